"""The band schedule solver: exact byte budgets, the paper's default, and the errors."""

from __future__ import annotations

import pytest

from peft_ext.tuners.deltacome.bands import (
    PAPER_SCHEDULE, column_bytes, lowrank_rank, packed_nbytes, parse_budget, solve_bands,
)


def test_paper_schedule_on_a_7b_attention_layer():
    """4096 x 4096 at 1/16 with group 128: 2 @ 8 bits and 32 @ 3 bits as given, the 2-bit band fills the rest.
    The paper's 968 counts the codes only; with scales, mins and sigma counted the band holds fewer."""
    bands = solve_bands(4096, 4096, 1 / 16, PAPER_SCHEDULE, 128)
    assert bands[:2] == ((8, 2), (3, 32))
    bits, n = bands[2]
    assert bits == 2 and 850 < n < 968
    limit = 4096 * 4096 * 2 / 16
    assert packed_nbytes(4096, 4096, bands, 128) <= limit
    assert packed_nbytes(4096, 4096, ((8, 2), (3, 32), (2, n + 1)), 128) > limit  # the fill band is as wide as fits
    # the paper's own bookkeeping (codes only) is exact at 968: (2*8 + 32*3 + 968*2) * 8192 bits = 1/16
    assert (2 * 8 + 32 * 3 + 968 * 2) * 8192 == 4096 * 4096 * 16 // 16


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (100, 37)])
@pytest.mark.parametrize("budget", [1 / 4, 1 / 8, 1 / 16])
def test_budget_is_never_exceeded(shape, budget):
    out, inp = shape
    try:
        bands = solve_bands(out, inp, budget, [[None, 2]], 64)
    except ValueError:
        pytest.fail("a single fill band always fits")
    assert packed_nbytes(out, inp, bands, 64) <= budget * out * inp * 2
    assert sum(n for _, n in bands) <= min(out, inp)


def test_rank_caps_the_fill_band():
    bands = solve_bands(200, 8, 1.0, [[2, 8], [None, 4]], 8)  # room for 10 4-bit directions, rank 8
    assert bands == ((8, 2), (4, 6))


def test_column_bytes_counts_everything():
    # 64 x 96, 3 bits, group 32: words 2 + 3 per plane, 2 + 3 groups of fp16 scale+min, one fp32 sigma
    assert column_bytes(64, 96, 3, 32) == (2 + 3) * 4 * 3 + (2 + 3) * 4 + 4


def test_budget_too_small_for_the_fixed_bands_names_the_fix():
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj \(64 x 64\).*raise budget.*\[\[null, 2\]\]"):
        solve_bands(64, 64, 1 / 16, PAPER_SCHEDULE, 128, "layers.0.q_proj")


@pytest.mark.parametrize("text, value", [("1/16", 1 / 16), (0.125, 0.125), ("0.5", 0.5), (1, 1.0)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("bad", [0, -1, 2, "x", "1/0"])
def test_parse_budget_rejects(bad):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad)


def test_lowrank_rank_matches_bytes():
    r = lowrank_rank(4096, 4096, 1 / 16)
    assert r == 128 and r * 8192 * 2 == 4096 * 4096 * 2 / 16


# ------------------------------------------------------------------ the default: the paper's bands scaled (item 25)
def test_the_default_schedule_is_the_papers_at_4096_and_scaled_below():
    from peft_ext.tuners.deltacome import DeltaComeConfig

    assert DeltaComeConfig().bands == "scaled"
    # 7B attention and MLP: the paper's fixed 2 / 32, the fill band as with the explicit schedule
    for shape in ((4096, 4096), (11008, 4096), (4096, 11008)):
        assert solve_bands(*shape, 1 / 16, "scaled", 128) == solve_bands(*shape, 1 / 16, PAPER_SCHEDULE, 128)
    assert solve_bands(576, 576, 1 / 16, "scaled", 128)[:2] == ((8, 1), (3, 5))  # SmolLM2-135M: ceil(2*576/4096) ...


@pytest.mark.parametrize("shape", [(128, 256), (256, 128), (64, 64), (32, 32), (20, 4), (4096, 128)])
@pytest.mark.parametrize("budget", [1 / 16, 1 / 64])
def test_the_default_schedule_fits_small_matrices(shape, budget):
    """Before the fix the default bands (the paper's fixed 2 + 32 directions) did not fit a 128 x 256 k_proj at 1/16
    (5,920 bytes against 4,096): every small model failed with the defaults."""
    out, inp = shape
    bands = solve_bands(out, inp, budget, "scaled", 128, "k_proj")
    assert packed_nbytes(out, inp, bands, 128) <= budget * out * inp * 2
    assert sum(n for _, n in bands) <= min(out, inp) and [b for b, _ in bands] == [8, 3, 2]
    if shape == (128, 256) and budget == 1 / 16:
        assert bands[:2] == ((8, 1), (3, 1)) and bands[2][1] > 0  # scaled 2 -> 1 and 32 -> 1, the 2-bit band fills
    if shape == (20, 4):  # not even one 2-bit direction fits 10 bytes: nothing is stored, nothing raises
        assert bands == ((8, 0), (3, 0), (2, 0))


def test_the_explicit_paper_schedule_is_kept_as_an_option():
    with pytest.raises(ValueError, match=r"k_proj \(128 x 256\).*raise budget.*bands='scaled'"):
        solve_bands(128, 256, 1 / 16, [[2, 8], [32, 3], [None, 2]], 128, "k_proj")
    with pytest.raises(ValueError, match=r"'scaled' .* or a list of \(n_cols, bits\) pairs"):
        solve_bands(128, 256, 1 / 16, "paper", 128)
