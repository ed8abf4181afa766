"""`--retries`: which endings are worth a relaunch (searched over every exit code and error kind), the
backoff's shape, and end to end through the CLI, engine and CPU image: a train runner killed mid-run, then
its container lost, is relaunched and ends like an uninterrupted run; bad data is never retried."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from forge.contract.events import Failure
from forge.errors import ERRORS_BY_CODE, EXIT_RESUMABLE
from forge.host.launcher import Outcome
from forge.host.mounts import Mounts
from forge.host.retries import MAX_DELAY_S, delay, retry_reason
from tests.conftest import EXAMPLES
from tests.test_end_to_end import _containers, _train_runs, _wait_for_step

TOTAL_STEPS = 6
SAVE_EVERY = 2
USER_ERRORS = sorted(ERRORS_BY_CODE)  # config, data, model, hardware, ...: the user must fix them
DEATHS = ["oom", "lost", "internal"]  # killed for memory, container gone, a crash the runner caught


def outcome(code: int, failure: str | None = None, requested: str | None = None) -> Outcome:
    error = Failure(ts=0.0, code=failure, message="boom") if failure else None
    return Outcome(exit_code=code, result=None, failure=error, mounts=Mounts(), requested=requested)


codes = st.integers(min_value=0, max_value=255)


@given(codes, st.sampled_from(USER_ERRORS))
def test_an_error_for_the_user_to_fix_is_never_retried(code, kind):
    assert retry_reason(outcome(code, kind)) is None


@given(st.sampled_from([cls.exit_code for cls in ERRORS_BY_CODE.values() if cls.exit_code != 1]))
def test_the_exit_code_of_an_error_for_the_user_is_never_retried_even_without_its_event(code):
    assert retry_reason(outcome(code)) is None


@given(codes, st.sampled_from([None, *USER_ERRORS, *DEATHS]), st.sampled_from(["stop", "kill"]))
def test_what_the_user_asked_for_is_never_retried(code, kind, requested):
    assert retry_reason(outcome(code, kind, requested)) is None


@given(st.sampled_from([None, *USER_ERRORS, *DEATHS]))
def test_a_finished_or_stopped_runner_is_never_retried(kind):
    assert retry_reason(outcome(0, kind)) is None
    assert retry_reason(outcome(EXIT_RESUMABLE, kind)) is None


@given(codes.filter(lambda c: c not in (0, EXIT_RESUMABLE)), st.sampled_from(DEATHS))
def test_a_runner_that_died_is_retried_whatever_its_exit_code(code, kind):
    assert retry_reason(outcome(code, kind))


@given(st.integers(min_value=129, max_value=255))
def test_a_runner_killed_by_a_signal_is_retried(code):
    reason = retry_reason(outcome(code))
    assert reason and f"exit {code}" in reason


def test_the_reasons_say_what_happened():
    assert "SIGKILL" in retry_reason(outcome(137))
    assert "out of memory" in retry_reason(outcome(137, "oom"))
    assert "lost" in retry_reason(outcome(5, "lost"))
    assert "SIGSEGV" in retry_reason(outcome(139))
    assert "crashed (boom)" == retry_reason(outcome(1, "internal"))


@given(st.floats(min_value=0, max_value=1000, allow_nan=False), st.integers(min_value=1, max_value=200))
def test_backoff_starts_at_the_first_delay_doubles_and_is_capped(first, retry):
    assert delay(1, first) == first
    assert delay(retry, first) <= delay(retry + 1, first) <= max(first, MAX_DELAY_S)
    if delay(retry + 1, first) < max(first, MAX_DELAY_S):
        assert delay(retry + 1, first) == 2 * delay(retry, first)


# End to end: the real engine and CPU image.

def forge(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forge.host", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "160", "FORGE_RETRY_DELAY": "0.2"})


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, dict, str]:
    out, err = process.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return process.returncode, json.loads(out.strip().splitlines()[-1]), err


def plan(workdir: Path) -> None:
    """A smoke plan made small (short rows, one row a step) so that a busy 2-core machine runs it quickly."""
    data = workdir / "data"
    data.mkdir(parents=True)
    for name in ("alpaca-sample.jsonl", "chat-sample.jsonl"):
        shutil.copy(EXAMPLES / name, data / name)
    planned = subprocess.run([sys.executable, "-m", "forge.host", "plan", "smoke", "--cpu", "--data", "data/*"],
                             cwd=workdir, capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    config = yaml.safe_load((workdir / "forge.yaml").read_text())
    config["prepare"]["max_length"] = 128
    config["prepare"]["split"]["val"] = 0.05  # a few rows: evaluation is not what this tests
    config["train"].update(max_steps=TOTAL_STEPS, save_every=SAVE_EVERY, keep_last=2, micro_batch_size=1,
                           gradient_accumulation=1)
    (workdir / "forge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def running_after(engine, previous) -> object:
    """The train container that replaced `previous`, once the engine has it running (an event, not a guess)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for container in _containers(engine):
            if container.id != previous.id and container.status == "running":
                return container
        time.sleep(0.1)
    raise AssertionError("no relaunched runner within 300s")


