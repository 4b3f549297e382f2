"""Which modules HFT trains: the candidate pool and the seeded draw of "half" of it.

A candidate is a module whose own parameters HFT can replace: nn.Linear, GPT-2's Conv1D, nn.Embedding,
and norm layers (any module whose class name contains "Norm" and that owns a `weight`). Candidates are
grouped by transformer block (the first integer in the module path: `layers.3.`, `h.3.`, `layer.3.`) and
by role (norm, attention, feed-forward), and each group trains `ratio` of its members.

Never candidates: the `out_proj` of an nn.MultiheadAttention (the attention reads `out_proj.weight` itself, so a
copy would never be used or trained) and an embedding whose weight is tied to another module (the output head of
GPT-2 or of a Llama with `tie_word_embeddings=True`: a copy would untie them). `exclude_modules` and
`layers_to_transform` / `layers_pattern` apply to every candidate, norms included, as PEFT applies them.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from peft_ext.tuners.base import is_linear_like

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Candidate:
    name: str
    block: Optional[int]  # None outside the repeated blocks
    role: str  # "norm", "attention", "mlp", "embedding"


def is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter)


def is_supported(module: nn.Module) -> bool:
    if type(module) is NonDynamicallyQuantizableLinear:  # nn.MultiheadAttention.out_proj: see read_directly
        return False
    return is_linear_like(module) or is_norm(module) or isinstance(module, nn.Embedding)


def read_directly(model: nn.Module) -> dict[str, str]:
    """{name: why} of linear layers whose parent reads their weight itself instead of calling them (HFT's copy would
    never be used): the out_proj of every nn.MultiheadAttention."""
    return {
        f"{name}.out_proj" if name else "out_proj": f"{type(module).__name__} reads out_proj.weight directly"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def tied_weights(model: nn.Module, names) -> dict[str, list[str]]:
    """{name: other modules sharing its weight} for the modules of `names` whose weight is tied to another module's
    (an input embedding and the output head)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else None
        weight = getattr(module, "weight", None) if module is not None else None
        if isinstance(weight, nn.Parameter):
            holders.setdefault(id(weight), []).append(name.removesuffix(".base_layer"))
    modules = dict(named_base_modules(model))
    tied = {}
    for name in names:
        weight = getattr(modules.get(name), "weight", None)
        others = sorted({n for n in holders.get(id(weight), []) if n != name and not n.startswith(name + ".")})
        if others:
            tied[name] = others
    return tied


def check_not_tied(model: nn.Module, names, modules_to_save=None) -> None:
    """Refuse modules whose weight is tied to another module's: HFT's trained copy would serve only one of them
    (the input embedding, not the output head), so training and the merged model would disagree. A partner in
    `modules_to_save` is fine: it trains its own (untied) copy, which the merged model keeps."""
    saved = set(modules_to_save or ())

    def is_saved(other: str) -> bool:
        return other in saved or other.split(".")[-1] in saved or other.removesuffix(".original_module") in saved

    tied = {n: others for n, others in tied_weights(model, names).items() if not all(map(is_saved, others))}
    if not tied:
        return
    name, others = next(iter(tied.items()))
    raise ValueError(
        f"HFT cannot train {name}: its weight is tied to {', '.join(others)} (tie_word_embeddings=True), and HFT's "
        f"trained copy would replace it only in {name}, so the trained model and the merged one would differ. "
        f"Leave it out of target_modules, or untie the weights before get_peft_model: "
        f"`model.config.tie_word_embeddings = False; head = model.get_output_embeddings(); "
        f"head.weight = torch.nn.Parameter(head.weight.detach().clone())` (both start equal; HFT then trains {name} "
        f"and the output head stays frozen), or put the output head in modules_to_save (it then trains its own copy)."
    )


def quantized_kind(module: nn.Module) -> Optional[str]:
    """The kind of a bitsandbytes-quantised weight ("Params4bit", "Int8Params"), else None."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    return kind if kind in ("Params4bit", "Int8Params") else None


def role_of(name: str, module: nn.Module) -> str:
    if is_norm(module):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    parts = name.lower().split(".")
    return "attention" if any("attn" in p or "attention" in p for p in parts) else "mlp"


def block_of(name: str) -> Optional[int]:
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def named_base_modules(model: nn.Module):
    """(name, module) of the model as the user sees it: an HFT-wrapped module counts as its base layer, and the
    internals of tuner layers and of `modules_to_save` wrappers are skipped."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            skip.append(name + ".")
            if isinstance(module, AuxiliaryTrainingWrapper):
                continue
            module = module.get_base_layer()
        yield name, module


