import json

import pytest
from pydantic import ValidationError

from forge.contract.events import Failure, Log, Progress, Result, StageStarted, encode_event, parse_line
from forge.contract.plan import Plan
from forge.contract.plan_io import dump_plan, load_plan, write_plan
from forge.errors import ConfigError
from forge.host.detect import GpuReport, detect
from forge.host.planner import build_plan
from tests.conftest import EXAMPLES


class NoGpu:
    def report(self):
        return GpuReport(problem="test: no GPU")


@pytest.fixture
def plan(tmp_path) -> Plan:
    return build_plan("smoke", "smollm2-135m-instruct", [str(EXAMPLES / "alpaca-sample.jsonl")], detect(NoGpu()), tmp_path)


def test_plan_round_trips_through_yaml(plan, tmp_path):
    path = tmp_path / "forge.yaml"
    write_plan(plan, path)
    assert load_plan(path) == plan
    assert dump_plan(load_plan(path)) == dump_plan(plan)


def test_schema_is_generated_from_the_models(plan):
    schema = Plan.model_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) >= {"model", "hardware", "image", "data", "prepare", "train"}
    assert "micro_batch_size" in json.dumps(schema)


def test_unknown_key_is_reported_with_its_line(plan, tmp_path):
    path = tmp_path / "forge.yaml"
    text = dump_plan(plan).replace("  micro_batch_size:", "  micro_batch_sise: 2\n  micro_batch_size:")
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "micro_batch_sise" in row)
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    assert f"forge.yaml:{line}: unknown key 'train.micro_batch_sise'" in err.value.message
    assert "forge schema" in err.value.hint


def test_wrong_type_is_reported_with_its_line_and_value(plan, tmp_path):
    path = tmp_path / "forge.yaml"
    text = dump_plan(plan).replace("learning_rate: 0.001", "learning_rate: fast")
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "learning_rate" in row)
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    assert f"forge.yaml:{line}: train.learning_rate" in err.value.message
    assert "'fast'" in err.value.message


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "forge.yaml"
    path.write_text("schema_version: 1\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"forge.yaml:\d+: not valid YAML"):
        load_plan(path)


def test_inputs_accept_plain_paths_and_mappings(plan):
    data = plan.model_dump(mode="json")
    data["data"] = {"inputs": ["a.jsonl", {"path": "b/*.csv", "format": "alpaca", "tags": {"source": "human"}}]}
    inputs = Plan.model_validate(data).data.inputs
    assert [(i.path, i.format, i.tags) for i in inputs] == [("a.jsonl", "auto", {}), ("b/*.csv", "alpaca", {"source": "human"})]


def test_split_fractions_must_leave_room_for_train(plan):
    data = plan.model_dump(mode="json")
    data["prepare"]["split"] = {"val": 0.6, "test": 0.5}
    with pytest.raises(ValidationError, match="leave rows for train"):
        Plan.model_validate(data)


def test_model_source_needs_the_fields_of_its_kind(plan):
    data = plan.model_dump(mode="json")
    data["model"]["source"] = {"kind": "hub"}
    with pytest.raises(ValidationError, match="needs repo"):
        Plan.model_validate(data)


@pytest.mark.parametrize("event", [
    StageStarted(ts=1.0, stage="tokenize", total=10, unit="rows"),
    Progress(ts=2.0, stage="train", done=3, total=12, metrics={"loss": 1.25}),
    Log(ts=3.0, level="warning", message="careful"),
    Result(ts=4.0, step="train", status="ok", paths={"adapter": "/out/runs/x/adapter"}, info={"steps": 12}),
    Failure(ts=5.0, code="data", message="bad", hint="fix it"),
])
def test_events_round_trip(event):
    assert parse_line(encode_event(event) + "\n") == event


@pytest.mark.parametrize("line", ["hello", '{"kind": "progress"}', '{"forge_event": 1, "kind": "nope", "ts": 1}', "{not json"])
def test_non_events_are_plain_output(line):
    assert parse_line(line) is None
