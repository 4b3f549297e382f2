"""Keep the command line's own output readable: no weight-loading or dataset-mapping bars, no known deprecation noise."""

from __future__ import annotations

import warnings


def quiet_libraries() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own bars only; the Trainer's progress bar stays
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # TRL 1.16 passes gradient_checkpointing, which transformers 5 renames: harmless, said on every run
    warnings.filterwarnings("ignore", message=".*(gradient|activation)_checkpointing.*", category=FutureWarning)
