"""The comparison's table (printed and in report.md), results.json and results.csv: mean ± std over seeds."""

from __future__ import annotations

import csv
import json
import platform
import statistics
from pathlib import Path

COST_COLUMNS = [  # (key, header, format)
    ("train_time_s", "train time s", "{:.1f}"),
    ("peak_memory_mb", "peak memory MB", "{:.0f}"),
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("adapter_mb", "size on disk MB", "{:.2f}"),
    ("latency_ms_unmerged", "latency ms (unmerged)", "{:.1f}"),
    ("latency_ms_merged", "latency ms (merged)", "{:.1f}"),
]


def _mean_std(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def score_columns(probes: list[str]) -> list[tuple[str, str, str]]:
    return [("score", "score", "{:.3f}")] + [(f"{p}_change", f"\u0394 {p}", "{:+.3f}") for p in probes]


def summarize(methods: list[str], runs: list[dict], probes: list[str]) -> dict:
    """method -> column -> {mean, std, n} over the method's seeds (None where nothing was measured)."""
    keys = [k for k, _, _ in score_columns(probes) + COST_COLUMNS] + probes
    summary = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        summary[m] = {k: _mean_std([r.get(k) for r in mine]) for k in keys}
        summary[m]["merge_note"] = next((r.get("merge_note") for r in mine if r.get("merge_note")), None)
        summary[m]["seeds"] = [r["seed"] for r in mine]
    return summary


def _cell(stat: dict | None, fmt: str) -> str:
    if stat is None:
        return "-"
    text = fmt.format(stat["mean"])
    return text + (" \u00b1 " + fmt.format(stat["std"]).lstrip("+") if stat["n"] > 1 else "")


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    probes = list(results["probes"])
    columns = score_columns(probes) + COST_COLUMNS
    headers = ["method"] + [h for _, h, _ in columns]
    base = results["base"]
    rows = [["base"] + [f.format(base["score"]) if k == "score" else "-" for k, _, f in columns]]
    for method, stats in results["summary"].items():
        rows.append([method] + [_cell(stats[k], f) for k, _, f in columns])
    return headers, rows


def markdown_table(results: dict) -> str:
    headers, rows = table_rows(results)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def legend(results: dict) -> str:
    scorer = results["scorer"]
    better = "higher" if scorer["higher_is_better"] else "lower"
    lines = [f"score: {scorer['kind']} on {scorer['size']} evaluation rows ({better} is better)."]
    for name, probe in results["probes"].items():
        worse = "a drop" if probe["higher_is_better"] else "a rise"
        lines.append(
            f"\u0394 {name}: change of {probe['kind']} on {probe['size']} rows against the base "
            f"({results['base'][name]:.3f}); {worse} is forgetting."
        )
    kinds = sorted({r.get("memory_kind") for r in results["runs"] if r.get("memory_kind")})
    timing = (f"latency: median forward pass over a batch of {results['config']['latency_batch']} evaluation inputs."
              if results["config"]["latency"] else "latency: not measured (latency: false).")
    lines.append(f"peak memory: {', '.join(kinds)} during training. trainable params: what the method trained over the "
                 f"run (a COLA chain: every link, the merged ones included). size on disk: the adapter's safetensors; "
                 f"for full fine-tuning the full model's weights. {timing}")
    notes = [f"{m}: {s['merge_note']}" for m, s in results["summary"].items() if s.get("merge_note") not in (None, "no adapter")]
    if notes:
        lines.append("merged latency missing: " + "; ".join(notes))
    seeds = results["config"]["seeds"]
    lines.append(f"{len(seeds)} seed(s) {seeds}" + (", mean \u00b1 std." if len(seeds) > 1 else "."))
    lines += [f"WARNING: {note}" for note in unchanged_notes(results)]
    return "\n".join(lines)


def unchanged_notes(results: dict) -> list[str]:
    """One note per method whose trained model scored exactly as the base (runs' `unchanged_from_base`)."""
    notes = {}
    for run in results["runs"]:
        if run.get("unchanged_from_base"):
            notes.setdefault(run["method"], ([], run["unchanged_from_base"]))[0].append(run["seed"])
    return [f"{m} (seed {', '.join(map(str, seeds))}) {note}" for m, (seeds, note) in notes.items()]


def launch_of(results: dict) -> dict:
    c = results["config"]
    return results.get("launch") or {"processes": 1, "gradient_accumulation_steps": c.get("gradient_accumulation_steps", 1),
                                     "global_batch": c["per_device_train_batch_size"], "precision": "fp32"}


def batch_words(results: dict) -> str:
    """"batch 8" on one process without accumulation, else "global batch 16 (4 per device x 2 processes x 2
    accumulation steps)"."""
    c, run = results["config"], launch_of(results)
    if run["processes"] == 1 and run["gradient_accumulation_steps"] == 1:
        return f"batch {run['global_batch']}"
    return (f"global batch {run['global_batch']} ({c['per_device_train_batch_size']} per device x {run['processes']} "
            f"process(es) x {run['gradient_accumulation_steps']} accumulation step(s))")


def describe_data(spec) -> str:
    """A data spec in words: "fictional-facts", "data/train.jsonl", "user/name (split test)", "+ first 8 rows"."""
    if not isinstance(spec, dict):
        return str(spec)
    text = str(next(spec[k] for k in ("builtin", "path", "dataset") if spec.get(k) is not None))
    if spec.get("dataset") or spec.get("split"):
        text += f" (split {spec.get('split', 'train')})"
    return text + (f", first {spec['limit']} rows" if spec.get("limit") else "")


def setup_line(results: dict) -> str:
    c = results["config"]
    return (f"{c['model']}, {results['trainer'].upper()} on {describe_data(c['train_data'])}, {c['max_steps']} steps x "
            f"{batch_words(results)} x {c['max_length']} tokens, {launch_of(results)['precision']}; scored on "
            f"{describe_data(c['eval_data'])}")


def format_table(results: dict) -> str:
    return "\n".join([setup_line(results), "", markdown_table(results), "", legend(results)])


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}"
    import os

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def measured_when(results: dict) -> str:
    """Where and when the runs were measured, from their own records (a rerun reuses runs made earlier)."""
    runs = results["runs"]
    places = sorted({r.get("hardware") or "unrecorded hardware" for r in runs})
    dates = sorted(r["finished_at"] for r in runs if r.get("finished_at"))
    when = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "dates unrecorded"
    train = sum(r["train_time_s"] for r in runs)
    reused = results.get("skipped_runs", 0)
    text = (f"- Measured on {'; '.join(places)}, {when}: {len(runs)} run(s), {train:.0f} s of training in all (each run's "
            f"own record).")
    if reused:
        text += (f" {reused} of them were reused from an earlier invocation (finished runs are skipped); this one took "
                 f"{results['total_time_s']:.0f} s on {results.get('hardware', hardware())}.")
    else:
        text += f" Total wall time {results['total_time_s']:.0f} s (training, scoring and timing)."
    return text


