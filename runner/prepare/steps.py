"""The per-row steps of prepare, in order: parse → clean → dedup → PII → compliance → template → tokenize
→ split. Each takes live rows and returns those it keeps; a row it removes gets its `removal` (kind, reason)
and leaves the stream. Steps record what happened on the row and count nothing: `Part.account` (parts.py)
derives every count from the rows, in one place, so the accounting identity holds by construction.

Every step but dedup's check is a pure function of its row, which is what lets worker processes run them
(see `work.py`) while that check, the one step that depends on the rows before it, runs in input order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from forge.contract.pii_key import PiiKey
from forge.contract.plan import PrepareSpec
from forge.runner.prepare.clean import clean_messages
from forge.runner.prepare.rows import FORMATS, Invalid, detect_format, to_conversation
from forge.runner.prepare.sources import RawRecord, decode
from forge.runner.prepare.tokenize import Encoded, apply_length_policy


@dataclass(slots=True)
class Removal:
    kind: str  # rejected | duplicates | dropped
    reason: str
    detail: str = ""
    duplicate_of: str | None = None


@dataclass(slots=True)
class Row:
    id: str
    source: str
    line: int
    input_hash: str  # sha256 of the raw record, first 16 hex: decides the split, never written
    input_trace: str  # its keyed trace (PiiKey): what the audit log shows, as a raw row may be guessable
    record: RawRecord | None  # dropped once parsed
    fmt: str
    base_tags: dict[str, str]
    messages: list[dict[str, str]] = field(default_factory=list)  # dropped once tokenized
    tags: dict[str, str] = field(default_factory=dict)
    examples: list[Encoded] = field(default_factory=list)
    split: str = "train"
    audit: list[dict] = field(default_factory=list)
    removal: Removal | None = None
    normalized: bool = False
    pii: list[str] = field(default_factory=list)  # entity of each hit
    checked: bool = False  # reached the compliance checks
    findings: list = field(default_factory=list)
    action: str = "keep"  # what the findings decided: keep | drop | fail
    length: str | None = None  # truncated | split | dropped
    stratum: str = ""

    def remove(self, kind: str, reason: str, detail: str = "", duplicate_of: str | None = None) -> None:
        self.removal = Removal(kind, reason, detail, duplicate_of)
        self.audit.append({"step": kind, "reason": reason, **({"duplicate_of": duplicate_of} if duplicate_of else {})})


def make_row(source: str, file_hash: str, record: RawRecord, fmt: str, tags: dict[str, str], key: PiiKey) -> Row:
    return Row(id=f"{file_hash[:8]}:{record.line}", source=source, line=record.line,
               input_hash=hashlib.sha256(record.raw).hexdigest()[:16], input_trace=key.trace(record.raw),
               record=record, fmt=fmt, base_tags=tags)


def file_format(records: list[RawRecord], declared: str) -> str:
    """The declared format, or the one the file's first recognisable record has."""
    if declared != "auto":
        return declared
    for record in records:
        found = detect_format(decode(record).value)
        if found:
            return found
    return "unknown"


def parse(rows: list[Row]) -> list[Row]:
    kept = []
    for row in rows:
        record, row.record = decode(row.record), None
        try:
            if record.problem:
                raise Invalid(*record.problem)
            if row.fmt not in FORMATS:
                raise Invalid("unknown_format", "the file has no record in a known format (alpaca, sharegpt, "
                                                "messages, prompt/completion); set the input's format")
            conversation = to_conversation(record.value, row.fmt)
            messages, changed = clean_messages(conversation.messages)
        except Invalid as exc:
            row.remove("rejected", exc.reason, str(exc))
            continue
        row.messages, row.tags = messages, {**row.base_tags, **conversation.tags}
        if changed:
            row.normalized = True
            row.audit.append({"step": "clean", "change": "normalized"})
        kept.append(row)
    return kept


def dedup_text(row: Row) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in row.messages)


def scrub_pii(rows: list[Row], scrubber) -> list[Row]:
    if scrubber is None:
        return rows
    kept = []
    for row in rows:
        drop = False
        for message, result in zip(row.messages, scrubber.scrub_many([m["content"] for m in row.messages])):
            message["content"] = result.text
            drop = drop or result.drop
            for hit in result.hits:
                row.pii.append(hit.entity)
                row.audit.append({"step": "pii", "entity": hit.entity, "value_hash": hit.value_hash,
                                  "action": hit.action})
        if drop:
            row.remove("dropped", "pii_policy")
        else:
            kept.append(row)
    return kept


def comply(rows: list[Row], checks, on: dict) -> list[Row]:
    from forge.runner.prepare.compliance import decide

    kept = []
    for row in rows:
        row.checked = True
        row.findings = [finding for check in checks for finding in check.fn(row.messages, row.tags)]
        row.action = decide(row.findings, on) if row.findings else "keep"
        for finding in row.findings:
            row.audit.append({"step": "compliance", "check": finding.check, "category": finding.category,
                              "severity": finding.severity})
        if row.action == "drop":
            row.remove("dropped", "compliance_policy")
        elif row.action == "keep":
            kept.append(row)
        # "fail" leaves the stream here; the run fails at the first such row in input order (parts.py)
    return kept


def fit_template(rows: list[Row], template: str) -> list[Row]:
    from forge.runner.prepare.templates import misfit

    kept = []
    for row in rows:
        reason = misfit(template, row.messages)
        if reason:
            row.remove("rejected", f"template_{reason}", f"does not fit the {template} template")
        else:
            kept.append(row)
    return kept


def tokenize(rows: list[Row], encoder, spec: PrepareSpec) -> list[Row]:
    kept = []
    for row, encoded in zip(rows, encoder.encode_batch([row.messages for row in rows])):
        try:
            if isinstance(encoded, Invalid):  # the template refuses the row, or its turns cannot be located
                raise encoded
            ids, labels = encoded
            row.examples, row.length = apply_length_policy(ids, labels, spec.max_length, spec.length_policy)
        except Invalid as exc:
            row.remove("rejected", exc.reason, str(exc))
            continue
        if row.length == "dropped":
            row.remove("dropped", "too_long", f"{len(ids)} tokens > {spec.max_length}")
            continue
        row.audit.append({"step": "tokenize", "tokens": len(ids),
                          **({"length_policy": row.length} if row.length else {})})
        kept.append(row)
    return kept


def assign_split(rows: list[Row], spec: PrepareSpec) -> None:
    """Hash-based per stratum: a row's split depends only on its content, the stratum and the seed."""
    split = spec.split
    for row in rows:
        row.stratum = _stratum(row, split.stratify_by)
        digest = hashlib.sha256(f"{split.seed}|{row.stratum}|{row.input_hash}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        row.split = "val" if u < split.val else "test" if u < split.val + split.test else "train"
        row.audit.append({"step": "split", "split": row.split, **({"stratum": row.stratum} if row.stratum else {})})


def _stratum(row: Row, stratify_by: str | None) -> str:
    if not stratify_by:
        return ""
    if stratify_by == "length":
        return f"len<{2 ** max(len(e.input_ids) for e in row.examples).bit_length()}"
    return f"{stratify_by[4:]}={row.tags.get(stratify_by[4:], '')}"


# One encoder for the per-row lines: `json.dumps(..., sort_keys=True)` builds a new one per call.
line_json = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode


def audit_line(row: Row) -> str:
    return line_json({"id": row.id, "source": row.source, "line": row.line, "input_hash": row.input_trace,
                      "steps": row.audit})
