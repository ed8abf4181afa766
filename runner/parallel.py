"""Fan a stream of tasks out to forked worker processes and take the results back in order, with a
bounded number in flight (so memory does not grow with the input, unlike `Pool.imap`, which drains
its input eagerly).

Workers are forked after the parent has built what they need (a tokenizer, compiled templates), so
nothing heavy is pickled: only each task and its result cross the pipe. Each worker has its own pipe, so
a worker that dies (killed, out of memory) is an error here, where `multiprocessing.Pool` would replace
it and wait forever for the result it took with it. A worker dies with its parent
(PR_SET_PDEATHSIG), so a `kill -9` of the runner leaves no orphan behind; stopping is the parent's
business, so workers ignore Ctrl-C and keep SIGTERM's default.
"""

from __future__ import annotations

import ctypes
import fcntl
import multiprocessing
import queue
import signal
import threading
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator, TypeVar

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")

_task: Callable | None = None  # set in the parent just before forking; the workers inherit it
_PR_SET_PDEATHSIG = 1
_F_SETPIPE_SZ = 1031


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
    fork = multiprocessing.get_context("fork")
    pipes, processes = [], []
    try:
        for _ in range(workers):
            tasks_out, tasks_in = _pipe(fork)
            results_out, results_in = _pipe(fork)
            process = fork.Process(target=_serve, args=(tasks_out, results_in), daemon=True)
            process.start()
            tasks_out.close()
            results_in.close()
            pipes.append((tasks_in, results_out))
            processes.append(process)
        limit = max(in_flight or 4 * workers, 1)
        board = _Board(pipes)
        pending: deque = deque()  # (context, worker) in task order
        for context, argument in items:
            board.collect()
            worker = board.least_busy()
            pipes[worker][0].send(argument)
            board.sent(worker)
            pending.append((context, worker))
            while len(pending) >= limit:
                context, worker = pending.popleft()
                yield context, board.take(worker)
        while pending:
            context, worker = pending.popleft()
            yield context, board.take(worker)
    finally:
        _task = None
        for ends in pipes:
            for end in ends:
                end.close()
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()


class _Board:
    """Results received so far per worker, and how many of its tasks each worker still has to finish: a new
    task goes to the worker with the least left, so one slow task does not leave another worker idle.
    Each worker answers its tasks in the order it got them, so taking the oldest task's worker's next
    result keeps the overall order."""

    def __init__(self, pipes: list) -> None:
        self.pipes = [results for _, results in pipes]
        self.results: list[deque] = [deque() for _ in pipes]
        self.busy = [0] * len(pipes)

    def sent(self, worker: int) -> None:
        self.busy[worker] += 1

    def least_busy(self) -> int:
        return self.busy.index(min(self.busy))

    def collect(self) -> None:
        """Take in whatever results have arrived, without waiting."""
        for pipe in wait(self.pipes, timeout=0):
            self._receive(self.pipes.index(pipe))

    def take(self, worker: int):
        while not self.results[worker]:
            self._receive(worker)
        ok, value = self.results[worker].popleft()
        if not ok:
            raise value
        return value

    def _receive(self, worker: int) -> None:
        try:
            self.results[worker].append(self.pipes[worker].recv())
        except EOFError:
            raise RuntimeError("A prepare worker process died (killed, or out of memory?).") from None
        self.busy[worker] -= 1


def _pipe(fork):
    """A one-way pipe (reading end, writing end) with a 1 MiB buffer where Linux allows it, so sending a
    task does not wait on the worker, which may be busy, to read it in 64 KiB pieces."""
    receiving, sending = fork.Pipe(duplex=False)
    try:
        fcntl.fcntl(sending.fileno(), _F_SETPIPE_SZ, 1 << 20)
    except OSError:  # not Linux, or over /proc/sys/fs/pipe-max-size: the default buffer still works
        pass
    return receiving, sending


def _serve(tasks_in, results_out) -> None:
    """A worker: a thread keeps taking tasks off the pipe while this one works, so the parent never blocks
    sending a task while this worker blocks sending a result it has not yet read."""
    _init_worker()
    tasks: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        try:
            while True:
                tasks.put(tasks_in.recv())
        except (EOFError, OSError):
            tasks.put(_DONE)

    threading.Thread(target=receive, daemon=True).start()
    while (task := tasks.get()) is not _DONE:
        try:
            reply = (True, _task(task))
        except Exception as exc:  # the parent re-raises it, hint and all
            reply = (False, exc)
        try:
            results_out.send(reply)
        except (BrokenPipeError, OSError):
            return
        except Exception:  # an unpicklable exception: send what it said
            results_out.send((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))


_DONE = object()


def _init_worker() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent still terminates its workers on a normal exit
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
