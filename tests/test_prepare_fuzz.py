"""Prepare fed broken files nobody wrote by hand: cut short, random bytes, deep nesting, byte-order marks,
huge and empty rows, in every format and compression. Each one runs through the runner's own entry point
(`python -m forge.runner prepare`, forked from a warm process so that a run costs about a second) under a
hard time limit: it must end with a clear error (the bad-data exit code, a message naming the file, no
traceback) or with every record kept, rejected with its reason or counted as a duplicate.

The files come from a random seed, new on each run and printed with any failure; FORGE_FUZZ_SEED=N
replays one, FORGE_FUZZ_FILES=N sets how many files (default 30).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from forge.errors import DataError
from tests.test_prepare import make_plan

LIMIT_S = 30  # per file: a run takes about a second alone, a few beside busy neighbours; a hang takes forever
BOM = b"\xef\xbb\xbf"
FORMATS = ("jsonl", "json", "csv", "parquet")
COMPRESSIONS = ("", ".gz", ".zst")
WORDS = ("the", "cat", "sat", "on", "a", "mat", "und", "café", "naïve", "日本語", "😀", "Ωmega", "tab\there",
         "line\nbreak", "quote\"d", "comma,", "back\\slash", "{brace}", "[bracket]", "null", "0", "-1e9")
DRIVER = textwrap.dedent("""
    # Run `python -m forge.runner prepare` once per config, each in a process forked from this warm one, each
    # under a hard time limit (SIGKILL past it: its workers die with it). One JSON line per run.
    import json, os, signal, sys, time
    from forge.runner.__main__ import main
    # warm, so that each child only forks: what a run imports on its way
    import jinja2, pandas, pyarrow.parquet, tokenizers
    import forge.runner.prepare.compliance, forge.runner.prepare.dedup, forge.runner.prepare.outputs
    import forge.runner.prepare.pii, forge.runner.prepare.pipeline, forge.runner.prepare.tokenize

    limit = float(sys.argv[1])
    for config in sys.argv[2:]:
        out, err = config + ".out", config + ".err"
        sys.stdout.flush()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
                os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                code = main(["prepare", "--config", config])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc, timed_out = os.waitstatus_to_exitcode(status), False
                break
            if time.monotonic() - started > limit:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc, timed_out = None, True
                break
            time.sleep(0.02)
        print(json.dumps({"config": config, "rc": rc, "timed_out": timed_out,
                          "seconds": round(time.monotonic() - started, 2)}), flush=True)
