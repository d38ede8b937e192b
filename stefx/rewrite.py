"""Rewrite: put a Plan's quantizers on the live model. The only step that mutates a model.

Every site is materialised on the module that owns it, so the model keeps its class,
its methods and every state-dict key; quantizer state is added beside the weights:

- a weight ``w`` of module ``m`` gets ``m.w_quantizer``, swapped in for the duration of
  ``m``'s forward by :mod:`stefx.runtime` (so it is quantized once per call however often
  ``forward`` reads it); a weight that two ops of ``m`` read with different specs (an
  embedding matrix ``m`` also uses as its output projection) gets one quantizer per op
  kind, ``m.<kind>_w_quantizer``, applied at each call of that kind;
- ``input_activations`` / ``output_activations`` become ``m.input_quantizer`` /
  ``m.output_quantizer``;
- op sites (functional matmul, bmm, SDPA... in ``m``'s own forward, or the pointwise
  call that ends a pattern) go to ``m.op_quantizers`` and the op table of ``m``'s
  :class:`~stefx.intercept.OpInterceptor`;
- a weight with a BatchNorm folded in (``fold_bn``) is quantized as the deployed, folded
  weight ``w·γ/σ`` and scaled back, ``q(w·γ/σ)·σ/γ``, so the BatchNorm that follows (kept,
  with its statistics) sees what it would see unfolded (Jacob et al., arXiv:1712.05877 §3.2;
  Krishnamoorthi, arXiv:1806.08342 §2.9). In eval mode conv + BatchNorm then computes
  exactly ``conv(x, q(w·γ/σ)) + b'``, the folded layer a converter will emit.

Everything is built and checked before anything is attached, so a failure leaves the
model untouched. Nothing attached holds a hook handle or a graph: the model deep-copies,
pickles and ``torch.save``-s like any module, and ``dequantize`` finds stefx's hooks by
what they are.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch import nn

from stefx.errors import RecipeError
from stefx.intercept import OpEntry
from stefx.match import Plan
from stefx.runtime import (
    STATE_ATTR,
    ModuleState,
    fold_scale,
    is_stefx_hook,
    post_hook,
    pre_hook,
    quantizer_name,
    restore,
    resume,
    suspend,
)
from stefx.sites import Site, operand_slots
from stefx.ste.base import Quantizer
from stefx.ste.spec import make_quantizer

__all__ = ["STATE_ATTR", "apply_plan", "dequantize", "quantized_modules", "weight_quantizer"]

Built = dict[str, nn.Module]


def _where(site: Site) -> str:
    return f"site {site.name!r} (rule {','.join(map(str, site.rules))})"


def weight_quantizer(site: Site, module: nn.Module, p: str, fold=None) -> Quantizer:
    """A weight's quantizer on its resolved spec, initialised from the weight."""
    param = module.get_parameter(p)
    q = make_quantizer(site.weight_specs[p], f"{_where(site)} weights")
    try:
        q.granularity.num_groups(param.shape)
    except RecipeError as e:  # say which site and weight it was
        raise RecipeError(f"{_where(site)} weights {p} {tuple(param.shape)}: {e}") from None
    with torch.no_grad():
        w = param.detach()
        if fold is not None:
            w = w * fold_scale(*fold, w)
        q.init_from(w)
    return q


def _build(module: nn.Module, sites: list[Site], modules: dict) -> tuple[ModuleState, Built]:
    """The state and quantizer submodules of one module's sites; raises before anything
    mutates."""
    state, built = ModuleState(), {}
    readers: dict[str, list[Site]] = defaultdict(list)
    for site in sites:
        for p in site.params:
            readers[p].append(site)
    for site in sites:
        fold = None
        if site.fold_bn and site.fold_axis is not None:
            fold = (modules[site.fold_bn], site.fold_axis)
            state.fold["weight"] = fold
        for p in site.params:
            q = weight_quantizer(site, module, p, fold if p == "weight" else None)
            if len(readers[p]) == 1:
                state.swaps[p] = name = quantizer_name(p)
            else:  # several ops read it with their own specs: quantize at each call
                name = f"{site.kind}_{quantizer_name(p)}"
                state.call_weights.setdefault(site.kind, {})[p] = name
            built[name] = q
        if site.is_op_site:
            _build_op_site(site, state, built)
            continue
        # A module has one input and one output: its first site quantizes them.
        for field_, name in (("input_activations", "input"), ("output_activations", "output")):
            spec = getattr(site, field_)
            if spec is not None and getattr(state, name) is None:
                built[f"{name}_quantizer"] = make_quantizer(spec, f"{_where(site)} {name}s")
                setattr(state, name, f"{name}_quantizer")
    taken = [n for n in built if n in module.__dict__ or hasattr(module, n)]
    if state.op_table and hasattr(module, "op_quantizers"):
        taken.append("op_quantizers")
    if taken:
        raise RecipeError(f"module {sites[0].module!r} already has attributes {taken}")
    return state, built


