"""Secrets for one runner container, as read-only files under /run/secrets.

Never environment variables, labels or arguments: `docker inspect` shows all of those to anyone who may
talk to the engine. Each secret is written to a private directory (memory-backed where the host has one,
so it never touches a disk), readable only by the container's user, mounted read-only, and deleted when
the container has gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from forge.contract import paths
from forge.host.mounts import RUNNER_UID


class Secrets:
    """Use as a context manager around the container's life; `volumes` goes into the container's mounts."""

    def __init__(self) -> None:
        self.volumes: dict[str, dict] = {}
        self._dir: Path | None = None

    def add(self, container_path: str, value: str | bytes) -> str:
        """Mount `value` read-only at `container_path` (under /run/secrets); returns that path."""
        inside = PurePosixPath(container_path)
        if inside.parent != PurePosixPath(paths.SECRETS) or inside.name in ("", ".", ".."):
            raise ValueError(f"a secret goes directly under {paths.SECRETS}, not at {container_path}")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="forge-secrets-", dir=_private_root()))  # 0700, ours
        host = self._dir / inside.name
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(value.encode() if isinstance(value, str) else value)
        _give_to_runner(host)
        self.volumes[str(host)] = {"bind": str(inside), "mode": "ro"}
        return str(inside)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.volumes = {}

    def __enter__(self) -> Secrets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _private_root() -> str | None:
    """The user's runtime dir or /dev/shm (memory, not disk) when there is one; else the temp dir."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return None


def _give_to_runner(path: Path) -> None:
    """As root, the container runs as the image's user (mounts.container_user), so the file must be theirs;
    its directory stays root's (0700), so that uid on the host cannot reach it, while the bind mount can."""
    if os.getuid() == 0:
        os.chown(path, RUNNER_UID, RUNNER_UID)
