"""Fan a stream of tasks out to forked worker processes and take the results back in order (optionally in
two stages with a step of the caller's in between), with a bounded number in flight (so memory does not
grow with the input, unlike `Pool.imap`, which drains its input eagerly).

Workers are forked after the parent has built what they need (a tokenizer, compiled templates), so
nothing heavy is pickled: only each task and its result cross the pipe. Each worker has its own pipe, so
a worker that dies (killed, out of memory) is an error here, where `multiprocessing.Pool` would replace
it and wait forever for the result it took with it. A worker dies with its parent
(PR_SET_PDEATHSIG), so a `kill -9` of the runner leaves no orphan behind; stopping is the parent's
business, so workers ignore Ctrl-C and keep SIGTERM's default. However the parent leaves the map
(done, an error, a stop, the caller letting go), its workers are killed and reaped there: they hold
nothing worth a graceful exit, and waiting on one is how `forge prepare` used to hang.
"""

from __future__ import annotations

import ctypes
import fcntl
import multiprocessing
import os
import queue
import signal
import threading
from collections import deque
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator, TypeVar

from forge.errors import OutOfMemoryError

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")

_stages: tuple[Callable, Callable | None] | None = None  # set in the parent just before forking; inherited
_PR_SET_PDEATHSIG = 1
_F_SETPIPE_SZ = 1031


def ordered_map(fn: Callable[[T], R], items: Iterable[tuple[C, T]], workers: int,
                in_flight: int | None = None) -> Iterator[tuple[C, R]]:
    """`(context, fn(argument))` for each `(context, argument)` in order, `fn` running in `workers` processes
    (in this one when workers <= 1) with at most `in_flight` tasks (default 4 per worker, so workers keep
    busy while the caller does a longer piece of its own work) sent ahead of the one being yielded. Only
    the argument and the result cross to the workers; the context stays here."""
    return _run(fn, None, None, items, workers, in_flight)


def pipelined_map(first: Callable, between: Callable, second: Callable, items: Iterable[tuple[C, T]], workers: int,
                  in_flight: int | None = None) -> Iterator[tuple[C, R]]:
    """Two stages per item, in one worker: `first(argument)` there; `between(context, its result)` here, one
    item after another in input order (for what depends on the items before, like dedup); then `second(what
    between returned)` back in the worker that ran `first`, which may keep what it needs from it. Yields
    `(context, second's result)` in input order, with at most `in_flight` items between the two ends."""
    return _run(first, between, second, items, workers, in_flight)


def _run(first, between, second, items, workers, in_flight):
    if workers <= 1:
        for context, argument in items:
            result = first(argument)
            yield context, second(between(context, result)) if between else result
        return
    global _stages
    _stages = (first, second)
    fork = multiprocessing.get_context("fork")
    pipes, processes = [], []
    try:
        for _ in range(workers):
            tasks_out, tasks_in = _pipe(fork)
            results_out, results_in = _pipe(fork)
            # the worker closes its copies of this process's ends (its own and earlier workers'): holding its
            # task pipe's writing end itself, it would never see the end of its input
            ours = [end for ends in pipes for end in ends] + [tasks_in, results_out]
            process = fork.Process(target=_serve, args=(tasks_out, results_in, ours, os.getpid()), daemon=True)
            with _signals_held():
                process.start()
            tasks_out.close()
            results_in.close()
            pipes.append((tasks_in, results_out))
            processes.append(process)
        board = _Board(pipes, processes)
        limit = max(in_flight or 4 * workers, 1)
        firsts: deque = deque()  # (context, task, worker), in input order
        seconds: deque = deque()
        items = iter(items)
        while True:
            while len(firsts) + len(seconds) < limit and (item := next(items, None)) is not None:
                context, argument = item
                firsts.append((context, *board.send(0, argument)))
            if not firsts and not seconds:
                return
            if between is None:
                context, task, worker = firsts.popleft()
                yield context, board.take(worker, task)
            elif firsts and (not seconds or board.ready(firsts[0][2], firsts[0][1])):
                # the oldest first stage is done (or nothing else is pending): its second stage can go out
                context, task, worker = firsts.popleft()
                payload = between(context, board.take(worker, task))
                seconds.append((context, *board.send(1, payload, worker)))
            else:
                context, task, worker = seconds.popleft()
                yield context, board.take(worker, task)
    finally:
        _stages = None
        for ends in pipes:
            for end in ends:
                end.close()
        for process in processes:
            process.kill()  # SIGKILL: cannot be caught, ignored or held, whatever the worker is doing
        for process in processes:
            process.join()


