"""Physical pruning of a folded FineGates model: structured exact zeros -> a smaller model with the same outputs.

After the gates are folded (W' = Diag(z_r) W Diag(z_c), b' = z_r * b) a closed gate leaves an exact zero row (weight
row and bias entry) or an exact zero column. This module works on the plain (un-wrapped) transformers model and
only reads those zeros, so every cut is exact by construction:

- MLP neuron j is dead iff row j of up (or gate, when act(0) == 0, checked numerically on the model's own activation;
  GPT-2 c_fc / BERT intermediate.dense likewise) is zero incl. bias, or column j of down (c_proj / output.dense) is
  zero. Dead neurons leave all the MLP's linears (plain, smaller nn.Linear / Conv1D).
- Attention head h is removable iff each of its head_dim dims has its v row (weight and bias) zero or its o column
  zero (its output is then exactly 0 whatever q/k do). A zero q or k head is NOT removable (it attends uniformly).
  Grouped-query attention: only whole KV groups (every query head of the group removable). At least one group is
  kept per layer. The attention forwards of the installed transformers infer the head count from the projection
  shapes (view(..., -1, head_dim)); the per-module attributes that are read are updated (GPT-2 `split_size`,
  `num_heads`; BERT `num_attention_heads`, `all_head_size`). `num_key_value_groups` keeps its ratio.
- Residual-stream dims (inputs of q/k/v/gate/up, outputs of o/down, and their GPT-2 / BERT counterparts) cannot
  shrink hidden_size: with residual_prune="gather" a module whose residual side is at least `residual_threshold` zero
  becomes a `PrunedLinear` (index_select in, smaller GEMM, scatter into zeros out); with "zeros" they stay zeros.
- Kept sizes (neurons, gathered residual dims) are padded up to `multiple_of` by re-keeping the lowest-index removed
  units (zero units, so still exact).

Only torch, transformers and peft_ext.tuners.base are imported: the FineGates tuner calls this, never the reverse.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from peft_ext.tuners.base import in_out_features, is_conv1d, logical_weight

__all__ = ["PruneReport", "PrunedLinear", "prune_model", "save_pruned", "load_pruned", "MANIFEST_NAME"]

MANIFEST_NAME = "pruned_manifest.json"
MANIFEST_VERSION = 1
RESIDUAL_PRUNE_MODES = ("gather", "zeros")
# integer per-module attributes that attention / MLP forwards read (recorded in the manifest, restored on load)
_HEAD_ATTRS = (
    "num_heads", "split_size", "num_attention_heads", "all_head_size", "intermediate_size", "num_key_value_groups",
    "head_dim", "attention_head_size", "embed_dim",
)


# ----------------------------------------------------------------------------------------------- PrunedLinear
class PrunedLinear(nn.Module):
    """A linear map of full width (in_features -> out_features) computed on kept dims only.

    y_full = scatter_{out_index}( Linear_small( x[..., in_index] ) ), zeros elsewhere. `in_index` / `out_index` are
    LongTensor buffers (None = all dims); the bias lives on the kept outputs only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_index: Optional[torch.Tensor] = None,
        out_index: Optional[torch.Tensor] = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        for name, idx, full in (("in_index", in_index, in_features), ("out_index", out_index, out_features)):
            if idx is not None:
                idx = torch.as_tensor(idx, dtype=torch.long, device=device).reshape(-1)
                if idx.numel() == 0 or idx.min() < 0 or idx.max() >= full or idx.unique().numel() != idx.numel():
                    raise ValueError(
                        f"PrunedLinear: {name} must hold distinct indices in [0, {full}), got {idx.tolist()[:20]}"
                    )
            self.register_buffer(name, idx)
        n_in = self.in_index.numel() if self.in_index is not None else self.in_features
        n_out = self.out_index.numel() if self.out_index is not None else self.out_features
        self.linear = nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype)

    @property
    def inner_in_features(self) -> int:
        return self.linear.in_features

    @property
    def inner_out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        y = self.linear(x)
        if self.out_index is None:
            return y
        out = y.new_zeros(*y.shape[:-1], self.out_features)
        return out.index_copy(-1, self.out_index, y)

    @torch.no_grad()
    def dense_weight(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The equivalent full (out, in) weight and (out,) bias (zeros on the dropped dims)."""
        w = self.linear.weight
        full = w.new_zeros(self.out_features, self.in_features)
        rows = self.out_index if self.out_index is not None else torch.arange(self.out_features, device=w.device)
        cols = self.in_index if self.in_index is not None else torch.arange(self.in_features, device=w.device)
        full[rows.unsqueeze(1), cols.unsqueeze(0)] = w
        bias = None
        if self.linear.bias is not None:
            bias = w.new_zeros(self.out_features)
            bias[rows] = self.linear.bias
        return full, bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kept_in={self.inner_in_features}, kept_out={self.inner_out_features}, bias={self.linear.bias is not None}"
        )


# ----------------------------------------------------------------------------------------------- report
@dataclass
class PruneReport:
    """What `prune_model` removed. Counts are actual model parameter counts (model.parameters(), tied once)."""

    model_class: str = ""
    params_before: int = 0
    params_after: int = 0
    mlp_neurons_removed: int = 0
    heads_removed: int = 0  # query heads
    kv_groups_removed: int = 0  # key/value heads (== heads_removed without GQA)
    residual_in_dims_gathered: int = 0  # input columns dropped by PrunedLinear, summed over modules
    residual_out_dims_gathered: int = 0  # output rows dropped by PrunedLinear, summed over modules
    params_removed_by_category: dict = field(default_factory=dict)  # mlp / attention / residual
    layers: list = field(default_factory=list)  # per-layer dicts
    dims_left_as_zeros: list = field(default_factory=list)  # {"module", "side", "count", "reason"}
    activation_not_zero_at_zero: list = field(default_factory=list)  # MLPs whose gate/fc-row criterion was skipped
    gathered_modules: list = field(default_factory=list)  # names of modules that became PrunedLinear
    unknown_architecture: bool = False
    notes: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["params_removed"] = self.params_removed
        return json.loads(json.dumps(d))  # guarantees JSON-serialisable plain types

    def table(self) -> str:
        pct = 100.0 * self.params_removed / self.params_before if self.params_before else 0.0
        lines = [
            f"FineGates pruning of {self.model_class}",
            f"  parameters: {self.params_before:,} -> {self.params_after:,} (-{self.params_removed:,}, -{pct:.2f}%)",
            f"  removed: {self.mlp_neurons_removed} MLP neurons, {self.heads_removed} attention heads "
            f"({self.kv_groups_removed} KV groups), residual dims gathered: {self.residual_in_dims_gathered} in / "
            f"{self.residual_out_dims_gathered} out ({len(self.gathered_modules)} PrunedLinear modules)",
        ]
        if self.params_removed_by_category:
            lines.append("  params removed by category: " + ", ".join(
                f"{k} {v:,}" for k, v in self.params_removed_by_category.items()))
        if self.layers:
            lines.append(f"  {'layer':>5} {'intermediate':>16} {'heads':>9} {'kv heads':>9}")
            for row in self.layers:
                inter = f"{row.get('intermediate_before', '-')}->{row.get('intermediate_after', '-')}"
                heads = f"{row.get('heads_before', '-')}->{row.get('heads_after', '-')}"
                kv = f"{row.get('kv_heads_before', '-')}->{row.get('kv_heads_after', '-')}"
                lines.append(f"  {str(row.get('layer')):>5} {inter:>16} {heads:>9} {kv:>9}")
        if self.dims_left_as_zeros:
            total = sum(d["count"] for d in self.dims_left_as_zeros)
            lines.append(f"  dims left as zeros: {total} in {len(self.dims_left_as_zeros)} places")
        if self.activation_not_zero_at_zero:
            lines.append("  act(0) != 0, zero gate/fc rows not cut in: " + ", ".join(self.activation_not_zero_at_zero))
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------- helpers
def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _is_lin(module: Any) -> bool:
    """A plain linear-like module we may slice (nn.Linear or Conv1D, not already a PrunedLinear)."""
    return isinstance(module, nn.Module) and (type(module) is nn.Linear or is_conv1d(module))


def _unwrap(module: Any) -> Any:
    """The base layer of a PEFT tuner layer (discovery also runs on a model that still holds adapters)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) and not isinstance(module, PrunedLinear) else module


