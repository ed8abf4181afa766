"""Gold-set scoring: what counts as an exact match and as a well-formed answer, per row and per tag."""

import json

import pytest

from forge.contract.plan import EvalSpec
from forge.errors import DataError
from forge.runner.gold import exact, read_gold, summarise, well_formed


@pytest.mark.parametrize("output, answer, expected", [
    ("Paris.", "Paris.", True),
    ("  Paris.\n", "Paris.", True),           # surrounding and repeated whitespace do not count
    ("The  capital\nis Paris", "The capital is Paris", True),
    ("paris.", "Paris.", False),              # case does
    ("Paris", "Paris.", False),               # and punctuation
])
def test_exact_match(output, answer, expected):
    assert exact(output, answer) is expected


@pytest.mark.parametrize("output, answer, spec, stopped, expected", [
    ('{"a": 1}', '{"b": 2}', {}, True, True),                 # auto: JSON object answer wants a JSON object
    ('[1, 2]', '{"b": 2}', {}, True, False),                  # a list is JSON, but not the answer's kind
    ('{"a": 1', '{"b": 2}', {}, True, False),                 # truncated JSON
    ("42", "17", {}, True, True),                             # auto: a number wants a number
    ("1,234.5", "17", {}, True, True),
    ("forty-two", "17", {}, True, False),
    ("Some prose.", "Other prose.", {}, True, True),          # text: non-empty and ended by the model
    ("Some prose that went on and", "Other prose.", {}, False, False),
    ("", "Other prose.", {}, True, False),
    ("A) yes", "B) no", {"format_regex": r"[A-D]\) .+"}, True, True),
    ("yes", "B) no", {"format_regex": r"[A-D]\) .+"}, True, False),
    ("12", "some text", {"format": "number"}, True, True),     # an explicit format overrides the answer's kind
])
def test_well_formed(output, answer, spec, stopped, expected):
    assert well_formed(output, answer, EvalSpec(**spec), stopped) is expected


def test_summary_is_sliced_by_tags():
    scored = [{"tags": {"source": "human"}, "exact_match": True, "well_formed": True},
              {"tags": {"source": "human"}, "exact_match": False, "well_formed": True},
              {"tags": {"source": "synthetic"}, "exact_match": False, "well_formed": False}]
    summary = summarise(scored)
    assert (summary["rows"], summary["exact_match"], summary["format_compliance"]) == (3, 1 / 3, 2 / 3)
    assert summary["slices"]["source:human"] == {"rows": 2, "exact_match": 0.5, "format_compliance": 1.0}
    assert summary["slices"]["source:synthetic"] == {"rows": 1, "exact_match": 0.0, "format_compliance": 0.0}


def test_gold_rows_split_prompt_and_answer_in_any_format(tmp_path):
    path = tmp_path / "gold.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Add.", "input": "2 and 2", "output": "4", "tags": {"kind": "math"}},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
    ]) + "\n")
    first, second = read_gold(path)
    assert (first.id, first.answer, first.tags) == ("gold.jsonl:1", "4", {"kind": "math"})
    assert [m["role"] for m in second.prompt] == ["system", "user"] and second.answer == "Hello."


@pytest.mark.parametrize("line, reason", [
    ('{"instruction": "broken', "line 2"),
    ('{"question": "no known format"}', "not a conversation"),
    ('{"messages": [{"role": "user", "content": "no answer"}]}', "no_assistant_turn"),
])
def test_a_bad_gold_row_is_an_error_naming_file_and_line(tmp_path, line, reason):
    path = tmp_path / "gold.jsonl"
    path.write_text(json.dumps({"instruction": "Fine.", "output": "Yes."}) + "\n" + line + "\n")
    with pytest.raises(DataError) as error:
        read_gold(path)
    assert "gold.jsonl line 2" in error.value.message and reason in error.value.message
