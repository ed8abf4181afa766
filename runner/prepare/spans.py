"""Where a rendered conversation's learned text lies, found by construction instead of by searching for it.

Searching the rendering for each turn's content lands in the wrong place whenever that text also occurs
earlier (in a role marker, a default system prompt or an earlier turn), and rendering prefix by prefix breaks
on templates that close every rendering (phi-3 ends each one with eos_token). Instead, each shape of
conversation (its sequence of roles) is rendered once with a sentinel in place of every message's content:
what lies between the sentinels is the template's own text, and each sentinel says whose content goes there.
A row's real rendering must then be exactly those pieces with each content in its slot, as is or trimmed (as
templates do); the slots' positions follow from the pieces' lengths, never from where a content's text occurs.
For a template that rewrites content, each assistant turn is placed by rendering the conversation up to it,
once with a sentinel in its place (where it starts) and once with its content (where that stops).

What closes an assistant turn is learned with it, so the model learns to stop: at the end of a conversation,
everything the template writes after the last content (e.g. "<|end|>\\n<|endoftext|>"); after a middle turn,
the part of what follows it that also closes a conversation (e.g. "<|end|>\\n", not the next turn's
"<|user|>"). A row that fits neither way (a template that rewrites content and also renders a turn
differently once more follow) is rejected with a reason: it is never labelled by a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from forge.runner.prepare.rows import Invalid

# Private-use characters: never whitespace (so trimming leaves a sentinel whole), never in a template's text.
_SENTINEL = "\ue000{}\ue001"
_SLOT = re.compile("\ue000([0-9]+)\ue001")
_PROBE = ({"role": "user", "content": ""}, {"role": "assistant", "content": ""})
UNLABELABLE = "template_unlabelable"


@dataclass(frozen=True, slots=True)
class Skeleton:
    """A template's rendering of one shape of conversation: its own text (`pieces`, one more than the slots)
    around the slots, and the message whose content fills each slot, in the order they are written."""

    pieces: tuple[str, ...]
    slots: tuple[int, ...]


def skeleton_of(render: Callable[[list[dict]], str], messages: list[dict]) -> Skeleton:
    """Render `messages` (all their fields) with a sentinel in place of each content."""
    text = render([{**message, "content": _SENTINEL.format(index)} for index, message in enumerate(messages)])
    parts = _SLOT.split(text)
    return Skeleton(tuple(parts[0::2]), tuple(map(int, parts[1::2])))


def fill(text: str, skeleton: Skeleton, contents: list[str]) -> list[tuple[int, int]] | None:
    """Each slot's (start, end) in `text`, if `text` is the skeleton's pieces with each slot's content written
    in between (as is, or stripped at either end or both); None if it is not.

    Content without surrounding whitespace (all of it, after prepare's cleaning) has one form, so the walk
    is a straight line; otherwise `_walk` tries the forms that fit."""
    pieces, slots = skeleton.pieces, skeleton.slots
    if not text.startswith(pieces[0]):
        return None
    placed, position = [], len(pieces[0])
    for slot, index in enumerate(slots):
        content = contents[index]
        if content[:1].isspace() or content[-1:].isspace():
            return _walk(text, skeleton, contents)
        end = position + len(content)
        if not (text.startswith(content, position) and text.startswith(pieces[slot + 1], end)):
            return None
        placed.append((position, end))
        position = end + len(pieces[slot + 1])
    return placed if position == len(text) else None


def _walk(text: str, skeleton: Skeleton, contents: list[str]) -> list[tuple[int, int]] | None:
    """`fill` for contents with several forms: a depth-first walk over the forms that fit where a slot starts
    and are followed by the next piece; (slot, position) pairs that led nowhere are not walked again."""
    pieces, slots = skeleton.pieces, skeleton.slots
    forms = [_forms(contents[index]) for index in slots]
    frames: list[list] = []  # per slot placed so far: [start, candidate ends left, chosen end]
    dead: set[tuple[int, int]] = set()
    position = len(pieces[0])
    while True:
        depth = len(frames)
        if depth == len(slots):
            if position == len(text):
                return [(start, end) for start, _, end in frames]
        elif (depth, position) not in dead:
            after = pieces[depth + 1]
            frames.append([position, iter([position + len(form) for form in forms[depth]
                                           if text.startswith(form, position)
                                           and text.startswith(after, position + len(form))]), 0])
        while frames:  # take the next candidate of the innermost slot that has one left
            frame = frames[-1]
            frame[2] = next(frame[1], -1)
            if frame[2] >= 0:
                position = frame[2] + len(pieces[len(frames)])
                break
            dead.add((len(frames) - 1, frame[0]))
            frames.pop()
        else:
            return None


def _forms(content: str) -> tuple[str, ...]:
    """The forms a template may write a content in: as is, or trimmed (Jinja's trim is str.strip)."""
    return tuple(dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())))


