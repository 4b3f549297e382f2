"""S'MoRE layers: a linear base layer (nn.Linear, GPT-2's Conv1D, bitsandbytes 4/8-bit) plus, per adapter, a
tree of routed low-rank residual experts (see SmoreConfig for the math and the spec's names)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft_ext.tuners.base import PeftExtLayer, is_conv1d, seeded
from peft_ext.tuners.mixed_batch import route_rows

from .config import SmoreConfig
from .routing import dense_gate, noisy_topk_gate, row_mask, switch_gate

MERGE_ERROR = (
    "S'MoRE cannot be merged: its update depends on each token's routing and nonlinear tree; keep it unmerged or "
    "unload()"
)

_ACTS = {"tanh": torch.tanh, "relu": F.relu, "identity": lambda t: t, "gelu": F.gelu, "silu": F.silu}


# ------------------------------------------------------------------------------------------ parameters
class _FlatParams(nn.Module):
    """Parameters held directly by the adapter's module, named `<name>_<index>` (no sub-modules): a saved key is then
    `<layer>.smore_experts.A_0`, which both PEFT and transformers' `load_adapter` map to `smore_experts.<adapter>.A_0`
    (transformers inserts the adapter name after the prefixed component only)."""

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        self.register_parameter(name, nn.Parameter(tensor))

    def _list(self, name: str) -> list[nn.Parameter]:
        out, i = [], 0
        while f"{name}_{i}" in self._parameters:
            out.append(self._parameters[f"{name}_{i}"])
            i += 1
        return out


class SmoreExperts(_FlatParams):
    """One adapter's experts of one layer: A_l (s, r, in), a_l = A_bias_l (s, r), B_l (s, d_{l+1}, r), b_l = B_bias_l
    (s, d_{l+1}), W_l (d_{l+1}, d_l) and w_l = W_bias_l for l >= 1 (named W_1 ... W_{L-1}), P (out, d_L), p = P_bias
    (out). S'MoRE#: one A, a, B, b (index 0) for every layer."""

    def __init__(self, config: SmoreConfig, in_features: int, out_features: int, dtype, device):
        super().__init__()
        s, r, d, L = config.num_experts, config.expert_ranks, config.widths(), config.num_layers
        pool = 1 if config.shared_expert_pool else L
        kw = dict(dtype=dtype, device=device)
        self.has_bias = bool(config.expert_bias)
        for l in range(pool):
            self._add(f"A_{l}", torch.empty(s[l], r[l], in_features, **kw))
            self._add(f"B_{l}", torch.empty(s[l], d[l + 1], r[l], **kw))
            if self.has_bias:
                self._add(f"A_bias_{l}", torch.zeros(s[l], r[l], **kw))
                self._add(f"B_bias_{l}", torch.zeros(s[l], d[l + 1], **kw))
        for l in range(1, L):
            self._add(f"W_{l}", torch.empty(d[l + 1], d[l], **kw))
            if self.has_bias:
                self._add(f"W_bias_{l}", torch.zeros(d[l + 1], **kw))
        self.P = nn.Parameter(torch.empty(out_features, d[L], **kw))
        self.P_bias = nn.Parameter(torch.zeros(out_features, **kw)) if self.has_bias else None
        self.L = L
        self.reset(config)

    @property
    def A(self) -> list[nn.Parameter]:
        return self._list("A")

    @property
    def B(self) -> list[nn.Parameter]:
        return self._list("B")

    @property
    def A_bias(self) -> list[nn.Parameter]:
        return self._list("A_bias")

    @property
    def B_bias(self) -> list[nn.Parameter]:
        return self._list("B_bias")

    def W(self, l: int) -> nn.Parameter:
        return self._parameters[f"W_{l}"]

    def W_bias(self, l: int) -> Optional[nn.Parameter]:
        return self._parameters.get(f"W_bias_{l}")

    @torch.no_grad()
    def reset(self, config: SmoreConfig) -> None:
        """The official code's inits (see SmoreConfig.init); biases zero."""
        init = config.init
        for A in self.A:
            for e in range(A.shape[0]):
                nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
        for B in self.B:
            s, _, r = B.shape
            for e in range(s):
                if init in ("b_zero", "bw_zero"):
                    B[e].zero_()
                elif init == "eq_1_layer":  # expert e's rank block in rows [e r, (e + 1) r)
                    B[e].zero_()
                    B[e, e * r : (e + 1) * r, :] = torch.eye(r, dtype=B.dtype, device=B.device)
                else:
                    nn.init.kaiming_uniform_(B[e], a=math.sqrt(5))
        for l in range(1, self.L):
            W = self.W(l)
            if init == "bw_zero":
                W.zero_()
            elif init == "eq_1_layer":  # [0; I]: the layer below's width passes through to the last rows
                W.zero_()
                W[-W.shape[1] :, :] = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
            else:
                nn.init.kaiming_uniform_(W, a=math.sqrt(5))
        if init in ("w_final_zero", "eq_1_layer"):
            self.P.zero_()
        else:
            nn.init.kaiming_uniform_(self.P, a=math.sqrt(5))


