"""Render conversations with a chat template and tokenize them, labelling only what the model should learn.

Each row is rendered once; where its assistant turns lie (and what closes each, learned with it so the model
learns to stop) follows from the template's own rendering of the row's shape (spans.py), never from searching
the text. A row the template refuses or whose turns cannot be located is a reject with its reason.
"""

from __future__ import annotations

import json
import os
from itertools import chain
from typing import NamedTuple
from pathlib import Path

import numpy as np

from forge.errors import ConfigError
from forge.runner.prepare.rows import Invalid

IGNORE = -100


class Encoded(NamedTuple):  # a tuple: pickled to the main process cheaply (a slots dataclass is not, on 3.11)
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where nothing is learned
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
        self.token_bytes = _token_bytes(self.backend)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        from forge.runner.prepare.templates import render

        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt, **self.special)

    def encode(self, texts: list[str]) -> list:
        """Encodings with ids and character offsets; special tokens in the text are parsed, none are added."""
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Ids only: without character offsets, encoding is about a quarter cheaper."""
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def split_point(self, text: str) -> int:
        """The end of the last added token in `text` at which the tokenizer certainly splits, or 0.

        HF tokenizers first cuts the text at added tokens (special tokens like <|im_start|>) and then
        normalises, pre-tokenizes and encodes the pieces independently, so text[:n] and text[n:] encode to
        the whole text's tokens when n is the end of such a token: one matched verbatim (not normalized,
        no lstrip/rstrip/single_word) that no other added token could overlap across n."""
        added = list(self.backend.get_added_tokens_decoder().values())
        plain = [token.content for token in added
                 if not (token.normalized or token.lstrip or token.rstrip or token.single_word)]
        end = max((text.rfind(content) + len(content) for content in plain if content in text), default=0)
        straddles = any(text[:end].endswith(token.content[:k]) for token in added for k in range(1, len(token.content)))
        return 0 if straddles else end


def _token_bytes(backend) -> np.ndarray | None:
    """How many bytes of the input each token id stands for, when a tokenizer's tokens always add up to its
    input's exact UTF-8 (byte-level BPE: one vocabulary character per byte, no normalizer, untrimmed offsets,
    so a token's span is its bytes); None for any other tokenizer."""
    def spec(component) -> dict | None:
        return json.loads(component.__getstate__()) if component is not None else None

    if backend.normalizer is not None or not _has_step(spec(backend.pre_tokenizer), "ByteLevel") \
            or _has_step(spec(backend.post_processor), "ByteLevel", trim_offsets=True):
        return None
    lengths = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, index in backend.get_vocab(with_added_tokens=False).items():
        lengths[index] = len(token)
    for index, token in backend.get_added_tokens_decoder().items():
        lengths[index] = len(token.content.encode("utf-8"))
    return lengths


def _has_step(step: dict | None, kind: str, **settings) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) has a step of `kind` with these settings."""
    if not step:
        return False
    if step.get("type") == "Sequence":
        return any(_has_step(part, kind, **settings) for part in step.get("pretokenizers") or
                   step.get("processors") or step.get("normalizers") or [])
    return step.get("type") == kind and all(step.get(key, value) == value for key, value in settings.items())


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
    """Token ids and labels for conversations, in one of the label modes (forge.contract.plan's
    PrepareSpec.labels): every assistant turn, the last one, or the whole sequence. Assistant spans are located
    by construction (spans.py), each with what closes its turn, so the model learns to stop."""

    def __init__(self, tokenizer, labels: str = "all_assistant") -> None:
        from jinja2 import TemplateError

        from forge.runner.prepare.spans import Locator

        self.tokenizer, self.labels = tokenizer, labels
        self._template_error = TemplateError  # what a template's raise_exception raises: that row's reject
        self.locator = Locator(self._render, self._common_tokens)
        self.prefix, self.prefix_ids = self._fixed_prefix()

    def _fixed_prefix(self) -> tuple[str, list[int]]:
        """What every conversation without a system message starts with (a default system prompt, say), up to
        a point where the tokenizer splits anyway: tokenized once instead of once per row (about 10% of the
        tokenizing for SmolLM2's template). Checked on two probes; empty when it cannot be used."""
        import jinja2

        try:
            first = self._render([{"role": "user", "content": "FORGE-PROBE-A"}, {"role": "assistant", "content": "x"}])
            second = self._render([{"role": "user", "content": "forge probe b"}, {"role": "assistant", "content": "y"}])
        except jinja2.TemplateError:  # a template that wants more than a bare exchange: no shortcut
            return "", []
        prefix = first[: self.tokenizer.split_point(os.path.commonprefix([first, second]))]
        if not prefix:
            return "", []
        whole_a, whole_b, head, tail_a, tail_b = self.tokenizer.encode(
            [first, second, prefix, first[len(prefix):], second[len(prefix):]])
        if whole_a.ids != head.ids + tail_a.ids or whole_b.ids != head.ids + tail_b.ids:
            return "", []
        return prefix, head.ids

    def _common_tokens(self, a: str, b: str) -> str:
        """The longest prefix of `a` made of whole tokens that `b` starts with too (never half a special token)."""
        first, second = self.tokenizer.encode([a, b[: len(a) + 64]])
        same = 0
        while same < min(len(first.ids), len(second.ids)) and first.ids[same] == second.ids[same]:
            same += 1
        return a[: first.offsets[same - 1][1]] if same else ""

    def _render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.render(messages, add_generation_prompt)

    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans to learn; Invalid (a reject reason) for a row the template
        refuses or whose assistant turns cannot be located."""
        try:
            text = self._render(messages)
        except self._template_error as exc:
            raise Invalid("template_error", f"the chat template refuses this row: {exc}") from None
        if self.labels == "whole_sequence":
            return text, [(0, len(text))]
        spans = self.locator.assistant_spans(text, messages)
        return text, [(start, end) for start, end, _ in (spans[-1:] if self.labels == "last_turn" else spans)]

    def encode_batch(self, conversations: list[list[dict[str, str]]]) -> list[tuple[np.ndarray, np.ndarray] | Invalid]:
        """Per conversation, token ids and labels (IGNORE outside the learned spans) as int32 arrays, untruncated,
        or the Invalid that rejects it."""
        results: list = [None] * len(conversations)
        rendered, where = [], []
        for index, messages in enumerate(conversations):
            try:
                rendered.append(self.render(messages))
                where.append(index)
            except Invalid as exc:
                results[index] = exc
        for index, encoded in zip(where, self._encode_rendered(rendered), strict=True):
            results[index] = encoded
        return results

    def _encode_rendered(self, rendered: list[tuple[str, list]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Ids and labels of rendered texts, each with its character spans to learn."""
        if not rendered:
            return []
        # rows that start with the fixed prefix (and learn nothing inside it) encode only what follows it
        size = len(self.prefix)
        cuts = [size if size and text.startswith(self.prefix) and all(start >= size for start, _ in spans) else 0
                for text, spans in rendered]
        tails = [text[cut:] for (text, _), cut in zip(rendered, cuts)]
        byte_level = self.tokenizer.token_bytes is not None
        encodings = self.tokenizer.encode_ids(tails) if byte_level else self.tokenizer.encode(tails)
        ids = [self.prefix_ids + encoding if cut else encoding for encoding, cut in zip(
            encodings if byte_level else (encoding.ids for encoding in encodings), cuts)]
        counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(counts.sum()))
        rows = np.cumsum(counts)[:-1]
        flat_labels = _byte_labels(flat_ids, counts, rendered, self.tokenizer.token_bytes) if byte_level else None
        if flat_labels is None:  # not byte-level, or a row whose tokens do not add up to its bytes
            if byte_level:
                encodings = self.tokenizer.encode(tails)
            flat_labels = np.full(len(flat_ids), IGNORE, dtype=np.int32)
            skip = len(self.prefix_ids)
            for encoding, (_, spans), cut, row_ids, labels in zip(
                    encodings, rendered, cuts, np.split(flat_ids, rows), np.split(flat_labels, rows)):
                if cut:
                    _label(encoding, [(start - cut, end - cut) for start, end in spans], row_ids[skip:], labels[skip:])
                else:
                    _label(encoding, spans, row_ids, labels)
        return list(zip(np.split(flat_ids, rows), np.split(flat_labels, rows)))


