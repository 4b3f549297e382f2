"""Calibration for GPTQ: H = sum x x^T of each targeted layer's inputs, over a small text sample.

The inputs are taken from the *fine-tuned* model (the model the compressed delta has to reproduce), block by block
as GPTQ implementations do (`blockwise_hessians`): the part of the model before the first decoder block (the
embeddings) runs once on the calibration ids and its outputs are cached; then each decoder block in turn is loaded
(from a checkpoint folder: its tensors alone, read from safetensors), run on the cached hidden states with hooks
collecting its layers' Hessians, its outputs become the next block's inputs, and it is dropped. So one block's
weights, the calibration activations and one block's Hessians are in memory at a time, never the whole model
(`blockwise_peak_bytes` computes the peak; docs/reproductions.md states it for a 7B pair). The result equals one
forward of the whole fine-tune with hooks on every layer (`collect_hessians`), which remains the fallback for
targeted layers outside the decoder blocks (it loads the whole model).

How much text: a Hessian of a layer with `in` inputs has rank at most the number of calibration tokens. The default
(`calibration_samples=None`) takes 2 tokens per input of the widest targeted layer (and at least 32 samples), as far
as the text holds: 86 x 256 tokens for a 7B model's down_proj (11,008 inputs). With fewer tokens than a layer's
inputs its Hessian is singular: GPTQ's damping (1 % of the mean diagonal added) makes it invertible, the directions
the text does not reach are then quantised as by round to nearest; the report counts those layers and a warning says
so.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from peft_ext.tuners.base import in_out_features

Calibration = Union[None, torch.Tensor, Sequence[str]]


TOKENS_PER_INPUT = 2  # default calibration size: tokens per input of the widest targeted layer
MIN_SAMPLES = 32


def default_samples(widest_input: int, seq_len: int) -> int:
    """calibration_samples=None: enough samples of seq_len tokens for 2 tokens per input of the widest layer, at
    least 32 (a 7B model's down_proj, 11,008 inputs, at 256 tokens: 86 samples)."""
    return max(MIN_SAMPLES, -(-TOKENS_PER_INPUT * widest_input // seq_len))


def calibration_batches(
    calibration: Calibration, tokenizer, n_samples: int, seq_len: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """Token-id batches: from given ids (n, L), from texts, or (None) from peft_ext's offline English text. At most
    n_samples samples; fewer when the text holds fewer."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"calibration ids must be an integer tensor (n_samples, seq_len), got {calibration.dtype} {tuple(calibration.shape)}.")
        ids = calibration.long()
    else:
        if tokenizer is None:
            raise ValueError(
                "quantizer='gptq' calibrates on text, which needs a tokenizer: pass tokenizer=, calibration= token "
                "ids (n, seq_len), or use quantizer='rtn' (no calibration)."
            )
        if calibration is None:
            from peft_ext.data.english_text import english_text

            calibration = english_text("train")
        text = "\n\n".join(calibration)
        all_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        n = min(n_samples, all_ids.numel() // seq_len)
        if n < 1:
            raise ValueError(f"the calibration text has {all_ids.numel()} tokens, fewer than one sample of seq_len={seq_len}.")
        ids = all_ids[: n * seq_len].view(n, seq_len)
    return list(ids[:n_samples].split(batch_size))


def layer_inputs(module: nn.Module) -> int:
    return in_out_features(module)[0]


def hessian_chunks(model: nn.Module, names: Sequence[str], max_bytes: int) -> Iterator[list[str]]:
    chunk, used = [], 0
    for name in names:
        size = layer_inputs(model.get_submodule(name)) ** 2 * 4
        if chunk and used + size > max_bytes:
            yield chunk
            chunk, used = [], 0
        chunk.append(name)
        used += size
    if chunk:
        yield chunk


@torch.no_grad()
def collect_hessians(model: nn.Module, names: Sequence[str], batches: list[torch.Tensor], device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """{name: sum over calibration tokens of x x^T} (fp32, on `device`) for the named linear modules of `model`."""
    device = device or next(model.parameters()).device
    hessians: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        hessians[name] = torch.zeros(layer_inputs(module), layer_inputs(module), device=device)

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(device=device, dtype=torch.float32)
            hessians[name].addmm_(x.T, x)

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    model_device = next(model.parameters()).device
    try:
        for ids in batches:
            model(input_ids=ids.to(model_device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return hessians


# ------------------------------------------------------------------------------------------- block by block
class _Stop(Exception):
    """Raised by the hook on the first decoder block once its inputs are captured."""


def find_blocks(model: nn.Module, names: Sequence[str]) -> Optional[str]:
    """The path of the nn.ModuleList of decoder blocks that holds the most of `names` (e.g. "model.layers"), or None."""
    best, count = None, 0
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = sum(1 for name in names if name.startswith(f"{path}."))
            if n > count:
                best, count = path, n
    return best


def _block_index(blocks_path: str, name: str) -> Optional[int]:
    rest = name[len(blocks_path) + 1 :] if name.startswith(f"{blocks_path}.") else None
    head = rest.split(".", 1)[0] if rest else ""
    return int(head) if head.isdigit() else None


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


class _Weights:
    """The fine-tune's parameters for a forward: an in-memory model as it is, or a skeleton (parameters on the meta
    device, buffers real) whose parameters are read from the checkpoint when needed and dropped after."""

    def __init__(self, model: nn.Module, source, device: torch.device, dtype: Optional[torch.dtype]):
        self.model, self.source, self.device, self.dtype = model, source, device, dtype

    @property
    def in_memory(self) -> bool:
        return self.source is None

    def load(self, names: Sequence[str]) -> None:
        if self.in_memory:
            return
        for name in names:
            if self.source.has(name):
                _set_parameter(self.model, name, self.source.get(name).to(device=self.device, dtype=self.dtype))

    def drop(self, names: Sequence[str]) -> None:
        if self.in_memory:
            return
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(module_name) if module_name else self.model
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False)


def skeleton(folder: str) -> nn.Module:
    """The model of a checkpoint folder with its parameters on the meta device and its buffers (rotary frequencies)
    computed as usual: nothing of the weights is read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return model.eval()


@torch.no_grad()
def blockwise_hessians(
    finetuned: Optional[nn.Module], source, names: Sequence[str], batches: list[torch.Tensor],
    device: torch.device, dtype: Optional[torch.dtype] = None, max_bytes: int = 4 * 2**30,
) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
    """Yields (names of one decoder block, {name: sum x x^T in fp32 on `device`}) block after block, then the targeted
    layers outside the blocks (whole-model fallback). `finetuned`: the fine-tune in memory, or None to read it from
    `source` (a WeightSource of a folder) onto `device` in `dtype`, one block at a time."""
    if finetuned is not None:
        model, weights = finetuned, _Weights(finetuned, None, device, None)
    else:
        model = skeleton(source.folder)
        for module in model.modules():  # the buffers (rotary frequencies) onto the device, in their own dtype
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[key] = buffer.to(device)
        weights = _Weights(model, source, device, dtype)
    blocks_path = find_blocks(model, names)
    inside = [n for n in names if blocks_path is not None and _block_index(blocks_path, n) is not None]
    outside = [n for n in names if n not in inside]
    if inside:
        yield from _run_blocks(model, weights, blocks_path, inside, batches, device)
    if outside:
        yield from _whole_model_hessians(finetuned, source, outside, batches, device, max_bytes)


def _run_blocks(model, weights: _Weights, blocks_path: str, names, batches, device):
    """The block-by-block pass (see blockwise_hessians), in eval mode throughout (the model's mode comes back after)."""
    was_training = model.training
    model.eval()
    try:
        yield from _blocks_in_eval(model, weights, blocks_path, names, batches, device)
    finally:
        model.train(was_training)


def _blocks_in_eval(model, weights: _Weights, blocks_path: str, names, batches, device):
    blocks = model.get_submodule(blocks_path)
    params = [n for n, _ in model.named_parameters()]  # a tied head's weight under its embedding's name
    head = _module_path(model, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
    # the inputs of block 0: run the model up to it (the embeddings; the output head never runs, and is not read)
    stem = [n for n in params if not n.startswith(f"{blocks_path}.") and (head is None or not n.startswith(f"{head}."))]
    weights.load(stem)
    captured = []

    def stop(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    model_device = device if not weights.in_memory else next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(model_device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        weights.drop(stem)
    hidden = [args[0] if args else kwargs.pop("hidden_states") for args, kwargs in captured]
    rest = [(args[1:], kwargs) for args, kwargs in captured]
    last = max(_block_index(blocks_path, n) for n in names)
    for i in range(last + 1):  # blocks after the last targeted layer's are never read
        block_names = [n for n in names if _block_index(blocks_path, n) == i]
        block_params = [n for n in params if n.startswith(f"{blocks_path}.{i}.")]
        weights.load(block_params)
        hessians = {n: _zeros_hessian(model.get_submodule(n), device) for n in block_names}
        handles = [model.get_submodule(n).register_forward_pre_hook(_accumulate(hessians, n, device)) for n in block_names]
        try:
            for b, ((args, kwargs), x) in enumerate(zip(rest, hidden)):
                out = blocks[i](x, *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
        finally:
            for h in handles:
                h.remove()
            weights.drop(block_params)
        if block_names:
            yield block_names, hessians
        del hessians


def _module_path(model: nn.Module, target: Optional[nn.Module]) -> Optional[str]:
    if target is None:
        return None
    return next((path for path, module in model.named_modules() if module is target), None)


def _zeros_hessian(module: nn.Module, device) -> torch.Tensor:
    d = layer_inputs(module)
    return torch.zeros(d, d, device=device)


def _accumulate(hessians: dict, name: str, device):
    def hook(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(device=device, dtype=torch.float32)
        hessians[name].addmm_(x.T, x)

    return hook


def _whole_model_hessians(finetuned, source, names, batches, device, max_bytes):
    """Targeted layers outside the decoder blocks (or a model without them): forwards of the whole fine-tune, one per
    chunk of layers whose Hessians fit max_bytes."""
    import warnings

    model = finetuned
    if model is None:
        from .compress import _load_causal_lm

        warnings.warn(
            f"calibrating {names[:3]}{' ...' if len(names) > 3 else ''} (outside the model's decoder blocks) loads the "
            f"whole fine-tuned model: calibrate block by block by leaving them out of target_modules, or use "
            f"quantizer='rtn' for them.", stacklevel=3,
        )
        model = _load_causal_lm(source.folder, device)
    for chunk in hessian_chunks(model, names, max_bytes):
        yield chunk, collect_hessians(model, chunk, batches, device)


def blockwise_peak_bytes(structure: nn.Module, names: Sequence[str], n_samples: int, seq_len: int,
                         batch_size: int = 8, dtype_bytes: int = 4) -> dict[str, int]:
    """The memory block-by-block calibration and compression hold at their peak, computed from the shapes of the model
    `structure` (on the meta device is fine) for `names` targeted and n_samples x seq_len calibration tokens. Three
    phases, each holding (dtype_bytes: the fine-tune's weights and activations, 4 on the CPU):

    - stem: the input embeddings and the block-0 inputs (n_tokens x hidden);
    - a block's forward: its parameters, its inputs and outputs (2 x n_tokens x hidden), its targeted layers' Hessians
      (in^2 fp32 each), and the activations of one batch (4 x batch tokens x the widest linear output, fp32, plus the
      attention scores, batch x heads x seq_len^2 fp32);
    - a layer's compression: the hidden states, the block's Hessians and, for the layer that needs most, 8 fp32 copies
      of its (out x in) shape (the base's and the fine-tune's weight, the delta, the SVD's factors and workspace, the
      reconstruction and its error) and GPTQ's inverse-Hessian factorisation in float64 (16 x in^2 bytes).

    `whole_model_bytes`: the fine-tune loaded whole (what calibration held before it ran block by block)."""
    blocks_path = find_blocks(structure, names)
    hidden = structure.get_input_embeddings().weight.shape[1]
    n_tokens, batch_tokens = n_samples * seq_len, min(batch_size, n_samples) * seq_len
    heads = getattr(getattr(structure, "config", None), "num_attention_heads", 0) or 0
    hidden_bytes = n_tokens * hidden * dtype_bytes
    block_phase, compress_phase = 0, 0
    for i, block in enumerate(structure.get_submodule(blocks_path) if blocks_path else []):
        here = [n for n in names if _block_index(blocks_path, n) == i]
        if not here:
            continue
        params = sum(p.numel() for p in block.parameters()) * dtype_bytes
        hessians = sum(layer_inputs(structure.get_submodule(n)) ** 2 * 4 for n in here)
        widest_out = max((in_out_features(m)[1] for m in block.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"), default=hidden)
        activations = 4 * batch_tokens * widest_out * 4 + min(batch_size, n_samples) * heads * seq_len**2 * 4
        largest = max(8 * i * o * 4 + 16 * i * i for i, o in (in_out_features(structure.get_submodule(n)) for n in here))
        block_phase = max(block_phase, params + 2 * hidden_bytes + hessians + activations)
        compress_phase = max(compress_phase, hidden_bytes + hessians + largest)
    embedding = sum(p.numel() for p in structure.get_input_embeddings().parameters()) * dtype_bytes
    stem_phase = embedding + hidden_bytes
    return {
        "stem": stem_phase, "block_forward": block_phase, "layer_compression": compress_phase,
        "peak": max(stem_phase, block_phase, compress_phase),
        "whole_model_bytes": sum(p.numel() for p in structure.parameters()) * dtype_bytes,
    }
