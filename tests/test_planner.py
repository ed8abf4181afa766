import io
from pathlib import Path

import pytest

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


GPUS = {name: device for device in DEVICES for name in [device[0]]}
WAYFARER_BOXES = ["NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3", "NVIDIA B200"]


def _plan_on(gpu_name: str, model: str, quantization: str = "auto", goal: str = "sft"):
    name, cc, memory, _ = GPUS[gpu_name]
    return build_plan(goal, model, DATA, detect(Table((name, cc, memory))), Path("."), quantization=quantization)


@pytest.mark.parametrize("gpu", WAYFARER_BOXES)
def test_qlora_wayfarer_plans_the_largest_micro_batch_that_fits(gpu):
    from forge.host.catalog import models
    from forge.host.memory import Shape, estimate
    from forge.host.planner import memory_budget

    plan = _plan_on(gpu, "wayfarer-2-12b", "4bit")
    t = plan.train
    assert (t.quantization, t.dtype) == ("4bit", "bfloat16")
    assert t.micro_batch_size * t.gradient_accumulation >= 16
    budget, _ = memory_budget(plan.hardware)

    def total(micro: int, checkpointing: bool) -> float:
        return estimate(Shape.of(models()["wayfarer-2-12b"]), dtype="bfloat16", quantization="4bit",
                        targets=t.lora.target_modules, rank=t.lora.r, seq_len=plan.prepare.max_length,
                        micro_batch=micro, checkpointing=checkpointing, accelerator="cuda").total

    assert total(t.micro_batch_size, t.gradient_checkpointing) <= budget
    if t.micro_batch_size * 2 <= 16:
        assert total(t.micro_batch_size * 2, t.gradient_checkpointing) > budget  # the largest that fits


def test_more_memory_never_plans_a_smaller_qlora_micro_batch():
    micro = [_plan_on(gpu, "wayfarer-2-12b", "4bit").train.micro_batch_size for gpu in WAYFARER_BOXES]
    assert micro == sorted(micro) and micro[0] < micro[-1]


def test_auto_quantization_picks_4bit_only_when_16_bit_weights_do_not_fit():
    assert _plan_on("NVIDIA GeForce RTX 4090", "wayfarer-2-12b").train.quantization == "4bit"
    assert _plan_on("NVIDIA H100 80GB HBM3", "wayfarer-2-12b").train.quantization == "none"
    assert _plan_on("NVIDIA GeForce RTX 4090", "llama-3.2-1b-instruct").train.quantization == "none"


def test_a_model_too_large_for_the_machine_is_a_clear_error():
    from forge.errors import HardwareError

    with pytest.raises(HardwareError) as error:
        build_plan("sft", "wayfarer-2-12b", DATA, detect(Table(problem="no GPU")), Path("."))
    assert "GiB" in error.value.message and "smaller model" in error.value.hint


def test_the_catalogs_parameter_counts_follow_from_the_architecture_numbers():
    """A typo in layers, widths or vocab shows up as a parameter count that no longer adds up."""
    from forge.host.catalog import models

    for name, m in models().items():
        attention = m.hidden * m.heads * m.attention_dim * 2 + 2 * m.hidden * m.kv_heads * m.attention_dim
        counted = m.vocab * m.hidden * (1 if m.tied_embeddings else 2) + m.layers * (attention + 3 * m.hidden * m.intermediate)
        assert counted / 1e6 == pytest.approx(m.params_m, rel=0.01), name


@pytest.mark.parametrize("gpu", WAYFARER_BOXES)
def test_explain_reads_well_for_wayfarer_qlora(gpu, monkeypatch):
    from rich.console import Console

    from forge.host import render
    from forge.host.planner import explain

    output = io.StringIO()
    monkeypatch.setattr(render, "out_console", Console(file=output, width=200, highlight=False))
    plan = _plan_on(gpu, "wayfarer-2-12b", "4bit")
    render.memory_breakdown(*explain(plan))
    text = output.getvalue()
    for row in ("weights", "LoRA params + grads + AdamW", "activations", "logits (fp32 loss)", "framework overhead",
                "total", "fits?"):
        assert row in text
    assert f"planned: 4bit, micro {plan.train.micro_batch_size}" in text and "bfloat16 weights" in text
    assert "GPU memory (90% of free)" in text


def test_a_local_model_is_planned_from_its_config_json(tmp_path):
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 1024, "num_attention_heads": 16, '
                                       '"num_key_value_heads": 4, "num_hidden_layers": 12, "intermediate_size": 2816, '
                                       '"vocab_size": 32000, "tie_word_embeddings": false}')
    plan = build_plan("sft", str(model), DATA, detect(Table(GPUS["NVIDIA L4"][:3])), tmp_path)
    assert plan.train.micro_batch_size > 1
    assert any("estimated" in reason and "GiB peak" in reason for reason in plan.reasons)
