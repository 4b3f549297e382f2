#!/usr/bin/env bash
# What a lent GPU session runs for peft-ext: the GPU tests and every benchmark, in ONE device call of at most
# 8 minutes.
#
#   here, once:   bash benchmarks/device_wheels.sh              (peft, the one package the GPU image lacks -> .whl/)
#   device call:  bash benchmarks/gpu_session.sh all            (carry [".whl"], timeout_s 480)
#
# Phases (`all` = tests kernels models, in that order):
#   tests    the `gpu`-marked tests (compiled kernels on CUDA against their references, the tuners in bf16)
#   kernels  benchmarks/lowrank_kernels.py, benchmarks/delta.py and benchmarks/autotune.py at their full-size shapes
#   models   benchmarks/lowrank.py (r=16) and benchmarks/hft_step.py, --variants all, benchmarks/smore.py (S'MoRE vs
#            LoRA at equal parameters), benchmarks/ssmlora.py (SSMLoRA vs LoRA on the same points / all q/v) and
#            benchmarks/finegates.py (training step vs LoRA, gated linear vs nn.Linear, pruned vs dense inference),
#            at the anchor shape
#   smoke    every benchmark at its small preset (CPU or GPU): checks this script, measures nothing
#
# Time: every step runs under its own timeout (the seconds in the step lines below; their sum, setup included,
# is 460 s) and the whole script under GPU_SESSION_BUDGET_S (default 460 s from its start): a step is cut at
# whichever comes first, killed with every process it started, reported, and the next step runs; a step that
# would get less than 15 s is skipped and reported. The timeouts are first guesses (nothing has run on a GPU
# yet; on 2026-12-06 gpu-tests, lowrank*, delta-14336x4096 and hft-step gave up 60 s to the smore step, then every
# kernels and models step 5-10 s, 45 s in all, to the ssmlora step, then the same eight steps 40 s in proportion to
# their caps (x 295/335, 4-9 s each) to the finegates step; then 6 s each from hft, smore, ssmlora and finegates to
# the autotune step; then 14 s from autotune, smore and finegates to the lowrank step, which gained two recompute
# rows; then 14 s from hft, ssmlora and autotune to a step of its own for the sibling-group table): the elapsed seconds of every step are listed at the end
# ($OUT/session.log) to size the next run.
# Output: each benchmark step appends its tables to $OUT/results_<phase>.md as soon as its script ends (the
# steps are small so that a cut loses one table, not a phase); logs go to $OUT/<phase>.log, the GPU tests'
# results to $OUT/gpu_tests.xml. Read the tables, then append them to benchmarks/RESULTS.md.
# Rows: the benchmark scripts run through a row guard (written to $SITE at setup): an exception while a row is
# timed (a first-run Triton compile error, OutOfResources, a CUDA error) fails that row, not the script and its
# table; the scripts mark such a row "OOM", and a note under the table names the real error.
# Packages: the image's own torch, triton and transformers are used; peft comes from .whl/ when carried; pytest
# runs with the image's plugins (pytest-xdist when present: -n $GPU_TEST_WORKERS, default 4). The GPU tests need
# neither datasets nor trl (tests/test_gpu_session.py runs the tests phase with both hidden).
#
# The script can be sourced (`source benchmarks/gpu_session.sh`): it then only defines its functions (the
# tests call `step` and `write_row_guard` that way).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-outputs/gpu_session}
PYTHON=${PYTHON:-python3}
SITE=${GPU_SESSION_SITE:-/tmp/peft_ext_site}
BUDGET_S=${GPU_SESSION_BUDGET_S:-460}
MIN_STEP_S=15
DEADLINE=$(($(date +%s) + BUDGET_S))  # reset when main starts
# every test module with a `gpu`-marked test lives under these (tests/test_gpu_session.py checks it)
GPU_TESTS="tests/kernels tests/cola tests/deltacome tests/smore tests/ssmlora"
GPU_TEST_WORKERS=${GPU_TEST_WORKERS:-4}  # pytest-xdist processes for the GPU tests (their compiles run in parallel)
PHASES="tests kernels models smoke"
STEPS=()  # "name status seconds timeout" per step, for the summary

