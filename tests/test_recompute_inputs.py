"""`peft_ext.recompute_adapter_inputs`: adapter layers rebuild their saved inputs in the backward instead of keeping
them. Exactness (loss and every adapter gradient bit-identical, torch.equal, fp32 and bf16), the saved bytes measured
on the CPU (unique storages autograd saves during the forward: frozen base / LoRA / LoRA + recompute), gradient
checkpointing, other saved_tensors_hooks, no-grad, undo, and an architecture it cannot cover (reported, untouched).

A tiny Llama built in-process: hidden 32, FFN 88, 2 blocks, batch 2 x 16 tokens (T = 32), LoRA r=4 on all 7 linears.
"""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_ext
from peft_ext.tuners.recompute import LiveActivationBytes, SavedTensorsCounter

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, FFN, BLOCKS, R = 64, 32, 88, 2, 4
TOKENS = 2 * 16
KINDS = ["lora", "lora-fused", "cola", "ssmlora", "smore", "finegates"]


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=BLOCKS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def adapted(kind: str, dtype: torch.dtype) -> nn.Module:
    base = tiny_llama(dtype)
    if kind in ("lora", "lora-fused"):
        config = LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base, config)
        return peft_ext.accelerate_lora(model, warn=False) if kind == "lora-fused" else model
    if kind == "cola":  # the last link of a 3-link chain: two merged links + the trained one (the fused fold path)
        config = peft_ext.ColaConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", chain_length=3)
        model = get_peft_model(base, config)
        model.base_model.next_link()
        model.base_model.next_link()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))  # B != 0: every gradient non-zero
        return model
    if kind == "smore":
        return get_peft_model(base, peft_ext.SmoreConfig(target_modules="all-linear", seed=0))
    if kind == "finegates":  # FineGates + LoRA, stochastic gates on (the same noise on both runs: `step` seeds)
        config = peft_ext.FineGatesConfig(task_type="CAUSAL_LM", seed=0, lora_r=R, target_modules="all-linear",
                                          gate_noise_std=0.3)  # fmt: skip
        return get_peft_model(base, config).train()
    config = peft_ext.SsmLoraConfig(r=R, init_weights=False, seed=0, target_modules="all-linear", chain="all")
    return get_peft_model(base, config)


def frozen(dtype: torch.dtype) -> nn.Module:
    model = tiny_llama(dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("embed_tokens.weight"))  # a backward through every block, as the benchmark
    return model


IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def step(model: nn.Module) -> tuple[torch.Tensor, dict, int]:
    """Loss, gradients and the activation bytes autograd saved in the forward (parameters and buffers excluded)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # SSMLoRA's state dropout: the same mask on both runs
    with SavedTensorsCounter(exclude=[*model.parameters(), *model.buffers()]) as counter:
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.bytes


def assert_exact(a, b) -> None:
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_bit_identical(kind, dtype):
    model = adapted(kind, dtype)
    off = step(model)
    hooks = hook_counts(model)
    report = peft_ext.recompute_adapter_inputs(model)
    on = step(model)
    assert_exact(off, on)
    nonzero = [bool(g.abs().sum() > 0) for g in off[1].values()]
    assert all(nonzero) if kind in ("lora", "lora-fused", "cola", "ssmlora") else sum(nonzero) > len(nonzero) // 2
    coverage = report.coverage()
    assert set(coverage) == set(report.layers) and len(report.layers) == 7 * BLOCKS
    # what the mechanism is for: the second block's norm outputs and the down_proj inputs are rebuilt
    block1 = "base_model.model.model.layers.1."
    for layer in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert coverage[block1 + layer]["rebuilt"], (layer, report.summary())
    assert on[2] < off[2]  # fewer saved bytes
    peft_ext.remove_adapter_input_recompute(model)  # undo: the layers save what they saved before
    assert_exact(off, step(model))
    assert step(model)[2] == off[2]
    assert hook_counts(model) == hooks


def hook_counts(model: nn.Module) -> list:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def assert_exact_and_block_1_rebuilt(model: nn.Module) -> dict:
    """One step without the option, one with: the same loss and gradients, fewer saved bytes, and block 1's q_proj,
    gate_proj and down_proj inputs rebuilt. Returns those three layers' coverage."""
    off = step(model)
    report = peft_ext.recompute_adapter_inputs(model)
    on = step(model)
    assert_exact(off, on)
    assert on[2] < off[2]
    coverage = {layer: report.coverage()["base_model.model.model.layers.1." + layer]
                for layer in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")}  # fmt: skip
    for layer, cov in coverage.items():
        assert cov["rebuilt"], (layer, report.summary())
    return coverage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_path_in_the_interpreter(monkeypatch, dtype):
    """The Triton path (`lowrank_linear`'s custom autograd Function, sibling groups included) saves x through
    `save_for_backward`: rebuilt the same way, exactly. Triton's interpreter runs it on the CPU."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from peft_ext.kernels import interpret_mode

    assert interpret_mode()
    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", init_lora_weights=False)
    model = peft_ext.accelerate_lora(get_peft_model(tiny_llama(dtype), config), backend="triton", warn=False)
    assert_exact_and_block_1_rebuilt(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["peft", "fused"])
def test_lora_dropout_exact(fused, dtype):
    """With lora_dropout > 0 the same mask is drawn on both runs (`step` seeds) and the gradients stay exact. In bf16
    PEFT casts x to fp32 before multiplying by its fp32 mask: a replay casting to fp16 or to fp32 would both give fp32
    after the mask, so the cast's dtype comes from the autograd node itself (otherwise nothing would be rebuilt)."""
    config = LoraConfig(r=R, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False)
    model = get_peft_model(tiny_llama(dtype), config).train()
    if fused:
        peft_ext.accelerate_lora(model, warn=False)
    coverage = assert_exact_and_block_1_rebuilt(model)
    for cov in coverage.values():
        assert not any("ambiguous" in reason for reason in cov["kept"]), cov


# --------------------------------------------------------------------------------------------- saved bytes
def predicted_rebuilt(kind: str, dtype: torch.dtype) -> int:
    """The bytes LoRA saves that the option rebuilds instead, on this tiny Llama: per block the input_layernorm
    output (q/k/v input; not in block 0, whose norm input needs no gradient under a frozen embedding: its norm saved
    nothing to rebuild from), the post_attention_layernorm output (gate/up input) and the down_proj input act(g)*u.
    PEFT's own path with fp32 adapter weights on a bf16 model saves an fp32 cast of x per layer instead (q, k, v, o,
    gate, up each their own copy; o_proj's rebuilt from SDPA's saved output); in fp32 the o_proj input is SDPA's
    saved output itself (costs nothing: kept)."""
    size = torch.tensor([], dtype=dtype).element_size()
    norm, down = TOKENS * HIDDEN * size, TOKENS * FFN * size
    if kind == "lora" and dtype == torch.bfloat16:
        norm32, down32 = TOKENS * HIDDEN * 4, TOKENS * FFN * 4
        return BLOCKS * (3 * norm32 + down32) + (BLOCKS - 1) * 3 * norm32
    return BLOCKS * (norm + down) + (BLOCKS - 1) * norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["lora", "lora-fused"])
def test_saved_bytes(kind, dtype):
    frozen_bytes = step(frozen(dtype))[2]
    model = adapted(kind, dtype)
    lora_bytes = step(model)[2]
    report = peft_ext.recompute_adapter_inputs(model)
    recompute_bytes = step(model)[2]
    # plain LoRA saves the norm outputs and the down_proj input (and, on PEFT's fp32-adapter path, fp32 casts of
    # every layer input); with the option on, exactly those are gone
    assert lora_bytes - recompute_bytes == predicted_rebuilt(kind, dtype)
    assert lora_bytes - frozen_bytes >= predicted_rebuilt(kind, dtype) - frozen_only(dtype)
    # what is still kept: the rank-r intermediates xa, block 0's q/k/v input (its norm saved nothing), and on the
    # bf16 reference path the bf16 casts of the fp32 adapter weights (rank-r too); nothing else
    kept = 0
    for name, cov in report.coverage().items():
        for reason, (count, nbytes) in cov["kept"].items():
            if reason.startswith("saved by its producer anyway"):
                continue  # the same storage as a tensor the base saves: no bytes of its own
            allowed = ("MmBackward0", "no autograd history", "AccumulateGrad")  # xa = x A^T, block 0, casts of A/B
            assert any(k in reason for k in allowed), reason
            if "no autograd history" in reason and nbytes > TOKENS * R * 4:
                assert ".layers.0.self_attn." in name, (name, reason)
            kept += nbytes
    xa = 7 * BLOCKS * TOKENS * R * (4 if kind == "lora" else torch.tensor([], dtype=dtype).element_size())
    if kind == "lora" and dtype == torch.bfloat16:  # PEFT's path: q, k and v each keep their own fp32 cast
        block0_qkv_input = 3 * TOKENS * HIDDEN * 4
    else:
        block0_qkv_input = TOKENS * HIDDEN * torch.tensor([], dtype=dtype).element_size()
    assert kept >= xa
    assert recompute_bytes <= frozen_bytes + kept
    assert recompute_bytes <= frozen_bytes + xa + block0_qkv_input + adapter_casts(kind, dtype)


