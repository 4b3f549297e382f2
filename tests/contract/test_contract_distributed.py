"""Contract item 9: 2 processes on CPU (gloo, torch.distributed.run) under DDP and FSDP2 equal one process on the same
global batch; the replicas are identical; rank 0's save reloads exactly, on our methods.

The tests live in peft_ext/testing/contract/distributed.py; peft_ext.testing.plugin (enabled in tests/conftest.py)
parametrises them over the entries below (the worker processes import this module to find them).
"""

import os
import sys
import time

import pytest

from peft_ext.testing.contract.distributed import *  # noqa: F403
from peft_ext.testing.contract.distributed import LaunchTimeout, run_launcher

from .methods import METHODS, VARIANTS

PEFT_EXT_CONTRACT_METHODS = METHODS
PEFT_EXT_CONTRACT_VARIANTS = VARIANTS


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_hung_launch_is_killed_with_its_workers(tmp_path):
    """The item's guard against a hung collective: past its timeout the launcher's process group is killed and
    LaunchTimeout raised, rather than CI stalling; a worker in a session of its own (as torchrun starts them) that
    wrote its pid into the pid folder is killed by its id."""
    pids = tmp_path / "pids"
    pids.mkdir()
    sleeper = "import time; time.sleep(600)"
    script = (
        "import os, subprocess, sys, time; "
        f"a = subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
        f"b = subprocess.Popen([sys.executable, '-c', {sleeper!r}, {str(tmp_path)!r}], start_new_session=True); "
        f"[open(os.path.join({str(pids)!r}, f'{{p.pid}}.pid'), 'w').write(str(p.pid)) for p in (a, b)]; "
        "time.sleep(600)"
    )
    start = time.perf_counter()
    with pytest.raises(LaunchTimeout):
        run_launcher([sys.executable, "-c", script], tmp_path / "log", timeout=3, pid_dir=pids)
    assert time.perf_counter() - start < 30
    written = [int(f.read_text()) for f in pids.glob("*.pid")]
    assert len(written) == 2, written
    for pid in written:
        assert _gone(pid), f"process {pid} survived"


def _gone(pid: int) -> bool:
    for _ in range(50):  # dead (a zombie until its parent or init reaps it)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    os.kill(pid, 9)
    return False
