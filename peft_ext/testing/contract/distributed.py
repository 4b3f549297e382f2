"""Contract item 9: two processes on CPU (gloo) under DDP, FSDP2 and FSDP1 give what one process gives.

Per method, on the tiny Llama: `python -m torch.distributed.run --nproc_per_node 2` runs
peft_ext.testing.distributed_worker, which trains `STEPS` AdamW steps on a fixed global batch split across the ranks,
under DDP, under FSDP2 (`fully_shard` on each decoder layer and on the root) and under FSDP1
(`FullyShardedDataParallel(use_orig_params=True)`, each decoder layer a unit: what the Trainer's and accelerate's
`fsdp` settings build by default); the test then asserts, for each mode, that

- the adapter's tensors after the steps equal a single process trained on the whole batch (fp32: rtol 1e-4, atol
  1e-5: the ranks' partial gradients are summed in another order), and the mean of the ranks' losses its loss;
- the replicas are identical (every rank's adapter tensors, bit for bit);
- rank 0's `save_pretrained` (FSDP2: of the full state dict gathered with `get_model_state_dict`; FSDP1: of the
  FULL_STATE_DICT state dict) reloads onto a
  fresh base exactly: the same tensors and the same output as the trained model, bit for bit.

A method documented as not trainable ("train") asserts that error and launches nothing; "ddp" / "fsdp" / "fsdp1" in
`documented_errors` say that the method refuses that mode (the worker records the error and the test matches it).
`MethodEntry.distributed_overrides` holds config overrides for this item (see docs/contract_suite.md).

The worker imports the test module by name to rebuild the entry (its callables are not picklable), with the folder
above the module's top-level package first on PYTHONPATH: the module must be importable under its `__name__`
(pytest's default rootdir-based import and `--import-mode=importlib` inside a package both give such names).

One launch runs the three modes; the method's other tests reuse it (a folder per method for the session, shared by
pytest-xdist's workers under a file lock). Each launch is killed after `LAUNCH_TIMEOUT_S` (env
PEFT_EXT_CONTRACT_LAUNCH_TIMEOUT), its workers by their pids, with a message naming a hung collective; each rank's
process group times out a collective after 60 s. A launch takes ~10-15 s on 2 CPU cores, nearly all of it imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from peft import PeftModel

from .. import distributed_worker as worker
from ..harness import assert_equal, output, peft_model, train_step
from ..marks import per_method
from ..models import MODELS

__all__ = ["test_ddp_two_processes_equal_one", "test_fsdp2_two_processes_equal_one", "test_fsdp1_two_processes_equal_one"]

NPROC = 2
LAUNCH_TIMEOUT_S = float(os.environ.get("PEFT_EXT_CONTRACT_LAUNCH_TIMEOUT", "120"))
RTOL, ATOL = 1e-4, 1e-5
# environment a launched worker must not inherit: the suite refuses to import under pytest without its plugin
_DROPPED_ENV = ("PYTEST_VERSION", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")


@per_method
def test_ddp_two_processes_equal_one(entry, request, tmp_path_factory):
    _check_mode(entry, "ddp", request, tmp_path_factory)


@per_method
def test_fsdp2_two_processes_equal_one(entry, request, tmp_path_factory):
    _check_mode(entry, "fsdp", request, tmp_path_factory)


@per_method
def test_fsdp1_two_processes_equal_one(entry, request, tmp_path_factory):
    _check_mode(entry, "fsdp1", request, tmp_path_factory)


# --------------------------------------------------------------------------------------------------------- checks
def _check_mode(entry, mode: str, request, tmp_path_factory) -> None:
    spec = MODELS[worker.MODEL_KIND]
    doc_train = entry.documented_error("train", spec.kind)
    if doc_train is not None:  # not trainable by design: the documented error, and nothing to distribute
        model, _ = peft_model(entry, spec, **entry.distributed_overrides)
        with pytest.raises(doc_train.error, match=doc_train.match):
            train_step(spec, model)
        return

    out = _launch(entry, mode, request, tmp_path_factory) / mode
    records = _records(out)
    errors = {r: rec for r, rec in records.items() if rec["status"] != "ok"}
    doc = entry.documented_error(mode, spec.kind)
    if doc is not None:
        _assert_documented(mode, doc, errors)
        return
    trained = all((out / f"rank{r}.safetensors").exists() for r in range(NPROC))
    if errors and not trained:
        _fail(mode, errors, "")
    if not trained:
        missing = sorted(set(range(NPROC)) - set(records))
        pytest.fail(f"{mode}: ranks {missing} wrote no result:\n{_tail(out.parent / 'launch.log')}", pytrace=False)

    from safetensors.torch import load_file

    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(NPROC)]
    _assert_replicas_identical(mode, ranks)
    _assert_equals_one_process(mode, entry, request, ranks[0], out)
    if errors:  # the training matched; saving failed
        _fail(mode, errors, "the training equals one process's, but ")

    # rank 0's save_pretrained reloads exactly
    reloaded = PeftModel.from_pretrained(spec.make(worker.MODEL_SEED), out / "adapter")
    loaded = worker.adapter_state(reloaded.state_dict(), entry)
    assert sorted(loaded) == sorted(ranks[0]), sorted(set(loaded) ^ set(ranks[0]))[:5]
    for name, tensor in ranks[0].items():
        assert_equal(loaded[name], tensor, f"{mode}: reloaded vs rank 0: {name}")
    logits = load_file(str(out / "logits.safetensors"))["logits"]
    assert_equal(output(spec, reloaded), logits, f"{mode}: reloaded output vs the trained model's")


def _assert_documented(mode: str, doc, errors: dict) -> None:
    assert errors, f"{mode}: the documented error ({doc.error.__name__}: {doc.match!r}) was not raised"
    name = f"{doc.error.__module__}.{doc.error.__qualname__}"
    for rank, rec in errors.items():
        raised = rec["error_types"][0]
        assert name in rec["error_types"], f"{mode} rank {rank} raised {raised}, not {name}:\n{rec['traceback']}"
        assert re.search(doc.match, rec["message"]), f"{mode} rank {rank}: {rec['message']!r} !~ {doc.match!r}"


def _assert_replicas_identical(mode: str, ranks: list[dict]) -> None:
    for r in range(1, NPROC):
        assert sorted(ranks[r]) == sorted(ranks[0]), f"{mode}: rank {r} holds other adapter tensors than rank 0"
        for name, tensor in ranks[0].items():
            assert_equal(ranks[r][name], tensor, f"{mode}: rank {r} vs rank 0 replica: {name}")


def _assert_equals_one_process(mode: str, entry, request, got: dict, out: Path) -> None:
    initial, expected, ref_losses = _reference(entry, request)
    assert sorted(got) == sorted(expected), sorted(set(got) ^ set(expected))[:5]
    assert any(not torch.equal(expected[n], initial[n]) for n in expected), "training moved no adapter tensor"
    far = []
    for name, want in expected.items():
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, (name, got[name].shape, want.shape)
        if not torch.allclose(got[name], want, rtol=RTOL, atol=ATOL):
            diff, moved = (got[name] - want).abs().max().item(), (want - initial[name]).abs().max().item()
            far.append(f"{name}: max abs diff {diff:.3g} (one process moved it {moved:.3g})")
    assert not far, (
        f"{mode}: {len(far)} adapter tensors differ from one process's after {worker.STEPS} steps on the same global "
        f"batch (rtol {RTOL}, atol {ATOL}):\n" + "\n".join(far[:10])
    )
    losses = [json.loads((out / f"rank{r}.losses.json").read_text()) for r in range(NPROC)]
    torch.testing.assert_close(
        torch.tensor(losses).mean(0), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL,
        msg=lambda m: f"{mode}: the mean of the ranks' losses vs one process's loss, per step: {m}",
    )  # fmt: skip


def _fail(mode: str, errors: dict, lead: str) -> None:
    rank, rec = sorted(errors.items())[0]
    where = f"{mode} (2 processes, gloo): {lead}rank {rank} raised in stage {rec['stage']!r}{_hint(rec)}"
    pytest.fail(f"{where}\n{rec['traceback']}", pytrace=False)


_REFERENCES: dict[tuple[str, str], tuple[dict, dict, list]] = {}


def _reference(entry, request) -> tuple[dict, dict, list]:
    """(the adapter's tensors at init, after the steps in one process on the whole batch, the losses): computed once
    per test process for a method's tests."""
    key = (request.module.__name__, entry.name)
    if key not in _REFERENCES:
        reference, _, losses = worker.train(entry)
        expected = worker.adapter_state(reference.state_dict(), entry)
        initial = worker.adapter_state(worker.build(entry)[0].state_dict(), entry)
        _REFERENCES[key] = (initial, expected, losses)
    return _REFERENCES[key]


def _hint(record: dict) -> str:
    if re.search(r"[Tt]imed out|[Tt]imeout", record["message"]):
        return f" (a collective timed out after {worker.PG_TIMEOUT_S} s: the other rank never joined it, hung or gone)"
    if re.search(r"[Cc]onnection closed by peer|[Cc]onnection reset", record["message"]):
        return " (the other rank left a collective: see its error)"
    return ""


def _records(out: Path) -> dict[int, dict]:
    """Each rank's record (a rank killed by the launcher after its peer failed may have written none)."""
    files = {r: out / f"rank{r}.json" for r in range(NPROC)}
    return {r: json.loads(f.read_text()) for r, f in files.items() if f.exists()}


# -------------------------------------------------------------------------------------------------------- launching
def _import_root(module) -> Path:
    """The folder from which `module.__name__` imports as `module.__file__`."""
    name, file = module.__name__, Path(getattr(module, "__file__", "") or "").resolve()
    parts = name.split(".")
    root = file.parents[len(parts) - 1] if len(file.parents) >= len(parts) else None
    if not file.name or root is None or root.joinpath(*parts[:-1], parts[-1] + ".py") != file:
        raise pytest.fail.Exception(
            f"the distributed contract item re-imports {name} in the worker processes to rebuild the entry, but "
            f"{file} is not {name.replace('.', '/')}.py under any folder: make the test module importable under its "
            f"name (a package with __init__.py files, or pytest's default rootdir-based import)"
        )
    return root


def launch_env() -> dict:
    """The environment of a launched process group: this one's without pytest's markers (the suite refuses to import
    under pytest without its plugin), on one thread, offline unless told otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchTimeout(Exception):
    """The launcher did not finish in time and was killed with its workers."""


def run_launcher(cmd: list[str], log: Path, timeout: float, env: Optional[dict] = None, cwd=None, pid_dir=None) -> int:
    """Run `cmd` in a session of its own, output to `log`; after `timeout` seconds kill its process group and raise
    LaunchTimeout. Returns the exit code. torchrun starts each worker in a session of its own, out of the group's
    reach: each worker writes its pid into `pid_dir` (`<pid>.pid`), and whichever of them is still alive when the
    launcher ends (a rank left behind by a killed launcher, or by one that gave up on it) is killed by its id, if its
    command line still names the folder above `pid_dir` (the workers' --out; not a reused pid)."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise LaunchTimeout(timeout) from None
        finally:
            if pid_dir is not None:
                _kill_left_behind(Path(pid_dir))


def _kill_left_behind(pid_dir: Path) -> None:
    tag = str(pid_dir.parent).encode()
    for pid_file in sorted(pid_dir.glob("*.pid")):
        try:
            pid = int(pid_file.read_text())
            if sys.platform == "linux" and tag not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            os.kill(pid, signal.SIGKILL)
        except (ValueError, OSError):  # gone already
            continue


def _launch_dir(request, entry, tmp_path_factory) -> Path:
    """One folder per (test module, entry) for the whole test session, shared by pytest-xdist's workers (the parent
    of a worker's basetemp), so that the method's tests use one launch wherever they run."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    key = f"{request.module.__name__}:{entry.name}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return base / "peft_ext_distributed" / f"{re.sub(r'[^A-Za-z0-9_]', '_', entry.name)}-{digest}"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): at worst both tests launch
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _launch(entry, mode: str, request, tmp_path_factory) -> Path:
    """The folder holding `<mode>/` from a worker launch: one launch runs every mode and the method's other tests
    reuse it; a launch that stopped at an earlier mode's failure is followed by one of `mode` alone."""
    main = _launch_dir(request, entry, tmp_path_factory)
    alone = main.with_name(f"{main.name}-{mode}")

    def meta(out: Path) -> Optional[dict]:
        return json.loads((out / "launched.json").read_text()) if (out / "launched.json").exists() else None

    def ran(out: Path) -> bool:
        return bool(list((out / mode).glob("rank*.json")))

    with _locked(main.with_suffix(".lock")):
        out, seconds = main, 0.0
        launched = meta(main)
        if launched is not None and not ran(main) and not (launched.get("setup_failed") or launched.get("timed_out")):
            out, launched = alone, meta(alone)  # the launch of all modes stopped before this one
        if launched is None:
            out.mkdir(parents=True, exist_ok=True)
            seconds, rc = _run(entry, worker.MODES if out == main else (mode,), request, out)
            setup = bool(list(out.glob("setup_rank*.json")))
            (out / "launched.json").write_text(json.dumps({"seconds": seconds, "rc": rc, "setup_failed": setup}))
    request.node.user_properties.append(("launch_seconds", round(seconds, 1)))
    if ran(out):
        return out
    setup = sorted(out.glob("setup_rank*.json"))
    if setup:
        trace = json.loads(setup[0].read_text())["traceback"]
        pytest.fail(f"{entry.name}: the worker could not set up:\n{trace}", pytrace=False)
    launched = meta(out)
    if launched.get("timed_out"):
        what = "timed out (see the test that ran it)"
    else:
        what = f"(exit code {launched['rc']}) wrote no result"
    pytest.fail(f"{entry.name}: the launch for {mode} {what}:\n{_tail(out / 'launch.log')}", pytrace=False)


def _run(entry, modes: tuple[str, ...], request, out: Path) -> tuple[float, int]:
    root = _import_root(request.module)
    env = launch_env()
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log = out / "launch.log"
    for attempt in range(2):  # a port taken between _free_port() and the store's bind: once more on another
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "peft_ext.testing.distributed_worker",
            "--entry", f"{request.module.__name__}:{entry.name}", "--modes", ",".join(modes), "--out", str(out),
        ]  # fmt: skip
        start = time.perf_counter()
        try:
            rc = run_launcher(cmd, log, LAUNCH_TIMEOUT_S, env=env, cwd=str(root), pid_dir=out / "pids")
        except LaunchTimeout:
            rc = None
        if rc is None:
            (out / "launched.json").write_text(json.dumps({"rc": None, "timed_out": True}))
            pytest.fail(
                f"{entry.name}: `torch.distributed.run --nproc_per_node {NPROC}` ({', '.join(modes)}) did not finish "
                f"within {LAUNCH_TIMEOUT_S:.0f} s and was killed with its workers: a collective most likely hung (a "
                f"rank waiting in all_reduce / all_gather / reduce_scatter / barrier for a peer that never joined it). "
                f"Each rank's process group times a collective out after {worker.PG_TIMEOUT_S} s. "
                f"Output:\n{_tail(log)}",
                pytrace=False,
            )
        seconds = time.perf_counter() - start
        port_taken = re.search(r"EADDRINUSE|[Aa]ddress already in use", log.read_text(errors="replace"))
        if rc != 0 and attempt == 0 and port_taken:
            continue
        return seconds, rc
    raise AssertionError("unreachable")


def _tail(log: Path, chars: int = 6000) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no output)"
    return text[-chars:]
