"""The band schedule: how many singular directions each bit width gets, solved so a layer fills its byte budget.

A schedule is written the way the paper states it, as (n_cols, bits) pairs, largest singular values first:
`[[2, 8], [32, 3], [None, 2]]` = 2 directions at 8 bits, 32 at 3 bits, then as many 2-bit directions as the
budget holds (None = "fill"). The paper's 7B default at 1/16 is 2 / 32 / 968 (attention) and 2 / 32 / 1,428 (MLP)
at 8 / 3 / 2 bits; with `[[2, 8], [32, 3], [None, 2]]` the fill band follows from each layer's shape.

The default, `"scaled"`, is that schedule with its fixed counts scaled to each matrix: the paper set 2 and 32 for
4096-wide matrices, so a matrix of rank r = min(out, in) gets ceil(2 r / 4096) and ceil(32 r / 4096) directions (the
paper's own 2 / 32 at r = 4096, 1 / 5 at SmolLM2-135M's 576, 1 / 1 at 128). For a square matrix this keeps the fixed
bands' share of the budget at the paper's (5.5 % of the code bits at 1/16) whatever its size; where even the scaled
bands exceed a small layer's budget they shrink, the last band first, until they fit (the fill band takes the
rest). An explicit schedule is used as given and raises when its fixed bands exceed a layer's budget.

Budget bookkeeping is exact: a layer may use at most `budget * out * in * 2` bytes (the fp16 dense delta times
the budget), counting everything that is stored: the bit-plane words (padded to 32 rows), the fp16 scales and
mins of every group, and the fp32 singular values. (The paper counts only the codes; with group size 128 the
scales add 0.25 bit per value, so our bands come out a little narrower than the paper's at the same budget.)
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Union

from peft_ext.kernels.delta_format import MAX_BITS, PackedDelta, check_bands

PAPER_SCHEDULE = ((2, 8), (32, 3), (None, 2))  # (n_cols, bits); None fills the budget
SCALED = "scaled"  # the default: PAPER_SCHEDULE with its fixed counts scaled to each matrix's rank
REFERENCE_RANK = 4096  # the width the paper's fixed counts were set for (7B: 4096 x 4096 and 11008 x 4096)
Budget = Union[float, str, Fraction]


def parse_budget(budget: Budget, field_name: str = "budget") -> float:
    """1/16, 0.0625 or "1/16" -> 0.0625; must be in (0, 1]."""
    try:
        value = float(Fraction(budget)) if isinstance(budget, str) else float(budget)
    except (ValueError, ZeroDivisionError, TypeError):
        raise ValueError(f"{field_name} must be a fraction of the dense fp16 delta such as 1/16 or 0.0625, got {budget!r}.") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{field_name} must be in (0, 1] (a fraction of the dense fp16 delta's size, e.g. 1/16), got {budget!r}.")
    return value


def check_schedule(schedule, field_name: str = "bands"):
    """Validates a (n_cols | None, bits) schedule (at most one None (fill) band) and returns it as a tuple of pairs,
    or "scaled" as is."""
    if isinstance(schedule, str):
        if schedule != SCALED:
            raise ValueError(
                f"{field_name} must be {SCALED!r} (the paper's [[2, 8], [32, 3], [null, 2]] scaled to each matrix) or a "
                f"list of (n_cols, bits) pairs such as [[2, 8], [32, 3], [null, 2]], got {schedule!r}."
            )
        return schedule
    out = []
    for i, band in enumerate(schedule):
        if not isinstance(band, (list, tuple)) or len(band) != 2:
            raise ValueError(f"{field_name}[{i}] must be an (n_cols, bits) pair such as [32, 3] or [null, 2], got {band!r}.")
        n, bits = band
        if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"{field_name}[{i}] has bits={bits!r}; bit widths must be integers from 1 to {MAX_BITS}.")
        if n is not None and (not isinstance(n, int) or n < 0):
            raise ValueError(f"{field_name}[{i}] has n_cols={n!r}; use a count >= 0, or null to fill the budget.")
        out.append((n, bits))
    if sum(n is None for n, _ in out) > 1:
        raise ValueError(f"{field_name} may have one fill band (n_cols null), got {sum(n is None for n, _ in out)}.")
    if not out:
        raise ValueError(f"{field_name} is empty; give at least one (n_cols, bits) band, e.g. [[2, 8], [32, 3], [null, 2]].")
    return tuple(out)


def column_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> float:
    """Bytes one singular direction costs at `bits` (codes of U and V columns, their scales and mins, sigma)."""
    words = -(-in_features // 32) + -(-out_features // 32)
    groups = -(-in_features // group_size) + -(-out_features // group_size)
    return words * 4 * bits + groups * 2 * 2 + 4


def scaled_schedule(out_features: int, in_features: int, budget: float, group_size: int) -> tuple:
    """The default schedule of one matrix: PAPER_SCHEDULE's fixed counts n scaled to ceil(n * min(out, in) / 4096),
    then shrunk (the last fixed band first) until they fit the layer's budget; the fill band stays."""
    rank = min(out_features, in_features)
    limit = budget * out_features * in_features * 2
    counts = [None if n is None else -(-n * rank // REFERENCE_RANK) for n, _ in PAPER_SCHEDULE]
    counts = [None if n is None else min(n, rank) for n in counts]

    def cost():
        left, total = rank, 0.0
        for n, (_, bits) in zip(counts, PAPER_SCHEDULE):
            if n is not None:
                total += min(n, left) * column_bytes(out_features, in_features, bits, group_size)
                left -= min(n, left)
        return total

    for i in reversed(range(len(counts))):
        while counts[i] and cost() > limit:
            counts[i] -= 1
    return tuple((n, bits) for n, (_, bits) in zip(counts, PAPER_SCHEDULE))


def solve_bands(
    out_features: int, in_features: int, budget: float, schedule, group_size: int, layer: str = "layer"
) -> tuple[tuple[int, int], ...]:
    """(bits, n_cols) per band for one layer: fixed bands as given (or, for "scaled", scaled to the matrix), the fill
    band as wide as the budget allows, no more directions than the delta's rank min(out, in). Raises if the fixed
    bands of an explicit schedule alone exceed the budget."""
    schedule = check_schedule(schedule)
    if schedule == SCALED:
        schedule = scaled_schedule(out_features, in_features, budget, group_size)
    limit = budget * out_features * in_features * 2
    rank_left = min(out_features, in_features)
    fixed = 0.0
    for n, bits in schedule:
        if n is not None:
            fixed += min(n, rank_left) * column_bytes(out_features, in_features, bits, group_size)
            rank_left -= min(n, rank_left)
    if fixed > limit:
        raise ValueError(
            f"budget {budget:g} gives {layer} ({out_features} x {in_features}) {int(limit):,} bytes, but the fixed bands "
            f"of bands={json.dumps([list(b) for b in schedule])} need {int(fixed):,}: raise budget or use fewer/narrower fixed bands "
            f"(e.g. bands=[[null, 2]] lets one band fill whatever the budget holds, and the default bands='{SCALED}' "
            f"scales the paper's fixed bands to each matrix)."
        )
    bands, rank_left, left = [], min(out_features, in_features), limit - fixed
    for n, bits in schedule:
        if n is None:
            n = min(rank_left, int(left // column_bytes(out_features, in_features, bits, group_size)))
        n = min(n, rank_left)
        rank_left -= n
        bands.append((bits, n))
    return check_bands(bands)


def lowrank_rank(out_features: int, in_features: int, budget: float) -> int:
    """The low-rank baseline's rank at a budget: r fp16 directions cost r * (out + in) * 2 bytes."""
    return min(out_features, in_features, int(budget * out_features * in_features // (out_features + in_features)))


def packed_nbytes(out_features: int, in_features: int, bands, group_size: int) -> int:
    shapes = PackedDelta.expected_shapes(out_features, in_features, group_size, bands)
    sizes = {"sigma": 4, "v_words": 4, "u_words": 4}
    total = 0
    for name, shape in shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        total += numel * sizes.get(name, 2)
    return total
