"""Recompute adapter inputs in the backward instead of saving them: `recompute_adapter_inputs(model)` and its inverse
`remove_adapter_input_recompute(model)`. A memory option for the LoRA-family training step (design/perf.md: peak
memory <= 1.10x the frozen base's; docs/memory.md has the measured saved and live bytes).

Why a LoRA layer costs memory. A frozen linear layer saves nothing of its input x (autograd keeps x of a matmul only
when W needs a gradient). An adapter needs x for dA = s dyb^T x, so every adapted layer saves x (or a cast or a view
of it): the RMSNorm outputs feeding q/k/v and gate/up, the down_proj input act(gate) * up (tokens x FFN, the largest)
and the o_proj input. None of these are saved by the frozen base, yet each is one cheap elementwise op away from
tensors the base *does* save: the norm's output is w * (h * rsqrt(var + eps)).to(dtype), whose h and rsqrt the norm's
own multiplication saves; act(gate) * up is a product whose two factors its multiplication saves; the o_proj input is
a contiguous copy of the attention output that SDPA saves.

The mechanism. While an adapted layer runs its forward, a pair of `torch.autograd.graph.saved_tensors_hooks` is
active (a forward pre-hook pushes it, an `always_call` forward hook pops it). The pack hook looks at each tensor the
layer saves (through autograd or a custom Function's `save_for_backward`: PEFT's LoRA, `accelerate_lora`'s fused
`lowrank_linear`, COLA, SSMLoRA, S'MoRE, FineGates alike) and asks the autograd graph how that tensor was made: the
tensor's base (`t._base` for a view) has a `grad_fn`, and a small interpreter follows it through nodes it can replay
exactly from what *their own* nodes saved:

    MulBackward0     a * b, each factor either saved by this node (`_saved_self` / `_saved_other`) or rebuilt
    ToCopyBackward0  a dtype cast (.to / .float) to the dtype autograd recorded for the node's output
                     (`_input_metadata`); where that is unavailable, the only dtype that gives the known layouts
                     (found on meta tensors; ambiguous -> not rebuilt)
    CloneBackward0   .contiguous() / .clone() (memory format found the same way)
    TransposeBackward0  .transpose(d0, d1) (its saved dims)
    View/UnsafeView/ReshapeAliasBackward0 under a cast, clone or transpose (its output shape known): .view(shape)
    a layer input that is a view of another tensor: that view (`as_strided`) of its rebuilt base
    a node that saved its own result (`_saved_result`: ReLU, sigmoid, tanh, exp, rsqrt, ...) or SDPA's output
                     (`_saved_output` of a scaled_dot_product_* node)

If the whole recipe replays to a tensor with the base's dtype, shape and strides, and every step standing for one of
the layer's inputs to that input's layout (checked on meta tensors at pack time; cached by the recipe's structure,
so a training loop checks each kind of saved tensor once), the hook packs a handle -- references to the producer
*nodes*, never to tensors -- instead of the tensor. The unpack hook replays the recipe (no grad) and returns the
same view of it (`as_strided` with the saved tensor's size, strides and offset). The same ops on the same inputs:
bit-identical values, so gradients are exactly those of the option off (tested with `torch.equal`, fp32 and bf16).
Holding nodes rather than tensors means the option never extends a tensor's lifetime: what the recipe reads is alive
exactly as long as its own node keeps it, and a consumer node (the adapted layer) always runs its backward before
the producer node releases its saved tensors. (This holds now: the hooks' closure once held the layer's inputs until
the backward; tested by test_rebuilt_inputs_are_freed_after_the_forward, and `LiveActivationBytes` measures it.)
One rebuild is shared by every layer that saved the same tensor (q/k/v, gate/up) and dropped once each has unpacked
it.

Nothing about the model's modules changes (no forward is replaced), so the option is architecture-agnostic: where a
producer is not one of the nodes above (GELU's output, a math-path attention output, native_dropout's output on CUDA,
a layer input that needs no gradient -- e.g. the first block's norm output under a frozen embedding, whose norm saves
nothing), the tensor is saved as before and `report.coverage()` says which tensors were rebuilt and which were
kept, and why.

Interplay:
  - No grad / `torch.no_grad` / `inference_mode`: the hooks are not pushed (nothing is saved anyway).
  - Other saved_tensors_hooks active around an adapted layer (gradient checkpointing's non-reentrant hooks,
    `save_on_cpu`, a user's own pair, `disable_saved_tensors_hooks`): the layer steps aside (saves as those hooks
    decide; counted in the coverage as "stepped aside"), since only the innermost pair would run. Hooks whose pack
    function has the attribute `_peft_ext_composable = True` are chained instead (kept tensors go through them),
    which is how `SavedTensorsCounter` measures saved bytes with the option on.
  - Gradient checkpointing: non-reentrant -> steps aside inside the checkpointed blocks; reentrant -> the forward runs
    without grad, and the recomputation inside the backward uses the option. Gradients are exact either way (tested);
    there is nothing to gain (a checkpointed block saves only its input), so enabling the option on a model with
    checkpointing on warns, and so does (once per model) the first training forward in which a layer steps aside
    because of other saved_tensors_hooks: Trainer / TRL turn checkpointing on inside train(), after the option.
  - `remove_adapter_input_recompute(model)` (or `recompute_adapter_inputs(model, enable=False)`) removes the hooks:
    the layers save exactly what they saved before.

Cost: the replay is one to three elementwise passes over the rebuilt tensor in the backward (per shared tensor, not
per consumer), plus about 20 microseconds of Python per saved tensor in the forward (docs/memory.md).
"""

