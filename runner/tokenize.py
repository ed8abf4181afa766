"""Render chat rows with the model's own template and tokenize them, labelling assistant tokens only.

Assistant spans are found by rendering the conversation up to each assistant turn (with and without
the generation prompt) and mapping those character spans onto token offsets; this works with any
template that renders a conversation as a prefix of its continuation, which the check enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.errors import ConfigError
from forge.runner.rows import Invalid

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def load_tokenizer(model_dir: Path, chat_template: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template != "model":
        path = Path(chat_template)
        if not path.is_file():
            raise ConfigError(f"Chat template file not found: {chat_template}.", "Set model.chat_template to 'model' or a Jinja file.")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise ConfigError(
            f"The tokenizer in {model_dir} has no chat template.",
            "Set model.chat_template in forge.yaml to a Jinja template file.",
        )
    return tokenizer


def encode(tokenizer, messages: list[dict[str, str]], max_length: int) -> Encoded:
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:index], tokenize=False, add_generation_prompt=True))
        end = len(render(messages[: index + 1], tokenize=False))
        if not text.startswith(render(messages[: index + 1], tokenize=False)) or start > end:
            raise ConfigError(
                "The chat template does not render a conversation as a prefix of its continuation, "
                "so assistant turns cannot be located.",
                "Use a template that renders turns in order (e.g. chatml) via model.chat_template.",
            )
        spans.append((start, end))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE
        for token, offset in zip(ids, encoding["offset_mapping"])
    ]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        raise Invalid("no_label_tokens", f"no assistant tokens within the first {max_length} tokens")
    return Encoded(ids, labels, truncated)
