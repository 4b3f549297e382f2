"""Package layout guarantees: kernels/ is peft_ext.kernels, and never stands in for Hugging Face's top-level `kernels`
(which transformers and bitsandbytes use), whether that package is installed or not."""

import importlib.metadata
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUR_INIT = REPO / "kernels" / "__init__.py"


def _hf_kernels_init():
    """Hugging Face's kernels/__init__.py where that distribution is installed, else None."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


def _run_in_repo_root(code, *python_args, timeout=180):
    """A fresh interpreter in the repository root: `-c` puts the working directory on sys.path, where kernels/
    is found as a top-level `kernels` before site-packages."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # bitsandbytes asks the Hub for a CPU kernel when it is imported
    return subprocess.run(
        [sys.executable, *python_args, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


# Shared by both directions: where peft_ext.kernels must come from (the folder, or a wheel's peft_ext/kernels).
_CHECK_PEFT_EXT_KERNELS = """
import peft_ext.kernels
from peft_ext.kernels import delta_linear, lowrank_linear, reference_lowrank_linear
ours = Path(peft_ext.kernels.__file__).resolve()
assert ours == OURS or ours.parts[-3:] == ("peft_ext", "kernels", "__init__.py"), ours
assert peft_ext.kernels.__name__ == "peft_ext.kernels" and sys.modules["kernels"] is not peft_ext.kernels
"""


def test_top_level_kernels_is_hugging_faces_package_where_installed():
    hf_init = _hf_kernels_init()
    if hf_init is None:
        pytest.skip("Hugging Face's kernels package is not installed")
    code = f"""
import importlib, importlib.util, sys
from pathlib import Path
OURS, HF = Path({str(OUR_INIT)!r}), Path({str(hf_init)!r})
spec = importlib.util.find_spec("kernels")  # as transformers' _is_package_available does, then imports
assert Path(spec.origin).resolve() == OURS, ("the folder no longer shadows anything: test moot", spec.origin)
import kernels
assert Path(kernels.__file__).resolve() == HF, kernels.__file__
assert sys.modules["kernels"] is kernels and kernels.__version__ == importlib.metadata.version("kernels")
from kernels import CUDAProperties, get_kernel
import kernels._internals.layer
for name, module in list(sys.modules.items()):  # its submodules come from its own folder
    if name == "kernels" or name.startswith("kernels."):
        assert Path(module.__file__).resolve().is_relative_to(HF.parent), (name, module.__file__)
import kernels as again
assert again is kernels and importlib.import_module("kernels") is kernels
by_hand = importlib.util.module_from_spec(spec)  # the folder's spec run by hand: a copy, no second load
spec.loader.exec_module(by_hand)
assert sys.modules["kernels"] is kernels and by_hand.get_kernel is get_kernel
from transformers.utils import is_kernels_available
assert is_kernels_available()
import transformers.integrations.hub_kernels
{_CHECK_PEFT_EXT_KERNELS}
import bitsandbytes  # probes kernels.get_kernel
assert sys.modules["kernels"] is kernels
del sys.modules["kernels"]
import kernels as fresh
assert fresh is not kernels and Path(fresh.__file__).resolve() == HF, fresh.__file__
print("ok")
"""
    result = _run_in_repo_root(code)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == ["ok"], result.stderr[-3000:]


def _site_dirs_without_hf_kernels(farm_root):
    """This interpreter's site-packages folders rebuilt as folders of symlinks to every entry except `kernels` and
    its `kernels-*.dist-info` (the shared environment cannot lose the package): Hugging Face's kernels hidden."""
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    seen, farms = set(), []
    for site_dir in map(Path, site_dirs):
        if str(site_dir) not in sys.path or not site_dir.is_dir() or site_dir.resolve() in seen:
            continue
        seen.add(site_dir.resolve())
        farm = farm_root / f"site{len(farms)}"
        farm.mkdir()
        for entry in site_dir.iterdir():
            hf_kernels = entry.name in ("kernels", "kernels.py") or (
                entry.name.startswith("kernels-") and entry.name.endswith(".dist-info")
            )
            if not hf_kernels:
                (farm / entry.name).symlink_to(entry)
        farms.append(str(farm))
    assert farms, sys.path
    return farms


def test_top_level_kernels_stays_inert_without_hugging_faces_package(tmp_path):
    farms = _site_dirs_without_hf_kernels(tmp_path)
    code = f"""
import site
for farm in {farms!r}:
    site.addsitedir(farm)  # runs the .pth files too: the editable install's finder for peft_ext
import importlib, importlib.metadata, importlib.util, sys
from pathlib import Path
OURS = Path({str(OUR_INIT)!r})
try:
    importlib.metadata.distribution("kernels")
    raise SystemExit("Hugging Face's kernels is still visible: test moot")
except importlib.metadata.PackageNotFoundError:
    pass
assert Path(importlib.util.find_spec("kernels").origin).resolve() == OURS  # the folder is all there is
from transformers.utils import is_kernels_available
assert not is_kernels_available(), "the repo folder posed as HF kernels"
import transformers.integrations.hub_kernels
try:
    from kernels import get_kernel
    raise SystemExit("kernels.get_kernel importable")
except ImportError:
    pass
import kernels
assert kernels.__file__ is None and list(kernels.__path__) == [], (kernels.__file__, kernels.__path__)
try:
    import kernels.lowrank
    raise SystemExit("kernels.lowrank importable")
except ImportError:
    pass
import kernels as again
assert again is kernels
{_CHECK_PEFT_EXT_KERNELS}
import bitsandbytes  # probes kernels.get_kernel, and copes with the ImportError
print("ok")
"""
    # -S: no site-packages but the farms; -c: the repository root on sys.path
    result = _run_in_repo_root(code, "-S")
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == ["ok"], result.stderr[-3000:]


def test_peft_ext_kernels_is_the_repository_folder():
    import peft_ext.kernels

    assert Path(peft_ext.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py" or "site-packages" in peft_ext.kernels.__file__


@pytest.mark.parametrize("python_args", [["-P"], []], ids=["cwd-not-on-path", "cwd-on-path"])
def test_kernel_tests_do_not_become_a_top_level_kernels_module(python_args):
    """pytest's importlib mode names a test package after the first folder up without __init__.py: tests/ has
    one, so tests/kernels imports as tests.kernels, not as `kernels` (Hugging Face's package name). With the
    repository root on sys.path, the only `kernels` anything may import is Hugging Face's (bitsandbytes probes it)."""
    code = (
        "import sys, pytest\n"
        "pytest.main(['-q', '-n', '0', 'tests/kernels/test_lowrank.py', '-k', 'knobs'])\n"
        "print('KERNELS', getattr(sys.modules.get('kernels'), '__file__', None))\n"
    )
    result = _run_in_repo_root(code, *python_args, timeout=300)
    assert "3 passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("KERNELS "), result.stdout[-2000:]
    kernels_file = last.removeprefix("KERNELS ")
    assert kernels_file == "None" or Path(kernels_file).resolve() == _hf_kernels_init(), result.stdout[-2000:]


def test_peft_ext_imports_from_the_repository_root_without_an_editable_install(tmp_path):
    """A Python started in a checkout's root imports the checkout's peft_ext/ (the working directory comes first on
    sys.path) even when the installed peft-ext is a wheel; peft_ext.kernels (kernels/ beside it) must be found
    then too. Simulated with this environment's site-packages minus the editable install of peft-ext."""
    farm = tmp_path / "site"
    farm.mkdir()
    for site_dir in map(Path, site.getsitepackages()):
        if not site_dir.is_dir():
            continue
        for entry in site_dir.iterdir():
            editable = "peft_ext" in entry.name.lower() or "peft-ext" in entry.name.lower()
            if not editable and not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    code = f"""
import site
site.addsitedir({str(farm)!r})
import importlib.util, sys
from pathlib import Path
import peft_ext
from peft_ext.kernels import lowrank_linear, delta_linear
assert Path(peft_ext.__file__).resolve().parent == Path({str(REPO)!r}) / "peft_ext", peft_ext.__file__
assert Path(sys.modules["peft_ext.kernels"].__file__).resolve() == Path({str(OUR_INIT)!r})
import peft_ext.kernels.delta_format
print("ok", sorted(peft_ext.registered_methods()))
"""
    result = _run_in_repo_root(code, "-S")
    # every method folder's registered name (each __init__ calls register_method("NAME", ...))
    names = sorted(
        re.search(r'register_method\(\s*"(\w+)"', init.read_text())[1] for init in (REPO / "peft_ext" / "tuners").glob("*/__init__.py")
    )
    assert names and result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [f"ok {names}"], (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
