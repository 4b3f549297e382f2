"""kernels/autotune.py driven for real on Triton's interpreter: tiny shapes, the first few candidates, wall-clock
timings (which candidate wins is not asserted: the timings are real and noisy). Every test uses its own cache folder
(tmp_path, via the tuner's cache_dir and $PEFT_EXT_CACHE), never the home cache."""

import json
import os

import pytest
import torch

from peft_ext.kernels import autotune, dispatch, grouped_lowrank_linear, lowrank_linear, lowrank_linear_gathered
from peft_ext.kernels import lowrank as lowrank_module
from peft_ext.kernels import lowrank_grouped as grouped_module
from peft_ext.kernels import plan_adapter_segments
from peft_ext.kernels.lowrank import dy_pass, lowrank_weight_grad, shrink_expand
from peft_ext.kernels.reference import reference_lowrank_linear, reference_lowrank_linear_gathered

from .accuracy import rel_err

CANDIDATES = 3  # the heuristic and two more: enough to tune, cheap on the interpreter


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """A fresh process-wide tuner with its cache in tmp_path, tuning on (the interpreter's default is off)."""
    monkeypatch.setenv("PEFT_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("PEFT_EXT_AUTOTUNE", "1")
    t = autotune.Autotuner(cache_dir=tmp_path, max_candidates=CANDIDATES)
    previous = autotune.set_tuner(t)
    yield t
    autotune.set_tuner(previous)


def new_tuner(tmp_path):
    """A second tuner on the same folder (a fresh process's in-memory cache), installed in place of the first."""
    t = autotune.Autotuner(cache_dir=tmp_path, max_candidates=CANDIDATES)
    autotune.set_tuner(t)
    return t


def cache_file(tmp_path):
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    return files[0]


def entries(tmp_path):
    return json.loads(cache_file(tmp_path).read_text())["entries"]


def layer(M, K=40, N=24, R=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(M, K, generator=g),
        weight=torch.randn(N, K, generator=g) / K**0.5,
        bias=torch.randn(N, generator=g),
        lora_a=torch.randn(R, K, generator=g) / K**0.5,
        lora_b=torch.randn(N, R, generator=g) / R**0.5,
    )


def forward_backward(t):
    leaves = {k: v.clone().requires_grad_(k in ("x", "lora_a", "lora_b")) for k, v in t.items()}
    y = lowrank_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], 0.5)
    y.backward(torch.ones_like(y))
    return y.detach(), {k: leaves[k].grad for k in ("x", "lora_a", "lora_b")}


def reference(t):
    leaves = {k: v.double().requires_grad_(k in ("x", "lora_a", "lora_b")) for k, v in t.items()}
    y = reference_lowrank_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], 0.5)
    y.backward(torch.ones_like(y))
    return y.detach(), {k: leaves[k].grad for k in ("x", "lora_a", "lora_b")}


@pytest.fixture
def launches(monkeypatch):
    """Records every kernel launch: (kernel name, config, data pointers of its tensor arguments)."""
    records = []
    original = dispatch.LazyKernel.__getitem__

    def recording(kernel, grid):
        launcher = original(kernel, grid)

        def launch(*args, **kwargs):
            cfg = {k: v for k, v in kwargs.items() if k in autotune.TUNABLE}
            ptrs = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
            records.append((kernel.fn.__name__, cfg, ptrs))
            return launcher(*args, **kwargs)

        return launch

    monkeypatch.setattr(dispatch.LazyKernel, "__getitem__", recording)
    return records