from __future__ import annotations

import gc
import itertools
import pickle
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "LiveActivationBytes",
    "RecomputeReport",
    "SavedTensorsCounter",
    "recompute_adapter_inputs",
    "remove_adapter_input_recompute",
]

_STATE_ATTR = "_peft_ext_input_recompute"
_HOOK_INTROSPECTION = ("_top_saved_tensors_default_hooks", "_saved_tensors_hooks_is_enabled")
_MAX_DEPTH = 8
_CAST_CANDIDATES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_CLONE_FORMATS = (torch.contiguous_format, torch.preserve_format)


# ------------------------------------------------------------------------------------------------ recipes
class _NotRebuildable(Exception):
    """Why a tensor's producer cannot be replayed (the message goes into the coverage report)."""


class _Op:
    """One step of a recipe. kind: "leaf" (param = the attribute of `node` holding a saved tensor), "mul" (two args),
    "cast" (param = dtype), "clone" (param = memory format), "transpose" (param = (d0, d1)), "reshape" (param = the
    shape), "view" (param = (size, stride, offset) of a known view of args[0]). `node, nr`: the autograd node and
    output number this step replays (for constraints); param None in a cast / clone: still to be resolved."""

    __slots__ = ("kind", "node", "nr", "args", "param", "layout")

    def __init__(self, kind: str, node, nr: int, args: tuple = (), param: Any = None, layout=None) -> None:
        self.kind, self.node, self.nr, self.args, self.param = kind, node, nr, args, param
        self.layout = layout  # leaf: its saved tensor's (dtype, shape, stride, device); else a known tensor's or None

    def with_param(self, param) -> "_Op":
        return _Op(self.kind, self.node, self.nr, self.args, param, self.layout)

    def with_args(self, args: tuple) -> "_Op":
        return _Op(self.kind, self.node, self.nr, args, self.param, self.layout)

    def signature(self) -> tuple:
        """Everything the resolution depends on (the ops, their fixed params, the leaves' and known layouts): equal
        signatures resolve alike, so a training loop resolves each kind of saved tensor once."""
        param = None if self.kind == "leaf" else self.param
        return (self.kind, param, self.layout, tuple(arg.signature() for arg in self.args))


def _layout(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), t.stride(), t.device)


def _leaf(node, nr: int, attr: str) -> Optional[_Op]:
    t = _saved(node, attr)
    return None if t is None else _Op("leaf", node, nr, (), attr, _layout(t))


def _saved(node, attr: str) -> Optional[torch.Tensor]:
    try:
        value = getattr(node, attr)
    except (AttributeError, RuntimeError):
        return None
    return value if isinstance(value, torch.Tensor) else None


_RESHAPES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def _known(known: dict, node, nr: int) -> Optional[torch.Tensor]:
    entry = known.get((id(node), nr)) if node is not None else None
    return entry[1] if entry is not None and entry[0] is node else None


def _recipe(node, nr: int, known: dict, depth: int = 0, shape: Optional[tuple] = None) -> _Op:
    """`_recipe_step`, with the layout of a known tensor the step stands for attached (a constraint)."""
    op = _recipe_step(node, nr, known, depth, shape)
    tensor = _known(known, node, nr)
    if tensor is not None and op.kind != "leaf":
        op.layout = _layout(tensor)  # a constraint: this step must replay to the known tensor's layout
    return op


