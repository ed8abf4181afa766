"""How a shard's rows move: this process reads the records and runs dedup's checks in input order (dedup
depends on the rows before it); worker processes do the rest, which is pure per row: parsing and dedup
sketches before the check, every step after it. The output is the same whatever the number of workers,
byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.contract.pii_key import PiiKey
from forge.contract.plan import Plan
from forge.runner.prepare import steps
from forge.runner.prepare.parts import Part
from forge.runner.prepare.sources import RawRecord


@dataclass(frozen=True)
class Source:
    """One input file as its rows need it."""

    name: str
    file_hash: str
    fmt: str
    tags: dict[str, str]


@dataclass
class Chunk:
    """Consecutive records of one shard, parsed, deduplicated and finished together by one worker."""

    shard: int
    last: bool  # the shard's last chunk
    parts: list[tuple[Source, list[RawRecord]]]
    number: int = 0  # in input order, from 0
    seq: int = 0  # the last row dedup had registered once this chunk was checked


class Stages:
    """The per-row work of a chunk, in two halves around dedup, both run by the same worker process (forked
    after this is built, so the tokenizer and compiled templates are shared, not pickled):
    `parse` makes the rows and sketches them for dedup and keeps them; `finish` takes dedup's verdicts and
    runs the steps after it (PII, compliance, template fit, tokenize, split) and lays the rows out as their
    output files want them. Only the records, the sketches, the verdicts and those parts cross between
    processes. `key` keys every trace of a value the outputs carry (PII hits, the audit's input hashes)."""

    def __init__(self, plan: Plan, model_dir: Path, key: PiiKey) -> None:
        from forge.runner.prepare.compliance import load_checks
        from forge.runner.prepare.dedup import Sketcher
        from forge.runner.prepare.pii import make_scrubber
        from forge.runner.prepare.tokenize import Encoder, load_tokenizer

        self.spec, self.template = plan.prepare, plan.model.chat_template
        dedup = self.spec.dedup
        self.sketcher = Sketcher(dedup) if dedup.exact or dedup.near else None
        self.key = key
        self.scrubber = make_scrubber(self.spec.pii, key) if self.spec.pii.enabled else None
        self.checks = load_checks(self.spec.compliance, key)
        self.encoder = Encoder(load_tokenizer(model_dir, self.template), self.spec.labels)
        self.held: dict[int, tuple[list[steps.Row], list[steps.Row]]] = {}

    def parse(self, task: tuple[int, list[tuple[Source, list[RawRecord]]]]):
        """(ids of the rows that parsed, their dedup sketches or None)."""
        number, parts = task
        rows = [steps.make_row(source.name, source.file_hash, record, source.fmt, dict(source.tags), self.key)
                for source, records in parts for record in records]
        parsed = steps.parse(rows)
        self.held[number] = (rows, parsed)
        sketches = self.sketcher.sketch([steps.dedup_text(row) for row in parsed]) if self.sketcher and parsed else None
        return [row.id for row in parsed], sketches

    def finish(self, task: tuple[int, list]) -> Part:
        """The chunk's rows finished, counted and laid out for writing."""
        number, verdicts = task
        rows, parsed = self.held.pop(number)
        unique = []
        for row, (verdict, first) in zip(parsed, verdicts, strict=True):
            if verdict == "unique":
                unique.append(row)
            else:
                row.remove("duplicates", verdict, duplicate_of=first)
        live = steps.scrub_pii(unique, self.scrubber)
        live = steps.comply(live, self.checks, self.spec.compliance.on)
        live = steps.fit_template(live, self.template)
        live = steps.tokenize(live, self.encoder, self.spec)
        steps.assign_split(live, self.spec)
        return Part.of(rows)
