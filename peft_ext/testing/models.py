"""Tiny models built from configs in-process (no downloads), and what the contract tests need to drive them.

Each `ModelSpec` (MODELS[kind]) knows how to build its model from a seed, how to make a batch of inputs, how to read the output
tensor to compare and how to get a scalar loss, so the tests treat causal LMs, an encoder classifier and a plain
MLP alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .tokenizer import VOCAB_SIZE

SEQ_LEN = 10
BATCH = 4


class TinyMLP(nn.Module):
    """Three nn.Linear layers and no blocks (PEFT's own tests use the same shape of model)."""

    def __init__(self, n_in: int = 12, hidden: int = 20, n_out: int = 4):
        super().__init__()
        self.lin0 = nn.Linear(n_in, hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.lin2 = nn.Linear(hidden, n_out)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(x)))))


def _llama(hidden: int = 32, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=3, tie_word_embeddings=False, **kw,
    )
    return LlamaForCausalLM(cfg)


def _qwen2(hidden: int = 32, **kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(  # grouped-query attention: 4 query heads share 2 key/value heads; q/k/v have biases
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=3, tie_word_embeddings=False, use_sliding_window=False, **kw,
    )
    return Qwen2ForCausalLM(cfg)


def _gpt2(hidden: int = 32, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(  # attention and MLP use transformers' Conv1D; embeddings tied with the head
        vocab_size=VOCAB_SIZE, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=3, **kw,
    )
    return GPT2LMHeadModel(cfg)


def _bert(hidden: int = 32, **kw):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout=0.0, num_labels=3, pad_token_id=0, **kw,
    )
    return BertForSequenceClassification(cfg)


def _mlp(hidden: int = 20, **kw):
    return TinyMLP(hidden=hidden)


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    build: Callable[..., nn.Module]
    task_type: Optional[str] = None  # PEFT task type: "CAUSAL_LM" wraps in PeftModelForCausalLM, etc.
    is_lm: bool = True  # token inputs (else float features)
    n_labels: int = 0  # sequence classifier: number of classes
    default_hidden: int = 32
    # modules PEFT adds to modules_to_save for this task type (the classifier head of SEQ_CLS)
    auto_modules_to_save: tuple[str, ...] = field(default=())
    transformers: bool = True  # a transformers PreTrainedModel (gradient_checkpointing_enable() and the like)

    def make(self, seed: int = 0, dtype: torch.dtype = torch.float32, hidden: Optional[int] = None) -> nn.Module:
        """The base model, random-initialised from `seed`, in eval mode (no dropout anyway)."""
        torch.manual_seed(seed)
        model = self.build(hidden=hidden or self.default_hidden)
        return model.to(dtype).eval()

    def inputs(self, batch: int = BATCH, seed: int = 123, dtype: torch.dtype = torch.float32) -> dict:
        """Keyword inputs for one batch (no labels)."""
        g = torch.Generator().manual_seed(seed)
        if not self.is_lm:
            return {"x": torch.randn(batch, 12, generator=g).to(dtype)}
        ids = torch.randint(4, VOCAB_SIZE, (batch, SEQ_LEN), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_with_labels(self, batch: int = BATCH, seed: int = 123, dtype: torch.dtype = torch.float32) -> dict:
        inputs = self.inputs(batch, seed, dtype)
        g = torch.Generator().manual_seed(seed + 1)
        if self.n_labels:
            inputs["labels"] = torch.randint(0, self.n_labels, (batch,), generator=g)
        elif self.is_lm:
            inputs["labels"] = inputs["input_ids"].clone()
        else:
            inputs["target"] = torch.randn(batch, 4, generator=g)
        return inputs

    def output(self, out) -> torch.Tensor:
        """The tensor to compare: logits (or the MLP's output)."""
        return out if isinstance(out, torch.Tensor) else out.logits

    def run(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "target")}
        return self.output(model(**inputs))

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if not self.is_lm:
            return torch.nn.functional.mse_loss(model(x=batch["x"]).float(), batch["target"])
        return model(**batch).loss


MODELS: dict[str, ModelSpec] = {
    "llama": ModelSpec("llama", _llama, task_type="CAUSAL_LM"),
    "qwen2_gqa": ModelSpec("qwen2_gqa", _qwen2, task_type="CAUSAL_LM"),
    "gpt2": ModelSpec("gpt2", _gpt2, task_type="CAUSAL_LM"),
    "bert_cls": ModelSpec(
        "bert_cls", _bert, task_type="SEQ_CLS", n_labels=3, auto_modules_to_save=("classifier", "score")
    ),
    "mlp": ModelSpec("mlp", _mlp, task_type=None, is_lm=False, default_hidden=20, transformers=False),
}
# the model kinds, in the order the per-model test ids come in ("<method>-<kind>")
MODEL_KINDS = list(MODELS)


class TokenDataset(torch.utils.data.Dataset):
    """`n` rows of random token ids (seeded) as a Trainer dataset: {"input_ids", "labels"} (labels = the ids)."""

    def __init__(self, n: int = 8, seq: int = 10, vocab: int = 64, seed: int = 0):
        self.x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}