def report_markdown(results: dict) -> str:
    """A model-card-ready section: setup, the table, its legend, the plots."""
    c = results["config"]
    run = launch_of(results)
    methods = ", ".join(f"{r['method']} (lr {r['learning_rate']:g})" for r in {r["method"]: r for r in results["runs"]}.values())
    return "\n".join([
        "## Method comparison (peft-ext compare)",
        "",
        f"- Model: `{c['model']}`; training data: {describe_data(c['train_data'])} ({results['trainer'].upper()}); "
        f"evaluation: {describe_data(c['eval_data'])}, scored by {results['scorer']['kind']}.",
        f"- Budget for every method: {c['max_steps']} steps, {batch_words(results)}, "
        f"{c['max_length']} tokens, {c['lr_scheduler_type']} schedule ({c['warmup_steps']} warm-up steps), "
        f"{run['precision']}. Methods: {methods}.",
        measured_when(results),
        "",
        markdown_table(results),
        "",
        legend(results),
        "",
        "![training loss](loss_curves.png)",
        "![score against cost](pareto.png)",
        "",
    ])


def write_results(out: Path, results: dict) -> list[Path]:
    """results.json (everything) and results.csv (one row per method: mean and std of every column)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "results.json", out / "results.csv"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    probes = list(results["probes"])
    keys = [k for k, _, _ in score_columns(probes) + COST_COLUMNS]
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method"] + [f"{k}{s}" for k in keys for s in ("", "_std")] + ["seeds"])
        writer.writerow(["base", results["base"]["score"], 0.0] + [""] * (2 * len(keys) - 2) + [""])
        for method, stats in results["summary"].items():
            cells = [v for k in keys for v in ((stats[k]["mean"], stats[k]["std"]) if stats[k] else ("", ""))]
            writer.writerow([method] + cells + [json.dumps(stats["seeds"])])
    return [json_path, csv_path]
