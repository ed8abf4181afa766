"""What prepare writes: Parquet shards per split, the removals with their reasons, the audit log, the
compliance report, stats and the manifest. Every file is written whole under a temp name and renamed,
and the contents are deterministic (no timestamps), so a resumed run is byte-identical."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from forge.contract.plan import Plan, PrepareSpec
from forge.contract.plan_io import atomic_write_text
from forge.runner.durable import fsync
from forge.runner.hashing import sha256_file
from forge.runner.prepare.pack import pack
from forge.runner.prepare.stats import ShardStats, report, summary_text
from forge.runner.prepare.steps import Row, Shard, line_json

SPLITS = ("train", "val", "test")
REMOVAL_FILES = {"rejected": "rejects", "duplicates": "duplicates", "dropped": "dropped"}


def splits_of(spec: PrepareSpec) -> list[str]:
    return [name for name in SPLITS if name == "train" or getattr(spec.split, name) > 0]


def write_shard(work: Path, shard: Shard, spec: PrepareSpec) -> None:
    folder = work / "shards"
    folder.mkdir(exist_ok=True)
    tag = f"{shard.index:05d}"
    kept = shard.kept()
    for split in splits_of(spec):
        examples = [(row, example) for row in kept if row.split == split for example in row.examples]
        if spec.packing:
            records = pack([(row.id, example) for row, example in examples], spec.max_length)
        else:
            records = [_example_record(row, example, n, len(row.examples)) for n, (row, example) in
                       enumerate(examples)]
        shard.stats.sequences += len(records)
        _write_parquet(folder / f"{split}-{tag}.parquet", records, spec.packing)
    removals = {kind: [] for kind in REMOVAL_FILES}
    for row in shard.removed:
        removals[row.removal.kind].append(line_json(_removal_record(row)))
    for kind, lines in removals.items():
        _write_lines(folder / f"{REMOVAL_FILES[kind]}-{tag}.jsonl", lines)
    _write_lines(folder / f"audit-{tag}.jsonl", [row.audit_json for row in shard.rows])
    _write_lines(folder / f"compliance-{tag}.jsonl", [
        json.dumps({"id": row.id, "source": row.source, "line": row.line, "action": row.action,
                    "findings": [asdict(f) for f in row.findings]}, sort_keys=True)
        for row in shard.findings
    ])
    fsync(folder)


def _example_record(row: Row, example, n: int, of: int) -> dict:
    return {"id": row.id if of == 1 else f"{row.id}#{n}", "source": row.source, "line": row.line,
            "tags": _tags_json(row.tags), "input_ids": example.input_ids, "labels": example.labels,
            "length": len(example.input_ids)}


_tags_json = json.JSONEncoder(sort_keys=True).encode


def _removal_record(row: Row) -> dict:
    removal = row.removal
    record = {"id": row.id, "file": row.source, "line": row.line, "reason": removal.reason}
    if removal.detail:
        record["detail"] = removal.detail
    if removal.duplicate_of:
        record["duplicate_of"] = removal.duplicate_of
    return record


def _write_parquet(path: Path, records: list[dict], packed: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ints = pa.list_(pa.int32())
    fields = ([("ids", pa.list_(pa.string())), ("input_ids", ints), ("labels", ints), ("position_ids", ints),
               ("seq_lengths", ints)] if packed else
              [("id", pa.string()), ("source", pa.string()), ("line", pa.int64()), ("tags", pa.string()),
               ("input_ids", ints), ("labels", ints), ("length", pa.int32())])
    columns = {name: _int_lists([r[name] for r in records]) if kind == ints else
               pa.array([r[name] for r in records], type=kind) for name, kind in fields}
    table = pa.table(columns, schema=pa.schema(fields))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    fsync(tmp)
    os.replace(tmp, path)


def _int_lists(arrays: list[np.ndarray]):
    """A list<int32> column straight from numpy arrays (no Python int per token)."""
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, arrays), dtype=np.int32, count=len(arrays)), out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(_int32s(offsets), _int32s(values))


def _int32s(values: np.ndarray):
    """An int32 Arrow array over the numpy buffer: `pa.array(ndarray)` would import pandas (0.2 s) to look for
    pandas types."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(np.ascontiguousarray(values))])


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def assemble(plan: Plan, work: Path, key: str, totals: ShardStats, prints: dict) -> dict:
    """Turn finished shards into the dataset layout; safe to redo if killed halfway (inputs are kept until the end)."""
    from forge.runner.prepare.compliance import ComplianceReport, Finding

    spec = plan.prepare
    shards = work / "shards"
    count = len(list(shards.glob("audit-*.jsonl")))
    files = {}
    for split in splits_of(spec):
        (work / split).mkdir(exist_ok=True)
        for index in range(count):
            source = shards / f"{split}-{index:05d}.parquet"
            target = work / split / f"shard-{index:05d}.parquet"
            if source.exists():
                os.replace(source, target)
            files[f"{split}/{target.name}"] = {"sha256": sha256_file(target)}
    for name in [*REMOVAL_FILES.values(), "audit"]:
        _concat([shards / f"{name}-{i:05d}.jsonl" for i in range(count)], work / f"{name}.jsonl")
    compliance = ComplianceReport()
    for index in range(count):
        for line in (shards / f"compliance-{index:05d}.jsonl").read_text().splitlines():
            item = json.loads(line)
            compliance.add(item["id"], item["source"], item["line"], [Finding(**f) for f in item["findings"]], item["action"])
    compliance.rows = totals.checked  # rows without findings were checked too
    _write_lines(work / "compliance.json", [json.dumps(compliance.to_json(), indent=2, sort_keys=True)])
    _write_lines(work / "compliance.txt", [compliance.to_text().rstrip()])
    stats = report(totals)
    _write_lines(work / "stats.json", [json.dumps(stats, indent=2, sort_keys=True)])
    _write_lines(work / "stats.txt", [summary_text(stats)])
    if spec.export_litdata:
        from forge.runner.prepare.litdata_export import export

        export(work, splits_of(spec))
    manifest = {
        "dataset_version": key,
        "pipeline_version": prints["pipeline"],
        "inputs": [{"file": Path(spec.path).name, **hashed} for spec, hashed in zip(plan.data.inputs, prints["inputs"])],
        "model": plan.model.name,
        "tokenizer": prints["tokenizer"],
        "chat_template": plan.model.chat_template,
        "max_length": spec.max_length,
        "labels": spec.labels,
        "packing": spec.packing,
        "tag_schema": sorted({tag.split("=", 1)[0] for tag in totals.tags}),
        "splits": {split: {"examples": totals.splits.get(split, 0), "tokens": totals.split_tokens.get(split, 0),
                           "files": sorted(f for f in files if f.startswith(split + "/"))} for split in splits_of(spec)},
        "files": files,
        "stats": stats,
        "config": spec.model_dump(mode="json", exclude={"workers"}),
    }
    _write_lines(work / "manifest.json", [json.dumps(manifest, indent=2, sort_keys=True)])
    for leftover in shards.iterdir():
        leftover.unlink()
    shards.rmdir()
    return manifest


def _concat(parts: list[Path], target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as handle:
                while block := handle.read(1 << 20):
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
