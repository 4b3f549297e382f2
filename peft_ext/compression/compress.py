"""`compress_delta(base, finetuned, out_dir)`: a full fine-tune -> a small Delta-CoMe adapter folder on its base.

Layer by layer: read one targeted weight from each model, form the delta in fp32 on the compute device (a GPU
when present), compress it (compress_layer), keep only the compressed tensors. Weights from folders are read
through memory maps one tensor at a time. GPTQ calibration runs the fine-tuned model over a small offline text
sample block by block (calibration.blockwise_hessians): one decoder block's weights, the calibration activations and
that block's Hessians in memory at a time, the block's layers compressed before the next block is read; so a 7B pair
fits in CPU memory (the computed peak is in docs/reproductions.md). BitDelta's
scales can then be distilled (`bitdelta_distill_steps`, bitdelta_distill.py): both models in memory, a few hundred
Adam steps on one scalar per layer so that the compressed model's logits match the fine-tune's.

The folder is a normal PEFT adapter: adapter_config.json + adapter_model.safetensors (loadable with
`PeftModel.from_pretrained(base, out_dir)` after `import peft_ext`), plus compression_report.json (bytes and
reconstruction error per layer, totals) and a README.md with the summary.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from peft_ext.tuners.base import in_out_features, is_conv1d, is_linear_like
from peft_ext.tuners.deltacome import DeltaComeConfig
from peft_ext.tuners.deltacome.compress_layer import compress_layer
from peft_ext.tuners.deltacome.layer import base_probes, delta_probes

from .calibration import Calibration, blockwise_hessians, calibration_batches, default_samples, layer_inputs
from .sources import ModelRef, WeightSource

WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "compression_report.json"


@dataclass
class CompressionResult:
    config: DeltaComeConfig
    state_dict: dict  # adapter_model.safetensors's tensors, keyed as PEFT saves them
    layers: list  # one report row per compressed module
    skipped: list = field(default_factory=list)  # rows for parameters left out (unchanged, or not storable)
    distillation: Optional[object] = None  # a BitDeltaDistillation when BitDelta's scales were distilled
    calibration: dict = field(default_factory=dict)  # GPTQ's calibration: tokens, widest input, rank-deficient layers

    @property
    def totals(self) -> dict:
        stored = sum(row["bytes"] for row in self.layers)
        dense = sum(row["dense_fp16_bytes"] for row in self.layers)
        extra = sum(t.numel() * t.element_size() for k, t in self.state_dict.items() if ".deltacome_dense." in k)
        return {
            "method": self.config.method, "budget": self.config.budget_fraction, "layers": len(self.layers),
            "compressed_bytes": stored, "dense_fp16_delta_bytes": dense, "ratio": stored / dense if dense else None,
            "dense_modules_bytes": extra, "file_bytes": stored + extra,
            "mean_rel_error": sum(r["rel_error"] for r in self.layers) / max(1, len(self.layers)),
            **self.calibration,
            **(self.distillation.totals() if self.distillation is not None else {}),
        }

    def report(self) -> dict:
        out = {"totals": self.totals, "layers": self.layers, "skipped": self.skipped}
        if self.distillation is not None:
            out["distillation"] = self.distillation.to_dict()
        return out

    def save(self, out_dir: str | os.PathLike) -> str:
        from safetensors.torch import save_file

        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.config.save_pretrained(out_dir)
        save_file({k: v.contiguous() for k, v in self.state_dict.items()}, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(out_dir, REPORT_NAME), "w") as f:
            json.dump(self.report(), f, indent=1)
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(model_card(self))
        return out_dir


def compress_delta(
    base: ModelRef,
    finetuned: ModelRef,
    out_dir: Optional[str | os.PathLike] = None,
    *,
    method: str = "deltacome",
    budget=1 / 16,
    bands=None,
    group_size: int = 128,
    quantizer: str = "gptq",
    target_modules="all-linear",
    exclude_modules=None,
    dense_modules="changed-norms",
    tokenizer=None,
    calibration: Calibration = None,
    calibration_samples: Optional[int] = None,
    calibration_seq_len: int = 256,
    hessian_memory_gb: float = 4.0,
    bitdelta_distill_steps: int = 0,
    bitdelta_distill_lr: float = 1e-4,
    device: Optional[str | torch.device] = None,
    progress: bool = True,
) -> CompressionResult:
    """Compress `finetuned - base` (nn.Modules, local folders or Hub ids) into a DELTACOME adapter.

    method / budget / bands / group_size / quantizer: as DeltaComeConfig. dense_modules: "changed-norms" (norm
    layers the fine-tune changed are stored whole, they are tiny), a list of module names to store whole (e.g. a
    new head), or None. Changed parameters stored neither way are listed in the report's "skipped".
    calibration (GPTQ, BitDelta's distillation): None (peft-ext's offline English text), a list of strings, or token
    ids (n, seq_len). calibration_samples (GPTQ): samples of calibration_seq_len tokens; None (default) sizes them by
    the widest targeted layer, 2 tokens per input and at least 32 samples (a 7B down_proj's 11,008 inputs: 86 x 256),
    as far as the text holds. A layer with more inputs than calibration tokens has a singular Hessian: GPTQ's damping
    then stands in for the missing directions, and the report counts such layers (`rank_deficient_layers`) and warns.
    hessian_memory_gb: only for targeted layers outside the decoder blocks (calibrated on the whole model).
    bitdelta_distill_steps (method="bitdelta"): 0 keeps BitDelta's closed-form scales α = mean|ΔW|; N > 0 refines
    every layer's α (the signs stay) with BitDelta's scale distillation: N Adam steps at bitdelta_distill_lr
    (BitDelta: 200 at 1e-4, cosine-annealed) so that the compressed model's logits match the fine-tune's on batches
    of 4 × 128 tokens of the calibration text (bitdelta_distill.distill_bitdelta). The base and the fine-tune are then
    held in memory (folders are loaded on `device`). With the default calibration text, the logit MSE is also
    measured on the offline held-out text; the report's totals carry both before and after.
    Returns a CompressionResult (written to out_dir when given).
    """
    config = DeltaComeConfig(
        method=method, budget=budget, bands=bands if bands is not None else DeltaComeConfig().bands,
        group_size=group_size, quantizer=quantizer, target_modules=target_modules, exclude_modules=exclude_modules,
    )
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_src, ft_src = WeightSource(base, "base"), WeightSource(finetuned, "finetuned")
    _check_same_architecture(base_src, ft_src)
    structure = base_src.structure()
    targets = _targeted_linear_modules(structure, config)
    _preflight(structure, targets, config, dense_modules)  # bad settings fail here, before any weight is read
    distill = _check_distill(method, bitdelta_distill_steps, bitdelta_distill_lr)
    if distill and not isinstance(calibration, torch.Tensor) and tokenizer is None:
        tokenizer = _folder_tokenizer(ft_src.folder) or _folder_tokenizer(base_src.folder)
        if tokenizer is None:
            from .bitdelta_distill import NO_TEXT

            raise ValueError(NO_TEXT.format(off="bitdelta_distill_steps=0"))
    deltas_needed = [n for n in targets if _weight_changed(base_src, ft_src, f"{n}.weight")]
    unchanged = [n for n in targets if n not in deltas_needed]
    if not deltas_needed:
        raise ValueError("the fine-tuned model's targeted linear weights equal the base's: there is no delta to compress.")

    groups, calib = [(deltas_needed, {})], {}
    if method == "deltacome" and quantizer == "gptq":
        if tokenizer is None and not isinstance(finetuned, nn.Module):
            tokenizer = _folder_tokenizer(ft_src.folder)  # None: calibration_batches says what to do
        widest = max(layer_inputs(structure.get_submodule(n)) for n in deltas_needed)
        samples = calibration_samples if calibration_samples is not None else default_samples(widest, calibration_seq_len)
        batches = calibration_batches(calibration, tokenizer, samples, calibration_seq_len)
        calib = _calibration_totals(structure, deltas_needed, batches, widest)
        ft_module = finetuned if isinstance(finetuned, nn.Module) else None
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as _load_causal_lm
        groups = blockwise_hessians(ft_module, ft_src, deltas_needed, batches, device, dtype, int(hessian_memory_gb * 2**30))

    state, rows, sign_stats = {}, [], {}
    bar = _progress(len(deltas_needed), progress)
    for chunk, hessians in groups:
        for name in chunk:
            bar.set_postfix_str(name)
            conv1d = is_conv1d(structure.get_submodule(name))
            w_base = base_src.get(f"{name}.weight").to(device=device, dtype=torch.float32)
            w_ft = ft_src.get(f"{name}.weight").to(device=device, dtype=torch.float32)
            if not (torch.isfinite(w_base).all() and torch.isfinite(w_ft).all()):
                raise ValueError(f"{name}.weight holds NaN or inf in the {'base' if not torch.isfinite(w_base).all() else 'fine-tuned'} model: fix that checkpoint first.")
            delta = (w_ft - w_base).T if conv1d else w_ft - w_base
            result = compress_layer(name, delta, method, config.budget_fraction, config.bands, group_size, hessians.pop(name, None))
            for key, tensor in result.tensors.items():
                state[f"base_model.model.{name}.deltacome_delta.{key}"] = tensor
            rows.append(result.row())
            if method == "bitdelta":  # ||dW - a S||^2 = sum dW^2 - 2 a sum|dW| + a^2 n for any a: the error of a distilled a
                rows[-1]["alpha"] = float(result.tensors["sign_alpha"])
                sign_stats[name] = (delta.numel(), float(delta.abs().double().sum()), float(delta.double().pow(2).sum()))
            probe_module = _ProbeView(w_base.T if conv1d else w_base)
            config.base_probes = {**(config.base_probes or {}), name: base_probes(probe_module)}
            config.delta_probes = {**(config.delta_probes or {}), name: delta_probes(probe_module.weight, delta)}
            config.layer_bands = {**(config.layer_bands or {}), name: result.bands}
            bar.update(1)
            del w_base, w_ft, delta
        del hessians
    bar.close()

    skipped = [{"parameter": f"{n}.weight", "reason": "unchanged by the fine-tune"} for n in unchanged]
    kept, more_skipped = _dense_modules(structure, base_src, ft_src, set(targets), dense_modules, state)
    skipped += more_skipped
    config.target_modules = sorted(deltas_needed)
    config.exclude_modules = None
    config.dense_modules = sorted(kept) or None
    config.task_type = "CAUSAL_LM" if hasattr(structure, "generate") and type(structure).__name__.endswith("ForCausalLM") else None
    config.base_model_name_or_path = None if isinstance(base, nn.Module) else os.fspath(base)
    result = CompressionResult(config, state, rows, skipped, calibration=calib)
    if distill:
        _distill(result, base, finetuned, base_src, calibration, tokenizer, bitdelta_distill_steps, bitdelta_distill_lr,
                 device, progress, sign_stats)
    if out_dir is not None:
        result.save(out_dir)
    return result


def _check_distill(method: str, steps, lr) -> bool:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"bitdelta_distill_steps must be an integer >= 0 (0: closed-form scales; BitDelta: 200), got {steps!r}.")
    if steps and method != "bitdelta":
        raise ValueError(
            f"bitdelta_distill_steps={steps} distils BitDelta's per-layer scales, but the method is {method!r}: "
            f"compress with method 'bitdelta', or set bitdelta_distill_steps=0."
        )
    if steps and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or lr == float("inf")):
        raise ValueError(f"bitdelta_distill_lr must be a positive number (BitDelta: 1e-4), got {lr!r}.")
    return steps > 0


def _distill(result, base, finetuned, base_src, calibration, tokenizer, steps, lr, device, progress, sign_stats) -> None:
    """BitDelta's scale distillation on `result` (its sign_alpha tensors replaced); the rows get the distilled alpha
    and its weight-space error, next to the closed-form ones."""
    from .bitdelta_distill import distill_bitdelta

    base_model = base if isinstance(base, nn.Module) else _load_causal_lm(base_src.folder, device)
    heldout = None
    if calibration is None:
        from peft_ext.data.english_text import english_text

        heldout = english_text("heldout")
    report = distill_bitdelta(
        base_model, finetuned, result, calibration, tokenizer=tokenizer, heldout=heldout, steps=steps, lr=lr,
        device=device, progress=progress, off_switch="bitdelta_distill_steps=0",
    )
    for row in result.layers:
        name = row["module"]
        n, abs_sum, sq_sum = sign_stats[name]
        a = report.alpha_after[name]
        row["alpha_closed_form"], row["rel_error_closed_form"] = row["alpha"], row["rel_error"]
        row["alpha"] = a
        row["rel_error"] = round(max(sq_sum - 2 * a * abs_sum + a * a * n, 0.0) ** 0.5 / max(sq_sum, 1e-60) ** 0.5, 6)


def _load_causal_lm(folder: str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def _folder_tokenizer(folder: Optional[str]):
    if folder is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - a folder without tokenizer files: the caller says what to do without one
        return None


class _ProbeView(nn.Module):
    """base_probes() reads `.weight` (out, in)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compressing layers", unit="layer", disable=not enabled)


def _check_same_architecture(base: WeightSource, ft: WeightSource) -> None:
    b, f = set(base.names()), set(ft.names())
    if b != f:
        only_b, only_f = sorted(b - f)[:3], sorted(f - b)[:3]
        raise ValueError(
            f"base and fine-tuned models have different parameters (only in base: {only_b}, only in fine-tune: "
            f"{only_f}): a delta needs the same architecture. Check that --finetuned was fine-tuned from --base."
        )
    for name in sorted(b):
        if base.shape(name) != ft.shape(name):
            raise ValueError(
                f"{name} has shape {base.shape(name)} in the base but {ft.shape(name)} in the fine-tune: a delta needs "
                f"identical shapes (a resized vocabulary? then store that module whole via dense_modules=[...])."
            )


def _targeted_linear_modules(structure: nn.Module, config: DeltaComeConfig) -> list[str]:
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    config = _maybe_include_all_linear_layers(config, structure)
    names = [
        n for n, m in structure.named_modules()
        if n and is_linear_like(m) and check_target_module_exists(config, n)
    ]
    if not names:
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear layer of {type(structure).__name__}.")
    return names


def _preflight(structure: nn.Module, targets: list[str], config: DeltaComeConfig, dense_modules) -> None:
    """Settings that cannot work, found from shapes alone: dense_modules naming missing modules, a budget that
    cannot hold the fixed bands in some layer."""
    from peft_ext.tuners.deltacome.bands import solve_bands

    if isinstance(dense_modules, (list, tuple, set)):
        modules = dict(structure.named_modules())
        missing = sorted(n for n in dense_modules if n not in modules)
        if missing:
            raise ValueError(f"dense_modules names modules that {type(structure).__name__} does not have: {missing[:5]}.")
    elif dense_modules not in (None, "changed-norms"):
        raise ValueError(f"dense_modules must be 'changed-norms', None or a list of module names, got {dense_modules!r}.")
    if config.method != "deltacome":
        return
    for name in targets:
        in_f, out_f = in_out_features(structure.get_submodule(name))
        solve_bands(out_f, in_f, config.budget_fraction, config.bands, config.group_size, name)


def _weight_changed(base: WeightSource, ft: WeightSource, key: str) -> bool:
    return not torch.equal(base.get(key), ft.get(key))


def _dense_modules(structure, base_src, ft_src, targets: set, dense_modules, state: dict):
    """Stores whole the modules asked for (norms the fine-tune changed, by default); reports other changes."""
    kept, skipped = set(), []
    wanted = set(dense_modules) if isinstance(dense_modules, (list, tuple, set)) else set()
    for name, module in structure.named_modules():
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if not name or not own or name in targets:
            continue
        changed = [p for p in own if ft_src.has(f"{name}.{p}") and _weight_changed(base_src, ft_src, f"{name}.{p}")]
        is_norm = "norm" in type(module).__name__.lower() or name.split(".")[-1].startswith("ln")
        if name in wanted or (changed and dense_modules == "changed-norms" and is_norm):
            for p in own:
                state[f"base_model.model.{name}.deltacome_dense.{p}"] = ft_src.get(f"{name}.{p}").detach().cpu().contiguous()
            kept.add(name)
        else:
            skipped += [{"parameter": f"{name}.{p}", "reason": "changed but not stored (add it to dense_modules)"} for p in changed]
    return kept, skipped


def _calibration_totals(structure: nn.Module, names: list, batches: list, widest: int) -> dict:
    """What GPTQ calibrated on; layers with more inputs than calibration tokens have a singular Hessian (warned)."""
    import warnings

    tokens = sum(int(b.numel()) for b in batches)
    deficient = [n for n in names if layer_inputs(structure.get_submodule(n)) > tokens]
    if deficient:
        warnings.warn(
            f"GPTQ calibrates on {tokens:,} tokens, fewer than the {widest:,} inputs of the widest layer: the Hessians "
            f"of {len(deficient)} layers ({deficient[0]}, ...) are singular and GPTQ's 1 % damping stands in for the "
            f"directions the text does not reach. Give more calibration text (calibration=, calibration_samples=).",
            stacklevel=3,
        )
    return {"calibration_tokens": tokens, "calibration_widest_input": widest, "rank_deficient_layers": len(deficient)}


def model_card(result: CompressionResult) -> str:
    t = result.totals
    lines = [
        "---", "library_name: peft", "tags:", "- peft-ext", "- deltacome", "---", "",
        f"# Delta-CoMe compressed delta ({result.config.method})", "",
        "A full fine-tune stored as its compressed delta on the base model, made with peft-ext "
        "(`pip install peft-ext`; load with `PeftModel.from_pretrained(base, this_folder)` after `import peft_ext`).",
        "", f"- base: {result.config.base_model_name_or_path or '(in-memory model)'}",
        f"- budget: {t['budget']:.6g} of the dense fp16 delta; stored {t['compressed_bytes']:,} bytes for "
        f"{t['layers']} layers ({(t['ratio'] or 0):.4f} of {t['dense_fp16_delta_bytes']:,}), plus "
        f"{t['dense_modules_bytes']:,} bytes of modules stored whole",
        f"- mean relative reconstruction error: {t['mean_rel_error']:.4f} (per layer: {REPORT_NAME})",
    ]
    if result.distillation is not None:
        d = result.distillation
        held = (f"; held-out text {d.heldout_loss_before:.4g} -> {d.heldout_loss_after:.4g}"
                if d.heldout_loss_before is not None else "")
        lines.append(
            f"- BitDelta scales distilled: {d.steps} Adam steps (lr {d.lr:g}, {d.schedule}) on {d.samples} x {d.seq_len} "
            f"tokens; {d.match} MSE vs the fine-tune {d.loss_before:.4g} -> {d.loss_after:.4g} on the calibration text{held}"
        )
    lines.append("")
    return "\n".join(lines)
