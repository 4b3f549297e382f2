"""The SCALE method's training companion: a callback that logs the mean |s| of the active adapter (what a
method's own driver would do; it shows that `peft-ext train` attaches a third-party method's companion)."""

from transformers import TrainerCallback


class ScaleLogCallback(TrainerCallback):
    def __init__(self):
        self.seen: list[float] = []

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None or logs is None:
            return
        values = [p.detach().abs().mean() for n, p in model.named_parameters() if ".scale_vector." in n]
        if values:
            logs["scale_abs_mean"] = float(sum(values) / len(values))  # reaches the trackers (report_to)
            self.seen.append(logs["scale_abs_mean"])
