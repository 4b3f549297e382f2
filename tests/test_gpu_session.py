"""benchmarks/gpu_session.sh, the script a lent GPU session runs, checked on the CPU: its phases are validated before
any install; its smoke phase runs every benchmark end to end into $OUT; every step runs under its own timeout
(its children killed with it) inside the session budget, and the steps' timeouts fit one 8-minute device call; a
row that raises fails that row, not the benchmark's table; the GPU tests collect with neither datasets nor trl;
only peft is carried to the machine."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
ONE_CALL_S = 480  # a device call of at most 8 minutes


def bash(code: str, tmp_path: Path, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    """Runs `code` in bash after sourcing the runbook (which then only defines its functions)."""
    full_env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_SESSION_SITE": str(tmp_path / "site"), **env}
    return subprocess.run(
        ["bash", "-c", f"source {SCRIPT}\n{code}"], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT
    )


# ------------------------------------------------------------------------------------------------ phases
@pytest.mark.parametrize("args, message", [([], "usage:"), (["tests", "bogus"], "unknown phase bogus")])
def test_bad_phases_are_refused_before_any_work(tmp_path, args, message):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_SESSION_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and message in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "site").exists() and not (tmp_path / "out").exists()  # nothing installed or written


def test_smoke_phase_installs_peft_ext_apart_and_writes_every_table(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_SITE": str(site), "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(SCRIPT), "smoke"], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (site / "peft_ext" / "kernels" / "delta.py").is_file()  # kernels/ installed as peft_ext.kernels
    assert (site / "peft_ext_row_guard.py").is_file()
    tables = (out / "results_smoke.md").read_text()
    scripts = ("lowrank_kernels.py", "delta.py", "lowrank.py", "hft_step.py", "smore.py", "ssmlora.py", "finegates.py",
               "autotune.py")
    for script in scripts:
        assert f"benchmarks/{script} " in tables, script  # each script's header names its command
    assert "OOM" not in tables and "Row guard" not in tables
    log = (out / "smoke.log").read_text()
    assert "### exit" not in log and "### timeout" not in log and "### skipped" not in log
    steps = re.findall(r"^    (\S+) (\S+) (\d+) (\d+)$", (out / "session.log").read_text(), re.M)
    assert [(name, status) for name, status, *_ in steps] == [
        ("setup", "ok"), ("lowrank-kernels", "ok"), ("delta", "ok"), ("lowrank", "ok"), ("hft-step", "ok"),
        ("smore", "ok"), ("ssmlora", "ok"), ("finegates", "ok"), ("autotune", "ok"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- time limits
def test_a_step_is_cut_at_its_timeout_with_its_children_and_the_next_step_runs(tmp_path):
    marker = tmp_path / "marker"
    start = time.monotonic()
    proc = bash(
        f"""step {tmp_path}/log slow 2 "(sleep 5; touch {marker}) & wait"; echo "rc=$?"
        step {tmp_path}/log failing 10 "exit 3"; echo "rc=$?"
        step {tmp_path}/log next 10 "echo next ran"; echo "rc=$?"
        printf 'STEP %s\\n' "${{STEPS[@]}}" """,
        tmp_path,
    )
    took = time.monotonic() - start
    assert proc.stdout.count("rc=") == 3, proc.stdout + proc.stderr
    assert "rc=124" in proc.stdout and "rc=3" in proc.stdout and "next ran\nrc=0" in proc.stdout
    assert took < 5, took  # cut at 2 s, not waited for
    time.sleep(5 - took + 1)
    assert not marker.exists()  # the step's background child was killed with it
    log = (tmp_path / "log").read_text()
    assert "### timeout after 2 s: slow" in log and "### exit 3: failing" in log
    assert re.findall(r"STEP (\S+) (\S+)", proc.stdout) == [("slow", "timeout"), ("failing", "exit-3"), ("next", "ok")]


def test_a_step_past_the_session_budget_is_cut_or_skipped(tmp_path):
    proc = bash(
        f"""DEADLINE=$(( $(date +%s) + 25 ))
        step {tmp_path}/log shortened 60 "echo ran"; echo "rc=$?"
        DEADLINE=$(( $(date +%s) + 8 ))
        step {tmp_path}/log late 60 "echo never"; echo "rc=$?" """,
        tmp_path,
    )
    log = (tmp_path / "log").read_text()
    assert re.search(r"### step shortened \(timeout (19|20) s\)", log), log  # the budget's 25 s less 5 s of margin
    assert "### skipped, 3 s left of the session budget: late" in log or "### skipped, 2 s left" in log, log
    assert "never" not in proc.stdout and "rc=125" in proc.stdout


def step_timeouts() -> dict[str, list[int]]:
    """The timeout of every step of every phase, read from the runbook's step lines."""
    text = SCRIPT.read_text()
    phases: dict[str, list[int]] = {"setup": [int(re.search(r"step \"\$OUT/session.log\" setup (\d+)", text)[1])]}
    body = text[text.index("run_phase() {") : text.index("summary() {")]
    for phase, block in re.findall(r"^        (\w+)\)(.*?);;", body, re.M | re.S):
        phases[phase] = [int(t) for t in re.findall(r"(?:step \S+ \S+|bench \w+ \S+) (\d+) ", block)]
    return phases


