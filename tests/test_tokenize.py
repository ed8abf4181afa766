"""Rendering with SmolLM2's own chat template; labels on assistant tokens only (real tokenizer)."""

import pytest

from forge.runner.rows import Invalid
from forge.runner.tokenize import IGNORE, encode, load_tokenizer

CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Blue."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir, "model")


def test_text_is_the_models_own_template(tokenizer):
    encoded = encode(tokenizer, CHAT, 512)
    assert tokenizer.decode(encoded.input_ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(encoded.input_ids).startswith("<|im_start|>system\n")


def test_only_assistant_turns_are_labelled(tokenizer):
    encoded = encode(tokenizer, CHAT, 512)
    learned = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE])
    assert learned == "Red.<|im_end|>\nBlue.<|im_end|>\n"
    assert all(label in (IGNORE, token) for token, label in zip(encoded.input_ids, encoded.labels))


def test_truncation_is_reported_and_an_empty_label_mask_is_rejected(tokenizer):
    long_answer = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * 200)}]
    encoded = encode(tokenizer, long_answer, 64)
    assert encoded.truncated and len(encoded.input_ids) == 64
    long_prompt = [{"role": "user", "content": " ".join(["word"] * 200)}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(Invalid) as err:
        encode(tokenizer, long_prompt, 64)
    assert err.value.reason == "no_label_tokens"


def test_custom_template_file(tmp_path, smollm2_dir):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = load_tokenizer(smollm2_dir, str(template))
    encoded = encode(tokenizer, CHAT[:2], 512)
    assert tokenizer.decode(encoded.input_ids) == "user: Name a colour.\nassistant: Red.\n"
