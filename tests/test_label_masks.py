"""Label masks, searched for failures: over generated conversations with adversarial content, for the model's
own template and every named one and in every label mode, exactly the assistant content and what closes its
turn are learned, token by token, and nothing else.

The expectation comes from an independent writer per template (WRITERS): plain Python that writes the text
the template writes, marking which characters are an assistant turn's content or its end-of-turn marker. Its
text must equal the template's rendering (which checks the writer), and a token must be learned iff it
overlaps a marked character (the labeller's rule: byte-level BPE's " Red" carries the space before an answer).
Contents are drawn to land where a search for them would: role names, special tokens, pieces of the template
and of its default system prompt, earlier turns (also with only whitespace changed), one-character answers.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.runner.prepare.clean import clean_messages
from forge.runner.prepare.rows import Invalid
from forge.runner.prepare.templates import NAMED, misfit, traits_of
from forge.runner.prepare.tokenize import IGNORE, Encoder, chat_template_for, load_tokenizer

MODES = ("all_assistant", "last_turn", "whole_sequence")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# A written conversation: (text, owner) pieces, owner the index of the assistant message whose content or
# end-of-turn marker the text is, or None for everything else.
Pieces = list[tuple[str, "int | None"]]


def _chatml(messages, out: Pieces) -> Pieces:
    for index, message in enumerate(messages):
        out.append((f"<|im_start|>{message['role']}\n", None))
        _turn(out, index, message, message["content"], "<|im_end|>\n")
    return out


def _turn(out: Pieces, index: int, message, content: str, end: str) -> None:
    """A message's content and what closes it, owned by the message if it is an assistant's."""
    owner = index if message["role"] == "assistant" else None
    out.extend([(content, owner), (end, owner)])


def write_model(messages, sp) -> Pieces:  # SmolLM2-135M-Instruct's own template
    return _chatml(messages, [] if messages[0]["role"] == "system" else
                   [(f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n", None)])


def write_chatml(messages, sp) -> Pieces:
    return _chatml(messages, [])


def write_qwen(messages, sp) -> Pieces:
    if messages[0]["role"] != "system":
        return _chatml(messages, [(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n", None)])
    out: Pieces = [(f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n", None)]
    for index, message in enumerate(messages[1:], start=1):
        out.append((f"<|im_start|>{message['role']}\n", None))
        _turn(out, index, message, message["content"], "<|im_end|>\n")
    return out


def write_llama_3(messages, sp) -> Pieces:
    out: Pieces = [(sp["bos_token"], None)]
    for index, message in enumerate(messages):
        out.append((f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n", None))
        _turn(out, index, message, message["content"].strip(), "<|eot_id|>")
    return out


def write_gemma(messages, sp) -> Pieces:
    out: Pieces = [(sp["bos_token"], None)]
    for index, message in enumerate(messages):
        out.append((f"<start_of_turn>{'model' if message['role'] == 'assistant' else 'user'}\n", None))
        _turn(out, index, message, message["content"].strip(), "<end_of_turn>\n")
    return out


def write_mistral(messages, sp) -> Pieces:
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    out: Pieces = [(sp["bos_token"], None)]
    for index, message in enumerate(messages):
        if message["role"] == "user":
            out.append((f" [INST] {system}{message['content']} [/INST]", None))
            system = ""
        elif message["role"] == "assistant":
            out.append((" ", None))
            _turn(out, index, message, message["content"], sp["eos_token"])
    return out


def write_llama_2(messages, sp) -> Pieces:
    system = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n" if messages[0]["role"] == "system" else ""
    out: Pieces = []
    for index, message in enumerate(messages):
        if message["role"] == "user":
            out.append((f"{sp['bos_token']}[INST] {(system + message['content']).strip()} [/INST]", None))
            system = ""
        elif message["role"] == "assistant":
            out.append((" ", None))
            _turn(out, index, message, message["content"].strip(), " " + sp["eos_token"])
    return out


def write_alpaca(messages, sp) -> Pieces:
    systems = [m["content"] for m in messages if m["role"] == "system"]
    out: Pieces = [(sp["bos_token"] + (systems[-1].strip() if systems else "") + "\n\n", None)]
    headers = {"user": "### Instruction:\n", "assistant": "### Response:\n"}
    for index, message in enumerate(messages):
        if message["role"] in headers:
            out.append((headers[message["role"]], None))
            end = sp["eos_token"] if message["role"] == "assistant" else ""
            _turn(out, index, message, message["content"].strip(), end)
            if index < len(messages) - 1:
                out.append(("\n\n", None))
    return out


def write_phi_3(messages, sp) -> Pieces:
    out: Pieces = []
    for index, message in enumerate(messages):
        out.append((f"<|{message['role']}|>\n", None))
        _turn(out, index, message, message["content"], "<|end|>\n")
    last = len(messages) - 1
    out.append((sp["eos_token"], last if messages[last]["role"] == "assistant" else None))  # closes the last turn
    return out


WRITERS = {"model": write_model, "chatml": write_chatml, "qwen": write_qwen, "llama-3": write_llama_3,
           "gemma": write_gemma, "mistral": write_mistral, "llama-2": write_llama_2, "alpaca": write_alpaca,
           "phi-3": write_phi_3}
assert set(WRITERS) == {"model", *NAMED}


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir):
    """SmolLM2's tokenizer, loaded once, with each template."""
    base = load_tokenizer(smollm2_dir, "model")
    return {name: _with_template(base, chat_template_for(name, smollm2_dir)) for name in WRITERS}