def _recipe_step(node, nr: int, known: dict, depth: int, shape: Optional[tuple]) -> _Op:
    """The recipe that replays output `nr` of autograd node `node`, or raises _NotRebuildable. `known`: (id(node), nr)
    -> (node, the live tensor that output is) for the layer's inputs and their bases: a view among them is replayed
    as that view of its base. `shape`: the output's shape where the caller knows it (a cast, clone or transpose keeps
    it), so that a reshape under a cast (`x.reshape(-1, k).to(fp32)` in a layer) replays as `.view(shape)`."""
    if node is None:
        raise _NotRebuildable("an operand has no autograd history and was not saved")
    if depth > _MAX_DEPTH:
        raise _NotRebuildable(f"recipe deeper than {_MAX_DEPTH} nodes")
    name = type(node).__name__
    tensor = _known(known, node, nr)
    if tensor is not None and tensor._is_view():
        base = tensor._base
        offset = tensor.storage_offset() - base.storage_offset()
        inner = _recipe(base.grad_fn, base.output_nr, known, depth + 1)
        return _Op("view", node, nr, (inner,), (tuple(tensor.shape), tuple(tensor.stride()), offset))
    op = _leaf(node, nr, "_saved_result") if nr == 0 else None
    if op is None and nr == 0 and "ScaledDotProduct" in name:
        op = _leaf(node, nr, "_saved_output")
    if op is not None:
        return op
    if nr != 0:
        raise _NotRebuildable(f"output {nr} of {name}")
    nexts = node.next_functions
    if name == "MulBackward0":
        operands = []
        for attr, (child, child_nr) in zip(("_saved_self", "_saved_other"), nexts):
            leaf = _leaf(node, -1, attr)
            operands.append(leaf if leaf is not None else _recipe(child, child_nr, known, depth + 1))
        return _Op("mul", node, nr, tuple(operands))
    if name == "ToCopyBackward0":
        return _Op("cast", node, nr, (_recipe(*nexts[0], known, depth + 1, shape),), _cast_dtype(node, nr))
    if name == "CloneBackward0":
        return _Op("clone", node, nr, (_recipe(*nexts[0], known, depth + 1, shape),))
    if name == "TransposeBackward0":
        dims = (int(node._saved_dim0), int(node._saved_dim1))
        inner_shape = None
        if shape is not None:
            inner_shape = list(shape)
            inner_shape[dims[0]], inner_shape[dims[1]] = inner_shape[dims[1]], inner_shape[dims[0]]
            inner_shape = tuple(inner_shape)
        return _Op("transpose", node, nr, (_recipe(*nexts[0], known, depth + 1, inner_shape),), dims)
    if name in _RESHAPES and shape is not None:
        return _Op("reshape", node, nr, (_recipe(*nexts[0], known, depth + 1),), tuple(shape))
    raise _NotRebuildable(f"produced by {name}")


def _cast_dtype(node, nr: int) -> Optional[torch.dtype]:
    """The dtype a cast node produced: the metadata autograd keeps of each forward output (the gradient it expects,
    `_input_metadata[nr]`; torch 2.13 has no public equivalent). None where unavailable: the cast's dtype is then
    searched for (and refused if ambiguous)."""
    try:
        dtype = node._input_metadata[nr].dtype
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return None
    return dtype if isinstance(dtype, torch.dtype) else None


def _open_slots(op: _Op, out: Optional[list] = None) -> list:
    """Every cast / clone whose param is still to resolve, depth first (the root last)."""
    out = [] if out is None else out
    for arg in op.args:
        _open_slots(arg, out)
    if op.kind in ("cast", "clone") and op.param is None:
        out.append(op)
    return out


def _fill(op: _Op, choices: dict) -> _Op:
    """The recipe with the open slots in `choices` (id(op) -> param) set."""
    filled = op.with_args(tuple(_fill(arg, choices) for arg in op.args)) if op.args else op
    return filled.with_param(choices[id(op)]) if id(op) in choices else filled


