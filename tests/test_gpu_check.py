"""bench/gpu_check.py on the CPU, so the GPU check cannot rot before a GPU appears: every section runs through
the runner's own training path (random-initialised SmolLM2 shape, the bundled tokenizer) and reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory) -> tuple[dict, dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (json.loads((out / "report.json").read_text()), json.loads((out / "calibration.json").read_text()),
            (out / "summary.md").read_text())


def test_every_section_runs_on_the_cpu(cpu_report):
    report, _, summary = cpu_report
    sections = report["sections"]
    assert report["finished"] and report["device"] == "cpu"
    assert {name: s["status"] for name, s in sections.items()} == {
        "detection": "ok", "selfcheck": "skipped", "training": "ok", "throughput": "ok", "oom": "ok", "memory": "ok"}
    assert sections["detection"]["hardware"]["accelerator"] == "cpu"
    assert sections["detection"]["plan"]["image"].startswith("forge-runner:cpu-")
    assert len(sections["training"]["losses"]) == 4
    assert sections["throughput"]["ratio"] > 0
    assert "| detection | ok |" in summary


def test_the_backoff_keeps_the_effective_batch_and_the_losses(cpu_report):
    oom = cpu_report[0]["sections"]["oom"]
    assert oom["simulated"] and [b["micro_batch_size"] for b in oom["backoffs"]] == [4, 2]
    assert oom["effective_batch"] == oom["planned_micro"] == 8
    assert oom["max_loss_difference"] < 1e-3


def test_the_grid_sets_measured_peaks_beside_the_planners(cpu_report):
    report, calibration, _ = cpu_report
    points = report["sections"]["memory"]["points"]
    assert {(p["checkpointing"], p["micro"]) for p in points} == {(False, 1), (False, 2), (True, 1), (True, 2)}
    for point in points:
        assert point["measured_mib"] > 0 and point["predicted_mib"] > 0
        assert point["predicted_over_measured"] == pytest.approx(point["predicted_mib"] / point["measured_mib"])
    assert len(calibration["points"]) == len(points) and calibration["accelerator"] == "cpu"
    assert calibration["rank"] == report["lora"]["r"]


def test_a_section_past_the_deadline_is_skipped_and_reported(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    check = gpu_check.Check(tmp_path, "cpu", deadline_s=0)
    ran = []
    assert check.section("training", lambda record: ran.append(record)) is None
    assert not ran
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sections"]["training"]["status"] == "skipped"


def test_the_watchdog_writes_the_report_and_ends_a_hung_check(tmp_path):
    """A section that never returns: past the deadline (and its grace period) the process ends with the report."""
    code = (f"import sys, time; sys.path.insert(0, {str(SCRIPT.parent)!r}); import gpu_check, pathlib\n"
            "gpu_check.Check.grace_s = -9\n"
            f"check = gpu_check.Check(pathlib.Path({str(tmp_path)!r}), 'cpu', deadline_s=10)\n"
            "check.watchdog()\ncheck.section('training', lambda record: time.sleep(600))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["deadline_hit"] and report["sections"]["training"]["status"] == "running"
