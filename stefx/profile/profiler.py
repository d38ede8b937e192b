"""profile(): what a model costs before and after quantization, per layer and in total.

Reads a :class:`~stefx.capture.Capture` and a :class:`~stefx.match.Plan`, costs every
``OpNode`` twice - **before** (float, at the op's own dtype width) and **after** (at the
plan's bit widths) - and turns each cost into hardware estimates (roofline latency, its
bound, energy). It annotates ``node.meta["stefx.cost"] = {"before": Cost, "after": Cost}``
on the analysis graph and returns a :class:`~stefx.profile.report.Report`. It never
changes the model; it runs it only when ``measure=True`` (real tensors, timing hooks that
are removed afterwards).

>>> import torch
>>> from torch import nn
>>> rep = profile(nn.Sequential(nn.Linear(4, 8)), (torch.randn(2, 4),), recipe="w4a8")
>>> rep.totals["before"]["macs"], rep.totals["after"]["bops"]
(64, 2048.0)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from torch import nn

from stefx.capture.graph import Capture, OpNode
from stefx.capture.kinds import FUNCTIONAL_KINDS
from stefx.errors import CaptureError, StefxError
from stefx.match import unread_weights
from stefx.profile.bits import OpBits, plan_bits
from stefx.profile.costs import Cost, cost_of, dtype_bits
from stefx.profile.fusion import FUSIONS, eager_dispatch, fuse_pointwise, quantize_cost
from stefx.profile.hardware import energy, load_hardware, resolve_energy_table, roofline_latency
from stefx.profile.measure import input_sizes, measure_model
from stefx.profile.report import OpCost, Report
from stefx.sites import op_sites

__all__ = ["OpBits", "profile"]  # OpBits: stefx.profile.bits, re-exported


def profile(
    model: nn.Module,
    example_inputs: Any = None,
    hardware: str = "a100",
    *,
    recipe: Any = None,
    plan: Any = None,
    energy: str | None = None,
    causal_halving: bool = False,
    measure: bool = False,
    capture: Capture | None = None,
    fusion: str = "pointwise",
    acc_bits: int | None = None,
) -> Report:
    """Profile ``model`` before and after quantization; see the module docstring.

    plan: a :class:`~stefx.match.Plan`; default: the plan ``stefx.quantize`` stored on the
        model, or the one ``recipe`` gives (matched without changing the model), or none
        (then "after" equals "before").
    hardware / energy: a hardware profile and an energy table, by name or YAML path;
        ``energy=None``: the hardware profile's own table, else Horowitz 45 nm (labelled).
    acc_bits: the integer accumulator's width for MAC energy (default: b_w + b_a, the
        product's width; 32 for int32 accumulation).
    measure: also time the model on real tensors (not possible on the meta device).
    fusion: ``"pointwise"`` costs pointwise chains as the one kernel a runtime fuses them
        into, ``"none"`` every aten op as a kernel of its own, ``"eager"`` as PyTorch eager
        mode runs it (unfused, every op a dispatch, views too); see
        :mod:`stefx.profile.fusion`.
    """
    from stefx.capture import capture as capture_model

    if fusion not in FUSIONS:
        raise StefxError(f"profile: fusion={fusion!r}; choose one of {list(FUSIONS)}")
    if not isinstance(model, nn.Module):
        raise StefxError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    on_meta = any(p.is_meta for p in model.parameters())
    if measure and on_meta:
        raise StefxError(
            "profile(measure=True) needs real weights, but the model is on the meta device; "
            "load the weights (e.g. model.to_empty(device='cpu') then load a state dict) or "
            "drop measure=True to get estimates only."
        )
    if capture is None:
        with _float_view(model):
            capture = capture_model(model, example_inputs)
    cap = capture
    if cap.ops and all(op.output_shape is None for op in cap.ops):
        raise CaptureError(
            f"profile: {type(model).__name__} was captured without tensor shapes, so nothing "
            "can be counted; pass example_inputs (a tuple of positional arguments or a dict "
            "of keyword arguments, e.g. (torch.randn(1, 3, 224, 224),))"
        )
    plan = _resolve_plan(model, cap, recipe, plan)
    device = load_hardware(hardware)
    table = resolve_energy_table(device, energy)
    costed = _cost_ops(model, cap, plan, device, table, causal_halving, fusion, acc_bits)
    samples, tokens = input_sizes(model, example_inputs)
    report = Report.build(
        costed,
        cap,
        plan,
        device,
        table,
        model_name=type(model).__name__,
        samples=samples,
        tokens=tokens,
    )
    report.not_covered += _not_run(model, cap, plan)
    report.notes += _cost_model_notes(fusion, plan is not None)
    if measure:
        report.measured = measure_model(model, example_inputs, report.rows)
    return report


def _cost_model_notes(fusion: str, quantized: bool) -> list[str]:
    """What the cost model assumes, for the report's header."""
    notes = [
        {
            "pointwise": "cost model: pointwise chains fused into one kernel (each reads its "
            "inputs and writes its outputs once), views and eval-mode dropout free, copies "
            "(cat, pad, index...) at their bytes",
            "none": "cost model: fusion='none': every aten op is a kernel of its own, reading "
            "and writing its tensors in memory (no runtime runs a model this way)",
            "eager": "cost model: fusion='eager': PyTorch eager mode, every aten op a kernel "
            "of its own and a dispatch (views included) paying the launch floor",
        }[fusion]
    ]
    if quantized:
        notes.append(
            "after: each activation quantizer is a kernel (reads float, writes codes and "
            "scales, 4 FLOPs/element); output quantizers run in the op's epilogue"
        )
    return notes