def _run(op: _Op, leaf: Callable[[Any, str], torch.Tensor], check: Optional[Callable] = None) -> torch.Tensor:
    """Replays the recipe with leaf tensors from `leaf(node, attr)`: real tensors in the backward, meta ones (and
    `check(op, out)` on every step) while resolving."""
    kind = op.kind
    if kind == "leaf":
        return leaf(op.node, op.param)
    if kind == "meta":  # a meta stand-in for a leaf, while resolving
        return op.param
    args = [_run(arg, leaf, check) for arg in op.args]
    if kind == "mul":
        out = args[0] * args[1]
    elif kind == "cast":
        if args[0].dtype == op.param:
            raise _NotRebuildable("a cast to the same dtype records no node")  # only while resolving
        out = args[0].to(dtype=op.param)
    elif kind == "clone":
        out = args[0].clone(memory_format=op.param)
    elif kind == "transpose":
        out = args[0].transpose(*op.param)
    elif kind == "reshape":
        out = args[0].view(op.param)
    else:  # view: param's offset is relative to the base's own
        size, stride, offset = op.param
        out = args[0].as_strided(size, stride, args[0].storage_offset() + offset)
    if check is not None:
        check(op, out)
    return out


def _same_layout(a: torch.Tensor, layout: tuple) -> bool:
    return (a.dtype, tuple(a.shape), a.stride()) == layout[:3]


_RESOLVED: "dict[tuple, Any]" = {}  # signature -> the slot params (or the reason it failed)
_MAX_RESOLVED = 512


def _resolve(recipe: _Op, root: torch.Tensor) -> _Op:
    """The recipe with every open slot set so that each step replays to the layout of the known tensor it stands for
    (the root, the layer's inputs) on meta tensors; raises if no setting does, or several do with a cast among the
    slots (its target dtype would be a guess). Cached by signature (a step of a training loop resolves nothing new)."""
    slots = _open_slots(recipe)
    key = (recipe.signature(), _layout(root))
    cached = _RESOLVED.get(key)
    if cached is None:
        cached = _search(recipe, slots, root)
        if len(_RESOLVED) >= _MAX_RESOLVED:
            _RESOLVED.clear()
        _RESOLVED[key] = cached
    if isinstance(cached, str):
        raise _NotRebuildable(cached)
    return _fill(recipe, {id(op): value for op, value in zip(slots, cached)})


def _search(recipe: _Op, slots: list, root: torch.Tensor):
    """The slot params (a tuple) that make the recipe replay to root's layout on meta tensors, or why not (a str)."""
    devices = set()

    def meta(op: _Op) -> _Op:
        if op.kind == "leaf":
            dtype, shape, stride, device = op.layout
            devices.add(device)
            return _Op("meta", None, -1, (), torch.empty_strided(shape, stride, dtype=dtype, device="meta"), op.layout)
        return op.with_args(tuple(meta(arg) for arg in op.args)) if op.args else op

    def check(op, out):
        if op.layout is not None and not _same_layout(out, op.layout):
            raise _NotRebuildable("layout differs")

    options = [_CAST_CANDIDATES if op.kind == "cast" else _CLONE_FORMATS for op in slots]
    if slots and slots[-1] is recipe and recipe.kind == "cast":
        options[-1] = (root.dtype,)  # the root is the cast: its dtype is the root's
    meta_recipe = meta(recipe)
    meta_slots = _open_slots(meta_recipe)
    found = []
    for combo in itertools.product(*options):
        candidate = _fill(meta_recipe, {id(op): value for op, value in zip(meta_slots, combo)})
        try:
            out = _run(candidate, lambda node, attr: attr, check)
        except (_NotRebuildable, RuntimeError):
            continue
        if _same_layout(out, _layout(root)):
            found.append(combo)
            if len(found) > 1:
                break
    if not found:
        return "no replay reproduces its dtype / shape / strides"
    if len(found) > 1 and any(op.kind == "cast" for op in slots):
        return "an inner cast's dtype is ambiguous"
    if devices != {root.device}:
        return f"its recipe reads tensors on {sorted(map(str, devices))}, it lives on {root.device}"
    return found[0]


def _describe(op: _Op) -> str:
    kind = op.kind
    if kind == "leaf":
        return f"{type(op.node).__name__}.{op.param[len('_saved_'):]}"
    inner = [_describe(arg) for arg in op.args]
    if kind == "mul":
        return f"({inner[0]} * {inner[1]})"
    if kind == "cast":
        return f"{inner[0]}.to({str(op.param).removeprefix('torch.')})"
    if kind == "clone":
        return f"{inner[0]}.clone()"
    if kind == "transpose":
        return f"{inner[0]}.transpose{op.param}"
    if kind == "reshape":
        return f"{inner[0]}.view{op.param}"
    return f"{inner[0]}.view{op.param[0]}"


