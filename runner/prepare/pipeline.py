"""`forge prepare`: stream the inputs through the steps in shards, resumable at shard granularity.

Layout while running: `datasets/.<key>.partial/` holds finished shards and `state.sqlite` (dedup
state plus the list of finished shards, committed together). A shard's files are renamed into place
before its commit, so after a kill -9 a rerun redoes at most the shard in flight and produces the
same bytes. When every shard is done, the run's files are assembled and the directory is renamed to
`datasets/<key>/`: the key covers the inputs' content, the config, the tokenizer, the template and
the pipeline version and the PII key's fingerprint, so an unchanged rerun is a cache hit and any change
is a new dataset.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sqlite3
import threading
import time
from itertools import chain, islice
from pathlib import Path
from typing import Iterator

from forge.contract.pii_key import PiiKey, runner_key
from forge.contract.plan import Plan
from forge.errors import DataError
from forge.runner import models, stop
from forge.runner.emit import emit, log, stage
from forge.runner.hashing import sha256_file, sha256_json
from forge.runner.parallel import pipelined_map
from forge.runner.resources import container_peak_mb, peak_rss_mb, usable_cpus
from forge.runner.prepare import steps
from forge.runner.prepare.outputs import assemble, write_shard
from forge.runner.prepare.parts import Shard
from forge.runner.prepare.sources import RawRecord, count_records, read_records
from forge.runner.prepare.stats import ShardStats
from forge.runner.prepare.work import Chunk, Source, Stages

PIPELINE_VERSION = 3
CHUNK_ROWS = 512  # records per task sent to a worker: small enough to balance the load, large enough to batch
CHUNK_BYTES = 4 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def fingerprint(plan: Plan, model_dir: Path, key: PiiKey | None = None) -> dict:
    """Everything the output depends on, hashed once: the inputs' content, the config, the tokenizer files, the
    template text, the pipeline version and which key traced the PII (the runner's key by default). The
    dataset key is its hash; the manifest records it."""
    from forge.runner.prepare.tokenize import chat_template_for

    inputs = []
    for spec in plan.data.inputs:
        path = Path(spec.path)
        if not path.is_file():
            raise DataError(f"Data file not found in the container: {spec.path}.", "Check data.inputs in forge.yaml.")
        inputs.append({"sha256": sha256_file(path), "format": spec.format, "tags": spec.tags})
    return {
        "pipeline": PIPELINE_VERSION,
        "inputs": inputs,
        "prepare": plan.prepare.model_dump(mode="json", exclude={"workers"}),  # any worker count writes the same bytes
        "tokenizer": {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()},
        "template": sha256_json(chat_template_for(plan.model.chat_template, model_dir)),
        "pii_key": (key or runner_key()).fingerprint,
    }


def dataset_dir(plan: Plan, model_dir: Path, prints: dict | None = None) -> Path:
    return Path(plan.output.dir) / "datasets" / sha256_json(prints or fingerprint(plan, model_dir))[:16]


def prepare(plan: Plan, rebuild: bool = False) -> None:
    model_dir = models.resolve(plan.model, Path(plan.output.model_cache))
    key = runner_key()  # before any work: a missing key fails the run at once
    with stage("hash", total=len(plan.data.inputs), unit="files") as progress:
        prints = fingerprint(plan, model_dir, key)
        target = dataset_dir(plan, model_dir, prints)
        progress.advance(len(plan.data.inputs))
    work = target.with_name(f".{target.name}.partial")
    if rebuild:
        log("--rebuild: discarding any cached or partial output for these inputs and settings.")
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if (target / "manifest.json").is_file():
        log(f"Inputs and settings unchanged: reusing {target.name} (use --rebuild to redo it).")
        _result(target, json.loads((target / "manifest.json").read_text()), cached=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(work / "state.sqlite", isolation_level="DEFERRED")
    try:
        totals = _run_shards(plan, model_dir, work, db, [i["sha256"] for i in prints["inputs"]], key)
    finally:
        db.close()
    with stage("assemble", total=1, unit="dataset") as progress:
        manifest = assemble(plan, work, target.name, totals, prints)
        (work / "state.sqlite").unlink()
        os.replace(work, target)
        progress.advance(1)
    log((target / "stats.txt").read_text().strip())
    _result(target, manifest, cached=False)


def _run_shards(plan: Plan, model_dir: Path, work_dir: Path, db: sqlite3.Connection,
                file_hashes: list[str], key: PiiKey) -> ShardStats:
    """Shards in input order: this process parses and dedups each chunk of records, workers run the steps
    after dedup, and each finished shard is written and committed with its dedup state."""
    from forge.runner.prepare.dedup import Deduplicator

    spec = plan.prepare
    db.execute("CREATE TABLE IF NOT EXISTS shards (shard INTEGER PRIMARY KEY, dedup_seq INTEGER NOT NULL, "
               "stats TEXT NOT NULL)")
    db.commit()
    done = {shard: (seq, ShardStats.from_json(json.loads(stats)))
            for shard, seq, stats in db.execute("SELECT shard, dedup_seq, stats FROM shards ORDER BY shard")}
    deduplicator = Deduplicator(db, spec.dedup) if spec.dedup.exact or spec.dedup.near else None
    written = max((seq for seq, _ in done.values()), default=0)
    if deduplicator and deduplicator.last_seq > written:
        deduplicator.forget_after(written)  # rows committed ahead of the last written shard: check them again
    stages = Stages(plan, model_dir, key)
    workers = spec.workers or usable_cpus()
    if workers > 1:  # each worker tokenizes on one CPU; the runner itself tokenizes nothing
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _quiet_gc()
    totals = ShardStats()
    if done:
        log(f"Resuming: {len(done)} finished shard(s) kept.")
    started = time.monotonic()
    total_rows = _RowCount(plan)  # a full pass over every file, counted while the rows go on
    with stage("process", unit="rows") as progress:
        def advance(rows: int, current: ShardStats | None = None, force: bool = False) -> None:
            total_rows.start()  # once the workers are forked: no thread may run when they are
            progress.total = total_rows.value
            progress.advance(rows, force, **_rates(progress.done + rows, started, totals, current))

        def skip(index: int) -> None:
            totals.merge(done[index][1])
            advance(done[index][1].rows_in)

        def tasks():
            for number, chunk in enumerate(_chunks(plan, file_hashes, spec.shard_rows, done, skip)):
                chunk.number = number
                yield chunk, (number, chunk.parts)

        def check(chunk: Chunk, parsed) -> tuple[int, list]:
            """Dedup's verdicts for a chunk's parsed rows, here, one chunk after another in input order."""
            ids, sketches = parsed
            verdicts = deduplicator.check_sketched(ids, sketches) if deduplicator and ids else [("unique", None)] * len(ids)
            chunk.seq = deduplicator.last_seq if deduplicator else 0
            return chunk.number, verdicts

        shard = None
        for chunk, part in pipelined_map(stages.parse, check, stages.finish, tasks(), workers, in_flight=8 * workers):
            if shard is None:
                stop.check()
                shard = Shard(chunk.shard)
            shard.add(part)
            if chunk.last:
                _finish(shard, work_dir, db, spec, chunk.seq)
                totals.merge(shard.stats)
                shard = None
            advance(part.stats.rows_in, shard and shard.stats)
        total_rows.wait()
        advance(0, force=True)  # the last update, with the total
        progress.summary = {"rows": totals.rows_in, "workers": workers, **_rates(totals.rows_in, started, totals)}
    if not totals.kept:
        names = ", ".join(Path(spec.path).name for spec in plan.data.inputs)
        if not totals.rows_in:
            raise DataError(f"No rows in {names}: nothing but blank lines, an empty array or a header.",
                            "Check that it holds what you meant to give: an empty export, or a download cut "
                            "short before its first line, reads as empty.")
        raise DataError(f"No usable rows in {names}: all {totals.rows_in} were rejected, duplicates or dropped.",
                        "See rejects.jsonl and the stats in the partial output for each row's reason.")
    return totals


class _RowCount:
    """The progress total: every input counted in a background thread (a full pass over the files)."""

    def __init__(self, plan: Plan) -> None:
        self.value: int | None = None
        self._thread = threading.Thread(target=self._count, args=(plan,), name="count-rows", daemon=True)

    def _count(self, plan: Plan) -> None:
        self.value = sum(count_records(Path(i.path)) for i in plan.data.inputs)

    def start(self) -> None:
        if not self._thread.ident:
            self._thread.start()

    def wait(self) -> None:
        self.start()
        self._thread.join()


def _quiet_gc() -> None:
    """Millions of short-lived row objects are acyclic; the collector's young-generation passes over a
    shard's live rows cost about 25 µs a row. Freeze what setup built (imports, the tokenizer: the forked
    workers share those pages untouched) and collect less often; cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _finish(shard: Shard, work: Path, db: sqlite3.Connection, spec, dedup_seq: int) -> None:
    stats = shard.stats
    if stats.accounted() != stats.rows_in:
        raise AssertionError(f"shard {shard.index}: {stats.accounted()} rows accounted for, {stats.rows_in} read")
    write_shard(work, shard, spec)
    db.execute("INSERT INTO shards VALUES (?, ?, ?)", (shard.index, dedup_seq, json.dumps(stats.to_json())))
    db.commit()  # this shard's "done" record, with the dedup state of its rows (and perhaps some after them)


