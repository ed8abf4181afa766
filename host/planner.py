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
    InputSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    Plan,
    PrepareSpec,
    SplitSpec,
    TrainSpec,
)
from forge.host import catalog
from forge.host.mounts import expand

GIB = 1024**3
HEADROOM = 0.9
MAX_MICRO_BATCH = 64
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def image_name(arch: str) -> str:
    return f"forge-runner:{arch}-{__version__}"


def build_plan(goal: str, model: str, data: list[str], hardware: Hardware, plan_dir: Path, fmt: str = "auto") -> Plan:
    preset = catalog.preset(goal)
    name, entry, source = catalog.resolve_model(model)
    reasons = [hardware.note]
    inputs = []
    for given in data:
        absolute = os.path.join(os.getcwd(), given)  # an absolute path stays as it is
        expand(absolute, plan_dir)  # fails now, naming the input, rather than in the container
        inputs.append(InputSpec(path=os.path.relpath(absolute, plan_dir.resolve()), format=fmt))

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
    if entry is not None:
        targets = entry.lora_targets
    else:
        known, model_type = catalog.lora_targets_for(Path(source.path))
        targets = known or DEFAULT_LORA_TARGETS
        reasons.append(f"Local {model_type} model: LoRA on {', '.join(targets)} "
                       + ("(plans/lora_targets.yaml)." if known else
                          "(not in plans/lora_targets.yaml: the usual attention names; check them)."))

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


def shard_rows(hardware: Hardware, max_length: int) -> int:
    """Rows per prepare shard. A shard is held in memory while it is processed (~30 KB per 256-token row
    measured, mostly Python lists of token ids), so it gets 1/16 of available RAM, at most 512 MiB."""
    per_row = max_length * 80 + 8192
    budget = min(hardware.ram_available_mib * 1024**2 / 16, 512 * 1024**2)
    return int(max(1000, min(50000, budget // per_row)) // 1000 * 1000)


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
