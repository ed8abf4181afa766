"""Arch mapping and CPU fallback, driven by a table of real devices (the NVML boundary is the only fake)."""

import pytest

from forge.contract.plan import Gpu
from forge.host.detect import GpuReport, arch_for, detect

# name, compute capability, memory (MiB): as NVML reports them for these parts.
DEVICES = [
    ("NVIDIA A100-SXM4-80GB", "8.0", 81920, "ampere"),
    ("NVIDIA GeForce RTX 3090", "8.6", 24576, "ampere"),
    ("NVIDIA GeForce RTX 4090", "8.9", 24564, "ada"),
    ("NVIDIA L4", "8.9", 23034, "ada"),
    ("NVIDIA L40S", "8.9", 46068, "ada"),
    ("NVIDIA H100 80GB HBM3", "9.0", 81559, "hopper"),
    ("NVIDIA H200", "9.0", 143771, "hopper"),
    ("NVIDIA B200", "10.0", 183359, "blackwell"),
    ("NVIDIA GeForce RTX 5090", "12.0", 32607, "blackwell"),
]


class Table:
    def __init__(self, *devices, problem=""):
        self.gpus = [
            Gpu(index=i, uuid=f"GPU-{i:08x}", name=name, compute_capability=cc, memory_total_mib=mem, memory_free_mib=mem - 500)
            for i, (name, cc, mem, *_rest) in enumerate(devices)
        ]
        self.problem = problem

    def report(self):
        return GpuReport(gpus=self.gpus, driver_version="575.57.08", cuda_driver_version="12.9", problem=self.problem)


@pytest.mark.parametrize("name, cc, memory, arch", DEVICES)
def test_each_real_device_maps_to_its_image_family(name, cc, memory, arch):
    hardware = detect(Table((name, cc, memory)))
    assert (hardware.accelerator, hardware.arch) == ("cuda", arch)
    assert hardware.gpus[0].name == name and hardware.cuda_driver_version == "12.9"
    assert name in hardware.note


@pytest.mark.parametrize("cc", ["7.5", "7.0", "8.7", "11.0"])
def test_parts_without_an_image_fall_back_to_cpu_and_say_why(cc):
    assert arch_for(cc) is None
    hardware = detect(Table(("Some GPU", cc, 16000)))
    assert hardware.accelerator == "cpu"
    assert f"Some GPU is {cc}" in hardware.note


def test_no_driver_gives_a_cpu_plan_with_the_reason():
    hardware = detect(Table(problem="no NVIDIA driver found (NVML: NVML Shared Library Not Found)"))
    assert (hardware.accelerator, hardware.arch, hardware.gpus) == ("cpu", "cpu", [])
    assert "no NVIDIA driver found" in hardware.note
    assert hardware.cpu_count >= 1 and hardware.ram_total_mib > 0


def test_mixed_box_plans_for_the_first_usable_family_only():
    hardware = detect(Table(("Tesla T4", "7.5", 15360), DEVICES[2][:3], DEVICES[3][:3], DEVICES[5][:3]))
    assert hardware.arch == "ada"
    assert [gpu.name for gpu in hardware.gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA L4"]


def test_real_nvml_provider_on_this_machine():
    """Without a driver (CI) NVML must report the problem cleanly; with one, real GPUs."""
    from forge.host.detect import NvmlProvider

    report = NvmlProvider().report()
    assert report.gpus or report.problem
