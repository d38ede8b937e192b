"""Cost formulas: what one op of the analysis graph costs, from its shapes and bit widths.

Each formula is a pure function ``(OpNode, CostSettings) -> Cost`` registered per op kind
with :func:`register_cost` (the built-in ones live in :mod:`stefx.profile.formulas`);
:func:`cost_of` resolves the bit widths and calls it. Nothing here reads tensors, runs a
model or mutates a graph.

Conventions (the report states them too):

* **MACs** are the multiply-accumulates of matmul-family work: linear, addmm, conv,
  conv_transpose, mm/bmm/baddbmm/matmul, einsum contractions, SDPA (QK^T and PV), RNN gates,
  fused experts. Bias additions are not counted, as in ``torch.utils.flop_counter``.
* **FLOPs** = 2 x MACs for those ops. Other ops count FLOPs per output element and no
  MACs: layer/group/instance norm 5 (+2 with an affine weight), RMS norm 3 (+1), batch norm
  2 (inference: statistics folded into one scale and shift), softmax 5 (max, subtract, exp,
  sum, divide), elementwise 1 (``attrs["flops_per_element"]`` overrides it), quantize 4
  (scale, round, clamp, rescale); reduce and pool 1 per *input* element; create 0. A
  transcendental counts as one FLOP.
* **BOPs** = MACs x b_w x b_a, where an unquantized operand has ``float_bits``.
* **Bit widths**: ``a_bits`` belongs to operand 0 (the activation); ``w_bits`` to the weight,
  or, for ops without one, to the second operand (K and V of SDPA: KV quantization).
  ``None`` means unquantized, i.e. ``float_bits``; ``out_bits`` (default ``float_bits``)
  is the output's width.
* **params** = elements of every parameter in ``op.params``. **param_bytes** = those
  elements x w_bits / 8 (packed sub-byte sizes), biases kept at ``float_bits``, plus
  ``scale_groups`` x ``scale_overhead_bits`` / 8 for the quantizer's scales (one per
  tensor, channel or group; default width ``float_bits``; add the zero-point bits for
  asymmetric schemes).
* **act_in_bytes** = numel x bits / 8 of every tensor input that is not a parameter (integer
  indices at 64 bits); **act_out_bytes** = output numel x out_bits / 8.
* Every op is **counted**, **ignored** (a documented zero: views) or **unsupported** (no
  formula, or shapes missing) - never a silent zero.

Matmul-family counts equal ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors,
except where torch counts nothing: ``aten.dot``/``aten.mv`` (1-D matmul operands), an einsum
step that is a broadcast multiply (outer product), and SDPA or a fused LSTM on devices
whose kernels it has no formula for. ``causal_halving=True`` is opt-in: torch counts the
full Lq x Lk for a causal SDPA.

Where shapes come from: ``op.param_shapes`` gives every parameter's shape. A module-call
node (capture names its target by the module class: ``"Linear"``) has only activations in
``input_shapes``; a function/aten node also receives its parameters as arguments, told
apart from activations by shape. Matmul-family formulas read their operands by position.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from stefx.capture.graph import OpNode
from stefx.errors import RecipeError, did_you_mean
from stefx.registry import Registry

__all__ = [
    "STATUSES",
    "Cost",
    "CostSettings",
    "cost_formula",
    "cost_of",
    "counted",
    "dtype_bits",
    "register_cost",
    "unsupported",
]

Shape = tuple[int, ...]
STATUSES = ("counted", "ignored", "unsupported")
INDEX_BITS = 64  # integer index tensors (embedding ids) are int64 in PyTorch
NORM_FLOPS = {"rms": 3, "batch": 2, "default": 5}  # per element, before the affine part
SOFTMAX_FLOPS = 5
QUANTIZE_FLOPS = 4


@dataclass(frozen=True)
class Cost:
    """The cost of one op; see the module docstring for what each number counts."""

    flops: int = 0
    macs: int = 0
    bops: float = 0.0
    params: int = 0
    param_bytes: float = 0.0
    act_in_bytes: float = 0.0
    act_out_bytes: float = 0.0
    status: str = "counted"
    note: str = ""
    # kernels this op launches as a runtime would run it: 0 for a layout op, an eval-mode
    # no-op or an op fused into its neighbour's kernel (see ``fusion``), else 1
    kernels: float = 1.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Cost.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def bytes_moved(self) -> float:
        """Bytes read and written, assuming every weight is read once per call."""
        return self.param_bytes + self.act_in_bytes + self.act_out_bytes


@dataclass(frozen=True)
class CostSettings:
    """Resolved bit widths and options a formula reads (no ``None`` left)."""

    w_bits: float
    a_bits: float
    out_bits: float
    float_bits: int = 32
    causal_halving: bool = False
    scale_groups: int = 0
    scale_overhead_bits: int = 32


Formula = Callable[[OpNode, CostSettings], Cost]
_FORMULAS: Registry[Formula] = Registry("cost formula", check=callable)


def register_cost(kind: str, *, replace: bool = False) -> Callable[[Formula], Formula]:
    """Register ``formula(op, settings) -> Cost`` for an op kind; duplicates are rejected.

    A formula usually computes MACs (or FLOPs) and lets :func:`counted` apply the
    conventions for BOPs, parameters and bytes::

        @register_cost("my_op")
        def my_op_cost(op: OpNode, s: CostSettings) -> Cost:
            return counted(op, s, macs=0, flops=3 * math.prod(op.output_shape))
    """
    return _FORMULAS.register(kind, replace=replace)


def cost_formula(kind: str) -> Formula:
    """The formula registered for ``kind``; an unknown kind raises with the nearest name."""
    return _FORMULAS.get(kind)


class _ShapeUnknown(Exception):
    """A formula lacks a shape it needs; :func:`cost_of` reports the op as unsupported."""


def cost_of(
    op: OpNode,
    w_bits: float | None = None,
    a_bits: float | None = None,
    *,
    out_bits: float | None = None,
    float_bits: int = 32,
    causal_halving: bool = False,
    scale_groups: int = 0,
    scale_overhead_bits: int | None = None,
) -> Cost:
    """Cost of one op at the given bit widths (``None`` = unquantized = ``float_bits``).

    >>> op = OpNode("fc", "linear", "Linear", module="fc", module_type="Linear",
    ...             params={"weight": "fc.weight"}, param_shapes={"weight": (5, 4)},
    ...             input_shapes=((3, 4),), output_shape=(3, 5))
    >>> c = cost_of(op, w_bits=4, a_bits=8)
    >>> c.macs, c.flops, c.bops, c.params, c.param_bytes
    (60, 120, 1920.0, 20, 10.0)
    """
    for name, value in (("w_bits", w_bits), ("a_bits", a_bits), ("out_bits", out_bits)):
        if value is not None and not value > 0:
            raise RecipeError(f"{name} must be a positive bit width or None, got {value!r}")
    if scale_groups < 0:
        raise RecipeError(f"scale_groups must be >= 0, got {scale_groups!r}")
    settings = CostSettings(
        w_bits=float(w_bits if w_bits is not None else float_bits),
        a_bits=float(a_bits if a_bits is not None else float_bits),
        out_bits=float(out_bits if out_bits is not None else float_bits),
        float_bits=float_bits,
        causal_halving=causal_halving,
        scale_groups=scale_groups,
        scale_overhead_bits=scale_overhead_bits if scale_overhead_bits is not None else float_bits,
    )
    if _on_sizes(op):
        note = "arithmetic on sizes (Python ints), not on tensors"
        return Cost(status="ignored", note=note, kernels=0)
    if op.kind not in _FORMULAS:
        hint = did_you_mean(op.kind, _FORMULAS.names())
        return unsupported(op, settings, f"no cost formula for kind {op.kind!r}{hint}")
    try:
        return cost_formula(op.kind)(op, settings)
    except _ShapeUnknown as missing:
        return unsupported(op, settings, f"{op.name}: {missing}")


def _on_sizes(op: OpNode) -> bool:
    """A traced ``n // 2`` or ``u0 >= 0`` on a symbolic size: no tensor in, none out."""
    return (
        op.kind in ("elementwise", "other")
        and not op.dtype
        and op.output_shape is None
        and all(s is None for s in op.input_shapes)
        and not op.params
    )


