"""forge train's recipe as a killable subprocess (the runner's code outside a container; the end-to-end test
runs it in the image): resume after kill -9 matches an uninterrupted run, OOM backoff keeps the effective
batch, and the run directory holds everything a run promises."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from forge.contract.plan_io import load_plan, write_plan
from forge.host.detect import detect
from forge.runner.prepare.pipeline import prepare
from forge.runner.train import run_dir_for
from tests.conftest import REPO
from tests.test_prepare import NoGpu

pytest.importorskip("torch")

STEPS = 8
SAFETY_NET_S = 3600  # only for a hung run: kills wait for step events, never for a guessed time


def _plan(root: Path, model_cache: Path, **train):
    from forge.host.planner import build_plan

    files = [REPO / "examples" / "alpaca-sample.jsonl", REPO / "examples" / "chat-sample.jsonl"]
    built = build_plan("smoke", "smollm2-135m-instruct", [str(f) for f in files], detect(NoGpu()), root)
    inputs = [i.model_copy(update={"path": str(f), "tags": {"source": f.stem.split("-")[0]}})
              for i, f in zip(built.data.inputs, files)]
    lora = built.train.lora.model_copy(update={"dropout": 0.1})  # dropout: resume must restore the RNG too
    built = built.model_copy(update={
        "data": built.data.model_copy(update={"inputs": inputs}),
        "output": built.output.model_copy(update={"dir": str(root / "out"), "model_cache": str(model_cache)}),
        "prepare": built.prepare.model_copy(update={"max_length": 128, "workers": 1}),
        "train": built.train.model_copy(update={"max_steps": STEPS, "save_every": 2, "micro_batch_size": 4,
                                                "gradient_accumulation": 1, "lora": lora, **train}),
    })
    root.mkdir(parents=True, exist_ok=True)
    write_plan(built, root / "forge.yaml")
    return load_plan(root / "forge.yaml")


def _run(root: Path, env: dict | None = None, kill_at_step: int | None = None, delay: float = 0.0,
         stderr: list[str] | None = None) -> list[dict]:
    """The train step as a subprocess; with kill_at_step, SIGKILL it `delay` s after that step's event. A
    `stderr` list gets what the process wrote there."""
    process = subprocess.Popen([sys.executable, "-m", "forge.runner", "train", "--config", str(root / "forge.yaml")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    events = []
    for line in process.stdout:
        if '"forge_event"' not in line:
            continue
        events.append(json.loads(line))
        event = events[-1]
        if kill_at_step is not None and event["kind"] == "progress" and event["stage"] == "train" \
                and event["done"] >= kill_at_step:
            if delay:
                import time

                time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=SAFETY_NET_S)
    err = process.stderr.read()
    if kill_at_step is None:
        assert process.returncode == 0, err[-3000:]
    if stderr is not None:
        stderr.append(err)
    return events


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("train")
    plan = _plan(root / "base", model_cache)
    prepare(plan)
    return plan, root


def _job(prepared, name: str, model_cache, **train) -> tuple[Path, Path]:
    """A job of its own that reuses the prepared dataset (same data and prepare settings: the same key)."""
    plan, root = prepared
    job = root / name
    new = _plan(job, model_cache, **train)
    shutil.copytree(Path(plan.output.dir) / "datasets", Path(new.output.dir) / "datasets")
    (dataset,) = (Path(new.output.dir) / "datasets").iterdir()
    return job, run_dir_for(new, dataset)


@pytest.fixture(scope="module")
def uninterrupted(prepared, model_cache):
    job, run_dir = _job(prepared, "uninterrupted", model_cache)
    stderr: list[str] = []
    events = _run(job, stderr=stderr)
    return run_dir, events, json.loads((run_dir / "metrics.json").read_text()), stderr[0]


def _losses(metrics: dict) -> list[float]:
    return [entry["loss"] for entry in metrics["history"]]


def test_run_directory_holds_adapter_config_metrics_environment_and_curve(uninterrupted):
    run_dir, events, metrics, stderr = uninterrupted
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert "'grad_norm'" not in stderr  # the Trainer's printed log dicts: the progress events carry the figures
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "train:" in (run_dir / "config.yaml").read_text()
    assert [entry["step"] for entry in metrics["history"]] == list(range(1, STEPS + 1))
    environment = json.loads((run_dir / "environment.json").read_text())
    assert {"torch", "transformers", "peft"} <= set(environment["packages"])
    assert len(environment["reproducibility_hash"]) == 64
    assert environment["reproducibility_hash"] == metrics["reproducibility_hash"]
    png = (run_dir / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    logged = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    steps = [e for e in logged if e["kind"] == "progress" and e["stage"] == "train"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "rss_mb"} <= set(steps[-1]["metrics"])


def test_checkpoints_are_the_trainers_own_sealed_by_a_manifest(uninterrupted):
    """SFTTrainer's checkpoint files (adapter, optimizer, scheduler, RNG, trainer state), every one under the
    manifest, beside Forge's state; only the last `keep_last` kept; no staging dirs left behind."""
    from forge.runner import checkpoint

    run_dir, _, metrics, _ = uninterrupted
    kept = checkpoint.all_checkpoints(run_dir / "checkpoints")
    assert [path.name for path in kept] == ["step-00000006", "step-00000008"]  # the smoke preset keeps 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [p.name for p in kept]
    last = kept[-1]
    manifest = json.loads((last / checkpoint.MANIFEST).read_text())
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            checkpoint.STATE} <= set(manifest)
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == STEPS
    assert checkpoint.read_state(last).history == metrics["history"]


