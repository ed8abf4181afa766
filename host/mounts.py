"""Map a plan's host paths into the container, and the runner's container paths back to the host.

Inputs (data, a local model) are mounted read-only; only the output dir and the model cache are writable.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from forge.contract import paths
from forge.contract.plan import Plan
from forge.errors import DataError, ModelError

RUNNER_UID = 1000  # the `forge` user baked into every image


@dataclass
class Mounts:
    volumes: dict[str, dict] = field(default_factory=dict)
    plan: Plan | None = None
    to_host: dict[str, Path] = field(default_factory=dict)

    def host_path(self, container_path: str) -> str:
        for prefix, host in self.to_host.items():
            if container_path == prefix or container_path.startswith(prefix + "/"):
                return str(host / os.path.relpath(container_path, prefix))
        return container_path


def model_cache_dir(plan: Plan, plan_dir: Path) -> Path:
    configured = os.environ.get("FORGE_MODEL_CACHE") or plan.output.model_cache
    if configured:
        return (plan_dir / Path(configured).expanduser()).resolve()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forge" / "models"


def output_dir(plan: Plan, plan_dir: Path) -> Path:
    return (plan_dir / plan.output.dir).resolve()


def build_mounts(plan: Plan, plan_dir: Path) -> Mounts:
    mounts = Mounts()
    inputs = []
    parents: dict[Path, str] = {}
    for spec in plan.data.inputs:
        for host in expand(spec.path, plan_dir):
            inside = parents.setdefault(host.parent, f"{paths.DATA_ROOT}/{len(parents)}")
            inputs.append(spec.model_copy(update={"path": f"{inside}/{host.name}"}))
    for host, inside in parents.items():
        mounts.volumes[str(host)] = {"bind": inside, "mode": "ro"}

    out = output_dir(plan, plan_dir)
    cache = model_cache_dir(plan, plan_dir)
    for path in (out, cache):
        _writable_dir(path)
    mounts.volumes[str(out)] = {"bind": paths.OUTPUT_ROOT, "mode": "rw"}
    mounts.volumes[str(cache)] = {"bind": paths.MODEL_CACHE, "mode": "rw"}
    mounts.to_host = {paths.OUTPUT_ROOT: out, paths.MODEL_CACHE: cache}

    source = plan.model.source
    if source.kind == "local":
        local = Path(source.path)
        if not local.is_dir():
            raise ModelError(f"Model directory not found: {local}.", "Fix model.source.path in forge.yaml.")
        mounts.volumes[str(local)] = {"bind": paths.LOCAL_MODEL, "mode": "ro"}
        source = source.model_copy(update={"path": paths.LOCAL_MODEL})

    train = plan.train
    if train.eval.gold:
        gold = (plan_dir / Path(train.eval.gold).expanduser()).resolve()
        if not gold.is_file():
            raise DataError(f"Gold set not found: {gold} (forge.yaml train.eval.gold).",
                            "Fix the path (relative to forge.yaml) or remove train.eval.gold.")
        mounts.volumes[str(gold.parent)] = {"bind": paths.GOLD_ROOT, "mode": "ro"}
        train = train.model_copy(update={"eval": train.eval.model_copy(update={"gold": f"{paths.GOLD_ROOT}/{gold.name}"})})
    mounts.plan = plan.model_copy(
        update={
            "train": train,
            "data": plan.data.model_copy(update={"inputs": inputs}),
            "output": plan.output.model_copy(update={"dir": paths.OUTPUT_ROOT, "model_cache": paths.MODEL_CACHE}),
            "model": plan.model.model_copy(update={"source": source}),
        }
    )
    return mounts


def expand(pattern: str, plan_dir: Path, typed: str | None = None) -> list[Path]:
    """The files an input names: itself, or what its glob matches (sorted, so the order is stable). `typed` is
    the path as given to `forge plan --data`, when it came from there: errors then name that, not forge.yaml."""
    path = plan_dir / Path(pattern).expanduser()
    if glob.has_magic(pattern):
        found = sorted(Path(p).resolve() for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if found:
            return found
        if typed is not None:
            raise DataError(f"No files match --data {typed!r}.",
                            "Fix the pattern (relative to the current directory), e.g. --data 'data/*.jsonl' "
                            "(quoted, so the shell leaves it to Forge) or --data 'data/**/*.parquet'.")
        raise DataError(f"No files match {pattern!r} (forge.yaml data.inputs).",
                        "Fix the pattern (relative to forge.yaml), e.g. data/*.jsonl or data/**/*.parquet.")
    if path.is_file():
        return [path.resolve()]
    if typed is not None:
        raise DataError(f"Data file not found: --data {typed!r} ({path.resolve()}).",
                        "Fix the path (relative to the current directory, or absolute) and run `forge plan` again.")
    raise DataError(
        f"Data file not found: {path.resolve()} (forge.yaml data.inputs entry {pattern!r}).",
        "Fix the path in forge.yaml (relative to the file itself) or re-run `forge plan --data ...`.",
    )


def container_user() -> str:
    """Run as the invoking user so outputs are theirs; never as root (root maps to the image's user)."""
    uid = os.getuid()
    return f"{uid}:{os.getgid()}" if uid != 0 else f"{RUNNER_UID}:{RUNNER_UID}"


def _writable_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chown(path, RUNNER_UID, RUNNER_UID)
