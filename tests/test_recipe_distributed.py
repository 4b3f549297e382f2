"""`peft-ext train RECIPE.yaml` runs unchanged under a multi-process launcher (docs/distributed.md).

Two processes on CPU (gloo) via `python -m torch.distributed.run --nproc_per_node 2 <the peft-ext console script>
train RECIPE.yaml` or `accelerate launch --multi_gpu --num_processes 2 <peft-ext> train RECIPE.yaml`,
per_device_train_batch_size 1, against one process of the same recipe with the same global batch (batch size 2: the
launcher-side sampler hands rank r the r-th sample of each global batch of the same seeded order):

- the launch exits 0 and only the main process saved and printed (one "Saved the trained adapter" line, one adapter);
- the saved adapter loads onto the tiny Llama, and its tensors equal the one-process run's within fp32 tolerance (the
  ranks' gradients are averaged in another order; a run of two independent processes, each on half the batch, would
  not match).

The methods' drivers under DDP, each against its one-process equivalent:
- FineGates' sparsity loss (a function of the replicated gates) is counted once, not once per rank;
- S'MoRE's load-balance loss is per micro-batch by design: 2 ranks x batch 1 equal one process x batch 1 with 2
  accumulation steps (each micro-batch's own balance loss, averaged), not x batch 2;
- COLA merges links and draws the next on every rank alike (the chain crosses two boundaries), and a chain whose link
  rank changes is refused before the first step;
- a run resumed from its step-2 checkpoint under 2 processes logs the same losses and ends with the same adapter as
  the run without the break.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from peft_ext.data.tiny_model import tiny_llama
from peft_ext.recipe import Recipe, run_recipe
from peft_ext.testing.contract.distributed import LaunchTimeout, _free_port, _tail, launch_env, run_launcher

NPROC = 2
LAUNCH_TIMEOUT_S = 120
RTOL, ATOL = 1e-4, 1e-5
TRAINER_ARGS = {
    "max_steps": 3, "learning_rate": 1e-2, "max_length": 64, "seed": 0, "data_seed": 0, "use_cpu": True,
    "ddp_timeout": 60,  # a hung collective ends the ranks after 60 s (the launcher's timeout kills torchrun itself)
}  # fmt: skip
LORA = {"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _recipe(tmp_path: Path, name: str, method: dict, batch_size: int, **trainer_args) -> Path:
    recipe = {
        "model": "tiny-llama", "data": "fictional-facts", "trainer": "sft", "method": method,
        "trainer_args": {**TRAINER_ARGS, "per_device_train_batch_size": batch_size, **trainer_args},
        "output_dir": str(tmp_path / name),
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _peft_ext_command() -> list[str]:
    """The installed console script (what a user runs); `-m peft_ext.cli` where it is not installed next to Python."""
    script = Path(sys.executable).parent / "peft-ext"
    return [str(script)] if script.is_file() else ["-m", "peft_ext.cli"]


def _launcher(kind: str, port: int) -> list[str]:
    if kind == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
        ]  # fmt: skip
    # accelerate's multi-process launcher (torch.distributed.run underneath); on a machine without GPUs the recipe's
    # use_cpu makes the Trainer run MULTI_CPU over gloo. (`--cpu --num_processes 2` would start one process.)
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(NPROC),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip


def _launch(tmp_path: Path, recipe: Path, launcher: str = "torchrun", expect_ok: bool = True) -> str:
    env = launch_env()
    log = tmp_path / f"{recipe.stem}.log"
    for attempt in range(2):  # a port taken between _free_port() and the store's bind: once more on another
        cmd = [*_launcher(launcher, _free_port()), *_peft_ext_command(), "train", str(recipe)]
        try:  # cwd: not the repository root, whose kernels/ folder would shadow HF's `kernels` package
            rc = run_launcher(cmd, log, LAUNCH_TIMEOUT_S, env=env, cwd=str(tmp_path))
        except LaunchTimeout:
            pytest.fail(f"`{' '.join(cmd)}` did not finish in {LAUNCH_TIMEOUT_S} s:\n{_tail(log)}", pytrace=False)
        text = log.read_text(errors="replace")
        if rc != 0 and attempt == 0 and ("EADDRINUSE" in text or "ddress already in use" in text):
            continue
        if expect_ok:
            assert rc == 0, f"`{' '.join(cmd)}` exited {rc}:\n{_tail(log)}"
        else:
            assert rc != 0, f"`{' '.join(cmd)}` succeeded where it should have been refused:\n{_tail(log)}"
        return text
    raise AssertionError("unreachable")


def _one_process(tmp_path: Path, name: str, method: dict, batch_size: int, **trainer_args):
    trainer = run_recipe(Recipe.from_yaml(str(_recipe(tmp_path, name, method, batch_size, **trainer_args))))
    return trainer, load_file(str(tmp_path / name / "adapter_model.safetensors"))


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want) and len(want) > 0, sorted(set(got) ^ set(want))[:5]
    far = [
        f"{name}: max abs diff {(got[name] - tensor).abs().max().item():.3g}"
        for name, tensor in want.items()
        if not torch.allclose(got[name], tensor, rtol=RTOL, atol=ATOL)
    ]
    assert not far, f"{what} (rtol {RTOL}, atol {ATOL}):\n" + "\n".join(far[:10])


def _two_processes(tmp_path: Path, name: str, method: dict, launcher: str = "torchrun", **trainer_args) -> dict:
    log = _launch(tmp_path, _recipe(tmp_path, name, method, 1, **trainer_args), launcher)
    assert log.count("Saved the trained adapter") == 1, f"not exactly one process saved and printed:\n{_tail(log)}"
    out = tmp_path / name
    assert ADAPTER_FILES <= {p.name for p in out.iterdir()}, sorted(p.name for p in out.iterdir())
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_peft_ext_train_under_a_launcher_two_processes_equals_one(tmp_path, launcher):
    start = time.perf_counter()
    got = _two_processes(tmp_path, "ddp", LORA, launcher)
    launch_s = time.perf_counter() - start
    reloaded = PeftModel.from_pretrained(tiny_llama()[0], tmp_path / "ddp")
    assert reloaded.peft_config["default"].peft_type == "LORA"

    one, want = _one_process(tmp_path, "one", LORA, batch_size=2)
    assert one.state.global_step == TRAINER_ARGS["max_steps"]
    lora_b = [n for n in want if "lora_B" in n]
    assert lora_b and all(want[n].abs().max() > 0 for n in lora_b), "training moved no lora_B (initialised at 0)"
    _assert_close(got, want, f"{launcher}: 2 processes x batch 1 vs 1 process x batch 2 (launch {launch_s:.0f} s)")
    # the reloaded adapter is the saved one, applied
    state = reloaded.state_dict()
    for name, tensor in got.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(state[key], tensor), name


def test_finegates_sparsity_loss_is_counted_once_across_ranks(tmp_path):
    """The sparsity loss depends on the gates only (the same on every rank); DDP averages the ranks' gradients, so
    it must enter each rank's loss once: the same as one process on the whole batch. A rank-count multiple (the
    Trainer scales its token-averaged loss by the number of processes) would move the gates differently."""
    method = {
        "peft_type": "FINEGATES", "target_modules": ["q_proj", "v_proj", "down_proj"], "sparsity_lambda": 5.0,
        "target_sparsity": 0.5, "gates_learning_rate": 0.1, "seed": 0,
    }  # fmt: skip
    got = _two_processes(tmp_path, "ddp", method)
    _, want = _one_process(tmp_path, "one", method, batch_size=2)
    _, no_sparsity = _one_process(tmp_path, "free", {**method, "sparsity_lambda": 0.0}, batch_size=2)
    gates = [n for n in want if "gates_" in n]
    assert gates and any(not torch.allclose(want[n], no_sparsity[n], rtol=RTOL, atol=ATOL) for n in gates), (
        "the sparsity loss moved no gate: this test would not see it counted twice"
    )
    _assert_close(got, want, "FineGates: 2 processes x batch 1 vs 1 process x batch 2")


def test_smore_balance_loss_is_per_micro_batch_across_ranks(tmp_path):
    """Each rank's S'MoRE balance loss is over its own micro-batch (as with gradient accumulation), and the ranks'
    gradients are averaged: 2 ranks x batch 1 equal one process x batch 1 with 2 accumulation steps."""
    method = {
        "peft_type": "SMORE", "target_modules": ["gate_proj", "down_proj"], "num_experts": [2, 2],
        "num_active": [1, 1], "expert_ranks": [2, 2], "router_dim": 8, "router_down_dim": 8,
        "balance_loss_weight": 1.0, "seed": 0,
    }  # fmt: skip
    got = _two_processes(tmp_path, "ddp", method)
    _, want = _one_process(tmp_path, "one", method, batch_size=1, gradient_accumulation_steps=2)
    _, doubled = _one_process(
        tmp_path, "doubled", {**method, "balance_loss_weight": 2.0}, batch_size=1, gradient_accumulation_steps=2
    )
    assert any(not torch.allclose(want[n], doubled[n], rtol=RTOL, atol=ATOL) for n in want), (
        "the balance loss moves nothing beyond the tolerance: this test would not see it counted twice"
    )
    _assert_close(got, want, "S'MoRE: 2 processes x batch 1 vs 1 process x batch 1 x 2 accumulation steps")


COLA = {"peft_type": "COLA", "r": 4, "target_modules": ["q_proj", "v_proj"], "chain_length": 3, "seed": 0}


def test_cola_chain_crosses_link_boundaries_alike_on_every_rank(tmp_path):
    """max_steps 4, three links: merges after steps 1 and 3 (round(k*4/3)); every rank merges the same link, draws
    the same next one and resets its optimizer state, so the run equals one process on the whole batch."""
    got = _two_processes(tmp_path, "ddp", COLA, max_steps=4)
    _, want = _one_process(tmp_path, "one", COLA, batch_size=2, max_steps=4)
    config = json.loads((tmp_path / "ddp" / "adapter_config.json").read_text())
    assert config["current_link"] == 2 and config["link_boundaries"] == [1, 3], config
    _assert_close(got, want, "COLA: 2 processes x batch 1 vs 1 process x batch 2, across two link boundaries")


def test_cola_rank_change_under_two_processes_is_refused_before_training(tmp_path):
    method = {**COLA, "link_ranks": [4, 2, 2]}
    log = _launch(tmp_path, _recipe(tmp_path, "ddp", method, 1, max_steps=4), expect_ok=False)
    assert "link 2 of the chain (counted from 1) has rank 2 where link 1 has rank 4" in log and "DDP sizes its gradient buckets once" in log, _tail(log)
    assert "'loss'" not in log, "the refusal came after training had started"
    assert not (tmp_path / "ddp" / "adapter_model.safetensors").exists()


def test_resume_under_two_processes_gives_the_same_loss_curve(tmp_path):
    """A run of 4 steps with checkpoints every 2, and a run resumed from the step-2 checkpoint of a copy: the same
    logged losses at steps 3 and 4 and the same final adapter (torchrun, 2 processes)."""
    args = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1}
    _two_processes(tmp_path, "full", LORA, **args)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", broken / "checkpoint-2")
    recipe = _recipe(tmp_path, "broken", LORA, 1, **args)
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "resume_from_checkpoint": True}))  # the latest checkpoint in output_dir
    log = _launch(tmp_path, recipe)
    logged = [line for line in log.splitlines() if "'loss'" in line]
    assert len(logged) == 2, f"the resumed run logged {len(logged)} steps, not steps 3 and 4 only:\n{_tail(log)}"

    def losses(run: str) -> dict:
        state = json.loads((tmp_path / run / "checkpoint-4" / "trainer_state.json").read_text())
        return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}

    full, resumed = losses("full"), losses("broken")
    assert sorted(full) == [1, 2, 3, 4] and {3, 4} <= set(resumed), (full, resumed)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, full, resumed)
    _assert_close(
        load_file(str(tmp_path / "broken" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "full" / "adapter_model.safetensors")),
        "resumed from checkpoint-2 vs without the break",
    )


def test_use_cpu_false_under_two_processes_is_refused_before_training(tmp_path):
    """On a machine without GPUs `use_cpu: false` hides the process group from the Trainer: each rank would train
    alone on its own data and both would write output_dir. run_recipe refuses it before training."""
    log = _launch(tmp_path, _recipe(tmp_path, "alone", LORA, 1, use_cpu=False), expect_ok=False)
    assert "launched as 2 processes, but the trainer sees one" in log and "use_cpu" in log, _tail(log)
    assert "'loss'" not in log and not (tmp_path / "alone" / "adapter_model.safetensors").exists()