def _is_lin_any(module: Any) -> bool:
    module = _unwrap(module)
    return _is_lin(module) or isinstance(module, PrunedLinear)


def _io(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear / Conv1D / PrunedLinear (full width)."""
    module = _unwrap(module)
    if isinstance(module, PrunedLinear):
        return module.in_features, module.out_features
    return in_out_features(module)


def _rows_off(module: nn.Module) -> torch.Tensor:
    """(out,) bool: output row is exactly zero (weight row and bias entry)."""
    w = logical_weight(module).detach()
    off = (w == 0).all(dim=1)
    if getattr(module, "bias", None) is not None:
        off &= module.bias.detach() == 0
    return off.cpu()


def _cols_off(module: nn.Module) -> torch.Tensor:
    """(in,) bool: input column is exactly zero."""
    return (logical_weight(module).detach() == 0).all(dim=0).cpu()


def _pad_keep(keep: torch.Tensor, multiple_of: int, min_keep: int = 1) -> torch.Tensor:
    """Sorted kept indices: the True entries of `keep`, plus the lowest-index False ones up to a multiple."""
    n = keep.numel()
    kept = int(keep.sum())
    target = max(kept, min(min_keep, n))
    if multiple_of > 1:
        target = min(n, int(math.ceil(target / multiple_of) * multiple_of))
    keep = keep.clone()
    if target > kept:
        extra = torch.nonzero(~keep).flatten()[: target - kept]
        keep[extra] = True
    return torch.nonzero(keep).flatten()


def _slice_linear(module: nn.Module, out_idx: Optional[torch.Tensor] = None,
                  in_idx: Optional[torch.Tensor] = None) -> nn.Module:
    """A new module of the same class (nn.Linear / Conv1D) keeping the given output rows / input columns."""
    w = logical_weight(module).detach()
    dev = w.device
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(dev))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(dev))
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if bias is not None and out_idx is not None:
        bias = bias.index_select(0, out_idx.to(dev))
    n_out, n_in = w.shape
    if is_conv1d(module):
        new = type(module)(n_out, n_in)
        new.to(device=dev, dtype=module.weight.dtype)
        new.weight = nn.Parameter(w.T.contiguous().clone(), requires_grad=module.weight.requires_grad)
    else:
        new = nn.Linear(n_in, n_out, bias=bias is not None, device=dev, dtype=module.weight.dtype)
        new.weight = nn.Parameter(w.contiguous().clone(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def _to_pruned_linear(module: nn.Module, in_idx: Optional[torch.Tensor],
                      out_idx: Optional[torch.Tensor]) -> PrunedLinear:
    n_in, n_out = in_out_features(module)
    w = logical_weight(module).detach()
    dev = w.device
    has_bias = getattr(module, "bias", None) is not None
    new = PrunedLinear(n_in, n_out, in_index=in_idx, out_index=out_idx, bias=has_bias, device=dev,
                       dtype=module.weight.dtype)
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(dev))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(dev))
    new.linear.weight = nn.Parameter(w.contiguous().clone(), requires_grad=module.weight.requires_grad)
    if has_bias:
        b = module.bias.detach()
        if out_idx is not None:
            b = b.index_select(0, out_idx.to(dev))
        new.linear.bias = nn.Parameter(b.contiguous().clone(), requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _layer_index(name: str) -> Optional[int]:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _act_zero_at_zero(act: Any, ref: torch.Tensor) -> bool:
    """act(0) == 0 exactly, evaluated on the model's own activation (module or function) in the weight dtype."""
    if not callable(act):
        return False
    try:
        with torch.no_grad():
            out = act(torch.zeros(8, dtype=ref.dtype, device=ref.device))
        return bool(torch.is_tensor(out) and (out == 0).all())
    except Exception:  # noqa: BLE001 - an activation we cannot evaluate is treated as act(0) != 0
        return False


# ----------------------------------------------------------------------------------------------- arch map
@dataclass
class _MLP:
    name: str  # the block (LlamaMLP / GPT2MLP / BertLayer)
    kind: str  # "gated" | "plain"
    fc: list  # names of the modules whose ROWS are the neurons: [gate, up] or [c_fc]
    gate: Optional[str]  # the row module whose zero rows need act(0) == 0 (gate, c_fc, intermediate.dense)
    down: str  # the module whose COLUMNS are the neurons
    act: Any
    holder: Optional[str] = None  # module carrying an `intermediate_size` attribute to update


@dataclass
class _Attn:
    name: str
    kind: str  # "llama" | "gpt2" | "bert"
    q: Optional[str]
    k: Optional[str]
    v: Optional[str]
    qkv: Optional[str]  # fused (GPT-2 c_attn)
    o: str
    head_dim: int
    n_heads: int
    n_kv: int
    attr_module: str  # module whose head-count attributes are updated


_LLAMA_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "attn_dropout", "rotary_emb"}
_GATED_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn", "dropout"}


