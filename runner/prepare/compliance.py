"""Compliance checks: small pluggable functions that flag privacy, bias and toxicity problems in a row,
and the report that counts what they found.

A check is a plain function `(messages, tags) -> findings`, so a team adds its own policy as one
function in its own package (`pkg.module:function`, or an entry point in `forge.compliance_checks`)
without touching Forge. What a finding does to its row is not the check's business: `decide` maps
severities to actions with the plan's `compliance.on` table, in one place.

Findings end up in reports that people read and share, so a detail must never carry raw PII: the
built-in checks report keyed traces (HMAC, `forge.contract.pii_key`), and custom checks' details are
scrubbed as they come back (and again in the report), in case a check forgets.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from typing import Any, Callable, Iterable, Mapping, Sequence

from forge.contract.pii_key import PiiKey
from forge.contract.plan import CheckSpec, ComplianceSpec, PiiSpec
from forge.errors import ConfigError
from forge.runner.prepare.pii import SECRETS, RegexScrubber

CATEGORIES = ("privacy", "bias", "toxicity", "custom")
SEVERITIES = ("low", "medium", "high")  # forge.contract.plan.Severity, weakest first
ENTRY_POINT_GROUP = "forge.compliance_checks"


@dataclass(frozen=True)
class Finding:
    check: str  # the check's name
    category: str  # privacy | bias | toxicity | custom
    severity: str  # low | medium | high (forge.contract.plan.Severity)
    detail: str  # human-readable; must NEVER contain raw PII (use keyed traces)


CheckFn = Callable[[list[dict[str, str]], dict[str, str]], Iterable[Finding]]


@dataclass(frozen=True)
class NamedCheck:
    name: str
    fn: CheckFn


_DETAIL_SCRUBBER = RegexScrubber(PiiSpec(), PiiKey.ephemeral())  # redacts: its traces are never written


def scrub_detail(detail: str) -> str:
    """A detail with any PII redacted: applied to custom checks' findings and again in the report."""
    return _DETAIL_SCRUBBER.scrub(detail).text


# --- decide -----------------------------------------------------------------------------------------------

_ACTION_STRENGTH = {"flag": 0, "drop": 1, "fail": 2}


def decide(findings: Iterable[Finding], on: Mapping[str, str]) -> str:
    """"keep", "drop" or "fail": the strongest action the findings' severities call for. A severity
    missing from `on` only flags, so a partial table never drops rows by surprise."""
    actions = (on.get(finding.severity, "flag") for finding in findings)
    strongest = max(actions, key=_ACTION_STRENGTH.__getitem__, default="flag")
    return "keep" if strongest == "flag" else strongest


# --- lexicons ---------------------------------------------------------------------------------------------


def _normal(term: str) -> str:
    """One spelling per term: lower case, single spaces, straight apostrophes."""
    return re.sub(r"\s+", " ", term.replace("’", "'")).strip().lower()


def parse_lexicon(text: str, source: str) -> dict[str, str]:
    """`term<TAB>severity` lines, `#` comments and blank lines skipped; a bad line names its number."""
    terms: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        term, _, severity = line.partition("\t")
        if not _normal(term) or severity.strip() not in SEVERITIES:
            raise ConfigError(
                f"{source} line {number}: expected `term<TAB>severity`, got {line!r}.",
                f"Severity is one of {', '.join(SEVERITIES)}.",
            )
        terms[_normal(term)] = severity.strip()
    return terms


@lru_cache(maxsize=None)
def builtin_lexicon(name: str) -> Mapping[str, str]:
    """A lexicon shipped in plans/lexicons (data, not code, so it is reviewed and extended as a list)."""
    resource = importlib.resources.files("forge.plans") / "lexicons" / f"{name}.txt"
    return parse_lexicon(resource.read_text(encoding="utf-8"), f"plans/lexicons/{name}.txt")


def _trie_pattern(terms: Iterable[str]) -> str:
    """An alternation shaped like a trie, so the regex follows one branch per character instead of
    trying every term at every position; the text is lower-cased instead of matching with IGNORECASE."""
    trie: dict[str, dict] = {}
    for term in terms:
        node = trie
        for char in term:
            node = node.setdefault(char, {})
        node[""] = {}
    return _node_pattern(trie) if trie else "(?!)"