class SmoreRouter(_FlatParams):
    """One adapter's router of one layer: down (in -> d_down, as nn.Linear), per S'MoRE layer l an MLP c_l -> m -> m
    (mlp_in_l, mlp_out_l, as nn.Linear), keys K_l (s_l, m) ~ U(0, 1), and for the noisy gate the noise weights N_l
    (s_l, c_l), zero at init."""

    def __init__(self, config: SmoreConfig, in_features: int, dtype, device):
        super().__init__()
        m, c, s = config.router_dim, config.router_in_dims(), config.num_experts
        kw = dict(dtype=dtype, device=device)
        self.act = _ACTS[config.router_act]
        self._linear("down", in_features, config.router_down_dim, kw)
        self.L = config.num_layers
        for l in range(self.L):
            self._linear(f"mlp_in_{l}", c[l], m, kw)
            self._linear(f"mlp_out_{l}", m, m, kw)
        for l in range(self.L):
            self._add(f"keys_{l}", torch.rand(s[l], m, **kw))
            if config.gate_type == "noisy_topk":
                self._add(f"noise_{l}", torch.zeros(s[l], c[l], **kw))

    def _linear(self, name: str, n_in: int, n_out: int, kw: dict) -> None:
        layer = nn.Linear(n_in, n_out, **kw)  # nn.Linear's default init
        self._add(f"{name}_weight", layer.weight.data)
        self._add(f"{name}_bias", layer.bias.data)

    def mlp(self, l: int, q: torch.Tensor) -> torch.Tensor:
        p = self._parameters
        hidden = self.act(F.linear(q, p[f"mlp_in_{l}_weight"], p[f"mlp_in_{l}_bias"]))
        return F.linear(hidden, p[f"mlp_out_{l}_weight"], p[f"mlp_out_{l}_bias"])

    def keys(self, l: int) -> nn.Parameter:
        return self._parameters[f"keys_{l}"]

    def noise(self, l: int) -> nn.Parameter:
        return self._parameters[f"noise_{l}"]


class SmoreSettings:
    """What a layer's forward needs from the config of one adapter (a plain object: not saved as state)."""

    def __init__(self, config: SmoreConfig):
        self.L = config.num_layers
        self.s = list(config.num_experts)
        self.r = list(config.expert_ranks)
        self.f = config.fanouts()
        self.d = config.widths()
        self.scales = config.scales()
        self.gate_type = config.gate_type
        self.act = _ACTS[config.expert_act]
        self.position = config.activation_position
        self.shared = config.shared_expert_pool
        self.gamma = float(config.balance_loss_weight)
        self.epsilon = float(config.noise_epsilon)
        self.aux_mode = config.aux_loss_mode
        self.mask_padding = config.balance_mask_padding


# --------------------------------------------------------------------------------------------- aux loss
class _AuxInject(torch.autograd.Function):
    """Identity on `out` (a copy with copy=True); its backward also sends gradient `coef` to `aux` (Megatron-Core's
    MoEAuxLossAutoScaler). Without a copy the result is a view that autograd forbids modifying in place: used on
    tensors internal to a layer; the copy is for tensors handed to the user (logits, log_probs)."""

    @staticmethod
    def forward(ctx, out, aux, coef: float, copy: bool):
        ctx.coef = coef
        ctx.aux_dtype = aux.dtype
        return out.clone() if copy else out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, torch.full((), ctx.coef, dtype=ctx.aux_dtype, device=grad_out.device), None, None


def inject_aux(out: torch.Tensor, aux: torch.Tensor, coef: float, copy: bool = False) -> torch.Tensor:
    """`out` unchanged (copied with copy=True, so that it can be modified in place), but backpropagating through it
    also backpropagates coef * aux."""
    return _AuxInject.apply(out, aux, float(coef), copy)


