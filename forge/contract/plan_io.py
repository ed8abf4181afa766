"""Read and write forge.yaml, turning YAML and schema errors into `file:line: field: problem` messages."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from forge.contract.plan import Plan
from forge.errors import ConfigError

_FIX = "Edit the file, or regenerate it with `forge plan`; `forge schema` prints every allowed key."


def dump_plan(plan: Plan) -> str:
    data = plan.model_dump(mode="json", exclude_none=True)
    return "# Written by `forge plan`. Schema: `forge schema`.\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_plan(plan: Plan, path: Path) -> None:
    atomic_write_text(path, dump_plan(plan))


def load_plan(path: Path) -> Plan:
    if not path.is_file():
        raise ConfigError(f"No plan at {path}.", "Run `forge plan --data FILE` first, or pass --config PATH.")
    return parse_plan(path.read_text(encoding="utf-8"), path)


def parse_plan(text: str, path: Path) -> Plan:
    """A plan from its YAML text; `path` names it in errors (a queued job carries its plan as text)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}).", _FIX) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}.", _FIX)
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(path, text, err) for err in exc.errors()]
        raise ConfigError("Invalid forge.yaml:\n  " + "\n  ".join(lines), _FIX) from None


def _describe(path: Path, text: str, err: dict) -> str:
    loc = [part for part in err["loc"] if not str(part).startswith("function-")]
    dotted = ".".join(str(part) for part in loc) or "(top level)"
    line = _line_of(text, loc)
    where = f"{path}:{line}" if line else str(path)
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key {dotted!r}"
    got = err.get("input")
    got_text = f" (got {got!r})" if err["type"] != "missing" and not isinstance(got, (dict, list)) else ""
    return f"{where}: {dotted}: {err['msg']}{got_text}"


def _line_of(text: str, loc: list) -> int | None:
    """1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be read (and mounted) by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
