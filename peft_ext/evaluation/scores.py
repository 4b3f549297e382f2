"""The three numbers a fine-tuning run is judged by: new-task score, old-knowledge score, LM loss on real text.

Both scores are multiple-choice accuracies by log-likelihood and the loss is teacher-forced NLL, so a change of
answer format cannot fake either learning or forgetting (design/methods/hft.md, "Small-scale reproduction").
"""

from __future__ import annotations

from dataclasses import dataclass

from peft_ext.data import heldout_english, new_task_probes, old_knowledge_probes
from peft_ext.evaluation import lm_loss, multiple_choice_accuracy

SCORE_NAMES = ("new_task", "old_knowledge", "lm_loss")


@dataclass
class ScoreData:
    new_task: list[dict]
    old_knowledge: list[dict]
    english: list[str]
    max_length: int = 128


def builtin_score_data(english_texts: int | None = 48, max_length: int = 128) -> ScoreData:
    """The built-in probes: 48 fictional facts, 45 world-knowledge questions, `english_texts` held-out paragraphs."""
    return ScoreData(new_task_probes(), old_knowledge_probes(), heldout_english(english_texts), max_length)


def measure_scores(model, tokenizer, data: ScoreData, batch_size: int = 64) -> dict[str, float]:
    """{"new_task": accuracy, "old_knowledge": accuracy, "lm_loss": mean token NLL}."""
    return {
        "new_task": multiple_choice_accuracy(model, tokenizer, data.new_task, batch_size),
        "old_knowledge": multiple_choice_accuracy(model, tokenizer, data.old_knowledge, batch_size),
        "lm_loss": lm_loss(model, tokenizer, data.english, data.max_length, batch_size=max(1, batch_size // 8)),
    }
