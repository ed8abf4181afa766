"""Where a data path came from decides what its error tells the user to fix: the `--data` they typed, or
the forge.yaml entry."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.errors import DataError
from forge.host.detect import detect
from forge.host.mounts import build_mounts
from forge.host.planner import build_plan
from tests.conftest import EXAMPLES
from tests.test_detect import Table

names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_. -]{0,20}", fullmatch=True).filter(lambda n: n.strip(". ") == n)
typed_paths = st.builds(lambda parts, glob, suffix: "/".join(parts) + ("/*" if glob else "") + suffix,
                        st.lists(names, min_size=1, max_size=3), st.booleans(), st.sampled_from([".jsonl", ".csv", ""]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(typed=typed_paths)
def test_a_missing_data_path_from_the_command_line_names_the_flag_not_forge_yaml(tmp_path, monkeypatch, typed):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as error:
        build_plan("smoke", "smollm2-135m-instruct", [typed], detect(Table(problem="x")), tmp_path / "plans")
    said = error.value.message + error.value.hint
    assert f"--data {typed!r}" in error.value.message
    assert "forge.yaml" not in said and "relative to the current directory" in error.value.hint


def test_a_missing_data_path_in_forge_yaml_names_its_entry(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text((EXAMPLES / "alpaca-sample.jsonl").read_text())
    plan = build_plan("smoke", "smollm2-135m-instruct", [str(data)], detect(Table(problem="x")), tmp_path)
    data.unlink()
    with pytest.raises(DataError) as error:
        build_mounts(plan, tmp_path)
    assert "forge.yaml data.inputs entry 'data.jsonl'" in error.value.message and "--data" not in error.value.message
    glob = plan.model_copy(update={"data": plan.data.model_copy(update={
        "inputs": [plan.data.inputs[0].model_copy(update={"path": "data/*.csv"})]})})
    with pytest.raises(DataError, match=r"No files match 'data/\*.csv' \(forge.yaml data.inputs\)"):
        build_mounts(glob, Path(tmp_path))
