from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft_ext.tuners.config_base import PeftExtConfig

# tanh bounds mu in (-1, 1), so the keep probability Phi((mu + 0.5) / 0.5) lies in (Phi(-1), Phi(3)) = (0.159, 0.9987):
# a target keep of 1 - target_sparsity below 0.159 cannot be reached
MAX_TARGET_SPARSITY = 0.84
OPEN_LOGIT = math.atanh(0.5)  # 0.5493: a gate is 1 (eval) iff logit >= this, 0 iff logit <= -this
INIT_FLOOR = 0.55  # init_weights=True clips the logits to >= 0.55, so every eval gate starts at exactly 1

OBJECTIVES = ("target", "l0")
BIASES = ("none", "gates")
RESIDUAL_PRUNE = ("gather", "zeros")

# the spec's per-architecture defaults (target_modules=None): never lm_head or embeddings
_BERT = r".*\.layer\.\d+\.(?:attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
DEFAULT_TARGETS: dict[str, Union[str, list[str]]] = {
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta")},
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo", "olmo2", "smollm3", "granite")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass
class FineGatesConfig(PeftExtConfig):
    """FineGates (Svirsky, Refael, Lindenbaum; arXiv 2412.12951 / 2602.09169): learn which whole output rows and input
    columns of each frozen linear layer to switch off, with stochastic gates pulled toward a target sparsity. The gates
    are the adapter (m + n numbers per m x n layer); closed rows and columns can be cut out, so the tuned model is also
    physically smaller (`merge_and_unload(prune=True)`).

    Per gated linear layer W (out m x in n), bias b (or none), input x:

        theta_r (m), theta_c (n): the trained gate logits;  mu = tanh(theta)
        training:  z = clamp(mu + eps + 0.5, 0, 1),  eps ~ N(0, gate_noise_std^2): one draw per layer and forward,
                   shared by every row of the batch and every token
        eval:      z = clamp(mu + 0.5, 0, 1)         (deterministic; may be fractional: folded as a scale)
        y = z_r * ((x * z_c) (W + s B A)^T + b + delta)      B A: the optional LoRA (lora_r > 0), s = lora_alpha / r
                                                             delta: the optional bias delta (bias="gates")
        keep probability  p(mu) = Phi((mu + 0.5) / reg_sigma)
        sparsity loss of a layer, "target":  (|mean_i p(mu_r,i) - k| + |mean_j p(mu_c,j) - k|) / 2,  k = 1 - target
                                  "l0":      mean over the layer's gates of p(mu)  (STG's expected L0)
        model sparsity loss: the mean over gated layers; the training objective is task + lambda(step) * that
        (added inside the trainer's loss by `peft_ext.training.with_finegates(TrainerCls)`: `peft-ext train` and
        `attach_companions` do it for you).

    A gate is exactly 0 in eval iff its logit <= -atanh(0.5) = -0.549 (1 iff >= 0.549). At init every logit is
    >= 0.55, so the evaluation output equals the base bit for bit; in training a gate dips below 1 with probability
    about 0.5 % (the noise), so the task alone barely moves the gates until the sparsity loss pulls mu toward 0.5.
    Only gates at exactly 0 are cut by pruning; the "target" objective can also be met by gates all sitting part-way
    (folded as scales, not cut). `gate_stats()["closed_fraction"]` (logged as finegates/closed_fraction) is the share
    actually closed: give the logits a learning rate that takes them from ~1 below -0.55 within the run
    (gates_learning_rate).

    After training:
        - `merge_and_unload(prune=True)` (default): folds the gates into the weights, then cuts what they closed:
          dead MLP neurons, removable attention heads (whole KV groups under GQA), and residual-stream dims
          (`residual_prune`). The result is a smaller plain transformers model whose outputs equal the gated
          model's evaluation outputs; `model.base_model.prune_report` (and the returned model's `.finegates_prune_report`)
          says what went. Save it with `peft_ext.tuners.finegates.save_pruned` (a shape manifest; `load_pruned` reads
          it back), or keep base + adapter and prune again: pruning is deterministic.
        - `merge_and_unload(prune=False)` / `merge_adapter()`: W' = diag(z_r) (W + s B A) diag(z_c),
          b' = z_r * (b + delta); same shapes, structured zeros; `unmerge_adapter()` restores the base bit for bit.

    Args:
        target_modules: names, a regex or "all-linear". None: the spec's per-architecture default (BERT / RoBERTa:
            query, key, value, attention.output.dense, intermediate.dense, output.dense; Llama / Qwen2 / Mistral and
            relatives: q, k, v, o, gate, up, down projections; GPT-2: c_attn, c_proj, c_fc). lm_head and (tied)
            embeddings are never gated.
        exclude_modules, modules_to_save, layers_to_transform, layers_pattern: as in PEFT's LoraConfig.
        fan_in_fan_out: accepted for LoraConfig compatibility; GPT-2's Conv1D is recognised on its own.
        target_sparsity: the fraction of gates (rows and columns alike) the loss pulls closed, in [0, 0.84). 0.4
            (official GLUE; LLM post-training used 0.3).
        sparsity_lambda: lambda, the sparsity loss weight. 50.0 (official).
        sparsity_objective: "target" (default, the official code) or "l0" (STG's expected-L0 penalty).
        sparsity_start_step: lambda is 0 before this optimizer step. 0.
        sparsity_warmup_steps: then lambda ramps linearly over this many steps (not in the paper). 0.
        gates_learning_rate: the gate logits' learning rate (their own optimizer group, weight decay 0: decay would
            drag the logits to 0, the gates to 0.5). None: the trainer's learning rate.
        gate_init_mean, gate_init_std: logits ~ N(mean, std^2) at init. 1.0, 0.1 (official); clipped to >= 0.55 with
            init_weights=True.
        gate_noise_std: the training noise's std. 0.1 (official).
        reg_sigma: the sigma of the keep probability. 0.5 (official; not the noise std).
        gate_rows, gate_columns: gate output rows / input columns. Both True.
        bias: "none" (default) or "gates": a trained bias delta per gated layer (zero at init; the base bias is never
            edited, so disable_adapter() and unload() stay exact; a layer without a bias gets one when merged).
        kurtosis: the kurtosis-informed weighting (v2): the per-layer means become softmax(-kappa / kurtosis_tau)-
            weighted sums over the open rows / columns, kappa = sqrt(mean z-score^4) of mean_tokens(x) * W (no
            gradient; from each layer's last training forward). False.
        kurtosis_tau: its temperature. 100.0.
        lora_r: > 0 adds a LoRA inside the gates (A kaiming-uniform, B = 0). 0 (off).
        lora_alpha: the LoRA scale's numerator (s = lora_alpha / lora_r); None: lora_r (s = 1).
        lora_dropout: dropout on the LoRA input. 0.0.
        residual_prune: what pruning does with residual-stream dims (the hidden size cannot shrink): "gather"
            (default: a layer with at least 10 % of them closed becomes a PrunedLinear that index-selects its
            inputs / scatters its outputs) or "zeros" (left as zeros).
        prune_multiple_of: kept sizes are padded to a multiple of this with zero units (GEMM-friendly). 8.
        init_weights: True (default): the identity at init as above. False: logits ~ U(-0.5, 0.5) (every gate
            fractional, none closed), random bias delta and LoRA B: a non-identity adapter, for tests.
        seed: None (default): initialised from torch's global RNG. An int: from (seed, module name).
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to gate."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    fan_in_fan_out: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    target_sparsity: float = field(default=0.4, metadata={"help": "Fraction of gates to close, in [0, 0.84)."})
    sparsity_lambda: float = field(default=50.0, metadata={"help": "Sparsity loss weight."})
    sparsity_objective: str = field(default="target", metadata={"help": "target | l0"})
    sparsity_start_step: int = field(default=0)
    sparsity_warmup_steps: int = field(default=0)
    gates_learning_rate: Optional[float] = field(default=None)
    gate_init_mean: float = field(default=1.0)
    gate_init_std: float = field(default=0.1)
    gate_noise_std: float = field(default=0.1)
    reg_sigma: float = field(default=0.5)
    gate_rows: bool = field(default=True)
    gate_columns: bool = field(default=True)
    bias: str = field(default="none", metadata={"help": "none | gates"})
    kurtosis: bool = field(default=False)
    kurtosis_tau: float = field(default=100.0)
    lora_r: int = field(default=0)
    lora_alpha: Optional[float] = field(default=None)
    lora_dropout: float = field(default=0.0)
    residual_prune: str = field(default="gather", metadata={"help": "gather | zeros"})
    prune_multiple_of: int = field(default=8)
    init_weights: bool = field(default=True)
    seed: Optional[int] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, list, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        t = self.target_sparsity
        if _not_number(t) or not 0.0 <= t < MAX_TARGET_SPARSITY:
            raise ValueError(
                f"FineGatesConfig.target_sparsity={t!r} is outside [0, {MAX_TARGET_SPARSITY}): the gates' keep "
                f"probability Phi((tanh(theta) + 0.5) / 0.5) cannot fall below Phi(-1) = 0.159, so at most 84 % of the "
                f"gates can be pulled closed. Use a value such as 0.2 - 0.4 (the paper's range)."
            )
        for name in ("sparsity_lambda", "kurtosis_tau", "gate_init_std", "gate_noise_std", "lora_dropout"):
            value = getattr(self, name)
            if _not_number(value) or value < 0 or (name == "kurtosis_tau" and value == 0):
                raise ValueError(f"FineGatesConfig.{name} must be a number >= 0{' (and > 0)' if name == 'kurtosis_tau' else ''}, got {value!r}.")
        if self.lora_dropout >= 1:
            raise ValueError(f"FineGatesConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if _not_number(self.reg_sigma) or self.reg_sigma <= 0:
            raise ValueError(f"FineGatesConfig.reg_sigma must be a number > 0, got {self.reg_sigma!r}.")
        if _not_number(self.gate_init_mean):
            raise ValueError(f"FineGatesConfig.gate_init_mean must be a number, got {self.gate_init_mean!r}.")
        if self.init_weights and self.gate_init_mean < INIT_FLOOR:
            raise ValueError(
                f"FineGatesConfig.gate_init_mean={self.gate_init_mean!r} with init_weights=True: the logits are clipped "
                f"to >= {INIT_FLOOR} so that every gate starts open (the output equals the base). Use gate_init_mean "
                f">= {INIT_FLOOR} (default 1.0), or init_weights=False for gates that start part-way."
            )
        if self.gates_learning_rate is not None and (_not_number(self.gates_learning_rate) or self.gates_learning_rate <= 0):
            raise ValueError(f"FineGatesConfig.gates_learning_rate must be None or a number > 0, got {self.gates_learning_rate!r}.")
        for name, allowed in (("sparsity_objective", OBJECTIVES), ("bias", BIASES), ("residual_prune", RESIDUAL_PRUNE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"FineGatesConfig.{name}={getattr(self, name)!r} is not one of {allowed}.")
        for name in ("sparsity_start_step", "sparsity_warmup_steps", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"FineGatesConfig.{name} must be an integer >= 0, got {value!r}.")
        m = self.prune_multiple_of
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"FineGatesConfig.prune_multiple_of must be an integer >= 1 (1: no padding), got {m!r}.")
        if self.lora_alpha is not None and (_not_number(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"FineGatesConfig.lora_alpha must be None (= lora_r) or a number > 0, got {self.lora_alpha!r}.")
        if self.lora_alpha is not None and self.lora_r == 0:
            raise ValueError("FineGatesConfig.lora_alpha is set but lora_r=0 (no LoRA): set lora_r > 0 or drop lora_alpha.")
        if not (self.gate_rows or self.gate_columns):
            raise ValueError(
                "FineGatesConfig: gate_rows=False and gate_columns=False leave nothing to gate: keep at least one True."
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"FineGatesConfig.seed must be None or an integer >= 0, got {self.seed!r}.")

    # ------------------------------------------------------------------------------------------ schedule
    def lambda_at(self, step: int) -> float:
        """lambda at optimizer step `step` (0-based, the trainer's global_step before the update): 0 before
        sparsity_start_step, then a linear ramp over sparsity_warmup_steps ((step - start + 1) / warmup of lambda),
        then constant."""
        if step < self.sparsity_start_step:
            return 0.0
        if self.sparsity_warmup_steps:
            return float(self.sparsity_lambda) * min(1.0, (step - self.sparsity_start_step + 1) / self.sparsity_warmup_steps)
        return float(self.sparsity_lambda)

    @property
    def lora_scale(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_r) / max(self.lora_r, 1)

    def training_companions(self) -> tuple[str, ...]:
        return (
            "peft_ext.training.finegates:FineGatesTrainerMixin",
            "peft_ext.training.finegates:FineGatesCallback",
        )


def _not_number(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
