"""The queue on SQLite and on a real PostgreSQL server: matching, order, leases, cancellation, concurrency.

Hardware is a table of real devices (the NVML boundary is the only fake); the databases are real.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import re
import time
from collections import Counter

import pytest

from forge.contract.plan import Hardware
from forge.host.detect import detect
from forge.host.planner import build_plan
from forge.host.queue.capacity import Capacity, gfd_family
from forge.host.queue.jobs import Requirements, RetryPolicy, requirements_of
from forge.host.queue.store import open_store
from tests.conftest import EXAMPLES
from tests.test_detect import Table

CPU = Hardware(accelerator="cpu", arch="cpu", cpu_count=8, ram_total_mib=32000, ram_available_mib=30000)


def hardware(*devices) -> Hardware:
    return detect(Table(*devices)) if devices else CPU


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def queue_url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'queue.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def submit(store, needs: Requirements, priority: int = 0, name: str = "job", output: str | None = None, **retry):
    """A job with its own output directory unless `output` names a shared one."""
    return store.submit(name=name, steps=["train"], plan_path="/shared/forge.yaml", plan_yaml="{}",
                        output_dir=output or f"/shared/out-{random.random()}", requirements=needs,
                        retry=RetryPolicy(**retry), priority=priority)


def cuda(arch: str, cc: str, vram: int, gpus: int = 1) -> Requirements:
    return Requirements(accelerator="cuda", arch=arch, min_compute_capability=cc, min_free_vram_mib=vram, gpu_count=gpus)


AGENTS = {
    "cpu box": Capacity(CPU),
    "rtx 4090": Capacity(hardware(("NVIDIA GeForce RTX 4090", "8.9", 24564))),
    "2× rtx 3090": Capacity(hardware(("NVIDIA GeForce RTX 3090", "8.6", 24576), ("NVIDIA GeForce RTX 3090", "8.6", 24576))),
    "h100, gpu jobs only": Capacity(hardware(("NVIDIA H100 80GB HBM3", "9.0", 81559)), cpu_jobs=False),
    "b200": Capacity(hardware(("NVIDIA B200", "10.0", 183359))),
    "a100 + l4": Capacity(hardware(("NVIDIA A100-SXM4-80GB", "8.0", 81920), ("NVIDIA L4", "8.9", 23034))),
}


def random_requirements(rng: random.Random) -> Requirements:
    if rng.random() < 0.2:
        return Requirements(accelerator="cpu", arch="cpu")
    arch, cc = rng.choice([("ampere", "8.0"), ("ampere", "8.6"), ("ada", "8.9"), ("hopper", "9.0"),
                           ("blackwell", "10.0"), ("blackwell", "12.0")])
    return cuda(arch, cc, rng.choice([8000, 20000, 24000, 40000, 80000, 150000]), rng.choice([1, 1, 1, 2, 4]))


@pytest.mark.parametrize("agent", list(AGENTS))
def test_an_agent_claims_exactly_the_jobs_it_can_run(queue_url, agent):
    """The SQL claim and `Capacity.misfit` are one rule: over 60 random jobs, the agent claims every job the
    rule admits and no other."""
    store, capacity = open_store(queue_url), AGENTS[agent]
    rng = random.Random(agent)
    jobs = {submit(store, random_requirements(rng)).id: None for _ in range(60)}
    jobs = {job.id: job.requirements for job in store.jobs(limit=100)}
    claimed = set()
    while (got := store.claim("agent", capacity, 60)) is not None:
        claimed.add(got[0].id)
    expected = {job_id for job_id, needs in jobs.items() if capacity.misfit(needs) is None}
    assert claimed == expected
    assert 0 < len(expected) < len(jobs)  # the random jobs really split into runnable and not


def test_misfit_reasons_name_what_is_missing():
    assert "does not run on NVIDIA GeForce RTX 4090" in AGENTS["rtx 4090"].misfit(cuda("hopper", "9.0", 1000))
    assert AGENTS["rtx 4090"].misfit(cuda("ampere", "8.0", 1000)) is None  # Ampere's 8.6 code runs on 8.9
    assert "needs 2 GPUs, has 1" == AGENTS["rtx 4090"].misfit(cuda("ada", "8.9", 1000, gpus=2))
    assert "MiB free" in AGENTS["rtx 4090"].misfit(cuda("ada", "8.9", 30000))
    assert AGENTS["2× rtx 3090"].misfit(cuda("ampere", "8.6", 20000, gpus=2)) is None
    assert "compute capability 8.6" in AGENTS["a100 + l4"].misfit(cuda("ampere", "8.6", 1000))
    assert AGENTS["h100, gpu jobs only"].misfit(Requirements(accelerator="cpu", arch="cpu")) == \
        "this agent takes GPU jobs only"


def test_labels_follow_gpu_feature_discovery():
    labels = AGENTS["rtx 4090"].labels()
    assert labels["nvidia.com/gpu.family"] == "ada-lovelace"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-GeForce-RTX-4090"
    assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == ("8", "9")
    assert labels["nvidia.com/gpu.count"] == "1" and labels["nvidia.com/gpu.memory"] == "24564"
    assert labels["forge.dev/images"] == "ampere,ada"
    assert AGENTS["2× rtx 3090"].labels()["nvidia.com/gpu.count"] == "2"
    assert "nvidia.com/gpu.family" not in AGENTS["cpu box"].labels()
    assert [gfd_family(cc) for cc in ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")] == \
        ["ampere", "ampere", "ada-lovelace", "hopper", "blackwell", "blackwell"]


def test_requirements_come_from_the_plan(tmp_path):
    data = [str(EXAMPLES / "chat-sample.jsonl")]
    h100 = build_plan("sft", "llama-3.2-1b-instruct", data, hardware(("NVIDIA H100 80GB HBM3", "9.0", 81559)), tmp_path)
    needs = requirements_of(h100)
    assert (needs.accelerator, needs.arch, needs.min_compute_capability, needs.gpu_count) == ("cuda", "hopper", "9.0", 1)
    # the planner's estimate for the planned batches, not the whole card: a smaller Hopper part fits
    assert 1000 < needs.min_free_vram_mib < 81559 - 500
    cpu = build_plan("smoke", "smollm2-135m-instruct", data, CPU, tmp_path)
    assert requirements_of(cpu) == Requirements(accelerator="cpu", arch="cpu")


def test_bind_moves_the_plan_onto_the_agents_freest_gpus(tmp_path):
    data = [str(EXAMPLES / "chat-sample.jsonl")]
    plan = build_plan("sft", "smollm2-135m-instruct", data, hardware(("NVIDIA GeForce RTX 3090", "8.6", 24576)), tmp_path)
    found = detect(Table(("NVIDIA GeForce RTX 4090", "8.9", 24564), ("NVIDIA GeForce RTX 4090", "8.9", 24564)))
    busy, free = found.gpus[0].model_copy(update={"memory_free_mib": 9000}), found.gpus[1]
    agent = Capacity(found.model_copy(update={"gpus": [busy, free]}))
    bound = agent.bind(plan, requirements_of(plan))
    assert [gpu.uuid for gpu in bound.hardware.gpus] == [agent.hardware.gpus[1].uuid]
    assert (bound.image, bound.train) == (plan.image, plan.train)


def test_priority_first_then_submission_order(queue_url):
    store = open_store(queue_url)
    cpu = Requirements(accelerator="cpu", arch="cpu")
    first, second, urgent = (submit(store, cpu, name=n, priority=p) for n, p in (("a", 0), ("b", 0), ("c", 5)))
    order = [store.claim("agent", AGENTS["cpu box"], 60)[0].name for _ in range(3)]
    assert order == ["c", "a", "b"]


def test_an_expired_lease_requeues_the_job_until_restarts_run_out(queue_url):
    store = open_store(queue_url)
    job = submit(store, Requirements(accelerator="cpu", arch="cpu"), max_restarts=1)
    _, token = store.claim("a", AGENTS["cpu box"], 60)  # long: a stalled machine must not expire it before the check
    assert store.requeue_expired() == []  # not yet
    assert store.renew(job.id, token, 0.3) is False  # still a's (and not cancelled); now ending in 0.3 s
    time.sleep(0.5)
    assert store.requeue_expired() == [(job.id, "queued")]
    assert store.renew(job.id, token, 60) is None  # agent a lost it: its heartbeat says so ...
    assert not store.finish(job.id, token, "succeeded", 0, None, {}, "late")  # ... and it cannot record a result
    again, token_b = store.claim("b", AGENTS["cpu box"], 0.3)
    assert (again.attempts, again.agent) == (2, "b")
    time.sleep(0.5)
    assert store.requeue_expired() == [(job.id, "failed")]  # one restart allowed, used
    failed = store.get(job.id)
    assert failed.final and "no restarts are left" in failed.error
    notes = [e["body"] for e in store.events(job.id) if e["kind"] == "queue"]
    assert sum("stopped renewing its lease" in note for note in notes) == 2


def test_retry_policy_decides_what_goes_back_on_the_queue(queue_url):
    store = open_store(queue_url)
    job = submit(store, Requirements(accelerator="cpu", arch="cpu"), max_restarts=2, retry_on=[75, 137])
    outcomes = []
    for code in (137, 75, 75):
        claimed, token = store.claim("a", AGENTS["cpu box"], 60)
        state = claimed.next_state(code)
        store.finish(job.id, token, state, code, None, {}, "")
        outcomes.append(state)
    assert outcomes == ["queued", "queued", "failed"]  # two restarts, then out
    other = submit(store, Requirements(accelerator="cpu", arch="cpu"))
    claimed, _ = store.claim("a", AGENTS["cpu box"], 60)
    assert claimed.next_state(3) == "failed"  # bad data is not retried
    assert claimed.next_state(0) == "succeeded"
    assert other.id == claimed.id


def test_cancel_a_queued_job_at_once_and_a_running_one_through_its_heartbeat(queue_url):
    store = open_store(queue_url)
    cpu = Requirements(accelerator="cpu", arch="cpu")
    queued, running = submit(store, cpu, name="q"), submit(store, cpu, name="r")
    claimed, token = store.claim("a", AGENTS["cpu box"], 60)
    assert claimed.id == queued.id
    store.finish(queued.id, token, "queued", 75, None, {}, "back")  # put back: it is queued again
    claimed, token = store.claim("a", AGENTS["cpu box"], 60)
    assert claimed.id == queued.id  # still first in line
    assert store.cancel(running.id).state == "cancelled"
    assert store.claim("b", AGENTS["cpu box"], 60) is None  # a cancelled job is never claimed
    assert store.renew(queued.id, token, 60) is False
    assert store.cancel(queued.id).cancel_requested
    assert store.renew(queued.id, token, 60) is True  # the agent hears it at its next heartbeat
    assert store.get(queued.id).next_state(75) == "cancelled"  # and the graceful stop ends it, not retried
    with pytest.raises(Exception, match="already cancelled"):
        store.cancel(running.id)


def test_an_unknown_or_ambiguous_job_is_a_clear_error(tmp_path):
    from forge.errors import QueueError

    store = open_store(f"sqlite:///{tmp_path / 'q.db'}")
    with pytest.raises(QueueError, match="No job 'j-nope'"):
        store.get("j-nope")
    for _ in range(20):
        submit(store, Requirements(accelerator="cpu", arch="cpu"))
    with pytest.raises(QueueError, match="matches several jobs"):
        store.get("j-")


def test_an_unreachable_postgres_is_a_clear_error():
    from forge.errors import QueueError

    with pytest.raises(QueueError, match="The queue at postgresql://forge@127.0.0.1:1/x failed") as caught:
        open_store("postgresql://forge@127.0.0.1:1/x")
    assert "server is up" in caught.value.hint


STRESS_LEASE = 3.0  # far above a claim's few milliseconds, even with 12 processes on 2 cores


def _claim_loop(url: str, agent: str, seconds: float, results, busy, lock) -> None:
    """One stress-test agent: claim, sometimes die mid-job (stop renewing), otherwise finish. `busy` holds the
    output directories being written; finding one already there is a violation."""
    store = open_store(url)
    rng = random.Random(agent)
    capacity = AGENTS["cpu box"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        store.requeue_expired()
        claimed = store.claim(agent, capacity, STRESS_LEASE)
        if claimed is None:
            if all(job.final for job in store.jobs(limit=1000)):
                return
            time.sleep(0.02)
            continue
        job, token = claimed
        output = store_output(store, job.id)
        with lock:
            results.append((job.id, job.attempts, agent, output in busy))
            busy[output] = agent
        time.sleep(rng.random() / 100)  # "runs" a moment
        with lock:
            busy.pop(output)  # the runner is gone (finished, or stopped by its lifeline) ...
        if rng.random() < 0.05:
            continue  # ... and this "agent" died: its lease will expire and the job go to someone else
        # refused only when this process stalled past its lease (these agents do not renew): then the job
        # is rightly someone else's, and the clash check above says whether it ran twice
        store.finish(job.id, token, "succeeded", 0, None, {}, "done")


def store_output(store, job_id: str) -> str:
    with store._tx() as run:
        return run("SELECT output_dir FROM forge_jobs WHERE id = :id", {"id": job_id})[0]["output_dir"]


@pytest.mark.parametrize("backend, agents, jobs", [("sqlite", 4, 150), pytest.param("postgres", 12, 400, marks=pytest.mark.postgres)])
def test_concurrent_agents_never_run_a_job_twice(backend, agents, jobs, tmp_path, request):
    """Agents in separate processes race for the same jobs, and some die holding one. Every job ends
    succeeded; each attempt was claimed by exactly one agent; a job is re-claimed only after its lease expired."""
    url = f"sqlite:///{tmp_path / 'queue.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    store = open_store(url)
    for i in range(jobs):  # a tenth of the jobs share an output directory with others (a plan submitted twice)
        submit(store, Requirements(accelerator="cpu", arch="cpu"), max_restarts=50,
               output=f"/shared/plan-{i % 5}" if i % 10 == 0 else None)
    with multiprocessing.Manager() as manager:
        results, busy, lock = manager.list(), manager.dict(), manager.Lock()
        workers = [multiprocessing.get_context("fork").Process(target=_claim_loop,
                                                               args=(url, f"agent-{i}", 90, results, busy, lock))
                   for i in range(agents)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        claims = list(results)
    assert all(worker.exitcode == 0 for worker in workers)
    final = store.jobs(limit=jobs + 1)
    assert Counter(job.state for job in final) == {"succeeded": jobs}
    per_attempt = Counter((job_id, attempt) for job_id, attempt, _, _ in claims)
    assert max(per_attempt.values()) == 1  # no attempt was handed to two agents
    assert {job_id for job_id, _, _, _ in claims} == {job.id for job in final}
    assert len({agent for _, _, agent, _ in claims}) > 1  # the work really was shared
    assert not any(clash for _, _, _, clash in claims)  # no output directory had two runners at once
    retried = [job for job in final if job.attempts > 1]
    for job in retried:  # each re-claim followed a lease expiry the queue recorded
        notes = [e["body"] for e in store.events(job.id) if e["kind"] == "queue"]
        assert sum("stopped renewing" in note for note in notes) == job.attempts - 1


def test_a_lost_agent_is_marked_lost(queue_url):
    store = open_store(queue_url)
    job = submit(store, Requirements(accelerator="cpu", arch="cpu"))
    store.register_agent("a-1", "a", AGENTS["cpu box"], "busy", job.id)
    store.claim("a-1", AGENTS["cpu box"], 0.2)
    time.sleep(0.4)
    store.requeue_expired()
    (agent,) = store.agents()
    assert (agent["state"], agent["job_id"]) == ("lost", None)


def run_cli(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "forge.host", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160", **(env or {})}, timeout=120)


def test_jobs_logs_replays_events_output_and_queue_notes(tmp_path):
    """What `forge jobs logs` shows comes from the queue: the runner's stages as bars, its output lines and
    the queue's own notes, in order; --json lists carry the requirements."""
    from forge.contract.events import Progress, StageFinished, StageStarted, encode_event

    url = f"sqlite:///{tmp_path / 'q.db'}"
    store = open_store(url)
    job = submit(store, Requirements(accelerator="cpu", arch="cpu"), name="replayed")
    claimed, token = store.claim("agent-x", AGENTS["cpu box"], 60)
    events = [StageStarted(ts=1, stage="train", total=4, unit="steps"),
              *(Progress(ts=1 + i, stage="train", done=i, total=4, metrics={"loss": 2.0 / i}) for i in range(1, 5)),
              StageFinished(ts=6, stage="train", seconds=5.0)]
    store.add_events(job.id, 1, [(e.ts, "event", encode_event(e)) for e in events] + [(7, "log", "a runner line")])
    store.finish(job.id, token, "succeeded", 0, None, {}, "Attempt 1 ended: job succeeded.")

    shown = run_cli("jobs", "logs", "-f", job.id[:6], "--queue", url)
    assert shown.returncode == 0, shown.stderr
    out = shown.stderr
    assert out.index("queue: Submitted by") < out.index("queue: Attempt 1 claimed by agent agent-x") \
        < out.index("a runner line") < out.index("queue: Attempt 1 ended")
    assert re.search(r"train +━+ 4/4 .*loss=0.5", out)
    listed = json.loads(run_cli("jobs", "list", "--json", "--queue", url).stdout)
    assert [(j["id"], j["state"], j["requirements"]["accelerator"]) for j in listed] == [(job.id, "succeeded", "cpu")]


