"""Turn a goal, a model, data and the detected hardware into a Plan, recording why at each choice.

The memory estimate here is deliberately simple (weights + LoRA optimizer state + activations per
sequence); it is what sizes the micro-batch so the effective batch from the preset is reached with
gradient accumulation.
"""

from __future__ import annotations

import os
from pathlib import Path

from forge import __version__
from forge.contract.plan import (
    DataSpec,
    Hardware,
    ImageSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    Plan,
    PrepareSpec,
    TrainSpec,
)
from forge.errors import DataError
from forge.host import catalog

GIB = 1024**3
HEADROOM = 0.9
MAX_MICRO_BATCH = 64
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def image_name(arch: str) -> str:
    return f"forge-runner:{arch}-{__version__}"


def build_plan(goal: str, model: str, data: list[Path], hardware: Hardware, plan_dir: Path) -> Plan:
    preset = catalog.preset(goal)
    name, entry, source = catalog.resolve_model(model)
    reasons = [hardware.note]
    missing = [str(path) for path in data if not path.is_file()]
    if missing:
        raise DataError(
            f"Data file not found: {', '.join(missing)}.",
            "Check the path (relative to the current directory) or pass --data with an existing JSONL file.",
        )

    dtype = "bfloat16" if hardware.accelerator == "cuda" else "float32"
    reasons.append(
        "bf16 weights and compute: every Forge GPU has compute capability ≥ 8.0."
        if dtype == "bfloat16"
        else "float32 on CPU: bf16 matmuls are slow or missing on most CPUs."
    )
    micro, accumulation, why = size_batches(
        entry, hardware, preset.prepare.max_length, preset.train.effective_batch, dtype
    )
    reasons.append(why)
    targets = entry.lora_targets if entry else DEFAULT_LORA_TARGETS
    if entry is None:
        reasons.append(f"Local model: LoRA on {', '.join(targets)} (the attention projections).")

    return Plan(
        forge_version=__version__,
        goal=goal,
        model=ModelSpec(name=name, source=source, chat_template=entry.chat_template if entry else "model"),
        hardware=hardware,
        image=ImageSpec(name=image_name(hardware.arch), arch=hardware.arch),
        data=DataSpec(paths=[os.path.relpath(path.resolve(), plan_dir.resolve()) for path in data]),
        prepare=PrepareSpec(**preset.prepare.model_dump()),
        train=TrainSpec(
            epochs=preset.train.epochs,
            max_steps=preset.train.max_steps,
            micro_batch_size=micro,
            gradient_accumulation=accumulation,
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


def size_batches(entry, hardware: Hardware, seq_len: int, effective: int, dtype: str) -> tuple[int, int, str]:
    """The largest power-of-two micro-batch that fits under the headroom, then accumulation for the rest."""
    if entry is None:
        return 1, effective, f"Unknown architecture: micro-batch 1 × {effective} accumulation steps (safe default)."
    dtype_bytes = 4 if dtype == "float32" else 2
    if hardware.accelerator == "cuda":
        budget = min(gpu.memory_free_mib for gpu in hardware.gpus) * 1024**2 * HEADROOM
        where = f"{budget / GIB:.1f} GiB of GPU memory ({HEADROOM:.0%} of free)"
    else:
        budget = hardware.ram_available_mib * 1024**2 * HEADROOM / 2  # leave half for the data pipeline
        where = f"{budget / GIB:.1f} GiB of RAM (half of {HEADROOM:.0%} of available)"
    fixed = entry.params_m * 1e6 * dtype_bytes * 1.2  # weights, plus LoRA params/grads/Adam and allocator slack
    per_sequence = entry.layers * seq_len * entry.hidden * dtype_bytes * 24 + seq_len * entry.vocab * 4 * 2
    fits = max(1, int((budget - fixed) // per_sequence))
    micro = 1
    while micro * 2 <= min(fits, effective, MAX_MICRO_BATCH):
        micro *= 2
    accumulation = max(1, -(-effective // micro))
    why = (
        f"Micro-batch {micro} × {accumulation} accumulation = {micro * accumulation} sequences per step: "
        f"~{fixed / GIB:.2f} GiB fixed + ~{per_sequence / GIB:.3f} GiB per {seq_len}-token sequence fits "
        f"{fits} in {where}."
    )
    return micro, accumulation, why