def test_every_step_has_a_timeout_and_all_fit_one_device_call():
    timeouts = step_timeouts()
    assert set(timeouts) == {"setup", "tests", "kernels", "models", "smoke"}
    assert [len(timeouts[p]) for p in ("tests", "kernels", "models", "smoke")] == [1, 6, 5, 8]
    assert timeouts["setup"] == [40] and timeouts["tests"][0] >= 85  # the new steps' time came from kernels / models
    one_call = sum(timeouts["setup"] + timeouts["tests"] + timeouts["kernels"] + timeouts["models"])
    budget = int(re.search(r"BUDGET_S=\$\{GPU_SESSION_BUDGET_S:-(\d+)\}", SCRIPT.read_text())[1])
    assert one_call <= budget <= ONE_CALL_S - 15, (one_call, budget)  # 5 s kill margin + the summary


# ------------------------------------------------------------------------------------------------- rows
INJECT = """
import runpy, sys
import peft_ext.kernels as kernels
from triton.runtime.errors import OutOfResources

real, calls = kernels.delta_linear, []


def first_call_fails(*args, **kwargs):  # what a first-run Triton error does to the first row that launches
    calls.append(1)
    if len(calls) == 1:
        raise OutOfResources(300000, 232448, "shared memory")
    return real(*args, **kwargs)


kernels.delta_linear = first_call_fails
guard, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(guard, run_name="__main__")
"""


def test_a_failing_row_fails_that_row_not_the_table(tmp_path):
    """A Triton error in one row of benchmarks/delta.py (its first `ours` row) marks that row failed; the other rows
    are measured and the tables are written, with a note naming the error under them."""
    proc = bash(f"write_row_guard {tmp_path}/site", tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "inject.py").write_text(INJECT)
    out = tmp_path / "results.md"
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "inject.py"), str(tmp_path / "site" / "peft_ext_row_guard.py"),
         "benchmarks/delta.py", "--smoke", "--skip-multi", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OutOfResources" in proc.stderr  # the traceback, in the step's log
    rows = [line for line in out.read_text().splitlines() if "base + ours (delta_linear)" in line]
    assert len(rows) == 3  # 96x64 at 1, 4 and 32 tokens
    assert "| OOM |" in rows[0] and "OOM" not in rows[1] + rows[2]  # only the failing row
    note = out.read_text().split("Row guard (benchmarks/gpu_session.sh): ", 1)[1]
    assert note.startswith("1 row(s) marked OOM above failed with another error")
    assert "triton.runtime.errors.OutOfResources: out of resource: shared memory" in note


# -------------------------------------------------------------------------------------------- packages
BLOCKER = '''
import sys

BLOCKED = ("datasets", "trl")


class Hidden:
    """A meta-path finder that does not see datasets and trl: to find_spec (transformers' availability checks) and
    to import they are missing, as on the GPU image, which has neither."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
'''


def test_the_gpu_tests_collect_without_datasets_and_trl(tmp_path):
    """The runbook's pytest command, collecting only, with `import datasets` and `import trl` failing: no collection
    error (a module-level `from datasets import Dataset` once stopped the whole GPU run)."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": str(tmp_path / "blocker"), "PYTHON": sys.executable, "GPU_TEST_WORKERS": "0"}
    check = bash('"$PYTHON" -c "import datasets"; "$PYTHON" -c "import trl"', tmp_path, **env)
    for name in ("datasets", "trl"):  # the blocker works
        assert f"ModuleNotFoundError: No module named '{name}'" in check.stderr, check.stderr
    proc = bash("mkdir -p $OUT && $(gpu_tests_command) --collect-only -qq", tmp_path, timeout=300, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not re.search(r"\d+ errors?\b", proc.stdout), proc.stdout[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(collected) >= 40 and any(line.startswith("tests/cola/") for line in collected)


def test_the_tests_phase_runs_on_the_installed_package_without_datasets_and_trl(tmp_path):
    """The `tests` phase end to end (here every GPU test is collected, in pytest-xdist workers, and skipped): the
    non-editable install in $GPU_SESSION_SITE, the pytest command and its workers, with datasets and trl hidden."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_SITE": str(tmp_path / "site"), "PYTHON": sys.executable,
           "PYTHONPATH": str(tmp_path / "blocker"), "GPU_TEST_WORKERS": "2"}  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), "tests"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    junit = (out / "gpu_tests.xml").read_text()
    counts = {key: int(re.search(rf'{key}="(\d+)"', junit)[1]) for key in ("tests", "errors", "failures", "skipped")}
    tests, errors, failures, skipped = counts.values()
    assert tests >= 40 and errors == failures == 0 and skipped == tests  # no GPU here: all skipped, none broken
    assert re.search(r"^    gpu-tests ok ", (out / "session.log").read_text(), re.M)


def test_every_gpu_test_is_in_the_runbooks_test_folders():
    folders = re.search(r'^GPU_TESTS="([^"]+)"', SCRIPT.read_text(), re.M)[1].split()
    gpu_marked = re.compile(r"^@pytest\.mark\.gpu\b", re.M)
    marked = {p.relative_to(ROOT) for p in (ROOT / "tests").rglob("test_*.py") if gpu_marked.search(p.read_text())}
    assert marked and all(any(str(p).startswith(f + "/") for f in folders) for p in marked), (marked, folders)


def test_only_peft_is_carried():
    """The image has its own transformers (and torch, triton): device_wheels.sh downloads peft alone."""
    download = (ROOT / "benchmarks" / "device_wheels.sh").read_text().split("pip download", 1)[1]
    assert re.findall(r'"(\w+)==', download) == ["peft"]
