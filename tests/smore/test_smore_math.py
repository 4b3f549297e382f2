"""S'MoRE (peft_ext/tuners/smore): exact checks of the forward against hand-written references of the spec's
equations (/work/shared/design/methods/smore.md), the parameter count, the refusal to merge, bad inputs, and
adapters side by side.

The references here are written from the spec, token by token and tree node by tree node (float64), without the
library's routing or layer helpers: they read the layer's raw parameters only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from peft_ext import SmoreConfig
from peft_ext.testing.models import MODELS
from peft_ext.tuners.smore import SmoreLayer

MERGE_MESSAGE = (
    "S'MoRE cannot be merged: its update depends on each token's routing and nonlinear tree; keep it unmerged or "
    "unload()"
)
ACTS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": lambda t: t,
    "gelu": F.gelu,
    "silu": F.silu,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


# ------------------------------------------------------------------------------------------------ helpers
class OneLinear(nn.Module):
    """One adapted layer and nothing else: the model's output minus the base's is exactly the layer's delta."""

    def __init__(self, n_in: int, n_out: int, conv1d: bool = False):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.lin = Conv1D(n_out, n_in)  # weight (in, out): the fan_in_fan_out layout
        else:
            self.lin = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.lin(x)


def one_layer(n_in=12, n_out=7, conv1d=False, seed=0, **cfg):
    torch.manual_seed(seed)
    base = OneLinear(n_in, n_out, conv1d)
    model = get_peft_model(base, SmoreConfig(target_modules=["lin"], **cfg))
    layer = model.base_model.model.lin
    assert isinstance(layer, SmoreLayer)
    return model, layer


@torch.no_grad()
def randomise(layer: SmoreLayer, adapter="default", seed=1, scale=0.5):
    """Every S'MoRE parameter (experts, biases, router, keys, noise weights) random and non-zero."""
    g = torch.Generator().manual_seed(seed)
    for module in (layer.smore_experts[adapter], layer.smore_router[adapter]):
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def raw(layer: SmoreLayer, adapter="default") -> dict[str, torch.Tensor]:
    """The adapter's parameters by name, as float64 copies (the reference's only input besides x)."""
    out = {}
    for prefix, module in (("ex.", layer.smore_experts[adapter]), ("ro.", layer.smore_router[adapter])):
        for name, p in module.named_parameters():
            out[prefix + name] = p.detach().double().clone()
    return out


def route_tree(prm, cfg: SmoreConfig, x, l, q):
    """Top-down routing of one parent at S'MoRE layer l, from its query q (spec: z = MLP_l(q), gate_l(z, K_l)):
    a list of (expert, weight, subtree) with subtree the children in layer l-1 (None at l = 0)."""
    ract = ACTS[cfg.router_act]
    z = prm[f"ro.mlp_out_{l}_weight"] @ ract(prm[f"ro.mlp_in_{l}_weight"] @ q + prm[f"ro.mlp_in_{l}_bias"])
    z = z + prm[f"ro.mlp_out_{l}_bias"]
    K = prm[f"ro.keys_{l}"]
    s = K.shape[0]
    if cfg.gate_type == "switch":
        pi = torch.exp(K @ z - (K @ z).max())
        pi = pi / pi.sum()
        chosen = [int(i) for i in torch.argsort(pi, descending=True)[: cfg.num_active[l]]]
        w = torch.stack([pi[e] for e in chosen])
        if len(chosen) > 1:
            w = w / w.sum()
        child_keys = [K[e] for e in chosen]
    elif cfg.gate_type == "dense":
        pi = torch.exp(K @ z - (K @ z).max())
        chosen, w = list(range(s)), pi / pi.sum()
        child_keys = [K[e] for e in chosen]
    else:  # noisy_topk, eval: cosine scores, softmax over the selected (the raw score for one child)
        Kn = K / K.norm(dim=1, keepdim=True)
        g = Kn @ (z / z.norm())
        chosen = [int(i) for i in torch.argsort(g, descending=True)[: cfg.num_active[l]]]
        sel = torch.stack([g[e] for e in chosen])
        w = torch.exp(sel - sel.max()) / torch.exp(sel - sel.max()).sum() if len(chosen) > 1 else sel
        child_keys = [Kn[e] for e in chosen]
    out = []
    for e, we, key in zip(chosen, w, child_keys):
        sub = route_tree(prm, cfg, x, l - 1, torch.cat([q, key])) if l > 0 else None
        out.append((e, we, sub))
    return out


