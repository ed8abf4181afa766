"""Render conversations with a chat template and tokenize them, labelling only what the model should learn.

Assistant spans are found in a single render: each assistant message's content is located in order,
and the template's end-of-turn text (learned once from a probe conversation) is labelled with it, so
the model learns to stop. Rows where that shortcut does not hold fall back to rendering each prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forge.errors import ConfigError
from forge.runner.prepare.rows import Invalid

IGNORE = -100
_PROBE = [{"role": "user", "content": "FORGE-PROBE-USER"}, {"role": "assistant", "content": "FORGE-PROBE-ASSISTANT"},
          {"role": "user", "content": "FORGE-PROBE-USER-2"}, {"role": "assistant", "content": "FORGE-PROBE-ASSISTANT-2"}]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class ChatTokenizer:
    """A model's tokenizer and chat template without transformers' model stack: the `tokenizers` library
    and transformers' own Jinja rendering, so prepare starts fast and fits in a small memory cap."""

    SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

    def __init__(self, model_dir: Path, chat_template: str) -> None:
        from tokenizers import Tokenizer

        config = _tokenizer_config(model_dir)
        self.special = {name: _token_text(config[name]) for name in self.SPECIAL if config.get(name)}
        self.chat_template = chat_template_for(chat_template, model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise ConfigError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required).",
                              "Save the model's tokenizer with a recent transformers, which writes tokenizer.json.")
        self.backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        from forge.runner.prepare.templates import render

        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt, **self.special)

    def encode(self, texts: list[str]) -> list:
        """Encodings with ids and character offsets; special tokens in the text are parsed, none are added."""
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def _tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def chat_template_for(spec: str, model_dir: Path) -> str:
    """The template text a plan asks for: the model's own (in tokenizer_config.json, or chat_template.jinja as
    transformers 5 saves it), a named one, or a Jinja file."""
    from types import SimpleNamespace

    from forge.runner.prepare.templates import template_text

    own_file = model_dir / "chat_template.jinja"
    own = _tokenizer_config(model_dir).get("chat_template") or (own_file.read_text() if own_file.is_file() else None)
    return template_text(spec, SimpleNamespace(chat_template=own))


def _token_text(value) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def load_tokenizer(model_dir: Path, chat_template: str) -> ChatTokenizer:
    return ChatTokenizer(model_dir, chat_template)


class Encoder:
    def __init__(self, tokenizer, labels: str = "all_assistant") -> None:
        self.tokenizer, self.labels = tokenizer, labels
        # What follows an assistant message: at the end of a conversation (e.g. "<|end|>\n<|endoftext|>"), and
        # the part of that which also ends a middle turn (e.g. "<|end|>\n"). Both are learned, so the model stops.
        last = self._after(self._render(_PROBE[:2]), _PROBE[1]["content"])
        middle = self._after(self._render(_PROBE), _PROBE[1]["content"])
        self.turn_ends = (last, self._common_tokens(last, middle))

    def _common_tokens(self, a: str, b: str) -> str:
        """The longest prefix of `a` made of whole tokens that `b` starts with too (never half a special token)."""
        first, second = self.tokenizer.encode([a, b[: len(a) + 64]])
        same = 0
        while same < min(len(first.ids), len(second.ids)) and first.ids[same] == second.ids[same]:
            same += 1
        return a[: first.offsets[same - 1][1]] if same else ""

    @staticmethod
    def _after(text: str, content: str) -> str:
        return text[text.index(content) + len(content):]

    def _render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.render(messages, add_generation_prompt)

    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans to learn."""
        text = self._render(messages)
        if self.labels == "whole_sequence":
            return text, [(0, len(text))]
        spans = self._fast_spans(text, messages)
        if spans is None:
            spans = self._slow_spans(text, messages)
        return text, spans[-1:] if self.labels == "last_turn" else spans

    def _fast_spans(self, text: str, messages) -> list[tuple[int, int]] | None:
        spans, cursor = [], 0
        for message in messages:
            content = message["content"].strip()
            start = text.find(content, cursor)
            if start < 0:
                return None
            end = start + len(content)
            if message["role"] == "assistant":
                suffix = next((s for s in self.turn_ends if text.startswith(s, end)), None)
                if suffix is None:
                    return None
                end += len(suffix)
                spans.append((start, end))
            cursor = end
        return spans

    def _slow_spans(self, text: str, messages) -> list[tuple[int, int]]:
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._render(messages[:index], add_generation_prompt=True))
            end = len(self._render(messages[: index + 1]))
            if not text.startswith(self._render(messages[: index + 1])) or start > end:
                raise ConfigError(
                    "The chat template does not render a conversation as a prefix of its continuation, "
                    "so assistant turns cannot be located.",
                    "Use a template that renders turns in order (e.g. chatml) via model.chat_template.",
                )
            spans.append((start, end))
        return spans

    def encode_batch(self, conversations: list[list[dict[str, str]]]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels (IGNORE outside the learned spans), untruncated."""
        rendered = [self.render(messages) for messages in conversations]
        encodings = self.tokenizer.encode([text for text, _ in rendered])
        return [(encoding.ids, _labels(encoding, spans)) for (_, spans), encoding in zip(rendered, encodings)]


def _labels(encoding, spans: list[tuple[int, int]]) -> list[int]:
    """A token is learned when it overlaps a span, so a byte-level token like " Red" (its offset includes the
    space before the answer) counts. Vectorised: rows are hundreds of tokens."""
    ids = np.asarray(encoding.ids, dtype=np.int64)
    if not len(ids) or not spans:
        return [IGNORE] * len(ids)
    offsets = np.asarray(encoding.offsets, dtype=np.int64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    bounds = np.asarray(spans, dtype=np.int64)
    which = np.searchsorted(bounds[:, 1], starts, side="right")  # first span ending after the token starts
    inside = which < len(bounds)
    inside[inside] = bounds[which[inside], 0] < ends[inside]
    return np.where(inside, ids, IGNORE).tolist()


def apply_length_policy(ids: list[int], labels: list[int], max_length: int, policy: str) -> tuple[list[Encoded], str | None]:
    """Examples for one row, and what happened: None, 'truncated', 'split' or 'dropped'."""
    if len(ids) <= max_length:
        pieces, what = [Encoded(ids, labels)], None
    elif policy == "drop":
        return [], "dropped"
    elif policy == "truncate":
        pieces, what = [Encoded(ids[:max_length], labels[:max_length], truncated=True)], "truncated"
    else:
        pieces = [Encoded(ids[i:i + max_length], labels[i:i + max_length], truncated=True)
                  for i in range(0, len(ids), max_length)]
        what = "split"
    pieces = [piece for piece in pieces if any(label != IGNORE for label in piece.labels)]
    if not pieces:
        raise Invalid("no_label_tokens", f"no tokens to learn within {max_length} tokens")
    return pieces, what