def _with_template(tokenizer, template: str):
    clone = copy.copy(tokenizer)
    clone.chat_template = template
    return clone


def adversarial_texts(tokenizer, name: str) -> list[str]:
    """Texts that occur in this template's renderings: role names, special tokens, the template's own pieces
    (from its writer) and the words of its default system prompt."""
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}]
    if misfit(name, probe):
        probe = probe[1:]
    pieces = [text for text, owner in WRITERS[name](probe, tokenizer.special) if text and text not in "SUA"]
    specials = [token.content for token in tokenizer.backend.get_added_tokens_decoder().values()]
    fixed = ["user", "assistant", "system", "model", "<|assistant|>", "<|end|>", "[INST]", "[/INST]", "</s>", "<s>",
             "<|eot_id|>", "### Response:", "<end_of_turn>", "<|im_end|>\n", "\n", " "]
    prompts = [SMOLLM2_SYSTEM, QWEN_SYSTEM, "Hugging Face", "SmolLM", "helpful", "You are"]
    return sorted({*pieces, *specials, *tokenizer.special.values(), *fixed, *prompts})


@st.composite
def conversations(draw, texts: list[str], name: str):
    """A conversation prepare could hand the labeller: an optional system message, then user/assistant turns
    ending with the assistant's; contents drawn to collide with the template and with each other."""
    earlier: list[str] = []

    def content() -> str:
        kind = draw(st.sampled_from(["adversarial", "piece", "letter", "earlier", "whitespace", "text"]))
        if kind == "adversarial":
            text = draw(st.sampled_from(texts))
        elif kind == "piece":  # a slice of a template piece or prompt, and maybe a letter glued on
            whole = draw(st.sampled_from(texts))
            start = draw(st.integers(0, len(whole)))
            text = whole[start:draw(st.integers(start, len(whole)))] + draw(st.sampled_from(["", "A", " B"]))
        elif kind == "letter":
            text = draw(st.sampled_from("ABCDabcd1.?"))
        elif kind in ("earlier", "whitespace") and earlier:
            text = draw(st.sampled_from(earlier))
            if kind == "whitespace":
                text = draw(st.sampled_from([" {}", "{} ", "\n{}", "{}\n", " {} ", "{}\n\n"])).format(text)
        else:
            text = draw(st.text(st.sampled_from(list("ab AB.\n?é日🎉<|>")), min_size=1, max_size=12))
        if not text.strip():  # prepare rejects empty turns before they get here
            text += "x"
        earlier.append(text)
        return text

    messages = []
    if (traits_of(name) is None or traits_of(name).system) and draw(st.booleans()):
        messages.append({"role": "system", "content": content()})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": content()})
        messages.append({"role": "assistant", "content": content()})
    return clean_messages(messages)[0] if draw(st.booleans()) else messages  # as prepare hands them over, or raw


def expected(tokenizer, pieces: Pieces, messages, mode: str) -> tuple[list[int], list[int]]:
    """Ids of the written text, and the labels the mode asks for: a token is learned iff it overlaps a marked
    character (assistant content or end-of-turn marker; only the last assistant turn's for last_turn)."""
    last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    marked, cursor = [], 0
    for text, owner in pieces:
        if mode == "whole_sequence" or (owner is not None and (mode == "all_assistant" or owner == last)):
            marked.append((cursor, cursor + len(text)))
        cursor += len(text)
    (encoding,) = tokenizer.encode(["".join(text for text, _ in pieces)])
    return encoding.ids, [token if any(s < end and e > start for s, e in marked) else IGNORE
                          for token, (start, end) in zip(encoding.ids, encoding.offsets)]


