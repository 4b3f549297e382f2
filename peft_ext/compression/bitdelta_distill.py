"""BitDelta's scale distillation (Liu et al., 2024): refine every layer's scale α of a 1-bit delta α·sign(ΔW) so
that the base + compressed-delta model's outputs match the fine-tuned model's. The signs stay; only the one fp32
scale per matrix moves, starting from the closed-form α = mean|ΔW| (the weight-space optimum for fixed signs).

BitDelta's published recipe (the paper, and github FasterDecoding/BitDelta `bitdelta/train.py` with
`scripts/train_example.bash`): loss = MSE between the two models' logits; Adam, lr 1e-4 annealed to 0 by a cosine
schedule over the steps (the code: AdamW with torch's default decay 0.01, negligible at this lr; here plain Adam);
200 steps of batch 4 × 128 tokens of C4 (800 samples). The defaults here are the same, on peft-ext's offline
English text instead of C4 (about 15k training tokens: 118 samples of 128 with SmolLM2's
tokenizer, so 200 × 4 samples cycle over them about 7 times).

Why logits (match="logits", the default): it is BitDelta's objective, and the logits are what generation uses;
the final hidden state (match="hidden", the head's input) weighs every hidden direction equally, including ones the
head barely reads. Both are offered; with an unchanged head the logit MSE is the hidden-state error measured
through the head.

Memory: the fine-tuned model runs once over the calibration (and held-out) text before any step; what is kept is
its head inputs (n × L × hidden), and its logits are recomputed per batch through its output head (the n × L ×
vocab logits themselves would be 85 × larger for SmolLM2's 49k vocabulary). Of a fine-tune loaded from a folder
only the head is kept.

The model that is optimised computes what the served adapter computes (DeltaComeLinear's unmerged forward): each
targeted layer's output is the base layer's own output plus x·(α·S)ᵀ in fp32, cast back to the output's dtype
(S = the stored signs, unpacked once and kept as int8), through a forward hook on the base layer; the norms the
adapter stores whole take the fine-tune's values (torch.func.functional_call). So neither the base nor a given
PeftModel is modified, nor ever put in training mode, and the hooks are removed after every call. In a bf16 model
this matters: α·S is about 1e-3 of the weights, below bf16's resolution, so fitting α to the merged weight
W + α·S rounded to bf16 (as this module did before) fitted a function close to the base's, not the served one.
Gradients reach the α leaves through the fp32 delta term (checked at the first step); the backward forms each layer's
dense (out × in) gradient to reduce it to the scalar. Going through the tuner's DeltaComeLinear instead (eval
mode, torch.enable_grad, the sign_alpha buffers requiring grad) also differentiates, but its forward unpacks every
layer's signs at every call. The tests check that this student's outputs equal the PeftModel's own forward, in fp32
and in bf16.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

DISTILL_STEPS = 200  # BitDelta's
DISTILL_LR = 1e-4
DISTILL_BATCH_SIZE = 4
DISTILL_SEQ_LEN = 128
MATCHES = ("logits", "hidden")
SCHEDULES = ("cosine", "constant")

NO_TEXT = (
    "BitDelta's scale distillation matches the fine-tune's outputs on text, which needs a tokenizer: pass "
    "tokenizer=, calibration= token ids (n_samples, seq_len), or {off} (the closed-form scales mean|ΔW|, no "
    "calibration)."
)

Calibration = Union[None, torch.Tensor, Sequence[str], Sequence[torch.Tensor]]


@dataclass
class BitDeltaDistillation:
    """What a distillation did. Losses are the mean over batches of the output-matching MSE (`match`)."""

    steps: int
    lr: float
    schedule: str
    match: str
    batch_size: int
    samples: int  # distinct calibration samples (the steps cycle over them)
    seq_len: int
    loss_before: float  # on the calibration batches, with the closed-form scales
    loss_after: float
    heldout_samples: int = 0
    heldout_loss_before: Optional[float] = None
    heldout_loss_after: Optional[float] = None
    alpha_before: dict = field(default_factory=dict)  # module name -> alpha
    alpha_after: dict = field(default_factory=dict)
    loss_curve: list = field(default_factory=list)  # each step's batch loss, before that step's update
    time_s: float = 0.0

    def totals(self) -> dict:
        """The few numbers a compression report's totals carry."""
        return {
            "distill_steps": self.steps, "distill_lr": self.lr, "distill_match": self.match,
            "distill_samples": self.samples, "distill_seq_len": self.seq_len,
            "distill_loss_before": self.loss_before, "distill_loss_after": self.loss_after,
            "distill_heldout_loss_before": self.heldout_loss_before, "distill_heldout_loss_after": self.heldout_loss_after,
            "distill_time_s": round(self.time_s, 3),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def distill_bitdelta(
    base: Optional[nn.Module],
    finetuned,
    compressed,
    calibration: Calibration = None,
    *,
    tokenizer=None,
    heldout: Calibration = None,
    steps: int = DISTILL_STEPS,
    lr: float = DISTILL_LR,
    batch_size: int = DISTILL_BATCH_SIZE,
    samples: Optional[int] = None,
    seq_len: int = DISTILL_SEQ_LEN,
    match: str = "logits",
    schedule: str = "cosine",
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    off_switch: str = "steps=0",
) -> BitDeltaDistillation:
    """Distil the scales of a BitDelta adapter in place; returns what it did.

    base: the base model (nn.Module) when `compressed` is a CompressionResult: it runs with the adapted weights
        added (forward hooks, removed after each call) and is not modified; ignored for a PeftModel.
    finetuned: the fine-tuned model (nn.Module, or a folder / Hub id loaded here on `device`).
    compressed: a CompressionResult of method "bitdelta" (its state_dict's `sign_alpha` tensors are replaced and
        `result.distillation` set), or a PeftModel whose active adapter is a bitdelta DELTACOME adapter (its
        `sign_alpha` buffers are updated).
    calibration: None (peft-ext's offline English training text), a list of texts, token ids (n, seq_len), or a
        list of token-id batches. Texts need `tokenizer`. `samples` (default steps × batch_size, BitDelta's 800) of
        `seq_len` tokens are taken from texts, as many as the text holds; the steps cycle over the batches.
    heldout: the same forms, scored before and after only (the generalisation of the distilled scales).
    steps, lr, schedule: Adam's steps and learning rate on the scales; "cosine" anneals the lr to 0 over the steps
        (BitDelta's code), "constant" does not.
    match: "logits" (BitDelta's) or "hidden" (the final hidden state, the output head's input).
    off_switch: how the no-tokenizer error names the way to skip the distillation (compress_delta's option).
    """
    _check_settings(steps, lr, batch_size, seq_len, match, schedule, samples)
    if not _is_token_batches(calibration) and tokenizer is None:
        raise ValueError(NO_TEXT.format(off=off_switch))
    samples = samples if samples is not None else steps * batch_size
    batches = _batches(calibration, tokenizer, samples, seq_len, batch_size)
    held = None
    if heldout is not None:
        if not _is_token_batches(heldout) and tokenizer is None:
            raise ValueError(NO_TEXT.format(off=off_switch))
        held = _batches(heldout, tokenizer, samples, seq_len, batch_size)

    started = time.perf_counter()
    result = None
    if _is_peft_model(compressed):
        student = _Student.of_peft_model(compressed)
    else:
        result = compressed
        if getattr(getattr(result, "config", None), "method", None) != "bitdelta":
            raise ValueError(
                "distill_bitdelta refines BitDelta's scales: `compressed` must be a CompressionResult of method "
                f"'bitdelta' or a PeftModel with an active bitdelta adapter, got {type(compressed).__name__}"
                + (f" of method {result.config.method!r}" if hasattr(result, "config") else "") + "."
            )
        if not isinstance(base, nn.Module):
            raise ValueError("distill_bitdelta with a CompressionResult needs the base model as an nn.Module (base=).")
        student = _Student.of_result(base, result)

    teacher = _Teacher(finetuned, device if device is not None else student.device, student.device)
    teacher_calib = teacher.head_inputs(batches)
    teacher_held = teacher.head_inputs(held) if held is not None else None
    teacher.release_model()
    before = {name: float(a) for name, a in student.alphas.items()}
    with _frozen(student.model), _captured_head_input(student.model) as captured:
        loss_fn = _OutputLoss(student, teacher, match, captured)
        loss_before = loss_fn.mean(batches, teacher_calib)
        held_before = loss_fn.mean(held, teacher_held) if held is not None else None
        curve = _optimise(loss_fn, student.alphas, batches, teacher_calib, steps, lr, schedule, progress)
        loss_after = loss_fn.mean(batches, teacher_calib)
        held_after = loss_fn.mean(held, teacher_held) if held is not None else None
    after = {name: float(a) for name, a in student.alphas.items()}
    student.write_back()

    report = BitDeltaDistillation(
        steps=steps, lr=lr, schedule=schedule, match=match, batch_size=batch_size,
        samples=sum(int(b.shape[0]) for b in batches), seq_len=int(batches[0].shape[1]),
        loss_before=loss_before, loss_after=loss_after,
        heldout_samples=sum(int(b.shape[0]) for b in held) if held is not None else 0,
        heldout_loss_before=held_before, heldout_loss_after=held_after,
        alpha_before=before, alpha_after=after, loss_curve=curve, time_s=time.perf_counter() - started,
    )
    if result is not None:
        result.distillation = report
    return report


def _optimise(loss_fn, alphas: dict, batches, teacher_hidden, steps: int, lr: float, schedule: str, progress: bool) -> list[float]:
    """Adam on the scales alone; the steps cycle over the batches. Returns each step's loss."""
    leaves = list(alphas.values())
    curve: list[float] = []
    for a in leaves:
        a.requires_grad_(True)
    try:
        optimizer = torch.optim.Adam(leaves, lr=lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if schedule == "cosine" else None
        bar = _progress(steps, progress)
        with torch.enable_grad():
            for step in range(steps):
                i = step % len(batches)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(batches[i], teacher_hidden[i])
                loss.backward()
                if step == 0:
                    _check_gradients(alphas)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                curve.append(loss.item())
                bar.set_postfix_str(f"loss {curve[-1]:.4g}")
                bar.update(1)
        bar.close()
    finally:
        for a in leaves:
            a.requires_grad_(False)
            a.grad = None
    return curve


# ------------------------------------------------------------------------------------------------ settings, data
def _check_settings(steps, lr, batch_size, seq_len, match, schedule, samples) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"BitDelta distillation steps must be a positive integer (BitDelta: 200), got {steps!r}.")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"BitDelta distillation lr must be a positive number (BitDelta: 1e-4), got {lr!r}.")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)) + ((("samples", samples),) if samples is not None else ()):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"BitDelta distillation {name} must be a positive integer, got {value!r}.")
    if match not in MATCHES:
        raise ValueError(f"BitDelta distillation match must be one of {MATCHES}, got {match!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"BitDelta distillation schedule must be one of {SCHEDULES}, got {schedule!r}.")


def _is_token_batches(calibration) -> bool:
    if isinstance(calibration, torch.Tensor):
        return True
    return isinstance(calibration, (list, tuple)) and len(calibration) > 0 and all(isinstance(b, torch.Tensor) for b in calibration)


def _batches(calibration, tokenizer, samples: int, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    from .calibration import calibration_batches

    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(b, torch.Tensor) for b in calibration):
        out = []
        for b in calibration:
            if b.dim() != 2 or b.dtype not in (torch.int32, torch.int64) or b.numel() == 0:
                raise ValueError(f"calibration batches must be integer tensors (batch, seq_len), got {b.dtype} {tuple(b.shape)}.")
            out.append(b.long())
        return out
    if isinstance(calibration, (list, tuple)) and not calibration:
        raise ValueError("the calibration text for BitDelta's distillation is empty.")
    return calibration_batches(calibration, tokenizer, samples, seq_len, batch_size)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="distilling BitDelta scales", unit="step", disable=not enabled)