def _atom(char: str) -> str:
    return {" ": r"\s+", "'": "['’]"}.get(char, re.escape(char))


def _node_pattern(node: dict[str, dict]) -> str:
    branches = [_atom(char) + _node_pattern(child) for char, child in sorted(node.items()) if char]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
    return f"(?:{body})?" if "" in node else body  # greedy: the longer phrase wins


class Lexicon:
    """Terms with severities, matched as whole words or phrases, case-insensitively, by one regex.

    Most texts contain no term, and the regex tries every position; an ASCII text first has its words
    looked up: a term can match only where each of its words (\\w runs) is a whole word of the text, so a
    text lacking one word of every term is skipped, which is about twice as fast as the scan."""

    def __init__(self, severities: Mapping[str, str]) -> None:
        self.severities = dict(severities)
        self._pattern = re.compile(rf"(?<!\w)(?:{_trie_pattern(self.severities)})(?!\w)")
        self._term_words = [frozenset(word.encode() for word in re.findall(r"\w+", term)) for term in self.severities]
        self._words = frozenset().union(*self._term_words) if all(self._term_words) else None  # else: always scan

    def terms_in(self, text: str) -> list[str]:
        lowered, words = _ascii_words(text)
        if words is not None and self._words is not None:
            present = self._words.intersection(words)
            if not present or not any(needed <= present for needed in self._term_words):
                return []
        found = self._pattern.findall(lowered)
        return [_normal(term) for term in found] if found else found


_NOT_WORD = bytes(c if c < 128 and (chr(c).isalnum() or chr(c) == "_") else 32 for c in range(256))


@lru_cache(maxsize=8)  # each lexicon check reads the same few messages in turn
def _ascii_words(text: str) -> tuple[str, list[bytes] | None]:
    """The lower-cased text and, when it is ASCII, its \\w runs (as `re` sees them in ASCII text)."""
    lowered = text.lower()
    return lowered, lowered.encode().translate(_NOT_WORD).split() if lowered.isascii() else None


# --- built-in checks --------------------------------------------------------------------------------------


def _options(name: str, options: Mapping[str, Any], allowed: Mapping[str, type]) -> dict[str, Any]:
    for key, value in options.items():
        if key not in allowed:
            raise ConfigError(
                f"Compliance check {name!r} has no option {key!r}.",
                f"Its options are: {', '.join(allowed) or 'none'}.",
            )
        if not isinstance(value, allowed[key]):
            raise ConfigError(f"Option {key!r} of compliance check {name!r} must be a {allowed[key].__name__}.")
    return dict(options)


def _extra_terms(name: str, entries: Iterable[str]) -> dict[str, str]:
    """`extra_terms: ["term:severity", ...]`; the last colon separates, so a term may contain colons."""
    terms = {}
    for entry in entries:
        term, _, severity = entry.rpartition(":")
        if not _normal(term) or severity not in SEVERITIES:
            raise ConfigError(
                f"Compliance check {name!r}: extra term {entry!r} is not `term:severity`.",
                f"Severity is one of {', '.join(SEVERITIES)}, e.g. \"darn:low\".",
            )
        terms[_normal(term)] = severity
    return terms


def _lexicon_check(category: str, name: str, options: Mapping[str, Any]) -> CheckFn:
    """One finding per distinct term and role per row, at the term's severity (strongest first), from
    `min_severity` up; `roles` limits the scan (e.g. to [assistant] when toxic prompts are the point)."""
    opts = _options(name, options, {"extra_terms": list, "min_severity": str, "roles": list})
    floor = opts.get("min_severity", "low")
    if floor not in SEVERITIES:
        raise ConfigError(f"Compliance check {name!r}: min_severity must be one of {', '.join(SEVERITIES)}.")
    lexicon = Lexicon({**builtin_lexicon(category), **_extra_terms(name, opts.get("extra_terms", []))})
    wanted = {s for s in SEVERITIES if SEVERITIES.index(s) >= SEVERITIES.index(floor)}
    roles = set(opts.get("roles", []))

    def check(messages: list[dict[str, str]], tags: dict[str, str]) -> list[Finding]:
        seen: Counter[tuple[str, str]] = Counter()
        for message in messages:
            if not roles or message["role"] in roles:
                terms = lexicon.terms_in(message["content"])
                if terms:  # most rows have none: skip building the pairs
                    seen.update((term, message["role"]) for term in terms)
        if not seen:
            return []
        found = [(lexicon.severities[term], term, role, count) for (term, role), count in seen.items()]
        return [
            Finding(name, category, severity, f'"{term}" ×{count} in {role} turns')
            for severity, term, role, count in sorted(found, key=lambda f: (-SEVERITIES.index(f[0]), f[1:]))
            if severity in wanted
        ]

    return check


