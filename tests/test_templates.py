"""Named chat templates: byte-identical to the official templates, misfit() agrees with them, specs resolve.

The official texts are kept verbatim in tests/fixtures/official_templates/ (sources: plans/templates/SOURCES.md).
Every conversation is rendered through ours and the official one with the same special tokens, with and
without the generation prompt; where the official raises, ours must raise the same error. Where ours differs
on purpose (alpaca's eos_token after each response), the official text is compared with that change applied.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest

from forge.errors import ConfigError
from forge.runner.prepare.templates import NAMED, TRAITS, Traits, misfit, render, template_text, traits_of

REPO = Path(__file__).resolve().parents[1]
OURS = REPO / "plans" / "templates"
OFFICIAL = REPO / "tests" / "fixtures" / "official_templates"

# Each family's special tokens as its tokenizer_config.json has them; apply_chat_template passes them all.
TOKENS = {
    "chatml": {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"},  # OpenHermes-2.5-Mistral-7B
    "llama-2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "llama-3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "alpaca": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},  # LLaMA, which Alpaca tuned
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "phi-3": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
    "qwen": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},  # Qwen2.5 Instruct has no bos_token
}
# Tokens that no template spells out: equal output with these shows ours reads bos_token/eos_token exactly
# where the official does, instead of writing the family's literal tokens.
STAND_INS = {"bos_token": "[BOS]", "eos_token": "[EOS]"}


def system(text="You are a terse assistant."):
    return {"role": "system", "content": text}


def user(text="What is the capital of France?"):
    return {"role": "user", "content": text}


def assistant(text="Paris."):
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "user only": [user()],
    "single turn": [user(), assistant()],
    "multi-turn": [user(), assistant(), user("And of Italy?"), assistant("Rome.")],
    "multi-turn, ends with user": [user(), assistant(), user("And of Italy?")],
    "system, single turn": [system(), user(), assistant()],
    "system, multi-turn": [system(), user(), assistant(), user("And of Italy?"), assistant("Rome.")],
    "system, ends with user": [system(), user()],
    "system only": [system()],
    "whitespace": [user("  \n\tpadded question \n"), assistant("\n  padded answer\t\n\n"), user(" again "),
                   assistant("   ")],
    "whitespace, system": [system("\n  padded system  \n"), user("  question\n"), assistant(" answer  ")],
    "unicode and newlines": [system("Réponds en français. 日本語も可。"),
                             user("Grüße! 🚀\nLine two\n\n- a bullet\r\n- another"),
                             assistant("Naïve café — “quoted” ‘text’…\n\n```py\nprint('\\n')\n```")],
    "template syntax and special tokens in content": [
        user("{{ bos_token }} {% if true %}x{% endif %} {# c #} <|im_end|> [INST] <end_of_turn>"),
        assistant("</s><|eot_id|>{{ eos_token }}"),
    ],
    "two users": [user(), user("Hello?")],
    "assistant first": [assistant(), user()],
    "two assistants": [user(), assistant(), assistant("Also Lyon.")],
    "system, then assistant": [system(), assistant()],
    "system mid-conversation": [user(), assistant(), system("Now answer in French."), user("And of Italy?")],
    "two systems": [system(), system("Be kind."), user(), assistant()],
}


# Where ours deliberately differs from the official text (plans/templates/SOURCES.md says why): the official
# text with these replacements is what ours must render byte for byte.
CHANGES = {
    "alpaca": [("### Response:\n{{ message['content']|trim -}}",  # each response ends with eos_token
                "### Response:\n{{ message['content']|trim + eos_token -}}")],
}


def official(name: str) -> str:
    """The official template's text, with our documented changes (CHANGES) applied."""
    text = (OFFICIAL / f"{name}.jinja").read_text(encoding="utf-8")
    for old, new in CHANGES.get(name, []):
        assert text.count(old) == 1, f"{name}: the official text no longer has {old!r} once"
        text = text.replace(old, new)
    return text


