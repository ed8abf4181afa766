"""The PII hashing key on the host: found, or created once per user when absent. The launcher hands it to
the runner container as a read-only secret file (`host.secrets`), never as an environment variable.

Where it comes from, first match wins: `FORGE_PII_KEY` (the key itself), `FORGE_PII_KEY_FILE` (a file
holding it), else the per-user file `$XDG_CONFIG_HOME/forge/pii.key` (default `~/.config/forge/pii.key`),
created with a random key (mode 0600) the first time it is needed. See `forge.contract.pii_key` for why.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable

from forge.contract.pii_key import ENV_KEY, ENV_KEY_FILE, PiiKey

KEYED_STEPS = ("prepare", "train")  # train finds its dataset by a name that covers the key's fingerprint


def default_key_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "forge" / "pii.key"


def key_text(on_log: Callable[[str], None]) -> str:
    """The key for this run, checked; `on_log` hears when the key file was created or is open to others."""
    if os.environ.get(ENV_KEY):
        PiiKey.parse(os.environ[ENV_KEY], f"${ENV_KEY}")
        return os.environ[ENV_KEY].strip()
    named = os.environ.get(ENV_KEY_FILE)
    path = Path(named).expanduser() if named else default_key_file()
    if not named and not path.exists():
        key = create_key_file(path)
        on_log(f"Created a PII hashing key at {path} ({key.fingerprint}). Prepare keys the PII hashes in its audit "
               "log and outputs with it, so that nobody without it can reverse them. Keep this file and back it "
               "up: datasets hashed with another key are not comparable (and a new key means a new dataset). Use "
               f"the same key on every machine that prepares or trains these datasets (copy it, or set {ENV_KEY_FILE}).")
    PiiKey.read(path, f"{path} (${ENV_KEY_FILE})" if named else str(path))
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        on_log(f"The PII hashing key file {path} is open to other users: chmod 600 {path}.")
    return path.read_text(encoding="utf-8").strip()


def create_key_file(path: Path) -> PiiKey:
    """A new random key in `path` (mode 0600, a new folder 0700), or the one another forge wrote first: the
    key is written whole to a temp file, then linked into place, which fails when `path` exists."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = secrets.token_hex(32) + "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return PiiKey.read(path)
    finally:
        tmp.unlink(missing_ok=True)
    return PiiKey.parse(text, str(path))
