"""One error type for every user-facing failure: what went wrong, and how to fix it.

The host CLI turns these into a message, a hint and an exit code; the runner turns them into an
`error` event that the host shows the same way. Nothing user-facing should surface as a traceback.
"""

from __future__ import annotations

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on request with its state saved; a rerun resumes


class ForgeError(Exception):
    """A failure the user can act on."""

    exit_code = 1
    code = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):  # keep the hint when an error crosses from a worker process
        return type(self), (self.message, self.hint)


class ConfigError(ForgeError):
    """forge.yaml, a CLI option or a catalog entry is invalid."""

    exit_code = 2
    code = "config"


class DataError(ForgeError):
    """An input data file is missing or unusable."""

    exit_code = 3
    code = "data"


class ModelError(ForgeError):
    """The model cannot be resolved or loaded."""

    exit_code = 4
    code = "model"


class EngineError(ForgeError):
    """The Docker engine cannot be reached or refused a request."""

    exit_code = 5
    code = "engine"


class ImageError(ForgeError):
    """The runner image is missing or does not match the plan."""

    exit_code = 6
    code = "image"


class HardwareError(ForgeError):
    """The detected hardware cannot run any Forge image."""

    exit_code = 7
    code = "hardware"


class QueueError(ForgeError):
    """The job queue cannot be reached, or a job is not where the command expects it."""

    exit_code = 8
    code = "queue"


class OutOfMemoryError(ForgeError):
    """The runner or one of its processes was killed for memory. Not in ERRORS_BY_CODE, which lists what would
    fail the same way again: with its state kept, a rerun resumes and may get further."""

    exit_code = 137  # what a process the kernel's OOM killer ended exits with: 128 + SIGKILL
    code = "oom"


ERRORS_BY_CODE = {cls.code: cls for cls in (ForgeError, ConfigError, DataError, ModelError, EngineError, ImageError,
                                            HardwareError, QueueError)}
