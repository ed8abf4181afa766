import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from forge.contract.compat import supports_bf16
from forge.errors import DataError, HardwareError
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
def test_gpu_plans_pick_the_arch_image_and_precision(tmp_path, name, cc, memory, arch):
    plan = build_plan("sft", "smollm2-135m-instruct", DATA, detect(Table((name, cc, memory))), tmp_path)
    assert plan.image.name.startswith(f"forge-runner:{arch}-")
    assert plan.train.dtype == ("bfloat16" if float(cc) >= 8.0 else "float16")


@pytest.mark.parametrize("name", ["Tesla T4", "Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"])
def test_t4_and_v100_get_a_turing_plan_in_float16(tmp_path, name):
    plan = build_plan("sft", "llama-3.2-1b-instruct", DATA, detect(Table(GPUS[name][:3])), tmp_path)
    assert (plan.hardware.accelerator, plan.image.arch, plan.train.dtype) == ("cuda", "turing", "float16")
    assert plan.image.name.startswith("forge-runner:turing-")
    assert any(reason.startswith("fp16 weights and compute") and "no bf16" in reason for reason in plan.reasons)
    # Unsloth on the T4; on a V100 (7.0) transformers + PEFT, as the image's xformers has no sm_70 code
    assert plan.train.backend == ("auto" if name == "Tesla T4" else "transformers")
    assert any("flash-attn 2 has no kernels" in reason for reason in plan.reasons)


@pytest.mark.parametrize("goal", ["sft", "smoke"])
def test_batches_come_nearest_the_presets_effective_batch(tmp_path, goal):
    from forge.host.catalog import preset

    small = detect(Table(("NVIDIA L4", "8.9", 23034)))
    plan = build_plan(goal, "llama-3.2-1b-instruct", DATA, small, tmp_path)
    effective, t = preset(goal).train.effective_batch, plan.train
    reached = t.micro_batch_size * t.gradient_accumulation
    assert all(abs(reached - effective) <= abs(t.micro_batch_size * steps - effective)
               for steps in range(1, 2 * effective + 2))


def test_a_card_that_fits_seven_gets_seven():
    """Not a power of two: an A100 40GB fits 7 sequences of Qwen2.5-1.5B at the sft preset's 1024 tokens (and
    not 8), so it gets 7 × 2, and the reasons say the 14 sequences per step are the nearest to the preset's 16."""
    plan = _plan_on("NVIDIA A100-SXM4-40GB", "qwen2.5-1.5b-instruct")
    assert (plan.train.micro_batch_size, plan.train.gradient_accumulation) == (7, 2)
    assert any("Micro-batch 7 (the largest whose estimate fits) × 2 accumulation = 14 sequences per step: the "
               "nearest to the preset's 16" in reason for reason in plan.reasons)


CATALOG_MODELS = ["smollm2-135m-instruct", "qwen2.5-0.5b-instruct", "llama-3.2-1b-instruct", "llama-3.2-3b-instruct",
                  "qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "mistral-nemo-12b-instruct", "gemma-2-9b-it"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(CATALOG_MODELS), cc=st.sampled_from(["7.0", "7.5", "8.0", "8.9", "9.0", "10.0"]),
       free_mib=st.integers(2000, 200000), seq_len=st.sampled_from([128, 256, 1000, 1024, 2048, 4096]),
       effective=st.integers(1, 200), quantization=st.sampled_from(["auto", "none", "4bit", "8bit"]),
       backend=st.sampled_from(["transformers", "unsloth"]))
