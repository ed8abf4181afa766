"""Formats, sources and cleaning: every record is turned into chat turns or rejected with a reason."""

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.runner.prepare.clean import clean_messages, clean_text
from forge.runner.prepare.rows import Invalid, detect_format, to_conversation
from forge.runner.prepare.sources import count_records, decode, read_records

ALPACA = {"instruction": "Say hi", "input": "to Ann", "output": "Hi Ann!", "tags": {"source": "human", "level": 2}}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
PROMPT = {"prompt": "Hi", "completion": "Hello."}
TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize("value, fmt", [(ALPACA, "alpaca"), (MESSAGES, "messages"), (SHAREGPT, "sharegpt"),
                                        (PROMPT, "prompt_completion"), ({"text": "x"}, None), ([1], None)])
def test_format_detection(value, fmt):
    assert detect_format(value) == fmt


def test_each_format_becomes_the_same_chat_turns():
    assert to_conversation(SHAREGPT, "sharegpt").messages == TURNS
    assert to_conversation(PROMPT, "prompt_completion").messages == TURNS
    assert to_conversation(MESSAGES, "messages").messages == [MESSAGES["messages"][0], *TURNS]
    alpaca = to_conversation(ALPACA, "alpaca")
    assert alpaca.messages == [{"role": "user", "content": "Say hi\n\nto Ann"}, {"role": "assistant", "content": "Hi Ann!"}]
    assert alpaca.tags == {"source": "human", "level": "2"}


BAD = [
    ({"instruction": "x"}, "alpaca", "missing_field"),
    ({"instruction": "x", "output": 3}, "alpaca", "wrong_type"),
    ({"messages": "hi"}, "messages", "wrong_type"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "bad_role"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "bad_role"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}, "messages", "empty_turn"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "bad_role_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}, "messages", "bad_role_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}]}, "messages", "bad_role_order"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no_assistant_turn"),
    ({"prompt": "a"}, "prompt_completion", "missing_field"),
    ({**ALPACA, "tags": ["x"]}, "alpaca", "wrong_type"),
    ("text", "alpaca", "not_an_object"),
]


@pytest.mark.parametrize("value, fmt, reason", BAD)
def test_bad_records_are_rejected_with_their_reason(value, fmt, reason):
    with pytest.raises(Invalid) as err:
        to_conversation(value, fmt)
    assert err.value.reason == reason and str(err.value)


def test_cleaning_fast_path_changes_nothing():
    """ASCII text with nothing to fix skips the full cleaning; both must give the same result on any text."""
    import random

    from forge.runner.prepare.clean import _clean

    rng = random.Random(0)
    alphabet = ["a", "b", " ", "  ", "\t", "\n", "\r", "\r\n", "\n\n\n", "\x07", "\x7f", "\x85", "\u00a0", "é", "e\u0301",
                "\u200b", "."]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            expected = _clean(text)
        except Invalid:
            with pytest.raises(Invalid):
                clean_text(text)
            continue
        assert clean_text(text) == expected, repr(text)


def test_cleaning_normalises_and_rejects_control_characters():
    assert clean_text("e\u0301 \u00a0x  \r\nnext\n\n\n\nend\u200b ") == "\u00e9  x\nnext\n\nend"
    assert clean_text("    indented\tcode") == "indented\tcode"
    with pytest.raises(Invalid) as err:
        clean_text("bell\x07")
    assert err.value.reason == "control_chars"
    cleaned, changed = clean_messages([{"role": "user", "content": "ok"}])
    assert not changed and cleaned == [{"role": "user", "content": "ok"}]


