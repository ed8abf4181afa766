"""What an agent can run: its hardware as labels (NVIDIA GPU Feature Discovery's names), whether a job's
requirements fit it, and the plan rebound to the GPUs it picked."""

from __future__ import annotations

import re
from dataclasses import dataclass

from forge.contract.compat import ARCH_CAPABILITIES, covers, parse_version
from forge.contract.plan import Hardware, Plan
from forge.host.queue.jobs import Requirements, compute_key


def gfd_family(capability: str) -> str:
    """GPU Feature Discovery's `nvidia.com/gpu.family` value."""
    major, minor = parse_version(capability)
    families = {5: "maxwell", 6: "pascal", 7: "volta" if minor < 5 else "turing",
                8: "ampere" if minor < 9 else "ada-lovelace", 9: "hopper", 10: "blackwell", 12: "blackwell"}
    return families.get(major, "undefined")


@dataclass(frozen=True)
class Capacity:
    hardware: Hardware
    cpu_jobs: bool = True

    @property
    def images(self) -> list[str]:
        """The image families whose compiled code covers every GPU here (an 8.9 card runs Ampere's 8.6 code)."""
        gpus = self.hardware.gpus
        return [arch for arch, caps in ARCH_CAPABILITIES.items()
                if gpus and all(covers(caps, gpu.compute_capability) for gpu in gpus)]

    @property
    def compute(self) -> int:
        return min((compute_key(gpu.compute_capability) for gpu in self.hardware.gpus), default=0)

    @property
    def free_vram_mib(self) -> list[int]:
        """Free memory per GPU, most first: n GPUs with v MiB each exist when the n-th entry is >= v."""
        return sorted((gpu.memory_free_mib for gpu in self.hardware.gpus), reverse=True)

    def labels(self) -> dict[str, str]:
        hw = self.hardware
        labels = {"forge.dev/cpu.count": str(hw.cpu_count), "forge.dev/memory.mib": str(hw.ram_total_mib),
                  "forge.dev/cpu-jobs": str(self.cpu_jobs).lower()}
        if not hw.gpus:
            return labels
        first = hw.gpus[0]
        major, minor = first.compute_capability.split(".")
        labels |= {
            "nvidia.com/gpu.count": str(len(hw.gpus)),
            "nvidia.com/gpu.product": _sanitise(first.name) + ("-MIG" if first.mig else ""),
            "nvidia.com/gpu.family": gfd_family(first.compute_capability),
            "nvidia.com/gpu.compute.major": major,
            "nvidia.com/gpu.compute.minor": minor,
            "nvidia.com/gpu.memory": str(first.memory_total_mib),
            "forge.dev/images": ",".join(self.images),
        }
        if hw.cuda_driver_version:
            driver_major, _, driver_minor = hw.cuda_driver_version.partition(".")
            labels |= {"nvidia.com/cuda.driver.major": driver_major, "nvidia.com/cuda.driver.minor": driver_minor}
        return labels

    def misfit(self, need: Requirements) -> str | None:
        """Why a job with these requirements cannot run here, or None when it can."""
        if need.accelerator == "cpu":
            return None if self.cpu_jobs else "this agent takes GPU jobs only"
        if need.arch not in self.images:
            found = ", ".join(sorted({f"{g.name} ({g.compute_capability})" for g in self.hardware.gpus})) or "no GPU"
            return f"the {need.arch} image does not run on {found}"
        if self.compute < compute_key(need.min_compute_capability or "0.0"):
            return f"needs compute capability {need.min_compute_capability} or newer"
        free = self.free_vram_mib
        if len(free) < need.gpu_count:
            return f"needs {need.gpu_count} GPUs, has {len(free)}"
        if free[need.gpu_count - 1] < need.min_free_vram_mib:
            return (f"needs {need.min_free_vram_mib} MiB free on {need.gpu_count} GPU(s), "
                    f"has {free[need.gpu_count - 1]} MiB")
        return None

    def bind(self, plan: Plan, need: Requirements) -> Plan:
        """The plan on this agent: its image and batches unchanged, this machine's GPUs (the freest ones) and
        driver, so the device request and the image check see what will really run it."""
        if need.accelerator == "cpu":
            return plan
        chosen = sorted(self.hardware.gpus, key=lambda gpu: -gpu.memory_free_mib)[:need.gpu_count]
        hardware = plan.hardware.model_copy(update={
            "gpus": chosen, "driver_version": self.hardware.driver_version,
            "cuda_driver_version": self.hardware.cuda_driver_version})
        return plan.model_copy(update={"hardware": hardware})


def _sanitise(name: str) -> str:
    """GFD's product label: only [A-Za-z0-9-_. ], blanks joined by '-'."""
    return "-".join(re.sub(r"[^A-Za-z0-9\-_. ]", "", name).split())
