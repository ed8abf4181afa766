"""One command for Forge's first minutes on a GPU box: detection, the runner's training path, the planner's
memory figures against measured peaks, a real out-of-memory backoff and throughput, in one JSON report and a
readable summary. It enforces its own deadline and reports what it got by then.

    python bench/gpu_check.py --out gpu-check/                 # the GPU it finds, 8-minute deadline
    python bench/gpu_check.py --device cpu --out /tmp/check    # small shapes, seconds (the test suite runs this)

Needs no download, Docker or network: models are random-initialised from the catalog's architecture numbers
(plans/models.yaml), with SmolLM2's tokenizer from bench/assets. On a bare box with torch, transformers, peft
and accelerate, bring pydantic, trl and datasets (and bitsandbytes for the 4-bit points) as wheels; the
README's "First run on a GPU box" says how. Sections, each timed and allowed to fail alone:

- detection: `forge.host.detect` on the real device, the image family, and the plan for the bundled sample;
- selfcheck: `runner/selfcheck.py` against this torch and driver;
- training: a few steps of `ForgeSFTTrainer` (bf16, SDPA on CUDA) with the runner's own LoRA setup;
- throughput: tokens/s of `ForgeSFTTrainer` against a bare Hugging Face `Trainer` + PEFT, same model and data;
- oom: a micro-batch that cannot fit under a capped allocator (a real CUDA out-of-memory), backed off to the
  same effective batch with the same losses (on CPU the runner's simulated OOM hook);
- memory: per shape × sequence length × checkpointing × micro-batch, the measured peak beside
  `memory.estimate`'s, and (CUDA) the largest micro-batch that really fits under the planner's headroom of an
  emulated card beside the one the planner picks; 4-bit points where bitsandbytes imports.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import replace
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
try:
    import forge.host  # noqa: F401  (pip-installed)
except ModuleNotFoundError:  # a bare box: forge.host is host/, forge.runner runner/ (the product layout)
    import forge

    forge.__path__.append(str(REPO))

TOKENIZER = REPO / "bench" / "assets" / "smollm2-tokenizer"
SAMPLE = REPO / "examples" / "alpaca-sample.jsonl"
GPU_SHAPES = ["smollm2-135m-instruct", "qwen2.5-0.5b-instruct", "llama-3.2-1b-instruct", "qwen2.5-7b-instruct",
              "mistral-nemo-12b-instruct"]
FAMILIES = {"smollm2": "llama", "llama": "llama", "qwen2.5": "qwen2", "mistral": "mistral", "wayfarer": "mistral",
            "gemma-2": "gemma2", "phi-3": "phi3"}
MIB = 2**20
GIB = 2**30
BACKEND = "transformers"  # what this check trains with (PEFT + TRL's SFTTrainer): the estimate for that backend
SMALL = 2e9  # parameters: shapes up to this get the small emulated card, 3 grid micro-batches and 4-bit points


class Check:
    """The report, the deadline, and the work folder; `section` runs one part and records how it ended."""

    grace_s = 30.0  # past the deadline, for the point in flight to finish before the watchdog ends the process

    def __init__(self, out: Path, device: str, deadline_s: float) -> None:
        self.out, self.device, self.cuda = out, device, device == "cuda"
        self.started = time.monotonic()
        self.deadline_s = deadline_s
        self.work = Path(tempfile.mkdtemp(prefix="forge-gpu-check-"))
        out.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.report = {"command": " ".join(["python", *sys.argv]), "device": device, "deadline_s": deadline_s,
                       "finished": False, "environment": _environment(), "sections": {}}

    def remaining(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)

    def section(self, name: str, fn, *args):
        record = self.report["sections"].setdefault(name, {})
        if self.remaining() < 5:
            record.update(status="skipped", reason="deadline reached before this section")
            self.write()
            return None
        started = time.monotonic()
        record["status"] = "running"
        try:
            result = fn(record, *args)
            if record["status"] == "running":  # a section may say skipped or failed itself
                record["status"] = "ok"
            return result
        except Exception as exc:  # one part failing must not lose the others
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                          traceback=traceback.format_exc()[-4000:])
            return None
        finally:
            record["seconds"] = round(time.monotonic() - started, 2)
            self.write()

    def write(self, finished: bool = False) -> None:
        with self.lock:
            self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.report["finished"] = finished
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic(self.out / "report.json", json.dumps(self.report, indent=1, default=str) + "\n")
            _atomic(self.out / "summary.md", summary(self.report))

    def watchdog(self) -> None:
        """Past the deadline (plus a grace period for the point in flight) the report is written as it stands
        and the process ends: a hung kernel or a stuck download never eats the box's time."""
        def expire():
            self.report["deadline_hit"] = True
            self.write()
            print(f"gpu_check: deadline of {self.deadline_s:.0f} s passed; report written to {self.out}", flush=True)
            os._exit(3)

        timer = threading.Timer(self.deadline_s + self.grace_s, expire)
        timer.daemon = True
        timer.start()


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _environment() -> dict:
    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "pydantic",
                 "nvidia-ml-py"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(), **versions}


