"""The packed format: bit planes, group-wise quantisation, PackedDelta shapes, bytes and errors."""

from __future__ import annotations

import pytest
import torch

from peft_ext.kernels.delta_format import PackedDelta, pack_bitplanes, quantize_rtn, unpack_bitplanes
from peft_ext.kernels.sign_format import SignDelta
from peft_ext.tuners.deltacome.bands import packed_nbytes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("d", [1, 31, 32, 33, 100])
def test_bitplanes_round_trip(bits, d):
    g = torch.Generator().manual_seed(bits * 100 + d)
    codes = torch.randint(0, 2**bits, (d, 5), generator=g)
    planes = pack_bitplanes(codes, bits)
    assert planes.dtype == torch.int32 and planes.shape == (bits, -(-d // 32), 5)
    assert torch.equal(unpack_bitplanes(planes, d), codes)


def test_bitplane_layout_is_documented_one():
    """bit (i % 32) of word (p, i // 32, j) is bit p of code (i, j)."""
    codes = torch.zeros(40, 2, dtype=torch.int64)
    codes[33, 1] = 0b101
    planes = pack_bitplanes(codes, 3)
    assert planes[0, 1, 1] == 1 << 1 and planes[1].abs().sum() == 0 and planes[2, 1, 1] == 1 << 1
    codes[31, 0] = 1  # the sign bit of the int32 word
    assert pack_bitplanes(codes, 3)[0, 0, 0] == -(2**31)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_rtn_error_is_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(70, 6, generator=g)
    codes, scales, mins = quantize_rtn(x, bits, group_size=32)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    group = torch.arange(70) // 32
    deq = codes * scales.float()[group] + mins.float()[group]
    step = scales.float()[group]
    # half a step, plus the fp16 rounding of min and scale (relative 2^-11 of the range)
    slack = 2**-10 * (x.abs().max() + 2**bits * step)
    assert ((deq - x).abs() <= step / 2 + slack).all()


def test_packed_delta_bytes_and_dense():
    g = torch.Generator().manual_seed(0)
    bands = ((8, 2), (3, 5), (2, 9))
    d = PackedDelta.random(70, 100, bands, group_size=32, generator=g)
    d.check()
    assert d.nbytes == packed_nbytes(70, 100, bands, 32)
    # 16 directions: words (bits * ceil(d/32) int32), fp16 scales+mins per group, fp32 sigma
    words = (8 * 2 + 3 * 5 + 2 * 9) * (4 + 3) * 4
    assert d.nbytes == words + (4 + 3) * 16 * 2 * 2 + 16 * 4
    u, v = d.factor("u"), d.factor("v")
    torch.testing.assert_close(d.dense(), (u * d.sigma) @ v.T)


def test_from_factors_quantises_each_band_at_its_width():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(64, 4, generator=g), torch.randn(96, 4, generator=g)
    sigma = torch.ones(4)
    d = PackedDelta.from_factors(u, sigma, v, ((8, 2), (1, 2)), group_size=32)
    err = (d.factor("v") - v).abs()
    assert err[:, :2].max() < 0.05  # 8 bits
    codes = [unpack_bitplanes(planes, 96) for bits, _, _, planes in d.band_slices("v")]
    assert codes[1].max() <= 1  # 1 bit: two levels per group


def test_check_names_field_and_fix():
    d = PackedDelta.empty(16, 24, 8, ((4, 3),))
    d.v_scales = torch.zeros(2, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"v_scales.*do not match this config or this base"):
        d.check("model.q_proj")
    d = PackedDelta.empty(16, 24, 8, ((4, 3),))
    d.sigma = d.sigma.half()
    with pytest.raises(TypeError, match="sigma"):
        d.check()


def test_sign_delta_is_alpha_times_sign():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(10, 70, generator=g)
    s = SignDelta.from_delta(delta)
    torch.testing.assert_close(s.alpha, delta.abs().mean().reshape(1))
    torch.testing.assert_close(s.dense(), torch.where(delta > 0, 1.0, -1.0) * delta.abs().mean())
    assert s.nbytes == 10 * 3 * 4 + 4


def test_a_constant_group_gets_valid_codes_and_exact_values():
    codes, scales, mins = quantize_rtn(torch.full((70, 3), 0.25), 2, group_size=32)
    assert codes.min() >= 0 and codes.max() <= 3 and (scales > 0).all()
    group = torch.arange(70) // 32
    torch.testing.assert_close(codes * scales.float()[group] + mins.float()[group], torch.full((70, 3), 0.25))