# ------------------------------------------------------------------------------------------------ handles
class _Source:
    """One rebuildable tensor (the base of what was saved), shared by every handle packed for it. Holds autograd
    nodes, never tensors, except the rebuilt value between the first and the last of its handles' unpacks."""

    __slots__ = ("recipe", "node", "pending", "cache", "lock", "description", "__weakref__")

    def __init__(self, recipe, node) -> None:
        self.recipe, self.node = recipe, node  # node: keeps id(node) (the lookup key) from being reused
        self.description = _describe(recipe)
        self.pending, self.cache, self.lock = 0, None, threading.Lock()

    def value(self, first_unpack: bool) -> torch.Tensor:
        with self.lock:
            out = self.cache
            if out is None:
                try:
                    with torch.no_grad():
                        out = _run(self.recipe, lambda node, attr: getattr(node, attr))
                except RuntimeError as err:
                    raise RuntimeError(
                        f"recompute_adapter_inputs: cannot rebuild a saved adapter input from "
                        f"{_describe(self.recipe)}: {err} (a backward through part of the graph a second time? turn "
                        f"the option off with peft_ext.remove_adapter_input_recompute(model))"
                    ) from err
            if first_unpack:
                self.pending -= 1
            self.cache = out if self.pending > 0 else None
            return out


class _Handle:
    """What the pack hook stores instead of a tensor: its source and the view of it that was saved."""

    __slots__ = ("source", "size", "stride", "offset", "unpacked")

    def __init__(self, source: _Source, t: torch.Tensor, root: torch.Tensor) -> None:
        self.source, self.unpacked = source, False
        self.size, self.stride, self.offset = t.shape, t.stride(), t.storage_offset() - root.storage_offset()
        source.pending += 1

    def unpack(self) -> torch.Tensor:
        first, self.unpacked = not self.unpacked, True
        base = self.source.value(first)
        return base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)


class _Outer:
    """A kept tensor that went through composable outer hooks (e.g. SavedTensorsCounter)."""

    __slots__ = ("packed", "unpack")

    def __init__(self, packed, unpack) -> None:
        self.packed, self.unpack = packed, unpack


def _extent(shape, stride, offset: int) -> int:
    return offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1 if all(n > 0 for n in shape) else 0


# -------------------------------------------------------------------------------------------------- state
@dataclass
class _LayerCoverage:
    rebuilt: dict = field(default_factory=dict)  # description -> [count, bytes]
    kept: dict = field(default_factory=dict)  # reason -> [count, bytes]
    stepped_aside: int = 0


