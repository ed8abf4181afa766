"""The per-row steps of prepare, in order: parse → clean → dedup → PII → compliance → template → tokenize
→ split. Each takes the shard's live rows and returns those it keeps; a row it removes is recorded once,
with its reason, in the shard's stats and audit trail, so the accounting identity holds by construction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from forge.contract.plan import PrepareSpec
from forge.errors import DataError
from forge.runner.prepare.clean import clean_messages
from forge.runner.prepare.rows import FORMATS, Invalid, detect_format, to_conversation
from forge.runner.prepare.sources import RawRecord
from forge.runner.prepare.stats import ShardStats
from forge.runner.prepare.tokenize import Encoded, apply_length_policy


@dataclass
class Row:
    id: str
    source: str
    line: int
    input_hash: str
    record: RawRecord
    fmt: str
    base_tags: dict[str, str]
    messages: list[dict[str, str]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    examples: list[Encoded] = field(default_factory=list)
    split: str = "train"
    audit: list[dict] = field(default_factory=list)


@dataclass
class Removal:
    row: Row
    kind: str  # rejected | duplicates | dropped
    reason: str
    detail: str = ""
    duplicate_of: str | None = None


class Shard:
    """Rows of one shard and everything that happened to them."""

    def __init__(self, index: int) -> None:
        self.index, self.stats, self.removed = index, ShardStats(), []
        self.findings: list[tuple[Row, list, str]] = []  # (row, compliance findings, action)

    def remove(self, row: Row, kind: str, reason: str, detail: str = "", duplicate_of: str | None = None) -> None:
        getattr(self.stats, kind)[reason] += 1
        self.removed.append(Removal(row, kind, reason, detail, duplicate_of))
        row.audit.append({"step": kind, "reason": reason, **({"duplicate_of": duplicate_of} if duplicate_of else {})})


def make_row(source: str, file_hash: str, record: RawRecord, fmt: str, tags: dict[str, str]) -> Row:
    return Row(id=f"{file_hash[:8]}:{record.line}", source=source, line=record.line,
               input_hash=hashlib.sha256(record.raw).hexdigest()[:16], record=record, fmt=fmt, base_tags=tags)


def file_format(records: list[RawRecord], declared: str) -> str:
    """The declared format, or the one the file's first recognisable record has."""
    if declared != "auto":
        return declared
    for record in records:
        found = detect_format(record.value)
        if found:
            return found
    return "unknown"


def parse(shard: Shard, rows: list[Row]) -> list[Row]:
    kept = []
    for row in rows:
        try:
            if row.record.problem:
                raise Invalid(*row.record.problem)
            if row.fmt not in FORMATS:
                raise Invalid("unknown_format", "the file has no record in a known format (alpaca, sharegpt, "
                                                "messages, prompt/completion); set the input's format")
            conversation = to_conversation(row.record.value, row.fmt)
            row.messages, row.tags = clean_step(row, conversation.messages), {**row.base_tags, **conversation.tags}
        except Invalid as exc:
            shard.remove(row, "rejected", exc.reason, str(exc))
            continue
        if row.audit:
            shard.stats.normalized += 1
        kept.append(row)
    return kept


