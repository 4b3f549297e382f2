"""FineGates layers: a linear base layer (nn.Linear, GPT-2's Conv1D, bitsandbytes 4/8-bit) whose output rows and input
columns are scaled by stochastic gates (see FineGatesConfig), with an optional bias delta and LoRA inside the gates."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft_ext.tuners.base import PeftExtLayer, is_conv1d, logical_weight, seeded
from peft_ext.tuners.mixed_batch import route_rows

from .config import INIT_FLOOR, FineGatesConfig

SQRT_2 = math.sqrt(2.0)


def is_quantized(module: nn.Module) -> bool:
    return "bitsandbytes" in type(module).__module__


def quantized_merge_error(where: str) -> str:
    return (
        f"FineGates cannot merge into a bitsandbytes-quantized base ({where}): folding the gates would dequantize and "
        f"requantize the weights (lossy), and a quantized layer cannot be cut. Keep the adapter unmerged, or load the "
        f"base in 16/32-bit (without quantization_config), load the adapter onto it and merge or prune there."
    )


def gate_values(logits: torch.Tensor, noise_std: float = 0.0) -> torch.Tensor:
    """z = clamp(tanh(theta) + eps + 0.5, 0, 1) in fp32; eps ~ N(0, noise_std^2) when noise_std > 0 (training), else 0
    (evaluation and merging)."""
    mu = torch.tanh(logits.float())
    if noise_std > 0:
        mu = mu + torch.randn_like(mu) * noise_std
    return torch.clamp(mu + 0.5, 0.0, 1.0)


def keep_probability(logits: torch.Tensor, reg_sigma: float) -> torch.Tensor:
    """p = Phi((tanh(theta) + 0.5) / reg_sigma): the probability that a gate is open under the relaxation."""
    mu = torch.tanh(logits.float())
    return 0.5 * (1.0 + torch.erf((mu + 0.5) / (reg_sigma * SQRT_2)))


@torch.no_grad()
def kurtosis_weights(activations: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `compute_kurtosis_weights`: per column (over rows) and per row (over columns) of the (rows, cols)
    activation matrix, kappa = sqrt(mean z-score^4) (unbiased std; a zero std gives z = 0), weights softmax(-kappa / tau).
    Returns (row weights, column weights)."""

    def kurt(matrix: torch.Tensor) -> torch.Tensor:
        std = matrix.std(0, keepdim=True)
        z = (matrix - matrix.mean(0, keepdim=True)) / std
        z = torch.where(torch.isnan(z), torch.zeros_like(z), z)
        return z.pow(4).mean(0).sqrt()

    a = activations.float()
    return torch.softmax(-kurt(a.T) / tau, dim=0), torch.softmax(-kurt(a) / tau, dim=0)


