"""The planner held to measured peaks (plans/calibration/*.json, written by bench/calibrate_memory.py and
bench/gpu_check.py with the command recorded in each file): every estimate within ±15% of what was measured,
and on a GPU the micro-batch the planner picks for an emulated card no larger than the largest that really
trained under its headroom, and at least 0.8 of it."""

import json

import pytest

from forge.contract.plan import Gpu, Hardware
from forge.host import catalog
from forge.host.calibration import point_estimate
from forge.host.memory import Shape
from forge.host.planner import MAX_MICRO_BATCH, largest_fitting, memory_budget, size_batches
from tests.conftest import REPO

FILES = sorted((REPO / "plans" / "calibration").glob("*.json"))
RECORDS = {path.stem: json.loads(path.read_text()) for path in FILES}


def _points():
    for name, record in RECORDS.items():
        for point in record["points"]:
            if point.get("measured_mb") is not None:
                yield pytest.param(record, point, id=f"{name}-{point['model']}-{point['quantization']}-"
                                                     f"ckpt{int(point['checkpointing'])}-s{point['seq']}-m{point['micro']}")


def _fits():
    for name, record in RECORDS.items():
        for fit in record.get("fits", []):
            yield pytest.param(record, fit, id=f"{name}-{fit['model']}-s{fit['seq']}-ckpt{int(fit['checkpointing'])}")


def test_there_are_measurements_to_hold_the_planner_to():
    assert FILES, "no calibration files: run bench/calibrate_memory.py or bench/gpu_check.py"
    assert any(record.get("accelerator") == "cuda" for record in RECORDS.values()), "no GPU calibration"


@pytest.mark.parametrize("record, point", list(_points()))
def test_estimate_is_within_15_percent_of_the_measured_peak(record, point):
    planned = point_estimate(record, point) / 2**20
    assert planned == pytest.approx(point["measured_mb"], rel=0.15), (planned, point["measured_mb"])


@pytest.mark.parametrize("record, fit", list(_fits()))
def test_the_planned_micro_batch_fits_and_is_at_least_0_8_of_the_largest_that_did(record, fit):
    """The planner's rule (the largest micro-batch whose estimate fits the budget) at the checkpointing setting the
    fit was measured with, on the card it emulated (its free memory the card's: the headroom is the planner's)."""
    entry = catalog.models()[fit["model"]]
    card = fit["card_gib"] * 1024
    gpu = Gpu(index=0, uuid="GPU-emulated", name=record["device"], compute_capability="9.0",
              memory_total_mib=card, memory_free_mib=card)
    hardware = Hardware(accelerator="cuda", arch="hopper", gpus=[gpu], cpu_count=8, ram_total_mib=65536,
                        ram_available_mib=65536)
    budget, _ = memory_budget(hardware)
    assert budget / 2**20 == pytest.approx(fit["budget_mib"])

    def fits(micro: int) -> bool:
        point = {"model": fit["model"], "quantization": "none", "checkpointing": fit["checkpointing"],
                 "seq": fit["seq"], "micro": micro}
        return point_estimate(record, point) <= budget

    planned = largest_fitting(fits, MAX_MICRO_BATCH)
    largest = fit["largest_micro"]
    if fit["boundary_confirmed"]:
        assert planned <= largest, f"planned {planned}, but {planned} did not fit ({largest} did)"
    assert planned >= 0.8 * largest, (planned, largest)
    sizing = size_batches(Shape.of(entry), hardware, fit["seq"], MAX_MICRO_BATCH, record.get("dtype", "bfloat16"),
                          entry.lora_targets, record["rank"], "none", backend=record["backend"],
                          lora_dropout=record["lora_dropout"])
    if sizing.checkpointing == fit["checkpointing"]:
        assert sizing.micro == planned  # the planner itself, where it chose the measured setting