def test_the_micro_batch_is_the_largest_whose_estimate_fits(model, cc, free_mib, seq_len, effective, quantization,
                                                            backend):
    """Over generated GPUs, models, lengths and batches: the planned micro-batch fits the budget, and either one
    more sequence would not or it is at the cap; no other accumulation comes nearer the effective batch."""
    from forge.host.catalog import models
    from forge.host.memory import Shape, estimate
    from forge.host.planner import MAX_MICRO_BATCH, memory_budget, size_batches

    entry = models()[model]
    hardware = detect(Table(("GPU", cc, free_mib + 500)))
    dtype = "bfloat16" if supports_bf16(cc) else "float16"
    try:
        sizing = size_batches(Shape.of(entry), hardware, seq_len, effective, dtype, entry.lora_targets, 16,
                              quantization, backend=backend)
    except HardwareError:
        assume(False)
    budget, _ = memory_budget(hardware)

    def total(micro: int) -> float:
        return estimate(Shape.of(entry), dtype=dtype, quantization=sizing.quantization, targets=entry.lora_targets,
                        rank=16, seq_len=seq_len, micro_batch=micro, checkpointing=sizing.checkpointing,
                        accelerator="cuda", backend=backend).total

    micro, accumulation = sizing.micro, sizing.accumulation
    assert total(micro) <= budget
    assert micro == min(effective, MAX_MICRO_BATCH) or total(micro + 1) > budget
    assert accumulation >= 1 and all(abs(micro * accumulation - effective) <= abs(micro * steps - effective)
                                     for steps in range(1, 2 * effective + 2))


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
    assert (t.quantization, t.dtype, t.backend) == ("4bit", "bfloat16", "auto")
    assert t.gradient_accumulation == max(1, round(16 / t.micro_batch_size + 1e-9))
    budget, _ = memory_budget(plan.hardware)

    def total(micro: int, checkpointing: bool) -> float:  # Unsloth: the GPU images' auto backend
        return estimate(Shape.of(models()["wayfarer-2-12b"]), dtype="bfloat16", quantization="4bit",
                        targets=t.lora.target_modules, rank=t.lora.r, seq_len=plan.prepare.max_length,
                        micro_batch=micro, checkpointing=checkpointing, accelerator="cuda", backend="unsloth",
                        lora_dropout=t.lora.dropout).total

    assert total(t.micro_batch_size, t.gradient_checkpointing) <= budget
    if t.micro_batch_size < 16:
        assert total(t.micro_batch_size + 1, t.gradient_checkpointing) > budget  # the largest that fits


@settings(max_examples=100, deadline=None)
@given(model=st.sampled_from(CATALOG_MODELS), quantization=st.sampled_from(["auto", "4bit"]),
       sizes=st.lists(st.integers(8000, 200000), min_size=2, max_size=5, unique=True))
def test_more_memory_never_means_more_recomputation_or_a_smaller_micro_batch(model, quantization, sizes):
    """More memory turns checkpointing off, never on, and with the same checkpointing never plans a smaller
    micro-batch (turning checkpointing off can: no recomputation for fewer sequences at a time)."""
    plans = []
    for mib in sorted(sizes):
        try:
            plans.append(build_plan("sft", model, DATA, detect(Table(("GPU", "9.0", mib))), Path("."),
                                    quantization=quantization).train)
        except HardwareError:
            continue
    for smaller, larger in zip(plans, plans[1:]):
        assert larger.gradient_checkpointing <= smaller.gradient_checkpointing
        if larger.gradient_checkpointing == smaller.gradient_checkpointing and larger.quantization == smaller.quantization:
            assert larger.micro_batch_size >= smaller.micro_batch_size


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


def _explained(plan, monkeypatch) -> str:
    from rich.console import Console

    from forge.host import render
    from forge.host.planner import explain

    output = io.StringIO()
    monkeypatch.setattr(render, "out_console", Console(file=output, width=250, highlight=False))
    render.memory_breakdown(*explain(plan))
    return output.getvalue()


def _only_cpu_calibration(monkeypatch):
    """The stored calibration files measured on a CPU (GPU files come and go; these tests must not)."""
    from forge.host import calibration

    cpu = tuple(r for r in calibration.records() if all(p.setting.accelerator == "cpu" for p in r.points))
    monkeypatch.setattr(calibration, "records", lambda: cpu)
    return cpu


def _row(text: str, component: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"│ {component} "))


@pytest.mark.parametrize("gpu", WAYFARER_BOXES)
def test_explain_reads_well_for_wayfarer_qlora(gpu, monkeypatch):
    _only_cpu_calibration(monkeypatch)
    plan = _plan_on(gpu, "wayfarer-2-12b", "4bit")
    text = _explained(plan, monkeypatch)
    for row in ("weights", "LoRA params + grads + AdamW", "activations", "logits and loss", "framework overhead",
                "total", "fits?"):
        assert f"│ {row} " in text
    assert f"planned: 4bit, micro {plan.train.micro_batch_size}" in text and "bfloat16 weights" in text
    assert "GPU memory (90% of free)" in text
    # nothing has been measured on a GPU here: every GPU figure says it is first principles
    for row in ("weights", "activations", "logits and loss", "framework overhead", "total"):
        assert "estimated (first principles)" in _row(text, row) and "✓" not in _row(text, row)


