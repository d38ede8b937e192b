"""The built-in cost formulas, one per op kind; conventions in :mod:`stefx.profile.costs`.

Each is a pure function ``(OpNode, CostSettings) -> Cost`` of shapes and bit widths,
registered with :func:`~stefx.profile.costs.register_cost`. Nothing here reads tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from stefx.capture.graph import OpNode
from stefx.profile.costs import (
    INDEX_BITS,
    NORM_FLOPS,
    QUANTIZE_FLOPS,
    SOFTMAX_FLOPS,
    Cost,
    CostSettings,
    Shape,
    _input,
    _need_output,
    _ShapeUnknown,
    _weight,
    counted,
    is_module_call,
    numel,
    register_cost,
    unsupported,
)

__all__ = ["einsum_work"]

# -- matmul family -----------------------------------------------------------------------


def _broadcast(a: Shape, b: Shape) -> Shape:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(x if y == 1 else y for x, y in zip(a, b, strict=True))


def _matmul_macs(a: Shape, b: Shape) -> int:
    """torch.matmul semantics: 1-D operands are vectors, leading dims broadcast."""
    m = 1 if len(a) == 1 else a[-2]
    n = 1 if len(b) == 1 else b[-1]
    return math.prod(_broadcast(a[:-2], b[:-2])) * m * a[-1] * n


@register_cost("linear")
def _linear(op: OpNode, s: CostSettings) -> Cost:
    # input [..., in], weight [out, in]; function form linear(input, weight, bias)
    x = _input(op, 0, 1)
    try:
        out_features, in_features = _weight(op, 1)[:2]
    except _ShapeUnknown:  # no weight shape known: infer [out, in] from input and output
        out_features, in_features = _need_output(op)[-1], x[-1]
    macs = math.prod(x[:-1]) * in_features * out_features
    return counted(op, s, macs=macs, in_bits={1: s.w_bits, 2: s.float_bits})


@register_cost("addmm")
def _addmm(op: OpNode, s: CostSettings) -> Cost:
    # addmm(bias, input, weight); HF Conv1D's weight is [in, out], transposed vs Linear
    module = is_module_call(op)
    x = _input(op, 0 if module else 1, 1)
    w = _weight(op, 2) if module else _input(op, 2, 1)
    bits = {} if module else {0: s.float_bits, 2: s.w_bits}  # a bias or weight not a parameter
    return counted(op, s, macs=_matmul_macs(x, w), in_bits=bits)


def _operands(op: OpNode, s: CostSettings, first: int) -> Cost:
    """mm, bmm, matmul (operands at 0, 1), baddbmm/addbmm (added tensor at 0, then 1, 2)."""
    a, b = _input(op, first, 1), _input(op, first + 1, 1)
    bits = {first + 1: s.w_bits, 0: s.a_bits if first == 0 else s.float_bits}
    return counted(op, s, macs=_matmul_macs(a, b), in_bits=bits)


for _kind, _first in (("matmul", 0), ("mm", 0), ("bmm", 0), ("baddbmm", 1)):
    register_cost(_kind)(lambda op, s, first=_first: _operands(op, s, first))


# -- convolutions ------------------------------------------------------------------------


@register_cost("conv")
@register_cost("conv_transpose")
def _conv(op: OpNode, s: CostSettings) -> Cost:
    # Regular: weight [C_out, C_in/groups, *kernel]; each output element takes
    # prod(weight[1:]) MACs whatever the stride, padding or dilation (padded taps count).
    # Transposed: weight [C_in, C_out/groups, *kernel]; each *input* element scatters into
    # prod(weight[1:]) outputs. Both are torch.utils.flop_counter's rules.
    w = _weight(op, 1)
    transposed = op.kind == "conv_transpose" or bool(op.attrs.get("transposed"))
    positions = math.prod(_input(op, 0, 2)) if transposed else numel(op.output_shape)
    return counted(op, s, macs=positions * math.prod(w[1:]), in_bits={1: s.w_bits, 2: s.float_bits})


# -- einsum ------------------------------------------------------------------------------


def _einsum_terms(equation: str, shapes: Sequence[Shape]) -> tuple[list[str], str, dict[str, int]]:
    """Parse an equation into operand index strings, the output string and index sizes.

    An ellipsis becomes fresh, right-aligned index letters; sizes of 1 broadcast.
    """
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise _ShapeUnknown(f"einsum {equation!r} does not fit {len(shapes)} operands")
    extra = [len(sh) - len(t) + 3 if "..." in t else 0 for t, sh in zip(terms, shapes, strict=True)]
    fresh = "".join(chr(0x3B1 + i) for i in range(max(extra)))  # Greek: unused by equations
    terms = [t.replace("...", fresh[len(fresh) - n :]) for t, n in zip(terms, extra, strict=True)]
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        if len(term) != len(shape):
            raise _ShapeUnknown(f"einsum term {term!r} does not fit shape {shape}")
        for index, size in zip(term, shape, strict=True):
            sizes[index] = max(sizes.get(index, 1), size)
    if arrow:
        out = rhs.replace("...", fresh)
    else:  # implicit output: ellipsis, then indices used once, alphabetically
        used = "".join(terms)
        out = fresh + "".join(sorted(c for c in set(used) - set(fresh) if used.count(c) == 1))
    return terms, out, sizes


def einsum_work(equation: str, shapes: Sequence[Shape]) -> tuple[int, int]:
    """(MACs, plain multiplies) of an einsum evaluated left to right, pairwise.

    Like torch.einsum (without opt_einsum), an index found in one operand only and not in
    the output is summed out first; each pairwise step then costs the product of the sizes
    of all indices it touches - MACs when it contracts an index, plain multiplies (a
    broadcast product, e.g. an outer product) when it does not.
    """
    terms, out, sizes = _einsum_terms(equation, shapes)
    sets = [set(t) for t in terms]
    for i, own in enumerate(sets):
        elsewhere = set(out).union(*(t for j, t in enumerate(sets) if j != i))
        sets[i] = own & elsewhere
    macs = mults = 0
    current = sets[0]
    for i in range(1, len(sets)):
        touched = current | sets[i]
        later = set(out).union(*sets[i + 1 :])
        work = math.prod(sizes[c] for c in touched)
        if touched - later:
            macs += work
        else:
            mults += work
        current = touched & later
    return macs, mults


@register_cost("einsum")
def _einsum(op: OpNode, s: CostSettings) -> Cost:
    equation = op.attrs.get("equation")
    if not isinstance(equation, str):
        raise _ShapeUnknown("einsum needs attrs['equation']")
    shapes = [_input(op, i) for i in range(len(op.input_shapes))]
    if len(shapes) == 1:  # a permutation, diagonal or reduction: one add per element read
        return counted(op, s, macs=0, flops=math.prod(shapes[0]), note="single-operand einsum")
    macs, mults = einsum_work(equation, shapes)
    note = f"{mults} broadcast multiplies counted as FLOPs" if mults else ""
    in_bits = dict.fromkeys(range(1, len(shapes)), s.w_bits)
    return counted(op, s, macs=macs, flops=2 * macs + mults, note=note, in_bits=in_bits)


# -- attention ---------------------------------------------------------------------------


def _causal_pairs(lq: int, lk: int) -> int:
    """Unmasked (query, key) pairs of torch's top-left aligned causal mask."""
    full = min(lq, lk)  # row i sees keys 0..i, capped at lk
    return full * (full + 1) // 2 + (lq - full) * lk


