"""The README's forge.yaml reference documents every key of the schema, and its commands exist."""

import re
from pathlib import Path

from pydantic import BaseModel

from forge.contract.plan import Plan

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _keys(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and name != "gpus":
            yield from _keys(annotation, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_every_forge_yaml_key_is_documented():
    reference = README.split("## forge.yaml reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)*)`", reference))
    assert sorted(set(_keys(Plan)) - documented) == []


def test_the_two_setup_commands_are_the_scripts_ci_uses():
    root = Path(__file__).resolve().parents[1]
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    assert "scripts/test.sh" in (root / ".ci" / "run").read_text()
