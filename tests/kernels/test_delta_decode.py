"""Delta-CoMe decode on the version-2 slot layout (kernels/delta_decode.py, kernels/delta_format.py SlotDelta):
the format's round trips, and the fused GEMV + delta kernels (Triton interpreter) against the plain-PyTorch
reference (kernels/delta_reference.py) on float64 copies. Split partials are poisoned with NaN: every element
must be written. Shapes are small: the interpreter's cost grows with programs x loop steps."""

import pytest
import torch

from peft_ext.kernels import PackedDelta, delta_linear, delta_linear_gathered, reference_delta_linear
from peft_ext.kernels import delta as dm
from peft_ext.kernels import delta_decode as dd
from peft_ext.kernels.delta_format import (
    FORMAT_VERSION_BITPLANES,
    FORMAT_VERSION_SLOTS,
    SlotDelta,
    pack_slots,
    slot_width,
    unpack_slots,
)
from peft_ext.kernels.delta_reference import reference_delta_linear_gathered

from .accuracy import BF16, FP16, FP32, TOL, rel_err
from .test_delta_linear import Recorder, check_close, f64, make


@pytest.fixture(autouse=True)
def _poison_partials(monkeypatch):
    real = dd._new_partials
    monkeypatch.setattr(dd, "_new_partials", lambda shape, device: real(shape, device).fill_(float("nan")))


