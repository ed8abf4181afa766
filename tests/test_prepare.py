"""The prepare pipeline in-process and as a killable subprocess (the runner's code, outside a container;
the end-to-end tests run the same code in the image through the CLI)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge.contract.pii_key import runner_key
from forge.contract.plan import Plan
from forge.contract.plan_io import load_plan, write_plan
from forge.host.detect import GpuReport, detect
from forge.host.planner import build_plan
from forge.runner import stop
from forge.runner.prepare.pipeline import dataset_dir, prepare
from tests.conftest import REPO

EMAIL = "jane.roe@example.org"
ANSWER = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence near the "
          "river. Later that evening the children walk home along the narrow path past the mill, counting the geese on "
          "the pond and arguing about which of them saw the heron first, until the church bell rings seven times and "
          "their mother calls them in for a supper of bread, cheese and apples from the orchard behind the barn.")


class NoGpu:
    def report(self):
        return GpuReport(problem="test")


def make_plan(tmp_path: Path, model_cache: Path, files: list[Path], **prepare) -> Plan:
    built = build_plan("smoke", "smollm2-135m-instruct", [str(f) for f in files], detect(NoGpu()), tmp_path)
    built = built.model_copy(update={
        "data": built.data.model_copy(update={"inputs": [
            i.model_copy(update={"path": str((tmp_path / i.path).resolve())}) for i in built.data.inputs]}),
        "output": built.output.model_copy(update={"dir": str(tmp_path / "out"), "model_cache": str(model_cache)}),
        "prepare": built.prepare.model_copy(update=prepare),
    })
    write_plan(built, tmp_path / "forge.yaml")
    return load_plan(tmp_path / "forge.yaml")


@pytest.fixture
def messy(tmp_path) -> list[Path]:
    """Every kind of row: good ones in four formats, and each way a row can leave the dataset."""
    data = tmp_path / "data"
    data.mkdir()
    words = ANSWER.split()
    good = [{"instruction": f"Question number {i} about {w}?", "output": " ".join(random.Random(i).choices(words, k=120)),
             "tags": {"source": "human" if i % 2 else "synthetic"}} for i, w in enumerate(["cats", "dogs", "owls", "eels"])]
    near = good[1]["output"].split()
    near[60] = "zebra"
    lines = [json.dumps(r) for r in good] + [
        '{"instruction": "broken',                                                     # rejected: malformed_json
        json.dumps({"instruction": "QUESTION NUMBER 0 ABOUT CATS?", "output": good[0]["output"]}),  # exact (case)
        json.dumps({"instruction": "Question number 1 about dogs?",                    # near duplicate of row 2
                    "output": " ".join(near)}),
        json.dumps({"instruction": "Who do I email?", "output": f"Write to {EMAIL} today."}),  # PII, redacted
        json.dumps({"instruction": "Bell", "output": "ding\x07"}),                        # rejected: control_chars
        json.dumps({"instruction": "Long one", "output": "word " * 400}),                 # length policy
    ]
    (data / "alpaca.jsonl").write_text("\n".join(lines) + "\n")
    (data / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Teal."}]},
        {"conversations": [{"from": "human", "value": "Hi"}]},                              # rejected: no assistant
    ]) + "\n")
    return sorted(data.iterdir())


def test_every_row_is_accounted_for(tmp_path, model_cache, smollm2_dir, messy):
    plan = make_plan(tmp_path, model_cache, messy, length_policy="drop", max_length=256)
    prepare(plan)
    target = dataset_dir(plan, smollm2_dir)
    stats = json.loads((target / "stats.json").read_text())
    acc = stats["accounting"]
    assert acc == {"rows_in": 12, "kept": 6, "rejected": 3, "duplicates": 2, "dropped_by_policy": 1, "balanced": True}
    assert stats["rejected"] == {"control_chars": 1, "malformed_json": 1, "no_assistant_turn": 1}
    assert stats["duplicates"] == {"exact": 1, "near": 1}
    assert stats["dropped"] == {"too_long": 1} and stats["pii"] == {"EMAIL": 1}
    duplicates = [json.loads(line) for line in (target / "duplicates.jsonl").read_text().splitlines()]
    first_ids = {json.loads(line)["id"] for line in (target / "audit.jsonl").read_text().splitlines()[:2]}
    assert {d["duplicate_of"] for d in duplicates} == first_ids
    rejects = [json.loads(line) for line in (target / "rejects.jsonl").read_text().splitlines()]
    assert {(r["file"], r["line"], r["reason"]) for r in rejects} == {
        ("alpaca.jsonl", 5, "malformed_json"), ("alpaca.jsonl", 9, "control_chars"), ("chat.jsonl", 2, "no_assistant_turn")}
    audit = [json.loads(line) for line in (target / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 12 and len({a["id"] for a in audit}) == 12
    pii_steps = [s for a in audit for s in a["steps"] if s["step"] == "pii"]
    assert pii_steps == [{"step": "pii", "entity": "EMAIL", "action": "redact",
                          "value_hash": runner_key().trace(EMAIL)}]  # keyed: no sha256 to try values against
    for path in target.rglob("*"):
        if path.is_file():
            assert EMAIL.encode() not in path.read_bytes(), f"raw PII in {path.name}"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["tag_schema"] == ["source"] and manifest["dataset_version"] == target.name
    for name, meta in manifest["files"].items():
        assert hashlib.sha256((target / name).read_bytes()).hexdigest() == meta["sha256"]


def test_progress_reports_rows_against_the_total(tmp_path, model_cache, smollm2_dir, messy, capsys):
    plan = make_plan(tmp_path, model_cache, messy)
    prepare(plan)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["kind"] == "progress" and e["stage"] == "process"]
    assert progress[-1]["done"] == progress[-1]["total"] == 12
    assert {"rows_per_s", "kept", "rejected", "duplicates", "dropped"} <= set(progress[-1]["metrics"])


def test_output_loads_with_datasets_and_trains_with_trl_unchanged(tmp_path, model_cache, smollm2_dir, messy):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    plan = make_plan(tmp_path, model_cache, messy)
    prepare(plan)
    target = dataset_dir(plan, smollm2_dir)
    data = datasets.load_dataset("parquet", data_files={"train": str(target / "train" / "*.parquet")}, split="train")
    assert data.num_rows == json.loads((target / "stats.json").read_text())["splits"]["train"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    trainer = SFTTrainer(model=model, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(smollm2_dir),
                         args=SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2,
                                        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True))
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(log["loss"] > 0 for log in trainer.state.log_history if "loss" in log)


def test_cache_hit_rebuild_and_new_key(tmp_path, model_cache, smollm2_dir, messy, capsys):
    plan = make_plan(tmp_path, model_cache, messy)
    prepare(plan)
    target = dataset_dir(plan, smollm2_dir)
    first = target.stat().st_mtime_ns
    prepare(plan)
    assert '"cached":1' in capsys.readouterr().out and target.stat().st_mtime_ns == first
    prepare(plan, rebuild=True)
    assert '"cached":0' in capsys.readouterr().out
    changed = plan.model_copy(update={"prepare": plan.prepare.model_copy(update={"max_length": 128})})
    assert dataset_dir(changed, smollm2_dir) != target


def test_labels_modes_and_packing(tmp_path, model_cache, smollm2_dir):
    import pyarrow.parquet as pq

    data = tmp_path / "multi.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Count {i}"}, {"role": "assistant", "content": f"One {i}."},
        {"role": "user", "content": "More"}, {"role": "assistant", "content": f"Two {i}."}]}) for i in range(12)) + "\n")
    learned = {}
    for mode in ("all_assistant", "last_turn", "whole_sequence"):
        plan = make_plan(tmp_path / mode, model_cache, [data], labels=mode, dedup={"exact": True, "near": False})
        prepare(plan)
        table = pq.read_table(dataset_dir(plan, smollm2_dir) / "train" / "shard-00000.parquet").to_pylist()
        learned[mode] = sum(sum(1 for label in row["labels"] if label != -100) for row in table) / len(table)
    assert learned["last_turn"] < learned["all_assistant"] < learned["whole_sequence"]

    plan = make_plan(tmp_path / "packed", model_cache, [data], packing=True, max_length=128)
    prepare(plan)
    rows = pq.read_table(dataset_dir(plan, smollm2_dir) / "train" / "shard-00000.parquet").to_pylist()
    assert all(len(r["input_ids"]) <= 128 and sum(r["seq_lengths"]) == len(r["input_ids"]) for r in rows)
    assert all(r["position_ids"].count(0) == len(r["seq_lengths"]) for r in rows)
    assert len(rows) < sum(len(r["seq_lengths"]) for r in rows)


def test_stratified_split_is_stable_and_covers_each_stratum(tmp_path, model_cache, smollm2_dir):
    rows = [{"prompt": f"Tell me fact {i} about topic {i % 7}.", "completion": f"Fact {i}: {ANSWER[: 30 + i % 40]}",
             "tags": {"source": "a" if i % 3 else "b"}} for i in range(300)]
    forward, backward = tmp_path / "f.jsonl", tmp_path / "b.jsonl"
    forward.write_text("".join(json.dumps(r) + "\n" for r in rows))
    backward.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    splits = []
    for path in (forward, backward):
        plan = make_plan(tmp_path / path.stem, model_cache, [path], dedup={"exact": False, "near": False},
                         split={"val": 0.2, "test": 0.1, "stratify_by": "tag:source", "seed": 3})
        prepare(plan)
        stats = json.loads((dataset_dir(plan, smollm2_dir) / "stats.json").read_text())
        audit = [json.loads(line) for line in (dataset_dir(plan, smollm2_dir) / "audit.jsonl").read_text().splitlines()]
        splits.append({a["input_hash"]: next(s["split"] for s in a["steps"] if s["step"] == "split") for a in audit})
        for source in ("a", "b"):
            counts = {split: stats["strata"].get(f"source={source}/{split}", 0) for split in ("train", "val", "test")}
            share = counts["val"] / sum(counts.values())
            assert 0.08 < share < 0.35, (source, counts)
            assert counts["test"] > 0
    assert splits[0] == splits[1]  # by content, not position


def test_stop_request_keeps_finished_shards(tmp_path, model_cache, smollm2_dir, messy):
    plan = make_plan(tmp_path, model_cache, messy, shard_rows=100)
    stop.requested.set()
    try:
        with pytest.raises(stop.Stopped):
            prepare(plan)
    finally:
        stop.requested.clear()
    assert not dataset_dir(plan, smollm2_dir).exists()
    prepare(plan)
    assert (dataset_dir(plan, smollm2_dir) / "manifest.json").is_file()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_kill_9_at_random_moments_then_rerun_is_byte_identical(tmp_path, model_cache, smollm2_dir):
    """The runner's prepare (two worker processes) is killed with SIGKILL three times at random moments; each
    rerun resumes, and the final output is byte-identical to an uninterrupted run's in one process."""
    sys.path.insert(0, str(REPO / "bench"))
    from generate import make_pairs, write

    data = tmp_path / "data"
    write(make_pairs(24000, seed=1), data)
    files = sorted(data.iterdir())
    reference = make_plan(tmp_path / "reference", model_cache, files, shard_rows=2000, workers=1)
    prepare(reference)
    expected = _tree_digest(dataset_dir(reference, smollm2_dir))

    plan = make_plan(tmp_path / "killed", model_cache, files, shard_rows=2000, workers=2)
    config = tmp_path / "killed" / "forge.yaml"
    rng = random.Random(7)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = 0
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-m", "forge.runner", "prepare", "--config", str(config)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        target = rng.uniform(0.1, 0.95)
        for line in child.stdout:  # kill once processing has passed a random point, after a random delay
            event = json.loads(line) if line.startswith("{") else {}
            if (event.get("kind") == "progress" and event.get("stage") == "process" and event["total"]
                    and event["done"] >= target * event["total"]):
                time.sleep(rng.uniform(0, 0.3))
                child.send_signal(signal.SIGKILL)
                kills += 1
                break
        child.wait()
    assert kills >= 2, "prepare finished too fast to be killed; raise the data size"
    final = subprocess.run([sys.executable, "-m", "forge.runner", "prepare", "--config", str(config)],
                           capture_output=True, text=True, env=env)
    assert final.returncode == 0, final.stderr[-2000:]
    assert _tree_digest(dataset_dir(plan, smollm2_dir)) == expected
    assert not list((tmp_path / "killed" / "out" / "datasets").glob(".*"))
    assert '"workers":2' in final.stdout or "Inputs and settings unchanged" in final.stdout


