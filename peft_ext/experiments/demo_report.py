"""The demo's results: per-method summary over seeds, comparison at equal new-task score, table, files, plots."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

METHOD_LABELS = {"hft": "HFT", "fft": "FFT", "lora": "LoRA"}
COLUMNS = [  # (key, header, format)
    ("new_task", "new-task acc", "{:.3f}"),
    ("old_knowledge", "old-knowledge acc", "{:.3f}"),
    ("lm_loss", "LM loss", "{:.3f}"),
    ("old_knowledge_change", "\u0394 old-knowledge", "{:+.3f}"),
    ("lm_loss_change", "\u0394 LM loss", "{:+.3f}"),
    ("steps", "steps", "{:.0f}"),
    ("train_time_s", "train time s", "{:.1f}"),
    ("trainable_params", "trainable params", "{:,.0f}"),
]


def with_changes(scores: dict, base: dict) -> dict:
    """Scores plus the forgetting: change of old-knowledge accuracy (down is bad) and of LM loss (up is bad)."""
    return {
        **scores,
        "old_knowledge_change": scores["old_knowledge"] - base["old_knowledge"],
        "lm_loss_change": scores["lm_loss"] - base["lm_loss"],
    }


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(methods: list[str], runs: list[dict]) -> dict[str, dict]:
    """method -> column -> {mean, std} over the method's runs (one per seed)."""
    return {
        m: {key: _mean_std([r[key] for r in runs if r["method"] == m]) for key, _, _ in COLUMNS} for m in methods
    }


def at_equal_new_task(methods: list[str], runs: list[dict], base: dict, target: float | None) -> dict | None:
    """Each run's forgetting at the first evaluation reaching `target` new-task accuracy (needs score curves).

    Without a target, compare at the best score every method reached: the lowest of their final means.
    """
    if not all(len(r["score_curve"]) > 1 for r in runs):
        return None
    if target is None:
        target = min(statistics.fmean(r["new_task"] for r in runs if r["method"] == m) for m in methods)
    result = {"target_new_task": target, "methods": {}}
    for m in methods:
        reached = []
        for r in (r for r in runs if r["method"] == m):
            point = next((p for p in r["score_curve"] if p["step"] > 0 and p["new_task"] >= target), None)
            if point is not None:
                reached.append(with_changes(point, base))
        stats = {"runs_reaching_target": f"{len(reached)}/{sum(r['method'] == m for r in runs)}"}
        if reached:
            stats.update({k: _mean_std([p[k] for p in reached]) for k in ("step", "old_knowledge_change", "lm_loss_change")})
        result["methods"][m] = stats
    return result


def _cell(stat: dict | None, fmt: str) -> str:
    if stat is None:
        return "-"
    text = fmt.format(stat["mean"])
    return text + ("\u00b1" + fmt.format(stat["std"]).lstrip("+") if stat["std"] else "")


def format_table(base: dict, summary: dict[str, dict]) -> str:
    """Rows: base and each method; columns as COLUMNS; mean±std where there are several seeds."""
    headers = ["method"] + [h for _, h, _ in COLUMNS]
    rows = [["base"] + [_cell({"mean": base[k], "std": 0.0}, f) if k in base else "-" for k, _, f in COLUMNS]]
    for method, stats in summary.items():
        rows.append([METHOD_LABELS.get(method, method)] + [_cell(stats[k], f) for k, _, f in COLUMNS])
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    legend = "forgetting = change against base: \u0394 old-knowledge < 0 lost facts, \u0394 LM loss > 0 lost English"
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows] + [legend])


def format_equal_score(comparison: dict) -> str:
    lines = [f"At equal new-task accuracy (first evaluation reaching {comparison['target_new_task']:.3f}):"]
    for method, stats in comparison["methods"].items():
        label = METHOD_LABELS.get(method, method)
        if "step" not in stats:
            lines.append(f"  {label:5s} never reached it ({stats['runs_reaching_target']} runs)")
            continue
        lines.append(
            f"  {label:5s} step {_cell(stats['step'], '{:.0f}')}, old-knowledge change "
            f"{_cell(stats['old_knowledge_change'], '{:+.3f}')}, LM loss change "
            f"{_cell(stats['lm_loss_change'], '{:+.3f}')} ({stats['runs_reaching_target']} runs)"
        )
    return "\n".join(lines)


def write_results(output_dir: Path, results: dict) -> list[Path]:
    """results.json (everything) and results.csv (the table, mean and std per column)."""
    json_path, csv_path = output_dir / "results.json", output_dir / "results.csv"
    json_path.write_text(json.dumps(results, indent=2))
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method"] + [f"{k}{s}" for k, _, _ in COLUMNS for s in ("", "_std")])
        base = results["base"]
        writer.writerow(["base"] + [v for k, _, _ in COLUMNS for v in ((base[k], 0.0) if k in base else ("", ""))])
        for method, stats in results["summary"].items():
            writer.writerow([method] + [v for k, _, _ in COLUMNS for v in (stats[k]["mean"], stats[k]["std"])])
    return [json_path, csv_path]
