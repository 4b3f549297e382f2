"""SSMLoRA's chains on tiny Llamas: where the modules go (insertion patterns, the saved chain layout), deterministic
outputs (the state starts from zero at every forward), gradients with and without gradient checkpointing, mixed
batches (each row runs its own adapter's chain), and torch.compile."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_ext import SsmLoraConfig
from peft_ext.tuners.ssmlora import SsmLoraLayer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def llama(n_layers: int = 2, seed: int = 0) -> nn.Module:
    """The tiny Llama of peft_ext.testing.models (hidden 32) with `n_layers` decoder layers."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def ids(batch=2, seq=6, seed=0):
    return torch.randint(4, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def layers(model) -> dict[str, SsmLoraLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SsmLoraLayer)}


def adapted(model, adapter="default") -> list[str]:
    return [n for n, m in layers(model).items() if adapter in m.ssmlora_A]


def ssm(n_layers=2, seed=0, **cfg):
    cfg = {"r": 4, "init_weights": False, "seed": seed, "task_type": "CAUSAL_LM", **cfg}
    return get_peft_model(llama(n_layers), SsmLoraConfig(**cfg))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def attn(i, kind):
    return f"model.layers.{i}.self_attn.{kind}_proj"


# ----------------------------------------------------------------------------------------------- insertion
def test_alternate_qv_adapts_q_in_even_and_v_in_odd_blocks(tmp_path):
    model = ssm(12, insertion="alternate_qv")
    expected = [attn(i, "q" if i % 2 == 0 else "v") for i in range(12)]  # blocks 10 and 11: two digits
    assert adapted(model) == expected
    assert model.peft_config["default"].chain_layout == [expected]  # one chain (per_type: q/v alternate as one)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["chain_layout"] == [expected]


@pytest.mark.parametrize(
    "chain, layout",
    [
        ("per_type", [[attn(i, "q") for i in range(4)], [attn(i, "v") for i in range(4)]]),
        ("all", [[attn(i, k) for i in range(4) for k in ("q", "v")]]),
    ],
)
def test_insertion_all_adapts_every_q_and_v(chain, layout):
    model = ssm(4, insertion="all", chain=chain)
    assert adapted(model) == [attn(i, k) for i in range(4) for k in ("q", "v")]
    assert model.peft_config["default"].chain_layout == layout
    for chain_names in layout:  # every module of a chain hands its state to the next one: one key per chain
        keys = {layers(model)[n].ssmlora_chain["default"] for n in chain_names}
        assert len(keys) == 1


def test_target_modules_per_type_and_all():
    per_type = ssm(2, target_modules=["q_proj", "up_proj"])
    assert per_type.peft_config["default"].chain_layout == [
        [attn(0, "q"), attn(1, "q")], ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    ]
    one = ssm(2, target_modules=["q_proj", "up_proj"], chain="all")
    assert one.peft_config["default"].chain_layout == [
        [attn(0, "q"), "model.layers.0.mlp.up_proj", attn(1, "q"), "model.layers.1.mlp.up_proj"]
    ]


def test_insertion_respects_layers_to_transform():
    model = ssm(4, insertion="all", layers_to_transform=[0, 1])
    assert adapted(model) == [attn(0, "q"), attn(0, "v"), attn(1, "q"), attn(1, "v")]


@pytest.mark.parametrize("targets", [{"insertion": "all"}, {"target_modules": ["q_proj", "v_proj"]}],
                         ids=["insertion", "target_modules"])
def test_exclude_modules_excludes_without_a_false_warning(targets):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ssm(2, exclude_modules=[attn(0, "q")], **targets)
    assert adapted(model) == [attn(0, "v"), attn(1, "q"), attn(1, "v")]  # the exclusion itself works
    assert [str(w.message) for w in caught if "exclude_modules" in str(w.message)] == []


def test_one_config_object_serves_two_models():
    config = SsmLoraConfig(r=4)
    get_peft_model(llama(2), config)
    model = get_peft_model(llama(4), config)
    assert adapted(model) == [attn(0, "q"), attn(1, "v"), attn(2, "q"), attn(3, "v")]


# ----------------------------------------------------------------------------------------------- determinism
def test_outputs_are_deterministic_and_independent_of_the_previous_batch():
    x = ids(2, 6)
    model = ssm(2)
    first = logits(model, x)
    assert (first - logits(llama(2), x)).abs().max() > 1e-3  # a non-identity adapter with an active state path
    assert torch.equal(logits(model, x), first)  # the same batch twice
    other = ssm(2)
    logits(other, ids(3, 4, seed=5))  # a batch of another size first: the official code would carry its state
    assert torch.equal(logits(other, x), first)
    assert other.base_model.ssmlora_run.states == {} and not other.base_model.ssmlora_run.in_forward
    # rows do not see each other: row 0 alone gives the row of the batch
    torch.testing.assert_close(logits(model, x[:1]), first[:1], rtol=0, atol=1e-6)
    model.train()  # state_dropout active: train outputs differ from eval
    torch.manual_seed(1)
    with torch.no_grad():
        trained = model(input_ids=x).logits
    assert not torch.equal(trained, first)
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, trained)  # the same dropout mask, the same state


