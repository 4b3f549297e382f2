"""FineGates gate maths against hand-written float64 references (refs.py): training gates with one noise draw per
layer and forward shared by the whole batch, deterministic evaluation gates, keep probabilities, the "target" and
"l0" sparsity losses, the model's mean over layers, the official kurtosis weighting (jsvir/FineGates model.py),
gate_stats, and the identity at init."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_ext.testing.models import MODELS
from peft_ext.tuners.finegates.layer import gate_values, keep_probability

from .refs import (
    F64, OPEN_AT, config, eval_gate, gated_layers, gated_linear, keep_prob, l0_loss, net, official_kurtosis_loss,
    set_logits, target_loss, train_gate,
)


def _x(shape, seed=3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ training gates
def test_training_gate_is_one_noise_draw_per_forward_replayed_from_the_seed():
    """Train mode: z = clamp(tanh(theta) + eps + 0.5, 0, 1), eps ~ N(0, std^2) drawn once for the layer in this
    forward (rows: m draws, columns: n draws) and shared by every row and token of the batch."""
    std = 0.3
    model = get_peft_model(net(), config(target_modules=["lin"], init_weights=False, gate_noise_std=std)).train()
    layer = gated_layers(model)["lin"]
    w, b = layer.get_base_layer().weight, layer.get_base_layer().bias
    th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
    m, n = th_r.numel(), th_c.numel()
    x = _x((3, 5, n))

    torch.manual_seed(11)
    y = layer(x)
    refs = []
    for order in ("rows_first", "cols_first"):  # the draw order inside a forward is the layer's business
        torch.manual_seed(11)
        first, second = torch.randn(m if order == "rows_first" else n), torch.randn(n if order == "rows_first" else m)
        eps_r, eps_c = (first, second) if order == "rows_first" else (second, first)
        zr, zc = train_gate(th_r, eps_r * std), train_gate(th_c, eps_c * std)
        refs.append(gated_linear(x, w, b, zr, zc))
    errors = [(y.to(F64) - ref).abs().max().item() for ref in refs]
    assert min(errors) < 1e-5, errors
    ref = refs[errors.index(min(errors))]
    assert (ref - gated_linear(x, w, b, eval_gate(th_r), eval_gate(th_c))).abs().max() > 1e-2  # the noise is there

    # a second forward draws again; the same seed replays the same draw
    torch.manual_seed(12)
    assert not torch.allclose(layer(x), y)
    torch.manual_seed(11)
    assert torch.equal(layer(x), y)


def test_training_noise_is_shared_by_every_row_and_token_effective_scaling():
    """With W = I and no bias the layer's output on a batch of ones is z_r * z_c: the effective scaling of every
    (row, token) must be the same vector (one draw per layer and forward), equal to the replayed one."""
    std = 0.3
    model = get_peft_model(net(n_in=24, bias=False), config(target_modules=["lin"], gate_noise_std=std,
                                                            gate_init_mean=0.6))
    layer = gated_layers(model)["lin"]
    with torch.no_grad():
        layer.get_base_layer().weight.copy_(torch.eye(24))
    model.train()
    th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
    torch.manual_seed(4)
    scale = layer(torch.ones(6, 7, 24)).detach()
    per_row_token = scale.reshape(-1, 24)
    assert torch.equal(per_row_token, per_row_token[:1].expand_as(per_row_token))
    assert (per_row_token[0] < 1).any()  # noise 0.3 on gates starting at tanh(0.6)+0.5: some dip below 1
    torch.manual_seed(4)
    e1, e2 = torch.randn(24) * std, torch.randn(24) * std
    candidates = [train_gate(th_r, e1) * train_gate(th_c, e2), train_gate(th_r, e2) * train_gate(th_c, e1)]
    assert min((per_row_token[0].to(F64) - c).abs().max().item() for c in candidates) < 1e-6


def test_training_gates_below_one_only_where_the_noise_crosses_the_open_threshold():
    """At init (theta >= 0.55, tanh(theta) > 0.5) a training gate is < 1 exactly where eps < 0.5 - tanh(theta)."""
    model = get_peft_model(net(n_in=512, n_mid=1024), config(target_modules=["lin"]))  # official 1.0 / 0.1 / 0.1
    layer = gated_layers(model)["lin"].train()
    th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
    assert th_r.min() >= 0.55 and th_c.min() >= 0.55
    dipped = 0
    for seed in range(4):
        torch.manual_seed(seed)
        zr, zc = layer.gates("default")
        torch.manual_seed(seed)
        eps_r, eps_c = torch.randn(th_r.numel()) * 0.1, torch.randn(th_c.numel()) * 0.1
        for z, eps, th in ((zr, eps_r, th_r), (zc, eps_c, th_c)):
            expected_below = eps.to(F64) < 0.5 - torch.tanh(th.detach().to(F64))
            assert torch.equal(z < 1, expected_below)
            assert (z.to(F64) - train_gate(th, eps)).abs().max() < 1e-6
            dipped += int(expected_below.sum())
    assert 0 < dipped < 0.05 * 4 * (512 + 1024)  # rare (about 0.5 % at theta ~ N(1, 0.1)), but it happens


def test_eval_gates_are_deterministic_and_fractional():
    model = get_peft_model(net(), config(target_modules=["lin"], init_weights=False, gate_noise_std=0.5)).eval()
    layer = gated_layers(model)["lin"]
    th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
    set_logits(th_r, torch.linspace(-1.2, 1.2, th_r.numel()))
    zr, zc = layer.gates("default")
    assert (zr.to(F64) - eval_gate(th_r)).abs().max() < 1e-7
    assert (zc.to(F64) - eval_gate(th_c)).abs().max() < 1e-7
    assert ((zr > 0) & (zr < 1)).any() and (zr == 0).any() and (zr == 1).any()
    # closed exactly at/below -atanh(0.5), open exactly at/above +atanh(0.5)
    set_logits(th_r[:4], [-OPEN_AT - 1e-3, -OPEN_AT + 1e-3, OPEN_AT - 1e-3, OPEN_AT + 1e-3])
    zr, _ = layer.gates("default")
    assert zr[0] == 0 and 0 < zr[1] < 1e-2 and 0.99 < zr[2] < 1 and zr[3] == 1
    x = _x((2, 4, th_c.numel()))
    torch.manual_seed(1)
    y1 = model(x)
    torch.manual_seed(2)
    assert torch.equal(model(x), y1)
    base = layer.get_base_layer()
    ref = gated_linear(x, base.weight, base.bias, eval_gate(th_r), eval_gate(th_c))
    assert (layer(x).to(F64) - ref).abs().max() < 1e-5


def test_gate_helpers_match_the_reference():
    """The public helpers gate_values / keep_probability against the hand formulas (fp32 results)."""
    theta = torch.linspace(-3, 3, 101)
    assert (gate_values(theta).to(F64) - eval_gate(theta)).abs().max() < 1e-7
    for sigma in (0.5, 0.8):
        assert (keep_probability(theta, sigma).to(F64) - keep_prob(theta, sigma)).abs().max() < 1e-6
    # the keep probability is bounded by tanh: (Phi(-1), Phi(3)) at sigma 0.5
    p = keep_prob(torch.tensor([-50.0, 50.0]))
    assert abs(p[0] - 0.158655) < 1e-5 and abs(p[1] - 0.998650) < 1e-5


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("sigma,target", [(0.5, 0.4), (0.8, 0.2)])
def test_target_loss_of_a_layer(sigma, target):
    model = get_peft_model(net(), config(init_weights=False, reg_sigma=sigma, target_sparsity=target))
    for name, layer in gated_layers(model).items():
        th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
        loss = layer.sparsity_loss("default")
        assert abs(loss.item() - target_loss(th_r, th_c, target, sigma)) < 1e-6, name
        # the loss is differentiable w.r.t. the logits only
        loss.backward()
        assert th_r.grad is not None and th_c.grad is not None and th_r.grad.abs().sum() > 0


def test_target_loss_with_hand_set_logits():
    """Rows: half closed (-1), half open (+1); columns all at 0: every number written out."""
    model = get_peft_model(net(), config(target_modules=["lin"], init_weights=False, target_sparsity=0.3))
    layer = gated_layers(model)["lin"]
    th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
    set_logits(th_r, torch.tensor([-1.0, 1.0]).repeat(th_r.numel() // 2))
    set_logits(th_c, torch.zeros(th_c.numel()))
    import math

    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    p_closed, p_open = phi((math.tanh(-1) + 0.5) / 0.5), phi((math.tanh(1) + 0.5) / 0.5)
    mean_r, mean_c = (p_closed + p_open) / 2, phi(1.0)
    expected = 0.5 * (abs(mean_r - 0.7) + abs(mean_c - 0.7))
    assert abs(layer.sparsity_loss("default").item() - expected) < 1e-6


def test_l0_loss_is_the_mean_of_all_keep_probabilities():
    model = get_peft_model(net(), config(init_weights=False, sparsity_objective="l0", reg_sigma=0.6))
    for layer in gated_layers(model).values():
        th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
        assert th_r.numel() != th_c.numel()  # a mean of means would differ
        assert abs(layer.sparsity_loss("default").item() - l0_loss(th_r, th_c, 0.6)) < 1e-6


def test_rows_only_layer_losses():
    model = get_peft_model(net(), config(init_weights=False, gate_columns=False, target_sparsity=0.25))
    for layer in gated_layers(model).values():
        assert "default" not in layer.gates_col_logits
        p = keep_prob(layer.gates_row_logits["default"])
        # "target" with one side: |mean p_r - k| (the mean over the sides present)
        assert abs(layer.sparsity_loss("default").item() - abs(p.mean().item() - 0.75)) < 1e-6


def test_model_sparsity_loss_is_the_mean_over_layers():
    spec = MODELS["llama"]
    model = get_peft_model(spec.make(0), config(target_modules=["q_proj", "down_proj", "up_proj"],
                                                init_weights=False, target_sparsity=0.35, task_type="CAUSAL_LM"))
    layers = gated_layers(model)
    assert len(layers) == 6
    per_layer = [target_loss(m.gates_row_logits["default"], m.gates_col_logits["default"], 0.35)
                 for m in layers.values()]
    loss = model.base_model.sparsity_loss()
    assert abs(loss.item() - sum(per_layer) / len(per_layer)) < 1e-6
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("gates_row_logits" in n or "gates_col_logits" in n for n in grads)
    # two active adapters: the mean over (layer, adapter) pairs
    model.add_adapter("b", config(target_modules=["q_proj", "down_proj", "up_proj"], init_weights=False, seed=5,
                                  target_sparsity=0.1))
    model.base_model.set_adapter(["default", "b"])
    both = per_layer + [target_loss(l.gates_row_logits["b"], l.gates_col_logits["b"], 0.1) for l in layers.values()]
    assert abs(model.base_model.sparsity_loss().item() - sum(both) / len(both)) < 1e-6


@pytest.mark.parametrize("tau", [100.0, 0.5])
def test_kurtosis_weighting_matches_the_official_code(tau):
    """kurtosis=True: the layer's loss after a training forward = official SparseLayer (kurt=True) sparsity_loss:
    kappa of mean_{batch,tokens}(x) * W on the open rows / columns, weights softmax(-kappa / tau), weighted sums."""
    model = get_peft_model(net(n_in=16, n_mid=24), config(target_modules=["lin"], init_weights=False, kurtosis=True,
                                                          kurtosis_tau=tau, target_sparsity=0.3))
    layer = gated_layers(model)["lin"]
    th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
    with torch.no_grad():
        th_r[[0, 5, 6]] = -1.0  # closed rows and columns drop out of the weighted sums
        th_c[[2, 3]] = -1.0
        layer.get_base_layer().weight[:, 7] *= 8.0  # an outlier column
    x = _x((3, 5, 16)) + 0.5
    model.train()
    layer(x)
    loss = layer.sparsity_loss("default")
    expected = official_kurtosis_loss(x, layer.get_base_layer().weight, th_r, th_c, 0.3, tau)
    assert abs(loss.item() - expected) < 1e-6
    plain = target_loss(th_r, th_c, 0.3)
    assert abs(expected - plain) > 1e-4  # the weighting changes the number
    loss.backward()  # the weights carry no gradient; the keep probabilities do
    assert th_r.grad[[0, 5, 6]].abs().sum() == 0 and th_r.grad.abs().sum() > 0
    # the weights come from training forwards only: an eval forward on other data leaves them
    model.eval()
    layer(_x((3, 5, 16), seed=9) * 5)
    assert abs(layer.sparsity_loss("default").item() - expected) < 1e-6


def test_kurtosis_off_is_the_plain_mean():
    model = get_peft_model(net(), config(target_modules=["lin"], init_weights=False, target_sparsity=0.3)).train()
    layer = gated_layers(model)["lin"]
    layer(_x((3, 5, 16)))
    th_r, th_c = layer.gates_row_logits["default"], layer.gates_col_logits["default"]
    assert abs(layer.sparsity_loss("default").item() - target_loss(th_r, th_c, 0.3)) < 1e-6


# ------------------------------------------------------------------------------------------- gate_stats
def test_gate_stats_on_hand_set_logits():
    model = get_peft_model(net(n_in=12, n_mid=20, n_out=10), config(init_weights=False, reg_sigma=0.5))
    layers = gated_layers(model)
    lin, lin2 = layers["lin"], layers["lin2"]  # 12 -> 20, 20 -> 10
    rows0 = [-1.0] * 5 + [0.1] * 3 + [1.0] * 12  # 5 closed, 3 fractional (open), 12 open
    cols0 = [-0.6] * 2 + [-0.5] * 1 + [2.0] * 9  # -0.6 < -0.549: closed; -0.5: fractional, open
    rows1 = [-2.0] * 4 + [0.0] * 6
    cols1 = [-1.0] * 6 + [0.7] * 14
    for p, v in ((lin.gates_row_logits, rows0), (lin.gates_col_logits, cols0), (lin2.gates_row_logits, rows1),
                 (lin2.gates_col_logits, cols1)):
        set_logits(p["default"], v)
    stats = model.base_model.gate_stats()
    open_r0, open_c0, open_r1, open_c1 = 15, 10, 6, 14
    assert stats["open_rows"] == pytest.approx((open_r0 + open_r1) / (20 + 10))
    assert stats["open_cols"] == pytest.approx((open_c0 + open_c1) / (12 + 20))
    removable = (20 * 12 - open_r0 * open_c0) + (10 * 20 - open_r1 * open_c1)
    assert stats["removed_params"] == removable == 240 - 150 + 200 - 84
    assert stats["removable_fraction"] == pytest.approx(removable / (240 + 200))
    closed = (20 - open_r0) + (12 - open_c0) + (10 - open_r1) + (20 - open_c1)  # 5 + 2 + 4 + 6
    assert stats["closed_fraction"] == pytest.approx(closed / (20 + 12 + 10 + 20)) and closed == 17
    kr = keep_prob(torch.tensor(rows0 + rows1)).mean().item()
    kc = keep_prob(torch.tensor(cols0 + cols1)).mean().item()
    assert stats["mean_keep_rows"] == pytest.approx(kr, abs=1e-6)
    assert stats["mean_keep_cols"] == pytest.approx(kc, abs=1e-6)
    # per layer: the official "compressed params"
    assert lin.gate_counts("default") == {"rows": 20, "cols": 12, "open_rows": 15, "open_cols": 10,
                                          "removable": 240 - 150}


# ------------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("kind", ["llama", "qwen2_gqa", "gpt2", "bert_cls", "mlp"])
def test_init_is_the_base_bit_for_bit(kind):
    spec = MODELS[kind]
    base = spec.make(0)
    kw = {"target_modules": ["lin0", "lin1", "lin2"] if kind == "mlp" else None}
    model = get_peft_model(spec.make(0), config(task_type=spec.task_type, bias="gates", lora_r=2, seed=None, **kw))
    logits = [p for n, p in model.named_parameters() if "gates_row_logits" in n or "gates_col_logits" in n]
    assert logits and all(p.min() >= 0.55 for p in logits)
    assert all(p.dtype == torch.float32 for p in logits)
    inputs = spec.inputs()
    with torch.no_grad():
        assert torch.equal(spec.run(model.eval(), inputs), spec.run(base, inputs))
    for layer in gated_layers(model).values():
        assert torch.equal(layer.gates_bias["default"], torch.zeros_like(layer.gates_bias["default"]))
        assert not layer.gates_lora_B["default"].weight.any()


def test_init_distribution_and_clip():
    model = get_peft_model(net(n_in=4000, n_mid=6000), config(target_modules=["lin"], gate_init_mean=0.6,
                                                              gate_init_std=0.1))
    layer = gated_layers(model)["lin"]
    th = torch.cat([layer.gates_row_logits["default"], layer.gates_col_logits["default"]]).detach().to(F64)
    assert th.min() == pytest.approx(0.55)  # N(0.6, 0.1) clipped at 0.55: a third of the draws sit on the floor
    frac_floor = (th == th.min()).double().mean().item()
    assert 0.25 < frac_floor < 0.37  # P(N(0.6, 0.1) < 0.55) = Phi(-0.5) = 0.31
    model = get_peft_model(net(n_in=4000, n_mid=6000), config(target_modules=["lin"]))
    th = gated_layers(model)["lin"].gates_row_logits["default"].detach().to(F64)
    assert abs(th.mean().item() - 1.0) < 0.01 and abs(th.std().item() - 0.1) < 0.01


# -------------------------------------------------------------------------------------------- lambda(t)
def test_lambda_schedule():
    """lambda(step) = 0 before sparsity_start_step, then a linear ramp over sparsity_warmup_steps, then constant."""
    cfg = config(sparsity_lambda=50.0, sparsity_start_step=3, sparsity_warmup_steps=4)
    assert [cfg.lambda_at(s) for s in range(9)] == [0.0, 0.0, 0.0, 12.5, 25.0, 37.5, 50.0, 50.0, 50.0]
    cfg = config(sparsity_lambda=2.0, sparsity_start_step=2)
    assert [cfg.lambda_at(s) for s in range(4)] == [0.0, 0.0, 2.0, 2.0]
    assert config().lambda_at(0) == 50.0  # the official default, from the first step
