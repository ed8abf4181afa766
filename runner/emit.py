"""The runner's only structured output: `emit(kind, **fields)` writes one event line to the host.

`claim_stdout` moves the real stdout aside for events and points fd 1 at stderr, so a library that
prints cannot corrupt the event stream.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from forge.contract.events import Backoff, Failure, Log, Progress, Result, StageFinished, StageStarted, encode_event

_KINDS = {cls.model_fields["kind"].default: cls for cls in (StageStarted, Progress, StageFinished, Log, Result, Backoff, Failure)}
_stream: IO[str] | None = None  # sys.stdout until claim_stdout() moves it aside
_copies: list[IO[str]] = []
PROGRESS_INTERVAL_S = 0.25


def claim_stdout() -> None:
    global _stream
    _stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)


def also_write_to(path: Path) -> None:
    """Keep a copy of every later event (a run's events.jsonl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _copies.append(path.open("a", encoding="utf-8", buffering=1))


def emit(kind: str, **fields) -> None:
    line = encode_event(_KINDS[kind](ts=time.time(), **fields))
    for stream in (_stream or sys.stdout, *_copies):
        stream.write(line + "\n")
        stream.flush()


def log(message: str, level: str = "info") -> None:
    emit("log", level=level, message=message)


class StageHandle:
    def __init__(self, name: str, total: int | None) -> None:
        self.name, self.total, self.done, self.summary = name, total, 0, {}
        self._last = 0.0

    def advance(self, count: int = 1, force: bool = False, **metrics: float) -> None:
        self.done += count
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_INTERVAL_S or self.done == self.total:
            self._last = now
            emit("progress", stage=self.name, done=self.done, total=self.total, metrics=metrics)


@contextmanager
def stage(name: str, total: int | None = None, unit: str = "items") -> Iterator[StageHandle]:
    """Announce a stage, time it, and report its summary when it ends."""
    emit("stage", stage=name, total=total, unit=unit)
    handle = StageHandle(name, total)
    started = time.monotonic()
    yield handle
    emit("stage_end", stage=name, seconds=round(time.monotonic() - started, 3), summary=handle.summary)
