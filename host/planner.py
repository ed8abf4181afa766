"""Turn a goal, a model, data and the detected (or targeted) hardware into a Plan, recording why at each choice.

The GPU decides precision (bf16 from compute capability 8.0, fp16 before) and the backend (Unsloth in the
GPU images, transformers + PEFT where Unsloth cannot run and on CPU). Memory decides the rest:
quantization (4-bit when 16-bit weights do not fit), gradient checkpointing (when a micro-batch of a few
sequences does not fit without it), and the largest micro-batch whose estimate fits under the headroom,
with the gradient accumulation that reaches the preset's effective batch. The estimate is
`memory.estimate` for the backend that will train; `forge plan --explain` prints its breakdown, each term
marked calibrated or estimated (forge.host.calibration).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from forge import __version__
from forge.contract.compat import UNSLOTH_MIN_CAPABILITY, parse_version, supports_bf16
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
from forge.host.calibration import TERM_DEPENDS, Basis, Setting, basis
from forge.host.memory import Breakdown, Shape, estimate, offloaded_bytes
from forge.host.mounts import expand

GIB = 1024**3
HEADROOM = 0.9
MAX_MICRO_BATCH = 64
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Unsloth sends attention through xformers whenever it imports, and the images' xformers (0.0.34,
# images/requirements-cuda.txt) has code for sm_75, sm_80 and sm_90 only: below 7.5 (V100) it cannot run.


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

    dtype, why = choose_dtype(hardware)
    reasons.append(why)
    backend, why = choose_backend(hardware)
    reasons.append(why)
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
                          targets, preset.lora.r, quantization, backend=resolved_backend(backend, hardware),
                          lora_dropout=preset.lora.dropout)
    reasons.extend(sizing.reasons)
    reasons.append("Attention: PyTorch SDPA (memory-efficient kernels, no sequence² memory, on every image); "
                   + ("flash-attn 2 has no kernels for this GPU (it needs compute capability 8.0)."
                      if dtype == "float16" else "flash_attention_2 needs an image built with FLASH_ATTN=1."))

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
            backend=backend,
            lora=LoraSpec(**preset.lora.model_dump(), target_modules=targets),
        ),
        output=OutputSpec(),
        reasons=reasons,
    )


def choose_dtype(hardware: Hardware) -> tuple[str, str]:
    """(train.dtype, why): bf16 where every planned GPU has it, fp16 on older GPUs, float32 on CPU."""
    if hardware.accelerator != "cuda":
        return "float32", "float32 on CPU: bf16 matmuls are slow or missing on most CPUs."
    if all(supports_bf16(gpu.compute_capability) for gpu in hardware.gpus):
        return "bfloat16", "bf16 weights and compute: compute capability ≥ 8.0 has bf16 tensor cores."
    lowest = min((gpu.compute_capability for gpu in hardware.gpus), key=parse_version)
    return "float16", (f"fp16 weights and compute, with loss scaling: compute capability {lowest} has no bf16 "
                       "(bf16 needs 8.0).")


def choose_backend(hardware: Hardware) -> tuple[str, str]:
    """(train.backend, why). `auto` runs Unsloth in the GPU images (which all have it) and transformers + PEFT
    on CPU; GPUs that Unsloth's attention cannot run on get transformers + PEFT by name."""
    if hardware.accelerator != "cuda":
        return "auto", "Backend: transformers + PEFT (the CPU image), the model's own loss over full logits."
    lowest = min((gpu.compute_capability for gpu in hardware.gpus), key=parse_version)
    if parse_version(lowest) < UNSLOTH_MIN_CAPABILITY:
        return "transformers", (f"Backend: transformers + PEFT with SDPA attention, not Unsloth: Unsloth routes "
                                f"attention through xformers, whose build in the image has no code for compute "
                                f"capability {lowest}.")
    return "auto", ("Backend: Unsloth (in every GPU image): its offloaded gradient checkpointing and chunked "
                    "cross-entropy loss, which the memory estimate follows.")


