"""Counts that add up: every input row is kept, rejected, a duplicate, or dropped by policy.

A `ShardStats` is built per shard and saved with it; the run's stats are their sum, so a resumed
run reports exactly what an uninterrupted one does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

SCALARS = ("rows_in", "kept", "examples", "sequences", "normalized", "checked")
COUNTERS = ("rejected", "duplicates", "dropped", "length", "pii", "compliance", "tags", "splits", "split_tokens", "strata")


@dataclass
class ShardStats:
    rows_in: int = 0
    kept: int = 0
    examples: int = 0
    sequences: int = 0
    normalized: int = 0
    checked: int = 0  # rows that reached the compliance checks
    rejected: Counter = field(default_factory=Counter)    # reason → rows
    duplicates: Counter = field(default_factory=Counter)  # exact/near → rows
    dropped: Counter = field(default_factory=Counter)     # policy reason → rows
    length: Counter = field(default_factory=Counter)      # truncated/split/dropped → rows
    pii: Counter = field(default_factory=Counter)         # entity → hits
    compliance: Counter = field(default_factory=Counter)  # category:severity → findings
    tags: Counter = field(default_factory=Counter)        # key=value → kept rows
    splits: Counter = field(default_factory=Counter)      # split → examples
    split_tokens: Counter = field(default_factory=Counter)
    strata: Counter = field(default_factory=Counter)      # stratum/split → examples
    lengths: list[int] = field(default_factory=list)      # histogram: index = tokens per example

    def add_length(self, tokens: int) -> None:
        if tokens >= len(self.lengths):
            self.lengths.extend([0] * (tokens + 1 - len(self.lengths)))
        self.lengths[tokens] += 1

    def merge(self, other: ShardStats) -> None:
        for name in SCALARS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in COUNTERS:
            getattr(self, name).update(getattr(other, name))
        for tokens, count in enumerate(other.lengths):
            if count:
                if tokens >= len(self.lengths):
                    self.lengths.extend([0] * (tokens + 1 - len(self.lengths)))
                self.lengths[tokens] += count

    def accounted(self) -> int:
        return self.kept + sum(self.rejected.values()) + sum(self.duplicates.values()) + sum(self.dropped.values())

    def to_json(self) -> dict:
        return {
            **{name: getattr(self, name) for name in SCALARS}, **{name: dict(sorted(getattr(self, name).items())) for name in COUNTERS},
            "lengths": self.lengths,
        }

    @classmethod
    def from_json(cls, data: dict) -> ShardStats:
        stats = cls(**{k: data[k] for k in SCALARS})
        for name in COUNTERS:
            getattr(stats, name).update(data[name])
        stats.lengths = list(data["lengths"])
        return stats


def percentiles(histogram: list[int], points=(50, 90, 95, 99)) -> dict[str, int]:
    total = sum(histogram)
    out: dict[str, int] = {}
    if not total:
        return out
    running, targets = 0, [(p, total * p / 100) for p in points]
    for tokens, count in enumerate(histogram):
        running += count
        while targets and running >= targets[0][1]:
            out[f"p{targets.pop(0)[0]}"] = tokens
    out["max"] = max(t for t, c in enumerate(histogram) if c)
    out["mean"] = round(sum(t * c for t, c in enumerate(histogram)) / total, 1)
    return out


def report(stats: ShardStats, bins: int = 10) -> dict:
    """The stats report: accounting, removals per reason, lengths, tags, splits."""
    histogram = stats.lengths
    width = max(1, -(-len(histogram) // bins))
    buckets = {f"{i}-{min(i + width, len(histogram)) - 1}": sum(histogram[i:i + width]) for i in range(0, len(histogram), width)}
    data = stats.to_json()
    del data["lengths"]
    data["accounting"] = {
        "rows_in": stats.rows_in, "kept": stats.kept, "rejected": sum(stats.rejected.values()),
        "duplicates": sum(stats.duplicates.values()), "dropped_by_policy": sum(stats.dropped.values()),
        "balanced": stats.accounted() == stats.rows_in,
    }
    data["token_lengths"] = {"percentiles": percentiles(histogram), "histogram": buckets}
    return data


def summary_text(data: dict) -> str:
    acc = data["accounting"]
    lines = [
        f"rows in {acc['rows_in']:,} = kept {acc['kept']:,} + rejected {acc['rejected']:,} + duplicates "
        f"{acc['duplicates']:,} + dropped by policy {acc['dropped_by_policy']:,}",
        f"examples {data['examples']:,} in {data['sequences']:,} sequences; splits: "
        + ", ".join(f"{k} {v:,}" for k, v in data["splits"].items()),
        "token lengths: " + ", ".join(f"{k} {v}" for k, v in data["token_lengths"]["percentiles"].items()),
    ]
    for title, key in (("rejected", "rejected"), ("duplicates", "duplicates"), ("dropped", "dropped"),
                       ("length policy", "length"), ("PII hits", "pii"), ("compliance findings", "compliance")):
        if data[key]:
            lines.append(f"{title}: " + ", ".join(f"{k} {v:,}" for k, v in data[key].items()))
    if data["tags"]:
        lines.append("tags: " + ", ".join(f"{k} {v:,}" for k, v in list(data["tags"].items())[:12]))
    return "\n".join(lines)
