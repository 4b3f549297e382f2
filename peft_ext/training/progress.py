"""Callbacks that show a run as it trains: a progress bar with the loss, and scores every few steps."""

from __future__ import annotations

import time

from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback

from peft_ext.evaluation.scores import ScoreData, measure_scores


class LossProgressBar(ProgressCallback):
    """transformers' tqdm bar, labelled with the method, showing the loss instead of printing every log line."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc=self.label, dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3f}")


class ScoreCurve(TrainerCallback):
    """Scores the model every `every` steps; optionally stops once the new-task score reaches `target`.

    `eval_seconds` is the time spent scoring, so that the caller can report training time without it.
    """

    def __init__(self, tokenizer, data: ScoreData, every: int, target: float | None = None, stop_at_target=False):
        self.tokenizer, self.data, self.every = tokenizer, data, every
        self.target, self.stop_at_target = target, stop_at_target
        self.points: list[dict] = []
        self.eval_seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every <= 0 or state.global_step % self.every:
            return
        start = time.perf_counter()
        scores = measure_scores(model, self.tokenizer, self.data)
        self.eval_seconds += time.perf_counter() - start
        self.points.append({"step": state.global_step, **scores})
        if self.stop_at_target and self.target is not None and scores["new_task"] >= self.target:
            control.should_training_stop = True
