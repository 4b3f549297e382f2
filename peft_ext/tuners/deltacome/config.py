from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft_ext.tuners.config_base import PeftExtConfig

from peft_ext.kernels.delta_format import FORMAT_VERSION_BITPLANES

from .bands import SCALED, check_schedule, parse_budget

METHODS = ("deltacome", "bitdelta", "lowrank")
FORMAT_VERSION = FORMAT_VERSION_BITPLANES  # of the saved tensors (kernels/delta_format.py)
QUANTIZERS = ("gptq", "rtn")


@dataclass
class DeltaComeConfig(PeftExtConfig):
    """Delta-CoMe (Ping et al., NeurIPS 2024): a full fine-tune stored as its compressed delta on the base.

    Each targeted linear layer's delta dW = W_ft - W_base is kept as singular directions, the largest at more
    bits (mixed precision along the spectrum), and served by a Triton kernel that dequantises on the fly:
    y = x W_base^T + ((x V) * sigma) U^T, never building dW. Several compressed fine-tunes ("tenants") load as
    named adapters on one base and a batch can mix them with `adapter_names=`.

    An adapter is made by `peft_ext.compress_delta(base, finetuned, ...)` / `peft-ext compress`, not trained:
    it is an inference adapter (a forward in training mode with gradients raises). `get_peft_model(base,
    DeltaComeConfig(...))` builds the empty structure (a zero delta) that a compressed state dict fills.

    Args:
        method: "deltacome" (mixed precision, the paper), or a baseline at the same budget: "lowrank" (top-r
            directions in fp16) or "bitdelta" (alpha * sign(dW), 1 bit per weight: its size is 1/16 of the dense delta whatever the
            budget, plus 4 bytes of alpha per layer and the padding of in_features to a multiple of 32).
        budget: the compressed size of each layer as a fraction of its dense fp16 delta (1/16 = "0.0625" =
            "1/16"). Everything stored counts (codes, scales, mins, singular values), see bands.py.
        bands: the precision schedule. "scaled" (default): the paper's [[2, 8], [32, 3], [null, 2]], set for
            4096-wide 7B matrices, with the fixed counts scaled to each matrix (ceil(n * min(out, in) / 4096): the
            paper's 2 / 32 at 4096, 1 / 1 at 128) and shrunk where a small layer's budget cannot hold them, so the
            default fits every layer at every budget. Or an explicit schedule, used as given: (n_cols, bits) pairs,
            largest singular values first, one band may have n_cols null ("as many as the budget holds"); a layer
            whose budget cannot hold its fixed bands raises.
        group_size: rows per quantisation group of each singular vector (scales and mins in fp16).
        quantizer: "gptq" (error compensation on calibration activations, the paper) or "rtn" (round to nearest).
        layer_bands: per module, the solved (n_cols, bits) bands (filled by the compressor; solved from budget and
            bands at injection when missing).
        dense_modules: full names of small non-linear modules (the norms a fine-tune changed) stored whole, one
            copy per adapter, that mixed batches route per row (filled by the compressor).
        base_probes: per module, a few of the base weights the delta was computed against (the base fingerprint).
            Loading onto another base raises.
        delta_probes: per module, [row, col, base value, delta value] at the positions where the fine-tune differs
            most from the base (filled by the compressor): loading onto the fine-tune itself raises (its weights
            match base_probes to ~1e-3, but hold the fine-tune's values there).
        init_weights: True: an empty adapter is a zero delta (the output equals the base). False: random
            contents (for tests).
        format_version: the layout of the saved Delta-CoMe tensors. 1 (the only one written and read): bit planes
            (kernels/delta_format.py PackedDelta). Folders saved before the field existed have none and load as 1.
            A layer converts each delta once, at load, to the version-2 slot layout (kernels/delta_format.py
            SlotDelta) and holds only that (one compressed copy; every kernel path reads it); its state_dict converts
            back, so saved files are version 1, bit for bit what was loaded.
        seed: the random contents of init_weights=False. None (default): drawn from torch's RNG, so that
            torch.manual_seed reproduces them and each adapter built gets its own. An int: the same contents from that
            seed and each layer's name, whatever torch's RNG and the adapter's name (two adapters of one seed are equal).
    """

    method: str = field(default="deltacome", metadata={"help": "deltacome | lowrank | bitdelta"})
    budget: Union[float, str] = field(default=1 / 16, metadata={"help": "Fraction of the dense fp16 delta, e.g. 1/16."})
    bands: Union[str, list] = field(
        default=SCALED, metadata={"help": "'scaled' (the paper's schedule scaled to each matrix) or (n_cols, bits) pairs."}
    )
    group_size: int = field(default=128, metadata={"help": "Quantisation group size along each singular vector."})
    quantizer: str = field(default="gptq", metadata={"help": "gptq | rtn"})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "Linear modules whose delta is stored (default: all but the head)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to leave out."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "PEFT's modules_to_save (e.g. a new head)."})
    dense_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Full names of small modules stored whole from the fine-tune (norms)."}
    )
    layer_bands: Optional[dict] = field(default=None, metadata={"help": "Solved bands per module (compressor)."})
    base_probes: Optional[dict] = field(default=None, metadata={"help": "Base-weight fingerprint per module."})
    delta_probes: Optional[dict] = field(default=None, metadata={"help": "Where base and fine-tune differ most, per module."})
    init_weights: bool = field(default=True, metadata={"help": "False: random contents (tests)."})
    seed: Optional[int] = field(
        default=None, metadata={"help": "init_weights=False: None draws from torch's RNG; an int fixes the contents."}
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Layout of the saved tensors: 1 = bit planes (absent in older folders: 1)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"DeltaComeConfig.method must be one of {METHODS}, got {self.method!r}.")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"DeltaComeConfig.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}.")
        self.budget_fraction = parse_budget(self.budget, "DeltaComeConfig.budget")
        if self.method == "bitdelta" and self.budget_fraction < 1 / 16:
            raise ValueError(
                f"DeltaComeConfig.budget={self.budget!r} is below 1/16, the size of BitDelta's 1-bit signs: use "
                f"budget >= 1/16 with method='bitdelta', or method='deltacome' / 'lowrank' for smaller budgets."
            )
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"DeltaComeConfig.group_size must be a positive integer (e.g. 128), got {self.group_size!r}.")
        bands = check_schedule(self.bands, "DeltaComeConfig.bands")
        self.bands = bands if isinstance(bands, str) else [list(b) for b in bands]
        if self.format_version != FORMAT_VERSION or isinstance(self.format_version, bool):
            raise ValueError(
                f"DeltaComeConfig.format_version={self.format_version!r}: this peft-ext reads Delta-CoMe adapters of "
                f"format version {FORMAT_VERSION} (bit planes) only. Load the folder with the peft-ext release that "
                f"wrote it, or compress the fine-tune again with this one (peft-ext compress / compress_delta)."
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"DeltaComeConfig.seed must be None (torch's RNG) or an integer, got {self.seed!r}.")
        if isinstance(self.target_modules, (set, frozenset)):
            self.target_modules = sorted(self.target_modules)

    def to_dict(self):
        out = super().to_dict()
        out.pop("budget_fraction", None)
        return out
