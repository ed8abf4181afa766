# Forge runner, Ada build: L4, L40S, RTX 40xx, RTX 6000 Ada (compute capability 8.9).
# Builds with the classic builder (no BuildKit syntax), so `forge images build ada` works against any
# engine through its API. The four CUDA Dockerfiles differ only in their arch values; they share
# images/install-gpu-stack.sh and the pinned set images/requirements-ada.txt (-> requirements-cuda.txt:
# torch 2.10.0 built with CUDA 12.8, Unsloth, bitsandbytes, the runner's stack).
#
# BASE_IMAGE: the runtime base. The CUDA wheels bundle the CUDA runtime, cuDNN and NCCL, and the host's
# driver comes in at run time (NVIDIA Container Toolkit), so a small CUDA base is enough; on hosts without a
# registry, pass the local base made by `forge images bootstrap` (forge-base:bookworm). Any Debian-like image
# with apt-get or python3.11 works (Ubuntu 24.04 has no python3.11).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
# BUILD_IMAGE: the build stage's base, the runtime base unless FLASH_ATTN=1, which compiles with nvcc: then
# pass a devel base of the same distro (nvidia/cuda:12.8.1-devel-ubuntu22.04), so the venv's python matches.
ARG BUILD_IMAGE=${BASE_IMAGE}
# What images/requirements-cuda.txt installs: the build fails if torch differs; the labels show it.
ARG FORGE_TORCH=2.10.0
ARG FORGE_CUDA=12.8

FROM ${BUILD_IMAGE} AS build

ARG FORGE_TORCH
ARG FORGE_CUDA
# 1: build flash-attn for train.attention flash_attention_2 (Ada runs its sm_80 code).
# 0: PyTorch's SDPA kernels only (train.attention sdpa, the default), and no nvcc needed.
ARG FLASH_ATTN=0
# Parallel nvcc jobs for flash-attn (each can take several GB of memory).
ARG MAX_JOBS=2
# The compute capabilities this image is for: the build fails unless torch has code for each of them.
ENV FORGE_ARCH=ada \
    TORCH_CUDA_ARCH_LIST="8.9" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

COPY images/install-gpu-stack.sh images/no-deps-requirements.txt images/requirements-cuda.txt \
     images/requirements-flash-attn.txt images/requirements-ada.txt /tmp/images/
RUN sh /tmp/images/install-gpu-stack.sh build
# Its own step, so a failed check keeps the downloads above for the next try.
RUN sh /tmp/images/install-gpu-stack.sh check

FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/forge \
    FORGE_ARCH=ada \
    PATH=/opt/forge/bin:${PATH} \
    TORCH_CUDA_ARCH_LIST="8.9" \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# python3.11, a C compiler for Triton, and the non-root user (uid 1000): the launcher runs as the invoking
# user, or as this user when that is root.
COPY images/install-gpu-stack.sh /tmp/images/
RUN sh /tmp/images/install-gpu-stack.sh runtime \
 && rm -rf /tmp/images
COPY --from=build /opt/forge /opt/forge

COPY pyproject.toml README.md /src/
COPY forge /src/forge
COPY host /src/host
COPY runner /src/runner
COPY plans /src/plans
RUN pip install --no-deps /src \
 && rm -rf /src

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "forge.runner"]
CMD ["--help"]

# Labels last, so a new version or source hash reuses every layer above.
ARG FORGE_TORCH
ARG FORGE_CUDA
ARG FORGE_VERSION=0.1.0
# Hash of Forge's own sources (set by `forge images build`): the host refuses an image built from other code.
ARG FORGE_SOURCE=unknown
LABEL org.opencontainers.image.title="forge-runner" \
      org.opencontainers.image.description="Forge runner (Ada, CUDA 12.8): prepare and train steps" \
      org.opencontainers.image.version="${FORGE_VERSION}" \
      dev.forge.arch="ada" \
      dev.forge.source="${FORGE_SOURCE}" \
      dev.forge.torch="${FORGE_TORCH}" \
      dev.forge.cuda="${FORGE_CUDA}" \
      dev.forge.compute-capabilities="8.9"
