"""Read JSONL rows into chat messages. Every line ends up kept or rejected with a reason code.

Formats: Alpaca (`instruction`, optional `input`, `output`, optional `system`) and OpenAI messages
(`messages: [{role, content}]`). `auto` detects per row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Row:
    source: str
    line: int
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Reject:
    source: str
    line: int
    reason: str
    detail: str

    def to_json(self) -> dict:
        return {"file": self.source, "line": self.line, "reason": self.reason, "detail": self.detail}


class Invalid(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def read_rows(path: Path, fmt: str = "auto") -> Iterator[Row | Reject]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield Row(path.name, number, to_messages(_decode(raw), fmt))
            except Invalid as exc:
                yield Reject(path.name, number, exc.reason, str(exc))


def _decode(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid("invalid_utf8", f"byte {exc.start} is not valid UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Invalid("malformed_json", f"{exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise Invalid("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return value


def to_messages(value: dict, fmt: str) -> list[dict[str, str]]:
    if fmt == "auto":
        fmt = "messages" if "messages" in value else "alpaca" if "instruction" in value else ""
        if not fmt:
            raise Invalid("unknown_format", "neither a 'messages' list nor an Alpaca 'instruction' field")
    return _from_messages(value) if fmt == "messages" else _from_alpaca(value)


def _from_alpaca(value: dict) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if key not in value:
            raise Invalid("missing_field", f"Alpaca row without {key!r}")
    for key in ("instruction", "input", "output", "system"):
        if key in value and not isinstance(value[key], str):
            raise Invalid("wrong_type", f"{key!r} must be a string, got {type(value[key]).__name__}")
    prompt = value["instruction"].strip()
    if value.get("input", "").strip():
        prompt += "\n\n" + value["input"].strip()
    messages = [{"role": "system", "content": value["system"]}] if value.get("system", "").strip() else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": value["output"]}]
    return _checked(messages)


def _from_messages(value: dict) -> list[dict[str, str]]:
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("wrong_type", "'messages' must be a non-empty list")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise Invalid("wrong_type", f"messages[{index}] needs a string 'content'")
        if message.get("role") not in ROLES:
            raise Invalid("bad_role", f"messages[{index}].role is {message.get('role')!r}; use system, user or assistant")
        out.append({"role": message["role"], "content": message["content"]})
    return _checked(out)


def _checked(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    for index, message in enumerate(messages):
        if not message["content"].strip():
            raise Invalid("empty_turn", f"messages[{index}] ({message['role']}) is empty")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[1:]):
        raise Invalid("bad_role_order", "a system message may only come first")
    if not turns or turns[0] != "user" or any(a == b for a, b in zip(turns, turns[1:])):
        raise Invalid("bad_role_order", "turns must alternate user/assistant, starting with user")
    if turns[-1] != "assistant":
        raise Invalid("no_assistant_turn", "the last turn must be the assistant's (nothing to learn otherwise)")
    return messages