# -------------------------------------------------------------------------------------------- tuning
def test_tuned_forward_backward_match_the_reference(tuner, tmp_path):
    t = layer(20)
    y, grads = forward_backward(t)
    y_ref, grads_ref = reference(t)
    assert rel_err(y, y_ref) <= 1e-4
    for k in grads:
        assert rel_err(grads[k], grads_ref[k]) <= 1e-4, k
    info = autotune.cache_info()
    assert info["tuned"] >= 2 and info["timed"] >= 2 and info["mode"] == "on"
    saved = entries(tmp_path)
    names = {key.split("|")[0] for key in saved}
    assert {"shrink_expand", "wgrad"} <= names, names
    for key, entry in saved.items():
        name = key.split("|")[0]
        tried = autotune.candidates(name, entry["heuristic"], compiled=False)
        assert entry["config"] in entry["candidates"] and entry["config"] in tried, (key, entry)
        assert entry["candidates"][0] == entry["heuristic"] and 1 <= len(entry["candidates"]) <= CANDIDATES
        assert entry["M"] == 20 and f"M={autotune.bucket_m(20)}" in key


def test_tuning_writes_the_callers_buffers_once(tuner, launches):
    """Candidates run on scratch outputs: the caller's out / mid are written by one launch (the chosen config), the
    inputs never, and the result is the reference's."""
    t = layer(20)
    x, a, b = t["x"], t["lora_a"], t["lora_b"]
    originals = [v.clone() for v in (x, a, b)]
    out = torch.full((20, 24), 7.0)
    mid = torch.full((20, 4), 7.0)
    shrink_expand(x, a, b, 0.5, out=out, mid=mid)
    user = {out.data_ptr(), mid.data_ptr()}
    on_user = [r for r in launches if r[2] & user]
    assert len(launches) > 1 and len(on_user) == 1, launches  # the candidates ran, elsewhere
    assert all(torch.equal(v, o) for v, o in zip((x, a, b), originals))
    xa = x.double() @ a.double().t()
    assert rel_err(mid, xa) <= 1e-5 and rel_err(out, 0.5 * xa @ b.double().t()) <= 1e-5
    assert on_user[0][1] == next(iter(autotune.get_tuner()._memory.values()))  # the chosen config


