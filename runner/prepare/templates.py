"""Chat templates by name: our own Jinja for each model family, rendered exactly as transformers renders one.

A template spec is "model" (the tokenizer's own template), a name in NAMED (plans/templates/<name>.jinja) or a
path to a Jinja file. Each named template renders byte for byte what its family's official template renders
(tests/test_templates.py proves it against the official texts, whose sources plans/templates/SOURCES.md lists),
but for one change made for training: alpaca ends each response with eos_token, as Stanford Alpaca does.
`misfit` says, before rendering, why a conversation cannot be written in a family's format.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from forge.errors import ConfigError

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
    """Render as `tokenizer.apply_chat_template(messages, tokenize=False)` does for role/content messages:
    the same Jinja environment (`environment()`) and variables, with the tokenizer's special tokens
    (bos_token=..., eos_token=...). A template's raise_exception raises jinja2.TemplateError; check `misfit`
    first for named templates."""
    return _compiled(text).render(messages=messages, tools=None, documents=None,
                                  add_generation_prompt=add_generation_prompt, **special_tokens)


@lru_cache(maxsize=16)
def _compiled(text: str):
    return environment().from_string(text)


@lru_cache(maxsize=1)
def environment():
    """transformers' chat-template environment (transformers.utils.chat_template_utils, 5.x), built from
    jinja2 itself: importing transformers takes 0.7 s, a twentieth of a 100k-row prepare. A sandbox (chat
    templates are code from the Hub), trim_blocks and lstrip_blocks, loop controls, a `{% generation %}`
    block (rendered as is: labels come from our own spans), a tojson that keeps non-ASCII, raise_exception,
    strftime_now, and dict/namespace that refuse underscore names. tests/test_templates.py holds it to
    transformers' own, setting by setting and render by render."""
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from packaging.version import Version

    if Version(jinja2.__version__) < Version("3.1.6"):  # as transformers requires: older sandboxes can be escaped
        raise ConfigError(f"Chat templates need jinja2 >= 3.1.6 (its sandbox), not {jinja2.__version__}.",
                          "Upgrade it in the runner's environment: pip install -U 'jinja2>=3.1.6'.")

    class Generation(jinja2.ext.Extension):  # transformers' AssistantTracker, never tracking
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # Jinja's own signature trick, so namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env
