"""What a run directory records besides the adapter: the environment it ran in, a reproducibility hash
over config + dataset manifest + environment, and a loss-curve picture.

Two runs with the same hash had the same settings, the same data and the same software; their losses
can still differ by nondeterministic GPU kernels, never by anything Forge chose.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from forge.contract.plan import Plan
from forge.contract.plan_io import atomic_write_text
from forge.runner.hashing import sha256_file, sha256_json
from forge.runner.resources import usable_cpus

PACKAGES = ("forge-runner", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
            "unsloth", "safetensors", "tokenizers")


def write_environment(run_dir: Path, plan: Plan, dataset: Path) -> dict:
    import json

    import torch

    environment = {
        "python": platform.python_version(),
        "packages": {name: found for name in PACKAGES if (found := _version(name))},
        "image": os.environ.get("FORGE_IMAGE"),
        "image_id": os.environ.get("FORGE_IMAGE_ID"),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpus": usable_cpus(),
    }
    environment["reproducibility_hash"] = sha256_json({
        "config": plan.model_dump(mode="json", exclude={"output", "reasons"}),
        "dataset_manifest": sha256_file(dataset / "manifest.json"),
        "environment": {key: environment[key] for key in ("python", "packages", "image_id", "cuda", "gpus")},
    })
    atomic_write_text(run_dir / "environment.json", json.dumps(environment, indent=2))
    return environment


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def plot_losses(path: Path, history: list[dict], val_loss: float | None) -> None:
    """Training loss per optimizer step (and the final validation loss), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    axes.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", linewidth=1.2)
    if val_loss is not None and history:
        axes.axhline(val_loss, color="tab:orange", linestyle="--", label=f"validation loss {val_loss:.3f}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
