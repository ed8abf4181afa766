import pytest
from pathlib import Path

from forge.errors import DataError
from forge.host.detect import detect
from forge.host.planner import build_plan
from tests.conftest import EXAMPLES
from tests.test_detect import DEVICES, Table

DATA = [str(EXAMPLES / "alpaca-sample.jsonl")]


def test_cpu_plan_says_why(tmp_path):
    plan = build_plan("smoke", "smollm2-135m-instruct", DATA, detect(Table(problem="no NVIDIA driver found")), tmp_path)
    assert plan.image.name.startswith("forge-runner:cpu-")
    assert plan.train.dtype == "float32"
    assert any("no NVIDIA driver found" in reason for reason in plan.reasons)
    assert any(reason.startswith("Micro-batch") for reason in plan.reasons)


@pytest.mark.parametrize("name, cc, memory, arch", DEVICES)
def test_gpu_plans_pick_the_arch_image_and_bf16(tmp_path, name, cc, memory, arch):
    plan = build_plan("sft", "smollm2-135m-instruct", DATA, detect(Table((name, cc, memory))), tmp_path)
    assert plan.image.name.startswith(f"forge-runner:{arch}-")
    assert plan.train.dtype == "bfloat16"


@pytest.mark.parametrize("goal", ["sft", "smoke"])
def test_batches_reach_the_presets_effective_batch(tmp_path, goal):
    from forge.host.catalog import preset

    small = detect(Table(("NVIDIA L4", "8.9", 23034)))
    plan = build_plan(goal, "llama-3.2-1b-instruct", DATA, small, tmp_path)
    effective = preset(goal).train.effective_batch
    assert plan.train.micro_batch_size * plan.train.gradient_accumulation >= effective
    assert plan.train.micro_batch_size & (plan.train.micro_batch_size - 1) == 0


def test_more_memory_never_means_a_smaller_micro_batch(tmp_path):
    sizes = [
        build_plan("sft", "llama-3.2-1b-instruct", DATA, detect(Table(("GPU", "9.0", mib))), tmp_path).train.micro_batch_size
        for mib in (8000, 24000, 80000)
    ]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_data_paths_are_stored_relative_to_the_plan(tmp_path):
    plan = build_plan("smoke", "smollm2-135m-instruct", DATA, detect(Table(problem="x")), tmp_path)
    assert (tmp_path / plan.data.inputs[0].path).resolve() == Path(DATA[0]).resolve()


def test_missing_data_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as err:
        build_plan("smoke", "smollm2-135m-instruct", [str(tmp_path / "nope.jsonl")], detect(Table(problem="x")), tmp_path)
    assert "nope.jsonl" in err.value.message and err.value.hint


def test_globs_are_kept_as_patterns_and_must_match(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    plan = build_plan("smoke", "smollm2-135m-instruct", [str(tmp_path / "*.jsonl")], detect(Table(problem="x")), tmp_path,
                      fmt="alpaca")
    assert [(i.path, i.format) for i in plan.data.inputs] == [("*.jsonl", "alpaca")]
    with pytest.raises(DataError, match="No files match"):
        build_plan("smoke", "smollm2-135m-instruct", [str(tmp_path / "*.csv")], detect(Table(problem="x")), tmp_path)


@pytest.mark.parametrize("model_type, expected", [("gpt2", ["c_attn", "c_proj"]),
                                                  ("phi3", ["qkv_proj", "o_proj"]),
                                                  ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                                  ("brand-new", ["q_proj", "k_proj", "v_proj", "o_proj"])])
def test_local_models_get_lora_targets_for_their_architecture(tmp_path, model_type, expected):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    plan = build_plan("smoke", str(model), DATA, detect(Table(problem="no GPU")), tmp_path)
    assert plan.train.lora.target_modules == expected
    assert any(model_type in reason and "LoRA on" in reason for reason in plan.reasons)
    if model_type == "brand-new":
        assert any("check them" in reason for reason in plan.reasons)