def test_evaluation_is_sliced_by_tags_with_the_hardest_rows(uninterrupted):
    _, _, metrics, _ = uninterrupted
    slices = metrics["slices"]
    assert set(slices) == {"source:alpaca", "source:chat"}
    assert sum(s["rows"] for s in slices.values()) == metrics["val_rows"]
    # the overall loss is the token-weighted mean of the slices (each row is in exactly one here)
    tokens = sum(s["tokens"] for s in slices.values())
    weighted = sum(s["loss"] * s["tokens"] for s in slices.values()) / tokens
    assert metrics["val_loss"] == pytest.approx(weighted, rel=1e-9)
    hardest = metrics["hardest"]
    assert hardest and all(h["tags"]["source"] in ("alpaca", "chat") for h in hardest)
    assert [h["loss"] for h in hardest] == sorted((h["loss"] for h in hardest), reverse=True)


def test_kill_9_at_random_moments_then_rerun_matches_the_uninterrupted_losses(prepared, model_cache, uninterrupted):
    _, _, expected, _ = uninterrupted
    job, run_dir = _job(prepared, "killed", model_cache)
    rng = random.Random(4)
    for _ in range(3):
        _run(job, kill_at_step=rng.randint(1, STEPS - 1), delay=rng.uniform(0, 0.4))
    sealed = max(int(path.name.split("-")[1]) for path in (run_dir / "checkpoints").glob("step-*"))
    events = _run(job)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == sealed > 0  # resumed from the newest checkpoint, not from scratch
    assert not any(e["kind"] == "log" and "Skipping checkpoint" in e["message"] and "checksum" in e["message"]
                   for e in events)
    assert len(_losses(metrics)) == STEPS
    assert _losses(metrics) == pytest.approx(_losses(expected), abs=1e-5)
    assert metrics["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-5)


def test_a_run_resumed_from_its_last_checkpoint_repeats_the_uninterrupted_losses_bit_for_bit(
        prepared, model_cache, uninterrupted):
    """Killed right after step 3 and resumed: the same floats, not merely close (the runner pins MKL to its
    reproducible mode; without it a resumed process sometimes drifted by up to 3e-5, depending on where
    its buffers happened to land in memory)."""
    _, _, expected, _ = uninterrupted
    job, run_dir = _job(prepared, "resumed-exactly", model_cache)
    _run(job, kill_at_step=3)
    _run(job)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] in (2, 4)
    assert _losses(metrics) == _losses(expected)


def _without_dropout(prepared, model_cache, name: str) -> tuple[Path, Path]:
    plan, _ = prepared
    return _job(prepared, name, model_cache, lora=plan.train.lora.model_copy(update={"dropout": 0.0}))


@pytest.fixture(scope="module")
def whole(prepared, model_cache) -> dict:
    """An uninterrupted run without dropout (whose masks depend on the micro-batch shape)."""
    job, run_dir = _without_dropout(prepared, model_cache, "whole")
    _run(job)
    return json.loads((run_dir / "metrics.json").read_text())


