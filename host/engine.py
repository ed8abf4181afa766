"""One way to reach the Docker engine, with an actionable error when it is not there."""

from __future__ import annotations

import os
from functools import cache

from forge.errors import EngineError


@cache
def client():
    import docker
    from docker.errors import DockerException

    try:
        engine = docker.from_env(timeout=600)
        engine.ping()
    except DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise EngineError(
            f"Cannot reach the Docker engine at {where} ({_short(exc)}).",
            "Start it (`sudo systemctl start docker`, or `bash scripts/ensure-docker.sh` on a bare machine), "
            "or set DOCKER_HOST to a running engine.",
        ) from None
    return engine


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
