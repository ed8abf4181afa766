"""What this process may use and has used: CPUs (affinity and the container's quota) and peak memory."""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path


CGROUP = Path("/sys/fs/cgroup")
PROC_SELF = Path("/proc/self")


def usable_cpus(proc: Path = PROC_SELF) -> int:
    """CPUs this process may keep busy: its affinity (cpusets, `taskset`, `docker run --cpuset-cpus`), capped by
    the tightest CPU quota on its cgroup or any ancestor (`docker run --cpus`, Kubernetes limits, systemd's
    CPUQuota), rounded down as uber-go/automaxprocs does: a thread beyond the quota is throttled each period,
    stalling the others at the next barrier. Not os.cpu_count(), which counts the host's CPUs."""
    count = len(os.sched_getaffinity(0))
    quota = cpu_quota(proc)
    return max(1, min(count, math.floor(quota))) if quota else count


def cpu_quota(proc: Path = PROC_SELF) -> float | None:
    """The tightest CPU quota, in CPUs, over this process's cgroups and their ancestors (cgroup v2 `cpu.max`,
    v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when there is none."""
    try:
        directories = list(_cpu_cgroup_dirs(proc))
    except (OSError, ValueError):
        directories = [CGROUP, CGROUP / "cpu"]  # an unreadable /proc: a container's own cgroup, v2 then v1
    return min(filter(None, map(_quota_in, directories)), default=None)


def _cpu_cgroup_dirs(proc: Path):
    """This process's cgroup directories that may hold a CPU quota, each from the innermost up to the root of
    its mount: /proc/self/cgroup names the cgroup, /proc/self/mountinfo where (and from which root) its
    hierarchy is mounted. In a container the mount's root is the container's own cgroup."""
    memberships = {}  # controllers ("" for cgroup v2) -> path in that hierarchy
    for line in (proc / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        memberships[controllers] = path
    for line in (proc / "mountinfo").read_text().splitlines():
        fields = line.split()
        tail = fields[fields.index("-") + 1:]  # fstype, source, super options
        if tail[0] == "cgroup2":
            path = memberships.get("")
        elif tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            path = next((p for c, p in memberships.items() if "cpu" in c.split(",")), None)
        else:
            continue
        if path is None:
            continue
        mount = Path(fields[4])
        relative = os.path.relpath(path, fields[3])
        directory = mount if relative.startswith("..") else mount / relative  # outside the mounted subtree: ours
        yield from (directory, *(p for p in directory.parents if p.is_relative_to(mount)))


def _quota_in(directory: Path) -> float | None:
    try:  # cgroup v2
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        return None if quota <= 0 else quota / int((directory / "cpu.cfs_period_us").read_text())
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
