"""Start the runner container, stream its events to a renderer, stop it gracefully on Ctrl-C/SIGTERM.

stdout of the runner carries events (one JSON line each); stderr is shown as log lines. The container
always goes away afterwards; the runner's exit code becomes the CLI's.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from forge.contract import paths
from forge.contract.events import Event, Failure, Result, parse_line
from forge.contract.plan import Plan
from forge.contract.plan_io import atomic_write_text, dump_plan
from forge.errors import EngineError
from forge.host.engine import client
from forge.host.images import check_image
from forge.host.mounts import Mounts, build_mounts, container_user, output_dir

STOP_GRACE_SECONDS = 60
OUTPUT_LABEL = "dev.forge.output"
PASSTHROUGH_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
Step = Literal["prepare", "train", "export"]


@dataclass
class Outcome:
    exit_code: int
    result: Result | None
    failure: Failure | None
    mounts: Mounts


class Control:
    """Stops a step's container from another thread: gracefully (the runner saves its state and exits 75),
    or at once. A request made before the container starts is applied as soon as it does."""

    def __init__(self) -> None:
        self.container = None
        self.wanted: str | None = None

    def bind(self, container) -> None:
        self.container = container
        if self.wanted:
            self._act(self.wanted)

    def stop(self) -> None:
        if self.wanted != "kill":
            self.wanted = "stop"
            self._act("stop")

    def kill(self) -> None:
        self.wanted = "kill"
        self._act("kill")

    def _act(self, what: str) -> None:
        container = self.container
        if container is not None:
            action = (lambda: container.stop(timeout=STOP_GRACE_SECONDS)) if what == "stop" else container.kill
            threading.Thread(target=quietly, args=(action,), daemon=True).start()


@dataclass(frozen=True)
class Lifeline:
    """Hold the runner's stdin open: when this process dies (even kill -9), the runner reads EOF, stops as on
    SIGTERM and exits for good after `grace_seconds`. An agent uses it so that a job never outlives its lease."""

    grace_seconds: float
    labels: dict[str, str]


def run_step(
    step: Step,
    plan: Plan,
    plan_path: Path,
    on_event: Callable[[Event], None],
    on_log: Callable[[str], None],
    args: list[str] | None = None,
    memory: str | None = None,
    control: Control | None = None,
    lifeline: Lifeline | None = None,
) -> Outcome:
    """Run one step. With a `control`, its owner handles stopping; without one, Ctrl-C/SIGTERM do."""
    plan_dir = plan_path.resolve().parent
    mounts = build_mounts(plan, plan_dir)
    image = check_image(plan.image.name, plan.image.arch, plan.hardware)
    job_file = output_dir(plan, plan_dir) / ".jobs" / f"{step}-forge.yaml"
    atomic_write_text(job_file, dump_plan(mounts.plan))
    job_file.chmod(0o644)
    volumes = {**mounts.volumes, str(job_file): {"bind": paths.JOB_CONFIG, "mode": "ro"}}

    out = str(output_dir(plan, plan_dir))
    _refuse_concurrent_runner(out)
    container = _create([step, *(args or [])], plan, image, volumes, out, memory, lifeline)
    outcome = Outcome(exit_code=1, result=None, failure=None, mounts=mounts)
    stdin = None
    try:
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read, args=(container, lines), daemon=True)
        if lifeline:
            stdin = container.client.api.attach_socket(container.id, params={"stdin": 1, "stream": 1})
        _start(container)
        reader.start()
        owned = control is None
        control = control or Control()
        control.bind(container)
        with (_graceful_stop(control, on_log) if owned else contextlib.nullcontext()):
            while True:
                item = lines.get()
                if item is None:
                    break
                stream, text = item
                event = parse_line(text) if stream == "out" else None
                if event is None:
                    on_log(text)
                    continue
                if isinstance(event, Result):
                    outcome.result = event
                elif isinstance(event, Failure):
                    outcome.failure = event
                on_event(event)
            outcome.exit_code = int(container.wait().get("StatusCode", 1))
            container.reload()
            if container.attrs["State"].get("OOMKilled"):
                outcome.failure = Failure(ts=time.time(), code="oom", message=(
                    f"The runner ran out of memory{f' (capped at {memory})' if memory else ''} and was killed."),
                    hint="Raise --memory, or lower prepare.shard_rows / train.micro_batch_size in forge.yaml; rerun to resume.")
                on_event(outcome.failure)
    finally:
        container.remove(force=True)
        if stdin is not None:
            stdin.close()
    return outcome


def _refuse_concurrent_runner(out: str) -> None:
    """Two runners writing one output dir would corrupt it (e.g. after the host CLI was kill -9'd)."""
    running = client().containers.list(filters={"label": f"{OUTPUT_LABEL}={out}"}, ignore_removed=True)
    if running:
        names = ", ".join(f"{c.name} ({c.labels.get('dev.forge.step')})" for c in running)
        raise EngineError(
            f"A runner is already working on {out}: container {names}.",
            f"Wait for it to finish, or stop it (`docker stop {running[0].name}`) and rerun to resume.",
        )


def _create(command: list[str], plan: Plan, image, volumes: dict, out: str, memory: str | None,
            lifeline: Lifeline | None):
    import docker
    from docker.errors import APIError

    environment = {
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FORGE_IMAGE": image.tag,  # recorded in a run's environment.json
        "FORGE_IMAGE_ID": image.id,
        **({"HF_HUB_OFFLINE": "1"} if plan.model.source.kind != "hub" else {}),
        **{name: os.environ[name] for name in PASSTHROUGH_SECRETS if os.environ.get(name)},
        **({"FORGE_LIFELINE": "stdin", "FORGE_LIFELINE_GRACE_S": str(lifeline.grace_seconds)} if lifeline else {}),
    }
    devices = []
    if plan.hardware.accelerator == "cuda":
        ids = [gpu.uuid for gpu in plan.hardware.gpus]
        devices = [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    try:
        return client().containers.create(
            image.tag,
            command=command,
            volumes=volumes,
            environment=environment,
            user=container_user(),
            init=True,
            device_requests=devices or None,
            labels={"dev.forge.step": command[0], "dev.forge.model": plan.model.name, OUTPUT_LABEL: out,
                    **(lifeline.labels if lifeline else {})},
            shm_size="1g",
            mem_limit=memory,
            memswap_limit=memory,  # no swap beyond the cap: an over-budget runner fails fast and visibly
            stop_signal="SIGTERM",
            # a lifeline is stdin kept open by us: not detached, so the engine closes it when we disconnect
            **({"stdin_open": True, "detach": False} if lifeline else {}),
        )
    except APIError as exc:
        raise EngineError(f"The engine could not create the runner container: {exc.explanation or exc}",
                          "Run `forge doctor` to check the engine and images.") from None


def _start(container) -> None:
    from docker.errors import APIError

    try:
        container.start()
    except APIError as exc:
        raise EngineError(f"The engine could not start the runner container: {exc.explanation or exc}",
                          "Run `forge doctor`; for GPU plans, check the NVIDIA container toolkit.") from None


def _read(container, lines: queue.Queue) -> None:
    """Split the demultiplexed byte stream into text lines; None marks the end."""
    pending = {"out": b"", "err": b""}
    try:
        for out, err in container.client.api.attach(container.id, stdout=True, stderr=True, stream=True,
                                                    logs=True, demux=True):
            for stream, chunk in (("out", out), ("err", err)):
                if not chunk:
                    continue
                *complete, pending[stream] = (pending[stream] + chunk).split(b"\n")
                for line in complete:
                    lines.put((stream, line.decode("utf-8", "replace")))
    finally:
        for stream, rest in pending.items():
            if rest:
                lines.put((stream, rest.decode("utf-8", "replace")))
        lines.put(None)


class _graceful_stop:
    """First Ctrl-C/SIGTERM: ask the runner to stop (it checkpoints); second: kill it."""

    def __init__(self, control: Control, on_log: Callable[[str], None]) -> None:
        self.control, self.on_log, self.asked = control, on_log, 0
        self.previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.asked += 1
        if self.asked == 1:
            self.on_log(f"Stopping the runner (it saves its state; up to {STOP_GRACE_SECONDS}s). Again to kill.")
            self.control.stop()
        else:
            self.on_log("Killing the runner.")
            self.control.kill()


def quietly(action) -> None:
    try:
        action()
    except Exception:  # the container may already be gone
        pass
