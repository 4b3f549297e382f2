"""The storage format of a mixed-precision compressed delta (Delta-CoMe), shared by the compressor and kernels.

A delta dW (out x in) is stored as k singular directions, dW ~= U diag(sigma) V^T with U (out x k) and V (in x k)
quantised column by column. The directions are split into consecutive *bands* (bits, n_cols), largest singular
values first, e.g. ((8, 2), (3, 32), (2, 968)): each band's columns are quantised to that many bits.

Per side (V: length d = in_features, U: length d = out_features), for all k columns:
  - integer codes q in [0, 2^bits - 1], stored as *bit planes*: band b is an int32 array [bits_b, W, n_b] with
    W = ceil(d / 32) words per column and plane, bit (i % 32) of word (p, i // 32, j) being bit p of q[i, j].
    Any bit width costs exactly `bits` bits per value (3-bit codes need no 10-in-32 packing with waste), and a
    kernel dequantises a value with `bits` shift-and-mask steps. The bands' arrays are flattened and concatenated
    in band order into one int32 vector (`v_words` / `u_words`).
  - group-wise asymmetric scales: value = q * scale[g, j] + min[g, j] with g = i // group_size; `*_scales` and
    `*_mins` are fp16 [ceil(d / group_size), k].
sigma (k,) is kept in fp32. Nothing here ever builds the dense delta except `PackedDelta.dense()` (for merging
and tests).

`nbytes` is the exact storage of all tensors (padding words included), the figure budgets are matched against.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Optional, Sequence

import torch

WORD_BITS = 32
MAX_BITS = 8
MIN_SCALE = 2.0**-24  # the smallest positive fp16 (subnormal): smaller steps would round to a zero scale
FORMAT_VERSION_BITPLANES = 1  # PackedDelta: bit planes (the adapter files' format)
FORMAT_VERSION_SLOTS = 2  # SlotDelta: codes in power-of-two slots of int32 words, row-major (the decode layout)
TENSOR_FIELDS = ("sigma", "v_words", "v_scales", "v_mins", "u_words", "u_scales", "u_mins")

__all__ = ["FORMAT_VERSION_BITPLANES", "FORMAT_VERSION_SLOTS", "MAX_BITS", "PackedDelta", "SlotDelta", "pack_slots", "unpack_slots", "slot_width", "slot_words", "slot_codes_from_words", "words_from_slot_codes", "check_bands", "pack_bitplanes", "unpack_bitplanes", "quantize_rtn", "words_per_column"]


def words_per_column(d: int) -> int:
    return -(-d // WORD_BITS)


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (d, n) in [0, 2^bits) -> int32 bit planes (bits, ceil(d/32), n)."""
    d, n = codes.shape
    words = words_per_column(d)
    padded = torch.zeros(words * WORD_BITS, n, dtype=torch.int64, device=codes.device)
    padded[:d] = codes.to(torch.int64)
    padded = padded.view(words, WORD_BITS, n)
    shifts = torch.arange(WORD_BITS, device=codes.device, dtype=torch.int64).view(1, WORD_BITS, 1)
    planes = []
    for p in range(bits):
        bit = (padded >> p) & 1
        word = (bit << shifts).sum(dim=1)  # int64 in [0, 2^32)
        planes.append(torch.where(word >= 2**31, word - 2**32, word))  # two's complement into int32
    if not planes:
        return torch.zeros(0, words, n, dtype=torch.int32, device=codes.device)
    return torch.stack(planes).to(torch.int32)