def dtype_bits(dtype: str) -> int:
    """Bit width of a dtype string: ``"torch.bfloat16"`` -> 16, ``"float8_e4m3fn"`` -> 8.

    Lets a profiler pass the model's own width as ``float_bits``; unknown names give 32.
    """
    name = dtype.rsplit(".", 1)[-1]
    found = re.search(r"\d+", name)
    return int(found.group()) if found else {"half": 16, "double": 64, "bool": 8}.get(name, 32)


# -- shared helpers: telling parameters from activations, filling a Cost ----------------


def numel(shape: Sequence[int] | None) -> int:
    if shape is None:
        raise _ShapeUnknown("shape unknown")
    return math.prod(shape)


def is_module_call(op: OpNode) -> bool:
    """Capture names a module call by the module's class (target "Linear" in a "Linear")."""
    return bool(op.module_type) and op.target == op.module_type


def _input(op: OpNode, i: int, rank: int = 0) -> Shape:
    """The i-th tensor input's shape (function nodes: parameters included, in order)."""
    shape = op.input_shapes[i] if i < len(op.input_shapes) else None
    if shape is None:
        raise _ShapeUnknown(f"the shape of input {i} is unknown")
    if len(shape) < rank:
        raise _ShapeUnknown(f"input {i} has shape {tuple(shape)}, fewer than {rank} dims")
    return tuple(shape)