def outcome(text: str, messages, add_generation_prompt: bool, tokens: dict[str, str]):
    """What rendering gives: the text, or the template's exception as (type, message)."""
    try:
        return render(text, messages, add_generation_prompt, **tokens)
    except jinja2.TemplateError as exc:
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("tokens", ["family", "stand-ins"])
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["plain", "generation-prompt"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", NAMED)
def test_renders_exactly_what_the_official_template_renders(name, conversation, add_generation_prompt, tokens):
    messages = CONVERSATIONS[conversation]
    special = TOKENS[name] if tokens == "family" else STAND_INS
    expected = outcome(official(name), messages, add_generation_prompt, special)
    assert outcome(template_text(name), messages, add_generation_prompt, special) == expected


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", NAMED)
def test_misfit_accepts_exactly_what_the_official_template_renders(name, conversation):
    messages = CONVERSATIONS[conversation]
    official_renders = isinstance(outcome(official(name), messages, False, TOKENS[name]), str)
    assert (misfit(name, messages) is None) == official_renders


@pytest.mark.parametrize(("name", "conversation", "reason"), [
    ("gemma", "system, single turn", "system_unsupported"),
    ("gemma", "two users", "not_alternating"),
    ("gemma", "assistant first", "not_alternating"),
    ("llama-2", "two assistants", "not_alternating"),
    ("llama-2", "system, then assistant", "not_alternating"),
    ("llama-2", "two systems", "system_unsupported"),
    ("mistral", "system mid-conversation", "system_unsupported"),
    ("mistral", "two users", "not_alternating"),
    ("mistral", "system, multi-turn", None),
    ("chatml", "two users", None),
    ("qwen", "system mid-conversation", None),
    ("phi-3", "assistant first", None),
])
def test_misfit_names_the_reason(name, conversation, reason):
    assert misfit(name, CONVERSATIONS[conversation]) == reason


def test_misfit_is_stricter_where_the_official_template_silently_misrenders():
    late_system = [user(), system("Answer in French.")]
    # Llama 2 drops a system message at an odd position; Gemma writes it as a "system" turn it never saw.
    assert "French" not in render(official("llama-2"), late_system, **TOKENS["llama-2"])
    assert "<start_of_turn>system\nAnswer in French." in render(official("gemma"), late_system, **TOKENS["gemma"])
    assert misfit("llama-2", late_system) == misfit("gemma", late_system) == "system_unsupported"
    for name in ("llama-2", "gemma"):
        assert outcome(template_text(name), late_system, False, TOKENS[name]) == \
            outcome(official(name), late_system, False, TOKENS[name])


@pytest.mark.parametrize("name", NAMED)
def test_an_empty_conversation_never_fits(name):
    assert misfit(name, []) == "empty"
    for add_generation_prompt in (False, True):
        assert outcome(template_text(name), [], add_generation_prompt, TOKENS[name]) == \
            outcome(official(name), [], add_generation_prompt, TOKENS[name])


@pytest.mark.parametrize("name", NAMED)
def test_traits_match_what_the_official_template_accepts(name):
    with_system = [system("Answer in French."), user(), assistant()]
    system_renders = outcome(official(name), with_system, False, TOKENS[name])
    assert TRAITS[name].system == (isinstance(system_renders, str) and "Answer in French." in system_renders)
    not_alternating = outcome(official(name), CONVERSATIONS["two users"], False, TOKENS[name])
    assert TRAITS[name].alternation == (not isinstance(not_alternating, str))
    assert traits_of(name) == TRAITS[name]


def test_traits_table():
    assert {name: (t.system, t.alternation) for name, t in TRAITS.items()} == {
        "chatml": (True, False),
        "llama-2": (True, True),
        "llama-3": (True, False),
        "alpaca": (True, False),
        "gemma": (False, True),
        "mistral": (True, True),
        "phi-3": (True, False),
        "qwen": (True, False),
    }


FORMATS = {  # the documented prompt formats, for [system?, user, assistant, user] with the generation prompt
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama-2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]",
    "llama-3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
              "### Instruction:\nBye### Response:\n",
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] Bye [/INST]",
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
             "<|user|>\nBye<|end|>\n<|assistant|>\n",
    "qwen": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", NAMED)
