"""Runtime: what a quantized module does when it runs. :mod:`stefx.rewrite` attaches it.

Each quantized module carries a :class:`ModuleState` (``module._stefx_state``) and two
hooks, module-level functions so the model deep-copies and pickles:

- the forward pre-hook swaps each quantized weight in for the duration of the forward
  (``m._parameters["weight"] = q(latent)``: outside forward, ``m.weight`` is the latent
  ``nn.Parameter`` the state dict, optimizers and weight tying see), quantizes the input,
  and enters the module's :class:`~stefx.intercept.OpInterceptor` when it has op sites;
- the always-called forward hook leaves the interceptor, puts the latent weights back,
  and quantizes the output.

A module whose quantizers are all disabled (``enabled = False`` or strength 0) runs its
plain float forward: the hooks return at once.

Eager-mode extras that ``torch.compile`` does not need (it fuses and deduplicates
itself): one input tensor quantized by several modules with the same stateless spec (a
decoder's q/k/v projections, gate/up of an MLP) is quantized once and shared; and a
planned op site that a forward never reached is reported with a warning, once.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from stefx.intercept import OpEntry, OpInterceptor
from stefx.ste.base import Quantizer

__all__ = [
    "RECOMPUTE_WEIGHTS",
    "STATE_ATTR",
    "ModuleState",
    "fold_scale",
    "is_stefx_hook",
    "param_slot",
    "post_hook",
    "pre_hook",
    "quantizer_name",
    "restore",
]

STATE_ATTR = "_stefx_state"


@dataclass(eq=False)
class ModuleState:
    """What stefx attached to one module, by name (the quantizers are its submodules).

    swaps:        weight parameter (local name) -> quantizer swapped in for the forward.
    call_weights: site kind -> {weight: quantizer} for weights quantized at each call of
                  that kind instead (several ops of the module read the weight with
                  different specs).
    input, output: quantizer of the module's input / output, or None.
    op_table:     (counter, ordinal) -> :class:`OpEntry` for op sites.
    fold:         weight -> (BatchNorm, weight axis) folded into it while training.
    added:        attributes stefx added (removed by ``dequantize``).
    fqn:          the module's name when it was quantized (the plan's sites say it); a
                  wrapper that moves the module (PEFT's LoRA layer) leaves it behind.
    """

    swaps: dict[str, str] = field(default_factory=dict)
    call_weights: dict[str, dict[str, str]] = field(default_factory=dict)
    input: str | None = None
    output: str | None = None
    op_table: dict[tuple[str, int], OpEntry] = field(default_factory=dict)
    fold: dict[str, tuple[nn.Module, int]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    fqn: str = ""
    # transient, only during a forward; never copied or pickled
    latent: dict[str, nn.Parameter] = field(default_factory=dict)
    interceptor: OpInterceptor | None = None
    saved: Any = None  # the saved-tensor hooks that recompute quantized weights
    warned: bool = False

    def weight_quantizers(self) -> list[tuple[str, str]]:
        """``(weight, quantizer name)`` for every weight this state quantizes, swapped in
        for the forward or quantized per call."""
        per_call = [pair for table in self.call_weights.values() for pair in table.items()]
        return [*self.swaps.items(), *per_call]

    def quantizers(self, module: nn.Module) -> list[Quantizer]:
        """Every quantizer this state names, on ``module``."""
        names = [qname for _, qname in self.weight_quantizers()]
        names += [n for n in (self.input, self.output) if n is not None]
        out = [module._modules[n] for n in names]
        if self.op_table:
            out += list(module._modules["op_quantizers"].values())
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(latent={}, interceptor=None, saved=None, warned=False)
        return state


def quantizer_name(param: str) -> str:
    """The submodule holding a weight's quantizer: ``weight`` -> ``weight_quantizer``,
    ``out_proj.weight`` (a child's weight the module reads) -> ``out_proj_weight_quantizer``."""
    return f"{param.replace('.', '_')}_quantizer"


def fold_scale(bn: nn.Module, axis: int, weight: torch.Tensor) -> torch.Tensor:
    """γ/√(σ²+ε) per output channel, shaped to broadcast along ``weight``'s ``axis``.

    A channel with γ = 0 keeps scale 1: its BatchNorm output is β whatever the weight.
    """
    std = torch.sqrt(bn.running_var.to(weight.dtype) + bn.eps)
    s = bn.weight.to(weight.dtype) / std if bn.weight is not None else std.reciprocal()
    s = torch.where(s == 0, torch.ones_like(s), s)
    shape = [1] * weight.dim()
    shape[axis] = -1
    return s.reshape(shape)


def param_slot(module: nn.Module, param: str) -> tuple[nn.Module, str]:
    """The module that holds ``param`` in its ``_parameters``, and the key there."""
    owner, _, name = param.rpartition(".")
    return (module.get_submodule(owner) if owner else module), name


def _active(q: Quantizer) -> bool:
    return q.enabled and not q._off


def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    state: ModuleState = module.__dict__[STATE_ATTR]
    if not any(_active(q) for q in state.quantizers(module)):
        return None  # the float forward, untouched
    requantize: dict | None = {} if RECOMPUTE_WEIGHTS and _may_hook_saved_tensors() else None
    for p, qname in state.swaps.items():
        owner, key = param_slot(module, p)
        latent = owner._parameters[key]
        state.latent[p] = latent
        q = module._modules[qname]
        qw = _quantized_weight(q, latent, state.fold.get(p))
        owner._parameters[key] = qw
        if requantize is not None and _recomputable(qw, latent, p, state):
            requantize[qw.untyped_storage().data_ptr()] = (qw, q, latent)
    if state.input is not None:
        args, kwargs = _quantize_first_input(module._modules[state.input], args, kwargs)
    if requantize:
        hooks = torch.autograd.graph.saved_tensors_hooks(partial(_pack, requantize), _unpack)
        hooks.__enter__()
        state.saved = (hooks, requantize)
    if state.op_table or state.call_weights:
        state.interceptor = OpInterceptor(module, state.op_table, state.call_weights)
        state.interceptor.__enter__()
    return args, kwargs


def post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    state: ModuleState = module.__dict__[STATE_ATTR]
    if state.saved is not None:
        (hooks, requantize), state.saved = state.saved, None
        hooks.__exit__(None, None, None)
        requantize.clear()  # autograd keeps the pack hook with each tensor it saved
    mode = state.interceptor
    if mode is not None:
        state.interceptor = None
        mode.__exit__(None, None, None)
        if not state.warned and not _compiling():
            _warn_unfired(state, mode)
    restore(module, state)
    floating = isinstance(output, torch.Tensor) and output.is_floating_point()
    if state.output is not None and floating:
        return module._modules[state.output](output)
    return output


def _quantized_weight(q: Quantizer, latent: torch.Tensor, fold) -> torch.Tensor:
    """``q(latent)``, or with a BatchNorm folded in, ``q(latent·s)/s``."""
    if fold is not None and _active(q):
        s = fold_scale(*fold, latent)
        return q(latent * s) / s
    return q(latent)


# -- quantized weights recomputed in backward, not saved (eager only) ------------------------

#: Recompute each quantized weight in the backward pass instead of keeping the copy the
#: op that reads it saves (a Linear saves its weight for dL/dx): one weight-sized buffer
#: less per layer, one quantizer forward more. Off: the copies are kept.
RECOMPUTE_WEIGHTS = True


class _Requantize:
    """What a saved quantized weight (or a view of it, ``w.t()``) is packed into: how to
    compute it again, and which view of it was saved."""

    __slots__ = ("latent", "quantizer", "version", "view")

    def __init__(self, quantizer: Quantizer, latent: torch.Tensor, saved: torch.Tensor) -> None:
        self.quantizer, self.latent = quantizer, latent
        self.version = latent._version
        self.view = (saved.size(), saved.stride(), saved.storage_offset())

    def __call__(self) -> torch.Tensor:
        if self.latent._version != self.version:
            raise RuntimeError(
                "stefx: a quantized weight saved for backward is recomputed from its latent "
                "weight, which was modified in place between forward and backward; set "
                "stefx.runtime.RECOMPUTE_WEIGHTS = False to keep the copies instead"
            )
        with torch.no_grad():
            w = _quantized_weight(self.quantizer, self.latent, None)
        return w.as_strided(*self.view)


def _recomputable(qw: torch.Tensor, latent: torch.Tensor, param: str, state) -> bool:
    """A fresh buffer of the quantizer's (not the latent itself: a disabled quantizer),
    and not a folded weight (it reads BatchNorm statistics that the forward moves)."""
    return (
        latent is not None  # a packed weight (stefx.convert): nothing to recompute from
        and qw is not latent
        and param not in state.fold
        and qw.is_contiguous()
        and qw.device.type != "meta"
    )


def _may_hook_saved_tensors() -> bool:
    """Only in eager mode, with gradients, and when no one else (activation checkpointing,
    offloading) has saved-tensor hooks on: those would otherwise be shadowed."""
    return (
        torch.is_grad_enabled()
        and not _compiling()
        and torch._C._autograd._saved_tensors_hooks_is_enabled()
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


def _pack(requantize: dict, t: torch.Tensor) -> Any:
    """A saved tensor that is a quantized weight or a view of it (same storage, a buffer
    the quantizer made for it alone) is packed as a recipe to recompute it."""
    if t.device.type == "meta" or t.layout != torch.strided:
        return t
    entry = requantize.get(t.untyped_storage().data_ptr())
    if (
        entry is not None
        and entry[0].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    ):
        return _Requantize(entry[1], entry[2], t)
    return t


def _unpack(packed: Any) -> torch.Tensor:
    return packed() if isinstance(packed, _Requantize) else packed


def restore(module: nn.Module, state: ModuleState) -> None:
    """Put the latent float parameters back after a forward (or on dequantize)."""
    for p, latent in state.latent.items():
        owner, key = param_slot(module, p)
        owner._parameters[key] = latent
    state.latent.clear()


def _warn_unfired(state: ModuleState, mode: OpInterceptor) -> None:
    missed = mode.unfired()
    if missed:
        state.warned = True
        warnings.warn(
            f"stefx: planned op site(s) {', '.join(missed)} did not run in this forward, so "
            "their quantizers did nothing; the forward took another path than the one "
            "captured (a branch, another attention implementation). stefx.explain(model, "
            "recipe, example_inputs) with inputs like these shows the sites this path has.",
            stacklevel=3,
        )


def suspend(owner: nn.Module, child: nn.Module, args: tuple) -> None:
    """Ops inside a child module belong to the child: stop counting for the owner."""
    mode = owner.__dict__[STATE_ATTR].interceptor
    if mode is not None:
        mode.suspended += 1


def resume(owner: nn.Module, child: nn.Module, args: tuple, output: Any) -> None:
    mode = owner.__dict__[STATE_ATTR].interceptor
    if mode is not None and mode.suspended:
        mode.suspended -= 1


def is_stefx_hook(hook: object) -> bool:
    """Whether a registered hook is one of stefx's (plain, or bound to an owner)."""
    fn = getattr(hook, "func", hook)  # functools.partial
    return fn in (pre_hook, post_hook, suspend, resume)


# -- one quantized input shared by several modules (eager only) ------------------------------


def _compiling() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class _LastInput(threading.local):
    slot: tuple | None = None


_last = _LastInput()


def _forget(ref: weakref.ref) -> None:
    """The shared input died: drop the quantized tensor kept for it."""
    slot = _last.slot
    if slot is not None and slot[0] is ref:
        _last.slot = None


def shared(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """``q(x)``, reusing the result of the previous call when it quantized this same
    tensor (same object, unchanged) with an identical stateless quantizer. The result is
    kept only while ``x`` itself is alive."""
    key = None if _compiling() else q.sharing_key()
    if key is None:
        return q(x)
    key = (key, torch.is_grad_enabled())
    slot = _last.slot
    if slot is not None and slot[0]() is x and slot[1] == x._version and slot[2] == key:
        y = slot[3]
        if y._version == slot[4]:
            return y
    y = q(x)
    _last.slot = (weakref.ref(x, _forget), x._version, key, y, y._version)
    return y


def _quantize_first_input(q: Quantizer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Quantize the module's input: its first tensor argument, and every other argument
    that is the same tensor (self-attention passes x as query, key and value: all three
    must see the one quantized x, and nn.MultiheadAttention's ``query is key`` holds)."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if first is None or not first.is_floating_point():
        return args, kwargs
    y = shared(q, first)
    args = tuple(y if a is first else a for a in args)
    kwargs = {k: (y if v is first else v) for k, v in kwargs.items()}
    return args, kwargs