class _State:
    def __init__(self) -> None:
        self.sources: "weakref.WeakValueDictionary[tuple, _Source]" = weakref.WeakValueDictionary()
        self.coverage: dict[str, _LayerCoverage] = {}
        self.handles: list = []
        self.layers: list[str] = []
        self.warned_aside = False  # the stepped-aside warning: once per model

    # ----------------------------------------------------------------------------------------- packing
    def plan(self, t: torch.Tensor, cov: _LayerCoverage, known: dict):
        """A _Handle for t, or None (kept) with the reason recorded. `known`: the layer's input tensors (and their
        bases) by (id(grad_fn), output_nr)."""
        if isinstance(t, nn.Parameter) or not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return None
        root = t._base if t._is_view() else t
        node = root.grad_fn
        if isinstance(root, nn.Parameter):
            return None
        if node is None:
            if not root.requires_grad:  # xa of a custom Function, or an input that needs no gradient
                _count(cov.kept, "no autograd history (a tensor made inside the layer, e.g. xa, or an input that "
                       "needs no gradient: its producer saved nothing to rebuild it from)", t)  # fmt: skip
            return None
        if t.dtype != root.dtype:
            _count(cov.kept, "a dtype view of its base", t)
            return None
        key = (id(node), root.output_nr, root.dtype, tuple(root.shape), root.stride())
        source = self.sources.get(key)
        if source is None:
            try:
                recipe = _resolve(_recipe(node, root.output_nr, known, 0, tuple(root.shape)), root)
            except _NotRebuildable as why:
                _count(cov.kept, f"not rebuildable: {why}", t)
                return None
            if recipe.kind == "leaf":  # its own producer saves it (SDPA's output, a ReLU result): costs nothing
                _count(cov.kept, f"saved by its producer anyway ({_describe(recipe)})", t)
                return None
            source = _Source(recipe, node)
            self.sources[key] = source
        offset = t.storage_offset() - root.storage_offset()
        if offset < 0 or _extent(t.shape, t.stride(), offset) > _extent(root.shape, root.stride(), 0):
            _count(cov.kept, "a view outside its base's elements", t)
            return None
        _count(cov.rebuilt, source.description, t)
        return _Handle(source, t, root)

    # ------------------------------------------------------------------------------------------- hooks
    def hooks(self, name: str) -> tuple[Callable, Callable]:
        """The forward pre-hook that pushes this layer's saved_tensors_hooks and the (always_call) forward hook that
        pops them. Closures sharing one per-thread stack, wrapped in `_Hook`: `copy.deepcopy` keeps them as they are,
        so a copied model's hooks stay a matched pair (a bound method would be bound to a copy of this state), and
        pickling them (`torch.save(model)`) says how to remove them."""
        local = threading.local()

        def pre_hook(module, args, kwargs):
            stack = local.__dict__.setdefault("stack", [])
            if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                stack.append(None)
                return None
            cov = self.coverage[name] = _LayerCoverage()
            top = torch._C._autograd._top_saved_tensors_default_hooks(False)
            enabled = torch._C._autograd._saved_tensors_hooks_is_enabled()
            if not enabled or (top is not None and not getattr(top[0], "_peft_ext_composable", False)):
                cov.stepped_aside += 1
                if not self.warned_aside:
                    self.warned_aside = True
                    _warn_stepped_aside(name, None if not enabled else top[0])
                stack.append(None)
                return None
            outer_pack, outer_unpack = top if top is not None else (None, None)
            known = {}
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, torch.Tensor) and arg.grad_fn is not None:
                    node = arg.grad_fn  # held in `known`: its id cannot be reused while the layer runs
                    known[(id(node), arg.output_nr)] = (node, arg)
                    base = arg._base if arg._is_view() else None
                    if base is not None and base.grad_fn is not None:
                        node = base.grad_fn
                        known[(id(node), base.output_nr)] = (node, base)

            def pack(t):
                handle = self.plan(t, cov, known)
                if handle is not None:
                    return handle
                return t if outer_pack is None else _Outer(outer_pack(t), outer_unpack)

            ctx = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
            ctx.__enter__()
            stack.append((ctx, known))
            return None

        def post_hook(module, args, output):
            stack = local.__dict__.get("stack")
            entry = stack.pop() if stack else None
            if entry is not None:
                ctx, known = entry
                ctx.__exit__(None, None, None)
                # autograd keeps a saved_tensors_hooks' pack function (so its closure) alive as long as the graph it
                # packed for: left filled, `known` would hold the layer's inputs until the backward, the very
                # tensors the option is there not to keep. pack only runs during this forward.
                known.clear()
            return None

        return _Hook(pre_hook), _Hook(post_hook)


