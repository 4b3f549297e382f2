"""`peft-ext train RECIPE.yaml` runs unchanged under a multi-process launcher (docs/distributed.md).

Two processes on CPU (gloo) via `python -m torch.distributed.run --nproc_per_node 2 <the peft-ext console script>
train RECIPE.yaml`, per_device_train_batch_size 1, against one process of the same recipe with batch size 2 (the same
global batch: the launcher-side sampler hands rank r the r-th sample of each global batch of the same seeded order):

- the launch exits 0 and only the main process saved and printed (one "Saved the trained adapter" line, one adapter);
- the saved adapter loads onto the tiny Llama, and its tensors equal the one-process run's within fp32 tolerance (the
  ranks' gradients are averaged in another order; a run of two independent processes, each on half the batch, would
  not match).
"""

import os
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
from peft_ext.testing.contract.distributed import _DROPPED_ENV, LaunchTimeout, _free_port, _tail, run_launcher

NPROC = 2
LAUNCH_TIMEOUT_S = 120
RTOL, ATOL = 1e-4, 1e-5
TRAINER_ARGS = {
    "max_steps": 3, "learning_rate": 1e-2, "max_length": 64, "seed": 0, "data_seed": 0, "use_cpu": True,
    "ddp_timeout": 60,  # a hung collective ends the ranks after 60 s (the launcher's timeout kills torchrun itself)
}  # fmt: skip
METHOD = {"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _recipe(tmp_path: Path, name: str, batch_size: int) -> Path:
    recipe = {
        "model": "tiny-llama", "data": "fictional-facts", "trainer": "sft", "method": METHOD,
        "trainer_args": {**TRAINER_ARGS, "per_device_train_batch_size": batch_size},
        "output_dir": str(tmp_path / name),
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _peft_ext_command() -> list[str]:
    """The installed console script (what a user runs); `-m peft_ext.cli` where it is not installed next to Python."""
    script = Path(sys.executable).parent / "peft-ext"
    return [str(script)] if script.is_file() else ["-m", "peft_ext.cli"]


def _launch(tmp_path: Path, recipe: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "launch.log"
    for attempt in range(2):  # a port taken between _free_port() and the store's bind: once more on another
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            *_peft_ext_command(), "train", str(recipe),
        ]  # fmt: skip
        try:  # cwd: not the repository root, whose kernels/ folder would shadow HF's `kernels` package
            rc = run_launcher(cmd, log, LAUNCH_TIMEOUT_S, env=env, cwd=str(tmp_path))
        except LaunchTimeout:
            pytest.fail(f"`{' '.join(cmd)}` did not finish in {LAUNCH_TIMEOUT_S} s:\n{_tail(log)}", pytrace=False)
        text = log.read_text(errors="replace")
        if rc != 0 and attempt == 0 and ("EADDRINUSE" in text or "ddress already in use" in text):
            continue
        assert rc == 0, f"`{' '.join(cmd)}` exited {rc}:\n{_tail(log)}"
        return text
    raise AssertionError("unreachable")


def test_peft_ext_train_under_torchrun_two_processes_equals_one(tmp_path):
    start = time.perf_counter()
    log = _launch(tmp_path, _recipe(tmp_path, "ddp", batch_size=1))
    launch_s = time.perf_counter() - start

    ddp = tmp_path / "ddp"
    assert log.count("Saved the trained adapter") == 1, f"not exactly one process saved and printed:\n{_tail(log)}"
    assert ADAPTER_FILES <= {p.name for p in ddp.iterdir()}, sorted(p.name for p in ddp.iterdir())
    reloaded = PeftModel.from_pretrained(tiny_llama()[0], ddp)
    assert reloaded.peft_config["default"].peft_type == "LORA"

    one = run_recipe(Recipe.from_yaml(str(_recipe(tmp_path, "one", batch_size=2))))
    assert one.state.global_step == TRAINER_ARGS["max_steps"]
    got = load_file(str(ddp / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want) and len(want) > 0
    lora_b = [n for n in want if "lora_B" in n]
    assert lora_b and all(want[n].abs().max() > 0 for n in lora_b), "training moved no lora_B (initialised at 0)"
    far = []
    for name, tensor in want.items():
        if not torch.allclose(got[name], tensor, rtol=RTOL, atol=ATOL):
            far.append(f"{name}: max abs diff {(got[name] - tensor).abs().max().item():.3g}")
    assert not far, (
        f"2 processes x batch 1 differ from 1 process x batch 2 after {TRAINER_ARGS['max_steps']} steps (rtol {RTOL}, "
        f"atol {ATOL}; launch {launch_s:.0f} s):\n" + "\n".join(far[:10])
    )
    # the reloaded adapter is the saved one, applied
    state = reloaded.state_dict()
    for name, tensor in got.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(state[key], tensor), name
