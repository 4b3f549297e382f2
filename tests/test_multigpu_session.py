"""benchmarks/multigpu_session.sh, the distributed smoke check for a machine with 2+ GPUs (issue 15), checked on CPU:
its cells name configs that accelerate loads, it stops before any install without 2 GPUs, and one of its cells (DDP
through recipes/accelerate/ddp.yaml, which on a machine without GPUs runs as 2 gloo processes) launches, trains and
gets its PASS verdict from the script's own functions."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "multigpu_session.sh"
CONFIGS = ROOT / "recipes" / "accelerate"


def bash(code: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OUT=str(tmp_path / "out"), GPU_SESSION_SITE=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    return subprocess.run(
        ["bash", "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=str(tmp_path)
    )


def test_every_cell_names_a_config_accelerate_loads(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    listed = bash(f"bash {SCRIPT} --list", tmp_path)
    assert listed.returncode == 0, listed.stderr
    cells = [line.split()[0] for line in listed.stdout.splitlines()]
    assert len(cells) == 19 and len(set(cells)) == 19, cells
    methods = {c.split("-")[0] for c in cells}
    assert methods == {"lora", "hft", "cola", "smore", "ssmlora", "finegates"}
    assert {c for c in cells if c.endswith("-ddp")} == {f"{m}-ddp" for m in methods}
    assert "cola-fsdp2 (must refuse" in listed.stdout and "cola-zero2 (must refuse" in listed.stdout
    kinds = {
        "ddp": ("MULTI_GPU", None), "fsdp2": ("FSDP", 2), "fsdp1": ("FSDP", 1), "zero2": ("DEEPSPEED", 2),
        "zero3": ("DEEPSPEED", 3),
    }  # fmt: skip
    assert {c.split("-")[1] for c in cells} == set(kinds)
    for name, (distributed, level) in kinds.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert str(config.distributed_type).endswith(distributed), (name, config.distributed_type)
        if distributed == "FSDP":
            assert int(config.fsdp_config["fsdp_version"]) == level
        if distributed == "DEEPSPEED":
            assert int(config.deepspeed_config["zero_stage"]) == level


def test_without_two_gpus_it_stops_before_any_install(tmp_path):
    run = bash(f"PATH=/usr/bin:/bin bash {SCRIPT}", tmp_path)  # no nvidia-smi on the PATH: 0 GPUs
    assert run.returncode == 3, run.stdout + run.stderr
    assert "needs 2 CUDA GPUs; this machine has 0" in run.stdout
    assert not (tmp_path / "site").exists() and not (tmp_path / "out").exists()


def test_a_ddp_cell_launches_trains_and_passes(tmp_path):
    """The script's own write_recipe / cell_command / verdict on the lora-ddp cell: 2 processes (gloo here)."""
    code = f"""
        PYTHON=python
        source {SCRIPT}
        mkdir -p "$OUT/multigpu"
        write_recipe lora-ddp "$OUT/multigpu/lora-ddp.yaml"
        timeout 150 bash -c "$(cell_command lora-ddp "$OUT/multigpu/lora-ddp.yaml")" > "$OUT/multigpu/lora-ddp.log" 2>&1
        verdict lora-ddp $? "$OUT/multigpu/lora-ddp.log"
    """
    run = bash(code, tmp_path, timeout=200)
    log = tmp_path / "out" / "multigpu" / "lora-ddp.log"
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else run.stderr
    assert run.stdout.strip().splitlines()[-1:] == ["PASS"], run.stdout + tail
    # 2 processes: 3 steps of 2 per process is 12 of fictional-facts' 48 rows
    assert "'epoch': '0.25'" in log.read_text(errors="replace"), tail


@pytest.mark.parametrize("cell, rc, text, want", [
    ("cola-fsdp2", 1, "ValueError: COLA adapter 'default': COLA cannot merge a link ...", "REFUSED"),
    ("cola-fsdp2", 0, "Saved the trained adapter", "FAIL (expected a refusal: COLA cannot merge a link)"),
    ("lora-ddp", 1, "Traceback ...", "FAIL (exit 1)"),
])  # fmt: skip
def test_verdicts_of_refusals_and_failures(tmp_path, cell, rc, text, want):
    log = tmp_path / "cell.log"
    log.write_text(text)
    run = bash(f"source {SCRIPT}; verdict {cell} {rc} {log}", tmp_path)
    assert run.stdout.strip() == want, run.stdout + run.stderr


def test_the_cells_can_be_split_over_calls_by_config(tmp_path):
    listed = bash(f"bash {SCRIPT} --list fsdp1 zero3", tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    cells = [line.split()[0] for line in listed.stdout.splitlines()]
    assert cells == ["lora-fsdp1", "hft-fsdp1", "lora-zero3", "hft-zero3"], cells
    bogus = bash(f"bash {SCRIPT} --list ddp bogus", tmp_path)
    assert bogus.returncode == 2 and "unknown config bogus" in bogus.stdout
