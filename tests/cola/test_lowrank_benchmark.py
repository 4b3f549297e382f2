"""Smoke test of benchmarks/lowrank.py: runs end to end on CPU at a tiny shape (as a user runs it, a subprocess from
the repository root) and prints both tables with every required row."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def _tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_lowrank_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "RESULTS.md"
    cmd = [sys.executable, "benchmarks/lowrank.py", "--tiny", "--steps", "1", "--warmup", "0", "--dtype", "float32",
           "--adapters", "1,4", "--fwd-batch", "4", "--fwd-seq", "8", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    step, fwd = _tables(proc.stdout)
    assert step[0] == ["variant", "trainable params", "step ms (median)", "peak GiB", "time vs frozen base", "memory vs frozen base"]
    labels = [row[0] for row in step[2:]]
    for r in (16, 64):
        for prefix in (f"PEFT LoRA r={r} (fp32", f"PEFT LoRA r={r} + peft_ext.accelerate", f"COLA r={r}, M=3, last link"):
            assert sum(label.startswith(prefix) for label in labels) == 1, (prefix, labels)
    assert labels[0].startswith("frozen base") and step[2][4] == "1.00"
    for row in step[2:]:
        assert NUMBER.match(row[2]) and float(row[2]) > 0 and row[3] == "n/a", row
    params = {row[0].split(" (")[0]: int(row[1].replace(",", "")) for row in step[2:]}
    assert params["PEFT LoRA r=16"] == params["PEFT LoRA r=16 + peft_ext.accelerate"] == params["COLA r=16, M=3, last link"]
    assert fwd[0] == ["variant", "forward ms (median)", "peak GiB", "time vs no adapter"]
    fwd_labels = [row[0] for row in fwd[2:]]
    assert fwd_labels[0] == "no adapter" and len(fwd_labels) == 1 + 2 + 2 * 2
    assert any("4 adapter(s) mixed via adapter_names + peft_ext.accelerate" in label for label in fwd_labels)
    assert "Command: `" in proc.stdout and "LoRA-family step <= 1.1x frozen-base" in proc.stdout
    assert out.read_text().strip() == proc.stdout.strip()
