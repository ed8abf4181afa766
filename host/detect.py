"""Hardware detection behind a small provider interface: NVML in production, a known part for
`forge plan --target` (host/gpus.py), a table in tests.

Everything above `GpuProvider` is pure, so the planner is tested without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from forge.contract.compat import ARCH_CAPABILITIES, arch_for, parse_version
from forge.contract.plan import Gpu, Hardware
from forge.errors import HardwareError

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReport:
    """What a provider found: GPUs and driver, or why there are none."""

    gpus: list[Gpu] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    problem: str = ""
    target: str | None = None  # the known part (plans/gpus.yaml) these GPUs stand for, when not detected


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
            gpus = [gpu for index in range(pynvml.nvmlDeviceGetCount()) for gpu in self._gpus(pynvml, index)]
            return GpuReport(
                gpus=gpus,
                driver_version=_text(pynvml.nvmlSystemGetDriverVersion()),
                cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
                problem="" if gpus else "the NVIDIA driver reports no GPUs",
            )
        finally:
            pynvml.nvmlShutdown()

    def _gpus(self, pynvml, index: int) -> list[Gpu]:
        """A GPU, or its MIG slices when MIG is on: each slice is a device of its own (its UUID is what Docker's
        device request takes), with its share of the memory and the parent's compute capability."""
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        try:
            mig = pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
        except pynvml.NVMLError:
            mig = False
        handles = [handle]
        if mig:
            handles = []
            for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    handles.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
                except pynvml.NVMLError:  # an empty slot
                    continue
        gpus = []
        for device in handles:
            memory = pynvml.nvmlDeviceGetMemoryInfo(device)
            gpus.append(Gpu(
                index=index,
                uuid=_text(pynvml.nvmlDeviceGetUUID(device)),
                name=_text(pynvml.nvmlDeviceGetName(device)),
                compute_capability=f"{major}.{minor}",
                memory_total_mib=memory.total // MIB,
                memory_free_mib=memory.free // MIB,
                mig=mig,
            ))
        return gpus


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def arm64_only(compute_capability: str) -> str | None:
    """The integrated (Jetson / DRIVE) parts with their own compute capabilities: arm64 boards only."""
    major, minor = parse_version(compute_capability)
    if (major, minor) in ((7, 2), (8, 7)):
        return "a Jetson (Xavier/Orin) module"
    if major == 11:
        return "a Jetson/DRIVE Thor module"
    return None


def _capabilities() -> str:
    return ", ".join(cap for caps in ARCH_CAPABILITIES.values() for cap in caps)


def detect(provider: GpuProvider | None = None, select: list[str] | None = None) -> Hardware:
    """The machine as the planner sees it. `select` picks GPUs by index or UUID (MIG slices by their UUID).
    GPUs no image covers lead to a CPU plan, with the reason; arm64-only parts are an error. A provider's
    `target` (forge plan --target) stands in for the GPUs; CPUs and RAM are still this machine's."""
    report = (provider or NvmlProvider()).report()
    memory = psutil.virtual_memory()
    common = dict(
        cpu_count=os.cpu_count() or 1,
        ram_total_mib=memory.total // MIB,
        ram_available_mib=memory.available // MIB,
        driver_version=report.driver_version,
        cuda_driver_version=report.cuda_driver_version,
    )
    gpus = _selected(report, select) if select else report.gpus
    usable = [gpu for gpu in gpus if arch_for(gpu.compute_capability)]
    if not usable:
        boards = [(gpu, kind) for gpu in gpus if (kind := arm64_only(gpu.compute_capability))]
        if boards:
            gpu, kind = boards[0]
            raise HardwareError(
                f"{gpu.name} (compute capability {gpu.compute_capability}) is {kind}: an arm64 system, and Forge's "
                f"images are built for x86_64 GPUs (compute capability {_capabilities()}).",
                "Run Forge on an x86_64 machine with such a GPU, or plan for the CPU image with --cpu on an "
                "x86_64 host.")
        note = report.problem or f"no GPU that a Forge image has code for ({_capabilities()}: " + ", ".join(
            f"{gpu.name} is {gpu.compute_capability}" for gpu in gpus
        ) + ")"
        return Hardware(accelerator="cpu", arch="cpu", note=f"CPU plan: {note}.", **common)
    arch = _family(usable)
    same_arch = [gpu for gpu in usable if arch_for(gpu.compute_capability) == arch]
    first = same_arch[0]
    found = (f"{len(same_arch)}× {first.name} (compute capability {first.compute_capability}"
             + (", MIG slice" if first.mig else ""))
    others = [gpu for gpu in usable if gpu not in same_arch]
    if others:  # one image family per run: the other GPUs sit this one out
        found += "; not used: " + ", ".join(f"{gpu.index}: {gpu.name}" for gpu in others)
    if report.target:
        note = (f"Planned for --target {report.target}: {found}, {first.memory_total_mib} MiB each, taken as idle) "
                "from plans/gpus.yaml, not detected on this machine; CPUs and RAM are this machine's.")
    else:
        note = found + ")."
    return Hardware(accelerator="cuda", arch=arch, gpus=same_arch, note=note, target=report.target, **common)


def _family(gpus: list[Gpu]) -> str:
    """The image family a mixed box runs: that of its largest GPU (then the newest), since a run trains on one
    family; a T4 at index 0 does not win over the RTX 4090 or H100 beside it. `--gpu` picks others."""
    best = max(gpus, key=lambda gpu: (gpu.memory_total_mib, parse_version(gpu.compute_capability)))
    return arch_for(best.compute_capability)


def _selected(report: GpuReport, select: list[str]) -> list[Gpu]:
    gpus = report.gpus
    if not gpus:
        raise HardwareError(f"--gpu {' '.join(select)} was given, but no GPU was detected ({report.problem}).",
                            "Install the NVIDIA driver (and nvidia-ml-py), or plan for the CPU with --cpu.")
    chosen = []
    for wanted in select:
        found = [gpu for gpu in gpus if (wanted.isdigit() and gpu.index == int(wanted)) or gpu.uuid == wanted]
        if not found:
            listed = "; ".join(f"{gpu.index}: {gpu.name} {gpu.uuid}" for gpu in gpus) or "none"
            raise HardwareError(f"No GPU matches --gpu {wanted}.", f"Pick by index or UUID from: {listed}.")
        chosen.extend(gpu for gpu in found if gpu not in chosen)
    return chosen
