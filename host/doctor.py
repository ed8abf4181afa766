"""`forge doctor`: each check says what it found and, when something is wrong, how to fix it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from forge.errors import ForgeError
from forge.host.detect import NvmlProvider, detect
from forge.host.engine import client
from forge.host.images import check_image
from forge.host.planner import image_name

MIN_FREE_DISK_GIB = 20


@dataclass(frozen=True)
class Check:
    name: str
    status: Literal["ok", "warn", "fail"]
    detail: str
    fix: str = ""


def run_checks(workdir: Path) -> list[Check]:
    checks = [_engine()]
    hardware = detect(NvmlProvider())
    if hardware.accelerator == "cuda":
        gpus = ", ".join(f"{g.name} (cc {g.compute_capability})" for g in hardware.gpus)
        checks.append(Check("gpu", "ok", f"{gpus}; driver {hardware.driver_version}, CUDA {hardware.cuda_driver_version}"))
    else:
        checks.append(Check("gpu", "warn", hardware.note, "Install the NVIDIA driver for GPU training; CPU plans still work."))
    if checks[0].status == "ok":
        checks.extend(_image(arch) for arch in dict.fromkeys(["cpu", hardware.arch]))
    else:
        checks.append(Check("images", "fail", "not checked: the engine is unreachable", "Fix the engine first."))
    checks.append(_disk(workdir))
    return checks


def _engine() -> Check:
    try:
        version = client().version()
    except ForgeError as exc:
        return Check("engine", "fail", exc.message, exc.hint)
    return Check("engine", "ok", f"Docker {version.get('Version', '?')} ({version.get('Os', '?')}/{version.get('Arch', '?')})")


def _image(arch: str) -> Check:
    try:
        info = check_image(image_name(arch), arch)
    except ForgeError as exc:
        return Check(f"image:{arch}", "fail", exc.message, exc.hint)
    return Check(f"image:{arch}", "ok", f"{info.tag}: Forge {info.forge_version}, torch {info.torch}, CUDA {info.cuda}, {info.size_mb} MB")


def _disk(workdir: Path) -> Check:
    free_gib = shutil.disk_usage(workdir).free / 1024**3
    if free_gib < MIN_FREE_DISK_GIB:
        return Check("disk", "warn", f"{free_gib:.1f} GiB free under {workdir}",
                     f"Free space: images, model caches and checkpoints need about {MIN_FREE_DISK_GIB} GiB.")
    return Check("disk", "ok", f"{free_gib:.0f} GiB free under {workdir}")
