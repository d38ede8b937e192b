"""Rewrite: put a Plan's quantizers on the live model. The only step that mutates a model.

Every site is materialised on the module that owns it, so the model keeps its class,
its methods and every state-dict key; quantizer state is added beside the weights:

- a weight ``w`` of module ``m`` gets ``m.w_quantizer``; a forward pre-hook swaps the
  quantized tensor in for the duration of ``m``'s forward and an always-called forward
  hook puts the latent float parameter back (so ``m.weight`` outside forward, the
  state dict and the optimizer all see the float weight, and the weight is quantized
  once per call however often ``forward`` reads it);
- ``input_activations`` / ``output_activations`` become ``m.input_quantizer`` /
  ``m.output_quantizer`` applied by the same hooks;
- op sites (functional matmul, bmm, SDPA... in ``m``'s own forward, or the pointwise
  call that ends a pattern) go to ``m.op_quantizers`` and an
  :class:`~stefx.intercept.OpInterceptor` active while ``m`` runs;
- a weight with a BatchNorm folded in (``fold_bn``) is quantized as the deployed, folded
  weight ``w·γ/σ`` and scaled back, ``q(w·γ/σ)·σ/γ``, so the BatchNorm that follows (kept,
  with its statistics) sees what it would see unfolded (Jacob et al., arXiv:1712.05877 §3.2;
  Krishnamoorthi, arXiv:1806.08342 §2.9). In eval mode conv + BatchNorm then computes
  exactly ``conv(x, q(w·γ/σ)) + b'``, the folded layer a converter will emit.

Everything is built and checked before anything is attached, so a failure leaves the
model untouched. The hooks are module-level functions (the model stays picklable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from stefx.errors import RecipeError
from stefx.intercept import OpInterceptor, operand_positions, quiet
from stefx.match import Plan, Site
from stefx.ste.base import Quantizer
from stefx.ste.spec import QuantSpec, make_quantizer

__all__ = [
    "STATE_ATTR",
    "apply_plan",
    "dequantize",
    "fold_scale",
    "quantized_modules",
    "weight_spec",
]

STATE_ATTR = "_stefx_state"


@dataclass
class _ModuleState:
    """What stefx attached to one module (kept on it as ``module._stefx_state``)."""

    params: tuple[str, ...] = ()
    has_input: bool = False
    has_output: bool = False
    op_table: dict = field(default_factory=dict)
    handles: list = field(default_factory=list)
    child_handles: list = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    latent: dict[str, nn.Parameter] = field(default_factory=dict)
    interceptor: OpInterceptor | None = None
    fold: dict[str, tuple[nn.Module, int]] = field(default_factory=dict)  # param -> (bn, axis)


def weight_spec(
    spec: QuantSpec, shape: tuple[int, ...], kind: str, in_axis: int | None
) -> QuantSpec:
    """The spec a weight quantizer of a ``kind`` op really gets: ``channel`` means one scale
    per output channel, which is axis 1 of a ConvTranspose weight [in, out, *k], and one
    scale per (expert, output row) of a fused expert weight [E, ., .], i.e. groups that
    span its whole input axis."""
    if spec.strategy != "channel" or spec.axis is not None:
        return spec
    if in_axis is not None:
        return spec.replace(strategy="group", axis=in_axis, group_size=shape[in_axis])
    if kind == "conv_transpose":
        return spec.replace(axis=1)
    return spec


def fold_axis(module: nn.Module, bn: nn.Module, where: str) -> int:
    """The output-channel axis of ``module.weight`` that ``bn``'s statistics scale."""
    axis = 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise RecipeError(
                f"{where}: fold_bn on a grouped ConvTranspose (groups={module.groups}) is not "
                "supported: its output channels are not one weight axis; remove fold_bn"
            )
        axis = 1  # weight [in, out, *k]
    elif type(module).__name__ == "Conv1D":
        axis = 1  # Hugging Face Conv1D: weight [in, out]
    n = module.weight.shape[axis]
    if n != bn.num_features:
        raise RecipeError(
            f"{where}: fold_bn: the weight has {n} output channels but the BatchNorm has "
            f"{bn.num_features} features; only a BatchNorm over this op's outputs can fold"
        )
    return axis


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


