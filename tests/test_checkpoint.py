"""Checkpoints are atomic and validated: a half-written or corrupted one is never loaded. (The files inside are
the Trainer's; tests/test_train.py checks a real run's checkpoints and resumes from them.)"""

import json

import pytest

from forge.runner import checkpoint

TRAINER_FILES = {"adapter_model.safetensors": b"weights" * 100, "optimizer.pt": b"moments" * 100,
                 "scheduler.pt": b"sched", "rng_state.pth": b"rng", "trainer_state.json": b"{}",
                 "nested/tokenizer.json": b"tok"}


def _save(root, step: int, keep_last: int = 3, **state):
    """What ForgeSFTTrainer does: the Trainer writes into a staging dir, `commit` seals and renames it."""
    written = checkpoint.staging_dir(root, step) / f"checkpoint-{step}"
    for name, data in TRAINER_FILES.items():
        (written / name).parent.mkdir(parents=True, exist_ok=True)
        (written / name).write_bytes(data)
    return checkpoint.commit(written, root, checkpoint.TrainState(step=step, **state), keep_last)


def test_commit_seals_every_file_and_keeps_forges_state(tmp_path):
    state = {"micro_batch_size": 2, "gradient_accumulation": 4,
             "backoffs": [{"step": 3, "micro_batch_from": 4, "micro_batch_size": 2}],
             "history": [{"step": 5, "loss": 2.0, "lr": 1e-4, "grad_norm": 0.5}]}
    path = _save(tmp_path, 5, **state)
    assert path == tmp_path / "step-00000005"
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert set(manifest) == set(TRAINER_FILES) | {checkpoint.STATE}
    assert checkpoint.read_state(path) == checkpoint.TrainState(step=5, **state)
    assert checkpoint.latest_valid(tmp_path) == path
    assert not list(tmp_path.glob(".tmp-*"))


def test_keeps_the_last_k(tmp_path):
    for step in range(1, 5):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint.all_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_a_rerun_step_replaces_the_earlier_attempt(tmp_path):
    _save(tmp_path, 2)
    path = _save(tmp_path, 2, micro_batch_size=1)
    assert checkpoint.read_state(path).micro_batch_size == 1
    assert len(checkpoint.all_checkpoints(tmp_path)) == 1


@pytest.mark.parametrize("damage", ["no_manifest", "truncated", "missing_file", "nested_changed"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, damage):
    good = _save(tmp_path, 2)
    bad = _save(tmp_path, 4)
    if damage == "no_manifest":
        (bad / checkpoint.MANIFEST).unlink()
    elif damage == "truncated":
        data = (bad / "optimizer.pt").read_bytes()
        (bad / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "missing_file":
        (bad / "adapter_model.safetensors").unlink()
    else:
        (bad / "nested" / "tokenizer.json").write_bytes(b"TOK")
    assert checkpoint.latest_valid(tmp_path) == good
    assert checkpoint.read_state(good).step == 2


def test_interrupted_write_leaves_only_a_staging_dir_that_is_ignored_and_cleaned(tmp_path):
    good = _save(tmp_path, 2)
    partial = checkpoint.staging_dir(tmp_path, 4) / "checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "optimizer.pt").write_bytes(b"half")
    assert checkpoint.latest_valid(tmp_path) == good
    assert not partial.parent.exists()


def test_no_checkpoints_means_a_fresh_start(tmp_path):
    assert checkpoint.latest_valid(tmp_path / "checkpoints") is None
