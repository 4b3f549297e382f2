"""Our methods' entries for the contract suite (peft_ext.testing): one `MethodEntry` per peft-ext method.

The test modules here (test_contract_*.py) run the suite on `METHODS` (the whole suite) and `VARIANTS` (the
per-model items). A new method joins by appending its entry to `METHODS`; peft_ext/testing/entries.py and
docs/contract_suite.md describe the fields and the contract item keys of `documented_errors`.
"""

from __future__ import annotations

import math
import re
from typing import Optional

from peft import PeftConfig
from torch import nn

import peft_ext
from peft_ext.testing import (
    MODELS,
    BadConfig,
    DocumentedError,
    MethodEntry,
    floating_numel,
    modules_to_save_numel,
    variant,
)

# --------------------------------------------------------------------------------------------------- HFT
def _hft_config(model_kind: str, **overrides) -> PeftConfig:
    kwargs = {"task_type": MODELS[model_kind].task_type}
    kwargs.update(overrides)
    return peft_ext.HftConfig(**kwargs)


def _hft_expected_trainable(base: nn.Module, config) -> int:
    """HFT spec, strategy "matrix": every floating parameter (weight and bias) of each selected module, plus the
    modules_to_save copies. Strategy "param": of every selected module, `ratio` of its output rows (rounded half
    up, at least one) of each floating parameter."""
    total = modules_to_save_numel(base, config.modules_to_save)
    for name in config.selected_modules:
        module = base.get_submodule(name)
        if config.strategy != "param":
            total += floating_numel(module, recurse=False)
            continue
        conv1d = type(module).__name__ == "Conv1D"  # GPT-2's Conv1D stores its weight as (in, out)
        n_out = module.weight.shape[1 if conv1d else 0]
        rows = min(n_out, max(1, int(config.ratio * n_out + 0.5)))
        for pname, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                row_dim = 1 if (conv1d and pname == "weight") else 0
                total += p.numel() // p.shape[row_dim] * rows
    return total


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


_BLOCK = re.compile(r"\.(?:layers|h|layer)\.(\d+)\.")


def _role(name: str, module: nn.Module) -> Optional[str]:
    last = name.split(".")[-1]
    if "Norm" in type(module).__name__ or last.startswith("ln_"):
        return "norm"
    if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
        return None
    return "attention" if ("attn" in name or "attention" in name) else "mlp"


def _hft_check_structure(model_kind: str, base: nn.Module, config) -> None:
    """The "matrix" strategy: per block and role, `ratio` of the group; odd groups alternate across blocks, so
    that the running total per role is round_half_up(ratio * members so far). Names are classified here on
    their own (not with peft_ext's selection code)."""
    if config.strategy not in ("matrix", "param"):
        return
    groups: dict[tuple[str, int], list[str]] = {}
    for name, module in base.named_modules():
        role = _role(name, module)
        match = _BLOCK.search("." + name + ".")
        if role is None:
            continue
        if match is None:  # outside the blocks: only a block-less model (the MLP) draws from its linear layers
            if role == "norm" or any(_BLOCK.search("." + n + ".") for n, _ in base.named_modules()):
                continue
            block = -1
        else:
            block = int(match.group(1))
        if role != "norm" or config.train_norms:
            groups.setdefault((role, block), []).append(name)
    selected = set(config.selected_modules)
    pool = {n for names in groups.values() for n in names}
    assert selected <= pool, f"selected modules outside the pool: {sorted(selected - pool)[:5]}"
    if config.strategy == "param":  # every module of the pool trains some of its rows
        assert selected == pool, sorted(pool - selected)[:5]
        return
    per_role: dict[str, list[int]] = {}
    for role in sorted({r for r, _ in groups}):
        blocks = sorted(b for r, b in groups if r == role)
        seen = taken = 0
        for b in blocks:
            members = groups[(role, b)]
            seen += len(members)
            want = min(len(members), _round_half_up(config.ratio * seen) - taken)
            got = len(selected & set(members))
            assert got == want, f"{model_kind}: block {b} {role}: selected {got} of {len(members)}, expected {want}"
            taken += got
            per_role.setdefault(role, []).append(got)
    if model_kind == "llama" and config.ratio == 0.5:  # the spec's worked example: 2 of q/k/v/o, 2,1 of gate/up/down
        assert per_role == {"attention": [2, 2], "mlp": [2, 1], "norm": [1, 1]}, per_role


