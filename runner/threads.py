"""The runner's CPU threads: as many as the CPUs it really gets, and asleep, not spinning, when idle.

Without this, torch's OpenMP (and the MKL under it, which uses the same GNU OpenMP runtime) sizes its pool
by the affinity mask alone, not by a container's CPU quota, and each idle thread spins (GOMP_SPINCOUNT
300000, a few ms) before it sleeps, at every parallel region. Beside busy processes on a small machine the
spinning threads take the CPU from the ones doing the work. Measured with bench/cpu_threads.py on 2 shared
cores (SmolLM2-135M, 4 x 256-token rows a step, median seconds per step): beside 2 busy loops 7.3 s with the
defaults, 4.3 s with PASSIVE (fair share: about 3.4); with the machine otherwise loaded (load 5.4) 16.9 s
and 5.1 s. The price is a wake-up per parallel region on an idle machine: 2.06 s a step instead of 1.70
(a short spin, GOMP_SPINCOUNT=10000, kept 1.75 alone but gave 4.9 beside the busy loops). PASSIVE is the
standard setting every OpenMP runtime reads, and it bounds the worst case where CPU training mostly runs:
CI and laptops that are doing other things.

`configure()` must run before torch, MKL, OpenMP or a tokenizer is loaded: they read these variables once,
when they initialise. So the runner calls it first thing (forge.runner.__main__), and forked prepare
workers inherit it.
"""

from __future__ import annotations

import os
from typing import MutableMapping

from forge.runner.resources import usable_cpus

# FORGE_CPU_THREADS=default leaves every library its own defaults (for comparison: bench/cpu_threads.py).
SETTING = "FORGE_CPU_THREADS"
# Pool sizes: OpenMP (torch's intra-op threads), MKL, OpenBLAS (numpy), Rayon (Hugging Face tokenizers).
THREAD_COUNTS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def sized_environment(cpus: int) -> dict[str, str]:
    """The variables that size every thread pool to `cpus` and make idle OpenMP threads sleep at once."""
    return {**{name: str(cpus) for name in THREAD_COUNTS}, "OMP_WAIT_POLICY": "PASSIVE"}


def configure(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Size this process's thread pools to its usable CPUs; returns what it set. A variable that is already
    set wins (a user's OMP_NUM_THREADS=1 stays), and FORGE_CPU_THREADS=default sets nothing."""
    if environ.get(SETTING) == "default":
        return {}
    chosen = {name: value for name, value in sized_environment(usable_cpus()).items() if name not in environ}
    environ.update(chosen)
    return chosen
