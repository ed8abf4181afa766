"""Which GPUs and drivers an image runs on: one rule for the host (from the image's labels, before it
launches) and the runner (from torch, when the container starts).

- A GPU of compute capability X.z runs code compiled for X.y when y <= z (CUDA's binary compatibility
  within a major version); 10.x and 12.x are different majors, so Blackwell images carry both.
- The driver must support the image's CUDA version: at least the same major.minor.
- bf16 needs compute capability 8.0 or newer; Volta (7.0) and Turing (7.5) compute in fp16.

The image family names live here once (`ARCHES`); forge.yaml's `image.arch` and the host's image list use them.
"""

from __future__ import annotations

# The compute capabilities each GPU image is built for. `turing` covers Volta (V100, 7.0) and Turing (T4,
# RTX 20xx, 7.5): one torch build has code for both, and neither has bf16.
ARCH_CAPABILITIES = {"turing": ("7.0", "7.5"), "ampere": ("8.0", "8.6"), "ada": ("8.9",), "hopper": ("9.0",),
                     "blackwell": ("10.0", "12.0")}
ARCHES = ("cpu", *ARCH_CAPABILITIES)
BF16_MIN_CAPABILITY = (8, 0)
UNSLOTH_MIN_CAPABILITY = (7, 5)  # Unsloth routes attention through xformers, whose pinned build starts at sm_75


def parse_version(text: str) -> tuple[int, int]:
    """'8.9' -> (8, 9); '12' -> (12, 0): compute capabilities and CUDA versions, comparable as tuples."""
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def arch_for(compute_capability: str) -> str | None:
    """The Forge image family built for a compute capability (its class, not mere binary compatibility:
    an 8.9 card gets the Ada image, though Ampere's 8.6 code would run on it), or None."""
    major, minor = parse_version(compute_capability)
    if major == 7:
        return {0: "turing", 5: "turing"}.get(minor)  # 7.2 is Jetson Xavier: arm64 only
    if major == 8:
        return {0: "ampere", 6: "ampere", 9: "ada"}.get(minor)  # 8.7 is Jetson Orin: arm64 only
    return {9: "hopper", 10: "blackwell", 12: "blackwell"}.get(major)


def supports_bf16(compute_capability: str) -> bool:
    """bf16 tensor cores (and bf16 autocast) start with Ampere; older parts train in fp16 with loss scaling."""
    return parse_version(compute_capability) >= BF16_MIN_CAPABILITY


def covers(capabilities, compute_capability: str) -> bool:
    major, minor = parse_version(compute_capability)
    return any(m == major and n <= minor for m, n in map(parse_version, capabilities))


def image_problem(image_arch: str, capabilities, image_cuda: str, gpus: list[tuple[str, str]],
                  driver_cuda: str | None, version: str) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when this image cannot run on these GPUs (name, capability) and driver."""
    for name, capability in gpus:
        if not covers(capabilities, capability):
            right = arch_for(capability)
            fix = (f"Use forge-runner:{right}-{version} (`forge images build {right}`), or re-plan on this machine "
                   "with `forge plan`." if right else "No Forge image supports this GPU; plan for the CPU with --cpu.")
            return (f"The {image_arch} image has code for compute capability {', '.join(capabilities)}; "
                    f"{name} is {capability}.", fix)
    if image_cuda not in ("", "none") and driver_cuda and parse_version(driver_cuda) < parse_version(image_cuda):
        return (f"The {image_arch} image uses CUDA {image_cuda}; this NVIDIA driver supports CUDA up to {driver_cuda}.",
                f"Update the NVIDIA driver to one that supports CUDA {image_cuda} or newer.")
    return None
