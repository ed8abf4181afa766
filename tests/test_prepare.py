"""The prepare step in-process (the container tests cover the same code through the CLI)."""

import json
from pathlib import Path

import pytest

from forge.contract.plan_io import load_plan, write_plan
from forge.host.detect import GpuReport, detect
from forge.host.planner import build_plan
from forge.runner import stop
from forge.runner.prepare import dataset_dir, prepare
from tests.conftest import EXAMPLES


class NoGpu:
    def report(self):
        return GpuReport(problem="test")


@pytest.fixture
def plan(tmp_path, model_cache, smollm2_dir):
    data = [EXAMPLES / "alpaca-sample.jsonl", EXAMPLES / "chat-sample.jsonl"]
    built = build_plan("smoke", "smollm2-135m-instruct", data, detect(NoGpu()), tmp_path)
    # The runner sees absolute paths (the launcher rewrites them to container paths).
    built = built.model_copy(update={
        "data": built.data.model_copy(update={"paths": [str(p) for p in data]}),
        "output": built.output.model_copy(update={"dir": str(tmp_path / "out"), "model_cache": str(model_cache)}),
    })
    write_plan(built, tmp_path / "forge.yaml")
    return load_plan(tmp_path / "forge.yaml")


def test_prepare_writes_a_manifest_whose_counts_add_up(plan, capsys):
    prepare(plan)
    manifest = json.loads((dataset_dir(plan) / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["rows_in"] == 64 == counts["kept"] + counts["rejected"] == counts["train"] + counts["val"]
    assert '"kind":"result"' in capsys.readouterr().out


def test_a_changed_setting_is_a_new_dataset(plan):
    changed = plan.model_copy(update={"prepare": plan.prepare.model_copy(update={"max_length": 128})})
    assert dataset_dir(changed) != dataset_dir(plan)


def test_stop_request_leaves_no_partial_dataset(plan):
    stop.requested.set()
    try:
        with pytest.raises(stop.Stopped):
            prepare(plan)
    finally:
        stop.requested.clear()
    parent = dataset_dir(plan).parent
    assert not dataset_dir(plan).exists()
    assert list(parent.glob(".*tmp*")) == []
