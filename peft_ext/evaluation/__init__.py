"""Scorers for fine-tuned models: pure functions of (model, tokenizer, data)."""

from .lm_loss import lm_loss
from .multiple_choice import multiple_choice_accuracy, option_scores, predictions

__all__ = ["lm_loss", "multiple_choice_accuracy", "option_scores", "predictions"]
