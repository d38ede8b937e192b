"""Capture by ``torch.fx`` symbolic tracing, with automatic opaque leaves and shape propagation.

``trace_with_leaves`` traces a plain PyTorch model. ``torch.nn`` modules (Linear, Conv*,
Embedding, norms, LSTM/GRU/RNN, MultiheadAttention, pooling, activations) stay leaves, as
in ``torch.fx.Tracer``, so their weights appear on one ``call_module`` node. A submodule
whose forward raises while being traced (data-dependent control flow, unsupported Python)
becomes an opaque leaf and tracing restarts; only a failure in the root's own forward is
fatal. ``propagate_shapes`` runs the graph on fake tensors (meta tensors for a meta model),
falling back to real tensors under ``no_grad`` when fake ones cannot answer (a branch on a
tensor value inside an opaque leaf). Neither changes the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_map

from stefx.capture.kinds import kind_of_module
from stefx.errors import CaptureError

__all__ = ["StefxTracer", "TraceFailure", "propagate_shapes", "run_args", "trace_with_leaves"]

_MAX_LEAVES = 256


class TraceFailure(Exception):
    """Tracing failed in ``module`` ("" for the root's own forward)."""

    def __init__(self, module: str, cause: BaseException) -> None:
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        where = f"submodule {module!r}" if module else "the model's own forward"
        super().__init__(f"symbolic tracing failed in {where}: {type(cause).__name__}: {first}")
        self.module, self.cause = module, cause


class StefxTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps ``opaque`` submodules as leaves and names failures.

    When tracing raises, ``failed`` holds the FQN of the innermost module whose forward
    was being traced (None if the root's own code raised).
    """

    def __init__(self, opaque: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque:
            return True
        if not super().is_leaf_module(m, module_qualified_name):
            return False
        # fx keeps every torch.nn module whole. That suits an op stefx knows (Linear,
        # LSTM...) or one with no children, but a torch.nn container such as
        # TransformerEncoder would hide its Linear layers: trace into it instead.
        return kind_of_module(m) != "other" or next(m.children(), None) is None

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:  # the innermost module sees the exception first
                self.failed = self.path_of_module(m)
            raise


def concrete_args_for(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Forward parameters the caller did not pass are traced at their default value.

    Tracing ``mask=None`` as a proxy would take the ``if mask is not None`` branch.
    """
    params = inspect.signature(model.forward).parameters
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    return {
        name: p.default
        for name, p in params.items()
        if name not in bound and p.default is not inspect.Parameter.empty
    }


def trace_with_leaves(
    model: nn.Module, concrete_args: dict[str, Any]
) -> tuple[fx.GraphModule, list[str], list[str]]:
    """Trace ``model``; return the GraphModule, the opaque leaf FQNs and notes."""
    opaque: set[str] = set()
    notes: list[str] = []
    while True:
        tracer = StefxTracer(frozenset(opaque))
        try:
            graph = tracer.trace(model, concrete_args=dict(concrete_args))
        except Exception as exc:
            failed = tracer.failed
            if not failed or failed in opaque or len(opaque) >= _MAX_LEAVES:
                raise TraceFailure(failed or "", exc) from exc
            opaque.add(failed)
            notes.append(f"kept {failed!r} opaque: {TraceFailure(failed, exc)}")
            continue
        # GraphModule shares the model's submodules and parameters; it copies no weights.
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        return gm, sorted(opaque), notes


def run_args(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """Positional values for the graph's placeholders, defaults included."""
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    values = []
    for name, p in sig.parameters.items():
        value = bound.arguments.get(name)
        values.extend(value if p.kind == p.VAR_POSITIONAL else [value])
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    return values[:n_placeholders]


class _Recorder(fx.Interpreter):
    """Stores each node's result in ``node.meta["val"]`` as fake or meta tensors."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeError(n, exc) from exc
        n.meta["val"] = tree_map(_shape_only, result)
        return result


class _NodeError(Exception):
    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.node, self.cause = node, cause


def _shape_only(value: Any) -> Any:
    """Keep shape and dtype, never data: real tensors become meta tensors."""
    real = isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)
    return torch.empty_like(value, device="meta") if real and value.device.type != "meta" else value


def _attempts(values: list[Any], on_meta: bool) -> Iterator[tuple[str, Any, list[Any]]]:
    """(label, context, inputs) for each way to run the graph, cheapest first."""
    if on_meta:
        yield "meta", torch.no_grad(), tree_map(_to_meta, values)
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = tree_map(lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v, values)
    yield "fake", _both(mode, torch.no_grad()), fake
    yield "real", torch.no_grad(), values


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


@contextmanager
def _both(first: Any, second: Any) -> Iterator[None]:
    with first, second:
        yield


def propagate_shapes(
    gm: fx.GraphModule, values: list[Any], on_meta: bool, opaque: list[str]
) -> tuple[list[str], dict[str, tuple[Any, Any]]]:
    """Fill ``node.meta["val"]``; return notes and shapes seen inside opaque leaves.

    Raises CaptureError when the graph cannot run on the example inputs at all.
    """
    seen: dict[str, tuple[Any, Any]] = {}
    last: _NodeError | None = None
    for label, context, inputs in _attempts(values, on_meta):
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
        with _inner_hooks(gm, opaque, seen), context:
            try:
                _Recorder(gm).run(*inputs)
                return ([] if label == "fake" else [f"shapes propagated on {label} tensors"]), seen
            except _NodeError as exc:
                last = exc
    assert last is not None
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    first = (str(last.cause).strip().splitlines() or [type(last.cause).__name__])[0]
    if last.node.op == "call_module" and last.node.target in opaque:
        return [f"no shapes: opaque leaf {last.node.target!r} cannot run here ({first})"], {}
    raise CaptureError(
        f"the traced graph of {type(gm).__name__} failed on example_inputs at node "
        f"{last.node.format_node()}: {type(last.cause).__name__}: {first}. Check that "
        "example_inputs are what model(*args) / model(**kwargs) expects."
    ) from last.cause


@contextmanager
def _inner_hooks(
    gm: fx.GraphModule, opaque: list[str], seen: dict[str, tuple[Any, Any]]
) -> Iterator[None]:
    """Record input/output shapes of modules inside opaque leaves while the graph runs."""
    handles = []
    for leaf in opaque:
        for name, module in gm.get_submodule(leaf).named_modules(prefix=leaf):
            if name != leaf:
                handles.append(module.register_forward_hook(_recorder(name, seen)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _recorder(name: str, seen: dict[str, tuple[Any, Any]]) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        seen.setdefault(name, (tree_map(_shape_only, args), tree_map(_shape_only, output)))

    return hook
