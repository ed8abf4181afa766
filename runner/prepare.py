"""`forge prepare`: read → render with the chat template → tokenize → split → Parquet + manifest.

The output directory is named by a key over the inputs' content hashes, the prepare config, the
model and the pipeline version, so a rerun with the same inputs is a cache hit and any change is a
rebuild. It is written to a temp dir and renamed, so a killed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from forge.contract.plan import Plan
from forge.errors import DataError
from forge.runner import models, stop
from forge.runner.emit import emit, log, stage
from forge.runner.hashing import sha256_file, sha256_json
from forge.runner.rows import Invalid, Reject, read_rows
from forge.runner.tokenize import encode, load_tokenizer

PIPELINE_VERSION = 1
SPLITS = ("train", "val")


def dataset_dir(plan: Plan) -> Path:
    """Where the prepared dataset for this plan lives; train uses it to find its data."""
    inputs = []
    for raw in plan.data.paths:
        path = Path(raw)
        if not path.is_file():
            raise DataError(f"Data file not found in the container: {raw}.", "Check data.paths in forge.yaml.")
        inputs.append(sha256_file(path))
    key = sha256_json({
        "pipeline": PIPELINE_VERSION,
        "inputs": inputs,
        "format": plan.data.format,
        "prepare": plan.prepare.model_dump(mode="json"),
        "model": plan.model.model_dump(mode="json"),
    })
    return Path(plan.output.dir) / "datasets" / key[:16]


def prepare(plan: Plan) -> None:
    model_dir = models.resolve(plan.model, Path(plan.output.model_cache))
    target = dataset_dir(plan)
    if (target / "manifest.json").is_file():
        log(f"Inputs and settings unchanged: reusing {target.name}.")
        _result(target, json.loads((target / "manifest.json").read_text()), cached=True)
        return

    tokenizer = load_tokenizer(model_dir, plan.model.chat_template)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed run of this same job
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        _write_dataset(plan, tokenizer, tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_dataset(plan: Plan, tokenizer, tmp: Path, target: Path) -> None:
    splits, counts, rejects = _tokenize_all(plan, tokenizer, tmp / "rejects.jsonl")
    with stage("write", total=len(SPLITS), unit="files") as progress:
        files = {}
        for name in SPLITS:
            files[f"{name}.parquet"] = _write_parquet(tmp / f"{name}.parquet", splits[name])
            progress.advance(1)
    manifest = {
        "pipeline_version": PIPELINE_VERSION,
        "key": target.name,
        "inputs": [{"file": Path(p).name, "sha256": sha256_file(Path(p))} for p in plan.data.paths],
        "model": plan.model.name,
        "chat_template": plan.model.chat_template,
        "max_length": plan.prepare.max_length,
        "counts": counts,
        "rejects_by_reason": dict(sorted(rejects.items())),
        "files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, target)
    _result(target, manifest, cached=False)


def _tokenize_all(plan: Plan, tokenizer, rejects_path: Path):
    total = sum(_count_lines(Path(p)) for p in plan.data.paths)
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    reasons: Counter = Counter()
    truncated = kept = 0
    with rejects_path.open("w", encoding="utf-8") as rejects, stage("tokenize", total=total, unit="rows") as progress:
        for raw in plan.data.paths:
            for item in read_rows(Path(raw), plan.data.format):
                stop.check()
                try:
                    if isinstance(item, Reject):
                        raise Invalid(item.reason, item.detail)
                    encoded = encode(tokenizer, item.messages, plan.prepare.max_length)
                except Invalid as exc:
                    reasons[exc.reason] += 1
                    rejects.write(json.dumps(Reject(item.source, item.line, exc.reason, str(exc)).to_json()) + "\n")
                    progress.advance(1, kept=kept, rejected=sum(reasons.values()))
                    continue
                truncated += encoded.truncated
                split = _split_of(encoded.input_ids, plan.prepare.val_fraction, plan.prepare.seed)
                splits[split].append({
                    "input_ids": encoded.input_ids,
                    "labels": encoded.labels,
                    "source": item.source,
                    "line": item.line,
                })
                kept += 1
                progress.advance(1, kept=kept, rejected=sum(reasons.values()))
        progress.summary = {"rows": total, "kept": kept, "rejected": sum(reasons.values()), "truncated": truncated}
    if not splits["train"]:
        raise DataError(
            f"No usable rows: {sum(reasons.values())} of {total} were rejected ({dict(reasons)}).",
            f"See {rejects_path.name} in the output for each row's file, line and reason.",
        )
    if plan.prepare.val_fraction > 0 and not splits["val"] and len(splits["train"]) > 1:
        splits["val"].append(splits["train"].pop())  # keep a validation loss even on tiny data
    counts = {"rows_in": total, "kept": kept, "rejected": sum(reasons.values()), "truncated": truncated,
              **{name: len(rows) for name, rows in splits.items()}}
    return splits, counts, reasons


def _split_of(input_ids: list[int], val_fraction: float, seed: int) -> str:
    """Hash-based, so a row lands in the same split however the input is ordered or streamed."""
    bucket = int(sha256_json([seed, input_ids])[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _write_parquet(path: Path, rows: list[dict]) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("source", pa.string()),
        ("line", pa.int64()),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return {"rows": len(rows), "sha256": sha256_file(path)}


def _result(target: Path, manifest: dict, cached: bool) -> None:
    counts = manifest["counts"]
    emit(
        "result",
        step="prepare",
        status="ok",
        paths={"dataset_dir": str(target), "manifest": str(target / "manifest.json"),
               "rejects": str(target / "rejects.jsonl")},
        info={"cached": int(cached), **counts},
    )
