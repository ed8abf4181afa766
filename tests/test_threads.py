"""The runner's CPU budget (affinity and the tightest cgroup quota, v1 and v2, nested, namespaced) and the
thread settings it starts with, checked in the OpenMP runtime torch really loads."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.runner.resources import cpu_quota, usable_cpus
from forge.runner.threads import configure

AFFINITY = len(os.sched_getaffinity(0))
# One cgroup level: no quota, or (quota, period) in microseconds.
LEVEL = st.one_of(st.none(), st.tuples(st.integers(1_000, 1_600_000), st.sampled_from([10_000, 100_000, 250_000])))


def _fake_proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, Path, str, str]]) -> Path:
    """A /proc/self with this cgroup file and a mountinfo of (root, mount point, fstype, super options)."""
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(
        f"{30 + i} 23 0:{40 + i} {root} {point} rw,nosuid - {fstype} {fstype} {options}\n"
        for i, (root, point, fstype, options) in enumerate(mounts)))
    return proc


def _set_quota(directory: Path, level, v2: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    quota, period = level or (None, 100_000)
    if v2:
        (directory / "cpu.max").write_text(f"{quota or 'max'} {period}\n")
    else:
        (directory / "cpu.cfs_quota_us").write_text(f"{quota or -1}\n")
        (directory / "cpu.cfs_period_us").write_text(f"{period}\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(v2=st.booleans(), levels=st.lists(LEVEL, min_size=1, max_size=5), depth=st.integers(0, 5), other=LEVEL,
       data=st.data())
def test_the_quota_is_the_tightest_on_the_path_from_the_process_to_its_mount(tmp_path_factory, v2, levels, depth,
                                                                            other, data):
    """The process is in cgroup /l0/l1/.../ln, each level with or without a quota. The hierarchy is mounted
    from the cgroup at `depth` (0: its root; len(levels): the process's own, as in a container), so the
    levels above that are out of sight; a cgroup off the process's path has a quota of its own. Only the
    mounted levels on the process's path count."""
    tmp = tmp_path_factory.mktemp("cg")
    depth = min(depth, len(levels))
    names = [f"l{i}" for i in range(len(levels))]
    mount = tmp / "cgroup"
    visible = range(max(depth - 1, 0), len(levels))  # the mount point itself shows the cgroup at `depth`
    for level in visible:
        _set_quota(mount.joinpath(*names[depth:level + 1]), levels[level], v2)
    _set_quota(mount.joinpath(*names[depth:-1], "other"), other, v2)
    cgroup_path, mount_root = "/" + "/".join(names), "/" + "/".join(names[:depth])
    if v2:
        proc = _fake_proc(tmp, f"0::{cgroup_path}\n", [(mount_root, mount, "cgroup2", "rw")])
    else:
        controllers = data.draw(st.sampled_from(["cpu", "cpu,cpuacct", "cpuacct,cpu"]))
        proc = _fake_proc(tmp, f"5:memory:/other\n4:{controllers}:{cgroup_path}\n1:cpuset:/\n",
                          [("/", tmp / "memory", "cgroup", "rw,memory"), ("/", tmp / "cpuset", "cgroup", "rw,cpuset"),
                           (mount_root, mount, "cgroup", f"rw,{controllers}")])
    expected = min((levels[i][0] / levels[i][1] for i in visible if levels[i]), default=None)
    assert cpu_quota(proc) == (pytest.approx(expected) if expected else None)
    assert usable_cpus(proc) == (max(1, min(AFFINITY, math.floor(expected))) if expected else AFFINITY)


def test_a_quota_on_either_hierarchy_of_a_hybrid_system_counts(tmp_path):
    """cgroup v2 mounted beside v1 (systemd's hybrid layout, this CI machine's): the cpu controller is on v1."""
    unified, cpu = tmp_path / "unified", tmp_path / "cpu"
    unified.mkdir()  # no cpu.max: the cpu controller is not on this hierarchy
    _set_quota(cpu / "job", (50_000, 100_000), v2=False)
    proc = _fake_proc(tmp_path, "4:cpu:/job\n0::/job\n", [("/", cpu, "cgroup", "rw,cpu"),
                                                           ("/", unified, "cgroup2", "rw")])
    assert cpu_quota(proc) == 0.5 and usable_cpus(proc) == 1  # half a CPU still gets a thread


def test_without_a_readable_proc_the_containers_own_cgroup_is_read(tmp_path):
    assert cpu_quota(tmp_path / "missing") == cpu_quota()  # /sys/fs/cgroup itself: a container's own cgroup


def test_configure_keeps_what_the_environment_already_says():
    environ = {"OMP_NUM_THREADS": "1"}
    chosen = configure(environ)
    assert environ["OMP_NUM_THREADS"] == "1" and "OMP_NUM_THREADS" not in chosen
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert environ["MKL_NUM_THREADS"] == environ["RAYON_NUM_THREADS"] == str(usable_cpus())
    assert configure({"FORGE_CPU_THREADS": "default"}) == {}


PROBE = """
import sys
import forge.runner.__main__  # the runner's entry module: it sizes the threads when it is imported
assert "torch" not in sys.modules, "torch was loaded before the runner sized its threads"
from forge.runner.resources import usable_cpus
import torch
print(usable_cpus(), torch.get_num_threads())
"""


def _probe(env: dict | None = None, cpus: set[int] | None = None) -> tuple[int, int, dict[str, str]]:
    """Start the runner's entry module as the image does and read back what torch's OpenMP runtime took
    (OMP_DISPLAY_ENV: GNU OpenMP prints its settings when it loads, GOMP_SPINCOUNT being how long an idle
    thread spins before it sleeps)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_DISPLAY_ENV": "VERBOSE", **(env or {})},
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    usable, torch_threads = map(int, done.stdout.split())
    shown = dict(line.strip().replace("'", "").split(" = ", 1) for line in done.stderr.splitlines() if " = " in line)
    assert "GOMP_SPINCOUNT" in shown, f"torch's OpenMP runtime is not GNU OpenMP here:\n{done.stderr[-2000:]}"
    return usable, torch_threads, shown


def test_the_runners_torch_gets_its_usable_cpus_and_idle_threads_sleep():
    usable, torch_threads, omp = _probe(cpus={min(os.sched_getaffinity(0))})
    assert usable == torch_threads == int(omp["OMP_NUM_THREADS"]) == 1
    assert omp["GOMP_SPINCOUNT"] == "0"  # the default spins 300000 times (about 3 ms) at every barrier
    _, torch_threads, omp = _probe(env={"OMP_NUM_THREADS": "1", "FORGE_CPU_THREADS": "default"})
    assert torch_threads == 1 and omp["GOMP_SPINCOUNT"] != "0"  # `default`: the libraries' own settings


def _cpu_hierarchy() -> tuple[Path, dict[str, str]] | None:
    """Where to make a cgroup with a 1-CPU quota, and the files that set it: cgroup v2, else v1."""
    root = Path("/sys/fs/cgroup")
    delegated = root / "cgroup.subtree_control"
    if delegated.exists() and "cpu" in delegated.read_text().split():
        return root, {"cpu.max": "100000 100000"}
    if (root / "cpu" / "cpu.cfs_quota_us").exists():
        return root / "cpu", {"cpu.cfs_quota_us": "100000", "cpu.cfs_period_us": "100000"}
    return None


def test_a_cgroup_quota_below_the_affinity_sizes_the_runners_threads(tmp_path):
    """A real cgroup with a 1-CPU quota on a machine with more CPUs: torch alone would start a thread per CPU
    of its affinity. Needs root and a writable cgroup v2 or v1 cpu hierarchy."""
    if AFFINITY < 2 or os.geteuid() != 0:
        pytest.skip("needs root and at least 2 CPUs")
    found = _cpu_hierarchy()
    if found is None:
        pytest.skip("no cgroup hierarchy with the cpu controller")
    parent, quota = found
    group = parent / f"forge-test-{os.getpid()}"
    try:
        group.mkdir()
        for name, value in quota.items():
            (group / name).write_text(value)
    except OSError as exc:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_DISPLAY_ENV": "VERBOSE"},
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        assert done.stdout.split() == ["1", "1"], done.stdout
    finally:
        group.rmdir()