class _Hook:
    """A forward (pre-)hook of the option: calls `fn`; deep-copied as itself (like a function); refuses to be pickled
    with a message that names the way out (a closure would fail with "Can't pickle local object")."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __deepcopy__(self, memo) -> "_Hook":
        return self

    def __reduce__(self):
        raise pickle.PicklingError(
            "recompute_adapter_inputs: a model with the option on cannot be pickled whole (torch.save(model)): "
            "its hooks hold training-time state. Call "
            "peft_ext.remove_adapter_input_recompute(model) first (and peft_ext.recompute_adapter_inputs(model) again "
            "afterwards), or save the state dict / save_pretrained, which the option does not affect."
        )


def _warn_stepped_aside(name: str, outer_pack: Optional[Callable]) -> None:
    """Warns (once per model) that a training forward ran an adapter layer under other saved_tensors_hooks, so it
    saved its inputs as before: Trainer / TRL turn gradient checkpointing on inside train(), after the option was
    enabled, and the enable-time warning cannot see that."""
    if outer_pack is not None and getattr(outer_pack, "__module__", None) == "torch.utils.checkpoint":
        cause = (
            "gradient checkpointing is on (non-reentrant; Trainer / TRL turn it on inside train() when the "
            "training arguments say gradient_checkpointing=True)"
        )
        fix = (
            "turn gradient checkpointing off (gradient_checkpointing=False in the trainer arguments, or "
            "model.gradient_checkpointing_disable())"
        )
    else:
        if outer_pack is None:
            cause = "saved_tensors_hooks are disabled around it (torch.autograd.graph.disable_saved_tensors_hooks)"
        else:
            what = getattr(outer_pack, "__qualname__", type(outer_pack).__name__)
            cause = f"other saved_tensors_hooks are active around it ({what}: e.g. save_on_cpu or a pair of your own)"
        fix = "run the training forward outside those hooks"
    warnings.warn(
        f"recompute_adapter_inputs: adapter layer {name} stepped aside in this training forward (it saved its inputs "
        f"as without the option: no memory saved) because {cause}. To use the option, {fix}; or drop the option "
        f"(peft_ext.remove_adapter_input_recompute(model), or remove recompute_adapter_inputs from the recipe). "
        f"Gradients are unaffected. Warned once per model; report.coverage() counts the layers that stepped aside.",
        UserWarning,
        stacklevel=2,
    )


def _unpack(packed):
    if isinstance(packed, _Handle):
        return packed.unpack()
    if isinstance(packed, _Outer):
        return packed.unpack(packed.packed)
    return packed


def _count(table: dict, key: str, t: torch.Tensor) -> None:
    entry = table.setdefault(key, [0, 0])
    entry[0] += 1
    entry[1] += t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------------- report
@dataclass
class RecomputeReport:
    """What `recompute_adapter_inputs` hooked.

    layers: the adapter layers whose saved tensors are now rebuilt where possible (names in `model`).
    not_hooked: (name, reason) for adapter layers left alone (nested inside another adapter layer).
    `coverage()`: per layer, after a training forward, which saved tensors were rebuilt (with their recipe) and which
    were kept (with the reason), from the latest forward of each layer; `summary()` the same as text."""

    layers: list = field(default_factory=list)
    not_hooked: list = field(default_factory=list)
    _state: Optional[_State] = field(default=None, repr=False)

    def coverage(self) -> dict[str, dict]:
        out = {}
        for name in self.layers:
            cov = self._state.coverage.get(name) if self._state is not None else None
            if cov is None:
                continue
            out[name] = {
                "rebuilt": {k: tuple(v) for k, v in cov.rebuilt.items()},
                "kept": {k: tuple(v) for k, v in cov.kept.items()},
                "stepped_aside": cov.stepped_aside,
            }
        return out

    def summary(self) -> str:
        lines = [f"recompute_adapter_inputs: {len(self.layers)} adapter layer(s) hooked"]
        lines += [f"  not hooked: {n}: {r}" for n, r in self.not_hooked]
        for name, cov in self.coverage().items():
            rebuilt = ", ".join(f"{k} x{c} ({b} B)" for k, (c, b) in cov["rebuilt"].items()) or "-"
            kept = ", ".join(f"{k} x{c} ({b} B)" for k, (c, b) in cov["kept"].items()) or "-"
            aside = cov["stepped_aside"]
            aside = f"; stepped aside x{aside} (other saved_tensors_hooks)" if aside else ""
            lines.append(f"  {name}: rebuilt {rebuilt}; kept {kept}{aside}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- public API
def _adapter_layers(model: nn.Module) -> tuple[list, list]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    hooked, nested = [], []
    tuner_names = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    modules = dict(model.named_modules())
    for name in tuner_names:
        parent = next((p for p in tuner_names if p != name and name.startswith(p + ".")), None)
        if parent is not None:
            nested.append((name, f"inside adapter layer {parent} (hooked there)"))
        else:
            hooked.append((name, modules[name]))
    return hooked, nested


def _checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def recompute_adapter_inputs(model: nn.Module, enable: bool = True, warn: bool = True) -> Optional[RecomputeReport]:
    """Rebuild the inputs that adapter layers save for their backward from tensors the frozen base saves anyway,
    instead of keeping them (in place; see the module docstring). Exact: gradients are bit-identical.

    Args:
        model: a `PeftModel` or any module holding PEFT tuner layers (PEFT LoRA, with or without
            `peft_ext.accelerate_lora`; COLA, S'MoRE, SSMLoRA, FineGates, ...).
        enable: False removes the option (same as `remove_adapter_input_recompute`) and returns None.
        warn: warn when gradient checkpointing is on (the option gains nothing there).

    Returns a `RecomputeReport`: the layers hooked; `report.coverage()` after a training forward says what was
    rebuilt and what kept. Calling it again re-hooks (adapter layers added since are included)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a PeftModel), got {type(model).__name__}.")
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be True or False, got {enable!r}.")
    remove_adapter_input_recompute(model)
    if not enable:
        return None
    missing = [f for f in _HOOK_INTROSPECTION if not hasattr(torch._C._autograd, f)]
    if missing:
        raise RuntimeError(
            f"recompute_adapter_inputs needs torch's saved-tensor hook introspection (torch._C._autograd."
            f"{missing[0]}), which torch {torch.__version__} lacks: it could not tell whether other "
            f"saved_tensors_hooks (gradient checkpointing) are active. Use torch 2.13 or train without the option."
        )
    layers, nested = _adapter_layers(model)
    if not layers:
        raise ValueError(
            "model has no adapter layers (PEFT BaseTunerLayer modules): recompute_adapter_inputs applies to a model "
            "after get_peft_model / inject_adapter_in_model (e.g. a LoraConfig or a peft_ext config)."
        )
    state = _State()
    for name, module in layers:
        pre_hook, post_hook = state.hooks(name)
        pre = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        post = module.register_forward_hook(post_hook, always_call=True)
        state.handles += [pre, post]
        state.layers.append(name)
    report = RecomputeReport(layers=list(state.layers), not_hooked=nested, _state=state)
    model.__dict__[_STATE_ATTR] = (state, report)
    if warn and _checkpointing_on(model):
        warnings.warn(
            "recompute_adapter_inputs: gradient checkpointing is on; checkpointed blocks save only their inputs, so "
            "the option gains nothing there (non-reentrant: the adapter layers step aside; reentrant: only the "
            "recomputation in the backward uses it). Gradients stay exact either way.",
            stacklevel=2,
        )
    return report