@register_cost("sdpa")
def _sdpa(op: OpNode, s: CostSettings) -> Cost:
    # q [..., Hq, Lq, D], k [..., Hkv, Lk, D], v [..., Hkv, Lk, Dv]. With GQA (Hkv < Hq)
    # every query head still does its own QK^T and PV, so q's leading dims set the count.
    q, k, v = _input(op, 0, 2), _input(op, 1, 2), _input(op, 2, 2)
    lq, lk = q[-2], k[-2]
    pairs = lq * lk
    note = "softmax and scaling not counted"
    if op.attrs.get("is_causal"):
        if s.causal_halving:
            pairs = _causal_pairs(lq, lk)
            note += "; causal: only unmasked score entries counted (about half)"
        else:
            note += "; causal mask not exploited: full Lq x Lk counted, as torch's counter"
    macs = math.prod(q[:-2]) * pairs * (q[-1] + v[-1])
    in_bits = {1: s.w_bits, 2: s.w_bits, 3: s.float_bits}  # K and V at w_bits; the mask
    return counted(op, s, macs=macs, note=note, in_bits=in_bits)


@register_cost("attention")
def _multihead(op: OpNode, s: CostSettings) -> Cost:
    # nn.MultiheadAttention: q/k/v projections, QK^T and PV over all heads, out projection
    q, k, v = _input(op, 0, 2), _input(op, 1, 2), _input(op, 2, 2)
    ps = op.param_shapes
    if "out_proj.weight" not in ps:
        raise _ShapeUnknown("nn.MultiheadAttention needs param_shapes['out_proj.weight']")
    embed = ps["out_proj.weight"][0]
    tokens_q, tokens_k, tokens_v = (math.prod(t[:-1]) for t in (q, k, v))
    if "in_proj_weight" in ps:  # packed [3E, E]
        macs = (tokens_q + tokens_k + tokens_v) * embed * ps["in_proj_weight"][1]
    else:
        sizes = [math.prod(ps.get(f"{r}_proj_weight", ())) for r in "qkv"]
        macs = tokens_q * sizes[0] + tokens_k * sizes[1] + tokens_v * sizes[2]
    seq_k = k[0] if len(k) == 2 or not op.attrs.get("batch_first") else k[1]
    macs += tokens_q * seq_k * embed * 2 + tokens_q * embed * embed
    return counted(op, s, macs=macs, note="softmax not counted")