def test_out_of_memory_halves_the_micro_batch_keeps_the_effective_batch_and_resumes_with_it(
        prepared, model_cache, whole):
    """A step split four ways must give the loss of the same step taken whole."""
    expected = whole
    job, run_dir = _without_dropout(prepared, model_cache, "oom")
    events = _run(job, env={"FORGE_SIMULATE_OOM_ABOVE_ROWS": "1"}, kill_at_step=3)
    backoffs = [e for e in events if e["kind"] == "backoff"]
    assert [(b["micro_batch_from"], b["micro_batch_size"], b["gradient_accumulation"]) for b in backoffs] == [
        (4, 2, 2), (2, 1, 4)]
    saved = json.loads((run_dir / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert (saved["micro_batch_size"], saved["gradient_accumulation"]) == (1, 4)
    events = _run(job, env={"FORGE_SIMULATE_OOM_ABOVE_ROWS": "1"})  # resumes at the smaller size: no new backoff
    assert not [e for e in events if e["kind"] == "backoff"]
    assert any(e["kind"] == "log" and "micro-batch 1 x 4" in e["message"] for e in events)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [b["micro_batch_size"] for b in metrics["backoffs"]] == [2, 1]
    # Not 1e-5 as for a resume: four micro-batches sum the step's floats in another order than one, and Adam
    # turns last-bit differences in near-zero gradients into loss differences of a few 1e-5 (3.6e-5 seen). A
    # changed effective batch would move the losses by more than 1e-2.
    assert _losses(metrics) == pytest.approx(_losses(expected), abs=1e-4)


def test_out_of_memory_with_a_single_row_is_a_clear_error(prepared, model_cache):
    job, _ = _job(prepared, "oom-floor", model_cache, micro_batch_size=1, gradient_accumulation=2)
    process = subprocess.run([sys.executable, "-m", "forge.runner", "train", "--config", str(job / "forge.yaml")],
                             capture_output=True, text=True, env={**os.environ, "FORGE_SIMULATE_OOM_ABOVE_ROWS": "0"})
    errors = [json.loads(line) for line in process.stdout.splitlines() if '"kind":"error"' in line]
    assert process.returncode == 7 and errors[0]["code"] == "hardware"
    assert "micro-batch of 1 row" in errors[0]["message"] and "max_length" in errors[0]["hint"]
    assert "Traceback" not in process.stderr


def test_quantization_on_a_cpu_plan_is_refused_when_the_plan_loads(tmp_path, model_cache):
    from forge.errors import ConfigError

    plan = _plan(tmp_path, model_cache)
    text = (tmp_path / "forge.yaml").read_text().replace("quantization: none", "quantization: 4bit")
    (tmp_path / "forge.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load_plan(tmp_path / "forge.yaml")
    assert "CUDA" in str(error.value.message) and plan.train.quantization == "none"


def test_export_merges_the_adapter_into_plain_safetensors_weights(prepared, uninterrupted, smollm2_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _, _, _ = uninterrupted
    job = run_dir.parents[2]
    process = subprocess.run([sys.executable, "-m", "forge.runner", "export", "--config", str(job / "forge.yaml"),
                              "--run", run_dir.name[:12]], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-3000:]
    merged_dir = run_dir / "merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    ids = torch.tensor([[1, 504, 3458, 282, 1345, 30, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-4)  # the merge changed the weights


def test_runs_list_show_and_compare(prepared, model_cache, uninterrupted, tmp_path, monkeypatch):
    """Two finished runs in one output directory: the comparison's deltas are B - A per slice, with the
    settings that differ and the correlation note."""
    from rich.console import Console
    from typer.testing import CliRunner

    from forge.host import render
    from forge.host.cli import app

    monkeypatch.setattr(render, "out_console", Console(width=200, highlight=False))  # whole hashes, no wrapping

    run_a, _, metrics_a, _ = uninterrupted
    job, run_b = _without_dropout(prepared, model_cache, "compared")
    _run(job)
    shutil.copytree(run_a, run_b.parent / run_a.name)  # both under the second job's output directory
    metrics_b = json.loads((run_b / "metrics.json").read_text())
    cli = CliRunner()
    config = str(job / "forge.yaml")

    listed = json.loads(cli.invoke(app, ["runs", "list", "-c", config, "--json"]).output)
    assert {r["id"] for r in listed} == {run_a.name, run_b.name} and all(r["finished"] for r in listed)

    shown = cli.invoke(app, ["runs", "show", run_b.name[:-3], "-c", config])
    assert shown.exit_code == 0 and "source:alpaca" in shown.output and metrics_b["reproducibility_hash"] in shown.output

    result = cli.invoke(app, ["runs", "compare", run_a.name, run_b.name, "-c", config, "--json"])
    compared = json.loads(result.output)
    rows = {row["slice"]: row for row in compared["slices"]}
    assert rows["all"]["loss_delta"] == pytest.approx(metrics_b["val_loss"] - metrics_a["val_loss"])
    for name in ("source:alpaca", "source:chat"):
        assert rows[name]["loss_delta"] == pytest.approx(
            metrics_b["slices"][name]["loss"] - metrics_a["slices"][name]["loss"])
    assert ["train.lora.dropout", "0.1", "0.0"] in compared["config_differences"]
    assert "not causes" in compared["note"]

    missing = cli.invoke(app, ["runs", "show", "nope", "-c", config])
    assert missing.exit_code != 0 and "No run matches 'nope'" in (missing.output + str(missing.exception))


def test_report_to_tensorboard_gets_the_same_metrics(prepared, model_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job, run_dir = _job(prepared, "tensorboard", model_cache, report_to=["tensorboard"], max_steps=3)
    _run(job)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = [scalar.value for scalar in events.Scalars("train/loss")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [scalar.step for scalar in events.Scalars("train/loss")] == [1, 2, 3]
    assert losses == pytest.approx(_losses(metrics), rel=1e-6)
    assert events.Scalars("eval/val_loss")[0].value == pytest.approx(metrics["val_loss"], rel=1e-6)


def test_report_to_a_missing_integration_is_a_clear_error(prepared, model_cache):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    job, _ = _job(prepared, "wandb", model_cache, report_to=["wandb"])
    process = subprocess.run([sys.executable, "-m", "forge.runner", "train", "--config", str(job / "forge.yaml")],
                             capture_output=True, text=True)
    errors = [json.loads(line) for line in process.stdout.splitlines() if '"kind":"error"' in line]
    assert process.returncode == 2 and errors[0]["code"] == "config"
    assert "wandb" in errors[0]["message"] and "pip install wandb" in errors[0]["hint"]


def test_gold_set_is_answered_scored_and_sliced_after_training(prepared, model_cache, tmp_path):
    from forge.contract.plan import EvalSpec

    gold = tmp_path / "gold.jsonl"
    gold.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Add the two numbers.", "input": "25 and 17", "output": "25 + 17 = 42.",
         "tags": {"skill": "math"}},
        {"instruction": "Give a synonym for the word.", "input": "end", "output": "finish", "tags": {"skill": "words"}},
        {"instruction": "Reply with a JSON object with the key colour.", "output": '{"colour": "red"}',
         "tags": {"skill": "format"}},
    ]) + "\n")
    job, run_dir = _job(prepared, "gold", model_cache, max_steps=2,
                        eval=EvalSpec(gold=str(gold), max_new_tokens=12))
    _run(job)
    metrics = json.loads((run_dir / "metrics.json").read_text())["gold"]
    predictions = [json.loads(line) for line in (run_dir / "gold_predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["gold.jsonl:1", "gold.jsonl:2", "gold.jsonl:3"]
    assert all(p["output"].strip() for p in predictions), "the model generated nothing"
    assert metrics["rows"] == 3
    assert metrics["exact_match"] == sum(p["exact_match"] for p in predictions) / 3
    assert metrics["format_compliance"] == sum(p["well_formed"] for p in predictions) / 3
    assert set(metrics["slices"]) == {"skill:math", "skill:words", "skill:format"}
    format_row = predictions[2]
    assert format_row["well_formed"] == (format_row["output"].strip().startswith("{") and
                                         isinstance(_maybe_json(format_row["output"]), dict))


def _maybe_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def test_gradient_checkpointing_changes_memory_not_losses(prepared, model_cache, whole):
    plan, _ = prepared
    job, run_dir = _job(prepared, "checkpointing", model_cache, gradient_checkpointing=True,
                        lora=plan.train.lora.model_copy(update={"dropout": 0.0}))
    _run(job)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert _losses(metrics) == pytest.approx(_losses(whole), abs=1e-5)


def test_the_planners_cpu_estimate_bounds_the_measured_peak(uninterrupted):
    """The planner sizes for full `max_length` sequences; this run's rows are shorter (batches pad to their
    longest row), so its peak is below the estimate, though not by much. The estimate's accuracy at full
    length is held to ±15% by tests/test_calibration.py (24 measured points)."""
    from forge.host import catalog
    from forge.host.memory import Shape, estimate

    run_dir, _, metrics, _ = uninterrupted
    plan = load_plan(run_dir.parents[2] / "forge.yaml")
    entry = catalog.models()[plan.model.name]
    planned = estimate(Shape.of(entry), dtype=plan.train.dtype, quantization="none",
                       targets=plan.train.lora.target_modules, rank=plan.train.lora.r,
                       seq_len=plan.prepare.max_length, micro_batch=plan.train.micro_batch_size,
                       checkpointing=False, accelerator="cpu").total / 2**20
    assert metrics["rss_mb"] <= planned <= 1.25 * metrics["rss_mb"], (planned, metrics["rss_mb"])
