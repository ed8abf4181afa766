"""Prepared rows as model inputs: padded batches (training and evaluation) and fixed-size chunks (evaluation)."""

from __future__ import annotations

IGNORE = -100


def micro_batches(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[start:start + size] for start in range(0, len(rows), size)]


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