class FineGatesLayer(PeftExtLayer):
    """y = z_r * ((x * z_c) (W + s B A)^T + b + delta) per active adapter (several compose as merging them in order
    would); `adapter_names=` gives each row of a batch its adapter's gate vectors (one base GEMM for the batch)."""

    adapter_layer_names = ("gates_row_logits", "gates_col_logits", "gates_bias", "gates_lora_A", "gates_lora_B")
    other_param_names = ("gates_dropout", "gates_settings")
    method_label = "FineGates"

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):  # bitsandbytes packs weights
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.gates_row_logits = nn.ParameterDict()
        self.gates_col_logits = nn.ParameterDict()
        self.gates_bias = nn.ParameterDict()
        self.gates_dropout = nn.ModuleDict()
        self.gates_settings: dict[str, dict] = {}
        self.gates_name = ""
        self._kurtosis: dict[str, tuple] = {}  # adapter -> (row weights, col weights, open rows, open cols)

    def adapter_keys(self):
        return self.gates_settings.keys()

    # ------------------------------------------------------------------------------------------ set-up
    def update_layer(self, adapter_name: str, config: FineGatesConfig, name: str = "") -> None:
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        dtype = dtype or getattr(base, "compute_dtype", None) or torch.float32
        device = weight.device if weight is not None and weight.device.type != "meta" else None
        kw = dict(dtype=dtype, device=device)
        m, n = self.out_features, self.in_features
        self.gates_name = name
        with seeded(config.seed, name):
            if config.gate_rows:
                self.gates_row_logits[adapter_name] = nn.Parameter(self._init_logits(m, config, device))
            if config.gate_columns:
                self.gates_col_logits[adapter_name] = nn.Parameter(self._init_logits(n, config, device))
            if config.bias == "gates":
                # fp32 as the logits (PEFT's upcast of a 16-bit ParameterDict entry on loading makes it trainable)
                delta = torch.zeros(m, dtype=torch.float32, device=device)
                if not config.init_weights:
                    nn.init.normal_(delta, std=0.1)
                self.gates_bias[adapter_name] = nn.Parameter(delta)
            if config.lora_r > 0:
                r = config.lora_r
                self.gates_lora_A[adapter_name] = nn.Linear(n, r, bias=False, **kw)
                self.gates_lora_B[adapter_name] = nn.Linear(r, m, bias=False, **kw)
                with torch.no_grad():
                    nn.init.kaiming_uniform_(self.gates_lora_A[adapter_name].weight, a=math.sqrt(5))
                    if config.init_weights:
                        self.gates_lora_B[adapter_name].weight.zero_()
                    else:
                        nn.init.normal_(self.gates_lora_B[adapter_name].weight, std=0.1)
        self.gates_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.gates_settings[adapter_name] = {
            "noise_std": float(config.gate_noise_std),
            "reg_sigma": float(config.reg_sigma),
            "keep": 1.0 - float(config.target_sparsity),
            "objective": config.sparsity_objective,
            "kurtosis": bool(config.kurtosis),
            "kurtosis_tau": float(config.kurtosis_tau),
            "lora_scale": config.lora_scale,
        }
        self.set_adapter(self.active_adapters)
        self.train(base.training)  # new modules start in training mode: follow the model's

    @staticmethod
    def _init_logits(size: int, config: FineGatesConfig, device) -> torch.Tensor:
        # fp32 whatever the base dtype: the thresholds at +-0.549 and the keep probabilities need the precision
        logits = torch.empty(size, dtype=torch.float32, device=device)
        if config.init_weights:
            nn.init.normal_(logits, mean=config.gate_init_mean, std=config.gate_init_std)
            return logits.clamp_(min=INIT_FLOOR)  # every eval gate exactly 1: the output is the base's
        return nn.init.uniform_(logits, -0.5, 0.5)  # every gate fractional (0.04 - 0.96), none closed

    # ------------------------------------------------------------------------------------------- gates
    def gates(self, name: str, sample: Optional[bool] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(z_r, z_c) of adapter `name` in fp32 (None for an ungated side): sampled with noise in training mode
        (`sample=None`), deterministic otherwise."""
        sample = self.training if sample is None else sample
        std = self.gates_settings[name]["noise_std"] if sample else 0.0
        rows = gate_values(self.gates_row_logits[name], std) if name in self.gates_row_logits else None
        cols = gate_values(self.gates_col_logits[name], std) if name in self.gates_col_logits else None
        return rows, cols

    def sparsity_loss(self, name: str) -> torch.Tensor:
        """The layer's sparsity loss for adapter `name` (FineGatesConfig: "target" or "l0", with the kurtosis weights
        of the last training forward when kurtosis=True)."""
        s = self.gates_settings[name]
        sides = [d[name] for d in (self.gates_row_logits, self.gates_col_logits) if name in d]
        probs = [keep_probability(t, s["reg_sigma"]) for t in sides]
        if s["objective"] == "l0":
            return torch.cat(probs).mean()
        kurt = self._kurtosis.get(name) if s["kurtosis"] else None
        if kurt is not None and len(probs) == 2:
            w_rows, w_cols, open_rows, open_cols = kurt
            means = torch.stack([(probs[0][open_rows] * w_rows).sum(), (probs[1][open_cols] * w_cols).sum()])
        else:
            means = torch.stack([p.mean() for p in probs])
        return (means - s["keep"]).abs().mean()

    @torch.no_grad()
    def gate_counts(self, name: str) -> dict[str, int]:
        """Eval gates of adapter `name`: open rows / columns (gate > 0) and the layer's removable weight entries
        (m n - open rows x open cols, the official "compressed params")."""
        rows, cols = self.gates(name, sample=False)
        m, n = self.out_features, self.in_features
        open_rows = int((rows > 0).sum()) if rows is not None else m
        open_cols = int((cols > 0).sum()) if cols is not None else n
        return {"rows": m, "cols": n, "open_rows": open_rows, "open_cols": open_cols,
                "removable": m * n - open_rows * open_cols}  # fmt: skip

    @torch.no_grad()
    def _record_kurtosis(self, name: str, x: torch.Tensor) -> None:
        rows, cols = self.gates(name, sample=False)
        open_rows = torch.nonzero(rows > 0, as_tuple=True)[0]
        open_cols = torch.nonzero(cols > 0, as_tuple=True)[0]
        x_mean = x.reshape(-1, self.in_features).float().mean(0)
        w = logical_weight(self.get_base_layer()).float()
        act = (x_mean[None, :] * w)[open_rows][:, open_cols]
        w_rows, w_cols = kurtosis_weights(act, self.gates_settings[name]["kurtosis_tau"])
        self._kurtosis[name] = (w_rows, w_cols, open_rows, open_cols)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.gates_settings]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self._composed_forward(active, x, *args, **kwargs)

    def _composed_forward(self, active: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """What merging `active` in order would compute: g_0(u) = base(u); g_j(u) = z_r^j * (g_{j-1}(u z_c^j) + delta_j
        + s_j LoRA_j(u z_c^j)). One adapter: y = z_r * (base(x z_c) + delta + s LoRA(x z_c))."""
        gates = {name: self.gates(name) for name in active}
        if self.training:
            for name in active:
                if self.gates_settings[name]["kurtosis"] and name in self.gates_row_logits and name in self.gates_col_logits:
                    self._record_kurtosis(name, x)
        inputs = [x] * (len(active) + 1)  # inputs[j]: what adapter j's LoRA sees; inputs[0]: the base layer's input
        for j in range(len(active) - 1, -1, -1):
            cols = gates[active[j]][1]
            inputs[j] = inputs[j + 1] if cols is None else inputs[j + 1] * cols.to(x.dtype)
        y = self.base_layer(inputs[0], *args, **kwargs)
        for j, name in enumerate(active):
            y = self._epilogue(name, y, inputs[j], gates[name][0])
        return y

    def _epilogue(self, name: str, y: torch.Tensor, u: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """z_r * (y + delta + s LoRA(u)) for one adapter (rows: z_r, or per-row gates broadcastable to y)."""
        if name in self.gates_lora_A:
            a = self.gates_lora_A[name]
            low = self.gates_lora_B[name](a(self.gates_dropout[name](u.to(a.weight.dtype))))
            y = y + (self.gates_settings[name]["lora_scale"] * low).to(y.dtype)
        if name in self.gates_bias:
            y = y + self.gates_bias[name].to(y.dtype)
        if rows is not None:
            y = y * rows.to(y.dtype)
        return y

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row with its adapter's (evaluation) gates: per-row column scales, one base GEMM for the batch, then
        per-row bias delta, LoRA and row scales. Rows of "__base__" (or of an adapter this layer lacks) see the base."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows.")
        ones_r = x.new_ones(self.out_features, dtype=torch.float32)
        ones_c = x.new_ones(self.in_features, dtype=torch.float32)
        per_adapter = {}
        for name in dict.fromkeys(adapter_names):
            if name in self.gates_settings:
                rows, cols = self.gates(name, sample=False)
                per_adapter[name] = (ones_r if rows is None else rows, ones_c if cols is None else cols)
            else:
                per_adapter[name] = (ones_r, ones_c)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2)
        z_c = torch.stack([per_adapter[a][1] for a in adapter_names]).view(*shape, self.in_features)
        z_r = torch.stack([per_adapter[a][0] for a in adapter_names]).view(*shape, self.out_features)
        u = x * z_c.to(x.dtype)
        y = self.base_layer(u, *args, **kwargs)
        extra = [a for a in per_adapter if a in self.gates_lora_A or a in self.gates_bias]
        if extra:

            def run(name, rows_u):
                if name not in extra:
                    return y.new_zeros((*rows_u.shape[:-1], self.out_features))
                return self._epilogue(name, y.new_zeros((*rows_u.shape[:-1], self.out_features)), rows_u, None)

            y = y + route_rows(u, adapter_names, run)
        return y * z_r.to(y.dtype)

    # ----------------------------------------------------------------------------------------- merge
    def merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """W' = diag(z_r) (W + s B A) diag(z_c), b' = z_r * (b + delta) on top of what is merged already (evaluation
        gates)."""
        base = self.get_base_layer()
        if is_quantized(base):
            raise ValueError(quantized_merge_error(self.gates_name or type(base).__name__))
        rows, cols = self.gates(adapter_name, sample=False)
        weight = base.weight.data
        w = (weight.T if is_conv1d(base) else weight).float()
        if adapter_name in self.gates_lora_A:
            a, b = self.gates_lora_A[adapter_name].weight, self.gates_lora_B[adapter_name].weight
            w = w + self.gates_settings[adapter_name]["lora_scale"] * (b.float() @ a.float()).to(w.device)
        if rows is not None:
            w = w * rows.to(w.device)[:, None]
        if cols is not None:
            w = w * cols.to(w.device)[None, :]
        values = {"weight": (w.T.contiguous() if is_conv1d(base) else w).to(weight.dtype)}
        bias = getattr(base, "bias", None)
        if bias is not None or adapter_name in self.gates_bias:
            b_new = bias.data.float() if bias is not None else torch.zeros(self.out_features, device=weight.device)
            if adapter_name in self.gates_bias:
                b_new = b_new + self.gates_bias[adapter_name].detach().float().to(b_new.device)
            if rows is not None:
                b_new = b_new * rows.to(b_new.device)
            values["bias"] = b_new.to(bias.dtype if bias is not None else weight.dtype)
        return values

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The (out, in) change merging `adapter_name` alone would make to the base weight."""
        base = self.get_base_layer()
        new = self.merged_values(adapter_name)["weight"]
        old = self.original_base_value("weight")
        if is_conv1d(base):
            new, old = new.T, old.T
        return new.float() - old.float()

    def write_base_value(self, pname: str, value: torch.Tensor) -> None:
        """A bias delta merged into a layer without a bias gives it one (removed again by unmerge)."""
        base = self.get_base_layer()
        if pname == "bias" and getattr(base, "bias", None) is None:
            base.bias = nn.Parameter(value.to(device=base.weight.device, dtype=base.weight.dtype).clone(),
                                     requires_grad=False)  # fmt: skip
            base._finegates_added_bias = True  # FineGatesModel.merge_and_unload declares it in the config
            self._merge_holder().created_bias = True
            return
        super().write_base_value(pname, value)

    def unmerge(self) -> None:
        holder = self._modules.get(self._ORIGINALS)
        created = bool(getattr(holder, "created_bias", False))
        super().unmerge()
        if created:
            base = self.get_base_layer()
            base.register_parameter("bias", None)
            base.__dict__.pop("_finegates_added_bias", None)

    def __repr__(self) -> str:
        return "finegates." + nn.Module.__repr__(self)