def _show(tokenizer, ids, labels) -> str:
    return json.dumps([(tokenizer.decode([int(t)]), int(l) != IGNORE) for t, l in zip(ids, labels)], ensure_ascii=False)


@pytest.mark.parametrize("name", list(WRITERS))
def test_exactly_the_assistant_turns_and_their_ends_are_learned(tokenizers, name):
    tokenizer = tokenizers[name]
    encoders = {mode: Encoder(tokenizer, mode) for mode in MODES}
    texts = adversarial_texts(tokenizer, name)

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(conversations(texts, name), min_size=1, max_size=3))
    def check(batch):
        batch = [messages for messages in batch if misfit(name, messages) is None]
        written = [WRITERS[name](messages, tokenizer.special) for messages in batch]
        for messages, pieces in zip(batch, written):
            assert "".join(text for text, _ in pieces) == tokenizer.render(messages), "the writer is wrong"
        for mode, encoder in encoders.items():
            for messages, pieces, encoded in zip(batch, written, encoder.encode_batch(batch), strict=True):
                assert not isinstance(encoded, Invalid), f"{name}/{mode}: rejected: {encoded.reason}: {encoded}"
                ids, labels = expected(tokenizer, pieces, messages, mode)
                assert encoded[0].tolist() == ids
                assert encoded[1].tolist() == labels, (
                    f"{name}/{mode}: {json.dumps(messages, ensure_ascii=False)}\n"
                    f"got      {_show(tokenizer, ids, encoded[1])}\nexpected {_show(tokenizer, ids, labels)}")

    check()



def _prepared(tmp_path, model_cache, smollm2_dir, rows: list[dict], template: str) -> tuple[dict, list[dict]]:
    """forge prepare (in-process) over `rows` with `template`: its stats and the train split's rows."""
    import pyarrow.parquet as pq

    from forge.contract.plan import DedupSpec, SplitSpec
    from forge.runner.prepare.pipeline import dataset_dir, prepare
    from tests.test_prepare import make_plan

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    plan = make_plan(tmp_path, model_cache, [data], dedup=DedupSpec(exact=False, near=False), split=SplitSpec(val=0.0))
    plan = plan.model_copy(update={"model": plan.model.model_copy(update={"chat_template": template})})
    prepare(plan)
    target = dataset_dir(plan, smollm2_dir)
    return (json.loads((target / "stats.json").read_text()),
            [row for shard in sorted((target / "train").glob("*.parquet")) for row in pq.read_table(shard).to_pylist()])


def test_prepare_with_phi_3_keeps_multiple_choice_rows_and_learns_each_letter(tmp_path, model_cache, smollm2_dir):
    """One-letter answers, multi-turn, with a template that ends every rendering with eos_token: every row is
    kept (the run used to fail as a whole) and each learns its letters, each turn's end and the final eos."""
    letters = "abcd"  # "a" also occurs in "<|assistant|>"
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: (a) red (b) green (c) blue (d) grey?"},
                          {"role": "assistant", "content": letters[i % 4]},
                          {"role": "user", "content": "And the next one? a, b, c or d"},
                          {"role": "assistant", "content": letters[(i + 1) % 4]}]} for i in range(12)]
    stats, train = _prepared(tmp_path, model_cache, smollm2_dir, rows, "phi-3")
    assert stats["accounting"]["rows_in"] == stats["accounting"]["kept"] == 12 and stats["accounting"]["balanced"]
    tokenizer = load_tokenizer(smollm2_dir, "phi-3")
    learned = sorted(tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE])
                     for row in train)
    assert learned == sorted(f"{letters[i % 4]}<|end|>\n{letters[(i + 1) % 4]}<|end|>\n<|im_end|>" for i in range(12))


def test_prepare_rejects_a_row_the_labeller_cannot_handle_and_keeps_the_rest(tmp_path, model_cache, smollm2_dir):
    """A template that rewrites an answer ("shout" upper-cased) and writes the last turn differently leaves a
    row with a rewritten middle turn unlocatable: that row is a reject with its reason, counted in the
    accounting, and the run goes on."""
    template = tmp_path / "shouty.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{% if loop.last %}(last){% endif %}\n"
                        "{{ m['content'] | upper if m['content'] == 'shout' else m['content'] }}</s>\n{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": f"Say {word}"}, {"role": "assistant", "content": word},
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": "ok"}]}
            for word in ("hello", "shout", "bye")]
    stats, train = _prepared(tmp_path, model_cache, smollm2_dir, rows, str(template))
    assert stats["accounting"] == {**stats["accounting"], "rows_in": 3, "kept": 2, "rejected": 1, "balanced": True}
    assert stats["rejected"] == {"template_unlabelable": 1}
    assert len(train) == 2
