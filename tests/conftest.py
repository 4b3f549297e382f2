"""Shared fixtures: deterministic seeds, the machine's two cores, no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (models seed themselves as well)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_adapter_dir(tmp_path):
    """A fresh folder for save_pretrained."""
    path = tmp_path / "adapter"
    path.mkdir()
    return path
