"""The draw of "half": group sizes per block and role, seeds, strategies, and the errors of a bad pool."""

from collections import Counter

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import DebertaV2Config, DebertaV2Model

from peft_ext import HftConfig
from peft_ext.tuners.hft.selection import block_of, role_of


def _per_block_role(names, model):
    modules = dict(model.named_modules())
    return Counter((block_of(n), role_of(n, modules[n])) for n in names)


def test_matrix_strategy_follows_the_papers_per_block_rule(llama):
    model = llama(layers=4)
    names = get_peft_model(model, HftConfig(seed=3)).peft_config["default"].selected_modules
    counts = _per_block_role(names, llama(layers=4))
    for block in range(4):
        assert counts[(block, "attention")] == 2  # 2 of q, k, v, o
        assert counts[(block, "norm")] == 1  # 1 of input / post-attention norm
    # 3 MLP matrices per block: 2, 1, 2, 1 so that the total is half
    assert [counts[(b, "mlp")] for b in range(4)] == [2, 1, 2, 1]


def test_selection_is_seeded_and_saved_in_the_config(llama):
    a = get_peft_model(llama(), HftConfig(seed=0)).peft_config["default"].selected_modules
    b = get_peft_model(llama(), HftConfig(seed=0)).peft_config["default"].selected_modules
    c = get_peft_model(llama(), HftConfig(seed=1)).peft_config["default"].selected_modules
    assert a == b
    assert a != c


def test_default_pool_excludes_embeddings_and_head(llama):
    config = get_peft_model(llama(), HftConfig(ratio=1.0)).peft_config["default"]
    assert not any("embed" in n or "lm_head" in n for n in config.selected_modules)
    assert len(config.selected_modules) == 4 * (7 + 2)  # every projection and norm of every block


def test_layer_strategy_trains_whole_blocks(llama):
    names = get_peft_model(llama(layers=4), HftConfig(strategy="layer", seed=0)).peft_config["default"].selected_modules
    blocks = Counter(block_of(n) for n in names)
    assert len(blocks) == 2 and set(blocks.values()) == {9}


def test_param_strategy_trains_half_of_the_rows_of_every_target(llama):
    model = get_peft_model(llama(), HftConfig(strategy="param", train_norms=False))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    rows = layer.hft_index["default"]["rows"]
    assert layer.hft_weight["default"]["weight"].shape == (16, 48) and rows.numel() == 16
    assert rows.unique().numel() == 16


def test_explicit_strategy_trains_exactly_the_named_modules(llama):
    names = ["model.layers.1.mlp.up_proj", "model.layers.0.self_attn.v_proj"]
    model = get_peft_model(llama(), HftConfig(strategy="explicit", selected_modules=names))
    trainable = {n.split(".hft_weight")[0].removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)


def test_gpt2_conv1d_roles(gpt2):
    model = gpt2()
    names = get_peft_model(model, HftConfig(seed=0)).peft_config["default"].selected_modules
    counts = _per_block_role(names, gpt2())
    for block in range(2):
        assert counts[(block, "attention")] == 1  # 1 of c_attn, c_proj
        assert counts[(block, "mlp")] == 1  # 1 of c_fc, c_proj
        assert counts[(block, "norm")] == 1  # 1 of ln_1, ln_2


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(target_modules=["nonexistent"]), r"target_modules=\['nonexistent'\] matches no module.*q_proj"),
        (dict(target_modules=["q_proj"], ratio=0.1, train_norms=False), r"selects nothing to train.*ratio"),
        (dict(target_modules=["self_attn"]), r"cannot train.*LlamaAttention"),
        (dict(strategy="explicit", selected_modules=["model.layers.9.mlp.up_proj"]), r"selected_modules.*does not have"),
    ],
)
def test_bad_pools_are_refused_before_any_module_is_wrapped(llama, kwargs, pattern):
    model = llama(layers=2)
    with pytest.raises(ValueError, match=pattern):
        get_peft_model(model, HftConfig(**kwargs))
    assert not any("hft" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(ratio=0), r"HftConfig.ratio must be in \(0, 1\]"),
    (dict(ratio=1.5), r"HftConfig.ratio must be in \(0, 1\]"),
    (dict(strategy="rows"), r"HftConfig.strategy must be one of"),
    (dict(strategy="explicit"), r"needs HftConfig.selected_modules"),
    (dict(save_format="npz"), r"HftConfig.save_format must be one of"),
])
def test_bad_config_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        HftConfig(**kwargs)


# ------------------------------------------------------------------------ issue 11 items 6 and 12
def _tiny_deberta():
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64, relative_attention=True,
                             norm_rel_ebd="layer_norm", position_buckets=8)
    return DebertaV2Model(config).eval()


@pytest.mark.parametrize("target_modules", [None, ["query_proj", "value_proj", "dense"]])
def test_layers_to_transform_limits_linear_layers_and_norms(target_modules):
    """Item 12: the norms (and the default pool) ignored layers_to_transform."""
    config = HftConfig(target_modules=target_modules, layers_to_transform=[1], layers_pattern="layer", ratio=1.0)
    names = get_peft_model(_tiny_deberta(), config).peft_config["default"].selected_modules
    assert names and {block_of(n) for n in names} == {1}, names
    assert any(n.endswith("LayerNorm") for n in names)


def test_exclude_modules_applies_to_norms(llama):
    """Item 12: exclude_modules did not reach the norms."""
    config = HftConfig(exclude_modules=["input_layernorm", "q_proj"], ratio=1.0)
    names = get_peft_model(llama(layers=2), config).peft_config["default"].selected_modules
    assert not any(n.endswith(("input_layernorm", "q_proj")) for n in names)
    assert sum(n.endswith("post_attention_layernorm") for n in names) == 2


class _EncoderLM(nn.Module):
    """Blocks of nn.TransformerEncoderLayer: attention is an nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(32, 64)

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def test_multihead_attention_out_proj_is_not_selected_and_every_copy_trains(input_ids):
    """Item 6: nn.MultiheadAttention reads out_proj.weight itself, so a copy of out_proj would never train."""
    torch.manual_seed(0)
    model = get_peft_model(_EncoderLM(), HftConfig(ratio=1.0))
    names = model.peft_config["default"].selected_modules
    assert not any(n.endswith("out_proj") for n in names)
    assert any(n.endswith("linear1") for n in names) and any(n.endswith("norm1") for n in names)
    model.train()
    model(input_ids).logsumexp(-1).mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


@pytest.mark.parametrize("kwargs", [dict(target_modules=["out_proj", "linear1"]),
                                    dict(strategy="explicit", selected_modules=["layers.0.self_attn.out_proj"])])
def test_multihead_attention_out_proj_named_is_refused(kwargs):
    with pytest.raises(ValueError, match=r"out_proj"):
        get_peft_model(_EncoderLM(), HftConfig(**kwargs))
