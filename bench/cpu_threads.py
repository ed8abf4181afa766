"""CPU training beside busy neighbours: the libraries' default threads against Forge's sizing
(forge.runner.threads: threads = usable CPUs, OMP_WAIT_POLICY=PASSIVE), alone and beside busy processes,
as ratios within one run.

    python bench/cpu_threads.py                      # 2 busy neighbours, two matmul loops, 6 training steps
    python bench/cpu_threads.py --busy 1 --steps 0   # matmul loops only
    python bench/cpu_threads.py --spin 10000         # a short spin (GOMP_SPINCOUNT) instead of PASSIVE

Printed, per workload and situation: seconds with the defaults (FORGE_CPU_THREADS=default) and with Forge's
sizing, and their ratio (> 1: Forge's is faster). "busy" is the gain; "alone" is what sleeping at once costs
on an idle machine (a wake-up per parallel region). A fair share beside N busy single-threaded neighbours is
T / (T + N) of the CPUs for T threads: 2 threads beside 2 neighbours on 2 CPUs get one, twice the alone time.
Workloads:
- matmul N: a loop of N x N float32 matmuls, `--gflop` in all: 128 has many short parallel regions (where
  spinning threads hurt most, and waking sleeping ones costs most), 512 is about a training matmul's size.
  Median of `--repeats` runs, before and after interleaved so other load on the machine hits both alike;
- train: `--steps` optimizer steps (4 rows of up to 256 tokens each) of SmolLM2-135M through the runner's own
  path (`python -m forge.runner train`, outside a container): the median of the seconds between step events
  (model load excluded), over `--train-runs` runs per setting, interleaved.
Neighbours are busy Python loops that end by themselves after `--neighbour-s` seconds and are killed when the
bench ends. The load average is printed beside each situation: on a shared machine "alone" means "with
whatever else runs there".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import make_pairs  # noqa: E402

from forge.runner.resources import usable_cpus  # noqa: E402
from forge.runner.threads import SETTING  # noqa: E402

MATMUL = """
import time, torch
size, loops = {size}, {loops}
a, b = torch.randn(size, size), torch.randn(size, size)
for _ in range(50):
    a @ b
start = time.perf_counter()
for _ in range(loops):
    a @ b
print(time.perf_counter() - start, torch.get_num_threads())
"""
# what the runner does first (forge/runner/__main__.py), then the loop
SIZED = "from forge.runner import threads; threads.configure()\n"
SETTINGS = {"default": {SETTING: "default"}, "forge": {}}


@contextmanager
def neighbours(count: int, seconds: float):
    """`count` busy loops, each ending by itself after `seconds`; killed on the way out."""
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    processes = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)  # let them get going
        yield
        if any(process.poll() is not None for process in processes):
            print("  (a neighbour ended before the measurements did: raise --neighbour-s)", flush=True)
    finally:
        for process in processes:
            process.kill()
            process.wait()


def environment(setting: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != SETTING}
    return {"FORGE_PII_KEY": "cpu-threads-bench-key", **env, **SETTINGS[setting]}  # prepare's PII hashing key


def matmul_seconds(setting: str, size: int, gflop: float) -> tuple[float, int]:
    loops = max(1, round(gflop * 1e9 / (2 * size ** 3)))
    code = (SIZED if setting == "forge" else "") + MATMUL.format(size=size, loops=loops)
    done = subprocess.run([sys.executable, "-c", code], env=environment(setting), capture_output=True, text=True,
                          check=True)
    seconds, threads = done.stdout.split()
    return float(seconds), int(threads)


def make_job(root: Path, steps: int) -> Path:
    """A forge.yaml for the runner's own code over generated chat data, prepared once."""
    data = root / "data"
    data.mkdir(parents=True)
    (data / "chat.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}) + "\n"
        for p, a in make_pairs(400, seed=3)))
    subprocess.run([sys.executable, str(Path(__file__).parent / "make_plan.py"), str(data), str(root)], check=True)
    config = yaml.safe_load((root / "forge.yaml").read_text())
    config["prepare"]["max_length"] = 256
    config["train"].update(max_steps=steps, save_every=steps, micro_batch_size=4, gradient_accumulation=1)
    config["train"]["lora"]["dropout"] = 0.0
    (root / "forge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    runner("prepare", root, "forge")
    return root


def runner(step: str, job: Path, setting: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "forge.runner", step, "--config", str(job / "forge.yaml")],
                          env=environment(setting), capture_output=True, text=True)
    events = [json.loads(line) for line in done.stdout.splitlines() if '"forge_event"' in line]
    if done.returncode:
        errors = [f"{e['message']} {e['hint']}" for e in events if e["kind"] == "error"]
        sys.exit(f"forge.runner {step} failed:\n{done.stderr[-3000:]}\n{' '.join(errors)}")
    return events


def step_seconds(job: Path, setting: str) -> list[float]:
    """The seconds between consecutive step events of one `forge.runner train` from step 0."""
    for run in (job / "forge-out" / "runs").glob("*"):
        shutil.rmtree(run)
    times = [e["ts"] for e in runner("train", job, setting) if e["kind"] == "progress" and e["stage"] == "train"]
    return [after - before for before, after in zip(times, times[1:])]


def row(workload: str, situation: str, before: float, after: float, notes: str) -> None:
    print(f"{workload:10} {situation:9} {before:9.2f} {after:9.2f} {before / after:14.2f}  {notes}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="busy neighbours beside the measured process")
    parser.add_argument("--sizes", default="128,512", help="matmul sides, comma-separated")
    parser.add_argument("--gflop", type=float, default=40, help="work per matmul run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (0: skip training)")
    parser.add_argument("--train-runs", type=int, default=1, help="training runs per setting, interleaved")
    parser.add_argument("--spin", type=int, help="try GOMP_SPINCOUNT=SPIN (a short spin before sleeping) "
                                                 "instead of Forge's PASSIVE (spin 0)")
    parser.add_argument("--neighbour-s", type=float, default=1800, help="a neighbour's longest life")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still kills the neighbours
    if args.spin is not None:
        SETTINGS["forge"] = {"GOMP_SPINCOUNT": str(args.spin)}

    print(f"usable cpus: {usable_cpus()}  (os.cpu_count(): {os.cpu_count()})  busy neighbours: {args.busy}")
    print(f"{'workload':10} {'situation':9} {'default':>9} {'forge':>9} {'default/forge':>14}  notes")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forge-threads-") as tmp:
        job = make_job(Path(tmp), args.steps) if args.steps else None
        for situation, busy in (("alone", 0), ("busy", args.busy)):
            with neighbours(busy, args.neighbour_s):
                load = os.getloadavg()[0]
                for size in map(int, args.sizes.split(",")):
                    runs, threads = {"default": [], "forge": []}, {}
                    for _ in range(args.repeats):
                        for setting in runs:
                            seconds, threads[setting] = matmul_seconds(setting, size, args.gflop)
                            runs[setting].append(seconds)
                    before, after = (statistics.median(runs[s]) for s in ("default", "forge"))
                    row(f"matmul {size}", situation, before, after,
                        f"s; threads {threads['default']} / {threads['forge']}; load {load:.1f}")
                if job:
                    steps = {"default": [], "forge": []}
                    for _ in range(args.train_runs):
                        for setting in steps:
                            steps[setting] += step_seconds(job, setting)
                    before, after = (statistics.median(steps[s]) for s in ("default", "forge"))
                    row("train", situation, before, after, f"s per step (median); load {os.getloadavg()[0]:.1f}")
    print(f"bench took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
