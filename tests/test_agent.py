"""`forge agent` against the real engine, CPU image and a real PostgreSQL: jobs land on the agent whose
hardware fits, a kill -9'd agent's job is resumed by another and finishes once, cancel stops gracefully,
and the GitHub Actions example runs a smoke job end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from forge.contract.events import Progress, parse_line
from forge.contract.plan_io import write_plan
from forge.host.agent import JOB_LABEL, Agent, AgentSettings
from forge.host.detect import detect
from forge.host.planner import build_plan
from forge.host.queue.jobs import RetryPolicy, requirements_of
from forge.host.queue.store import open_store
from tests.conftest import EXAMPLES, REPO
from tests.test_detect import Table

pytestmark = pytest.mark.docker

TOTAL_STEPS = 30
# Only for a hang: these waits are for events, and beside busy neighbours on 2 cores a job may take many times
# as long as alone.
SAFETY_NET_S = 3600


def cli(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forge.host", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "160"}, **kwargs)


def agent_process(url: str, name: str, *extra: str) -> subprocess.Popen:
    return cli("agent", "--queue", url, "--name", name, "--cpu", "--lease", "6", "--heartbeat", "1", "--poll", "0.3",
               *extra)


@pytest.fixture
def plan_dir(tmp_path, model_cache) -> Path:
    """A CPU smoke plan on the bundled sample, long enough (30 steps, a checkpoint every 3) to kill mid-way."""
    work = shared_dir(tmp_path)
    shutil.copy(EXAMPLES / "chat-sample.jsonl", work / "chat-sample.jsonl")
    planned = subprocess.run([sys.executable, "-m", "forge.host", "plan", "smoke", "--cpu", "--data",
                              "chat-sample.jsonl"], cwd=work, capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    config = yaml.safe_load((work / "forge.yaml").read_text())
    config["train"].update(max_steps=TOTAL_STEPS, save_every=3, keep_last=3)
    (work / "forge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work


def shared_dir(tmp_path: Path) -> Path:
    """pytest's own directories are private (0700); the runner (uid 1000 under root) must read the data."""
    work = tmp_path / "shared"
    work.mkdir(mode=0o755)
    work.chmod(0o755)
    return work


def submit(url: str, plan: Path, *extra: str) -> str:
    done = cli("submit", "-c", str(plan), "--queue", url, "--json", *extra)
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    return json.loads(out)["id"]


