"""Node -> OpNode normalisation, shared by the symbolic_trace and torch.export paths.

Given an fx graph and a ``ModelView`` (what the graph's parameter placeholders / get_attr
nodes and module paths mean in the user's model), ``annotate`` builds one ``OpNode`` per
computing node, stores it in ``node.meta["stefx.op"]`` and returns them in order. It reads
shapes from ``node.meta["val"]`` (fake or meta tensors) when shape propagation ran. It
never touches the model's tensors, only their names and shapes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.operator_schemas import get_signature_for_torch_op
from torch.utils._pytree import tree_leaves

from stefx.capture.graph import OpNode, Shape
from stefx.capture.kinds import (
    MATMUL_KINDS,
    MODULE_WEIGHT_KINDS,
    SKIPPED,
    WEIGHT_KINDS,
    base_name,
    call_name,
    kind_of_function,
    kind_of_module,
    target_name,
)

__all__ = ["ModelView", "annotate", "normalise", "normalise_fqn", "opaque_inner_ops", "shape_of"]

# Ops a parameter may pass through on its way into a computing op (w.t(), w[idx], w.to()).
_PASS_THROUGH = frozenset(
    {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "contiguous"}
    | {"to", "_to_copy", "type", "float", "half", "bfloat16", "alias", "detach", "clone"}
    | {"select", "index", "slice", "getitem", "unsqueeze", "squeeze", "flatten", "narrow"}
    | {"lift_fresh_copy", "type_as", "unflatten"}
    | {"numpy_T", "T", "mT", "adjoint", "movedim", "swapaxes", "view_as"}  # w.T (Falcon)
)
_NAMED_ROLES = frozenset({"weight", "bias", "running_mean", "running_var"})
_LOOKUPS = frozenset({"index", "index_select", "take", "getitem"})


@dataclass
class ModelView:
    """What graph names mean in the user's model.

    modules:   ``dict(model.named_modules())``.
    tensor_of: graph node name (placeholder or get_attr) -> ("param" | "buffer", FQN).
    aliases:   parameter FQN -> every FQN of the same tensor, canonical first (tied weights).
    prefix:    FQN of the module the graph was captured from ("" for the whole model).
    opaque:    FQNs of leaf modules stefx could not trace (their calls get kind "opaque").
    """

    modules: dict[str, nn.Module]
    tensor_of: dict[str, tuple[str, str]] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    prefix: str = ""
    opaque: frozenset[str] = frozenset()

    def join(self, fqn: str) -> str:
        return f"{self.prefix}.{fqn}" if self.prefix and fqn else (self.prefix or fqn)


def shape_of(value: Any) -> Shape | None:
    """The static shape of a tensor-like value, or None."""
    shape = getattr(value, "shape", None)
    if shape is None or not isinstance(value, torch.Tensor):
        return None
    dims = []
    for s in shape:
        if isinstance(s, torch.SymInt):  # data-dependent sizes (MoE routing): unknown
            s = s.node.maybe_as_int()
            if s is None:
                return None
        dims.append(int(s))
    return tuple(dims)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _first_tensor(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return value if isinstance(value, torch.Tensor) else None


def annotate(graph: fx.Graph, view: ModelView) -> list[OpNode]:
    """Build, store and return the OpNode of every computing node of ``graph``."""
    ops = []
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if base_name(node.target) in SKIPPED:
            continue
        op = normalise(node, view)
        node.meta["stefx.op"] = op
        ops.append(op)
    return ops


def normalise(node: fx.Node, view: ModelView) -> OpNode:
    """The OpNode of one call_function / call_method / call_module node."""
    stack = _module_stack(node, view)
    if node.op == "call_module" and (not stack or stack[-1][0] != view.join(str(node.target))):
        fqn = view.join(str(node.target))
        stack = tuple((m, type(view.modules[m]).__name__) for m in _chain(fqn))
    module = stack[-1][0] if stack else view.prefix
    module_type = type(view.modules[module]).__name__
    if node.op == "call_module":
        leaf = view.modules[module]
        kind = "opaque" if module in view.opaque else kind_of_module(leaf)
        params, buffers = _module_tensors(leaf, module)
        attrs = _module_attrs(leaf, kind)
    else:
        kind = _lookup_kind(node, view) or kind_of_function(node.target, node.args)
        params, buffers = _read_tensors(node, view, module, kind)
        attrs = _function_attrs(node, kind)
    if kind in MATMUL_KINDS and any(len(s) >= 3 for s in _param_shapes(params, view).values()):
        kind = "experts"  # a matmul reading a 3D parameter: fused mixture-of-experts weights
    if kind == "experts":
        shape = next(iter(_param_shapes(params, view).values()), ())
        attrs = {**attrs, "num_experts": shape[0]} if len(shape) >= 3 else attrs
        if node.op != "call_module" and (axes := _expert_in_axes(node, view, module, params)):
            attrs["expert_in_axis"] = axes
    args = [*node.args, *node.kwargs.values()]
    out = _first_tensor(_val(node))
    return OpNode(
        name=node.name,
        kind=kind,
        target=type(leaf).__name__ if node.op == "call_module" else target_name(node.target),
        module=module,
        module_type=module_type,
        module_stack=stack,
        params=params,
        input_shapes=tuple(s for a in args for s in _arg_shapes(a)),
        output_shape=shape_of(out),
        dtype=str(out.dtype) if out is not None else "",
        attrs=attrs,
        buffers=buffers,
        param_shapes=_param_shapes(params, view),
        call="" if node.op == "call_module" else call_name(node.target),
    )


def _lookup_kind(node: fx.Node, view: ModelView) -> str | None:
    """``weight[ids]`` on a 2D parameter is an embedding lookup (Whisper's positions)."""
    if base_name(node.target) not in _LOOKUPS or not node.args:
        return None
    table = node.args[0]
    if not isinstance(table, fx.Node) or view.tensor_of.get(table.name, ("",))[0] != "param":
        return None
    shape = _param_shapes({"table": view.tensor_of[table.name][1]}, view).get("table", ())
    dtypes = {getattr(_val(i), "dtype", None) for i in _flat_nodes(node.args[1:])}
    if len(shape) == 2 and dtypes and dtypes <= {torch.int64, torch.int32}:
        return "embedding"
    return None


def _flat_nodes(args: Any) -> Iterator[fx.Node]:
    if isinstance(args, list | tuple):
        for a in args:
            yield from _flat_nodes(a)
    elif isinstance(args, fx.Node):
        yield args


def _arg_shapes(arg: Any) -> Iterator[Shape | None]:
    if isinstance(arg, list | tuple):
        for a in arg:
            yield from _arg_shapes(a)
    elif isinstance(arg, fx.Node):
        yield shape_of(_val(arg))


def _param_shapes(params: dict[str, str], view: ModelView) -> dict[str, Shape]:
    shapes = {}
    for role, fqn in params.items():
        owner, _, attr = fqn.rpartition(".")
        tensor = getattr(view.modules.get(owner), attr, None)
        if isinstance(tensor, torch.Tensor):
            shapes[role] = tuple(tensor.shape)
    return shapes


def _module_stack(node: fx.Node, view: ModelView) -> tuple[tuple[str, str], ...]:
    """(FQN, class name) pairs from ``nn_module_stack``, FQNs normalised to named_modules."""
    stack = [(m, type(view.modules[m]).__name__) for m in _chain(view.prefix)]
    for raw, _cls in (node.meta.get("nn_module_stack") or {}).values():
        fqn = normalise_fqn(str(raw), view)
        if fqn is None or (stack and stack[-1][0] == fqn) or (fqn == "" and not stack):
            continue
        stack.append((fqn, type(view.modules[fqn]).__name__))
    return tuple(stack)


def normalise_fqn(raw: str, view: ModelView) -> str | None:
    """Turn an nn_module_stack path into a ``named_modules()`` name (None if not a module).

    Depending on the torch version and capture method the path reads ``model.layers.0``,
    ``L['self'].model.layers[0]`` or ``L['self']._modules['model']...``.
    """
    path = raw.split("@")[0]  # "@1" marks the second call of the same module
    for prefix in ("L['self']", "L__self__", "self"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    for old, new in (("._modules['", "."), ("['", "."), ("']", ""), ("[", "."), ("]", "")):
        path = path.replace(old, new)
    fqn = view.join(path.strip("."))
    return fqn if fqn in view.modules else None


def _module_tensors(module: nn.Module, fqn: str) -> tuple[dict[str, str], dict[str, str]]:
    """A leaf module reads all its own parameters and buffers, named module-locally."""
    join = (lambda n: f"{fqn}.{n}") if fqn else (lambda n: n)
    params = {n: join(n) for n, _ in module.named_parameters(remove_duplicate=False)}
    buffers = {n: join(n) for n, _ in module.named_buffers(remove_duplicate=False)}
    return params, buffers


def _read_tensors(
    node: fx.Node, view: ModelView, module: str, kind: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Parameters and buffers a function node reads, by role (see OpNode.params)."""
    found: dict[str, dict[str, str]] = {"param": {}, "buffer": {}}
    for arg_name, arg in _named_args(node):
        for source in _tensor_sources(arg):
            if source.name not in view.tensor_of:
                continue  # a model input, not a parameter or buffer
            what, fqn = view.tensor_of[source.name]
            fqn = _prefer_local(fqn, module, view) if what == "param" else fqn
            role = _role(arg_name, fqn, kind)
            if role in found[what]:
                role = fqn.rpartition(".")[2]
            found[what].setdefault(role, fqn)
    return found["param"], found["buffer"]


def _role(arg_name: str, fqn: str, kind: str) -> str:
    if arg_name in _NAMED_ROLES:
        return arg_name
    if kind in ("addmm", "baddbmm") and arg_name in ("input", "self"):
        return "bias"
    if kind in WEIGHT_KINDS:
        return "weight"
    return fqn.rpartition(".")[2]


def _tensor_sources(arg: Any, depth: int = 0) -> Iterator[fx.Node]:
    """Placeholder / get_attr nodes of parameters or buffers feeding ``arg``."""
    if isinstance(arg, list | tuple):
        for a in arg:
            yield from _tensor_sources(a, depth)
        return
    if not isinstance(arg, fx.Node) or depth > 8:
        return
    if arg.op in ("placeholder", "get_attr"):
        yield arg
    elif (
        arg.op in ("call_function", "call_method")
        and base_name(arg.target) in _PASS_THROUGH
        and arg.args
    ):
        yield from _tensor_sources(arg.args[0], depth + 1)


# Matrix operands of the matmul-like functions, by position: (left, right).
_MATRIX_ARGS = {"linear": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2)}
# grouped_mm_fallback: transformers' grouped_mm(input, weight[E, in, out], offs) on CPU
_MATMULS = frozenset(
    {"matmul", "__matmul__", "mm", "bmm", "grouped_mm", "_grouped_mm", "grouped_mm_fallback"}
)


def _expert_in_axes(
    node: fx.Node, view: ModelView, module: str, params: dict[str, str]
) -> dict[str, int]:
    """The input (reduced) axis of each fused [E, ., .] parameter a matmul-like node reads.

    The op reduces its right operand's axis -2 (``x @ W``; linear's weight, stored
    [out, in], its axis -1) and its left operand's axis -1. The operand may be a
    transposed view or an expert slice of the parameter, so the reduced axis is found by
    its stride: the parameter's axis with that stride. Square experts need this, since
    their shapes alone cannot tell [E, in, out] from [E, out, in]; so do ops that take a
    bias first (``baddbmm(b, x, W)``). Empty where the graph carries no strides."""
    name = base_name(node.target)
    if name not in _MATRIX_ARGS and name not in _MATMULS:
        return {}
    left, right = _MATRIX_ARGS.get(name, (0, 1))
    by_fqn = {fqn: role for role, fqn in params.items()}
    axes: dict[str, int] = {}
    for pos, reduced in ((left, -1), (right, -1 if name == "linear" else -2)):
        arg = node.args[pos] if pos < len(node.args) else None
        operand = _val(arg)
        if not isinstance(operand, torch.Tensor) or operand.dim() < 2:
            continue
        for source in _tensor_sources(arg):
            what, fqn = view.tensor_of.get(source.name, ("", ""))
            fqn = _prefer_local(fqn, module, view) if what == "param" else ""
            owner, _, attr = fqn.rpartition(".")
            weight = getattr(view.modules.get(owner), attr, None)
            if fqn not in by_fqn or not isinstance(weight, torch.Tensor) or weight.dim() != 3:
                continue
            if not weight.is_contiguous():
                continue
            stride = operand.stride(reduced)
            found = [a for a in (1, 2) if weight.stride(a) == stride and weight.shape[a] > 1]
            if len(found) == 1:
                axes[by_fqn[fqn]] = found[0]
    return axes


def _prefer_local(fqn: str, module: str, view: ModelView) -> str:
    """For tied weights, name the copy that belongs to the module using it."""
    names = view.aliases.get(fqn, [fqn])
    owned = [n for n in names if n.rpartition(".")[0] == module]
    return owned[0] if owned else fqn


def _named_args(node: fx.Node) -> Iterator[tuple[str, Any]]:
    """(argument name, value) pairs; names from the op schema or signature when known."""
    names = _arg_names(node)
    for i, arg in enumerate(node.args):
        yield (names[i] if i < len(names) else f"arg{i}"), arg
    yield from node.kwargs.items()


def _arg_names(node: fx.Node) -> list[str]:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return [a.name for a in target._schema.arguments]
    if node.op == "call_method":
        target = getattr(torch, str(target), None)
        if target is None:
            return []
    try:
        return list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        pass
    signatures = get_signature_for_torch_op(target) or []
    return list(signatures[0].parameters) if signatures else []


def _bound(node: fx.Node) -> dict[str, Any]:
    """Arguments by name, with schema defaults for those not passed."""
    bound = dict(_named_args(node))
    if isinstance(node.target, torch._ops.OpOverload):
        for a in node.target._schema.arguments:
            if a.name not in bound and a.has_default_value():
                bound[a.name] = a.default_value
    return bound


def _function_attrs(node: fx.Node, kind: str) -> dict[str, Any]:
    """Attributes cost formulas need, taken from the call's arguments."""
    if kind not in ("conv", "conv_transpose", "sdpa", "einsum", "softmax"):
        return {}
    bound = _bound(node)
    if kind == "einsum":
        eq = bound.get("equation", node.args[0] if node.args else None)
        return {"equation": eq}
    if kind == "softmax":
        return {"dim": bound.get("dim", bound.get("arg1"))}
    if kind == "sdpa":
        attrs = {"is_causal": False, "scale": None, "enable_gqa": False, "dropout_p": 0.0}
        attrs.update({k: bound[k] for k in attrs if k in bound})
        attrs["has_mask"] = bound.get("attn_mask") is not None
        return attrs
    attrs = {"transposed": kind == "conv_transpose", "groups": 1}
    for key in ("stride", "padding", "dilation", "groups", "output_padding"):
        if key == "output_padding" and kind == "conv":
            continue
        if key in bound and not isinstance(bound[key], fx.Node):
            attrs[key] = _plain(bound[key])
    return attrs


def _plain(value: Any) -> Any:
    """Lists of ints as tuples; strings ("same") and ints as they are."""
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else value


def _module_attrs(module: nn.Module, kind: str) -> dict[str, Any]:
    if kind in ("conv", "conv_transpose"):
        keys = ["stride", "padding", "dilation", "groups"]
        keys += ["output_padding"] if kind == "conv_transpose" else []
        return {
            "transposed": kind == "conv_transpose",
            **{k: _plain(getattr(module, k)) for k in keys},
        }
    if kind == "softmax":
        return {"dim": getattr(module, "dim", None)}
    if kind == "attention":
        return {"num_heads": module.num_heads, "batch_first": module.batch_first}
    return {}


def opaque_inner_ops(
    leaf: str, view: ModelView, shapes: dict[str, tuple[Any, Any]] | None = None
) -> list[OpNode]:
    """OpNodes for the weight-carrying modules (and 3D expert tensors) inside an opaque leaf.
    A module stefx keeps whole (Linear, LSTM, MultiheadAttention...) is one op with all
    its parameters, as when it is called from a traced graph: its children are not
    listed again.

    They are not graph nodes (their ``name`` is ``"<leaf>::<fqn>"``) but let later steps
    see, cover or report every weight inside a region stefx could not trace. ``shapes``
    maps a module FQN to the (input, output) tensors a forward hook saw, when it ran.
    """
    ops = []
    owners: list[str] = []  # weight modules whose children are read by their own code
    for fqn, module in view.modules.items():
        if not (fqn == leaf or fqn.startswith(f"{leaf}.") or (leaf == "" and fqn)):
            continue
        if any(fqn.startswith(f"{o}.") for o in owners):
            continue  # nn.MultiheadAttention reads out_proj.weight itself: one op, its own
        kind = kind_of_module(module)
        seen = (shapes or {}).get(fqn, (None, None))
        if kind in MODULE_WEIGHT_KINDS and fqn != leaf:
            owners.append(fqn)
            params, buffers = _module_tensors(module, fqn)
            ops.append(_inner_op(leaf, fqn, kind, params, buffers, seen, view))
        elif kind not in MODULE_WEIGHT_KINDS:
            for name, p in module.named_parameters(recurse=False):
                if p.dim() >= 3:  # a fused expert tensor read by the module's own code
                    params = {"weight": f"{fqn}.{name}" if fqn else name}
                    ops.append(_inner_op(leaf, fqn, "experts", params, {}, seen, view))
    return ops


def _inner_op(
    leaf: str,
    fqn: str,
    kind: str,
    params: dict[str, str],
    buffers: dict[str, str],
    seen: tuple[Any, Any],
    view: ModelView,
) -> OpNode:
    module = view.modules[fqn]
    shapes = _param_shapes(params, view)
    attrs = {"inside_opaque": leaf, **_module_attrs(module, kind)}
    if kind == "experts":
        attrs["num_experts"] = shapes["weight"][0]
    return OpNode(
        name=f"{leaf}::{params['weight'] if kind == 'experts' else fqn}",
        kind=kind,
        target=type(module).__name__,
        module=fqn,
        module_type=type(module).__name__,
        module_stack=tuple((m, type(view.modules[m]).__name__) for m in _chain(fqn)),
        params=params,
        input_shapes=tuple(
            shape_of(t) for t in tree_leaves(seen[0]) if isinstance(t, torch.Tensor)
        ),  # every tensor argument: nn.MultiheadAttention's cost reads query, key, value
        output_shape=shape_of(_first_tensor(seen[1])),
        dtype=str(_first_tensor(seen[1]).dtype) if _first_tensor(seen[1]) is not None else "",
        attrs=attrs,
        buffers=buffers,
        param_shapes=shapes,
    )


def _chain(fqn: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]`` (the root "" is left out)."""
    if not fqn:
        return []
    parts = fqn.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
