"""Every error a user can see is checked against what it tells them to use: each forge.yaml key its message
or hint names must exist in the Plan schema, and each CLI flag must exist on the `forge` command it names
(on some command when it names none). The errors are found by parsing the source: every construction of a
ForgeError subclass (ConfigError, DataError, ...) and of typer.BadParameter, and every call given a `hint=`
(failure events) or a `fix=` (`forge doctor`'s checks)."""

from __future__ import annotations

import ast
import re
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel

from forge import errors
from forge.contract.plan import Plan
from forge.host.cli import app
from tests.conftest import REPO

SOURCES = ("forge", "host", "runner")
# Programs whose flags a hint may quote (`pip install --no-deps`): their flags are theirs, not ours.
OTHER_PROGRAMS = ("docker", "pip", "python", "hf", "git", "nvidia-smi", "apt-get", "chmod")
FILE_SUFFIXES = {"jsonl", "json", "csv", "parquet", "yaml", "yml", "gz", "zst", "py", "txt", "md", "jinja", "gguf",
                 "safetensors", "bin", "sqlite", "lock", "key", "pt", "toml"}


def _error_names() -> set[str]:
    found, todo = set(), [errors.ForgeError]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo += cls.__subclasses__()
    return found | {name for name, value in vars(errors).items()
                    if isinstance(value, type) and issubclass(value, errors.ForgeError)}


@dataclass(frozen=True)
class Hint:
    where: str  # file:line
    text: str  # the message and hint's literal text; a formatted value is a gap ("\0")


def _literal_text(node: ast.AST, constants: dict[str, ast.AST], depth: int = 0) -> list[str]:
    """The string literals in an expression, module-level string constants it names resolved."""
    pieces = []
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            pieces.append(child.value)
        elif isinstance(child, ast.JoinedStr):
            pieces.append("".join(v.value if isinstance(v, ast.Constant) else "\0" for v in child.values))
        elif isinstance(child, ast.Name) and child.id in constants and depth < 3:
            pieces += _literal_text(constants[child.id], constants, depth + 1)
    return pieces


@cache
def sources() -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(REPO)), ast.parse(path.read_text(encoding="utf-8"), str(path)))
            for root in SOURCES for path in sorted((REPO / root).rglob("*.py"))]


def collect_hints() -> list[Hint]:
    names = _error_names()
    hints = []
    for path, tree in sources():
        constants = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            given = [k.value for k in node.keywords if k.arg in ("message", "hint", "fix", "param_hint")]
            if called in names or called == "BadParameter":
                given += node.args[:2]
            elif not any(k.arg in ("hint", "fix") for k in node.keywords):
                continue
            text = "\n".join(piece for arg in given for piece in _literal_text(arg, constants))
            hints.append(Hint(f"{path}:{node.lineno}", text))
    return hints


# --- the schema's keys -------------------------------------------------------------------------------------


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _is_mapping(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Mapping):
        return True
    return origin in (typing.Union, types.UnionType) and any(_is_mapping(a) for a in typing.get_args(annotation))


def key_exists(dotted: str) -> bool:
    """Whether `a.b.c` names a field of forge.yaml (an entry of a mapping field counts: prepare.pii.policies.EMAIL)."""
    models: list[type[BaseModel]] = [Plan]
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        fields = [model.model_fields[part] for model in models if part in model.model_fields]
        if not fields:
            return False
        annotation = fields[0].annotation
        models = _models_in(annotation)
        if not models:
            return index == len(parts) - 1 or (_is_mapping(annotation) and index == len(parts) - 2)
    return True


KEY = re.compile(r"(?<![\w./-])(?:%s)(?:\.[A-Za-z_]\w*)+(?![\w/-])" % "|".join(Plan.model_fields))


def named_keys(text: str) -> list[str]:
    return [match.group() for match in KEY.finditer(text) if match.group().rsplit(".", 1)[1] not in FILE_SUFFIXES
            and not text[match.end():match.end() + 1] == "\0"]  # `train.{name}`: a key built at run time


# --- the CLI's flags -----------------------------------------------------------------------------------------