def test_explain_marks_a_cpu_plan_calibrated_on_the_cpu_file(monkeypatch):
    records = _only_cpu_calibration(monkeypatch)
    assert [r.path for r in records] == ["plans/calibration/cpu-smollm2-135m-instruct.json"]
    plan = build_plan("smoke", "smollm2-135m-instruct", DATA, detect(Table(problem="x")), Path("."))
    text = _explained(plan, monkeypatch)
    for row in ("weights", "activations", "logits and loss", "framework overhead", "total"):
        assert "calibrated on CPU [1]" in _row(text, row) and "~" not in _row(text, row)
    assert "[1] CPU, plans/calibration/cpu-smollm2-135m-instruct.json (smollm2-135m-instruct; 24 points)" in text


def test_explain_marks_follow_what_was_measured(monkeypatch):
    """A GPU file of transformers + PEFT points (bf16, no quantization, no checkpointing) calibrates a plan of
    exactly those settings when the estimate is within ±15% there, and says it is off when it is not; for
    Unsloth (auto) it speaks only for the terms that do not depend on the backend; checkpointed activations
    and 4-bit weights it does not measure at all."""
    from forge.host import calibration
    from forge.host.calibration import Point, Record, Setting

    measured = Setting("cuda", "transformers", "bfloat16", "none", False)
    close = Record("plans/calibration/h200-test.json", "NVIDIA H200", ("qwen2.5-0.5b-instruct",),
                   (Point(measured, 0.9), Point(measured, 1.0), Point(measured, 1.12)))
    monkeypatch.setattr(calibration, "records", lambda: (close,))
    plan = _plan_on("NVIDIA H100 80GB HBM3", "llama-3.2-1b-instruct")
    assert (plan.train.backend, plan.train.quantization, plan.train.gradient_checkpointing) == ("auto", "none", False)
    transformers = plan.model_copy(update={"train": plan.train.model_copy(update={"backend": "transformers"})})

    text = _explained(transformers, monkeypatch)
    for row in ("weights", "LoRA params + grads + AdamW", "activations", "logits and loss", "framework overhead",
                "total"):
        assert "calibrated on NVIDIA H200 [1]" in _row(text, row)
    assert "[1] NVIDIA H200, plans/calibration/h200-test.json (qwen2.5-0.5b-instruct; 3 points)" in text
    assert _row(text, "activations").count("~") == 1  # the checkpointing alternative: not measured

    text = _explained(plan, monkeypatch)  # Unsloth
    for row in ("weights", "LoRA params + grads + AdamW"):
        assert "calibrated on NVIDIA H200 [1]" in _row(text, row)
    for row in ("activations", "logits and loss", "framework overhead", "total"):
        assert "estimated (first principles)" in _row(text, row)

    qlora = _plan_on("NVIDIA GeForce RTX 4090", "wayfarer-2-12b", "4bit")
    assert "estimated (first principles)" in _row(_explained(qlora, monkeypatch), "weights")

    far = Record(close.path, close.device, close.models, (Point(measured, 1.0), Point(measured, 2.5)))
    monkeypatch.setattr(calibration, "records", lambda: (far,))
    text = _explained(transformers, monkeypatch)
    for row in ("weights", "activations", "logits and loss", "total"):
        assert "off on NVIDIA H200 [1]: estimate 1.00–2.50× measured" in _row(text, row) and "✓" not in _row(text, row)
        assert "!" in _row(text, row)


def test_a_local_model_is_planned_from_its_config_json(tmp_path):
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 1024, "num_attention_heads": 16, '
                                       '"num_key_value_heads": 4, "num_hidden_layers": 12, "intermediate_size": 2816, '
                                       '"vocab_size": 32000, "tie_word_embeddings": false}')
    plan = build_plan("sft", str(model), DATA, detect(Table(GPUS["NVIDIA L4"][:3])), tmp_path)
    assert plan.train.micro_batch_size > 1
    assert any("estimated" in reason and "GiB peak" in reason for reason in plan.reasons)