class SmoreRun:
    """The state one forward of the model shares with its S'MoRE layers (set by SmoreModel's forward hooks):
    whether a model forward is running (a layer called outside one is a gradient-checkpointing recomputation), the
    token mask, the auxiliary losses collected, and the weights they get."""

    def __init__(self) -> None:
        self.in_forward = False
        self.token_mask: Optional[torch.Tensor] = None
        self.aux: list[torch.Tensor] = []  # add_to_loss adapters' losses, added to outputs.loss
        self.aux_seen: list[torch.Tensor] = []  # every adapter's, for logging
        self.loss_weight = 1.0  # add_to_loss: this micro-batch's share of the trainer's loss normaliser
        # the weight of an injected aux gradient (inject mode; add_to_loss through log_probs / logits): SmoreCallback
        # sets 1 / gradient_accumulation_steps, times the fp16 loss scale
        self.inject_scale = 1.0
        self.inject_scale_set = False  # by SmoreCallback (else a one-time warning where the aux is injected)
        self.warned_unscaled = False
        # reentrant checkpointing: the weight with which the recomputation injects an aux that the forward could not
        # attach to the graph (the loss weight times the scale the backward sent into outputs.loss, or inject_scale)
        self.pending_coef = 1.0
        self.last_aux: Optional[torch.Tensor] = None  # detached (no host sync in the forward)
        self.stats: dict[str, list[dict]] = {}  # module name -> per S'MoRE layer load / entropy of the last step


    def check_inject_scale(self) -> None:
        """Warn once when an auxiliary gradient is injected with a weight no SmoreCallback has set."""
        if self.inject_scale_set or self.warned_unscaled:
            return
        self.warned_unscaled = True
        warnings.warn(
            "S'MoRE: the load-balance loss reaches the gradient beside the trainer's loss (injected through the "
            "log_probs / logits the trainer builds its loss from, or aux_loss_mode='inject'), with weight 1 per "
            "forward: with gradient accumulation it would count once per micro-batch, and fp16 loss scaling would "
            "not scale it. Add callbacks=[peft_ext.training.SmoreCallback()] to the trainer (peft-ext train and "
            "peft_ext.training.attach_companions do), which divides it by the accumulation steps and follows the "
            "loss scale.",
            stacklevel=4,
        )


