"""The secret that keys PII hashes, as the host hands it to the runner.

An unkeyed hash of a US SSN or a phone number is no protection: there are only about 10⁹ of them, so
anyone holding an audit log recovers the values by hashing every candidate. Prepare therefore writes
HMAC-SHA256 traces under a key only the user holds. The same key gives the same traces (reruns are
byte-identical, and repeats can still be counted across rows and datasets); without the key a trace says
nothing. A trace is the plain HMAC of the value, so the key's holder can check a value with standard
tools: `printf %s VALUE | openssl dgst -sha256 -hmac "$(cat KEY_FILE)"` (its first 16 hex digits).

The key is text (whitespace at either end ignored), from `FORGE_PII_KEY` or a file (`FORGE_PII_KEY_FILE`;
on the host the default is a per-user file created once). The launcher mounts it read-only at
`paths.PII_KEY` in the runner container. It is never written to an output, forge.yaml, an event or a
log: outputs carry its fingerprint, an HMAC of a fixed label, which tells keys apart and reveals nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from forge.contract import paths
from forge.errors import ConfigError

ENV_KEY = "FORGE_PII_KEY"
ENV_KEY_FILE = "FORGE_PII_KEY_FILE"
MIN_CHARS = 16  # a short key could itself be guessed from a trace of a guessable value
TRACE_HEX = 16
_FINGERPRINT_LABEL = b"forge pii key fingerprint v1"

HOW_TO_PROVIDE = (
    f"Set {ENV_KEY} to a secret of at least {MIN_CHARS} characters, or {ENV_KEY_FILE} to a file holding one "
    f"(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > key; chmod 600 key`). Keep the same key "
    "for datasets whose PII hashes must be comparable."
)


class PiiKey:
    """An HMAC key for PII traces. Its repr and its fingerprint never show the secret."""

    __slots__ = ("_secret", "fingerprint")

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self.fingerprint = "hmac-sha256:" + hmac.digest(secret, _FINGERPRINT_LABEL, hashlib.sha256).hex()[:TRACE_HEX]

    @classmethod
    def parse(cls, text: str, where: str) -> PiiKey:
        """A key from its text; `where` names its origin in errors (never the text itself)."""
        secret = text.strip()
        if len(secret) < MIN_CHARS:
            raise ConfigError(f"The PII hashing key from {where} is too short ({len(secret)} characters; at least "
                              f"{MIN_CHARS} needed).", HOW_TO_PROVIDE)
        return cls(secret.encode("utf-8"))

    @classmethod
    def read(cls, path: Path, where: str | None = None) -> PiiKey:
        where = where or str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"The PII hashing key file {where} does not exist.", HOW_TO_PROVIDE) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the PII hashing key file {where}: {exc}.", HOW_TO_PROVIDE) from None
        return cls.parse(text, where)

    @classmethod
    def ephemeral(cls) -> PiiKey:
        """A random key for traces that are thrown away (a scrubber used only for its redacted text)."""
        return cls(secrets.token_bytes(32))

    def trace(self, value: str | bytes) -> str:
        """The keyed one-way trace of a value: HMAC-SHA256, its first 16 hex digits."""
        data = value.encode("utf-8") if isinstance(value, str) else value
        return hmac.digest(self._secret, data, hashlib.sha256).hex()[:TRACE_HEX]

    def __repr__(self) -> str:
        return f"PiiKey({self.fingerprint})"


def runner_key() -> PiiKey:
    """The key the runner was given: `FORGE_PII_KEY`, else the file `FORGE_PII_KEY_FILE` names, else the
    secret the launcher mounts at `paths.PII_KEY`."""
    if os.environ.get(ENV_KEY):
        return PiiKey.parse(os.environ[ENV_KEY], f"${ENV_KEY}")
    if os.environ.get(ENV_KEY_FILE):
        return PiiKey.read(Path(os.environ[ENV_KEY_FILE]), f"${ENV_KEY_FILE} ({os.environ[ENV_KEY_FILE]})")
    if Path(paths.PII_KEY).is_file():
        return PiiKey.read(Path(paths.PII_KEY))
    raise ConfigError("No PII hashing key was given to the runner.",
                      f"Run it through `forge prepare` (which provides one), or: {HOW_TO_PROVIDE}")
