"""The container's own check at start: in a CUDA image, every visible GPU must be one the image has code
for, and the driver must support the image's CUDA version (the rule in forge.contract.compat, the one the
host applies to the image's labels before launching). A mismatch is a clear error naming the right image,
instead of "no kernel image is available for execution on the device" halfway into loading a model."""

from __future__ import annotations

import ctypes
import os

from forge import __version__
from forge.contract import compat
from forge.errors import HardwareError


def check_gpu_image() -> None:
    import torch

    if not torch.version.cuda:
        return  # the CPU image
    problem = gpu_problem(torch.version.cuda, torch.cuda.get_arch_list(), _devices(torch), driver_cuda())
    if problem:
        raise HardwareError(*problem)


def gpu_problem(image_cuda: str, arch_list: list[str], devices: list[tuple[str, str]],
                driver: str | None) -> tuple[str, str] | None:
    if not devices:
        return ("This is a CUDA image, but no GPU is visible in the container"
                + (f" (the driver supports CUDA {driver})." if driver else " (no NVIDIA driver was found)."),
                "Run it with the GPU passed through (forge does this from the plan: re-run `forge plan` on this "
                "machine), or use the CPU image with `forge plan --cpu`.")
    capabilities = [f"{int(a[3:-1])}.{a[-1]}" for a in arch_list if a.startswith("sm_") and a[3:].isdigit()]
    arch = os.environ.get("FORGE_ARCH", "CUDA")  # set by each GPU Dockerfile
    return compat.image_problem(arch, capabilities, image_cuda, devices, driver, __version__)


def _devices(torch) -> list[tuple[str, str]]:
    try:
        count = torch.cuda.device_count()
    except RuntimeError:
        return []
    return [(torch.cuda.get_device_name(i), "{}.{}".format(*torch.cuda.get_device_capability(i))) for i in range(count)]


def driver_cuda() -> str | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion), or None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"