""")


DAMAGE = ("bom", "deep", "odd", "noise", "cut", "random", "empty")


@dataclass
class Case:
    """One generated input file and what is known of it."""

    path: Path
    damage: list[str]
    records: int | None = None  # how many records the file holds, where the damage leaves that known
    good: list[int] = field(default_factory=list)  # the lines (elements) of rows that must be kept or duplicates
    deep: list[int] = field(default_factory=list)  # the lines of rows nested too deep to read
    must_fail: bool = False  # damage no reader gets past: a cut-short compressed stream, a broken file

    def __str__(self) -> str:
        return f"{self.path.name} ({', '.join(self.damage)})"


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def _good_row(rng: random.Random, row_format: str, n: int) -> dict:
    return _row(row_format, f"Question {n}: {_text(rng)}?", f"Answer {n}: {_text(rng)}.")


def _row(row_format: str, question, answer) -> dict:
    if row_format == "alpaca":
        return {"instruction": question, "input": "", "output": answer}
    if row_format == "messages":
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if row_format == "sharegpt":
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    return {"prompt": question, "completion": answer}


def _deep(rng: random.Random, row_format: str) -> str:
    """A row of the file's format with an answer nested `depth` deep (a sentinel stands in for it)."""
    depth = rng.choice([101, 150, 999, 1000, 5000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"a": ', "}")])
    return json.dumps(_row(row_format, "Deep?", "@")).replace('"@"', opener * depth + "1" + closer * depth)


def _odd(rng: random.Random, row_format: str) -> list[str]:
    """Valid JSON, and still no use as a row: empty, the wrong shape, a number Python will not read, a lone
    surrogate, a huge answer (a row of the file's own format where it has one: the first row decides it)."""
    odd = ["{}", "[]", "null", '""', "0", json.dumps(_row(row_format, "", "")), '{"messages": []}',
           json.dumps(_row(row_format, "@", "Long?")).replace('"@"', "1" * 5000),
           json.dumps(_row(row_format, "lone @ half", "ok")).replace("@", "\\ud800"),
           json.dumps({**_row(row_format, "ok", "tag"), "tags": {"k": "@"}}).replace("@", "\\udfff"),
           json.dumps(_row(row_format, "Huge?", "word " * rng.randint(100_000, 300_000)))]
    return rng.sample(odd, rng.randint(1, 4))


def _noise(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(1, 300))


def make_case(rng: random.Random, path: Path, damage: list[str]) -> Case:
    """A file of good rows in one of the four row formats, damaged as `damage` says."""
    fmt, compression = path.name.split(".", 1)[1].partition(".")[::2]
    row_format = rng.choice(["alpaca", "messages", "sharegpt", "prompt_completion"])
    case = Case(path, damage)
    rows = [] if "empty" in damage else [_good_row(rng, row_format, n) for n in range(rng.randint(1, 25))]
    if rows and rng.random() < 0.3:
        rows.insert(rng.randrange(len(rows) + 1), dict(rows[0]))  # an exact duplicate
    items = [("good", json.dumps(row, ensure_ascii=rng.random() < 0.5)) for row in rows]
    if "odd" in damage and fmt != "parquet":
        for text in _odd(rng, row_format):
            items.insert(rng.randrange(len(items) + 1), ("odd", text))
    if "deep" in damage and fmt in ("jsonl", "json"):
        for _ in range(rng.randint(1, 2)):
            items.insert(rng.randrange(len(items) + 1), ("deep", _deep(rng, row_format)))
    if fmt == "parquet":
        data, case.records, case.good = _parquet(rng, rows, "odd" in damage)
    else:
        data, case.records, case.good, case.deep = TEXT_FILES[fmt](rng, items, "noise" in damage)
    if "empty" in damage and fmt == "jsonl":
        data += rng.choice([b"", b"\n", b"\n \n\t\n", b"\r\n\r\n"])  # blank lines are no records
    elif "empty" in damage and fmt == "csv":
        data += rng.choice([b"", b"\n", b"\r\n\r\n"])  # empty lines (a space would be a field)
    if "bom" in damage and fmt != "parquet":
        data = BOM + data
    if compression == "gz":
        data = gzip.compress(data, mtime=0)
    elif compression == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    if "cut" in damage and len(data) > 1:
        data = data[:rng.randrange(1, len(data))]
        case.records, case.good, case.deep = None, [], []
        case.must_fail = bool(compression) or fmt in ("json", "parquet")
    if "random" in damage:
        data = rng.randbytes(rng.choice([0, 1, 3, 100, 5000]))
        case.records, case.good, case.deep, case.must_fail = None, [], [], True
    path.write_bytes(data)
    return case


def _jsonl(rng: random.Random, items: list[tuple[str, str]], noise: bool):
    if noise:
        for _ in range(rng.randint(1, 4)):
            items.insert(rng.randrange(len(items) + 1), ("noise", _noise(rng)))
    data, lines = b"", {"good": [], "deep": []}
    for kind, text in items:
        line = data.count(b"\n") + 1
        lines.setdefault(kind, []).append(line)
        data += (text if isinstance(text, bytes) else text.encode()) + b"\n" + b"\n" * (rng.random() < 0.1)
    records = sum(1 for line in data.split(b"\n") if line.strip())  # a record per line that is not blank
    return data, records, lines["good"], lines["deep"]


def _json(rng: random.Random, items: list[tuple[str, str]], noise: bool):
    if noise:  # noise in a JSON array is a string of it (anything else breaks the whole file)
        text = _noise(rng).decode("latin-1").translate({ord('"'): None, ord("\\"): None})
        items.insert(rng.randrange(len(items) + 1), ("noise", json.dumps(text)))
    data = ("[" + ",\n ".join(text for _, text in items) + "]").encode()
    numbers = {kind: [n for n, (k, _) in enumerate(items, 1) if k == kind] for kind in ("good", "deep")}
    return data, len(items), numbers["good"], numbers["deep"]


def _csv(rng: random.Random, items: list[tuple[str, str]], noise: bool):
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=rng.choice(["\n", "\r\n"]))
    writer.writerow(["prompt", "completion"])
    for kind, text in items:
        try:
            value = json.loads(text)
        except ValueError:  # a number Python will not read: the text itself as a prompt
            value = text
        if isinstance(value, dict) and "prompt" in value:
            writer.writerow([value["prompt"], value.get("completion", "")])
        else:  # another row format: its question and answer, or the JSON text itself as a prompt
            writer.writerow([s for s in _strings(value) if s][-2:] if kind == "good" else [text, ""])
    text = out.getvalue()
    csv.field_size_limit(1 << 30)  # the huge answer
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    lines = [reader.line_num for _ in reader]  # where each record ends, as the runner numbers them
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate is then bytes that are not UTF-8
    if noise:
        return data + _noise(rng) + b"\n", None, [], []
    return data, len(items), [line for line, (kind, _) in zip(lines, items) if kind == "good"], []


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


TEXT_FILES = {"jsonl": _jsonl, "json": _json, "csv": _csv}


def _parquet(rng: random.Random, rows: list[dict], odd: bool):
    items = [("good", row) for row in rows]
    if odd:  # an empty row and a huge one, in the file's own columns
        for text in ("", "x " * 100_000):
            items.insert(rng.randrange(len(items) + 1), ("odd", {"prompt": text, "completion": text[:1]}))
    columns = list(dict.fromkeys(key for _, row in items for key in row))  # from_pylist reads the first row's only
    table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for _, row in items]) if items else pa.table(
        {"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue(), len(items), [n for n, (kind, _) in enumerate(items, 1) if kind == "good"]


def test_broken_files_end_in_a_clear_error_or_with_every_record_accounted_for(tmp_path, model_cache, smollm2_dir):
    seed = int(os.environ.get("FORGE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    combos = [(fmt, compression) for fmt in FORMATS for compression in COMPRESSIONS
              if not (fmt == "parquet" and compression)]
    cases, configs = {}, []
    for index in range(int(os.environ.get("FORGE_FUZZ_FILES", "30"))):
        if index < 3:  # JSONL with no rows at all: the quickest way out of the pipeline, which raced the workers' start
            fmt, compression, damage = "jsonl", "", ["empty"]
        else:  # every format and compression, each damage in turn, with others at random
            fmt, compression = combos[index % len(combos)]
            damage = sorted({DAMAGE[index % len(DAMAGE)], *rng.sample(DAMAGE, rng.randint(0, 2))})
        folder = tmp_path / f"case-{index:02d}"
        (folder / "data").mkdir(parents=True)
        case = make_case(rng, folder / "data" / f"f{index:02d}.{fmt}{compression}", damage)
        make_plan(folder, model_cache, [case.path], workers=2)
        cases[str(folder / "forge.yaml")] = case
        configs.append(str(folder / "forge.yaml"))
    done = subprocess.run([sys.executable, "-c", DRIVER, str(LIMIT_S), *configs], capture_output=True, text=True,
                          timeout=LIMIT_S * len(configs) + 60)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [run["config"] for run in runs] == configs
    failures = [f"{cases[run['config']]}: {problem}"
                for run in runs for problem in _problems(cases[run["config"]], run)]
    assert not failures, f"FORGE_FUZZ_SEED={seed}:\n" + "\n".join(failures)


def _problems(case: Case, run: dict) -> list[str]:
    """What is wrong with how one run ended: nothing, or each way it broke the rules."""
    if run["timed_out"]:
        return [f"still running after {LIMIT_S} s: a hang"]
    out, err = (Path(run["config"] + suffix).read_text(errors="replace") for suffix in (".out", ".err"))
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    errors = [event for event in events if event["kind"] == "error"]
    problems = [f"a traceback:\n{err[-2000:]}"] if "Traceback" in err else []
    if run["rc"] == DataError.exit_code:
        message = errors[-1]["message"] if errors else ""
        if case.path.name not in message:
            problems.append(f"the error does not name the file: {message!r}")
        if case.good:
            problems.append(f"failed although lines {case.good} are good rows: {message!r}")
    elif run["rc"] == 0:
        if case.must_fail:
            problems.append("succeeded on damage that no reader gets past")
        problems += _accounting_problems(case, next(e for e in events if e["kind"] == "result"))
    else:
        problems.append(f"exit code {run['rc']}: {errors[-1] if errors else err[-2000:]}")
    return problems


def _accounting_problems(case: Case, result: dict) -> list[str]:
    """Every record kept, rejected with a reason, dropped by a policy or counted as a duplicate, each removal
    listed with its file, line and reason; the good rows kept; the deep ones rejected as such."""
    target = Path(result["paths"]["dataset_dir"])
    acc = json.loads((target / "stats.json").read_text())["accounting"]
    problems = []
    removed_count = acc["rejected"] + acc["duplicates"] + acc["dropped_by_policy"]
    if not acc["balanced"] or acc["rows_in"] != acc["kept"] + removed_count:
        problems.append(f"the counts do not add up: {acc}")
    if case.records is not None and acc["rows_in"] != case.records:
        problems.append(f"{acc['rows_in']} rows read of the {case.records} records in the file")
    audit = (target / "audit.jsonl").read_text().splitlines()
    if len(audit) != acc["rows_in"]:
        problems.append(f"{len(audit)} audit lines for {acc['rows_in']} rows")
    removed = {}
    for name, key in (("rejects", "rejected"), ("duplicates", "duplicates"), ("dropped", "dropped_by_policy")):
        entries = [json.loads(line) for line in (target / f"{name}.jsonl").read_text().splitlines()]
        if len(entries) != acc[key]:
            problems.append(f"{len(entries)} lines in {name}.jsonl for {acc[key]} {key}")
        for entry in entries:
            if not entry.get("reason") or entry.get("file") != case.path.name or not entry.get("line", 0) >= 1:
                problems.append(f"{name}.jsonl: an entry without its file, line or reason: {entry}")
            removed[entry.get("line")] = (name, entry.get("reason"))
    lost = {line: removed[line] for line in case.good if line in removed and removed[line][0] != "duplicates"}
    if lost:
        problems.append(f"good rows removed: {lost}")
    deep = {line: removed.get(line) for line in case.deep if removed.get(line) != ("rejects", "nested_too_deep")}
    if deep:
        problems.append(f"rows nested too deep, not rejected as such: {deep}")
    return problems
