from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft_ext.tuners.config_base import PeftExtConfig

STRATEGIES = ("matrix", "param", "layer", "explicit")
RESELECT = ("stage", "epoch", "never")
SAVE_FORMATS = ("delta", "full")


@dataclass
class HftConfig(PeftExtConfig):
    """Half Fine-Tuning (Hui et al., 2024, arXiv 2404.18466): train a random half of the model, freeze the rest.

    The frozen half keeps what the model knew; the trained half learns the new task. No architecture change:
    each selected module trains an adapter-owned copy of its weights (`hft_weight`) that its forward uses in
    place of the frozen base weights, one matmul as in full fine-tuning. `merge_and_unload()` gives the
    fine-tuned dense model, `unload()` the exact base, `disable_adapter()` the base outputs. The frozen originals
    of the selected modules are not read while the adapter trains: `peft_ext.tuners.hft.layer.offload_originals(
    model)` keeps them in pinned CPU memory (disabling, merging, unloading and saving still get them).

    Args:
        target_modules: the pool that the half is drawn from: a list of module-name suffixes, a regex, or
            "all-linear". `None` (default) takes every linear layer (nn.Linear or GPT-2's Conv1D) inside the
            transformer blocks, which is what the paper does; the output head and the embeddings stay frozen
            (put them in `modules_to_save` to train them fully). Never selected: the `out_proj` of an
            nn.MultiheadAttention (the attention reads its weight directly; naming it is refused), and an
            embedding tied to the output head (tie_word_embeddings=True: refused, with the way to untie them).
        exclude_modules: names or regex that are never selected (norms included).
        layers_to_transform, layers_pattern: as in PEFT's LoraConfig: only the blocks with these indices (found
            with `layers_pattern`, e.g. "layer" for BERT/DeBERTa, "layers" for Llama) are drawn from, norms
            included.
        ratio: the fraction of each group to train, in (0, 1]. Paper: 0.5.
        strategy: how the fraction is drawn.
            "matrix" (paper, default): per block and role (attention, feed-forward, norms), `ratio` of the
            matrices; an odd group alternates across blocks (MLP gate/up/down: 2, 1, 2, 1, ...) so the total
            is `ratio` of the matrices.
            "param": every target trains a random `ratio` of its output rows (finer grain; costs one
            weight-sized `index_copy` per forward).
            "layer": `ratio` of the blocks train all their targets.
            "explicit": exactly `selected_modules`.
        seed: the seed of the draw; the drawn set is written to `selected_modules`, so a saved adapter is
            self-describing and reloads the same selection.
        train_norms: also draw `ratio` of each block's norm layers (paper: yes).
        selected_modules: the modules trained now (full names). Filled in by the draw; give it yourself with
            strategy="explicit".
        trained_modules: every module that holds trained weights (the union over re-selection stages); filled in.
        candidate_modules: the pool every draw takes its selection from (full names, sorted), fixed at the first
            draw from target_modules / exclude_modules / train_norms and saved, so that later stages draw from the
            same pool (PEFT rewrites target_modules="all-linear" into every linear layer after injection, an
            encoder's pooler included). Filled in; give it yourself to draw from exactly these modules.
        reselect: when the training callback re-draws the selection: "stage" (each `trainer.train()` after the
            first, for continual learning; paper), "epoch", or "never".
        stage: how many re-selections this adapter has been through (the draw of stage s uses seed + s).
        trained_stages: how many training runs (`trainer.train()` calls) this adapter has finished; the callback
            re-draws at the start of a run when a finished run used the current selection.
        save_format: "delta" (default) saves, per trained tensor, the smaller exact form: W_ft - W_0 in the
            tensor's own dtype (bf16 for a bf16 model, fp32 for fp32 weights and for the fp32 masters of an fp16
            model) where W_0 + delta rebuilds W_ft bit for bit, else W_ft itself; the file is never larger than
            with "full". (In bf16 a delta is exact only where every entry stays within a factor 2 of its
            pre-trained value, e.g. norms; matrices whose small entries cross zero are saved full.) "full" saves
            every tensor's values. Either way a saved adapter reloads bit-identically; files with the fp32 deltas of
            16-bit weights that earlier versions wrote still load.
        init_weights: True starts every copy equal to the base weights (outputs equal the base at init).
            False adds small noise, for tests that need a non-identity adapter: drawn from torch's seed
            (`torch.manual_seed`), `seed` and the module's name, and different for two adapters of one model
            built from the same seeds.
        modules_to_save: modules trained in full and saved whole (e.g. a classifier head).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Pool of modules the selection is drawn from (default: linear layers in blocks)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never selected."})
    ratio: float = field(default=0.5, metadata={"help": "Fraction trained, in (0, 1]."})
    strategy: Literal["matrix", "param", "layer", "explicit"] = field(default="matrix")
    seed: int = field(default=0, metadata={"help": "Seed of the random selection."})
    train_norms: bool = field(default=True, metadata={"help": "Also select half of each block's norms."})
    selected_modules: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained now (filled in)."})
    trained_modules: Optional[list[str]] = field(default=None, metadata={"help": "Modules holding trained weights."})
    candidate_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "The pool every stage's selection is drawn from (filled in at the first draw)."}
    )
    reselect: Literal["stage", "epoch", "never"] = field(default="stage")
    stage: int = field(default=0, metadata={"help": "Number of re-selections so far."})
    trained_stages: int = field(default=0, metadata={"help": "Number of finished training runs."})
    save_format: Literal["delta", "full"] = field(default="delta")
    init_weights: bool = field(default=True, metadata={"help": "Start equal to the base (True) or perturbed."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved whole."})
    # read by PEFT's target matching; kept so that `check_target_module_exists` works as for LoRA
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def training_companions(self) -> tuple[str, ...]:
        """HFT's stage re-selection callback, unless reselect="never"."""
        return () if self.reselect == "never" else ("peft_ext.training.hft_reselect:HftReselectCallback",)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) <= 1.0:
            raise ValueError(
                f"HftConfig.ratio must be in (0, 1] (the fraction of the model to train; the paper uses 0.5), "
                f"got {self.ratio!r}."
            )
        self.ratio = float(self.ratio)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("reselect", self.reselect, RESELECT)
        _check_choice("save_format", self.save_format, SAVE_FORMATS)
        if self.strategy == "explicit" and not self.selected_modules:
            raise ValueError(
                'HftConfig.strategy="explicit" needs HftConfig.selected_modules: the full names of the modules to '
                'train (e.g. ["model.layers.0.self_attn.q_proj"]); or pick strategy="matrix" to draw them.'
            )
        if self.selected_modules is not None:
            self.selected_modules = sorted(set(self.selected_modules))
        if self.trained_modules is not None:
            self.trained_modules = sorted(set(self.trained_modules))
        if self.candidate_modules is not None:
            if isinstance(self.candidate_modules, str) or not all(isinstance(n, str) for n in self.candidate_modules):
                raise ValueError(
                    f"HftConfig.candidate_modules must be a list of full module names (e.g. "
                    f'["model.layers.0.self_attn.q_proj"]), got {self.candidate_modules!r}.'
                )
            self.candidate_modules = sorted(set(self.candidate_modules))
            outside = sorted(set(self.selected_modules or ()) - set(self.candidate_modules))
            if outside and self.strategy != "explicit":
                raise ValueError(
                    f"HftConfig.selected_modules names modules outside candidate_modules (the pool it is drawn "
                    f"from): {outside[:5]}. Leave candidate_modules out, or use strategy='explicit'."
                )


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"HftConfig.{name} must be one of {list(choices)}, got {value!r}.")