def frozen_only(dtype: torch.dtype) -> int:
    """What the frozen base (embedding trainable) saves and LoRA (embedding frozen) does not: block 0's
    input_layernorm input in fp32 and its rsqrt (the norm input needs a gradient there only)."""
    return TOKENS * HIDDEN * 4 * (dtype != torch.float32) + TOKENS * 4 + TOKENS * 8


def adapter_casts(kind: str, dtype: torch.dtype) -> int:
    """The reference path on a bf16 model casts the fp32 A and B to bf16 and saves the casts (rank-r, not
    activations); the Triton path saves the fp32 parameters themselves."""
    if kind != "lora-fused" or dtype == torch.float32:
        return 0
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, HIDDEN // 2), (HIDDEN, HIDDEN // 2), (HIDDEN, HIDDEN), (HIDDEN, FFN),
              (HIDDEN, FFN), (FFN, HIDDEN)]  # fmt: skip
    return BLOCKS * sum(R * (i + o) * 2 for i, o in shapes)


def live_bytes(model: nn.Module) -> int:
    """The bytes of the storages made during a training forward that are still alive after it (LiveActivationBytes:
    whoever keeps them, autograd or any other reference), read before the backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with LiveActivationBytes() as live:
        loss = model(input_ids=IDS, labels=IDS).loss
    nbytes = live.bytes
    loss.backward()
    return nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["lora", "lora-fused"])
def test_live_bytes_after_the_forward(kind, dtype):
    """What is really still allocated after the forward, not only what autograd packs (the hooks' closure once held
    the layers' inputs: the saved bytes dropped, the live ones did not): with the option the live bytes drop by at
    least the rebuilt inputs' size, to the frozen base's plus the rank-r xa (and block 0's q/k/v input)."""
    frozen_live = live_bytes(frozen(dtype))
    model = adapted(kind, dtype)
    lora_live = live_bytes(model)
    peft_ext.recompute_adapter_inputs(model)
    on_live = live_bytes(model)
    assert lora_live - on_live >= predicted_rebuilt(kind, dtype)
    xa = 7 * BLOCKS * TOKENS * R * (4 if kind == "lora" else torch.tensor([], dtype=dtype).element_size())
    block0_qkv_input = TOKENS * HIDDEN * (12 if kind == "lora" and dtype == torch.bfloat16 else dtype.itemsize)
    assert on_live <= frozen_live + xa + block0_qkv_input + adapter_casts(kind, dtype)


def test_live_bytes_counts_new_storages_still_alive():
    a = torch.randn(4, 8, requires_grad=True)
    with LiveActivationBytes() as live:
        y = a.exp()  # saved by exp (its result) and kept here
        z = (y[:, :4] * 2).sum()  # the view makes no storage; y[:, :4] * 2 is freed by the end
    assert (live.storages, live.bytes) == (2, 4 * 8 * 4 + 4)
    del y, z
    assert (live.storages, live.bytes) == (0, 0)


def test_retain_graph_second_backward():
    """A rebuilt tensor is shared by q/k/v and dropped after their first unpacks; a second backward through the
    retained graph rebuilds it again."""
    model = adapted("lora-fused", torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads_twice():
        loss = model(input_ids=IDS, labels=IDS).loss
        first = torch.autograd.grad(loss, params, retain_graph=True)
        return first, torch.autograd.grad(loss, params)

    off = grads_twice()
    peft_ext.recompute_adapter_inputs(model)
    on = grads_twice()
    for a, b in zip([*off[0], *off[1]], [*on[0], *on[1]]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- checkpointing, hooks
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing(reentrant):
    model = adapted("lora-fused", torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    model.train()
    off = step(model)
    with pytest.warns(UserWarning, match="gradient checkpointing is on"):
        report = peft_ext.recompute_adapter_inputs(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = step(model)
    assert_exact(off, on)
    aside = [w for w in caught if "stepped aside" in str(w.message)]
    assert len(aside) == (0 if reentrant else 1), [str(w.message) for w in aside]
    cov = report.coverage()["base_model.model.model.layers.1.mlp.down_proj"]
    if reentrant:  # the forward ran without grad; the recomputation in the backward used the option
        assert cov["rebuilt"] and not cov["stepped_aside"]
    else:  # inside checkpoint's own saved_tensors_hooks: stepped aside
        assert cov["stepped_aside"] and not cov["rebuilt"]


def test_other_saved_tensors_hooks_step_aside():
    model = adapted("lora", torch.float32)

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, 0

    off = run()
    report = peft_ext.recompute_adapter_inputs(model)
    packed = []

    def pack(t):
        packed.append(t.untyped_storage().data_ptr())
        return t

    match = r"stepped aside .* other saved_tensors_hooks are active around it \(test_other_saved_tensors_hooks"
    with pytest.warns(UserWarning, match=match):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            on = run()
    assert_exact(off, on)
    assert len(packed) > 7 * BLOCKS  # the user's hooks saw the adapter layers' tensors too
    assert all(cov["stepped_aside"] and not cov["rebuilt"] for cov in report.coverage().values())
    with torch.autograd.graph.save_on_cpu():
        assert_exact(off, run())
    assert_exact(off, run())  # and the option works again once they are gone
    assert all(cov["rebuilt"] for name, cov in report.coverage().items() if "layers.1.mlp" in name)


def test_checkpointing_turned_on_after_the_option_warns_once_at_the_forward():
    """Trainer / TRL turn gradient checkpointing on inside train(), after the option was enabled: the enable-time
    warning cannot see it, so the first training forward whose layers step aside warns, naming cause and fix."""
    model = adapted("lora-fused", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # checkpointing still off: no warning at enable time
        report = peft_ext.recompute_adapter_inputs(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    fix = r"gradient checkpointing is on .*gradient_checkpointing=False.*remove_adapter_input_recompute"
    with pytest.warns(UserWarning, match=fix) as caught:
        step(model)
    assert len([w for w in caught if "stepped aside" in str(w.message)]) == 1  # not once per layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(model)
    assert not [w for w in caught if "stepped aside" in str(w.message)]  # once per model
    assert all(cov["stepped_aside"] for cov in report.coverage().values())


def test_no_grad_and_eval_unchanged():
    model = adapted("lora-fused", torch.bfloat16)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    report = peft_ext.recompute_adapter_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)
    assert report.coverage() == {}  # nothing was saved, nothing looked at
    model.eval()
    assert torch.equal(model(input_ids=IDS).logits.detach(), expected)


def test_deepcopy_keeps_the_option_and_undoes_separately():
    model = adapted("lora-fused", torch.float32)
    off = step(model)
    hooks = hook_counts(model)
    peft_ext.recompute_adapter_inputs(model)
    clone = copy.deepcopy(model)  # e.g. TRL's reference model
    on = step(clone)
    assert_exact(off, on)
    assert on[2] < off[2]
    peft_ext.remove_adapter_input_recompute(clone)
    assert hook_counts(clone) == hooks and hook_counts(model) != hooks
    assert step(clone)[2] == off[2] and step(model)[2] == on[2]


def test_pickling_the_model_names_the_way_out():
    """torch.save(model) with the option on fails with a message naming the option and its undo (not "Can't pickle
    local object"); once removed, the model pickles."""
    import io
    import pickle

    model = adapted("lora-fused", torch.float32)
    peft_ext.recompute_adapter_inputs(model)
    with pytest.raises(pickle.PicklingError, match="recompute_adapter_inputs.*remove_adapter_input_recompute"):
        torch.save(model, io.BytesIO())
    peft_ext.remove_adapter_input_recompute(model)
    torch.save(model, io.BytesIO())


def test_exception_inside_a_layer_leaves_no_hooks_behind():
    model = adapted("lora-fused", torch.float32)
    peft_ext.recompute_adapter_inputs(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj

    def boom(module, args):
        raise RuntimeError("boom")

    handle = layer.get_base_layer().register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="^boom$"):
        model(input_ids=IDS, labels=IDS)
    handle.remove()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    off = step(adapted("lora-fused", torch.float32))
    assert_exact(off, step(model))


# ------------------------------------------------------------------------------------ unknown structures
class GeluMlp(nn.Module):
    """Not a gated MLP: fc2's input is GELU's output, which GELU does not save (it saves its input)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def test_unknown_structure_untouched_and_reported():
    model = get_peft_model(GeluMlp(), LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False))
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def run():
        model.zero_grad(set_to_none=True)
        with SavedTensorsCounter(exclude=list(model.parameters())) as counter:
            out = model(x).square().mean()
        out.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, counter.bytes

    off = run()
    forwards = {name: (type(m).forward, "forward" in m.__dict__) for name, m in model.named_modules()}
    report = peft_ext.recompute_adapter_inputs(model)
    on = run()
    assert_exact(off, on)
    assert on[2] == off[2]  # nothing rebuilt: a leaf input and GELU's output are kept
    assert {name: (type(m).forward, "forward" in m.__dict__) for name, m in model.named_modules()} == forwards
    fc2 = report.coverage()["base_model.model.fc2"]
    assert not fc2["rebuilt"] and any("GeluBackward0" in reason for reason in fc2["kept"]), report.summary()
    assert "GeluBackward0" in report.summary()


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input():
    with pytest.raises(ValueError, match="model has no adapter layers"):
        peft_ext.recompute_adapter_inputs(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        peft_ext.recompute_adapter_inputs("model")
    model = adapted("lora", torch.float32)
    with pytest.raises(TypeError, match="enable must be True or False"):
        peft_ext.recompute_adapter_inputs(model, enable="yes")
    peft_ext.recompute_adapter_inputs(model)
    assert peft_ext.recompute_adapter_inputs(model, enable=False) is None  # the other way to undo
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_counter_counts_each_storage_once():
    a = torch.randn(4, 8, requires_grad=True)
    with SavedTensorsCounter(exclude=[a]) as counter:
        y = a.exp()  # saves its result y
        (y[:, :4] * y[:, 4:]).sum()  # saves two views of y: the same storage
    assert (counter.storages, counter.bytes) == (1, 4 * 8 * 4)


@pytest.mark.parametrize("kind", ["lora", "lora-fused"])
def test_rebuilt_inputs_are_freed_after_the_forward(kind):
    """What the option rebuilds must really be gone between forward and backward (not only absent from what autograd
    saves: a closure of the hooks holding the layer's inputs kept them allocated while the counted bytes dropped).
    Checked on the storages of block 1's down_proj input and q_proj input (the RMSNorm output)."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    alive = {}
    for on in (False, True):
        model = adapted(kind, torch.float32)
        if on:
            peft_ext.recompute_adapter_inputs(model)
        block = model.base_model.model.model.layers[1]
        refs = {}
        for name, layer in (("down_proj", block.mlp.down_proj), ("q_proj", block.self_attn.q_proj)):
            layer.register_forward_pre_hook(lambda mod, args, name=name: refs.update({name: StorageWeakRef(args[0].untyped_storage())}))
        loss = model(input_ids=IDS, labels=IDS).loss
        gc.collect()
        alive[on] = {name: not ref.expired() for name, ref in refs.items()}
        loss.backward()  # and the backward still runs from the rebuilt inputs
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert alive[False] == {"down_proj": True, "q_proj": True}  # saved for dA without the option
    assert alive[True] == {"down_proj": False, "q_proj": False}
