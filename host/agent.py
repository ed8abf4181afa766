"""`forge agent`: take the queued jobs this machine can run, run them like `forge train` does, report back.

One job at a time per agent; run one agent per GPU set (`--gpu`) to share a box. A claim is a lease the
agent renews every heartbeat. Two things keep a job from ever running twice at once:
- an agent that cannot renew (lost, or the database unreachable past 80% of the lease) kills its runner;
- the runner holds a lifeline to its agent (stdin): if the agent dies, even by kill -9, the runner stops
  and is gone within half a lease, before the lease expires and another agent may claim the job.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from forge.contract.events import Event, Failure, Result, StageFinished, encode_event
from forge.contract.plan_io import parse_plan
from forge.errors import EXIT_RESUMABLE, DataError, ForgeError, QueueError
from forge.host.detect import GpuProvider, detect
from forge.host.launcher import Control, Lifeline, quietly, run_step
from forge.host.queue.capacity import Capacity
from forge.host.queue.jobs import Job
from forge.host.queue.store import Store

JOB_LABEL = "dev.forge.job"


@dataclass(frozen=True)
class AgentSettings:
    name: str = socket.gethostname()
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    poll_seconds: float = 2.0
    cpu_jobs: bool = True
    memory: str | None = None  # the runner container's memory cap


class Agent:
    def __init__(self, store: Store, provider: GpuProvider, settings: AgentSettings,
                 select: list[str] | None = None, say: Callable[[str], None] = print) -> None:
        self.store, self.provider, self.settings, self.select, self.say = store, provider, settings, select, say
        self.id = f"{settings.name}-{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self.control: Control | None = None

    def capacity(self) -> Capacity:
        """Detected afresh before each claim: free GPU memory changes as other work comes and goes."""
        return Capacity(detect(self.provider, self.select), cpu_jobs=self.settings.cpu_jobs)

    def serve(self, once: bool = False) -> int:
        """Claim and run jobs until stopped (SIGTERM/Ctrl-C: the running job is stopped gracefully and goes back
        on the queue) or, with `once`, after one job. Returns the exit code of the last job run."""
        self._handle_signals()
        capacity = self.capacity()
        self.say(f"Agent {self.id} on {self.store.url}: " + ", ".join(f"{k}={v}" for k, v in capacity.labels().items()))
        code = 0
        try:
            while not self.stopping.is_set():
                try:
                    self.store.requeue_expired()
                    capacity = self.capacity()
                    self.store.register_agent(self.id, self.settings.name, capacity, "idle", None)
                    claimed = self.store.claim(self.id, capacity, self.settings.lease_seconds)
                except QueueError as exc:  # a database restart or a network blip: keep trying, say so
                    self.say(f"{exc.message} Retrying in {self.settings.lease_seconds / 4:.0f}s.")
                    self.stopping.wait(self.settings.lease_seconds / 4)
                    continue
                if claimed is None:
                    self.stopping.wait(self.settings.poll_seconds)
                    continue
                job, token = claimed
                self.store.register_agent(self.id, self.settings.name, capacity, "busy", job.id)
                code = self.run(job, token, capacity)
                if once:
                    break
        finally:
            self.store.register_agent(self.id, self.settings.name, capacity, "stopped", None)
        return code

    def run(self, job: Job, token: str, capacity: Capacity) -> int:
        """One attempt of a job: its steps in order, with the lease renewed until the last one ends."""
        self.say(f"{job.id} ({job.name}): attempt {job.attempts}, steps {'+'.join(job.steps)}")
        self.control = control = Control()
        sink = _EventSink(self.store, job.id, job.attempts)
        lease = _Lease(self.store, job.id, token, self.settings, control, self.say,
                       beat=lambda: self.store.register_agent(self.id, self.settings.name, capacity, "busy", job.id))

        def on_event(event: Event) -> None:
            sink.event(event)
            if line := summarise(event):
                self.say(f"{job.id}: {line}")

        sink.start()
        lease.start()
        code, error, result = 1, None, {}
        try:
            if not Path(job.plan_path).parent.is_dir():
                raise DataError(f"The plan's directory {Path(job.plan_path).parent} is not on this machine "
                                f"(agent {self.id}).", "Put forge.yaml, its data and its output directory on storage "
                                "every agent mounts at the same path, then submit again.")
            plan = capacity.bind(parse_plan(job.plan_yaml, Path(job.plan_path)), job.requirements)
            lifeline = Lifeline(grace_seconds=self.settings.lease_seconds / 2, labels={JOB_LABEL: job.id})
            _clear_leftovers(job.id, lifeline.grace_seconds)
            for step in job.steps:
                if control.wanted:
                    code = EXIT_RESUMABLE
                    break
                outcome = run_step(step, plan, Path(job.plan_path), on_event, sink.log, memory=self.settings.memory,
                                   control=control, lifeline=lifeline)
                code = outcome.exit_code
                if outcome.result:
                    result[step] = {"paths": {k: outcome.mounts.host_path(v) for k, v in outcome.result.paths.items()},
                                    "info": outcome.result.info}
                if outcome.failure:
                    error = _said(outcome.failure.message, outcome.failure.hint)
                if code != 0:
                    break
        except ForgeError as exc:
            code, error = exc.exit_code, _said(exc.message, exc.hint)
            sink.event(Failure(ts=time.time(), code=exc.code, message=exc.message, hint=exc.hint))
        except Exception as exc:  # a bug in Forge: the job fails with it, the agent lives on
            code, error = 1, f"Forge agent error: {exc!r}"
            sink.log(traceback.format_exc())
        finally:
            lease.stop()
            sink.close()
            self.control = None
        if lease.lost:
            self.say(f"{job.id}: the lease was lost; the job is another agent's now.")
            return code
        deadline = time.monotonic() + self.settings.lease_seconds
        while True:  # the outcome is recorded unless the lease runs out first (the job then reruns and resumes)
            try:
                state = self.store.get(job.id).next_state(code)
                note = f"Attempt {job.attempts} on agent {self.id} ended with exit code {code}: job {state}."
                self.store.finish(job.id, token, state, code, error if state != "succeeded" else None, result, note)
                break
            except QueueError as exc:
                if time.monotonic() > deadline:
                    note = f"could not record the outcome ({exc.message}); the queue will rerun it."
                    break
                time.sleep(1)
        self.say(f"{job.id}: {note}")
        return code

    def _handle_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum, frame) -> None:
            if self.stopping.is_set() and self.control:
                self.say("Killing the runner.")
                self.control.kill()
                return
            self.stopping.set()
            if self.control:
                self.say("Stopping: the running job saves its state and goes back on the queue. Again to kill.")
                self.control.stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handle)


class _Lease(threading.Thread):
    """Renews the lease every heartbeat; stops the runner gracefully on a cancel, kills it when the lease is
    lost or could not be renewed for 80% of its length (another agent may claim the job after 100%)."""

    def __init__(self, store: Store, job_id: str, token: str, settings: AgentSettings, control: Control,
                 say: Callable[[str], None], beat: Callable[[], None]) -> None:
        super().__init__(name="lease", daemon=True)
        self.store, self.job_id, self.token, self.settings = store, job_id, token, settings
        self.control, self.say, self.beat = control, say, beat
        self.done = threading.Event()
        self.lost = False

    def run(self) -> None:
        renewed = time.monotonic()
        while not self.done.wait(self.settings.heartbeat_seconds):
            asked = time.monotonic()
            try:
                cancel = self.store.renew(self.job_id, self.token, self.settings.lease_seconds)
            except ForgeError as exc:
                if time.monotonic() - renewed > 0.8 * self.settings.lease_seconds:
                    self._fence(f"could not renew the lease for {time.monotonic() - renewed:.0f}s ({exc.message})")
                continue
            if cancel is None:
                self._fence("the lease is no longer this agent's")
                continue
            renewed = asked
            try:
                self.beat()
            except ForgeError:
                pass
            if cancel and self.control.wanted is None:
                self.say(f"{self.job_id}: cancelled; stopping the runner gracefully.")
                self.control.stop()

    def _fence(self, why: str) -> None:
        if not self.lost:
            self.lost = True
            self.say(f"{self.job_id}: {why}: killing the runner so the job never runs twice.")
            self.control.kill()

    def stop(self) -> None:
        self.done.set()
        self.join()


class _EventSink(threading.Thread):
    """Buffers the runner's events and output lines and writes them to the queue twice a second, so that
    `forge jobs logs -f` follows along without a database round trip per line."""

    MAX_BUFFERED = 50_000

    def __init__(self, store: Store, job_id: str, attempt: int) -> None:
        super().__init__(name="events", daemon=True)
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.items: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.done = threading.Event()

    def event(self, event: Event) -> None:
        self._add((event.ts, "event", encode_event(event)))

    def log(self, line: str) -> None:
        self._add((time.time(), "log", line))

    def _add(self, item: tuple[float, str, str]) -> None:
        with self.lock:
            self.items.append(item)
            if len(self.items) > self.MAX_BUFFERED:  # the queue is unreachable: keep all but progress ticks
                self.items = [i for i in self.items if '"kind":"progress"' not in i[2]]

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.flush()

    def flush(self) -> None:
        with self.lock:
            batch, self.items = self.items, []
        try:
            self.store.add_events(self.job_id, self.attempt, batch)
        except ForgeError:
            with self.lock:
                self.items[:0] = batch

    def close(self) -> None:
        self.done.set()
        self.join()
        self.flush()


def _clear_leftovers(job_id: str, grace_seconds: float) -> None:
    """A dead agent's runner for this job on this machine: give its lifeline time to stop it, then remove it."""
    from forge.host.engine import client

    for container in client().containers.list(all=True, filters={"label": f"{JOB_LABEL}={job_id}"},
                                              ignore_removed=True):  # one may go between listing and looking
        try:
            container.wait(timeout=grace_seconds + 5)
        except Exception:
            quietly(container.kill)
        quietly(lambda: container.remove(force=True))


def _said(message: str, hint: str) -> str:
    """An error as the job records it: what went wrong, then how to fix it."""
    return f"{message} {hint}" if hint else message


def summarise(event: Event) -> str | None:
    """The agent's own console: stage ends, results and errors, not every progress tick."""
    if isinstance(event, StageFinished):
        return f"{event.stage} done in {event.seconds:.1f}s"
    if isinstance(event, Result):
        return f"{event.step} {event.status}"
    if isinstance(event, Failure):
        return f"error: {event.message}"
    return None
