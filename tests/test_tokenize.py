"""Rendering with a chat template and labelling only what the model should learn (real SmolLM2 tokenizer)."""

import numpy as np
import pytest

from forge.errors import ConfigError
from forge.runner.prepare.rows import Invalid
from forge.runner.prepare.templates import NAMED, misfit
from forge.runner.prepare.tokenize import IGNORE, Encoder, load_tokenizer

CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Blue."},
]


def learned(tokenizer, ids, labels) -> str:
    return tokenizer.decode([int(t) for t, label in zip(ids, labels) if label != IGNORE])


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir, "model")


def test_same_text_and_ids_as_transformers(tokenizer, smollm2_dir):
    """Prepare avoids importing transformers' model stack; it must still match it token for token."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_dir)
    text = reference.apply_chat_template(CHAT, tokenize=False)
    ((ids, _),) = Encoder(tokenizer).encode_batch([CHAT])
    assert tokenizer.render(CHAT) == text and text.startswith("<|im_start|>system\n")
    assert ids.tolist() == reference(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("mode, expected", [
    ("all_assistant", "Red.<|im_end|>\nBlue.<|im_end|>\n"),
    ("last_turn", "Blue.<|im_end|>\n"),
])
def test_label_modes(tokenizer, mode, expected):
    ((ids, labels),) = Encoder(tokenizer, mode).encode_batch([CHAT])
    assert learned(tokenizer, ids, labels) == expected
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels))


def test_whole_sequence_learns_everything(tokenizer):
    ((ids, labels),) = Encoder(tokenizer, "whole_sequence").encode_batch([CHAT])
    assert labels.tolist() == ids.tolist()


@pytest.mark.parametrize("name", ["model", "chatml", "qwen", "llama-3", "gemma"])
def test_spans_agree_with_rendering_each_prefix(smollm2_dir, name):
    """For templates that render a conversation as a prefix of its continuation, an assistant turn spans from
    the end of the generation prompt before it to the end of the conversation that ends with it."""
    encoder = Encoder(load_tokenizer(smollm2_dir, name))
    text, spans = encoder.render(CHAT)
    assert spans == [(len(encoder._render(CHAT[:index], add_generation_prompt=True)),
                      len(encoder._render(CHAT[:index + 1]))) for index in (1, 3)]


MULTIPLE_CHOICE = [{"role": "user", "content": "Which is a prime? A) 4 B) 7"}, {"role": "assistant", "content": "B"},
                   {"role": "user", "content": "Which is even? A) 4 B) 7"}, {"role": "assistant", "content": "A"}]


def test_one_letter_answers_with_a_template_that_closes_every_rendering(smollm2_dir):
    """phi-3 ends every rendering with eos_token, so no rendering of a prefix is a prefix of the whole: one-letter
    answers (which also occur in the questions and in "<|assistant|>") are still located, each with its end."""
    tokenizer = load_tokenizer(smollm2_dir, "phi-3")
    ((ids, labels),) = Encoder(tokenizer).encode_batch([MULTIPLE_CHOICE])
    assert learned(tokenizer, ids, labels) == "B<|end|>\nA<|end|>\n<|im_end|>"  # SmolLM2's eos_token closes it


# Upper-cases content that starts with "shout" (no form of it fits its slot) and marks the last message (so a
# turn renders differently once more follow); refuses "boom".
ODD = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no booms') }}{% endif %}"
       "<{{ m['role'] }}>{% if loop.last %}(last){% endif %}\n"
       "{{ m['content'] | upper if m['content'].startswith('shout') else m['content'] }}</s>\n{% endfor %}")


def test_a_template_that_rewrites_content_is_labelled_turn_by_turn_or_the_row_rejected(smollm2_dir, tmp_path):
    """Rewritten content is placed by rendering up to each turn; where that cannot work either (a rewritten
    turn followed by more) or the template raises, that row is a reject with its reason, and the rows around it
    are encoded as usual."""
    path = tmp_path / "odd.jinja"
    path.write_text(ODD)
    encoder = Encoder(load_tokenizer(smollm2_dir, str(path)))
    shout = {"role": "assistant", "content": "shout it"}
    rows = [CHAT, [CHAT[0], shout], [CHAT[0], shout, *CHAT[2:]], [CHAT[0], {"role": "assistant", "content": "boom"}],
            CHAT[:2]]
    good, rewritten, unlocatable, refused, short = encoder.encode_batch(rows)
    assert learned(encoder.tokenizer, *good) == "Red.</s>\nBlue.</s>\n"
    assert learned(encoder.tokenizer, *rewritten) == "SHOUT IT</s>\n"
    assert isinstance(unlocatable, Invalid) and unlocatable.reason == "template_unlabelable"
    assert isinstance(refused, Invalid) and refused.reason == "template_error" and "no booms" in str(refused)
    assert learned(encoder.tokenizer, *short) == "Red.</s>\n"


@pytest.mark.parametrize("name", NAMED)
def test_every_named_template_labels_each_answer_and_its_end(smollm2_dir, name):
    tokenizer = load_tokenizer(smollm2_dir, name)
    ((ids, labels),) = Encoder(tokenizer).encode_batch([CHAT])
    text = learned(tokenizer, ids, labels)
    assert "Red." in text and "Blue." in text and "Name a colour" not in text and "Another" not in text


def test_custom_template_file_and_missing_one(tmp_path, smollm2_dir):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = load_tokenizer(smollm2_dir, str(template))
    ((ids, labels),) = Encoder(tokenizer).encode_batch([CHAT[:2]])
    assert tokenizer.decode(ids.tolist()) == "user: Name a colour.\nassistant: Red.\n"
    assert learned(tokenizer, ids, labels) == " Red.\n"  # byte-level BPE: the space belongs to the answer token
    with pytest.raises(ConfigError):
        load_tokenizer(smollm2_dir, str(tmp_path / "nope.jinja"))


@pytest.mark.parametrize("template", ["model", "bare"])
def test_batch_labels_match_labelling_each_row_alone(smollm2_dir, tmp_path, template):
    """Labels for a whole batch must be what each row's spans give it alone: a token is learned iff it
    overlaps a learned span. The bare template ends a turn with nothing, so a span can end inside a
    multi-byte character that byte-level BPE splits into several tokens."""
    if template == "bare":
        (tmp_path / "bare.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}")
        template = str(tmp_path / "bare.jinja")
    tokenizer = load_tokenizer(smollm2_dir, template)
    encoder = Encoder(tokenizer)
    batch = [CHAT, CHAT[:2], [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}],
             [{"role": "system", "content": "Be terse."}, *CHAT],
             [{"role": "user", "content": "🎉 Party?"}, {"role": "assistant", "content": "🎉🎉 wörld 日本語🎉"}],
             [{"role": "user", "content": "Émoji"}, {"role": "assistant", "content": "é"}]]
    for conversation, (ids, labels) in zip(batch, encoder.encode_batch(batch), strict=True):
        text, spans = encoder.render(conversation)
        (encoding,) = tokenizer.encode([text])
        expected = [token if any(s < end and e > start for s, e in spans) else IGNORE
                    for token, (start, end) in zip(encoding.ids, encoding.offsets)]
        assert ids.tolist() == encoding.ids and labels.tolist() == expected


@pytest.mark.parametrize("name", ["model", *NAMED])
@pytest.mark.parametrize("mode", ["all_assistant", "last_turn", "whole_sequence"])
def test_fixed_prefix_is_tokenized_once_with_the_same_result(smollm2_dir, name, mode):
    """The rendered start every row shares (SmolLM2's default system prompt) is tokenized once; ids and labels
    must be exactly what tokenizing each whole text gives."""
    tokenizer = load_tokenizer(smollm2_dir, name)
    cached, plain = Encoder(tokenizer, mode), Encoder(tokenizer, mode)
    plain.prefix, plain.prefix_ids = "", []
    batch = [CHAT, CHAT[:2], [{"role": "system", "content": "Be terse."}, *CHAT],
             [{"role": "user", "content": "<|im_start|> sneaky"}, {"role": "assistant", "content": "🎉 ok\n\n"}],
             [{"role": "user", "content": " leading space"}, {"role": "assistant", "content": "日本語"}]]
    batch = [conversation for conversation in batch if misfit(name, conversation) is None]
    for (ids, labels), (expected_ids, expected_labels) in zip(cached.encode_batch(batch), plain.encode_batch(batch)):
        assert ids.tolist() == expected_ids.tolist() and labels.tolist() == expected_labels.tolist()
    if name in ("model", "qwen"):  # templates with a default system prompt: the cache has real work to save
        assert len(cached.prefix_ids) > 10


def _offset_labels(encoder, batch):
    """The reference: each row encoded alone with character offsets, a token learned iff it overlaps a span."""
    for conversation in batch:
        text, spans = encoder.render(conversation)
        (encoding,) = encoder.tokenizer.encode([text])
        yield encoding.ids, [token if any(s < end and e > start for s, e in spans) else IGNORE
                             for token, (start, end) in zip(encoding.ids, encoding.offsets)]


def _random_conversations(count: int, seed: int):
    """Texts built to stress byte accounting: multi-byte characters, emoji, whitespace runs, special tokens."""
    import random

    rng = random.Random(seed)
    pieces = ["a", "Red", " ", "  ", "\n", "\n\n", "\t", "é", "日本", "🎉", "wörld", ".", "<|im_end|>", "x" * 40,
              "\u200b", "Ω", "’", "1234", " 🎉 "]
    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))).strip() or "z"
    return [[message for turn in range(rng.randint(1, 3))
             for message in ({"role": "user", "content": text()}, {"role": "assistant", "content": text()})]
            for _ in range(count)]


@pytest.mark.parametrize("mode", ["all_assistant", "last_turn", "whole_sequence"])
def test_byte_level_labels_match_offset_labels(tokenizer, mode):
    """Byte-level tokenizers (SmolLM2's) are labelled from token byte lengths without computing offsets; on
    random texts full of multi-byte characters and whitespace runs that must equal the offsets' answer."""
    assert tokenizer.token_bytes is not None, "SmolLM2's byte-level BPE should take the byte path"
    encoder = Encoder(tokenizer, mode)
    batch = _random_conversations(300, seed=7)
    for (ids, labels), (expected_ids, expected_labels) in zip(
            encoder.encode_batch(batch), _offset_labels(encoder, batch), strict=True):
        assert ids.tolist() == expected_ids and labels.tolist() == expected_labels


def test_tokens_that_do_not_add_up_to_the_text_fall_back_to_offsets(smollm2_dir):
    """An added token that strips the whitespace around it covers bytes no token length accounts for: the
    batch must then be labelled from offsets, not from misaligned byte counts."""
    from tokenizers import AddedToken

    tokenizer = load_tokenizer(smollm2_dir, "model")
    tokenizer.backend.add_tokens([AddedToken("[MARK]", lstrip=True, rstrip=True)])
    tokenizer.token_bytes = np.append(tokenizer.token_bytes, len("[MARK]"))
    encoder = Encoder(tokenizer)
    batch = [[{"role": "user", "content": "a   [MARK]   b"}, {"role": "assistant", "content": "c   [MARK]   d"}],
             *_random_conversations(20, seed=3)]
    assert _byte_labels_of(encoder, batch) is None
    for (ids, labels), (expected_ids, expected_labels) in zip(
            encoder.encode_batch(batch), _offset_labels(encoder, batch), strict=True):
        assert ids.tolist() == expected_ids and labels.tolist() == expected_labels


def _byte_labels_of(encoder, batch):
    from forge.runner.prepare.tokenize import _byte_labels

    rendered = [encoder.render(conversation) for conversation in batch]
    ids = [encoder.tokenizer.encode_ids([text])[0] for text, _ in rendered]
    counts = np.array([len(row) for row in ids])
    return _byte_labels(np.array([t for row in ids for t in row], dtype=np.int32), counts, rendered,
                        encoder.tokenizer.token_bytes)


def test_only_byte_level_tokenizers_take_the_byte_path(tmp_path):
    """A normalizer or trimmed offsets break the bytes-equal-tokens identity: such tokenizers keep offsets."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from forge.runner.prepare.tokenize import _token_bytes

    def tokenizer(normalizer=None, processor=None):
        built = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
        built.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if normalizer:
            built.normalizer = normalizer
        if processor:
            built.post_processor = processor
        return built

    assert _token_bytes(tokenizer()) is not None
    assert _token_bytes(tokenizer(normalizers.Lowercase())) is None
    assert _token_bytes(tokenizer(processor=processors.ByteLevel(trim_offsets=True))) is None
    assert _token_bytes(tokenizer(processor=processors.Sequence([processors.ByteLevel(trim_offsets=False)]))) \
        is not None