def train_steps(store, job_id: str) -> dict[int, list[int]]:
    """The train progress the queue recorded, per attempt."""
    steps: dict[int, list[int]] = {}
    for row in store.events(job_id, limit=100_000):
        if row["kind"] == "event" and isinstance(event := parse_line(row["body"]), Progress) and event.stage == "train":
            steps.setdefault(row["attempt"], []).append(event.done)
    return steps


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None, store=None,
               job_id: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the agent exited ({process.returncode}) before {what}:\n{process.stderr.read()[-3000:]}")
        if store is not None and store.get(job_id).final:
            raise AssertionError(f"the job ended before {what}: {store.get(job_id)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class RunningContainers(threading.Thread):
    """Samples the engine: the most runner containers of one job that were ever running at once."""

    def __init__(self, engine, job_id: str) -> None:
        super().__init__(daemon=True)
        self.engine, self.job_id, self.most, self.done = engine, job_id, 0, threading.Event()
        self.exit_codes: dict[str, int] = {}

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                found = self.engine.containers.list(all=True, filters={"label": f"{JOB_LABEL}={self.job_id}"})
                self.most = max(self.most, sum(c.status == "running" for c in found))
                for container in found:
                    if container.status == "exited":
                        self.exit_codes[container.id] = container.attrs["State"]["ExitCode"]
            except Exception:  # a container removed between list and inspect
                pass


@pytest.mark.postgres
def test_a_killed_agents_job_is_resumed_by_another_and_finishes_once(plan_dir, postgres_url, engine):
    store = open_store(postgres_url)
    job_id = submit(postgres_url, plan_dir / "forge.yaml")
    watcher = RunningContainers(engine, job_id)
    watcher.start()
    first = agent_process(postgres_url, "first")
    try:
        wait_until(lambda: max(train_steps(store, job_id).get(1, [0])) >= 7, SAFETY_NET_S, "step 7 on the first agent", first, store, job_id)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = agent_process(postgres_url, "second", "--once")
    out, err = second.communicate(timeout=SAFETY_NET_S)
    watcher.done.set()
    watcher.join()
    assert second.returncode == 0, err
    assert "Traceback" not in err

    job = store.get(job_id)
    assert (job.state, job.attempts, job.exit_code) == ("succeeded", 2, 0)
    assert job.agent.startswith("second-")
    notes = [row["body"] for row in store.events(job_id) if row["kind"] == "queue"]
    assert any(note.startswith("Agent first-") and "stopped renewing its lease: job queued" in note for note in notes)
    steps = train_steps(store, job_id)
    assert max(steps[1]) >= 7  # the first attempt's progress is kept on the queue
    assert min(steps[2]) > 3 and max(steps[2]) == TOTAL_STEPS  # the second resumed from a checkpoint and finished

    runs = list((plan_dir / "forge-out" / "runs").iterdir())
    assert len(runs) == 1  # one run, finished once
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["steps"] == TOTAL_STEPS and metrics["resumed_from_step"] >= 6
    assert watcher.most == 1  # never two runners for the job at once
    assert 75 in watcher.exit_codes.values()  # the orphaned runner stopped itself when its lifeline closed
    assert not engine.containers.list(all=True, filters={"label": f"{JOB_LABEL}={job_id}"})


@pytest.mark.postgres
def test_jobs_land_on_the_agent_whose_hardware_fits(tmp_path, postgres_url, engine, model_cache):
    """An RTX 4090 agent (taking GPU jobs only) and a CPU agent; a CPU job, an Ada job and a Hopper job.
    The Hopper job stays queued and `forge jobs show` says why. (The Ada job then fails on this machine: no
    GPU image is built here, which shows it really went to the launcher on the 4090 agent.)"""
    tmp_path = shared_dir(tmp_path)
    shutil.copy(EXAMPLES / "chat-sample.jsonl", tmp_path / "chat-sample.jsonl")
    data = [str(tmp_path / "chat-sample.jsonl")]
    store = open_store(postgres_url)
    jobs = {}
    for name, found in {"cpu": detect(Table(problem="none")), "ada": detect(Table(("NVIDIA L4", "8.9", 23034))),
                        "hopper": detect(Table(("NVIDIA H100 80GB HBM3", "9.0", 81559)))}.items():
        plan = build_plan("smoke", "smollm2-135m-instruct", data, found, tmp_path)
        path = tmp_path / f"{name}.yaml"
        write_plan(plan.model_copy(update={"output": plan.output.model_copy(update={"dir": f"out-{name}"})}), path)
        jobs[name] = store.submit(name=name, steps=["prepare"], plan_path=str(path), plan_yaml=path.read_text(),
                                  output_dir=str(tmp_path / f"out-{name}"),
                                  requirements=requirements_of(plan), retry=RetryPolicy()).id

    quiet = lambda line: None  # noqa: E731
    gpu_box = Agent(open_store(postgres_url), Table(("NVIDIA GeForce RTX 4090", "8.9", 24564)),
                    AgentSettings(name="rtx4090", poll_seconds=0.2, cpu_jobs=False), say=quiet)
    cpu_box = Agent(open_store(postgres_url), Table(problem="no GPU"), AgentSettings(name="cpu", poll_seconds=0.2),
                    say=quiet)
    threads = [threading.Thread(target=agent.serve, daemon=True) for agent in (gpu_box, cpu_box)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: store.get(jobs["cpu"]).final and store.get(jobs["ada"]).final, SAFETY_NET_S, "both jobs to end")
        time.sleep(1)  # several more polls: nobody takes the Hopper job
        shown = cli("jobs", "show", jobs["hopper"], "--queue", postgres_url)
        out, err = shown.communicate(timeout=60)
    finally:
        for agent in (gpu_box, cpu_box):
            agent.stopping.set()
        for thread in threads:
            thread.join(60)

    cpu, ada, hopper = (store.get(jobs[name]) for name in ("cpu", "ada", "hopper"))
    assert (cpu.state, cpu.agent) == ("succeeded", cpu_box.id)
    assert (ada.state, ada.agent, ada.exit_code) == ("failed", gpu_box.id, 6)
    assert "forge-runner:ada" in ada.error
    assert (hopper.state, hopper.attempts) == ("queued", 0)
    labels = {agent["name"]: agent["labels"] for agent in store.agents()}
    assert labels["rtx4090"]["nvidia.com/gpu.family"] == "ada-lovelace"
    assert "nvidia.com/gpu.family" not in labels["cpu"]
    assert shown.returncode == 0, err
    assert "queued" in out and "cannot: the hopper image does not run on NVIDIA GeForce RTX 4090 (8.9)" in out


def test_cancel_stops_a_running_job_gracefully(plan_dir, tmp_path, engine):
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    store = open_store(url)
    job_id = submit(url, plan_dir / "forge.yaml", "--step", "train", "--max-restarts", "5")
    subprocess.run([sys.executable, "-m", "forge.host", "prepare"], cwd=plan_dir, check=True, capture_output=True)
    agent = agent_process(url, "solo", "--once")
    wait_until(lambda: max(train_steps(store, job_id).get(1, [0])) >= 2, SAFETY_NET_S, "step 2", agent, store, job_id)
    cancelled = cli("jobs", "cancel", job_id, "--queue", url)
    assert cancelled.wait(60) == 0 and "cancel requested" in cancelled.stdout.read()
    out, err = agent.communicate(timeout=SAFETY_NET_S)
    assert agent.returncode == 75, err  # stopped on request, state saved
    job = store.get(job_id)
    assert (job.state, job.exit_code, job.attempts) == ("cancelled", 75, 1)  # not retried
    run = next((plan_dir / "forge-out" / "runs").iterdir())
    saved = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert saved == max(train_steps(store, job_id)[1])  # the graceful stop checkpointed its last step
    logs = cli("jobs", "logs", job_id, "--queue", url)
    out, err = logs.communicate(timeout=60)
    assert logs.returncode == 0 and "Cancel requested by" in err and "Stopped on request" in err


def test_the_github_actions_example_submits_and_follows_a_smoke_job(tmp_path, engine, model_cache):
    workflow = yaml.safe_load((REPO / "examples" / "github-actions" / "forge-smoke.yml").read_text())
    steps = workflow["jobs"]["smoke"]["steps"]
    assert any("examples/github-actions/submit-smoke.sh" in step.get("run", "") for step in steps)
    assert workflow["jobs"]["smoke"]["env"]["FORGE_QUEUE"] == "${{ secrets.FORGE_QUEUE }}"

    env = {**os.environ, "FORGE_QUEUE": f"sqlite:///{tmp_path / 'queue.db'}", "COLUMNS": "160"}
    agent = subprocess.Popen([sys.executable, "-m", "forge.host", "agent", "--cpu", "--once", "--poll", "0.3"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    script = subprocess.run(["bash", str(REPO / "examples" / "github-actions" / "submit-smoke.sh"),
                             str(tmp_path / "shared" / "run-1")], env=env, capture_output=True, text=True, timeout=SAFETY_NET_S)
    agent_out, agent_err = agent.communicate(timeout=SAFETY_NET_S)
    assert script.returncode == 0, script.stdout + script.stderr
    assert agent.returncode == 0, agent_err
    assert "succeeded" in script.stdout and "train" in script.stderr  # the followed progress
    assert (tmp_path / "shared" / "run-1" / "forge-out" / "runs").is_dir()


def test_an_agent_that_loses_its_lease_kills_its_runner(tmp_path, engine):
    """Fencing: once another agent holds the job, the old one's next heartbeat finds out and kills its
    runner at once, without waiting for a graceful stop."""
    from forge.host.agent import _Lease
    from forge.host.launcher import Control
    from forge.host.queue.jobs import Requirements
    from tests.test_queue import AGENTS

    store = open_store(f"sqlite:///{tmp_path / 'queue.db'}")
    job = store.submit(name="fenced", steps=["train"], plan_path="/x/forge.yaml", plan_yaml="{}", output_dir="/x/out",
                       requirements=Requirements(accelerator="cpu", arch="cpu"), retry=RetryPolicy())
    _, token = store.claim("old", AGENTS["cpu box"], 0.5)
    runner = engine.containers.run("forge-runner:cpu-0.1.0", entrypoint=["sleep", "300"], detach=True,
                                   labels={JOB_LABEL: job.id}, stop_signal="SIGTERM")
    try:
        control = Control()
        control.bind(runner)
        said: list[str] = []
        lease = _Lease(store, job.id, token, AgentSettings(lease_seconds=0.5, heartbeat_seconds=0.2), control,
                       said.append, beat=lambda: None)
        time.sleep(0.7)
        assert store.requeue_expired() == [(job.id, "queued")]
        assert store.claim("new", AGENTS["cpu box"], 60)[0].agent == "new"
        lease.start()
        wait_until(lambda: (runner.reload(), runner.status)[1] == "exited", 60, "the runner to be killed")
        lease.stop()
        assert lease.lost and runner.attrs["State"]["ExitCode"] == 137  # SIGKILL, not a graceful stop
        assert any("the lease is no longer this agent's" in line for line in said)
    finally:
        runner.remove(force=True)