def resolved_backend(backend: str, hardware: Hardware) -> str:
    """What a plan's `train.backend` trains with (the runner's rule): auto is Unsloth on CUDA images."""
    if backend == "auto":
        return "unsloth" if hardware.accelerator == "cuda" else "transformers"
    return backend


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
                 targets: list[str], rank: int, quantization: str = "auto", *,
                 backend: str = "transformers", lora_dropout: float = 0.0) -> Sizing:
    """Quantization, checkpointing and the largest micro-batch (any size, up to the effective batch and
    MAX_MICRO_BATCH) whose estimate for `backend` fits the budget; accumulation to reach the effective batch."""
    cuda = hardware.accelerator == "cuda"
    if quantization not in ("auto", "none") and not cuda:
        raise ConfigError(f"--quantization {quantization} needs a CUDA GPU (bitsandbytes); this plan is for the CPU.",
                          "Use --quantization none (or auto) for CPU plans.")
    if shape is None:
        return Sizing(1, effective, "none" if quantization == "auto" else quantization, False,
                      [f"Unknown architecture: micro-batch 1 × {effective} accumulation steps (safe default)."])
    budget, where = memory_budget(hardware)
    peak = _estimator(shape, hardware, dtype, targets, rank, seq_len, backend, lora_dropout)
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
    micro = largest_fitting(lambda m: peak(quantization, m, checkpointing).total <= budget, limit)
    accumulation = nearest_accumulation(effective, micro)
    chosen = peak(quantization, micro, checkpointing)
    why_micro = ("the largest whose estimate fits" if micro < limit else
                 "the preset's effective batch" if limit == effective else f"Forge's cap ({MAX_MICRO_BATCH})")
    reasons.append(
        f"Micro-batch {micro} ({why_micro}) × {accumulation} accumulation = {micro * accumulation} sequences per "
        + ("step, the preset's effective batch" if micro * accumulation == effective else
           f"step: the nearest to the preset's {effective} in whole micro-batches of {micro}")
        + f". An estimated {chosen.total / GIB:.2f} GiB peak at {seq_len} tokens fits {where}"
        + (" with gradient checkpointing (without it a few sequences would not)." if checkpointing else ".")
        + " `forge plan --explain` shows the breakdown."
    )
    if checkpointing and backend == "unsloth":
        host = offloaded_bytes(shape, dtype=dtype, seq_len=seq_len, micro_batch=micro)
        reasons.append(f"Unsloth's checkpointing keeps every layer's input in pinned host RAM: {host / GIB:.1f} GiB "
                       "at this micro-batch, outside the GPU estimate.")
    return Sizing(micro, accumulation, quantization, checkpointing, reasons)


def nearest_accumulation(effective: int, micro: int) -> int:
    """Accumulation steps whose micro-batches come nearest the effective batch (ties above), at least one: a card
    that fits 15 of a preset's 16 trains 15 per step, not 30."""
    return max(1, (2 * effective + micro) // (2 * micro))


def largest_fitting(fits, limit: int) -> int:
    """The largest n in 1..limit with fits(n), for a `fits` that holds at 1 and, once false, stays false."""
    low, high = 1, limit
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _estimator(shape: Shape, hardware: Hardware, dtype: str, targets: list[str], rank: int, seq_len: int,
               backend: str = "transformers", lora_dropout: float = 0.0):
    """`peak(quantization, micro_batch, checkpointing)`: the estimate for one model, machine, backend and LoRA."""

    def peak(quantization: str, micro: int, checkpointing: bool) -> Breakdown:
        return estimate(shape, dtype=dtype, quantization=quantization, targets=targets, rank=rank, seq_len=seq_len,
                        micro_batch=micro, checkpointing=checkpointing, accelerator=hardware.accelerator,
                        backend=backend, lora_dropout=lora_dropout)

    return peak


def _plan_estimator(plan: Plan):
    """The estimator for a written plan's model, machine, backend and LoRA setup, or None when the shape is
    unknown."""
    _, entry, source = catalog.resolve_model(plan.model.name if plan.model.source.kind != "local"
                                             else plan.model.source.path)
    shape = catalog.shape_of(entry, source)
    if shape is None:
        return None
    t = plan.train
    return _estimator(shape, plan.hardware, t.dtype, t.lora.target_modules, t.lora.r, plan.prepare.max_length,
                      resolved_backend(t.backend, plan.hardware), t.lora.dropout)


def planned_peak(plan: Plan) -> Breakdown | None:
    """The estimate for the settings the plan holds, or None when the model's shape is unknown."""
    peak, t = _plan_estimator(plan), plan.train
    return None if peak is None else peak(t.quantization, t.micro_batch_size, t.gradient_checkpointing)


@dataclass(frozen=True)
class Column:
    """One setting in `forge plan --explain`: its estimate, and per term (and total) where the figure comes from."""

    label: str
    breakdown: Breakdown
    bases: dict[str, Basis]


def explain(plan: Plan) -> tuple[list[Column], float, str]:
    """The planned run's memory breakdown next to the alternatives the planner weighed, and the budget."""
    budget, where = memory_budget(plan.hardware)
    peak = _plan_estimator(plan)
    if peak is None:
        return [], budget, where
    t = plan.train
    backend = resolved_backend(t.backend, plan.hardware)

    def column(label: str, quantization: str, micro: int, checkpointing: bool) -> Column:
        setting = Setting(plan.hardware.accelerator, backend, t.dtype, quantization, checkpointing)
        return Column(label, peak(quantization, micro, checkpointing),
                      {term: basis(setting, term) for term in TERM_DEPENDS})

    ckpt = ", checkpointing" if t.gradient_checkpointing else ""
    micro = t.micro_batch_size
    columns = [column(f"planned: {t.quantization if t.quantization != 'none' else t.dtype}, micro {micro}{ckpt}",
                      t.quantization, micro, t.gradient_checkpointing)]
    if micro < min(micro * t.gradient_accumulation, MAX_MICRO_BATCH):  # a larger micro-batch was an option
        columns.append(column(f"micro {micro + 1}{ckpt}", t.quantization, micro + 1, t.gradient_checkpointing))
    if not t.gradient_checkpointing:
        columns.append(column(f"micro {micro}, checkpointing", t.quantization, micro, True))
    if t.quantization != "none":
        columns.append(column(f"{t.dtype} weights, micro 1, checkpointing", "none", 1, True))
    return columns, budget, where