def _not_run(model: nn.Module, cap: Capture, plan: Any) -> list[dict[str, Any]]:
    """Weights of modules that did not run on the example inputs (``unread_weights``)
    and that the plan does not quantize either; quantized ones are covered, just not
    costed."""
    quantized = (
        {f"{s.module}.{p}".lstrip(".") for s in plan.sites for p in s.params} if plan else set()
    )
    out = []
    for name, weights in unread_weights(cap, model).items():
        module = model.get_submodule(name)
        for local in weights:
            fqn = f"{name}.{local}".lstrip(".")
            if fqn in quantized:
                continue
            p = module.get_parameter(local)
            out.append(
                {
                    "param": fqn,
                    "module": name,
                    "op": "did not run",
                    "shape": tuple(p.shape),
                    "params": p.numel(),
                    "bytes": p.numel() * dtype_bits(str(p.dtype)) / 8,
                    "aliases": [],
                    "partly_quantized": False,
                }
            )
    return out


def _cost_ops(
    model,
    cap: Capture,
    plan,
    device,
    table,
    causal_halving: bool,
    fusion: str = "pointwise",
    acc_bits: int | None = None,
) -> list[OpCost]:
    """Cost every op before and after the plan, with hardware estimates; annotate
    ``node.meta["stefx.cost"]`` on the analysis graph."""
    nodes = {id(n.meta["stefx.op"]): n for n in cap.graph.nodes if "stefx.op" in n.meta}
    ops, nodes = _without_quantizer_params(cap.ops, nodes, model)
    ops, nodes = _without_claimed_params(ops, nodes)
    bits = plan_bits(plan, ops, model) if plan is not None else {}
    names = row_names(ops, model)
    costs: dict[int, list[Cost]] = {}
    for op in ops:
        fb = dtype_bits(op.dtype) if op.dtype else 32
        after_bits = bits.get(id(op), OpBits())
        before = cost_of(op, float_bits=fb, causal_halving=causal_halving)
        if after_bits.folded_into:
            after = _folded(op, fb, after_bits.folded_into)
        else:
            after = cost_of(
                op,
                after_bits.w_bits,
                after_bits.a_bits,
                out_bits=after_bits.out_bits,
                float_bits=fb,
                causal_halving=causal_halving,
                scale_groups=after_bits.scale_groups,
                scale_overhead_bits=after_bits.scale_overhead_bits,
            )
        costs[id(op)] = [before, after]
    if fusion == "pointwise":
        fuse_pointwise(cap.graph, ops, nodes, costs)
    elif fusion == "eager":
        eager_dispatch(costs)
    costed: list[OpCost] = []
    for op in ops:
        fb = dtype_bits(op.dtype) if op.dtype else 32
        after_bits = bits.get(id(op), OpBits())
        before, after = costs[id(op)]
        if not after_bits.folded_into:
            after = quantize_cost(after, op, list(after_bits.quantized_inputs),
                                  after_bits.out_bits, fb)  # fmt: skip
        node = nodes.get(id(op))
        if node is not None:
            node.meta["stefx.cost"] = {"before": before, "after": after}
        hw_bits = fb if fb in (16, 32) else 32
        costed.append(
            OpCost(
                op=op,
                row=names[id(op)],
                before=before,
                after=after,
                bits=after_bits,
                float_bits=fb,
                before_hw=_estimate(before, device, table, None, None, hw_bits, acc_bits),
                after_hw=_estimate(
                    after, device, table, after_bits.w_bits, after_bits.a_bits, hw_bits, acc_bits
                ),
                # only an op that counts the weights claims them (a transpose of a fused
                # expert weight must not hide it from the experts op that reads it)
                params=_canonical(op, cap.tied_params) if before.params else frozenset(),
            )
        )
    return costed


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@contextmanager
def _float_view(model: nn.Module) -> Iterator[None]:
    """Capture a quantized model as its float self: stefx's hooks are set aside while
    capturing and put back afterwards (the same dict objects), so the analysis graph has
    the float model's ops and the plan's sites line up with them."""
    from stefx.runtime import is_stefx_hook

    saved = []
    for module in model.modules():
        hooks = module._forward_pre_hooks, module._forward_hooks
        ids = {k for table in hooks for k, h in table.items() if is_stefx_hook(h)}
        if not ids:
            continue
        for attr in _HOOK_DICTS:
            table = getattr(module, attr)
            if any(k in ids for k in table):
                saved.append((module, attr, table))
                setattr(module, attr, type(table)((k, v) for k, v in table.items() if k not in ids))
    restore = _show_packed_weights(model)
    try:
        yield
    finally:
        for module, attr, table in saved:
            setattr(module, attr, table)
        restore()