# ------------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize("bits", range(1, 9))
def test_slots_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (37, 45), generator=g)
    words = pack_slots(codes, bits)
    slot = slot_width(bits)
    assert slot in (1, 2, 4, 8) and slot >= bits
    assert words.dtype == torch.int32 and words.shape == (37, -(-45 // (32 // slot)))
    assert torch.equal(unpack_slots(words, bits, 45), codes)
    # code j of a row sits in bits [slot * (j % cpw), ...) of word j // cpw
    j = 5
    cpw = 32 // slot
    assert ((int(words[3, j // cpw]) & 0xFFFFFFFF) >> (slot * (j % cpw))) & ((1 << slot) - 1) == int(codes[3, j])


def test_slot_delta_is_the_packed_delta_relaid():
    g = torch.Generator().manual_seed(0)
    packed = PackedDelta.random(70, 45, ((8, 2), (3, 5), (1, 33), (2, 0), (7, 3)), group_size=32, generator=g)
    sd = SlotDelta.from_packed(packed)
    sd.check()
    assert packed.format_version == FORMAT_VERSION_BITPLANES and sd.format_version == FORMAT_VERSION_SLOTS
    for side in ("u", "v"):
        assert torch.equal(sd.factor(side), packed.factor(side))
    back = sd.to_packed()
    assert all(torch.equal(getattr(back, k), t) for k, t in packed.tensors().items())
    # exact storage: one int32 word per 32 / slot codes per row, plus the same scales, mins and sigma
    row_words = 1 + 1 + 2 + 0 + 1  # 2 x 8-bit, 5 x 4-bit slots (3-bit codes), 33 x 1-bit, none, 3 x 8-bit
    assert sd.u_codes.shape == (70, row_words) and sd.v_codes.shape == (45, row_words)
    assert sd.nbytes == packed.nbytes - packed.u_words.numel() * 4 - packed.v_words.numel() * 4 + (70 + 45) * row_words * 4


def test_layout_conversion_in_column_chunks_is_the_same(monkeypatch):
    """The conversion between the layouts works in chunks of columns (a multiple of 32) to bound its int64
    temporaries (delta_format.column_chunk); with the budget so small that every band is cut into 32-column chunks
    (a partial last one too), both directions give what one pass gives."""
    from peft_ext.kernels import delta_format

    g = torch.Generator().manual_seed(1)
    packed = PackedDelta.random(70, 45, ((8, 40), (3, 70), (1, 33), (2, 100)), group_size=32, generator=g)
    whole = SlotDelta.from_packed(packed)
    assert delta_format.column_chunk(2, 70) >= 100  # the default budget: one chunk per band at this size
    monkeypatch.setattr(delta_format, "CONVERSION_CHUNK_BYTES", 1)
    assert delta_format.column_chunk(8, 14336) == 32 and delta_format.column_chunk(2, 70) == 32
    chunked = SlotDelta.from_packed(packed)
    assert all(torch.equal(getattr(chunked, k), t) for k, t in whole.tensors().items())
    back = chunked.to_packed()
    assert all(torch.equal(getattr(back, k), t) for k, t in packed.tensors().items())
    # the default budget at the goal shape: 16 MiB over 2 x 14336 x 8 bytes per column of the 2-bit band
    monkeypatch.setattr(delta_format, "CONVERSION_CHUNK_BYTES", 16 * 2**20)
    assert delta_format.column_chunk(2, 14336) == 64


def test_slot_delta_check_names_the_field_and_the_fix():
    sd = SlotDelta.from_packed(PackedDelta.random(40, 30, ((2, 9),), group_size=16))
    bad = SlotDelta(**{**sd.__dict__, "u_codes": sd.u_codes[:, :0]})
    with pytest.raises(ValueError, match=r"u_codes has shape .*format version 2.*SlotDelta.from_packed"):
        bad.check()
    with pytest.raises(TypeError, match="v_scales has dtype torch.float32"):
        SlotDelta(**{**sd.__dict__, "v_scales": sd.v_scales.float()}).check()
    x, w = torch.randn(2, 30), torch.randn(40, 30)
    with pytest.raises(ValueError, match="u_codes"):
        delta_linear(x, w, None, bad)
    with pytest.raises(ValueError, match=r"is for a \(40 x 30\) layer"):
        delta_linear(torch.randn(2, 31), torch.randn(40, 31), None, sd)


# ----------------------------------------------------------------------------------------- fused decode
CASES = [
    # lead, K (in), N (out), bands, group size, dtype, bias
    ((1,), 33, 100, ((8, 2), (3, 5), (1, 9)), 32, FP32, True),  # batch 1, a 1-bit band (256-column tiles)
    ((3,), 257, 100, ((8, 2), (3, 32), (2, 70)), 128, BF16, False),  # the paper's bit widths
    ((16,), 100, 130, ((2, 70),), 40, FP32, True),  # 16 rows; group 40: scales per element in both kernels
    ((2, 5), 64, 48, tuple((b, 3) for b in range(1, 9)) + ((4, 0),), 16, FP32, True),  # bits 1..8, an empty band
    ((5,), 64, 64, ((3, 16), (2, 16)), 32, FP16, True),
]


@pytest.mark.parametrize("lead,K,N,bands,group_size,dtype,bias", CASES)
def test_fused_decode_matches_reference(lead, K, N, bands, group_size, dtype, bias):
    x, weight, b, delta = make(lead, K, N, bands, group_size, dtype, bias)
    fused = Recorder(dd._fused_decode_kernel)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dd, "_fused_decode_kernel", fused)
        y = delta_linear(x, weight, b, SlotDelta.from_packed(delta))
        assert len(fused.launches) == 1 and y.dtype == dtype and y.shape == (*lead, N)
        # a PackedDelta with the opt-in cached relayout: the same kernel, bitwise the same output
        torch.testing.assert_close(delta_linear(x, weight, b, delta, cache_relayout=True), y, rtol=0, atol=0)
        assert len(fused.launches) == 2
        # a PackedDelta by default: the bit-plane kernels (no second copy), the reference's output too
        check_close(delta_linear(x, weight, b, delta), x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), dtype)
        assert len(fused.launches) == 2
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), dtype)


@pytest.mark.parametrize("shrink_splits,splits,M", [(1, 1, 4), (3, 2, 4), (2, 4, 4), (2, 4, 1), (3, 2, 2)])
def test_split_reductions(monkeypatch, shrink_splits, splits, M):
    """The shrink split over `in` (per-split slices summed in a fixed order) and the fused reduction split over
    W's columns and U's tiles (fp32 partials summed, bias added once): each split count gives the reference, on
    the dot path (M = 4) and the batch-1/2 FMA path (its tiles strided over the splits too)."""
    real = dd.decode_config

    def forced(N, K, group_size, n_tiles, device, dtype, rows_x):
        c = real(N, K, group_size, n_tiles, device, dtype, rows_x)
        rows = dd.cdiv(dd.cdiv(K, c.block_i), shrink_splits) * c.block_i
        k_per = dd.cdiv(dd.cdiv(K, c.block_k), splits) * c.block_k
        return c._replace(shrink_splits=dd.cdiv(K, rows), rows_per_split=rows, splits=dd.cdiv(K, k_per), k_per_split=k_per)

    monkeypatch.setattr(dd, "decode_config", forced)
    fused = Recorder(dd._fused_decode_kernel)
    monkeypatch.setattr(dd, "_fused_decode_kernel", fused)
    x, weight, b, delta = make((M,), 700, 50, ((8, 2), (2, 40)), 64, FP32)
    y = delta_linear(x, weight, b, SlotDelta.from_packed(delta))
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), FP32)
    assert fused.launches[0]["SPLITS"] == min(splits, 3)  # 700 columns of W = 3 steps of 256
    assert fused.launches[0]["FMA_ROWS"] == (M if M <= 2 else 0)