# step LOG NAME TIMEOUT COMMAND: runs COMMAND (a bash command line) under min(TIMEOUT, time left before DEADLINE),
# its output appended to LOG and echoed; returns its status (124 when cut by the timeout, 125 when skipped).
step() {
    local log=$1 name=$2 cap=$3 cmd=$4
    local left=$((DEADLINE - $(date +%s) - 5))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt "$MIN_STEP_S" ] && [ "$limit" -lt "$cap" ]; then
        echo "### skipped, ${left} s left of the session budget: $name" | tee -a "$log"
        STEPS+=("$name skipped 0 $cap")
        return 125
    fi
    echo "### step $name (timeout ${limit} s): $cmd" | tee -a "$log"
    local start rc
    start=$(date +%s)
    # timeout signals the whole process group it runs the command in: pytest's workers, python children
    timeout --kill-after=5 "$limit" bash -c "$cmd" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - start)) status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=timeout
        rc=124
        echo "### timeout after ${limit} s: $name" | tee -a "$log"
    elif [ "$rc" -ne 0 ]; then
        status="exit-$rc"
        echo "### exit $rc: $name" | tee -a "$log"
    fi
    STEPS+=("$name $status $took $limit")
    return "$rc"
}

# write_row_guard DIR: DIR/peft_ext_row_guard.py, which runs `benchmarks/SCRIPT.py ARGS` as `python SCRIPT ARGS`
# would, with any exception raised while a row is timed turned into that row's failure (see the header).
write_row_guard() {
    mkdir -p "$1"
    cat >"$1/peft_ext_row_guard.py" <<'PY'
"""python peft_ext_row_guard.py benchmarks/SCRIPT.py ARGS...: run a benchmark script so that an exception in one
row fails that row, not the script (written by benchmarks/gpu_session.sh).

The scripts catch torch.cuda.OutOfMemoryError per row and mark that row "OOM"; any other exception (a first-run
Triton compile error or OutOfResources, a CUDA error) ended the script before it printed a table. Every row is
timed through common.measure or common.KernelBench.time_ms, where its first launch (and so its compile) happens:
here those re-raise any other exception as RowFailed, a subclass of OutOfMemoryError, so the script's own handler
fails the row and goes on. Each such failure's traceback goes to stderr (the step's log), and a note under the
script's tables names the errors, since the table itself says "OOM".
"""
import runpy
import sys
import traceback
from pathlib import Path

script = sys.argv[1]
sys.argv = sys.argv[1:]  # as if run as `python benchmarks/SCRIPT.py ARGS`
sys.path.insert(0, str(Path(script).resolve().parent))
import common  # noqa: E402  (the scripts' helpers: takes the repository root off sys.path first)
import torch  # noqa: E402

failures = []


class RowFailed(torch.cuda.OutOfMemoryError):
    """Not out of memory: another exception raised while a row was timed (named in the note under the table)."""


def row_guarded(fn):
    def guarded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise  # a real OOM (the scripts' own case), or a RowFailed from an inner guarded call
        except Exception as exc:
            traceback.print_exc()
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            failures.append(f"{type(exc).__module__}.{type(exc).__name__}: {first_line}")
            raise RowFailed(f"row failed: {failures[-1]}") from exc

    return guarded


common.measure = row_guarded(common.measure)  # also what common.time_training_step times with
common.KernelBench.time_ms = row_guarded(common.KernelBench.time_ms)
publish = common.publish


def publish_with_note(text, out):
    if failures:
        items = "\n".join(f"- `{failure}`" for failure in failures)
        text = (
            f"{text.rstrip()}\n\nRow guard (benchmarks/gpu_session.sh): {len(failures)} row(s) marked OOM above failed "
            f"with another error, in row order (tracebacks in the step's log):\n{items}\n"
        )
    publish(text, out)


common.publish = publish_with_note
runpy.run_path(script, run_name="__main__")
PY
}

setup() {
    rm -rf "$SITE" && mkdir -p "$SITE"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return 1
    fi
    # not editable: the repository's kernels/ folder becomes peft_ext.kernels only through the install
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . || return 1
    write_row_guard "$SITE"
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -P -c "import torch, triton, peft, transformers, peft_ext
print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers',
      transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
}