def test_a_failed_forward_leaves_no_state_behind():
    model = ssm(2)
    x = ids()
    expected = logits(model, x)
    def boom(module, args, output):
        assert model.base_model.ssmlora_run.states  # block 0's q_proj has handed its state on
        raise RuntimeError("boom")

    handle = model.base_model.model.model.layers[1].mlp.register_forward_hook(boom)  # fails inside the model
    with pytest.raises(RuntimeError, match="^boom$"):
        model(input_ids=x)
    handle.remove()
    assert not model.base_model.ssmlora_run.in_forward and model.base_model.ssmlora_run.states == {}
    assert torch.equal(logits(model, x), expected)


# ----------------------------------------------------------------------------------- gradient checkpointing
def loss_and_grads(ckpt: bool, reentrant: bool = False, detach: bool = True, seed: int = 7):
    model = ssm(4, insertion="all", chain="all", detach_state=detach, state_dropout=0.1)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model.train()
    x = ids(2, 6)
    torch.manual_seed(seed)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize(
    "reentrant, detach", [(False, True), (False, False), (True, True)], ids=["non_reentrant", "non_reentrant_flow",
                                                                            "reentrant_detached"]
)
def test_gradients_equal_with_and_without_checkpointing(reentrant, detach):
    loss, grads = loss_and_grads(False, detach=detach)
    loss_ckpt, grads_ckpt = loss_and_grads(True, reentrant, detach)
    assert torch.equal(loss, loss_ckpt)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-6, atol=1e-7, msg=name)
    assert all(g.abs().sum() > 0 for g in grads.values())  # every adapter tensor gets gradient
    # the state dropout is on: another mask gives another loss (so the recomputation had to replay the mask)
    assert not torch.equal(loss_and_grads(False, detach=detach, seed=8)[0], loss)


def test_detach_state_false_under_reentrant_checkpointing_is_refused():
    message = (
        "SSMLoRA with detach_state=False under reentrant gradient checkpointing: the forward ran without gradient, "
        "so the state's gradient between checkpointed blocks would be lost. Use non-reentrant checkpointing "
        "(gradient_checkpointing_kwargs={'use_reentrant': False}, transformers' default) or "
        "SsmLoraConfig(detach_state=True)."
    )
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        loss_and_grads(True, reentrant=True, detach=False)


@pytest.mark.parametrize("detach", [True, False])
def test_two_forwards_one_backward_under_checkpointing(detach):
    a, b = ids(2, 6, seed=1), ids(2, 6, seed=2)
    grads = []
    for ckpt in (False, True):
        model = ssm(4, detach_state=detach, state_dropout=0.0)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        (model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- mixed batches
def two_adapters():
    """Adapter "one" on alternating q/v, "two" on every q/v (other modules, other chains); both with non-zero B
    and the default state path (D random)."""
    model = get_peft_model(llama(2), SsmLoraConfig(r=4, init_weights=False, seed=1, task_type="CAUSAL_LM"),
                           adapter_name="one")
    model.add_adapter("two", SsmLoraConfig(r=3, alpha=4.0, insertion="all", init_weights=False, seed=2,
                                           task_type="CAUSAL_LM"))
    return model.eval()


def test_mixed_batch_rows_run_their_own_adapters_chain():
    model = two_adapters()
    x = ids(5, 6, seed=3)
    names = ["one", "two", "__base__", "one", "two"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
    v1 = layers(model)[attn(1, "v")]
    state = v1._state_in["one"]  # the chain ran on the rows of "one": q0 handed its state to v1
    assert state is not None and state.shape == (2 * 6, 4) and state.amax() > 0  # (tokens of its 2 rows, r)
    per_adapter = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        per_adapter[name] = logits(model, x)
    with model.disable_adapter():
        per_adapter["__base__"] = logits(model, x)
    assert torch.equal(per_adapter["__base__"], logits(llama(2), x))
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], rtol=0, atol=1e-6, msg=f"row {row} ({name})")
    assert (per_adapter["one"] - per_adapter["two"]).abs().max() > 1e-3  # the rows really differ


def test_several_active_adapters_keep_their_chains_apart():
    model = two_adapters()
    x = ids(2, 6)
    model.base_model.set_adapter(["one", "two"])
    both = logits(model, x)
    # each adapter's state flows on its own chain: v1 receives "one"'s q0 state and "two"'s v0 state
    v1 = layers(model)[attn(1, "v")]
    assert v1._state_in["one"].shape == (2 * 6, 4) and v1._state_in["two"].shape == (2 * 6, 3)  # (tokens, r)
    for name in ("one", "two"):
        model.base_model.set_adapter(name)
        assert (logits(model, x) - both).abs().max() > 1e-3


def test_mixed_batches_are_refused_in_training():
    model = two_adapters().train()
    with pytest.raises(ValueError, match=re.escape("adapter_names= (mixed-adapter batches) is for inference")):
        model(input_ids=ids(2, 6), adapter_names=["one", "two"])


# ----------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    try:
        model = ssm(2, detach_state=False, state_dropout=0.0)
        x = ids(2, 6)
        eager = logits(model, x)
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(logits(compiled, x), eager, rtol=0, atol=1e-6)

        model.train()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        loss_compiled = compiled(input_ids=x, labels=x).loss
        loss_compiled.backward()
        torch.testing.assert_close(loss_compiled.detach(), loss.detach(), rtol=0, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        torch._dynamo.reset()