# the benchmark shapes scaled down (out rows: BLOCK_O = 16 as at 4096 rows, 32 as at 14336 in the interpreter's
# config), the paper's 8/3/2-bit bands, one scale group per tile (the FMA path's condition)
SMALL_SHAPES = {"4096x4096/16": (64, 96, ((8, 2), (3, 6), (2, 45))), "14336x4096/32": (288, 96, ((8, 2), (3, 5), (2, 70)))}


@pytest.mark.parametrize("shape", list(SMALL_SHAPES))
@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_batch_paths_match_reference(shape, M, dtype):
    """Batch 1 and 2 take the FMA path for the <= 4-bit bands (codes decoded two per 32-bit op into fp32 128 + code,
    scale and min folded into T, no dot), batch 16 the dot path; each against the float64 reference, with the
    launch's FMA_ROWS and tile width checked."""
    N, K, bands = SMALL_SHAPES[shape]
    x, weight, b, delta = make((M,), K, N, bands, 32, dtype, seed=M)
    fused = Recorder(dd._fused_decode_kernel)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dd, "_fused_decode_kernel", fused)
        y = delta_linear(x, weight, b, SlotDelta.from_packed(delta))
    launch = fused.launches[0]
    assert launch["FMA_ROWS"] == (M if M <= 2 else 0) and launch["BLOCK_O"] == (16 if N == 64 else 32)
    assert launch["WPT"] == (16 if M == 1 and N == 64 else 8)
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), dtype)


@pytest.mark.parametrize("M", [1, 2])
def test_fma_path_fp32_accuracy_and_extreme_codes(M):
    """fp32 (perf.md: 1e-4): the FMA path's 128 + code offset, cancelled per column, costs no visible accuracy; every
    code of U at its largest value (all bit planes set), bands of 1, 2 and 4-bit slots, a band narrower than a word
    and one that ends inside a tile."""
    x, weight, b, delta = make((M,), 80, 48, ((1, 40), (2, 3), (3, 37), (4, 19), (8, 2)), 16, FP32, seed=3)
    delta.u_words.fill_(-1)
    ref_delta = delta
    sd = SlotDelta.from_packed(delta)
    assert int(sd.codes("u").max()) == 255 and int(sd.codes("u")[:, :40].max()) == 1
    fused = Recorder(dd._fused_decode_kernel)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dd, "_fused_decode_kernel", fused)
        y = delta_linear(x, weight, b, sd)
    assert fused.launches[0]["FMA_ROWS"] == M
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), ref_delta), FP32)


def test_zero_rank_delta_is_the_base():
    x, weight, b, delta = make((3,), 40, 30, ((2, 0),), 32, FP32)
    for d in (delta, SlotDelta.from_packed(delta)):
        for rows in (x, torch.cat([x] * 7)):  # decode, prefill
            y = delta_linear(rows, weight, b, d)
            assert rel_err(y, torch.nn.functional.linear(f64(rows), f64(weight), f64(b))) <= TOL[FP32]


def test_fp16_large_t_stays_in_range(gpu_fp16_math):
    """The fused kernel reads T in fp32 for fp16 inputs (|T| > 65504 here)."""
    from .test_delta_linear import large_t_delta

    K, N = 70, 100
    delta = large_t_delta(K, N)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, K, generator=g) * 2).half()
    weight = (torch.randn(N, K, generator=g) * K**-0.5).half()
    assert ((x.double() @ delta.factor("v").double()) * delta.sigma.double()).abs().max() > 65504
    y = delta_linear(x, weight, None, SlotDelta.from_packed(delta))
    assert y.isfinite().all()
    check_close(y, x, weight, None, reference_delta_linear(f64(x), f64(weight), None, delta), FP16)


