#!/usr/bin/env bash
# The distributed smoke check for a machine with 2 or more GPUs (issue 15), in ONE device call of at most 8 minutes:
#
#   here, once:   bash benchmarks/device_wheels.sh              (peft -> .whl/, as for gpu_session.sh)
#   device call:  bash benchmarks/multigpu_session.sh ddp fsdp2           (carry [".whl"], timeout_s 480)
#   device call:  bash benchmarks/multigpu_session.sh fsdp1 zero2 zero3   (the other cells, a second call)
#   here:         bash benchmarks/multigpu_session.sh --list [CONFIG...]  (the cells it would run, nothing launched)
# CONFIG: any of ddp fsdp2 fsdp1 zero2 zero3 (default: all five, which may not fit one call: the last cells are then
# reported "SKIP (budget spent)").
#
# Each cell is `accelerate launch --config_file recipes/accelerate/<config>.yaml <peft-ext> train <recipe>`: the tiny
# Llama on fictional-facts, 3 steps, batch 2 per GPU, 2 processes, under its own timeout (CELL_TIMEOUT_S, default 60 s)
# and the whole script under MULTIGPU_BUDGET_S (default 440 s). The cells: every method (LoRA, HFT, COLA, S'MoRE,
# SSMLoRA, FineGates) under DDP (NCCL) and FSDP2; LoRA and HFT under FSDP1 and, when `import deepspeed` works, under
# ZeRO-2 and ZeRO-3; COLA (whose link boundaries fall inside the 3 steps) under FSDP2 and ZeRO-2, where it must refuse
# before the first step. A cell's verdict:
#   PASS       exit 0, exactly one "Saved the trained adapter", the adapter file holds tensors and loads
#   REFUSED    a non-zero exit with the cell's expected message (COLA under FSDP/ZeRO; LoRA's empty FSDP1 file)
#   FAIL       anything else (the log's tail is kept)        SKIP  deepspeed missing, or the budget spent
# The table goes to $OUT/results_multigpu.md as each cell ends; logs to $OUT/multigpu/<cell>.log. What the CPU tests
# cover instead (2 gloo processes): docs/distributed.md. Fewer than 2 GPUs: exit 3 before any install.
set -uo pipefail
OUT=${OUT:-outputs/multigpu_session}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_session.sh"  # ROOT, PYTHON, SITE, step(), setup(): defined, nothing run
BUDGET_S=${MULTIGPU_BUDGET_S:-440}
CELL_TIMEOUT_S=${CELL_TIMEOUT_S:-60}
CONFIGS="ddp fsdp2 fsdp1 zero2 zero3"
NPROC=${MULTIGPU_NPROC:-2}

# method name -> the recipe's method block (YAML flow style)
declare -A METHOD=(
    [lora]="{peft_type: LORA, r: 8, target_modules: all-linear}"
    [hft]="{peft_type: HFT, seed: 0}"
    [cola]="{peft_type: COLA, r: 4, target_modules: [q_proj, v_proj], chain_length: 3, seed: 0}"
    [smore]="{peft_type: SMORE, target_modules: [gate_proj, down_proj], num_experts: [2, 2], num_active: [1, 1], expert_ranks: [2, 2], router_dim: 8, router_down_dim: 8, seed: 0}"
    [ssmlora]="{peft_type: SSMLORA, seed: 0}"
    [finegates]="{peft_type: FINEGATES, target_modules: [q_proj, v_proj, down_proj], seed: 0}"
)
# cell -> the message a refusal must carry (empty: the cell must pass)
declare -A REFUSAL=(
    [cola-fsdp2]="COLA cannot merge a link"
    [cola-zero2]="holds state peft-ext cannot reach"
    [lora-fsdp1]="holds no tensor"
)
CELLS=(
    lora-ddp hft-ddp cola-ddp smore-ddp ssmlora-ddp finegates-ddp
    lora-fsdp2 hft-fsdp2 smore-fsdp2 ssmlora-fsdp2 finegates-fsdp2 cola-fsdp2
    lora-fsdp1 hft-fsdp1
    lora-zero2 hft-zero2 cola-zero2 lora-zero3 hft-zero3
)

