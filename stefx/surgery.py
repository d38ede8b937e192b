"""Graph surgery: a quantized model as a ``torch.fx.GraphModule`` with its quantizers as
nodes, for models ``torch.fx.symbolic_trace`` can trace (``quantize(..., as_graph=True)``).

The default (:mod:`stefx.rewrite`) keeps the user's class and works on any model; this is
the other road, for users who compose fx passes or want to read the quantized program.
Starting from a copy of the analysis graph the plan was matched on, each site becomes
nodes:

- a quantized weight: ``get_attr`` -> ``call_module(<m>.weight_quantizer)``, and the
  module call becomes its functional form reading that node (``F.linear``, ``F.conv2d``,
  ``F.conv_transpose2d``, ``F.embedding``);
- an input / output quantizer: a ``call_module`` node before / after the op;
- an op site (``torch.matmul``, SDPA..., the pointwise call that ends a pattern): a
  quantizer node on each operand, positional or keyword, and on the result.

Quantizers sit at the same paths as on a hook-quantized model (``fc1.weight_quantizer``,
``attn.op_quantizers.matmul_0_in0``), so the two state dicts load into each other. The
GraphModule shares the model's parameters; the model itself is not changed. Sites this
road cannot express as nodes (a weight read inside an LSTM, nn.MultiheadAttention, HF
Conv1D or fused experts; BatchNorm folding) are refused with the fix.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from stefx.errors import CaptureError, RecipeError
from stefx.match import Plan
from stefx.rewrite import device_of, weight_quantizer
from stefx.runtime import quantizer_name
from stefx.sites import Site, op_sites, operand_slots
from stefx.ste.spec import make_quantizer

__all__ = ["to_graph_module"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONV_T = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


def _refuse(site: Site, why: str) -> RecipeError:
    return RecipeError(
        f"as_graph=True: site {site.name!r} ({site.module_type}) {why}; quantize without "
        "as_graph (the default keeps the model's class and handles it), or leave this "
        "site out of the recipe"
    )


def _functional(site: Site, module: nn.Module, x: fx.Node, w: fx.Node, b: fx.Node | None, g):
    """The call_function node computing ``module`` on ``x`` with weight node ``w``."""
    kind = type(module)
    if kind is nn.Linear:
        return g.call_function(F.linear, (x, w, b))
    if kind in _CONV:
        if module.padding_mode != "zeros":
            raise _refuse(site, f"pads with {module.padding_mode!r}, not zeros")
        m = module
        return g.call_function(_CONV[kind], (x, w, b, m.stride, m.padding, m.dilation, m.groups))
    if kind in _CONV_T:
        m = module
        args = (x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
        return g.call_function(_CONV_T[kind], args)
    if kind is nn.Embedding:
        if module.max_norm is not None:
            raise _refuse(site, "renormalises its weight in place (max_norm)")
        m = module
        args = (x, w, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, m.sparse)
        return g.call_function(F.embedding, args)
    raise _refuse(site, "reads its weight inside its own forward")


def _shell(module: nn.Module) -> nn.Module:
    """A new module object holding the same parameters, buffers and children, so adding
    quantizers to it leaves the user's module as it was."""
    shell = copy.copy(module)
    for name in ("_parameters", "_buffers", "_modules"):
        shell.__dict__[name] = dict(module.__dict__[name])
    return shell