def expert_out(prm, cfg: SmoreConfig, x, l, e):
    """E_l[e](x) = scale_l (B_l[e] (A_l[e] x + a_l[e]) + b_l[e]); S'MoRE# reads the one shared pool (index 0)."""
    k = 0 if cfg.shared_expert_pool else l
    alpha = cfg.alpha[l] if isinstance(cfg.alpha, list) else cfg.alpha
    scale = 1.0 if alpha is None else alpha / cfg.expert_ranks[l]
    u = prm[f"ex.A_{k}"][e] @ x
    if cfg.expert_bias:
        u = u + prm[f"ex.A_bias_{k}"][e]
    v = prm[f"ex.B_{k}"][e] @ u
    if cfg.expert_bias:
        v = v + prm[f"ex.B_bias_{k}"][e]
    return scale * v


def aggregate(prm, cfg: SmoreConfig, x, l, tree):
    """Bottom-up (Eq. 3): the parent's h = sum over its children of alpha * sigma(E + W h_child + w) ("all"), or the
    S'MoRE* variants ("child": alpha E + W sigma(h_child) + w; "child_v2": alpha (E + W sigma(h_child) + w))."""
    act = ACTS[cfg.expert_act]
    total = 0.0
    for e, w, sub in tree:
        E = expert_out(prm, cfg, x, l, e)
        if sub is None:
            val = w * act(E) if cfg.activation_position == "all" else w * E
        else:
            hc = aggregate(prm, cfg, x, l - 1, sub)
            W = prm[f"ex.W_{l}"]
            wb = prm[f"ex.W_bias_{l}"] if cfg.expert_bias else 0.0
            if cfg.activation_position == "all":
                val = w * act(E + W @ hc + wb)
            elif cfg.activation_position == "child":
                val = w * E + W @ act(hc) + wb
            else:
                val = w * (E + W @ act(hc) + wb)
        total = total + val
    return total


def reference_delta(layer: SmoreLayer, cfg: SmoreConfig, x: torch.Tensor, adapter="default") -> torch.Tensor:
    """P h_L(x) + p, one token at a time (x: T x in), in float64."""
    prm = raw(layer, adapter)
    L = len(cfg.num_experts)
    rows = []
    for xt in x.double():
        q = prm["ro.down_weight"] @ xt + prm["ro.down_bias"]
        h = aggregate(prm, cfg, xt, L - 1, route_tree(prm, cfg, xt, L - 1, q))
        y = prm["ex.P"] @ h
        if cfg.expert_bias:
            y = y + prm["ex.P_bias"]
        rows.append(y)
    return torch.stack(rows)


def lm_batch(kind="llama", batch=3, seed=123):
    return MODELS[kind].inputs(batch=batch, seed=seed)


# ------------------------------------------------------------------------------------------- 1. init = base
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["w_final_zero", "eq_1_layer", "normal"])
def test_init_equals_base_except_normal(kind, init):
    spec = MODELS[kind]
    base = spec.make(seed=0)
    inputs = lm_batch(kind)
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(base, SmoreConfig(task_type="CAUSAL_LM", init=init, num_experts=[4, 3], expert_ranks=[2, 3]))
    layers = [m for m in model.modules() if isinstance(m, SmoreLayer)]
    assert len(layers) == (6 if kind == "llama" else 4)  # gate/up/down_proj or c_fc/mlp.c_proj of 2 blocks
    if kind == "gpt2":
        assert type(layers[0].get_base_layer()).__name__ == "Conv1D"
    model.eval()
    with torch.no_grad():
        got = model(**inputs).logits
    if init == "normal":
        assert not torch.allclose(got, expected, atol=1e-4)
    else:
        assert torch.equal(got, expected)  # bit-identical: P = 0 and p = 0
        model.train()  # and in training (aux computed, not in the logits)
        assert torch.equal(model(**inputs).logits.detach(), expected)


