"""Turn a goal, a model, data and the detected hardware into a Plan, recording why at each choice.

Memory decides: precision (bf16 on every Forge GPU), quantization (4-bit when 16-bit weights do not fit),
gradient checkpointing (when a micro-batch of a few sequences does not fit without it), and the largest
power-of-two micro-batch under the headroom, with gradient accumulation for the preset's effective batch.
The estimate is `memory.estimate`; `forge plan --explain` prints its breakdown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from forge import __version__
from forge.contract.plan import (
    DataSpec,
    Hardware,
    ImageSpec,
    InputSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    Plan,
    PrepareSpec,
    SplitSpec,
    TrainSpec,
)
from forge.errors import ConfigError, HardwareError
from forge.host import catalog
from forge.host.memory import Breakdown, Shape, estimate
from forge.host.mounts import expand

GIB = 1024**3
HEADROOM = 0.9
MAX_MICRO_BATCH = 64
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def image_name(arch: str) -> str:
    return f"forge-runner:{arch}-{__version__}"


def build_plan(goal: str, model: str, data: list[str], hardware: Hardware, plan_dir: Path, fmt: str = "auto",
               quantization: str = "auto") -> Plan:
    preset = catalog.preset(goal)
    name, entry, source = catalog.resolve_model(model)
    reasons = [hardware.note]
    inputs = []
    for given in data:
        absolute = os.path.join(os.getcwd(), given)  # an absolute path stays as it is
        expand(absolute, plan_dir, typed=given)  # fails now, naming the input, rather than in the container
        inputs.append(InputSpec(path=os.path.relpath(absolute, plan_dir.resolve()), format=fmt))

    dtype = "bfloat16" if hardware.accelerator == "cuda" else "float32"
    reasons.append(
        "bf16 weights and compute: every Forge GPU has compute capability ≥ 8.0."
        if dtype == "bfloat16"
        else "float32 on CPU: bf16 matmuls are slow or missing on most CPUs."
    )
    if entry is not None:
        targets = entry.lora_targets
    else:
        known, model_type = catalog.lora_targets_for(Path(source.path))
        targets = known or DEFAULT_LORA_TARGETS
        reasons.append(f"Local {model_type} model: LoRA on {', '.join(targets)} "
                       + ("(plans/lora_targets.yaml)." if known else
                          "(not in plans/lora_targets.yaml: the usual attention names; check them)."))
    shape = catalog.shape_of(entry, source)
    sizing = size_batches(shape, hardware, preset.prepare.max_length, preset.train.effective_batch, dtype,
                          targets, preset.lora.r, quantization)
    reasons.extend(sizing.reasons)
    reasons.append("Attention: PyTorch SDPA (memory-efficient kernels, no sequence² memory, on every image); "
                   "flash_attention_2 needs an image built with FLASH_ATTN=1.")

    return Plan(
        forge_version=__version__,
        goal=goal,
        model=ModelSpec(name=name, source=source, chat_template=entry.chat_template if entry else "model"),
        hardware=hardware,
        image=ImageSpec(name=image_name(hardware.arch), arch=hardware.arch),
        data=DataSpec(inputs=inputs),
        prepare=PrepareSpec(
            max_length=preset.prepare.max_length,
            split=SplitSpec(val=preset.prepare.val_fraction),
            shard_rows=shard_rows(hardware, preset.prepare.max_length),
        ),
        train=TrainSpec(
            epochs=preset.train.epochs,
            max_steps=preset.train.max_steps,
            micro_batch_size=sizing.micro,
            gradient_accumulation=sizing.accumulation,
            quantization=sizing.quantization,
            gradient_checkpointing=sizing.checkpointing,
            attention="sdpa",
            learning_rate=preset.train.learning_rate,
            warmup_steps=preset.train.warmup_steps,
            save_every=preset.train.save_every,
            keep_last=preset.train.keep_last,
            dtype=dtype,
            lora=LoraSpec(**preset.lora.model_dump(), target_modules=targets),
        ),
        output=OutputSpec(),
        reasons=reasons,
    )


def shard_rows(hardware: Hardware, max_length: int) -> int:
    """Rows per prepare shard. A shard is held in memory while it is processed (~30 KB per 256-token row
    measured, mostly Python lists of token ids), so it gets 1/16 of available RAM, at most 512 MiB."""
    per_row = max_length * 80 + 8192
    budget = min(hardware.ram_available_mib * 1024**2 / 16, 512 * 1024**2)
    return int(max(1000, min(50000, budget // per_row)) // 1000 * 1000)


@dataclass(frozen=True)
class Sizing:
    micro: int
    accumulation: int
    quantization: str
    checkpointing: bool
    reasons: list[str]


def memory_budget(hardware: Hardware) -> tuple[float, str]:
    if hardware.accelerator == "cuda":
        budget = min(gpu.memory_free_mib for gpu in hardware.gpus) * 1024**2 * HEADROOM
        return budget, f"{budget / GIB:.1f} GiB of GPU memory ({HEADROOM:.0%} of free)"
    budget = hardware.ram_available_mib * 1024**2 * HEADROOM / 2  # leave half for the data pipeline
    return budget, f"{budget / GIB:.1f} GiB of RAM (half of {HEADROOM:.0%} of available)"


def size_batches(shape: Shape | None, hardware: Hardware, seq_len: int, effective: int, dtype: str,
                 targets: list[str], rank: int, quantization: str = "auto") -> Sizing:
    """Quantization, checkpointing and the largest power-of-two micro-batch whose estimate fits the budget."""
    cuda = hardware.accelerator == "cuda"
    if quantization not in ("auto", "none") and not cuda:
        raise ConfigError(f"--quantization {quantization} needs a CUDA GPU (bitsandbytes); this plan is for the CPU.",
                          "Use --quantization none (or auto) for CPU plans.")
    if shape is None:
        return Sizing(1, effective, "none" if quantization == "auto" else quantization, False,
                      [f"Unknown architecture: micro-batch 1 × {effective} accumulation steps (safe default)."])
    budget, where = memory_budget(hardware)
    peak = _estimator(shape, hardware, dtype, targets, rank, seq_len)
    reasons = []
    if quantization == "auto":
        quantization = "none"
        if cuda and peak("none", 1, True).total > budget:
            quantization = "4bit"
            reasons.append(f"4-bit QLoRA: 16-bit weights need {peak('none', 1, True).total / GIB:.1f} GiB at one "
                           f"sequence with checkpointing, over {where}.")
    if peak(quantization, 1, True).total > budget:
        raise HardwareError(
            f"{quantization if quantization != 'none' else '16-bit'} training needs "
            f"{peak(quantization, 1, True).total / GIB:.1f} GiB at one {seq_len}-token sequence with gradient "
            f"checkpointing; {where} is available.",
            "Pick a smaller model (--model), a goal with shorter sequences (the first argument, e.g. `forge plan "
            "smoke`; plans/presets.yaml), --quantization 4bit on a GPU, or free GPU memory.")
    limit = min(effective, MAX_MICRO_BATCH)
    checkpointing = peak(quantization, min(4, limit), False).total > budget
    micro = 1
    while micro * 2 <= limit and peak(quantization, micro * 2, checkpointing).total <= budget:
        micro *= 2
    accumulation = max(1, -(-effective // micro))
    chosen = peak(quantization, micro, checkpointing)
    reasons.append(
        f"Micro-batch {micro} × {accumulation} accumulation = {micro * accumulation} sequences per step: an "
        f"estimated {chosen.total / GIB:.2f} GiB peak at {seq_len} tokens fits {where}"
        + (" with gradient checkpointing (without it a few sequences would not)." if checkpointing else ".")
        + " `forge plan --explain` shows the breakdown."
    )
    return Sizing(micro, accumulation, quantization, checkpointing, reasons)


def _estimator(shape: Shape, hardware: Hardware, dtype: str, targets: list[str], rank: int, seq_len: int):
    """`peak(quantization, micro_batch, checkpointing)`: the estimate for one model, machine and LoRA setup."""

    def peak(quantization: str, micro: int, checkpointing: bool) -> Breakdown:
        return estimate(shape, dtype=dtype, quantization=quantization, targets=targets, rank=rank, seq_len=seq_len,
                        micro_batch=micro, checkpointing=checkpointing, accelerator=hardware.accelerator)

    return peak


def _plan_estimator(plan: Plan):
    """The estimator for a written plan's model, machine and LoRA setup, or None when the shape is unknown."""
    _, entry, source = catalog.resolve_model(plan.model.name if plan.model.source.kind != "local"
                                             else plan.model.source.path)
    shape = catalog.shape_of(entry, source)
    if shape is None:
        return None
    t = plan.train
    return _estimator(shape, plan.hardware, t.dtype, t.lora.target_modules, t.lora.r, plan.prepare.max_length)