def _byte_labels(flat_ids: np.ndarray, counts: np.ndarray, rendered: list[tuple[str, list[tuple[int, int]]]],
                 token_bytes: np.ndarray) -> np.ndarray | None:
    """Labels for a batch from each token's byte length instead of its character offsets: a token is learned
    iff its bytes overlap a span's bytes, which is what overlapping offsets means for a byte-level tokenizer.
    None when some row's tokens do not add up to its text (an added token that strips whitespace, say)."""
    sizes = token_bytes[flat_ids]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    row_ends = ends[np.cumsum(counts) - 1] if len(ends) else np.zeros(len(counts), dtype=np.int64)
    row_ends[counts == 0] = 0  # an empty row ends where the previous one did
    row_ends = np.maximum.accumulate(row_ends)
    bases = np.concatenate(([0], row_ends[:-1]))
    span_starts, span_ends = [], []
    for (text, spans), base, row_end in zip(rendered, bases.tolist(), row_ends.tolist()):
        ascii_text = text.isascii()
        if row_end - base != (len(text) if ascii_text else len(text.encode("utf-8"))):
            return None
        for start, end in spans:
            if end > start:
                span_starts.append(base + (start if ascii_text else len(text[:start].encode("utf-8"))))
                span_ends.append(base + (end if ascii_text else len(text[:end].encode("utf-8"))))
    first = np.searchsorted(ends, np.array(span_starts, dtype=np.int64), side="right")
    stop = np.searchsorted(starts, np.array(span_ends, dtype=np.int64), side="left")
    inside = np.zeros(len(flat_ids) + 1, dtype=np.int64)
    np.add.at(inside, first, 1)
    np.add.at(inside, stop, -1)
    return np.where(np.cumsum(inside[:-1]) > 0, flat_ids, np.int32(IGNORE))


def _label(encoding, spans: list[tuple[int, int]], ids: np.ndarray, labels: np.ndarray) -> None:
    """Learn every token that overlaps a span, so a byte-level token like " Red" (its offsets include the
    space before the answer) counts. Each span's first and last tokens come from `char_to_token`, without
    materialising every token's offsets; tokens that share characters (a multi-byte character split in
    bytes) are followed to the last one that starts inside the span."""
    for start, end in spans:
        if end <= start:
            continue
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:  # a character no token covers: compare every token's offsets
            for index, (token_start, token_end) in enumerate(encoding.offsets):
                if start < token_end and end > token_start:
                    labels[index] = ids[index]
            continue
        while last + 1 < len(ids) and encoding.token_to_chars(last + 1)[0] < end:
            last += 1
        labels[first:last + 1] = ids[first:last + 1]


def apply_length_policy(ids: np.ndarray, labels: np.ndarray, max_length: int,
                        policy: str) -> tuple[list[Encoded], str | None]:
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
    pieces = [piece for piece in pieces if (piece.labels != IGNORE).any()]
    if not pieces:
        raise Invalid("no_label_tokens", f"no tokens to learn within {max_length} tokens")
    return pieces, what