def remove_adapter_input_recompute(model: nn.Module) -> nn.Module:
    """Undo `recompute_adapter_inputs`: remove its hooks, so adapter layers save their inputs again. In place;
    returns `model`. A no-op on a model without the option."""
    entry = model.__dict__.pop(_STATE_ATTR, None)
    if entry is not None:
        for handle in entry[0].handles:
            handle.remove()
        entry[0].handles.clear()
    return model


# --------------------------------------------------------------------------------------------- measuring
class SavedTensorsCounter(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the unique storages autograd saves while active (each storage once, however many nodes
    save it or views of it); `exclude` (e.g. `model.parameters()`) lists tensors whose storages are not counted.
    A measurement of saved activation bytes, independent of the device's allocator (works on the CPU).

    Composable with `recompute_adapter_inputs`: the adapter layers' hooks chain to it, so a tensor they rebuild in the
    backward is not counted (it is not saved) while what they keep is. Holds the counted storages until exit (so a
    freed address cannot be counted twice); use it around a forward, then read `.bytes` / `.storages`."""

    def __init__(self, exclude=()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: dict = {}

        def pack(t):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
                key = _storage_key(t)
                if key not in self._excluded and key not in self._seen:
                    storage = t.untyped_storage()
                    self._seen[key] = (storage, storage.nbytes())
            return t

        pack._peft_ext_composable = True
        super().__init__(pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self._seen.values())

    @property
    def storages(self) -> int:
        return len(self._seen)

    def __enter__(self) -> "SavedTensorsCounter":
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._seen = {k: (None, n) for k, (_, n) in self._seen.items()}


class LiveActivationBytes(TorchDispatchMode):
    """Live memory a forward leaves behind, measured on any device without its allocator: while active, records (by
    weak reference) the storage of every tensor an op creates (every aten op below autograd, custom Functions'
    internals included); `.bytes` then sums the storages still alive (each once, after `gc.collect()`), whoever keeps
    them: autograd's saved tensors, the outputs, or any other reference (a closure, a cache). `SavedTensorsCounter`
    sees only what autograd packs; this sees what is really still allocated. Parameters, buffers and inputs are not
    made during the forward, so they are not counted; casts of weights made in the forward are.

    Use it around a forward, read `.bytes` / `.storages` before the backward (while the graph is alive)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict = {}  # storage key -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if _strided(t):
                storage = t.untyped_storage()
                key = _storage_key(t)
                if inputs is None:  # a view or an in-place result shares an input's storage: not made here
                    inputs = {_storage_key(a) for a in tree_flatten((args, kwargs))[0] if _strided(a)}
                if key in inputs:
                    continue
                entry = self._made.get(key)
                if entry is None or entry[0].expired():  # a new storage (a freed one's address may be reused)
                    self._made[key] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def _alive(self) -> list:
        gc.collect()
        return [n for ref, n in self._made.values() if not ref.expired()]

    @property
    def bytes(self) -> int:
        return sum(self._alive())

    @property
    def storages(self) -> int:
        return len(self._alive())


def _strided(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())