def planned_peak(plan: Plan) -> Breakdown | None:
    """The estimate for the settings the plan holds, or None when the model's shape is unknown."""
    peak, t = _plan_estimator(plan), plan.train
    return None if peak is None else peak(t.quantization, t.micro_batch_size, t.gradient_checkpointing)


def explain(plan: Plan) -> tuple[list[tuple[str, Breakdown]], float, str]:
    """The planned run's memory breakdown next to the alternatives the planner weighed, and the budget."""
    budget, where = memory_budget(plan.hardware)
    peak = _plan_estimator(plan)
    if peak is None:
        return [], budget, where
    t = plan.train
    label = f"planned: {t.quantization if t.quantization != 'none' else t.dtype}, micro {t.micro_batch_size}" + (
        ", checkpointing" if t.gradient_checkpointing else "")
    columns = [(label, peak(t.quantization, t.micro_batch_size, t.gradient_checkpointing))]
    if t.micro_batch_size * 2 <= t.micro_batch_size * t.gradient_accumulation:  # a larger micro-batch was an option
        columns.append((f"micro {t.micro_batch_size * 2}" + (", checkpointing" if t.gradient_checkpointing else ""),
                        peak(t.quantization, t.micro_batch_size * 2, t.gradient_checkpointing)))
    if not t.gradient_checkpointing:
        columns.append((f"micro {t.micro_batch_size}, checkpointing", peak(t.quantization, t.micro_batch_size, True)))
    if t.quantization != "none":
        columns.append((f"{t.dtype} weights, micro 1, checkpointing", peak("none", 1, True)))
    return columns, budget, where