def test_renders_the_documented_format(name):
    messages = [user("Hi"), assistant("Hello!"), user("Bye")]
    if TRAITS[name].system:
        messages = [system("Be brief."), *messages]
    assert render(template_text(name), messages, add_generation_prompt=True, **TOKENS[name]) == FORMATS[name]


def test_qwen_writes_its_default_system_prompt():
    rendered = render(template_text("qwen"), [user("Hi")], **TOKENS["qwen"])
    assert rendered.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def _tiny_tokenizer(special: dict[str, str]):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<unk>", *sorted(set(special.values()) - {"<unk>"})])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{"unk_token": "<unk>", **special})


@pytest.mark.parametrize("name", NAMED)
def test_render_is_what_apply_chat_template_gives(name):
    tokenizer = _tiny_tokenizer(TOKENS[name])
    text = template_text(name)
    for conversation in ("system, multi-turn", "multi-turn, ends with user", "whitespace"):
        messages = CONVERSATIONS[conversation]
        if misfit(name, messages):
            continue
        for add_generation_prompt in (False, True):
            expected = tokenizer.apply_chat_template(
                messages, chat_template=text, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert render(text, messages, add_generation_prompt, **tokenizer.special_tokens_map) == expected


PROBE = """{%- set ns = namespace(count=0) %}
    {% for message in messages %}
        {% if loop.index > 2 %}{% break %}{% endif %}
        {{ message | tojson }}
        {% set ns.count = ns.count + 1 %}
    {% endfor %}
{{ ns.count }}|{{ bos_token }}|{{ add_generation_prompt }}|{{ tools }}
{% if messages | length > 3 %}{{ raise_exception('too long: ' ~ messages | length) }}{% endif %}"""


def test_render_uses_the_environment_apply_chat_template_uses():
    """trim_blocks, lstrip_blocks, loop controls, namespaces, a tojson that keeps non-ASCII, raise_exception."""
    tokenizer = _tiny_tokenizer(TOKENS["llama-2"])
    messages = [user("Grüße <b>"), assistant("ok"), user("more")]
    expected = tokenizer.apply_chat_template(messages, chat_template=PROBE, tokenize=False, add_generation_prompt=True)
    assert render(PROBE, messages, True, **tokenizer.special_tokens_map) == expected
    assert '{"role": "user", "content": "Grüße <b>"}' in expected and "more" not in expected
    assert expected.endswith("\n2|<s>|True|None\n")
    with pytest.raises(jinja2.TemplateError, match="too long: 4"):
        render(PROBE, [*messages, assistant()])


def test_the_environment_is_transformers_own():
    """Built from jinja2 (importing transformers costs 0.7 s), so held to transformers' setting by setting."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from forge.runner.prepare.templates import environment

    ours, theirs = environment(), _compile_jinja_template(PROBE).environment
    assert type(ours) is type(theirs)
    assert (ours.trim_blocks, ours.lstrip_blocks, ours.autoescape) == (theirs.trim_blocks, theirs.lstrip_blocks,
                                                                       theirs.autoescape)
    assert set(ours.globals) == set(theirs.globals) and set(ours.filters) == set(theirs.filters)
    assert {tag for ext in ours.extensions.values() for tag in ext.tags} == \
        {tag for ext in theirs.extensions.values() for tag in ext.tags}
    value = {"b": ["é", 1], "a": None}
    for options in ({}, {"indent": 2}, {"sort_keys": True, "separators": (",", ":")}, {"ensure_ascii": True}):
        assert ours.filters["tojson"](value, **options) == theirs.filters["tojson"](value, **options)


GENERATION = """{% for message in messages %}{{ message['role'] }}: {% if message['role'] == 'assistant' %}\
{% generation %} {{ message['content'] }}{% set inner = 1 %}{{ loop.index }} {% endgeneration %}\
{% else %}{{ message['content'] }}{% endif %}{{ inner | default('-') }}
{% endfor %}{{ dict(a=1) | tojson }}"""


@pytest.mark.parametrize("template", [GENERATION, "{% set ns = namespace(_x=1) %}", "{{ ''.__class__.__mro__ }}",
                                      "{% set ns = namespace() %}{% set ns._y = 2 %}{{ ns._y }}",
                                      "{{ dict.fromkeys(['a']) }}{{ strftime_now('%Y') | length }}"])
def test_generation_blocks_and_the_sandbox_behave_as_in_apply_chat_template(template):
    tokenizer = _tiny_tokenizer(TOKENS["chatml"])
    messages = [user("hi"), assistant("yo"), user("more"), assistant("ok")]
    try:
        expected = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except jinja2.TemplateError as error:
        with pytest.raises(type(error)):
            render(template, messages)
    else:
        assert render(template, messages) == expected


def test_a_jinja2_whose_sandbox_can_be_escaped_is_refused(monkeypatch):
    from forge.runner.prepare.templates import environment

    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    environment.cache_clear()
    try:
        with pytest.raises(ConfigError, match="jinja2 >= 3.1.6"):
            environment()
    finally:
        environment.cache_clear()


def test_rendering_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys; from forge.runner.prepare.templates import render, template_text; "
            "render(template_text('chatml'), [{'role': 'user', 'content': 'x'}]); "
            "print('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_every_named_template_ships_with_an_official_fixture_and_traits():
    assert {path.stem for path in OURS.glob("*.jinja")} == set(NAMED)
    assert {path.stem for path in OFFICIAL.glob("*.jinja")} == set(NAMED)
    assert set(TRAITS) == set(NAMED)


@pytest.mark.parametrize("name", NAMED)
def test_template_text_reads_the_packaged_file(name):
    assert template_text(name) == (OURS / f"{name}.jinja").read_text(encoding="utf-8")


def test_fixtures_are_the_texts_sources_md_records():
    sources = (OURS / "SOURCES.md").read_text(encoding="utf-8")
    recorded = dict(re.findall(r"^\| `([\w-]+)` \|.*\| `([0-9a-f]{64})` \|$", sources, flags=re.MULTILINE))
    assert set(recorded) == set(NAMED)
    for name, digest in recorded.items():
        assert hashlib.sha256((OFFICIAL / f"{name}.jinja").read_bytes()).hexdigest() == digest, name


def test_a_custom_template_file(tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}{{ eos_token }}", encoding="utf-8")
    text = template_text(str(path))
    assert render(text, [user("Hi")], add_generation_prompt=True, eos_token="</s>") == "user: Hi\nassistant: </s>"
    assert traits_of(str(path)) is None
    assert misfit(str(path), CONVERSATIONS["two users"]) is None


def test_the_models_own_template():
    tokenizer = SimpleNamespace(chat_template="{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    text = template_text("model", tokenizer)
    assert render(text, [user("a"), assistant("b")], bos_token="<s>") == "<s>[a][b]"
    assert traits_of("model") is None
    assert misfit("model", CONVERSATIONS["system, then assistant"]) is None
    several = SimpleNamespace(chat_template={"default": "{{ 'chat' }}", "tool_use": "{{ 'tools' }}"})
    assert template_text("model", several) == "{{ 'chat' }}"


@pytest.mark.parametrize("tokenizer", [SimpleNamespace(chat_template=None), SimpleNamespace(), None],
                         ids=["no template", "no attribute", "no tokenizer"])
def test_a_model_without_a_template_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError) as err:
        template_text("model", tokenizer)
    assert "no chat template" in err.value.message
    assert all(name in err.value.hint for name in NAMED)


def test_an_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        template_text("llama2")
    assert err.value.message == "Unknown chat template 'llama2'."
    assert "llama-2" in err.value.hint and "'model'" in err.value.hint


def test_a_missing_file_is_a_config_error(tmp_path):
    missing = tmp_path / "templates" / "mine.jinja"
    with pytest.raises(ConfigError) as err:
        template_text(str(missing))
    assert err.value.message == f"Chat template file not found: {missing}."


def test_traits_is_a_value_object():
    assert Traits(system=True, alternation=False) == TRAITS["chatml"]
    with pytest.raises(AttributeError):
        TRAITS["chatml"].system = False  # type: ignore[misc]