# --------------------------------------------------------------------------------- 2. L = s = 1, dense, sigma = id
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("alpha", [None, 8.0])
def test_one_layer_one_expert_is_a_biased_lora(conv1d, alpha):
    model, layer = one_layer(
        conv1d=conv1d, num_experts=[1], num_active=[1], expert_ranks=[4], gate_type="dense", expert_act="identity",
        alpha=alpha,
    )
    randomise(layer, seed=3)
    ex = layer.smore_experts["default"]
    A, a, B, b, P, p = ex.A_0[0], ex.A_bias_0[0], ex.B_0[0], ex.B_bias_0[0], ex.P, ex.P_bias
    for t in (a, b, p):
        assert t.abs().min() > 0  # the biases are really non-zero
    scale = 1.0 if alpha is None else alpha / 4
    x = torch.randn(5, 12)
    expected = (P @ (scale * (B @ (A @ x.T + a[:, None]) + b[:, None]))).T + p  # P (s (B (A x + a) + b)) + p
    model.eval()
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
        delta = layer.adapter_delta("default", x, None)[0]
        model_delta = model(x) - base_out
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model_delta, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------- 3. eq_1_layer, sigma = id = flat mixture (Prop 3.2)
@pytest.mark.parametrize("shared", [False, True])
def test_eq_1_layer_identity_is_the_flat_multi_order_mixture(shared):
    r = [3, 3] if shared else [2, 3]
    model, layer = one_layer(
        num_experts=[4, 4], num_active=[2, 2], expert_ranks=r, init="eq_1_layer", expert_act="identity",
        activation_position="all", shared_expert_pool=shared, router_dim=6, router_down_dim=5,
    )
    cfg = model.peft_config["default"]
    ex = layer.smore_experts["default"]
    s, d1 = 4, 4 * r[0]
    d2 = d1 if shared else d1 + 4 * r[1]
    # the init (Prop 3.2): B_l^i = I_r in rows [i r, (i + 1) r), W_1 = [0; I_{d_1}], P = 0, biases 0
    for l, B in enumerate(ex.B):
        for i in range(s):
            expected = torch.zeros(B.shape[1], r[l])
            expected[i * r[l] : (i + 1) * r[l]] = torch.eye(r[l])
            assert torch.equal(B[i], expected)
    assert torch.equal(ex.W_1, torch.cat([torch.zeros(d2 - d1, d1), torch.eye(d1)]))
    zero = ["P", "P_bias", "W_bias_1"] + [f"{n}_{k}" for n in ("A_bias", "B_bias") for k in range(len(ex.B))]
    for name in zero:
        assert not getattr(ex, name).any(), name
    with torch.no_grad():
        ex.P.copy_(torch.randn_like(ex.P))
    x = torch.randn(6, 12)
    prm = raw(layer)
    A0 = prm["ex.A_0"]
    A1 = prm["ex.A_0"] if shared else prm["ex.A_1"]
    expected = []
    for xt in x.double():
        tree = route_tree(prm, cfg, xt, 1, prm["ro.down_weight"] @ xt + prm["ro.down_bias"])
        # h_2 = [sum_i alpha_1^i e_i (x) A_1^i x ; sum_i alpha_1^i sum_{j child of i} alpha_0^{ij} e_j (x) A_0^j x]
        top = torch.zeros(s, r[1], dtype=torch.float64)  # layer-1 experts, weighted by their alpha
        bottom = torch.zeros(s, r[0], dtype=torch.float64)  # layer-0 experts, weighted by the products along the path
        for i, a1, children in tree:
            top[i] += a1 * (A1[i] @ xt)
            for j, a0, _ in children:
                bottom[j] += a1 * a0 * (A0[j] @ xt)
        h = (top + bottom).reshape(-1) if shared else torch.cat([top.reshape(-1), bottom.reshape(-1)])
        expected.append(prm["ex.P"] @ h)
    expected = torch.stack(expected)
    model.eval()
    with torch.no_grad():
        got = layer.adapter_delta("default", x, None)[0]
        model_delta = model(x) - layer.get_base_layer()(x)
    torch.testing.assert_close(model_delta, got, rtol=0, atol=1e-6)  # the model adds the layer's delta
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- 4. the full tree, every variant
TREE_CASES = {
    "all": dict(activation_position="all"),
    "child": dict(activation_position="child"),
    "child_v2": dict(activation_position="child_v2"),
    "shared_pool": dict(shared_expert_pool=True, num_experts=[3, 3], expert_ranks=[2, 2], num_active=[2, 1]),
    "alpha_per_layer": dict(alpha=[4.0, 6.0]),
    "dense": dict(gate_type="dense"),
    "noisy_topk_eval": dict(gate_type="noisy_topk", num_active=[2, 1]),
    "no_bias_relu": dict(expert_bias=False, expert_act="relu", router_act="tanh"),
    "three_layers": dict(num_experts=[3, 3, 2], num_active=[2, 1, 2], expert_ranks=[2, 1, 2]),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_tree_forward_matches_a_hand_written_reference(case):
    kw = dict(num_experts=[4, 3], num_active=[2, 2], expert_ranks=[2, 3], gate_type="switch", expert_act="tanh",
              router_dim=5, router_down_dim=6)  # fmt: skip
    kw.update(TREE_CASES[case])
    model, layer = one_layer(**kw)
    cfg = model.peft_config["default"]
    randomise(layer, seed=11)
    model.eval()
    x = torch.randn(2, 3, 12)  # a (batch, seq, in) input: the layer keeps the leading shape
    with torch.no_grad():
        got, aux, _ = layer.adapter_delta("default", x, None)
        model_delta = model(x) - layer.get_base_layer()(x)
    torch.testing.assert_close(model_delta, got, rtol=0, atol=1e-6)
    assert got.shape == (2, 3, 7) and aux is None  # no statistics asked for
    expected = reference_delta(layer, cfg, x.reshape(6, 12)).reshape(2, 3, 7)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_tree_reference_is_sensitive_to_the_variant():
    """The variants really differ (so the reference test above cannot pass by accident)."""
    outs = {}
    for pos in ("all", "child", "child_v2"):
        _, layer = one_layer(num_experts=[4, 3], num_active=[2, 2], expert_ranks=[2, 3], activation_position=pos)
        randomise(layer, seed=11)
        with torch.no_grad():
            outs[pos] = layer.eval().adapter_delta("default", torch.ones(3, 12), None)[0]
    assert not torch.allclose(outs["all"], outs["child"], atol=1e-3)
    assert not torch.allclose(outs["child"], outs["child_v2"], atol=1e-3)


# -------------------------------------------------------------------------------- 5. trainable parameters
def spec_count(n_in, n_out, s, r, m, down, gate="switch", bias=True, shared=False):
    """smore.md: experts sum_l s_l r_l (in + d_{l+1}) + sum_{l>=1} d_{l+1} d_l + out d_L; biases sum_l s_l (r_l +
    d_{l+1}) + sum_{l>=1} d_{l+1} + out; router (in + 1) d_down + sum_l [(c_l + 1) m + (m + 1) m + s_l m (+ s_l c_l
    noisy)], c_l = d_down + (L - 1 - l) m; S'MoRE#: one pool (A, B once), d_l = s r."""
    L = len(s)
    d = [0] + ([s[0] * r[0]] * L if shared else [sum(s[k] * r[k] for k in range(l + 1)) for l in range(L)])
    pool = [0] if shared else range(L)
    experts = sum(s[l] * r[l] * (n_in + d[l + 1]) for l in pool) + sum(d[l + 1] * d[l] for l in range(1, L))
    experts += n_out * d[L]
    if bias:
        experts += sum(s[l] * (r[l] + d[l + 1]) for l in pool) + sum(d[l + 1] for l in range(1, L)) + n_out
    router = (n_in + 1) * down
    for l in range(L):
        c = down + (L - 1 - l) * m
        router += (c + 1) * m + (m + 1) * m + s[l] * m + (s[l] * c if gate == "noisy_topk" else 0)
    return experts, router


def count(module, prefix):
    return sum(p.numel() for n, p in module.named_parameters() if p.requires_grad and prefix in n)


def test_parameter_count_of_the_papers_smollm2_example():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = nn.Linear(576, 1536, bias=False)

        def forward(self, x):
            return self.up_proj(x)

    model = get_peft_model(Block(), SmoreConfig(
        target_modules=["up_proj"], num_experts=[4, 4], num_active=[2, 2], expert_ranks=[4, 4], router_dim=32,
        router_down_dim=32))  # fmt: skip
    layer = model.base_model.model.up_proj
    assert count(layer, "smore_experts") == 70_656
    assert count(layer, "smore_router") == 23_968
    assert count(model, "") == 94_624 == model.get_nb_trainable_parameters()[0]
    assert spec_count(576, 1536, [4, 4], [4, 4], 32, 32) == (70_656, 23_968)
    assert not layer.get_base_layer().weight.requires_grad


@pytest.mark.parametrize("variant", [
    dict(),
    dict(gate_type="noisy_topk", num_active=[1, 2]),
    dict(expert_bias=False),
    dict(shared_expert_pool=True, num_experts=[3, 3, 3], expert_ranks=[2, 2, 2], num_active=[2, 1, 2]),
    dict(shared_expert_pool=True, num_experts=[3, 3], expert_ranks=[2, 2], gate_type="noisy_topk", expert_bias=False),
    dict(num_experts=[2, 5, 3], expert_ranks=[1, 2, 4], num_active=[1, 2, 2]),
], ids=["default", "noisy_topk", "no_bias", "shared_pool", "shared_noisy_no_bias", "three_layers"])  # fmt: skip
def test_parameter_count_matches_the_spec_formula(variant):
    kw = dict(num_experts=[4, 3], num_active=[2, 2], expert_ranks=[2, 3], router_dim=5, router_down_dim=6)
    kw.update(variant)
    model, layer = one_layer(n_in=12, n_out=7, **kw)
    cfg = model.peft_config["default"]
    experts, router = spec_count(
        12, 7, cfg.num_experts, cfg.expert_ranks, 5, 6, cfg.gate_type, cfg.expert_bias, cfg.shared_expert_pool
    )
    assert (count(layer, "smore_experts"), count(layer, "smore_router")) == (experts, router)
    assert model.get_nb_trainable_parameters()[0] == experts + router == cfg.trainable_parameters(12, 7)


# --------------------------------------------------------------------------------------- 6. no merge; unload
def test_merging_is_refused_with_the_specs_message():
    base = MODELS["llama"].make(seed=0)
    model = get_peft_model(base, SmoreConfig(task_type="CAUSAL_LM", init="normal"))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    exact = "^" + __import__("re").escape(MERGE_MESSAGE) + "$"
    with pytest.raises(ValueError, match=exact):
        model.merge_adapter()
    with pytest.raises(ValueError, match=exact):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=exact):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(ValueError, match=exact):
        layer.get_delta_weight("default")
    with pytest.raises(ValueError, match=exact):
        layer.merge()
    # nothing was changed by the refused merges: still an S'MoRE model
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj, SmoreLayer) and not layer.merged


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_disable_adapter_and_unload_give_the_exact_base(kind):
    spec = MODELS[kind]
    base = spec.make(seed=0)
    reference = copy.deepcopy(base)
    batch = spec.batch_with_labels(batch=2)
    model = get_peft_model(base, SmoreConfig(task_type="CAUSAL_LM", init="normal"))
    model.train()
    reference.train()
    ref_out = reference(**batch)
    out = model(**batch)
    assert not torch.allclose(out.logits, ref_out.logits, atol=1e-4)
    with model.disable_adapter():
        disabled = model(**batch)
    assert torch.equal(disabled.logits, ref_out.logits)
    assert torch.equal(disabled.loss, ref_out.loss)  # no auxiliary loss either
    unloaded = model.unload()
    assert not any(isinstance(m, SmoreLayer) for m in unloaded.modules())
    ref_params = dict(reference.named_parameters())
    got_params = dict(unloaded.named_parameters())
    assert got_params.keys() == ref_params.keys()
    for name, p in got_params.items():
        assert torch.equal(p, ref_params[name]), name
    for (n1, m1), (n2, m2) in zip(unloaded.named_modules(), reference.named_modules()):
        assert n1 == n2 and type(m1) is type(m2)
    again = unloaded(**batch)  # the loss hooks are gone too
    assert torch.equal(again.logits, ref_out.logits) and torch.equal(again.loss, ref_out.loss)