# ------------------------------------------------------------------------------------------------ the models
def _is_peft_model(obj) -> bool:
    from peft import PeftModel

    return isinstance(obj, PeftModel)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no parameter gradients while inside; the model's flags come back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


class _Student:
    """The base + BitDelta model as a function of the scales: `model` run with a forward hook on each targeted base
    layer adding x·(α·S)ᵀ in fp32 to its output (the served adapter's function), and each stored-whole module's
    parameters replaced by the fine-tune's values (functional_call)."""

    def __init__(self, model: nn.Module, layers: dict, dense: dict, sink):
        # layers: name -> (base layer module, int8 signs (out, in), fp32 alpha leaf); dense: parameter path -> value
        self.model, self.layers, self.dense, self._sink = model, layers, dense, sink
        self.device = _model_device(model)
        self.alphas = {name: alpha for name, (_, _, alpha) in layers.items()}

    @classmethod
    def of_result(cls, base: nn.Module, result) -> "_Student":
        from peft_ext.kernels.sign_format import SignDelta

        from peft_ext.tuners.base import logical_weight

        state, prefix = result.state_dict, "base_model.model."
        layers, dense = {}, {}
        for name in result.config.target_modules:
            module = base.get_submodule(name)
            out_f, in_f = logical_weight(module).shape
            words = state[f"{prefix}{name}.deltacome_delta.sign_words"]
            alpha = state[f"{prefix}{name}.deltacome_delta.sign_alpha"]
            layers[name] = _layer(module, SignDelta(out_f, in_f, words, alpha))
        for key, value in state.items():
            if ".deltacome_dense." in key:
                module_name, pname = key[len(prefix):].split(".deltacome_dense.")
                target = base.get_submodule(module_name)
                dense[f"{module_name}.{pname}"] = value.to(getattr(target, pname).device, getattr(target, pname).dtype)

        def sink(alphas):
            for name, a in alphas.items():
                key = f"{prefix}{name}.deltacome_delta.sign_alpha"
                state[key] = a.detach().to("cpu", torch.float32).clone().reshape(state[key].shape)

        return cls(base, layers, dense, sink)

    @classmethod
    def of_peft_model(cls, model) -> "_Student":
        from peft_ext.tuners.deltacome.dense_layer import DeltaComeDense
        from peft_ext.tuners.deltacome.layer import DeltaComeLinear, DeltaComeTunerLayer

        active = model.active_adapters
        if len(active) != 1:
            raise ValueError(f"distill_bitdelta distils one adapter at a time, but {active} are active: call model.set_adapter(name).")
        adapter = active[0]
        config = model.peft_config.get(adapter)
        if getattr(config, "method", None) != "bitdelta":
            raise ValueError(
                f"distill_bitdelta refines BitDelta's scales, but the active adapter {adapter!r} is "
                f"{getattr(config, 'method', type(config).__name__)!r}: only DELTACOME adapters of method 'bitdelta' have them."
            )
        if any(m.merged for m in model.modules() if isinstance(m, DeltaComeTunerLayer)):
            raise ValueError("distill_bitdelta needs an unmerged adapter (its scales are read at each forward): call model.unmerge_adapter() first.")
        layers, dense, buffers = {}, {}, {}
        for path, module in model.named_modules():
            if isinstance(module, DeltaComeLinear) and adapter in module.deltacome_delta and module.delta_meta[adapter][0] == "bitdelta":
                name = _base_name(path)
                layers[name] = _layer(module.get_base_layer(), module.delta(adapter))
                buffers[name] = module.deltacome_delta[adapter]
            elif isinstance(module, DeltaComeDense) and adapter in module.deltacome_dense:
                base_layer = module.get_base_layer()
                for pname, value in module.deltacome_dense[adapter].items():
                    dense[f"{path}.base_layer.{pname}"] = value.to(getattr(base_layer, pname).dtype)
        if not layers:
            raise ValueError(f"adapter {adapter!r} has no BitDelta layer (no sign_alpha buffers) to distil.")

        def sink(alphas):
            for name, a in alphas.items():
                old = buffers[name]["sign_alpha"]
                buffers[name]["sign_alpha"] = a.detach().to(old.device, old.dtype).reshape(old.shape).clone()

        return cls(model, layers, dense, sink)

    def __call__(self, ids: torch.Tensor):
        from torch.func import functional_call

        handles = [module.register_forward_hook(_add_scaled_signs(signs, alpha)) for module, signs, alpha in self.layers.values()]
        try:
            with _adapters_off(self.model):
                if self.dense:
                    return functional_call(self.model, self.dense, args=(), kwargs={"input_ids": ids.to(self.device)})
                return self.model(input_ids=ids.to(self.device))
        finally:
            for handle in handles:
                handle.remove()

    def write_back(self) -> None:
        """The distilled scales into the adapter they came from (a CompressionResult's state dict, or the
        PeftModel's sign_alpha buffers)."""
        self._sink(self.alphas)