class Locator:
    """The learned character spans of rendered conversations, for one template.

    `render(messages)` renders a conversation; `common(a, b)` is the longest prefix of `a` made of whole
    tokens that `b` starts with too (so a turn's end is never cut inside a token)."""

    MAX_SHAPES = 4096  # distinct role sequences kept; beyond that, a shape's skeleton is rendered per row

    def __init__(self, render: Callable[[list[dict]], str], common: Callable[[str, str], str]) -> None:
        self.render, self.common = render, common
        # per shape: its skeleton and, for each assistant message, (index, slot, characters learned after it)
        self._shapes: dict[tuple[str, ...], tuple[Skeleton, list[tuple[int, int, int]] | Invalid]] = {}
        self._turn_ends: dict[tuple[str, str], int] = {}
        self._closing: str | None = None

    def assistant_spans(self, text: str, messages: list[dict]) -> list[tuple[int, int, int]]:
        """(start, end, message index) of each assistant message's content and what closes its turn, in
        message order. Raises Invalid when this row cannot be labelled by construction."""
        shape = tuple([message["role"] for message in messages])
        contents = [message["content"] for message in messages]
        known = self._shapes.get(shape)
        if known is None:
            known = self._shape([{"role": role, "content": ""} for role in shape])
            if len(self._shapes) < self.MAX_SHAPES:
                self._shapes[shape] = known
        skeleton, turns = known
        placed = fill(text, skeleton, contents)
        if placed is None:  # this row's own fields, text that changed since (a date), or rewritten content
            skeleton, turns = self._shape(messages)
            placed = fill(text, skeleton, contents) or self._by_prefixes(text, messages, skeleton)
            if placed is None:
                raise Invalid(UNLABELABLE, "the chat template rewrites this row's content and renders its turns "
                                           "differently once more follow, so its assistant turns cannot be "
                                           "located; use a template that writes each message's content as is "
                                           "or trimmed (model.chat_template)")
        if isinstance(turns, Invalid):
            raise Invalid(turns.reason, str(turns))
        return [(placed[slot][0], placed[slot][1] + after, index) for index, slot, after in turns]

    def _shape(self, messages: list[dict]) -> tuple[Skeleton, list[tuple[int, int, int]] | Invalid]:
        """A shape's skeleton and its assistant turns' layout (or why it has none)."""
        import jinja2

        try:
            skeleton = skeleton_of(self.render, messages)
        except jinja2.TemplateError as exc:
            raise Invalid(UNLABELABLE, f"the chat template cannot render this row with placeholders: {exc}") from None
        try:
            if any(index >= len(messages) for index in skeleton.slots):  # a template that writes our sentinels
                raise Invalid(UNLABELABLE, "the chat template's own text looks like Forge's placeholders")
            return skeleton, self._turns(skeleton, [message["role"] for message in messages])
        except Invalid as exc:
            return skeleton, exc

    def _by_prefixes(self, text: str, messages: list[dict], skeleton: Skeleton) -> list | None:
        """Assistant contents' spans for a template that rewrites content (so no form of it fits its slot): a
        content starts where a sentinel in its place lands when the conversation is rendered up to it, and
        ends where the same rendering with the real content stops writing it (what follows the sentinel
        closes it too, as phi-3's eos_token closes every rendering). None unless the whole rendering goes on
        as the skeleton says after each."""
        import jinja2

        slots, pieces = skeleton.slots, skeleton.pieces
        placed: list = [None] * len(slots)
        for slot, index in enumerate(slots):
            if messages[index]["role"] != "assistant":
                continue
            marker = _SENTINEL.format(index)
            try:
                parts = self.render([*messages[:index], {**messages[index], "content": marker}]).split(marker)
                upto = self.render(messages[: index + 1])
            except jinja2.TemplateError:
                return None
            if len(parts) != 2 or not upto.startswith(parts[0]) or not upto.endswith(parts[1]):
                return None
            start, end = len(parts[0]), len(upto) - len(parts[1])
            follows = len(text) == end + len(pieces[-1]) if slot == len(slots) - 1 else True
            if end < start or not text.startswith(upto[:end]) or not text.startswith(pieces[slot + 1], end) \
                    or not follows:
                return None
            placed[slot] = (start, end)
        return placed

    def _turns(self, skeleton: Skeleton, roles: list[str]) -> list[tuple[int, int, int]]:
        """(message index, slot, characters learned after its content) of each assistant message."""
        slots, pieces = skeleton.slots, skeleton.pieces
        where: dict[int, int] = {}
        for slot, index in enumerate(slots):
            if roles[index] == "assistant":
                if index in where:
                    raise Invalid(UNLABELABLE, f"the chat template writes assistant turn {index} more than once")
                where[index] = slot
        turns = []
        for index, role in enumerate(roles):
            if role != "assistant":
                continue
            if index not in where:
                raise Invalid(UNLABELABLE, f"the chat template leaves out assistant turn {index}")
            slot = where[index]
            after = pieces[slot + 1]
            if slot == len(slots) - 1:  # the conversation's end: all the template writes after it closes it
                turns.append((index, slot, len(after)))
            else:
                closing = pieces[-1] if roles[slots[-1]] == "assistant" else self.closing()
                turns.append((index, slot, self._turn_end(after, closing)))
        return turns

    def _turn_end(self, after: str, closing: str) -> int:
        """How much of the text after a middle assistant turn closes that turn: all that closes a conversation
        when it starts with all of it (llama-3's "<|eot_id|>"), else the part they share in whole tokens
        (phi-3's "<|end|>\n" of "<|end|>\n<|endoftext|>": their characters share "<|end|>\n<|", but
        "<|user|>" and "<|endoftext|>" are different tokens)."""
        key = (after, closing)
        if key not in self._turn_ends:
            self._turn_ends[key] = len(closing) if after.startswith(closing) else len(self.common(closing, after))
        return self._turn_ends[key]

    def closing(self) -> str:
        """What the template writes after a conversation's last assistant turn, from a probe."""
        if self._closing is None:
            import jinja2

            try:
                skeleton = skeleton_of(self.render, list(_PROBE))
            except jinja2.TemplateError:
                skeleton = Skeleton(("",), ())
            self._closing = skeleton.pieces[-1] if skeleton.slots[-1:] == (1,) else ""
        return self._closing