def test_an_older_triton_serves_decode_with_the_slot_kernels(monkeypatch):
    """The fused decode indexes constexpr tuples, which Triton < 3.3 cannot compile: with such a Triton, decode
    batches go to the slot kernels (same results), and decode=True names the version and the fix."""
    import triton

    slot_shrink = Recorder(dm._slot_delta_shrink_kernel)
    monkeypatch.setattr(dm, "_slot_delta_shrink_kernel", slot_shrink)
    fused = Recorder(dd._fused_decode_kernel)
    monkeypatch.setattr(dd, "_fused_decode_kernel", fused)
    x, weight, b, delta = make((2,), 40, 30, ((2, 3), (3, 2)), 32, FP32)
    sd = SlotDelta.from_packed(delta)
    ref = reference_delta_linear(f64(x), f64(weight), f64(b), delta)
    assert dd.fused_decode_supported()  # the installed Triton (the CI's newest) compiles it
    try:
        monkeypatch.setattr(triton, "__version__", "3.2.0")
        dd.fused_decode_supported.cache_clear()  # the answer is cached per process (asked at every decode call)
        assert not dd.fused_decode_supported()
        check_close(delta_linear(x, weight, b, sd), x, weight, b, ref, FP32)
        assert (len(fused.launches), len(slot_shrink.launches)) == (0, 1)
        with pytest.raises(ValueError, match=r"decode=True needs Triton >= 3.3 \(installed: 3.2.0; upgrade triton"):
            delta_linear(x, weight, b, sd, decode=True)
        monkeypatch.setattr(triton, "__version__", "3.3.0")
        dd.fused_decode_supported.cache_clear()
        assert dd.fused_decode_supported()
    finally:
        dd.fused_decode_supported.cache_clear()  # recomputed for the installed version by the tests after this one


def test_paths_and_decode_argument(monkeypatch):
    """A SlotDelta: <= 16 rows the fused decode, more rows or decode=False the slot kernels (never a conversion
    to bit planes). A PackedDelta: the bit-plane kernels at every size unless cache_relayout=True. decode=True
    where it cannot run: a clear error."""
    shrink = Recorder(dm._delta_shrink_kernel)
    monkeypatch.setattr(dm, "_delta_shrink_kernel", shrink)
    slot_shrink = Recorder(dm._slot_delta_shrink_kernel)
    monkeypatch.setattr(dm, "_slot_delta_shrink_kernel", slot_shrink)
    fused = Recorder(dd._fused_decode_kernel)
    monkeypatch.setattr(dd, "_fused_decode_kernel", fused)
    monkeypatch.setattr(SlotDelta, "to_packed", lambda self: pytest.fail("a SlotDelta was converted to bit planes"))
    x, weight, b, delta = make((20,), 40, 30, ((2, 3), (3, 2)), 32, FP32)
    sd = SlotDelta.from_packed(delta)
    ref = reference_delta_linear(f64(x), f64(weight), f64(b), delta)
    check_close(delta_linear(x, weight, b, sd), x, weight, b, ref, FP32)  # 20 rows: slot kernels
    check_close(delta_linear(x[:16], weight, b, sd), x[:16], weight, b, ref[:16], FP32)  # fused
    check_close(delta_linear(x[:2], weight, b, sd, decode=False), x[:2], weight, b, ref[:2], FP32)  # slot kernels
    assert (len(fused.launches), len(slot_shrink.launches), len(shrink.launches)) == (1, 2, 0)
    check_close(delta_linear(x[:2], weight, b, delta), x[:2], weight, b, ref[:2], FP32)  # bit planes
    check_close(delta_linear(x, weight, b, delta), x, weight, b, ref, FP32)  # bit planes
    w_t = weight.T.contiguous().T  # a transposed view: unit row stride
    check_close(delta_linear(x[:2], w_t, b, sd), x[:2], weight, b, ref[:2], FP32)  # slot kernels
    check_close(delta_linear(x[:2], weight, b, delta, cache_relayout=True), x[:2], weight, b, ref[:2], FP32)  # fused
    assert (len(fused.launches), len(slot_shrink.launches), len(shrink.launches)) == (2, 3, 2)
    with pytest.raises(ValueError, match="decode=True needs at most 16 rows"):
        delta_linear(x, weight, b, sd, decode=True)
    with pytest.raises(ValueError, match="unit column stride"):
        delta_linear(x[:2], w_t, b, sd, decode=True)
    with pytest.raises(ValueError, match=r"decode=True .* pass a SlotDelta .*cache_relayout=True"):
        delta_linear(x[:2], weight, b, delta, decode=True)
    with pytest.raises(TypeError, match=r"SlotDelta.from_packed.*cache_relayout=True.*twice the memory"):
        dd.fused_decode(x[:2], weight, b, delta)
    index = torch.tensor([0, -1, 0, 0] * 5)
    y_g = delta_linear_gathered(x, weight, b, [sd], index)
    check_close(y_g, x, weight, b, reference_delta_linear_gathered(f64(x), f64(weight), f64(b), [delta], index), FP32)
    assert len(shrink.launches) == 2  # the gathered SlotDelta: slot kernels too


