"""Fused forward for PEFT's own LoRA layers: `accelerate_lora(model)` and its inverse `remove_lora_acceleration`.

Plain `LoraConfig` users keep their model, config and saved adapters; `accelerate_lora(model)` swaps the class of
each `peft.tuners.lora.layer.Linear` instance for `FusedLoraLinear`, a subclass whose forward computes

    y = x W^T + b + s * (dropout(x) A^T) B^T

with one call of `peft_ext.kernels.lowrank_linear` (Triton on CUDA: the adapter's shrink/expand in one launch that
reads x once, then the base GEMM accumulating into its output; the plain-PyTorch reference on the CPU), and
`adapter_names=` mixed batches with one call of `lowrank_linear_gathered` (one launch for every adapter of the
batch, rows grouped by adapter). Nothing else changes: parameters, state dict, `merge`/`unmerge`,
`disable_adapter`, `set_adapter`, saving and loading are PEFT's, and `remove_lora_acceleration(model)` (or PEFT's
own `merge_and_unload`/`unload`) gives plain PEFT layers back. The swap is per instance (`module.__class__`), so
it survives `deepcopy`, needs no monkey-patching of PEFT, and `isinstance(module, peft.tuners.lora.Linear)` holds.

Which calls take the fused path (anything else runs PEFT's own forward, unchanged):
  - the base layer is a plain `nn.Linear` or transformers' `Conv1D` (GPT-2; `fan_in_fan_out`), with no forward
    hooks (e.g. accelerate's offloading hooks) and a floating-point weight;
  - the adapters involved are vanilla LoRA: no DoRA or other variant, `lora_bias=False`, rank <= min(in, out);
  - one active adapter (a list of active adapters runs on PEFT's path), or `adapter_names=` (inference);
  - the adapter is neither merged nor disabled (PEFT's path already is the base layer then);
  - `lora_dropout` is applied by the kernel (its keep-mask comes from torch's RNG; a different mask than PEFT's
    nn.Dropout draws, same distribution).

Sibling groups (`accelerate_lora(group_siblings=True)`, the default): LoRA layers that are children of one module
and share in_features (Llama's q/k/v/o_proj, gate/up_proj) form a `_SiblingGroup`. In training (module.training and
grad enabled), the first of them called with a tensor x runs ONE grouped shrink for every sibling expected to read
x (kernels/lowrank_grouped.py: x read once in the forward and once for all their dA), and each sibling called with
the same tensor object (same `_version`) takes its slice and runs only its expand and base GEMM; its backward reads
its dy once (dB fused where the bytes model says so). A sibling called with another tensor, with dropout in effect,
merged, disabled, with adapter_names or several active adapters, in eval mode or under no_grad, takes its own path;
the first backward teaches the group which siblings really consumed x (o_proj reads the attention output, so from
the second step on nothing is computed for it). The shared results are dropped as soon as no sibling is waiting, so
x is not kept alive past its siblings' calls; with activation checkpointing (non-reentrant) the recomputed forward
builds the same groups (what was learned applies after the recomputation). Gradients equal the ungrouped path's
(fp32 to 1e-5; bf16 within bf16 rounding: tests/kernels/test_lora_grouped.py), hence on by default. COLA's layers
(their own forward) are not grouped. Grouping needs the Triton path (CUDA, or TRITON_INTERPRET=1) and a
concatenated rank <= 128 (else each layer runs on its own).

Numerics: the adapter weights (fp32 by PEFT's default) are cast to x's dtype instead of x being upcast to fp32
(the upcast is most of PEFT's overhead, design/perf.md), so bf16 outputs differ from PEFT's within bf16 rounding;
fp32 outputs agree to float rounding.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from peft_ext.kernels import (
    AdapterSegments,
    lowrank_linear,
    lowrank_linear_gathered,
    plan_adapter_segments,
    reference_lowrank_linear_gathered,
)
from peft_ext.kernels.dispatch import BACKENDS, HAS_TRITON, MAX_TRITON_RANK, TRITON_DTYPES, autocast_base, choose_backend, interpret_mode
from peft_ext.kernels.lowrank_grouped import grouped_shrink_with_input, lowrank_expand_linear
from peft_ext.tuners.base import is_conv1d, logical_weight

__all__ = ["FusedLoraLinear", "accelerate_lora", "remove_lora_acceleration", "fused_path_report"]


class FusedLoraLinear(LoraLinear):
    """`peft.tuners.lora.layer.Linear` with the fused forward (see the module docstring). Built by class swap
    (`accelerate_lora`), never constructed directly; COLA's layer (`peft_ext.tuners.cola.ColaLinear`) subclasses it.

    `lowrank_backend`: None (Triton on CUDA, the reference elsewhere), "triton" or "reference" (forced)."""

    lowrank_backend: Optional[str] = None

    # ----------------------------------------------------------------------------------------- factors
    def adapter_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s): the adapter's whole update is s * B A."""
        return self.lora_A[adapter].weight, self.lora_B[adapter].weight, float(self.scaling[adapter])

    def base_weight_and_bias(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base layer's weight as (out, in) (a transposed view for Conv1D) and its bias."""
        base = self.get_base_layer()
        return logical_weight(base), base.bias

    def fused_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(x, W, b) for the kernels, cast to the autocast dtype under torch.autocast (as F.linear would). Done here
        because the kernels' entry points check that x and W share a dtype before applying autocast themselves."""
        weight, bias = self.base_weight_and_bias()
        return autocast_base(x, weight, bias)

    def dropout_p(self, adapter: str) -> float:
        """The adapter's dropout probability in effect now (0 in eval mode)."""
        dropout = self.lora_dropout[adapter]
        return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    # ------------------------------------------------------------------------------------- eligibility
    def fused_base_reason(self, x: Any = None, args: tuple = (), kwargs: Optional[dict] = None) -> Optional[str]:
        """Why the base layer (or this call) cannot take the fused path; None if it can."""
        if args or any(v is not None for k, v in (kwargs or {}).items() if k != "adapter_names"):
            return "extra forward arguments"
        base = self.get_base_layer()
        if type(base) is not nn.Linear and not is_conv1d(base):
            return f"base layer is {type(base).__name__}, not nn.Linear / Conv1D"
        if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
            return "base layer has forward hooks"
        if not base.weight.is_floating_point():
            return f"base weight dtype {base.weight.dtype}"
        if x is not None:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return "input is not a floating-point tensor"
            autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
            if x.dtype != base.weight.dtype and not autocast:
                return "input and weight dtypes differ"  # PEFT's path raises its own error
        return None

    def fused_adapter_reason(self, adapter: str) -> Optional[str]:
        """Why `adapter` cannot take the fused path in this layer; None if it can."""
        if adapter in self.lora_variant:
            return f"adapter {adapter!r} is a LoRA variant ({type(self.lora_variant[adapter]).__name__})"
        if self.lora_bias.get(adapter, False):
            return f"adapter {adapter!r} has lora_bias=True"
        dropout = self.lora_dropout[adapter]
        if not isinstance(dropout, (nn.Dropout, nn.Identity)):
            return f"adapter {adapter!r} has dropout {type(dropout).__name__}"
        rank = self.lora_A[adapter].weight.shape[0]
        if rank > min(self.in_features, self.out_features):
            return (
                f"adapter {adapter!r} has rank {rank} > min(in_features, out_features) = "
                f"{min(self.in_features, self.out_features)}"
            )
        return None

    def _fusable(self, x, args, kwargs) -> bool:
        if self.disable_adapters or self.merged or self.fused_base_reason(x, args, kwargs) is not None:
            return False
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            names = [a for a in self.active_adapters if a in self.lora_A]
            if len(names) != 1:
                return False
        else:
            names = {a for a in adapter_names if a in self.lora_A}
            if self.training and any(self.dropout_p(a) > 0 for a in names):
                return False
        return all(self.fused_adapter_reason(a) is None for a in names)

    def sibling_adapter(self, x, args, kwargs) -> Optional[str]:
        """The adapter whose shrink this call can take from its sibling group (`_SiblingGroup`): the single active
        adapter when the call takes the fused path with no dropout in effect and no adapter_names; else None."""
        if kwargs.get("adapter_names") is not None or not self._fusable(x, args, kwargs):
            return None
        adapter = next(a for a in self.active_adapters if a in self.lora_A)
        return adapter if self.dropout_p(adapter) == 0.0 else None

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        group = self.__dict__.get("_lora_siblings")
        if group is not None:
            y = group.forward(self, x, args, kwargs)
            if y is not None:
                return y
        if not self._fusable(x, args, kwargs):
            return super().forward(x, *args, **kwargs)  # PEFT's own path, unchanged
        self._check_forward_args(x, *args, **kwargs)  # PEFT's errors for bad adapter_names
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is not None:
            return self.gathered_forward(x, adapter_names)
        adapter = next(a for a in self.active_adapters if a in self.lora_A)
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return self.fused_lowrank(x, lora_a, lora_b, float(self.scaling[adapter]), self.dropout_p(adapter))

    def fused_lowrank(self, x, lora_a, lora_b, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
        """x W^T + b + scale * (dropout(x) A^T) B^T through `lowrank_linear`."""
        x, weight, bias = self.fused_operands(x)
        return lowrank_linear(
            x, weight, bias, lora_a, lora_b, scale, dropout_p=dropout_p, training=dropout_p > 0.0,
            backend=self.lowrank_backend,
        )  # fmt: skip

    def expand_slice(self, x_alias: torch.Tensor, xa: torch.Tensor, adapter: str) -> torch.Tensor:
        """x W^T + b + s xa B^T with xa = x A^T from the sibling group's shared shrink (`lowrank_expand_linear`)."""
        x_alias, weight, bias = self.fused_operands(x_alias)
        return lowrank_expand_linear(
            x_alias, xa, weight, bias, self.lora_B[adapter].weight, float(self.scaling[adapter]), backend="triton"
        )

    def gathered_forward(self, x: torch.Tensor, adapter_names: list) -> torch.Tensor:
        """Mixed batch: row (sequence) i of x under adapter adapter_names[i] ("__base__" or an adapter this layer
        does not hold: the base layer alone), all adapters in one gathered kernel call."""
        names = sorted({a for a in adapter_names if a in self.lora_A})
        if not names:
            return self.base_layer(x)
        factors = [self.adapter_factors(a) for a in names]
        a_stack, b_stack = self.adapter_stacks(factors)
        rank = a_stack.shape[1]
        plan = segment_plan(adapter_names, names, x)
        x, weight, bias = self.fused_operands(x)
        scales = [s for _, _, s in factors]
        if rank > min(self.in_features, self.out_features):  # only COLA's accumulated chains get here
            return reference_lowrank_linear_gathered(
                x, weight, bias, a_stack, b_stack, scales, plan.row_index.view(x.shape[:-1])
            )
        return lowrank_linear_gathered(
            x, weight, bias, a_stack, b_stack, scales, plan, check_index=False, backend=self.lowrank_backend
        )

    def adapter_stacks(self, factors: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The (L, r, in) / (L, out, r) stacks of the mixed batch's adapters, kept between forwards while the same
        parameters hold the same values (an in-place update, a re-created or moved parameter rebuilds them; the
        cache holds the parameters, so their ids cannot be reused meanwhile). Only plain parameters are kept
        (COLA's folded chains are computed per call), and never stacks recorded by autograd (they hold a graph)."""
        tensors = [t for a, b, _ in factors for t in (a, b)]
        key = _stack_key(tensors)
        cached = self.__dict__.get("_adapter_stacks")
        if cached is not None and cached[0] == key:
            return cached[2]
        stacks = _stack([a for a, _, _ in factors], [b for _, b, _ in factors])
        recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if recorded or not all(isinstance(t, nn.Parameter) for t in tensors):
            self.__dict__.pop("_adapter_stacks", None)
        else:
            self.__dict__["_adapter_stacks"] = (key, tensors, stacks)
        return stacks


def _stack_key(tensors) -> tuple:
    """Identifies the exact values of the tensors: same objects, no in-place change since (`_version`)."""
    return tuple((id(t), t._version, t.dtype, t.device) for t in tensors)


def _stack(a_list: list, b_list: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, r, in) and (L, out, r) stacks; adapters of smaller rank are zero-padded to the largest (zero rows of A
    and columns of B add nothing). Equal ranks and dtypes (the usual case) take one copy per stack."""
    dtype = a_list[0].dtype
    for t in (*a_list, *b_list):
        dtype = torch.promote_types(dtype, t.dtype)
    rank = max(a.shape[0] for a in a_list)
    if all(a.shape[0] == rank and a.dtype == dtype for a in a_list) and all(b.dtype == dtype for b in b_list):
        return torch.stack(a_list), torch.stack(b_list)
    a_stack = torch.stack([F.pad(a.to(dtype), (0, 0, 0, rank - a.shape[0])) for a in a_list])
    b_stack = torch.stack([F.pad(b.to(dtype), (0, rank - b.shape[1])) for b in b_list])
    return a_stack, b_stack


# ------------------------------------------------------------------------------------ sibling groups
class _Shared:
    """One grouped shrink's results for one input tensor: its slices wait for the siblings that were computed for.
    Holds the input only through the slices' graph and `x_alias` (a weak reference identifies it), and is dropped as
    soon as no slice is pending."""

    __slots__ = ("x_ref", "x_version", "x_alias", "slices", "record")

    def __init__(self, x, x_alias, slices, record):
        self.x_ref = weakref.ref(x)
        self.x_version = x._version
        self.x_alias = x_alias  # x (cast as autocast would) passed through the shrink node
        self.slices = slices  # member index -> (factor, its _version, xa slice)
        self.record = record

    def matches(self, x) -> bool:
        return self.x_ref() is x and x._version == self.x_version


class _Record:
    """Which siblings a shrink was computed for and which took their slice (no tensors: kept by the learning hook)."""

    __slots__ = ("computed", "consumed")

    def __init__(self, computed):
        self.computed, self.consumed = set(computed), set()


class _SiblingGroup:
    """Sibling LoRA layers under one parent module with the same in_features (q/k/v/o, gate/up), built by
    `accelerate_lora(group_siblings=True)`. The first of them called with a tensor x (training, grad enabled, fused
    path, no dropout) runs one grouped shrink (`lowrank_grouped.grouped_shrink_with_input`: x read once forward and
    once for all the dA) for every sibling expected to consume x; a sibling called afterwards with the same tensor
    object (same `_version`, same adapter factor unchanged) takes its slice (`lowrank_expand_linear`); any other call
    (another tensor, dropout, merged, disabled, adapter_names, several adapters, eval) runs the layer's own path and
    gives up its pending slice. When no slice is pending the shared results (and with them x) are dropped.

    Learning: the first shrink is computed for every eligible sibling; when autograd runs that shrink's backward
    (after any activation-checkpoint recomputation of it, so the recomputed forward computes the same set and saves
    tensors of the same shapes) the set becomes the siblings that took their slice (o_proj, called with the
    attention output, drops out), plus any that later asked for a slice computed without them. Until then a sibling
    computed but never called (a layer that skips k/v) gets a zero gradient for its A in that step where PEFT leaves
    None (an optimizer with weight decay then decays it once). The concatenated rank stays within MAX_TRITON_RANK: the
    caller and then the siblings after it that fit."""

    def __init__(self, members: list):
        self.members = list(members)
        self.consumers: Optional[set] = None  # learned member indices; None: not learned yet (all)
        self.wanted: set = set()
        self.shared: Optional[_Shared] = None

    def index(self, member) -> Optional[int]:
        """`member`'s position, or None for a module that only shares the group through a copied __dict__ (e.g. an
        nn.DataParallel replica): such a copy runs on its own."""
        return next((i for i, m in enumerate(self.members) if m is member), None)

    def _give_up(self, i: int) -> None:
        shared = self.shared
        if shared is not None:
            shared.slices.pop(i, None)
            if not shared.slices:
                self.shared = None

    def learn(self, record: _Record) -> None:
        self.consumers = set(record.consumed) | self.wanted
        self.wanted = set()
        if self.shared is not None and self.shared.record is record:
            self.shared = None  # its backward runs: that forward is over, a slice still pending will not be taken

    def forward(self, member, x, args, kwargs) -> Optional[torch.Tensor]:
        """`member`'s output through the group, or None: the caller runs its own path."""
        i = self.index(member)
        if i is None:
            return None
        usable = isinstance(x, torch.Tensor) and torch.is_grad_enabled() and member.training
        adapter = member.sibling_adapter(x, args, kwargs) if usable else None
        shared = self.shared
        if adapter is None:
            self._give_up(i)
            return None
        if shared is not None and shared.matches(x):
            entry = shared.slices.pop(i, None)
            if not shared.slices:
                self.shared = None
            factor = member.lora_A[adapter].weight
            if entry is None or entry[0] is not factor or entry[1] != factor._version:
                self.wanted.add(i)  # computed without it (or for another adapter): re-learned at the next backward
                return None
            shared.record.consumed.add(i)
            return member.expand_slice(shared.x_alias, entry[2], adapter)
        if shared is not None and i in shared.record.consumed:
            # it took its slice of that x already and now reads another tensor: that forward is over, and what its
            # siblings never took (a layer that skips k/v, q called alone) must not keep x alive nor block the group
            self.shared = shared = None
        self._give_up(i)  # called with another tensor than its siblings
        if shared is not None and i in shared.record.computed:
            return None  # a sibling that was expected on the shared x: not a leader for this other tensor
        if self.consumers is not None and i not in self.consumers:
            return None
        return self._lead(member, i, x, adapter)

    def _lead(self, member, i: int, x, adapter: str) -> Optional[torch.Tensor]:
        chosen = {i: adapter}
        for j, m in enumerate(self.members):
            if j == i or (self.consumers is not None and j not in self.consumers):
                continue
            a = m.sibling_adapter(x, (), {}) if m.training else None
            if a is not None and m.lowrank_backend == member.lowrank_backend:
                chosen[j] = a
        # the kernels take a concatenated rank up to MAX_TRITON_RANK: the caller first, then siblings in module order
        # while they fit (q/k/v of rank 40 group; o_proj, which reads another tensor anyway, is left out)
        total, fitting = 0, {}
        for j in [i] + sorted(j for j in chosen if j != i):
            rank = self.members[j].lora_A[chosen[j]].weight.shape[0]
            if total + rank <= MAX_TRITON_RANK:
                total, fitting[j] = total + rank, chosen[j]
        chosen = fitting
        if len(chosen) < 2:
            return None
        order = sorted(chosen)
        factors = [self.members[j].lora_A[chosen[j]].weight for j in order]
        x_cast, _, _ = member.fused_operands(x)
        if choose_backend(x_cast, total, member.lowrank_backend) != "triton":
            return None  # the reference has no shared read to save
        x_alias, xas = grouped_shrink_with_input(x_cast, factors, backend="triton")
        record = _Record(order)
        node = xas[0].grad_fn
        if node is not None:
            node.register_prehook(_learning_hook(weakref.ref(self), record))
        slices = {j: (f, f._version, xa) for j, f, xa in zip(order, factors, xas)}
        own = slices.pop(i)
        record.consumed.add(i)
        self.shared = _Shared(x, x_alias, slices, record) if slices else None
        return member.expand_slice(x_alias, own[2], adapter)


def _learning_hook(group_ref, record: _Record):
    def hook(grad_outputs):
        group = group_ref()
        if group is not None:
            group.learn(record)

    return hook


def build_sibling_groups(model: nn.Module) -> list:
    """Attach a `_SiblingGroup` to every set of >= 2 `FusedLoraLinear` layers (its own forward, not COLA's) that are
    children of one module and share in_features; returns the groups. Replaces groups built before."""
    groups = []
    for parent in model.modules():
        by_width: dict = {}
        for child in parent.children():
            if isinstance(child, FusedLoraLinear) and type(child).forward is FusedLoraLinear.forward:
                by_width.setdefault(child.in_features, []).append(child)
        for members in by_width.values():
            for m in members:
                m.__dict__.pop("_lora_siblings", None)
            if len(members) >= 2:
                group = _SiblingGroup(members)
                for m in members:
                    m.__dict__["_lora_siblings"] = group
                groups.append(group)
    return groups


def remove_sibling_groups(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop("_lora_siblings", None)


# ------------------------------------------------------------------------------------ mixed-batch plans
_PLANS: "OrderedDict[tuple, AdapterSegments]" = OrderedDict()
_MAX_PLANS = 32


def segment_plan(adapter_names: list, stack_names: list, x: torch.Tensor) -> AdapterSegments:
    """The rows of x grouped by adapter (`plan_adapter_segments`), cached: a plan depends only on its key (the
    names per row, the stack's order, x's shape and device), so every layer of one forward, and later forwards of
    the same batch layout, reuse it. The index is built and checked on the CPU (no host sync)."""
    key = (tuple(adapter_names), tuple(stack_names), tuple(x.shape), str(x.device), interpret_mode())
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    position = {name: i for i, name in enumerate(stack_names)}
    index = torch.tensor([position.get(a, -1) for a in adapter_names], dtype=torch.int64)
    plan = plan_adapter_segments(index, len(stack_names), tuple(x.shape), device=x.device, check_index=True)
    _PLANS[key] = plan
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


# ---------------------------------------------------------------------------------------- public API
GROUP_SIBLINGS_DEFAULT = True  # gradients equal to the ungrouped path in tests/kernels/test_lora_grouped.py


def _check_backend(backend: Optional[str]) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None (automatic), 'triton' or 'reference', got {backend!r}.")


def _triton_unusable(module: LoraLayer) -> Optional[str]:
    weight = module.get_base_layer().weight
    if not HAS_TRITON:
        return "triton is not installed"
    if weight.dtype not in TRITON_DTYPES:
        return f"its weight is {weight.dtype} (the Triton kernels take float16, bfloat16 and float32)"
    if weight.is_cuda or (weight.device.type == "cpu" and interpret_mode()):
        return None
    return f"its weight is on {weight.device} (Triton runs on CUDA, or on the CPU with TRITON_INTERPRET=1)"


QUANTIZED_BASE = (
    "its base is a bitsandbytes quantized layer; the fused kernels need a dense weight, so this layer keeps PEFT's "
    "own path (bitsandbytes dequantises the base, PEFT adds the adapter): correct, not accelerated. Load the base "
    "in bf16 for the fused path"
)


def _is_quantized_lora(module: nn.Module) -> bool:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    return type(base).__name__ in ("Linear4bit", "Linear8bitLt") or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def fused_path_report(model: nn.Module) -> dict[str, list]:
    """Which LoRA layers of `model` take the fused path: {"fused": [names], "peft": [(name, reason)]}.

    Static reasons only (base layer type, variants, lora_bias, rank); per-call conditions (merged, disabled,
    several active adapters, extra arguments) are checked at each forward."""
    report: dict[str, list] = {"fused": [], "peft": []}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, FusedLoraLinear):
            report["peft"].append((name, QUANTIZED_BASE if _is_quantized_lora(module) else f"{type(module).__module__}.{type(module).__name__} is not accelerated"))
            continue
        reason = module.fused_base_reason() or next(
            (r for a in module.lora_A for r in [module.fused_adapter_reason(a)] if r is not None), None
        )
        if reason is None:
            report["fused"].append(name)
        else:
            report["peft"].append((name, reason))
    return report


def accelerate_lora(
    model: nn.Module, backend: Optional[str] = None, warn: bool = True, group_siblings: bool = GROUP_SIBLINGS_DEFAULT
) -> nn.Module:
    """Give every PEFT LoRA `Linear` layer of `model` the fused forward (in place; returns `model`).

    Args:
        model: a `PeftModel` (or any module holding PEFT LoRA layers, e.g. after `inject_adapter_in_model`).
        backend: None (Triton on CUDA, the plain-PyTorch reference elsewhere), "reference", or "triton" (raises
            here, naming the layer, if some layer's weight is not on a device/dtype the Triton kernels run on).
        warn: warn about LoRA layers that stay on PEFT's path (other layer types, DoRA and other variants,
            lora_bias, a rank larger than the layer).
        group_siblings: sibling LoRA layers under one parent with the same in_features (q/k/v, gate/up) share one
            read of their common input for their shrinks and dA in training (`_SiblingGroup`, module docstring).
            Default on (`GROUP_SIBLINGS_DEFAULT`); False gives each layer its own `lowrank_linear`.

    Idempotent; layers added later (`add_adapter` on new target modules) need another call. Undo with
    `remove_lora_acceleration(model)`.
    """
    _check_backend(backend)
    if not isinstance(group_siblings, bool):
        raise TypeError(f"accelerate_lora: group_siblings must be True or False, got {group_siblings!r}.")
    layers = [(n, m) for n, m in model.named_modules() if type(m) is LoraLinear or isinstance(m, FusedLoraLinear)]
    quantized = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and _is_quantized_lora(m)]
    if backend == "triton" and quantized:
        raise RuntimeError(f"accelerate_lora(backend='triton') cannot run layer {quantized[0]}: {QUANTIZED_BASE}.")
    if backend == "triton":
        for name, module in layers:
            reason = _triton_unusable(module)
            if reason:
                raise RuntimeError(
                    f"accelerate_lora(backend='triton') cannot run layer {name}: {reason}. Use backend=None to pick "
                    f"Triton where it runs and the reference elsewhere."
                )
    for _, module in layers:
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
        module.lowrank_backend = backend
    if group_siblings:
        build_sibling_groups(model)
    else:
        remove_sibling_groups(model)
    if warn:
        stays = fused_path_report(model)["peft"]
        if stays:
            listing = "; ".join(f"{n}: {r}" for n, r in stays[:5]) + (" ..." if len(stays) > 5 else "")
            warnings.warn(f"accelerate_lora: {len(stays)} LoRA layer(s) stay on PEFT's own path ({listing}).", stacklevel=2)
    return model


def remove_lora_acceleration(model: nn.Module) -> nn.Module:
    """Undo `accelerate_lora`: every `FusedLoraLinear` becomes PEFT's `Linear` again (COLA's layers, which are
    built fused, are left alone). In place; returns `model`."""
    for module in model.modules():
        if type(module) is FusedLoraLinear:
            module.__class__ = LoraLinear
            module.__dict__.pop("lowrank_backend", None)
        module.__dict__.pop("_lora_siblings", None)
    return model


# re-exported for the COLA layer
VARIANT_KEYS = tuple(VARIANT_KWARG_KEYS)
