"""Best-fit-decreasing packing of examples into sequences of at most max_length tokens.

Position ids restart at 0 for each example, and `seq_lengths` records the boundaries, so attention
implementations that support packed batches (flash-attention varlen, TRL's padding-free collator)
keep examples from attending to each other.
"""

from __future__ import annotations

import bisect

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
    ids, labels, positions, lengths, row_ids = [], [], [], [], []
    for row_id, example in members:
        ids += example.input_ids
        labels += example.labels
        positions += list(range(len(example.input_ids)))
        lengths.append(len(example.input_ids))
        row_ids.append(row_id)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "seq_lengths": lengths, "ids": row_ids}