@cache
def cli_commands() -> dict[str, set[str]]:
    """Each command's path (`plan`, `images build`) → the option names it accepts."""
    found: dict[str, set[str]] = {}

    def walk(command, path: str) -> None:
        found[path] = {opt for param in command.params if param.param_type_name == "option"
                       for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def bad_flags(text: str, commands: dict[str, set[str]]) -> list[str]:
    """Flags the text names that no command has: checked against `forge CMD` when the text quotes one right
    before the flag, skipped when it quotes another program there."""
    every = set().union(*commands.values())
    bad = []
    for match in FLAG.finditer(text):
        before = text[:match.start()]
        quoted = before.count("`") % 2 == 1
        clause = before[before.rfind("`") + 1:] if quoted else re.split(r"[.;:(\n]\s", before)[-1]
        words = clause.split()
        if words and words[0] in OTHER_PROGRAMS:
            continue
        if words and words[0] == "forge":
            command = " ".join(w for w in words[1:3] if re.fullmatch(r"[a-z]+", w))
            while command and command not in commands:
                command = command.rpartition(" ")[0]
            if command and match.group() not in commands[command]:
                bad.append(f"`forge {command}` has no {match.group()}")
                continue
        if match.group() not in every:
            bad.append(f"no command has {match.group()}")
    return bad


# --- the checks ----------------------------------------------------------------------------------------------

HINTS = collect_hints()


def test_the_collector_finds_the_error_paths():
    """A guard on the collector itself: it sees errors of every kind, with their hints."""
    assert len(HINTS) > 100
    texts = "\n".join(hint.text for hint in HINTS)
    for sample in ("Run `forge prepare` first", "Fix the entry named in the message.", "Use one of:"):
        assert sample in texts
    assert len({hint.where.split(":")[0] for hint in HINTS}) > 20


def test_the_checks_catch_a_key_or_flag_that_does_not_exist():
    commands = cli_commands()
    assert named_keys("lower prepare.val_fraction, then prepare again") == ["prepare.val_fraction"]
    assert not key_exists("prepare.val_fraction") and not key_exists("train.lora.targets")
    assert all(key_exists(k) for k in ("prepare.split.val", "train.lora.target_modules", "prepare.pii.policies.EMAIL",
                                       "model.source.path", "train.eval.gold", "output.dir"))
    assert not key_exists("prepare.split.val.x") and not key_exists("goal.x")
    assert named_keys("see data.jsonl and forge.yaml or train.{}".replace("{}", "\0")) == []
    assert bad_flags("e.g. --goal with a shorter preset", commands) == ["no command has --goal"]
    assert bad_flags("`forge train --rebuild`", commands) == ["`forge train` has no --rebuild"]
    assert bad_flags("`forge prepare --rebuild`, `pip install --no-deps x`, `forge images build --base B`",
                     commands) == []


def literal_texts() -> list[Hint]:
    """Every string literal in the sources but docstrings: hints carried in a variable, validators' messages."""
    found = []
    for path, tree in sources():
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        found += [Hint(f"{path}:{node.lineno}", _literal_text(node, {})[0]) for node in ast.walk(tree)
                  if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                                         and id(node) not in docstrings)]
    return found


def test_every_forge_yaml_key_any_message_names_exists():
    """Wider than the error paths: hints kept in a variable or a tuple, and pydantic validators' messages."""
    unknown = [f"{text.where}: {key}" for text in literal_texts() for key in named_keys(text.text)
               if not key_exists(key)]
    assert not unknown, f"forge.yaml keys the schema lacks: {unknown}"


@pytest.mark.parametrize("hint", HINTS, ids=lambda hint: hint.where)
def test_every_key_and_flag_an_error_names_exists(hint):
    unknown_keys = [key for key in named_keys(hint.text) if not key_exists(key)]
    assert not unknown_keys, f"{hint.where} names forge.yaml keys the schema lacks: {unknown_keys}\n{hint.text}"
    flags = bad_flags(hint.text, cli_commands())
    assert not flags, f"{hint.where} names CLI flags the CLI lacks: {flags}\n{hint.text}"