cell_command() {  # cell_command CELL RECIPE: the launch command line of one cell
    local config=${1#*-}
    echo "$PYTHON -m accelerate.commands.launch --config_file $ROOT/recipes/accelerate/$config.yaml" \
        "--num_processes $NPROC --main_process_port $((29500 + RANDOM % 1000)) -m peft_ext.cli train $2"
}

write_recipe() {  # write_recipe CELL PATH
    local method=${1%%-*}
    cat >"$2" <<EOF
model: tiny-llama
data: fictional-facts
trainer: sft
method: ${METHOD[$method]}
trainer_args: {max_steps: 3, per_device_train_batch_size: 2, learning_rate: 1.0e-3, max_length: 64, seed: 0, logging_steps: 1, ddp_timeout: 60}
output_dir: $OUT/multigpu/$1
EOF
}

verdict() {  # verdict CELL RC LOG: PASS, REFUSED or FAIL (and why)
    local cell=$1 rc=$2 log=$3 expected=${REFUSAL[$1]:-}
    if [ -n "$expected" ]; then
        if [ "$rc" -ne 0 ] && grep -qF "$expected" "$log"; then echo "REFUSED"; else echo "FAIL (expected a refusal: $expected)"; fi
        return
    fi
    [ "$rc" -eq 0 ] || { echo "FAIL (exit $rc)"; return; }
    [ "$(grep -c 'Saved the trained adapter' "$log")" -eq 1 ] || { echo "FAIL (not exactly one save)"; return; }
    "$PYTHON" -P - "$OUT/multigpu/$cell" <<'PY' && echo PASS || echo "FAIL (the adapter does not load)"
import sys
from peft import PeftModel
from safetensors import safe_open
from peft_ext.data.tiny_model import tiny_llama
folder = sys.argv[1]
with safe_open(f"{folder}/adapter_model.safetensors", framework="pt") as f:
    assert list(f.keys()), "no tensor in the adapter file"
PeftModel.from_pretrained(tiny_llama()[0], folder)
PY
}

select_cells() {  # select_cells [CONFIG...]: CELLS restricted to those configs (all without arguments)
    local wanted=" ${*:-$CONFIGS} " config cell selected=()
    for config in "$@"; do
        [[ " $CONFIGS " == *" $config "* ]] || { echo "unknown config $config: choose from $CONFIGS"; return 2; }
    done
    for cell in "${CELLS[@]}"; do [[ $wanted == *" ${cell#*-} "* ]] && selected+=("$cell"); done
    CELLS=("${selected[@]}")
}

main() {
    local list=0
    if [ "${1:-}" = "--list" ]; then
        list=1
        shift
    fi
    select_cells "$@" || return 2
    if [ $list -eq 1 ]; then
        local cell
        for cell in "${CELLS[@]}"; do echo "$cell${REFUSAL[$cell]:+ (must refuse: ${REFUSAL[$cell]})}"; done
        return 0
    fi
    local gpus
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "${gpus:-0}" -lt "$NPROC" ]; then
        echo "multigpu_session.sh needs $NPROC CUDA GPUs; this machine has ${gpus:-0}: nothing run (on CPU, the 2-process" \
            "tests of docs/distributed.md cover DDP, FSDP2 and FSDP1)"
        return 3
    fi
    cd "$ROOT" || return 1
    mkdir -p "$OUT/multigpu"
    OUT=$(cd "$OUT" && pwd)
    DEADLINE=$(($(date +%s) + BUDGET_S))
    export -f setup write_row_guard
    export SITE PYTHON
    step "$OUT/session.log" setup 40 setup || { echo "setup failed"; return 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
    local table="$OUT/results_multigpu.md" has_deepspeed=0 status=0 cell rc result
    "$PYTHON" -c "import deepspeed" 2>/dev/null && has_deepspeed=1
    {
        echo "### Distributed smoke check, $NPROC GPUs ($(date -u +%Y-%m-%d); $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
        echo
        echo "| cell | verdict | seconds |"
        echo "|---|---|---|"
    } >>"$table"
    cd "$OUT/multigpu" || return 1  # not the repository root, whose kernels/ folder would shadow HF's `kernels`
    for cell in "${CELLS[@]}"; do
        local log="$OUT/multigpu/$cell.log" start
        start=$(date +%s)
        if [[ $cell == *-zero* ]] && [ $has_deepspeed -eq 0 ]; then
            result="SKIP (deepspeed is not installed)"
        elif [ $((DEADLINE - start)) -lt 20 ]; then
            result="SKIP (budget spent)"
        else
            write_recipe "$cell" "$OUT/multigpu/$cell.yaml"
            step "$log" "$cell" "$CELL_TIMEOUT_S" "$(cell_command "$cell" "$OUT/multigpu/$cell.yaml")"
            rc=$?
            result=$(verdict "$cell" "$rc" "$log")
        fi
        [[ $result == FAIL* ]] && status=1
        echo "| $cell | $result | $(($(date +%s) - start)) |" | tee -a "$table"
    done
    return $status
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
    exit $?
fi
