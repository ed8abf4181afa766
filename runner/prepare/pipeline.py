"""`forge prepare`: stream the inputs through the steps in shards, resumable at shard granularity.

Layout while running: `datasets/.<key>.partial/` holds finished shards and `state.sqlite` (dedup
state plus the list of finished shards, committed together). A shard's files are renamed into place
before its commit, so after a kill -9 a rerun redoes at most the shard in flight and produces the
same bytes. When every shard is done, the run's files are assembled and the directory is renamed to
`datasets/<key>/`: the key covers the inputs' content, the config, the tokenizer, the template and
the pipeline version, so an unchanged rerun is a cache hit and any change is a new dataset.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
import time
from itertools import chain, islice
from pathlib import Path
from typing import Iterator

from forge.contract.plan import Plan
from forge.errors import DataError
from forge.runner import models, stop
from forge.runner.emit import emit, log, stage
from forge.runner.hashing import sha256_file, sha256_json
from forge.runner.prepare import steps
from forge.runner.prepare.outputs import assemble, write_shard
from forge.runner.prepare.sources import count_records, read_records
from forge.runner.prepare.stats import ShardStats

PIPELINE_VERSION = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def fingerprint(plan: Plan, model_dir: Path) -> dict:
    """Everything the output depends on, hashed once: the inputs' content, the config, the tokenizer files, the
    template text and the pipeline version. The dataset key is its hash; the manifest records it."""
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
        "prepare": plan.prepare.model_dump(mode="json"),
        "tokenizer": {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()},
        "template": sha256_json(chat_template_for(plan.model.chat_template, model_dir)),
    }


def dataset_dir(plan: Plan, model_dir: Path, prints: dict | None = None) -> Path:
    return Path(plan.output.dir) / "datasets" / sha256_json(prints or fingerprint(plan, model_dir))[:16]


def prepare(plan: Plan, rebuild: bool = False) -> None:
    model_dir = models.resolve(plan.model, Path(plan.output.model_cache))
    with stage("hash", total=len(plan.data.inputs), unit="files") as progress:
        prints = fingerprint(plan, model_dir)
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
        totals = _run_shards(plan, model_dir, work, db, [i["sha256"] for i in prints["inputs"]])
    finally:
        db.close()
    with stage("assemble", total=1, unit="dataset") as progress:
        manifest = assemble(plan, work, target.name, totals, prints)
        (work / "state.sqlite").unlink()
        os.replace(work, target)
        progress.advance(1)
    log((target / "stats.txt").read_text().strip())
    _result(target, manifest, cached=False)


def _run_shards(plan: Plan, model_dir: Path, work: Path, db: sqlite3.Connection, file_hashes: list[str]) -> ShardStats:
    from forge.runner.prepare.compliance import load_checks
    from forge.runner.prepare.dedup import Deduplicator
    from forge.runner.prepare.pii import make_scrubber
    from forge.runner.prepare.tokenize import Encoder, load_tokenizer

    spec = plan.prepare
    db.execute("CREATE TABLE IF NOT EXISTS shards (shard INTEGER PRIMARY KEY, stats TEXT NOT NULL)")
    db.commit()
    done = {shard: ShardStats.from_json(json.loads(stats)) for shard, stats in db.execute("SELECT shard, stats FROM shards")}
    tokenizer = load_tokenizer(model_dir, plan.model.chat_template)
    encoder = Encoder(tokenizer, spec.labels)
    deduplicator = Deduplicator(db, spec.dedup) if spec.dedup.exact or spec.dedup.near else None
    scrubber = make_scrubber(spec.pii) if spec.pii.enabled else None
    checks = load_checks(spec.compliance)
    totals = ShardStats()
    total_rows = sum(count_records(Path(i.path)) for i in plan.data.inputs)
    if done:
        log(f"Resuming: {len(done)} finished shard(s) kept.")
    started = time.monotonic()
    with stage("process", total=total_rows, unit="rows") as progress:
        for index, rows in enumerate(_shards(plan, file_hashes, spec.shard_rows)):
            if index in done:
                totals.merge(done[index])
                progress.advance(len(rows), force=True, **_rates(totals, started))
                continue
            stop.check()
            shard = steps.Shard(index)
            shard.stats.rows_in = len(rows)
            live = steps.parse(shard, rows)
            live = steps.dedup(shard, live, deduplicator)
            live = steps.scrub_pii(shard, live, scrubber)
            live = steps.comply(shard, live, checks, spec.compliance.on)
            live = steps.fit_template(shard, live, plan.model.chat_template)
            live = steps.tokenize(shard, live, encoder, spec)
            steps.assign_split(live, spec)
            steps.count_kept(shard, live, spec)
            if shard.stats.accounted() != shard.stats.rows_in:
                raise AssertionError(f"shard {index}: {shard.stats.accounted()} rows accounted for, {shard.stats.rows_in} read")
            write_shard(work, shard, rows, live, spec)
            db.execute("INSERT INTO shards VALUES (?, ?)", (index, json.dumps(shard.stats.to_json())))
            db.commit()  # the dedup state of this shard and its "done" record land together
            totals.merge(shard.stats)
            progress.advance(len(rows), force=True, **_rates(totals, started))
        progress.summary = {"rows": totals.rows_in, **_rates(totals, started)}
    if not totals.kept:
        raise DataError(f"No usable rows: all {totals.rows_in} were rejected, duplicates or dropped.",
                        "See rejects.jsonl and the stats in the partial output for each row's reason.")
    return totals


def _rates(totals: ShardStats, started: float) -> dict:
    return {"rows_per_s": round(totals.rows_in / max(time.monotonic() - started, 1e-9)),
            "kept": totals.kept, "rejected": sum(totals.rejected.values()),
            "duplicates": sum(totals.duplicates.values()), "dropped": sum(totals.dropped.values())}


def _shards(plan: Plan, file_hashes: list[str], size: int) -> Iterator[list[steps.Row]]:
    """Shard boundaries are a pure function of the inputs: every `size` records in input order."""
    rows = _rows(plan, file_hashes)
    while chunk := list(islice(rows, size)):
        yield chunk


def _rows(plan: Plan, file_hashes: list[str]) -> Iterator[steps.Row]:
    for spec, file_hash in zip(plan.data.inputs, file_hashes, strict=True):
        path = Path(spec.path)
        records = read_records(path)
        head = list(islice(records, 100))
        fmt = steps.file_format(head, spec.format)
        for record in chain(head, records):  # lazily: a file is never held in memory whole
            yield steps.make_row(path.name, file_hash, record, fmt, dict(spec.tags))


def _result(target: Path, manifest: dict, cached: bool) -> None:
    acc = manifest["stats"]["accounting"]
    emit(
        "result",
        step="prepare",
        status="ok",
        paths={"dataset_dir": str(target), "manifest": str(target / "manifest.json"),
               "rejects": str(target / "rejects.jsonl"), "stats": str(target / "stats.json")},
        info={"cached": int(cached), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "rows_in": acc["rows_in"], "kept": acc["kept"], "rejected": acc["rejected"],
              "duplicates": acc["duplicates"], "dropped_by_policy": acc["dropped_by_policy"],
              **{f"examples_{k}": v for k, v in manifest["stats"]["splits"].items()}},
    )
