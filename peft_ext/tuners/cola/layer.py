from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from peft_ext.kernels.dispatch import MAX_TRITON_RANK
from peft_ext.tuners.base import ExactMerge
from peft_ext.tuners.lora_fused import VARIANT_KEYS, FusedLoraLinear


class MergedFactor(nn.Module):
    """One frozen factor of the merged links (a module, not a bare tensor, so that its parameter is named
    `cola_merged_A.<adapter>.weight`: TRL's reference-adapter copy takes parameters named `.default.`).

    Before any link is merged the factor is empty ((0, in) for A, (out, 0) for B): `weight` is then an empty
    non-persistent buffer, not a parameter, so the model holds no zero-size parameter (FSDP2 shards one to an empty
    piece that `get_model_state_dict(full_state_dict=True)` cannot gather in torch 2.13) and the state dict, hence an
    adapter file, holds no empty tensor. It becomes a frozen parameter when a link is merged (`set`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.set(weight)

    @property
    def empty(self) -> bool:
        return "weight" not in self._parameters

    def set(self, value: torch.Tensor) -> None:
        """Hold `value`: in the frozen parameter's storage (the same Parameter object) once it is one; an empty
        `value` turns the factor back into the empty buffer."""
        value = value.detach()
        if value.numel() == 0:
            self._parameters.pop("weight", None)
            self.register_buffer("weight", value, persistent=False)
        elif not self.empty:
            self.weight.data = value
        else:
            self._buffers.pop("weight", None)  # the empty buffer, if any
            self._non_persistent_buffers_set.discard("weight")
            self.weight = nn.Parameter(value, requires_grad=False)


class ColaChain:
    """The chain of a COLA layer, shared by the layer types (ColaLinear; ColaLinear4bit in bnb.py): the link
    being trained is LoRA's own `lora_A` / `lora_B` (rank r_k); the links already merged are frozen factors with
    their scaling folded in (see ColaLinear). Mixed into a LoRA layer class, before it in the bases."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("cola_merged_A", "cola_merged_B")
    other_param_names = LoraLayer.other_param_names + ("cola_link_ranks",)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        if "cola_merged_A" not in self._modules:  # first adapter: before LoRA's own update_layer runs
            self.cola_merged_A = nn.ModuleDict()
            self.cola_merged_B = nn.ModuleDict()
            self.cola_link_ranks: dict[str, list[int]] = {}
            self.cola_init: dict[str, object] = {}
            self.frozen_peft_weight_names = {}
        name = kwargs.get("target_name", "") or ""
        ranks = config.ranks_for(r)
        limit = min(self.in_features, self.out_features)
        for j, rank in enumerate(ranks):
            if rank > limit:
                field = f"link_ranks[{j}]" if config.link_ranks is not None else "r (or its rank_pattern entry)"
                raise ValueError(
                    f"COLA rank {rank} (ColaConfig.{field}) is larger than layer {name or type(self.get_base_layer()).__name__} "
                    f"allows: each link's rank must be <= min(in_features, out_features) = "
                    f"min({self.in_features}, {self.out_features}) = {limit}."
                )
        k = config.current_link
        super().update_layer(adapter_name, ranks[k], lora_alpha=lora_alpha, config=config, **kwargs)
        self.cola_link_ranks[adapter_name] = ranks
        self.cola_init[adapter_name] = config.init_lora_weights
        weight = self.lora_A[adapter_name].weight
        merged = sum(ranks[:k])  # 0 at link 0: empty factors, held as buffers (see MergedFactor)
        self.cola_merged_A[adapter_name] = MergedFactor(weight.new_zeros(merged, self.in_features))
        self.cola_merged_B[adapter_name] = MergedFactor(weight.new_zeros(self.out_features, merged))
        self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: ("cola_merged_A", "cola_merged_B")}
        if config.seed is not None:
            self.init_link(adapter_name, link_seed(config.seed, k, name), config.init_lora_weights, first=k == 0)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------------------------------ chain
    def merged_rank(self, adapter: str) -> int:
        return self.cola_merged_A[adapter].weight.shape[0]

    def links_merged(self, adapter: str) -> int:
        """How many links the merged factors hold (from their rank)."""
        return links_for_rank(self.cola_link_ranks[adapter], self.merged_rank(adapter))

    @torch.no_grad()
    def init_link(self, adapter: str, seed: int, init=True, first: bool = False) -> None:
        """Draw the current link from `seed`: A as LoRA does (kaiming-uniform, or N(0, 1/r) for "gaussian"),
        B = 0 (identity start). init=False on the first link (tests only) draws B like A."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        g = torch.Generator().manual_seed(seed)
        new_a = torch.empty(a.shape, dtype=torch.float32)
        if init == "gaussian":
            nn.init.normal_(new_a, std=1.0 / a.shape[0], generator=g)
        else:
            nn.init.kaiming_uniform_(new_a, a=math.sqrt(5), generator=g)
        a.copy_(new_a)
        if first and init is False:
            new_b = torch.empty(b.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(new_b, a=math.sqrt(5), generator=g)
            b.copy_(new_b)
        else:
            b.zero_()

    @torch.no_grad()
    def start_next_link(self, adapter: str, seed: int) -> list[nn.Parameter]:
        """Merge the current link into the frozen factors and start the next one (A from `seed`, B = 0) in the
        same Parameter objects (resized if the next link's rank differs). Returns [A, B]: their optimizer state
        must be reset."""
        ranks = self.cola_link_ranks[adapter]
        k = self.links_merged(adapter)
        if k + 1 >= len(ranks):
            raise ValueError(f"the chain of {len(ranks)} links is complete: there is no link {k + 2} to start.")
        lin_a, lin_b = self.lora_A[adapter], self.lora_B[adapter]
        a, b = lin_a.weight, lin_b.weight
        _refuse_sharded(a, b)
        fa, fb = self.cola_merged_A[adapter], self.cola_merged_B[adapter]
        # the first merge makes the factors parameters in the link's dtype (as the empty ones were cast with it)
        like_a, like_b = (a, b) if fa.empty else (fa.weight, fb.weight)
        new_b = (b.detach().float() * self.scaling[adapter]).to(like_b.device, like_b.dtype)
        fa.set(torch.cat([fa.weight.to(like_a.device, like_a.dtype), a.detach().to(like_a.device, like_a.dtype)], 0))
        fb.set(torch.cat([fb.weight.to(like_b.device, like_b.dtype), new_b], 1))
        rank = ranks[k + 1]
        if rank != a.shape[0]:
            a.data = a.data.new_empty(rank, self.in_features)
            b.data = b.data.new_empty(self.out_features, rank)
            lin_a.out_features = lin_b.in_features = rank
            self.set_link_rank(adapter, rank)
        a.grad = b.grad = None
        self.init_link(adapter, seed, self.cola_init.get(adapter, True))  # the config's init_lora_weights
        return [a, b]

    def set_link_rank(self, adapter: str, rank: int) -> None:
        self.r[adapter] = rank
        self.scaling[adapter] = _scaling(self.lora_alpha[adapter], rank, self.use_rslora.get(adapter, False))

    @torch.no_grad()
    def resize_for(self, adapter: str, merged_rank: int, current_rank: int) -> int:
        """Reshape this adapter's tensors for a checkpoint whose merged factors have rank `merged_rank` and whose
        current link has rank `current_rank` (values are loaded afterwards). Returns the number of merged links."""
        ranks = self.cola_link_ranks[adapter]
        k = links_for_rank(ranks, merged_rank)
        if ranks[k] != current_rank:
            raise ValueError(
                f"the checkpoint's current link has rank {current_rank}, but link {k + 1} of this ColaConfig has rank "
                f"{ranks[k]}: load the adapter with the config it was saved with."
            )
        fa, fb = self.cola_merged_A[adapter], self.cola_merged_B[adapter]
        if fa.weight.shape[0] != merged_rank:
            _refuse_sharded(self.lora_A[adapter].weight, self.lora_B[adapter].weight)
            # the dtype of the link (as the first merge gives them) unless they hold merged links already
            like_a, like_b = (self.lora_A[adapter].weight, self.lora_B[adapter].weight) if fa.empty else (fa.weight, fb.weight)
            fa.set(like_a.detach().new_zeros(merged_rank, self.in_features))
            fb.set(like_b.detach().new_zeros(self.out_features, merged_rank))
        lin_a, lin_b = self.lora_A[adapter], self.lora_B[adapter]
        if lin_a.weight.shape[0] != current_rank:
            lin_a.weight.data = lin_a.weight.data.new_zeros(current_rank, self.in_features)
            lin_b.weight.data = lin_b.weight.data.new_zeros(self.out_features, current_rank)
            lin_a.out_features = lin_b.in_features = current_rank
            lin_a.weight.grad = lin_b.weight.grad = None
            self.set_link_rank(adapter, current_rank)
        return k

    def folded_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B') of the whole chain: B' A = sum over links of s_j B_j A_j (rank R_m + r_k)."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        ma, mb = self.cola_merged_A[adapter].weight, self.cola_merged_B[adapter].weight
        b = b * self.scaling[adapter]
        if ma.shape[0] == 0:
            return a, b
        return torch.cat([ma.to(a.dtype), a], 0), torch.cat([mb.to(b.dtype), b], 1)

    def adapter_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with s * B A the whole chain (scaling folded, s = 1, once links are merged)."""
        if self.merged_rank(adapter) == 0:
            return self.lora_A[adapter].weight, self.lora_B[adapter].weight, float(self.scaling[adapter])
        a, b = self.folded_factors(adapter)
        return a, b, 1.0

    def _merged_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        ma, mb = self.cola_merged_A[adapter].weight, self.cola_merged_B[adapter].weight
        dtype = _compute_dtype(x)
        return F.linear(F.linear(x.to(dtype), ma.to(dtype)), mb.to(dtype))

    def _delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter's whole low-rank term in plain PyTorch (several active adapters, unusual base layers)."""
        dtype = _compute_dtype(x)
        a, b = self.lora_A[adapter].weight.to(dtype), self.lora_B[adapter].weight.to(dtype)
        xd = self.lora_dropout[adapter](x.to(dtype))
        out = F.linear(F.linear(xd, a), b) * self.scaling[adapter]
        if self.merged_rank(adapter):
            out = out + self._merged_term(x, adapter)
        return out

    def _loop_mixed_forward(self, x, adapter_names, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        for adapter in sorted({a for a in adapter_names if a in self.lora_A}):
            rows = [i for i, a in enumerate(adapter_names) if a == adapter]
            result[rows] += self._delta(x[rows], adapter).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The whole chain's update, sum over links of s_j B_j A_j, shaped like the base weight."""
        a, b = self.folded_factors(adapter)
        delta = b.detach().float() @ a.detach().float()
        return delta.t() if self.fan_in_fan_out else delta


class ColaLinear(ColaChain, ExactMerge, FusedLoraLinear):
    """A LoRA layer holding a chain: the link being trained (`lora_A`, `lora_B`, PEFT's own, rank r_k) and the
    links already merged, as frozen factors with their scaling folded in:

        y = x W^T + b + (x A_m^T) B_m^T + s_k * (dropout(x) A_k^T) B_k^T
        A_m = [A_1; ...; A_{k-1}]  (R_m, in)      B_m = [s_1 B_1, ..., s_{k-1} B_{k-1}]  (out, R_m)

    `cola_merged_A[adapter].weight` is A_m and `cola_merged_B[adapter].weight` is B_m; R_m (the sum of the merged
    links' ranks) is read from their shapes, so a state dict carries the chain position. The forward is one fused
    low-rank call on [A_m; A_k], [B_m, s_k B_k] (Triton on CUDA, the reference on the CPU) when the total rank fits
    the kernel and no dropout applies; otherwise the current link is fused and the merged part added.

    Why frozen factors instead of W += s B A (the paper): the base weights stay untouched, so `unload()` is the
    exact base, `disable_adapter()` the exact base outputs (the DPO reference), and the export is exact; the cost
    is a rank-R_m extra in the low-rank term (M*r is still far below the layer's width).
    """

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in VARIANT_KEYS:
            kwargs.pop(key, None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.training and any(self.dropout_p(a) > 0 for a in adapter_names if a in self.lora_A):
                raise ValueError("adapter_names= (mixed-adapter batches) is for inference: call model.eval() first.")
            if self.fused_base_reason(x, args, kwargs) is None:
                return self.gathered_forward(x, adapter_names)
            return self._loop_mixed_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1 and self.fused_base_reason(x, args, kwargs) is None:
            return self._fused_forward(x, active[0])
        result = self.base_layer(x, *args, **kwargs)
        for adapter in active:
            result = result + self._delta(x, adapter).to(result.dtype)
        return result

    def _fused_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        a, b, s = self.lora_A[adapter].weight, self.lora_B[adapter].weight, float(self.scaling[adapter])
        p = self.dropout_p(adapter)
        merged = self.merged_rank(adapter)
        total = merged + a.shape[0]
        if merged and p == 0.0 and total <= min(self.in_features, self.out_features, MAX_TRITON_RANK):
            # the whole chain as one low-rank term: x is read once
            a_all, b_all = self.folded_factors(adapter)
            return self.fused_lowrank(x, a_all, b_all, 1.0)
        y = self.fused_lowrank(x, a, b, s, p)
        if merged:
            y = y + self._merged_term(x, adapter).to(y.dtype)  # merged links see x without dropout
        return y

    # -------------------------------------------------------------------------------------- merge
    method_label = "COLA"

    def merged_values(self, adapter: str) -> dict[str, torch.Tensor]:
        """The base weight plus the whole chain's update (ExactMerge keeps the original for `unmerge`)."""
        weight = self.get_base_layer().weight
        return {"weight": (weight.data.float() + self.get_delta_weight(adapter).to(weight.device)).to(weight.dtype)}

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        ExactMerge.unmerge(self)

    def __repr__(self) -> str:
        return "cola." + super().__repr__()


# ----------------------------------------------------------------------------------------------- helpers
def link_seed(seed: Optional[int], link: int, module_name: str) -> int:
    """The seed of one link of one module: from the config's seed, or, when it is None, from the run's (torch's initial
    seed, which the Trainer sets from TrainingArguments.seed), so later links vary with the run's seed and a
    resumed run draws them again exactly."""
    base = torch.initial_seed() if seed is None else seed
    return zlib.crc32(f"{base}:{link}:{module_name}".encode())


def links_for_rank(ranks: list[int], merged_rank: int) -> int:
    """k such that the first k links' ranks sum to merged_rank (ValueError if none)."""
    total = 0
    for k, rank in enumerate(ranks):
        if total == merged_rank:
            return k
        total += rank
    raise ValueError(
        f"merged COLA factors of rank {merged_rank} are not a whole number of links of ranks {ranks} (the last link "
        f"is never merged): load the adapter with the ColaConfig it was saved with."
    )


FSDP2_LINK_MERGE = (
    "COLA cannot merge a link (or reshape its chain for a checkpoint) while the model is sharded with FSDP2 "
    "(fully_shard): the link's parameters are sharded DTensors that FSDP2 manages, which the merge would move and "
    "resize. Run each link as its own FSDP2 run: save the adapter at the link boundary, call "
    "`model.base_model.next_link()` on the unsharded model (or load a checkpoint into it before `fully_shard`), then "
    "shard it again; or train the chain under DDP, or on one process."
)


def _refuse_sharded(*params: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without torch.distributed
        return
    if any(isinstance(p, DTensor) for p in params):
        raise RuntimeError(FSDP2_LINK_MERGE)


def _scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
