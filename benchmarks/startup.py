"""Start-up cost of the autoload hook (`peft_ext_autoload.pth` -> `_peft_ext_autoload`), peft never imported.

Every Python start-up in an environment holding peft-ext runs the .pth line; this measures what it costs, side by
side in one run (the variants interleaved, round after round, so that drift hits them all alike):

- in throw-away venvs of this Python (`python -m venv --without-pip`) holding only the hook, laid out as pip
  installs the wheel (the .pth and the module in site-packages, the module byte-compiled): without the .pth (the
  baseline), with the .pth and PEFT_EXT_NO_AUTOLOAD=1, with the hook on, and with the hook on but no bytecode
  for the module (an editable install under PYTHONDONTWRITEBYTECODE=1 compiles it at every start);
- in this environment (the running interpreter, editable install and all): hook on, PEFT_EXT_NO_AUTOLOAD=1, and
  `python -S` (no site at all) for reference. Hiding the .pth here would mean editing a shared site-packages,
  so the difference on/off stands in for it (the venv rows show that off costs what no .pth costs).

Columns: the median wall-clock of `python -c pass` (subprocess start to exit), its difference to the baseline of
the same interpreter, and from `python -X importtime -c pass` (medians) the self and cumulative µs of
`_peft_ext_autoload` and the modules that the .pth line adds at start-up (beyond those of the baseline).
The goal: under 2 ms.

    python benchmarks/startup.py                       # prints the table
    python benchmarks/startup.py --out benchmarks/RESULTS.md

Standard library only (no torch): it runs in a second or two per 10 rounds.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import py_compile
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from common import command_line, cpu_model, git_revision

REPO_ROOT = Path(__file__).resolve().parent.parent
PTH = "peft_ext_autoload.pth"
MODULE = "_peft_ext_autoload"
HEADING = "## Start-up cost of the autoload hook (`startup.py`)"
GOAL = "Goal: the .pth costs under 2 ms of start-up (hook on, bytecode present, peft never imported)."


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PEFT_EXT_NO_AUTOLOAD", "PYTHONSTARTUP")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no run writes bytecode: the variants stay what they are
    env.update(extra)
    return env


def _make_venv(root: Path, name: str, pth: bool, bytecode: bool) -> Path:
    """A venv of this Python holding only the hook, as pip lays out the wheel; returns its python."""
    path = root / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, env=_clean_env()).stdout.strip()
    site = Path(purelib)
    shutil.copy2(REPO_ROOT / f"{MODULE}.py", site / f"{MODULE}.py")
    if pth:
        shutil.copy2(REPO_ROOT / PTH, site / PTH)
    if bytecode:  # what pip does at install time
        py_compile.compile(str(site / f"{MODULE}.py"), doraise=True,
                           cfile=str(site / "__pycache__" / f"{MODULE}.{sys.implementation.cache_tag}.pyc"))
    return python


def _importtime(out: str) -> dict[str, tuple[int, int]]:
    """module -> (self µs, cumulative µs) from `-X importtime` output."""
    times = {}
    for line in out.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        times[name.strip()] = (int(self_us), int(cumulative_us))
    return times


class Variant:
    def __init__(self, key, label, python, flags=(), env=None, baseline=None, has_hook=True):
        self.key, self.label, self.python, self.flags = key, label, str(python), list(flags)
        self.env = _clean_env(**(env or {}))
        self.baseline = baseline  # key of the row it is compared with (same interpreter, no hook)
        self.has_hook = has_hook
        self.wall_ms: list[float] = []
        self.importtimes: list[dict[str, tuple[int, int]]] = []

    def run(self, cwd: Path, importtime: bool = False) -> None:
        cmd = [self.python, *self.flags, *(["-X", "importtime"] if importtime else []), "-c", "pass"]
        t0 = time.perf_counter()
        result = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True)
        elapsed = (time.perf_counter() - t0) * 1e3
        if result.returncode != 0 or (not importtime and result.stderr):
            raise SystemExit(f"{self.label}: {shlex.join(cmd)} failed:\n{result.stderr}")
        if importtime:
            self.importtimes.append(_importtime(result.stderr))
        else:
            self.wall_ms.append(elapsed)


def _median(values):
    return statistics.median(values) if values else None


def _hook_times(variant: Variant):
    hits = [t[MODULE] for t in variant.importtimes if MODULE in t]
    if not hits:
        return None, None
    return _median([h[0] for h in hits]), _median([h[1] for h in hits])


def _added_modules(variant: Variant, baseline: Variant | None) -> str:
    if baseline is None or not variant.importtimes or not baseline.importtimes:
        return "n/a"
    base = set().union(*baseline.importtimes)
    added = sorted(set(variant.importtimes[0]) - base)
    if not added:
        return "none"
    self_us = _median([sum(t[m][0] for m in added if m in t) for t in variant.importtimes])
    return f"{', '.join(f'`{m}`' for m in added)} ({self_us:.0f} µs self)"


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for dist in ("peft-ext", "peft", "transformers", "torch"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} n/a")
    return ", ".join(parts)


def _machine() -> str:
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60, help="timed `python -c pass` runs per variant (default 60)")
    parser.add_argument("--importtime-runs", type=int, default=15, help="`-X importtime` runs per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (page cache, directory caches)")
    parser.add_argument("--out", help="also append the heading (once), header, table and goal to this file")
    args = parser.parse_args(argv)

    installed = Path(sysconfig.get_paths()["purelib"]) / PTH
    notes = []
    if not installed.exists():
        notes.append(f"This environment has no {PTH} (peft-ext not installed): its hook-on row equals off.")
    elif installed.read_bytes() != (REPO_ROOT / PTH).read_bytes():
        notes.append(f"This environment's {PTH} differs from the repository's: reinstall (`pip install -e .`).")

    with tempfile.TemporaryDirectory(prefix="peft-ext-startup-") as tmp:
        root = Path(tmp)
        cwd = root / "cwd"
        cwd.mkdir()
        print("making the throw-away venvs ...", file=sys.stderr)
        plain = _make_venv(root, "no-pth", pth=False, bytecode=True)
        hooked = _make_venv(root, "pth", pth=True, bytecode=True)
        no_pyc = _make_venv(root, "pth-no-pyc", pth=True, bytecode=False)
        variants = [
            Variant("venv-base", "clean venv, no .pth (baseline)", plain, has_hook=False),
            Variant("venv-off", "clean venv, .pth, PEFT_EXT_NO_AUTOLOAD=1", hooked, env={"PEFT_EXT_NO_AUTOLOAD": "1"},
                    baseline="venv-base", has_hook=False),
            Variant("venv-on", "clean venv, .pth, hook on", hooked, baseline="venv-base"),
            Variant("venv-on-nopyc", "clean venv, .pth, hook on, module not byte-compiled", no_pyc,
                    baseline="venv-base"),
            Variant("env-S", "this environment, `python -S` (no site at all)", sys.executable, flags=["-S"],
                    has_hook=False),
            Variant("env-off", "this environment, PEFT_EXT_NO_AUTOLOAD=1", sys.executable,
                    env={"PEFT_EXT_NO_AUTOLOAD": "1"}, has_hook=False),
            Variant("env-on", "this environment, hook on", sys.executable, baseline="env-off"),
        ]
        by_key = {v.key: v for v in variants}
        for _ in range(args.warmup):
            for v in variants:
                v.run(cwd)
        for v in variants:
            v.wall_ms.clear()
        print(f"timing {args.runs} rounds of {len(variants)} variants ...", file=sys.stderr)
        for _ in range(args.runs):
            for v in variants:
                v.run(cwd)
        for _ in range(args.importtime_runs):
            for v in variants:
                v.run(cwd, importtime=True)

    lines = [
        "| variant | `python -c pass` ms (median) | vs baseline ms | `_peft_ext_autoload` self µs | cumulative µs "
        "| modules the .pth adds |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        median = _median(v.wall_ms)
        base = by_key.get(v.baseline)
        delta = None if base is None else median - _median(base.wall_ms)
        self_us, cumulative_us = _hook_times(v)
        lines.append(
            f"| {v.label} | {_fmt(median)} | {'' if base is None else f'{delta:+.2f}'} | {_fmt(self_us, 0)} | "
            f"{_fmt(cumulative_us, 0)} | {_added_modules(v, base) if base is not None else ''} |"
        )
    def cost(key):
        v = by_key[key]
        return _median(v.wall_ms) - _median(by_key[v.baseline].wall_ms), _hook_times(v)[1]

    (on_ms, on_us), (nopyc_ms, nopyc_us) = cost("venv-on"), cost("venv-on-nopyc")
    verdict = (
        f"Result: the .pth with the hook on costs {on_ms:+.2f} ms of wall-clock start-up ({_fmt(on_us, 0)} µs in "
        f"`-X importtime`) where the module is byte-compiled (a wheel install; an editable install once Python has "
        f"cached it): goal {'met' if on_ms < 2 and (on_us or 0) < 2000 else 'NOT met'}. Without bytecode for the "
        f"module (PYTHONDONTWRITEBYTECODE=1 with an editable install) it is compiled at every start: "
        f"{nopyc_ms:+.2f} ms ({_fmt(nopyc_us, 0)} µs)."
    )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"{now} · {_machine()} · {_versions()} · git {git_revision()}\n\nCommand: `{command_line()}`"
    detail = (
        f"{args.runs} timed runs per variant (after {args.warmup} warm-up rounds), interleaved; "
        f"`-X importtime`: median of {args.importtime_runs} runs. All runs with PYTHONDONTWRITEBYTECODE=1, "
        "PYTHONPATH unset, cwd a temp dir."
    )
    block = "\n\n".join([header, detail, "\n".join(lines), GOAL, verdict, *notes])
    print(block)
    if args.out:
        out = Path(args.out)
        previous = out.read_text() if out.exists() else ""
        with out.open("a") as f:
            if previous and not previous.endswith("\n\n"):
                f.write("\n" if previous.endswith("\n") else "\n\n")
            if HEADING not in previous:
                f.write(HEADING + "\n\n")
            f.write(block.rstrip("\n") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
