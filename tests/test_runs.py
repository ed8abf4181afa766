"""`forge runs compare` arithmetic on recorded metrics (the CLI over real runs is in test_train.py)."""

import pytest

from forge.host.runs import Run, compare, compare_gold


def _run(name, val_loss, slices, gold=None):
    return Run(path=__import__("pathlib").Path(name),
               metrics={"val_loss": val_loss, "perplexity": 2.0 ** val_loss, "val_rows": 4, "slices": slices,
                        **({"gold": gold} if gold else {})})


def test_deltas_are_b_minus_a_per_slice_and_a_missing_slice_has_none():
    a = _run("a", 1.0, {"source:human": {"loss": 0.5, "perplexity": 1.6, "rows": 2}})
    b = _run("b", 0.75, {"source:human": {"loss": 0.25, "perplexity": 1.3, "rows": 2},
                         "source:synthetic": {"loss": 2.0, "perplexity": 7.4, "rows": 2}})
    rows = {row["slice"]: row for row in compare(a, b)}
    assert list(rows) == ["all", "source:human", "source:synthetic"]
    assert rows["all"]["loss_delta"] == pytest.approx(-0.25)
    assert rows["source:human"]["loss_delta"] == pytest.approx(-0.25)
    assert rows["source:synthetic"]["loss_a"] is None and rows["source:synthetic"]["loss_delta"] is None


def test_gold_deltas_per_slice():
    a = _run("a", 1.0, {}, {"rows": 2, "exact_match": 0.5, "format_compliance": 1.0,
                            "slices": {"skill:math": {"rows": 1, "exact_match": 1.0, "format_compliance": 1.0}}})
    b = _run("b", 1.0, {}, {"rows": 2, "exact_match": 1.0, "format_compliance": 0.5,
                            "slices": {"skill:math": {"rows": 1, "exact_match": 0.0, "format_compliance": 1.0}}})
    rows = {row["slice"]: row for row in compare_gold(a, b)}
    assert rows["all"]["exact_match_delta"] == 0.5 and rows["all"]["format_compliance_delta"] == -0.5
    assert rows["skill:math"]["exact_match_delta"] == -1.0
    assert compare_gold(_run("c", 1.0, {}), _run("d", 1.0, {})) == []
