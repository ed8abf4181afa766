"""The PII hashing key: found or created once on the host, checked, handed to the runner container as a
read-only secret file, and shown nowhere (forge.contract.pii_key, forge.host.pii_key)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from forge.contract.pii_key import ENV_KEY, ENV_KEY_FILE, PiiKey, runner_key
from forge.errors import ConfigError
from forge.host import pii_key


@pytest.fixture
def no_key(tmp_path, monkeypatch) -> Path:
    """No key in the environment; the per-user config folder is a fresh one."""
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "forge" / "pii.key"


def test_the_per_user_key_is_created_once_private_with_a_message_saying_where_and_to_keep_it(no_key):
    said: list[str] = []
    text = pii_key.key_text(said.append)
    assert no_key.read_text().strip() == text and len(text) == 64
    assert stat.S_IMODE(no_key.stat().st_mode) == 0o600 and stat.S_IMODE(no_key.parent.stat().st_mode) == 0o700
    (message,) = said
    assert str(no_key) in message and "Keep this file and back it up" in message
    assert PiiKey.parse(text, "t").fingerprint in message and text not in message
    assert pii_key.key_text(said.append) == text and len(said) == 1  # found, not made again
    assert os.listdir(no_key.parent) == ["pii.key"]  # no temp file left


def test_concurrent_first_runs_agree_on_one_key(no_key):
    """Several forge commands starting at once on a new machine: one key wins, every one of them uses it."""
    with ThreadPoolExecutor(16) as pool:
        keys = list(pool.map(lambda _: pii_key.create_key_file(no_key).fingerprint, range(64)))
    assert set(keys) == {PiiKey.read(no_key).fingerprint}
    assert os.listdir(no_key.parent) == ["pii.key"]


def test_a_key_in_the_environment_wins_and_creates_no_file(no_key, monkeypatch):
    monkeypatch.setenv(ENV_KEY, "  an-environment-key-0123  \n")
    assert pii_key.key_text(pytest.fail) == "an-environment-key-0123"
    assert not no_key.exists()


def test_a_named_key_file_is_used_and_never_created(no_key, tmp_path, monkeypatch):
    named = tmp_path / "team.key"
    monkeypatch.setenv(ENV_KEY_FILE, str(named))
    with pytest.raises(ConfigError) as error:
        pii_key.key_text(pytest.fail)
    assert str(named) in error.value.message and ENV_KEY in error.value.hint
    assert not named.exists() and not no_key.exists()
    named.write_text("a-team-key-0123456789\n")
    named.chmod(0o644)
    said: list[str] = []
    assert pii_key.key_text(said.append) == "a-team-key-0123456789"
    assert said == [f"The PII hashing key file {named} is open to other users: chmod 600 {named}."]


@pytest.mark.parametrize("text", ["", "   \n", "short-key", "fifteen-chars!!"])
def test_a_short_key_is_refused_without_showing_it(no_key, monkeypatch, text):
    monkeypatch.setenv(ENV_KEY, text or " ")
    with pytest.raises(ConfigError) as error:
        pii_key.key_text(pytest.fail)
    assert "too short" in error.value.message and f"${ENV_KEY}" in error.value.message
    assert not text.strip() or text.strip() not in error.value.message + error.value.hint


def test_the_runner_reads_its_key_from_the_environment_or_a_file_and_refuses_to_run_without_one(no_key,
                                                                                                   tmp_path,
                                                                                                   monkeypatch):
    with pytest.raises(ConfigError) as error:
        runner_key()
    assert "No PII hashing key" in error.value.message and ENV_KEY_FILE in error.value.hint
    (tmp_path / "k").write_text("a-file-key-0123456789\n")
    monkeypatch.setenv(ENV_KEY_FILE, str(tmp_path / "k"))
    assert runner_key().fingerprint == PiiKey.parse("a-file-key-0123456789", "t").fingerprint
    monkeypatch.setenv(ENV_KEY, "an-environment-key-0123")
    assert runner_key().fingerprint == PiiKey.parse("an-environment-key-0123", "t").fingerprint


# --- through the CLI, the engine and the CPU image ---------------------------------------------------------

PLANTED_ROWS = [{"instruction": f"What is the SSN of customer {n}?", "output": f"It is 123-45-{6700 + n}."}
                for n in range(12)]


def _forge(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The CLI with a key only where `env` gives one (not the suite's own)."""
    base = {name: value for name, value in os.environ.items() if name not in (ENV_KEY, ENV_KEY_FILE)}
    return subprocess.run([sys.executable, "-m", "forge.host", *args], cwd=cwd, capture_output=True, text=True,
                          env={**base, "COLUMNS": "160", **env}, timeout=600)


@pytest.mark.docker
def test_the_runner_container_gets_the_key_as_a_secret_file_and_it_shows_nowhere(tmp_path, engine, model_cache):
    """`forge prepare` with a planted key in the environment: the manifest names that key's fingerprint (the
    runner in the container can only have read it from the mounted secret file), and the key's text is in no
    output, no forge.yaml, no line the CLI printed. Without one, a per-user key is created and said so, and
    it makes another dataset."""
    (tmp_path / "data").mkdir()  # a folder of its own, readable by the runner's user (tmp_path is private)
    (tmp_path / "data" / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PLANTED_ROWS))
    planted = "planted-pii-key-" + os.urandom(8).hex()
    env = {ENV_KEY: planted, "XDG_CONFIG_HOME": str(tmp_path / "config"), "FORGE_MODEL_CACHE": str(model_cache)}
    made = _forge("plan", "smoke", "--cpu", "--data", "data/data.jsonl", cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stderr
    first = _forge("prepare", "--json", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr + first.stdout
    dataset = Path(json.loads(first.stdout.splitlines()[-1])["paths"]["dataset_dir"])
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["pii_key"] == PiiKey.parse(planted, "t").fingerprint
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "config" not in p.parts]
    assert not any(planted.encode() in content for content in written)
    assert planted not in first.stdout + first.stderr + made.stdout + made.stderr
    assert not (tmp_path / "config").exists()  # the environment's key: no key file made

    del env[ENV_KEY]
    second = _forge("prepare", "--json", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr + second.stdout
    key_file = tmp_path / "config" / "forge" / "pii.key"
    assert f"Created a PII hashing key at {key_file}" in second.stderr.replace("\n", " ")
    other = Path(json.loads(second.stdout.splitlines()[-1])["paths"]["dataset_dir"])
    assert other != dataset
    assert json.loads((other / "manifest.json").read_text())["pii_key"] == PiiKey.read(key_file).fingerprint
    assert key_file.read_text().strip() not in second.stdout + second.stderr