def find_candidates(model: nn.Module, config) -> list[Candidate]:
    """The pool `config.target_modules` names (or the default pool), plus block norms if `train_norms`."""
    modules = dict(named_base_modules(model))
    output_head = _output_head_names(model, modules)
    saved = set(config.modules_to_save or [])
    direct = read_directly(model)

    def excluded(name: str) -> bool:
        return name in output_head or name.split(".")[-1] in saved or name in saved

    if config.target_modules is None or config.target_modules == "all-linear":
        linear = [n for n, m in modules.items() if is_linear_like(m) and n not in direct]
        in_blocks = [n for n in linear if block_of(n) is not None]
        pool = in_blocks or linear
        pool = [n for n in pool if not excluded(n) and _in_scope(config, n)]
    else:
        pool = [n for n in modules if not excluded(n) and _matches(config, n)]
        unsupported = [
            f"{n} ({type(modules[n]).__name__})" for n in pool if not is_supported(modules[n]) and n not in direct
        ]
        if unsupported:
            raise ValueError(
                f"HftConfig.target_modules={config.target_modules!r} matches modules HFT cannot train: "
                f"{', '.join(unsupported[:5])}. HFT trains nn.Linear, Conv1D, nn.Embedding and norm layers; "
                f"name those (e.g. the projections q_proj, v_proj) instead of their containers."
            )
        _check_not_read_directly(config, [n for n in pool if n in direct], direct)
    check_not_tied(model, pool, config.modules_to_save)
    if not pool:
        examples = sorted({n.split(".")[-1] for n, m in modules.items() if is_supported(m)})
        raise ValueError(
            f"HftConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Modules HFT can train here are named like: {', '.join(examples[:12]) or 'none'}. Set "
            f"target_modules to some of these, or leave it None for every linear layer in the blocks."
        )
    names = set(pool)
    if config.train_norms:
        names |= {
            n for n, m in modules.items()
            if is_norm(m) and block_of(n) is not None and not excluded(n) and _in_scope(config, n)
        }
    quantized = [f"{n} ({quantized_kind(modules[n])})" for n in sorted(names) if quantized_kind(modules[n])]
    if quantized:
        raise ValueError(
            f"HFT cannot train bitsandbytes-quantised layers ({', '.join(quantized[:3])}, ...): it trains the "
            f"selected weights themselves, and a 4/8-bit weight has no full-precision values to train. Load the "
            f"model in bf16 or fp32 for HFT, or use LoRA (QLoRA) on a quantised model."
        )
    order = {n: i for i, n in enumerate(modules)}
    return [Candidate(n, block_of(n), role_of(n, modules[n])) for n in sorted(names, key=order.__getitem__)]


def draw(candidates: list[Candidate], strategy: str, ratio: float, seed: int) -> list[str]:
    """The seeded selection: full names of the modules to train."""
    rng = random.Random(seed)
    if strategy == "param":
        return [c.name for c in candidates]
    if strategy == "layer":
        blocks = sorted({c.block for c in candidates if c.block is not None})
        chosen = set(rng.sample(blocks, _round_half_up(ratio * len(blocks)))) if blocks else set()
        outside = _draw_by_group([c for c in candidates if c.block is None], ratio, rng)
        return [c.name for c in candidates if c.block in chosen] + outside
    if strategy == "matrix":
        return _draw_by_group(candidates, ratio, rng)
    raise ValueError(f"strategy {strategy!r} does not draw a selection")


def _draw_by_group(candidates: list[Candidate], ratio: float, rng: random.Random) -> list[str]:
    """`ratio` of each (block, role) group; odd groups alternate round-up/round-down across blocks per role."""
    groups: dict[tuple, list[str]] = {}
    for c in candidates:
        groups.setdefault((c.role, -1 if c.block is None else c.block), []).append(c.name)
    seen: dict[str, int] = {}  # per role: members so far
    taken: dict[str, int] = {}  # per role: selected so far
    selected = []
    for (role, _), names in sorted(groups.items()):
        seen[role] = seen.get(role, 0) + len(names)
        k = min(len(names), max(0, _round_half_up(ratio * seen[role]) - taken.get(role, 0)))
        taken[role] = taken.get(role, 0) + k
        selected += rng.sample(sorted(names), k)
    return selected


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _match_result(config, name: str, target_modules):
    # PEFT's own matcher (suffixes, regex, exclude_modules, layers_to_transform), on the fields it reads
    view = SimpleNamespace(
        target_modules=target_modules,
        target_parameters=None,
        exclude_modules=config.exclude_modules,
        modules_to_save=None,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    return check_target_module_exists(view, name)


def _matches(config, name: str) -> bool:
    result = _match_result(config, name, config.target_modules)
    return bool(result) and not isinstance(result, _ExcludedModule)


def _in_scope(config, name: str) -> bool:
    """Not excluded by `exclude_modules`, and in `layers_to_transform` (found with `layers_pattern` as PEFT does)
    when that is set: for the modules that target_modules does not name one by one (the default pool, the norms)."""
    result = _match_result(config, name, [name.rsplit(".", 1)[-1]] if "." in name else [name])
    return bool(result) and not isinstance(result, _ExcludedModule)


def _check_not_read_directly(config, names: list[str], why: dict[str, str]) -> None:
    if names:
        raise ValueError(
            f"HftConfig.target_modules={config.target_modules!r} matches {', '.join(names[:3])}, which HFT cannot "
            f"train: {why[names[0]]} (a trained copy would never be used). Leave it out of target_modules (e.g. "
            f"exclude_modules=['out_proj']); the default pool skips it."
        )


def _output_head_names(model: nn.Module, modules: dict) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return set()
    return {n for n, m in modules.items() if m is head or getattr(m, "base_layer", None) is head}
