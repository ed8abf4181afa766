"""Training data as one endless stream of rows, so a resume needs only a position and any micro-batch size
splits an optimizer step into the same rows.

Row i of the stream is row `order[epoch][i % n]` with `epoch = i // n`, where each epoch's order is a seeded
permutation: a pure function of (rows, seed, i). An optimizer step takes the next `effective` rows, however
many micro-batches that makes; OOM backoff changes the split, never which rows a step learns from.
"""

from __future__ import annotations

import math

IGNORE = -100


class RowStream:
    def __init__(self, rows: list[dict], seed: int, shuffle: bool = True) -> None:
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, position: int, count: int) -> list[dict]:
        return [self._row(index) for index in range(position, position + count)]

    def _row(self, index: int) -> dict:
        import torch

        epoch, offset = divmod(index, len(self.rows))
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(len(self.rows), generator=generator).tolist()
            self._order = (epoch, order)
        return self.rows[self._order[1][offset]]


def steps_per_epoch(rows: int, effective_batch: int) -> int:
    return math.ceil(rows / effective_batch)


def micro_batches(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def learned_tokens(rows: list[dict]) -> int:
    """Tokens that carry a loss: labels other than IGNORE after the one-token shift of causal LM training."""
    return sum(sum(1 for label in row["labels"][1:] if label != IGNORE) for row in rows)


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded tensors. Packed rows carry position_ids, which restart at 0 per example: without an
    attention mask (and without a KV cache) transformers builds a block-causal mask from them, so the
    examples of a packed row do not attend to each other."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)

    def pad(values: list[int], fill: int) -> list[int]:
        return list(values) + [fill] * (width - len(values))

    batch = {
        "input_ids": torch.tensor([pad(row["input_ids"], pad_id) for row in rows]),
        "labels": torch.tensor([pad(row["labels"], IGNORE) for row in rows]),
    }
    if "position_ids" in rows[0]:
        batch["position_ids"] = torch.tensor([pad(row["position_ids"], 0) for row in rows])
        batch["use_cache"] = False
    else:
        batch["attention_mask"] = torch.tensor([pad([1] * len(row["input_ids"]), 0) for row in rows])
    return batch
