"""Unicode and whitespace cleaning. Control characters are rejected rather than stripped: they usually
mean a broken export, and silently editing them away would hide that."""

from __future__ import annotations

import re
import unicodedata

from forge.runner.prepare.rows import Invalid

_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))  # zero-width characters
_WIDE_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# In ASCII text, the only things the steps below change (or reject): control characters and CR, trailing
# spaces, blank-line runs, and the ends (strip). One character class and three substring scans find them.
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """NFC, LF line ends, no zero-width characters, no trailing spaces, at most one blank line in a row."""
    if (text.isascii() and " \n" not in text and "\t\n" not in text and "\n\n\n" not in text
            and not _ASCII_CONTROL.search(text)):  # most text: nothing to do but strip
        return text.strip()
    return _clean(text)


def _clean(text: str) -> str:
    found = _CONTROL.search(text)
    if found:
        raise Invalid("control_chars", f"control character U+{ord(found.group()):04X}")
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    text = _TRAILING.sub("\n", _WIDE_SPACES.sub(" ", text))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def clean_messages(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], bool]:
    cleaned = [{"role": m["role"], "content": clean_text(m["content"])} for m in messages]
    for index, message in enumerate(cleaned):
        if not message["content"]:
            raise Invalid("empty_turn", f"turn {index} ({message['role']}) is empty after cleaning")
    return cleaned, cleaned != messages
