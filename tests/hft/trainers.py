"""The Trainer the HFT re-selection tests drive: a few steps on random tokens, CPU, weight decay on (so the
decay / no-decay optimizer groups differ), no checkpoints or logging unless asked."""

from transformers import Trainer, TrainingArguments

from peft_ext.testing.models import TokenDataset


def reselect_trainer(model, out, callbacks, **kwargs) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", weight_decay=0.1, **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)
