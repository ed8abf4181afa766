"""Turn decoded records into chat turns. Formats: Alpaca, ShareGPT, OpenAI messages, prompt/completion.

The format is detected once per file (from its first record that matches one) unless the input sets
it; every record that does not fit becomes a reject with a reason code, never a silent skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
# Half of a UTF-16 pair alone: JSON may spell one ("\\ud800"), but it is no character, and no tokenizer or
# UTF-8 file takes it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class Invalid(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    tags: dict[str, str] = field(default_factory=dict)


def detect_format(value: object) -> str | None:
    if not isinstance(value, dict):
        return None
    if "messages" in value:
        return "messages"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value:
        return "alpaca"
    if "prompt" in value and "completion" in value:
        return "prompt_completion"
    return None


def to_conversation(value: object, fmt: str) -> Conversation:
    if not isinstance(value, dict):
        raise Invalid("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    messages = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages, "prompt_completion": _prompt_completion}[fmt](value)
    return Conversation(checked(messages), _tags(value.get("tags")))


def _strings(value: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    for key in required:
        if value.get(key) is None:
            raise Invalid("missing_field", f"no {key!r} field")
    for key in required + optional:
        if key in value and value[key] is not None and not isinstance(value[key], str):
            raise Invalid("wrong_type", f"{key!r} must be a string, got {type(value[key]).__name__}")


def _alpaca(value: dict) -> list[dict[str, str]]:
    _strings(value, ("instruction", "output"), ("input", "system"))
    prompt = value["instruction"].strip()
    if (value.get("input") or "").strip():
        prompt += "\n\n" + value["input"].strip()
    system = [{"role": "system", "content": value["system"]}] if (value.get("system") or "").strip() else []
    return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": value["output"]}]


def _prompt_completion(value: dict) -> list[dict[str, str]]:
    _strings(value, ("prompt", "completion"), ("system",))
    system = [{"role": "system", "content": value["system"]}] if (value.get("system") or "").strip() else []
    return system + [{"role": "user", "content": value["prompt"]}, {"role": "assistant", "content": value["completion"]}]


def _turns(value: dict, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    turns = value.get(key)
    if turns is None:
        raise Invalid("missing_field", f"no {key!r} field")
    if not isinstance(turns, list) or not turns:
        raise Invalid("wrong_type", f"{key!r} must be a non-empty list")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise Invalid("wrong_type", f"{key}[{index}] needs a string {content_key!r}")
        role = roles.get(str(turn.get(role_key)).lower()) if turn.get(role_key) is not None else None
        if role is None:
            raise Invalid("bad_role", f"{key}[{index}].{role_key} is {turn.get(role_key)!r}; use one of {sorted(roles)}")
        out.append({"role": role, "content": turn[content_key]})
    return out


def _messages(value: dict) -> list[dict[str, str]]:
    return _turns(value, "messages", "role", "content", {role: role for role in ROLES})


def _sharegpt(value: dict) -> list[dict[str, str]]:
    return _turns(value, "conversations", "from", "value", SHAREGPT_ROLES)


def _tags(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        raise Invalid("wrong_type", "'tags' must be an object of strings or numbers")
    tags = {str(key): str(item) for key, item in value.items()}
    if any(not _is_text(text) for pair in tags.items() for text in pair):
        raise Invalid("invalid_unicode", "a tag holds an unpaired UTF-16 surrogate (a \\ud800-style escape)")
    return tags


def _is_text(text: str) -> bool:
    return text.isascii() or not _LONE_SURROGATE.search(text)  # isascii() is O(1): most text costs nothing


def checked(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Empty turns and bad role order are rejected here, whatever the source format."""
    for index, message in enumerate(messages):
        if not message["content"].strip():
            raise Invalid("empty_turn", f"turn {index} ({message['role']}) is empty")
        if not _is_text(message["content"]):
            raise Invalid("invalid_unicode", f"turn {index} ({message['role']}) holds an unpaired UTF-16 surrogate "
                                             "(a \\ud800-style escape), which is not a character")
    if any(m["role"] == "system" for m in messages[1:]):
        raise Invalid("bad_role_order", "a system message may only come first")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[0] != "user" or any(a == b for a, b in zip(turns, turns[1:])):
        raise Invalid("bad_role_order", "turns must alternate user/assistant, starting with user")
    if turns[-1] != "assistant":
        raise Invalid("no_assistant_turn", "the last turn must be the assistant's (nothing to learn otherwise)")
    return messages
