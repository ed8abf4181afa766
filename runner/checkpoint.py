"""Crash-safe checkpoints: written to a temp dir with a checksum manifest, then renamed into place.

A checkpoint without a manifest, or whose files do not match it, is never loaded: `latest_valid`
skips it with a warning and falls back to the one before.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forge.runner.emit import log
from forge.runner.durable import fsync
from forge.runner.hashing import sha256_file

MANIFEST = "manifest.json"
PREFIX = "step-"


@dataclass
class TrainState:
    """Everything besides tensors that a resume needs to continue exactly where it stopped."""

    step: int = 0
    position: int = 0  # rows consumed from the stream (see batches.RowStream): the data position
    micro_batch_size: int = 1  # as last used: after an OOM backoff, the smaller size is the one resumed with
    gradient_accumulation: int = 1
    backoffs: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def save(root: Path, state: TrainState, model, optimizer, scheduler, keep_last: int) -> Path:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(get_peft_model_state_dict(model), tmp / "adapter.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    files = sorted(path.name for path in tmp.iterdir())
    for name in files:
        fsync(tmp / name)
    (tmp / MANIFEST).write_text(json.dumps({name: sha256_file(tmp / name) for name in files}, indent=1))
    fsync(tmp / MANIFEST)
    shutil.rmtree(final, ignore_errors=True)  # an earlier attempt at the same step, e.g. before a crash
    os.replace(tmp, final)
    fsync(root)
    for old in all_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if path.is_dir() and path.name.startswith(PREFIX))


def latest_valid(root: Path) -> Path | None:
    """The newest complete checkpoint. Temp dirs of interrupted saves are removed on the way."""
    for partial in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)
    for path in reversed(all_checkpoints(root)):
        problem = _problem(path)
        if problem is None:
            return path
        log(f"Skipping checkpoint {path.name}: {problem}.", "warning")
    return None


def _problem(path: Path) -> str | None:
    try:
        expected = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest (it was interrupted while being written)"
    for name, digest in expected.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256_file(path / name) != digest:
            return f"{name} does not match its checksum"
    return None


def load(path: Path, model, optimizer, scheduler) -> TrainState:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return TrainState(**json.loads((path / "state.json").read_text()))


def rng_state() -> dict:
    """Every random stream training draws from (dropout on CPU or GPU, Python's `random`)."""
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
