"""S'MoRE's load-balance loss: the gates' auxiliary losses against hand-written formulas of the spec, padding left
out of the statistics, how the loss reaches the gradient (add_to_loss, inject, through the logits), and gradient
checkpointing neither counting it twice nor changing a gradient.

The references are written here from /work/shared/design/methods/smore.md (loops over rows, Shazeer's load
estimate re-derived from the same noise), not with the library's routing helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_ext import SmoreConfig
from peft_ext.testing.models import MODELS
from peft_ext.tuners.smore import SmoreLayer
from peft_ext.tuners.smore import routing

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


ROUTER_ACTS = {"relu": torch.relu, "tanh": torch.tanh, "identity": lambda t: t}


# ------------------------------------------------------------------------------------------ 9. gate formulas
def _gate_inputs(T=5, R=3, m=4, s=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, R, m, generator=g, dtype=torch.float64)
    keys = torch.randn(s, m, generator=g, dtype=torch.float64)
    rows = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)[:T, None].expand(T, R).contiguous()
    return z, keys, rows


def _valid(rows):
    return [(t, r) for t in range(rows.shape[0]) for r in range(rows.shape[1]) if rows[t, r] > 0]


def _cv2(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # unbiased
    return var / mean**2


@pytest.mark.parametrize("fanout", [1, 2, 3])
def test_switch_gate_aux_and_statistics(fanout):
    z, keys, rows = _gate_inputs()
    s, gamma = keys.shape[0], 0.3
    out = routing.switch_gate(z, keys, fanout, gamma, rows, stats=True)
    valid = _valid(rows)
    n = len(valid)
    frac, pbar, ent = [0.0] * s, [0.0] * s, 0.0
    for t in range(z.shape[0]):
        for r in range(z.shape[1]):
            logits = [float(z[t, r] @ keys[e]) for e in range(s)]
            mx = max(logits)
            ex = [math.exp(v - mx) for v in logits]
            pi = [v / sum(ex) for v in ex]
            chosen = sorted(range(s), key=lambda e: -pi[e])[:fanout]
            w = [pi[e] for e in chosen]
            if fanout > 1:
                w = [v / sum(w) for v in w]
            assert out.idx[t, r].tolist() == chosen
            # (the gate takes its softmax in float32, as for bf16 inputs)
            torch.testing.assert_close(out.alpha[t, r], torch.tensor(w, dtype=torch.float64), rtol=1e-6, atol=1e-7)
            assert torch.equal(out.keys[t, r], keys[chosen])
            if (t, r) in valid:  # padding rows (rows = 0) are not counted
                for e in chosen:
                    frac[e] += 1 / n
                for e in range(s):
                    pbar[e] += pi[e] / n
                ent += -sum(p * math.log(p) for p in pi) / n
    assert abs(sum(frac) - fanout) < 1e-12  # sum_e frac_e = f
    expected = gamma * s * sum(f * p for f, p in zip(frac, pbar))
    assert out.aux.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(out.load, torch.tensor(frac, dtype=torch.float64) / fanout)
    assert out.entropy.item() == pytest.approx(ent, rel=1e-6)
    # the padded rows really matter: all rows counted gives another loss
    every = routing.switch_gate(z, keys, fanout, gamma, torch.ones_like(rows), stats=True)
    assert abs(every.aux.item() - expected) > 1e-4
    # no statistics in eval
    assert routing.switch_gate(z, keys, fanout, gamma, rows, stats=False).aux is None


def test_dense_gate_weights_every_expert_and_has_no_aux():
    z, keys, rows = _gate_inputs()
    out = routing.dense_gate(z, keys, rows, stats=True)
    assert out.aux is None
    pi = torch.exp(z @ keys.T) / torch.exp(z @ keys.T).sum(-1, keepdim=True)
    torch.testing.assert_close(out.alpha, pi)
    assert out.idx[2, 1].tolist() == list(range(keys.shape[0]))
    valid = torch.stack([pi[t, r] for t, r in _valid(rows)])
    torch.testing.assert_close(out.load, valid.mean(0))


def _phi(v):
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


def _noisy_reference(z, q, keys, noise_w, fanout, gamma, eps, rows, noise):
    """Shazeer et al. (2017) as the spec: g = cos(z, K) (+ noise * (softplus(q N^T) + eps) in training); alpha =
    softmax over the f selected (the raw logit for f = 1); importance_e = sum of the valid rows' alpha_e; load_e =
    sum over valid rows of P(e stays in the top f under fresh noise) (training) or the pick counts (eval);
    aux = gamma (cv^2(importance) + cv^2(load))."""
    T, R, _ = z.shape
    s = keys.shape[0]
    importance, load = [0.0] * s, [0.0] * s
    picks = []
    for t in range(T):
        for r in range(R):
            zn = z[t, r] / z[t, r].norm()
            clean = [float(zn @ (keys[e] / keys[e].norm())) for e in range(s)]
            if noise is None:
                logits = clean
            else:
                std = [math.log1p(math.exp(float(q[t, r] @ noise_w[e]))) + eps for e in range(s)]
                logits = [clean[e] + float(noise[t, r, e]) * std[e] for e in range(s)]
            order = sorted(range(s), key=lambda e: -logits[e])
            chosen = order[:fanout]
            sel = [logits[e] for e in chosen]
            if fanout > 1:
                mx = max(sel)
                w = [math.exp(v - mx) / sum(math.exp(u - mx) for u in sel) for v in sel]
            else:
                w = sel
            picks.append((chosen, w))
            if rows[t, r] == 0:
                continue
            for e, a in zip(chosen, w):
                importance[e] += a
            if noise is None:
                for e in chosen:
                    load[e] += 1.0
            else:
                thr_in, thr_out = logits[order[fanout]], logits[order[fanout - 1]]
                for e in range(s):
                    thr = thr_in if logits[e] > thr_in else thr_out
                    load[e] += _phi((clean[e] - thr) / std[e])
    return picks, importance, load, gamma * (_cv2(importance) + _cv2(load))



@pytest.mark.parametrize("fanout,training", [
    pytest.param(1, False, id="f1-eval"),
    pytest.param(2, False, id="f2-eval"),
    pytest.param(1, True, id="f1-train"),
    pytest.param(2, True, id="f2-train"),
])  # fmt: skip
def test_noisy_topk_gate_aux_is_shazeers_cv2_loss(fanout, training):
    z, keys, rows = _gate_inputs(seed=3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(*z.shape[:2], 6, generator=g, dtype=torch.float64)
    noise_w = torch.randn(keys.shape[0], 6, generator=g, dtype=torch.float64) * 0.5
    gamma, eps = 0.2, 1e-2
    torch.manual_seed(77)
    out = routing.noisy_topk_gate(z, q, keys, noise_w, fanout, gamma, eps, rows, training=training, stats=True)
    noise = None
    if training:
        torch.manual_seed(77)  # the same draw: one standard normal per (token, row, expert)
        noise = torch.randn(*z.shape[:2], keys.shape[0], dtype=torch.float64)
    picks, importance, load, expected = _noisy_reference(z, q, keys, noise_w, fanout, gamma, eps, rows, noise)
    T, R = z.shape[:2]
    for i, (chosen, w) in enumerate(picks):
        t, r = divmod(i, R)
        assert out.idx[t, r].tolist() == chosen
        torch.testing.assert_close(out.alpha[t, r], torch.tensor(w, dtype=torch.float64), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out.keys[t, r], keys[chosen] / keys[chosen].norm(dim=-1, keepdim=True))
    assert out.aux.item() == pytest.approx(expected, rel=1e-6)  # cv^2 in float32
    counts = torch.zeros(keys.shape[0], dtype=torch.float64)
    for i, (chosen, _) in enumerate(picks):
        if rows[divmod(i, R)] > 0:
            counts[chosen] += 1
    torch.testing.assert_close(out.load, counts / counts.sum())


def test_noisy_topk_eval_load_counts_a_top1_pick_with_a_negative_score():
    z = torch.tensor([[[-1.0, -1.0]]])  # every cosine score is negative: expert 0 (the least negative) is picked
    keys = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.0]])
    rows = torch.ones(1, 1)
    out = routing.noisy_topk_gate(z, z, keys, torch.zeros(3, 2), 1, 1.0, 1e-2, rows, training=False, stats=True)
    assert out.idx.flatten().tolist() == [0] and out.alpha.item() < 0
    assert out.load.tolist() == [1.0, 0.0, 0.0]
    # importance (-0.774, 0, 0) and load (1, 0, 0): cv^2 = 3 each (unbiased variance over 3 experts)
    assert out.aux.item() == pytest.approx(6.0, rel=1e-5)


def test_noisy_topk_training_aux_gradient_reaches_the_noise_weights():
    """The smooth load estimate is differentiable in the noise weights N (why Shazeer uses it): the gradient of the
    gate's aux equals the finite difference of the hand-written reference (same noise)."""
    z, keys, rows = _gate_inputs(seed=5)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(*z.shape[:2], 6, generator=g, dtype=torch.float64)
    noise_w = (torch.randn(keys.shape[0], 6, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    torch.manual_seed(9)
    out = routing.noisy_topk_gate(z, q, keys, noise_w, 2, 1.0, 1e-2, rows, training=True, stats=True)
    (grad,) = torch.autograd.grad(out.aux, noise_w)
    torch.manual_seed(9)
    noise = torch.randn(*z.shape[:2], keys.shape[0], dtype=torch.float64)
    h = 1e-6
    for e, k in [(0, 0), (2, 3), (4, 5)]:
        plus, minus = noise_w.detach().clone(), noise_w.detach().clone()
        plus[e, k] += h
        minus[e, k] -= h
        f_plus = _noisy_reference(z, q, keys, plus, 2, 1.0, 1e-2, rows, noise)[3]
        f_minus = _noisy_reference(z, q, keys, minus, 2, 1.0, 1e-2, rows, noise)[3]
        assert grad[e, k].item() == pytest.approx((f_plus - f_minus) / (2 * h), rel=1e-4, abs=1e-8)
    assert grad.abs().max() > 1e-4


# ---------------------------------------------------------------------- a model-level reference of the aux
def smore_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SmoreLayer)]