def _add_scaled_signs(signs: torch.Tensor, alpha: torch.Tensor):
    """The forward hook of one layer: its output + x·(α·S)ᵀ in fp32, in the output's dtype (DeltaComeLinear's
    bitdelta forward: `(F.linear(x, W, b).float() + sign_delta_part(x, d)).to(y.dtype)`)."""

    def hook(module, args, output):
        return (output.float() + _ScaledSigns.apply(args[0], alpha, signs)).to(output.dtype)

    return hook


class _ScaledSigns(torch.autograd.Function):
    """x·(α·S)ᵀ in fp32 (sign_delta_part's arithmetic), differentiable in x and α; the backward keeps the int8 signs,
    not an fp32 copy of them per layer."""

    @staticmethod
    def forward(ctx, x, alpha, signs):
        ctx.save_for_backward(x, alpha, signs)
        return x.float() @ (signs.float() * alpha).T

    @staticmethod
    def backward(ctx, grad):
        x, alpha, signs = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ (signs.float() * alpha)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).float()
            grad_alpha = ((g.T @ x2) * signs).sum().to(alpha.dtype).reshape(alpha.shape)
        return grad_x, grad_alpha, None


def _layer(module: nn.Module, sign):
    """(base layer module, signs as int8 (out, in) on its device, a fresh fp32 alpha leaf)."""
    from peft_ext.kernels.delta_format import unpack_bitplanes

    signs = (unpack_bitplanes(sign.words.unsqueeze(0), sign.in_features).T * 2 - 1).to(torch.int8)
    device = module.weight.device
    return module, signs.to(device), sign.alpha.detach().to(device, torch.float32).reshape(()).clone()


