"""One rank of tests/hft/test_reselect_ddp.py (issue 15): HFT with `HftReselectCallback(reselect="epoch")` under the
HF Trainer on CPU (use_cpu=True), which `torch.distributed.run --nproc_per_node 2` makes MULTI_CPU DDP over gloo.

    python -m torch.distributed.run --nproc_per_node 2 tests/hft/ddp_reselect_worker.py --out DIR

Scenarios, each 2 steps per epoch (8 rows, 2 per rank per step: a global batch of 4), the new half drawn after the
Trainer wrapped the model in DDP:
    epoch          reselect="epoch", 2 epochs: drawn at the start of epoch 1
    stage_new      reselect="stage": one epoch, then a new Trainer for the next stage (drawn in its on_train_begin)
    stage_same     reselect="stage": the same Trainer's train() twice (it keeps its DDP wrapper)
    fsdp           (ranks only) FSDP2 `fully_shard` on the layers and the root; a re-selection must raise
Writes DIR/<scenario>-rank<r>.safetensors (every HFT copy at the end), DIR/rank<r>.json (per scenario: "ok" with the
selections, or "error" with the traceback) and DIR/pids/<pid>.pid (the test kills a rank left behind by its id).
Without torch.distributed.run (no RANK in the environment) it runs the training scenarios in one process with a
batch of 4: the reference the test compares against (DIR/<scenario>-single.safetensors, DIR/single.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

ROWS, PER_RANK, EPOCHS, SEED = 8, 2, 2, 0


def copies(model) -> dict:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if ".hft_weight." in n}


SCENARIOS = ("epoch", "stage_new", "stage_same")


def train(out: Path, scenario: str, tag: str, per_device: int, **extra_args) -> dict:
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import Trainer, TrainingArguments

    from peft_ext import HftConfig
    from peft_ext.testing.models import MODELS, TokenDataset
    from peft_ext.training import HftReselectCallback

    torch.set_num_threads(1)
    reselect = "epoch" if scenario == "epoch" else "stage"
    model = get_peft_model(MODELS["llama"].make(0), HftConfig(seed=0, reselect=reselect))
    config = model.peft_config["default"]
    first = sorted(config.selected_modules)
    callback = HftReselectCallback()

    def trainer(epochs):
        args = TrainingArguments(
            output_dir=str(out / f"trainer-{scenario}-{tag}"), per_device_train_batch_size=per_device,
            learning_rate=1e-2, num_train_epochs=epochs, report_to=[], use_cpu=True, save_strategy="no",
            logging_strategy="no", weight_decay=0.1, seed=SEED, dataloader_num_workers=0, **extra_args,
        )  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=TokenDataset(n=ROWS), callbacks=[callback])

    if scenario == "epoch":
        trainer(EPOCHS).train()
    elif scenario == "stage_new":
        trainer(1).train()
        trainer(1).train()
    else:
        same = trainer(1)
        same.train()
        same.train()
    save_file(copies(model), str(out / f"{scenario}-{tag}.safetensors"))
    return {"status": "ok", "stage": config.stage, "first": first, "last": sorted(config.selected_modules)}


def unused_false_refuses(out: Path, rank: int) -> dict:
    """ddp_find_unused_parameters=False: DDP would expect a gradient for the previous half, frozen by the re-selection;
    the callback raises the fix before anything is re-drawn."""
    try:
        record = train(out, "epoch", f"unused-rank{rank}", PER_RANK, ddp_find_unused_parameters=False)
    except ValueError as err:
        return {"status": "ok", "raised": str(err)}
    return {**record, "raised": None}


def fsdp_refuses() -> dict:
    """Under FSDP2, the callback's re-selection raises before anything is re-drawn."""
    from types import SimpleNamespace

    import torch
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard

    from peft_ext import HftConfig
    from peft_ext.testing.models import MODELS
    from peft_ext.training import HftReselectCallback

    model = get_peft_model(MODELS["llama"].make(0), HftConfig(seed=0, reselect="epoch"))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    try:
        HftReselectCallback().on_epoch_begin(None, SimpleNamespace(epoch=1.0), None, model=model, optimizer=optimizer)
    except ValueError as err:
        return {"status": "ok", "raised": str(err), "stage": model.peft_config["default"].stage}
    return {"status": "ok", "raised": None, "stage": model.peft_config["default"].stage}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if "RANK" not in os.environ:  # the single-process reference
        records = {s: train(out, s, "single", PER_RANK * 2) for s in SCENARIOS}
        (out / "single.json").write_text(json.dumps(records, indent=1))
        return 0
    rank = int(os.environ["RANK"])
    (out / "pids").mkdir(exist_ok=True)
    (out / "pids" / f"{os.getpid()}.pid").write_text(str(os.getpid()))
    records, failed = {}, False
    for scenario in SCENARIOS + ("fsdp", "unused_false"):
        try:
            if scenario == "fsdp":
                records[scenario] = fsdp_refuses()
            elif scenario == "unused_false":
                records[scenario] = unused_false_refuses(out, rank)
            else:
                records[scenario] = train(out, scenario, f"rank{rank}", PER_RANK)
        except Exception as err:
            records[scenario] = {
                "status": "error", "message": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
            }  # fmt: skip
            failed = True
        (out / f"rank{rank}.json").write_text(json.dumps(records, indent=1))
        if failed:
            break  # the ranks may disagree on what runs next: stop rather than hang
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