# --- detection and the image's own check -------------------------------------------------------------------------

def detection(record: dict, check: Check):
    from forge.contract.compat import arch_for
    from forge.contract.plan_io import dump_plan
    from forge.host import detect, planner

    hardware = detect.detect()
    record["hardware"] = hardware.model_dump(mode="json")
    record["families"] = {gpu.uuid: arch_for(gpu.compute_capability) for gpu in hardware.gpus}
    plan = planner.build_plan("sft", "smollm2-135m-instruct", [str(SAMPLE)], hardware, check.out)
    _atomic(check.out / "forge.yaml", dump_plan(plan))
    record["plan"] = {"image": plan.image.name, "dtype": plan.train.dtype, "micro_batch": plan.train.micro_batch_size,
                      "gradient_accumulation": plan.train.gradient_accumulation,
                      "quantization": plan.train.quantization, "checkpointing": plan.train.gradient_checkpointing,
                      "reasons": plan.reasons}
    if check.cuda and hardware.accelerator != "cuda":
        record["status"] = "failed"
        record["error"] = f"torch sees a GPU but the planner made a CPU plan: {hardware.note}"
    return hardware, plan


def selfcheck(record: dict, hardware):
    import torch

    from forge.runner import selfcheck as image_check

    record.update(torch_cuda=torch.version.cuda, arch_list=torch.cuda.get_arch_list() if torch.version.cuda else [],
                  driver_cuda=image_check.driver_cuda())
    if not torch.version.cuda:
        record.update(status="skipped", reason="a CPU build of torch: nothing to check")
        return
    os.environ.setdefault("FORGE_ARCH", hardware.arch)  # what the arch's Dockerfile sets
    image_check.check_gpu_image()  # raises HardwareError on a mismatch, which fails this section with its text
    record["problem"] = None


# --- models built from catalog shapes -----------------------------------------------------------------------------

class Shaped:
    """A random-initialised base model of a catalog entry's shape, with the runner's LoRA setup on top."""

    def __init__(self, check: Check, name: str, layers: int | None = None) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from forge.host import catalog
        from forge.host.memory import Shape

        self.name, self.entry = name, catalog.models()[name]
        family = next(kind for prefix, kind in FAMILIES.items() if name.startswith(prefix))
        e = self.entry
        self.config = AutoConfig.for_model(
            family, vocab_size=e.vocab, hidden_size=e.hidden, intermediate_size=e.intermediate,
            num_hidden_layers=layers or e.layers, num_attention_heads=e.heads, num_key_value_heads=e.kv_heads,
            head_dim=e.attention_dim, tie_word_embeddings=e.tied_embeddings, max_position_embeddings=8192)
        self.dtype = "bfloat16" if check.cuda else "float32"  # what the planner picks for each
        with torch.device("cuda" if check.cuda else "cpu"):
            self.base = AutoModelForCausalLM.from_config(self.config, dtype=getattr(torch, self.dtype),
                                                         attn_implementation="sdpa")
        self.params = sum(p.numel() for p in self.base.parameters())
        shape = Shape.of(e)
        self.shape = shape if layers is None else replace(shape, layers=layers, params=self.params)
        self.model = None

    def with_lora(self, plan) -> None:
        """The runner's `add_lora` for this plan's checkpointing; adapters reset to one saved starting point,
        so every point starts from the same weights and two runs of the same batch can be compared."""
        from forge.runner.train import add_lora

        self.release_lora()
        self.model = add_lora(plan, self.base)
        self.start = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}

    def reset(self) -> None:
        import torch

        with torch.no_grad():
            for key, value in self.model.named_parameters():
                if key in self.start:
                    value.copy_(self.start[key])
                    value.grad = None

    def release_lora(self) -> None:
        if self.model is None:
            return
        self.base = self.model.unload()
        self.base.gradient_checkpointing_disable()
        with contextlib.suppress(Exception):
            self.base.disable_input_require_grads()
        self.model = None

    def adopt(self, model) -> None:
        """A model with LoRA loaded elsewhere (the runner's 4-bit loader) in place of this one's."""
        if self.base is not None:
            self.release_lora()
        self.model = self.base = None
        _release()
        self.model = model
        self.start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    def free(self) -> None:
        if self.base is not None:
            self.release_lora()
        self.model = self.base = None
        _release()


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tokenizer_dir(check: Check) -> Path:
    """bench/assets' tokenizer, with tokenizer.json unpacked (transformers reads it from a directory)."""
    target = check.work / "tokenizer"
    if not target.is_dir():
        shutil.copytree(TOKENIZER, target, ignore=shutil.ignore_patterns("*.gz"))
        (target / "tokenizer.json").write_bytes(gzip.decompress((TOKENIZER / "tokenizer.json.gz").read_bytes()))
    return target


