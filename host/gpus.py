"""Known GPUs (plans/gpus.yaml), so `forge plan --target NAME[:COUNT]` plans for a box this machine is not:
a provider like NVML's, whose report is the named part, idle, COUNT times."""

from __future__ import annotations

import difflib
import re
from functools import cache

from pydantic import Field, model_validator

from forge.contract.compat import arch_for, supports_bf16
from forge.contract.plan import Gpu
from forge.errors import ConfigError
from forge.host.catalog import _load, _Strict
from forge.host.detect import GpuReport

IDLE_RESERVED_MIB = 512  # what NVML shows in use on an idle card (driver, ECC pages): a target's free memory is the rest
MAX_COUNT = 64


class GpuPart(_Strict):
    product: str = Field(min_length=1, description="The name NVML reports")
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    memory_mib: int = Field(gt=IDLE_RESERVED_MIB, description="Total memory as NVML reports it")
    bf16: bool

    @model_validator(mode="after")
    def _consistent(self) -> GpuPart:
        if arch_for(self.compute_capability) is None:
            raise ValueError(f"no Forge image family has code for compute capability {self.compute_capability}")
        if self.bf16 != supports_bf16(self.compute_capability):
            raise ValueError(f"bf16: {str(self.bf16).lower()} contradicts compute capability {self.compute_capability} "
                             "(bf16 starts at 8.0)")
        return self


@cache
def parts() -> dict[str, GpuPart]:
    return _load("gpus.yaml", GpuPart)


def _normal(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'rtx4090', 'A100_80GB' -> 'a100-80gb' -> 'a10080gb', 'Tesla T4' -> 't4'."""
    words = re.split(r"[\s_\-]+", name.strip().lower())
    return "".join(word for word in words if word and word not in ("nvidia", "geforce", "tesla"))


def find(name: str) -> tuple[str, GpuPart]:
    """A known part by its name in plans/gpus.yaml (any case, with or without spaces, dashes or underscores)
    or its NVML product name; else an error that suggests the nearest names (a prefix first: v100 -> v100-16gb)."""
    wanted = _normal(name)
    for key, part in parts().items():
        if wanted in (_normal(key), _normal(part.product)):
            return key, part
    prefixed = [key for key in parts() if wanted and _normal(key).startswith(wanted)]
    close = prefixed + [key for key in difflib.get_close_matches(name.strip().lower(), list(parts()), n=3, cutoff=0.5)
                        if key not in prefixed]
    suggestion = f" Did you mean {' or '.join(close[:3])}?" if close else ""
    raise ConfigError(f"Unknown GPU {name!r} for --target.{suggestion}",
                      f"Use one of: {', '.join(parts())} (plans/gpus.yaml), optionally with a count (h100:8); "
                      "or add the part to plans/gpus.yaml.")


def parse_target(text: str) -> tuple[str, GpuPart, int]:
    """'h100' or 'h100:8' -> (name, part, count)."""
    name, colon, count = text.rpartition(":") if ":" in text else (text, "", "1")
    if not count.isdigit() or not 1 <= int(count) <= MAX_COUNT:
        raise ConfigError(f"--target {text}: the count after ':' must be a whole number from 1 to {MAX_COUNT}.",
                          "Write NAME or NAME:COUNT, e.g. --target h100:8.")
    key, part = find(name)
    return key, part, int(count)


class TargetProvider:
    """Reports COUNT idle GPUs of a known part, named by index: a plan made here knows no UUIDs, and Docker's
    device requests take indices too, so the plan runs as it is on a box whose first COUNT GPUs are these."""

    def __init__(self, text: str) -> None:
        self.name, self.part, self.count = parse_target(text)

    def report(self) -> GpuReport:
        part = self.part
        gpus = [Gpu(index=i, uuid=str(i), name=part.product, compute_capability=part.compute_capability,
                    memory_total_mib=part.memory_mib, memory_free_mib=part.memory_mib - IDLE_RESERVED_MIB)
                for i in range(self.count)]
        return GpuReport(gpus=gpus, target=self.name if self.count == 1 else f"{self.name}:{self.count}")
