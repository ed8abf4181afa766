"""Chat templates by name: our own Jinja for each model family, rendered exactly as transformers renders one.

A template spec is "model" (the tokenizer's own template), a name in NAMED (plans/templates/<name>.jinja) or a
path to a Jinja file. Each named template renders byte for byte what its family's official template renders
(tests/test_templates.py proves it against the official texts, whose sources plans/templates/SOURCES.md lists).
`misfit` says, before rendering, why a conversation cannot be written in a family's format.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from forge.errors import ConfigError, ForgeError

NAMED: tuple[str, ...] = ("chatml", "llama-2", "llama-3", "alpaca", "gemma", "mistral", "phi-3", "qwen")


@dataclass(frozen=True)
class Traits:
    system: bool  # accepts a system message
    alternation: bool  # requires strict user/assistant alternation (after an optional leading system message)


TRAITS: dict[str, Traits] = {
    "chatml": Traits(system=True, alternation=False),
    "llama-2": Traits(system=True, alternation=True),
    "llama-3": Traits(system=True, alternation=False),
    "alpaca": Traits(system=True, alternation=False),
    "gemma": Traits(system=False, alternation=True),
    "mistral": Traits(system=True, alternation=True),
    "phi-3": Traits(system=True, alternation=False),
    "qwen": Traits(system=True, alternation=False),
}


def template_text(spec: str, tokenizer=None) -> str:
    """The Jinja source that `spec` names: the tokenizer's own, one of ours, or a file's."""
    if spec == "model":
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # a tokenizer may carry several named templates; "default" is the chat one
            text = text.get("default")
        if not text:
            raise ConfigError(
                "The model's tokenizer has no chat template.",
                f"Set model.chat_template in forge.yaml to one of {', '.join(NAMED)} or a Jinja file.",
            )
        return text
    if spec in NAMED:
        return (files("forge.plans") / "templates" / f"{spec}.jinja").read_text(encoding="utf-8")
    path = Path(spec)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.suffix or len(path.parts) > 1:
        raise ConfigError(f"Chat template file not found: {spec}.", "Check the path in model.chat_template.")
    raise ConfigError(
        f"Unknown chat template {spec!r}.",
        f"Set model.chat_template to 'model', one of {', '.join(NAMED)}, or a path to a Jinja file.",
    )


def traits_of(spec: str) -> Traits | None:
    """What a named template's family can represent; None for "model" and custom files (unknown)."""
    return TRAITS.get(spec)


def misfit(spec: str, messages: list[dict[str, str]]) -> str | None:
    """None if the named template can render the conversation; else why not, as a reason code.

    Never laxer than the official template: a conversation accepted here renders without raising. It is
    stricter in two corners where the official renders something the model never saw instead of raising:
    a system message later in an alternating family's conversation (llama-2 drops it, gemma writes a
    "system" turn), and an empty conversation ("empty"; transformers' apply_chat_template refuses those too).
    """
    traits = traits_of(spec)
    if traits is None:
        return None
    if not messages:
        return "empty"
    roles = [message["role"] for message in messages]
    if "system" in roles and not traits.system:
        return "system_unsupported"
    if traits.alternation:
        turns = roles[1:] if roles[0] == "system" else roles
        if "system" in turns:
            return "system_unsupported"
        if any(role != ("user" if index % 2 == 0 else "assistant") for index, role in enumerate(turns)):
            return "not_alternating"
    return None


def render(text: str, messages, add_generation_prompt: bool = False, **special_tokens) -> str:
    """Render as `tokenizer.apply_chat_template(messages, tokenize=False)` does: transformers' own Jinja
    environment (sandbox, trim_blocks/lstrip_blocks, raise_exception, tojson, ...), with the tokenizer's
    special tokens (bos_token=..., eos_token=...) as variables. A template's raise_exception raises
    jinja2.TemplateError; check `misfit` first for named templates."""
    compiled = _compiled(text)
    if compiled is not None:  # the same compiled template and variables, without per-call conversion overhead
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    rendered, _ = _render_jinja_template()(
        conversations=[messages], chat_template=text, add_generation_prompt=add_generation_prompt, **special_tokens
    )
    return rendered[0]


@lru_cache(maxsize=16)
def _compiled(text: str):
    """transformers' compiled template (its private cache function), or None when that is unavailable.
    Plain role/content messages need none of render_jinja_template's per-call conversions."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template(text)


def _render_jinja_template():
    """The one place that reaches into transformers' chat-template machinery (public module, not re-exported)."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError as exc:
        raise ForgeError(
            "Rendering chat templates needs transformers (with jinja2).",
            "Install the runner extras: pip install 'forge-runner[runner]'.",
        ) from exc
    return render_jinja_template