def created(engine, since: int, out: Path) -> list[str]:
    """The steps whose containers the engine created for this output dir since `since`."""
    return [e["Actor"]["Attributes"]["dev.forge.step"] for e in engine.events(
        since=since, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "create", "label": f"dev.forge.output={out.resolve()}"})]


@pytest.mark.docker
def test_a_killed_then_lost_train_runner_is_relaunched_and_ends_like_an_uninterrupted_run(tmp_path, engine,
                                                                                          model_cache):
    """Attempt 1 is killed past its first checkpoint, attempt 2's container removed while it loads; attempt 3
    resumes from attempt 1's checkpoint and ends with an uninterrupted run's losses."""
    job = tmp_path / "job"
    plan(job)
    code, _, err = finish(forge("prepare", "--json", cwd=job))
    assert code == 0, err
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(job, uninterrupted)
    code, result, err = finish(forge("train", "--json", cwd=uninterrupted))
    assert code == 0, err
    expected = json.loads(Path(result["paths"]["metrics"]).read_text())

    since = int(time.time()) - 1
    process = forge("train", "--json", "--retries", "2", cwd=job)
    _wait_for_step(job, process, minimum=SAVE_EVERY + 1)  # past the first checkpoint
    (first,) = _containers(engine)
    first.kill()  # SIGKILL, as the OOM killer sends it
    second = running_after(engine, first)
    second.remove(force=True)  # the container goes away under the runner
    code, result, err = finish(process)

    assert (code, result["status"], result["attempts"]) == (0, "ok", 3), err
    retries = [line for line in err.splitlines() if "Retry " in line]
    assert len(retries) == 2 and "killed (SIGKILL" in retries[0], err
    assert "was lost" in retries[1] or "killed (SIGKILL" in retries[1], err  # the engine may report either first
    assert all("resuming from the newest valid checkpoint" in line for line in retries)
    assert created(engine, since, job / "forge-out") == ["train"] * 3
    runs = _train_runs(Path(result["paths"]["run_dir"]))  # attempt 2 never got to train
    assert len(runs) == 2 and runs[1][0] == result["info"]["resumed_from_step"] + 1 and runs[1][-1] == TOTAL_STEPS
    assert result["info"]["resumed_from_step"] >= SAVE_EVERY
    metrics = json.loads(Path(result["paths"]["metrics"]).read_text())
    assert [h["step"] for h in metrics["history"]] == list(range(1, TOTAL_STEPS + 1))
    assert [h["loss"] for h in metrics["history"]] == pytest.approx([h["loss"] for h in expected["history"]],
                                                                    abs=1e-5)
    assert metrics["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-5)


@pytest.mark.docker
def test_bad_data_is_not_retried(tmp_path, engine, model_cache):
    """A JSON file that breaks off is the user's to fix: one attempt, whatever --retries says."""
    (tmp_path / "data").mkdir()
    broken = tmp_path / "data" / "broken.json"
    broken.write_text(json.dumps([{"instruction": "Hi", "output": "Hello."}]))
    planned = subprocess.run([sys.executable, "-m", "forge.host", "plan", "smoke", "--cpu", "--data",
                              "data/broken.json"], cwd=tmp_path, capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    broken.write_text('[{"instruction": "Hi", "output": "Hello."},\n{"instr')
    since = int(time.time()) - 1
    code, result, err = finish(forge("prepare", "--json", "--retries", "3", cwd=tmp_path))
    assert (code, result["error"]["code"], result["attempts"]) == (3, "data", 1), err
    assert "broken.json" in result["error"]["message"] and "Retry" not in err
    assert created(engine, since, tmp_path / "forge-out") == ["prepare"]
