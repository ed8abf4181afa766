"""`--retries N`: relaunch a runner that died, with capped exponential backoff.

A rerun resumes by itself (train from its newest valid checkpoint, prepare from its finished shards), so a
retry is the same step launched again. Only a runner that died is retried: killed (OOM, exit 137, `docker
kill`), crashed (a driver fault, an unexpected exception) or lost (its container removed, the engine
restarted). One that reported an error the user must fix (config, data, model, hardware) fails at once, as
does one that finished or was stopped on request: those would fail, or stop, the same way again.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

from forge.errors import ERRORS_BY_CODE, EXIT_RESUMABLE
from forge.host.launcher import Outcome

MAX_DELAY_S = 300.0
# The exit codes of the errors a runner reports for the user to fix (ForgeError's own 1 is also a crash's).
_USER_EXIT_CODES = {cls.exit_code for cls in ERRORS_BY_CODE.values()} - {1}
_SIGNALS = {signal.SIGKILL: "killed (SIGKILL: out of memory, or `docker kill`)", signal.SIGSEGV: "crashed (SIGSEGV)",
            signal.SIGABRT: "crashed (SIGABRT)", signal.SIGBUS: "crashed (SIGBUS)", signal.SIGTERM: "terminated"}


def retry_reason(outcome: Outcome) -> str | None:
    """Why this attempt is worth another one, or None when it is not."""
    code, failure = outcome.exit_code, outcome.failure
    if code in (0, EXIT_RESUMABLE) or outcome.requested:
        return None
    if failure is not None:
        if failure.code == "oom":  # the kernel's OOM killer (the launcher's finding): a resume gets further
            return f"was killed for running out of memory (exit {code})"
        if failure.code == "lost":
            return "was lost (its container went away)"
        if failure.code in ERRORS_BY_CODE:  # reported for the user to fix: would fail the same way again
            return None
        if failure.code == "internal":
            return f"crashed ({failure.message[:200]})"
    if code in _USER_EXIT_CODES:
        return None
    if code > 128:
        what = _SIGNALS.get(code - 128, f"died of signal {code - 128}")
        return f"{what} (exit {code})"
    return f"died (exit {code})"


def delay(retry: int, first: float) -> float:
    """Seconds before retry number `retry` (1, 2, ...): `first`, doubling each time, at most MAX_DELAY_S."""
    cap, wait = max(first, MAX_DELAY_S), first
    for _ in range(retry - 1):
        if wait <= 0 or wait >= cap:
            break
        wait = min(wait * 2, cap)
    return wait


def run_with_retries(launch: Callable[[list[str]], Outcome], args: list[str], retries: int, first_delay: float,
                     on_log: Callable[[str], None], resumes_from: str) -> tuple[Outcome, int]:
    """`launch(args)` until it ends for good or `retries` relaunches are spent; returns the last outcome and the
    number of attempts. A relaunch never passes --rebuild again: it would throw away what the last attempt
    finished. Ctrl-C or SIGTERM during a wait ends it with the last outcome."""
    attempt = 1
    while True:
        outcome = launch(args)
        reason = retry_reason(outcome)
        if reason is None:
            return outcome, attempt
        if attempt > retries:
            if retries:
                on_log(f"The runner {reason}; no retries left ({retries} used).")
            return outcome, attempt
        wait = delay(attempt, first_delay)
        on_log(f"The runner {reason}. Retry {attempt} of {retries} in {wait:.0f}s, resuming from {resumes_from}.")
        if not _sleep(wait):
            on_log("Not retrying: stopped on request.")
            return outcome, attempt
        args = [arg for arg in args if arg != "--rebuild"]
        attempt += 1


def _sleep(seconds: float) -> bool:
    """Wait; False when Ctrl-C or SIGTERM came first (in the main thread; elsewhere a plain wait)."""
    woken = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: woken.set())
    try:
        return not woken.wait(seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
