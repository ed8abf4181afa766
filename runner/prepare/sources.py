"""Read input files as a stream of raw records with provenance: JSONL, JSON arrays, CSV and Parquet,
plain, gzip or zstd. Nothing is parsed into chat turns here; a record that cannot be decoded is still
yielded (with its problem) so that it is counted and rejected, never silently skipped. A file that
cannot be read on (cut short, damaged, not what its name says) is a `DataError` naming it and the last
record read whole; a UTF-8 byte-order mark at its start (as Windows tools write them) is not data.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import IO, Iterator, NamedTuple

from forge.errors import DataError
from forge.runner.prepare.streams import broken_stream_errors, open_bytes

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BOM = b"\xef\xbb\xbf"
# A chat record nests four or five levels deep. Python's JSON parser recurses, and its stack ends near 1000
# levels, at a depth that depends on the caller's; a fixed limit rejects the same records wherever they
# are decoded (so any worker count writes the same bytes).
MAX_DEPTH = 100
CSV_FIELD_LIMIT = (1 << 31) - 1  # the csv module's default (128 KiB) would end the run at one long answer


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
    value, problem = _loads(text)
    if problem:
        return RawRecord(record.line, raw=record.raw, problem=problem)
    return RawRecord(record.line, value, record.raw)


def _loads(text: str) -> tuple[object, tuple[str, str] | None]:
    """One JSON text's value, or why it has none: malformed, nested too deep, a number Python will not read."""
    if too_deep(text):
        return None, _TOO_DEEP
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, ("malformed_json", f"{exc.msg} at column {exc.colno}")
    except RecursionError:  # not reached below MAX_DEPTH; kept so that no depth can end the run
        return None, _TOO_DEEP
    except ValueError as exc:  # an integer of over 4300 digits (sys.int_info.default_max_str_digits)
        return None, ("malformed_json", str(exc).partition(";")[0])


_TOO_DEEP = ("nested_too_deep", f"JSON nested more than {MAX_DEPTH} levels deep")
_BRACKETS = re.compile(r'(?P<open>[\[{])|(?P<close>[\]}])|"(?:[^"\\]|\\.)*"?')  # a string (skipped whole) or a bracket


def too_deep(text: str, start: int = 0, end: int | None = None) -> bool:
    """Whether text[start:end] nests arrays and objects more than MAX_DEPTH deep (brackets in strings aside).
    Two counts rule out nearly every record; only one with that many brackets at all is scanned."""
    end = len(text) if end is None else end
    if text.count("[", start, end) + text.count("{", start, end) <= MAX_DEPTH:
        return False
    depth = 0
    for match in _BRACKETS.finditer(text, start, end):
        if match.lastgroup == "open":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif match.lastgroup == "close":
            depth -= 1
    return False


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
    read = {"jsonl": _jsonl, "json": _json_array, "csv": _csv}[kind]
    last = 0
    try:
        with open_bytes(path, compression) as handle:
            for record in read(handle, path):
                last = record.line
                yield record
    except broken_stream_errors() as exc:
        raise _broken(path, compression or "file", last, exc) from None


def _broken(path: Path, compression: str, last: int, exc: Exception) -> DataError:
    where = f"after line {last}" if last else "before its first record"
    good = f"Lines up to {last} read fine. " if last else ""
    check = {"gzip": f"`gzip -t {path.name}`", "zstd": f"`zstd -t {path.name}`"}.get(compression, "its size")
    return DataError(
        f"{path.name}: the {compression} data ends early or is damaged, {where} ({exc}).",
        f"{good}The file is cut short (an interrupted download or copy?), damaged, or not {compression} data at "
        f"all: check it with {check}, then fetch or compress it again, or name it after what it holds.")


def count_records(path: Path) -> int:
    """Cheap count for progress totals (lines for text formats, rows from Parquet metadata). A file that
    cannot be read to its end counts what could be read: reading it for real reports why, file and line."""
    kind, compression = kind_of(path)
    count = 0
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if kind == "json":
            for _ in read_records(path):
                count += 1
            return count
        with open_bytes(path, compression) as handle:
            for line in handle:
                count += bool(line.strip())
    except (DataError, *broken_stream_errors(), *_parquet_errors()):
        pass
    return count - 1 if kind == "csv" and count else count