@contextmanager
def _signals_held():
    """SIGTERM and SIGINT held while a worker is forked: it starts with this process's handlers (the runner's
    graceful stop only sets a flag), so one that reached it before `_init_worker` reset them would be
    swallowed; held, it waits for the reset and then has its default effect."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class _Board:
    """Tasks sent and results received, per worker. A new task goes to the worker with the fewest left to
    do, so one slow task does not leave another worker idle; results are kept by task number until taken."""

    def __init__(self, pipes: list, processes: list) -> None:
        self.processes = processes
        self.tasks = [tasks for tasks, _ in pipes]
        self.pipes = [results for _, results in pipes]
        self.results: list[dict] = [{} for _ in pipes]
        self.busy = [0] * len(pipes)
        self.count = 0

    def send(self, stage: int, payload, worker: int | None = None) -> tuple[int, int]:
        """Send a task (to `worker`, or the least busy one): (its number, the worker)."""
        self.collect()
        worker = self.busy.index(min(self.busy)) if worker is None else worker
        task, self.count = self.count, self.count + 1
        try:
            self.tasks[worker].send((task, stage, payload))
        except BrokenPipeError:  # the worker is gone: say why, as a result it never sent would
            raise _death(self.processes[worker]) from None
        self.busy[worker] += 1
        return task, worker

    def collect(self) -> None:
        """Take in whatever results have arrived, without waiting."""
        for pipe in wait(self.pipes, timeout=0):
            self._receive(self.pipes.index(pipe))

    def ready(self, worker: int, task: int) -> bool:
        self.collect()
        return task in self.results[worker]

    def take(self, worker: int, task: int):
        while task not in self.results[worker]:
            self._receive(worker)
        ok, value = self.results[worker].pop(task)
        if not ok:
            raise value
        return value

    def _receive(self, worker: int) -> None:
        try:
            task, ok, value = self.pipes[worker].recv()
        except EOFError:
            raise _death(self.processes[worker]) from None
        self.results[worker][task] = (ok, value)
        self.busy[worker] -= 1


def _death(process) -> Exception:
    """Why a worker ended without a result. A SIGKILL is how the kernel's out-of-memory killer ends a process
    (nothing else in a runner container sends one to a worker alone): the user's to fix, so a Forge error that
    says how. Any other end is a bug."""
    process.join(timeout=5)
    code = process.exitcode
    if code == -signal.SIGKILL:
        return OutOfMemoryError(
            "A prepare worker process was killed (SIGKILL), most likely by the kernel for lack of memory.",
            "Give the runner more memory (a higher `forge prepare --memory`, or free RAM), or lower "
            "prepare.shard_rows or prepare.workers in forge.yaml; then rerun `forge prepare` to resume.")
    if code is None or code >= 0:
        return RuntimeError(f"A prepare worker process died ({'still running' if code is None else f'exit {code}'}).")
    return RuntimeError(f"A prepare worker process died (signal {-code}: {signal.strsignal(-code)}).")


def _pipe(fork):
    """A one-way pipe (reading end, writing end) with a 1 MiB buffer where Linux allows it, so sending a
    task does not wait on the worker, which may be busy, to read it in 64 KiB pieces."""
    receiving, sending = fork.Pipe(duplex=False)
    try:
        fcntl.fcntl(sending.fileno(), _F_SETPIPE_SZ, 1 << 20)
    except OSError:  # not Linux, or over /proc/sys/fs/pipe-max-size: the default buffer still works
        pass
    return receiving, sending


def _serve(tasks_in, results_out, parent_ends: list, parent: int) -> None:
    """A worker: a thread keeps taking tasks off the pipe while this one works, so the parent never blocks
    sending a task while this worker blocks sending a result it has not yet read. It ends when the parent
    closes its task pipe, or dies."""
    _init_worker(parent)
    for end in parent_ends:
        end.close()
    tasks: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        try:
            while True:
                tasks.put(tasks_in.recv())
        except (EOFError, OSError):
            tasks.put(_DONE)

    threading.Thread(target=receive, daemon=True).start()
    while (received := tasks.get()) is not _DONE:
        task, stage, payload = received
        try:
            reply = (task, True, _stages[stage](payload))
        except Exception as exc:  # the parent re-raises it, hint and all
            reply = (task, False, exc)
        try:
            try:
                results_out.send(reply)
            except (BrokenPipeError, OSError):
                raise
            except Exception:  # an unpicklable exception: send what it said
                results_out.send((task, False, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]}")))
        except OSError:  # the parent is gone or has let go: nobody is waiting for this
            return


_DONE = object()


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _init_worker(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent still kills its workers on a normal exit
        pass
    if os.getppid() != parent:  # the parent died before the line above: nobody would ever kill this one
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held since the fork (_signals_held)