HFT_ENTRY = MethodEntry(
    name="hft",
    peft_type="HFT",
    config_cls=peft_ext.HftConfig,
    prefix="hft_",
    make_config=_hft_config,
    expected_trainable=_hft_expected_trainable,
    trained_modules=lambda config: list(config.selected_modules),
    nonidentity_overrides={"init_weights": False},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("ratio_zero", {"ratio": 0}, ValueError, r"ratio"),
        BadConfig("ratio_too_big", {"ratio": 1.5}, ValueError, r"ratio"),
        BadConfig("ratio_negative", {"ratio": -0.5}, ValueError, r"ratio"),
        BadConfig("strategy_unknown", {"strategy": "rows"}, ValueError, r"strategy"),
        BadConfig("explicit_without_modules", {"strategy": "explicit"}, ValueError, r"selected_modules"),
    ),
    nothing_trainable=BadConfig(
        "nothing_trainable", {"target_modules": ["q_proj"], "ratio": 0.1}, ValueError, r"selects nothing", "inject"
    ),
    check_structure=_hft_check_structure,
    card_terms=("hft", "peft-ext"),
    init_atol=0.0,
    documented_errors={},
)


# -------------------------------------------------------------------------------------------------- COLA
def _cola_config(model_kind: str, **overrides) -> PeftConfig:
    kwargs = {
        "task_type": MODELS[model_kind].task_type,
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "all-linear",
        "chain_length": 3,
    }
    kwargs.update(overrides)
    return peft_ext.ColaConfig(**kwargs)


def _in_out(module: nn.Module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D":  # GPT-2's Conv1D stores its weight as (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _cola_expected_trainable(base: nn.Module, config) -> int:
    """COLA spec: only the link being trained trains, a LoRA of that link's rank r_k on each targeted module:
    r_k * (in + out) per module (the merged links are frozen factors), plus the modules_to_save copies."""
    total = modules_to_save_numel(base, config.modules_to_save)
    for name in config.target_modules:
        n_in, n_out = _in_out(base.get_submodule(name))
        rank = config.link_ranks[config.current_link] if config.link_ranks else config.r
        total += rank * (n_in + n_out)
    return total


COLA_ENTRY = MethodEntry(
    name="cola",
    peft_type="COLA",
    config_cls=peft_ext.ColaConfig,
    prefix="lora_",
    make_config=_cola_config,
    expected_trainable=_cola_expected_trainable,
    trained_modules=lambda config: list(config.target_modules),  # "all-linear", expanded to full names on injection
    nonidentity_overrides={"init_lora_weights": False},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("rank_zero", {"r": 0}, ValueError, r"\br\b"),
        BadConfig("chain_length_zero", {"chain_length": 0}, ValueError, r"chain_length"),
        BadConfig("steps_per_link_length", {"steps_per_link": [10, 10]}, ValueError, r"steps_per_link"),
        BadConfig("steps_per_link_zero", {"steps_per_link": 0}, ValueError, r"steps_per_link"),
        BadConfig("merge_every_past_end", {"merge_every": 0.6}, ValueError, r"merge_every"),
        BadConfig("two_schedules", {"steps_per_link": 5, "merge_every": 0.2}, ValueError, r"not both"),
        BadConfig("link_ranks_length", {"link_ranks": [4]}, ValueError, r"link_ranks"),
        BadConfig("dora", {"use_dora": True}, ValueError, r"use_dora"),
        BadConfig("pissa_init", {"init_lora_weights": "pissa"}, ValueError, r"init_lora_weights"),
        BadConfig("rank_larger_than_layer", {"r": 64}, ValueError, r"larger than", "inject"),
    ),
    nothing_trainable=BadConfig(
        "nothing_trainable", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, r"matches no", "inject"
    ),
    card_terms=("cola", "peft-ext"),
    init_atol=0.0,
    documented_errors={},
)