def test_gathered_mixed_layouts_one_launch_pair_per_layout(monkeypatch):
    """Tenants of both layouts in one batch: each read in its own layout (no conversion), one launch pair each."""
    shrink = Recorder(dm._delta_shrink_kernel)
    monkeypatch.setattr(dm, "_delta_shrink_kernel", shrink)
    slot_shrink = Recorder(dm._slot_delta_shrink_kernel)
    monkeypatch.setattr(dm, "_slot_delta_shrink_kernel", slot_shrink)
    monkeypatch.setattr(SlotDelta, "to_packed", lambda self: pytest.fail("a SlotDelta was converted to bit planes"))
    monkeypatch.setattr(SlotDelta, "from_packed", lambda d: pytest.fail("a PackedDelta was converted to slots"))
    g = torch.Generator().manual_seed(3)
    x, weight, b, d0 = make((9,), 70, 50, ((8, 2), (2, 20)), 32, FP32)
    d1 = PackedDelta.random(50, 70, ((3, 7), (1, 40)), group_size=32, generator=g)
    d2 = PackedDelta.random(50, 70, ((4, 5),), group_size=32, generator=g)
    from peft_ext.kernels.delta_format import slot_codes_from_words

    def slots(d):
        codes = {f"{side}_codes": slot_codes_from_words(getattr(d, f"{side}_words"), n, d.bands) for side, n in (("v", 70), ("u", 50))}
        return SlotDelta(d.out_features, d.in_features, d.group_size, d.bands, sigma=d.sigma, v_scales=d.v_scales,
                         v_mins=d.v_mins, u_scales=d.u_scales, u_mins=d.u_mins, **codes)  # fmt: skip

    index = torch.tensor([2, 0, -1, 1, 1, 0, 2, 2, 1])
    for det in (False, True):
        y = delta_linear_gathered(x, weight, b, [slots(d0), d1, slots(d2)], index, deterministic=det)
        ref = reference_delta_linear_gathered(f64(x), f64(weight), f64(b), [d0, d1, d2], index)
        check_close(y, x, weight, b, ref, FP32)
    assert len(shrink.launches) == 2 and len(slot_shrink.launches) == 2


def test_reference_backend_reads_a_slot_delta():
    x, weight, b, delta = make((2, 3), 40, 30, ((2, 5), (8, 1)), 32, FP32)
    sd = SlotDelta.from_packed(delta)
    torch.testing.assert_close(delta_linear(x, weight, b, sd, backend="reference"),
                               delta_linear(x, weight, b, delta, backend="reference"), rtol=0, atol=0)  # fmt: skip
    index = torch.tensor([0, -1])
    torch.testing.assert_close(delta_linear_gathered(x, weight, b, [sd], index, backend="reference"),
                               delta_linear_gathered(x, weight, b, [delta], index, backend="reference"), rtol=0, atol=0)  # fmt: skip


