"""`forge train`: one LoRA recipe for every backend (Unsloth on CUDA images that have it, transformers +
PEFT elsewhere), trained by TRL's SFTTrainer (see `sft` for what Forge adds to it), readable top to bottom.

setup (model, data, resume point) → train (SFTTrainer: accumulate, back off on OOM, step, report,
checkpoint) → finish (evaluation by tag and on the gold set, adapter, run record). The run directory is
named by the dataset and the training settings, so rerunning the same plan resumes the same run from its
newest valid checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from forge.contract.compat import UNSLOTH_MIN_CAPABILITY
from forge.contract.plan import Plan
from forge.contract.plan_io import atomic_write_text, dump_plan
from forge.errors import ConfigError, DataError
from forge.runner import checkpoint, models, run_record, stop
from forge.runner.emit import also_write_to, emit, log, stage
from forge.runner.evaluate import evaluate
from forge.runner.gold import evaluate_gold, read_gold
from forge.runner.hashing import sha256_json
from forge.runner.prepare.pipeline import dataset_dir
from forge.runner.prepare.tokenize import chat_template_for
from forge.runner.report import Reporters
from forge.runner.resources import peak_memory

TRAIN_COLUMNS = ("input_ids", "labels", "position_ids")


def run_dir_for(plan: Plan, dataset: Path) -> Path:
    """Named by what shapes the weights: the dataset, the model and the training settings (not where metrics
    are reported or how the result is evaluated, so changing those reuses the run)."""
    train = plan.train.model_dump(mode="json", exclude={"eval", "report_to"})
    key = sha256_json({"dataset": dataset.name, "train": train, "model": plan.model.name})
    return Path(plan.output.dir) / "runs" / f"{plan.model.name}-{key[:10]}"


def train(plan: Plan) -> None:
    import torch

    model_dir = models.resolve(plan.model, Path(plan.output.model_cache))
    dataset = dataset_dir(plan, model_dir)
    if not (dataset / "manifest.json").is_file():
        raise DataError("No prepared dataset matches this plan's data and settings.",
                        "Run `forge prepare` first (with the same PII hashing key: a dataset prepared under another "
                        "FORGE_PII_KEY or key file is another dataset).")
    run_dir = run_dir_for(plan, dataset)
    also_write_to(run_dir / "events.jsonl")
    if (run_dir / "metrics.json").is_file() and (run_dir / "adapter").is_dir():
        log(f"Run {run_dir.name} already finished; delete {run_dir} to train again.")
        _result(run_dir, json.loads((run_dir / "metrics.json").read_text()))
        return
    atomic_write_text(run_dir / "config.yaml", dump_plan(plan))
    environment = run_record.write_environment(run_dir, plan, dataset)

    gold = read_gold(Path(plan.train.eval.gold)) if plan.train.eval.gold else None  # bad rows fail before training
    torch.manual_seed(plan.train.seed)
    cuda = plan.hardware.accelerator == "cuda" and torch.cuda.is_available()
    model, tokenizer = _setup_model(plan, model_dir, cuda)
    rows = _read_table(dataset, "train", TRAIN_COLUMNS)
    if rows is None or not rows.num_rows:
        raise DataError("The training split is empty.", "Add data, or lower prepare.split.val and prepare.split.test "
                        "in forge.yaml; then run `forge prepare` again.")
    effective = plan.train.micro_batch_size * plan.train.gradient_accumulation
    total_steps = plan.train.max_steps or plan.train.epochs * math.ceil(rows.num_rows / effective)

    state = checkpoint.TrainState(micro_batch_size=plan.train.micro_batch_size,
                                  gradient_accumulation=plan.train.gradient_accumulation)
    latest = checkpoint.latest_valid(run_dir / "checkpoints")
    if latest is not None:
        state = checkpoint.read_state(latest)
        log(f"Resuming from checkpoint {latest.name} (step {state.step} of {total_steps}, "
            f"micro-batch {state.micro_batch_size} x {state.gradient_accumulation}).")
    resumed_from = state.step

    from forge.runner import sft  # after the model: Unsloth swaps in its own SFTTrainer when it is imported

    with Reporters(plan.train.report_to, run_dir, plan) as reporters:
        with stage("train", total=total_steps, unit="steps") as progress:
            progress.done = state.step
            trainer = sft.build(plan, model, tokenizer, rows, state, run_dir, total_steps, progress, reporters,
                                cuda=cuda)
            trainer.train(resume_from_checkpoint=str(latest) if latest else None)
            if stop.requested.is_set() and state.step < total_steps:
                emit("result", step="train", status="stopped", paths={"run_dir": str(run_dir)},
                     info={"step": state.step, "total_steps": total_steps})
                raise stop.Stopped()
        metrics = _finish(plan, model, tokenizer, model_dir, dataset, run_dir, state, total_steps, resumed_from,
                          environment, gold)
        reporters.log({f"eval/{key}": value for key, value in metrics.items() if isinstance(value, float)},
                      state.step)
    _result(run_dir, metrics)


def _setup_model(plan: Plan, model_dir: Path, cuda: bool):
    """The base model with LoRA adapters: Unsloth's FastLanguageModel on CUDA when the image has it (its
    kernels and gradient checkpointing), else transformers + PEFT; 8/4-bit weights through bitsandbytes."""
    spec = plan.train
    if spec.quantization != "none" and not cuda:
        raise ConfigError(f"train.quantization {spec.quantization} needs a CUDA GPU (bitsandbytes); this run has none.",
                          "Set train.quantization: none for CPU runs, or plan on a GPU machine.")
    if not cuda and spec.dtype == "float16":
        raise ConfigError("float16 training is not supported on CPU.", "Set train.dtype to float32 or bfloat16.")
    backend = _backend(spec.backend, cuda)
    with stage("load", total=1, unit="model") as progress:
        if backend == "unsloth":
            model, tokenizer = _unsloth_model(plan, model_dir)
        else:
            model, tokenizer = _peft_model(plan, model_dir, cuda)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        trainable, total = model.get_nb_trainable_parameters()
        progress.summary = {"backend": backend, "trainable": trainable, "params": total}
        progress.advance(1)
    model.train()
    return model, tokenizer


def _backend(wanted: str, cuda: bool) -> str:
    """Unsloth where `auto` allows it: a CUDA image that has it, on a GPU its attention (xformers) has code for
    (not a V100), the rule the planner applies too."""
    import importlib.util

    import torch

    has_unsloth = (cuda and importlib.util.find_spec("unsloth") is not None
                   and min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
                   >= UNSLOTH_MIN_CAPABILITY)
    if wanted == "unsloth" and not has_unsloth:
        raise ConfigError("train.backend unsloth needs a CUDA GPU of compute capability 7.5 or newer and an image "
                          "with Unsloth (the GPU images).",
                          "Set train.backend: auto (Unsloth where it can run, transformers + PEFT elsewhere).")
    return "unsloth" if wanted == "unsloth" or (wanted == "auto" and has_unsloth) else "transformers"


def _peft_model(plan: Plan, model_dir: Path, cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    spec = plan.train
    dtype = getattr(torch, spec.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quantization = {
        "none": None,
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype),
    }[spec.quantization]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quantization,
                                                 attn_implementation=spec.attention,
                                                 **({"device_map": {"": 0}} if cuda else {}))
    return add_lora(plan, model), tokenizer


def add_lora(plan: Plan, model):
    """The plan's gradient checkpointing and LoRA adapters on a loaded base model (bench/gpu_check.py calls
    this on random-initialised models built from catalog shapes, so it measures the runner's own setup)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    spec = plan.train
    if spec.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad through checkpoints
    lora = spec.lora
    missing = [name for name in lora.target_modules if not any(n.endswith(name) for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(f"LoRA target modules not in this model: {', '.join(missing)}.",
                          "Fix train.lora.target_modules in forge.yaml.")
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def _unsloth_model(plan: Plan, model_dir: Path):
    """Not exercised by the CPU test suite: it runs only in a CUDA image on a GPU."""
    import torch
    from unsloth import FastLanguageModel

    spec = plan.train
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=plan.prepare.max_length, dtype=getattr(torch, spec.dtype),
        load_in_4bit=spec.quantization == "4bit", load_in_8bit=spec.quantization == "8bit",
    )
    lora = spec.lora
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_gradient_checkpointing="unsloth" if spec.gradient_checkpointing else False, random_state=spec.seed,
    )
    return model, tokenizer