def point_plan(base_plan, shaped: Shaped, *, micro: int, accumulation: int = 1, checkpointing: bool, steps: int,
               quantization: str = "none"):
    """The sample plan with the settings of one point: the catalog's LoRA targets, the `sft` preset's LoRA."""
    train = base_plan.train.model_copy(update=dict(
        micro_batch_size=micro, gradient_accumulation=accumulation, gradient_checkpointing=checkpointing,
        max_steps=steps, save_every=10**6, warmup_steps=0, quantization=quantization,
        dtype=shaped.dtype,
        lora=base_plan.train.lora.model_copy(update={"target_modules": list(shaped.entry.lora_targets)})))
    return base_plan.model_copy(update={"train": train})


def random_rows(count: int, seq: int, vocab: int, seed: int = 0):
    """Full-length rows of random tokens, every position learned (the most memory a row of `seq` can take)."""
    import numpy as np
    import pyarrow as pa

    ids = np.random.default_rng(seed).integers(0, vocab, (count, seq), dtype=np.int32)
    column = pa.array(list(ids), type=pa.list_(pa.int32()))
    return pa.table({"input_ids": column, "labels": column})


class Sink:
    """Stands in for the host-facing progress stage and the metric reporters: keeps what the trainer sends."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.done = 0

    def advance(self, count: int = 1, force: bool = False, **metrics) -> None:
        self.done += count
        self.steps.append(metrics)

    def log(self, metrics: dict, step: int) -> None:
        pass


def step_clock():
    """A callback that timestamps each optimizer step's end, after the GPU has finished it."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = Clock()
    clock.times = []
    return clock


def run_forge(check: Check, shaped: Shaped, plan, rows, tokens_per_step: int, cap_bytes: float | None = None) -> dict:
    """Train `plan.train.max_steps` steps with `ForgeSFTTrainer`, as the runner builds it; peak memory and
    tokens/s (steps after the first)."""
    from transformers import AutoTokenizer

    from forge.runner import checkpoint, sft

    shaped.reset()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(check))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    state = checkpoint.TrainState(micro_batch_size=plan.train.micro_batch_size,
                                  gradient_accumulation=plan.train.gradient_accumulation)
    run_dir = Path(tempfile.mkdtemp(dir=check.work))
    sink, clock = Sink(), step_clock()
    with _memory_window(check, cap_bytes) as peak:
        trainer = sft.build(plan, shaped.model, tokenizer, rows, state, run_dir, plan.train.max_steps, sink, sink,
                            cuda=check.cuda)
        trainer.add_callback(clock)
        try:
            trainer.train()
        finally:
            del trainer
    shutil.rmtree(run_dir, ignore_errors=True)
    result = {**peak, "losses": [entry["loss"] for entry in state.history], "backoffs": state.backoffs,
              "micro_batch_size": state.micro_batch_size, "gradient_accumulation": state.gradient_accumulation,
              "tokens_per_s": _rate(clock.times, tokens_per_step)}
    if any(not math.isfinite(loss) for loss in result["losses"]):
        raise RuntimeError(f"non-finite loss: {result['losses']}")
    return result


def _rate(times: list[float], tokens_per_step: int) -> float | None:
    return tokens_per_step * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None


@contextlib.contextmanager
def _memory_window(check: Check, cap_bytes: float | None):
    """Peak memory of what runs inside: on CUDA the caching allocator's peaks (optionally capped, so a micro-batch
    that does not fit raises a real out-of-memory), on CPU the process's peak RSS (VmHWM, reset first)."""
    import torch

    peak: dict = {}
    _release()
    if check.cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.reset_peak_memory_stats()
        if cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
        try:
            yield peak
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            peak.update(allocated_mib=torch.cuda.max_memory_allocated() / MIB,
                        reserved_mib=torch.cuda.max_memory_reserved() / MIB)
            peak["measured_mib"] = peak["reserved_mib"] + check.report["cuda_context_mib"]
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        try:
            yield peak
        finally:
            status = Path("/proc/self/status").read_text()
            peak["measured_mib"] = int(status.split("VmHWM:")[1].split()[0]) / 1024


