"""Arch mapping and CPU fallback, driven by a table of real devices (the NVML boundary is the only fake)."""

import pytest

from forge.contract.plan import Gpu
from forge.errors import HardwareError
from forge.host.detect import GpuReport, NvmlProvider, arch_for, detect

# name, compute capability, memory (MiB): as NVML reports them for these parts.
DEVICES = [
    ("Tesla V100-SXM2-16GB", "7.0", 16160, "turing"),
    ("Tesla V100-SXM2-32GB", "7.0", 32510, "turing"),
    ("Tesla T4", "7.5", 15360, "turing"),
    ("NVIDIA A100-SXM4-40GB", "8.0", 40960, "ampere"),
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


GPUS = {name: (name, cc, memory) for name, cc, memory, _ in DEVICES}


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


@pytest.mark.parametrize("cc", ["6.1", "6.0", "5.2"])
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


def test_mixed_box_plans_for_the_family_of_its_largest_gpu():
    rtx4090, l4, h100, t4 = (GPUS[name] for name in ("NVIDIA GeForce RTX 4090", "NVIDIA L4", "NVIDIA H100 80GB HBM3",
                                                     "Tesla T4"))
    hardware = detect(Table(("Tesla P100-PCIE-16GB", "6.0", 16384), rtx4090, l4, h100))
    assert hardware.arch == "hopper" and [gpu.name for gpu in hardware.gpus] == ["NVIDIA H100 80GB HBM3"]
    assert "not used: 1: NVIDIA GeForce RTX 4090, 2: NVIDIA L4" in hardware.note
    hardware = detect(Table(t4, rtx4090, l4))  # a T4 first does not make the box a Turing box
    assert hardware.arch == "ada" and [gpu.name for gpu in hardware.gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA L4"]


def test_volta_and_turing_share_the_turing_family():
    hardware = detect(Table(GPUS["Tesla T4"], GPUS["Tesla V100-SXM2-32GB"], GPUS["NVIDIA L4"]))
    assert (hardware.accelerator, hardware.arch) == ("cuda", "turing")
    assert [gpu.name for gpu in hardware.gpus] == ["Tesla T4", "Tesla V100-SXM2-32GB"]


def test_real_nvml_provider_on_this_machine():
    """Without a driver (CI) NVML must report the problem cleanly; with one, real GPUs."""
    from forge.host.detect import NvmlProvider

    report = NvmlProvider().report()
    assert report.gpus or report.problem


@pytest.mark.parametrize("name, cc", [("Orin (nvgpu)", "8.7"), ("NVIDIA Thor", "11.0"), ("Xavier", "7.2")])
def test_arm64_only_parts_are_a_clear_error(name, cc):
    with pytest.raises(HardwareError) as error:
        detect(Table((name, cc, 30000)))
    assert f"compute capability {cc}" in error.value.message and "arm64" in error.value.message


def test_several_gpus_are_picked_by_index_or_uuid():
    table = Table(GPUS["NVIDIA H100 80GB HBM3"], GPUS["NVIDIA H200"], GPUS["NVIDIA A100-SXM4-80GB"])
    assert [g.name for g in detect(table).gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert [g.index for g in detect(table, select=["1"]).gpus] == [1]
    chosen = detect(table, select=["GPU-00000002"])
    assert (chosen.arch, [g.name for g in chosen.gpus]) == ("ampere", ["NVIDIA A100-SXM4-80GB"])
    with pytest.raises(HardwareError) as error:
        detect(table, select=["7"])
    assert "GPU-00000000" in error.value.hint
    with pytest.raises(HardwareError) as error:
        detect(Table(problem="no NVIDIA driver found"), select=["0"])
    assert "no NVIDIA driver found" in error.value.message and "--cpu" in error.value.hint


class FakeNvml:
    """pynvml's surface as NVML reports an A100 split in two MIG slices next to a whole H100 (the NVML boundary)."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    class _Memory:
        def __init__(self, mib):
            self.total, self.free = mib * 2**20, (mib - 100) * 2**20

    devices = {0: ("NVIDIA A100-SXM4-40GB", (8, 0), 40960, True), 1: ("NVIDIA H100 80GB HBM3", (9, 0), 81559, False)}
    slices = {0: [("MIG-aaaa", "NVIDIA A100-SXM4-40GB MIG 3g.20gb", 19968), None,
                  ("MIG-bbbb", "NVIDIA A100-SXM4-40GB MIG 2g.10gb", 9984)]}

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlSystemGetCudaDriverVersion_v2(self): return 12080
    def nvmlSystemGetDriverVersion(self): return b"570.86.10"
    def nvmlDeviceGetCount(self): return len(self.devices)
    def nvmlDeviceGetHandleByIndex(self, index): return ("gpu", index)
    def nvmlDeviceGetCudaComputeCapability(self, handle): return self.devices[handle[1]][1]
    def nvmlDeviceGetMigMode(self, handle): return (int(self.devices[handle[1]][3]), 0)
    def nvmlDeviceGetMaxMigDeviceCount(self, handle): return len(self.slices.get(handle[1], []))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, slot):
        if self.slices[handle[1]][slot] is None:
            raise self.NVMLError("Not Found")
        return ("mig", handle[1], slot)

    def _info(self, handle):
        if handle[0] == "gpu":
            name, _, mib, _ = self.devices[handle[1]]
            return f"GPU-{handle[1]}", name, mib
        return self.slices[handle[1]][handle[2]]

    def nvmlDeviceGetUUID(self, handle): return self._info(handle)[0]
    def nvmlDeviceGetName(self, handle): return self._info(handle)[1]
    def nvmlDeviceGetMemoryInfo(self, handle): return self._Memory(self._info(handle)[2])


def test_nvml_reports_mig_slices_as_devices_with_their_own_uuid_and_memory(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    report = NvmlProvider().report()
    assert [(g.uuid, g.memory_total_mib, g.mig, g.compute_capability) for g in report.gpus] == [
        ("MIG-aaaa", 19968, True, "8.0"), ("MIG-bbbb", 9984, True, "8.0"), ("GPU-1", 81559, False, "9.0")]
    assert (report.driver_version, report.cuda_driver_version) == ("570.86.10", "12.8")
    hardware = detect(type("Fixed", (), {"report": lambda self: report})(), select=["MIG-bbbb"])
    assert hardware.arch == "ampere" and [g.uuid for g in hardware.gpus] == ["MIG-bbbb"]
    assert "MIG slice" in hardware.note