# ------------------------------------------------------------------------------------------------ layer
class SmoreLayer(PeftExtLayer):
    """A linear base layer with S'MoRE adapters: y = base(x) + sum over active adapters of P h_L(x) + p.

    Several active adapters add up (each with its own router); `adapter_names=` runs each row with its adapter.
    Merging is refused (MERGE_ERROR); `unload()` returns the base layer untouched."""

    adapter_layer_names = ("smore_experts", "smore_router")
    other_param_names = ("smore_settings",)
    method_label = "S'MoRE"

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):  # bitsandbytes packs weights
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.smore_settings: dict[str, SmoreSettings] = {}
        self.smore_run: Optional[SmoreRun] = None
        self.smore_name = ""
        self._route_mask: Optional[torch.Tensor] = None
        self._pending_aux: dict[str, bool] = {}  # adapters whose aux gradient the recomputation injects

    def update_layer(self, adapter_name: str, config: SmoreConfig, name: str = "") -> None:
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        dtype = dtype or getattr(base, "compute_dtype", None) or torch.float32
        device = weight.device if weight is not None and weight.device.type != "meta" else None
        self.smore_name = name
        with seeded(config.seed, name):
            self.smore_experts[adapter_name] = SmoreExperts(config, self.in_features, self.out_features, dtype, device)
            self.smore_router[adapter_name] = SmoreRouter(config, self.in_features, dtype, device)
        self.smore_settings[adapter_name] = SmoreSettings(config)
        self.set_adapter(self.active_adapters)
        self.train(base.training)  # new modules start in training mode: follow the model's (the noisy gate's noise)

    # ------------------------------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(MERGE_ERROR)

    def merged_values(self, adapter_name: str):
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:  # never merged
        return None

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names):
        if merge:
            raise ValueError(MERGE_ERROR)
        return self.get_base_layer()

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            result = self.base_layer(x, *args, **kwargs)

            def run(name, rows):
                if name not in self.smore_experts:  # "__base__", or an adapter of other layers only
                    return result.new_zeros((*rows.shape[:-1], self.out_features))
                return self.adapter_delta(name, rows, None)[0].to(result.dtype)

            return result + route_rows(x, adapter_names, run)
        active = [name for name in self.active_adapters if name in self.smore_experts]
        if len(active) == 1 and not args and not kwargs and self._epilogue_base(x) is not None:
            return self._add_adapter(active[0], x, None)  # the base GEMM adds the adapter's output in its epilogue
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = self._add_adapter(name, x, result)
        return result

    def _epilogue_base(self, x: torch.Tensor) -> Optional[nn.Module]:
        """The base layer when its GEMM can take the adapter's output as its epilogue (a dense nn.Linear or Conv1D in
        x's dtype, no autocast), else None."""
        base = self.get_base_layer()
        if type(base) is not nn.Linear and not is_conv1d(base):
            return None
        weight = getattr(base, "weight", None)
        if weight is None or weight.dtype != x.dtype or not x.is_floating_point() or weight.device != x.device:
            return None
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            return None
        return base

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        run, training = self.smore_run, self.training
        recompute = training and run is not None and not run.in_forward  # gradient checkpointing's backward replay
        if training and run is not None and not recompute:
            self._route_mask = run.token_mask
        settings = self.smore_settings[name]
        mask = self._route_mask if (training and settings.mask_padding) else None
        if mask is not None and mask.numel() != x.shape[:-1].numel():
            mask = None  # packed or reshaped inputs: every token counts
        h, aux, stats = self.routed_features(name, x, mask, stats=training)
        coef = self._aux_bookkeeping(name, aux, stats, recompute)
        if coef is not None:  # through h (T x d_L, internal to this layer): the layer's output stays a plain tensor
            h = inject_aux(h, aux, coef)
        if result is None:
            return self._output_in_base_epilogue(name, x, h)
        ex = self.smore_experts[name]
        return result + F.linear(h, ex.P, ex.P_bias).reshape(*x.shape[:-1], self.out_features).to(result.dtype)

    def _aux_bookkeeping(self, name: str, aux, stats, recompute: bool) -> Optional[float]:
        """Record this forward's statistics and auxiliary loss with the run; return the coefficient with which the
        layer backpropagates the auxiliary loss itself (inject mode; add_to_loss under reentrant checkpointing's
        recomputation), or None."""
        run, settings = self.smore_run, self.smore_settings[name]
        if self.training and run is not None and not recompute:
            run.stats[f"{self.smore_name}:{name}"] = stats  # every gate's load and entropy, with or without an aux
        if aux is None or settings.aux_mode == "none" or run is None:
            return None
        grad = torch.is_grad_enabled()
        if recompute:
            pending = self._pending_aux.pop(name, False)
            if grad and (settings.aux_mode == "inject" or pending):
                return run.inject_scale if settings.aux_mode == "inject" else run.pending_coef
            return None
        if not any(p.requires_grad for p in self.smore_router[name].parameters()):
            return None  # a frozen adapter (loaded for inference) trains nothing: no auxiliary loss
        run.aux_seen.append(aux)
        if settings.aux_mode == "inject":
            if grad:
                run.check_inject_scale()
            return run.inject_scale if grad else None
        run.aux.append(aux)
        if not grad:
            # add_to_loss inside a no-grad forward (reentrant gradient checkpointing): the aux counted in the loss
            # carries no gradient, so the recomputation in the backward injects it (a forward with the adapter
            # disabled, such as DPO's reference pass, does not come here and leaves this in place)
            self._pending_aux[name] = True
        else:
            self._pending_aux.pop(name, None)  # a forward with gradient: nothing left to inject from an earlier one
        return None

    def _output_in_base_epilogue(self, name: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """base(x) + P h + p as two GEMMs and no elementwise pass: y_low = (b + p) + h P^T, then the base GEMM
        y = y_low + x W^T with beta = 1 (the low-rank kernel's layout: the base GEMM's epilogue reads y_low)."""
        base, ex = self.get_base_layer(), self.smore_experts[name]
        bias = base.bias
        if bias is not None and ex.P_bias is not None:
            c = bias.to(ex.P.dtype) + ex.P_bias
        else:
            c = bias.to(ex.P.dtype) if bias is not None else ex.P_bias
        y_low = h @ ex.P.t() if c is None else torch.addmm(c, h, ex.P.t())
        weight = base.weight if is_conv1d(base) else base.weight.t()
        y = torch.addmm(y_low.to(x.dtype), x.reshape(-1, self.in_features), weight)
        return y.view(*x.shape[:-1], self.out_features)

    def adapter_delta(self, name: str, x: torch.Tensor, token_mask: Optional[torch.Tensor], stats: bool = False):
        """(P h_L(x) + p with x's leading shape, summed aux loss or None, per-layer stats) for adapter `name`."""
        h, aux, per_layer = self.routed_features(name, x, token_mask, stats)
        ex = self.smore_experts[name]
        y = F.linear(h, ex.P, ex.P_bias)
        return y.reshape(*x.shape[:-1], self.out_features), aux, per_layer

    def routed_features(self, name: str, x: torch.Tensor, token_mask: Optional[torch.Tensor], stats: bool = False):
        """(h_L (T, d_L): the top of each token's tree, before the output projection; summed aux loss or None;
        per-layer stats) for adapter `name`. x (..., in) is flattened to T tokens."""
        ex, router, st = self.smore_experts[name], self.smore_router[name], self.smore_settings[name]
        dtype = ex.P.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)
        T = x2.shape[0]
        # every layer's A (and a) and the router's down-projection: one skinny GEMM reading x once
        A_all, down_w, down_b = ex.A, router.down_weight, router.down_bias
        weights = [A.reshape(-1, self.in_features) for A in A_all] + [down_w]
        if ex.has_bias:
            bias = torch.cat([a.reshape(-1) for a in ex.A_bias] + [down_b])
        else:
            bias = torch.cat([down_b.new_zeros(sum(w.shape[0] for w in weights[:-1])), down_b])
        U = F.linear(x2, torch.cat(weights), bias)
        widths = [A.shape[0] * A.shape[1] for A in A_all]
        # contiguous copies: matmul on a strided slice picks its kernel by whether the weight requires grad, so a
        # reloaded (frozen) adapter would differ from the trained one in the last bit
        parts = [t.contiguous() for t in U.split(widths + [down_w.shape[0]], dim=1)]
        q = parts[-1][:, None, :]
        # ---- top-down routing: layer L-1 picks f_{L-1} experts, each picks f_l children one layer down
        routes: list = [None] * st.L
        aux_total = None
        per_layer = []
        for l in range(st.L - 1, -1, -1):
            z = router.mlp(l, q)
            R = z.shape[1]
            rows = row_mask(token_mask, T, R, x.device) if stats else None
            keys = router.keys(l)
            if st.gate_type == "switch":
                g = switch_gate(z, keys, st.f[l], st.gamma, rows, stats)
            elif st.gate_type == "dense":
                g = dense_gate(z, keys, rows, stats)
            else:
                g = noisy_topk_gate(z, q, keys, router.noise(l), st.f[l], st.gamma, st.epsilon, rows, self.training, stats)
            routes[l] = g
            if g.aux is not None:
                aux_total = g.aux if aux_total is None else aux_total + g.aux
            if stats:
                per_layer.append({"layer": l, "load": g.load, "entropy": g.entropy})
            if l > 0:
                f = g.idx.shape[-1]
                q = torch.cat((q[:, :, None, :].expand(T, R, f, q.shape[-1]), g.keys.to(q.dtype)), dim=-1)
                q = q.reshape(T, R * f, q.shape[-1])
        # ---- bottom-up aggregation along the tree
        h = None
        B_all, B_bias = ex.B, (ex.B_bias if ex.has_bias else None)
        for l in range(st.L):
            k = 0 if st.shared else l
            Ul = parts[k].view(T, st.s[l], st.r[l])
            E = torch.einsum("tsr,sdr->tsd", Ul, B_all[k])
            if B_bias is not None:
                E = E + B_bias[k]
            E = E * st.scales[l] if st.scales[l] != 1.0 else E
            g = routes[l]
            R, f = g.idx.shape[1], g.idx.shape[2]
            dl1 = E.shape[-1]
            sel = torch.gather(E, 1, g.idx.reshape(T, R * f, 1).expand(T, R * f, dl1))  # (T, F_l, d_{l+1})
            alpha = g.alpha.reshape(T, R * f, 1).to(sel.dtype)
            if h is None:
                val = alpha * (st.act(sel) if st.position == "all" else sel)
                h = val.view(T, R, f, dl1).sum(2)
                continue
            W, w = ex.W(l), ex.W_bias(l)
            if st.position == "all":
                val = alpha * st.act(sel + F.linear(h, W, w))
            elif st.position == "child":
                val = alpha * sel + F.linear(st.act(h), W, w)
            else:  # child_v2
                val = alpha * (sel + F.linear(st.act(h), W, w))
            h = val.view(T, R, f, dl1).sum(2)
        return h[:, 0], aux_total, per_layer

    def __repr__(self) -> str:
        return "smore." + nn.Module.__repr__(self)

