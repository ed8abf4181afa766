"""What this process may use and has used: CPUs (affinity and the container's quota) and peak memory."""

from __future__ import annotations

import os
import resource
from pathlib import Path


CGROUP = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup's CPU quota (`docker run --cpus`)."""
    count = len(os.sched_getaffinity(0))
    quota = _cpu_quota()
    return min(count, max(1, round(quota))) if quota else count


def _cpu_quota() -> float | None:
    try:  # cgroup v2, then v1
        quota, period = (CGROUP / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP / "cpu" / "cpu.cfs_quota_us").read_text())
        return None if quota <= 0 else quota / int((CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def container_peak_mb() -> int | None:
    """Peak memory of the whole container (every process, and the page cache it dirtied): what a `--memory`
    cap is held against. None outside a container."""
    if not Path("/.dockerenv").exists():
        return None
    for path in (CGROUP / "memory.peak", CGROUP / "memory" / "memory.max_usage_in_bytes"):  # cgroup v2, v1
        try:
            return round(int(path.read_text()) / 2**20)
        except (OSError, ValueError):
            continue
    return None


def peak_rss_mb() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    runner started from a large parent would report the parent's peak as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_memory() -> dict[str, float]:
    """The training peak: GPU memory allocated by torch on CUDA, the process's RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"rss_mb": float(peak_rss_mb())}