# pytest: -P so that the repository root does not shadow the installed peft_ext (its kernels/ folder lives at the
# root); pyproject's addopts replaced (they ask for pytest-xdist, which the image may lack)
gpu_tests_command() {
    local workers=""
    [ "$GPU_TEST_WORKERS" -gt 0 ] && "$PYTHON" -c "import xdist" 2>/dev/null && workers="-n $GPU_TEST_WORKERS"
    echo "$PYTHON -P -m pytest -o addopts= -ra --import-mode=importlib -p no:cacheprovider -m gpu $workers -v" \
        "$GPU_TESTS --junitxml=$OUT/gpu_tests.xml"
}

bench() {  # bench PHASE NAME TIMEOUT SCRIPT ARGS...: one benchmark script through the row guard, tables appended
    local phase=$1 name=$2 cap=$3 script=$4
    shift 4
    step "$OUT/$phase.log" "$name" "$cap" \
        "$PYTHON $SITE/peft_ext_row_guard.py benchmarks/$script $* --out $OUT/results_$phase.md"
}

run_phase() {  # each step's failure is reported and the next step still runs; returns 1 if any failed
    local phase=$1 status=0
    case $phase in
        tests) step "$OUT/tests.log" "gpu-tests" 85 "$(gpu_tests_command)" || status=1 ;;
        kernels)
            bench kernels lowrank-kernels-train 31 lowrank_kernels.py --skip-infer --skip-groups || status=1
            bench kernels lowrank-kernels-groups 14 lowrank_kernels.py --skip-train --skip-infer || status=1
            bench kernels lowrank-kernels-infer 22 lowrank_kernels.py --skip-train --skip-groups || status=1
            bench kernels delta-4096x4096 26 delta.py --shapes 4096x4096 || status=1
            bench kernels delta-14336x4096 26 delta.py --shapes 14336x4096 || status=1
            # heuristic vs tuned launch configs (tuning is opt-in until this table shows it pays: kernels/autotune.py)
            bench kernels autotune 12 autotune.py || status=1
            ;;
        models)
            bench models lowrank-step-and-forward 80 lowrank.py --variants all --ranks 16 --adapters 4,16 || status=1
            bench models hft-step 30 hft_step.py --variants all || status=1
            bench models smore-step 34 smore.py || status=1
            bench models ssmlora-step 30 ssmlora.py || status=1
            # two sparsity levels (the control and the LLM post-training target 0.3) and 3 timed repetitions, to fit
            # 30 s; its tables are written in the order training step, gated linear, inference (the longest, last)
            bench models finegates-step 30 finegates.py --levels 0,0.3 --infer-reps 3 --infer-warmup 1 || status=1
            ;;
        smoke)
            bench smoke lowrank-kernels 120 lowrank_kernels.py --tiny || status=1
            bench smoke delta 120 delta.py --smoke || status=1
            bench smoke lowrank 120 lowrank.py --tiny --steps 1 --warmup 0 || status=1
            bench smoke hft-step 120 hft_step.py --tiny --steps 1 --warmup 0 || status=1
            bench smoke smore 120 smore.py --tiny --steps 1 --warmup 0 || status=1
            bench smoke ssmlora 120 ssmlora.py --tiny --steps 1 --warmup 0 || status=1
            bench smoke finegates 120 finegates.py --tiny --steps 1 --warmup 0 || status=1
            bench smoke autotune 120 autotune.py --tiny || status=1
            ;;
    esac
    return $status
}

summary() {
    {
        echo "### steps (status, seconds taken, timeout given):"
        local s
        for s in "${STEPS[@]}"; do echo "    $s"; done
        echo "### session: $(($(date +%s) - DEADLINE + BUDGET_S)) s of a ${BUDGET_S} s budget"
    } | tee -a "$OUT/session.log"
}

main() {
    [ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu_session.sh PHASE... (all, or: $PHASES)"; exit 2; }
    local phases=() phase
    for phase in "$@"; do
        case $phase in
            all) phases+=(tests kernels models) ;;
            tests | kernels | models | smoke) phases+=("$phase") ;;
            *) echo "unknown phase $phase: choose from all, ${PHASES// /, }"; exit 2 ;;
        esac
    done
    cd "$ROOT" || exit 1
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    DEADLINE=$(($(date +%s) + BUDGET_S))
    export -f setup write_row_guard  # the steps run in their own bash (under timeout)
    export SITE PYTHON
    step "$OUT/session.log" setup 40 setup || {
        summary
        echo "setup failed"
        exit 1
    }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    local status=0
    for phase in "${phases[@]}"; do
        run_phase "$phase" || status=1
    done
    summary
    exit $status
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
