"""PNG plots of a comparison (matplotlib's Agg backend): training loss, and score against memory and time with the
Pareto front (the methods no other beats on both score and cost)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _colors(names):
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(dict.fromkeys(names))}


def plot_loss_curves(runs: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors, labelled = _colors(r["method"] for r in runs), set()
    for run in runs:
        if not run["loss_curve"]:
            continue
        steps, losses = zip(*run["loss_curve"])
        label = None if run["method"] in labelled else run["method"]
        labelled.add(run["method"])
        ax.plot(steps, losses, color=colors[run["method"]], label=label, alpha=0.85)
    # the task loss (FineGates' logged loss less its lambda x sparsity term: runner.loss_curves), one scale for all
    ax.set(xlabel="step", ylabel="training loss (task)", title="Training loss (task loss, without regularisers)")
    return _save(fig, [ax], path)


def pareto_front(points: list[tuple[str, float, float]], higher_is_better: bool) -> list[str]:
    """Names of the (name, cost, score) points that no other point beats on both (lower cost, better score)."""
    sign = 1 if higher_is_better else -1
    front = []
    for name, cost, score in points:
        beaten = any(c <= cost and sign * s >= sign * score and (c < cost or sign * s > sign * score)
                     for n, c, s in points if n != name)
        if not beaten:
            front.append(name)
    return front


def plot_pareto(results: dict, path: Path) -> Path:
    summary, higher = results["summary"], results["scorer"]["higher_is_better"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = _colors(summary)
    for ax, key, label in ((axes[0], "peak_memory_mb", "peak memory MB"), (axes[1], "train_time_s", "train time s")):
        points = [(m, s[key]["mean"], s["score"]["mean"]) for m, s in summary.items() if s[key] and s["score"]]
        front = pareto_front(points, higher)
        labels = []
        for name, cost, score in sorted(points, key=lambda p: (p[2], p[1])):
            std = summary[name]["score"]["std"]
            ax.errorbar(cost, score, yerr=std or None, fmt="o", color=colors[name], label=name, capsize=3)
            labels.append((name + (" *" if name in front else ""), cost, score))
        line = sorted((c, s) for n, c, s in points if n in front)
        if len(line) > 1:
            ax.plot(*zip(*line), "--", color="gray", alpha=0.6, label="Pareto front")
        kind = results["runs"][0].get("memory_kind", "") if key == "peak_memory_mb" and results["runs"] else ""
        ax.set(xlabel=f"{label} {f'({kind})' if kind else ''}", ylabel=f"score ({results['scorer']['kind']})",
               title=f"Score vs {label.split(' MB')[0].split(' s')[0]} (* = Pareto front)")
        ax.axhline(results["base"]["score"], color="black", lw=0.8, ls=":", label="base")
        place_labels(ax, labels)
    return _save(fig, axes, path)


# label offsets tried in order, in points from the marker: right-up, right-down, then further up and down; the same
# to the left of the marker (for points near the right edge), the text then ending at the marker
_RIGHT = [(5, 5), (5, -13)] + [(5, sign * (5 + 11 * k)) for k in range(1, 12) for sign in (1, -1)]
_OFFSETS = [(x, y, "left") for x, y in _RIGHT] + [(-x, y, "right") for x, y in _RIGHT]


def place_labels(ax, labels: list[tuple[str, float, float]]) -> list:
    """Annotates each (text, x, y) point of `ax` with its text at the first offset of `_OFFSETS` whose box overlaps
    no label placed before it (several methods often sit at about the same score and cost, e.g. the base's) and
    stays inside the axes, or else at the offset with the least overlap plus area outside the axes. Call after the
    data and limits are set. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the axes' transform and gives a renderer for the text extents
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed, annotations = [], []
    for text, x, y in labels:
        best = None
        for dx, dy, align in _OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, ha=align)
            box = ann.get_window_extent(renderer)
            outside = box.width * box.height - _overlap_area(box, frame)
            overlap = sum(_overlap_area(box, other) for other in placed) + outside
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, ann, box)
            else:
                ann.remove()
            if overlap == 0:
                break
        placed.append(best[2])
        annotations.append(best[1])
    return annotations


def _overlap_area(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _save(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