# ---------------------------------------------------------------------------------------------- DELTACOME
def _deltacome_config(model_kind: str, **overrides) -> PeftConfig:
    # the tiny models' layers are too small to compress (the MLP's last layer is 20 x 4): at budget 1 an 8-bit and a
    # 4-bit band fit everywhere; group 16 gives several groups per singular vector
    kwargs = {"task_type": MODELS[model_kind].task_type, "budget": 1.0, "bands": [[1, 8], [None, 4]], "group_size": 16}
    kwargs.update(overrides)
    return peft_ext.DeltaComeConfig(**kwargs)


_INFERENCE_ONLY = DocumentedError(
    RuntimeError, r"inference.*compress", "a compressed delta is made by compressing a fine-tune, not trained"
)

DELTACOME_ENTRY = MethodEntry(
    name="deltacome",
    peft_type="DELTACOME",
    config_cls=peft_ext.DeltaComeConfig,
    prefix="deltacome_",
    make_config=_deltacome_config,
    # buffers only: nothing of the delta trains (PEFT still adds a classifier head to modules_to_save for SEQ_CLS)
    expected_trainable=lambda base, config: modules_to_save_numel(base, config.modules_to_save),
    trained_modules=lambda config: [],
    nonidentity_overrides={"init_weights": False},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("method_unknown", {"method": "gptq"}, ValueError, r"method"),
        BadConfig("budget_zero", {"budget": 0}, ValueError, r"budget"),
        BadConfig("budget_text", {"budget": "a sixteenth"}, ValueError, r"budget"),
        BadConfig("bitdelta_below_1_16", {"method": "bitdelta", "budget": 1 / 32}, ValueError, r"1/16"),
        BadConfig("bits_too_wide", {"bands": [[4, 9]]}, ValueError, r"bits"),
        BadConfig("two_fill_bands", {"bands": [[None, 3], [None, 2]]}, ValueError, r"fill"),
        BadConfig("group_size_zero", {"group_size": 0}, ValueError, r"group_size"),
        BadConfig("budget_too_small_for_bands", {"budget": 0.01, "bands": [[8, 8], [None, 2]]}, ValueError, r"raise budget", "inject"),
    ),
    nothing_trainable=BadConfig(
        "matches_nothing", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, r"matches no", "inject"
    ),
    card_terms=("deltacome", "peft-ext"),
    init_atol=0.0,
    documented_errors={
        item: _INFERENCE_ONLY for item in ("train", "trl_sft", "trl_dpo", "gradient_checkpointing")
    },
)


# ------------------------------------------------------------------------------------------------- S'MORE
def _smore_config(model_kind: str, **overrides) -> PeftConfig:
    # small experts so that the tiny models' layers (20-64 wide) keep the adapter small; every linear layer adapted
    kwargs = {
        "task_type": MODELS[model_kind].task_type,
        "target_modules": ["lin0", "lin1", "lin2"] if model_kind == "mlp" else "all-linear",
        "num_experts": [4, 3],
        "num_active": [2, 2],
        "expert_ranks": [2, 3],
        "router_dim": 8,
        "router_down_dim": 6,
    }
    kwargs.update(overrides)
    return peft_ext.SmoreConfig(**kwargs)


