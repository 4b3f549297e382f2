"""The start-up hook (`peft_ext_autoload.pth` -> `_peft_ext_autoload`): plain PEFT / transformers code loads
peft-ext adapters without `import peft_ext`, whatever imported or looked up peft first.

Two kinds of tests:

- in-process tests of the finder on two throw-away packages (a "target" standing for peft and a "follower"
  standing for peft_ext), milliseconds each: lookups do not disarm it, re-entrancy, failures, clean-up;
- fresh-process tests of the installed hook on a real HFT adapter, one process per import order (the orders a
  user meets: nothing, `importlib.util.find_spec("peft")`, transformers' `is_peft_available()`, `import trl`,
  `from transformers import Trainer`, `import accelerate`, `import peft_ext`), each running the four loaders
  (`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM.from_pretrained`, transformers' `load_adapter` and
  `AutoModelForCausalLM.from_pretrained(adapter_dir)`), offline, on a tiny Llama saved to a local folder.
  Importing peft alone takes ~4-5 s here (a child ~7 s on an idle 2-core machine), so a process per
  (order, loader) pair would cost ~3 CPU-minutes; instead the loader that runs first rotates with the order, so
  each order is met where peft is first imported after it and each loader where it is the one importing peft
  (the child reports which step imported peft first, and the test asserts it).

Each loader's logits must equal, bit for bit, those of the in-memory model computed in the test process. The
child sets the test process's torch thread count: pytest-xdist workers compute on one thread (tests/conftest.py)
while a fresh process takes every core, and a kernel may split its reductions by thread count. (On the 2-core
machine where this was written, 1 to 16 threads and HF `kernels` present or absent all gave identical logits for
this model, so the original test passed there; the same thread count removes that cause wherever it differs.)

Fresh processes run with cwd = a temp dir: at the repository root, the folder kernels/ would shadow Hugging Face's
`kernels` package that transformers imports.
"""

import copy
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

import _peft_ext_autoload as autoload

REPO = Path(__file__).resolve().parents[1]
LOADERS = ["PeftModel", "AutoPeft", "load_adapter", "AutoModel"]


