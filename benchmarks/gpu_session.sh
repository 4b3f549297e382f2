#!/usr/bin/env bash
# What a lent GPU session runs for peft-ext, in phases that each fit one 10-minute device call.
#
#   here, once:   bash benchmarks/device_wheels.sh
#   device call:  bash benchmarks/gpu_session.sh tests kernels      (carry .whl)
#   device call:  bash benchmarks/gpu_session.sh models             (carry .whl)
#
# Phases:
#   tests    the `gpu`-marked tests (compiled kernels on CUDA against their references, the tuners in bf16)
#   kernels  benchmarks/lowrank_kernels.py and benchmarks/delta.py at their full-size shapes
#   models   benchmarks/lowrank.py --variants all and benchmarks/hft_step.py --variants all (anchor shape)
#   smoke    every benchmark at its small preset (CPU or GPU): checks this script, measures nothing
# Tables go to $OUT/results_<phase>.md (to be appended to benchmarks/RESULTS.md after reading), logs to
# $OUT/<phase>.log. The image's own torch and triton are used; peft and transformers come from .whl when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
SITE=${GPU_SESSION_SITE:-/tmp/peft_ext_site}

setup() {
    rm -rf "$SITE" && mkdir -p "$SITE"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return 1
    fi
    # not editable: the repository's kernels/ folder becomes peft_ext.kernels only through the install
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . || return 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -P -c "import torch, triton, peft, transformers, peft_ext; print('torch', torch.__version__, 'triton',
triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
}

run_phase() {  # phase, then the commands; a failed command is reported and the next one still runs
    local phase=$1 status=0
    shift
    for cmd in "$@"; do
        echo "### $cmd" | tee -a "$OUT/$phase.log"
        bash -c "$cmd" 2>&1 | tee -a "$OUT/$phase.log"
        local rc=${PIPESTATUS[0]}
        [ "$rc" -ne 0 ] && echo "### exit $rc: $cmd" | tee -a "$OUT/$phase.log" && status=1
    done
    return $status
}

[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu_session.sh PHASE... (tests, kernels, models, smoke)"; exit 2; }
for phase in "$@"; do
    case $phase in tests | kernels | models | smoke) ;; *) echo "unknown phase $phase: choose from tests, kernels, models, smoke"; exit 2 ;; esac
done
setup || { echo "setup failed"; exit 1; }
# pytest with -P: the repository root must not shadow the installed peft_ext (its kernels/ folder lives at the
# root); the benchmark scripts take the root off sys.path themselves (benchmarks/common.py)
PY=$PYTHON
status=0
for phase in "$@"; do
    md="$OUT/results_$phase.md"
    case $phase in
        tests) run_phase tests "$PY -P -m pytest -m gpu -n 0 tests/kernels tests/cola tests/deltacome --junitxml=$OUT/gpu_tests.xml" ;;
        kernels) run_phase kernels "$PY benchmarks/lowrank_kernels.py --out $md" "$PY benchmarks/delta.py --out $md" ;;
        models) run_phase models "$PY benchmarks/lowrank.py --variants all --out $md" \
            "$PY benchmarks/hft_step.py --variants all --out $md" ;;
        smoke) run_phase smoke "$PY benchmarks/lowrank_kernels.py --tiny --out $md" "$PY benchmarks/delta.py --smoke --out $md" \
            "$PY benchmarks/lowrank.py --tiny --steps 1 --warmup 0 --out $md" \
            "$PY benchmarks/hft_step.py --tiny --steps 1 --warmup 0 --out $md" ;;
    esac || status=1
done
exit $status
