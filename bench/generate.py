"""A synthetic mixed-format dataset for the prepare benchmarks, with planted duplicates and PII.

Rows are written across five files in four formats (Alpaca JSONL, ShareGPT JSON array... as JSONL.gz,
OpenAI messages JSONL.zst, prompt/completion CSV and Parquet). About 10% of rows are exact duplicates
(some with case/whitespace changes), 5% near duplicates (a few words changed), 2% carry PII.

    python bench/generate.py --rows 100000 --out /tmp/forge-bench/data
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
from pathlib import Path

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "model data train learn token batch memory layer weight gradient loss value signal river mountain garden").split()
PII = ["Contact me at jane.doe{n}@example.com for details.", "Call +1 415 555 {n:04d} after five.",
       "My card is 4111 1111 1111 1111, expiry 12/29.", "The server is at 10.0.{a}.{b} behind the VPN.",
       "Use key AKIAIOSFODNN7EXAMPL{c} for the bucket."]
FILES = ("alpaca.jsonl", "sharegpt.jsonl.gz", "messages.jsonl.zst", "prompt_completion.csv", "prompt_completion.parquet")
PLAIN_FILES = ("alpaca.jsonl", "sharegpt.jsonl", "messages.jsonl", "prompt_completion.csv", "prompt_completion.jsonl")


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def make_pairs(rows: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    for n in range(rows):
        roll = rng.random()
        if pairs and roll < 0.10:
            prompt, answer = rng.choice(pairs)
            if rng.random() < 0.3:
                prompt = "  " + prompt.upper() + " "
        elif pairs and roll < 0.15:
            prompt, answer = rng.choice(pairs)
            words = answer.split()
            for _ in range(2):
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            answer = " ".join(words)
        else:
            prompt = " ".join(sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(1, 2)))
            answer = " ".join(sentence(rng, rng.randint(8, 18)) for _ in range(rng.randint(3, 6)))
            if rng.random() < 0.02:
                answer += " " + rng.choice(PII).format(n=n % 10000, a=n % 250, b=(n * 7) % 250, c=n % 10)
        pairs.append((prompt, answer))
    return pairs


def write(pairs: list[tuple[str, str]], out: Path, compressed: bool = True) -> list[Path]:
    """The five files; `compressed=False` writes text only (every part JSONL or CSV), so the size on disk is the
    size of the data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    out.mkdir(parents=True, exist_ok=True)
    parts = [pairs[i::len(FILES)] for i in range(len(FILES))]
    paths = [out / name for name in (FILES if compressed else PLAIN_FILES)]
    with paths[0].open("w") as f:
        f.writelines(json.dumps({"instruction": p, "output": a, "tags": {"source": "human"}}) + "\n" for p, a in parts[0])
    if not compressed:
        chats = [[{"from": "human", "value": p}, {"from": "gpt", "value": a}] for p, a in parts[1]]
        paths[1].write_text("".join(json.dumps({"conversations": c, "tags": {"source": "synthetic"}}) + "\n" for c in chats))
        paths[2].write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant",
                                                                                          "content": a}]}) + "\n"
                                    for p, a in parts[2]))
        with paths[3].open("w", newline="") as f:
            csv.writer(f).writerows([("prompt", "completion"), *parts[3]])
        paths[4].write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in parts[4]))
        return paths
    with gzip.open(paths[1], "wt") as f:
        f.writelines(json.dumps({"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}],
                                 "tags": {"source": "synthetic"}}) + "\n" for p, a in parts[1])
    text = "".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}) + "\n"
                   for p, a in parts[2])
    paths[2].write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    with paths[3].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        writer.writerows(parts[3])
    pq.write_table(pa.Table.from_pylist([{"prompt": p, "completion": a} for p, a in parts[4]]), paths[4])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write(make_pairs(args.rows, args.seed), args.out):
        print(path)


if __name__ == "__main__":
    main()
