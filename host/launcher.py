"""Start the runner container, stream its events to a renderer, stop it gracefully on Ctrl-C/SIGTERM.

stdout of the runner carries events (one JSON line each); stderr is shown as log lines. The container
always goes away afterwards; the runner's exit code becomes the CLI's.

The container is locked down: no Linux capabilities, no privilege gain, a read-only root filesystem with a
tmpfs for what must be written, a pids limit, a non-root user and no network. The one exception is a hub
model not yet in the model cache: a separate `fetch` container downloads it first, with network and the
hub token (a read-only secret file), and nothing else mounted; the step itself then runs offline.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

from forge.contract import paths
from forge.contract.events import Event, Failure, Result, parse_line
from forge.contract.plan import Plan
from forge.contract.plan_io import atomic_write_text, dump_plan
from forge.errors import EXIT_RESUMABLE, EngineError
from forge.host import pii_key
from forge.host.engine import client
from forge.host.images import check_image
from forge.host.mounts import Mounts, build_mounts, container_user, model_cache_dir, output_dir
from forge.host.secrets import Secrets

STOP_GRACE_SECONDS = 60
OUTPUT_LABEL = "dev.forge.output"
HUB_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # read on the host; reach only a fetch, as a secret file
HUB_SETTINGS = ("HF_ENDPOINT",)  # not secrets: a fetch from a mirror
Step = Literal["fetch", "prepare", "train", "export"]
# Least privilege for every runner container (checked on the live container in tests/test_container_security.py).
PIDS_LIMIT = 4096  # processes and threads: room for a prepare worker per core and torch's pools on big boxes
# HOME and every cache (Hugging Face, Triton, torch) live here; no noexec, as Triton loads the kernels it builds.
TMPFS = {"/tmp": "rw,nosuid,nodev,size=1g,mode=1777"}
HARDENING = {"cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"], "read_only": True,
             "tmpfs": TMPFS, "pids_limit": PIDS_LIMIT}


@dataclass
class Outcome:
    exit_code: int
    result: Result | None
    failure: Failure | None
    mounts: Mounts
    requested: str | None = None  # "stop" or "kill" when the user (or an agent) asked for it: never retried


class Control:
    """Stops a step's container from another thread: gracefully (the runner saves its state and exits 75),
    or at once. A request made before the container starts is applied as soon as it does."""

    def __init__(self) -> None:
        self.container = None
        self.graceful = True
        self.wanted: str | None = None

    def bind(self, container, graceful: bool = True) -> None:
        """`graceful`: whether the runner has state to save on a stop (a fetch has none: it is killed)."""
        self.container, self.graceful = container, graceful
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
            graceful = what == "stop" and self.graceful
            action = (lambda: container.stop(timeout=STOP_GRACE_SECONDS)) if graceful else container.kill
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
    """Run one step (after a `fetch` when its hub model is not in the model cache yet). With a `control`, its
    owner handles stopping; without one, Ctrl-C/SIGTERM do."""
    plan_dir = plan_path.resolve().parent
    mounts = build_mounts(plan, plan_dir)
    image = check_image(plan.image.name, plan.image.arch, plan.hardware)
    out = output_dir(plan, plan_dir)
    _refuse_concurrent_runner(str(out))
    owned = control is None
    control = control or Control()
    with (_graceful_stop(control, on_log) if owned else contextlib.nullcontext()):
        if step != "fetch" and needs_download(plan, plan_dir):
            fetched = _run_container("fetch", [], plan, mounts, image, out, on_event, on_log, memory, control,
                                     lifeline)
            if fetched.exit_code or control.wanted:  # a stop during the download: nothing else was started
                return replace(fetched, exit_code=fetched.exit_code or EXIT_RESUMABLE)
        return _run_container(step, args or [], plan, mounts, image, out, on_event, on_log, memory, control,
                              lifeline)


def needs_download(plan: Plan, plan_dir: Path) -> bool:
    """A hub model that is not complete in the model cache yet (the runner writes the marker last)."""
    if plan.model.source.kind != "hub":
        return False
    entry = model_cache_dir(plan, plan_dir) / paths.model_cache_entry(plan.model.name)
    return not (entry / paths.MODEL_MARKER).is_file()


def _run_container(step: Step, args: list[str], plan: Plan, mounts: Mounts, image, out: Path,
                   on_event: Callable[[Event], None], on_log: Callable[[str], None], memory: str | None,
                   control: Control, lifeline: Lifeline | None) -> Outcome:
    job_file = out / ".jobs" / f"{step}-forge.yaml"
    atomic_write_text(job_file, dump_plan(mounts.plan))
    job_file.chmod(0o644)
    volumes = {**_volumes(step, mounts), str(job_file): {"bind": paths.JOB_CONFIG, "mode": "ro"}}
    outcome = Outcome(exit_code=1, result=None, failure=None, mounts=mounts)
    with Secrets() as secrets:
        if step in pii_key.KEYED_STEPS:
            secrets.add(paths.PII_KEY, pii_key.key_text(on_log))
        environment = _secret_environment(step, secrets)
        container = _create([step, *args], plan, image, {**volumes, **secrets.volumes}, environment, str(out),
                            memory, lifeline)
        stdin = None
        try:
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(target=_read, args=(container, lines), daemon=True)
            if lifeline:
                stdin = container.client.api.attach_socket(container.id, params={"stdin": 1, "stream": 1})
            _start(container)
            reader.start()
            control.bind(container, graceful=step != "fetch")
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
            ended = _exit_status(container)
            outcome.requested = control.wanted
            if ended is None:
                outcome.exit_code = EngineError.exit_code
                outcome.failure = Failure(ts=time.time(), code="lost", message=(
                    "The runner container went away before it finished (removed, or the engine restarted)."),
                    hint="Rerun the same command to resume, or pass --retries N to relaunch it automatically.")
                on_event(outcome.failure)
            elif ended[1]:
                outcome.exit_code = ended[0]
                outcome.failure = Failure(ts=time.time(), code="oom", message=(
                    f"The runner ran out of memory{f' (capped at {memory})' if memory else ''} and was killed."),
                    hint="Raise --memory, or lower prepare.shard_rows / train.micro_batch_size in forge.yaml; rerun to resume.")
                on_event(outcome.failure)
            else:
                outcome.exit_code = ended[0]
        finally:
            quietly(lambda: container.remove(force=True))  # already gone when it was lost
            if stdin is not None:
                stdin.close()
    return outcome


def _volumes(step: Step, mounts: Mounts) -> dict[str, dict]:
    """A fetch sees the model cache only: no data, no outputs, no local model."""
    if step != "fetch":
        return mounts.volumes
    return {host: spec for host, spec in mounts.volumes.items() if spec["bind"] == paths.MODEL_CACHE}


def _secret_environment(step: Step, secrets: Secrets) -> dict[str, str]:
    """Add the secret files this step needs; returns the environment variables that point at them (paths, never
    values). Only a fetch gets the hub token: huggingface_hub reads it from HF_TOKEN_PATH."""
    environment: dict[str, str] = {}
    if step == "fetch":
        token = next((os.environ[name] for name in HUB_TOKENS if os.environ.get(name)), None)
        if token:
            environment["HF_TOKEN_PATH"] = secrets.add(paths.HF_TOKEN, token.strip())
        environment.update({name: os.environ[name] for name in HUB_SETTINGS if os.environ.get(name)})
    return environment


def _exit_status(container) -> tuple[int, bool] | None:
    """The container's exit code and whether the kernel killed it for memory; None when it is gone."""
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    try:
        code = int(container.wait().get("StatusCode", 1))
        container.reload()
    except (DockerException, RequestException):
        return None
    return code, bool(container.attrs["State"].get("OOMKilled"))


def _refuse_concurrent_runner(out: str) -> None:
    """Two runners writing one output dir would corrupt it (e.g. after the host CLI was kill -9'd)."""
    running = client().containers.list(filters={"label": f"{OUTPUT_LABEL}={out}"}, ignore_removed=True)
    if running:
        names = ", ".join(f"{c.name} ({c.labels.get('dev.forge.step')})" for c in running)
        raise EngineError(
            f"A runner is already working on {out}: container {names}.",
            f"Wait for it to finish, or stop it (`docker stop {running[0].name}`) and rerun to resume.",
        )


def _create(command: list[str], plan: Plan, image, volumes: dict, secret_environment: dict[str, str], out: str,
            memory: str | None, lifeline: Lifeline | None):
    import docker
    from docker.errors import APIError

    fetch = command[0] == "fetch"
    environment = {
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FORGE_IMAGE": image.tag,  # recorded in a run's environment.json
        "FORGE_IMAGE_ID": image.id,
        **({} if fetch else {"HF_HUB_OFFLINE": "1"}),  # no network: fail fast instead of trying the hub
        **secret_environment,
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
            network_mode=None if fetch else "none",  # a fetch gets the engine's default network
            **HARDENING,
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
