"""Worker processes for prepare: results in order, input read only a little ahead, errors that keep their hint,
and no worker left behind when the runner is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from forge.errors import ConfigError, OutOfMemoryError
from forge.runner.parallel import ordered_map


def _square_with_pid(x: int) -> tuple[int, int]:
    time.sleep(0.001 * (x % 3))  # uneven task times: results must still come back in order
    return x * x, os.getpid()


def test_results_come_back_in_order_with_their_context_from_several_processes():
    out = list(ordered_map(_square_with_pid, ((f"item {i}", i) for i in range(60)), workers=2))
    assert [(context, square) for context, (square, _) in out] == [(f"item {i}", i * i) for i in range(60)]
    assert len({pid for _, (_, pid) in out} - {os.getpid()}) == 2


def test_one_worker_runs_in_this_process():
    results = ordered_map(_square_with_pid, ((i, i) for i in range(5)), workers=1)
    assert {pid for _, (_, pid) in results} == {os.getpid()}


def test_input_is_read_only_a_little_ahead():
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i, i

    results = ordered_map(_square_with_pid, items(), workers=2, in_flight=4)
    next(results)
    assert len(pulled) <= 5
    results.close()


def _fail(x: int):
    raise ConfigError(f"row {x} is bad", "Fix row 3.")


def test_an_error_in_a_worker_reaches_the_caller_with_its_hint():
    with pytest.raises(ConfigError) as error:
        list(ordered_map(_fail, [(3, 3)], workers=2))
    assert error.value.message == "row 3 is bad" and error.value.hint == "Fix row 3."


def test_large_tasks_and_results_do_not_deadlock_the_pipes():
    """Tasks and results far larger than a pipe's buffer, several in flight per worker: the parent must never
    wait on sending a task while the worker waits on sending it a result (run apart, so a hang fails)."""
    program = textwrap.dedent("""
        from forge.runner.parallel import ordered_map
        payloads = ((i, bytes([i]) * (3 << 20)) for i in range(12))
        out = list(ordered_map(lambda payload: payload * 2, payloads, workers=2, in_flight=8))
        assert [(i, len(r), r[:1]) for i, r in out] == [(i, 6 << 20, bytes([i])) for i in range(12)]
    """)
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)


def _die(x: int):
    os._exit(3)


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="worker process died"):
        list(ordered_map(_die, [(1, 1)], workers=2))


def test_workers_die_with_a_runner_killed_by_sigkill():
    program = textwrap.dedent("""
        import time
        from forge.runner.parallel import ordered_map
        for _ in ordered_map(time.sleep, ((i, 600) for i in range(4)), workers=2):
            pass
    """)
    runner = subprocess.Popen([sys.executable, "-c", program])
    try:
        deadline = time.monotonic() + 30
        while len(psutil.Process(runner.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = psutil.Process(runner.pid).children()
        assert len(workers) == 2
        time.sleep(0.5)  # let them take their tasks
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned workers: {alive}"
    finally:
        runner.kill()


class _Halves:
    """A two-stage task: the first half keeps state in its worker, the second half needs it."""

    def __init__(self) -> None:
        self.kept: dict[int, int] = {}

    def first(self, x: int) -> int:
        time.sleep(0.001 * (x % 3))
        self.kept[x] = os.getpid()
        return x * x

    def second(self, task: tuple[int, int]) -> tuple[int, int, bool]:
        x, running_total = task
        return x, running_total, self.kept.pop(x) == os.getpid()  # the same worker ran both halves


@pytest.mark.parametrize("workers", [1, 2])
def test_pipelined_halves_run_in_one_worker_with_the_middle_here_in_order(workers):
    from forge.runner.parallel import pipelined_map

    halves, seen, total = _Halves(), [], 0

    def between(context: int, square: int) -> tuple[int, int]:
        nonlocal total
        seen.append(context)
        total += square  # state of this process's own, updated strictly in input order
        return context, total

    out = list(pipelined_map(halves.first, between, halves.second, ((i, i) for i in range(40)), workers, in_flight=6))
    assert seen == list(range(40))
    assert [context for context, _ in out] == list(range(40))
    assert [result for _, result in out] == [(i, sum(j * j for j in range(i + 1)), True) for i in range(40)]


_EARLY_EXITS = textwrap.dedent("""
    import sys
    import psutil
    from forge.runner import stop
    from forge.runner.parallel import ordered_map, pipelined_map

    stop.install()  # the runner's graceful-stop handlers, which every worker starts with

    def failing_input():
        yield 1, 1
        raise ValueError("the input ends in an error")

    def failing_between(context, result):
        raise ValueError("the step between fails")

    case = sys.argv[1]
    for attempt in range(20):  # the exits race the workers' start: try each many times
        try:
            if case == "no_input":
                assert list(ordered_map(abs, [], workers=2)) == []
            elif case == "input_fails":
                list(ordered_map(abs, failing_input(), workers=2))
            elif case == "task_fails":
                list(ordered_map(int, [(1, "x")], workers=2))
            elif case == "between_fails":
                list(pipelined_map(abs, failing_between, abs, [(1, 1), (2, 2)], workers=2))
            elif case == "caller_lets_go":
                results = ordered_map(abs, ((i, i) for i in range(100)), workers=2)
                next(results)
                results.close()
        except ValueError:
            pass
        else:
            assert case in ("no_input", "caller_lets_go"), "the error did not reach the caller"
        assert not psutil.Process().children(), f"workers left running after attempt {attempt}"
    print("ok")
