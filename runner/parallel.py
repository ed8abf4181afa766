"""Fan a stream of tasks out to forked worker processes and take the results back in order, with a
bounded number in flight (so memory does not grow with the input, unlike `Pool.imap`, which drains
its input eagerly).

Workers are forked after the parent has built what they need (a tokenizer, compiled templates), so
nothing heavy is pickled: only each task and its result cross the pipe. A worker dies with its parent
(PR_SET_PDEATHSIG), so a `kill -9` of the runner leaves no orphan behind; stopping is the parent's
business, so workers ignore Ctrl-C and keep SIGTERM's default, which `Pool.terminate` relies on.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")

_task: Callable | None = None  # set in the parent just before forking; the workers inherit it
_PR_SET_PDEATHSIG = 1


def ordered_map(fn: Callable[[T], R], items: Iterable[tuple[C, T]], workers: int,
                in_flight: int | None = None) -> Iterator[tuple[C, R]]:
    """`(context, fn(argument))` for each `(context, argument)` in order, `fn` running in `workers` processes
    (in this one when workers <= 1) with at most `in_flight` tasks (default 4 per worker, so workers keep
    busy while the caller does a longer piece of its own work) sent ahead of the one being yielded. Only
    the argument and the result cross to the workers; the context stays here."""
    if workers <= 1:
        for context, argument in items:
            yield context, fn(argument)
        return
    global _task
    _task = fn
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker)
    try:
        pending: deque = deque()
        for context, argument in items:
            pending.append((context, pool.apply_async(_run, (argument,))))
            while len(pending) >= (in_flight or 4 * workers):
                context, result = pending.popleft()
                yield context, result.get()
        while pending:
            context, result = pending.popleft()
            yield context, result.get()
    finally:
        pool.terminate()
        pool.join()
        _task = None


def _run(item):
    return _task(item)


def _init_worker() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool still terminates its workers on a normal exit
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
