"""What a fresh machine installs: the sdist, a wheel built FROM that sdist, and what the wheel holds.

The sdist is built from a copy of the source tree as a fresh clone has it (git's tracked and untracked-but-not-
ignored files), so build/ and a stale *.egg-info/SOURCES.txt left in the repository (which setuptools merges into
the sdist) can neither hide a missing MANIFEST.in entry nor race with tests/hft/test_autoload.py's in-tree build.
No network: the wheel is built with --no-build-isolation and --no-deps, with the setuptools of the test extra.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder in the repository -> import package it becomes (pyproject.toml's package-dir)
PACKAGE_ROOTS = {"peft_ext": "peft_ext", "kernels": "peft_ext.kernels"}
IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.py[cod]", "*.egg-info", "build", "dist", ".venv", "tests")


def _run(args, cwd, timeout=300):
    # -P: the build runs with the source root as cwd, where the folder kernels/ would otherwise be importable as
    # `kernels` and break setuptools' egg_info, which loads Hugging Face kernels' `egg_info.writers` entry point.
    result = subprocess.run(
        [sys.executable, "-P", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": "", "PIP_NO_INDEX": "1"},
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _copy_source_tree(dest: Path):
    """The files a fresh clone would have (tests/ aside), or, outside a git checkout, the tree less build outputs."""
    listed = None
    if (REPO / ".git").exists() and shutil.which("git"):
        result = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, timeout=60,
        )
        if result.returncode == 0:
            listed = [p for p in result.stdout.decode().split("\0") if p and not p.startswith("tests/")]
    if listed is None:
        shutil.copytree(REPO, dest, ignore=IGNORED)
        return
    for rel in listed:
        src = REPO / rel
        if src.is_file():  # a deleted-but-still-tracked file is listed too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _build(root: Path) -> dict:
    source = root / "source"
    _copy_source_tree(source)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(root / 'sdist')!r}))"
    name = _run(["-c", code], cwd=source).stdout.strip().splitlines()[-1]
    sdist = root / "sdist" / name
    with tarfile.open(sdist) as tf:
        sdist_names = tf.getnames()
        tf.extractall(root / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (root / "unpacked").iterdir()
    _run(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(root / "dist"),
          str(unpacked)], cwd=root)
    (wheel,) = (root / "dist").glob("peft_ext-*.whl")
    site = root / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    return {"sdist": sdist, "sdist_names": sdist_names, "wheel": wheel, "names": set(names), "site": site}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Built once per session: under xdist the workers share one build through a lock in the session's temp root."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _build(tmp_path_factory.mktemp("packaging"))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "packaging-build"  # this session's, shared by its workers
    with FileLock(str(root) + ".lock"):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _build(root)
            (root / "done").touch()
    wheel = next((root / "dist").glob("peft_ext-*.whl"))
    sdist = next((root / "sdist").glob("peft_ext-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        sdist_names = tf.getnames()
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    return {"sdist": sdist, "sdist_names": sdist_names, "wheel": wheel, "names": names, "site": root / "site"}


def test_the_sdist_holds_what_the_wheel_is_built_from(built):
    prefix = built["sdist_names"][0].split("/")[0]
    inside = {n.removeprefix(prefix + "/") for n in built["sdist_names"]}
    for needed in ("peft_ext_autoload.pth", "_peft_ext_autoload.py", "setup.py", "pyproject.toml", "MANIFEST.in",
                   "README.md", "kernels/__init__.py", "peft_ext/__init__.py"):
        assert needed in inside, f"{needed} missing from the sdist {built['sdist'].name}"


def test_the_wheel_built_from_the_sdist_ships_the_hook_and_the_kernels(built):
    names = built["names"]
    assert "peft_ext_autoload.pth" in names and "_peft_ext_autoload.py" in names
    assert (built["site"] / "peft_ext_autoload.pth").read_bytes() == (REPO / "peft_ext_autoload.pth").read_bytes()
    assert "peft_ext/kernels/__init__.py" in names
    assert not [n for n in names if n.split("/")[0] == "kernels"], "a top-level `kernels` package in the wheel"
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    top_level = {n.split("/")[0] for n in names} - {dist_info}
    assert top_level == {"peft_ext", "_peft_ext_autoload.py", "peft_ext_autoload.pth"}, top_level


def test_every_source_folder_is_a_package_that_reaches_the_wheel(built):
    """A folder with .py files but no __init__.py is silently left out by setuptools: none may exist, and each
    folder's every module must be in the wheel under its import name."""
    checked = 0
    for folder, package in PACKAGE_ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(REPO / folder):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            modules = sorted(f for f in filenames if f.endswith(".py"))
            if not modules:
                continue
            rel = Path(dirpath).relative_to(REPO / folder)
            assert "__init__.py" in modules, f"{folder}/{rel.as_posix()} has .py files but no __init__.py"
            in_wheel = Path(*package.split("."), rel)
            missing = [m for m in modules if (in_wheel / m).as_posix() not in built["names"]]
            assert not missing, f"{folder}/{rel.as_posix()}: {missing} not in the wheel (as {in_wheel.as_posix()}/)"
            checked += 1
    assert checked >= 2


def test_the_unpacked_wheel_imports_from_a_site_dir_outside_the_repository(built, tmp_path):
    site = built["site"]
    code = textwrap.dedent(
        f"""
        import site, sys
        site.addsitedir({str(site)!r})
        import peft_ext
        from peft_ext.kernels import lowrank_linear
        import peft_ext.kernels
        print(peft_ext.__file__)
        print(peft_ext.kernels.__file__)
        print(callable(lowrank_linear), hasattr(peft_ext, "HftConfig"))
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # (_peft_ext_autoload itself may come from the running environment's install: its .pth ran at start-up)
    *files, flags = result.stdout.strip().splitlines()[-3:]
    for file in files:
        assert Path(file).resolve().is_relative_to(site.resolve()), f"{file} imported from outside the wheel"
    assert flags == "True True"
