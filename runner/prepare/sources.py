"""Read input files as a stream of raw records with provenance: JSONL, JSON arrays, CSV and Parquet,
plain, gzip or zstd. Nothing is parsed into chat turns here; a record that cannot be decoded is still
yielded (with its problem) so that it is counted and rejected, never silently skipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import IO, Iterator, NamedTuple

from forge.errors import DataError

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class RawRecord(NamedTuple):
    """One input record: its value (a dict when decoding worked) or the reason it could not be decoded.

    JSONL lines come undecoded (`pending`): reading only splits lines, and `decode` parses a line when its
    row is parsed (in a worker), so a malformed one is rejected there like any other bad row. A tuple,
    because records cross to the workers: a NamedTuple pickles three times faster than a slots dataclass."""

    line: int  # 1-based line (JSONL, CSV) or element number (JSON array, Parquet)
    value: object = None
    raw: bytes = b""  # the bytes the row was decoded from (for the input hash)
    problem: tuple[str, str] | None = None  # (reason code, detail)
    pending: bool = False  # `raw` is a JSON text not decoded yet


def decode(record: RawRecord) -> RawRecord:
    """The record with its JSON value decoded, or with the reason it cannot be."""
    if not record.pending:
        return record
    text, problem = _decode(record.raw)
    if problem:
        return RawRecord(record.line, raw=record.raw, problem=problem)
    try:
        return RawRecord(record.line, json.loads(text), record.raw)
    except json.JSONDecodeError as exc:
        return RawRecord(record.line, raw=record.raw, problem=("malformed_json", f"{exc.msg} at column {exc.colno}"))


def kind_of(path: Path) -> tuple[str, str | None]:
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    kind = KINDS.get(suffixes[-1]) if suffixes else None
    if kind is None:
        raise DataError(
            f"{path.name}: unknown file type.",
            "Use .jsonl, .json, .csv or .parquet (optionally .gz or .zst compressed).",
        )
    if kind == "parquet" and compression:
        raise DataError(f"{path.name}: compressed Parquet files are not supported.", "Parquet compresses itself; drop the .gz/.zst.")
    return kind, compression


def read_records(path: Path) -> Iterator[RawRecord]:
    kind, compression = kind_of(path)
    if kind == "parquet":
        yield from _parquet(path)
        return
    with _open(path, compression) as handle:
        if kind == "jsonl":
            yield from _jsonl(handle)
        elif kind == "json":
            yield from _json_array(handle, path)
        else:
            yield from _csv(handle)


def count_records(path: Path) -> int:
    """Cheap count for progress totals (lines for text formats, rows from Parquet metadata)."""
    kind, compression = kind_of(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if kind == "json":
        return sum(1 for _ in read_records(path))
    with _open(path, compression) as handle:
        count = sum(1 for line in handle if line.strip())
    return count - 1 if kind == "csv" and count else count


def _open(path: Path, compression: str | None) -> IO[bytes]:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")


def _decode(raw: bytes) -> tuple[str | None, tuple[str, str] | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, ("invalid_utf8", f"byte {exc.start} is not valid UTF-8")


def _jsonl(handle: IO[bytes]) -> Iterator[RawRecord]:
    for number, raw in enumerate(handle, start=1):
        raw = raw.rstrip(b"\r\n")
        if raw.strip():
            yield RawRecord(number, raw=raw, pending=True)


def _json_array(handle: IO[bytes], path: Path) -> Iterator[RawRecord]:
    """A JSON array of objects (read whole: use JSONL for files that do not fit in memory)."""
    data = handle.read()
    text, problem = _decode(data)
    try:
        value = json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}:{exc.lineno}: not valid JSON ({exc.msg}).", "Fix the file, or convert it to JSONL.") from None
    if problem or not isinstance(value, list):
        raise DataError(f"{path.name}: expected a JSON array of objects.", "Use a JSON array, or one object per line (.jsonl).")
    for number, item in enumerate(value, start=1):
        yield RawRecord(number, item, json.dumps(item, sort_keys=True, ensure_ascii=False).encode())


def _csv(handle: IO[bytes]) -> Iterator[RawRecord]:
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    for row in reader:
        raw = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogateescape")
        line = reader.line_num
        if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
            yield RawRecord(line, raw=raw, problem=("invalid_utf8", "a field is not valid UTF-8"))
        elif None in row:
            yield RawRecord(line, raw=raw, problem=("malformed_csv", "more fields than the header has"))
        else:
            yield RawRecord(line, dict(row), raw)


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    number = 0
    # Buffered page-by-page reads: a file written as one huge row group is not decoded whole (265 → 141 MiB
    # peak for an 800k-row file).
    for batch in pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield RawRecord(number, row, json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
