import random

import numpy as np

import pytest

from forge.runner.prepare.pack import pack
from forge.runner.prepare.rows import Invalid
from forge.runner.prepare.tokenize import IGNORE, Encoded, apply_length_policy


def _example(n: int, first: int) -> Encoded:
    return Encoded(np.arange(first, first + n, dtype=np.int32),
                   np.array([IGNORE] + list(range(first + 1, first + n)), dtype=np.int32))


def test_best_fit_decreasing_packs_every_example_once_within_the_limit():
    rng = random.Random(0)
    examples = [(f"r{i}", _example(rng.randint(1, 100), i * 1000)) for i in range(200)]
    sequences = pack(examples, 128)
    assert sorted(i for s in sequences for i in s["ids"]) == sorted(i for i, _ in examples)
    assert all(len(s["input_ids"]) <= 128 for s in sequences)
    lower_bound = -(-sum(len(e.input_ids) for _, e in examples) // 128)
    assert len(sequences) <= lower_bound * 1.1 + 1  # BFD is near-optimal on this mix


def test_position_ids_restart_per_example_and_labels_follow_tokens():
    examples = [("a", _example(3, 10)), ("b", _example(5, 20)), ("c", _example(2, 30))]
    (sequence,) = pack(examples, 10)
    assert sequence["ids"] == ["b", "a", "c"]  # longest first
    assert sequence["seq_lengths"].tolist() == [5, 3, 2]
    assert sequence["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert sequence["input_ids"][5:8].tolist() == [10, 11, 12] and sequence["labels"][5] == IGNORE


def test_packing_is_deterministic():
    examples = [(f"r{i}", _example(1 + (i * 37) % 50, i)) for i in range(100)]
    first, second = pack(examples, 64), pack(list(examples), 64)
    assert [s["ids"] for s in first] == [s["ids"] for s in second]
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))


def test_length_policies():
    ids = np.arange(10, dtype=np.int32)
    labels = np.array([IGNORE] * 4 + list(range(4, 10)), dtype=np.int32)
    (whole,), what = apply_length_policy(ids, labels, 16, "drop")
    assert what is None and whole.input_ids is ids and whole.labels is labels and not whole.truncated
    assert apply_length_policy(ids, labels, 8, "drop") == ([], "dropped")
    (piece,), what = apply_length_policy(ids, labels, 8, "truncate")
    assert what == "truncated" and piece.input_ids.tolist() == list(range(8)) and piece.truncated
    pieces, what = apply_length_policy(ids, labels, 4, "split")
    # the first chunk has no label tokens and is dropped; the rest keep every learned token
    assert what == "split" and [p.input_ids.tolist() for p in pieces] == [[4, 5, 6, 7], [8, 9]]
    with pytest.raises(Invalid):  # nothing left to learn within the limit
        apply_length_policy(ids, labels, 4, "truncate")
