"""plan → prepare → train through the `forge` CLI, against the real engine and CPU image, with a
graceful stop, a kill -9 of the container mid-training, and resumes; then the adapter generates text."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forge.contract.events import Progress, StageStarted, parse_line
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.docker

TOTAL_STEPS = 30
SAVE_EVERY = 3
# Only for a hung run: the tests wait for the runs' events, never for a guessed time; beside busy neighbours
# on 2 cores a run may take many times as long as alone.
SAFETY_NET_S = 3600
BAD_ROWS = [b'{"instruction": "broken', b'{"messages": [{"role": "user", "content": "no answer"}]}', b'"just a string"']


def forge(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forge.host", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "160"})


def finish(process: subprocess.Popen, timeout: float = SAFETY_NET_S) -> tuple[int, dict, str]:
    out, err = process.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return process.returncode, json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def job(tmp_path_factory, engine, model_cache) -> Path:
    workdir = tmp_path_factory.mktemp("job")
    data = workdir / "data"
    data.mkdir()
    for name in ("alpaca-sample.jsonl", "chat-sample.jsonl"):
        shutil.copy(EXAMPLES / name, data / name)
    (data / "bad.jsonl").write_bytes(b"\n".join(BAD_ROWS) + b"\n")
    plan = subprocess.run(
        [sys.executable, "-m", "forge.host", "plan", "smoke", "--cpu", *[f"--data={p}" for p in sorted(data.iterdir())]],
        cwd=workdir, capture_output=True, text=True,
    )
    assert plan.returncode == 0, plan.stderr
    config = yaml.safe_load((workdir / "forge.yaml").read_text())
    config["train"].update(max_steps=TOTAL_STEPS, save_every=SAVE_EVERY, keep_last=3)
    (workdir / "forge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


@pytest.fixture(scope="module")
def prepared(job) -> dict:
    code, result, err = finish(forge("prepare", "--json", cwd=job))
    assert code == 0 and result["status"] == "ok", err
    return result


def test_prepare_accounts_for_every_row(job, prepared):
    manifest = json.loads(Path(prepared["paths"]["manifest"]).read_text())
    counts = manifest["stats"]["accounting"]
    rows_in = sum(1 for p in (job / "data").iterdir() for line in p.read_bytes().splitlines() if line.strip())
    assert counts["rows_in"] == rows_in == counts["kept"] + counts["rejected"] + counts["duplicates"] + counts["dropped_by_policy"]
    assert counts["balanced"] and manifest["splits"]["val"]["examples"] > 0
    rejects = [json.loads(line) for line in Path(prepared["paths"]["rejects"]).read_text().splitlines()]
    assert sorted((r["file"], r["line"], r["reason"]) for r in rejects) == [
        ("bad.jsonl", 1, "malformed_json"), ("bad.jsonl", 2, "no_assistant_turn"), ("bad.jsonl", 3, "not_an_object")]
    assert manifest["stats"]["rejected"] == {"malformed_json": 1, "no_assistant_turn": 1, "not_an_object": 1}

    import pyarrow.parquet as pq

    from forge.runner.hashing import sha256_file

    dataset = Path(prepared["paths"]["dataset_dir"])
    for name, meta in manifest["files"].items():
        assert sha256_file(dataset / name) == meta["sha256"]
    assert sum(pq.read_table(dataset / f).num_rows for f in manifest["splits"]["train"]["files"]) == \
        manifest["splits"]["train"]["examples"]


def test_prepare_rerun_is_a_cache_hit(job, prepared):
    code, again, _ = finish(forge("prepare", "--json", cwd=job))
    assert code == 0 and again["info"]["cached"] == 1
    assert again["paths"] == prepared["paths"]


def test_train_stops_gracefully_survives_kill_and_resumes(job, prepared, engine, smollm2_dir):
    # 1. SIGTERM to the CLI: the runner checkpoints and exits 75; the container is removed.
    first = forge("train", "--json", cwd=job)
    run_dir = _wait_for_step(job, first, minimum=4)
    first.send_signal(signal.SIGTERM)
    code, result, _ = finish(first)
    assert (code, result["status"]) == (75, "stopped")
    stopped_at = _latest_checkpoint_step(run_dir)
    assert stopped_at >= 4
    assert not _containers(engine)

    # 2. kill -9 the container itself once training has moved past another checkpoint.
    second = forge("train", "--json", cwd=job)
    _wait_for_step(job, second, minimum=stopped_at + SAVE_EVERY + 1, after_stage_starts=2)
    (container,) = _containers(engine)
    _assert_locked_down(container)
    container.kill(signal="SIGKILL")
    code, result, _ = finish(second)
    assert code == 137 and result["status"] == "failed"
    killed_after = _latest_checkpoint_step(run_dir)
    assert killed_after > stopped_at
    assert not _containers(engine)

    # 2b. kill -9 the host CLI instead: its container runs on, and a second runner on the same output is refused.
    orphaned = forge("train", "--json", cwd=job)
    _wait_for_step(job, orphaned, minimum=killed_after + SAVE_EVERY + 1, after_stage_starts=3)
    orphaned.kill()
    orphaned.wait()
    code, result, err = finish(forge("train", "--json", cwd=job))
    assert code == 5 and result["status"] == "failed" and "already working on" in err
    (orphan,) = _containers(engine)
    orphan.kill(signal="SIGKILL")
    orphan.remove(force=True)
    killed_after = _latest_checkpoint_step(run_dir)

    # 3. Rerun: resumes from the newest checkpoint and finishes.
    code, result, err = finish(forge("train", "--json", cwd=job))
    assert code == 0 and result["status"] == "ok", err
    assert result["info"]["resumed_from_step"] == killed_after
    assert result["info"]["steps"] == TOTAL_STEPS
    runs = _train_runs(run_dir)
    assert len(runs) == 4
    assert runs[0][0] == 1 and runs[1][0] == stopped_at + 1 and runs[3][0] == killed_after + 1
    assert runs[3][-1] == TOTAL_STEPS
    metrics = json.loads(Path(result["paths"]["metrics"]).read_text())
    assert [entry["step"] for entry in metrics["history"]] == list(range(1, TOTAL_STEPS + 1))

    # 4. The adapter loads with PEFT and changes what the model says.
    _generate_with_adapter(smollm2_dir, Path(result["paths"]["adapter"]))


def _copy_job(job: Path, name: str) -> Path:
    """Another job over the same data and plan, with the prepared dataset but no runs."""
    copy = job.parent / name
    shutil.copytree(job, copy, ignore=shutil.ignore_patterns("runs", ".jobs"))
    return copy


def test_train_killed_at_random_moments_matches_an_uninterrupted_run_then_exports(job, prepared, engine):
    """kill -9 of the container at moments told by the run's own events (so each lands where it is meant to,
    however slow the machine): once the model is loading, in mid-training past a sealed checkpoint, and right
    as a checkpoint is being written. The rerun resumes from the newest valid checkpoint and the finished
    run's losses match an uninterrupted one; then `forge export` merges the adapter and `forge runs list`
    shows the run."""
    import random

    import docker

    code, result, err = finish(forge("train", "--json", cwd=_copy_job(job, "uninterrupted")))
    assert code == 0, err
    expected = json.loads(Path(result["paths"]["metrics"]).read_text())

    killed = _copy_job(job, "killed")
    (killed / "gold").mkdir()
    (killed / "gold" / "gold.jsonl").write_text(  # a gold set beside forge.yaml: mounted read-only, answered after training
        json.dumps({"instruction": "Add the two numbers.", "input": "2 and 3", "output": "2 + 3 = 5."}) + "\n"
        + json.dumps({"instruction": "Name a colour.", "output": "Red.", "tags": {"kind": "open"}}) + "\n")
    config = yaml.safe_load((killed / "forge.yaml").read_text())
    config["train"]["eval"] = {"gold": "gold/gold.jsonl", "max_new_tokens": 8}
    (killed / "forge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rng = random.Random(11)
    past_a_checkpoint = rng.randint(SAVE_EVERY + 1, 2 * SAVE_EVERY)  # checkpoint 3 is sealed by then
    moments = [  # (what, the event to kill at, the longest random delay after it in seconds)
        ("while loading", lambda e: isinstance(e, StageStarted) and e.stage == "load", 1.0),
        (f"past step {past_a_checkpoint}", lambda e: _step(e) >= past_a_checkpoint, 0.5),
        ("while writing a checkpoint", lambda e: _step(e) > 0 and _step(e) % SAVE_EVERY == 0, 0.0),
    ]
    codes = []
    for invocation, (what, moment, delay) in enumerate(moments, start=1):
        process = forge("train", "--json", cwd=killed)
        _wait_for(killed, process, what, lambda events: any(map(moment, events)), invocation)
        time.sleep(rng.uniform(0, delay))
        for container in _containers(engine):
            try:
                container.kill(signal="SIGKILL")
            except docker.errors.APIError:  # it went first (it cannot have finished: the kill is before the last step)
                pass
        code, _, _ = finish(process)
        codes.append(code)
    assert codes == [137, 137, 137], codes
    run_dir = next((killed / "forge-out" / "runs").iterdir())
    sealed = _latest_checkpoint_step(run_dir)
    assert sealed >= SAVE_EVERY
    code, result, err = finish(forge("train", "--json", cwd=killed))
    assert code == 0 and result["status"] == "ok", err
    assert result["info"]["resumed_from_step"] == sealed  # the newest checkpoint, not a fresh start
    metrics = json.loads(Path(result["paths"]["metrics"]).read_text())
    assert "Skipping checkpoint" not in (Path(result["paths"]["run_dir"]) / "events.jsonl").read_text()
    assert [h["step"] for h in metrics["history"]] == list(range(1, TOTAL_STEPS + 1))
    assert [h["loss"] for h in metrics["history"]] == pytest.approx([h["loss"] for h in expected["history"]],
                                                                    abs=1e-5)
    assert metrics["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-5)
    assert metrics["gold"]["rows"] == 2 and set(metrics["gold"]["slices"]) == {"kind:open"}
    environment = json.loads((Path(result["paths"]["run_dir"]) / "environment.json").read_text())
    assert environment["image"].startswith("forge-runner:cpu-") and environment["image_id"].startswith("sha256:")

    code, exported, err = finish(forge("export", "--json", cwd=killed))
    assert code == 0 and exported["status"] == "ok", err
    assert (Path(exported["paths"]["merged"]) / "model.safetensors").is_file()
    listed = subprocess.run([sys.executable, "-m", "forge.host", "runs", "list", "--json"], cwd=killed,
                            capture_output=True, text=True)
    assert [(r["id"], r["finished"], r["steps"]) for r in json.loads(listed.stdout)] == [
        (Path(result["paths"]["run_dir"]).name, True, TOTAL_STEPS)]


def test_an_input_the_runner_cannot_read_is_a_clear_error(job, prepared):
    """As root, forge runs the container as uid 1000: a gold set in a private directory is unreadable there,
    which must say what and how to fix it, not print a traceback."""
    if os.getuid() != 0:
        pytest.skip("the runner runs as the invoking user, who can read their own files")
    private = _copy_job(job, "private")
    (private / "secret").mkdir(mode=0o700)
    (private / "secret" / "gold.jsonl").write_text(json.dumps({"instruction": "Hi", "output": "Hello."}) + "\n")
    config = yaml.safe_load((private / "forge.yaml").read_text())
    config["train"]["eval"] = {"gold": "secret/gold.jsonl"}
    (private / "forge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    code, result, err = finish(forge("train", "--json", cwd=private))
    assert code == 3 and result["error"]["code"] == "data", err
    assert "Permission denied: /gold/gold.jsonl" in result["error"]["message"] and "chmod" in result["error"]["hint"]


def _assert_locked_down(container) -> None:
    """Non-root, an init process, inputs read-only: checked on the live container."""
    container.reload()
    user = container.attrs["Config"]["User"]
    assert user and not user.startswith("0:") and user not in ("0", "root")
    assert container.attrs["HostConfig"]["Init"] is True
    mounts = {m["Destination"]: m["RW"] for m in container.attrs["Mounts"]}
    assert mounts["/out"] is True and mounts["/job/forge.yaml"] is False
    data = [rw for destination, rw in mounts.items() if destination.startswith("/data/")]
    assert data and not any(data)


def _generate_with_adapter(base_dir: Path, adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        tuned_logits = model(**inputs).logits
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), "the adapted model generated nothing"
    assert not torch.allclose(base_logits, tuned_logits), "the adapter did not change the model"


def _events(job: Path) -> list:
    files = list((job / "forge-out" / "runs").glob("*/events.jsonl"))
    if not files:
        return []
    return [event for line in files[0].read_text().splitlines() if (event := parse_line(line))]


def _train_runs(run_dir: Path) -> list[list[int]]:
    """Step numbers reported by each `forge train` invocation, split at each train stage start."""
    runs: list[list[int]] = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        event = parse_line(line)
        if isinstance(event, StageStarted) and event.stage == "train":
            runs.append([])
        elif isinstance(event, Progress) and event.stage == "train":
            runs[-1].append(event.done)
    return runs


def _wait_for_step(job: Path, process: subprocess.Popen, minimum: int, after_stage_starts: int = 1) -> Path:
    """Wait until the `after_stage_starts`-th `forge train` of this job reports step `minimum` or later."""
    _wait_for(job, process, f"step {minimum}", lambda events: any(_step(e) >= minimum for e in events),
              after_stage_starts)
    return next((job / "forge-out" / "runs").iterdir())


def _wait_for(job: Path, process: subprocess.Popen, what: str, condition, invocation: int) -> None:
    """Poll the run's events until `condition` holds for those of the `invocation`-th `forge train` of this
    job (counted by the model load each one starts with). No wall-clock guess: the safety net is for a hang."""
    deadline = time.monotonic() + SAFETY_NET_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"forge train exited with {process.returncode} before {what}:\n"
                                 f"{process.stderr.read()[-3000:]}")
        events = _events(job)
        starts = [i for i, e in enumerate(events) if isinstance(e, StageStarted) and e.stage == "load"]
        if len(starts) >= invocation and condition(events[starts[invocation - 1]:]):
            return
        time.sleep(0.1)
    raise AssertionError(f"forge train did not get {what} within {SAFETY_NET_S}s")


def _step(event) -> int:
    """The training step a progress event reports; 0 for any other event."""
    return event.done if isinstance(event, Progress) and event.stage == "train" else 0


def _latest_checkpoint_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    return max(steps)


def _containers(engine) -> list:
    return engine.containers.list(all=True, filters={"label": "dev.forge.step=train"}, ignore_removed=True)


def test_prepare_killed_in_the_container_resumes_to_identical_output(tmp_path, engine, model_cache):
    """kill -9 of the runner container mid-prepare; the rerun finishes from the finished shards and its
    output is byte-identical to a from-scratch run (--rebuild)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from generate import make_pairs, write

    write(make_pairs(8000, seed=2), tmp_path / "data")
    plan = subprocess.run([sys.executable, "-m", "forge.host", "plan", "smoke", "--cpu", "--data", "data/*"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    config = yaml.safe_load((tmp_path / "forge.yaml").read_text())
    config["prepare"]["shard_rows"] = 500
    (tmp_path / "forge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    first = forge("prepare", "--json", cwd=tmp_path)
    partial = tmp_path / "forge-out" / "datasets"
    deadline = time.monotonic() + SAFETY_NET_S
    while len(list(partial.glob(".*.partial/shards/audit-*.jsonl"))) < 3:
        assert time.monotonic() < deadline and first.poll() is None, "prepare never got going"
        time.sleep(0.1)
    (container,) = engine.containers.list(filters={"label": "dev.forge.step=prepare"})
    container.kill(signal="SIGKILL")
    code, result, _ = finish(first)
    assert code == 137 and result["status"] == "failed"

    code, resumed, err = finish(forge("prepare", "--json", cwd=tmp_path))
    assert code == 0 and resumed["info"]["cached"] == 0, err
    assert "Resuming:" in err and "rows_per_s" in err
    dataset = Path(resumed["paths"]["dataset_dir"])
    after_resume = {str(p.relative_to(dataset)): p.read_bytes() for p in dataset.rglob("*") if p.is_file()}

    code, rebuilt, err = finish(forge("prepare", "--json", "--rebuild", cwd=tmp_path))
    assert code == 0 and rebuilt["paths"] == resumed["paths"], err
    assert {str(p.relative_to(dataset)): p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == after_resume
    stats = json.loads((dataset / "stats.json").read_text())
    assert stats["accounting"]["balanced"] and stats["accounting"]["rows_in"] == 8000
    assert stats["duplicates"]["exact"] > 0 and stats["pii"]
