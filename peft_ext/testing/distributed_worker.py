"""The worker of the contract suite's distributed item (peft_ext.testing.contract.distributed), one per rank:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \\
        -m peft_ext.testing.distributed_worker --entry tests.contract.test_contract_distributed:hft \\
        --modes ddp,fsdp,fsdp1 --out DIR

It builds the tiny Llama with the entry's config, wraps it (DDP; FSDP2's `fully_shard` on each decoder layer and the
root; or FSDP1, `FullyShardedDataParallel(use_orig_params=True)` with each decoder layer a unit), trains `STEPS` AdamW steps on a fixed global batch split evenly across the ranks, and writes under DIR/<mode>/:

    rank<r>.json            what happened on rank r: "ok" with the per-step losses and seconds, or "error" with the
                            stage it failed in ("train": building, wrapping and the steps; "gather"; "save"), the
                            exception's classes (the MRO, "module.qualname"), message and traceback
    rank<r>.safetensors     the adapter's tensors after training, full (FSDP2: gathered), as rank r holds them
    rank<r>.losses.json     the per-step losses on rank r's share of the batch
    logits.safetensors      rank 0: the trained model's eval output on MODELS["llama"].inputs()
    adapter/                rank 0: save_pretrained (FSDP2: of `get_model_state_dict(full_state_dict=True)`)

and DIR/pids/<pid>.pid, one per rank (torchrun gives each worker a session of its own: the test kills a rank left
behind by its id).

The entry: `--entry MODULE:NAME`. The worker imports MODULE (the test module the item runs in, found from the
repository root the test puts on PYTHONPATH) and takes the MethodEntry named NAME from its PEFT_EXT_CONTRACT_METHODS /
PEFT_EXT_CONTRACT_VARIANTS, or else the module attribute NAME. An entry's callables (make_config, ...) are lambdas
and closures, so they are never pickled: the worker rebuilds the entry the same way the test module does, which is
also what registers a user's own method with PEFT (the module imports it).

`train(entry, world_size=1, rank=0)` is the same training without a process group: the single-process reference the
item compares against (the test runs it in its own process).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

MODEL_KIND = "llama"
STEPS = 3
GLOBAL_BATCH = 4  # rows per step, split evenly across the ranks (2 x 2)
BATCH_SEED = 1000  # step s trains on MODELS[MODEL_KIND].batch_with_labels(GLOBAL_BATCH, seed=BATCH_SEED + s)
TRAIN_SEED = 1234  # torch's global RNG right before the first training forward (training noise: FineGates' gates)
MODEL_SEED = 0
PG_TIMEOUT_S = 60  # init_process_group(timeout=...): a collective that waits longer raises
MODES = ("ddp", "fsdp", "fsdp1")  # DDP, FSDP2 (fully_shard), FSDP1 (FullyShardedDataParallel, use_orig_params=True)


# ------------------------------------------------------------------------------------------------------- entries
def resolve_entry(ref: str):
    """The MethodEntry that `MODULE:NAME` refers to (see the module docstring)."""
    from .entries import MethodEntry
    from .plugin import METHODS_ATTR, VARIANTS_ATTR

    module_name, sep, name = ref.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--entry {ref!r}: expected MODULE:NAME (a MethodEntry's name or a module attribute)")
    module = importlib.import_module(module_name)
    for attr in (METHODS_ATTR, VARIANTS_ATTR):
        for entry in getattr(module, attr, None) or ():
            if isinstance(entry, MethodEntry) and entry.name == name:
                return entry
    entry = getattr(module, name, None)
    if isinstance(entry, MethodEntry):
        return entry
    raise LookupError(
        f"--entry {ref!r}: {module_name} has no MethodEntry named {name!r} in {METHODS_ATTR}/{VARIANTS_ATTR} and no "
        f"attribute {name} holding one"
    )


# ------------------------------------------------------------------------------------------------------ training
def build(entry):
    """(peft model, spec): the tiny model with the entry's config and its `distributed_overrides`, built from the
    same seeds in every process (FSDP2 broadcasts nothing: every rank must build the same model)."""
    from .harness import peft_model
    from .models import MODELS

    spec = MODELS[MODEL_KIND]
    model, _ = peft_model(entry, spec, seed=MODEL_SEED, **entry.distributed_overrides)
    return model, spec


def shard(batch: dict, rank: int, world_size: int) -> dict:
    if GLOBAL_BATCH % world_size:
        raise ValueError(f"the global batch of {GLOBAL_BATCH} rows does not split over {world_size} ranks")
    per = GLOBAL_BATCH // world_size
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def train(entry, world_size: int = 1, rank: int = 0, wrap: Optional[Callable[[nn.Module], nn.Module]] = None):
    """STEPS AdamW steps (the contract's lr and weight decay) on rank `rank`'s share of each global batch; returns
    (the peft model, the wrapped model it trained through, the per-step losses). The causal LM loss is a mean over
    tokens and every row has as many, so the mean over ranks of the per-rank losses is the full batch's loss: DDP's
    averaged gradients are the single-process gradients of the whole batch."""
    from .harness import LR, WEIGHT_DECAY

    model, spec = build(entry)
    trained = wrap(model) if wrap is not None else model
    params = [p for p in trained.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter of the model requires grad")
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    trained.train()
    torch.manual_seed(TRAIN_SEED)  # every rank and the single process draw the same training noise
    losses = []
    for step in range(STEPS):
        batch = shard(spec.batch_with_labels(batch=GLOBAL_BATCH, seed=BATCH_SEED + step), rank, world_size)
        loss = spec.loss(trained, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    trained.eval()
    return model, trained, losses


def adapter_state(state: dict, entry) -> dict[str, torch.Tensor]:
    """The adapter's tensors in a state dict: the method's prefixed parameters and buffers, modules_to_save copies."""
    return {
        k: v.detach().clone().contiguous()
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and ("." + entry.prefix in k or ".modules_to_save." in k)
    }


# ---------------------------------------------------------------------------------------------------- wrapping
def wrap_ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters=False, torch's and accelerate's default: every trainable parameter must get a gradient in
    # every step on every rank (DDP raises "Expected to have finished reduction in the prior iteration" otherwise)
    return DistributedDataParallel(model, find_unused_parameters=False)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (transformers' `_no_split_modules` classes), outermost first; FSDP2 shards each."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def wrap_fsdp1(model: nn.Module) -> nn.Module:
    """FSDP1 as accelerate's and the Trainer's `fsdp` settings build it: `FullyShardedDataParallel` with
    `use_orig_params=True` (PEFT's frozen and trainable parameters share flat parameters), each decoder layer a unit of
    its own, the root the rest."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = {type(m) for m in decoder_layers(model)}
    return FullyShardedDataParallel(
        model, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy(blocks), device_id=torch.device("cpu")
    )


def fsdp1_full_state_dict(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP1 root, with the unwrapped model's names, on every rank (a
    collective): what accelerate's `get_state_dict` gives under FSDP1's FULL_STATE_DICT."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
        return {k: v.detach().clone() for k, v in wrapped.state_dict().items()}


WRAPS = {"ddp": wrap_ddp, "fsdp": wrap_fsdp, "fsdp1": wrap_fsdp1}


def gathered_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each sharded tensor gathered whole, a collective under FSDP2 (every rank calls it):
    what the test compares. An empty tensor (a zero-size parameter) is rebuilt from its shape, which
    `DTensor.full_tensor()` cannot do in torch 2.13."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = torch.empty(v.shape, dtype=v.dtype) if v.numel() == 0 else v.full_tensor()
        out[k] = v
    return out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a user saves an FSDP2 model from (accelerate's `get_state_dict` does the same): torch's
    `get_model_state_dict(full_state_dict=True)`, a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------------------------- a rank
def _error_record(err: BaseException) -> dict:
    return {
        "status": "error",
        "error_types": [f"{c.__module__}.{c.__qualname__}" for c in type(err).__mro__],
        "message": str(err),
        "traceback": traceback.format_exc(),
    }


class _Stage:
    """The step a rank is at ("train", "gather", "save"): an error record names it."""

    name = "train"


def run_mode(entry, mode: str, out: Path, rank: int, world_size: int, stage: _Stage) -> dict:
    """Train under `mode` and write this rank's files; returns its record. The tensors and the output are written
    before saving, so the test can compare the training even where saving fails."""
    from safetensors.torch import save_file

    from .models import MODELS

    start = time.perf_counter()
    stage.name = "train"
    model, trained, losses = train(entry, world_size, rank, WRAPS[mode])
    stage.name = "gather"
    if mode == "fsdp1":
        full = fsdp1_full_state_dict(trained)
    else:
        full = gathered_tensors(model) if mode == "fsdp" else model.state_dict()
    tensors = adapter_state(full, entry)
    if not tensors:
        raise ValueError(f"no adapter tensors (names containing '.{entry.prefix}') in the trained model's state dict")
    with torch.no_grad():  # every rank runs it (FSDP2 gathers the parameters)
        logits = MODELS[MODEL_KIND].run(trained, MODELS[MODEL_KIND].inputs()).detach().contiguous()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    if rank == 0:
        save_file({"logits": logits}, str(out / "logits.safetensors"))
    (out / f"rank{rank}.losses.json").write_text(json.dumps(losses))
    stage.name = "save"
    state = None  # DDP: the model's own tensors
    if mode == "fsdp":
        state = full_state_dict(model)  # every rank: a collective
    elif mode == "fsdp1":
        state = full  # gathered above
    if rank == 0:
        model.save_pretrained(str(out / "adapter"), state_dict=state)
    return {"status": "ok", "losses": losses, "seconds": time.perf_counter() - start}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry", required=True, help="MODULE:NAME, the MethodEntry (see the module docstring)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, in order: ddp, fsdp, fsdp1")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: {unknown or 'none'}; the modes are {', '.join(MODES)}")

    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    (args.out / "pids").mkdir(parents=True, exist_ok=True)  # the test kills a rank left behind by its id
    (args.out / "pids" / f"{os.getpid()}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        entry = resolve_entry(args.entry)
    except Exception as err:  # the entry does not resolve: the same on every rank
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"setup_rank{rank}.json").write_text(json.dumps({**_error_record(err), "rank": rank}, indent=1))
        return 1
    failed = False
    for mode in modes:
        out = args.out / mode
        out.mkdir(parents=True, exist_ok=True)
        stage = _Stage()
        try:
            record = run_mode(entry, mode, out, rank, world_size, stage)
        except Exception as err:  # recorded for the test, which asserts it or fails with the traceback
            record = {**_error_record(err), "stage": stage.name}
            failed = True
        record.update(rank=rank, world_size=world_size, mode=mode)
        (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
        if failed:
            break  # the ranks may now disagree on what runs next: stop rather than hang (the launcher ends the peer)
        try:
            dist.barrier()  # raises when the peer failed and left
        except Exception:
            failed = True
            break
    if not failed:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