def _show_packed_weights(model: nn.Module):
    """A converted model holds no float weight where it stores packed codes: put the
    dequantized weight there while capturing (shapes and dtypes only matter), and return
    what puts the empty slots back."""
    import torch

    from stefx.convert import packed_slots

    slots = packed_slots(model)
    for owner, key, packed in slots:
        owner._parameters[key] = torch.nn.Parameter(packed.dequantized(), requires_grad=False)

    def restore() -> None:
        for owner, key, _ in slots:
            owner._parameters[key] = None

    return restore


def _without_quantizer_params(ops: list[OpNode], nodes: dict, model: nn.Module):
    """Drop the parameters of stefx quantizers (learned scales) from leaf-module ops: their
    bytes are the scale overhead the plan accounts for, not weights."""
    from stefx.ste.base import Quantizer

    owned = {
        f"{name}.{p}" if name else p
        for name, m in model.named_modules()
        if isinstance(m, Quantizer)
        for p, _ in m.named_parameters()
    }
    return _drop_params(ops, nodes, lambda op, fqn: fqn in owned)


def _without_claimed_params(ops: list[OpNode], nodes: dict):
    """An opaque leaf lists every weight it holds, and capture adds one op for each weight
    it could cost inside (fused expert tensors): those weights belong to their own ops, so
    the opaque op keeps only the rest (each weight counts once, at its own bits)."""
    claimed = {fqn for op in ops if op.kind != "opaque" for fqn in op.params.values()}
    return _drop_params(ops, nodes, lambda op, fqn: op.kind == "opaque" and fqn in claimed)


def _drop_params(ops: list[OpNode], nodes: dict, drop) -> tuple[list[OpNode], dict]:
    """``ops`` without the parameters ``drop(op, fqn)`` names, and ``nodes`` re-keyed to
    the new op objects."""
    out, out_nodes = [], {}
    for op in ops:
        node = nodes.get(id(op))
        if any(drop(op, fqn) for fqn in op.params.values()):
            keep = {r: f for r, f in op.params.items() if not drop(op, f)}
            shapes = {r: sh for r, sh in op.param_shapes.items() if r in keep}
            op = replace(op, params=keep, param_shapes=shapes)
        out.append(op)
        if node is not None:
            out_nodes[id(op)] = node
    return out, out_nodes


def _resolve_plan(model: nn.Module, cap: Capture, recipe: Any, plan: Any) -> Any:
    if plan is not None:
        return plan
    if recipe is not None:
        from stefx.match import match
        from stefx.recipe import load_recipe

        return match(load_recipe(recipe), cap, model)
    return model.__dict__.get("_stefx_plan")


def _folded(op: OpNode, float_bits: int, into: str) -> Cost:
    """A BatchNorm folded into the weights before it: at deployment nothing runs; what is
    left is one bias per channel, stored in float beside the folded weights."""
    channels = op.output_shape[1] if op.output_shape and len(op.output_shape) > 1 else 0
    return Cost(
        params=channels,
        param_bytes=channels * float_bits / 8,
        note=f"folded into {into} (a per-channel bias remains)",
        kernels=0,
    )


def _estimate(cost: Cost, device, table, w_bits, a_bits, float_bits: int, acc_bits=None) -> tuple:
    """(latency_s, bound, energy_j) of one op: roofline on ``device``, energy from ``table``."""
    latency, bound = roofline_latency(cost, device, w_bits, a_bits, float_bits=float_bits)
    joules = energy(cost, table, w_bits, a_bits, float_bits=float_bits, acc_bits=acc_bits)
    return latency, bound, joules


def _canonical(op: OpNode, tied: dict[str, str]) -> frozenset[str]:
    return frozenset(tied.get(fqn, fqn) for fqn in op.params.values())


# -- row names -----------------------------------------------------------------------------


def row_names(ops: list[OpNode], model: nn.Module) -> dict[int, str]:
    """id(op) -> its report row: the module FQN, or ``<module>.<kind>_<n>`` for functional
    matmul-family ops without weights of their own inside a module with children (the
    op-site names of :mod:`stefx.match`). Everything else in a module's own forward
    (norms, softmax, elementwise...) goes to that module's row."""
    has_children = {name for name, m in model.named_modules() if next(m.children(), None)}
    sites = {id(op): name for name, op in op_sites(ops).items()}
    out = {}
    for op in ops:
        inner = op.attrs.get("inside_opaque")
        if id(op) in sites and op.kind in FUNCTIONAL_KINDS and op.module in has_children:
            out[id(op)] = sites[id(op)]
        else:
            out[id(op)] = op.module if not inner or op.module else str(inner)
    return out
