"""forge prepare against its baselines, measured side by side in one run, on the generated dataset.

    python bench/prepare_bench.py --rows 100000            # throughput ratios
    python bench/prepare_bench.py --rows 100000 --rss 1000000   # plus peak RSS at 1M ÷ at 100k rows

Ratios printed:
- forge prepare ÷ raw `tokenizers` batch encoding of the same rendered texts (the physical limit; target ≥ 0.5)
- forge prepare ÷ a plain `datasets.map(apply_chat_template + tokenize)` script with no cleaning,
  dedup or PII (target ≥ 2)
- peak RSS of forge prepare at the --rss size ÷ at --rows (target ≤ 1.3)
Forge runs in a subprocess here (the runner's own code, outside the container) so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import make_pairs, write  # noqa: E402

MODEL_CACHE = Path(os.environ.get("FORGE_MODEL_CACHE", Path.home() / ".cache" / "forge" / "models"))


def conversations(pairs):
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in pairs]


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_CACHE / "smollm2-135m-instruct")


def raw_tokenizers(pairs) -> float:
    """Rows/s of the Rust tokenizer alone on pre-rendered texts."""
    tok = tokenizer()
    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations(pairs)]
    start = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok.backend_tokenizer.encode_batch(texts[i:i + 1000], add_special_tokens=False)
    return len(texts) / (time.perf_counter() - start)


def datasets_map(pairs, workdir: Path) -> float:
    """Rows/s of the usual script: load JSONL, map(apply_chat_template + tokenize), save Parquet."""
    import datasets

    datasets.disable_progress_bars()
    path = workdir / "messages.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(pairs)))
    tok = tokenizer()
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(workdir / "hf"))
    dataset = dataset.map(lambda b: tok([tok.apply_chat_template(m, tokenize=False) for m in b["messages"]],
                                        add_special_tokens=False), batched=True, remove_columns=["messages"])
    dataset.to_parquet(str(workdir / "baseline.parquet"))
    return len(pairs) / (time.perf_counter() - start)


def forge_prepare(rows: int, workdir: Path) -> tuple[float, float, dict]:
    """Rows/s and peak RSS (MiB) of the runner's prepare on a fresh dataset of `rows` rows."""
    data = workdir / f"data-{rows}"
    write(make_pairs(rows), data)
    plan = workdir / f"plan-{rows}"
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_plan.py")), str(data), str(plan)], check=True)
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", "forge.runner", "prepare", "--config", str(plan / "forge.yaml")],
                           capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"forge prepare failed:\n{child.stderr[-3000:]}\n{child.stdout[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = [json.loads(l) for l in child.stdout.splitlines() if '"kind":"result"' in l][-1]
    return rows / seconds, peak, result["info"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rss", type=int, default=0, help="also run forge at this size and compare peak RSS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        workdir = Path(tmp)
        pairs = make_pairs(args.rows)
        limit = raw_tokenizers(pairs)
        baseline = datasets_map(pairs, workdir)
        forge, peak, info = forge_prepare(args.rows, workdir)
        print(f"rows: {args.rows:,}  forge accounting: {json.dumps(info)}")
        print(f"raw tokenizers batch encoding : {limit:10,.0f} rows/s")
        print(f"datasets.map template+tokenize: {baseline:10,.0f} rows/s")
        print(f"forge prepare (all steps)     : {forge:10,.0f} rows/s   peak RSS {peak:,.0f} MiB")
        print(f"ratio forge / raw tokenizers  : {forge / limit:.2f}   (target >= 0.5)")
        print(f"ratio forge / datasets.map    : {forge / baseline:.2f}   (target >= 2)")
        if args.rss:
            big, big_peak, _ = forge_prepare(args.rss, workdir)
            print(f"forge prepare at {args.rss:,} rows: {big:,.0f} rows/s   peak RSS {big_peak:,.0f} MiB")
            print(f"ratio peak RSS {args.rss:,} / {args.rows:,} rows: {big_peak / peak:.2f}   (target <= 1.3)")


if __name__ == "__main__":
    main()