def quantizer_name(param: str) -> str:
    """The submodule holding a weight's quantizer: ``weight`` -> ``weight_quantizer``,
    ``out_proj.weight`` (a child's weight the module reads) -> ``out_proj_weight_quantizer``."""
    return f"{param.replace('.', '_')}_quantizer"


def _slot(module: nn.Module, param: str) -> tuple[nn.Module, str]:
    """The module that holds ``param`` in its ``_parameters``, and the key there."""
    owner, _, name = param.rpartition(".")
    return (module.get_submodule(owner) if owner else module), name


def _build(
    site: Site, module: nn.Module, fold: tuple[nn.Module, int] | None = None
) -> dict[str, nn.Module]:
    """The quantizer submodules a site needs, initialised; raises before anything mutates.
    ``fold``: (BatchNorm, weight axis) folded into ``weight``."""
    built: dict[str, nn.Module] = {}
    where = f"site {site.name!r} (rule {','.join(map(str, site.rules))})"
    for p in site.params:
        param = module.get_parameter(p)
        spec = weight_spec(site.weights, param.shape, site.kind, site.expert_in_axis.get(p))
        q = make_quantizer(spec, f"{where} weights")
        try:
            q.granularity.num_groups(param.shape)
        except RecipeError as e:  # say which site and weight it was
            raise RecipeError(f"{where} weights {p} {tuple(param.shape)}: {e}") from None
        with torch.no_grad():
            w = param.detach()
            if fold is not None and p == "weight":
                w = w * fold_scale(*fold, w)
            q.init_from(w)
        built[quantizer_name(p)] = q
    if site.is_op_site:
        if site.input_activations is not None:
            for i, _ in enumerate(operand_positions(site.kind, site.operands)):
                built[f"{site.kind}_{site.ordinal}_in{i}"] = make_quantizer(
                    site.input_activations, f"{where} input_activations"
                )
        if site.output_activations is not None:
            built[f"{site.kind}_{site.ordinal}_out"] = make_quantizer(
                site.output_activations, f"{where} output_activations"
            )
        return built
    if site.input_activations is not None:
        built["input_quantizer"] = make_quantizer(site.input_activations, f"{where} inputs")
    if site.output_activations is not None:
        built["output_quantizer"] = make_quantizer(site.output_activations, f"{where} outputs")
    return built