# ------------------------------------------------------------------------------------------ in-process: the finder
@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Two fresh packages on sys.path: `target` (stands for peft) and `follower` (for peft_ext; it records that the
    target had finished executing when it ran). Removed from sys.modules / sys.meta_path afterwards."""
    tag = uuid.uuid4().hex[:8]
    names = {"target": f"autoload_target_{tag}", "follower": f"autoload_follower_{tag}"}
    (tmp_path / names["target"]).mkdir()
    (tmp_path / names["target"] / "__init__.py").write_text("EXECUTED = True\n")
    (tmp_path / names["follower"]).mkdir()
    (tmp_path / names["follower"] / "__init__.py").write_text(
        f"import {names['target']} as target\nTARGET_WAS_EXECUTED = target.EXECUTED\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    meta_path = list(sys.meta_path)
    yield {**names, "dir": tmp_path}
    sys.meta_path[:] = meta_path
    for name in list(sys.modules):
        if name.split(".")[0] in names.values():
            del sys.modules[name]


def _install(packages):
    finder = autoload._ImportAfter(packages["target"], packages["follower"])
    sys.meta_path.insert(0, finder)
    return finder


def test_lookups_do_not_disarm_the_finder_and_the_import_runs_the_follower(packages):
    target, follower = packages["target"], packages["follower"]
    finder = _install(packages)
    for _ in range(3):  # what is_peft_available(), trl and accelerate do before anything imports peft
        spec = importlib.util.find_spec(target)
        assert spec is not None and spec.origin.endswith("__init__.py")
    assert finder in sys.meta_path and follower not in sys.modules

    module = importlib.import_module(target)

    assert sys.modules[follower].TARGET_WAS_EXECUTED  # the follower ran after the target's __init__ finished
    assert finder not in sys.meta_path  # one import, then gone
    # the module keeps its real loader (the wrapper lived on the handed-out spec only)
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    assert module.__spec__.loader is module.__loader__
    assert "exec_module" not in vars(module.__loader__)


def test_a_spec_found_but_never_executed_changes_nothing(packages):
    finder = _install(packages)
    spec = importlib.util.find_spec(packages["target"])
    assert isinstance(spec.loader, autoload._ExecThenImport)
    assert spec.loader.get_filename(packages["target"]) == spec.origin  # the real loader's methods pass through
    assert copy.copy(spec).loader.loader is spec.loader.loader  # copies (and pickling) do not recurse
    # a module made by hand from the spec is no import: the finder waits for the real one
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EXECUTED and finder in sys.meta_path and packages["follower"] not in sys.modules
    importlib.import_module(packages["target"])
    assert packages["follower"] in sys.modules and finder not in sys.meta_path


def test_a_follower_that_fails_warns_and_the_target_still_imports(packages):
    (packages["dir"] / packages["follower"] / "__init__.py").write_text("raise RuntimeError('broken follower')\n")
    finder = _install(packages)
    with pytest.warns(RuntimeWarning, match="could not be imported after.*broken follower"):
        module = importlib.import_module(packages["target"])
    assert module.EXECUTED and finder not in sys.meta_path and packages["follower"] not in sys.modules


def test_a_target_that_fails_to_execute_keeps_the_finder_for_the_next_try(packages):
    init = packages["dir"] / packages["target"] / "__init__.py"
    init.write_text("raise ValueError('half installed')\n")
    finder = _install(packages)
    with pytest.raises(ValueError, match="half installed"):
        importlib.import_module(packages["target"])
    assert finder in sys.meta_path and packages["follower"] not in sys.modules
    init.write_text("EXECUTED = True\n")
    importlib.invalidate_caches()
    sys.path_importer_cache.clear()  # the source changed within the same second: let the finders look again
    importlib.import_module(packages["target"])
    assert sys.modules[packages["follower"]].TARGET_WAS_EXECUTED and finder not in sys.meta_path


def test_the_finder_is_reentrancy_safe(packages):
    """Another finder behind ours that asks the whole meta path again (importlib.util.find_spec) while it is asked."""
    target = packages["target"]
    asked = []

    class Delegating:
        busy = False

        def find_spec(self, fullname, path=None, target_module=None):
            if fullname != target or self.busy:
                return None
            self.busy = True
            try:
                asked.append(fullname)
                return importlib.util.find_spec(fullname)  # comes back to our finder first
            finally:
                self.busy = False

    finder = _install(packages)
    sys.meta_path.insert(1, Delegating())
    spec = importlib.util.find_spec(target)
    assert isinstance(spec.loader, autoload._ExecThenImport)
    assert not isinstance(spec.loader.loader, autoload._ExecThenImport)  # wrapped once, not once per level
    module = importlib.import_module(target)
    assert asked and packages["follower"] in sys.modules and finder not in sys.meta_path
    assert type(module.__loader__).__name__ == "SourceFileLoader"


def test_install_is_idempotent_and_honours_the_switch(monkeypatch):
    saved = list(sys.meta_path)
    try:
        monkeypatch.setenv(autoload.ENV, "1")
        assert autoload.install("autoload_never_imported") is None
        monkeypatch.setenv(autoload.ENV, "0")
        first = autoload.install("autoload_never_imported")
        assert first is sys.meta_path[0] and autoload.install("autoload_never_imported") is first
        assert sum(f is first for f in sys.meta_path) == 1
        assert autoload.install("os") is None  # already imported: nothing to wait for
    finally:
        sys.meta_path[:] = saved
    for value, off in [("1", True), ("true", True), (" YES ", True), ("on", True), ("0", False), ("", False)]:
        assert autoload.disabled({autoload.ENV: value}) is off


# ------------------------------------------------------------------------------------------ fresh processes
# The child: args (JSON) name the import order, the loaders in the order they run, and the files. It reports as
# JSON which step first imported peft, whether the hook imported peft_ext, and each loader's result.
CHILD = textwrap.dedent(
    """
    import json, sys, time, traceback
    args = json.loads(sys.argv[1])
    exec(args.get("setup", ""))
    t0 = time.perf_counter()
    assert "peft" not in sys.modules and "peft_ext" not in sys.modules, "imported at start-up"
    hook = sys.modules.get("_peft_ext_autoload")
    # two finders: peft (then peft_ext) and transformers.integrations.peft (its load_adapter is routed through
    # peft_ext's converting loader as soon as it exists: the first load_adapter call is what imports peft)
    finders = [f for f in sys.meta_path if getattr(f, "_peft_ext_autoload", False) and getattr(f, "target", None) == "peft"]
    report = {"hook_module": getattr(hook, "__file__", None), "finders_at_startup": len(finders), "steps": []}

    def step(name):
        report["steps"].append([name, "peft" in sys.modules, "peft_ext" in sys.modules,
                                round(time.perf_counter() - t0, 2)])

    import torch
    torch.set_num_threads(args["threads"])  # the test process's: bit-identical logits need the same reductions
    step("torch")
    order = args["order"]
    if order == "find_spec":
        import importlib.util
        assert importlib.util.find_spec("peft") is not None
    elif order == "is_peft_available":
        import transformers.utils
        assert transformers.utils.is_peft_available()
    elif order == "trl":
        import trl
    elif order == "Trainer":
        from transformers import Trainer
    elif order == "accelerate":
        import accelerate
    elif order == "peft_ext":
        import peft_ext
    else:
        assert order == "nothing", order
    step(order)
    report["lookups_before_import"] = getattr(finders[0], "asked", None) if finders else None
    x, expected = torch.load(args["x"]), torch.load(args["expected"])
    report["results"] = {}
    for loader in args["loaders"]:
        try:
            if loader == "PeftModel":
                from transformers import AutoModelForCausalLM
                base = AutoModelForCausalLM.from_pretrained(args["base"])
                step("PeftModel: base loaded")
                from peft import PeftModel
                model = PeftModel.from_pretrained(base, args["adapter"])
            elif loader == "AutoPeft":
                from peft import AutoPeftModelForCausalLM
                model = AutoPeftModelForCausalLM.from_pretrained(args["adapter"])
            elif loader == "load_adapter":
                from transformers import AutoModelForCausalLM
                model = AutoModelForCausalLM.from_pretrained(args["base"])
                step("load_adapter: base loaded")
                model.load_adapter(args["adapter"])
            elif loader == "AutoModel":
                from transformers import AutoModelForCausalLM
                model = AutoModelForCausalLM.from_pretrained(args["adapter"])
            with torch.no_grad():
                y = model.eval()(x).logits
            report["results"][loader] = {"equal": torch.equal(y, expected), "type": type(model).__name__,
                                         "max_abs_diff": (y - expected).abs().max().item()}
        except Exception as err:
            traceback.print_exc()
            report["results"][loader] = {"error": repr(err)}
        step(loader)
    hook = sys.modules.get("_peft_ext_autoload")
    report["imported_by_hook"] = bool(getattr(hook, "imported_peft_ext", False))
    report["finders_left"] = sum(bool(getattr(f, "_peft_ext_autoload", False)) for f in sys.meta_path)
    mixin = sys.modules.get("transformers.integrations.peft")
    report["load_adapter_routed"] = bool(mixin and getattr(mixin.PeftAdapterMixin.load_adapter, "_peft_ext_checked", False))
    report["peft_ext_file"] = getattr(sys.modules.get("peft_ext"), "__file__", None)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved as a local model folder, an HFT adapter on it (init_weights=False: non-trivial deltas)
    whose adapter_config.json names that folder, input ids and the in-memory model's logits."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from peft_ext import HftConfig

    root = tmp_path_factory.mktemp("autoload")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")  # so the adapter records the folder
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(x).logits
    model = get_peft_model(base, HftConfig(init_weights=False)).eval()
    model.save_pretrained(root / "adapter")
    recorded = json.loads((root / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded) == root / "base", recorded
    with torch.no_grad():
        expected = model(x).logits
    assert (expected - base_logits).abs().max() > 1e-3  # a loader that dropped the adapter cannot pass
    torch.save(x, root / "x.pt")
    torch.save(expected, root / "expected.pt")
    (root / "threads").write_text(str(torch.get_num_threads()))  # what `expected` was computed with
    return root


def _child(saved, order, loaders, env=None, setup="", flags=(), timeout=300):
    args = {"order": order, "loaders": loaders, "threads": int((saved / "threads").read_text()), "setup": setup,
            "base": str(saved / "base"), "adapter": str(saved / "adapter"),
            "x": str(saved / "x.pt"), "expected": str(saved / "expected.pt")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFT_EXT_NO_AUTOLOAD": "0", **(env or {})}
    run_dir = saved / f"cwd-{uuid.uuid4().hex[:8]}"  # not the repository root (kernels/ would shadow `kernels`)
    run_dir.mkdir()
    result = subprocess.run([sys.executable, *flags, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                            cwd=run_dir, env=env, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(lines[-1][len("REPORT "):]) if lines else None
    return result, report


def _first_importer(report):
    return next(name for name, peft, _, _ in report["steps"] if peft)


# import order -> the loaders in the order that process runs them: the first one imports peft, except where the
# order itself imports it (Trainer, peft_ext). Each loader comes first after at least one order that looks peft up.
ORDERS = {
    "nothing": LOADERS,
    "find_spec": LOADERS[1:] + LOADERS[:1],
    "is_peft_available": LOADERS[2:] + LOADERS[:2],
    "trl": LOADERS[3:] + LOADERS[:3],
    "accelerate": LOADERS,
    "Trainer": LOADERS,
    "peft_ext": LOADERS,
}
ORDERS_THAT_IMPORT_PEFT = {"Trainer", "peft_ext"}


def test_the_hook_is_installed_in_this_environment():
    assert (Path(sysconfig.get_paths()["purelib"]) / "peft_ext_autoload.pth").exists(), "pip install peft-ext first"


@pytest.mark.parametrize("order", list(ORDERS))
def test_every_loader_opens_an_hft_adapter_after_every_import_order(saved, order):
    loaders = ORDERS[order]
    result, report = _child(saved, order, loaders)
    assert result.returncode == 0 and report, result.stderr[-4000:]
    failures = {name: r for name, r in report["results"].items() if not r.get("equal")}
    assert not failures, f"{failures}\n{result.stderr[-4000:]}"
    assert list(report["results"]) == loaders
    assert report["finders_at_startup"] == 1 and report["hook_module"]
    # where peft was imported first: the order itself, or the first loader (never torch, never a base model load)
    first = _first_importer(report)
    assert first == (order if order in ORDERS_THAT_IMPORT_PEFT else loaders[0]), report["steps"]
    # peft_ext was there as soon as peft was, and the hook imported it (the child never does, but for "peft_ext")
    assert all(ext for _, peft, ext, _ in report["steps"] if peft), report["steps"]
    assert report["imported_by_hook"] and report["finders_left"] == 0 and report["load_adapter_routed"]
    assert "could not be imported after" not in result.stderr
    if order in ("find_spec", "is_peft_available", "trl"):  # the orders that used to disarm the hook
        assert report["lookups_before_import"] >= 1
    print(f"{order}: {report['seconds']} s in the child, peft first imported by {first!r}; steps {report['steps']}")


def test_without_the_hook_plain_peft_fails_and_the_config_names_the_package(saved):
    result, report = _child(saved, "nothing", ["PeftModel"], env={"PEFT_EXT_NO_AUTOLOAD": "1"})
    assert result.returncode == 0 and report, result.stderr[-4000:]
    assert report["hook_module"] is None and report["finders_at_startup"] == 0  # the .pth did nothing
    assert "KeyError: 'HFT'" in report["results"]["PeftModel"]["error"] + result.stderr
    # what a user without peft-ext sees in the folder
    assert '"peft_ext_requirement": "peft-ext>=' in (saved / "adapter" / "adapter_config.json").read_text()
    card = (saved / "adapter" / "README.md").read_text()
    assert "peft-ext" in card and "hft" in card


def test_at_start_up_the_hook_imports_nothing_but_itself(tmp_path):
    """What the .pth costs: one small module, no importlib.abc / typing / warnings; with the switch off, nothing."""
    code = "import sys, json; print(json.dumps(sorted(sys.modules)))"

    def modules(**env):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                                env={**os.environ, **env}, timeout=60)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return set(json.loads(result.stdout))

    on, off = modules(PEFT_EXT_NO_AUTOLOAD="0"), modules(PEFT_EXT_NO_AUTOLOAD="1")
    assert on - off == {"_peft_ext_autoload"}, on - off
    assert "_peft_ext_autoload" not in off


def _copy_source_tree(dest: Path):
    """The files a fresh clone has (git's tracked and untracked-not-ignored files, tests aside), so the build
    neither writes build/ into the repository nor races with another build there."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, timeout=60)
    except OSError:  # no git
        listed = None
    if listed is None or listed.returncode != 0:
        ignore = shutil.ignore_patterns(".git", "__pycache__", "build", "dist", "*.egg-info", "tests")
        shutil.copytree(REPO, dest, ignore=ignore)
        return
    for rel in listed.stdout.decode().split("\0"):
        if rel and not rel.startswith("tests/") and (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)


def test_the_wheel_ships_the_hook(tmp_path, saved):
    source = tmp_path / "source"
    _copy_source_tree(source)
    build = subprocess.run(
        [sys.executable, "-P", "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""},
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("peft_ext-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert zf.read("peft_ext_autoload.pth") == (REPO / "peft_ext_autoload.pth").read_bytes()
    assert "_peft_ext_autoload.py" in names and "peft_ext/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels` package
    # A site dir holding only the wheel's files (as pip lays them out) makes PEFT load HFT adapters. The child
    # starts without site (-S), adds the wheel's site dir first (its .pth runs, so the hook is the wheel's), then
    # the environment's site-packages for torch & co (whose editable peft-ext comes after the wheel's on the path).
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    setup = f"import site; site.addsitedir({str(site)!r}); site.main()"
    result, report = _child(saved, "nothing", ["PeftModel"], env={"PYTHONPATH": ""}, setup=setup, flags=["-S"])
    assert result.returncode == 0 and report, result.stderr[-4000:]
    assert report["results"]["PeftModel"].get("equal"), report["results"]
    assert report["imported_by_hook"] and report["finders_left"] == 0
    for file in (report["hook_module"], report["peft_ext_file"]):  # the wheel's, not the environment's install
        assert Path(file).resolve().is_relative_to(site.resolve()), file


def test_the_startup_benchmark_prints_its_table(tmp_path):
    """benchmarks/startup.py at 2 runs per variant: a well-formed table (the numbers are in benchmarks/RESULTS.md)."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n")
    cmd = [sys.executable, str(REPO / "benchmarks" / "startup.py"), "--runs", "2", "--importtime-runs", "1",
           "--warmup", "0", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| variant")}
    assert len(rows) == 7, result.stdout
    assert rows["clean venv, .pth, PEFT_EXT_NO_AUTOLOAD=1"][4] == "none"  # switched off: the .pth imports nothing
    assert rows["clean venv, .pth, hook on"][4].startswith("`_peft_ext_autoload` (")  # and only itself when on
    text = out.read_text()
    assert text.count("## Start-up cost of the autoload hook (`startup.py`)") == 1 and "| variant |" in text


def test_a_stale_pth_without_its_module_stays_silent(tmp_path):
    """An uninstalled or moved editable install can leave the .pth behind: Python must start without a traceback."""
    (tmp_path / "peft_ext_autoload.pth").write_bytes((REPO / "peft_ext_autoload.pth").read_bytes())
    code = f"import site; site.addsitedir({str(tmp_path)!r}); print('started')"
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("PEFT_EXT_NO_AUTOLOAD", None)
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "started" and result.stderr == "", result.stderr
