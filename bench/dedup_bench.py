"""Benchmark `Deduplicator.check_batch`: throughput, recall/precision on planted duplicates, peak RSS.

Rows are ~100 words drawn from a Zipf-weighted synthetic vocabulary; 10% are exact duplicates of an
earlier original (with case and spacing changed) and 5% near duplicates (1-3 words replaced, at
random places: true Jaccard 0.73-0.9 with 5-word shingles, so recall is also shown by it). Each
row's text is a pure function of its index, so rows are generated on the fly and the benchmark's own
memory does not grow with --rows: what grows is only what the deduplicator keeps.

    python bench/dedup_bench.py --rows 50000          # one run
    python bench/dedup_bench.py --ratio 20000 100000  # two fresh processes, peak RSS ratio (big / small)
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import accumulate
from pathlib import Path

from forge.contract.plan import DedupSpec
from forge.runner.prepare.dedup import Deduplicator, normalise_for_dedup

_VOCAB_SIZE = 50_000
_rng = random.Random(1234)
_VOCAB = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(2, 10)))
          for _ in range(_VOCAB_SIZE)]
_CUM = list(accumulate(1.0 / (rank + 1) for rank in range(_VOCAB_SIZE)))


def kind(i: int) -> str:
    """'original', 'exact' or 'near': 85 / 10 / 5 %, the first 100 rows always original."""
    if i < 100:
        return "original"
    u = random.Random(i * 7919 + 17).random()
    return "exact" if u < 0.10 else "near" if u < 0.15 else "original"


def source(i: int) -> int:
    """The earlier original that duplicate row i copies."""
    rng = random.Random(i * 104729 + 3)
    while True:
        j = rng.randrange(i)
        if kind(j) == "original":
            return j


def original_text(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choices(_VOCAB, cum_weights=_CUM, k=rng.randint(90, 110)))


def row(i: int) -> tuple[str, str, int | None]:
    """(row id, text, index of the planted original or None)."""
    k = kind(i)
    if k == "original":
        return f"r{i}", original_text(i), None
    j = source(i)
    words = original_text(j).split()
    rng = random.Random(i)
    if k == "exact":
        text = "  ".join(w.upper() if rng.random() < 0.1 else w for w in words) + " \n"
    else:
        for _ in range(rng.randint(1, 3)):
            words[rng.randrange(len(words))] = rng.choice(_VOCAB) + "0"  # a digit: never a word of the text
        text = " ".join(words)
    return f"r{i}", text, j


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def true_jaccard(a: str, b: str, n: int) -> float:
    def shingles(text: str) -> set:
        ws = normalise_for_dedup(text).split()
        return {tuple(ws[i : i + n]) for i in range(max(len(ws) - n + 1, 1))}
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def run(rows: int, batch: int, shard_rows: int, spec: DedupSpec, db_path: Path, journal: str) -> dict:
    db = sqlite3.connect(db_path, isolation_level="DEFERRED")
    db.execute(f"PRAGMA journal_mode = {journal}")
    dedup = Deduplicator(db, spec)
    db.commit()
    rss_start = peak_rss_mib()
    counts: Counter = Counter()
    near_buckets: dict[str, list[int]] = {}  # true Jaccard bucket -> [found, planted]
    examples: list[str] = []
    elapsed = shard_time = cpu = 0.0
    shard_count = 0
    shard_rates = []
    for start in range(0, rows, batch):
        chunk = [row(i) for i in range(start, min(start + batch, rows))]
        t0, c0 = time.perf_counter(), time.process_time()
        verdicts = dedup.check_batch([(rid, text) for rid, text, _ in chunk])
        if (start + batch) % shard_rows == 0 or start + batch >= rows:
            db.commit()  # as the pipeline does at the end of each shard
        dt = time.perf_counter() - t0
        cpu += time.process_time() - c0
        elapsed += dt
        shard_time += dt
        shard_count += len(chunk)
        if shard_count >= shard_rows or start + batch >= rows:
            shard_rates.append(shard_count / shard_time)
            shard_time, shard_count = 0.0, 0
        for (rid, text, planted), (verdict, first) in zip(chunk, verdicts):
            found = verdict != "unique"
            planted_kind = kind(int(rid[1:]))
            counts[f"{planted_kind}:{verdict}"] += 1
            if found and planted is not None and first != f"r{planted}" and len(examples) < 5:
                examples.append(f"{rid} ({planted_kind} of r{planted}) -> {verdict} of {first}")
            if planted_kind == "near":
                j = true_jaccard(text, original_text(planted), spec.shingle_words)
                bucket = f"J<{spec.threshold}" if j < spec.threshold else f"J>={spec.threshold + 0.05:.2f}" \
                    if j >= spec.threshold + 0.05 else f"J in [{spec.threshold}, {spec.threshold + 0.05:.2f})"
                near_buckets.setdefault(bucket, [0, 0])
                near_buckets[bucket][0] += found
                near_buckets[bucket][1] += 1
    db.close()
    planted_exact, planted_near = counts["exact:exact"] + counts["exact:near"] + counts["exact:unique"], \
        counts["near:exact"] + counts["near:near"] + counts["near:unique"]
    found_planted = sum(counts[f"{k}:{v}"] for k in ("exact", "near") for v in ("exact", "near"))
    false_found = counts["original:exact"] + counts["original:near"]

    def ratio(a: int, b: int) -> float:
        return round(a / b, 4) if b else 1.0

    return {
        "rows": rows,
        "rows_per_s": round(rows / elapsed),
        "rows_per_s_first_shard": round(shard_rates[0]),
        "rows_per_s_last_shard": round(shard_rates[-1]),
        "rows_per_cpu_s": round(rows / cpu),  # less sensitive than wall time to other load on the machine
        "seconds_in_check_batch": round(elapsed, 2),
        "planted_exact": planted_exact,
        "planted_near": planted_near,
        "recall": ratio(found_planted, planted_exact + planted_near),
        "recall_exact": ratio(counts["exact:exact"], planted_exact),
        "recall_near": ratio(counts["near:near"] + counts["near:exact"], planted_near),
        "recall_near_by_true_jaccard": {k: f"{ratio(f, n)} of {n}" for k, (f, n) in sorted(near_buckets.items())},
        "precision": ratio(found_planted, found_planted + false_found),
        "duplicate_of_mismatches": examples,
        "peak_rss_mib_before": round(rss_start, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "db_mib": round(db_path.stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1_000, help="rows per check_batch call")
    parser.add_argument("--shard-rows", type=int, default=20_000, help="rows per commit, as the pipeline's shards")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--no-exact", action="store_true")
    parser.add_argument("--no-near", action="store_true")
    parser.add_argument("--journal", default="delete", choices=["delete", "wal"],
                        help="journal mode (the pipeline's state.sqlite uses SQLite's default, delete)")
    parser.add_argument("--db", type=Path, help="state database (default: a temporary file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--ratio", type=int, nargs=2, metavar=("SMALL", "BIG"),
                        help="run --rows SMALL and --rows BIG in fresh processes and print the peak RSS ratio")
    args = parser.parse_args()
    if args.ratio and args.db:
        parser.error("--ratio runs two fresh databases: leave out --db")

    if args.ratio:
        at = sys.argv.index("--ratio")
        passed = sys.argv[1:at] + sys.argv[at + 3 :]
        results = []
        for n in args.ratio:
            out = subprocess.run([sys.executable, __file__, *passed, "--rows", str(n), "--json"],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out))
            print(json.dumps(results[-1]))
        small, big = results
        print(f"peak RSS {big['rows']} rows / {small['rows']} rows = {big['peak_rss_mib']:.1f} / "
              f"{small['peak_rss_mib']:.1f} MiB = {big['peak_rss_mib'] / small['peak_rss_mib']:.3f} "
              f"(before the first check: {small['peak_rss_mib_before']:.1f} / {big['peak_rss_mib_before']:.1f} MiB)")
        return

    spec = DedupSpec(exact=not args.no_exact, near=not args.no_near, threshold=args.threshold,
                     num_perm=args.num_perm)
    with tempfile.TemporaryDirectory() as tmp:
        db_path = args.db or Path(tmp) / "dedup.sqlite"
        result = run(args.rows, args.batch, args.shard_rows, spec, db_path, args.journal)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
