"""fsync for files and directories: what is renamed into place must be on disk before its record is."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