def _build_op_site(site: Site, state: ModuleState, built: Built) -> None:
    stem = f"{site.counter}_{site.ordinal}"
    inputs: list[str | None] = []
    if site.input_activations is not None:
        for i, _ in enumerate(operand_slots(site.kind, site.operands)):
            inputs.append(f"{stem}_in{i}")
            built[f"op_quantizers.{stem}_in{i}"] = make_quantizer(
                site.input_activations, f"{_where(site)} input_activations"
            )
    output = None
    if site.output_activations is not None:
        output = f"{stem}_out"
        built[f"op_quantizers.{output}"] = make_quantizer(
            site.output_activations, f"{_where(site)} output_activations"
        )
    state.op_table[(site.counter, site.ordinal)] = OpEntry(tuple(inputs), output, site.name)


def device_of(module: nn.Module) -> torch.device | None:
    """Where the module computes: its first parameter or buffer, own or a child's."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def apply_plan(model: nn.Module, plan: Plan) -> list[str]:
    """Attach every site of ``plan`` to ``model``; return the names of modules touched."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_module: dict[str, list[Site]] = {}
    for site in plan.sites:
        by_module.setdefault(site.module, []).append(site)
    staged = []
    for fqn, sites in by_module.items():
        module = modules[fqn]
        if STATE_ATTR in module.__dict__:
            raise RecipeError(
                f"module {fqn!r} is already quantized; call stefx.dequantize(model) first"
            )
        state, built = _build(module, sites, modules)
        state.fqn = fqn
        device = device_of(module)
        if device is not None:  # activation quantizers hold state too (LSQ step, PACT α)
            built = {name: q.to(device) for name, q in built.items()}
        staged.append((module, state, built))
    for module, state, built in staged:  # nothing below can fail on valid input
        _attach(module, state, built)
    return list(by_module)


def _attach(module: nn.Module, state: ModuleState, built: Built) -> None:
    object.__setattr__(module, STATE_ATTR, state)
    module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    module.register_forward_hook(post_hook, always_call=True)
    for name, q in built.items():
        if name.startswith("op_quantizers."):
            if "op_quantizers" not in module._modules:
                module.add_module("op_quantizers", nn.ModuleDict())
                state.added.append("op_quantizers")
            module.op_quantizers[name.split(".", 1)[1]] = q
        else:
            module.add_module(name, q)
            state.added.append(name)
    if state.op_table:  # calls inside children belong to them, not to this module's count
        for child in module.children():
            if isinstance(child, Quantizer) or child is module._modules["op_quantizers"]:
                continue
            child.register_forward_pre_hook(partial(suspend, module), prepend=True)
            child.register_forward_hook(partial(resume, module), always_call=True)


_HOOK_DICTS = (
    ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
    ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
)


def remove_hooks(module: nn.Module, owner: nn.Module | None = None) -> None:
    """Remove stefx's own hooks from ``module``, or with ``owner`` the suspend/resume
    hooks that ``owner``'s op interceptor put on it."""
    for table, extras in _HOOK_DICTS:
        hooks = getattr(module, table)
        for hid, hook in list(hooks.items()):
            if owner is None:
                ours = hook is pre_hook or hook is post_hook
            else:
                ours = is_stefx_hook(hook) and getattr(hook, "args", (None,))[0] is owner
            if ours:
                del hooks[hid]
                for extra in extras:
                    getattr(module, extra).pop(hid, None)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that carry stefx quantizers, by FQN."""
    return {name: m for name, m in model.named_modules() if STATE_ATTR in m.__dict__}


def dequantize(model: nn.Module) -> nn.Module:
    """Remove every stefx quantizer and hook: the model is its float self again (in place)."""
    from stefx.convert import packed_slots

    # stefx.convert's packed weights come back as float Parameters holding their values
    unpacked = [(owner, key, packed.dequantized()) for owner, key, packed in packed_slots(model)]
    for module in quantized_modules(model).values():
        state: ModuleState = module.__dict__[STATE_ATTR]
        if state.op_table:
            for child in module.children():
                remove_hooks(child, owner=module)
        remove_hooks(module)
        restore(module, state)
        for name in state.added:
            delattr(module, name)
        object.__delattr__(module, STATE_ATTR)
    for owner, key, values in unpacked:
        owner._parameters[key] = nn.Parameter(values)
    return model