def test_following_a_failed_job_exits_with_its_code(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    store = open_store(url)
    job = submit(store, Requirements(accelerator="cpu", arch="cpu"))
    _, token = store.claim("a", AGENTS["cpu box"], 60)
    store.finish(job.id, token, "failed", 3, "Data file not found.", {}, "failed")
    followed = run_cli("jobs", "logs", "--follow", job.id, "--queue", url)
    assert followed.returncode == 3 and f"{job.id} failed (exit code 3)" in followed.stdout


def test_submit_refuses_bad_input_clearly(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    missing = run_cli("submit", "-c", str(tmp_path / "nope.yaml"), "--queue", url)
    assert missing.returncode == 2 and "No plan at" in missing.stderr and "Traceback" not in missing.stderr
    bad_step = run_cli("submit", "--step", "deploy", "--queue", url)
    assert bad_step.returncode == 2 and "use prepare, train or both" in bad_step.stderr
    bad_state = run_cli("jobs", "list", "--state", "done", "--queue", url)
    assert bad_state.returncode == 2 and "done: use queued, running, succeeded, failed, cancelled" in bad_state.stderr
    unknown = run_cli("jobs", "show", "j-nothing", "--queue", url)
    assert unknown.returncode == 8 and "No job 'j-nothing'" in unknown.stderr
    agent = run_cli("agent", "--queue", url, "--lease", "5", "--heartbeat", "2")
    assert agent.returncode == 2 and "three heartbeats per lease" in agent.stderr


def test_jobs_sharing_an_output_directory_never_run_at_once(queue_url):
    """The same plan submitted twice trains the same run: the second waits for the first, even on an idle
    agent, and jobs behind it are not held up."""
    store = open_store(queue_url)
    cpu = Requirements(accelerator="cpu", arch="cpu")
    first, twin, other = (submit(store, cpu, name=n, output=o) for n, o in
                          (("first", "/shared/run"), ("twin", "/shared/run"), ("other", None)))
    claimed, token = store.claim("a", AGENTS["cpu box"], 60)
    assert claimed.id == first.id
    assert store.claim("b", AGENTS["cpu box"], 60)[0].id == other.id  # the twin is skipped, not blocking
    assert store.claim("c", AGENTS["cpu box"], 60) is None
    store.finish(first.id, token, "succeeded", 0, None, {}, "done")
    assert store.claim("c", AGENTS["cpu box"], 60)[0].id == twin.id


def test_a_plan_the_agent_cannot_see_fails_with_what_to_do(tmp_path):
    from forge.host.agent import Agent, AgentSettings

    store = open_store(f"sqlite:///{tmp_path / 'q.db'}")
    job = submit(store, Requirements(accelerator="cpu", arch="cpu"))  # its plan is in /shared, not here
    said: list[str] = []
    code = Agent(store, Table(problem="none"), AgentSettings(name="here", poll_seconds=0.1), say=said.append).serve(once=True)
    failed = store.get(job.id)
    assert code == 3 and (failed.state, failed.exit_code) == ("failed", 3)
    assert "The plan's directory /shared is not on this machine" in failed.error and "same path" in failed.error
    assert any("ended with exit code 3: job failed" in line for line in said)


@pytest.mark.postgres
def test_a_claim_skips_a_job_another_agent_is_claiming(postgres_url):
    """The row lock, deterministically: while another agent's claim holds the first job's row, a claim takes
    the next job at once instead of waiting for that row or taking the same job."""
    import threading

    import psycopg

    store = open_store(postgres_url)
    cpu = Requirements(accelerator="cpu", arch="cpu")
    first, second = submit(store, cpu, name="first"), submit(store, cpu, name="second")
    with psycopg.connect(postgres_url) as other:  # a transaction left open: the row stays locked
        other.execute("SELECT id FROM forge_jobs WHERE id = %s FOR UPDATE", (first.id,))
        got = []
        claimer = threading.Thread(target=lambda: got.append(store.claim("b", AGENTS["cpu box"], 60)), daemon=True)
        claimer.start()
        claimer.join(10)
        assert not claimer.is_alive(), "the claim waited on the locked row"
        other.rollback()
    assert got[0][0].id == second.id
    assert store.claim("c", AGENTS["cpu box"], 60)[0].id == first.id  # released: now it is claimable
