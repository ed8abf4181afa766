"""`forge train`: a LoRA recipe on transformers + PEFT, readable top to bottom.

setup (model, data, optimizer, resume) → loop (accumulate, step, report, checkpoint) → finish
(validation loss, adapter, metrics). The run directory is named by the dataset and the training
config, so rerunning the same plan resumes the same run from its newest valid checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from forge.contract.plan import Plan
from forge.contract.plan_io import atomic_write_text, dump_plan
from forge.errors import ConfigError, DataError
from forge.runner import checkpoint, models, stop
from forge.runner.emit import also_write_to, emit, log, stage
from forge.runner.hashing import sha256_json
from forge.runner.prepare.pipeline import dataset_dir
from forge.runner.resources import peak_rss_mb

MAX_GRAD_NORM = 1.0


def run_dir_for(plan: Plan, dataset: Path) -> Path:
    key = sha256_json({"dataset": dataset.name, "train": plan.train.model_dump(mode="json"), "model": plan.model.name})
    return Path(plan.output.dir) / "runs" / f"{plan.model.name}-{key[:10]}"


def train(plan: Plan) -> None:
    import torch

    model_dir = models.resolve(plan.model, Path(plan.output.model_cache))
    dataset = dataset_dir(plan, model_dir)
    if not (dataset / "manifest.json").is_file():
        raise DataError("No prepared dataset matches this plan's data and settings.", "Run `forge prepare` first.")
    run_dir = run_dir_for(plan, dataset)
    also_write_to(run_dir / "events.jsonl")
    if (run_dir / "metrics.json").is_file() and (run_dir / "adapter").is_dir():
        log(f"Run {run_dir.name} already finished; delete {run_dir} to train again.")
        _result(run_dir, json.loads((run_dir / "metrics.json").read_text()))
        return
    atomic_write_text(run_dir / "config.yaml", dump_plan(plan))

    torch.manual_seed(plan.train.seed)
    model, tokenizer = _setup_model(plan, model_dir)
    rows = _read_split(dataset, "train")
    batches = MicroBatches(rows, plan.train.micro_batch_size, plan.train.seed, tokenizer.pad_token_id)
    total_steps = plan.train.max_steps or plan.train.epochs * math.ceil(len(batches) / plan.train.gradient_accumulation)
    optimizer, scheduler = _setup_optimizer(plan, model, total_steps)

    state = checkpoint.TrainState(micro_batch_size=plan.train.micro_batch_size,
                                  gradient_accumulation=plan.train.gradient_accumulation)
    resumed_from = 0
    latest = checkpoint.latest_valid(run_dir / "checkpoints")
    if latest is not None:
        state = checkpoint.load(latest, model, optimizer, scheduler)
        resumed_from = state.step
        log(f"Resuming from checkpoint {latest.name} (step {state.step} of {total_steps}).")

    _loop(plan, model, batches, optimizer, scheduler, state, total_steps, run_dir)
    metrics = _finish(plan, model, dataset, run_dir, state, total_steps, resumed_from, tokenizer.pad_token_id)
    _result(run_dir, metrics)


def _setup_model(plan: Plan, model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if plan.hardware.accelerator == "cpu" and plan.train.dtype == "float16":
        raise ConfigError("float16 training is not supported on CPU.", "Set train.dtype to float32 or bfloat16.")
    with stage("load", total=1, unit="model") as progress:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, plan.train.dtype))
        lora = plan.train.lora
        missing = [name for name in lora.target_modules if not any(n.endswith(name) for n, _ in model.named_modules())]
        if missing:
            raise ConfigError(f"LoRA target modules not in this model: {', '.join(missing)}.",
                              "Fix train.lora.target_modules in forge.yaml.")
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        trainable, total = model.get_nb_trainable_parameters()
        progress.summary = {"trainable": trainable, "params": total}
        progress.advance(1)
    model.train()
    return model, tokenizer


def _setup_optimizer(plan: Plan, model, total_steps: int):
    import torch
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.train.learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.train.warmup_steps, total_steps)
    return optimizer, scheduler


def _loop(plan, model, batches, optimizer, scheduler, state, total_steps: int, run_dir: Path) -> None:
    import torch

    accumulation = state.gradient_accumulation
    params = [p for p in model.parameters() if p.requires_grad]
    with stage("train", total=total_steps, unit="steps") as progress:
        progress.done = state.step
        started, tokens_seen = time.monotonic(), 0
        while state.step < total_steps:
            step_loss = 0.0
            for _ in range(accumulation):
                batch = batches.get(state.micro_index)
                state.micro_index += 1
                loss = model(**batch).loss / accumulation
                loss.backward()
                step_loss += loss.item()
                tokens_seen += batches.last_tokens
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.history.append({"step": state.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm})
            progress.advance(1, force=True, loss=step_loss, lr=lr, grad_norm=grad_norm,
                             tokens_per_s=tokens_seen / max(time.monotonic() - started, 1e-9), rss_mb=peak_rss_mb())
            due = state.step % plan.train.save_every == 0 or state.step == total_steps
            if due or stop.requested.is_set():
                checkpoint.save(run_dir / "checkpoints", state, model, optimizer, scheduler, plan.train.keep_last)
            if stop.requested.is_set() and state.step < total_steps:
                emit("result", step="train", status="stopped", paths={"run_dir": str(run_dir)},
                     info={"step": state.step, "total_steps": total_steps})
                raise stop.Stopped()


def _finish(plan, model, dataset: Path, run_dir: Path, state, total_steps: int, resumed_from: int, pad_id: int) -> dict:
    import torch

    val_rows = _read_split(dataset, "val")
    val_loss = None
    if val_rows:
        model.eval()
        batches = MicroBatches(val_rows, plan.train.micro_batch_size, plan.train.seed, pad_id, shuffle=False)
        with stage("evaluate", total=len(batches), unit="batches") as progress, torch.no_grad():
            losses = []
            for index in range(len(batches)):
                losses.append(model(**batches.get(index)).loss.item())
                progress.advance(1)
            val_loss = sum(losses) / len(losses)
            progress.summary = {"val_loss": val_loss, "perplexity": math.exp(val_loss)}
    tmp = run_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    os.replace(tmp, run_dir / "adapter")
    metrics = {
        "steps": state.step,
        "total_steps": total_steps,
        "resumed_from_step": resumed_from,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "val_loss": val_loss,
        "perplexity": math.exp(val_loss) if val_loss is not None else None,
        "peak_rss_mb": peak_rss_mb(),
        "history": state.history,
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


class MicroBatches:
    """Micro-batch i is a pure function of (rows, seed, i): resume needs only the index."""

    def __init__(self, rows: list[dict], size: int, seed: int, pad_id: int, shuffle: bool = True) -> None:
        if not rows:
            raise DataError("The training split is empty.", "Add data or lower prepare.val_fraction, then prepare again.")
        self.rows, self.size, self.seed, self.pad_id, self.shuffle = rows, size, seed, pad_id, shuffle
        self.per_epoch = math.ceil(len(rows) / size)
        self._order: tuple[int, list[int]] | None = None
        self.last_tokens = 0

    def __len__(self) -> int:
        return self.per_epoch

    def get(self, index: int) -> dict:
        import torch

        epoch, position = divmod(index, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            if self.shuffle:
                order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._order = (epoch, order)
        chosen = [self.rows[i] for i in self._order[1][position * self.size:(position + 1) * self.size]]
        width = max(len(row["input_ids"]) for row in chosen)
        pad = lambda values, fill: values + [fill] * (width - len(values))  # noqa: E731
        self.last_tokens = sum(len(row["input_ids"]) for row in chosen)
        batch = {
            "input_ids": torch.tensor([pad(row["input_ids"], self.pad_id) for row in chosen]),
            "labels": torch.tensor([pad(row["labels"], -100) for row in chosen]),
        }
        if "position_ids" in chosen[0]:
            # Packed rows: without an attention mask (and without a KV cache), transformers builds a block-causal
            # mask from the position ids, which restart at 0 per example, so examples do not attend to each other.
            batch["position_ids"] = torch.tensor([pad(row["position_ids"], 0) for row in chosen])
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.tensor([pad([1] * len(row["input_ids"]), 0) for row in chosen])
        return batch


def _read_split(dataset: Path, split: str) -> list[dict]:
    """All shards of a split, in order. Packed datasets carry position_ids, which restart per example."""
    import pyarrow.parquet as pq

    rows = []
    for path in sorted((dataset / split).glob("*.parquet")):
        table = pq.read_table(path)
        columns = [c for c in ("input_ids", "labels", "position_ids") if c in table.column_names]
        rows.extend(table.select(columns).to_pylist())
    return rows


def _result(run_dir: Path, metrics: dict) -> None:
    emit(
        "result",
        step="train",
        status="ok",
        paths={"run_dir": str(run_dir), "adapter": str(run_dir / "adapter"), "metrics": str(run_dir / "metrics.json")},
        info={key: metrics[key] for key in ("steps", "total_steps", "resumed_from_step", "final_loss", "val_loss")},
    )
