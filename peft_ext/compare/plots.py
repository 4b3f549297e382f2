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
        for i, (name, cost, score) in enumerate(sorted(points, key=lambda p: (p[2], p[1]))):
            std = summary[name]["score"]["std"]
            ax.errorbar(cost, score, yerr=std or None, fmt="o", color=colors[name], label=name, capsize=3)
            # labels of points at about the same score (often several at the base's score) are staggered vertically
            ax.annotate(name + (" *" if name in front else ""), (cost, score), textcoords="offset points",
                        xytext=(5, 5 + 10 * (i % 3)), fontsize=8)
        line = sorted((c, s) for n, c, s in points if n in front)
        if len(line) > 1:
            ax.plot(*zip(*line), "--", color="gray", alpha=0.6, label="Pareto front")
        kind = results["runs"][0].get("memory_kind", "") if key == "peak_memory_mb" and results["runs"] else ""
        ax.set(xlabel=f"{label} {f'({kind})' if kind else ''}", ylabel=f"score ({results['scorer']['kind']})",
               title=f"Score vs {label.split(' MB')[0].split(' s')[0]} (* = Pareto front)")
        ax.axhline(results["base"]["score"], color="black", lw=0.8, ls=":", label="base")
    return _save(fig, axes, path)


def _save(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
