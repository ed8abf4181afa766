"""`forge prepare` through the CLI, in the CPU container capped at --memory (default 1g), on a generated dataset
of at least --size bytes on disk (default 2 GiB, twice the cap; plain JSONL and CSV, so the size on disk is
the size of the data). It must finish; printed: rows, rows/s, and the container's peak memory (its cgroup's
high-water mark, page cache included) against the cap.

    python bench/prepare_memcap.py                     # 1 GiB cap, 2 GiB of data (about 4M rows)
    python bench/prepare_memcap.py --memory 512m --size 200000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import make_pairs, write  # noqa: E402

PART_ROWS = 250_000  # generated (and deduplicated against each other) in parts of this many rows


def _bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.lower().rstrip("ib").strip()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="1g", help="the container's memory cap (docker's --memory)")
    parser.add_argument("--size", default="2GiB", help="bytes of input data to generate, e.g. 2GiB")
    parser.add_argument("--workdir", type=Path, help="keep the data and output here (default: a temp dir)")
    args = parser.parse_args()
    target = _bytes(args.size)
    with tempfile.TemporaryDirectory(prefix="forge-memcap-") as tmp:
        workdir = args.workdir or Path(tmp)
        data, size, part = workdir / "data", 0, 0
        while size < target:
            folder = data / f"part-{part:03d}"
            paths = sorted(folder.glob("*")) if folder.is_dir() else []  # a kept --workdir: reuse what is there
            if len(paths) != 5:
                paths = write(make_pairs(PART_ROWS, seed=part), folder, compressed=False)
            size += sum(p.stat().st_size for p in paths)
            part += 1
        print(f"data: {size / 2**30:.2f} GiB in {part} parts of {PART_ROWS:,} rows", flush=True)
        config = workdir / "forge.yaml"
        subprocess.run(["forge", "plan", "smoke", "--cpu", "--data", str(data / "part-*" / "*"), "-o", str(config)],
                       check=True, stdout=subprocess.DEVNULL)
        start = time.perf_counter()
        run = subprocess.run(["forge", "prepare", "-c", str(config), "--memory", args.memory, "--json", "--rebuild"],
                             stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        result = json.loads(run.stdout.strip().splitlines()[-1])
        info = result.get("info") or {}
        print(f"exit {run.returncode} ({result['status']}) in {seconds:,.0f} s; rows {info.get('rows_in', 0):,} "
              f"({info.get('rows_in', 0) / seconds:,.0f} rows/s); kept {info.get('kept', 0):,}")
        print(f"container peak {info.get('container_peak_mb')} MiB (cap {args.memory}); "
              f"runner main process peak RSS {info.get('peak_rss_mb')} MiB")
        sys.exit(run.returncode)


if __name__ == "__main__":
    main()
