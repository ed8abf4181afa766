"""Best-fit-decreasing packing of examples into sequences of at most max_length tokens.

Position ids restart at 0 for each example, and `seq_lengths` records the boundaries, so attention
implementations that support packed batches (flash-attention varlen, TRL's padding-free collator)
keep examples from attending to each other.
"""

from __future__ import annotations

import bisect

import numpy as np

from forge.runner.prepare.tokenize import Encoded


def pack(examples: list[tuple[str, Encoded]], max_length: int) -> list[dict]:
    """Deterministic: longest first (ties by input order), each into the fullest bin it fits."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][1].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for index in order:
        size = len(examples[index][1].input_ids)
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, chosen = free.pop(slot)
        else:
            space, chosen = max_length, len(bins)
            bins.append([])
        bins[chosen].append(index)
        bisect.insort(free, (space - size, chosen))
    return [_sequence([examples[i] for i in members]) for members in bins]


def _sequence(members: list[tuple[str, Encoded]]) -> dict:
    lengths = [len(example.input_ids) for _, example in members]
    return {"input_ids": np.concatenate([example.input_ids for _, example in members]),
            "labels": np.concatenate([example.labels for _, example in members]),
            "position_ids": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
            "seq_lengths": np.asarray(lengths, dtype=np.int32), "ids": [row_id for row_id, _ in members]}