def _smore_layer_count(base: nn.Module, config, in_features: int, out_features: int) -> int:
    """The spec's count for one adapted (in -> out) layer, written out here from smore.md (not with the config's own
    method): experts sum_l s_l r_l (in + d_{l+1}) + sum_{l>=1} d_{l+1} d_l + out d_L; biases sum_l s_l (r_l + d_{l+1})
    + sum_{l>=1} d_{l+1} + out; router (in + 1) d_down + sum_l [(c_l + 1) m + (m + 1) m + s_l m (+ s_l c_l noisy)]
    with d_0 = 0, d_{l+1} = d_l + s_l r_l (S'MoRE#: d_l = s r and one shared A, B), c_l = d_down + (L - 1 - l) m."""
    s, r, L = config.num_experts, config.expert_ranks, len(config.num_experts)
    if config.shared_expert_pool:
        d = [0] + [s[0] * r[0]] * L
        pool = [0]
    else:
        d = [0]
        for l in range(L):
            d.append(d[-1] + s[l] * r[l])
        pool = list(range(L))
    n = sum(s[l] * r[l] * (in_features + d[l + 1]) for l in pool)
    n += sum(d[l + 1] * d[l] for l in range(1, L)) + out_features * d[L]
    if config.expert_bias:
        n += sum(s[l] * (r[l] + d[l + 1]) for l in pool) + sum(d[l + 1] for l in range(1, L)) + out_features
    m, down = config.router_dim, config.router_down_dim
    n += (in_features + 1) * down
    for l in range(L):
        c = down + (L - 1 - l) * m
        n += (c + 1) * m + (m + 1) * m + s[l] * m + (s[l] * c if config.gate_type == "noisy_topk" else 0)
    return n


def _smore_expected_trainable(base: nn.Module, config) -> int:
    total = modules_to_save_numel(base, config.modules_to_save)
    for name in config.target_modules:
        n_in, n_out = _in_out(base.get_submodule(name))
        total += _smore_layer_count(base, config, n_in, n_out)
    return total


_SMORE_NO_MERGE = DocumentedError(
    ValueError, r"S'MoRE cannot be merged", "the update depends on each token's routing and nonlinear tree"
)

SMORE_ENTRY = MethodEntry(
    name="smore",
    peft_type="SMORE",
    config_cls=peft_ext.SmoreConfig,
    prefix="smore_",
    make_config=_smore_config,
    expected_trainable=_smore_expected_trainable,
    trained_modules=lambda config: list(config.target_modules),
    nonidentity_overrides={"init": "normal"},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("list_lengths", {"num_active": [2]}, ValueError, r"num_active.*one value per S'MoRE layer"),
        BadConfig("ranks_length", {"expert_ranks": [2, 2, 2]}, ValueError, r"expert_ranks"),
        BadConfig("rank_zero", {"expert_ranks": [0, 2]}, ValueError, r"expert_ranks\[0\]"),
        BadConfig("rank_negative", {"expert_ranks": [2, -1]}, ValueError, r"expert_ranks\[1\]"),
        BadConfig("experts_zero", {"num_experts": [0, 3]}, ValueError, r"num_experts\[0\]"),
        BadConfig("noisy_fanout", {"gate_type": "noisy_topk", "num_active": [4, 2]}, ValueError, r"num_active\[0\].*noisy"),
        BadConfig("switch_fanout", {"num_active": [5, 2]}, ValueError, r"num_active\[0\]"),
        BadConfig("gate_unknown", {"gate_type": "top2"}, ValueError, r"gate_type"),
        BadConfig("init_unknown", {"init": "zeros"}, ValueError, r"\binit\b"),
        BadConfig("activation_unknown", {"expert_act": "swish"}, ValueError, r"expert_act"),
        BadConfig("router_act_unknown", {"router_act": "elu"}, ValueError, r"router_act"),
        BadConfig("position_unknown", {"activation_position": "parent"}, ValueError, r"activation_position"),
        BadConfig("aux_mode_unknown", {"aux_loss_mode": "sum"}, ValueError, r"aux_loss_mode"),
        BadConfig("shared_pool_unequal", {"shared_expert_pool": True}, ValueError, r"shared_expert_pool.*equal"),
        BadConfig("alpha_length", {"alpha": [8.0]}, ValueError, r"alpha"),
        BadConfig("router_dim_zero", {"router_dim": 0}, ValueError, r"router_dim"),
    ),
    nothing_trainable=BadConfig(
        "nothing_trainable", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, r"matches no", "inject"
    ),
    card_terms=("smore", "peft-ext"),
    init_atol=0.0,
    train_steps=2,
    # the load-balance loss is over the batch's routing statistics: per replica under DDP/FSDP, not the global batch's
    distributed_overrides={"aux_loss_mode": "none"},
    documented_errors={"merge": _SMORE_NO_MERGE, "safe_merge": _SMORE_NO_MERGE},
)