# -- lookups and fused experts -----------------------------------------------------------


@register_cost("embedding")
def _embedding(op: OpNode, s: CostSettings) -> Cost:
    ids = dict.fromkeys(range(len(op.input_shapes)), INDEX_BITS)  # the only activation
    return counted(op, s, macs=0, note="gather: no arithmetic", in_bits=ids)


def _routed_macs(op: OpNode) -> tuple[int, str]:
    """Experts module call: tokens x top_k x per-expert matrix sizes of its 3-D weights."""
    per_token = sum(math.prod(sh[1:]) for sh in op.param_shapes.values() if len(sh) == 3)
    ids = op.input_shapes[1] if len(op.input_shapes) > 1 else None
    top_k = op.attrs.get("top_k") or (ids[-1] if ids else None)
    if not (op.input_shapes and op.input_shapes[0] and top_k and per_token):
        raise _ShapeUnknown("expert MACs need the hidden states, top_k and 3-D weight shapes")
    return math.prod(op.input_shapes[0][:-1]) * top_k * per_token, f"top_k={top_k}"


@register_cost("experts")
def _experts(op: OpNode, s: CostSettings) -> Cost:
    # Fused MoE weights [E, a, b]. A module call routes each token to top_k experts; a
    # function node multiplies its operands: grouped_mm x [T, K] by w [E, K, N] gives each
    # token one expert (T x K x N); bmm or matmul follow matmul semantics.
    try:
        if is_module_call(op):
            macs, note = _routed_macs(op)
        else:
            a, b = _input(op, 0, 1), _input(op, 1, 1)
            macs = a[0] * b[-2] * b[-1] if (len(a), len(b)) == (2, 3) else _matmul_macs(a, b)
            note = ""
    except _ShapeUnknown as why:  # the parameters still count
        return counted(op, s, macs=0, flops=0, note=f"{op.name}: {why}", status="unsupported")
    note = "; ".join(n for n in (note, "router, activation and weighting not counted") if n)
    in_bits = {1: INDEX_BITS if is_module_call(op) else s.w_bits}  # top_k_index / operand
    return counted(op, s, macs=macs, note=note, in_bits=in_bits)


# -- recurrent layers --------------------------------------------------------------------

_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _rnn_shape(op: OpNode) -> tuple[int, int, int, int]:
    """(hidden, proj, layers, directions) from attrs, else from nn.RNNBase parameter shapes."""
    a, ps = op.attrs, op.param_shapes
    hidden = a.get("hidden_size")
    if hidden is None and "weight_hh_l0" in ps:
        hidden = ps["weight_hh_l0"][0] // _GATES[op.kind]
    if hidden is None:
        raise _ShapeUnknown("an RNN needs attrs['hidden_size'] or param_shapes")
    proj = a.get("proj_size") or (ps["weight_hr_l0"][0] if "weight_hr_l0" in ps else 0)
    layers = a.get("num_layers") or sum(1 for r in ps if r.startswith("weight_ih_l")) or 1
    if not a.get("num_layers") and "weight_ih_l0_reverse" in ps:
        layers //= 2  # the count above included the reverse direction
    bidirectional = a.get("bidirectional", "weight_ih_l0_reverse" in ps)
    return hidden, proj, layers, 2 if bidirectional else 1


def _rnn(op: OpNode, s: CostSettings) -> Cost:
    # Per step, layer and direction: gates x H x (input + recurrent width) MACs, plus the
    # LSTM projection H x P. Gate nonlinearities and biases are not counted.
    x = _input(op, 0, 2)
    steps_batch = math.prod(x[:-1])  # (L, N), (N, L) or unbatched (L,): order is irrelevant
    hidden, proj, layers, dirs = _rnn_shape(op)
    state = proj or hidden
    macs, width = 0, x[-1]
    for _ in range(layers):
        per_step = _GATES[op.kind] * hidden * (width + state) + hidden * proj
        macs += steps_batch * dirs * per_step
        width = state * dirs
    return counted(op, s, macs=macs, note="gate nonlinearities not counted")


