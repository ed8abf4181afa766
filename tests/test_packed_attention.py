"""Packed sequences train as if each example were alone: no attention across example boundaries."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from forge.runner.prepare.pack import pack  # noqa: E402
from forge.runner.prepare.tokenize import IGNORE, Encoded  # noqa: E402
from forge.runner.batches import collate  # noqa: E402


def test_packed_example_sees_only_itself(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    first, second = list(range(100, 140)), list(range(500, 520))
    (packed_row,) = pack([("a", Encoded(np.array(first), np.full(40, IGNORE))),
                          ("b", Encoded(np.array(second), np.full(20, IGNORE)))], 64)
    row = {key: np.asarray(value).tolist() for key, value in packed_row.items()}  # as read back from Parquet
    batch = collate([row], pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"][0, 40].item() == 0
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, 40:60]
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0, 40:60]  # plain causal attention
    assert torch.allclose(packed, alone, atol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-4)  # the test can fail: without the block mask it differs
