"""Smoke test of the benchmark scripts: they run end to end on CPU at a tiny shape and print a well-formed table.

Runs them as a user would (`python benchmarks/<name>.py` from the repository root, in a subprocess), so that
benchmarks/ is sys.path[0] and the root's kernels/ folder is not importable as a top-level module.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")

REQUIRED_ROWS = (
    "frozen base",
    "full fine-tuning",
    "PEFT LoRA r=16",
    "HFT ratio 0.5, strategy matrix",
)
HEADERS = [
    "variant",
    "trainable params",
    "step ms (median)",
    "peak GiB",
    "time vs full FT",
    "memory vs full FT",
    "time vs frozen base",
]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 2 + len(REQUIRED_ROWS), text
    header, separator, *rows = lines
    assert set(separator.replace("|", "")) <= set("-: "), separator
    return _cells(header), [_cells(row) for row in rows]


def test_hft_step_tiny_cpu(tmp_path):
    out = tmp_path / "RESULTS.md"
    cmd = [sys.executable, "benchmarks/hft_step.py", "--tiny", "--steps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout

    header, rows = _table(text)
    assert header == HEADERS
    by_label = {}
    for required in REQUIRED_ROWS:
        matches = [row for row in rows if row[0].startswith(required)]
        assert len(matches) == 1, (required, rows)
        by_label[required] = matches[0]
    for row in rows:
        assert len(row) == len(HEADERS), row
        label, params, ms, gib, t_full, m_full, t_frozen = row
        assert int(params.replace(",", "")) > 0, row
        assert NUMBER.match(ms) and float(ms) > 0, row
        assert gib == "n/a", row  # CPU: peak memory is measured on CUDA only
        assert m_full == "n/a", row
        assert NUMBER.match(t_full) and float(t_full) > 0, row
        assert NUMBER.match(t_frozen) and float(t_frozen) > 0, row
    assert by_label["full fine-tuning"][4] == "1.00"
    assert by_label["frozen base"][6] == "1.00"
    params = {k: int(v[1].replace(",", "")) for k, v in by_label.items()}
    assert params["PEFT LoRA r=16"] < params["full fine-tuning"]
    assert params["HFT ratio 0.5, strategy matrix"] < params["full fine-tuning"]

    # the header (date, device, versions, exact command) and the goal line come with the table
    assert re.search(r"\d{4}-\d\d-\d\d .*torch .*triton .*peft .*transformers ", text), text
    assert "Command: `" in text and "benchmarks/hft_step.py --tiny --steps 1 --warmup 0" in text
    assert "HFT <= 0.75x full fine-tuning" in text
    # --out appends the same block
    assert out.read_text().strip() == text.strip()


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in `text`, as (header cells, row cells)."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            header, separator, *rows = block
            assert set(separator.replace("|", "")) <= set("-: "), separator
            tables.append((_cells(header), [_cells(row) for row in rows]))
            block = []
    return tables


def test_delta_smoke_cpu(tmp_path):
    out = tmp_path / "RESULTS.md"
    cmd = [sys.executable, "benchmarks/delta.py", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    (h1, single), (h2, memory), (h3, multi) = _tables(text)

    assert h1[:5] == ["shape (out x in)", "tokens", "variant", "ms", "vs base"] and "% of copy BW" in h1
    variants = [row[2] for row in single]
    for label in ("base only", "base + ours (delta_linear)", "base + dequant + matmul", "dense merged W + dW"):
        assert variants.count(label) == 3, (label, variants)  # tokens 1, 4 and a 32-token prefill
    for row in single:
        assert NUMBER.match(row[3]) and float(row[3]) > 0, row
        if row[2] == "base only":
            assert row[4] == "1.00", row
        if row[2].startswith("base + ours"):
            assert float(row[h1.index("delta MB")]) > 0 and float(row[h1.index("rel err vs fp64")]) < 1e-2, row

    assert h2[:3] == ["shape (out x in)", "bands", "tenants N"]
    for row in memory:  # exact bytes: base + N deltas vs N merged copies
        n, base, delta, compressed, merged = int(row[2]), *(int(c.replace(",", "")) for c in row[3:7])
        assert base == 96 * 64 * 2 and compressed == base + n * delta and merged == n * base, row
    assert [row[2] for row in memory] == ["1", "4"]

    assert [row[1] for row in multi] == ["-", "2", "4"] and "% of copy BW" in h3
    assert all(NUMBER.match(row[3]) for row in multi)

    assert re.search(r"\d{4}-\d\d-\d\d .*torch .*triton .*peft ", text), text
    assert "Command: `" in text and "benchmarks/delta.py --smoke" in text
    assert "Device copy bandwidth" in text and "not judged" in text and "<= 1.15x" in text
    assert out.read_text().strip() == text.strip()


def _markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(_cells(line))
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize(
    "script, first_row",
    [("lowrank_kernels.py", "frozen base x W^T"), ("lowrank.py", "frozen base (only the input embedding trainable)"),
     ("autotune.py", "shrink/expand forward")],
)
def test_lowrank_benchmarks_tiny_cpu(tmp_path, script, first_row):
    """The low-rank benchmarks run end to end at their --tiny shape and append what they print to --out."""
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--tiny", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tables = _markdown_tables(proc.stdout)
    assert tables and tables[0][0][0] == "variant" and tables[0][2][0] == first_row, proc.stdout
    for table in tables:
        assert all(len(row) == len(table[0]) for row in table), table
    assert all(line in out.read_text() for line in proc.stdout.splitlines() if line.startswith("|"))


SMORE_HEADERS = [
    "variant",
    "trainable params",
    "step ms (median)",
    "peak GiB",
    "time vs LoRA",
    "memory vs LoRA",
    "time vs frozen base",
]
SMORE_ROWS = ("frozen base", "PEFT LoRA r=", "S'MoRE switch 4-4 top-2", "S'MoRE dense 2-2")


@pytest.mark.parametrize(
    "extra", [[], ["--interleave", "--track-memory", "--threads", "1"]], ids=["sequential", "interleaved"]
)
def test_smore_benchmark_tiny_cpu(tmp_path, extra):
    """benchmarks/smore.py at --shape tiny: one table, S'MoRE vs PEFT LoRA at equal trainable parameters and the frozen
    base, every cell a number (or n/a for CUDA's peak memory), LoRA's count within 2 % of S'MoRE's."""
    out = tmp_path / "RESULTS.md"
    args = ["benchmarks/smore.py", "--shape", "tiny", "--steps", "1", "--warmup", "0", *extra, "--out", str(out)]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    tables = _tables(text)
    assert len(tables) == 1, text
    header, rows = tables[0]
    tracked = "--track-memory" in extra
    assert header == SMORE_HEADERS[:4] + (["tracked peak GiB"] if tracked else []) + SMORE_HEADERS[4:], header
    assert [row[0].startswith(label) for row, label in zip(rows, SMORE_ROWS)] == [True] * 4 and len(rows) == 4, rows
    by_label = dict(zip(SMORE_ROWS, rows))
    for row in rows:
        assert len(row) == len(header), row
        cells = dict(zip(header, row))
        assert int(cells["trainable params"].replace(",", "")) > 0, row
        assert NUMBER.match(cells["step ms (median)"]) and float(cells["step ms (median)"]) > 0, row
        assert cells["peak GiB"] == "n/a", row  # CPU: CUDA's allocator peak only
        for key in ("time vs LoRA", "time vs frozen base"):
            assert NUMBER.match(cells[key]) and float(cells[key]) > 0, row
        if tracked:
            assert NUMBER.match(cells["tracked peak GiB"]) and NUMBER.match(cells["memory vs LoRA"]), row
        else:
            assert cells["memory vs LoRA"] == "n/a", row
    assert by_label["PEFT LoRA r="][header.index("time vs LoRA")] == "1.00"
    assert by_label["frozen base"][header.index("time vs frozen base")] == "1.00"
    params = {label: int(row[1].replace(",", "")) for label, row in by_label.items()}
    smore = params["S'MoRE switch 4-4 top-2"]
    assert abs(params["PEFT LoRA r="] - smore) <= 0.02 * smore  # equal parameters, router included (spec: +-2 %)
    assert params["frozen base"] == 512 * 64  # the tiny shape's input embedding
    r = int(re.search(r"PEFT LoRA r=(\d+)", by_label["PEFT LoRA r="][0])[1])
    assert params["PEFT LoRA r="] == r * 2 * 3 * (64 + 176)  # r * (in + out) over gate/up/down of 2 blocks

    # the counts, the goals and the header (date, device, versions, exact command) come with the table
    assert f"S'MoRE 4-4 has {smore:,} trainable parameters" in text, text
    assert "LoRA has " in text and "% of S'MoRE's count" in text
    assert "S'MoRE step <= 1.25x a PEFT LoRA step" in text and "judged on a GPU at the anchor shape" in text
    assert re.search(r"\d{4}-\d\d-\d\d .*torch .*triton .*peft .*transformers ", text), text
    assert "Command: `" in text and "benchmarks/smore.py --shape tiny --steps 1 --warmup 0" in text
    assert out.read_text().strip() == text.strip()


SSMLORA_HEADERS = [
    "variant",
    "trainable params",
    "step ms (median)",
    "peak GiB",
    "time vs LoRA (same points)",
    "time vs LoRA all q/v",
    "memory vs LoRA (same points)",
    "time vs frozen base",
    "memory vs frozen base",
]
SSMLORA_ROWS = ("frozen base", "PEFT LoRA r=8, same points", "PEFT LoRA r=8, all q/v", "SSMLoRA r=8, alternate_qv",
                "SSMLoRA r=8, all q/v, chain all")  # fmt: skip


@pytest.mark.parametrize(
    "extra", [[], ["--interleave", "--track-memory", "--threads", "1"]], ids=["sequential", "interleaved"]
)
def test_ssmlora_benchmark_tiny_cpu(tmp_path, extra):
    """benchmarks/ssmlora.py at --shape tiny: one table, SSMLoRA (alternate q/v, and all q/v in one chain) vs PEFT LoRA
    on the same insertion points and on all q/v, and the frozen base; every cell a number (or n/a for CUDA's peak
    memory); the trainable counts equal the spec's formula."""
    out = tmp_path / "RESULTS.md"
    args = ["benchmarks/ssmlora.py", "--shape", "tiny", "--steps", "1", "--warmup", "0", *extra, "--out", str(out)]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    tables = _tables(text)
    assert len(tables) == 1, text
    header, rows = tables[0]
    tracked = "--track-memory" in extra
    assert header == SSMLORA_HEADERS[:4] + (["tracked peak GiB"] if tracked else []) + SSMLORA_HEADERS[4:], header
    assert len(rows) == 5 and all(row[0].startswith(label) for row, label in zip(rows, SSMLORA_ROWS)), rows
    by_label = dict(zip(SSMLORA_ROWS, rows))
    for row in rows:
        assert len(row) == len(header), row
        cells = dict(zip(header, row))
        assert int(cells["trainable params"].replace(",", "")) > 0, row
        assert NUMBER.match(cells["step ms (median)"]) and float(cells["step ms (median)"]) > 0, row
        assert cells["peak GiB"] == "n/a", row  # CPU: CUDA's allocator peak only
        for key in ("time vs LoRA (same points)", "time vs LoRA all q/v", "time vs frozen base"):
            assert NUMBER.match(cells[key]) and float(cells[key]) > 0, row
        for key in ("memory vs LoRA (same points)", "memory vs frozen base"):
            assert NUMBER.match(cells[key]) if tracked else cells[key] == "n/a", row
        if tracked:
            assert NUMBER.match(cells["tracked peak GiB"]), row
    assert by_label["PEFT LoRA r=8, same points"][header.index("time vs LoRA (same points)")] == "1.00"
    assert by_label["PEFT LoRA r=8, all q/v"][header.index("time vs LoRA all q/v")] == "1.00"
    assert by_label["frozen base"][header.index("time vs frozen base")] == "1.00"
    params = {label: int(row[1].replace(",", "")) for label, row in by_label.items()}
    # tiny shape: hidden 64, 4 heads / 2 KV heads (head dim 16), 2 blocks: q_proj 64 -> 64, v_proj 64 -> 32; r = 8
    q, v, r = 8 * (64 + 64), 8 * (64 + 32), 8
    assert params["frozen base"] == 512 * 64  # the tiny shape's input embedding
    assert params["PEFT LoRA r=8, same points"] == q + v  # q_proj of block 0, v_proj of block 1
    assert params["PEFT LoRA r=8, all q/v"] == 2 * (q + v)
    assert params["SSMLoRA r=8, alternate_qv"] == q + v + 2 * r * r + r * r  # D on both, C on the chain's second
    assert params["SSMLoRA r=8, all q/v, chain all"] == 2 * (q + v) + 4 * r * r + 3 * r * r  # one chain of 4

    # the counts, the goals and the header (date, device, versions, exact command) come with the table
    assert "ssmlora 1,984 (= the formula, 2 adapted modules)" in text, text
    assert "!= the formula" not in text and "WARNING" not in proc.stderr
    assert "perf.md's LoRA-family step <= 1.1x the frozen base's time and peak memory" in text
    assert "judged on a GPU at the anchor shape" in text
    assert re.search(r"\d{4}-\d\d-\d\d .*torch .*triton .*peft .*transformers ", text), text
    assert "Command: `" in text and "benchmarks/ssmlora.py --shape tiny --steps 1 --warmup 0" in text
    assert out.read_text().strip() == text.strip()


FINEGATES_STEP_HEADERS = [
    "variant",
    "trainable params",
    "step ms (median)",
    "peak GiB",
    "time vs LoRA",
    "memory vs LoRA",
    "time vs frozen base",
    "memory vs frozen base",
]
FINEGATES_STEP_ROWS = ("frozen base", "PEFT LoRA r=8, all linear layers of the blocks", "FineGates, default targets",
                       "FineGates + bias=\"gates\" + LoRA r=8")  # fmt: skip
FINEGATES_INFER_HEADERS = [
    "variant", "params", "closed gates", "removable (gate_stats)", "max abs logit diff vs dense (fp32)",
    "prefill 1x16 ms", "prefill 2x16 ms", "decode ms/token", "prefill 1x16 vs dense", "prefill 2x16 vs dense",
    "decode vs dense",
]  # fmt: skip


def _percent(cell: str) -> float:
    assert cell.endswith(" %"), cell
    return float(cell[:-2]) / 100


@pytest.mark.parametrize(
    "extra", [["--force-gated-linear"], ["--interleave", "--track-memory", "--threads", "1", "--tables", "1"]],
    ids=["three-tables", "interleaved-step-only"],
)  # fmt: skip
def test_finegates_benchmark_tiny_cpu(tmp_path, extra):
    """benchmarks/finegates.py --tiny: the training step of FineGates (alone and with bias + LoRA) against PEFT LoRA r=8
    and the frozen base, with the spec's trainable counts; the gated linear against nn.Linear (forced on the CPU); the
    pruned vs dense inference of a tiny random Llama at synthetic sparsity 0 / 0.2 / 0.3 / 0.4: pruned logits equal
    the dense ones, fewer parameters at every s > 0 and none removed at the control."""
    out = tmp_path / "RESULTS.md"
    args = ["benchmarks/finegates.py", "--tiny", "--steps", "1", "--warmup", "0", *extra, "--out", str(out)]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    tables = _tables(text)
    all_tables = "--tables" not in extra
    assert len(tables) == (3 if all_tables else 1), text

    # 1. training step
    header, rows = tables[0]
    tracked = "--track-memory" in extra
    assert header == FINEGATES_STEP_HEADERS[:4] + (["tracked peak GiB"] if tracked else []) + FINEGATES_STEP_HEADERS[4:]
    assert len(rows) == 4 and all(row[0].startswith(label) for row, label in zip(rows, FINEGATES_STEP_ROWS)), rows
    for row in rows:
        cells = dict(zip(header, row))
        assert len(row) == len(header) and cells["peak GiB"] == "n/a", row  # CPU: CUDA's allocator peak only
        assert NUMBER.match(cells["step ms (median)"]) and float(cells["step ms (median)"]) > 0, row
        for key in ("time vs LoRA", "time vs frozen base"):
            assert NUMBER.match(cells[key]) and float(cells[key]) > 0, row
        assert NUMBER.match(cells["memory vs LoRA"]) if tracked else cells["memory vs LoRA"] == "n/a", row
    assert rows[1][header.index("time vs LoRA")] == "1.00" and rows[0][header.index("time vs frozen base")] == "1.00"
    params = [int(row[1].replace(",", "")) for row in rows]
    # tiny shape: hidden 64, FFN 176, 4 heads / 2 KV heads (k, v 64 -> 32), 2 blocks; (in + out) of the seven linears
    in_out = 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 176))
    outs = 2 * (64 + 32 + 32 + 64 + 176 + 176 + 64)
    assert params == [512 * 64, 8 * in_out, in_out, in_out + outs + 8 * in_out], params
    assert "(= the formula)" in text and "!= the formula" not in text
    assert "perf.md's LoRA-family step (FineGates + LoRA among them) <= 1.1x the frozen base's time" in text
    assert re.search(r"machine load \(os\.getloadavg 1/5/15 min\) [\d.]+/[\d.]+/[\d.]+ before", text), text
    assert re.search(r"\d{4}-\d\d-\d\d .*torch .*triton .*peft .*transformers ", text), text
    assert "Command: `" in text and "benchmarks/finegates.py --tiny --steps 1 --warmup 0" in text
    assert out.read_text().strip() == text.strip()
    if not all_tables:
        return

    # 3. (printed second) the gated linear against nn.Linear, forced on the CPU
    header, rows = tables[1]
    assert header == ["variant", "shape (out x in)", "tokens", "ms (median)", "vs nn.Linear"], header
    assert [row[1] for row in rows] == ["176x64"] * 4 + ["64x176"] * 4, rows
    assert [row[0].split(" ")[0] for row in rows[:4]] == ["nn.Linear,", "autograd", "peft-ext", "ref:"], rows
    assert all(NUMBER.match(row[3]) and NUMBER.match(row[4]) for row in rows) and rows[0][4] == "1.00", rows
    assert "Not judged: a CPU run tests the script" in text and "No Triton gated_linear is written" in text

    # 2. (printed last) pruned vs dense inference, synthetic gates
    header, rows = tables[2]
    assert header == FINEGATES_INFER_HEADERS, header
    assert [row[0].split(":")[0] for row in rows] == [
        "s=0 (control) dense", "s=0 (control) pruned", "s=0.2 dense", "s=0.2 pruned", "s=0.3 dense", "s=0.3 pruned",
        "s=0.4 dense", "s=0.4 pruned",
    ]  # fmt: skip
    total = 158_016  # the tiny Llama: embeddings 2 x 512 x 64, 2 blocks, norms
    for dense, pruned in zip(rows[::2], rows[1::2]):
        d, p = dict(zip(header, dense)), dict(zip(header, pruned))
        assert int(d["params"].replace(",", "")) == total and d["max abs logit diff vs dense (fp32)"] == "-"
        assert float(p["max abs logit diff vs dense (fp32)"]) < 1e-4, pruned
        assert d["closed gates"] == p["closed gates"] and d["removable (gate_stats)"] == p["removable (gate_stats)"]
        for key in ("prefill 1x16", "prefill 2x16", "decode"):
            assert d[f"{key} vs dense"] == "1.00" and NUMBER.match(p[f"{key} vs dense"]), (dense, pruned)
    assert int(dict(zip(header, rows[1]))["params"].replace(",", "")) == total  # the control removes nothing
    closed = [_percent(dict(zip(header, row))["closed gates"]) for row in rows[1::2]]
    assert closed[0] == 0 and all(abs(c - s) < 0.05 for c, s in zip(closed[1:], (0.2, 0.3, 0.4))), closed
    pruned_params = [int(row[1].replace(",", "")) for row in rows[1::2]]
    assert pruned_params[0] > pruned_params[1] > pruned_params[2] > pruned_params[3], pruned_params
    assert "synthetic gates at realised sparsity s" in text and "greedy tokens identical" in text
    assert "NOT within" not in text and "DIFFER" not in text
    assert re.search(r"Machine load \(os\.getloadavg, 1/5/15 min\): [\d.]+/[\d.]+/[\d.]+ before", text), text