class _Builder:
    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.model, self.plan = model, plan
        cap = plan.capture
        self.graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.graph.output(self.graph.graph_copy(cap.graph, env))
        for node in self.graph.nodes:
            if isinstance(node.type, str):  # a postponed annotation: pickling cannot import it
                node.type = None
        self.by_name = {old.name: new for old, new in env.items()}
        self.quantizers: dict[str, nn.Module] = {}
        self.inputs: set[str] = set()  # root input quantized already

    def quantizer(self, path: str, spec, where: str, device=None) -> str:
        q = make_quantizer(spec, where)
        self.quantizers[path] = q if device is None else q.to(device)
        return path

    def weight(self, site: Site, module: nn.Module, path: str, param: str) -> str:
        """A weight's quantizer, initialised from the weight (as stefx.rewrite builds it)."""
        q = weight_quantizer(site, module, param)
        device = device_of(module)
        self.quantizers[path] = q if device is None else q.to(device)
        return path

    def insert_after(self, node: fx.Node, target: str) -> None:
        with self.graph.inserting_after(node):
            q = self.graph.call_module(target, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)

    def module_site(self, site: Site) -> None:
        module = self.model.get_submodule(site.module)
        calls = [n for n in self.graph.nodes if n.op == "call_module" and n.target == site.module]
        if not calls:
            return self.functional_weights(site)
        if site.fold_bn:
            raise _refuse(site, "folds a BatchNorm into its weights (fold_bn)")
        prefix = f"{site.module}." if site.module else ""
        wq = None
        if site.params:
            if site.params != ("weight",):
                raise _refuse(site, f"reads the weights {list(site.params)} itself")
            wq = self.weight(site, module, prefix + quantizer_name("weight"), "weight")
        iq = oq = None
        if site.input_activations is not None:
            iq = self.quantizer(prefix + "input_quantizer", site.input_activations, site.name)
        if site.output_activations is not None:
            oq = self.quantizer(prefix + "output_quantizer", site.output_activations, site.name)
        for node in calls:
            self.rewrite_call(site, module, node, prefix, wq, iq, oq)

    def functional_weights(self, site: Site) -> None:
        """A module's own forward reads its weights with functional ops (``F.linear(x,
        self.w)``): quantize each ``get_attr`` of a weight, and the ops' first inputs."""
        prefix = f"{site.module}." if site.module else ""
        reads = [
            n
            for n in self.graph.nodes
            if n.op == "get_attr" and n.target in {prefix + p for p in site.params}
        ]
        if not reads:
            raise _refuse(site, "has no call in the traced graph (inside an opaque module)")
        if site.output_activations is not None:
            raise _refuse(site, "quantizes the output of a functional op on its own weight")
        module = self.model.get_submodule(site.module)
        for get in reads:
            param = get.target[len(prefix) :]
            target = self.weight(site, module, prefix + quantizer_name(param), param)
            self.insert_after(get, target)
        if site.input_activations is not None and "input_quantizer" not in self.inputs:
            self.module_input(site)

    def module_input(self, site: Site) -> None:
        """``input_activations`` of a site in a module's own forward quantize the module's
        first input, as the hook does: expressible as a node for the root's first
        argument (left alone unless it is a float tensor, as the hook leaves it)."""
        if site.module:
            raise _refuse(site, "quantizes the input of a module the graph traces through")
        self.inputs.add("input_quantizer")
        target = self.quantizer("input_quantizer", site.input_activations, site.name)
        first = next(n for n in self.graph.nodes if n.op == "placeholder")
        val = first.meta.get("val")
        if val is not None and getattr(val, "is_floating_point", lambda: False)():
            self.insert_after(first, target)

    def rewrite_call(self, site, module, node, prefix, wq, iq, oq) -> None:
        g = self.graph
        with g.inserting_before(node):
            x = node.args[0] if node.args else next(iter(node.kwargs.values()))
            if iq is not None:
                x = g.call_module(iq, (x,))
            if wq is None:
                new = node
                if node.args:
                    node.update_arg(0, x)
                else:
                    node.update_kwarg(next(iter(node.kwargs)), x)
            else:
                w = g.call_module(wq, (g.get_attr(prefix + "weight"),))
                b = (
                    g.get_attr(prefix + "bias")
                    if getattr(module, "bias", None) is not None
                    else None
                )
                if len(node.args) + len(node.kwargs) > 1:
                    raise _refuse(site, "is called with more than its input")
                new = _functional(site, module, x, w, b, g)
                new.meta = dict(node.meta)
        if new is not node:
            node.replace_all_uses_with(new)
            g.erase_node(node)
        if oq is not None:
            self.insert_after(new, oq)

    def op_site(self, site: Site, named: dict) -> None:
        op = named.get(site.name)
        node = self.by_name.get(op.name) if op is not None else None
        if node is None:
            raise _refuse(site, "has no node in the traced graph")
        prefix = f"{site.module}.op_quantizers." if site.module else "op_quantizers."
        stem = f"{site.counter}_{site.ordinal}"
        if site.input_activations is not None:
            slots = operand_slots(site.kind, site.operands)
            for i, (pos, name) in enumerate(slots):
                target = self.quantizer(f"{prefix}{stem}_in{i}", site.input_activations, site.name)
                with self.graph.inserting_before(node):
                    if pos < len(node.args) and isinstance(node.args[pos], fx.Node):
                        node.update_arg(pos, self.graph.call_module(target, (node.args[pos],)))
                    elif isinstance(node.kwargs.get(name), fx.Node):
                        q = self.graph.call_module(target, (node.kwargs[name],))
                        node.update_kwarg(name, q)
        if site.output_activations is not None:
            target = self.quantizer(f"{prefix}{stem}_out", site.output_activations, site.name)
            self.insert_after(node, target)

    def root(self) -> dict[str, Any]:
        """Every get_attr / call_module target, resolved: the model's own objects (a shell
        for a module that gets quantizers as children) and the new quantizers."""
        shells: dict[str, nn.Module] = {}
        for path in self.quantizers:
            owner = path.rsplit(".", 1)[0]
            for cut in range(owner.count(".") + 1):
                prefix = ".".join(owner.split(".")[: cut + 1])
                if prefix and prefix not in shells:
                    try:
                        shells[prefix] = _shell(self.model.get_submodule(prefix))
                    except AttributeError:
                        break  # op_quantizers: a new holder
        out: dict[str, Any] = dict(self.quantizers)
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module") and node.target not in out:
                out[node.target] = self._resolve(node.target, shells)
        return out

    def _resolve(self, target: str, shells: dict[str, nn.Module]) -> Any:
        if target in shells:
            return shells[target]
        obj: Any = self.model
        for atom in target.split("."):
            obj = getattr(obj, atom)
        return obj


def to_graph_module(model: nn.Module, plan: Plan) -> fx.GraphModule:
    """``model`` as a GraphModule with ``plan``'s quantizers as nodes (see the module
    docstring). Raises before building anything if a site cannot be expressed."""
    cap = plan.capture
    if cap is None or cap.method != "symbolic_trace" or cap.regions:
        raise CaptureError(
            f"as_graph=True needs a model torch.fx.symbolic_trace can trace; "
            f"{type(model).__name__} was captured by {cap.method if cap else 'nothing'}. "
            "Quantize it without as_graph: the default keeps the model's class"
        )
    builder = _Builder(model, plan)
    named = op_sites(cap.ops)
    for site in plan.sites:
        if site.is_op_site:
            builder.op_site(site, named)
        else:
            builder.module_site(site)
    graph = builder.graph
    gm = fx.GraphModule(builder.root(), graph, class_name=f"Quantized{type(model).__name__}")
    modules = dict(gm.named_modules())
    for path, q in builder.quantizers.items():
        if path not in modules:  # built but no node reads it (an integer root input)
            gm.add_submodule(path, q)
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in builder.quantizers:
            node.meta["stefx.quantizer"] = builder.quantizers[node.target].spec
    gm.recompile()
    return gm
