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
