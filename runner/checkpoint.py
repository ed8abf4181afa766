"""Crash-safe checkpoints around the Trainer's own: it writes a checkpoint into a staging dir, `commit` adds
Forge's state and a checksum manifest and renames it into place.

A checkpoint without a manifest, or whose files do not match it, is never loaded: `latest_valid` skips it
with a warning and falls back to the one before.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forge.runner.durable import fsync
from forge.runner.emit import log
from forge.runner.hashing import sha256_file

MANIFEST = "manifest.json"
STATE = "state.json"
PREFIX = "step-"
STAGING = ".tmp-"


@dataclass
class TrainState:
    """What Forge adds to the Trainer's state: the micro-batch in use (after an OOM backoff, the smaller size is
    the one resumed with), the backoffs and the per-step history that metrics.json and the loss curve show."""

    step: int = 0
    micro_batch_size: int = 1
    gradient_accumulation: int = 1
    backoffs: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def staging_dir(root: Path, step: int) -> Path:
    return root / f"{STAGING}{PREFIX}{step:08d}-{os.getpid()}"


def commit(written: Path, root: Path, state: TrainState, keep_last: int) -> Path:
    """Seal a fully written checkpoint dir (fsync, manifest) and rename it to `step-<N>`; keep the last K."""
    (written / STATE).write_text(json.dumps(asdict(state)))
    files = sorted(str(path.relative_to(written)) for path in written.rglob("*") if path.is_file())
    for name in files:
        fsync(written / name)
    (written / MANIFEST).write_text(json.dumps({name: sha256_file(written / name) for name in files}, indent=1))
    fsync(written / MANIFEST)
    final = root / f"{PREFIX}{state.step:08d}"
    shutil.rmtree(final, ignore_errors=True)  # an earlier attempt at the same step, e.g. before a crash
    os.replace(written, final)
    fsync(root)
    for old in all_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if path.is_dir() and path.name.startswith(PREFIX))


def latest_valid(root: Path) -> Path | None:
    """The newest complete checkpoint. Staging dirs of interrupted saves are removed on the way."""
    for partial in root.glob(f"{STAGING}*") if root.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)
    for path in reversed(all_checkpoints(root)):
        problem = _problem(path)
        if problem is None:
            return path
        log(f"Skipping checkpoint {path.name}: {problem}.", "warning")
    return None


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / STATE).read_text()))


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