def _children(mod: nn.Module) -> set:
    return {n for n, _ in mod.named_children()}


def _own_params(mod: nn.Module) -> list:
    return [n for n, _ in mod.named_parameters(recurse=False)]


def _discover(model: nn.Module) -> tuple[list, list, list]:
    """(mlps, attentions, skipped notes) found by inspecting module structure and attributes."""
    mlps, attns, skipped = [], [], []
    for name, mod in model.named_modules():
        ch = _children(mod)
        # ---- Llama / Qwen2 / Mistral-style attention
        if {"q_proj", "k_proj", "v_proj", "o_proj"} <= ch:
            q, k, v, o = (getattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
            hd = getattr(mod, "head_dim", None)
            ok = all(_is_lin_any(m) for m in (q, k, v, o)) and isinstance(hd, int) and hd > 0
            ok = ok and ch <= _LLAMA_ATTN_CHILDREN and not _own_params(mod)
            if ok:
                nq, nk, nv = _io(q)[1], _io(k)[1], _io(v)[1]
                ok = nq % hd == 0 and nk == nv and nk % hd == 0 and _io(o)[0] == nq and nk > 0
                ok = ok and (nq // hd) % (nk // hd) == 0
                groups = getattr(mod, "num_key_value_groups", None)
                ok = ok and (groups is None or groups == (nq // hd) // (nk // hd))
                for norm in ("q_norm", "k_norm"):  # per-head norms over head_dim are shared by all heads: fine
                    nm = getattr(mod, norm, None)
                    w = getattr(nm, "weight", None) if nm is not None else None
                    if nm is not None and w is not None and w.numel() != hd:
                        ok = False
            if ok:
                attns.append(_Attn(name, "llama", _join(name, "q_proj"), _join(name, "k_proj"), _join(name, "v_proj"),
                                   None, _join(name, "o_proj"), hd, nq // hd, nk // hd, name))
            else:
                skipped.append(f"{name} ({type(mod).__name__}): q/k/v/o attention of an unrecognised layout")
        # ---- gated MLP (Llama / Qwen2 / Mistral)
        elif {"gate_proj", "up_proj", "down_proj"} <= ch:
            g, u, d = (getattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj"))
            act = getattr(mod, "act_fn", None)
            ok = all(_is_lin_any(m) for m in (g, u, d)) and callable(act) and ch <= _GATED_MLP_CHILDREN
            ok = ok and not _own_params(mod)
            if ok:
                n_i = _io(g)[1]
                ok = _io(u)[1] == n_i and _io(d)[0] == n_i
            if ok:
                mlps.append(_MLP(name, "gated", [_join(name, "gate_proj"), _join(name, "up_proj")],
                                 _join(name, "gate_proj"), _join(name, "down_proj"), act, name))
            else:
                skipped.append(f"{name} ({type(mod).__name__}): gate/up/down MLP of an unrecognised layout")
        # ---- GPT-2 attention (fused c_attn Conv1D: q|k|v along the output)
        elif {"c_attn", "c_proj"} <= ch and hasattr(mod, "split_size"):
            ca, cp = mod.c_attn, mod.c_proj
            hd, nh, ss = getattr(mod, "head_dim", None), getattr(mod, "num_heads", None), mod.split_size
            ok = _is_lin_any(ca) and _is_lin_any(cp) and all(isinstance(x, int) for x in (hd, nh, ss))
            ok = ok and not hasattr(mod, "q_attn") and not getattr(mod, "is_cross_attention", False)
            ok = ok and not _own_params(mod) and ch <= {"c_attn", "c_proj", "attn_dropout", "resid_dropout"}
            ok = ok and nh * hd == ss and _io(ca)[1] == 3 * ss and _io(cp)[0] == ss
            if ok:
                attns.append(_Attn(name, "gpt2", None, None, None, _join(name, "c_attn"), _join(name, "c_proj"),
                                   hd, nh, nh, name))
            else:
                skipped.append(f"{name} ({type(mod).__name__}): fused c_attn attention of an unrecognised layout")
        # ---- GPT-2 MLP
        elif {"c_fc", "c_proj"} <= ch:
            fc, cp, act = mod.c_fc, mod.c_proj, getattr(mod, "act", None)
            ok = _is_lin_any(fc) and _is_lin_any(cp) and callable(act) and not _own_params(mod)
            ok = ok and ch <= {"c_fc", "c_proj", "act", "dropout"}
            ok = ok and _io(cp)[0] == _io(fc)[1]
            if ok:
                mlps.append(_MLP(name, "plain", [_join(name, "c_fc")], _join(name, "c_fc"), _join(name, "c_proj"),
                                 act))
            else:
                skipped.append(f"{name} ({type(mod).__name__}): c_fc/c_proj MLP of an unrecognised layout")
        # ---- BERT / RoBERTa attention: <attention>.self.{query,key,value} + <attention>.output.dense
        elif {"self", "output"} <= ch and {"query", "key", "value"} <= _children(mod.self):
            sa, out = mod.self, mod.output
            hd, nh = getattr(sa, "attention_head_size", None), getattr(sa, "num_attention_heads", None)
            dense = getattr(out, "dense", None)
            lins = [getattr(sa, a) for a in ("query", "key", "value")] + [dense]
            ok = all(_is_lin_any(m) for m in lins) and isinstance(hd, int) and isinstance(nh, int)
            ok = ok and not getattr(mod, "is_cross_attention", False) and not _own_params(sa)
            ok = ok and _children(sa) <= {"query", "key", "value", "dropout", "distance_embedding"}
            ok = ok and not hasattr(sa, "distance_embedding")  # relative position embeddings: not handled
            ok = ok and getattr(sa, "all_head_size", nh * hd) == nh * hd
            ok = ok and all(_io(m)[1] == nh * hd for m in lins[:3]) and _io(dense)[0] == nh * hd
            if ok:
                sn = _join(name, "self")
                attns.append(_Attn(name, "bert", _join(sn, "query"), _join(sn, "key"), _join(sn, "value"), None,
                                   _join(_join(name, "output"), "dense"), hd, nh, nh, sn))
            else:
                skipped.append(f"{name} ({type(mod).__name__}): query/key/value attention of an unrecognised layout")
        # ---- BERT / RoBERTa MLP: <layer>.intermediate.dense + <layer>.output.dense
        elif {"intermediate", "output"} <= ch and hasattr(mod.intermediate, "dense") and hasattr(mod.output, "dense"):
            fc, dn = mod.intermediate.dense, mod.output.dense
            act = getattr(mod.intermediate, "intermediate_act_fn", None)
            ok = _is_lin_any(fc) and _is_lin_any(dn) and callable(act) and _io(dn)[0] == _io(fc)[1]
            ok = ok and _children(mod.intermediate) <= {"dense", "intermediate_act_fn"}
            if ok:
                mlps.append(_MLP(name, "plain", [_join(name, "intermediate.dense")], _join(name, "intermediate.dense"),
                                 _join(name, "output.dense"), act))
            else:
                skipped.append(f"{name} ({type(mod).__name__}): intermediate/output MLP of an unrecognised layout")
    return mlps, attns, skipped


def activation_blocks(model: nn.Module) -> list[tuple[str, str, list[str], str, bool]]:
    """The MLPs pruning recognises in `model` (plain, or still holding PEFT tuner layers), as (block, the module whose
    zero rows need act(0) = 0, its act-independent row partners (up_proj), the module whose columns are the neurons,
    whether act(0) = 0): what a caller checks before folding adapters in, so that a prune that would be refused is
    refused before anything is changed."""
    out = []
    for mlp in _discover(model)[0]:
        weight = _unwrap(model.get_submodule(mlp.down)).weight
        partners = [n for n in mlp.fc if n != mlp.gate]
        out.append((mlp.name, mlp.gate, partners, mlp.down, _act_zero_at_zero(mlp.act, weight)))
    return out


def _embedding_like_names(model: nn.Module) -> set:
    """Names of embeddings, the output head and any module sharing a parameter with them (tied weights)."""
    special = set()
    tied_ids = set()
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    heads = []
    for getter in (get_in, get_out):
        try:
            m = getter() if callable(getter) else None
        except Exception:  # noqa: BLE001
            m = None
        if m is not None:
            heads.append(m)
    for m in heads:
        tied_ids.update(id(p) for p in m.parameters())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) or any(mod is h for h in heads):
            special.add(name)
        elif any(id(p) in tied_ids for p in mod.parameters(recurse=False)):
            special.add(name)
    return special


# ----------------------------------------------------------------------------------------------- prune_model
@torch.no_grad()
def prune_model(
    model: nn.Module,
    *,
    modules: Optional[Iterable[str]] = None,
    residual_prune: str = "gather",
    multiple_of: int = 8,
    residual_threshold: float = 0.10,
    require_zero_activation: bool = False,
) -> PruneReport:
    """Physically remove the structured exact zeros of a folded model, in place; returns a `PruneReport`.

    modules: names (as in model.named_modules()) allowed to be cut; None = every linear of the architecture map.
    A neuron cut changes every linear of its MLP and a head cut every projection of its attention, so those need
    all of them allowed. residual_prune: "gather" (PrunedLinear where >= residual_threshold of a module's residual
    side is zero) or "zeros" (leave them). multiple_of: kept neurons / gathered dims padded up to a multiple (1 = off).
    require_zero_activation: raise ValueError when an MLP's act(0) != 0 keeps zero gate/fc rows from being cut.
    """
    if residual_prune not in RESIDUAL_PRUNE_MODES:
        raise ValueError(f"residual_prune must be one of {RESIDUAL_PRUNE_MODES}, got {residual_prune!r}")
    if not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an int >= 1, got {multiple_of!r}")
    if not 0.0 <= float(residual_threshold) <= 1.0:
        raise ValueError(f"residual_threshold must be in [0, 1], got {residual_threshold!r}")

    all_names = {n for n, _ in model.named_modules()}
    special = _embedding_like_names(model)
    allowed: Optional[set] = None
    if modules is not None:
        allowed = set(modules) if not isinstance(modules, str) else {modules}
        bad = sorted(allowed & special)
        if bad:
            raise ValueError(
                f"pruning tied embeddings / lm_head is not supported (modules names {bad}); leave the embeddings and "
                "the output head out of `modules`"
            )
        unknown = sorted(allowed - all_names)
        if unknown:
            raise ValueError(f"`modules` names modules that are not in the model: {unknown[:10]}")

    def may_cut(*names: str) -> bool:
        return allowed is None or all(n in allowed for n in names)

    report = PruneReport(model_class=type(model).__name__, params_before=_n_params(model))
    report.settings = {"residual_prune": residual_prune, "multiple_of": multiple_of,
                       "residual_threshold": float(residual_threshold),
                       "modules": sorted(allowed) if allowed is not None else None}
    mlps, attns, skipped = _discover(model)
    report.notes.extend(f"skipped {s}" for s in skipped)
    if not mlps and not attns:
        warnings.warn(
            f"FineGates pruning: no known attention/MLP blocks in {type(model).__name__}; no structural cuts made "
            "(zero dims stay zeros)", stacklevel=2,
        )
        report.unknown_architecture = True
        for name, mod in model.named_modules():
            if not _is_lin(mod) or name in special or (allowed is not None and name not in allowed):
                continue
            for side, off in (("out", _rows_off(mod)), ("in", _cols_off(mod))):
                if int(off.sum()):
                    report.dims_left_as_zeros.append(
                        {"module": name, "side": side, "count": int(off.sum()), "reason": "consumers unknown"})
        report.params_after = _n_params(model)
        return report

    layers: dict = {}

    def layer_row(name: str) -> dict:
        idx = _layer_index(name)
        return layers.setdefault(idx if idx is not None else name, {"layer": idx if idx is not None else name})

    # ---------------- MLP neurons
    n0 = _n_params(model)
    for mlp in mlps:
        fc_mods = [model.get_submodule(n) for n in mlp.fc]
        down = model.get_submodule(mlp.down)
        if not all(_is_lin(m) for m in fc_mods + [down]):
            report.notes.append(f"{mlp.name}: has a PrunedLinear (pruned before); neurons not re-cut")
            continue
        n_i = in_out_features(down)[0]
        row = layer_row(mlp.name)
        row["intermediate_before"] = row["intermediate_after"] = n_i
        dead = _cols_off(down)
        gate_dead = torch.zeros(n_i, dtype=torch.bool)
        for n, m in zip(mlp.fc, fc_mods):
            if n == mlp.gate:
                gate_dead = _rows_off(m)
            else:  # up_proj: act-independent (act(gate) * 0 = 0)
                dead |= _rows_off(m)
        extra = gate_dead & ~dead
        if _act_zero_at_zero(mlp.act, down.weight):
            dead |= gate_dead
        elif int(extra.sum()):
            msg = (f"{mlp.name}: act(0) != 0 for {type(mlp.act).__name__}, so {int(extra.sum())} neurons with a zero "
                   f"{mlp.gate.rsplit('.', 1)[-1]} row are not cut")
            if require_zero_activation:
                raise ValueError(
                    msg + " (require_zero_activation=True): the activation must satisfy act(0) = 0 to cut neurons by "
                    "their gate/fc rows; gate the up/down side instead or use an activation with act(0) = 0"
                )
            report.activation_not_zero_at_zero.append(mlp.name)
            report.dims_left_as_zeros.append(
                {"module": mlp.gate, "side": "out", "count": int(extra.sum()), "reason": "act(0) != 0"})
        n_dead = int(dead.sum())
        if not n_dead:
            continue
        if not may_cut(*mlp.fc, mlp.down):
            report.dims_left_as_zeros.append({"module": mlp.name, "side": "neurons", "count": n_dead,
                                              "reason": "not every linear of the MLP is in `modules`"})
            continue
        keep = _pad_keep(~dead, multiple_of)
        if keep.numel() == n_i:
            continue
        for n, m in zip(mlp.fc, fc_mods):
            _set_module(model, n, _slice_linear(m, out_idx=keep))
        _set_module(model, mlp.down, _slice_linear(down, in_idx=keep))
        if mlp.holder is not None and isinstance(getattr(model.get_submodule(mlp.holder), "intermediate_size", None),
                                                 int):
            model.get_submodule(mlp.holder).intermediate_size = int(keep.numel())
        report.mlp_neurons_removed += n_i - int(keep.numel())
        row["intermediate_after"] = int(keep.numel())
    n1 = _n_params(model)

    # ---------------- attention heads / KV groups
    for at in attns:
        hd, nh, nkv = at.head_dim, at.n_heads, at.n_kv
        rep = nh // nkv
        row = layer_row(at.name)
        row["heads_before"] = row["heads_after"] = nh
        row["kv_heads_before"] = row["kv_heads_after"] = nkv
        o = model.get_submodule(at.o)
        projs = [at.qkv] if at.kind == "gpt2" else [at.q, at.k, at.v]
        if not all(_is_lin(model.get_submodule(n)) for n in projs + [at.o]):
            report.notes.append(f"{at.name}: has a PrunedLinear (pruned before); heads not re-cut")
            continue
        o_off = _cols_off(o).view(nh, hd)
        if at.kind == "gpt2":
            qkv = model.get_submodule(at.qkv)
            v_off = _rows_off(qkv)[2 * nh * hd:].view(nkv, hd)
        else:
            v_off = _rows_off(model.get_submodule(at.v)).view(nkv, hd)
        zero_dim = v_off.repeat_interleave(rep, dim=0) | o_off  # (nh, hd): the dim's contribution is exactly 0
        group_ok = zero_dim.all(dim=1).view(nkv, rep).all(dim=1)
        if bool(group_ok.all()):
            group_ok = group_ok.clone()
            group_ok[0] = False  # keep at least one group: a layer with zero heads is not representable
            report.notes.append(f"{at.name}: every head removable; kept KV group 0")
        # dims of heads that stay, whose output is zero (v row or o column): left as zeros inside the head
        partial = int((zero_dim & ~group_ok.repeat_interleave(rep)[:, None]).sum())
        if partial:
            report.dims_left_as_zeros.append({"module": at.name, "side": "head_dims", "count": partial,
                                              "reason": "head not fully removable (or GQA group kept)"})
        kept_heads = ~group_ok.repeat_interleave(rep)
        if at.kind == "gpt2":
            rows = _rows_off(qkv)
            q_zero, k_zero = rows[: nh * hd].view(nh, hd), rows[nh * hd: 2 * nh * hd].view(nkv, hd)
        else:
            q_zero = _rows_off(model.get_submodule(at.q)).view(nh, hd)
            k_zero = _rows_off(model.get_submodule(at.k)).view(nkv, hd)
        qk = int(q_zero[kept_heads].sum()) + int(k_zero[~group_ok].sum())
        if qk:
            report.dims_left_as_zeros.append({"module": at.name, "side": "qk_dims", "count": qk,
                                              "reason": "zero q/k dims of kept heads (head_dim is shared; RoPE pairs)"})
        if not int(group_ok.sum()):
            continue
        proj_names = [at.qkv] if at.kind == "gpt2" else [at.q, at.k, at.v]
        if not may_cut(*proj_names, at.o):
            report.dims_left_as_zeros.append({"module": at.name, "side": "heads", "count": int(group_ok.sum()) * rep,
                                              "reason": "not every projection of the attention is in `modules`"})
            continue
        kv_keep = torch.nonzero(~group_ok).flatten()
        heads_keep = torch.nonzero(~group_ok.repeat_interleave(rep)).flatten()
        dim_idx = lambda heads: (heads[:, None] * hd + torch.arange(hd)[None, :]).flatten()  # noqa: E731
        q_rows, kv_rows = dim_idx(heads_keep), dim_idx(kv_keep)
        if at.kind == "gpt2":
            width = nh * hd
            rows = torch.cat([q_rows, width + kv_rows, 2 * width + kv_rows])
            _set_module(model, at.qkv, _slice_linear(qkv, out_idx=rows))
        else:
            _set_module(model, at.q, _slice_linear(model.get_submodule(at.q), out_idx=q_rows))
            _set_module(model, at.k, _slice_linear(model.get_submodule(at.k), out_idx=kv_rows))
            _set_module(model, at.v, _slice_linear(model.get_submodule(at.v), out_idx=kv_rows))
        _set_module(model, at.o, _slice_linear(o, in_idx=q_rows))
        holder = model.get_submodule(at.attr_module)
        n_new = int(heads_keep.numel())
        if at.kind == "gpt2":
            holder.num_heads = n_new
            holder.split_size = n_new * hd
        elif at.kind == "bert":
            holder.num_attention_heads = n_new
            holder.all_head_size = n_new * hd
        # llama-style: head counts come from the shapes; num_key_value_groups (rep) is unchanged
        report.heads_removed += nh - n_new
        report.kv_groups_removed += nkv - int(kv_keep.numel())
        row["heads_after"], row["kv_heads_after"] = n_new, int(kv_keep.numel())
    n2 = _n_params(model)

    # ---------------- residual-stream dims
    def residual_sides():
        for at in attns:
            for n in ([at.qkv] if at.kind == "gpt2" else [at.q, at.k, at.v]):
                yield n, "in"
            yield at.o, "out"
        for mlp in mlps:
            for n in mlp.fc:
                yield n, "in"
            yield mlp.down, "out"

    for name, side in residual_sides():
        mod = model.get_submodule(name)
        if not _is_lin(mod):
            continue
        off = _cols_off(mod) if side == "in" else _rows_off(mod)
        n_off, full = int(off.sum()), off.numel()
        if not n_off:
            continue
        reason = None
        if residual_prune != "gather":
            reason = 'residual_prune="zeros"'
        elif n_off / full < residual_threshold:
            reason = f"below residual_threshold ({n_off}/{full} < {residual_threshold})"
        elif not may_cut(name):
            reason = "not in `modules`"
        keep = _pad_keep(~off, multiple_of) if reason is None else None
        if keep is not None and keep.numel() == full:
            reason = f"padding to multiple_of={multiple_of} keeps every dim"
        if reason is not None:
            report.dims_left_as_zeros.append({"module": name, "side": side, "count": n_off, "reason": reason})
            continue
        new = _to_pruned_linear(mod, keep if side == "in" else None, keep if side == "out" else None)
        _set_module(model, name, new)
        report.gathered_modules.append(name)
        if side == "in":
            report.residual_in_dims_gathered += full - int(keep.numel())
        else:
            report.residual_out_dims_gathered += full - int(keep.numel())
        if n_off > full - int(keep.numel()):
            report.dims_left_as_zeros.append({"module": name, "side": side,
                                              "count": n_off - (full - int(keep.numel())),
                                              "reason": f"re-kept as padding to multiple_of={multiple_of}"})
    n3 = _n_params(model)

    report.params_after = n3
    report.params_removed_by_category = {"mlp": n0 - n1, "attention": n1 - n2, "residual": n2 - n3}
    report.layers = [layers[k] for k in sorted(layers, key=lambda k: (not isinstance(k, int), k if isinstance(k, int)
                                                                       else 0, str(k)))]
    return report


# ----------------------------------------------------------------------------------------------- save / load
def _module_entry(mod: nn.Module) -> Optional[dict]:
    if isinstance(mod, PrunedLinear):
        return {
            "class": "PrunedLinear", "in_features": mod.in_features, "out_features": mod.out_features,
            "bias": mod.linear.bias is not None,
            "in_index": mod.in_index.tolist() if mod.in_index is not None else None,
            "out_index": mod.out_index.tolist() if mod.out_index is not None else None,
        }
    if _is_lin(mod):
        n_in, n_out = in_out_features(mod)
        return {"class": "Conv1D" if is_conv1d(mod) else "Linear", "in_features": n_in, "out_features": n_out,
                "bias": getattr(mod, "bias", None) is not None}
    return None


def build_manifest(model: nn.Module, report: Optional[PruneReport] = None) -> dict:
    """The shape manifest: every linear-like module (class, in/out, bias, PrunedLinear indices) and the integer
    head-count attributes of every module, so `load_pruned` can rebuild the pruned shapes from the config."""
    config = getattr(model, "config", None)
    archs = list(getattr(config, "architectures", None) or [])
    arch = type(model).__name__
    modules, attrs = {}, {}
    pruned_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, PrunedLinear))
    for name, mod in model.named_modules():
        if pruned_prefixes and name.startswith(pruned_prefixes):
            continue  # a PrunedLinear's inner Linear is part of its entry
        entry = _module_entry(mod)
        if entry is not None and name:
            modules[name] = entry
        vals = {a: getattr(mod, a) for a in _HEAD_ATTRS
                if isinstance(getattr(mod, a, None), int) and not isinstance(getattr(mod, a), bool)}
        if vals and name and not hasattr(mod, "get_input_embeddings"):
            attrs[name] = vals
    return {
        "format": "peft_ext.finegates.pruned", "version": MANIFEST_VERSION, "architecture": arch,
        "config_architectures": archs, "modules": modules, "attributes": attrs,
        "report": report.to_dict() if report is not None else None,
    }


def save_pruned(model: nn.Module, path: str, report: Optional[PruneReport] = None) -> str:
    """Save a pruned model: safetensors weights (save_pretrained) + config + `pruned_manifest.json` (with `report`, or
    the model's own `finegates_prune_report` from merge_and_unload(prune=True))."""
    if report is None:
        report = getattr(model, "finegates_prune_report", None)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_pruned needs a transformers PreTrainedModel, got {type(model).__name__}")
    os.makedirs(path, exist_ok=True)
    if getattr(model.config, "architectures", None) != [type(model).__name__]:
        model.config.architectures = [type(model).__name__]
    params = inspect.signature(model.save_pretrained).parameters
    kwargs = {}
    if "safe_serialization" in params:  # transformers 4.x; 5.x always writes safetensors
        kwargs["safe_serialization"] = True
    if "save_original_format" in params:  # keep the in-memory key names (load_pruned reads them back as they are)
        kwargs["save_original_format"] = False
    model.save_pretrained(path, **kwargs)
    manifest = build_manifest(model, report)
    with open(os.path.join(path, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return path


def _read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for fn in files:
            sd.update(load_file(os.path.join(path, os.path.basename(fn))))
        return sd
    raise FileNotFoundError(f"no model.safetensors (or safetensors index) in {path}")


def _new_module(entry: dict, name: str, dtype: torch.dtype) -> nn.Module:
    cls = entry.get("class")
    try:
        n_in, n_out, bias = int(entry["in_features"]), int(entry["out_features"]), bool(entry["bias"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"pruned manifest: entry for {name!r} is malformed ({entry})") from e
    if cls == "Linear":
        return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    if cls == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        if not bias:
            raise ValueError(f"pruned manifest: Conv1D {name!r} without bias is not representable")
        return Conv1D(n_out, n_in).to(dtype)
    if cls == "PrunedLinear":
        try:
            return PrunedLinear(n_in, n_out, in_index=entry.get("in_index"), out_index=entry.get("out_index"),
                                bias=bias, dtype=dtype)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"pruned manifest: PrunedLinear {name!r}: {e}") from e
    raise ValueError(f"pruned manifest: unknown module class {cls!r} for {name!r}")


def load_pruned(path: str, torch_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Rebuild a model saved by `save_pruned`: config -> model class -> manifest shapes -> safetensors weights.

    Strict: a manifest entry naming a module that does not exist, missing or unexpected weight keys, or shapes that
    disagree with the manifest raise ValueError. Weights are read with safetensors only (no unpickling)."""
    import transformers
    from transformers import AutoConfig

    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{path} has no {MANIFEST_NAME}: not saved by save_pruned")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != "peft_ext.finegates.pruned" or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{mpath}: unknown manifest format/version {manifest.get('format')!r} "
                         f"{manifest.get('version')!r}")
    config = AutoConfig.from_pretrained(path)
    arch = manifest.get("architecture")
    cls = getattr(transformers, str(arch), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{mpath}: architecture {arch!r} is not a transformers model class")
    if list(getattr(config, "architectures", None) or []) and arch not in config.architectures:
        raise ValueError(f"{mpath}: architecture {arch!r} disagrees with config.architectures {config.architectures}")

    state = _read_safetensors(path)
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    file_dtype = next(iter(float_dtypes)) if len(float_dtypes) == 1 else torch.float32
    model = cls._from_config(config, dtype=file_dtype)

    names = {n for n, _ in model.named_modules()}
    for name, entry in (manifest.get("modules") or {}).items():
        if name not in names:
            raise ValueError(f"{mpath}: manifest names module {name!r}, which {arch} does not have")
        current = model.get_submodule(name)
        if _module_entry(current) == entry:
            continue
        ref = getattr(current, "weight", None)
        dtype = ref.dtype if torch.is_tensor(ref) and ref.is_floating_point() else file_dtype
        _set_module(model, name, _new_module(entry, name, dtype))
    for name, vals in (manifest.get("attributes") or {}).items():
        if name not in names:
            raise ValueError(f"{mpath}: manifest names module {name!r}, which {arch} does not have")
        mod = model.get_submodule(name)
        for attr, val in vals.items():
            if attr not in _HEAD_ATTRS or not isinstance(val, int) or not isinstance(getattr(mod, attr, None), int):
                raise ValueError(f"{mpath}: attribute {name}.{attr} cannot be set to {val!r}")
            setattr(mod, attr, val)

    expected = model.state_dict()
    # tied parameters (lm_head <-> embeddings) are saved once: any one name of a tied group suffices
    by_tensor: dict = {}
    for key, t in expected.items():
        by_tensor.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append(key)
    missing = []
    for keys in by_tensor.values():
        if len(keys) > 1 and any(k in state for k in keys):
            continue
        missing.extend(k for k in keys if k not in state)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the manifest-shaped {arch}: missing keys {sorted(missing)}, "
                         f"unexpected keys {unexpected}")
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in state.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{path}: weight shapes disagree with the manifest: {bad}")
    for name, entry in (manifest.get("modules") or {}).items():  # index buffers: file and manifest must agree
        if entry.get("class") == "PrunedLinear":
            for side in ("in_index", "out_index"):
                key = f"{name}.{side}"
                if (key in state) != (entry.get(side) is not None) or (
                        key in state and state[key].tolist() != entry[side]):
                    raise ValueError(f"{path}: {key} in the weights disagrees with the manifest")
    model.load_state_dict(state, strict=False)
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.eval()
