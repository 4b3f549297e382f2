"""The pool a selection is drawn from is fixed at the first draw and saved (HftConfig.candidate_modules): PEFT
rewrites target_modules="all-linear" into every linear layer after injection, BERT's pooler included."""

import json

import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertModel

from peft_ext import HftConfig
from peft_ext.tuners.hft.selection import find_candidates


def _bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def test_all_linear_pool_is_fixed_at_the_first_selection(tmp_path):
    model = get_peft_model(_bert(), HftConfig(target_modules="all-linear", seed=0))
    config = model.peft_config["default"]
    pool = sorted(c.name for c in find_candidates(_bert(), HftConfig(target_modules="all-linear")))
    assert "pooler.dense" not in pool
    for _ in range(4):
        model.base_model.reselect()
        assert set(config.selected_modules) <= set(pool)  # the pooler never joins a later stage's draw
    assert set(config.trained_modules) <= set(pool)
    assert config.candidate_modules == pool  # sorted: the same file on every run

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["candidate_modules"] == pool
    loaded = PeftModel.from_pretrained(_bert(), tmp_path, is_trainable=True)
    loaded.base_model.reselect()
    model.base_model.reselect()
    assert loaded.peft_config["default"].selected_modules == config.selected_modules


def test_a_given_pool_is_drawn_from(llama):
    pool = [f"model.layers.{i}.{p}" for i in range(4) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    config = get_peft_model(llama(), HftConfig(candidate_modules=pool, seed=0)).peft_config["default"]
    assert config.candidate_modules == sorted(pool)
    assert set(config.selected_modules) <= set(pool) and len(config.selected_modules) == 6  # 1 of q, v per block; up: 1, 0, 1, 0