# ---------------------------------------------------------------------------------------------- 7. bad input
BAD = [
    (dict(num_active=[2]), r"SmoreConfig\.num_active has 1 entries but num_experts has 2"),
    (dict(expert_ranks=[2, 2, 2]), r"SmoreConfig\.expert_ranks has 3 entries"),
    (dict(num_experts=[]), r"SmoreConfig\.num_experts must be a non-empty list"),
    (dict(gate_type="noisy_topk", num_active=[4, 2]), r"SmoreConfig\.num_active\[0\]=4 with num_experts\[0\]=4.*noisy"),
    (dict(gate_type="noisy_topk", num_active=[2, 5]), r"SmoreConfig\.num_active\[1\]=5 with num_experts\[1\]=4"),
    (dict(num_active=[5, 2]), r"SmoreConfig\.num_active\[0\]=5 is more than num_experts\[0\]=4"),
    (dict(num_active=[0, 2]), r"SmoreConfig\.num_active\[0\] must be an integer >= 1, got 0"),
    (dict(expert_ranks=[0, 2]), r"SmoreConfig\.expert_ranks\[0\] must be an integer >= 1, got 0"),
    (dict(expert_ranks=[2, -1]), r"SmoreConfig\.expert_ranks\[1\] must be an integer >= 1, got -1"),
    (dict(num_experts=[0, 4]), r"SmoreConfig\.num_experts\[0\] must be an integer >= 1, got 0"),
    (dict(expert_ranks=[2, 2.5]), r"SmoreConfig\.expert_ranks\[1\] must be an integer"),
    (dict(gate_type="top2"), r"SmoreConfig\.gate_type='top2' is not one of 'switch', 'noisy_topk', 'dense'"),
    (dict(init="zeros"), r"SmoreConfig\.init='zeros' is not one of"),
    (dict(expert_act="swish"), r"SmoreConfig\.expert_act='swish' is not one of"),
    (dict(router_act="elu"), r"SmoreConfig\.router_act='elu'"),
    (dict(activation_position="parent"), r"SmoreConfig\.activation_position='parent'"),
    (dict(aux_loss_mode="sum"), r"SmoreConfig\.aux_loss_mode='sum'"),
    (dict(shared_expert_pool=True, num_experts=[4, 3]), r"SmoreConfig\.shared_expert_pool=True.*num_experts=\[4, 3\]"),
    (dict(shared_expert_pool=True, expert_ranks=[2, 4]), r"SmoreConfig\.shared_expert_pool=True.*ranks=\[2, 4\]"),
    (dict(alpha=[8.0]), r"SmoreConfig\.alpha has 1 entries but num_experts has 2"),
    (dict(alpha=[8.0, 0.0]), r"SmoreConfig\.alpha\[1\] must be a number > 0"),
    (dict(alpha=-1.0), r"SmoreConfig\.alpha must be a number > 0"),
    (dict(router_dim=0), r"SmoreConfig\.router_dim must be an integer >= 1"),
    (dict(router_down_dim=-2), r"SmoreConfig\.router_down_dim must be an integer >= 1"),
    (dict(balance_loss_weight=-0.1), r"SmoreConfig\.balance_loss_weight must be a number >= 0"),
]


