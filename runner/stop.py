"""Graceful stop: SIGTERM/SIGINT set a flag; long loops check it at safe points (after an optimizer step)."""

from __future__ import annotations

import signal
import threading

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on request, state saved, rerun to resume

requested = threading.Event()


class Stopped(Exception):
    """Raised at a safe point after a stop was requested."""


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: requested.set())


def check() -> None:
    if requested.is_set():
        raise Stopped()