def test_every_file_type_and_compression(tmp_path):
    rows = [ALPACA, PROMPT]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist([PROMPT, PROMPT]), tmp_path / "e.parquet")
    with open(tmp_path / "f.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows([PROMPT, PROMPT])
    for path in sorted(tmp_path.iterdir()):
        records = [decode(r) for r in read_records(path)]
        assert len(records) == count_records(path) == 2, path.name
        assert all(r.problem is None and r.raw for r in records), path.name
        assert records[-1].value == PROMPT, path.name
    assert [r.line for r in read_records(tmp_path / "f.csv")] == [2, 3]


def test_undecodable_records_are_yielded_with_their_problem(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{broken\n\n{"prompt": "caf\xe9"}\n')
    records = [decode(r) for r in read_records(path)]
    assert [(r.line, r.problem and r.problem[0]) for r in records] == [(1, None), (2, "malformed_json"), (4, "invalid_utf8")]


def _compressed(data: bytes, compression: str) -> bytes:
    if compression == ".gz":
        return gzip.compress(data, mtime=0)
    return zstandard.ZstdCompressor().compress(data) if compression == ".zst" else data


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, kind, compression):
    """As Windows tools write them: the first row must read like the others (it was malformed_json, or in
    CSV a header field named '\\ufeffprompt', so that no row had a prompt)."""
    rows = [PROMPT, {"prompt": "Again", "completion": "Yes."}]
    text = {"jsonl": "\n".join(json.dumps(r) for r in rows) + "\n", "json": json.dumps(rows),
            "csv": "prompt,completion\r\nHi,Hello.\r\nAgain,Yes.\r\n"}[kind]
    path = tmp_path / f"x.{kind}{compression}"
    path.write_bytes(_compressed(b"\xef\xbb\xbf" + text.encode(), compression))
    records = [decode(r) for r in read_records(path)]
    assert [(r.problem, r.value) for r in records] == [(None, row) for row in rows]


def _deeply_nested(depth: int) -> str:
    return '{"prompt": ' + "[" * depth + "]" * depth + ', "completion": "x"}'


@pytest.mark.parametrize("depth", [101, 995, 1000, 100_000])
def test_json_nested_too_deep_is_a_reject_of_its_own(tmp_path, depth):
    """Python's JSON parser recurses: a row nested past its stack was a RecursionError that ended the run.
    It is a reject (the rows around it stay), in JSONL and in a JSON array alike, at any depth over the limit."""
    (tmp_path / "x.jsonl").write_text("\n".join([json.dumps(PROMPT), _deeply_nested(depth), json.dumps(PROMPT)]))
    (tmp_path / "x.json").write_text(f"[{json.dumps(PROMPT)}, {_deeply_nested(depth)}, {json.dumps(PROMPT)}]")
    for name in ("x.jsonl", "x.json"):
        records = [decode(r) for r in read_records(tmp_path / name)]
        assert [r.problem and r.problem[0] for r in records] == [None, "nested_too_deep", None], name
        assert records[2].value == PROMPT and records[2].line == 3
    shallow = '{"prompt": ' + "[" * 99 + "]" * 99 + ', "completion": "x"}'  # 100 levels with the object
    assert decode(next(read_records_of(tmp_path, shallow))).problem is None


def read_records_of(tmp_path, line: str):
    (tmp_path / "one.jsonl").write_text(line + "\n")
    return read_records(tmp_path / "one.jsonl")


def test_a_number_python_will_not_read_is_a_reject(tmp_path):
    records = [decode(r) for r in read_records_of(tmp_path, '{"prompt": ' + "1" * 5000 + "}")]
    assert records[0].problem[0] == "malformed_json" and "4300 digits" in records[0].problem[1]


@pytest.mark.parametrize("compression", [".gz", ".zst"])
def test_a_compressed_file_cut_short_names_the_file_and_the_last_good_line(tmp_path, compression):
    """A cut-short gzip stream raised EOFError (a traceback, "a Forge bug"); zstandard's reader ended quietly,
    so the rest of the file was lost without a word (and a file cut inside its first frame read as empty)."""
    from forge.errors import DataError

    lines = "".join(json.dumps({"prompt": f"Question {i}", "completion": f"Answer {i} " * 20}) + "\n"
                    for i in range(5000))
    whole = _compressed(lines.encode(), compression)
    for cut in (len(whole) // 2, len(whole) - 1, 5):
        path = tmp_path / f"cut{cut}.jsonl{compression}"
        path.write_bytes(whole[:cut])
        read = 0
        with pytest.raises(DataError) as error:
            for record in read_records(path):
                assert decode(record).value == {"prompt": f"Question {read}", "completion": f"Answer {read} " * 20}
                read += 1
        message = error.value.message
        assert message.startswith(f"{path.name}: ") and "ends early or is damaged" in message
        assert (f"after line {read}" if read else "before its first record") in message, message
        assert count_records(path) <= read + 1  # the progress count stops there too, quietly


def test_a_file_that_is_not_what_its_name_says_is_a_data_error(tmp_path):
    from forge.errors import DataError

    for name, data in (("x.jsonl.gz", b'{"prompt": "a"}\n'), ("x.jsonl.zst", b"\x00" * 100), ("x.parquet", b"PAR1 no")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as error:
            list(read_records(tmp_path / name))
        assert error.value.message.startswith(f"{name}: ") and error.value.hint
        assert count_records(tmp_path / name) == 0


def test_csv_rows_with_extra_fields_or_huge_fields_are_read(tmp_path):
    """More fields than the header was a TypeError (None and str keys sorted together); a field over the csv
    module's default limit of 128 KiB was a csv.Error. Both ended the run."""
    path = tmp_path / "x.csv"
    huge = "word " * 60_000
    path.write_text(f"prompt,completion\r\nHi,Hello.,extra\r\nLong,{huge}\r\n")
    records = list(read_records(path))
    assert [(r.line, r.problem and r.problem[0]) for r in records] == [(2, "malformed_csv"), (3, None)]
    assert records[1].value == {"prompt": "Long", "completion": huge}


def test_lone_surrogates_are_rejected_not_sent_to_the_tokenizer():
    """JSON can spell half a UTF-16 pair ("\\ud800"); no tokenizer or UTF-8 file takes it (the tokenizer's
    TypeError ended the run)."""
    for value in ({"prompt": "half \ud800 of it", "completion": "ok"},
                  {"prompt": "ok", "completion": "ok", "tags": {"k": "\udfff"}}):
        with pytest.raises(Invalid) as error:
            to_conversation(value, "prompt_completion")
        assert error.value.reason == "invalid_unicode"
    assert to_conversation({"prompt": "emoji 😀 pair", "completion": "ok"}, "prompt_completion").messages


_JSON_PIECES = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=20), "completion": st.text(max_size=20)}).map(json.dumps),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=10).map(json.dumps),
    st.integers(1, 3000).map(_deeply_nested),
    st.sampled_from(['{"prompt": "\\ud800", "completion": "x"}', '{"prompt": 1' + "0" * 4400 + "}", "", " ", "{",
                     '"\\', "[" * 2000, "\ufeff{}", "\x00", "null"]),
    st.binary(max_size=40).map(lambda data: data.decode("latin-1")),
)