def test_gathered_tuned_keeps_the_plans_block_m(tuner, tmp_path):
    g = torch.Generator().manual_seed(3)
    L, R, K, N = 3, 4, 40, 24
    x = torch.randn(6, 5, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    a = torch.randn(L, R, K, generator=g) / K**0.5
    b = torch.randn(L, N, R, generator=g) / R**0.5
    index = torch.tensor([0, 2, -1, 1, 0, 2])
    plan = plan_adapter_segments(index, L, x.shape)
    y = lowrank_linear_gathered(x, w, None, a, b, [1.0, 0.5, 2.0], plan)
    ref = reference_lowrank_linear_gathered(x.double(), w.double(), None, a.double(), b.double(), [1.0, 0.5, 2.0], index)
    assert rel_err(y, ref) <= 1e-5
    (key, entry), = entries(tmp_path).items()
    assert key.startswith("gathered|") and f"BLOCK_M={plan.block_m}" in key and "L=3" in key
    assert all(c["BLOCK_M"] == plan.block_m for c in entry["candidates"])


def test_a_candidate_with_wrong_output_is_rejected(tuner, tmp_path, monkeypatch):
    """The correctness guard on a real wrong candidate: a weight-gradient BLOCK_M that does not divide the rows per
    split double-counts rows (the candidate list normally excludes it)."""
    real = autotune.candidates

    def with_a_bad_one(name, heuristic, valid=None, elem=2, compiled=True):
        return [dict(heuristic), dict(heuristic, BLOCK_M=128)] + real(name, heuristic, valid, elem, compiled)[1:]

    monkeypatch.setattr(autotune, "candidates", with_a_bad_one)
    g = torch.Generator().manual_seed(5)
    left, right = torch.randn(100, 4, generator=g), torch.randn(100, 24, generator=g)
    out = lowrank_weight_grad(left, right, 0.5, splits=2)  # rows per split 64 on the interpreter (BLOCK_M 32)
    assert rel_err(out, 0.5 * left.double().t() @ right.double()) <= 1e-5
    (entry,) = entries(tmp_path).values()
    assert [r["config"]["BLOCK_M"] for r in entry["rejected"]] == [128]
    assert "NaN positions" in entry["rejected"][0]["reason"] or "relative difference" in entry["rejected"][0]["reason"]
    assert entry["config"]["BLOCK_M"] != 128


# ------------------------------------------------------------------------------------ the backward's dy pass
def dy_pass_inputs(M=70, N=24, K=40, R=4, p=0.25, seed=11):
    g = torch.Generator().manual_seed(seed)
    dy, b, a, xa = (torch.randn(*shape, generator=g) for shape in ((M, N), (N, R), (R, K), (M, R)))
    return dy, b, a, xa, torch.rand(M, K, generator=g) > p


@pytest.mark.parametrize("fused", [True, False])
def test_tuned_dy_pass_writes_the_callers_buffers_once(tuner, tmp_path, launches, monkeypatch, fused):
    """`dy_pass` tuned ("dy_pass_db" with dB fused: BLOCK_M fixed by the partials' layout; "dy_pass" without: BLOCK_M
    varies, the grid follows): the buffers it returns (and the partials), NaN-filled at their allocation, are written
    by one launch, the chosen config's; M = 70: two 64-row programs on the interpreter, rows not a block multiple."""
    real_empty, allocated = torch.empty, []

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        allocated.append(t)
        return t.fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", empty)  # the tuner's scratch comes from torch.empty_strided: not recorded
    dy, b, a, xa, keep = dy_pass_inputs()
    inputs = [v.clone() for v in (dy, b, a, xa, keep)]
    s, p = 0.7, 0.25
    dx, mid, db = dy_pass(dy, b, a, xa if fused else None, s, mid_scale=1.5, keep=keep, dropout_p=p)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert len(allocated) == (3 if fused else 2)  # mid, dx (, the partials)
    ours = [r for r in launches if r[0] == "_dy_pass_kernel"]
    for t in allocated:
        assert sum(t.data_ptr() in r[2] for r in ours) == 1, t.shape
    assert len(ours) > 1 and all(torch.equal(v, o) for v, o in zip((dy, b, a, xa, keep), inputs))
    dyb = dy.double() @ b.double()
    assert rel_err(mid, 1.5 * dyb) <= 1e-5
    assert rel_err(dx, s * (dyb @ a.double()) * keep.double() / (1 - p)) <= 1e-5
    if fused:
        assert rel_err(db, s * dy.double().t() @ xa.double()) <= 1e-5
    else:
        assert db is None
    (key, entry), = entries(tmp_path).items()
    name = "dy_pass_db" if fused else "dy_pass"
    assert key.startswith(name + "|") and "M=128|N=24|K=40|R=4" in key and f"DO_DB={fused}" in key
    assert ("BLOCK_M=64" in key) == fused  # with dB the row block is part of the key, not tuned
    assert entry["candidates"][0] == entry["heuristic"] == lowrank_module._dy_pass_config(70, 4, dy.device, fused)
    assert ({c["BLOCK_M"] for c in entry["candidates"]} == {64}) == fused and len(entry["candidates"]) == CANDIDATES
    chosen = [r[1] for r in ours if allocated[0].data_ptr() in r[2]]
    assert chosen == [entry["config"]] and not entry["rejected"]


def grouped_reference_grads(t, scale=0.5):
    leaves = {k: v.double().requires_grad_(k in ("x", "lora_a", "lora_b")) for k, v in t.items()}
    y = reference_lowrank_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], scale)
    y.backward(torch.ones_like(y))
    return {k: leaves[k].grad for k in ("x", "lora_a", "lora_b")}