def capture_inputs(model):
    """Forward hooks that keep each S'MoRE layer's input (with its graph); returns (store, handles)."""
    store, handles = [], []
    for _, layer in smore_layers(model):
        handles.append(layer.register_forward_hook(lambda mod, args, out: store.append((mod, args[0]))))
    return store, handles


def reference_switch_aux(layer: SmoreLayer, cfg: SmoreConfig, x, mask, adapter="default"):
    """Top-down switch routing of one adapted layer from the spec (router MLPs, softmax over K_l z, top-f,
    children's queries = [query, chosen key]), and sum_l gamma s_l sum_e frac_e pbar_e over the valid tokens;
    also each S'MoRE layer's load (frac_e / f_l). Differentiable in the router's parameters and in x."""
    p = dict(layer.smore_router[adapter].named_parameters())
    act = ROUTER_ACTS[cfg.router_act]
    x2 = x.reshape(-1, x.shape[-1])
    valid = torch.ones(x2.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    q = (x2 @ p["down_weight"].T + p["down_bias"])[:, None, :]
    total, loads = 0.0, {}
    for l in reversed(range(len(cfg.num_experts))):
        z = act(q @ p[f"mlp_in_{l}_weight"].T + p[f"mlp_in_{l}_bias"]) @ p[f"mlp_out_{l}_weight"].T
        z = z + p[f"mlp_out_{l}_bias"]
        K = p[f"keys_{l}"]
        s, f = K.shape[0], cfg.num_active[l]
        pi = torch.softmax(z @ K.T, dim=-1)  # (T, R, s)
        idx = torch.argsort(pi.detach(), dim=-1, descending=True)[..., :f]
        chosen = torch.zeros_like(pi).scatter(-1, idx, 1.0)
        n_rows = valid.sum() * pi.shape[1]
        frac = chosen[valid].sum(dim=(0, 1)) / n_rows
        pbar = pi[valid].sum(dim=(0, 1)) / n_rows
        total = total + cfg.balance_loss_weight * s * (frac * pbar).sum()
        loads[l] = (frac / f).detach()
        if l > 0:
            T, R = idx.shape[:2]
            q = torch.cat([q[:, :, None, :].expand(T, R, f, q.shape[-1]), K[idx]], dim=-1).reshape(T, R * f, -1)
    return total, loads


def lm_loss(logits, labels):
    """The causal LM loss by hand: mean cross-entropy of the next token over the labels that are not -100."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100)


def make(**over):
    kw = dict(
        task_type="CAUSAL_LM", init="normal", seed=1, num_experts=[4, 3], num_active=[2, 2], expert_ranks=[2, 3],
        router_dim=8, router_down_dim=6, balance_loss_weight=0.5,
    )
    kw.update(over)
    return get_peft_model(MODELS["llama"].make(seed=0), SmoreConfig(**kw))


def padded_batch():
    ids = MODELS["llama"].inputs(batch=3, seed=5)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(got, expected, atol=1e-6, rtol=1e-5):
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------- 10. padding left out
def test_padding_is_left_out_of_the_layer_statistics():
    """adapter_delta with a token mask = the same layer on the unpadded tokens only (aux and per-gate load)."""
    model = make()
    layer = smore_layers(model)[0][1]
    model.train()
    x = torch.randn(3, 10, layer.in_features)
    mask = padded_batch()["attention_mask"]
    _, aux_masked, stats_masked = layer.adapter_delta("default", x, mask, stats=True)
    _, aux_kept, stats_kept = layer.adapter_delta("default", x[mask.bool()], None, stats=True)
    _, aux_all, _ = layer.adapter_delta("default", x, None, stats=True)
    torch.testing.assert_close(aux_masked, aux_kept, rtol=1e-6, atol=1e-8)
    assert abs(aux_masked.item() - aux_all.item()) > 1e-4  # the padded rows would change it
    for a, b in zip(stats_masked, stats_kept):
        assert a["layer"] == b["layer"]
        torch.testing.assert_close(a["load"], b["load"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a["entropy"], b["entropy"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask_padding", [True, False])
def test_model_statistics_and_loss_leave_padding_out(mask_padding):
    model = make(balance_mask_padding=mask_padding).train()
    cfg = model.peft_config["default"]
    batch = padded_batch()
    store, handles = capture_inputs(model)
    out = model(**batch)
    for h in handles:
        h.remove()
    assert len(store) == 6
    names = {id(m): n for n, m in smore_layers(model)}
    stats = model.base_model.smore_stats()
    assert set(stats["layers"]) == {f"{names[id(m)].removeprefix('base_model.model.')}:default" for m, _ in store}
    total = 0.0
    with torch.no_grad():
        for layer, x in store:
            keep = batch["attention_mask"] if mask_padding else None
            aux, loads = reference_switch_aux(layer, cfg, x, keep)
            total = total + aux
            if mask_padding:  # = the same tokens with the padded rows removed
                aux_removed, _ = reference_switch_aux(layer, cfg, x[batch["attention_mask"].bool()], None)
                torch.testing.assert_close(aux, aux_removed, rtol=1e-6, atol=1e-8)
            got = {d["layer"]: d["load"] for d in stats["layers"][f"{layer.smore_name}:default"]}
            assert got.keys() == loads.keys()
            for l in loads:
                torch.testing.assert_close(got[l].double(), loads[l].double(), rtol=1e-6, atol=1e-7)
        unmasked = sum(reference_switch_aux(layer, cfg, x, None)[0] for layer, x in store)
    assert stats["aux_loss"] == pytest.approx(float(total), rel=1e-5)
    expected = lm_loss(out.logits.detach(), batch["labels"]) + total
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-6, atol=1e-6)
    if mask_padding:
        assert abs(float(unmasked) - float(total)) > 1e-3


# ----------------------------------------------------------------------------------- 11. how the loss trains
def test_add_to_loss_adds_every_layers_aux_in_training_only():
    model = make()
    cfg = model.peft_config["default"]
    batch = MODELS["llama"].batch_with_labels(batch=2)
    model.train()
    store, handles = capture_inputs(model)
    out = model(**batch)
    for h in handles:
        h.remove()
    aux = sum(reference_switch_aux(layer, cfg, x.detach(), None)[0] for layer, x in store)
    assert aux.item() > 1e-3
    expected = lm_loss(out.logits.detach(), batch["labels"]) + aux.detach()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-6, atol=1e-6)
    model.eval()
    with torch.no_grad():
        out_eval = model(**batch)
    torch.testing.assert_close(out_eval.loss, lm_loss(out_eval.logits, batch["labels"]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out_eval.logits, out.logits.detach(), rtol=0, atol=1e-6)  # switch: no noise


@pytest.mark.parametrize("mode", ["none", "inject"])
def test_inject_and_none_leave_outputs_loss_alone(mode):
    model = make(aux_loss_mode=mode).train()
    batch = MODELS["llama"].batch_with_labels(batch=2)
    out = model(**batch)
    torch.testing.assert_close(out.loss.detach(), lm_loss(out.logits.detach(), batch["labels"]), rtol=1e-6, atol=1e-7)


def test_dense_gate_adds_no_aux():
    model = make(gate_type="dense").train()
    batch = MODELS["llama"].batch_with_labels(batch=2)
    out = model(**batch)
    torch.testing.assert_close(out.loss.detach(), lm_loss(out.logits.detach(), batch["labels"]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
def test_inject_gives_the_gradients_of_add_to_loss(gate):
    over = dict(gate_type=gate, num_active=[2, 1] if gate == "noisy_topk" else [2, 2])
    batch = MODELS["llama"].batch_with_labels(batch=2)
    results = {}
    for mode in ("add_to_loss", "inject", "none"):
        model = make(aux_loss_mode=mode, **over).train()
        torch.manual_seed(3)
        out = model(**batch)
        out.loss.backward()
        results[mode] = (out.loss.detach(), grads(model))
    assert_grads_close(results["inject"][1], results["add_to_loss"][1])
    torch.testing.assert_close(results["inject"][0], results["none"][0], rtol=0, atol=0)  # the plain LM loss
    router = [n for n in results["none"][1] if "smore_router" in n]
    assert any(not torch.allclose(results["none"][1][n], results["inject"][1][n], atol=1e-5) for n in router)


# ------------------------------------------------------------------------------- 12. gradient checkpointing
def _train_step(gc, reentrant, **over):
    model = make(**over).train()
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
    torch.manual_seed(11)  # the noisy gate's noise
    out = model(**padded_batch())  # the recomputation must route with the same token mask
    out.loss.backward()
    return out.loss.detach(), grads(model), model.base_model.smore_stats()["aux_loss"]


@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
@pytest.mark.parametrize("mode", ["add_to_loss", "inject"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_changes_nothing(reentrant, mode, gate):
    over = dict(aux_loss_mode=mode, gate_type=gate, num_active=[2, 1] if gate == "noisy_topk" else [2, 2])
    loss, expected, aux = _train_step(False, reentrant, **over)
    gc_loss, got, gc_aux = _train_step(True, reentrant, **over)
    assert aux > 1e-3
    assert gc_aux == pytest.approx(aux, rel=1e-6)  # counted once
    torch.testing.assert_close(gc_loss, loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(got, expected)


# ------------------------------------------------------------------------- 13. a loss built from the logits
def _dpo_like(logits, ids):
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    return -F.logsigmoid(0.1 * (logp[0] - logp[1]))


def test_loss_from_logits_carries_the_aux_gradient():
    ids = MODELS["llama"].inputs(batch=2, seed=8)
    model = make().train()
    out = model(**ids)
    assert out.loss is None
    _dpo_like(out.logits, ids["input_ids"]).backward()
    got = grads(model)

    reference = make(aux_loss_mode="none").train()
    cfg = reference.peft_config["default"]
    store, handles = capture_inputs(reference)
    ref_out = reference(**ids)
    for h in handles:
        h.remove()
    torch.testing.assert_close(ref_out.logits, out.logits.detach(), rtol=0, atol=0)  # the same weights
    aux = sum(reference_switch_aux(layer, cfg, x, ids["attention_mask"])[0] for layer, x in store)
    (_dpo_like(ref_out.logits, ids["input_ids"]) + aux).backward()
    assert_grads_close(got, grads(reference))

    without = make(aux_loss_mode="none").train()  # and the aux really matters for the router
    _dpo_like(without(**ids).logits, ids["input_ids"]).backward()
    plain = grads(without)
    assert any(not torch.allclose(plain[n], got[n], atol=1e-5) for n in got if "smore_router" in n)



def test_an_in_place_op_on_the_logits_keeps_the_aux_gradient():
    ids = MODELS["llama"].inputs(batch=2, seed=8)
    reference = make().train()
    _dpo_like(reference(**ids).logits / 0.7, ids["input_ids"]).backward()
    model = make().train()
    logits = model(**ids).logits
    logits /= 0.7  # a sampling temperature applied in place (compute_loss_func, custom trainers)
    _dpo_like(logits, ids["input_ids"]).backward()
    assert_grads_close(grads(model), grads(reference))