def _known_parts():
    from forge.host.gpus import parts

    return sorted(parts())


@pytest.mark.parametrize("name", _known_parts())
def test_target_plans_for_each_known_part_as_the_card_itself(name, tmp_path):
    """`--target NAME`: the plan a box with that card (idle) would get, said to be planned for a target."""
    from forge.contract.compat import arch_for
    from forge.contract.plan import Gpu
    from forge.contract.plan_io import dump_plan, parse_plan
    from forge.host.detect import GpuReport
    from forge.host.gpus import IDLE_RESERVED_MIB, TargetProvider, parts

    part = parts()[name]
    plan = build_plan("sft", "llama-3.2-1b-instruct", DATA, detect(TargetProvider(name)), tmp_path)
    hardware = plan.hardware
    assert hardware.target == name and plan.reasons[0] == hardware.note
    assert hardware.note.startswith(f"Planned for --target {name}:") and "not detected on this machine" in hardware.note
    assert (hardware.accelerator, plan.image.arch) == ("cuda", arch_for(part.compute_capability))
    assert [(g.name, g.compute_capability, g.memory_total_mib) for g in hardware.gpus] == [
        (part.product, part.compute_capability, part.memory_mib)]
    assert plan.train.dtype == ("bfloat16" if part.bf16 else "float16")

    idle = Gpu(index=0, uuid="GPU-real", name=part.product, compute_capability=part.compute_capability,
               memory_total_mib=part.memory_mib, memory_free_mib=part.memory_mib - IDLE_RESERVED_MIB)
    on_the_box = build_plan("sft", "llama-3.2-1b-instruct", DATA,
                            detect(type("Box", (), {"report": lambda self: GpuReport(gpus=[idle])})()), tmp_path)
    assert on_the_box.train == plan.train and on_the_box.hardware.target is None
    assert parse_plan(dump_plan(plan), tmp_path / "forge.yaml") == plan


@settings(max_examples=200, deadline=None)
@given(model=st.sampled_from(CATALOG_MODELS), seq_len=st.sampled_from([128, 512, 2048, 8192]),
       micro=st.integers(1, 64), quantization=st.sampled_from(["none", "4bit"]), dtype=st.sampled_from(["bfloat16", "float16"]))
def test_the_estimate_follows_the_backend(model, seq_len, micro, quantization, dtype):
    """Unsloth's chunked loss never holds all the logits, and its offloaded checkpointing keeps no layer input on
    the GPU (so depth does not add to it); what the backend does not touch is the same; the default is
    transformers, the estimate the calibration files were measured against."""
    from dataclasses import replace

    from forge.host.catalog import models
    from forge.host.memory import UNSLOTH_CE_CHUNK, Shape, estimate

    entry = models()[model]
    shape = Shape.of(entry)

    def peak(shape, backend=None, checkpointing=True):
        return estimate(shape, dtype=dtype, quantization=quantization, targets=entry.lora_targets, rank=16,
                        seq_len=seq_len, micro_batch=micro, checkpointing=checkpointing, accelerator="cuda",
                        **({"backend": backend} if backend else {}))

    transformers, unsloth = peak(shape, "transformers"), peak(shape, "unsloth")
    assert peak(shape) == transformers
    assert (unsloth.lora, unsloth.overhead) == (transformers.lora, transformers.overhead)
    # unquantized embeddings: float32 after PEFT's k-bit preparation, 16-bit in Unsloth
    assert (unsloth.weights == transformers.weights) if quantization == "none" else unsloth.weights < transformers.weights
    full_logits = micro * seq_len * shape.vocab * (2 + 4 * 4)
    assert unsloth.logits <= min(full_logits, UNSLOTH_CE_CHUNK) + micro * seq_len * shape.hidden * 2
    deeper = replace(shape, layers=shape.layers * 2)
    assert peak(deeper, "unsloth").activations == unsloth.activations
    assert peak(deeper, "transformers").activations > transformers.activations
    assert peak(shape, "unsloth", False).activations == peak(shape, "transformers", False).activations
