"""Shared fixtures: deterministic seeds, the machine's two cores, no network; the contract suite's plugin."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist runs one worker per core (-n 2 in pyproject.toml): more OpenMP threads than cores makes some ops
# orders of magnitude slower on the 2-core CI machine, so each worker computes on one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# the contract suite (peft_ext.testing): parametrises tests/contract/test_contract_*.py over tests/contract/methods.py,
# and gives every test the `tmp_adapter_dir` fixture (a fresh folder for save_pretrained)
pytest_plugins = ["peft_ext.testing.plugin"]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny tensors, where more OpenMP threads only wait on each other on the
    shared 2-core machine (already the case under pytest-xdist; this covers `-n 0` runs). Modules ask for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group in this process for the test (FSDP wraps on it exactly as with more ranks),
    destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (models seed themselves as well)."""
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests are skipped (and reported as such) where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