def _decode(raw: bytes) -> tuple[str | None, tuple[str, str] | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, ("invalid_utf8", f"byte {exc.start} is not valid UTF-8")


def _jsonl(handle: IO[bytes], path: Path) -> Iterator[RawRecord]:
    for number, raw in enumerate(handle, start=1):
        raw = raw.rstrip(b"\r\n")
        if number == 1:
            raw = raw.removeprefix(BOM)
        if raw.strip():
            yield RawRecord(number, raw=raw, pending=True)


def _json_array(handle: IO[bytes], path: Path) -> Iterator[RawRecord]:
    """A JSON array of objects (read whole: use JSONL for files that do not fit in memory), element by
    element, so that one the parser cannot take (nested too deep, an endless number) is a reject of its own."""
    text, problem = _decode(handle.read().removeprefix(BOM))
    if problem:
        raise DataError(f"{path.name}: not UTF-8 text ({problem[1]}).",
                        "Save the file as UTF-8, or convert it to JSONL (a bad line is then only a reject).")
    decoder, at = json.JSONDecoder(), _skip_space(text, 0)
    if not text.startswith("[", at):
        raise DataError(f"{path.name}: expected a JSON array of objects.",
                        "Use a JSON array, or one object per line (.jsonl).")
    at = _skip_space(text, at + 1)
    number, closed = 0, text.startswith("]", at)
    while not closed:
        number += 1
        try:
            item, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise _invalid_json(path, exc) from None
        except (RecursionError, ValueError) as exc:  # valid JSON all the same: step past it by its brackets
            end = _value_end(text, at)
            problem = _TOO_DEEP if isinstance(exc, RecursionError) else ("malformed_json", str(exc).partition(";")[0])
            yield RawRecord(number, raw=text[at:end].encode(), problem=problem)
        else:
            if too_deep(text, at, end):
                yield RawRecord(number, raw=text[at:end].encode(), problem=_TOO_DEEP)
            else:
                raw = json.dumps(item, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
                yield RawRecord(number, item, raw)  # a lone surrogate in it is rejected once parsed (rows.py)
        at = _skip_space(text, end)
        if text.startswith(",", at):
            at = _skip_space(text, at + 1)
        elif text.startswith("]", at):
            closed = True
        else:
            raise _invalid_json(path, json.JSONDecodeError("Expecting ',' delimiter", text, at))
    if _skip_space(text, at + 1) < len(text):
        raise _invalid_json(path, json.JSONDecodeError("Extra data", text, _skip_space(text, at + 1)))


def _invalid_json(path: Path, exc: json.JSONDecodeError) -> DataError:
    return DataError(f"{path.name}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}).",
                     "Fix the file, or convert it to JSONL (one object per line: a bad line is then only a reject).")


_SPACE = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?')  # to its closing quote, or to the end of an unclosed one
_WORD = re.compile(r'[^\s,\]}]*')  # a number, true, false or null


def _skip_space(text: str, at: int) -> int:
    return _SPACE.match(text, at).end()


def _value_end(text: str, at: int) -> int:
    """Where the JSON value at `at` ends, by its brackets and quotes alone: to step past one the parser refused."""
    if text.startswith('"', at):
        return _STRING.match(text, at).end()
    if not text.startswith(("[", "{"), at):
        return _WORD.match(text, at).end()
    depth = 0
    for match in _BRACKETS.finditer(text, at):
        depth += {"open": 1, "close": -1}.get(match.lastgroup, 0)
        if depth == 0:
            return match.end()
    return len(text)


def _csv(handle: IO[bytes], path: Path) -> Iterator[RawRecord]:
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(text)
    try:
        for row in reader:
            line = reader.line_num
            if None in row:  # the extra fields are listed under None: no key order to sort
                raw = json.dumps(list(row.items()), ensure_ascii=False).encode("utf-8", "surrogateescape")
                yield RawRecord(line, raw=raw, problem=("malformed_csv", "more fields than the header has"))
                continue
            raw = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogateescape")
            if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                yield RawRecord(line, raw=raw, problem=("invalid_utf8", "a field is not valid UTF-8"))
            else:
                yield RawRecord(line, dict(row), raw)
    except csv.Error as exc:
        raise DataError(f"{path.name}:{reader.line_num}: not valid CSV ({exc}).",
                        "Fix the file (quotes closed, and doubled inside a quoted field), or convert it to "
                        "JSONL.") from None


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    number = 0
    try:
        # Buffered page-by-page reads: a file written as one huge row group is not decoded whole (265 → 141 MiB
        # peak for an 800k-row file).
        for batch in pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield RawRecord(number, row, json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    except _parquet_errors() as exc:
        where = f"after row {number}" if number else "before its first row"
        raise DataError(f"{path.name}: not a readable Parquet file, {where} ({exc}).",
                        "The file is cut short (an interrupted download or copy?) or damaged: write or fetch it "
                        "again, or name it after what it holds.") from None


def _parquet_errors() -> tuple[type[Exception], ...]:
    import pyarrow

    return (pyarrow.ArrowException,)