def unpack_bitplanes(planes: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `pack_bitplanes`: int32 (bits, W, n) -> int64 codes (d, n)."""
    bits, words, n = planes.shape
    shifts = torch.arange(WORD_BITS, device=planes.device, dtype=torch.int64).view(1, 1, WORD_BITS, 1)
    bit_values = (planes.to(torch.int64).unsqueeze(2) >> shifts) & 1  # (bits, W, 32, n)
    weights = (1 << torch.arange(bits, device=planes.device, dtype=torch.int64)).view(bits, 1, 1, 1)
    codes = (bit_values * weights).sum(dim=0).reshape(words * WORD_BITS, n)
    return codes[:d]


def quantize_rtn(columns: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest group-wise asymmetric quantisation of (d, n) along d.

    Returns (codes int64 (d, n), scales fp16 (G, n), mins fp16 (G, n)); the dequantised value is
    codes * scales + mins with the fp16 scales/mins (what the kernels read)."""
    d, n = columns.shape
    groups = -(-d // group_size)
    maxq = (1 << bits) - 1
    padded = torch.zeros(groups * group_size, n, dtype=torch.float32, device=columns.device)
    padded[:d] = columns.float()
    grouped = padded.view(groups, group_size, n)
    if d % group_size:  # the last group's padding must not widen its range
        valid = torch.arange(groups * group_size, device=columns.device).view(groups, group_size, 1) < d
        lo = torch.where(valid, grouped, torch.inf).amin(dim=1)
        hi = torch.where(valid, grouped, -torch.inf).amax(dim=1)
    else:
        lo, hi = grouped.amin(dim=1), grouped.amax(dim=1)
    scales, mins = grid_for_range(lo, hi, bits)
    codes = codes_on_grid(padded.view(groups, group_size, n), scales.unsqueeze(1), mins.unsqueeze(1), maxq)
    return codes.reshape(groups * group_size, n)[:d], scales, mins


def grid_for_range(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """fp16 (scale, min) of the asymmetric grid min + q * scale, q in [0, 2^bits), covering [lo, hi]."""
    maxq = (1 << bits) - 1
    scale = ((hi - lo) / maxq).clamp_min(MIN_SCALE)  # a constant group still gets a non-zero fp16 step
    return scale.to(torch.float16), lo.to(torch.float16)


def codes_on_grid(values: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest code of `values` on the grid given by fp16 scales/mins (broadcast), clamped to [0, maxq]."""
    scale, low = scales.float(), mins.float()
    return torch.round((values - low) / scale).clamp_(0, maxq).to(torch.int64)


def check_bands(bands: Sequence[Sequence[int]], field_name: str = "bands") -> tuple[tuple[int, int], ...]:
    """Validates a band schedule ((bits, n_cols), ...) and returns it as a tuple of int pairs."""
    out = []
    for i, band in enumerate(bands):
        if len(band) != 2:
            raise ValueError(f"{field_name}[{i}] must be a (bits, n_cols) pair, got {band!r}.")
        bits, n = int(band[0]), int(band[1])
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"{field_name}[{i}] has bits={bits}; bit widths must be between 1 and {MAX_BITS}.")
        if n < 0:
            raise ValueError(f"{field_name}[{i}] has n_cols={n}; column counts must be >= 0.")
        out.append((bits, n))
    return tuple(out)


@dataclass
class PackedDelta:
    """One layer's compressed delta (see the module docstring for the layout)."""

    out_features: int
    in_features: int
    group_size: int
    bands: tuple[tuple[int, int], ...]
    sigma: torch.Tensor  # fp32 (k,)
    v_words: torch.Tensor  # int32 (sum_b bits_b * n_b * ceil(in / 32),)
    v_scales: torch.Tensor  # fp16 (ceil(in / group_size), k)
    v_mins: torch.Tensor
    u_words: torch.Tensor  # int32 (sum_b bits_b * n_b * ceil(out / 32),)
    u_scales: torch.Tensor  # fp16 (ceil(out / group_size), k)
    u_mins: torch.Tensor

    format_version = FORMAT_VERSION_BITPLANES  # a class constant (not a dataclass field)

    # ------------------------------------------------------------------------------------------- shape facts
    @property
    def rank(self) -> int:
        return sum(n for _, n in self.bands)

    @property
    def bit_columns(self) -> int:
        """sum over bands of bits * n_cols: the planes per word row."""
        return sum(bits * n for bits, n in self.bands)

    @property
    def device(self) -> torch.device:
        return self.sigma.device

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in TENSOR_FIELDS)

    @staticmethod
    def expected_shapes(out_features: int, in_features: int, group_size: int, bands) -> dict[str, tuple[int, ...]]:
        k = sum(n for _, n in bands)
        plane_cols = sum(bits * n for bits, n in bands)
        shapes = {"sigma": (k,)}
        for side, d in (("v", in_features), ("u", out_features)):
            groups = -(-d // group_size)
            shapes[f"{side}_words"] = (plane_cols * words_per_column(d),)
            shapes[f"{side}_scales"] = (groups, k)
            shapes[f"{side}_mins"] = (groups, k)
        return shapes

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, bands, device=None) -> "PackedDelta":
        """All-zero tensors of the right shapes: a zero delta (scales and mins 0), to be filled by a state dict."""
        return _zero_delta(cls, out_features, in_features, group_size, bands, device)

    @classmethod
    def from_factors(cls, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, bands, group_size: int) -> "PackedDelta":
        """Round-to-nearest quantisation of given factors u (out, k), v (in, k) band by band."""
        bands = check_bands(bands)
        k = sum(n for _, n in bands)
        if u.shape[1] != k or v.shape[1] != k or sigma.shape != (k,):
            raise ValueError(f"factors have {u.shape[1]}/{v.shape[1]}/{tuple(sigma.shape)} columns, bands hold {k}.")
        sides = {}
        for side, mat in (("v", v), ("u", u)):
            codes, scales, mins = [], [], []
            start = 0
            for bits, n in bands:
                c, s, m = quantize_rtn(mat[:, start : start + n], bits, group_size)
                codes.append(pack_bitplanes(c, bits).reshape(-1))
                scales.append(s)
                mins.append(m)
                start += n
            sides[f"{side}_words"] = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int32)
            sides[f"{side}_scales"] = torch.cat(scales, dim=1)
            sides[f"{side}_mins"] = torch.cat(mins, dim=1)
        return cls(u.shape[0], v.shape[0], group_size, bands, sigma=sigma.float().contiguous(), **sides)

    @classmethod
    def random(
        cls, out_features: int, in_features: int, bands, group_size: int = 128,
        generator: Optional[torch.Generator] = None, device=None, sigma_scale: float = 1.0,
    ) -> "PackedDelta":
        """Random valid contents (random orthonormal-ish factors quantised with RTN): for tests and benchmarks."""
        bands = check_bands(bands)
        k = sum(n for _, n in bands)
        u = torch.randn(out_features, k, generator=generator) / out_features**0.5
        v = torch.randn(in_features, k, generator=generator) / in_features**0.5
        sigma = torch.sort(torch.rand(k, generator=generator), descending=True).values * sigma_scale
        return cls.from_factors(u, sigma, v, bands, group_size).to(device)

    # -------------------------------------------------------------------------------------------- unpacking
    def band_slices(self, side: str) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """(bits, col_start, n_cols, planes (bits, W, n)) per band of one side ("u" or "v")."""
        d = self.in_features if side == "v" else self.out_features
        words = words_per_column(d)
        flat = getattr(self, f"{side}_words")
        offset = col = 0
        for bits, n in self.bands:
            size = bits * words * n
            yield bits, col, n, flat[offset : offset + size].view(bits, words, n)
            offset += size
            col += n

    def factor(self, side: str) -> torch.Tensor:
        """Dequantised U (out, k) or V (in, k) in fp32, exactly as the kernels compute it."""
        d = self.in_features if side == "v" else self.out_features
        codes = torch.zeros(d, self.rank, dtype=torch.float32, device=self.device)
        for _, col, n, planes in self.band_slices(side):
            codes[:, col : col + n] = unpack_bitplanes(planes, d).float()
        group = torch.arange(d, device=self.device) // self.group_size
        scales = getattr(self, f"{side}_scales").float()[group]
        mins = getattr(self, f"{side}_mins").float()[group]
        return codes * scales + mins

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The delta U diag(sigma) V^T (out, in): for merging and tests, never on the serving path."""
        u, v = self.factor("u"), self.factor("v")
        return ((u * self.sigma) @ v.T).to(dtype)

    # ---------------------------------------------------------------------------------------------- moving
    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_FIELDS}

    def to(self, device=None) -> "PackedDelta":
        if device is None:
            return self
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in TENSOR_FIELDS}
        return PackedDelta(**meta, **moved)

    def check(self, name: str = "delta") -> None:
        """Shapes and dtypes against the bands: a mismatched or truncated file fails here, with the field named."""
        expected = self.expected_shapes(self.out_features, self.in_features, self.group_size, self.bands)
        want_dtype = {"sigma": torch.float32, "v_words": torch.int32, "u_words": torch.int32}
        for field_name, shape in expected.items():
            t = getattr(self, field_name)
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{name}.{field_name} has shape {tuple(t.shape)}, but bands {list(self.bands)} with group_size "
                    f"{self.group_size} on a ({self.out_features} x {self.in_features}) layer need {shape}: the "
                    f"adapter files do not match this config or this base model."
                )
            if t.dtype != want_dtype.get(field_name, torch.float16):
                raise TypeError(f"{name}.{field_name} has dtype {t.dtype}, expected {want_dtype.get(field_name, torch.float16)}.")


# ------------------------------------------------------------------------------------ format version 2: slots
SLOT_TENSOR_FIELDS = ("sigma", "v_codes", "v_scales", "v_mins", "u_codes", "u_scales", "u_mins")


def slot_width(bits: int) -> int:
    """The slot a `bits`-bit code is stored in: the next power of two (1, 2, 4, 4, 8, 8, 8, 8), so a word holds
    32 / slot codes and a code is one shift and one mask away (a 3-bit band costs 4 bits per code)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits}; bit widths must be between 1 and {MAX_BITS}.")
    return 1 << (int(bits) - 1).bit_length()


def slot_words(n_cols: int, bits: int) -> int:
    """int32 words per row for n_cols codes of `bits` bits."""
    per_word = WORD_BITS // slot_width(bits)
    return -(-n_cols // per_word)


def pack_slots(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (d, n) in [0, 2^bits) -> int32 words (d, ceil(n / cpw)), cpw = 32 / slot_width(bits): code
    (i, j) is bits [s * (j % cpw), s * (j % cpw) + s) of word (i, j // cpw) (little end first; unused slots 0)."""
    slot = slot_width(bits)
    cpw = WORD_BITS // slot
    d, n = codes.shape
    words = slot_words(n, bits)
    padded = torch.zeros(d, words * cpw, dtype=torch.int64, device=codes.device)
    padded[:, :n] = codes.to(torch.int64)
    shifts = (torch.arange(cpw, device=codes.device, dtype=torch.int64) * slot).view(1, 1, cpw)
    word = (padded.view(d, words, cpw) << shifts).sum(dim=2)  # int64 in [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_slots(words: torch.Tensor, bits: int, n_cols: int) -> torch.Tensor:
    """Inverse of `pack_slots`: int32 (d, W) -> int64 codes (d, n_cols)."""
    slot = slot_width(bits)
    cpw = WORD_BITS // slot
    d, w = words.shape
    shifts = (torch.arange(cpw, device=words.device, dtype=torch.int64) * slot).view(1, 1, cpw)
    codes = (words.to(torch.int64).unsqueeze(2) & 0xFFFFFFFF) >> shifts & ((1 << slot) - 1)
    return codes.reshape(d, w * cpw)[:, :n_cols]


@dataclass
class SlotDelta:
    """Format version 2 of a compressed delta: the same quantised values as a PackedDelta (bands, group-wise fp16
    scales / mins, fp32 sigma), with each side's codes stored row by row in power-of-two slots:
    `v_codes` (in, row_words) and `u_codes` (out, row_words) int32, a row holding its bands' words one after the
    other (band b: slot_words(n_b, bits_b) words). A kernel decodes a code with one shift and one mask (bits
    as a compile-time slot width), reading whole rows of a tile contiguously. Built from a PackedDelta with
    `from_packed` (lossless; `to_packed` goes back)."""

    out_features: int
    in_features: int
    group_size: int
    bands: tuple[tuple[int, int], ...]
    sigma: torch.Tensor  # fp32 (k,)
    v_codes: torch.Tensor  # int32 (in, row_words)
    v_scales: torch.Tensor  # fp16 (ceil(in / group_size), k)
    v_mins: torch.Tensor
    u_codes: torch.Tensor  # int32 (out, row_words)
    u_scales: torch.Tensor
    u_mins: torch.Tensor

    format_version = FORMAT_VERSION_SLOTS

    @property
    def rank(self) -> int:
        return sum(n for _, n in self.bands)

    @property
    def row_words(self) -> int:
        return sum(slot_words(n, bits) for bits, n in self.bands)

    @property
    def device(self) -> torch.device:
        return self.sigma.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @staticmethod
    def expected_shapes(out_features: int, in_features: int, group_size: int, bands) -> dict[str, tuple[int, ...]]:
        k = sum(n for _, n in bands)
        row_words = sum(slot_words(n, bits) for bits, n in bands)
        shapes = {"sigma": (k,)}
        for side, d in (("v", in_features), ("u", out_features)):
            groups = -(-d // group_size)
            shapes[f"{side}_codes"] = (d, row_words)
            shapes[f"{side}_scales"] = (groups, k)
            shapes[f"{side}_mins"] = (groups, k)
        return shapes

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, bands, device=None) -> "SlotDelta":
        """All-zero tensors of the right shapes (a zero delta), to be filled by a state dict."""
        return _zero_delta(cls, out_features, in_features, group_size, bands, device)

    def band_layout(self) -> list[tuple[int, int, int, int]]:
        """(bits, first column, n_cols, first word in a row) per band, empty bands included."""
        out, col, word = [], 0, 0
        for bits, n in self.bands:
            out.append((bits, col, n, word))
            col += n
            word += slot_words(n, bits)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in SLOT_TENSOR_FIELDS}

    def to(self, device=None) -> "SlotDelta":
        if device is None:
            return self
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return SlotDelta(self.out_features, self.in_features, self.group_size, self.bands, **moved)

    @classmethod
    def from_packed(cls, delta: PackedDelta) -> "SlotDelta":
        """The version-2 layout of a (version-1, bit-plane) PackedDelta: the same codes, scales, mins and sigma
        (the scales, mins and sigma tensors are shared, not copied)."""
        sides = {
            f"{side}_codes": slot_codes_from_words(getattr(delta, f"{side}_words"), d, delta.bands)
            for side, d in (("v", delta.in_features), ("u", delta.out_features))
        }
        return cls(delta.out_features, delta.in_features, delta.group_size, tuple(delta.bands), sigma=delta.sigma,
                   v_scales=delta.v_scales, v_mins=delta.v_mins, u_scales=delta.u_scales, u_mins=delta.u_mins, **sides)  # fmt: skip

    def codes(self, side: str) -> torch.Tensor:
        """int64 codes (d, k) of one side."""
        d = self.in_features if side == "v" else self.out_features
        return codes_from_slots(getattr(self, f"{side}_codes"), d, self.bands)

    def to_packed(self) -> PackedDelta:
        """The version-1 (bit-plane) form: bitwise the PackedDelta this was built from (the adapter files' layout)."""
        sides = {f"{side}_words": words_from_slot_codes(getattr(self, f"{side}_codes"), self.bands) for side in ("v", "u")}
        return PackedDelta(self.out_features, self.in_features, self.group_size, self.bands, sigma=self.sigma,
                           v_scales=self.v_scales, v_mins=self.v_mins, u_scales=self.u_scales, u_mins=self.u_mins, **sides)  # fmt: skip

    def factor(self, side: str) -> torch.Tensor:
        """Dequantised U (out, k) or V (in, k) in fp32, as the kernels compute it."""
        d = self.in_features if side == "v" else self.out_features
        group = torch.arange(d, device=self.device) // self.group_size
        scales = getattr(self, f"{side}_scales").float()[group]
        mins = getattr(self, f"{side}_mins").float()[group]
        return self.codes(side).float() * scales + mins

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ((self.factor("u") * self.sigma) @ self.factor("v").T).to(dtype)

    def check(self, name: str = "delta") -> None:
        """Shapes and dtypes against the bands (ValueError / TypeError naming the field)."""
        bands = check_bands(self.bands, f"{name}.bands")
        k = sum(n for _, n in bands)
        row_words = sum(slot_words(n, bits) for bits, n in bands)
        expected = {"sigma": (k,)}
        for side, d in (("v", self.in_features), ("u", self.out_features)):
            groups = -(-d // self.group_size)
            expected[f"{side}_codes"] = (d, row_words)
            expected[f"{side}_scales"] = (groups, k)
            expected[f"{side}_mins"] = (groups, k)
        want_dtype = {"sigma": torch.float32, "v_codes": torch.int32, "u_codes": torch.int32}
        for field_name, shape in expected.items():
            t = getattr(self, field_name)
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{name}.{field_name} has shape {tuple(t.shape)}, but format version {FORMAT_VERSION_SLOTS} "
                    f"(slots) with bands {list(bands)} and group_size {self.group_size} on a ({self.out_features} x "
                    f"{self.in_features}) layer needs {shape}: rebuild it with SlotDelta.from_packed(packed_delta)."
                )
            if t.dtype != want_dtype.get(field_name, torch.float16):
                raise TypeError(f"{name}.{field_name} has dtype {t.dtype}, expected {want_dtype.get(field_name, torch.float16)}.")


# ------------------------------------------------------------------------------- one side's layout conversions
def slot_codes_from_words(words: torch.Tensor, d: int, bands, name: str = "words") -> torch.Tensor:
    """One side's version-1 bit planes (the flat int32 `v_words` / `u_words` of a PackedDelta over d rows) ->
    its version-2 slot codes (d, row_words) int32 (lossless; `words_from_slot_codes` goes back). A vector of the
    wrong size or dtype raises naming `name`."""
    bands = check_bands(bands)
    want = sum(bits * n for bits, n in bands) * words_per_column(d)
    if words.dim() != 1 or words.numel() != want:
        raise ValueError(
            f"{name} has shape {tuple(words.shape)}, but bands {list(bands)} on {d} rows need ({want},): the adapter "
            f"files do not match this config or this base model."
        )
    if words.dtype != torch.int32:
        raise TypeError(f"{name} has dtype {words.dtype}, expected torch.int32.")
    n_words = words_per_column(d)
    parts, offset = [], 0
    for bits, n in bands:
        size = bits * n_words * n
        if n:
            planes = words[offset : offset + size].view(bits, n_words, n)
            step = column_chunk(bits, d)
            parts += [pack_slots(unpack_bitplanes(planes[:, :, c : c + step], d), bits) for c in range(0, n, step)]
        offset += size
    return torch.cat(parts, dim=1).contiguous() if parts else torch.zeros(d, 0, dtype=torch.int32, device=words.device)


# the int64 temporaries of one layout conversion step stay under this many bytes (column_chunk)
CONVERSION_CHUNK_BYTES = 16 * 2**20


def column_chunk(bits: int, d: int) -> int:
    """Columns converted per step between the two layouts: a multiple of 32 (so a chunk fills whole slot words for
    every slot width), as many as keep the unpacked bits (bits x d x 8 bytes per column, int64) under
    CONVERSION_CHUNK_BYTES. Unchunked, a 14336-row side's 2-bit band of 1428 columns took a 327 MB temporary."""
    per_column = max(1, bits * d * 8)
    return max(WORD_BITS, CONVERSION_CHUNK_BYTES // per_column // WORD_BITS * WORD_BITS)


def codes_from_slots(codes: torch.Tensor, d: int, bands) -> torch.Tensor:
    """int64 codes (d, k) of one side's slot codes (d, row_words)."""
    parts, word = [], 0
    for bits, n in bands:
        w = slot_words(n, bits)
        parts.append(unpack_slots(codes[:, word : word + w], bits, n))
        word += w
    return torch.cat(parts, dim=1) if parts else torch.zeros(d, 0, dtype=torch.int64, device=codes.device)


def words_from_slot_codes(codes: torch.Tensor, bands) -> torch.Tensor:
    """Inverse of `slot_codes_from_words`: slot codes (d, row_words) -> the flat int32 bit planes of a PackedDelta."""
    d = codes.shape[0]
    planes, word = [], 0
    for bits, n in bands:
        w = slot_words(n, bits)
        band = codes[:, word : word + w]
        cpw = WORD_BITS // slot_width(bits)
        step = column_chunk(bits, d)  # a multiple of 32, so of cpw: chunks start at a word boundary
        chunks = [
            pack_bitplanes(unpack_slots(band[:, c // cpw : (c + step) // cpw], bits, min(step, n - c)), bits)
            for c in range(0, n, step)
        ]
        if chunks:
            planes.append(torch.cat(chunks, dim=2).reshape(-1))  # (bits, W, n): bit plane, row word, column
        word += w
    return torch.cat(planes) if planes else torch.zeros(0, dtype=torch.int32, device=codes.device)


def _zero_delta(cls, out_features: int, in_features: int, group_size: int, bands, device):
    """A `cls` (PackedDelta or SlotDelta) of all-zero tensors of its expected shapes: the codes (`*_words` /
    `*_codes`) int32, sigma fp32, scales and mins fp16."""
    bands = check_bands(bands)

    def dtype(name: str) -> torch.dtype:
        if name == "sigma":
            return torch.float32
        return torch.int32 if name.endswith(("_words", "_codes")) else torch.float16

    tensors = {
        name: torch.zeros(shape, dtype=dtype(name), device=device)
        for name, shape in cls.expected_shapes(out_features, in_features, group_size, bands).items()
    }
    return cls(out_features, in_features, group_size, bands, **tensors)
