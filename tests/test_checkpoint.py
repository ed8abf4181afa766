"""Checkpoints are atomic and validated: a half-written or corrupted one is never loaded."""

import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from forge.runner import checkpoint  # noqa: E402


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler):
    batch = torch.randint(0, 64, (2, 8))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_save_and_load_restore_weights_optimizer_and_state(tmp_path):
    model, optimizer, scheduler = _tiny()
    _step(model, optimizer, scheduler)
    state = checkpoint.TrainState(step=1, position=12, history=[{"step": 1, "loss": 2.0}])
    path = checkpoint.save(tmp_path, state, model, optimizer, scheduler, keep_last=2)
    after_save = torch.rand(3)

    fresh, fresh_opt, fresh_sched = _tiny()
    restored = checkpoint.load(path, fresh, fresh_opt, fresh_sched)
    assert restored == state
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    assert fresh_opt.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert torch.equal(torch.rand(3), after_save)  # RNG continues exactly where it was saved


def test_keeps_the_last_k(tmp_path):
    model, optimizer, scheduler = _tiny()
    for step in range(1, 5):
        checkpoint.save(tmp_path, checkpoint.TrainState(step=step), model, optimizer, scheduler, keep_last=2)
    assert [p.name for p in checkpoint.all_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("damage", ["no_manifest", "truncated", "missing_file"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, damage):
    model, optimizer, scheduler = _tiny()
    good = checkpoint.save(tmp_path, checkpoint.TrainState(step=2), model, optimizer, scheduler, keep_last=3)
    bad = checkpoint.save(tmp_path, checkpoint.TrainState(step=4), model, optimizer, scheduler, keep_last=3)
    if damage == "no_manifest":
        (bad / checkpoint.MANIFEST).unlink()
    elif damage == "truncated":
        data = (bad / "optimizer.pt").read_bytes()
        (bad / "optimizer.pt").write_bytes(data[: len(data) // 2])
    else:
        (bad / "adapter.safetensors").unlink()
    assert checkpoint.latest_valid(tmp_path) == good
    assert json.loads((good / "state.json").read_text())["step"] == 2


def test_interrupted_write_leaves_only_a_temp_dir_that_is_ignored_and_cleaned(tmp_path):
    model, optimizer, scheduler = _tiny()
    good = checkpoint.save(tmp_path, checkpoint.TrainState(step=2), model, optimizer, scheduler, keep_last=3)
    partial = tmp_path / ".tmp-step-00000004-99"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"half")
    assert checkpoint.latest_valid(tmp_path) == good
    assert not partial.exists()
