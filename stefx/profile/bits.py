"""Which bit widths each op of the analysis graph runs at after quantization, as a
:class:`~stefx.match.Plan` says: weights, activation inputs (and the scales their
quantizers write), outputs, BatchNorms folded into the weights before them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from stefx.capture.graph import OpNode
from stefx.capture.kinds import MODULE_WEIGHT_KINDS
from stefx.match import module_op_kind
from stefx.profile.costs import dtype_bits
from stefx.sites import op_sites

__all__ = ["OpBits", "plan_bits"]


@dataclass(frozen=True)
class OpBits:
    """Bit widths one op runs at after quantization (None: float)."""

    w_bits: float | None = None
    a_bits: float | None = None
    out_bits: float | None = None
    scale_groups: int = 0
    scale_overhead_bits: int | None = None
    quantized_params: frozenset[str] = frozenset()  # FQNs of weights at w_bits
    folded_into: str = ""  # a BatchNorm folded into this site's weights (fold_bn)
    # quantized activation inputs: (input position, bits, scales per call)
    quantized_inputs: tuple[tuple[int, float, int], ...] = ()


def _local(fqn: str, module: str) -> str:
    return fqn[len(module) + 1 :] if module and fqn.startswith(module + ".") else fqn


def _scale_groups(site, param: str, shape: tuple[int, ...]) -> int:
    """Scale groups of a weight quantizer on ``shape``, by the site's resolved spec."""
    from stefx.ste.granularity import Granularity

    spec = site.weight_specs.get(param, site.weights)
    if spec.scale == "none":  # sign(w) alone (BNN): no scale is stored
        return 0
    try:
        return Granularity(spec.strategy, spec.axis, spec.group_size).num_groups(shape)
    except ValueError:
        return 1


def plan_bits(plan: Any, ops: list[OpNode], model: nn.Module) -> dict[int, OpBits]:
    """id(op) -> the bits the plan gives it. Ops in no site are absent (they stay float)."""
    out: dict[int, OpBits] = {}
    named_op_sites = op_sites(ops)
    by_module: dict[tuple[str, str], Any] = {}
    folded: dict[str, str] = {}  # BatchNorm FQN -> the site its statistics fold into
    for site in plan.sites:
        if site.is_op_site:
            op = named_op_sites.get(site.name)
            if op is not None and site.input_activations is not None:
                bits = site.input_activations.num_bits
                out_bits = _bits(site.output_activations)
                inputs = tuple(
                    (i, bits, _act_groups(site.input_activations, op, i))
                    for i in range(min(2, len(op.input_shapes)))
                    if site.input_activations.enabled
                )
                out[id(op)] = OpBits(
                    w_bits=bits, a_bits=bits, out_bits=out_bits, quantized_inputs=inputs
                )
            elif op is not None:
                out[id(op)] = OpBits(out_bits=_bits(site.output_activations))
        else:
            by_module[(site.module, site.kind)] = site
            if site.fold_bn:
                folded[site.fold_bn] = site.name
    for op in ops:
        if op.kind == "norm" and op.module in folded:
            out[id(op)] = OpBits(folded_into=folded[op.module])
            continue
        site = by_module.get((op.module, module_op_kind(op) or op.kind))
        if site is None:
            continue
        if op.kind not in MODULE_WEIGHT_KINDS or not op.params:
            # a module without weights that a site quantizes around: the nn.ReLU that ends
            # a [conv, batch_norm, relu] pattern writes its output at the site's bits
            a, o = _bits(site.input_activations), _bits(site.output_activations)
            if a is not None or o is not None:
                inputs = () if a is None else ((0, a, _act_groups(site.input_activations, op)),)
                out[id(op)] = OpBits(a_bits=a, out_bits=o, quantized_inputs=inputs)
            continue
        quantized, groups = set(), 0
        if site.weights is not None:
            for role, fqn in op.params.items():
                if _local(fqn, op.module) in site.params and role in op.param_shapes:
                    shape = tuple(op.param_shapes[role])
                    quantized.add(fqn)
                    groups += _scale_groups(site, _local(fqn, op.module), shape)
        w_bits = site.weights.num_bits if quantized else None
        overhead = None
        if quantized and not site.weights.symmetric:  # a zero point per group, at w_bits
            overhead = dtype_bits(op.dtype or "float32") + site.weights.num_bits
        a_bits = _bits(site.input_activations)
        out[id(op)] = OpBits(
            w_bits=w_bits,
            a_bits=a_bits,
            out_bits=_bits(site.output_activations),
            scale_groups=groups,
            scale_overhead_bits=overhead,
            quantized_params=frozenset(quantized),
            quantized_inputs=()
            if a_bits is None
            else ((0, a_bits, _act_groups(site.input_activations, op)),),
        )
    return out


def _act_groups(spec: Any, op: OpNode, i: int = 0) -> int:
    """Scales an activation quantizer writes per call on input ``i`` (per tensor: 1;
    per token: one per row...); a frozen (static) scale is a constant, also 1 read."""
    from stefx.ste.granularity import Granularity

    shape = op.input_shapes[i] if i < len(op.input_shapes) else None
    if not shape:
        return 1
    try:
        return Granularity(spec.strategy, spec.axis, spec.group_size).num_groups(tuple(shape))
    except Exception:  # an axis the shape does not have: count one scale
        return 1


def _bits(spec: Any) -> int | None:
    return None if spec is None or not spec.enabled else spec.num_bits
