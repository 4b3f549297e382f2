"""accelerate_lora(group_siblings=True): sibling LoRA layers (q/k/v, gate/up) share one grouped shrink of their
common input (peft_ext/tuners/lora_fused.py `_SiblingGroup`, kernels/lowrank_grouped.py). A tiny Llama built in-process
under PEFT LoRA on every linear, run with Triton's interpreter: gradients with grouping on equal grouping off (fp32:
1e-5 relative; bf16: bf16 rounding) and PEFT's own path, with gradient checkpointing and gradient accumulation too;
the learned consumer set; no input kept alive after the group is consumed; siblings with another input, dropout or
eval mode fall back to their own path."""

import copy
import gc
import warnings
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_ext import accelerate_lora
from peft_ext.tuners import lora_fused

from .accuracy import BF16, FP32, rel_err

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def tiny_llama(dtype=FP32) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def lora_model(dtype=FP32, accelerate=True, group=True, dropout=0.0):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=dropout)
    model = get_peft_model(tiny_llama(dtype), config, autocast_adapter_dtype=False)
    if accelerate:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accelerate_lora(model, group_siblings=group)
    return model.train()


def grads_of(model, steps=1, ids=IDS):
    """Summed gradients of `steps` forward/backward passes (gradient accumulation when steps > 1)."""
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture
def shrinks(monkeypatch):
    """The ranks of each grouped shrink the layers launch (one list of sibling ranks per call)."""
    calls = []
    real = lora_fused.grouped_shrink_with_input

    def spy(x, factors, backend=None):
        calls.append(len(factors))
        return real(x, factors, backend)

    monkeypatch.setattr(lora_fused, "grouped_shrink_with_input", spy)
    return calls


def assert_grads_close(got, want, tol):
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) <= tol, (name, rel_err(got[name], want[name]))


def test_grouped_grads_equal_ungrouped_and_peft_and_consumers_are_learned(shrinks):
    grouped, plain, peft = lora_model(), lora_model(group=False), lora_model(accelerate=False)
    g_plain, g_peft = grads_of(plain), grads_of(peft)
    g1 = grads_of(grouped)
    # first step: every sibling of q/k/v/o (o_proj reads the attention output: computed, never consumed) and gate/up
    assert shrinks == [4, 2, 4, 2]
    g2 = grads_of(grouped)
    assert shrinks[4:] == [3, 2, 3, 2]  # learned: o_proj is no longer computed
    for g in (g1, g2):
        assert_grads_close(g, g_plain, 1e-5)
        assert_grads_close(g, g_peft, 1e-5)
    layer = grouped.base_model.model.model.layers[0]
    attn = layer.self_attn.q_proj.__dict__["_lora_siblings"]
    assert [m for m in attn.members] == [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                         layer.self_attn.o_proj]  # fmt: skip
    assert attn.consumers == {0, 1, 2} and attn.shared is None
    assert "_lora_siblings" not in layer.mlp.down_proj.__dict__  # no sibling with its in_features


def test_grouped_bf16_within_bf16_rounding(shrinks):
    """bf16 end to end through two blocks: grouped and ungrouped gradients both differ from the fp32 model's by the
    bf16 rounding of their own path (the interpreter computes the ungrouped kernels' intermediates in fp32, where a
    GPU rounds them to bf16 as the grouped path stores them: their bits are not comparable here); grouped is checked
    against the fp32 truth: on average no worse than 1.5x the ungrouped path's error, and each gradient within 0.1."""
    truth = grads_of(lora_model(BF16, accelerate=False).float())
    got, plain = grads_of(lora_model(BF16)), grads_of(lora_model(BF16, group=False))
    assert shrinks == [4, 2, 4, 2]
    err_got = [rel_err(got[n], truth[n]) for n in truth]
    err_plain = [rel_err(plain[n], truth[n]) for n in truth]
    assert sum(err_got) <= 1.5 * sum(err_plain) and max(err_got) <= 0.1, (err_got, err_plain)


def test_grouped_bf16_one_group_matches_ungrouped():
    """One group's layers, bf16 (no network to amplify the rounding): grouped within bf16 rounding of ungrouped."""
    grouped, plain = sibling_pair(dtype=BF16)
    x = torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(4)).to(BF16)
    assert_grads_close(sibling_grads(grouped, x), sibling_grads(plain, x), 1e-2)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_and_accumulation(shrinks, reentrant):
    """transformers' gradient checkpointing and two accumulated micro-steps, the sums equal to the ungrouped path's.
    Non-reentrant (what PEFT / TRL enable): the recomputed forward takes the same groups, so checkpoint's metadata
    check passes. Reentrant: the first forward runs under no_grad (no grouping), the recomputation groups."""
    plain = lora_model(group=False)
    want = grads_of(plain, steps=2)
    grouped = lora_model()
    grouped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        grouped.enable_input_require_grads()
    got = grads_of(grouped, steps=2)
    assert_grads_close(got, want, 1e-5)
    if reentrant:  # step 1's recomputation (layer 1, then 0), then step 2's, with o_proj learned out
        assert shrinks == [4, 2, 4, 2, 3, 2, 3, 2]
    else:  # step 1: forward [4, 2] x 2 layers, then its recomputation (learning applies after it); step 2: [3, 2]
        assert shrinks[:8] == [4, 2, 4, 2, 4, 2, 4, 2] and shrinks[8:] == [3, 2] * 4