@contextmanager
def _adapters_off(model: nn.Module):
    """A PeftModel's own adapters off (the student supplies the adapted tensors itself); other models as they are."""
    if _is_peft_model(model):
        with model.disable_adapter():
            yield
    else:
        yield


def _base_name(name: str) -> str:
    return name.split("base_model.model.", 1)[1] if name.startswith("base_model.model.") else name


def _check_gradients(alphas: dict[str, torch.Tensor]) -> None:
    missing = [n for n, a in alphas.items() if a.grad is None]
    if missing:
        raise RuntimeError(
            f"no gradient reached the BitDelta scale of {missing[:3]}{' ...' if len(missing) > 3 else ''}: the layer is "
            f"not on the forward path of the model's outputs (a merged or disabled adapter?)."
        )
    bad = [n for n, a in alphas.items() if not torch.isfinite(a.grad).all()]
    if bad:
        raise RuntimeError(f"the gradient of the BitDelta scale of {bad[:3]} is NaN or inf: check the models' outputs.")


class _Teacher:
    """The fine-tuned model's head inputs on the batches (kept on the CPU) and its output head (on the student's
    device), to recompute its logits per batch."""

    def __init__(self, finetuned, device, student_device):
        self.loaded_here = not isinstance(finetuned, nn.Module)
        if self.loaded_here:
            from transformers import AutoModelForCausalLM

            from .sources import resolve_folder

            device = torch.device(device)
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(resolve_folder(finetuned, "finetuned"), dtype=dtype).to(device)
        else:
            self.model = finetuned
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no output head (get_output_embeddings() is None): BitDelta's distillation matches a causal LM's outputs.")
        self.device = _model_device(self.model)
        self.head = copy.deepcopy(head).to(student_device) if (self.loaded_here or self.device != student_device) else head

    @torch.no_grad()
    def head_inputs(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        with _captured_head_input(self.model) as captured, _frozen(self.model):
            for ids in batches:
                self.model(input_ids=ids.to(self.device))
                out.append(captured.pop().detach().to("cpu", torch.float32))
        return out

    def release_model(self) -> None:
        if self.loaded_here:
            del self.model
        self.model = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.head.weight
        return self.head(hidden.to(device=w.device, dtype=w.dtype)).float()


@contextmanager
def _captured_head_input(model: nn.Module):
    captured: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


class _OutputLoss:
    """MSE between the student's and the teacher's logits (or final hidden states) on one batch. `captured`: where
    a hook on the student's output head puts its input."""

    def __init__(self, student: _Student, teacher: _Teacher, match: str, captured: list):
        self.student, self.teacher, self.match, self.captured = student, teacher, match, captured

    def __call__(self, ids: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        self.captured.clear()
        out = self.student(ids)
        hidden = self.captured.pop()
        if self.match == "hidden":
            return F.mse_loss(hidden.float(), teacher_hidden.to(hidden.device, torch.float32))
        logits = out.logits.float()
        with torch.no_grad():
            target = self.teacher.logits(teacher_hidden).to(logits.device)
        return F.mse_loss(logits, target)

    @torch.no_grad()
    def mean(self, batches: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> float:
        """The per-token mean over all the batches (batches of unequal size weighted by their tokens)."""
        total, count = 0.0, 0
        for ids, hidden in zip(batches, teacher_hidden):
            total += float(self(ids, hidden)) * ids.numel()
            count += ids.numel()
        return total / count
