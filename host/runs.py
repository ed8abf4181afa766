"""`forge runs`: the runs under a plan's output directory, read from their metrics.json (no ML imports)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from forge.errors import ConfigError

CORRELATION_NOTE = (
    "Differences between two runs are correlations, not causes: a slice that moved may have moved because of "
    "the data order, the seed or nondeterministic kernels as much as because of the settings that differ."
)


@dataclass(frozen=True)
class Run:
    path: Path
    metrics: dict | None  # None while the run has not finished

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def last_checkpoint_step(self) -> int:
        steps = sorted(int(p.name.split("-")[1]) for p in (self.path / "checkpoints").glob("step-*") if p.is_dir())
        return steps[-1] if steps else 0


def all_runs(out_dir: Path) -> list[Run]:
    runs = []
    for path in sorted((out_dir / "runs").glob("*")):
        if path.is_dir():
            metrics = path / "metrics.json"
            runs.append(Run(path, json.loads(metrics.read_text()) if metrics.is_file() else None))
    return runs


def find(out_dir: Path, run_id: str) -> Run:
    runs = all_runs(out_dir)
    matches = [r for r in runs if r.id == run_id] or [r for r in runs if r.id.startswith(run_id)]
    if len(matches) != 1:
        known = ", ".join(r.id for r in runs) or "none yet"
        raise ConfigError(f"{'No' if not matches else 'More than one'} run matches {run_id!r} in {out_dir / 'runs'}.",
                          f"Runs there: {known}.")
    return matches[0]


def compare(a: Run, b: Run) -> list[dict]:
    """Loss and perplexity per slice ("all" first) for both runs, with B - A; a slice missing from one run
    shows None there."""
    for run in (a, b):
        if run.metrics is None:
            raise ConfigError(f"Run {run.id} has not finished.", "Rerun `forge train` to finish it, then compare.")

    def slices(run: Run) -> dict[str, dict]:
        overall = {"loss": run.metrics.get("val_loss"), "perplexity": run.metrics.get("perplexity"),
                   "rows": run.metrics.get("val_rows")}
        return {"all": overall, **run.metrics.get("slices", {})}

    return _deltas(slices(a), slices(b), ("loss", "perplexity", "rows"))


def compare_gold(a: Run, b: Run) -> list[dict]:
    """Gold-set exact match and format compliance per slice ("all" first), B - A; empty without gold sets."""
    left, right = (run.metrics.get("gold") for run in (a, b))
    if not left and not right:
        return []

    def slices(gold: dict | None) -> dict[str, dict]:
        return {"all": gold, **gold.get("slices", {})} if gold else {}

    return _deltas(slices(left), slices(right), ("exact_match", "format_compliance"))


def _deltas(left: dict[str, dict], right: dict[str, dict], keys: tuple[str, ...]) -> list[dict]:
    """One row per slice of either side: each key's value in A and B and B - A (None where one lacks it)."""
    rows = []
    for name in [*left, *(n for n in right if n not in left)]:
        x, y = left.get(name, {}), right.get(name, {})
        row = {"slice": name}
        for key in keys:
            row[f"{key}_a"], row[f"{key}_b"] = x.get(key), y.get(key)
            row[f"{key}_delta"] = (y[key] - x[key]) if x.get(key) is not None and y.get(key) is not None else None
        rows.append(row)
    return rows


def config_differences(a: Run, b: Run) -> list[tuple[str, str, str]]:
    """Settings that differ between the two runs' resolved configs (dotted keys)."""
    import yaml

    def flat(value, prefix=""):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from flat(item, f"{prefix}{key}.")
        else:
            yield prefix.rstrip("."), value

    configs = []
    for run in (a, b):
        path = run.path / "config.yaml"
        configs.append(dict(flat(yaml.safe_load(path.read_text()) if path.is_file() else {})))
    keys = sorted(set(configs[0]) | set(configs[1]))
    return [(key, str(configs[0].get(key)), str(configs[1].get(key)))
            for key in keys if configs[0].get(key) != configs[1].get(key) and not key.startswith("reasons")]
