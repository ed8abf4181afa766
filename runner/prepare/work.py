"""How a shard's rows move: this process reads, parses and dedups them in input order (dedup depends on
the rows before it), and worker processes run the steps after dedup, which are pure per row, on the
unique rows. The output is the same whatever the number of workers, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.contract.plan import Plan
from forge.runner.prepare import steps
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
    """Consecutive records of one shard, parsed and deduplicated together; their unique rows go to one worker."""

    shard: int
    last: bool  # the shard's last chunk
    parts: list[tuple[Source, list[RawRecord]]]

    def rows(self) -> list[steps.Row]:
        return [steps.make_row(source.name, source.file_hash, record, source.fmt, dict(source.tags))
                for source, records in self.parts for record in records]


def drop_duplicates(rows: list[steps.Row], deduplicator) -> list[steps.Row]:
    """The rows that are not duplicates of a row before them; the others are marked as such."""
    if deduplicator is None or not rows:
        return rows
    sketches = deduplicator.sketcher.sketch([steps.dedup_text(row) for row in rows])
    unique = []
    for row, (verdict, first) in zip(rows, deduplicator.check_sketched([row.id for row in rows], sketches)):
        if verdict == "unique":
            unique.append(row)
        else:
            row.remove("duplicates", verdict, duplicate_of=first)
    return unique


class AfterDedup:
    """The steps after dedup, with everything they need built once in this process and inherited by forked
    workers: PII scrubbing, compliance checks, template fit, tokenizing and the split."""

    def __init__(self, plan: Plan, model_dir: Path) -> None:
        from forge.runner.prepare.compliance import load_checks
        from forge.runner.prepare.pii import make_scrubber
        from forge.runner.prepare.tokenize import Encoder, load_tokenizer

        self.spec, self.template = plan.prepare, plan.model.chat_template
        self.scrubber = make_scrubber(self.spec.pii) if self.spec.pii.enabled else None
        self.checks = load_checks(self.spec.compliance)
        self.encoder = Encoder(load_tokenizer(model_dir, self.template), self.spec.labels)

    def __call__(self, handoffs: list[tuple]) -> list[tuple]:
        """`Row.handoff()`s in, `Row.outcome()`s out: only what the steps read and write crosses processes."""
        rows = [steps.after_dedup_row(handoff) for handoff in handoffs]
        live = steps.scrub_pii(rows, self.scrubber)
        live = steps.comply(live, self.checks, self.spec.compliance.on)
        live = steps.fit_template(live, self.template)
        live = steps.tokenize(live, self.encoder, self.spec)
        steps.assign_split(live, self.spec)
        return [row.outcome() for row in rows]
