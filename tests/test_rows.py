"""Every input line is kept or rejected with a reason code, with file and line."""

import json

import pytest

from forge.runner.rows import Reject, Row, read_rows

GOOD_ALPACA = {"instruction": "Say hi", "input": "to Ann", "output": "Hi Ann!"}
GOOD_MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}]}

BAD = [
    (b'{"instruction": "x", "output": ', "malformed_json"),
    (b'{"instruction": "caf\xe9", "output": "x"}', "invalid_utf8"),
    (b'["a list"]', "not_an_object"),
    (b'{"prompt": "x"}', "unknown_format"),
    (b'{"instruction": "x"}', "missing_field"),
    (b'{"instruction": "x", "output": 3}', "wrong_type"),
    (b'{"messages": "hi"}', "wrong_type"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "bad_role"),
    (b'{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}', "empty_turn"),
    (b'{"messages": [{"role": "assistant", "content": "x"}]}', "bad_role_order"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}', "bad_role_order"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}]}', "bad_role_order"),
    (b'{"messages": [{"role": "user", "content": "a"}]}', "no_assistant_turn"),
]


def test_alpaca_and_messages_become_chat_turns(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GOOD_ALPACA) + "\n\n" + json.dumps(GOOD_MESSAGES) + "\n")
    rows = list(read_rows(path))
    assert rows == [
        Row("mixed.jsonl", 1, [{"role": "user", "content": "Say hi\n\nto Ann"}, {"role": "assistant", "content": "Hi Ann!"}]),
        Row("mixed.jsonl", 3, GOOD_MESSAGES["messages"]),
    ]


@pytest.mark.parametrize("raw, reason", BAD)
def test_each_bad_row_is_rejected_with_its_reason(tmp_path, raw, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD_ALPACA).encode() + b"\n" + raw + b"\n")
    first, second = read_rows(path)
    assert isinstance(first, Row)
    assert isinstance(second, Reject) and (second.source, second.line, second.reason) == ("bad.jsonl", 2, reason)
    assert second.detail


def test_forced_format_rejects_the_other_format(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD_MESSAGES) + "\n")
    (reject,) = read_rows(path, "alpaca")
    assert reject.reason == "missing_field"
