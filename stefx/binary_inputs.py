"""Binary input quantizers and the sign of what they read.

``sign`` of a tensor that is never negative (a ReLU's output, a softmax...) is a constant
+1: a binary input quantizer there stops its layer from learning. The analysis graph of a
plan says what produced each site's input, so this module can

- resolve ``threshold: auto`` per site (:func:`resolve_thresholds`, called by
  :func:`stefx.match.match`): a learned threshold (ReActNet's RSign) where the input is
  never negative, plain sign elsewhere;
- list the sites a recipe binarizes with plain sign although their input is never
  negative (:func:`binarized_nonnegative_inputs`), which ``quantize`` warns about.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from stefx.ste.spec import QuantSpec

if TYPE_CHECKING:
    from stefx.match import Plan

__all__ = ["binarized_nonnegative_inputs", "resolve_thresholds"]

_NONNEGATIVE_CALLS = frozenset(
    {"relu", "relu_", "relu6", "sigmoid", "hardsigmoid", "softmax", "exp", "abs"}
)
_NONNEGATIVE_MODULES = frozenset({"ReLU", "ReLU6", "Sigmoid", "Hardsigmoid", "Softmax"})
_PASS_THROUGH = frozenset({"view", "pool"})  # reshapes, flatten, max/avg pooling keep signs


def _nonnegative(node, depth: int = 0) -> str | None:
    """The op that makes ``node``'s value non-negative (``relu``, ``ReLU``...), looking
    through reshapes and pooling; None if it may be negative (or is not known)."""
    op = node.meta.get("stefx.op") if hasattr(node, "meta") else None
    if op is None or depth > 8:
        return None
    if op.kind == "softmax" or op.call in _NONNEGATIVE_CALLS:
        return op.call or op.kind
    if not op.call and op.module_type in _NONNEGATIVE_MODULES:
        return op.module_type
    if op.kind in _PASS_THROUGH or op.call in ("dropout", "contiguous", "clone"):
        first = next((a for a in node.args if hasattr(a, "meta")), None)
        return _nonnegative(first, depth + 1) if first is not None else None
    return None


def _binary_input(spec: QuantSpec | None, *thresholds: str) -> bool:
    return (
        spec is not None and spec.type == "binary" and spec.options.get("threshold") in thresholds
    )


def resolve_thresholds(plan: Plan) -> Plan:
    """``threshold: auto`` on a binary input quantizer becomes ``learned`` (RSign) where the
    input is never negative (after a ReLU...) and ``none`` elsewhere: a centred input keeps
    plain sign, and identical quantizers (an attention block's q/k/v) keep sharing one
    binarized input."""
    if not any(_binary_input(s.input_activations, "auto") for s in plan.sites):
        return plan
    needs = {name for name, _ in _nonnegative_inputs(plan, ("auto",))}
    sites = [
        dataclasses.replace(
            s,
            input_activations=s.input_activations.replace(
                threshold="learned" if s.name in needs else "none"
            ),
        )
        if _binary_input(s.input_activations, "auto")
        else s
        for s in plan.sites
    ]
    return dataclasses.replace(plan, sites=sites)


def binarized_nonnegative_inputs(plan: Plan) -> list[tuple[str, str]]:
    """``(site, producer)`` for each site whose input a binary quantizer would see only as
    values >= 0 (it follows a ReLU, a sigmoid...): plain ``sign`` of it is a constant, so
    the layer cannot learn. Needs the analysis graph (``plan.capture``)."""
    return _nonnegative_inputs(plan, ("none",))


def _nonnegative_inputs(plan: Plan, thresholds: tuple[str, ...]) -> list[tuple[str, str]]:
    if plan.capture is None:
        return []
    binary = {s.name for s in plan.sites if _binary_input(s.input_activations, *thresholds)}
    by_op = {id(c.op): c.name for c in plan.candidates if c.op is not None and c.name in binary}
    found = []
    for node in plan.capture.graph.nodes:
        op = node.meta.get("stefx.op")
        name = by_op.get(id(op)) if op is not None else None
        first = next((a for a in node.args if hasattr(a, "meta")), None) if name else None
        producer = _nonnegative(first) if first is not None else None
        if producer:
            found.append((name, producer))
    return found
