"""Package layout guarantees: kernels/ is peft_ext.kernels, never a usable top-level `kernels`."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_folder_is_inert_as_a_top_level_module():
    code = (
        "from transformers.utils import is_kernels_available\n"
        "assert not is_kernels_available(), 'the repo folder posed as HF kernels'\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "    raise SystemExit('kernels.get_kernel importable')\n"
        "except ImportError:\n"
        "    pass\n"
        "import peft_ext.kernels\n"
        "print('ok')\n"
    )
    # cwd = repository root puts the folder on sys.path as `kernels`
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_peft_ext_kernels_is_the_repository_folder():
    import peft_ext.kernels

    assert Path(peft_ext.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py" or "site-packages" in peft_ext.kernels.__file__


def test_kernel_tests_do_not_become_a_top_level_kernels_module():
    """pytest's importlib mode names a test package after the first folder up without __init__.py: tests/ has
    one, so tests/kernels imports as tests.kernels, not as `kernels` (Hugging Face's package name)."""
    code = (
        "import sys, pytest\n"
        "pytest.main(['-q', '-n', '0', 'tests/kernels/test_lowrank.py', '-k', 'knobs'])\n"
        "print('KERNELS', getattr(sys.modules.get('kernels'), '__file__', None))\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "3 passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "KERNELS None", result.stdout[-2000:]
