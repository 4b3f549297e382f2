"""Smoke test of the benchmark scripts: they run end to end on CPU at a tiny shape and print a well-formed table.

Runs them as a user would (`python benchmarks/<name>.py` from the repository root, in a subprocess), so that
benchmarks/ is sys.path[0] and the root's kernels/ folder is not importable as a top-level module.
"""

import re
import subprocess
import sys
from pathlib import Path

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