@pytest.mark.parametrize("fused", [True, False])
def test_tuned_backward_dy_pass_matches_the_reference(tuner, tmp_path, monkeypatch, fused):
    """The backward with its dy pass tuned: lowrank_linear's with dB fused ("dy_pass_db"), the grouped projections'
    without ("dy_pass", dB by its own pass); dx / dA / dB against kernels/reference.py in float64."""
    monkeypatch.setattr(lowrank_module, "fuse_db_saves_bytes", lambda *a: fused)
    monkeypatch.setattr(grouped_module, "fuse_db_saves_bytes", lambda *a: fused)
    t = layer(70)
    if fused:
        _, grads = forward_backward(t)
    else:
        leaves = {k: v.clone().requires_grad_(k in ("x", "lora_a", "lora_b")) for k, v in t.items()}
        (y,) = grouped_lowrank_linear(leaves["x"], [leaves["weight"]], [leaves["bias"]], [leaves["lora_a"]],
                                      [leaves["lora_b"]], [0.5])  # fmt: skip
        y.backward(torch.ones_like(y))
        grads = {k: leaves[k].grad for k in ("x", "lora_a", "lora_b")}
    ref = grouped_reference_grads(t)
    for k in ref:
        assert rel_err(grads[k], ref[k]) <= 1e-4, k
    names = {key.split("|")[0] for key in entries(tmp_path)}
    assert ("dy_pass_db" if fused else "dy_pass") in names and "wgrad" in names, names
    assert ("dy_pass" if fused else "dy_pass_db") not in names, names


def test_dy_pass_cache_round_trip(tmp_path, monkeypatch):
    """Both dy-pass keys written, read back by a fresh tuner (nothing timed, the same bits); a cached "dy_pass_db"
    config with another BLOCK_M (a partial layout this call's buffer does not have) gives the heuristic."""
    monkeypatch.setenv("PEFT_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("PEFT_EXT_AUTOTUNE", "1")
    dy, b, a, xa, _ = dy_pass_inputs()
    first_calls, second_calls = [], []
    previous = autotune.set_tuner(autotune.Autotuner(cache_dir=tmp_path, timer=counting_timer(first_calls),
                                                     max_candidates=CANDIDATES))  # fmt: skip
    try:
        out1 = [dy_pass(dy, b, a, xa if fused else None, 0.7) for fused in (True, False)]
        saved = entries(tmp_path)
        assert sorted(k.split("|")[0] for k in saved) == ["dy_pass", "dy_pass_db"] and first_calls
        second = autotune.Autotuner(cache_dir=tmp_path, timer=counting_timer(second_calls), max_candidates=CANDIDATES)
        autotune.set_tuner(second)
        out2 = [dy_pass(dy, b, a, xa if fused else None, 0.7) for fused in (True, False)]
        assert second_calls == [] and second.stats["tuned"] == 0 and second.stats["disk_hits"] == 2
        for o1, o2 in zip(out1, out2):
            assert all((u is None and v is None) or torch.equal(u, v) for u, v in zip(o1, o2))
        # a foreign BLOCK_M in the fused entry: not usable with this call's partials, the heuristic runs
        data = json.loads(cache_file(tmp_path).read_text())
        key = next(k for k in data["entries"] if k.startswith("dy_pass_db|"))
        data["entries"][key]["config"]["BLOCK_M"] = 32
        cache_file(tmp_path).write_text(json.dumps(data))
        third = autotune.Autotuner(cache_dir=tmp_path, timer=counting_timer(second_calls), max_candidates=CANDIDATES)
        autotune.set_tuner(third)
        dx, mid, db = dy_pass(dy, b, a, xa, 0.7)
        assert second_calls == [] and third.stats["disk_hits"] == 1
        assert rel_err(db, 0.7 * dy.double().t() @ xa.double()) <= 1e-5 and rel_err(mid, dy.double() @ b.double()) <= 1e-5
    finally:
        autotune.set_tuner(previous)


def test_guard_tolerance_and_comparison():
    ref = torch.tensor([1.0, 2.0, float("nan"), float("inf")])
    assert autotune.outputs_match(ref, ref.clone()) is None
    assert "NaN" in autotune.outputs_match(ref, torch.tensor([1.0, float("nan"), float("nan"), float("inf")]))
    assert "inf" in autotune.outputs_match(ref, torch.tensor([1.0, 2.0, float("nan"), -float("inf")]))
    assert "relative difference" in autotune.outputs_match(ref, torch.tensor([1.0, 2.1, float("nan"), float("inf")]))
    bf = torch.randn(1000, dtype=torch.bfloat16)
    nudged = (bf.float() * (1 + 2**-8)).to(torch.bfloat16)  # a one-ulp kind of change: rounding
    assert autotune.outputs_match(bf, nudged) is None
    assert autotune.guard_tolerance(torch.float32) == 1e-5


# --------------------------------------------------------------------------------------------- cache
def counting_timer(calls):
    """The real wall-clock timer, counting its calls."""

    def timer(fn):
        calls.append(fn)
        return autotune.wall_clock_timer(fn)

    return timer


def test_cache_file_round_trip_times_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("PEFT_EXT_AUTOTUNE", "1")
    first_calls, second_calls = [], []
    tuner = autotune.Autotuner(cache_dir=tmp_path, timer=counting_timer(first_calls), max_candidates=CANDIDATES)
    previous = autotune.set_tuner(tuner)
    try:
        _round_trip(tuner, tmp_path, first_calls, second_calls)
    finally:
        autotune.set_tuner(previous)


def _round_trip(tuner, tmp_path, first_calls, second_calls):
    t = layer(20)
    y1, g1 = forward_backward(t)
    first = entries(tmp_path)
    assert len(first_calls) == tuner.stats["timed"] > 0
    second = autotune.Autotuner(cache_dir=tmp_path, timer=counting_timer(second_calls), max_candidates=CANDIDATES)
    autotune.set_tuner(second)
    try:
        y2, g2 = forward_backward(t)
    finally:
        autotune.set_tuner(tuner)
    assert second_calls == [] and second.stats["tuned"] == 0 and second.stats["disk_hits"] == len(first)
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in g1)  # the same configs: the same bits
    assert {k: v["config"] for k, v in entries(tmp_path).items()} == {k: v["config"] for k, v in first.items()}
    # clear_cache: memory forgotten, the file still answers; disk=True deletes it
    autotune.clear_cache()
    assert autotune.cache_info()["entries_in_memory"] == 0
    timed = len(first_calls)
    forward_backward(t)
    assert len(first_calls) == timed and tuner.stats["disk_hits"] > 0
    # cache_info lists the files on disk with what they hold (also for a fresh process that used none of them)
    (path,) = [str(p) for p in tmp_path.glob("*.json")]
    assert autotune.cache_info()["files"] == {path: {"entries_on_disk": len(first)}}
    fresh = autotune.set_tuner(autotune.Autotuner(cache_dir=tmp_path))
    try:
        assert autotune.cache_info()["files"] == {path: {"entries_on_disk": len(first)}}
        assert autotune.cache_info()["devices"] == {}
    finally:
        autotune.set_tuner(fresh)
    mode = (os.stat(path).st_mode & 0o777)
    assert mode & 0o044 == 0o044 & ~autotune._umask(), oct(mode)  # readable by others (umask allowing): a shared folder
    assert autotune.clear_cache(disk=True) == [path]
    assert not list(tmp_path.glob("*.json"))


