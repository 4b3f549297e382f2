"""SSMLoRA layers: a linear base layer (nn.Linear, GPT-2's Conv1D, bitsandbytes 4/8-bit) plus, per adapter, a LoRA
whose low-rank features also feed a small state that flows to the next module of its chain (see SsmLoraConfig)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft_ext.tuners.base import PeftExtLayer, is_conv1d, seeded
from peft_ext.tuners.mixed_batch import route_rows

NORM_EPS = 1e-8  # the official min-max normalisation's epsilon


def merge_error(where: str) -> str:
    return (
        f"SSMLoRA cannot be merged while its state path is active ({where} has a non-zero C or D: the update depends on "
        f"each token's state, through a min-max normalisation and a leaky ReLU). Keep it unmerged, or unload(); an "
        f"adapter whose C and D are zero everywhere merges exactly as a LoRA."
    )


class SsmRun:
    """The state one forward of the model shares with its SSMLoRA layers (set by SsmLoraModel's forward hooks):
    whether a model forward is running (a layer called outside one is a gradient-checkpointing recomputation, which
    replays the state the layer received in the forward) and each chain's current state, per adapter."""

    def __init__(self) -> None:
        self.in_forward = False
        self.depth = 0  # nesting of hooked forwards (the model, its backbone, its encoder): the outermost resets
        self.grad = False  # whether the running model forward records a graph
        self.checkpointing = False  # whether the model recomputes its layers in the backward
        self.states: dict[tuple[str, str], torch.Tensor] = {}
        # per (layer, adapter): the states received in the training forwards not yet recomputed, latest last (a
        # backward recomputes the latest forward first); emptied at the end of every backward
        self.replay: dict[tuple[int, str], list] = {}
        self._clear_queued = False

    def clear_after_backward(self) -> None:
        """Empty `replay` when the running backward ends (entries of forwards that never get a backward go too)."""
        if self._clear_queued:
            return
        self._clear_queued = True

        def clear() -> None:
            self.replay.clear()
            self._clear_queued = False

        torch.autograd.Variable._execution_engine.queue_callback(clear)


class SsmLoraLayer(PeftExtLayer):
    """y = base(x) + sum over active adapters of alpha * (u + leaky_relu(dropout(ĥ))) B^T, u = x A^T, with the state
    ĥ from the previous module of the adapter's chain. Several active adapters add up (each with its own chain);
    `adapter_names=` runs each row with its adapter's chain."""

    adapter_layer_names = ("ssmlora_A", "ssmlora_B", "ssmlora_C", "ssmlora_D")
    other_param_names = ("ssmlora_dropout", "ssmlora_alpha", "ssmlora_chain", "ssmlora_detach")
    method_label = "SSMLoRA"

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):  # bitsandbytes packs weights
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.ssmlora_dropout = nn.ModuleDict()
        self.ssmlora_alpha: dict[str, float] = {}
        self.ssmlora_chain: dict[str, str] = {}
        self.ssmlora_detach: dict[str, bool] = {}
        self.ssmlora_run: Optional[SsmRun] = None
        self.ssmlora_name = ""
        self._state_in: dict[str, Optional[torch.Tensor]] = {}  # adapter -> the state received in the last forward

    def update_layer(self, adapter_name: str, r: int, config, chain_key: str, name: str = "") -> None:
        limit = min(self.in_features, self.out_features)
        if r > limit:
            raise ValueError(
                f"SsmLoraConfig: rank {r} of {name or type(self.get_base_layer()).__name__} is above the layer's "
                f"min(in_features, out_features) = {limit}: use r (or its rank_pattern entry) <= {limit}."
            )
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        dtype = dtype or getattr(base, "compute_dtype", None) or torch.float32
        device = weight.device if weight is not None and weight.device.type != "meta" else None
        kw = dict(bias=False, dtype=dtype, device=device)
        self.ssmlora_name = name
        with seeded(config.seed, name):
            self.ssmlora_A[adapter_name] = nn.Linear(self.in_features, r, **kw)
            self.ssmlora_B[adapter_name] = nn.Linear(r, self.out_features, **kw)
            self.ssmlora_C[adapter_name] = nn.Linear(r, r, **kw)
            self.ssmlora_D[adapter_name] = nn.Linear(r, r, **kw)
            with torch.no_grad():
                nn.init.normal_(self.ssmlora_A[adapter_name].weight, std=r**-0.5)  # official: N(0, 1/r)
                if config.init_weights:
                    self.ssmlora_B[adapter_name].weight.zero_()
                else:  # a non-identity adapter (tests)
                    nn.init.normal_(self.ssmlora_B[adapter_name].weight, std=0.1)
                self.ssmlora_C[adapter_name].weight.zero_()
                if config.state_init == "zeros":
                    self.ssmlora_D[adapter_name].weight.zero_()
                else:
                    nn.init.normal_(self.ssmlora_D[adapter_name].weight, std=r**-0.5)
        self.ssmlora_dropout[adapter_name] = nn.Dropout(config.state_dropout) if config.state_dropout else nn.Identity()
        self.ssmlora_alpha[adapter_name] = float(config.alpha)
        self.ssmlora_chain[adapter_name] = chain_key
        self.ssmlora_detach[adapter_name] = bool(config.detach_state)
        self.set_adapter(self.active_adapters)
        self.train(base.training)  # new modules start in training mode: follow the model's (the state dropout)

    def rank(self, adapter_name: str) -> int:
        return self.ssmlora_A[adapter_name].weight.shape[0]

    # ------------------------------------------------------------------------------------------ merge
    def state_path_active(self, adapter_name: str) -> bool:
        """Whether C or D is non-zero (then the update depends on the state)."""
        c = self.ssmlora_C[adapter_name].weight if adapter_name in self.ssmlora_C else None
        return bool((c is not None and c.any()) or self.ssmlora_D[adapter_name].weight.any())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """alpha * B A as an (out, in) matrix: the whole update when C = D = 0 (the state stays zero)."""
        if self.state_path_active(adapter_name):
            raise ValueError(merge_error(self.ssmlora_name or "this layer"))
        a, b = self.ssmlora_A[adapter_name].weight, self.ssmlora_B[adapter_name].weight
        return self.ssmlora_alpha[adapter_name] * (b.float() @ a.float())

    def merged_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        if "bitsandbytes" in type(base).__module__:
            raise ValueError(
                "SSMLoRA does not merge into bitsandbytes-quantized weights (dequantizing and requantizing is lossy): "
                "keep the adapter unmerged, or merge into the 16-bit model."
            )
        delta = self.get_delta_weight(adapter_name).to(base.weight.device)
        weight = base.weight.data
        value = weight.float() + (delta.T if is_conv1d(base) else delta)
        return {"weight": value.to(weight.dtype)}

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            result = self.base_layer(x, *args, **kwargs)

            def run(name, rows):
                if name not in self.ssmlora_A:  # "__base__", or an adapter of other layers only
                    return result.new_zeros((*rows.shape[:-1], self.out_features))
                return self.adapter_delta(name, rows).to(result.dtype)

            return result + route_rows(x, adapter_names, run)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.ssmlora_A]
        if len(active) == 1 and not args and not kwargs and self._fusable(x):
            return self._fused_forward(active[0], x)
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = result + self.adapter_delta(name, x).to(result.dtype)
        return result

    def _fusable(self, x: torch.Tensor) -> bool:
        base = self.get_base_layer()
        if type(base) is not nn.Linear and not is_conv1d(base):
            return False
        if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
            return False
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            return False
        return x.is_floating_point() and x.dtype == base.weight.dtype

    def _fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The low-rank kernel's layout with the state update between its halves: u = x A^T (the shrink, x read
        once), z = u + leaky_relu(dropout(ĥ)), then y_low = b + alpha z B^T and the base GEMM y = y_low + x W^T with
        beta = 1 (the expand in the base GEMM's epilogue: no elementwise pass over y). cuBLAS/PyTorch: the fused
        Triton kernel (`peft_ext.kernels.lowrank_linear`) computes shrink and expand in one program, with no place
        for the state in between."""
        base = self.get_base_layer()
        a, b, alpha = self.ssmlora_A[name].weight, self.ssmlora_B[name].weight, self.ssmlora_alpha[name]
        x2 = x.reshape(-1, self.in_features)
        u = F.linear(x2.to(a.dtype), a)
        z = u + self.state_term(name, x2, u)
        bias = base.bias
        if bias is None:
            y_low = alpha * (z @ b.t())
        else:
            y_low = torch.addmm(bias.to(b.dtype), z, b.t(), alpha=alpha)
        weight = base.weight if is_conv1d(base) else base.weight.t()
        y = torch.addmm(y_low.to(x.dtype), x2, weight)
        return y.view(*x.shape[:-1], self.out_features)

    def adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """alpha * (u + leaky_relu(dropout(ĥ))) B^T for adapter `name` (the state handed on along its chain)."""
        a, b = self.ssmlora_A[name].weight, self.ssmlora_B[name].weight
        x2 = x.reshape(-1, self.in_features)  # the state is (tokens, r) on every path, so a chain can mix paths
        u = F.linear(x2.to(a.dtype), a)
        delta = self.ssmlora_alpha[name] * F.linear(u + self.state_term(name, x2, u), b)
        return delta.view(*x.shape[:-1], self.out_features)

    def state_term(self, name: str, x: torch.Tensor, u: Optional[torch.Tensor] = None) -> torch.Tensor:
        """leaky_relu(dropout(ĥ)) for x (tokens, in): the state update of this module, handing ĥ (tokens, r) on to
        the next module of the chain."""
        a = self.ssmlora_A[name].weight
        if u is None:
            u = F.linear(x.reshape(-1, self.in_features).to(a.dtype), a)
        h = self._incoming_state(name, u)
        h_new = h + F.linear(u, self.ssmlora_D[name].weight)
        if name in self.ssmlora_C:  # a chain's first module has no C: its incoming state is always zero
            h_new = h_new + F.linear(h, self.ssmlora_C[name].weight)
        h32 = h_new.float()  # in fp32: 1e-8 rounds to 0 in fp16, and a constant state would give 0 / 0
        low = h32.amin(dim=-1, keepdim=True)
        high = h32.amax(dim=-1, keepdim=True)
        normed = ((h32 - low) / (high - low + NORM_EPS)).to(h_new.dtype)
        self._hand_on(name, normed)
        return F.leaky_relu(self.ssmlora_dropout[name](normed))

    # ----------------------------------------------------------------------------------- the chain
    def _incoming_state(self, name: str, u: torch.Tensor) -> torch.Tensor:
        run = self.ssmlora_run
        if run is not None and run.in_forward:
            h = run.states.get((name, self.ssmlora_chain[name]))
            self._state_in[name] = None if h is None else h.detach()  # the state received last (for inspection)
            if self.training and run.grad and run.checkpointing:  # what a recomputation of this forward replays
                run.replay.setdefault((id(self), name), []).append(h)
        elif self.training and run is not None and torch._C._current_graph_task_id() != -1:
            # a gradient-checkpointing recomputation inside the backward: the latest forward not yet replayed
            stack = run.replay.get((id(self), name))
            h = stack.pop() if stack else None
            run.clear_after_backward()
            if (
                h is not None and torch.is_grad_enabled() and not self.ssmlora_detach[name] and not h.requires_grad
                and self.ssmlora_A[name].weight.requires_grad
            ):
                raise RuntimeError(
                    "SSMLoRA with detach_state=False under reentrant gradient checkpointing: the forward ran without "
                    "gradient, so the state's gradient between checkpointed blocks would be lost. Use non-reentrant "
                    "checkpointing (gradient_checkpointing_kwargs={'use_reentrant': False}, transformers' default) or "
                    "SsmLoraConfig(detach_state=True)."
                )
        else:  # the layer called outside a model forward (on its own): a chain of one, from zero
            h = None
        if h is None or h.shape != u.shape:
            return torch.zeros_like(u)
        return h.to(u.dtype)

    def _hand_on(self, name: str, normed: torch.Tensor) -> None:
        run = self.ssmlora_run
        if run is not None and run.in_forward:
            run.states[(name, self.ssmlora_chain[name])] = normed.detach() if self.ssmlora_detach[name] else normed

    def __repr__(self) -> str:
        return "ssmlora." + nn.Module.__repr__(self)