@pytest.mark.parametrize("bad,match", BAD, ids=[m.split("\\.")[1][:24] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        SmoreConfig(**bad)


def test_borderline_configs_are_accepted():
    assert SmoreConfig(num_active=[4, 4]).fanouts() == [4, 4]  # switch: fan-out = experts is fine
    assert SmoreConfig(gate_type="noisy_topk", num_active=[3, 3]).fanouts() == [3, 3]
    assert SmoreConfig(gate_type="dense", num_active=[9, 9]).fanouts() == [4, 4]  # ignored by the dense gate
    assert SmoreConfig(num_experts=4, num_active=2, expert_ranks=8).widths() == [0, 32]  # one layer, ints
    shared = SmoreConfig(shared_expert_pool=True, num_experts=[3] * 3, num_active=[2] * 3, expert_ranks=[2] * 3)
    assert shared.widths() == [0, 6, 6, 6]


def _save(tmp_path, hidden=32, **cfg):
    base = MODELS["llama"].make(seed=0, hidden=hidden)
    model = get_peft_model(base, SmoreConfig(task_type="CAUSAL_LM", init="normal", seed=4, **cfg))
    model.save_pretrained(tmp_path)
    return model


def test_adapter_round_trip(tmp_path):
    model = _save(tmp_path, num_experts=[4, 3], expert_ranks=[2, 3]).eval()
    inputs = lm_batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        loaded = PeftModel.from_pretrained(MODELS["llama"].make(seed=0), tmp_path).eval()
        assert torch.equal(loaded(**inputs).logits, expected)


def test_loading_onto_another_base_is_a_clear_error(tmp_path):
    _save(tmp_path, hidden=32)
    other = MODELS["llama"].make(seed=0, hidden=48)
    with pytest.raises(ValueError, match=r"has shape \(\d+(, \d+)*\), but this model's has .*another base model"):
        PeftModel.from_pretrained(other, tmp_path)


def test_loading_with_another_smore_shape_is_a_clear_error(tmp_path):
    _save(tmp_path, expert_ranks=[8, 8])
    targets = ["gate_proj", "up_proj", "down_proj"]
    other_cfg = SmoreConfig(task_type="CAUSAL_LM", expert_ranks=[4, 4], target_modules=targets)
    with pytest.raises(ValueError, match=r"has shape \(\d+(, \d+)*\).*another base model.*another S'MoRE shape"):
        PeftModel.from_pretrained(MODELS["llama"].make(seed=0), tmp_path, config=other_cfg)


# ------------------------------------------------------------------------------- 8. several adapters side by side
def _two_adapters(kind="llama"):
    base = MODELS[kind].make(seed=0)
    kw = dict(task_type="CAUSAL_LM", init="normal", num_experts=[4, 3], expert_ranks=[2, 3])
    model = get_peft_model(base, SmoreConfig(seed=1, **kw), adapter_name="a")
    model.add_adapter("b", SmoreConfig(seed=2, gate_type="noisy_topk", num_active=[1, 2], **kw))
    return model.eval()


def test_mixed_batch_equals_per_adapter_runs():
    model = _two_adapters()
    inputs = lm_batch(batch=5)
    names = ["a", "__base__", "b", "a", "b"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
        per = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            per[name] = model(**inputs).logits
        with model.disable_adapter():
            per["__base__"] = model(**inputs).logits
    assert not torch.allclose(per["a"], per["b"], atol=1e-4)
    assert not torch.allclose(per["a"], per["__base__"], atol=1e-4)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per[name][row], rtol=1e-5, atol=1e-6)


def test_several_active_adapters_add_their_deltas():
    model = _two_adapters()
    model.base_model.set_adapter(["a", "b"])
    assert model.base_model.active_adapters == ["a", "b"]
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert layer.active_adapters == ["a", "b"]
    cfg_a, cfg_b = model.peft_config["a"], model.peft_config["b"]
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        base = layer.get_base_layer()(x)
    expected = base.double() + reference_delta(layer, cfg_a, x, "a") + reference_delta(layer, cfg_b, x, "b")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    delta_a = reference_delta(layer, cfg_a, x, "a")
    assert not torch.allclose(got.double(), base.double() + delta_a, atol=1e-4)  # b really contributes
