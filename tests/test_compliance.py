"""Compliance checks: the shipped lexicons, the built-in checks, custom checks by dotted path and entry
point, decide(), and a report that lists row ids but never raw PII."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest

from forge.contract.pii_key import PiiKey
from forge.contract.plan import CheckSpec, ComplianceSpec
from forge.errors import ConfigError
from forge.runner.prepare.compliance import (
    SEVERITIES,
    ComplianceReport,
    Finding,
    Lexicon,
    builtin_lexicon,
    decide,
    load_checks,
    parse_lexicon,
)

EMAIL = "jane.doe@example.com"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
KEY = PiiKey.parse("compliance-tests-pii-key", "test")


def turns(*contents: str) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": content} for i, content in enumerate(contents)]


def run(name: str, messages, **options) -> list[Finding]:
    (check,) = load_checks(ComplianceSpec(checks=[CheckSpec(name=name, options=options)]), KEY)
    assert check.name == name
    return list(check.fn(messages, {}))


# --- lexicon files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["toxicity", "bias"])
def test_shipped_lexicons_parse_and_round_trip(name):
    terms = builtin_lexicon(name)
    assert len(terms) >= 10 and set(terms.values()) == set(SEVERITIES)
    dumped = "# header\n\n" + "\n".join(f"{term}\t{severity}" for term, severity in terms.items())
    assert parse_lexicon(dumped, "dumped") == terms


def test_a_bad_lexicon_line_names_its_number():
    with pytest.raises(ConfigError) as error:
        parse_lexicon("# ok\nidiot\tmedium\nmoron\tsevere\n", "custom.txt")
    assert "custom.txt line 3" in error.value.message


def test_lexicon_matches_whole_words_and_phrases_case_insensitively():
    lexicon = Lexicon({"idiot": "medium", "women can't": "medium", "shut up": "low", "c++": "low"})
    text = "IDIOT! idiotic, kidiot. Women  can’t.\nShut\nup. women cant. I like C++."
    assert list(lexicon.terms_in(text)) == ["idiot", "women can't", "shut up", "c++"]


def test_the_longest_phrase_wins():
    lexicon = Lexicon({"fuck": "high", "fuck you": "high", "shit": "medium", "piece of shit": "high"})
    assert list(lexicon.terms_in("fuck you, piece of shit")) == ["fuck you", "piece of shit"]


def test_the_word_lookup_before_the_scan_never_misses_a_term():
    """Lexicon skips an ASCII text lacking a word of every term; on texts built from the terms' own words,
    cut and joined every which way, it must find exactly what the regex scan alone finds."""
    import random
    import re

    from forge.runner.prepare.compliance import _trie_pattern

    terms = {**builtin_lexicon("bias"), **builtin_lexicon("toxicity"), "c++": "low", "x_1": "low"}
    lexicon = Lexicon(terms)
    scan = re.compile(rf"(?<!\w)(?:{_trie_pattern(terms)})(?!\w)")
    words = sorted({word for term in terms for word in re.findall(r"\w+|\S", term)} | {"the", "a", "ok", "9"})
    glue = [" ", "  ", "\n", ", ", ". ", "-", "'", "’", "", "_", "!"]
    rng, hits = random.Random(7), 0
    for _ in range(5000):
        parts = [rng.choice(words).upper() if rng.random() < 0.2 else rng.choice(words) for _ in range(rng.randint(1, 12))]
        text = "".join(part + rng.choice(glue) for part in parts)
        expected = scan.findall(text.lower())
        hits += bool(expected)
        assert len(lexicon.terms_in(text)) == len(expected), text
    assert hits > 200  # the texts did contain terms


# --- built-in checks --------------------------------------------------------------------------------------


def test_toxicity_reports_each_term_once_per_role_with_its_severity():
    findings = run("lexicon.toxicity", turns("You idiot, shut up. Idiot!", "Kill yourself."))
    assert findings == [
        Finding("lexicon.toxicity", "toxicity", "high", '"kill yourself" ×1 in assistant turns'),
        Finding("lexicon.toxicity", "toxicity", "medium", '"idiot" ×2 in user turns'),
        Finding("lexicon.toxicity", "toxicity", "low", '"shut up" ×1 in user turns'),
    ]


def test_bias_flags_generalisations():
    findings = run("lexicon.bias", turns("Women can't code and all immigrants are lazy.", "That is not true."))
    assert [(f.category, f.severity, f.detail) for f in findings] == [
        ("bias", "medium", '"all immigrants are" ×1 in user turns'),
        ("bias", "medium", '"women can\'t" ×1 in user turns'),
    ]


def test_clean_text_has_no_findings():
    messages = turns("Summarise the meeting notes, please.", "The team agreed to ship on Friday.")
    assert run("lexicon.toxicity", messages) == run("lexicon.bias", messages) == []


def test_extra_terms_min_severity_and_roles():
    messages = turns("darn it, you idiot", "frak this, moron")
    findings = run("lexicon.toxicity", messages, extra_terms=["darn:low", "frak:high"], min_severity="medium",
                   roles=["assistant"])
    assert [(f.severity, f.detail) for f in findings] == [
        ("high", '"frak" ×1 in assistant turns'),
        ("medium", '"moron" ×1 in assistant turns'),
    ]


@pytest.mark.parametrize("options, message", [
    ({"extra_terms": ["darn"]}, "not `term:severity`"),
    ({"extra_terms": ["darn:severe"]}, "not `term:severity`"),
    ({"min_severity": "extreme"}, "min_severity"),
    ({"threshold": 3}, "no option 'threshold'"),
    ({"roles": "assistant"}, "must be a list"),
])
def test_bad_lexicon_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        load_checks(ComplianceSpec(checks=[CheckSpec(name="lexicon.toxicity", options=options)]), KEY)


def test_residual_pii_reports_entity_and_hash_never_the_value():
    findings = run("privacy.residual_pii", turns(f"mail {EMAIL}", f"key {AWS_KEY}"))
    assert [(f.category, f.severity) for f in findings] == [("privacy", "medium"), ("privacy", "high")]
    assert findings[0].detail == f"EMAIL hmac:{KEY.trace(EMAIL)} in user turn 1"
    assert findings[1].detail == f"API_KEY hmac:{KEY.trace(AWS_KEY)} in assistant turn 2"
    assert EMAIL not in repr(findings) and AWS_KEY not in repr(findings)
    assert not any(hashlib.sha256(v.encode()).hexdigest()[:16] in repr(findings) for v in (EMAIL, AWS_KEY))


def test_residual_pii_ignores_placeholders_left_by_the_scrubber():
    assert run("privacy.residual_pii", turns("mail <EMAIL> or <EMAIL:1a2b3c4d>", "ok")) == []


# --- decide -----------------------------------------------------------------------------------------------

ON = {"low": "flag", "medium": "drop", "high": "fail"}


def finding(severity: str) -> Finding:
    return Finding("c", "custom", severity, "d")


@pytest.mark.parametrize("severities, on, expected", [
    ([], ON, "keep"),
    (["low"], ON, "keep"),
    (["low", "medium"], ON, "drop"),
    (["medium", "high", "low"], ON, "fail"),
    (["high"], {"low": "flag", "medium": "flag", "high": "drop"}, "drop"),
    (["high"], {"high": "flag"}, "keep"),
    (["medium"], {"high": "fail"}, "keep"),  # a severity missing from `on` only flags
    (["low", "low"], {"low": "drop"}, "drop"),
])
def test_decide_takes_the_strongest_action(severities, on, expected):
    assert decide((finding(s) for s in severities), on) == expected


# --- custom checks ----------------------------------------------------------------------------------------

CUSTOM = '''
from forge.runner.prepare.compliance import Finding

def no_shouting(messages, tags, limit=3, severity="low"):
    loud = sum(1 for m in messages for word in m["content"].split() if len(word) > 1 and word.isupper())
    return [Finding("custom.no_shouting", "custom", severity, f"{loud} shouted words")] if loud > limit else []

def tagged(messages, tags):
    return [Finding("custom.tagged", "custom", "low", f"lang={tags.get('lang')}")]

def leaky(messages, tags):
    return [Finding("custom.leaky", "privacy", "medium", "contact " + messages[0]["content"])]

def wrong_type(messages, tags):
    return ["not a finding"]

def crashes(messages, tags):
    raise ValueError("cannot parse " + messages[0]["content"])

def wrong_severity(messages, tags):
    return [Finding("custom.bad", "custom", "critical", "x")]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "forge_test_checks.py").write_text(textwrap.dedent(CUSTOM))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "forge_test_checks"


def test_dotted_path_check_runs_with_options_as_keyword_arguments(custom_module):
    messages = turns("WHY IS THIS SO LOUD", "ok")
    assert run(f"{custom_module}:no_shouting", messages) == [
        Finding("custom.no_shouting", "custom", "low", "5 shouted words")]
    assert run(f"{custom_module}:no_shouting", messages, limit=10) == []
    assert run(f"{custom_module}:no_shouting", messages, severity="high")[0].severity == "high"


def test_dotted_path_check_gets_the_row_tags(custom_module):
    (check,) = load_checks(ComplianceSpec(checks=[CheckSpec(name=f"{custom_module}:tagged")]), KEY)
    assert [f.detail for f in check.fn(turns("hi", "hello"), {"lang": "en"})] == ["lang=en"]


@pytest.mark.parametrize("name, message", [
    ("toxicity", "Unknown compliance check 'toxicity'"),
    ("no_such_module_xyz:check", "Cannot import compliance check 'no_such_module_xyz:check'"),
    ("forge_test_checks:missing", "has no function 'missing'"),
    ("forge_test_checks:NOT_A_FUNCTION", "is not a function"),
])
def test_unknown_or_broken_checks_are_config_errors_that_say_how_to_fix(custom_module, name, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_checks(ComplianceSpec(checks=[CheckSpec(name=name)]), KEY)
    assert "package.module:function" in error.value.hint and "lexicon.toxicity" in error.value.hint


def test_options_a_custom_check_does_not_take_fail_at_load_time(custom_module):
    with pytest.raises(ConfigError, match="does not accept"):
        load_checks(ComplianceSpec(checks=[CheckSpec(name=f"{custom_module}:tagged", options={"limit": 3})]), KEY)


@pytest.mark.parametrize("function, message", [("wrong_type", "a str instead of a Finding"),
                                               ("wrong_severity", "severity 'critical'"),
                                               ("crashes", "raised ValueError")])
def test_a_custom_check_returning_junk_fails_by_name(custom_module, function, message):
    (check,) = load_checks(ComplianceSpec(checks=[CheckSpec(name=f"{custom_module}:{function}")]), KEY)
    with pytest.raises(ConfigError, match=message) as error:
        check.fn(turns(f"mail {EMAIL}", "ho"), {})
    assert function in error.value.message and EMAIL not in error.value.message


def test_entry_point_check(tmp_path, monkeypatch, custom_module):
    dist = tmp_path / "forge_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: forge-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[forge.compliance_checks]\nshouting = {custom_module}:no_shouting\nbroken = {custom_module}:nope\n")
    assert run("shouting", turns("AB CD EF GH IJ", "ok"), limit=1)[0].detail == "5 shouted words"
    with pytest.raises(ConfigError, match="Cannot load compliance check 'broken'"):
        load_checks(ComplianceSpec(checks=[CheckSpec(name="broken")]), KEY)


def test_default_spec_loads_the_two_lexicon_checks():
    assert [check.name for check in load_checks(ComplianceSpec(), KEY)] == ["lexicon.toxicity", "lexicon.bias"]


# --- report -----------------------------------------------------------------------------------------------


def build_report(custom_module: str, examples: int = 1000) -> ComplianceReport:
    checks = load_checks(ComplianceSpec(checks=[
        CheckSpec(name="lexicon.toxicity"), CheckSpec(name="privacy.residual_pii"),
        CheckSpec(name=f"{custom_module}:leaky"),
    ]), KEY)
    rows = {
        "a.jsonl:1": turns(f"you idiot, mail {EMAIL}", "no"),
        "a.jsonl:2": turns("hello", "hi"),
        "b.jsonl:7": turns(f"key {AWS_KEY}", "fuck you"),
    }
    report = ComplianceReport(examples=examples)
    for row_id, messages in rows.items():
        findings = [f for check in checks for f in check.fn(messages, {})]
        source, line = row_id.split(":")
        report.add(row_id, source, int(line), findings, decide(findings, {"high": "drop"}))
    return report


def test_report_json_counts_and_lists_row_ids_by_type(custom_module):
    data = build_report(custom_module).to_json()
    assert (data["rows"], data["rows_with_findings"]) == (3, 3)
    assert data["actions"] == {"keep": 2, "drop": 1}
    assert data["by_category"] == {"privacy": 5, "toxicity": 2}
    assert data["by_severity"] == {"high": 2, "medium": 5}
    assert data["by_check"] == {"custom.leaky": 3, "lexicon.toxicity": 2, "privacy.residual_pii": 2}
    assert [e["row_id"] for e in data["by_type"]["lexicon.toxicity"]["examples"]] == ["a.jsonl:1", "b.jsonl:7"]
    example = data["by_type"]["privacy.residual_pii"]["examples"][0]
    assert example.pop("detail").startswith("EMAIL hmac:")
    assert example == {"row_id": "a.jsonl:1", "source": "a.jsonl", "line": 1, "severity": "medium"}


def test_rows_without_findings_still_count():
    report = ComplianceReport()
    report.add("x:1", "x", 1, [], "keep")
    assert report.to_json() == {"rows": 1, "rows_with_findings": 0, "findings": 0, "actions": {"keep": 1},
                                "by_category": {}, "by_check": {}, "by_severity": {}, "by_type": {}}
    assert report.to_text() == "Compliance: 0 of 1 rows had findings (1 kept, 0 dropped, 0 failed); 0 findings."


def test_a_leaky_custom_checks_details_are_scrubbed_at_the_source(custom_module):
    (finding,) = run(f"{custom_module}:leaky", turns(f"mail {EMAIL}", "ok"))
    assert finding.detail == "contact mail <EMAIL>"


def test_report_never_holds_raw_pii(custom_module):
    report = build_report(custom_module)
    report.add("c.jsonl:1", "c.jsonl", 1, [Finding("x", "custom", "low", f"raw {EMAIL} {AWS_KEY}")], "keep")
    dumped = json.dumps(report.to_json()) + report.to_text()
    assert EMAIL not in dumped and AWS_KEY not in dumped
    assert "contact you idiot, mail <EMAIL>" in dumped and "raw <EMAIL> <API_KEY>" in dumped


def test_report_text_summarises_with_row_ids(custom_module):
    text = build_report(custom_module).to_text()
    assert text.splitlines()[0] == "Compliance: 3 of 3 rows had findings (2 kept, 1 dropped, 0 failed); 7 findings."
    assert "lexicon.toxicity (toxicity): 2 — rows a.jsonl:1, b.jsonl:7" in text
    assert "by category: privacy 5, toxicity 2" in text


def test_report_keeps_a_bounded_number_of_examples(custom_module):
    data = build_report(custom_module, examples=1).to_json()
    entry = data["by_type"]["lexicon.toxicity"]
    assert (entry["count"], len(entry["examples"]), entry["examples_truncated"]) == (2, 1, True)
    assert json.loads(json.dumps(data)) == data
