"""The runner→host event protocol: one JSON object per stdout line, tagged with `forge_event`.

The runner writes them through `forge.runner.emit`; the host parses them with `parse_line`.
Any stdout line that is not an event is shown as a log line, so a stray print never breaks the host.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

EVENT_PROTOCOL_VERSION = 1


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    forge_event: Literal[1] = EVENT_PROTOCOL_VERSION
    ts: float = Field(description="Unix time on the runner")


class StageStarted(_Event):
    kind: Literal["stage"] = "stage"
    stage: str
    total: int | None = None
    unit: str = "items"


class Progress(_Event):
    kind: Literal["progress"] = "progress"
    stage: str
    done: int
    total: int | None = None
    metrics: dict[str, float] = {}


class StageFinished(_Event):
    kind: Literal["stage_end"] = "stage_end"
    stage: str
    seconds: float
    summary: dict[str, int | float | str] = {}


class Log(_Event):
    kind: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str


class Result(_Event):
    kind: Literal["result"] = "result"
    step: Literal["prepare", "train", "export"]
    status: Literal["ok", "stopped"]
    paths: dict[str, str] = Field({}, description="Container paths of what the step produced")
    info: dict[str, int | float | str | None] = {}


class Backoff(_Event):
    """Training ran out of GPU memory: the micro-batch was halved and accumulation raised to match."""

    kind: Literal["backoff"] = "backoff"
    step: int
    micro_batch_from: int
    micro_batch_size: int
    gradient_accumulation: int
    reason: str


class Failure(_Event):
    kind: Literal["error"] = "error"
    code: str
    message: str
    hint: str = ""


Event = Annotated[Union[StageStarted, Progress, StageFinished, Log, Result, Backoff, Failure], Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def encode_event(event: _Event) -> str:
    return event.model_dump_json()


def parse_line(line: str) -> Event | None:
    """The event on this line, or None when the line is plain output."""
    line = line.strip()
    if not line.startswith("{") or '"forge_event"' not in line:
        return None
    try:
        return _ADAPTER.validate_python(json.loads(line))
    except (ValueError, ValidationError):
        return None
