"""Hardware detection behind a small provider interface: NVML in production, a table in tests.

Everything above `GpuProvider` is pure, so the planner is tested without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from forge.contract.plan import Arch, Gpu, Hardware

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReport:
    """What a provider found: GPUs and driver, or why there are none."""

    gpus: list[Gpu] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    problem: str = ""


class GpuProvider(Protocol):
    def report(self) -> GpuReport: ...


class NvmlProvider:
    """Reads GPUs through NVML (nvidia-ml-py). No driver is a normal outcome: a CPU plan."""

    def report(self) -> GpuReport:
        try:
            import pynvml
        except ImportError:
            return GpuReport(problem="nvidia-ml-py is not installed")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return GpuReport(problem=f"no NVIDIA driver found (NVML: {exc})")
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            gpus = [self._gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
            return GpuReport(
                gpus=gpus,
                driver_version=_text(pynvml.nvmlSystemGetDriverVersion()),
                cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
                problem="" if gpus else "the NVIDIA driver reports no GPUs",
            )
        finally:
            pynvml.nvmlShutdown()

    @staticmethod
    def _gpu(pynvml, index: int) -> Gpu:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            mig = pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
        except pynvml.NVMLError:
            mig = False
        return Gpu(
            index=index,
            uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
            name=_text(pynvml.nvmlDeviceGetName(handle)),
            compute_capability=f"{major}.{minor}",
            memory_total_mib=memory.total // MIB,
            memory_free_mib=memory.free // MIB,
            mig=mig,
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def arch_for(compute_capability: str) -> Arch | None:
    """The Forge image family for a compute capability, or None when no image covers it."""
    major, minor = (int(part) for part in compute_capability.split("."))
    if major == 8 and minor in (0, 6):
        return "ampere"
    if major == 8 and minor == 9:
        return "ada"
    if major == 9:
        return "hopper"
    if major in (10, 12):
        return "blackwell"
    return None


def detect(provider: GpuProvider | None = None) -> Hardware:
    """The machine as the planner sees it. GPUs no image covers lead to a CPU plan, with the reason."""
    report = (provider or NvmlProvider()).report()
    memory = psutil.virtual_memory()
    common = dict(
        cpu_count=os.cpu_count() or 1,
        ram_total_mib=memory.total // MIB,
        ram_available_mib=memory.available // MIB,
        driver_version=report.driver_version,
        cuda_driver_version=report.cuda_driver_version,
    )
    usable = [gpu for gpu in report.gpus if arch_for(gpu.compute_capability)]
    if not usable:
        note = report.problem or "no GPU with compute capability 8.0 or newer (" + ", ".join(
            f"{gpu.name} is {gpu.compute_capability}" for gpu in report.gpus
        ) + ")"
        return Hardware(accelerator="cpu", arch="cpu", note=f"CPU plan: {note}.", **common)
    arch = arch_for(usable[0].compute_capability)
    same_arch = [gpu for gpu in usable if arch_for(gpu.compute_capability) == arch]
    return Hardware(
        accelerator="cuda",
        arch=arch,
        gpus=same_arch,
        note=f"{len(same_arch)}× {same_arch[0].name} (compute capability {same_arch[0].compute_capability}).",
        **common,
    )
