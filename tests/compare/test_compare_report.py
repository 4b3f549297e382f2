"""The comparison's summary over seeds, its table cells and the Pareto front of its plots."""

import pytest

from peft_ext.compare.plots import pareto_front
from peft_ext.compare.report import _cell, describe_data, summarize


def test_summary_is_mean_and_sample_std_over_seeds_and_skips_missing_values():
    runs = [
        {"method": "a", "seed": 0, "score": 0.5, "p_change": 0.1, "latency_ms_merged": None, "p": 1.0},
        {"method": "a", "seed": 1, "score": 0.7, "p_change": 0.3, "latency_ms_merged": None, "p": 1.2},
        {"method": "b", "seed": 0, "score": 0.9, "p_change": -0.1, "latency_ms_merged": 2.0, "p": 0.9, "merge_note": "x"},
    ]
    summary = summarize(["a", "b"], runs, ["p"])
    assert summary["a"]["score"]["mean"] == pytest.approx(0.6) and summary["a"]["score"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["a"]["latency_ms_merged"] is None and summary["b"]["latency_ms_merged"]["mean"] == 2.0
    assert summary["b"]["merge_note"] == "x" and summary["a"]["seeds"] == [0, 1]
    assert _cell(summary["a"]["p_change"], "{:+.3f}") == "+0.200 \u00b1 0.141"
    assert _cell(summary["b"]["p_change"], "{:+.3f}") == "-0.100" and _cell(None, "{:.1f}") == "-"


def test_pareto_front_keeps_the_points_no_other_beats_on_cost_and_score():
    points = [("cheap", 1.0, 0.5), ("best", 5.0, 0.9), ("dominated", 6.0, 0.8), ("middle", 3.0, 0.7), ("tie", 3.0, 0.7)]
    assert pareto_front(points, higher_is_better=True) == ["cheap", "best", "middle", "tie"]
    # a loss: lower is better
    assert pareto_front([("a", 1.0, 2.0), ("b", 2.0, 1.5), ("c", 3.0, 1.8)], higher_is_better=False) == ["a", "b"]


def test_data_specs_in_words():
    assert describe_data("fictional-facts") == "fictional-facts"
    assert describe_data({"path": "d/t.jsonl", "limit": 5}) == "d/t.jsonl, first 5 rows"
    assert describe_data({"dataset": "user/set", "split": "test"}) == "user/set (split test)"
