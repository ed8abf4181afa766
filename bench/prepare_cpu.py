"""Where prepare's CPU goes: the runner's own (serial) CPU-seconds against its workers', on the generated dataset.

    python bench/prepare_cpu.py --rows 100000

The runner's share bounds throughput on a machine with many cores (rows ÷ runner CPU-seconds); on a few
cores the total is what counts. Sampled with psutil every 100 ms while `python -m forge.runner prepare` runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_bench import generated_plan, runner_prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    rows = parser.parse_args().rows
    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        config = generated_plan(rows, Path(tmp), "plan")
        start = time.perf_counter()
        child = subprocess.Popen(runner_prepare(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        runner, runner_cpu, workers = psutil.Process(child.pid), 0.0, {}
        while child.poll() is None:
            try:
                runner_cpu = sum(runner.cpu_times()[:2])
                for worker in runner.children():
                    workers[worker.pid] = sum(worker.cpu_times()[:2])
            except psutil.Error:
                pass
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        if child.returncode:
            sys.exit(f"forge prepare failed:\n{child.stderr.read()[-3000:].decode()}")
    total = runner_cpu + sum(workers.values())
    print(f"rows: {rows:,}  cpus: {psutil.cpu_count()}  wall {seconds:.1f} s  ({rows / seconds:,.0f} rows/s)")
    print(f"runner CPU  : {runner_cpu:6.1f} s  -> at most {rows / runner_cpu:,.0f} rows/s however many cores")
    print(f"workers CPU : {sum(workers.values()):6.1f} s  ({len(workers)} workers)")
    print(f"total CPU   : {total:6.1f} s  -> at most {rows / total * psutil.cpu_count():,.0f} rows/s on these cores")


if __name__ == "__main__":
    main()
