"""The PII scrubber: every entity found, look-alikes left alone, each policy's output, and no raw value
anywhere but the scrubbed text's own unchanged parts."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from forge.contract.pii_key import PiiKey
from forge.contract.plan import PiiSpec
from forge.errors import ConfigError
from forge.runner.prepare.pii import ENTITIES, PiiHit, RegexScrubber, ScrubResult, make_scrubber

KEY = PiiKey.parse("pii-tests-key-0123456789", "test")
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MaLVYxmpq8k2example\n"
    "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\n"
    "-----END RSA PRIVATE KEY-----"
)

# (text, entity, the text with the default policy, redact)
POSITIVES = [
    ("mail john.doe+tag@example.co.uk today", "EMAIL", "mail <EMAIL> today"),
    ("Write to ANNA_92@mail-server.org.", "EMAIL", "Write to <EMAIL>."),
    ("call +1 (415) 555-2671 now", "PHONE", "call <PHONE> now"),
    ("call 415-555-2671", "PHONE", "call <PHONE>"),
    ("call 415.555.2671", "PHONE", "call <PHONE>"),
    ("call (415) 555-2671.", "PHONE", "call <PHONE>."),
    ("toll free 1-800-555-0199", "PHONE", "toll free <PHONE>"),
    ("E.164: +14155552671", "PHONE", "E.164: <PHONE>"),
    ("London +44 20 7946 0958", "PHONE", "London <PHONE>"),
    ("Paris +33 6 12 34 56 78", "PHONE", "Paris <PHONE>"),
    ("UK 020 7946 0958", "PHONE", "UK <PHONE>"),
    ("FR 06 12 34 56 78", "PHONE", "FR <PHONE>"),
    ("DE (030) 1234567", "PHONE", "DE <PHONE>"),
    ("visa 4111 1111 1111 1111 ok", "CREDIT_CARD", "visa <CREDIT_CARD> ok"),
    ("mc 5500-0000-0000-0004", "CREDIT_CARD", "mc <CREDIT_CARD>"),
    ("amex 378282246310005", "CREDIT_CARD", "amex <CREDIT_CARD>"),
    ("amex 3782 822463 10005", "CREDIT_CARD", "amex <CREDIT_CARD>"),
    ("host 192.168.1.20 is up", "IPV4", "host <IPV4> is up"),
    ("ip=10.0.0.1, [172.16.254.1].", "IPV4", "ip=<IPV4>, [<IPV4>]."),
    ("addr 2001:db8::ff00:42:8329 here", "IPV6", "addr <IPV6> here"),
    ("addr 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "IPV6", "addr <IPV6>"),
    ("mapped ::ffff:192.0.2.1", "IPV6", "mapped <IPV6>"),
    ("pay to DE89 3704 0044 0532 0130 00 please", "IBAN", "pay to <IBAN> please"),
    ("pay to GB82WEST12345698765432", "IBAN", "pay to <IBAN>"),
    ("pay to NL91ABNA0417164300.", "IBAN", "pay to <IBAN>."),
    ("ssn 123-45-6789", "US_SSN", "ssn <US_SSN>"),
    ("aws AKIAIOSFODNN7EXAMPLE", "API_KEY", "aws <API_KEY>"),
    ("aws ASIAY34FZKBOKMUTVV7A", "API_KEY", "aws <API_KEY>"),
    ("gh ghp_" + "a1B2" * 9, "API_KEY", "gh <API_KEY>"),
    ("gh gho_" + "Z" * 36, "API_KEY", "gh <API_KEY>"),
    ("gh github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "API_KEY", "gh <API_KEY>"),
    ("slack xoxb-123456789012-abcdefghijKLM", "API_KEY", "slack <API_KEY>"),
    ("openai sk-proj-abcDEF123456ghiJKL789mno", "API_KEY", "openai <API_KEY>"),
    ("openai sk-abcdefghijklmnopqrstuvwxyz012345", "API_KEY", "openai <API_KEY>"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "API_KEY", "stripe <API_KEY>"),
    ("stripe rk_live_4eC39HqLyjWDarjtT1zdp7dc", "API_KEY", "stripe <API_KEY>"),
    ("google AIzaSyA-1234567890abcdefghijklmnopqrstu", "API_KEY", "google <API_KEY>"),
    (f"token {JWT}", "API_KEY", "token <API_KEY>"),
    ("Authorization: Bearer abc123DEF456ghi789JKL", "API_KEY", "Authorization: Bearer <API_KEY>"),
    ("auth: bearer abc123DEF456ghi789JKL", "API_KEY", "auth: bearer <API_KEY>"),
    ("AUTH: BEARER abc123DEF456ghi789JKL", "API_KEY", "AUTH: BEARER <API_KEY>"),
    ("gh ghs_" + "Z" * 36, "API_KEY", "gh <API_KEY>"),
    (f"key:\n{PEM}\nthanks", "PRIVATE_KEY", "key:\n<PRIVATE_KEY>\nthanks"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----",
     "PRIVATE_KEY", "<PRIVATE_KEY>"),
    ("cut off: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSj\n\nThanks!",
     "PRIVATE_KEY", "cut off: <PRIVATE_KEY>\n\nThanks!"),
    ("db https://alice:s3cr3t@db.example.com:5432/app?x=1", "URL_CREDENTIALS",
     "db https://<URL_CREDENTIALS>@db.example.com:5432/app?x=1"),
    ("postgres://svc:p%40ss@10.1.2.3/db", "URL_CREDENTIALS", "postgres://<URL_CREDENTIALS>@10.1.2.3/db"),
]

# Look-alikes that must stay untouched, and why.
NEGATIVES = [
    "1234-5678-9012-3456",  # fails Luhn (and starts with 1)
    "4111 1111 1111 1112",  # one digit off: fails Luhn
    "4111 1111-1111 1111",  # mixed separators: not how a card is written
    "4444 4444 4444 4444",  # passes Luhn, but one repeated digit is filler
    "id 4111111111111111111111",  # a long ID that merely contains a card-like run
    "192.168.1.256",  # octet over 255
    "1.2.3.4.5",  # five parts: a version
    "v1.2.3.4",  # a version, glued to v
    "version 1.2.3.4",  # decided: right after "version" it is a version, not an address
    "release 10.0.0.1",
    "000-12-3456",  # SSN area 000
    "666-12-3456",  # SSN area 666
    "900-12-3456",  # SSN area 9xx
    "123-00-4567",  # SSN group 00
    "123-45-0000",  # SSN serial 0000
    "DE89 3704 0044 0532 0130 01",  # IBAN with a bad checksum
    "in 2024 we shipped 3 models",  # years and small numbers
    "on 2024-01-15 and 15.01.2024",  # dates
    "01.02.2024 12",  # a date and a number
    "build 10.0.19041.1234",  # a version with a long part
    "order 4155552671",  # bare digits: an ID, not a phone
    "ref ABC-415-555-2671",  # glued to a word
    "ID 123456789012",
    "phone 555-0199",  # too few digits
    "pi is 3.14159265358979",
    "numbers 12 345 678 901",
    "ISBN 978-0-306-40615-7",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sha 3f786850e387550fdab836ed7e6dc881de23001b",
    "at 10:30:45 on 2024-01-15T10:30:45Z",  # times are not IPv6
    "std::vector<int>::iterator",
    "slice a[1::2] and loopback ::1",  # decided: fewer than three groups is not worth a hit
    "MAC 00:1A:2B:3C:4D:5E",
    "price $1,234,567.89",
    "pip install scikit-learn; sk-learn is not a key",
    "nobody@localhost and user@example",  # no top-level domain
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----",
    "https://example.com/a:b@c and https://example.com/path",
    "AKIAIOSFODNN7EXAMPL ghp_short xoxb-1 AIzaShort",  # key prefixes with too little after them
    "the bearer of bad news",
]


@pytest.fixture
def redact() -> RegexScrubber:
    return RegexScrubber(PiiSpec(), KEY)


def digest(value: str) -> str:
    return KEY.trace(value)


@pytest.mark.parametrize("text, entity, expected", POSITIVES)
def test_each_entity_is_found_and_redacted(redact, text, entity, expected):
    result = redact.scrub(text)
    assert result.text == expected
    assert result.hits and {hit.entity for hit in result.hits} == {entity}
    assert result.drop is False


def test_every_entity_has_a_positive_case():
    assert {entity for _, entity, _ in POSITIVES} == set(ENTITIES)


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_are_left_alone(redact, text):
    assert redact.scrub(text) == ScrubResult(text, (), False)


def test_random_valid_cards_and_ibans_are_found_in_prose(redact):
    rng = random.Random(7)
    for _ in range(200):
        body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
        card = body + next(d for d in "0123456789" if _luhn_ok(body + d))
        grouped = " ".join(card[i:i + 4] for i in range(0, 16, 4))
        result = redact.scrub(f"my card is {grouped}, thanks")
        assert result.text == "my card is <CREDIT_CARD>, thanks", grouped


def _luhn_ok(number: str) -> bool:
    digits = [int(d) for d in reversed(number)]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(digits)) % 10 == 0


def test_random_prose_with_numbers_has_no_hits(redact):
    rng = random.Random(3)
    words = "the model scored 3.5 on 12 tasks in 2024 with v2 release 1.4.2 and 87 percent at 10:30 of 4096"
    words = words.split()
    for _ in range(500):
        text = " ".join(rng.choice(words) for _ in range(60))
        assert redact.scrub(text).hits == (), text


# --- policies ---------------------------------------------------------------------------------------------

def test_a_rows_messages_scrubbed_together_are_each_scrubbed_alone():
    """scrub_many gates a row's messages once, on their joined text; it must never skip a hit `scrub` finds,
    with PII anywhere in any message, split across two, or absent."""
    scrubber = RegexScrubber(PiiSpec(), KEY)
    pieces = [text for text, _, _ in POSITIVES] + NEGATIVES + ["plain words here", "", "12345", "@", "://x", "v1.2.3"]
    rng, found = random.Random(3), 0
    for _ in range(3000):
        texts = [" ".join(rng.sample(pieces, rng.randint(0, 2))) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3 and len(texts) > 1:  # a value cut in two across messages: a hit in neither
            value = rng.choice(pieces)
            texts[0], texts[1] = texts[0] + value[: len(value) // 2], value[len(value) // 2:] + texts[1]
        expected = [scrubber.scrub(text) for text in texts]
        found += any(result.hits for result in expected)
        assert scrubber.scrub_many(texts) == expected
    assert 500 < found < 3000  # rows with hits and rows without
    assert make_scrubber(PiiSpec(enabled=False), KEY).scrub_many(["a@b.co", "x"]) == [ScrubResult("a@b.co", (), False),
                                                                                ScrubResult("x", (), False)]


EMAIL = "jane.doe@example.com"


@pytest.mark.parametrize("policy, expected", [
    ("redact", "to <EMAIL>."),
    ("mask", "to ****.***@*******.com."),
    ("hash", f"to <EMAIL:{digest(EMAIL)[:8]}>."),
    ("drop", "to <EMAIL>."),
    ("keep", f"to {EMAIL}."),
])
def test_each_policy_rewrites_the_value(policy, expected):
    result = RegexScrubber(PiiSpec(default=policy), KEY).scrub(f"to {EMAIL}.")
    assert result.text == expected
    assert result.hits == (PiiHit("EMAIL", digest(EMAIL), policy),)
    assert result.drop is (policy == "drop")


def test_mask_keeps_separators_and_the_last_four():
    result = RegexScrubber(PiiSpec(default="mask"), KEY).scrub("card 4111-1111-1111-1111 ssn 123-45-6789")
    assert result.text == "card ****-****-****-1111 ssn ***-**-6789"


def test_mask_hides_short_values_completely():
    result = RegexScrubber(PiiSpec(default="mask"), KEY).scrub("https://bob:pw@host")
    assert result.text == "https://***:**@host"


def test_policies_are_per_entity_with_a_default():
    spec = PiiSpec(default="redact", policies={"EMAIL": "hash", "CREDIT_CARD": "drop", "IPV4": "keep"})
    result = RegexScrubber(spec, KEY).scrub(f"{EMAIL} 4111 1111 1111 1111 10.0.0.1 +1 415 555 2671")
    assert result.text == f"<EMAIL:{digest(EMAIL)[:8]}> <CREDIT_CARD> 10.0.0.1 <PHONE>"
    assert [(hit.entity, hit.action) for hit in result.hits] == [
        ("EMAIL", "hash"), ("CREDIT_CARD", "drop"), ("IPV4", "keep"), ("PHONE", "redact")]
    assert result.drop is True


def test_url_credentials_policies_touch_only_user_and_password():
    text = "https://alice:s3cr3t@db.example.com/x"
    hashed = RegexScrubber(PiiSpec(default="hash"), KEY).scrub(text)
    assert hashed.text == f"https://<URL_CREDENTIALS:{digest('alice:s3cr3t')[:8]}>@db.example.com/x"
    assert hashed.hits[0].value_hash == digest("alice:s3cr3t")


def test_bearer_keeps_the_scheme_word():
    assert RegexScrubber(PiiSpec(), KEY).scrub(f"Bearer {JWT}").text == "Bearer <API_KEY>"


def test_unknown_entity_in_policies_is_a_config_error_naming_the_allowed_ones():
    with pytest.raises(ConfigError) as error:
        make_scrubber(PiiSpec(policies={"EMAILS": "hash"}), KEY)
    assert "EMAILS" in error.value.message
    assert all(entity in error.value.hint for entity in ENTITIES)


def test_disabled_scrubbing_changes_nothing_but_still_checks_the_config():
    text = f"{EMAIL} 123-45-6789"
    assert make_scrubber(PiiSpec(enabled=False), KEY).scrub(text) == ScrubResult(text, (), False)
    with pytest.raises(ConfigError):
        make_scrubber(PiiSpec(enabled=False, policies={"NAME": "keep"}), KEY)


def test_make_scrubber_defaults_to_regex():
    assert isinstance(make_scrubber(PiiSpec(), KEY), RegexScrubber)


def test_presidio_without_the_package_is_a_config_error_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # import fails even where it is installed
    with pytest.raises(ConfigError) as error:
        make_scrubber(PiiSpec(backend="presidio"), KEY)
    assert "pip install presidio-analyzer presidio-anonymizer" in error.value.hint


@dataclass
class FakeResult:
    entity_type: str
    start: int
    end: int


class FakeAnalyzer:
    """Stands in for presidio_analyzer.AnalyzerEngine: finds fixed strings, as its NER would."""

    FOUND = {"Alice": "PERSON", "Paris": "LOCATION", EMAIL: "EMAIL_ADDRESS", "2001:db8::1:2": "IP_ADDRESS"}

    def analyze(self, text, language, entities):
        assert language == "en" and "PERSON" in entities
        return [FakeResult(kind, text.index(value), text.index(value) + len(value))
                for value, kind in self.FOUND.items() if value in text]


def test_presidio_entities_map_to_ours_and_regex_still_covers_secrets(monkeypatch):
    monkeypatch.setitem(sys.modules, "presidio_analyzer", types.SimpleNamespace(AnalyzerEngine=FakeAnalyzer))
    scrubber = make_scrubber(PiiSpec(backend="presidio", policies={"LOCATION": "keep"}), KEY)
    result = scrubber.scrub(f"Alice in Paris mailed {EMAIL} from 2001:db8::1:2 with key AKIAIOSFODNN7EXAMPLE")
    assert result.text == "<PERSON> in Paris mailed <EMAIL> from <IPV6> with key <API_KEY>"
    assert [hit.entity for hit in result.hits] == ["PERSON", "LOCATION", "EMAIL", "IPV6", "API_KEY"]


# --- the raw value never escapes --------------------------------------------------------------------------

SECRETS = [EMAIL, "+1 (415) 555-2671", "4111 1111 1111 1111", "123-45-6789", "DE89 3704 0044 0532 0130 00",
           "AKIAIOSFODNN7EXAMPLE", JWT, PEM, "192.168.1.20", "2001:db8::ff00:42:8329"]


@pytest.mark.parametrize("policy", ["redact", "mask", "hash", "drop", "keep"])
def test_hits_carry_only_a_hash_of_the_value(policy):
    result = RegexScrubber(PiiSpec(default=policy), KEY).scrub(" | ".join(SECRETS))
    assert [hit.value_hash for hit in result.hits] == [digest(value) for value in SECRETS]
    dumped = repr(result.hits) + json.dumps([asdict(hit) for hit in result.hits])
    for value in SECRETS:
        assert value not in dumped
        assert value.replace(" ", "") not in dumped
        assert digest(value) != value


@pytest.mark.parametrize("policy", ["redact", "mask", "hash", "drop"])
def test_scrubbed_text_holds_no_raw_value(policy):
    text = RegexScrubber(PiiSpec(default=policy), KEY).scrub(" | ".join(SECRETS)).text
    for value in SECRETS:
        assert value not in text


# --- determinism and overlaps -----------------------------------------------------------------------------


def test_scrubbing_is_deterministic():
    text = " ".join(value for _, _, value in POSITIVES) + " " + " ".join(SECRETS)
    first = RegexScrubber(PiiSpec(default="hash"), KEY).scrub(text)
    assert all(RegexScrubber(PiiSpec(default="hash"), KEY).scrub(text) == first for _ in range(3))


@pytest.mark.parametrize("text, expected", [
    # the whole URL outranks the e-mail-looking "pw@host.com" inside it
    ("https://bob:pw@host.com/x", "https://<URL_CREDENTIALS>@host.com/x"),
    # the Bearer header outranks the JWT inside it, and rewrites only the token
    (f"Authorization: Bearer {JWT}", "Authorization: Bearer <API_KEY>"),
    # a phone greedily swallowing the next number gives way to the card/SSN and keeps its own digits
    ("+1 (415) 555-2671 4111 1111 1111 1111", "<PHONE> <CREDIT_CARD>"),
    ("+1 (415) 555-2671 123-45-6789", "<PHONE> <US_SSN>"),
    ("+1 (415) 555-2671 2001:db8::ff00:42:8329", "<PHONE> <IPV6>"),
    # a candidate rejected by its checksum does not hide the real hit that starts inside it
    ("2024 4111 1111 1111 1111 one", "2024 <CREDIT_CARD> one"),
    ("4111 1111 1111 1111 12 items", "<CREDIT_CARD> 12 items"),
])
def test_overlaps_resolve_to_the_more_specific_or_longer_hit(redact, text, expected):
    assert redact.scrub(text).text == expected


# --- keyed traces: nothing to try candidate values against -------------------------------------------------

def sha256_hex(value: str | bytes) -> str:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()


ssns = st.builds("{:03d}-{:02d}-{:04d}".format, st.integers(1, 665), st.integers(1, 99), st.integers(1, 9999))
phones = st.builds("+1 ({}) 555-{:04d}".format, st.integers(201, 989), st.integers(0, 9999))
emails = st.builds("{}@{}.com".format, st.from_regex(r"[a-z]{1,12}", fullmatch=True),
                   st.from_regex(r"[a-z]{2,10}", fullmatch=True))
key_texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Zs", "Cc"]), min_size=16, max_size=64)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(ssns, phones, emails), min_size=1, max_size=6), key_a=key_texts, key_b=key_texts,
       filler=st.sampled_from(["", "see ", "numbers 12 and 2024; ", "call me: "]))
def test_traces_are_keyed_hmacs_that_differ_by_key_and_never_show_the_key(values, key_a, key_b, filler):
    """For any planted values and any two keys: each hit's trace is the HMAC under the key (the one form a
    key holder can check with openssl), never the bare SHA-256 an attacker could try every SSN against;
    the hash policy's placeholder is its prefix; other keys give other traces; the key is shown nowhere."""
    assume(key_a.strip() != key_b.strip())
    text = filler + " | ".join(values) + "."
    a, b = PiiKey.parse(key_a, "a"), PiiKey.parse(key_b, "b")
    result_a = RegexScrubber(PiiSpec(default="hash"), a).scrub(text)
    result_b = RegexScrubber(PiiSpec(default="hash"), b).scrub(text)
    assert [hit.value_hash for hit in result_a.hits] == [
        hmac.new(key_a.strip().encode(), v.encode(), "sha256").hexdigest()[:16] for v in values]
    for value, hit_a, hit_b in zip(values, result_a.hits, result_b.hits, strict=True):
        assert sha256_hex(value)[:8] not in hit_a.value_hash + result_a.text
        assert f":{hit_a.value_hash[:8]}>" in result_a.text
        assert hit_a.value_hash != hit_b.value_hash
    assert a.fingerprint != b.fingerprint
    shown = repr(result_a) + repr(a) + a.fingerprint + json.dumps([asdict(hit) for hit in result_a.hits])
    assert key_a.strip() not in shown and key_a.strip().encode().hex() not in shown


