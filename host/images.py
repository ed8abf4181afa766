"""Build, list and check the runner images. Labels tie an image to a Forge version and an arch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

from forge import __version__
from forge.contract import compat
from forge.errors import ConfigError, EngineError, ImageError
from forge.host.engine import client
from forge.host.planner import image_name

LABEL_PREFIX = "dev.forge"
ARCHES = compat.ARCHES  # cpu and the GPU families, named once in forge.contract.compat
DEFAULT_LOCAL_BASE = "forge-base:bookworm"
TORCH_VERSION = "2.13.0"
# The packages whose code runs in the image, and where they live in a checkout (pyproject's package-dir).
# Host-only changes need no rebuild.
PACKAGE_DIRS = {"forge": "forge", "forge.contract": "forge/contract", "forge.runner": "runner",
                "forge.runner.prepare": "runner/prepare", "forge.plans": "plans"}
SOURCE_SUFFIXES = (".py", ".yaml", ".jinja")


@dataclass(frozen=True)
class ImageInfo:
    tag: str
    arch: str
    forge_version: str
    torch: str
    cuda: str
    size_mb: int
    source: str
    id: str = ""
    capabilities: tuple[str, ...] = ()


def find_context(start: Path | None = None) -> Path:
    """The build context: the checkout holding the Dockerfiles (images are built from source)."""
    candidates = [start] if start else [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[1]]
    for candidate in candidates:
        if candidate and (candidate / "Dockerfile.cpu").is_file():
            return candidate
    raise ConfigError(
        "No Forge source checkout found (looked for Dockerfile.cpu).",
        "Run from the Forge checkout, or pass --context PATH_TO_CHECKOUT.",
    )


def build(arch: str, context: Path, base: str | None, on_line: Callable[[str], None]) -> str:
    """Build `forge-runner:<arch>-<version>` through the engine's API, streaming its output lines."""
    dockerfile = context / f"Dockerfile.{arch}"
    if not dockerfile.is_file():
        raise ImageError(
            f"No Dockerfile for arch {arch!r} ({dockerfile.name} is missing in {context}).",
            f"Build one of: {', '.join(available_arches(context))}.",
        )
    args = {"FORGE_VERSION": __version__,
            "FORGE_SOURCE": source_digest({pkg: context / rel for pkg, rel in PACKAGE_DIRS.items()})}
    if base:
        args["BASE_IMAGE"] = base
    if arch == "cpu":  # the CUDA images pin their own torch (images/requirements-cuda.txt)
        args["TORCH_VERSION"] = TORCH_VERSION
        if any((context / "wheels").glob(f"torch-{TORCH_VERSION}*.whl")):
            args["TORCH_INDEX_URL"] = ""  # a staged wheel in wheels/ replaces the official CPU index
    tag = image_name(arch)
    for chunk in _stream(context, dockerfile.name, tag, args):
        if "error" in chunk:
            detail = chunk.get("error", "").strip()
            on = f"base {base}" if base else "the Dockerfile's default base"
            raise ImageError(f"Building {tag} on {on} failed: {detail}", _build_hint(detail))
        text = chunk.get("stream", "") or chunk.get("status", "")
        for line in text.splitlines():
            if line.strip():
                on_line(line.rstrip())
    return tag


def _stream(context: Path, dockerfile: str, tag: str, args: dict) -> Iterator[dict]:
    from docker.errors import APIError

    try:
        yield from client().api.build(
            path=str(context), dockerfile=dockerfile, tag=tag, buildargs=args, decode=True, rm=True, forcerm=True
        )
    except APIError as exc:
        raise EngineError(f"The engine refused the build: {exc.explanation or exc}", "See `forge doctor`.") from None


def _build_hint(detail: str) -> str:
    markers = ("pull access denied", "not found", "failed to resolve", "registry", "no such host", "manifest unknown")
    if any(marker in detail.lower() for marker in markers):
        return (
            f"The base image could not be pulled. Without registry access, run `forge images bootstrap` and then "
            f"`forge images build --base {DEFAULT_LOCAL_BASE}`."
        )
    return "Read the build output above; rerun with the same command once fixed (layers are cached)."


def source_digest(package_dirs: dict[str, Path]) -> str:
    """A hash of Forge's own code, so an image built from other sources than the host's is caught."""
    digest = hashlib.sha256()
    for package, directory in sorted(package_dirs.items()):
        for path in sorted(Path(directory).iterdir()):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES:
                digest.update(f"{package}/{path.name}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def installed_source_digest() -> str:
    return source_digest({pkg: Path(str(resources.files(pkg))) for pkg in PACKAGE_DIRS})


def available_arches(context: Path) -> list[str]:
    return [arch for arch in ARCHES if (context / f"Dockerfile.{arch}").is_file()]


def list_images() -> list[ImageInfo]:
    found = client().images.list(filters={"label": f"{LABEL_PREFIX}.arch"})
    return sorted((_info(image) for image in found if image.tags), key=lambda info: info.tag)


def _info(image) -> ImageInfo:
    labels = image.labels or {}
    return ImageInfo(
        tag=image.tags[0],
        arch=labels.get(f"{LABEL_PREFIX}.arch", "?"),
        forge_version=labels.get("org.opencontainers.image.version", "?"),
        torch=labels.get(f"{LABEL_PREFIX}.torch", "?"),
        cuda=labels.get(f"{LABEL_PREFIX}.cuda", "?"),
        size_mb=int(image.attrs.get("Size", 0) / 1e6),
        source=labels.get(f"{LABEL_PREFIX}.source", "?"),
        id=image.id or "",
        capabilities=tuple(c for c in labels.get(f"{LABEL_PREFIX}.compute-capabilities", "").split(",") if c),
    )


def check_image(tag: str, arch: str, hardware=None) -> ImageInfo:
    """The image must exist, its labels must say it runs this plan's arch with this Forge version, and (for a
    GPU plan) its compiled compute capabilities and CUDA version must suit the planned GPUs and driver."""
    from docker.errors import ImageNotFound

    try:
        image = client().images.get(tag)
    except ImageNotFound:
        raise ImageError(f"Image {tag} is not present.", f"Build it: `forge images build {arch}`.") from None
    info = _info(image)
    if info.arch != arch or info.forge_version != __version__:
        raise ImageError(
            f"Image {tag} is for arch {info.arch!r}, Forge {info.forge_version}; the plan needs arch {arch!r}, "
            f"Forge {__version__}.",
            f"Rebuild it: `forge images build {arch}`.",
        )
    if hardware is not None and hardware.accelerator == "cuda":
        problem = compat.image_problem(info.arch, info.capabilities, info.cuda,
                                       [(gpu.name, gpu.compute_capability) for gpu in hardware.gpus],
                                       hardware.cuda_driver_version, __version__)
        if problem:
            raise ImageError(f"Image {tag} cannot run here: {problem[0]}", problem[1])
    host_source = installed_source_digest()
    if info.source != host_source:
        raise ImageError(
            f"Image {tag} was built from other Forge sources than this host's (source {info.source}, host "
            f"{host_source}), so host and runner could disagree.",
            f"Rebuild it: `forge images build {arch}` (unchanged layers are cached).",
        )
    return info

