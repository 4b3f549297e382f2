"""benchmarks/gpu_session.sh, the script a lent GPU session runs: its phases are checked before any install, and
its smoke phase runs every benchmark end to end (here on CPU) into $OUT."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


@pytest.mark.parametrize("args, message", [([], "usage:"), (["tests", "bogus"], "unknown phase bogus")])
def test_bad_phases_are_refused_before_any_work(tmp_path, args, message):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_SESSION_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and message in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "site").exists()  # nothing installed


def test_smoke_phase_installs_peft_ext_apart_and_writes_every_table(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_SITE": str(site), "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(SCRIPT), "smoke"], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (site / "peft_ext" / "kernels" / "delta.py").is_file()  # kernels/ installed as peft_ext.kernels
    tables = (out / "results_smoke.md").read_text()
    for script in ("lowrank_kernels.py", "delta.py", "lowrank.py", "hft_step.py"):
        assert f"benchmarks/{script} " in tables, script  # each script's header names its command
    assert "### exit" not in (out / "smoke.log").read_text()
