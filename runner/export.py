"""`forge export`: merge a finished run's LoRA adapter into the base weights and save them as safetensors
with the tokenizer, a plain transformers model directory that serving stacks (vLLM, TGI, llama.cpp's
converter) load without PEFT. Written to a temp directory and renamed, so a killed export leaves nothing
half-written under the final name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from forge.contract.plan import Plan
from forge.errors import ConfigError
from forge.runner import models
from forge.runner.emit import emit, stage


def export(plan: Plan, run_id: str | None) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = find_run(Path(plan.output.dir) / "runs", run_id)
    model_dir = models.resolve(plan.model, Path(plan.output.model_cache))
    final = run_dir / "merged"
    with stage("export", total=3, unit="steps") as progress:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, plan.train.dtype))
        progress.advance(1)
        merged = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
        progress.advance(1)
        tmp = run_dir / f".merged.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        progress.advance(1)
    emit("result", step="export", status="ok", paths={"merged": str(final), "run_dir": str(run_dir)},
         info={"run_id": run_dir.name})
    return final


def find_run(runs: Path, run_id: str | None) -> Path:
    """A finished run by id or unique id prefix; without one, the most recently finished run."""
    finished = sorted((d for d in runs.glob("*") if (d / "adapter").is_dir() and (d / "metrics.json").is_file()),
                      key=lambda d: (d / "metrics.json").stat().st_mtime)
    if not finished:
        raise ConfigError(f"No finished run in {runs}.", "Run `forge train` first.")
    if run_id is None:
        return finished[-1]
    matches = [d for d in finished if d.name == run_id] or [d for d in finished if d.name.startswith(run_id)]
    if len(matches) != 1:
        names = ", ".join(d.name for d in finished)
        raise ConfigError(f"{'No' if not matches else 'More than one'} finished run matches {run_id!r}.",
                          f"Use one of: {names} (`forge runs list`).")
    return matches[0]
