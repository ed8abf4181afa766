"""forge prepare against its baselines, measured side by side in one run, on the generated dataset.

    python bench/prepare_bench.py --rows 100000                 # throughput ratios
    python bench/prepare_bench.py --rows 100000 --rss 1000000   # plus peak memory at 1M ÷ at 100k rows

Ratios printed:
- forge prepare ÷ raw `tokenizers` batch encoding of the same rendered texts (the physical limit; target ≥ 0.5)
- forge prepare ÷ a plain `datasets.map(apply_chat_template + tokenize)` script with no cleaning, dedup or PII
  (target ≥ 2). Two such scripts are measured: the plain one, one row per call with `tokenize=True` (how
  TRL's SFTTrainer prepares a conversational dataset), and a batched one that renders per row and tokenizes
  each batch with the fast tokenizer's own threads.
- peak memory of forge prepare at the --rss size ÷ at --rows (target ≤ 1.3): the PSS of the runner and its
  worker processes summed (shared pages counted once), sampled every 250 ms; the main process's peak RSS too.
  Sampling slows a run, so these come from two more runs, not the one timed for the ratios above.
Forge runs the runner's own code in a subprocess here (outside the container), with the worker count it picks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import make_pairs, write  # noqa: E402

MODEL_CACHE = Path(os.environ.get("FORGE_MODEL_CACHE", Path.home() / ".cache" / "forge" / "models"))
os.environ.setdefault("FORGE_PII_KEY", "forge-bench-pii-key-not-a-secret")  # the runner needs one (pii_key.py)


def settle() -> None:
    """Flush what earlier steps wrote (datasets' cache, the generated inputs) before timing the next one,
    so no measurement pays for another's writeback."""
    os.sync()


def conversations(pairs):
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in pairs]


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_CACHE / "smollm2-135m-instruct")


def raw_tokenizers(pairs) -> float:
    """Rows/s of the Rust tokenizer alone (its own threads) on pre-rendered texts."""
    tok = tokenizer()
    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations(pairs)]
    settle()
    start = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok.backend_tokenizer.encode_batch(texts[i:i + 1000], add_special_tokens=False)
    return len(texts) / (time.perf_counter() - start)


def datasets_map(pairs, workdir: Path, batched: bool) -> float:
    """Rows/s of the usual script: load JSONL, map(apply_chat_template + tokenize), save Parquet."""
    import datasets

    datasets.disable_progress_bars()
    path = workdir / "messages.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(pairs)))
    tok = tokenizer()
    settle()
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(path), split="train",
                                    cache_dir=str(workdir / f"hf-{batched}"))
    if batched:
        dataset = dataset.map(lambda b: tok([tok.apply_chat_template(m, tokenize=False) for m in b["messages"]],
                                            add_special_tokens=False), batched=True, remove_columns=["messages"])
    else:
        dataset = dataset.map(lambda row: tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True),
                              remove_columns=["messages"])
    dataset.to_parquet(str(workdir / f"baseline-{batched}.parquet"))
    return len(pairs) / (time.perf_counter() - start)


class TreeMemory:
    """Peak memory of a process and its children while it runs: summed PSS, and the parent's own RSS."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak_pss, self.peak_main_rss = psutil.Process(pid), 0, 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE:
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak_pss = max(self.peak_pss, sum(p.memory_full_info().pss for p in procs))
                self.peak_main_rss = max(self.peak_main_rss, self.root.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.25)

    def join(self) -> tuple[float, float]:
        self._thread.join()
        return self.peak_pss / 2**20, self.peak_main_rss / 2**20


def generated_plan(rows: int, workdir: Path, name: str) -> Path:
    """A forge.yaml (in workdir/name) over the generated dataset of `rows` rows (made once per workdir)."""
    data = workdir / f"data-{rows}"
    if not data.exists():
        write(make_pairs(rows), data)
    plan = workdir / name
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_plan.py")), str(data), str(plan)], check=True)
    return plan / "forge.yaml"


def runner_prepare(config: Path) -> list[str]:
    """The runner's own prepare, outside a container."""
    return [sys.executable, "-m", "forge.runner", "prepare", "--config", str(config)]


def forge_prepare(rows: int, workdir: Path, memory: bool = False) -> tuple[float, float, float, dict]:
    """Rows/s of the runner's prepare on a fresh dataset of `rows` rows and, with `memory`, its peak tree PSS
    and peak main RSS (MiB). Sampling PSS walks every process's page tables (and holds their memory maps'
    lock) four times a second, which can slow the run it measures: throughput comes from an unsampled run."""
    config = generated_plan(rows, workdir, f"plan-{rows}-{memory}")
    settle()
    start = time.perf_counter()
    child = subprocess.Popen(runner_prepare(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeMemory(child.pid) if memory else None
    out, err = child.communicate()
    seconds = time.perf_counter() - start
    pss, main_rss = sampler.join() if sampler else (0.0, 0.0)
    if child.returncode:
        sys.exit(f"forge prepare failed:\n{err[-3000:]}\n{out[-3000:]}")
    result = [json.loads(line) for line in out.splitlines() if '"kind":"result"' in line][-1]
    return rows / seconds, pss, main_rss, result["info"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rss", type=int, default=0, help="also run forge at this size and compare peak memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        workdir = Path(tmp)
        pairs = make_pairs(args.rows)
        limit = raw_tokenizers(pairs)
        plain = datasets_map(pairs, workdir, batched=False)
        batched = datasets_map(pairs, workdir, batched=True)
        forge, _, _, info = forge_prepare(args.rows, workdir)
        print(f"rows: {args.rows:,}  cpus: {len(os.sched_getaffinity(0))}  forge accounting: {json.dumps(info)}")
        print(f"raw tokenizers batch encoding          : {limit:10,.0f} rows/s")
        print(f"datasets.map, plain (TRL's way)        : {plain:10,.0f} rows/s")
        print(f"datasets.map, batched tokenizing       : {batched:10,.0f} rows/s")
        print(f"forge prepare (all steps)              : {forge:10,.0f} rows/s")
        print(f"ratio forge / raw tokenizers           : {forge / limit:.2f}   (target >= 0.5)")
        print(f"ratio forge / datasets.map, plain      : {forge / plain:.2f}   (target >= 2)")
        print(f"ratio forge / datasets.map, batched    : {forge / batched:.2f}")
        if args.rss:
            peaks = {}
            for rows in (args.rows, args.rss):
                speed, pss, main_rss, _ = forge_prepare(rows, workdir, memory=True)
                peaks[rows] = pss, main_rss
                print(f"forge prepare at {rows:,} rows, memory sampled: {speed:,.0f} rows/s   peak PSS {pss:,.0f} MiB "
                      f"(main RSS {main_rss:,.0f} MiB)")
            (small_pss, small_rss), (big_pss, big_rss) = peaks[args.rows], peaks[args.rss]
            print(f"ratio peak PSS {args.rss:,} / {args.rows:,} rows: {big_pss / small_pss:.2f}   (target <= 1.3); "
                  f"main RSS: {big_rss / small_rss:.2f}")

if __name__ == "__main__":
    main()