def _residual_pii_check(name: str, options: Mapping[str, Any], key: PiiKey) -> CheckFn:
    """PII the scrubber left (policy `keep`, or scrubbing off): entity and keyed trace, never the value."""
    _options(name, options, {})
    detector = RegexScrubber(PiiSpec(default="keep"), key)

    def check(messages: list[dict[str, str]], tags: dict[str, str]) -> list[Finding]:
        return [
            Finding(name, "privacy", "high" if hit.entity in SECRETS else "medium",
                    f"{hit.entity} hmac:{hit.value_hash} in {message['role']} turn {turn}")
            for turn, message in enumerate(messages, 1)
            for hit in detector.scrub(message["content"]).hits
        ]

    return check


_BUILTINS: dict[str, Callable[[str, Mapping[str, Any], PiiKey], CheckFn]] = {  # (name, options, PII key)
    "lexicon.toxicity": lambda name, options, key: _lexicon_check("toxicity", name, options),
    "lexicon.bias": lambda name, options, key: _lexicon_check("bias", name, options),
    "privacy.residual_pii": _residual_pii_check,
}


# --- loading ----------------------------------------------------------------------------------------------

_HOW_TO_NAME = (
    f"Use a built-in check ({', '.join(_BUILTINS)}), a dotted path `package.module:function` importable in "
    f"the runner image, or an entry point registered in the {ENTRY_POINT_GROUP!r} group."
)


def load_checks(spec: ComplianceSpec, key: PiiKey) -> list[NamedCheck]:
    """Every configured check, resolved and validated up front, so a typo fails before the first row; `key`
    keys the traces a check reports."""
    return [NamedCheck(check.name, _load(check, key)) for check in spec.checks]


def _load(check: CheckSpec, key: PiiKey) -> CheckFn:
    if check.name in _BUILTINS:
        return _BUILTINS[check.name](check.name, check.options, key)
    fn = _import_dotted(check.name) if ":" in check.name else _entry_point(check.name)
    if not callable(fn):
        raise ConfigError(f"Compliance check {check.name!r} is not a function.", _HOW_TO_NAME)
    _check_signature(check.name, fn, check.options)
    return _guarded(check.name, partial(fn, **check.options) if check.options else fn)


def _import_dotted(name: str) -> Any:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, or broken on import: either way the config names bad code
        raise ConfigError(f"Cannot import compliance check {name!r}: {exc}.", _HOW_TO_NAME) from exc
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigError(f"Module {module_name!r} has no function {attribute!r} (check {name!r}).",
                          _HOW_TO_NAME) from exc


def _entry_point(name: str) -> Any:
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not points:
        raise ConfigError(f"Unknown compliance check {name!r}.", _HOW_TO_NAME)
    point = next(iter(points))
    try:
        return point.load()
    except Exception as exc:  # a broken plugin is a configuration problem, whatever it raised
        raise ConfigError(f"Cannot load compliance check {name!r} ({point.value}): {exc}.", _HOW_TO_NAME) from exc


