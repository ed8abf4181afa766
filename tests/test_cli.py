"""The `forge` CLI as a user runs it: real subprocesses, so exit codes and stderr are what people see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, REPO


def forge(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge.host", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=120)


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "To fix:" in result.stderr
    for needle in needles:
        assert needle in result.stderr


def test_help_for_every_command(tmp_path):
    for command in ([], ["plan"], ["prepare"], ["train"], ["doctor"], ["images"], ["images", "build"], ["schema"]):
        result = forge(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Usage" in result.stdout, command


def test_plan_without_gpu_writes_a_cpu_plan_and_says_why(tmp_path):
    result = forge("plan", "smoke", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "forge-runner:cpu-" in result.stdout and "CPU plan: --cpu was given" in result.stdout
    assert (tmp_path / "forge.yaml").is_file()


def test_plan_for_a_target_gpu_says_so_and_explains_each_term(tmp_path):
    result = forge("plan", "sft", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--model", "llama-3.2-1b-instruct",
                   "--target", "T4", "--explain", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "forge-runner:turing-" in out and "Tesla T4" in out and "planned for --target t4, not detected" in out
    assert "Planned for --target t4:" in out and "float16" in out
    assert "basis of the planned figure" in out and "estimated (first principles)" in out
    from forge.contract.plan_io import load_plan

    plan = load_plan(tmp_path / "forge.yaml")
    assert (plan.hardware.target, plan.train.dtype, [g.uuid for g in plan.hardware.gpus]) == ("t4", "float16", ["0"])


def test_plan_for_several_target_gpus(tmp_path):
    from forge.contract.plan_io import load_plan

    assert forge("plan", "smoke", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--target", "h100:4",
                 cwd=tmp_path).returncode == 0
    plan = load_plan(tmp_path / "forge.yaml")
    assert [g.index for g in plan.hardware.gpus] == [0, 1, 2, 3] and plan.hardware.target == "h100:4"


def test_an_unknown_target_suggests_the_known_names(tmp_path):
    result = forge("plan", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--target", "a100", cwd=tmp_path)
    assert_clean_error(result, 2, "Unknown GPU 'a100' for --target", "Did you mean a100-40gb or a100-80gb",
                       "v100-32gb", "plans/gpus.yaml")
    assert not (tmp_path / "forge.yaml").exists()


def test_a_target_with_cpu_or_gpu_is_a_usage_error(tmp_path):
    for extra in (["--cpu"], ["--gpu", "0"]):
        result = forge("plan", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--target", "t4", *extra, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "--target" in result.stderr and "leave out --cpu and --gpu" in result.stderr


def test_schema_is_json(tmp_path):
    result = forge("schema", cwd=tmp_path)
    assert json.loads(result.stdout)["title"] == "Plan"


def test_missing_data_file(tmp_path):
    result = forge("plan", "--data", "missing.jsonl", cwd=tmp_path)
    assert_clean_error(result, 3, "Data file not found", "missing.jsonl")


def test_unknown_model(tmp_path):
    result = forge("plan", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--model", "gpt-17", cwd=tmp_path)
    assert_clean_error(result, 4, "Unknown model 'gpt-17'", "smollm2-135m-instruct")


def test_unknown_goal(tmp_path):
    result = forge("plan", "finetune-everything", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), cwd=tmp_path)
    assert_clean_error(result, 2, "Unknown goal", "smoke")


@pytest.mark.parametrize("edit, message", [
    (("train:", "train:\n  turbo: true"), "unknown key 'train.turbo'"),
    (("micro_batch_size: ", "micro_batch_size: two #"), "train.micro_batch_size"),
])
def test_malformed_plan(tmp_path, edit, message):
    assert forge("plan", "smoke", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--cpu", cwd=tmp_path).returncode == 0
    plan = tmp_path / "forge.yaml"
    plan.write_text(plan.read_text().replace(*edit, 1))
    for step in ("prepare", "train"):
        assert_clean_error(forge(step, cwd=tmp_path), 2, message, "forge.yaml:")


def test_missing_plan(tmp_path):
    assert_clean_error(forge("train", cwd=tmp_path), 2, "No plan at forge.yaml")


def test_unreachable_engine(tmp_path):
    assert forge("plan", "smoke", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--cpu", cwd=tmp_path).returncode == 0
    result = forge("prepare", cwd=tmp_path, env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert_clean_error(result, 5, "Cannot reach the Docker engine", "no-engine.sock")


def test_data_file_removed_after_planning(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text((EXAMPLES / "alpaca-sample.jsonl").read_text())
    assert forge("plan", "smoke", "--data", str(data), "--cpu", cwd=tmp_path).returncode == 0
    data.unlink()
    assert_clean_error(forge("prepare", cwd=tmp_path), 3, "Data file not found", "data.jsonl")


@pytest.mark.docker
def test_missing_image(tmp_path, engine):
    assert forge("plan", "smoke", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--cpu", cwd=tmp_path).returncode == 0
    plan = tmp_path / "forge.yaml"
    plan.write_text(plan.read_text().replace("name: forge-runner:cpu-", "name: forge-runner:nonexistent-"))
    assert_clean_error(forge("prepare", cwd=tmp_path), 6, "forge-runner:nonexistent-", "forge images build cpu")


@pytest.mark.docker
def test_image_built_from_other_sources_is_refused(tmp_path, engine):
    import io

    from forge.host.planner import image_name

    dockerfile = f"FROM {image_name('cpu')}\nLABEL dev.forge.source=0123456789abcdef\n"
    engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag="forge-runner:stale-test", rm=True)
    try:
        assert forge("plan", "smoke", "--data", str(EXAMPLES / "alpaca-sample.jsonl"), "--cpu", cwd=tmp_path).returncode == 0
        plan = tmp_path / "forge.yaml"
        plan.write_text(plan.read_text().replace(f"name: {image_name('cpu')}", "name: forge-runner:stale-test"))
        assert_clean_error(forge("prepare", cwd=tmp_path), 6, "other Forge sources", "forge images build cpu")
    finally:
        engine.images.remove("forge-runner:stale-test", force=True)


def test_building_an_arch_without_a_dockerfile(tmp_path):
    result = forge("images", "build", "tensilica", "--context", str(REPO), cwd=tmp_path)
    assert_clean_error(result, 6, "No Dockerfile for arch 'tensilica'", "cpu")


@pytest.mark.docker
def test_unpullable_base_image_points_at_bootstrap(tmp_path, engine):
    result = forge("images", "build", "cpu", "--base", "forge-test-no-such-base:1", "--context", str(REPO), cwd=tmp_path)
    assert_clean_error(result, 6, "forge-test-no-such-base", "forge images bootstrap")


def test_source_digest_follows_the_code(tmp_path):
    from forge.host.images import source_digest

    (tmp_path / "a.py").write_text("x = 1\n")
    before = source_digest({"pkg": tmp_path})
    (tmp_path / "notes.txt").write_text("not code")
    assert source_digest({"pkg": tmp_path}) == before
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_digest({"pkg": tmp_path}) != before


def test_host_never_imports_the_ml_stack():
    code = (
        "import sys, forge.host.cli, forge.host.launcher, forge.host.doctor, forge.host.images, forge.host.planner;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
