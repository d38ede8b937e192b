"""Capture by ``torch.export`` (non-strict), whole model first, else region by region.

``export_whole`` exports the model on example inputs and tells ``ops.annotate`` what each
lifted parameter placeholder is (``ep.graph_signature``). When that fails (e.g. a MoE
block that loops over the experts a token was routed to), ``export_regions`` runs the model
once with forward pre-hooks to record every submodule's first inputs, then exports the
largest submodules that export on their own; a submodule that fails and has no children
left to try becomes an opaque leaf. The region graphs are laid side by side in one graph
(placeholders first), so every op and weight is listed even though the regions are not
connected. Nothing here changes the model; exported programs share its parameters.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from stefx.capture.inputs import to_device
from stefx.capture.kinds import WEIGHT_KINDS, kind_of_module
from stefx.errors import CaptureError

__all__ = ["Region", "export_regions", "export_whole", "first_line"]


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _export(module: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    # On failure torch.export prints the partial graph to stderr: pages of code for one
    # expected fallback. Keep stderr for successful exports only.
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        program = torch.export.export(module, args=tuple(args), kwargs=dict(kwargs), strict=False)
    sys.stderr.write(buffer.getvalue())
    return program


@dataclass
class Region:
    """One exported program (``fqn`` "" for the whole model) or one opaque leaf."""

    fqn: str
    program: torch.export.ExportedProgram | None = None
    order: int = 0

    def tensor_of(self) -> dict[str, tuple[str, str]]:
        """Placeholder name -> ("param" | "buffer", FQN relative to the region)."""
        if self.program is None:
            return {}
        sig = self.program.graph_signature
        found = {name: ("param", fqn) for name, fqn in sig.inputs_to_parameters.items()}
        found.update({name: ("buffer", fqn) for name, fqn in sig.inputs_to_buffers.items()})
        return found


def export_whole(model: nn.Module, args: tuple, kwargs: dict) -> Region:
    """Export the whole model; raises whatever torch.export raises."""
    return Region("", _export(model, args, kwargs))


@dataclass
class _Calls:
    """First-call inputs, output shapes and call order of every submodule, from one pass."""

    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)
    shapes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)
    failed_types: set[type] = field(default_factory=set)


@contextmanager
def _record_calls(model: nn.Module, calls: _Calls) -> Iterator[None]:
    def pre_hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in calls.inputs:
                calls.order[name] = len(calls.order)
                calls.inputs[name] = (args, kwargs)

        return hook

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in calls.shapes:
                calls.shapes[name] = (_meta_like(args), _meta_like(output))

        return hook

    handles = []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre_hook_for(name), with_kwargs=True))
            handles.append(m.register_forward_hook(hook_for(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _meta_like(value: Any) -> Any:
    """Shapes and dtypes only: keep no activation alive beyond the recording pass."""
    return tree_map(
        lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t, value
    )


def export_regions(
    model: nn.Module, args: tuple, kwargs: dict, on_meta: bool
) -> tuple[list[Region], list[str], list[str], dict[str, tuple[Any, Any]]]:
    """Export the largest submodules that export alone; return regions, leaves, notes
    and the (input, output) shapes each submodule was seen with.

    Runs the model once (on meta tensors for a meta model, else on the real inputs under
    ``no_grad``) to learn each submodule's inputs.
    """
    calls = _Calls()
    run_args, run_kwargs = (
        to_device((args, kwargs), torch.device("meta")) if on_meta else (args, kwargs)
    )
    with _record_calls(model, calls), torch.no_grad():
        try:
            model(*run_args, **run_kwargs)
        except Exception as exc:
            where = "on meta tensors" if on_meta else "on the example inputs"
            raise CaptureError(
                f"{type(model).__name__} could not be exported and does not run {where} "
                f"either ({first_line(exc)}). Pass example_inputs that model(**inputs) "
                "accepts" + (", or a model with real weights." if on_meta else ".")
            ) from exc
    regions: list[Region] = []
    leaves: list[str] = []
    notes: list[str] = []
    _visit(model, "", calls, regions, leaves, notes)
    return sorted(regions, key=lambda r: r.order), leaves, notes, calls.shapes


def _visit(
    module: nn.Module,
    fqn: str,
    calls: _Calls,
    regions: list[Region],
    leaves: list[str],
    notes: list[str],
) -> None:
    """Export ``module`` if it ran, else (or on failure) try its children.

    A module whose class already failed is not tried again (its siblings in a layer
    stack fail the same way); see ``_keep_whole`` for when a failed module stays whole.
    """
    error = None
    if fqn in calls.inputs:
        if type(module) in calls.failed_types:
            error = f"{type(module).__name__} failed to export above"
        else:
            args, kwargs = calls.inputs[fqn]
            try:
                regions.append(Region(fqn, _export(module, args, kwargs), calls.order[fqn]))
                return
            except Exception as exc:
                error = first_line(exc)
                calls.failed_types.add(type(module))
    children = [
        (f"{fqn}.{name}" if fqn else name, child)
        for name, child in module.named_children()
        if _ran(f"{fqn}.{name}" if fqn else name, calls)
    ]
    if fqn and (not children or _keep_whole(module, fqn, calls)):
        leaves.append(fqn)
        regions.append(Region(fqn, None, calls.order.get(fqn, 0)))
        notes.append(f"kept {fqn!r} opaque: torch.export failed ({error})")
        return
    if error is not None:
        notes.append(
            f"{fqn or type(module).__name__!r} did not export ({error}); "
            "captured its submodules one by one; its own ops between them are not listed"
        )
    for child_fqn, child in children:
        _visit(child, child_fqn, calls, regions, leaves, notes)


def _keep_whole(module: nn.Module, fqn: str, calls: _Calls) -> bool:
    """A failed module is kept as one opaque leaf when its children would not cover it:
    it has parameters of its own (fused expert tensors), or a weight-carrying descendant
    did not run (a data-dependent branch, whose weights must still be listed)."""
    if any(True for _ in module.parameters(recurse=False)):
        return True
    return any(
        kind_of_module(m) in WEIGHT_KINDS and f"{fqn}.{name}" not in calls.inputs
        for name, m in module.named_modules()
        if name
    )


def _ran(fqn: str, calls: _Calls) -> bool:
    return fqn in calls.inputs or any(k.startswith(f"{fqn}.") for k in calls.inputs)


def merge_regions(regions: list[Region]) -> fx.Graph:
    """One graph holding every region's nodes, placeholders first.

    Region graphs must already be annotated: each copied node keeps its ``stefx.op``,
    renamed to the node's name in the merged graph. Opaque leaves become argument-less
    ``call_module`` nodes at their call position, to be annotated by the caller.
    """
    graph = fx.Graph()
    envs: list[dict[fx.Node, fx.Node]] = [{} for _ in regions]
    for env, region in zip(envs, regions, strict=True):
        for node in region.program.graph.nodes if region.program is not None else ():
            if node.op == "placeholder":
                env[node] = _copy(graph, node, env)
    outputs = []
    for env, region in zip(envs, regions, strict=True):
        if region.program is None:
            graph.call_module(region.fqn)
            continue
        for node in region.program.graph.nodes:
            if node.op == "output":
                outputs.append(fx.map_arg(node.args[0], lambda n, e=env: e[n]))
            elif node.op != "placeholder":
                env[node] = _copy(graph, node, env)
    graph.output(tuple(outputs))
    return graph


def _copy(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    new = graph.node_copy(node, lambda n: env[n])
    op = new.meta.get("stefx.op")
    if op is not None and op.name != new.name:
        new.meta["stefx.op"] = replace(op, name=new.name)
    return new