def _finish(plan, model, tokenizer, model_dir: Path, dataset: Path, run_dir: Path, state, total_steps: int,
            resumed_from: int, environment: dict, gold: list | None) -> dict:
    val_rows = _read_split(dataset, "val")
    report = (evaluate(model, val_rows, tokenizer.pad_token_id, state.micro_batch_size, plan.train.eval.hardest)
              if val_rows else {"val_loss": None, "perplexity": None, "slices": {}, "hardest": []})
    if gold:
        template = chat_template_for(plan.model.chat_template, model_dir)
        report["gold"] = evaluate_gold(model, tokenizer, template, gold, plan.train.eval,
                                       run_dir / "gold_predictions.jsonl")
    tmp = run_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    os.replace(tmp, run_dir / "adapter")
    run_record.plot_losses(run_dir / "loss_curve.png", state.history, report["val_loss"])
    metrics = {
        "run_id": run_dir.name,
        "model": plan.model.name,
        "steps": state.step,
        "total_steps": total_steps,
        "resumed_from_step": resumed_from,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        **report,
        "micro_batch_size": state.micro_batch_size,
        "gradient_accumulation": state.gradient_accumulation,
        "backoffs": state.backoffs,
        "reproducibility_hash": environment["reproducibility_hash"],
        **peak_memory(),
        "history": state.history,
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _read_split(dataset: Path, split: str) -> list[dict]:
    """All rows of a split, in order, with what evaluation reads (ids and tags for slicing)."""
    table = _read_table(dataset, split, ("id", "ids", "tags", *TRAIN_COLUMNS))
    return table.to_pylist() if table is not None else []


def _read_table(dataset: Path, split: str, wanted: tuple[str, ...]):
    """All shards of a split, in order, as one Arrow table of the columns asked for (None when empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in sorted((dataset / split).glob("*.parquet")):
        table = pq.read_table(path)
        tables.append(table.select([c for c in wanted if c in table.column_names]))
    return pa.concat_tables(tables) if tables else None


def _result(run_dir: Path, metrics: dict) -> None:
    emit(
        "result",
        step="train",
        status="ok",
        paths={"run_dir": str(run_dir), "adapter": str(run_dir / "adapter"), "metrics": str(run_dir / "metrics.json")},
        info={key: metrics[key] for key in ("steps", "total_steps", "resumed_from_step", "final_loss", "val_loss")},
    )
