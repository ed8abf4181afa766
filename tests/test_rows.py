"""Formats, sources and cleaning: every record is turned into chat turns or rejected with a reason."""

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

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