def _check_signature(name: str, fn: Callable, options: Mapping[str, Any]) -> None:
    """Options become keyword arguments: a mismatch is a config error now, not a TypeError on row one."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some callables cannot be introspected; they fail, if at all, when called
    try:
        signature.bind([], {}, **options)
    except TypeError as exc:
        raise ConfigError(
            f"Compliance check {name!r} does not accept (messages, tags{', ' if options else ''}"
            f"{', '.join(f'{key}=' for key in options)}): {exc}.",
            "A check is `def check(messages, tags, **options) -> Iterable[Finding]`.",
        ) from exc


def _guarded(name: str, fn: CheckFn) -> CheckFn:
    """A custom check's output is checked like config: wrong types or levels fail loudly, by check name.
    Its details are scrubbed here, before any audit file or report sees them, and a crash names the
    check and the exception type only: the exception's message may quote the row's text."""

    def check(messages: list[dict[str, str]], tags: dict[str, str]) -> list[Finding]:
        try:
            findings = list(fn(messages, tags) or ())
        except Exception as exc:
            raise ConfigError(
                f"Compliance check {name!r} raised {type(exc).__name__}.",
                "Run the check on a sample row locally to see the full error; remove it from compliance.checks "
                "to prepare without it.",
            ) from exc
        for finding in findings:
            if not isinstance(finding, Finding):
                problem = f"a {type(finding).__name__} instead of a Finding"
            elif finding.severity not in SEVERITIES or finding.category not in CATEGORIES:
                problem = f"a Finding with severity {finding.severity!r} and category {finding.category!r}"
            else:
                continue
            raise ConfigError(
                f"Compliance check {name!r} returned {problem}.",
                f"Return Finding(check, category, severity, detail) with category in {', '.join(CATEGORIES)} "
                f"and severity in {', '.join(SEVERITIES)}.",
            )
        return [replace(finding, detail=scrub_detail(finding.detail)) for finding in findings]

    return check


# --- report -----------------------------------------------------------------------------------------------


@dataclass
class _TypeLog:
    category: str
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


class ComplianceReport:
    """Counts by category, check, severity and action, and per finding type the rows it hit: the first
    `examples` findings in full, the rest counted only, so memory stays flat on a million rows.
    Call `add` for every checked row (an empty `findings` still counts the row and its action)."""

    def __init__(self, examples: int = 1000) -> None:
        self._examples = examples
        self.rows = 0
        self.rows_with_findings = 0
        self.actions: Counter[str] = Counter()
        self.by_category: Counter[str] = Counter()
        self.by_check: Counter[str] = Counter()
        self.by_severity: Counter[str] = Counter()
        self._types: dict[str, _TypeLog] = {}

    def add(self, row_id: str, source: str, line: int, findings: Sequence[Finding], action: str) -> None:
        self.rows += 1
        self.actions[action] += 1
        self.rows_with_findings += bool(findings)
        for finding in findings:
            self.by_category[finding.category] += 1
            self.by_check[finding.check] += 1
            self.by_severity[finding.severity] += 1
            log = self._types.setdefault(finding.check, _TypeLog(finding.category))
            log.count += 1
            if len(log.examples) < self._examples:
                log.examples.append({"row_id": row_id, "source": source, "line": line,
                                     "severity": finding.severity, "detail": scrub_detail(finding.detail)})

    def to_json(self) -> dict:
        return {
            "rows": self.rows,
            "rows_with_findings": self.rows_with_findings,
            "findings": sum(self.by_check.values()),
            "actions": _ranked(self.actions),
            "by_category": _ranked(self.by_category),
            "by_check": _ranked(self.by_check),
            "by_severity": {s: self.by_severity[s] for s in reversed(SEVERITIES) if self.by_severity[s]},
            "by_type": {
                check: {
                    "category": log.category,
                    "count": log.count,
                    "examples": log.examples,
                    "examples_truncated": log.count > len(log.examples),
                }
                for check, log in sorted(self._types.items(), key=lambda item: (-item[1].count, item[0]))
            },
        }

    def to_text(self, row_ids: int = 5) -> str:
        lines = [
            f"Compliance: {self.rows_with_findings} of {self.rows} rows had findings "
            f"({self.actions['keep']} kept, {self.actions['drop']} dropped, {self.actions['fail']} failed); "
            f"{sum(self.by_check.values())} findings."
        ]
        if self.by_category:
            lines.append("  by category: " + ", ".join(f"{k} {v}" for k, v in _ranked(self.by_category).items()))
            lines.append("  by severity: " + ", ".join(f"{s} {self.by_severity[s]}" for s in reversed(SEVERITIES)))
        for check, entry in self.to_json()["by_type"].items():
            ids = list(dict.fromkeys(example["row_id"] for example in entry["examples"]))
            more = ", …" if len(ids) > row_ids or entry["examples_truncated"] else ""
            lines.append(f"  {check} ({entry['category']}): {entry['count']} — rows {', '.join(ids[:row_ids])}{more}")
        return "\n".join(lines)


def _ranked(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