# ------------------------------------------------------------------------------------------------ SSMLORA
_SSMLORA_TARGETS = {  # the tiny models without q_proj / v_proj: explicit modules, one chain through them
    "gpt2": ["c_attn", "c_fc"], "bert_cls": ["query", "value"], "mlp": ["lin0", "lin1", "lin2"],
}


def _ssmlora_config(model_kind: str, **overrides) -> PeftConfig:
    # rank 3: with rank 2 the min-max normalised state is always (0, 1) or (1, 0), with (almost) no gradient to C
    kwargs = {"task_type": MODELS[model_kind].task_type, "r": 3, "alpha": 2.0, "state_dropout": 0.0}
    if "target_modules" in overrides:
        overrides.pop("insertion", None)  # an insertion variant given explicit modules
    if model_kind in _SSMLORA_TARGETS and "target_modules" not in overrides:
        overrides.pop("insertion", None)  # an insertion variant: these models have no q_proj / v_proj
        kwargs.update(target_modules=_SSMLORA_TARGETS[model_kind], chain="all")
    kwargs.update(overrides)
    return peft_ext.SsmLoraConfig(**kwargs)


def _ssmlora_expected_trainable(base: nn.Module, config) -> int:
    """SSMLoRA spec: per module A (r x in), B (out x r), D (r x r) and C (r x r) except on each chain's first module,
    whose incoming state is always zero; plus the modules_to_save copies."""
    total = modules_to_save_numel(base, config.modules_to_save)
    for chain in config.chain_layout:
        for i, name in enumerate(chain):
            n_in, n_out = _in_out(base.get_submodule(name))
            total += config.r * (n_in + n_out) + config.r * config.r * (2 if i else 1)
    return total


# D starts random (state_init="normal"): the state path is active, so merging is refused (an adapter with C = D = 0,
# state_init="zeros" before D trains, merges exactly as a LoRA: tests/ssmlora)
_SSMLORA_NO_MERGE = DocumentedError(ValueError, r"SSMLoRA cannot be merged while its state path is active", "C or D non-zero")

SSMLORA_ENTRY = MethodEntry(
    name="ssmlora",
    peft_type="SSMLORA",
    config_cls=peft_ext.SsmLoraConfig,
    prefix="ssmlora_",
    make_config=_ssmlora_config,
    expected_trainable=_ssmlora_expected_trainable,
    trained_modules=lambda config: [name for chain in config.chain_layout for name in chain],
    nonidentity_overrides={"init_weights": False},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("rank_zero", {"r": 0}, ValueError, r"SsmLoraConfig\.r\b"),
        BadConfig("rank_negative", {"r": -2}, ValueError, r"SsmLoraConfig\.r\b"),
        BadConfig("dropout_one", {"state_dropout": 1.0}, ValueError, r"state_dropout"),
        BadConfig("dropout_negative", {"state_dropout": -0.1}, ValueError, r"state_dropout"),
        BadConfig("insertion_unknown", {"insertion": "every_third"}, ValueError, r"insertion"),
        BadConfig("chain_unknown", {"chain": "per_layer"}, ValueError, r"chain"),
        BadConfig("alpha_zero", {"alpha": 0}, ValueError, r"alpha"),
        BadConfig("rank_above_layer", {"r": 64}, ValueError, r"above the layer", "inject"),
        BadConfig("chain_mixes_ranks", {"insertion": "alternate_qv", "rank_pattern": {"v_proj": 4}}, ValueError,
                  r"mixes ranks", "inject"),
    ),
    nothing_trainable=BadConfig(
        "nothing_trainable", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, r"matches no", "inject"
    ),
    card_terms=("ssmlora", "peft-ext"),
    init_atol=0.0,
    train_steps=2,
    documented_errors={
        "merge": _SSMLORA_NO_MERGE, "safe_merge": _SSMLORA_NO_MERGE,
    },
)


