"""Graceful stop: SIGTERM/SIGINT set a flag; long loops check it at safe points (after an optimizer step)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from forge.errors import EXIT_RESUMABLE

requested = threading.Event()


class Stopped(Exception):
    """Raised at a safe point after a stop was requested."""


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: requested.set())


def check() -> None:
    if requested.is_set():
        raise Stopped()


def watch_lifeline() -> None:
    """Under `forge agent`, stdin is held open by the agent: EOF means it died (even kill -9). Stop as on
    SIGTERM, and exit for good after the grace period, before the job's lease can pass to another agent."""
    if os.environ.get("FORGE_LIFELINE") != "stdin":
        return
    grace = float(os.environ.get("FORGE_LIFELINE_GRACE_S", "30"))

    def watch() -> None:
        try:  # the raw fd, not sys.stdin: a forked worker closes sys.stdin, which deadlocks on a held buffer lock
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        print(f"The agent is gone: stopping (at most {grace:.0f}s).", file=sys.stderr, flush=True)
        requested.set()
        time.sleep(grace)
        os._exit(EXIT_RESUMABLE)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