def test_cached_relayout_is_opt_in_and_converted_once(monkeypatch):
    """No silent second copy: a PackedDelta is converted to slots only with cache_relayout=True (then once per
    contents, kept beside it); a SlotDelta is never converted to bit planes (prefill included)."""
    x, weight, b, delta = make((2,), 40, 30, ((2, 3),), 32, FP32)
    calls = []
    real = SlotDelta.from_packed.__func__

    def counted(cls, d):
        calls.append(1)
        return real(cls, d)

    monkeypatch.setattr(SlotDelta, "from_packed", classmethod(counted))
    for _ in range(3):
        delta_linear(x, weight, b, delta)
    assert calls == [] and not hasattr(delta.u_words, dd._ATTR)  # the default: bit-plane kernels, nothing kept
    for _ in range(3):
        delta_linear(x, weight, b, delta, cache_relayout=True)
    assert len(calls) == 1 and hasattr(delta.u_words, dd._ATTR)
    # an in-place change of the delta (e.g. load_state_dict into the same buffers) is seen: converted again
    y = delta_linear(x, weight, b, delta, cache_relayout=True)
    delta.sigma.mul_(3.0)
    delta.u_words.copy_(delta.u_words.flip(0))
    y2 = delta_linear(x, weight, b, delta, cache_relayout=True)
    assert len(calls) == 2
    check_close(y2, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), FP32)
    assert not torch.allclose(y, y2)
    # a SlotDelta at prefill reads its slots: nothing converted, nothing kept, in-place changes seen
    sd = SlotDelta.from_packed(delta)
    monkeypatch.setattr(SlotDelta, "to_packed", lambda self: pytest.fail("a SlotDelta was converted to bit planes"))
    x20 = torch.randn(20, 40)
    delta_linear(x20, weight, b, sd)
    sd.v_scales.mul_(0.5)
    check_close(delta_linear(x20, weight, b, sd), x20, weight, b, reference_delta_linear(f64(x20), f64(weight), f64(b), sd), FP32)
    assert not any(hasattr(t, dd._ATTR) for t in sd.tensors().values())


def test_bytes_model_counts_the_stored_tensors():
    """decode_bytes_model's delta bytes are the tensors' own sizes (slot codes for the fused path, bit planes for
    the old one), W / x / y at the input dtype; the old path adds the expand's read-modify-write of y."""
    packed = PackedDelta.random(100, 70, ((8, 2), (3, 5), (2, 33)), group_size=32)
    sd = SlotDelta.from_packed(packed)
    base = dd.decode_bytes_model(4, packed, 2, "base")
    assert base == dict(W=100 * 70 * 2, x=4 * 70 * 2, y=4 * 100 * 2, total=100 * 70 * 2 + 4 * 170 * 2)
    fused, old = dd.decode_bytes_model(4, packed, 2, "fused"), dd.decode_bytes_model(4, sd, 2, "bitplanes")
    small = sum(t.numel() * t.element_size() for k, t in packed.tensors().items() if not k.endswith("words"))
    assert fused["codes"] == sd.u_codes.numel() * 4 + sd.v_codes.numel() * 4 and fused["scales"] == small
    assert old["codes"] == (packed.u_words.numel() + packed.v_words.numel()) * 4 and old["scales"] == small
    assert old["y_rmw"] == 2 * base["y"] and fused["total"] == sum(v for k, v in fused.items() if k != "total")
    with pytest.raises(ValueError, match="path must be"):
        dd.decode_bytes_model(4, packed, 2, "other")


# ------------------------------------------------------------------------------------------------ GPU
BENCH_SHAPES = [(4096, 4096, ((8, 2), (3, 32), (2, 968))), (14336, 4096, ((8, 2), (3, 32), (2, 1428)))]


@pytest.mark.gpu
@pytest.mark.parametrize("out_f,in_f,bands", BENCH_SHAPES)
@pytest.mark.parametrize("M", [1, 2, 4, 16])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_gpu_fused_decode_benchmark_shapes(out_f, in_f, bands, M, dtype):
    x, weight, b, delta = make((M,), in_f, out_f, bands, 128, dtype, device="cuda")
    fused = Recorder(dd._fused_decode_kernel)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(dd, "_fused_decode_kernel", fused)
        y = delta_linear(x, weight, b, SlotDelta.from_packed(delta))
    assert len(fused.launches) == 1
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), dtype)


@pytest.mark.gpu
def test_gpu_split_fused_reduction():
    """1024 output rows: fewer output blocks than SMs, so the fused reduction is split (fp32 partials)."""
    x, weight, b, delta = make((3,), 4096, 1024, ((8, 2), (3, 32), (2, 200)), 128, BF16, device="cuda")
    fused = Recorder(dd._fused_decode_kernel)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(dd, "_fused_decode_kernel", fused)
        y = delta_linear(x, weight, b, SlotDelta.from_packed(delta))
    assert fused.launches[0]["SPLITS"] > 1
    check_close(y, x, weight, b, reference_delta_linear(f64(x), f64(weight), f64(b), delta), BF16)
