"""TRL's SFTTrainer with what Forge promises on top of it: OOM backoff inside a step, atomic checksummed
checkpoints, progress events and a graceful stop.

Import this only after the model is set up: Unsloth replaces `trl.SFTTrainer` with its own when it is
imported, and this module must subclass the replacement.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from datasets.table import InMemoryTable
from transformers import PrinterCallback, Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from forge.contract.plan import Plan
from forge.errors import HardwareError
from forge.runner import checkpoint, stop
from forge.runner.batches import collate
from forge.runner.emit import emit, log
from forge.runner.resources import peak_memory

MAX_GRAD_NORM = 1.0
TOKENS = "forge_tokens"  # a batch's real (unpadded) token count, taken out before the model sees the batch


def sft_config(plan: Plan, run_dir: Path, total_steps: int, cuda: bool) -> SFTConfig:
    """The plan's training settings in TRL's terms. The dataset is already tokenized, templated and truncated
    by `forge prepare`, so TRL's own preparation is skipped; metrics go through Forge's reporters."""
    spec = plan.train
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    # SFTConfig turns activation checkpointing on by default; the model setup already applied the plan's
    # setting, in Unsloth's variant on Unsloth, which the Trainer's would replace
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return SFTConfig(
        **{checkpointing: False},
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation,
        max_steps=total_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=spec.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch",
        seed=spec.seed,
        bf16=cuda and spec.dtype == "bfloat16",
        fp16=cuda and spec.dtype == "float16",
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.save_every,
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_length=None,
        dataloader_pin_memory=cuda,
    )


def build(plan: Plan, model, tokenizer, rows, state: checkpoint.TrainState, run_dir: Path,
          total_steps: int, progress, reporters, cuda: bool) -> ForgeSFTTrainer:
    pad_id = tokenizer.pad_token_id

    def collate_counting(batch: list[dict]) -> dict:
        return {**collate(batch, pad_id), TOKENS: sum(len(row["input_ids"]) for row in batch)}

    train_dataset = Dataset(InMemoryTable(rows))  # the prepared Arrow table as it is: no copy, no cache files
    trainer = ForgeSFTTrainer(model=model, args=sft_config(plan, run_dir, total_steps, cuda),
                              train_dataset=train_dataset,
                              processing_class=tokenizer, data_collator=collate_counting,
                              callbacks=[StopAtSafePoint()])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the progress events carry the same figures
    trainer.forge_setup(plan, state, progress, reporters)
    return trainer


class StopAtSafePoint(TrainerCallback):
    """SIGTERM/SIGINT: save a checkpoint after the current optimizer step and end training there."""

    def on_step_end(self, args, state, control, **kwargs):
        if stop.requested.is_set():
            control.should_save = True
            control.should_training_stop = True
        return control


class ForgeSFTTrainer(SFTTrainer):
    def forge_setup(self, plan: Plan, state: checkpoint.TrainState, progress, reporters) -> None:
        self.plan, self.forge_state, self.progress, self.reporters = plan, state, progress, reporters
        self._staging: Path | None = None
        self._tokens = 0
        self._started = time.monotonic()
        self._first_step = state.step
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """On CPU, the model's own loss instead of TRL's fused LM head, which without Triton scores every
        position in tiles: 0.71 of the tokens/s and 1.15 of the peak RSS of the model's own loss (measured on
        bench/train_bench.py's job, 12 steps of 4 x 2). Both losses are the same quantity: the learned tokens'
        summed loss divided by the step's count of them."""
        if self.args.use_cpu:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # --- OOM backoff: the same rows per step, in smaller pieces ---------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch from the data loader, run in pieces of the current micro-batch size. Every piece's loss
        is a sum over its tokens divided by the step's token count, so the step's gradient does not depend on
        the split. On CUDA out-of-memory, the micro-batch's partial gradients and random state are rolled back,
        the size halves and the micro-batch runs again: the effective batch never changes."""
        tokens = int(inputs.pop(TOKENS))
        while True:
            before = self._set_gradients_aside()
            rng = _rng_state()
            try:
                loss = None
                for piece in _pieces(inputs, self.forge_state.micro_batch_size):
                    _simulate_out_of_memory(piece)
                    piece_loss = super().training_step(model, piece, num_items_in_batch)
                    loss = piece_loss if loss is None else loss + piece_loss
            except torch.OutOfMemoryError as exc:
                reason = str(exc)
            else:
                self._add_gradients_back(before)
                self._tokens += tokens
                return loss
            self._restore_gradients(before)
            _set_rng_state(rng)
            self._back_off(reason)

    def _set_gradients_aside(self) -> list:
        """Earlier micro-batches' gradients; the parameters start this one from none, so a failed piece leaves
        nothing behind (a backward interrupted by OOM may have added to some parameters and not to others)."""
        before = [p.grad for p in self._trainable]
        for p in self._trainable:
            p.grad = None
        return before

    def _add_gradients_back(self, before: list) -> None:
        for p, grad in zip(self._trainable, before):
            if grad is not None:
                p.grad = grad if p.grad is None else grad.add_(p.grad)

    def _restore_gradients(self, before: list) -> None:
        for p, grad in zip(self._trainable, before):
            p.grad = grad

    def _back_off(self, reason: str) -> None:
        """Halve the micro-batch and raise accumulation to match. Recorded in an event, the checkpointed state
        (so a resume keeps the smaller size) and the run's metrics."""
        state, spec = self.forge_state, self.plan.train
        step = self.state.global_step + 1
        if state.micro_batch_size == 1:
            raise HardwareError(
                f"Out of GPU memory with a micro-batch of 1 row at step {step}: {reason}",
                "Lower prepare.max_length and prepare again, set train.quantization to 4bit, or pick a smaller model.",
            )
        before = state.micro_batch_size
        state.micro_batch_size = math.ceil(before / 2)
        state.gradient_accumulation = spec.gradient_accumulation * math.ceil(spec.micro_batch_size /
                                                                              state.micro_batch_size)
        record = {"step": step, "micro_batch_from": before, "micro_batch_size": state.micro_batch_size,
                  "gradient_accumulation": state.gradient_accumulation, "reason": reason[:300]}
        state.backoffs.append(record)
        emit("backoff", **record)
        effective = spec.micro_batch_size * spec.gradient_accumulation
        log(f"Out of memory at step {step}: micro-batch {before} -> {state.micro_batch_size}, gradient "
            f"accumulation -> {state.gradient_accumulation} (effective batch {effective} unchanged).", "warning")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- progress: one event per optimizer step ------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if "loss" in logs and "grad_norm" in logs:  # a training step's log, not the end-of-training summary
            self._record_step(logs)

    def _record_step(self, logs: dict[str, float]) -> None:
        state = self.forge_state
        state.step = self.state.global_step
        entry = {"step": state.step, "loss": logs["loss"], "lr": logs["learning_rate"], "grad_norm": logs["grad_norm"]}
        state.history.append(entry)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        metrics = {**{key: value for key, value in entry.items() if key != "step"},
                   "tokens_per_s": self._tokens / elapsed,
                   "eta_s": (self.state.max_steps - state.step) * elapsed / (state.step - self._first_step),
                   **peak_memory()}
        if "mean_token_accuracy" in logs:
            metrics["token_accuracy"] = logs["mean_token_accuracy"]
        self.progress.advance(1, force=True, **metrics)
        self.reporters.log({f"train/{key}": value for key, value in metrics.items() if key != "eta_s"}, state.step)

    # --- checkpoints: the Trainer's files, staged, sealed and renamed ----------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        root = Path(self.args.output_dir)
        self._staging = checkpoint.staging_dir(root, self.state.global_step)
        try:  # Trainer's, not TRL's: TRL's also writes a model card into the checkpoints dir
            Trainer._save_checkpoint(self, model, trial)
        finally:
            staging, self._staging = self._staging, None
        self.forge_state.step = self.state.global_step
        checkpoint.commit(staging / f"checkpoint-{self.state.global_step}", root, self.forge_state,
                          self.plan.train.keep_last)
        shutil.rmtree(staging, ignore_errors=True)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)


def _pieces(inputs: dict, size: int) -> list[dict]:
    rows = len(inputs["input_ids"])
    if rows <= size:
        return [inputs]
    return [{key: value[start:start + size] if isinstance(value, torch.Tensor) else value
             for key, value in inputs.items()} for start in range(0, rows, size)]


def _simulate_out_of_memory(piece: dict) -> None:
    """A test hook: pieces over FORGE_SIMULATE_OOM_ABOVE_ROWS rows raise CUDA's out-of-memory error, so the
    backoff path runs on CPU exactly as it would on a GPU that is too small."""
    limit = os.environ.get("FORGE_SIMULATE_OOM_ABOVE_ROWS")
    if limit and len(piece["input_ids"]) > int(limit):
        raise torch.OutOfMemoryError(f"simulated (FORGE_SIMULATE_OOM_ABOVE_ROWS={limit}): "
                                     f"a micro-batch of {len(piece['input_ids'])} rows does not fit")


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
