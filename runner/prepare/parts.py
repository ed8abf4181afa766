"""Finished rows as what prepare writes, built where the rows were finished (a worker), so the runner takes
a few objects per chunk instead of one per row, and a shard is their concatenation.

A `Part` is one chunk's rows tallied (`ShardStats`), their examples per split as columns (one flat token
array, not an array per example) and the lines of the removal, audit and compliance files. `account` is
the one place that counts: the accounting identity holds by construction.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from forge.errors import DataError
from forge.runner.prepare.compliance import SEVERITIES
from forge.runner.prepare.stats import ShardStats
from forge.runner.prepare.steps import Row, audit_line, line_json

SPLITS = ("train", "val", "test")
REMOVAL_FILES = {"rejected": "rejects", "duplicates": "duplicates", "dropped": "dropped"}
LINE_FILES = (*REMOVAL_FILES.values(), "audit", "compliance")
_tags_json = json.JSONEncoder(sort_keys=True).encode


@dataclass
class Columns:
    """A split's examples in input order: per example its id, source line, tags and length; the tokens of all
    of them in `input_ids`/`labels` (a list of flat int32 arrays, one per part, joined when written)."""

    ids: list[str] = field(default_factory=list)  # row id, or row id#n for a row split into several (see row_ids)
    sources: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)  # JSON
    lengths: list[int] = field(default_factory=list)
    input_ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def add(self, row: Row) -> None:
        tags, of = _tags_json(row.tags), len(row.examples)
        for n, example in enumerate(row.examples):
            self.ids.append(row.id if of == 1 else f"{row.id}#{n}")
            self.sources.append(row.source)
            self.lines.append(row.line)
            self.tags.append(tags)
            self.lengths.append(len(example.input_ids))
            self.input_ids.append(example.input_ids)
            self.labels.append(example.labels)

    def seal(self) -> Columns:
        """The tokens joined into one array each: what crosses a pipe cheaply."""
        self.input_ids, self.labels = [join_tokens(self.input_ids)], [join_tokens(self.labels)]
        return self

    def extend(self, other: Columns) -> None:
        for column in fields(self):
            getattr(self, column.name).extend(getattr(other, column.name))

    def row_ids(self) -> list[str]:
        """Each example's row id (row ids, `file-hash:line`, hold no '#')."""
        return [example_id.partition("#")[0] for example_id in self.ids]

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        return join_tokens(self.input_ids), join_tokens(self.labels)


def join_tokens(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, dtype=np.int32)


class Part:
    """Consecutive finished rows of one shard, counted and laid out as their output files want them."""

    def __init__(self) -> None:
        self.stats = ShardStats()
        self.failure: tuple[str, str] | None = None  # (error, hint) of the first row a compliance check failed
        self.examples = {split: Columns() for split in SPLITS}
        self.lines: dict[str, list[str]] = {name: [] for name in LINE_FILES}

    @classmethod
    def of(cls, rows: list[Row]) -> Part:
        part = cls()
        for row in rows:
            part.account(row)
        for columns in part.examples.values():
            columns.seal()
        return part

    def account(self, row: Row) -> None:
        """Count one finished row, in input order, and lay out what it writes. A compliance `fail` is
        recorded at the first such row; the runner fails the run there, in input order."""
        stats = self.stats
        stats.rows_in += 1
        stats.normalized += row.normalized
        stats.checked += row.checked
        self.lines["audit"].append(audit_line(row))
        for entity in row.pii:
            stats.pii[entity] += 1
        for finding in row.findings:
            stats.compliance[f"{finding.category}:{finding.severity}"] += 1
        if row.findings:
            self.lines["compliance"].append(json.dumps(
                {"id": row.id, "source": row.source, "line": row.line, "action": row.action,
                 "findings": [asdict(f) for f in row.findings]}, sort_keys=True))
        if row.action == "fail":  # counted nowhere: the run fails at the first such row
            if self.failure is None:
                worst = max(row.findings, key=lambda f: SEVERITIES.index(f.severity))
                self.failure = (
                    f"Compliance check {worst.check} failed the run at row {row.id} ({row.source}:{row.line}): "
                    f"{worst.category}, severity {worst.severity}.",
                    "Fix or remove the row, or change prepare.compliance.on to flag or drop this severity.",
                )
            return
        if row.length:
            stats.length[row.length] += 1
        if row.removal:
            getattr(stats, row.removal.kind)[row.removal.reason] += 1
            self.lines[REMOVAL_FILES[row.removal.kind]].append(line_json(_removal_record(row)))
            return
        stats.kept += 1
        for key, value in row.tags.items():
            stats.tags[f"{key}={value}"] += 1
        for example in row.examples:
            tokens = len(example.input_ids)
            stats.examples += 1
            stats.splits[row.split] += 1
            stats.split_tokens[row.split] += tokens
            stats.add_length(tokens)
            if row.stratum:
                stats.strata[f"{row.stratum}/{row.split}"] += 1
        self.examples[row.split].add(row)


class Shard(Part):
    """A shard's parts, joined in input order as they come back from the workers."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def add(self, part: Part) -> None:
        if part.failure:
            raise DataError(*part.failure)
        self.stats.merge(part.stats)
        for split, columns in part.examples.items():
            self.examples[split].extend(columns)
        for name, lines in part.lines.items():
            self.lines[name].extend(lines)


def _removal_record(row: Row) -> dict:
    removal = row.removal
    record = {"id": row.id, "file": row.source, "line": row.line, "reason": removal.reason}
    if removal.detail:
        record["detail"] = removal.detail
    if removal.duplicate_of:
        record["duplicate_of"] = removal.duplicate_of
    return record