def _need_output(op: OpNode) -> Shape:
    if op.output_shape is None:
        raise _ShapeUnknown("the output shape is unknown")
    return tuple(op.output_shape)


def _weight(op: OpNode, position: int) -> Shape:
    """The weight's shape: from ``param_shapes``, else the function node's argument."""
    shape = op.param_shapes.get("weight")
    if shape is not None:
        return tuple(shape)
    if is_module_call(op):
        raise _ShapeUnknown("the weight shape is unknown")
    return _input(op, position, 1)


def _activations(op: OpNode) -> list[tuple[int, Shape]]:
    """(position, shape) of tensor inputs that are not parameters.

    A function node receives its parameters as arguments: each is recognised by its shape,
    as stored or transposed (``x @ w.t()``); a shape shared with an activation only moves
    bytes between the two widths.
    """
    inputs = [(i, tuple(s)) for i, s in enumerate(op.input_shapes) if s is not None]
    if is_module_call(op):
        return inputs
    for role in op.params:
        shape = tuple(op.param_shapes.get(role, ()))
        swapped = (*shape[:-2], shape[-1], shape[-2]) if len(shape) > 2 else shape
        for candidate in (shape, shape[::-1], swapped) if shape else ():
            hit = next((k for k, (_, s) in enumerate(inputs) if s == candidate), None)
            if hit is not None:
                del inputs[hit]
                break
    return inputs


def _float_role(role: str) -> bool:
    """Parameters kept at float width: biases ("bias", "bias_ih_l0", "in_proj_bias")."""
    return "bias" in role.rsplit(".", 1)[-1]


def counted(
    op: OpNode,
    s: CostSettings,
    *,
    macs: int,
    flops: int | None = None,
    note: str = "",
    in_bits: Mapping[int, float] | None = None,
    status: str = "counted",
    float_params: bool = False,
) -> Cost:
    """Fill a Cost by the module's conventions from a formula's MACs (and FLOPs).

    Activation inputs are at ``a_bits`` except those in ``in_bits`` (input position ->
    bits); parameters at ``w_bits``, biases (or all, with ``float_params``) at float width.
    """
    params, param_bits, missing = 0, s.scale_groups * s.scale_overhead_bits, []
    for role in op.params:
        shape = op.param_shapes.get(role)
        if shape is None:
            missing.append(role)
            continue
        n = math.prod(shape)
        params += n
        param_bits += n * (s.float_bits if float_params or _float_role(role) else s.w_bits)
    bits = in_bits or {}
    act_in = sum(math.prod(sh) * bits.get(i, s.a_bits) for i, sh in _activations(op))
    out = 0 if op.output_shape is None else math.prod(op.output_shape) * s.out_bits
    missing_note = f"shape unknown for params {', '.join(missing)}" if missing else ""
    return Cost(
        flops=2 * macs if flops is None else flops,
        macs=macs,
        bops=float(macs * s.w_bits * s.a_bits),
        params=params,
        param_bytes=param_bits / 8,
        act_in_bytes=act_in / 8,
        act_out_bytes=out / 8,
        status=status,
        note="; ".join(n for n in (note, missing_note) if n),
    )


def unsupported(op: OpNode, s: CostSettings, note: str) -> Cost:
    """An op without a formula: its parameters and activations are still counted when known."""
    return counted(op, s, macs=0, flops=0, note=note, status="unsupported")


# Registers the built-in formulas (they import the helpers above).
from stefx.profile import formulas as _formulas  # noqa: E402, F401