def test_the_same_key_gives_the_same_traces_and_fingerprint():
    again = PiiKey.parse("  pii-tests-key-0123456789\n", "again")  # surrounding whitespace is not part of a key
    assert again.fingerprint == KEY.fingerprint and again.trace("123-45-6789") == KEY.trace("123-45-6789")
    assert "pii-tests-key" not in repr(KEY) and KEY.fingerprint.startswith("hmac-sha256:")


# The attacker's search space: a known SSN prefix and a known phone exchange, 10⁴ candidates each, small
# enough to try all of them here (a real attacker tries all 10⁹ SSNs in minutes).
SSN_SPACE = [f"123-45-{n:04d}" for n in range(1, 10000)]
PHONE_SPACE = [f"+1 (415) 555-{n:04d}" for n in range(10000)]
SSN_ROW = '{{"instruction": "Which SSN is on file?", "output": "The SSN on file is {}."}}'
PHONE_ROW = '{{"instruction": "Which number should I call?", "output": "Call {} after nine."}}'


@pytest.fixture
def planted(tmp_path) -> tuple[list[Path], list[str]]:
    """Rows each holding one SSN or phone number drawn from the attacker's space."""
    rng = random.Random(14)
    values = rng.sample(SSN_SPACE, 12) + rng.sample(PHONE_SPACE, 12)
    rows = [(SSN_ROW if value in SSN_SPACE else PHONE_ROW).format(value) for value in values]
    data = tmp_path / "data"
    data.mkdir()
    (data / "planted.jsonl").write_text("\n".join(rows) + "\n")
    return [data / "planted.jsonl"], values