# ---------------------------------------------------------------------------------------------- FINEGATES
_FINEGATES_DEFAULTS = {  # the spec's per-architecture targets, written out here (not read from peft_ext)
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2_gqa": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "mlp": ["lin0", "lin1", "lin2"],
}
_FINEGATES_BERT = re.compile(
    r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


def _finegates_config(model_kind: str, **overrides) -> PeftConfig:
    # logits from N(0.6, 0.1) (clipped >= 0.55: the base at init) and noise 0.3: about 45 % of the training gates dip
    # below 1 in a forward, so the task loss reaches every gate vector at the first step (with the official N(1, 0.1)
    # and noise 0.1 about 0.5 % do: the sparsity loss moves them first, tests/finegates)
    kwargs = {"task_type": MODELS[model_kind].task_type, "gate_init_mean": 0.6, "gate_noise_std": 0.3}
    if model_kind == "mlp":
        kwargs["target_modules"] = ["lin0", "lin1", "lin2"]
    if overrides.get("bias") == "gates" and model_kind in ("llama", "qwen2_gqa") and "target_modules" not in overrides:
        # a bias delta merged into a layer without a bias adds one, which the contract's merge item (the base's
        # architecture) rules out: here only Qwen2's q/k/v have biases (the bias-less case: tests/finegates)
        if model_kind == "llama":
            overrides["bias"] = "none"
        else:
            kwargs["target_modules"] = ["k_proj", "q_proj", "v_proj"]
    kwargs.update(overrides)
    return peft_ext.FineGatesConfig(**kwargs)


def _finegates_targets(base: nn.Module, config) -> list[str]:
    """The gated modules' full names, matched here on their own from the spec's defaults (or the config's list)."""
    names = []
    for name, module in base.named_modules():
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        if type(base).__name__.startswith("Bert"):
            if _FINEGATES_BERT.fullmatch(name):
                names.append(name)
        elif name.split(".")[-1] in (config.target_modules if isinstance(config.target_modules, list) else []):
            names.append(name)
    return names


def _finegates_expected_trainable(base: nn.Module, config) -> int:
    """FineGates spec: per gated (in -> out) layer, out row logits + in column logits, + out for bias="gates",
    + r (in + out) for the LoRA inside the gates; plus the modules_to_save copies."""
    total = modules_to_save_numel(base, config.modules_to_save)
    for name in _finegates_targets(base, config):
        n_in, n_out = _in_out(base.get_submodule(name))
        total += (n_out if config.gate_rows else 0) + (n_in if config.gate_columns else 0)
        total += n_out if config.bias == "gates" else 0
        total += config.lora_r * (n_in + n_out)
    return total


def _finegates_check_structure(model_kind: str, base: nn.Module, config) -> None:
    """The defaults gate the spec's modules only: never the LM head, the embeddings or BERT's pooler."""
    names = _finegates_targets(base, config)
    assert names and not any("lm_head" in n or "embed" in n or "pooler" in n or "classifier" in n for n in names), names
    if model_kind in ("llama", "qwen2_gqa") and config.bias == "none":
        assert len(names) == 7 * 2, names  # q, k, v, o, gate, up, down in each of the 2 blocks
    if model_kind == "bert_cls":
        assert len(names) == 6 * len(base.bert.encoder.layer), names


FINEGATES_ENTRY = MethodEntry(
    name="finegates",
    peft_type="FINEGATES",
    config_cls=peft_ext.FineGatesConfig,
    prefix="gates_",
    make_config=_finegates_config,
    expected_trainable=_finegates_expected_trainable,
    trained_modules=lambda config, base: _finegates_targets(base, config),
    # every gate fractional (none closed) and no training noise: a deterministic non-identity adapter
    nonidentity_overrides={"init_weights": False, "gate_noise_std": 0.0},
    seed_overrides=lambda seed: {"seed": seed},
    bad_configs=(
        BadConfig("sparsity_above_tanh_bound", {"target_sparsity": 0.84}, ValueError, r"target_sparsity.*0\.84"),
        BadConfig("sparsity_negative", {"target_sparsity": -0.1}, ValueError, r"target_sparsity"),
        BadConfig("objective_unknown", {"sparsity_objective": "l1"}, ValueError, r"sparsity_objective"),
        BadConfig("bias_unknown", {"bias": "all"}, ValueError, r"\bbias\b"),
        BadConfig("residual_unknown", {"residual_prune": "drop"}, ValueError, r"residual_prune"),
        BadConfig("lambda_negative", {"sparsity_lambda": -1.0}, ValueError, r"sparsity_lambda"),
        BadConfig("init_below_open", {"gate_init_mean": 0.3}, ValueError, r"gate_init_mean"),
        BadConfig("nothing_gated", {"gate_rows": False, "gate_columns": False}, ValueError, r"gate_rows"),
        BadConfig("lora_rank_negative", {"lora_r": -1}, ValueError, r"lora_r"),
        BadConfig("multiple_of_zero", {"prune_multiple_of": 0}, ValueError, r"prune_multiple_of"),
        BadConfig("lm_head", {"target_modules": ["q_proj", "lm_head"]}, ValueError, r"LM head", "inject"),
    ),
    nothing_trainable=BadConfig(
        "nothing_trainable", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, r"matches no", "inject"
    ),
    check_structure=_finegates_check_structure,
    card_terms=("finegates", "peft-ext"),
    init_atol=0.0,
    documented_errors={},
)


# One entry per method: the whole suite (per-model items, TRL, bad inputs, compile) runs on each.
METHODS: list[MethodEntry] = [HFT_ENTRY, COLA_ENTRY, DELTACOME_ENTRY, SMORE_ENTRY, SSMLORA_ENTRY, FINEGATES_ENTRY]
# Config variants of a method: the per-model items (1 to 6, without compile) run on each as well.
VARIANTS: list[MethodEntry] = [
    variant(HFT_ENTRY, "param", strategy="param"),
    variant(DELTACOME_ENTRY, "lowrank", method="lowrank"),
    variant(DELTACOME_ENTRY, "bitdelta", method="bitdelta"),
    variant(SMORE_ENTRY, "noisy_topk", gate_type="noisy_topk"),
    variant(SMORE_ENTRY, "dense_child", gate_type="dense", activation_position="child", num_experts=[2, 2], expert_ranks=[2, 2]),
    variant(SMORE_ENTRY, "shared_pool", shared_expert_pool=True, num_experts=[3, 3], expert_ranks=[2, 2], init="eq_1_layer", expert_act="identity"),
    variant(SSMLORA_ENTRY, "all_qv_per_type", insertion="all", state_dropout=0.1),
    variant(SSMLORA_ENTRY, "chain_gradients", detach_state=False),
    variant(FINEGATES_ENTRY, "bias_lora", bias="gates", lora_r=2, lora_alpha=4.0),
    variant(FINEGATES_ENTRY, "rows_l0", gate_columns=False, sparsity_objective="l0"),
    variant(SMORE_ENTRY, "one_layer_nobias", num_experts=[4], num_active=[2], expert_ranks=[3], expert_bias=False, aux_loss_mode="inject"),
]
