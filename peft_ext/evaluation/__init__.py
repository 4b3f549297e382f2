"""Scorers for fine-tuned models: pure functions of (model, tokenizer, data)."""

from .completion_loss import completion_loss
from .exact_match import exact_match
from .lm_loss import lm_loss
from .multiple_choice import multiple_choice_accuracy, option_scores, predictions

__all__ = ["completion_loss", "exact_match", "lm_loss", "multiple_choice_accuracy", "option_scores", "predictions"]
