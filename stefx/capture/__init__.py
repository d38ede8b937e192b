"""stefx.capture: one analysis graph of a whole model, every computing node an ``OpNode``.

``capture(model)`` picks the method: plain PyTorch models are symbolically traced (with
untraceable submodules kept as opaque leaves), Hugging Face models are exported with
``torch.export`` (non-strict, ``use_cache=False``) on inputs built from their config, and a
model that does not export whole is exported region by region. Capture never changes the
model: parameters, buffers, config and train/eval flags are as before (it analyses in
eval mode and restores every module's flag), no weight is copied, and a model on the
``meta`` device captures without allocating weights.

>>> cap = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), (torch.randn(2, 4),))
>>> [(op.kind, op.module, op.output_shape) for op in cap.ops]
[('linear', '0', (2, 8)), ('elementwise', '1', (2, 8))]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from stefx.capture.export import Region, export_regions, export_whole, first_line, merge_regions
from stefx.capture.graph import Capture, OpNode
from stefx.capture.inputs import (
    bind_inputs,
    example_inputs_for,
    is_hf_model,
    model_device,
    to_device,
)
from stefx.capture.ops import ModelView, annotate, normalise, opaque_inner_ops, shape_of
from stefx.capture.trace import (
    TraceFailure,
    concrete_args_for,
    propagate_shapes,
    run_args,
    trace_with_leaves,
)
from stefx.errors import CaptureError, did_you_mean

__all__ = ["METHODS", "Capture", "OpNode", "capture", "example_inputs_for"]

METHODS = ("auto", "symbolic_trace", "export")


def capture(model: nn.Module, example_inputs: Any = None, *, method: str = "auto") -> Capture:
    """Capture ``model`` as one analysis graph with a normalised ``OpNode`` per op.

    example_inputs: a tuple of positional args, a dict of kwargs, or None. With inputs,
        shapes are propagated (on fake tensors; no real compute). Without, a plain model
        is traced with empty shapes and a Hugging Face model gets inputs from its config.
    method: "auto" (symbolic_trace for plain models, falling back to torch.export;
        torch.export for Hugging Face models), "symbolic_trace" or "export".
    """
    if method not in METHODS:
        raise CaptureError(
            f"method={method!r} is not one of {METHODS}{did_you_mean(method, METHODS)}"
        )
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() takes an nn.Module, got {type(model).__name__}.")
    hf = is_hf_model(model)
    extra = {"use_cache": False} if hf else {}
    bound = None if example_inputs is None else bind_inputs(model, example_inputs, extra)
    notes: list[str] = []
    with _analysis_mode(model):
        if method == "symbolic_trace" or (method == "auto" and not hf):
            try:
                return _traced(model, bound)
            except TraceFailure as failure:
                if method == "symbolic_trace":
                    raise CaptureError(
                        f"{type(model).__name__}: {failure}. Try method='export' with "
                        "example_inputs."
                    ) from failure.cause
                notes.append(f"{failure}; used torch.export instead")
        if bound is None:
            if not hf:
                raise CaptureError(
                    f"{type(model).__name__} cannot be symbolically traced ({notes[0]}) and "
                    "torch.export needs example inputs: pass example_inputs=(tensor, ...) "
                    "or example_inputs={'arg': tensor}."
                )
            bound = bind_inputs(model, example_inputs_for(model), extra)
            notes.append(f"example inputs built from the config: {_describe(bound)}")
        return _exported(model, *bound, notes)


@contextmanager
def _analysis_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode while capturing (no dropout, running BN stats); every flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _describe(bound: tuple[tuple, dict]) -> str:
    def one(v: Any) -> str:
        return f"{tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)

    return ", ".join([one(a) for a in bound[0]] + [f"{k}={one(v)}" for k, v in bound[1].items()])


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter FQN -> all FQNs of the same tensor, canonical (first) one first."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: names for names in groups.values() for name in names}


def _tied(aliases: dict[str, list[str]]) -> dict[str, str]:
    return {name: names[0] for name, names in aliases.items() if name != names[0]}


def _on_meta(model: nn.Module) -> bool:
    return model_device(model).type == "meta"


def _traced(model: nn.Module, bound: tuple[tuple, dict] | None) -> Capture:
    args, kwargs = bound or ((), {})
    gm, leaves, notes = trace_with_leaves(model, concrete_args_for(model, args, kwargs))
    inner_shapes: dict[str, tuple[Any, Any]] = {}
    if bound is not None:
        values = run_args(gm, model, args, kwargs)
        more, inner_shapes = propagate_shapes(gm, values, _on_meta(model), leaves)
        notes += more
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    tensor_of = {
        n.name: ("param" if n.target in params else "buffer", str(n.target))
        for n in gm.graph.nodes
        if n.op == "get_attr" and (n.target in params or n.target in buffers)
    }
    aliases = _aliases(model)
    view = ModelView(dict(model.named_modules()), tensor_of, aliases, "", frozenset(leaves))
    ops = _with_inner(annotate(gm.graph, view), view, inner_shapes)
    return Capture("symbolic_trace", gm.graph, ops, leaves, notes, tied_params=_tied(aliases))


def _region_view(model: nn.Module, region: Region, modules: dict, aliases: dict) -> ModelView:
    view = ModelView(modules, {}, aliases, region.fqn)
    view.tensor_of = {name: (what, view.join(f)) for name, (what, f) in region.tensor_of().items()}
    return view


def _exported(model: nn.Module, args: tuple, kwargs: dict, notes: list[str]) -> Capture:
    on_meta = _on_meta(model)
    if on_meta:
        args, kwargs = _to_meta((args, kwargs))
    modules, aliases = dict(model.named_modules()), _aliases(model)
    try:
        region = export_whole(model, args, kwargs)
    except Exception as exc:
        notes.append(f"torch.export of the whole model failed ({first_line(exc)})")
        return _exported_regions(model, args, kwargs, notes, exc)
    ops = annotate(region.program.graph, _region_view(model, region, modules, aliases))
    return Capture("export", region.program.graph, ops, [], notes, tied_params=_tied(aliases))


def _exported_regions(
    model: nn.Module, args: tuple, kwargs: dict, notes: list[str], cause: Exception
) -> Capture:
    modules, aliases = dict(model.named_modules()), _aliases(model)
    regions, leaves, more, shapes = export_regions(model, args, kwargs, _on_meta(model))
    exported = [r for r in regions if r.program is not None]
    if not exported:
        raise CaptureError(
            f"torch.export failed on {type(model).__name__} and on each of its submodules: "
            f"{first_line(cause)}. Check example_inputs (model(**example_inputs) must run); "
            "if they are right, please report this to stefx with the message above."
        ) from cause
    for region in exported:
        annotate(region.program.graph, _region_view(model, region, modules, aliases))
    graph = merge_regions(regions)
    view = ModelView(modules, {}, aliases, "", frozenset(leaves))
    for node in graph.nodes:
        if node.op == "call_module":  # an opaque leaf: shapes from the recording pass
            seen_in, seen_out = shapes.get(str(node.target), (None, None))
            node.meta["val"] = seen_out
            op = normalise(node, view)
            in_shapes = tuple(shape_of(t) for t in tree_leaves(seen_in) if torch.is_tensor(t))
            node.meta["stefx.op"] = replace(op, input_shapes=in_shapes)
    ops = [n.meta["stefx.op"] for n in graph.nodes if "stefx.op" in n.meta]
    return Capture(
        "export",
        graph,
        _with_inner(ops, view, shapes),
        leaves,
        notes + more,
        regions=[r.fqn for r in exported],
        tied_params=_tied(aliases),
    )


def _to_meta(value: Any) -> Any:
    return to_device(value, torch.device("meta"))


def _with_inner(
    ops: list[OpNode], view: ModelView, shapes: dict[str, tuple[Any, Any]]
) -> list[OpNode]:
    """Follow each opaque leaf's op with the weight-carrying modules inside it."""
    out: list[OpNode] = []
    listed: set[str] = set()
    for op in ops:
        out.append(op)
        if op.kind == "opaque" and op.module not in listed:
            listed.add(op.module)
            out.extend(opaque_inner_ops(op.module, view, shapes))
    return out
