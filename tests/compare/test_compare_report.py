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


def test_pareto_labels_of_points_at_the_same_place_do_not_overlap():
    import itertools

    import matplotlib.pyplot as plt

    from peft_ext.compare.plots import place_labels

    fig, ax = plt.subplots(figsize=(6, 4))
    # six methods at the base's score and about the same cost (what `compare`'s default run gave), one apart
    labels = [(name, 100.0 + i * 0.01, 0.25) for i, name in enumerate(["lora", "hft *", "cola", "smore", "ssmlora", "finegates"])]
    labels.append(("full *", 400.0, 0.9))
    ax.plot([x for _, x, _ in labels], [y for _, _, y in labels], "o")
    annotations = place_labels(ax, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in annotations]
    assert [a.get_text() for a in annotations] == [t for t, _, _ in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    frame = ax.get_window_extent(renderer)  # "full *" sits at the top right corner: its label moves inside
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, (box, frame)
    # each label stays next to its own point (within the furthest offset tried, 5 + 11 * 11 points)
    for ann, (_, x, y) in zip(annotations, labels):
        assert ann.xy == (x, y) and abs(ann.xyann[1]) <= 126 and abs(ann.xyann[0]) == 5
    plt.close(fig)
