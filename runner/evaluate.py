"""End-of-run evaluation on the validation split: loss and perplexity over every learned token, the same
sliced by each row tag (`source:human`, `source:synthetic`, ...), and the hardest rows with their tags.

Per-row losses come from the logits, so one pass gives the overall figure, every slice and the ranking.
Packed rows hold several examples and no tags of their own: they count in the overall figure only.
"""

from __future__ import annotations

import json
import math

from forge.runner.batches import IGNORE, collate, micro_batches
from forge.runner.emit import stage


def evaluate(model, rows: list[dict], pad_id: int, batch_size: int, hardest: int) -> dict:
    import torch
    import torch.nn.functional as F

    model.eval()
    scored = []  # (row, loss sum, learned tokens)
    chunks = micro_batches(rows, batch_size)
    with stage("evaluate", total=len(chunks), unit="batches") as progress, torch.no_grad():
        for chunk in chunks:
            batch = collate(chunk, pad_id)
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch).logits[:, :-1].float()
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
            learned = labels != IGNORE
            sums, counts = (losses * learned).sum(dim=1).tolist(), learned.sum(dim=1).tolist()
            scored.extend(zip(chunk, sums, counts))
            progress.advance(1)
        report = _summary(scored, hardest)
        progress.summary = {"val_loss": report["val_loss"], "perplexity": report["perplexity"]}
    return report


def _summary(scored: list[tuple[dict, float, int]], hardest: int) -> dict:
    total = _loss(sum(s for _, s, _ in scored), sum(n for _, _, n in scored), len(scored))
    slices: dict[str, list[float]] = {}
    for row, loss_sum, count in scored:
        for key, value in _tags(row).items():
            entry = slices.setdefault(f"{key}:{value}", [0.0, 0, 0])
            entry[0] += loss_sum
            entry[1] += count
            entry[2] += 1
    ranked = sorted((item for item in scored if item[2]), key=lambda item: -item[1] / item[2])[:hardest]
    return {
        "val_loss": total["loss"],
        "perplexity": total["perplexity"],
        "val_rows": len(scored),
        "slices": {name: _loss(*entry) for name, entry in sorted(slices.items())},
        "hardest": [{"id": _id(row), "tags": _tags(row), "loss": loss_sum / count}
                    for row, loss_sum, count in ranked],
    }


def _loss(loss_sum: float, tokens: int, rows: int) -> dict:
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "rows": rows, "tokens": tokens}


def _tags(row: dict) -> dict:
    tags = row.get("tags")
    return json.loads(tags) if isinstance(tags, str) and tags else {}


def _id(row: dict) -> str:
    return row.get("id") or "+".join(row.get("ids") or [])