def _device_of(module: nn.Module) -> torch.device | None:
    """Where the module computes: its first parameter or buffer, own or a child's."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def apply_plan(model: nn.Module, plan: Plan) -> list[str]:
    """Attach every site of ``plan`` to ``model``; return the names of modules touched."""
    modules = dict(model.named_modules(remove_duplicate=False))
    staged: list[tuple[Site, nn.Module, dict[str, nn.Module], tuple | None]] = []
    io_taken: set[tuple[str, str]] = set()
    for site in plan.sites:
        module = modules[site.module]
        if getattr(module, STATE_ATTR, None) is not None:
            raise RecipeError(
                f"module {site.module!r} is already quantized; call stefx.dequantize(model) first"
            )
        fold = None
        if site.fold_bn and "weight" in site.params:
            bn = modules[site.fold_bn]
            fold = (bn, fold_axis(module, bn, f"site {site.name!r}"))
        built = _build(site, module, fold)
        device = _device_of(module)
        if device is not None:  # activation quantizers hold state too (LSQ step, PACT α)
            built = {name: q.to(device) for name, q in built.items()}
        if not site.is_op_site:
            # A module has one input and one output: its first site quantizes them.
            for name in ("input_quantizer", "output_quantizer"):
                if name in built and (site.module, name) in io_taken:
                    del built[name]
                io_taken.add((site.module, name))
            taken = [n for n in built if n.endswith("_quantizer") and hasattr(module, n)]
            if taken:
                raise RecipeError(f"module {site.module!r} already has attributes {taken}")
        staged.append((site, module, built, fold))
    touched: list[str] = []
    for site, module, built, fold in staged:  # nothing below can fail on valid input
        _attach(site, module, built)
        if fold is not None:
            getattr(module, STATE_ATTR).fold["weight"] = fold
        if site.module not in touched:
            touched.append(site.module)
    return touched


def _attach(site: Site, module: nn.Module, built: dict[str, nn.Module]) -> None:
    state = getattr(module, STATE_ATTR, None)
    if state is None:
        state = _ModuleState()
        object.__setattr__(module, STATE_ATTR, state)
        state.handles.append(module.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        state.handles.append(module.register_forward_hook(_post_hook, always_call=True))
    if site.is_op_site:
        if not hasattr(module, "op_quantizers"):
            module.add_module("op_quantizers", nn.ModuleDict())
            state.added.append("op_quantizers")
            for child in module.children():
                if isinstance(child, Quantizer) or child is module.op_quantizers:
                    continue
                suspend, resume = partial(_suspend, module), partial(_resume, module)
                pre = child.register_forward_pre_hook(suspend, prepend=True)
                state.child_handles.append(pre)
                state.child_handles.append(child.register_forward_hook(resume, always_call=True))
        for name, q in built.items():
            module.op_quantizers[name] = q
        key = (site.kind, site.ordinal)
        ins = [q for n, q in built.items() if n.rsplit("_", 1)[-1].startswith("in")]
        out = built.get(f"{site.kind}_{site.ordinal}_out")
        state.op_table[key] = (ins, out)
        return
    for name, q in built.items():
        module.add_module(name, q)
        state.added.append(name)
    state.params = tuple(dict.fromkeys((*state.params, *site.params)))
    state.has_input = state.has_input or "input_quantizer" in built
    state.has_output = state.has_output or "output_quantizer" in built


def _quantize_first_input(q: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Quantize the module's input: its first tensor argument, and every other argument
    that is the same tensor (self-attention passes x as query, key and value: all three
    must see the one quantized x, and nn.MultiheadAttention's ``query is key`` holds)."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if first is None or not first.is_floating_point():
        return args, kwargs
    y = q(first)
    args = tuple(y if a is first else a for a in args)
    kwargs = {k: (y if v is first else v) for k, v in kwargs.items()}
    return args, kwargs


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state: _ModuleState = getattr(module, STATE_ATTR)
    with quiet:  # an ancestor's op interceptor must not count the quantizers' own ops
        args, kwargs = _quantize_inputs(module, state, args, kwargs)
    if state.op_table:
        state.interceptor = OpInterceptor(state.op_table)
        state.interceptor.__enter__()
    return args, kwargs


def _quantize_inputs(module: nn.Module, state: _ModuleState, args: tuple, kwargs: dict):
    for p in state.params:
        owner, key = _slot(module, p)
        latent = owner._parameters[key]
        state.latent[p] = latent
        q = getattr(module, quantizer_name(p))
        fold = state.fold.get(p)
        if fold is not None and q.enabled and q.strength:
            s = fold_scale(*fold, latent)
            owner._parameters[key] = q(latent * s) / s
        else:
            owner._parameters[key] = q(latent)
    if state.has_input:
        args, kwargs = _quantize_first_input(module.input_quantizer, args, kwargs)
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    state: _ModuleState = getattr(module, STATE_ATTR)
    if state.interceptor is not None:
        state.interceptor.__exit__(None, None, None)
        state.interceptor = None
    _restore(module, state)
    if state.has_output and isinstance(output, torch.Tensor) and output.is_floating_point():
        with quiet:
            return module.output_quantizer(output)
    return output


def _restore(module: nn.Module, state: _ModuleState) -> None:
    """Put the latent float parameters back after a forward (or on dequantize)."""
    for p, latent in state.latent.items():
        owner, key = _slot(module, p)
        owner._parameters[key] = latent
    state.latent.clear()


def _suspend(owner: nn.Module, child: nn.Module, args: tuple) -> None:
    """Ops inside a child module belong to the child: stop counting for the owner."""
    mode = getattr(owner, STATE_ATTR).interceptor
    if mode is not None:
        mode.suspended += 1


def _resume(owner: nn.Module, child: nn.Module, args: tuple, output: Any) -> None:
    mode = getattr(owner, STATE_ATTR).interceptor
    if mode is not None and mode.suspended:
        mode.suspended -= 1


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that carry stefx quantizers, by FQN."""
    return {
        name: m for name, m in model.named_modules() if getattr(m, STATE_ATTR, None) is not None
    }


def dequantize(model: nn.Module) -> nn.Module:
    """Remove every stefx quantizer and hook: the model is its float self again (in place)."""
    for module in quantized_modules(model).values():
        state: _ModuleState = getattr(module, STATE_ATTR)
        for h in (*state.handles, *state.child_handles):
            h.remove()
        _restore(module, state)
        for name in state.added:
            delattr(module, name)
        object.__delattr__(module, STATE_ATTR)
    return model