def test_any_worker_count_writes_the_same_bytes(tmp_path, model_cache, smollm2_dir):
    """Dedup runs in input order in the runner; the steps after it in workers: the dataset, its key and every
    report must not depend on how many there are."""
    sys.path.insert(0, str(REPO / "bench"))
    from generate import make_pairs, write

    data = tmp_path / "data"
    write(make_pairs(3000, seed=2), data)
    datasets = []
    for workers in (1, 2):
        plan = make_plan(tmp_path / f"workers-{workers}", model_cache, sorted(data.iterdir()), shard_rows=1000,
                         workers=workers)
        prepare(plan)
        datasets.append(dataset_dir(plan, smollm2_dir))
    assert datasets[0].name == datasets[1].name
    assert _tree_digest(datasets[0]) == _tree_digest(datasets[1])


def test_a_compliance_fail_stops_the_run_at_the_first_such_row_in_input_order(tmp_path, model_cache, smollm2_dir):
    """`on: {high: fail}`: the run fails naming the first failing row in input order (workers finish chunks in
    any order), and no dataset is written."""
    from forge.errors import DataError

    data = tmp_path / "data"
    data.mkdir()
    words = ANSWER.split()
    rows = [{"instruction": f"Question {i}?", "output": " ".join(random.Random(i).choices(words, k=60))}
            for i in range(3000)]  # no two alike: none is removed as a duplicate before the checks
    for line in (1700, 2600):  # in different chunks of 512 records, so possibly different workers
        rows[line - 1]["output"] = "fuck you, " + rows[line - 1]["output"]
    (data / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = make_plan(tmp_path, model_cache, [data / "rows.jsonl"])
    compliance = base.prepare.compliance.model_copy(update={"on": {"low": "flag", "medium": "flag", "high": "fail"}})
    plan = make_plan(tmp_path, model_cache, [data / "rows.jsonl"], workers=2, compliance=compliance)
    with pytest.raises(DataError) as error:
        prepare(plan)
    assert "failed the run at row" in error.value.message and "(rows.jsonl:1700)" in error.value.message
    assert "toxicity, severity high" in error.value.message and "prepare.compliance.on" in error.value.hint
    assert not dataset_dir(plan, smollm2_dir).exists()


def test_rows_are_read_lazily(tmp_path, model_cache, monkeypatch, messy):
    """A file is streamed, never held whole: reading the first rows must not pull the rest of the file."""
    from itertools import islice

    from forge.runner.prepare import pipeline
    from forge.runner.prepare.sources import RawRecord

    def endless(path):
        for line in range(1, 10**9):
            if line > 1000:
                raise AssertionError("read far past what was asked for")
            yield RawRecord(line, {"prompt": "p", "completion": "c"}, b"{}")

    monkeypatch.setattr(pipeline, "read_records", endless)
    plan = make_plan(tmp_path, model_cache, messy[:1])
    assert len(list(islice(pipeline._records(plan, ["0" * 64]), 300))) == 300


def test_a_worker_killed_for_memory_is_reported_as_out_of_memory_with_its_fix(tmp_path, model_cache, smollm2_dir):
    """The kernel's OOM killer SIGKILLs one worker mid-run: the runner reports an out-of-memory error saying how
    to fix it (exit 137, as a container killed for memory), not "a Forge bug" with a traceback."""
    import psutil

    sys.path.insert(0, str(REPO / "bench"))
    from generate import make_pairs, write

    data = tmp_path / "data"
    write(make_pairs(20000, seed=3), data)
    make_plan(tmp_path, model_cache, sorted(data.iterdir()), shard_rows=2000, workers=2)
    child = subprocess.Popen([sys.executable, "-m", "forge.runner", "prepare", "--config", str(tmp_path / "forge.yaml")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    events = []
    for line in child.stdout:
        events.append(json.loads(line) if line.startswith("{") else {})
        if events[-1].get("kind") == "progress" and events[-1].get("stage") == "process" and events[-1]["done"]:
            break  # the workers are busy
    workers = psutil.Process(child.pid).children()
    assert workers, "prepare finished before a worker could be killed; raise the data size"
    workers[0].send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=120)
    (error,) = [e for e in map(json.loads, filter(lambda line: line.startswith("{"), out.splitlines()))
                if e["kind"] == "error"]
    assert child.returncode == 137 and error["code"] == "oom", err[-2000:]
    assert "lack of memory" in error["message"] and "--memory" in error["hint"] and "prepare.workers" in error["hint"]
    assert "Forge bug" not in out + err and "Traceback" not in err