@st.composite
def _broken_files(draw) -> tuple[str, bytes, bool]:
    """(file name, bytes, whether they were cut short): rows good and bad in any of the text formats and
    compressions, perhaps behind a byte-order mark, perhaps cut anywhere."""
    kind = draw(st.sampled_from(["jsonl", "json", "csv"]))
    compression = draw(st.sampled_from(["", ".gz", ".zst"]))
    pieces = draw(st.lists(_JSON_PIECES, max_size=8))
    if kind == "jsonl":
        text = "\n".join(pieces)
    elif kind == "json":
        text = "[" + ",".join(pieces) + "]" if draw(st.booleans()) else ",".join(pieces)
    else:
        out = io.StringIO()
        csv.writer(out).writerows([["prompt", "completion"], *([p, p[::-1]] for p in pieces)])
        text = out.getvalue() + draw(st.sampled_from(["", '"unclosed,', "a,b,c,d\n"]))
    data = (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text.encode("utf-8", "surrogatepass")
    data = _compressed(data, compression)
    cut = draw(st.none() | st.integers(0, max(len(data) - 1, 0)))
    return f"x.{kind}{compression}", data[:cut] if cut is not None else data, cut is not None


@given(_broken_files())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_file_reads_to_records_with_a_reason_or_fails_naming_itself(tmp_path, broken):
    """Whatever the bytes, reading and parsing either ends in a DataError that names the file, or gives each
    record its value or its reason; no other exception (each was a traceback ending the run). A JSONL file not
    cut short has a record per line that is not blank."""
    from forge.errors import DataError

    name, data, cut = broken
    path = tmp_path / name
    path.write_bytes(data)
    try:
        records = [decode(record) for record in read_records(path)]
    except DataError as error:
        assert error.message.startswith(f"{name}:") and error.hint, error.message
        return
    fmt = next((found for r in records if (found := detect_format(r.value))), None)
    for record in records:
        assert record.line >= 1 and (record.problem is None or (record.problem[0] and record.value is None))
        if record.problem is None and fmt:
            try:
                clean_messages(to_conversation(record.value, fmt).messages)
            except Invalid as exc:
                assert exc.reason and str(exc)
    if name.startswith("x.jsonl") and not cut:
        text = (gzip.decompress(data) if name.endswith(".gz") else
                zstandard.ZstdDecompressor().decompressobj().decompress(data) if name.endswith(".zst") else data)
        lines = text.removeprefix(b"\xef\xbb\xbf").split(b"\n")
        assert len(records) == sum(1 for line in lines if line.strip())
