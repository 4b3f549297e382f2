"""PNG plots of a demo run (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from peft_ext.experiments.demo_report import METHOD_LABELS  # noqa: E402

COLORS = {"hft": "tab:green", "fft": "tab:red", "lora": "tab:blue"}


def _by_method(runs: list[dict]):
    for i, run in enumerate(runs):
        first = all(r["method"] != run["method"] for r in runs[:i])  # label each method once in the legend
        label = METHOD_LABELS.get(run["method"], run["method"]) if first else None
        yield run, dict(color=COLORS.get(run["method"]), label=label, alpha=0.85)


def plot_training_loss(runs: list[dict], path: Path) -> Path:
    """Training loss over steps, one line per run (method x seed)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, style in _by_method(runs):
        steps, losses = zip(*run["loss_curve"]) if run["loss_curve"] else ((), ())
        ax.plot(steps, losses, **style)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss on the new task")
    return _save(fig, [ax], path)


def plot_score_curves(runs: list[dict], base: dict, path: Path) -> Path:
    """New-task accuracy over steps, and forgetting (LM loss and old-knowledge change) against new-task accuracy."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for run, style in _by_method(runs):
        curve = run["score_curve"]
        new = [p["new_task"] for p in curve]
        axes[0].plot([p["step"] for p in curve], new, marker="o", ms=3, **style)
        axes[1].plot(new, [p["lm_loss"] - base["lm_loss"] for p in curve], marker="o", ms=3, **style)
        axes[2].plot(new, [p["old_knowledge"] - base["old_knowledge"] for p in curve], marker="o", ms=3, **style)
    axes[0].set(xlabel="step", ylabel="new-task accuracy", title="Learning")
    axes[1].set(xlabel="new-task accuracy", ylabel="LM loss change (up = forgetting)", title="Forgetting: English text")
    axes[2].set(xlabel="new-task accuracy", ylabel="old-knowledge accuracy change", title="Forgetting: world knowledge")
    return _save(fig, axes, path)


def _save(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