def clean_step(row: Row, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    cleaned, changed = clean_messages(messages)
    if changed:
        row.audit.append({"step": "clean", "change": "normalized"})
    return cleaned


def dedup(shard: Shard, rows: list[Row], deduplicator) -> list[Row]:
    if deduplicator is None:
        return rows
    texts = [(row.id, "\n".join(f"{m['role']}: {m['content']}" for m in row.messages)) for row in rows]
    kept = []
    for row, (verdict, first) in zip(rows, deduplicator.check_batch(texts)):
        if verdict == "unique":
            kept.append(row)
        else:
            shard.remove(row, "duplicates", verdict, duplicate_of=first)
    return kept


def scrub_pii(shard: Shard, rows: list[Row], scrubber) -> list[Row]:
    if scrubber is None:
        return rows
    kept = []
    for row in rows:
        drop = False
        for message in row.messages:
            result = scrubber.scrub(message["content"])
            message["content"] = result.text
            drop = drop or result.drop
            for hit in result.hits:
                shard.stats.pii[hit.entity] += 1
                row.audit.append({"step": "pii", "entity": hit.entity, "value_hash": hit.value_hash, "action": hit.action})
        if drop:
            shard.remove(row, "dropped", "pii_policy")
        else:
            kept.append(row)
    return kept


def comply(shard: Shard, rows: list[Row], checks, on: dict) -> list[Row]:
    from forge.runner.prepare.compliance import decide

    shard.stats.checked += len(rows)
    if not checks:
        return rows
    kept = []
    for row in rows:
        findings = [finding for check in checks for finding in check.fn(row.messages, row.tags)]
        action = decide(findings, on) if findings else "keep"
        for finding in findings:
            shard.stats.compliance[f"{finding.category}:{finding.severity}"] += 1
            row.audit.append({"step": "compliance", "check": finding.check, "category": finding.category,
                              "severity": finding.severity})
        if findings:
            shard.findings.append((row, findings, action))
        if action == "fail":
            worst = max(findings, key=lambda f: ("low", "medium", "high").index(f.severity))
            raise DataError(
                f"Compliance check {worst.check} failed the run at row {row.id} ({row.source}:{row.line}): "
                f"{worst.category}, severity {worst.severity}.",
                "Fix or remove the row, or change prepare.compliance.on to flag or drop this severity.",
            )
        if action == "drop":
            shard.remove(row, "dropped", "compliance_policy")
        else:
            kept.append(row)
    return kept


def fit_template(shard: Shard, rows: list[Row], template: str) -> list[Row]:
    from forge.runner.prepare.templates import misfit

    kept = []
    for row in rows:
        reason = misfit(template, row.messages)
        if reason:
            shard.remove(row, "rejected", f"template_{reason}", f"does not fit the {template} template")
        else:
            kept.append(row)
    return kept


def tokenize(shard: Shard, rows: list[Row], encoder, spec: PrepareSpec) -> list[Row]:
    kept = []
    for row, (ids, labels) in zip(rows, encoder.encode_batch([row.messages for row in rows])):
        try:
            row.examples, what = apply_length_policy(ids, labels, spec.max_length, spec.length_policy)
        except Invalid as exc:
            shard.remove(row, "rejected", exc.reason, str(exc))
            continue
        if what == "dropped":
            shard.stats.length["dropped"] += 1
            shard.remove(row, "dropped", "too_long", f"{len(ids)} tokens > {spec.max_length}")
            continue
        if what:
            shard.stats.length[what] += 1
        row.audit.append({"step": "tokenize", "tokens": len(ids), **({"length_policy": what} if what else {})})
        kept.append(row)
    return kept


def assign_split(rows: list[Row], spec: PrepareSpec) -> None:
    """Hash-based per stratum: a row's split depends only on its content, the stratum and the seed."""
    split = spec.split
    for row in rows:
        stratum = _stratum(row, split.stratify_by)
        digest = hashlib.sha256(f"{split.seed}|{stratum}|{row.input_hash}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        row.split = "val" if u < split.val else "test" if u < split.val + split.test else "train"
        row.audit.append({"step": "split", "split": row.split, **({"stratum": stratum} if stratum else {})})


def _stratum(row: Row, stratify_by: str | None) -> str:
    if not stratify_by:
        return ""
    if stratify_by == "length":
        return f"len<{2 ** max(len(e.input_ids) for e in row.examples).bit_length()}"
    return f"{stratify_by[4:]}={row.tags.get(stratify_by[4:], '')}"


def count_kept(shard: Shard, rows: list[Row], spec: PrepareSpec) -> None:
    for row in rows:
        shard.stats.kept += 1
        for key, value in row.tags.items():
            shard.stats.tags[f"{key}={value}"] += 1
        stratum = _stratum(row, spec.split.stratify_by)
        for example in row.examples:
            shard.stats.examples += 1
            shard.stats.splits[row.split] += 1
            shard.stats.split_tokens[row.split] += len(example.input_ids)
            shard.stats.add_length(len(example.input_ids))
            if stratum:
                shard.stats.strata[f"{stratum}/{row.split}"] += 1


def audit_line(row: Row) -> str:
    return json.dumps({"id": row.id, "source": row.source, "line": row.line, "input_hash": row.input_hash,
                       "steps": row.audit}, sort_keys=True, ensure_ascii=False)