def test_input_is_not_kept_alive():
    model = lora_model()
    seen = []
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(args[0])))
    for _ in range(2):
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        del out
    handle.remove()
    gc.collect()
    assert len(seen) == 2 and all(ref() is None for ref in seen)
    for module in model.modules():
        group = module.__dict__.get("_lora_siblings")
        assert group is None or group.shared is None


class Siblings(torch.nn.Module):
    """Three siblings under one parent: a and b read x; c reads another tensor (a copy of x: same values, not the
    same object) in `forward`, or x itself in `forward_same`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(24, 24), torch.nn.Linear(24, 8), torch.nn.Linear(24, 16)

    def forward(self, x):
        return self.a(x).sum() + self.b(x).square().sum() + self.c(x.clone()).mul(3).sum()


def sibling_pair(dtype=FP32, **fields):
    config = dict(r=4, lora_alpha=8, target_modules=["a", "b", "c"], init_lora_weights=False)
    config.update(fields)
    models = []
    for group in (True, False):
        model = get_peft_model(Siblings().to(dtype), LoraConfig(**config), autocast_adapter_dtype=False)
        accelerate_lora(model, group_siblings=group)
        models.append(model.train())
    return models


def sibling_grads(model, x):
    x = x.clone().requires_grad_()
    model(x).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad
    model.zero_grad(set_to_none=True)
    return grads


def test_sibling_with_another_input_falls_back(shrinks):
    grouped, plain = sibling_pair()
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2))
    want = sibling_grads(plain, x)
    for step in range(2):
        assert_grads_close(sibling_grads(grouped, x), want, 1e-5)
    assert shrinks == [3, 2]  # c was computed once, called with its copy, and learned out
    group = grouped.base_model.model.a.__dict__["_lora_siblings"]
    assert group.consumers == {0, 1} and group.shared is None


def test_a_shallow_copy_of_a_member_runs_on_its_own(shrinks):
    """A copy sharing the group through its __dict__ (nn.DataParallel replicates modules that way) is not a member:
    it takes its own path, and the members' group is untouched."""
    grouped, plain = sibling_pair()
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(6))
    replica = copy.copy(grouped.base_model.model.a)
    want = plain.base_model.model.a(x)
    assert torch.allclose(replica(x), want, rtol=1e-5, atol=1e-6) and shrinks == []
    assert replica.__dict__["_lora_siblings"].shared is None


def test_dropout_eval_and_no_grad_take_the_own_path(shrinks):
    grouped, plain = sibling_pair(lora_dropout=0.1)
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    got = sibling_grads(grouped, x)
    torch.manual_seed(5)
    assert_grads_close(got, sibling_grads(plain, x), 1e-6)  # same path, same dropout masks
    assert shrinks == []
    grouped, _ = sibling_pair()
    with torch.no_grad():
        grouped(x)
    grouped.eval()
    grouped(x)
    assert shrinks == []


def test_group_siblings_option_and_removal():
    model = lora_model(group=False)
    assert not any("_lora_siblings" in m.__dict__ for m in model.modules())
    accelerate_lora(model)  # the default
    assert lora_fused.GROUP_SIBLINGS_DEFAULT is True
    assert sum("_lora_siblings" in m.__dict__ for m in model.modules()) == 2 * (4 + 2)
    lora_fused.remove_lora_acceleration(model)
    assert not any("_lora_siblings" in m.__dict__ for m in model.modules())
    with pytest.raises(TypeError, match="group_siblings must be True or False, got 'yes'"):
        accelerate_lora(model, group_siblings="yes")


def test_a_group_wider_than_the_kernels_takes_the_siblings_that_fit(shrinks):
    """q/k/v/o of rank 40 add up to 160 > MAX_TRITON_RANK: the leader and the siblings after it that fit (q, k, v:
    120) share the shrink, even with backend="triton" forced (it raised on the concatenated rank); gradients as
    ungrouped."""
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=160, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    models = []
    for group in (True, False):
        torch.manual_seed(0)
        lora = LoraConfig(r=40, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(LlamaForCausalLM(config), lora, autocast_adapter_dtype=False)
        accelerate_lora(model, backend="triton", group_siblings=group, warn=False)
        models.append(model.train())
    want = grads_of(models[1])
    assert_grads_close(grads_of(models[0]), want, 1e-5)
    # step 1: q/k/v (o left out: it would not fit), then o leads its own guess (o, q, k: never consumed), gate/up
    assert shrinks == [3, 3, 2]
    assert_grads_close(grads_of(models[0]), want, 1e-5)
    assert shrinks[3:] == [3, 2]  # learned: q/k/v and gate/up only


class QOnly(torch.nn.Module):
    """q/k/v siblings whose forward (like a layer that reuses K/V) never calls k and v."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.q(x).square().sum()


def test_siblings_never_called_do_not_keep_the_input_nor_block_the_group(shrinks):
    """The first step computes k's and v's slices too; they are never taken. The group must neither keep that
    step's x alive (nor the graph: the model stays deep-copyable) nor refuse to lead again."""
    model = get_peft_model(QOnly(), LoraConfig(r=4, target_modules=["q", "k", "v"]))
    accelerate_lora(model, warn=False)
    model.train()
    refs = []
    for _ in range(3):
        x = torch.randn(64, 16, requires_grad=True, generator=torch.Generator().manual_seed(len(refs)))
        refs.append(weakref.ref(x))
        model(x).backward()
        del x
    gc.collect()
    assert [r() is not None for r in refs] == [False, False, False]
    group = model.base_model.model.q.__dict__["_lora_siblings"]
    assert group.shared is None and group.consumers == {0}  # learned: q alone, so no grouped shrink after step 1
    assert shrinks == [3]
    copy.deepcopy(model)