def cuda_context_mib() -> float:
    """What the device holds beyond torch's allocator once cuBLAS is loaded: the context, kernels, workspaces."""
    import torch

    a = torch.ones(256, 256, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / MIB


# --- the sections that train ----------------------------------------------------------------------------------------

def training(record: dict, check: Check, base_plan, settings: dict):
    shaped = Shaped(check, settings["shapes"][0], layers=settings["layers"])
    try:
        seq = settings["seqs"][0]
        plan = point_plan(base_plan, shaped, micro=2, accumulation=2, checkpointing=False, steps=4)
        shaped.with_lora(plan)
        result = run_forge(check, shaped, plan, random_rows(16, seq, shaped.entry.vocab), 4 * seq)
        record.update(model=shaped.name, params=shaped.params, seq=seq, backend="transformers+peft",
                      attention="sdpa", dtype=plan.train.dtype, **result)
        if len(result["losses"]) != 4:
            raise RuntimeError(f"expected 4 optimizer steps, got {len(result['losses'])}")
    finally:
        shaped.free()


def throughput(record: dict, check: Check, base_plan, settings: dict):
    """The same model, rows and batch through ForgeSFTTrainer and through a bare Trainer, in turn (twice each on
    CUDA); the best of each, so a warm-up or a clock change does not decide the ratio."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from forge.runner.batches import collate

    name, seq, micro, steps = settings["throughput"]
    shaped = Shaped(check, name, layers=settings["layers"])
    try:
        plan = point_plan(base_plan, shaped, micro=micro, checkpointing=False, steps=steps)
        shaped.with_lora(plan)
        rows = random_rows(micro * steps, seq, shaped.entry.vocab, seed=1)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(check))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def bare() -> float | None:
            shaped.reset()
            clock = step_clock()
            args = TrainingArguments(output_dir=str(check.work / "bare"), per_device_train_batch_size=micro,
                                     max_steps=steps, learning_rate=plan.train.learning_rate, optim="adamw_torch",
                                     bf16=check.cuda, use_cpu=not check.cuda, save_strategy="no", report_to="none",
                                     disable_tqdm=True, logging_steps=10**6, remove_unused_columns=False,
                                     dataloader_pin_memory=check.cuda, max_grad_norm=1.0, lr_scheduler_type="linear")
            trainer = Trainer(model=shaped.model, args=args, train_dataset=Dataset(_in_memory(rows)),
                              data_collator=lambda batch: collate(batch, pad), callbacks=[clock])
            trainer.train()
            del trainer
            _release()
            return _rate(clock.times, micro * seq)

        forge_rates, bare_rates = [], []
        for _ in range(settings["rounds"]):
            forge_rates.append(run_forge(check, shaped, plan, rows, micro * seq)["tokens_per_s"])
            bare_rates.append(bare())
        best_forge, best_bare = max(filter(None, forge_rates)), max(filter(None, bare_rates))
        record.update(model=shaped.name, seq=seq, micro=micro, steps=steps, forge_tokens_per_s=forge_rates,
                      bare_tokens_per_s=bare_rates, ratio=best_forge / best_bare)
    finally:
        shaped.free()


def _in_memory(table):
    from datasets.table import InMemoryTable

    return InMemoryTable(table)


def out_of_memory(record: dict, check: Check, base_plan, settings: dict):
    """A micro-batch of 8 that cannot fit: on CUDA an allocator capped between the peaks of 2 and 4 rows (a real
    torch.OutOfMemoryError in the forward or backward), on CPU the runner's simulated hook. It must back off
    to a size that fits, keep the effective batch, and give the losses of an uncapped run of the same rows."""
    name, seq = settings["shapes"][0], settings["oom_seq"]
    shaped = Shaped(check, name, layers=settings["layers"])
    try:
        steps, micro = 2, 8
        plan = point_plan(base_plan, shaped, micro=micro, checkpointing=False, steps=steps)
        shaped.with_lora(plan)
        rows = random_rows(micro * steps, seq, shaped.entry.vocab, seed=2)
        reference = run_forge(check, shaped, plan, rows, micro * seq)
        cap, simulated = None, not check.cuda
        if check.cuda:
            one = run_forge(check, shaped, point_plan(base_plan, shaped, micro=1, checkpointing=False, steps=1),
                            rows, seq)["reserved_mib"]
            two = run_forge(check, shaped, point_plan(base_plan, shaped, micro=2, checkpointing=False, steps=1),
                            rows, 2 * seq)["reserved_mib"]
            cap = (two + 1.5 * (two - one)) * MIB
            record["cap_mib"] = cap / MIB
        else:
            os.environ["FORGE_SIMULATE_OOM_ABOVE_ROWS"] = "2"
        try:
            backed = run_forge(check, shaped, plan, rows, micro * seq, cap_bytes=cap)
        finally:
            os.environ.pop("FORGE_SIMULATE_OOM_ABOVE_ROWS", None)
        effective = backed["micro_batch_size"] * backed["gradient_accumulation"]
        difference = max(abs(a - b) for a, b in zip(reference["losses"], backed["losses"]))
        record.update(model=name, seq=seq, simulated=simulated, planned_micro=micro, backoffs=backed["backoffs"],
                      final_micro=backed["micro_batch_size"], effective_batch=effective,
                      reference_losses=reference["losses"], losses=backed["losses"], max_loss_difference=difference)
        if not backed["backoffs"] or effective < micro or len(backed["losses"]) != steps:
            raise RuntimeError(f"expected a backoff to an effective batch of {micro}: {backed['backoffs']}")
        if difference > 0.02 * max(abs(x) for x in reference["losses"]):
            raise RuntimeError(f"losses after the backoff differ from the uncapped run by {difference:.4g}")
    finally:
        shaped.free()


def memory(record: dict, check: Check, base_plan, hardware, settings: dict):
    """The grid, shape by shape (small first, so a deadline cuts the largest)."""
    record.setdefault("points", [])
    record.setdefault("fits", [])
    record["quantized"] = "bitsandbytes" if _has_bitsandbytes(check) else "skipped: bitsandbytes does not import"
    for name in settings["shapes"]:
        if check.remaining() < 30:
            record.setdefault("cut", []).append(name)
            continue
        shaped = Shaped(check, name, layers=settings["layers"])
        try:
            micros = settings["micros"] if shaped.params <= SMALL else settings["micros"][:2]
            for checkpointing in (False, True):
                plan = point_plan(base_plan, shaped, micro=1, checkpointing=checkpointing, steps=2)
                shaped.with_lora(plan)
                for seq in settings["seqs"]:
                    for micro in micros:
                        if check.remaining() < 20:
                            break
                        record["points"].append(grid_point(check, shaped, base_plan, seq, micro, checkpointing))
                        check.write()
            if check.cuda:
                for seq in settings["seqs"]:
                    if check.remaining() > 30:
                        record["fits"].append(largest_fit(check, shaped, base_plan, hardware, seq, record["points"]))
                        check.write()
        finally:
            shaped.free()
        if _has_bitsandbytes(check) and shaped.params <= SMALL and check.remaining() > 45:
            record["points"].extend(quantized_points(check, name, base_plan, settings))
    ratios = [p["predicted_over_measured"] for p in record["points"] if p.get("predicted_over_measured")]
    record["within_15_percent"] = sum(abs(r - 1) <= 0.15 for r in ratios)
    record["of"] = len(ratios)


def grid_point(check: Check, shaped: Shaped, base_plan, seq: int, micro: int, checkpointing: bool,
               quantization: str = "none") -> dict:
    plan = point_plan(base_plan, shaped, micro=micro, checkpointing=checkpointing, steps=2, quantization=quantization)
    point = {"model": shaped.name, "quantization": quantization, "checkpointing": checkpointing, "seq": seq,
             "micro": micro, "backend": "transformers"}
    try:
        result = run_forge(check, shaped, plan, random_rows(2 * micro, seq, shaped.entry.vocab), micro * seq)
    except Exception as exc:  # e.g. out of memory at a micro-batch of 1
        return {**point, "error": f"{type(exc).__name__}: {exc}"[:500]}
    predicted = _estimate(check, shaped, plan, seq, micro)
    point.update({key: result[key] for key in ("measured_mib", "allocated_mib", "reserved_mib", "tokens_per_s")
                  if key in result}, predicted_mib=predicted, backoffs=len(result["backoffs"]))
    if not result["backoffs"]:
        point["predicted_over_measured"] = predicted / result["measured_mib"]
    return point


def _estimate(check: Check, shaped: Shaped, plan, seq: int, micro: int, checkpointing: bool | None = None) -> float:
    from forge.host.memory import estimate

    t = plan.train
    return estimate(shaped.shape, dtype=t.dtype, quantization=t.quantization, targets=t.lora.target_modules,
                    rank=t.lora.r, seq_len=seq, micro_batch=micro,
                    checkpointing=t.gradient_checkpointing if checkpointing is None else checkpointing,
                    accelerator="cuda" if check.cuda else "cpu", backend=BACKEND,
                    lora_dropout=t.lora.dropout).total / MIB


def largest_fit(check: Check, shaped: Shaped, base_plan, hardware, seq: int, points: list[dict]) -> dict:
    """On an emulated card (24 GiB for small shapes, 80 GiB for large), the planner's micro-batch and
    checkpointing beside the largest micro-batch that really trains under the planner's headroom: the
    allocator is capped at the budget less the CUDA context, and a point fits when it needed no backoff."""
    from forge.host import planner

    card_mib = (24 if shaped.params <= SMALL else 80) * 1024
    gpu = hardware.gpus[0].model_copy(update={"memory_total_mib": card_mib, "memory_free_mib": card_mib})
    card = hardware.model_copy(update={"gpus": [gpu]})
    t = base_plan.train
    sizing = planner.size_batches(shaped.shape, card, seq, planner.MAX_MICRO_BATCH, t.dtype,
                                  list(shaped.entry.lora_targets), t.lora.r, "none", backend=BACKEND,
                                  lora_dropout=t.lora.dropout)
    budget, _ = planner.memory_budget(card)
    cap = budget - check.report["cuda_context_mib"] * MIB
    fit = {"model": shaped.name, "seq": seq, "card_gib": card_mib // 1024, "budget_mib": budget / MIB,
           "checkpointing": sizing.checkpointing, "planned_micro": sizing.micro, "tried": {}}
    plan = point_plan(base_plan, shaped, micro=1, checkpointing=sizing.checkpointing, steps=2)
    shaped.with_lora(plan)

    def fits(micro: int) -> bool:
        if micro not in fit["tried"]:
            trial = point_plan(base_plan, shaped, micro=micro, checkpointing=sizing.checkpointing, steps=2)
            try:
                result = run_forge(check, shaped, trial, random_rows(2 * micro, seq, shaped.entry.vocab),
                                   micro * seq, cap_bytes=cap)
                fit["tried"][micro] = not result["backoffs"]
            except Exception:  # out of memory at a micro-batch of 1
                fit["tried"][micro] = False
        return fit["tried"][micro]

    guess = _linear_guess(points, shaped.name, seq, sizing.checkpointing, cap / MIB - check.report["cuda_context_mib"])
    micro = max(1, min(planner.MAX_MICRO_BATCH, guess or sizing.micro))
    for _ in range(4):  # walk from the guess to the boundary: micro fits and micro + 1 does not
        if check.remaining() < 15:
            break
        if fits(micro):
            if micro == planner.MAX_MICRO_BATCH or not fits(micro + 1):
                break
            micro += 1
        else:
            micro -= 1
            if micro < 1:
                break
    fitting = [m for m, ok in fit["tried"].items() if ok]
    failing = [m for m, ok in fit["tried"].items() if not ok]
    largest = max(fitting, default=0)
    fit["largest_micro"] = largest
    fit["boundary_confirmed"] = largest == planner.MAX_MICRO_BATCH or (largest + 1) in failing or (
        largest == 0 and 1 in failing)
    fit["planned_over_largest"] = sizing.micro / largest if largest else None
    fit["planned_fits"] = fits(sizing.micro) if check.remaining() > 10 else None
    return fit


def _linear_guess(points: list[dict], name: str, seq: int, checkpointing: bool, cap_mib: float) -> int | None:
    """The largest micro-batch under `cap_mib` of reserved memory, on the line through the grid's points."""
    measured = [(p["micro"], p["reserved_mib"]) for p in points if p["model"] == name and p["seq"] == seq
                and p["checkpointing"] == checkpointing and p.get("reserved_mib") and not p.get("backoffs")
                and p["quantization"] == "none"]
    if len(measured) < 2:
        return None
    (m0, r0), (m1, r1) = min(measured), max(measured)
    slope = (r1 - r0) / (m1 - m0) if m1 != m0 else 0
    return int((cap_mib - r0) / slope + m0) if slope > 0 else None


def _has_bitsandbytes(check: Check) -> bool:
    if not check.cuda:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def quantized_points(check: Check, name: str, base_plan, settings: dict) -> list[dict]:
    """4-bit QLoRA through the runner's own loader: the random model is saved, then loaded as the runner loads
    a model directory (bitsandbytes NF4, double quantization)."""
    from forge.runner.train import _peft_model

    shaped = Shaped(check, name, layers=settings["layers"])
    model_dir = check.work / f"model-{name}"
    try:
        shaped.base.save_pretrained(model_dir)
        for file in tokenizer_dir(check).iterdir():
            shutil.copy(file, model_dir / file.name)
        points = []
        for seq in settings["seqs"]:
            plan = point_plan(base_plan, shaped, micro=1, checkpointing=True, steps=2, quantization="4bit")
            shaped.adopt(_peft_model(plan, model_dir, cuda=True)[0])
            for micro in (1, 2):
                if check.remaining() > 20:
                    points.append(grid_point(check, shaped, base_plan, seq, micro, True, quantization="4bit"))
        return points
    except Exception as exc:
        return [{"model": name, "quantization": "4bit", "error": f"{type(exc).__name__}: {exc}"[:500]}]
    finally:
        shaped.model = shaped.base = None
        shutil.rmtree(model_dir, ignore_errors=True)
        _release()


# --- the summary --------------------------------------------------------------------------------------------------

def summary(report: dict) -> str:
    s = report["sections"]
    lines = [f"# Forge GPU check ({report['device']})", "",
             f"`{report['command']}`: {report['elapsed_s']} s of a {report['deadline_s']:.0f} s deadline"
             + ("" if report["finished"] else " (not finished: see the sections)") + ".", "",
             "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, section in s.items():
        lines.append(f"| {name} | {section.get('status')} | {section.get('seconds', '')} | "
                     f"{(section.get('error') or section.get('reason') or '')[:160]} |")
    det = s.get("detection", {})
    for gpu in det.get("hardware", {}).get("gpus", []):
        lines.append(f"\nGPU {gpu['index']}: {gpu['name']}, compute capability {gpu['compute_capability']}, "
                     f"{gpu['memory_total_mib']} MiB, MIG {gpu['mig']}, family {det['families'].get(gpu['uuid'])}; "
                     f"driver {det['hardware'].get('driver_version')} (CUDA {det['hardware'].get('cuda_driver_version')}).")
    if "plan" in det:
        p = det["plan"]
        lines.append(f"\nPlan for the bundled sample: {p['image']}, {p['dtype']}, micro-batch {p['micro_batch']} × "
                     f"{p['gradient_accumulation']}, quantization {p['quantization']}, checkpointing "
                     f"{p['checkpointing']}.")
    if s.get("throughput", {}).get("ratio"):
        t = s["throughput"]
        lines.append(f"\nThroughput ({t['model']}, {t['micro']} × {t['seq']} tokens): ForgeSFTTrainer "
                     f"{max(filter(None, t['forge_tokens_per_s'])):,.0f} tokens/s, bare Trainer + PEFT "
                     f"{max(filter(None, t['bare_tokens_per_s'])):,.0f}: ratio {t['ratio']:.3f}.")
    if s.get("oom", {}).get("backoffs"):
        o = s["oom"]
        lines.append(f"\nOut of memory ({'simulated' if o['simulated'] else 'real CUDA'}): micro-batch "
                     f"{o['planned_micro']} → {o['final_micro']}, effective batch {o['effective_batch']}, "
                     f"largest loss difference to the uncapped run {o['max_loss_difference']:.2e}.")
    points = s.get("memory", {}).get("points", [])
    if points:
        lines += ["", "| model | quant | ckpt | seq | micro | allocated MiB | reserved MiB | measured MiB | "
                  "predicted MiB | predicted ÷ measured |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in points:
            if "error" in p:
                lines.append(f"| {p['model']} | {p.get('quantization')} | | | | {p['error'][:80]} | | | | |")
                continue
            ratio = p.get("predicted_over_measured")
            lines.append(f"| {p['model']} | {p['quantization']} | {p['checkpointing']} | {p['seq']} | {p['micro']} | "
                         f"{p.get('allocated_mib', 0):,.0f} | {p.get('reserved_mib', 0):,.0f} | "
                         f"{p['measured_mib']:,.0f} | {p['predicted_mib']:,.0f} | "
                         + (f"{ratio:.2f}" if ratio else f"backed off {p['backoffs']}×") + " |")
    fits = s.get("memory", {}).get("fits", [])
    if fits:
        lines += ["", "| model | seq | card GiB | ckpt | planned micro | largest that fits | planned ÷ largest |",
                  "|---|---|---|---|---|---|---|"]
        for f in fits:
            ratio = f.get("planned_over_largest")
            lines.append(f"| {f['model']} | {f['seq']} | {f['card_gib']} | {f['checkpointing']} | {f['planned_micro']} "
                         f"| {f['largest_micro']}{'' if f['boundary_confirmed'] else ' (unconfirmed)'} | "
                         + (f"{ratio:.2f}" if ratio else "") + " |")
    return "\n".join(lines) + "\n"


def calibration(report: dict) -> dict:
    """The memory grid in plans/calibration's format (tests/test_calibration.py holds the planner to it): the
    measured peak is the device's whole use, the allocator's reserved peak plus the CUDA context, as the planner
    budgets free memory; the fits are the largest micro-batches that trained under an emulated card's headroom."""
    memory_section = report["sections"].get("memory", {})
    det = report["sections"].get("detection", {}).get("hardware", {})
    gpu = (det.get("gpus") or [{}])[0]
    lora = report.get("lora", {})
    return {"device": gpu.get("name", "cpu"), "accelerator": report["device"], "backend": BACKEND,
            "memory_total_mib": gpu.get("memory_total_mib"), "cuda_context_mib": report.get("cuda_context_mib"),
            "rank": lora.get("r"), "lora_dropout": lora.get("dropout"), "environment": report["environment"],
            "command": report["command"],
            "points": [{"model": p["model"], "quantization": p["quantization"], "checkpointing": p["checkpointing"],
                        "seq": p["seq"], "micro": p["micro"], "measured_mb": p["measured_mib"],
                        "allocated_mb": p.get("allocated_mib"), "reserved_mb": p.get("reserved_mib")}
                       for p in memory_section.get("points", []) if "measured_mib" in p and not p.get("backoffs")],
            "fits": [{key: f[key] for key in ("model", "seq", "card_gib", "budget_mib", "checkpointing",
                                              "largest_micro", "boundary_confirmed")}
                     for f in memory_section.get("fits", [])]}


def settings_for(device: str, args) -> dict:
    if device == "cuda":
        return {"shapes": args.shapes or GPU_SHAPES, "layers": None, "seqs": args.seqs or [512, 2048],
                "micros": [1, 2, 4], "oom_seq": 2048, "throughput": ("qwen2.5-0.5b-instruct", 1024, 8, 10), "rounds": 2}
    # CPU: SmolLM2's widths with 2 layers, short rows: the same code paths in seconds
    return {"shapes": args.shapes or ["smollm2-135m-instruct"], "layers": 2, "seqs": args.seqs or [64],
            "micros": [1, 2], "oom_seq": 32, "throughput": ("smollm2-135m-instruct", 64, 2, 4), "rounds": 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json, summary.md, forge.yaml")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--deadline", type=float, default=480, help="seconds (default 8 minutes)")
    parser.add_argument("--shapes", nargs="+", help="catalog names (default: five shapes from 135M to 12B)")
    parser.add_argument("--seqs", nargs="+", type=int, help="sequence lengths (default 512 2048 on CUDA)")
    parser.add_argument("--only", nargs="+", help="run only these sections")
    args = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # library deprecation chatter, as the runner does
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False).", file=sys.stderr)
        return 2
    check = Check(args.out.resolve(), device, args.deadline)
    check.watchdog()
    torch.manual_seed(0)
    if check.cuda:
        check.report["cuda_context_mib"] = cuda_context_mib()
    settings = settings_for(device, args)
    check.report["settings"] = settings
    wanted = set(args.only or ["detection", "selfcheck", "training", "throughput", "oom", "memory"])
    planned = check.section("detection", detection, check) if "detection" in wanted else None
    if planned is None:
        print("gpu_check: detection failed; see report.json", file=sys.stderr)
        check.write(finished=True)
        return 1
    hardware, base_plan = planned
    check.report["lora"] = {"r": base_plan.train.lora.r, "dropout": base_plan.train.lora.dropout}
    for name, fn, extra in (("selfcheck", selfcheck, (hardware,)),
                            ("training", training, (check, base_plan, settings)),
                            ("throughput", throughput, (check, base_plan, settings)),
                            ("oom", out_of_memory, (check, base_plan, settings)),
                            ("memory", memory, (check, base_plan, hardware, settings))):
        if name in wanted:
            check.section(name, fn, *extra)
    check.write(finished=True)
    _atomic(check.out / "calibration.json", json.dumps(calibration(check.report), indent=1) + "\n")
    shutil.rmtree(check.work, ignore_errors=True)
    failed = [name for name, section in check.report["sections"].items() if section["status"] == "failed"]
    print(summary(check.report))
    print(f"gpu_check: report in {check.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