def test_cache_info_with_a_bad_switch_and_an_unwritable_folder(tmp_path, monkeypatch):
    """A failed write leaves no entry reported on disk; a bad PEFT_EXT_AUTOTUNE does not stop inspection."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PEFT_EXT_AUTOTUNE", "1")
    tuner = autotune.Autotuner(cache_dir=blocker / "autotune", max_candidates=CANDIDATES)
    previous = autotune.set_tuner(tuner)
    try:
        with pytest.warns(RuntimeWarning, match="cannot write the autotune cache file"):
            t = layer(20)
            shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)
        info = autotune.cache_info()
        assert info["files"] == {} and info["entries_in_memory"] >= 1 and info["tuned"] >= 1
        monkeypatch.setenv("PEFT_EXT_AUTOTUNE", "maybe")
        assert autotune.cache_info()["mode"].startswith("invalid (PEFT_EXT_AUTOTUNE='maybe' is not understood")
    finally:
        autotune.set_tuner(previous)


def test_key_buckets_m_and_keeps_the_other_sizes_exact(tuner, tmp_path):
    assert [autotune.bucket_m(m) for m in (1, 2, 17, 32, 33, 8192, 8193)] == [1, 2, 32, 32, 64, 8192, 16384]
    t = layer(20)
    shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)
    timed = tuner.stats["timed"]
    t30 = layer(30)
    shrink_expand(t30["x"], t30["lora_a"], t30["lora_b"], 0.5)  # M 30: the same bucket (32)
    assert tuner.stats["timed"] == timed and tuner.stats["memory_hits"] == 1
    t40 = layer(40)
    shrink_expand(t40["x"], t40["lora_a"], t40["lora_b"], 0.5)  # M 40: bucket 64
    assert tuner.stats["timed"] > timed
    timed = tuner.stats["timed"]
    k48 = layer(20, K=48)
    shrink_expand(k48["x"], k48["lora_a"], k48["lora_b"], 0.5)  # another K: another key
    assert tuner.stats["timed"] > timed
    keys = sorted(entries(tmp_path))
    assert len(keys) == 3 and sum("M=32|K=40" in k for k in keys) == 1 and sum("M=64|K=40" in k for k in keys) == 1
    assert all("N=24|R=4" in k and "BLOCK_R=16" in k and "X:float32/1" in k for k in keys), keys


def test_corrupt_file_is_ignored_with_one_warning_and_rewritten(tuner, tmp_path):
    t = layer(20)
    shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)
    path = cache_file(tmp_path)
    path.write_text("{ not json")
    fresh = new_tuner(tmp_path)
    try:
        with pytest.warns(RuntimeWarning, match="corrupt autotune cache file") as record:
            shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)
            t40 = layer(40)
            shrink_expand(t40["x"], t40["lora_a"], t40["lora_b"], 0.5)
        assert sum("corrupt" in str(w.message) for w in record) == 1
        assert fresh.stats["tuned"] == 2  # nothing read from the bad file
    finally:
        autotune.set_tuner(tuner)
    data = json.loads(path.read_text())
    assert data["format"] == autotune.FORMAT and len(data["entries"]) == 2
    # an entry whose config is not a config is dropped, the rest is kept
    key = next(iter(data["entries"]))
    data["entries"][key]["config"] = {"BLOCK_M": "big"}
    path.write_text(json.dumps(data))
    third = new_tuner(tmp_path)
    try:
        shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)
        shrink_expand(t40["x"], t40["lora_a"], t40["lora_b"], 0.5)
    finally:
        autotune.set_tuner(tuner)
    assert third.stats["tuned"] == 1 and third.stats["disk_hits"] == 1


def test_write_is_atomic_and_merges(tuner, tmp_path, monkeypatch):
    t = layer(20)
    shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)
    path = cache_file(tmp_path)
    before = path.read_text()

    real_replace = os.replace

    def crash(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(autotune.os, "replace", crash)
    t40 = layer(40)
    with pytest.warns(RuntimeWarning, match="cannot write the autotune cache file"):
        shrink_expand(t40["x"], t40["lora_a"], t40["lora_b"], 0.5)
    assert path.read_text() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.name + ".lock"])  # no temp file left
    assert autotune.cache_info()["entries_in_memory"] == 2  # still served from memory
    monkeypatch.setattr(autotune.os, "replace", real_replace)
    # two processes' tuners writing to one file: each write merges what is on disk
    other = autotune.Autotuner(cache_dir=tmp_path, max_candidates=CANDIDATES)
    autotune.set_tuner(other)
    try:
        t64 = layer(64)
        shrink_expand(t64["x"], t64["lora_a"], t64["lora_b"], 0.5)
    finally:
        autotune.set_tuner(tuner)
    t128 = layer(100)
    shrink_expand(t128["x"], t128["lora_a"], t128["lora_b"], 0.5)
    buckets = sorted(int(k.split("|")[1][2:]) for k in entries(tmp_path))
    assert buckets == [32, 64, 128], buckets  # 64 was lost to the crash in this tuner's file, written by the other


# ---------------------------------------------------------------------------------------------- switch
def test_switch_off_gives_the_heuristic_exactly(tuner, tmp_path, monkeypatch, launches):
    monkeypatch.setenv("PEFT_EXT_AUTOTUNE", "0")
    t = layer(20)
    forward_backward(t)
    se = [cfg for name, cfg, _ in launches if name == "_shrink_expand_kernel"]
    wg = [cfg for name, cfg, _ in launches if name == "_wgrad_kernel"]
    assert se == [lowrank_module._shrink_expand_config(20, 4, torch.device("cpu"))]
    assert wg and all(cfg == lowrank_module._wgrad_config(20, 40 if i == 0 else 24, 4, torch.device("cpu"), None)[0]
                      for i, cfg in enumerate(wg))
    assert tuner.stats == dict.fromkeys(tuner.stats, 0) and not list(tmp_path.glob("*.json"))
    # default (auto): never tunes on the interpreter
    monkeypatch.delenv("PEFT_EXT_AUTOTUNE")
    assert autotune.mode() == "auto"
    launches.clear()
    x = layer(20)
    y = shrink_expand(x["x"], x["lora_a"], x["lora_b"], 0.5)[0]
    assert [cfg for _, cfg, _ in launches] == [lowrank_module._shrink_expand_config(20, 4, torch.device("cpu"))]
    assert tuner.stats["timed"] == 0 and y is not None
    monkeypatch.setenv("PEFT_EXT_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match=r"PEFT_EXT_AUTOTUNE='maybe'.*set it to 0"):
        shrink_expand(x["x"], x["lora_a"], x["lora_b"], 0.5)


def test_no_tuning_while_tracing(tuner, tmp_path, monkeypatch, launches):
    """Under torch.compile tracing or CUDA graph capture: the cache or the heuristic, never a timing."""
    monkeypatch.setattr(autotune, "_tracing", lambda: True)
    t = layer(20)
    shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)
    assert [cfg for _, cfg, _ in launches] == [lowrank_module._shrink_expand_config(20, 4, torch.device("cpu"))]
    assert tuner.stats["timed"] == 0 and tuner.stats["heuristic"] == 1
    monkeypatch.setattr(autotune, "_tracing", lambda: False)
    shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)
    assert tuner.stats["tuned"] == 1
    monkeypatch.setattr(autotune, "_tracing", lambda: True)
    launches.clear()
    shrink_expand(t["x"], t["lora_a"], t["lora_b"], 0.5)  # now cached: the tuned config is used
    assert [cfg for _, cfg, _ in launches] == [next(iter(entries(tmp_path).values()))["config"]]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_EXT_CACHE", str(tmp_path / "x"))
    assert autotune.default_cache_dir() == tmp_path / "x" / "autotune"
    monkeypatch.delenv("PEFT_EXT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autotune.default_cache_dir() == tmp_path / ".cache" / "peft-ext" / "autotune"
    with pytest.raises(TypeError, match="set_tuner takes an Autotuner"):
        autotune.set_tuner(object())
    with pytest.raises(ValueError, match="unknown kernel name 'nope'"):
        autotune.candidates("nope", {})


def test_candidates_hold_the_rank_and_vary_one_setting():
    heur = dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, BLOCK_R=64, num_warps=4, num_stages=3)
    cands = autotune.candidates("shrink_expand", heur)
    assert cands[0] == heur and len(cands) == len({tuple(sorted(c.items())) for c in cands})
    for c in cands[1:]:
        assert c["BLOCK_R"] == 64
        assert sum(c[k] != heur[k] for k in heur) == 1, c
    gathered = autotune.candidates("gathered", dict(heur, BLOCK_M=16))
    assert all(c["BLOCK_M"] == 16 for c in gathered)
    wgrad = autotune.candidates("wgrad", dict(BLOCK_M=64, BLOCK_C=64, BLOCK_R=16, num_warps=4, num_stages=3),
                                lambda c: 192 % c["BLOCK_M"] == 0)
    assert {c["BLOCK_M"] for c in wgrad} == {32, 64}
