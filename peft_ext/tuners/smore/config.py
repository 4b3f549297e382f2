from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft_ext.tuners.config_base import PeftExtConfig

GATE_TYPES = ("switch", "noisy_topk", "dense")
INITS = ("w_final_zero", "eq_1_layer", "b_zero", "bw_zero", "normal")
ACTIVATIONS = ("tanh", "relu", "identity", "gelu", "silu")
ACTIVATION_POSITIONS = ("all", "child", "child_v2")
AUX_LOSS_MODES = ("add_to_loss", "inject", "none")

# the MLP projections of common architectures (the paper adapts every block's gate/up/down_proj)
TARGET_MODULES_MAPPING = {
    **{t: ["gate_proj", "up_proj", "down_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite",
        "smollm3", "phi3",
    )},  # fmt: skip
    "gpt2": ["c_fc", "mlp.c_proj"],
}


@dataclass
class SmoreConfig(PeftExtConfig):
    """S'MoRE, Structural Mixture of Residual Experts (Zeng et al., NeurIPS 2025, arXiv 2504.06426).

    Each adapted linear layer W (in -> out) gets L small "S'MoRE layers" of low-rank experts (layer l: s_l experts of
    rank r_l). Per token, a top-down router builds a tree: the top layer picks f_{L-1} experts, each of those picks
    f_{L-2} children one layer down, and so on; the token's low-rank features are then aggregated bottom-up along
    the tree (a GIN-like step with activation sigma) and projected once to the output:

        y = W x + b + P h_L(x) + p,   h_{l+1} = sum over children of alpha * sigma(E_l[child](x) + W_l h_l + w_l)

    with E_l[e](x) = scale_l * (B_l[e] (A_l[e] x + a_l[e]) + b_l[e]). The cost is about that of a LoRA of rank
    d_L = sum_l s_l r_l plus a small router. With sigma = identity it collapses to a flat mixture of experts.

    The update depends on each token's routing, so an S'MoRE adapter cannot be merged into the weights: `merge`,
    `merge_and_unload`, `safe_merge` and `get_delta_weight` raise; `unload()` returns the exact base and
    `disable_adapter()` gives the base outputs (and no auxiliary loss).

    Lists are per S'MoRE layer, bottom (l = 0) to top (l = L-1); L = len(num_experts).

    Args:
        target_modules: the linear layers to adapt (names, a regex, or "all-linear"). Default: the MLP projections
            (gate/up/down_proj for Llama-like models, c_fc / mlp.c_proj for GPT-2), as the paper.
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in PEFT's LoraConfig.
        num_experts: s_l, the experts of each layer. Default [4, 4] (the paper's "4-4").
        num_active: f_l, the fan-out: how many children each selected parent picks in layer l (for the top layer:
            how many experts the token picks). Default [2, 2]. `switch`: 1 <= f_l <= s_l; `noisy_topk`:
            1 <= f_l < s_l; ignored by `dense` (every expert, f_l = s_l).
        expert_ranks: r_l, the rank of each layer's experts. Default [8, 8].
        alpha: None (default, the official code's): scale 1. A number or a list of L numbers: scale alpha_l / r_l.
        gate_type: "switch" (default; softmax over key-query dot products, top-f, MixLoRA's load-balance loss),
            "noisy_topk" (Shazeer et al. 2017: cosine scores plus learned noise in training, softmax over the
            top-f, cv^2 importance and load loss), or "dense" (every expert, softmax weights, no auxiliary loss;
            HydraLoRA-style).
        router_dim: m, the key and query width of each layer's router MLP. Default 32.
        router_down_dim: the router's input projection width (x -> d_down). Default 32.
        router_act: the router MLPs' activation: "relu" (default), "tanh", "identity", "gelu", "silu".
        noise_epsilon: the noisy gate's noise floor (softplus(N q) + epsilon). Default 1e-2.
        expert_act: sigma, the aggregation's activation: "tanh" (default, the paper's examples), "relu",
            "identity" (the flat-mixture limit), "gelu", "silu".
        activation_position: "all" (default, the paper's S'MoRE: sigma(E + W h + w) at every layer), "child"
            (S'MoRE*: sum(alpha E + W sigma(h) + w)), "child_v2" (sum alpha (E + W sigma(h) + w)).
        shared_expert_pool: S'MoRE#: every layer uses the same s x r experts (A, B shared; needs equal num_experts
            and equal expert_ranks), d = s * r.
        init: "w_final_zero" (default: P = 0, so the output equals the base at init), "eq_1_layer" (Prop. 3.2:
            B and W are identity blocks and P = 0; with expert_act="identity" the tree is the flat multi-order
            mixture), "b_zero" (B = 0, P random), "bw_zero" (B = W = 0, P random), "normal" (all random: the
            output differs from the base at init).
        expert_bias: trainable biases a, b, w, p (zero at init), as the official code. Default True.
        balance_loss_weight: gamma, the weight of each gate's load-balance loss (the paper: 0.01).
        aux_loss_mode: how the load-balance loss reaches the gradient. "add_to_loss" (default): whenever the model
            trains, the summed auxiliary loss is added to `outputs.loss` (transformers' Trainer; with gradient
            accumulation it is weighted like the LM loss); where the trainer builds its loss itself it rides, as
            an autograd identity, on what that loss is built from: the `log_probs` of TRL's fused LM head
            (SFTTrainer, DPOTrainer, KTO, GRPO in TRL 1.16), else the logits (compute_loss_func). "inject": each
            layer backpropagates its auxiliary loss itself; `outputs.loss` is left alone. Where it is injected,
            `peft_ext.training.SmoreCallback` divides it by the accumulation steps and follows the fp16 loss scale.
            "none": no auxiliary loss. A frozen adapter (loaded for inference) adds none.
        balance_mask_padding: leave padding tokens (attention_mask == 0) out of the load statistics. Default True.
            (Not for encoder-decoder models: their attention_mask is the encoder's, so every token counts.)
        seed: None (default): the adapter is drawn from torch's global RNG. An int: drawn from this seed (and the
            module's name): reproducible per adapter.

    The paper's runs: targets gate/up/down_proj of every block, switch or dense gates, 4-4 or 2-2 experts with
    fan-out 2-2 or 1-1, ranks up to 32, tanh, lr 1e-4 cosine over 2 epochs.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Linear layers to adapt (default: the MLP projections)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never adapted."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    num_experts: list[int] = field(default_factory=lambda: [4, 4], metadata={"help": "Experts per layer (bottom-up)."})
    num_active: list[int] = field(default_factory=lambda: [2, 2], metadata={"help": "Fan-out per layer."})
    expert_ranks: list[int] = field(default_factory=lambda: [8, 8], metadata={"help": "Expert rank per layer."})
    alpha: Optional[Union[float, list[float]]] = field(default=None, metadata={"help": "None: scale 1; else alpha/r."})
    gate_type: str = field(default="switch", metadata={"help": "switch | noisy_topk | dense"})
    router_dim: int = field(default=32, metadata={"help": "Router key/query width m."})
    router_down_dim: int = field(default=32, metadata={"help": "Router input projection width."})
    router_act: str = field(default="relu", metadata={"help": "Router MLP activation."})
    noise_epsilon: float = field(default=1e-2, metadata={"help": "noisy_topk noise floor."})
    expert_act: str = field(default="tanh", metadata={"help": "Aggregation activation sigma."})
    activation_position: str = field(default="all", metadata={"help": "all | child | child_v2"})
    shared_expert_pool: bool = field(default=False, metadata={"help": "S'MoRE#: one expert pool for all layers."})
    init: str = field(default="w_final_zero", metadata={"help": "w_final_zero | eq_1_layer | b_zero | bw_zero | normal"})
    expert_bias: bool = field(default=True, metadata={"help": "Trainable biases a, b, w, p."})
    balance_loss_weight: float = field(default=1e-2, metadata={"help": "Load-balance loss weight gamma."})
    aux_loss_mode: str = field(default="add_to_loss", metadata={"help": "add_to_loss | inject | none"})
    balance_mask_padding: bool = field(default=True, metadata={"help": "Exclude padding from load statistics."})
    seed: Optional[int] = field(default=None, metadata={"help": "Seed of the adapter's initialisation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, list, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self._validate()

    def training_companions(self) -> tuple[str, ...]:
        """SmoreCallback: logs the auxiliary loss, expert load and router entropy, warns on starving experts, and
        scales the injected auxiliary gradient by 1 / gradient_accumulation_steps."""
        return ("peft_ext.training.smore_balance:SmoreCallback",)

    # ------------------------------------------------------------------------------------------ checks
    def _validate(self) -> None:
        for name in ("num_experts", "num_active", "expert_ranks"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"SmoreConfig.{name} must be a non-empty list of integers (one per S'MoRE layer), got {value!r}.")
            setattr(self, name, list(value))
        L = len(self.num_experts)
        for name in ("num_active", "expert_ranks"):
            if len(getattr(self, name)) != L:
                raise ValueError(
                    f"SmoreConfig.{name} has {len(getattr(self, name))} entries but num_experts has {L}: give one "
                    f"value per S'MoRE layer (bottom to top), e.g. {name}={[getattr(self, name)[0]] * L}."
                )
        for l, s in enumerate(self.num_experts):
            _check_int(f"num_experts[{l}]", s, 1)
        for l, r in enumerate(self.expert_ranks):
            _check_int(f"expert_ranks[{l}]", r, 1)
        _choice("gate_type", self.gate_type, GATE_TYPES)
        _choice("init", self.init, INITS)
        _choice("expert_act", self.expert_act, ACTIVATIONS)
        _choice("router_act", self.router_act, ACTIVATIONS)
        _choice("activation_position", self.activation_position, ACTIVATION_POSITIONS)
        _choice("aux_loss_mode", self.aux_loss_mode, AUX_LOSS_MODES)
        if self.gate_type != "dense":
            for l, (f, s) in enumerate(zip(self.num_active, self.num_experts)):
                _check_int(f"num_active[{l}]", f, 1)
                if self.gate_type == "noisy_topk" and f >= s:
                    raise ValueError(
                        f"SmoreConfig.num_active[{l}]={f} with num_experts[{l}]={s}: the noisy_topk gate's load "
                        f"estimate needs fan-out < experts. Use num_active[{l}] <= {s - 1}, more experts, or "
                        f"gate_type='switch'."
                    )
                if f > s:
                    raise ValueError(
                        f"SmoreConfig.num_active[{l}]={f} is more than num_experts[{l}]={s}: a parent picks at most "
                        f"every expert of the layer below. Use num_active[{l}] <= {s}."
                    )
        _check_int("router_dim", self.router_dim, 1)
        _check_int("router_down_dim", self.router_down_dim, 1)
        _check_number("noise_epsilon", self.noise_epsilon, 0.0)
        _check_number("balance_loss_weight", self.balance_loss_weight, 0.0)
        if self.alpha is not None:
            alphas = self.alpha if isinstance(self.alpha, (list, tuple)) else None
            if alphas is not None:
                if len(alphas) != L:
                    raise ValueError(
                        f"SmoreConfig.alpha has {len(alphas)} entries but num_experts has {L}: give one alpha per "
                        f"S'MoRE layer, a single number, or None (scale 1)."
                    )
                for l, a in enumerate(alphas):
                    _check_number(f"alpha[{l}]", a, 0.0, strict=True)
                self.alpha = [float(a) for a in alphas]
            else:
                _check_number("alpha", self.alpha, 0.0, strict=True)
        if self.shared_expert_pool:
            if len(set(self.num_experts)) != 1 or len(set(self.expert_ranks)) != 1:
                raise ValueError(
                    f"SmoreConfig.shared_expert_pool=True shares one pool of experts across layers, so every layer "
                    f"needs the same num_experts and expert_ranks; got num_experts={self.num_experts}, expert_ranks="
                    f"{self.expert_ranks}. Make them equal, or set shared_expert_pool=False."
                )
        if self.seed is not None:
            _check_int("seed", self.seed, 0)

    # ------------------------------------------------------------------------------------ the structure
    @property
    def num_layers(self) -> int:
        return len(self.num_experts)

    def fanouts(self) -> list[int]:
        """f_l actually used: every expert under the dense gate."""
        return list(self.num_experts) if self.gate_type == "dense" else list(self.num_active)

    def widths(self) -> list[int]:
        """d_0 .. d_L (Eq. 4): d_0 = 0, d_{l+1} = d_l + s_l r_l; S'MoRE#: d_l = s r for l >= 1."""
        L = self.num_layers
        if self.shared_expert_pool:
            return [0] + [self.num_experts[0] * self.expert_ranks[0]] * L
        d = [0]
        for s, r in zip(self.num_experts, self.expert_ranks):
            d.append(d[-1] + s * r)
        return d

    def scales(self) -> list[float]:
        if self.alpha is None:
            return [1.0] * self.num_layers
        alphas = self.alpha if isinstance(self.alpha, list) else [self.alpha] * self.num_layers
        return [a / r for a, r in zip(alphas, self.expert_ranks)]

    def router_in_dims(self) -> list[int]:
        """c_l: the input width of layer l's router MLP (the down-projected x plus the keys of its ancestors)."""
        L = self.num_layers
        return [self.router_down_dim + (L - 1 - l) * self.router_dim for l in range(L)]

    def trainable_parameters(self, in_features: int, out_features: int) -> int:
        """The spec's count of one adapted (in -> out) layer's trainable parameters (experts, biases, router)."""
        s, r, d, L = self.num_experts, self.expert_ranks, self.widths(), self.num_layers
        pool = range(1) if self.shared_expert_pool else range(L)
        n = sum(s[l] * r[l] * (in_features + d[l + 1]) for l in pool)
        n += sum(d[l + 1] * d[l] for l in range(1, L)) + out_features * d[L]
        if self.expert_bias:
            n += sum(s[l] * (r[l] + d[l + 1]) for l in pool) + sum(d[l + 1] for l in range(1, L)) + out_features
        m, c = self.router_dim, self.router_in_dims()
        n += (in_features + 1) * self.router_down_dim
        for l in range(L):
            n += (c[l] + 1) * m + (m + 1) * m + s[l] * m
            if self.gate_type == "noisy_topk":
                n += s[l] * c[l]
        return n


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"SmoreConfig.{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SmoreConfig.{name} must be an integer >= {minimum}, got {value!r}.")


def _check_number(name: str, value, minimum: float, strict: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
    if bad or (value <= minimum if strict else value < minimum):
        raise ValueError(f"SmoreConfig.{name} must be a number {'>' if strict else '>='} {minimum}, got {value!r}.")
