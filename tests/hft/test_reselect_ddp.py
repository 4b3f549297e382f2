"""Issue 15: HFT re-selection under DDP. The Trainer wraps the model in DDP before the callback's events, so the copies
a re-selection makes trainable are not in DDP's gradient all-reduce; the replicas then drift apart. Two processes
(torch.distributed.run, gloo, the Trainer with use_cpu=True), a new half drawn at the start of epoch 1, two steps
after it: every rank must end with the same copies, bit for bit, and those of one process trained on the same
global batch (fp32: the ranks' partial gradients are summed in another order)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_ext.testing.contract.distributed import LaunchTimeout, _free_port, _tail, launch_env, run_launcher

WORKER = Path(__file__).with_name("ddp_reselect_worker.py")
TIMEOUT_S = float(os.environ.get("PEFT_EXT_CONTRACT_LAUNCH_TIMEOUT", "180"))
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(folder, per-rank records, launch seconds): one 2-process launch runs every scenario of the worker."""
    tmp = tmp_path_factory.mktemp("reselect_ddp")
    out = tmp / "ddp"
    out.mkdir()
    log = out / "launch.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(WORKER), "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        rc = run_launcher(cmd, log, TIMEOUT_S, env=launch_env(), cwd=str(tmp), pid_dir=out / "pids")
    except LaunchTimeout:
        pytest.fail(f"the 2-process launch did not finish within {TIMEOUT_S:.0f} s (killed):\n{_tail(log)}")
    seconds = time.perf_counter() - start
    records = [json.loads(f.read_text()) if f.exists() else {} for f in (out / "rank0.json", out / "rank1.json")]
    return out, records, rc, seconds, log


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same scenarios in one process, a batch of 4 (the same global batches)."""
    out = tmp_path_factory.mktemp("reselect_single")
    subprocess.run(
        [sys.executable, str(WORKER), "--out", str(out)], env=launch_env(), cwd=str(out), check=True, timeout=TIMEOUT_S,
        capture_output=True,
    )  # fmt: skip
    return out, json.loads((out / "single.json").read_text())


def _records(launched, scenario):
    out, records, rc, seconds, log = launched
    for r, rec in enumerate(records):
        got = rec.get(scenario)
        assert got is not None, f"rank {r} ran no {scenario!r} (exit code {rc} after {seconds:.0f} s):\n{_tail(log)}"
        assert got["status"] == "ok", f"rank {r}, {scenario}: {got['traceback']}"
    return [rec[scenario] for rec in records]


@pytest.mark.parametrize("scenario", ["epoch", "stage_new", "stage_same"])
def test_reselection_under_ddp_keeps_replicas_identical_and_equal_to_one_process(scenario, launched, single):
    records = _records(launched, scenario)
    out = launched[0]
    assert records[0]["stage"] == records[1]["stage"] == 1
    assert records[0]["first"] == records[1]["first"] != records[0]["last"] == records[1]["last"]

    ranks = [load_file(str(out / f"{scenario}-rank{r}.safetensors")) for r in range(2)]
    assert sorted(ranks[0]) == sorted(ranks[1])
    differ = [n for n, t in ranks[0].items() if not torch.equal(t, ranks[1][n])]
    assert not differ, f"{scenario}: {len(differ)} HFT copies differ between the two replicas, e.g. {differ[:4]}"

    folder, reference = single
    assert reference[scenario]["last"] == records[0]["last"]
    expected = load_file(str(folder / f"{scenario}-single.safetensors"))
    assert sorted(expected) == sorted(ranks[0])
    far = [
        f"{n}: max abs diff {(ranks[0][n] - want).abs().max().item():.3g}"
        for n, want in expected.items()
        if not torch.allclose(ranks[0][n], want, rtol=RTOL, atol=ATOL)
    ]
    assert not far, f"{scenario}: {len(far)} copies differ from one process's training on the same global batches:\n" + (
        "\n".join(far[:10])
    )


def test_reselection_under_fsdp_raises_the_fix_and_draws_nothing(launched):
    for record in _records(launched, "fsdp"):
        assert record["raised"] is not None, "a re-selection under FSDP2 did not raise"
        assert "FSDP" in record["raised"] and "reselect='never'" in record["raised"], record["raised"]
        assert record["stage"] == 0


def test_reselection_under_ddp_without_unused_parameter_search_raises_the_fix(launched):
    """DDP built with find_unused_parameters=False expects a gradient for every parameter that required grad when it
    was built; the previous half, frozen by a re-selection, would get none (DDP then fails the next step). The
    Trainer's default for a PeftModel searches for unused parameters; set to False, the callback raises first."""
    for record in _records(launched, "unused_false"):
        assert record["raised"] is not None, f"a re-selection with ddp_find_unused_parameters=False did not raise: {record}"
        assert "ddp_find_unused_parameters" in record["raised"] and "Nothing was re-drawn" in record["raised"], record