""")


@pytest.mark.parametrize("case", ["no_input", "input_fails", "task_fails", "between_fails", "caller_lets_go"])
def test_every_early_exit_ends_the_workers(case):
    """However the map ends (nothing to do, an error in the input, in a task or in the step between, the caller
    letting go), it returns or raises at once and leaves no worker behind, even when it ends before its workers
    have set up their signals (run apart, under the runner's stop handlers, so a hang fails on the timeout)."""
    done = subprocess.run([sys.executable, "-c", _EARLY_EXITS, case], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_sigterm_at_the_moment_a_worker_is_forked_still_ends_it():
    """A worker starts with the runner's handlers, whose SIGTERM only sets a flag; one that arrives before the
    worker resets them must not be swallowed (here: sent by the worker to itself right after the fork)."""
    program = textwrap.dedent("""
        import os, signal, time
        from forge.runner import stop
        from forge.runner.parallel import ordered_map

        stop.install()
        os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))
        try:
            list(ordered_map(time.sleep, [(1, 30), (2, 30)], workers=2))
        except RuntimeError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=25)
    assert "worker process died" in done.stdout, done.stderr[-2000:]


def _pipes_open_twice(_: int) -> list[str]:
    pipes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            pipes.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the directory listing's own descriptor, closed since
            pass
    pipes = [p for p in pipes if p.startswith("pipe:")]
    return sorted({p for p in pipes if pipes.count(p) > 1})


def test_no_worker_holds_both_ends_of_a_pipe():
    """A worker holding its own task pipe's writing end would never see the end of its input. (Pipes this
    process holds both ends of, the test runner's own, are in every worker too.)"""
    here = set(_pipes_open_twice(0))
    out = list(ordered_map(_pipes_open_twice, ((i, i) for i in range(8)), workers=3))
    assert [set(twice) - here for _, twice in out] == [set()] * 8


def _killed_for_memory(_: int):
    os.kill(os.getpid(), signal.SIGKILL)  # how the kernel's out-of-memory killer ends a process


def test_a_worker_killed_for_memory_is_an_out_of_memory_error_with_its_fix_not_a_bug():
    with pytest.raises(OutOfMemoryError) as error:
        list(ordered_map(_killed_for_memory, [(1, 1), (2, 2)], workers=2))
    assert "lack of memory" in error.value.message
    assert "--memory" in error.value.hint and "prepare.shard_rows" in error.value.hint
    with pytest.raises(RuntimeError, match=r"worker process died \(exit 3\)"):  # any other death: still a bug
        list(ordered_map(_die, [(1, 1)], workers=2))
