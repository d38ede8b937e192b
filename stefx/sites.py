"""Sites: the places quantizers go, and the one rule that names and counts them.

A **site** is one place a quantizer goes:

- a *module site*: a module whose op reads its own weight (Linear, Conv, HF Conv1D,
  Embedding, fused MoE experts...). ``weights`` quantizes the weight parameters it reads,
  ``input_activations`` its first input, ``output_activations`` its output;
- an *op site*: a functional op with no weight of its own (``torch.matmul`` for attention
  QKᵀ and PV, ``bmm``, ``einsum``, SDPA), or the pointwise call that ends a pattern
  (``F.relu``, ``x + y``). ``input_activations`` quantizes its tensor operands,
  ``output_activations`` its result.

**The op-site rule**, used by match (to name sites on the analysis graph), by the run
time interceptor (to find them while the model runs) and by the profiler: inside one
module's own forward (not its children's), calls are counted per *counter*: the op kind
of a matmul-like call (``matmul``, ``sdpa``...), the call name of a pointwise one
(``relu``, ``add``: ``kinds.call_name`` spells ``operator.add``, ``Tensor.__add__`` and
``aten.add_`` alike). The n-th call of counter c in module m is the site
``<m>.<c>_<n>``. Every call of a counter is counted, weight-reading or not, because that
is what the run time sees.

The resolved form of each site's weight specs (which axis is a weight's output channel or
input dimension) is decided here too, once, and kept on the :class:`Site`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from stefx.capture.graph import OpNode
from stefx.capture.kinds import FUNCTIONAL_KINDS, call_name, kind_of_function
from stefx.errors import RecipeError
from stefx.ste.spec import QUANTIZERS, QuantSpec, parse_spec

__all__ = [
    "Site",
    "call_counter",
    "counter",
    "counter_of_function",
    "number_op_sites",
    "op_site_name",
    "op_sites",
    "operand_slots",
    "weight_axes",
    "weight_spec",
]


@dataclass(frozen=True)
class Site:
    """A place to put quantizers, with the spec each field got from the recipe.

    ``weight_specs`` holds the spec each weight parameter really gets (its channel or
    group axis resolved for the weight's layout, see :func:`weight_spec`); ``counter``
    and ``ordinal`` locate an op site by the op-site rule.
    """

    name: str
    kind: str
    module: str
    module_type: str
    params: tuple[str, ...]
    ordinal: int | None
    weights: QuantSpec | None
    input_activations: QuantSpec | None
    output_activations: QuantSpec | None
    rules: tuple[int, ...]
    operands: int = 0  # op sites: number of tensor inputs of the op
    expert_in_axis: dict[str, int] = field(default_factory=dict)  # experts: param -> in axis
    fold_bn: str = ""  # FQN of the BatchNorm folded into the weights while training (QAT)
    fold_axis: int | None = None  # the weight's output axis that BatchNorm scales
    ran: bool = True  # False: the module did not run on the example inputs
    counter: str = ""  # op sites: what ``ordinal`` counts (see the module docstring)
    weight_specs: Mapping[str, QuantSpec] = field(default_factory=dict)

    @property
    def is_op_site(self) -> bool:
        return self.ordinal is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (specs as recipe dicts); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, QuantSpec):
                value = value.to_dict()
            elif f.name == "weight_specs":
                value = {p: spec.to_dict() for p, spec in value.items()}
            elif f.name == "expert_in_axis":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Site:
        """The site :meth:`to_dict` wrote; specs are validated again (a custom quantizer
        type must be registered first). Raises RecipeError on a malformed record."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or not {"name", "kind", "module"} <= set(data):
            raise RecipeError(f"site record {data!r} is invalid; expected Site.to_dict() output")
        if unknown := set(data) - names:
            raise RecipeError(f"site {data['name']!r}: unknown keys {sorted(unknown)}")
        kw = dict(data)
        where = f"site {data['name']!r}"
        for key in ("weights", "input_activations", "output_activations"):
            if kw.get(key) is not None:
                kw[key] = parse_spec(kw[key], f"{where} {key}")
        kw["weight_specs"] = {
            p: parse_spec(spec, f"{where} weights {p}")
            for p, spec in (kw.get("weight_specs") or {}).items()
        }
        for key in ("params", "rules"):
            kw[key] = tuple(kw.get(key, ()))
        try:
            return cls(**kw)
        except TypeError as e:
            raise RecipeError(f"{where}: {e}") from None


# -- the op-site rule ----------------------------------------------------------------------


def call_counter(kind: str, call: str) -> str | None:
    """What calls of this kind and call name are counted under inside one module's
    forward: the kind for matmul-like ops (``matmul_0``), the call name for pointwise
    ops (``relu_1``); None for ops that cannot carry an op site."""
    if kind in FUNCTIONAL_KINDS:
        return kind
    if kind == "elementwise" and call:
        return call
    return None


def counter(op: OpNode) -> str | None:
    """The counter of a graph op. Arithmetic on sizes (``x.size(-1) // 2``: no tensor in
    or out) is traced but runs as plain Python, so it is not counted."""
    if op.kind == "elementwise" and not op.dtype and all(s is None for s in op.input_shapes):
        return None
    return call_counter(op.kind, op.call)


_COUNTERS: dict[Any, str | None] = {}


@torch.compiler.assume_constant_result
def counter_of_function(func: Any) -> str | None:
    """The counter of a torch-level callable as the run time sees it (same tables). A
    constant of the callable: under ``torch.compile`` it is looked up while tracing."""
    try:
        return _COUNTERS[func]
    except KeyError:
        key = _COUNTERS[func] = call_counter(kind_of_function(func), call_name(func))
        return key


def number_op_sites(ops: list[OpNode]) -> dict[int, int]:
    """id(op) -> its ordinal among the calls of its counter in its module, for every op
    that has a counter (weight-reading or not: the run time counts them all)."""
    counts: Counter[tuple[str, str]] = Counter()
    out = {}
    for op in ops:
        key = counter(op)
        if key is not None:
            out[id(op)] = counts[(op.module, key)]
            counts[(op.module, key)] += 1
    return out


def op_site_name(module: str, key: str, ordinal: int) -> str:
    """``<module>.<counter>_<n>`` (``<counter>_<n>`` in the root module)."""
    return f"{module}.{key}_{ordinal}" if module else f"{key}_{ordinal}"


def op_sites(ops: list[OpNode]) -> dict[str, OpNode]:
    """Op-site name -> op for every weightless op that can carry an op site."""
    ordinals = number_op_sites(ops)
    return {
        op_site_name(op.module, counter(op), ordinals[id(op)]): op
        for op in ops
        if id(op) in ordinals and not op.params
    }


# Tensor operands an op site quantizes: (position, keyword) of each, in order.
_OPERANDS: dict[str, tuple[tuple[int, str], ...]] = {
    "matmul": ((0, "input"), (1, "other")),
    "bmm": ((0, "input"), (1, "mat2")),
    "addmm": ((1, "mat1"), (2, "mat2")),  # not the additive input
    "baddbmm": ((1, "batch1"), (2, "batch2")),
    "sdpa": ((0, "query"), (1, "key"), (2, "value")),
}


def operand_slots(kind: str, n_inputs: int) -> tuple[tuple[int, str], ...]:
    """(argument position, keyword name) of the tensor operands an op site quantizes."""
    if kind == "einsum":
        return tuple((i, "") for i in range(1, 1 + n_inputs))
    if kind in _OPERANDS:
        return _OPERANDS[kind]
    raise ValueError(f"no op-site operands known for kind {kind!r}")


# -- the spec a weight really gets -----------------------------------------------------------


def weight_axes(kind: str, module_type: str, ndim: int, in_axis: int | None) -> tuple[int, int]:
    """(output-channel axis, input axis) of a weight read by an op of ``kind``.

    Linear, Conv and Embedding weights are [out, in, ...]; a ConvTranspose weight is
    [in, out, ...]; Hugging Face's Conv1D (GPT-2) stores [in, out]; a fused expert
    weight [E, ., .] has its input axis found from the shapes it ran with.
    """
    if in_axis is not None:  # experts
        return (2 if in_axis == 1 else 1), in_axis
    if module_type == "Conv1D":
        return 1, 0
    if kind == "conv_transpose":
        return 1, 0
    return 0, (1 if ndim == 2 else -1)


def weight_spec(
    spec: QuantSpec,
    shape: tuple[int, ...],
    kind: str,
    module_type: str = "",
    in_axis: int | None = None,
) -> QuantSpec:
    """The spec a weight quantizer of a ``kind`` op really gets, with its axis resolved:
    ``channel`` means one scale per output channel, ``group`` runs of ``group_size``
    along the input dimension, whatever the weight's layout; a fused expert weight gets
    one scale per (expert, output row): one group spanning its whole input axis, or the
    ``token`` view along that axis for quantizers without groups (binary, ternary, SEQ)."""
    if spec.axis is not None or spec.strategy not in ("channel", "group"):
        return spec
    out_axis, inp = weight_axes(kind, module_type, len(shape), in_axis)
    if spec.strategy == "channel":
        if in_axis is not None:
            if "group" in QUANTIZERS.get(spec.type).strategies:
                return spec.replace(strategy="group", axis=in_axis, group_size=shape[in_axis])
            return spec.replace(strategy="token", axis=in_axis)
        return spec if out_axis == 0 else spec.replace(axis=out_axis)
    return spec if inp in (-1, len(shape) - 1) else spec.replace(axis=inp)
