"""The labeller's speed against its own baseline, in one run: `Encoder.encode_batch` (render, locate the
assistant spans, tokenize, label) as it is now ÷ as it was at a baseline commit (before assistant spans were
located by construction), on the same conversations and the same SmolLM2 tokenizer.

    python bench/label_bench.py                          # 3k conversations, baseline f3a1e8b
    python bench/label_bench.py --rows 50000 --baseline <commit>

Ratios printed per template and conversation kind, and their geometric mean (target >= 0.9: no slower than
before, within noise):
- new ÷ baseline rows/s, both labelling all assistant turns (the default label mode)
- new ÷ raw `tokenizers` batch encoding of the pre-rendered texts (how close labelling is to tokenizing alone)
Speeds are rows per CPU-second of this process (a busy neighbour then slows neither side's figure), each the
median of --repeats passes, new and baseline interleaved pass by pass; a ratio is the median of the passes'
own ratios (each new pass against the baseline pass beside it). The baseline's tokenize.py is read with
`git show`, never checked out.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import make_pairs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("FORGE_MODEL_CACHE", Path.home() / ".cache" / "forge" / "models")) / "smollm2-135m-instruct"
BASELINE = "f3a1e8b"  # the last commit whose labeller searched the rendered text for each turn's content
TEMPLATES = ("model", "chatml", "llama-3")  # the baseline fails whole batches on phi-3, so it has no figure there


def baseline_module(commit: str):
    """The baseline's runner/prepare/tokenize.py as a module of its own (the current one stays loaded)."""
    source = subprocess.run(["git", "show", f"{commit}:runner/prepare/tokenize.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="forge-label-bench-")) / "baseline_tokenize.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_tokenize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conversations(rows: int, turns: int) -> list[list[dict[str, str]]]:
    """The prepare benchmarks' generated pairs, cleaned as prepare cleans them, `turns` pairs a conversation."""
    pairs = [(prompt.strip(), answer.strip()) for prompt, answer in make_pairs(rows * turns)]
    return [[message for prompt, answer in pairs[i:i + turns]
             for message in ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})]
            for i in range(0, len(pairs), turns)]


def rows_per_s(encode, batches) -> float:
    """Rows per second of this process's CPU time (all its threads): on a shared machine, wall time also
    counts the time neighbours held the CPUs."""
    start = time.process_time()
    for batch in batches:
        encode(batch)
    return sum(map(len, batches)) / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000)
    parser.add_argument("--batch", type=int, default=512, help="rows per encode_batch call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", default=BASELINE)
    args = parser.parse_args()

    from forge.runner.prepare.tokenize import Encoder, load_tokenizer

    old = baseline_module(args.baseline)
    print(f"rows: {args.rows:,}  batch: {args.batch}  repeats: {args.repeats}  baseline: {args.baseline}  "
          f"cpus: {len(os.sched_getaffinity(0))}  load: {os.getloadavg()[0]:.1f}")
    print(f"{'template':9} {'turns':>5} {'new rows/s':>11} {'baseline':>10} {'raw tok':>10} "
          f"{'new/baseline':>13} {'new/raw':>8}")
    ratios = []
    for turns in (1, 3):
        data = conversations(args.rows, turns)
        batches = [data[i:i + args.batch] for i in range(0, len(data), args.batch)]
        for name in TEMPLATES:
            tokenizer = load_tokenizer(MODEL, name)
            new, before = Encoder(tokenizer), old.Encoder(tokenizer)
            texts = [[tokenizer.render(messages) for messages in batch] for batch in batches]
            for encoder in (new, before):  # warm: compiled templates, cached shapes and turn ends
                encoder.encode_batch(batches[0])
            results = {"new": [], "baseline": [], "raw": []}
            for _ in range(args.repeats):
                results["new"].append(rows_per_s(new.encode_batch, batches))
                results["baseline"].append(rows_per_s(before.encode_batch, batches))
                results["raw"].append(rows_per_s(tokenizer.encode_ids, texts))
            speed = {key: statistics.median(values) for key, values in results.items()}
            # each pass's own ratio: the new pass and the baseline pass beside it ran under the same load
            ratio = statistics.median(a / b for a, b in zip(results["new"], results["baseline"]))
            ratios.append(ratio)
            print(f"{name:9} {turns:>5} {speed['new']:>11,.0f} {speed['baseline']:>10,.0f} {speed['raw']:>10,.0f} "
                  f"{ratio:>13.2f} {statistics.median(a / b for a, b in zip(results['new'], results['raw'])):>8.2f}")
    print(f"new / baseline, geometric mean over the rows above: {statistics.geometric_mean(ratios):.2f}   "
          f"(target >= 0.9)")


if __name__ == "__main__":
    main()
