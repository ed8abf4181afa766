"""What the memory estimate has been checked against: the measured peaks in plans/calibration/*.json
(bench/calibrate_memory.py, bench/gpu_check.py), which tests/test_calibration.py holds the estimate to.

A term of the estimate is *measured* by a file when the file has points whose settings exercise that term's
formula as planned: the same accelerator, and what the term depends on (the weights: dtype and quantization;
activations: backend, dtype and checkpointing; logits: backend and dtype; overhead: backend; LoRA: nothing
more). It is *calibrated* when the estimate is within TOLERANCE of every such point, *off* when it misses
one (the file says the formula is wrong there), and *estimated* where nothing was measured: first
principles only. A point measures a total, so an off total marks every term it exercises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

TOLERANCE = 0.15  # tests/test_calibration.py's ±15%
TERM_DEPENDS = {
    "weights": ("dtype", "quantization"),
    "lora": (),
    "activations": ("backend", "dtype", "checkpointing"),
    "logits": ("backend", "dtype"),
    "overhead": ("backend",),
    "total": ("backend", "dtype", "quantization", "checkpointing"),
}


@dataclass(frozen=True)
class Setting:
    """What an estimate was made for, in the terms a calibration point is recorded in."""

    accelerator: str
    backend: str
    dtype: str
    quantization: str
    checkpointing: bool


@dataclass(frozen=True)
class Point:
    setting: Setting
    ratio: float  # the estimate's total over the measured peak


@dataclass(frozen=True)
class Record:
    path: str  # plans/calibration/<name>.json
    device: str  # what it was measured on, e.g. "CPU" or "NVIDIA H200"
    models: tuple[str, ...]
    points: tuple[Point, ...]

    def describe(self) -> str:
        return f"{self.device}, {self.path} ({', '.join(self.models)}; {len(self.points)} points)"


@dataclass(frozen=True)
class Basis:
    """Where one term's figure comes from: per file that measured it, the estimate/measured ratios there."""

    measured: tuple[tuple[Record, tuple[float, ...]], ...]

    @property
    def calibrated(self) -> bool:
        return bool(self.measured) and not self.off

    @property
    def off(self) -> bool:
        return any(abs(ratio - 1) > TOLERANCE for _, ratios in self.measured for ratio in ratios)

    @property
    def records(self) -> tuple[Record, ...]:
        return tuple(record for record, _ in self.measured)

    def spread(self) -> str:
        ratios = [ratio for _, rs in self.measured for ratio in rs]
        low, high = min(ratios), max(ratios)
        return f"{low:.2f}×" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}–{high:.2f}×"

    def describe(self) -> str:
        if not self.measured:
            return "estimated (first principles)"
        where = "; ".join(record.describe() for record in self.records)
        if self.off:
            return f"off: {self.spread()} the measured peaks ({where})"
        return f"calibrated within ±{TOLERANCE:.0%}: {where}"


@cache
def records() -> tuple[Record, ...]:
    folder = resources.files("forge.plans").joinpath("calibration")
    if not folder.is_dir():
        return ()
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            record = _record(f"plans/calibration/{entry.name}", json.loads(entry.read_text(encoding="utf-8")))
            if record.points:
                found.append(record)
    return tuple(found)


def _record(path: str, data: dict) -> Record:
    """A calibration file as bench/ writes it. `accelerator` (or `device`: cpu or cuda), `backend` (default
    transformers: what bench/calibrate_memory.py trains with), `dtype` (default: bf16 on CUDA, float32 on CPU)
    and `rank` apply to every point; `device` or `gpu` names the GPU. Points of models the catalog does not
    know are left out: there is no shape to estimate them from."""
    from forge.host import catalog

    accelerator = _accelerator(data)
    named = data.get("gpu")
    named = named.get("name") if isinstance(named, dict) else named
    device = named or (data.get("device") if data.get("device") not in (None, "cpu", "cuda") else None)
    device = device or ("CPU" if accelerator == "cpu" else "a CUDA GPU")
    points, models = [], set()
    for p in data.get("points", []):
        entry = catalog.models().get(p.get("model"))
        if p.get("measured_mb") is None or entry is None:
            continue
        setting = setting_of(data, p)
        points.append(Point(setting, point_estimate(data, p) / (p["measured_mb"] * 2**20)))
        models.add(p["model"])
    return Record(path, str(device), tuple(sorted(models)), tuple(points))


def _accelerator(data: dict) -> str:
    return "cuda" if (data.get("accelerator") or data.get("device")) == "cuda" else "cpu"


def setting_of(data: dict, point: dict) -> Setting:
    accelerator = _accelerator(data)
    return Setting(accelerator, point.get("backend", data.get("backend", "transformers")),
                   point.get("dtype", data.get("dtype", "bfloat16" if accelerator == "cuda" else "float32")),
                   point["quantization"], bool(point["checkpointing"]))


def point_estimate(data: dict, point: dict):
    """The estimate, in bytes, for one measured point of a calibration file (its model from the catalog, the
    file's LoRA rank and dropout: bench/calibrate_memory.py trains without dropout)."""
    from forge.host import catalog
    from forge.host.memory import Shape, estimate

    entry, setting = catalog.models()[point["model"]], setting_of(data, point)
    return estimate(Shape.of(entry), dtype=setting.dtype, quantization=setting.quantization,
                    targets=entry.lora_targets, rank=data.get("rank", 16), seq_len=point["seq"],
                    micro_batch=point["micro"], checkpointing=setting.checkpointing,
                    accelerator=setting.accelerator, backend=setting.backend,
                    lora_dropout=data.get("lora_dropout") or 0.0).total


def basis(setting: Setting, term: str) -> Basis:
    """The files whose measured points exercise this term's formula as `setting` uses it, with the ratios."""
    keys = ("accelerator", *TERM_DEPENDS[term])
    wanted = tuple(getattr(setting, key) for key in keys)
    measured = []
    for record in records():
        ratios = tuple(point.ratio for point in record.points
                       if tuple(getattr(point.setting, key) for key in keys) == wanted)
        if ratios:
            measured.append((record, ratios))
    return Basis(tuple(measured))
