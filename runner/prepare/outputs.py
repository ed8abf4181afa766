"""What prepare writes: Parquet shards per split, the removals with their reasons, the audit log, the
compliance report, stats and the manifest. Every file is written whole under a temp name and renamed,
and the contents are deterministic (no timestamps), so a resumed run is byte-identical."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from forge.contract.plan import Plan, PrepareSpec
from forge.contract.plan_io import atomic_write_text
from forge.runner.durable import fsync
from forge.runner.hashing import sha256_file
from forge.runner.prepare.pack import pack
from forge.runner.prepare.parts import REMOVAL_FILES, SPLITS, Columns, Shard, join_tokens
from forge.runner.prepare.stats import ShardStats, report, summary_text
from forge.runner.prepare.tokenize import Encoded


def splits_of(spec: PrepareSpec) -> list[str]:
    return [name for name in SPLITS if name == "train" or getattr(spec.split, name) > 0]


def write_shard(work: Path, shard: Shard, spec: PrepareSpec) -> None:
    folder = work / "shards"
    folder.mkdir(exist_ok=True)
    tag = f"{shard.index:05d}"
    for split in splits_of(spec):
        columns = shard.examples[split]
        if spec.packing:
            input_ids, labels = columns.tokens()
            cuts = _offsets(columns.lengths)[1:-1]
            examples = [(row_id, Encoded(ids, labels)) for row_id, ids, labels in
                        zip(columns.row_ids(), np.split(input_ids, cuts), np.split(labels, cuts))]
            table = _packed_table(pack(examples, spec.max_length))
        else:
            table = _examples_table(columns)
        shard.stats.sequences += table.num_rows
        _write_parquet(folder / f"{split}-{tag}.parquet", table)
    for name, lines in shard.lines.items():
        _write_lines(folder / f"{name}-{tag}.jsonl", lines)
    fsync(folder)


def _examples_table(columns: Columns):
    import pyarrow as pa

    input_ids, labels = columns.tokens()
    offsets = _offsets(columns.lengths)
    return pa.table({
        "id": pa.array(columns.ids, pa.string()), "source": pa.array(columns.sources, pa.string()),
        "line": pa.array(columns.lines, pa.int64()), "tags": pa.array(columns.tags, pa.string()),
        "input_ids": _int_lists(offsets, input_ids), "labels": _int_lists(offsets, labels),
        "length": pa.array(columns.lengths, pa.int32())})


def _packed_table(sequences: list[dict]):
    import pyarrow as pa

    offsets = _offsets([len(s["input_ids"]) for s in sequences])
    counts = _offsets([len(s["seq_lengths"]) for s in sequences])
    return pa.table({
        "ids": pa.array([s["ids"] for s in sequences], pa.list_(pa.string())),
        **{name: _int_lists(offsets, join_tokens([s[name] for s in sequences]))
           for name in ("input_ids", "labels", "position_ids")},
        "seq_lengths": _int_lists(counts, join_tokens([s["seq_lengths"] for s in sequences]))})


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    fsync(tmp)
    os.replace(tmp, path)


def _offsets(lengths: list[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(np.asarray(lengths, dtype=np.int32), out=offsets[1:])
    return offsets


def _int_lists(offsets: np.ndarray, values: np.ndarray):
    """A list<int32> column straight from numpy arrays (no Python int per token)."""
    import pyarrow as pa

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
        "pii_key": prints["pii_key"],  # which key traced the PII (its fingerprint): other keys' traces differ
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