def _rates(rows: int, started: float, *stats: ShardStats | None) -> dict:
    counted = [s for s in stats if s is not None]
    return {"rows_per_s": round(rows / max(time.monotonic() - started, 1e-9)),
            "kept": sum(s.kept for s in counted),
            **{kind: sum(sum(getattr(s, kind).values()) for s in counted)
               for kind in ("rejected", "duplicates", "dropped")}}


def _chunks(plan: Plan, file_hashes: list[str], shard_rows: int, done: dict, skip) -> Iterator[Chunk]:
    """Shard boundaries are a pure function of the inputs: every `shard_rows` records in input order. Each
    shard goes out in chunks of at most CHUNK_ROWS records and (a record aside) CHUNK_BYTES; finished shards
    are read past and reported through `skip`."""
    shard, in_shard, count, size, parts = 0, 0, 0, 0, []
    for source, record in _records(plan, file_hashes):
        in_shard += 1
        if shard not in done:
            if not parts or parts[-1][0] is not source:
                parts.append((source, []))
            parts[-1][1].append(record)
            count, size = count + 1, size + len(record.raw) + 1
        last = in_shard == shard_rows
        if parts and (last or count >= CHUNK_ROWS or size >= CHUNK_BYTES):
            yield Chunk(shard, last, parts)
            parts, count, size = [], 0, 0
        if last:
            if shard in done:
                skip(shard)
            shard, in_shard = shard + 1, 0
    if in_shard:  # the last, short shard
        if shard in done:
            skip(shard)
        else:
            yield Chunk(shard, True, parts)


def _records(plan: Plan, file_hashes: list[str]) -> Iterator[tuple[Source, RawRecord]]:
    for spec, file_hash in zip(plan.data.inputs, file_hashes, strict=True):
        path = Path(spec.path)
        records = read_records(path)
        head = list(islice(records, 100))
        source = Source(path.name, file_hash, steps.file_format(head, spec.format), dict(spec.tags))
        for record in chain(head, records):  # lazily: a file is never held in memory whole
            yield source, record


def _result(target: Path, manifest: dict, cached: bool) -> None:
    acc = manifest["stats"]["accounting"]
    emit(
        "result",
        step="prepare",
        status="ok",
        paths={"dataset_dir": str(target), "manifest": str(target / "manifest.json"),
               "rejects": str(target / "rejects.jsonl"), "stats": str(target / "stats.json")},
        info={"cached": int(cached), "peak_rss_mb": peak_rss_mb(), "container_peak_mb": container_peak_mb(),
              "rows_in": acc["rows_in"], "kept": acc["kept"], "rejected": acc["rejected"],
              "duplicates": acc["duplicates"], "dropped_by_policy": acc["dropped_by_policy"],
              **{f"examples_{k}": v for k, v in manifest["stats"]["splits"].items()}},
    )