def _output_text(target: Path, tokenizer_dir: Path) -> str:
    """Every output file's text, and the training text the Parquet shards hold as tokens, decoded."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = []
    for path in sorted(target.rglob("*")):
        if path.suffix == ".parquet":
            texts += tokenizer.decode_batch(pq.read_table(path, columns=["input_ids"]).column("input_ids").to_pylist())
        elif path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


def _recovered(text: str) -> set[str]:
    """What trying every candidate recovers: values whose SHA-256 (whole-value, as `hash` and the audit wrote
    it, or of the row they sit in) shows up in the outputs."""
    shown = set(re.findall(r"[0-9a-f]{8,}", text))
    shown |= {run[:8] for run in shown} | {run[:16] for run in shown}
    found = set()
    for space, row in ((SSN_SPACE, SSN_ROW), (PHONE_SPACE, PHONE_ROW)):
        for value in space:
            if {sha256_hex(value)[:8], sha256_hex(value)[:16], sha256_hex(row.format(value))[:16]} & shown:
                found.add(value)
    return found


def test_no_planted_value_can_be_recovered_from_what_prepare_writes(tmp_path, model_cache, smollm2_dir, planted,
                                                                    monkeypatch, capsys):
    """prepare with `hash` for SSNs and phones: trying every candidate against the audit log, the placeholders
    in the training text, the compliance report and every other output recovers nothing, while the key's
    holder still finds each value's trace. Another key: another dataset, other traces, another fingerprint.
    The same key again: the same bytes. Neither key's text appears in any output or event."""
    from forge.runner.prepare.pipeline import dataset_dir, prepare
    from tests.test_prepare import make_plan

    files, values = planted
    key_a, key_b = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
    spec = {"pii": PiiSpec(default="hash"), "dedup": {"exact": False, "near": False}, "split": {"val": 0.25},
            "compliance": {"checks": [{"name": "privacy.residual_pii"}]}}
    monkeypatch.setenv("FORGE_PII_KEY", key_a)
    plan = make_plan(tmp_path, model_cache, files, **spec)
    prepare(plan)
    target_a = dataset_dir(plan, smollm2_dir)
    text = _output_text(target_a, smollm2_dir)
    audit = (target_a / "audit.jsonl").read_text()

    assert _recovered(text) == set()
    assert all(PiiKey.parse(key_a, "a").trace(value) in audit for value in values)  # the key's holder can
    manifest = json.loads((target_a / "manifest.json").read_text())
    assert manifest["pii_key"] == PiiKey.parse(key_a, "a").fingerprint

    digest_a = _tree_digest(target_a)
    prepare(plan, rebuild=True)
    assert _tree_digest(target_a) == digest_a  # a rerun with the same key: byte-identical

    monkeypatch.setenv("FORGE_PII_KEY", key_b)
    prepare(plan)
    target_b = dataset_dir(plan, smollm2_dir)
    assert target_b != target_a  # a different key is a different dataset, not a cache hit
    text_b = _output_text(target_b, smollm2_dir)
    assert _recovered(text_b) == set()
    assert json.loads((target_b / "manifest.json").read_text())["pii_key"] == PiiKey.parse(key_b, "b").fingerprint
    traces_a, traces_b = (_value_hashes(t / "audit.jsonl") for t in (target_a, target_b))
    assert len(traces_a) == len(traces_b) == len(values) and not traces_a & traces_b

    events = capsys.readouterr()
    for key in (key_a, key_b):
        assert key not in text + text_b + events.out + events.err
        assert key not in (tmp_path / "forge.yaml").read_text()


def _value_hashes(audit: Path) -> set[str]:
    return {step["value_hash"] for line in audit.read_text().splitlines()
            for step in json.loads(line)["steps"] if step["step"] == "pii"}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_hex(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}
