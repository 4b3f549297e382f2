"""Export a COLA chain as ONE plain PEFT LoRA that loads without peft-ext.

The chain's update in each module is a sum of low-rank products, sum_j s_j B_j A_j = B' A with A = [A_1; ...; A_M]
(rank R = sum of the link ranks) and B' = [s_1 B_1, ..., s_M B_M]. The export writes A and B' as the module's
`lora_A` / `lora_B` with lora_alpha = r = R, so PEFT's scaling is exactly 1 whatever the links' ranks, alphas or
rslora (modules of another total rank, from rank_pattern, get rank_pattern / alpha_pattern entries).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from peft_ext.version import __version__

from .config import ColaConfig
from .model import ColaModel

CHAIN_FILE = "cola_chain.json"


def export_as_lora(
    model: PeftModel, path: Union[str, Path], adapter_name: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> LoraConfig:
    """Write the COLA adapter `adapter_name` (default: the active one) of `model` to the folder `path` as a plain
    PEFT LoRA of rank M*r (`peft_type` LORA: `PeftModel.from_pretrained(base, path)` loads it without peft-ext and
    reproduces the COLA model's outputs up to float rounding). Also writes `cola_chain.json` (the chain's metadata)
    and a README.md. `dtype`: the dtype of the written factors (default: the adapter's, fp32 unless changed).
    Returns the LoraConfig written."""
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, ColaModel):
        raise TypeError(
            f"export_as_lora takes the PeftModel that holds a COLA adapter (get_peft_model(base, ColaConfig(...)) or "
            f"PeftModel.from_pretrained), got {type(model).__name__}."
        )
    tuner: ColaModel = model.base_model
    adapter_name = adapter_name or tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"export_as_lora: no adapter {adapter_name!r}; this model has {sorted(tuner.peft_config)}.")
    config: ColaConfig = tuner.peft_config[adapter_name]
    layers = list(tuner.cola_layers(adapter_name))
    if not layers:
        raise ValueError(f"export_as_lora: adapter {adapter_name!r} holds no COLA layer.")

    # everything but the COLA factors (modules_to_save copies, ...) is written as saved
    state = {
        k: v
        for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
        if ".lora_A." not in k and ".lora_B." not in k and ".cola_merged_" not in k
    }
    ranks = {}
    with torch.no_grad():
        for name, layer in layers:
            a, b = layer.folded_factors(adapter_name)
            out_dtype = dtype or a.dtype
            state[f"base_model.model.{name}.lora_A.weight"] = a.detach().to(out_dtype).contiguous().clone()
            state[f"base_model.model.{name}.lora_B.weight"] = b.detach().to(out_dtype).contiguous().clone()
            ranks[name] = a.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(n): r for n, r in ranks.items() if r != rank}
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: each link's scaling is folded into lora_B
        target_modules=sorted(ranks),
        rank_pattern=others,
        alpha_pattern=dict(others),
        fan_in_fan_out=config.fan_in_fan_out,
        bias="none",
        use_rslora=False,
        lora_dropout=config.lora_dropout,
        modules_to_save=config.modules_to_save,
        trainable_token_indices=config.trainable_token_indices,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(path))
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    links = config.current_link + 1
    chain = {
        "method": "COLA",
        "exported_by": f"peft-ext {__version__}",
        "links": links,
        "chain_length": config.chain_length,
        "link_ranks": config.ranks_for(config.r)[:links],
        "total_rank": rank,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "link_boundaries": config.link_boundaries,
    }
    (path / CHAIN_FILE).write_text(json.dumps(chain, indent=2) + "\n")
    (path / "README.md").write_text(_card(config, chain))
    return lora


def _card(config: ColaConfig, chain: dict) -> str:
    base = config.base_model_name_or_path or "the base model it was trained on"
    return (
        "---\nlibrary_name: peft\ntags:\n- lora\n- cola\n- peft-ext\n---\n\n"
        f"# COLA chain exported as one LoRA\n\n"
        f"A chain of {chain['links']} LoRA link(s) (COLA, Chain of LoRA; Xia et al., 2024) trained with peft-ext, "
        f"written as one plain PEFT LoRA of rank {chain['total_rank']} (each link's scaling folded into lora_B, "
        f"lora_alpha = r). It loads without peft-ext:\n\n"
        f"```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"<this folder>\")  "
        f"# base: {base}\n```\n\n`{CHAIN_FILE}` records the chain (links, ranks, merge steps).\n"
    )