for _kind in _GATES:
    register_cost(_kind)(_rnn)


# -- per-element ops ---------------------------------------------------------------------


@register_cost("norm")
def _norm(op: OpNode, s: CostSettings) -> Cost:
    name = f"{op.target} {op.module_type}".lower()
    family = "rms" if "rms" in name else "batch" if "batch" in name else "default"
    per = NORM_FLOPS[family]
    if "weight" in op.params:
        per += 1 if family == "rms" else 2 if family == "default" else 0
    note = f"{per} FLOPs/element ({family} norm)"
    return counted(op, s, macs=0, flops=per * numel(op.output_shape), note=note)


@register_cost("softmax")
def _softmax(op: OpNode, s: CostSettings) -> Cost:
    flops = SOFTMAX_FLOPS * numel(op.output_shape)
    return counted(op, s, macs=0, flops=flops, note=f"{SOFTMAX_FLOPS} FLOPs/element")


#: dropout in eval mode (the analysis graph is captured in eval mode) returns its input
DROPOUTS = frozenset({"dropout", "native_dropout", "feature_dropout", "alpha_dropout"})


@register_cost("elementwise")
def _elementwise(op: OpNode, s: CostSettings) -> Cost:
    if op.call in DROPOUTS or (not op.call and "Dropout" in op.module_type):
        return Cost(status="ignored", note="dropout in eval mode returns its input", kernels=0)
    per = op.attrs.get("flops_per_element", 1)
    return counted(op, s, macs=0, flops=per * numel(op.output_shape), note=f"{per} FLOP/element")


@register_cost("quantize")
def _quantize(op: OpNode, s: CostSettings) -> Cost:
    # a fake-quantizer reads a float tensor: its input is at float width, not a_bits
    flops = QUANTIZE_FLOPS * numel(op.output_shape)
    note = f"{QUANTIZE_FLOPS} FLOPs/element (scale, round, clamp, rescale)"
    return counted(
        op, s, macs=0, flops=flops, note=note, in_bits={0: s.float_bits}, float_params=True
    )


@register_cost("pool")
@register_cost("reduce")
def _reduce(op: OpNode, s: CostSettings) -> Cost:
    # one compare or add per input element: exact for a sum, a max or non-overlapping
    # pooling windows; a lower bound for overlapping windows, sort and topk
    return counted(op, s, macs=0, flops=numel(_input(op, 0)), note="1 FLOP/input element")


@register_cost("create")
def _create(op: OpNode, s: CostSettings) -> Cost:
    return counted(op, s, macs=0, note="creates a tensor: no arithmetic, output bytes written")


#: "view"-kind calls that write a new tensor: they move bytes, unlike a reshape or a slice
COPIES = frozenset(
    {"cat", "concat", "concatenate", "stack", "pad", "constant_pad_nd", "repeat", "tile"}
    | {"repeat_interleave", "roll", "flip", "clone", "clone_", "contiguous", "copy_"}
    | {"scatter", "scatter_add", "index_put", "index_put_", "masked_select"}
)
#: copies that read only what they gather (plus their indices), not the whole source
GATHERS = frozenset({"index", "index_select", "gather", "masked_select"})


@register_cost("view")
def _view(op: OpNode, s: CostSettings) -> Cost:
    if op.call in GATHERS and op.output_shape is not None:
        out = numel(op.output_shape)
        index_bits = sum(numel(sh) for sh in op.input_shapes[1:] if sh) * INDEX_BITS
        return Cost(
            act_in_bytes=(out * s.a_bits + index_bits) / 8,
            act_out_bytes=out * s.out_bits / 8,
            note="gather: reads the elements it picks and the indices, writes them",
        )
    if op.call in COPIES and op.output_shape is not None:
        # contiguous() copies only a strided input (stefx cannot see strides: assumed so)
        c = counted(op, s, macs=0, flops=0, note="data movement: reads its inputs, writes a copy")
        return replace(c, params=0, param_bytes=0.0)
    note = "layout op (view, reshape, transpose, slice, cast): no arithmetic, no bytes moved"
    return Cost(status="ignored", note=note, kernels=0)


@register_cost("opaque")
def _opaque(op: OpNode, s: CostSettings) -> Cost:
    return unsupported(op, s, f"opaque module {op.module or op.target!r}: no formula looks inside")


@register_cost("other")
def _other(op: OpNode, s: CostSettings) -> Cost:
    return unsupported(op, s, f"no cost formula for {op.target!r}")
