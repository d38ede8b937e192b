"""Cost formulas: hand-worked arithmetic, and equality with torch's FlopCounterMode on meta."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from stefx.capture.graph import OpNode
from stefx.errors import RecipeError, StefxError
from stefx.profile import costs
from stefx.profile.costs import Cost, cost_formula, cost_of, dtype_bits, register_cost

META = torch.device("meta")
FAST = settings(max_examples=25, deadline=None)


def node(kind, inputs, out, *, params=None, attrs=None, module=None, target=None):
    """An OpNode built from shapes, as capture produces it.

    ``params`` maps role -> shape; ``module`` (a class name) makes it a module-call node,
    whose target is the class and whose inputs hold only activations.
    """
    params = dict(params or {})
    return OpNode(
        name=f"{kind}_0",
        kind=kind,
        target=module or target or f"aten.{kind}.default",
        module="m" if module else "",
        module_type=module or "Model",
        params={role: f"m.{role}" for role in params},
        input_shapes=tuple(None if s is None else tuple(s) for s in inputs),
        output_shape=None if out is None else tuple(out),
        attrs=dict(attrs or {}),
        param_shapes={role: tuple(shape) for role, shape in params.items()},
    )


def torch_flops(fn, *tensors):
    """(FLOPs torch counts, output shape) for fn on meta tensors of the given shapes."""
    args = [torch.empty(s, device=META) for s in tensors]
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    return counter.get_total_flops(), tuple(out.shape)


# -- hand-worked arithmetic --------------------------------------------------------------


def test_linear_module_call_closed_form():
    # Linear 4 -> 5 on a [3, 4] input: 3 x 4 x 5 = 60 MACs
    op = node("linear", [(3, 4)], (3, 5), params={"weight": (5, 4), "bias": (5,)}, module="Linear")
    c = cost_of(op, w_bits=4, a_bits=8, scale_groups=5, scale_overhead_bits=16)
    assert (c.macs, c.flops, c.bops) == (60, 120, 60 * 4 * 8)
    assert c.params == 25
    assert c.param_bytes == 20 * 4 / 8 + 5 * 32 / 8 + 5 * 16 / 8  # weight, fp32 bias, scales
    assert c.act_in_bytes == 12 * 8 / 8 and c.act_out_bytes == 15 * 32 / 8
    assert c.status == "counted" and c.bytes_moved == c.param_bytes + 12 + 60


def test_linear_function_node_unquantized_uses_float_bits():
    params = {"weight": (5, 4), "bias": (5,)}
    c = cost_of(node("linear", [(2, 3, 4), (5, 4), (5,)], (2, 3, 5), params=params), float_bits=16)
    assert c.macs == 6 * 4 * 5 and c.bops == 120 * 16 * 16
    assert c.params == 25 and c.param_bytes == 25 * 2
    assert c.act_in_bytes == 24 * 2  # the weight/bias arguments are parameters, not activations


def test_linear_without_weight_shape_infers_it():
    assert cost_of(node("linear", [(7, 4)], (7, 3))).macs == 7 * 4 * 3


def test_transposed_parameter_operand_is_not_an_activation():
    # y = x @ w.t(): capture reports matmul((2, 5, 8), (8, 6)) reading weight (6, 8)
    op = node("matmul", [(2, 5, 8), (8, 6)], (2, 5, 6), params={"weight": (6, 8)})
    c = cost_of(op, w_bits=4, a_bits=8)
    assert c.macs == 10 * 8 * 6 and c.param_bytes == 48 / 2 and c.act_in_bytes == 80


def test_addmm_hf_conv1d_weight_is_in_by_out():
    # GPT-2 Conv1D: bias [N], x [M, K], weight [K, N]; 6 x 8 x 24 MACs
    params = {"weight": (8, 24), "bias": (24,)}
    aten = node("addmm", [(24,), (6, 8), (8, 24)], (6, 24), params=params)
    module = node("addmm", [(2, 3, 8)], (2, 3, 24), params=params, module="Conv1D")
    for op in (aten, module):
        c = cost_of(op, w_bits=2)
        assert c.macs == 6 * 8 * 24 and c.params == 8 * 24 + 24
        assert c.param_bytes == 8 * 24 * 2 / 8 + 24 * 4 and c.act_in_bytes == 48 * 4


def test_conv_groups_closed_form():
    # Conv2d(4 -> 6, k=3, groups=2, padding=1) on [1, 4, 8, 8]: 384 outputs x 2 x 9
    op = node("conv", [(1, 4, 8, 8), (6, 2, 3, 3)], (1, 6, 8, 8), params={"weight": (6, 2, 3, 3)})
    c = cost_of(op)
    assert c.macs == 384 * 2 * 9 and c.params == 108


def test_conv_transpose_closed_form():
    # ConvTranspose1d(4 -> 6, k=3, stride=2, groups=2): weight [4, 3, 3]; 1*4*5 inputs x 3 x 3
    shapes, w = [(1, 4, 5)], {"weight": (4, 3, 3)}
    module = node("conv_transpose", shapes, (1, 6, 11), params=w, module="ConvTranspose1d")
    flagged = node("conv", [*shapes, (4, 3, 3)], (1, 6, 11), params=w, attrs={"transposed": True})
    assert cost_of(module).macs == cost_of(flagged).macs == 20 * 9


def test_matmul_family_closed_forms():
    assert cost_of(node("mm", [(3, 4), (4, 5)], (3, 5))).macs == 60
    assert cost_of(node("bmm", [(2, 3, 4), (2, 4, 5)], (2, 3, 5))).macs == 120
    assert cost_of(node("baddbmm", [(2, 3, 5), (2, 3, 4), (2, 4, 5)], (2, 3, 5))).macs == 120
    assert cost_of(node("matmul", [(5, 1, 3, 4), (6, 4, 2)], (5, 6, 3, 2))).macs == 30 * 3 * 4 * 2
    assert cost_of(node("matmul", [(4,), (4,)], ())).macs == 4  # dot
    assert cost_of(node("matmul", [(2, 3, 4), (4,)], (2, 3))).macs == 24  # batched mat-vec


def test_activation_matmul_second_operand_takes_w_bits():
    c = cost_of(node("bmm", [(2, 3, 4), (2, 4, 5)], (2, 3, 5)), w_bits=4, a_bits=8, out_bits=16)
    assert c.bops == 120 * 4 * 8 and c.params == 0
    assert c.act_in_bytes == 24 * 8 / 8 + 40 * 4 / 8 and c.act_out_bytes == 30 * 2


@pytest.mark.parametrize(
    ("equation", "shapes", "macs", "mults"),
    [
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], 120, 0),
        ("ij,jk", [(3, 4), (4, 5)], 60, 0),  # implicit output "ik"
        ("...ij,...jk->...ik", [(7, 2, 3, 4), (2, 4, 5)], 7 * 2 * 3 * 4 * 5, 0),
        ("ij,jk->", [(3, 4), (4, 5)], 4, 0),  # i and k summed out first, then a dot over j
        ("i,j->ij", [(3,), (4,)], 0, 12),  # outer product: multiplies, nothing accumulated
        ("bi,bj,bk->ijk", [(2, 3), (2, 4), (2, 5)], 120, 24),
    ],
)
def test_einsum_closed_forms(equation, shapes, macs, mults):
    c = cost_of(node("einsum", shapes, None, attrs={"equation": equation}))
    assert (c.macs, c.flops) == (macs, 2 * macs + mults)


def test_sdpa_gqa_and_causal_halving():
    # q [2, 8, 16, 64], k [2, 2, 32, 64], v [2, 2, 32, 48]: 16 query heads-batches x 16 x 32
    shapes = [(2, 8, 16, 64), (2, 2, 32, 64), (2, 2, 32, 48)]
    c = cost_of(node("sdpa", shapes, (2, 8, 16, 48)), w_bits=4, a_bits=8)
    assert c.macs == 16 * 16 * 32 * (64 + 48) and c.bops == c.macs * 32
    assert c.act_in_bytes == 2 * 8 * 16 * 64 + (2 * 2 * 32 * 64 + 2 * 2 * 32 * 48) / 2
    causal = node("sdpa", [(1, 1, 4, 8)] * 3, (1, 1, 4, 8), attrs={"is_causal": True})
    assert cost_of(causal).macs == 16 * 16  # not exploited by default: full 4 x 4
    halved = cost_of(causal, causal_halving=True)
    assert halved.macs == 10 * 16 and "causal" in halved.note  # 1 + 2 + 3 + 4 entries


def test_embedding_is_a_gather_with_params():
    w = {"weight": (100, 16)}
    c = cost_of(node("embedding", [(100, 16), (2, 7)], (2, 7, 16), params=w), w_bits=4)
    assert (c.macs, c.flops, c.params, c.param_bytes) == (0, 0, 1600, 800)
    assert c.act_in_bytes == 14 * 8  # int64 ids
    module = node("embedding", [(2, 7)], (2, 7, 16), params=w, module="Embedding")
    assert cost_of(module, w_bits=4) == c


def test_experts_module_call_and_grouped_mm():
    # Mixtral-like: 4 experts, hidden 8, intermediate 6; 5 tokens routed to 2 experts each
    shapes = {"gate_up_proj": (4, 12, 8), "down_proj": (4, 8, 6)}
    op = node("experts", [(5, 8), (5, 2), (5, 2)], (5, 8), params=shapes, module="MixtralExperts")
    c = cost_of(op, w_bits=4)
    assert c.macs == 5 * 2 * (12 * 8 + 8 * 6) and c.params == 4 * (96 + 48)
    assert c.param_bytes == c.params / 2
    no_routing = node("experts", [(5, 8)], (5, 8), params=shapes, module="MixtralExperts")
    partial = cost_of(no_routing)
    assert partial.status == "unsupported" and partial.params == c.params and partial.macs == 0
    # grouped_mm(x [T, K], w [E, K, N]): each token through one expert
    grouped = node("experts", [(5, 8), (4, 8, 12)], (5, 12), params={"weight": (4, 8, 12)})
    assert cost_of(grouped).macs == 5 * 8 * 12


@pytest.mark.parametrize(
    ("kind", "module", "params", "per_element"),
    [
        ("norm", None, {}, 5),  # aten.norm.default: layer norm without affine
        ("norm", "LayerNorm", {"weight": (4,), "bias": (4,)}, 7),
        ("norm", "LlamaRMSNorm", {"weight": (4,)}, 4),
        ("norm", "BatchNorm2d", {"weight": (3,), "bias": (3,)}, 2),
        ("softmax", None, {}, 5),
        ("elementwise", None, {}, 1),
        ("quantize", "IntQuantizer", {}, 4),
        ("reduce", None, {}, 1),
        ("pool", "MaxPool2d", {}, 1),
        ("create", None, {}, 0),
    ],
)
def test_per_element_flops(kind, module, params, per_element):
    c = cost_of(node(kind, [(2, 3, 4)], (2, 3, 4), params=params, module=module))
    assert (c.flops, c.macs, c.status) == (per_element * 24, 0, "counted")


def test_reduce_counts_input_elements_and_quantizer_scale_stays_float():
    assert cost_of(node("reduce", [(6, 7)], ())).flops == 42
    assert cost_of(node("elementwise", [(10,)], (10,), attrs={"flops_per_element": 8})).flops == 80
    q = node("quantize", [(4, 4)], (4, 4), params={"scale": (4, 1)}, module="IntQuantizer")
    c = cost_of(q, w_bits=4, a_bits=4)
    assert c.param_bytes == 4 * 4 and c.act_in_bytes == 16 * 4  # fp32 scale and input


def test_rnn_gate_formula_from_attrs_and_param_shapes():
    # LSTM(4 -> 5), seq 3, batch 2: 4 gates x 5 x (4 + 5) per step and batch element
    op = node("lstm", [(3, 2, 4)], (3, 2, 5), attrs={"hidden_size": 5})
    assert cost_of(op).macs == 6 * 4 * 5 * 9
    lstm = torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True)
    shapes = {n: tuple(p.shape) for n, p in lstm.named_parameters()}
    c = cost_of(node("lstm", [(3, 2, 4)], (3, 2, 10), params=shapes, module="LSTM"), w_bits=8)
    assert c.macs == 6 * 2 * (4 * 5 * 9 + 4 * 5 * 15)
    biases = sum(math.prod(s) for n, s in shapes.items() if n.startswith("bias"))
    assert c.params == sum(p.numel() for p in lstm.parameters())
    assert c.param_bytes == (c.params - biases) + biases * 4


def test_view_ignored_and_unknowns_unsupported():
    view = cost_of(node("view", [(2, 3)], (6,)))
    assert view == Cost(status="ignored", note=view.note, kernels=0) and view.note
    opaque = cost_of(node("opaque", [(2, 3)], (2, 5), params={"weight": (5, 3)}, module="Odd"))
    assert opaque.status == "unsupported" and opaque.params == 15 and opaque.flops == 0
    assert opaque.act_in_bytes == 6 * 4
    assert cost_of(node("other", [(2,)], (2,))).status == "unsupported"
    typo = cost_of(node("lineer", [(2, 3)], (2, 5)))
    assert typo.status == "unsupported" and "did you mean 'linear'" in typo.note
    missing = cost_of(node("conv", [(1, 3, 8, 8)], None))
    assert missing.status == "unsupported" and "conv_0" in missing.note


def test_registry_rejects_duplicates_and_suggests():
    with pytest.raises(ValueError, match="already registered"):
        register_cost("linear")(lambda op, s: Cost())
    with pytest.raises(RecipeError, match="did you mean 'einsum'"):
        cost_formula("einsun")
    with pytest.raises(StefxError):
        cost_of(node("mm", [(1, 1), (1, 1)], (1, 1)), w_bits=0)


def test_custom_formula_registration():
    @register_cost("stefx_test_double")
    def _double(op, s):
        return Cost(flops=2 * math.prod(op.output_shape))

    try:
        assert cost_of(node("stefx_test_double", [(3,)], (3,))).flops == 6
    finally:
        costs._FORMULAS.remove("stefx_test_double")


def test_dtype_bits():
    names = ("torch.bfloat16", "torch.float8_e4m3fn", "torch.half", "torch.int64")
    assert [dtype_bits(d) for d in names] == [16, 8, 16, 64]


# -- equality with torch.utils.flop_counter on meta tensors ------------------------------


def assert_matches(kind, fn, *shapes, attrs=None, weight_at=None):
    expected, out = torch_flops(fn, *shapes)
    params = {} if weight_at is None else {"weight": shapes[weight_at]}
    c = cost_of(node(kind, shapes, out, params=params, attrs=attrs))
    assert c.status == "counted" and c.flops == expected, (kind, shapes, c, expected)


dim = st.integers(1, 6)


@FAST
@given(st.lists(dim, min_size=1, max_size=3), dim, dim)
def test_linear_matches_torch(lead, k, n):
    assert_matches("linear", F.linear, (*lead, k), (n, k), weight_at=1)


@FAST
@given(dim, dim, dim)
def test_mm_addmm_match_torch(m, k, n):
    assert_matches("mm", torch.mm, (m, k), (k, n))
    assert_matches("addmm", torch.addmm, (n,), (m, k), (k, n), weight_at=2)


@FAST
@given(dim, dim, dim, dim)
def test_bmm_baddbmm_match_torch(b, m, k, n):
    assert_matches("bmm", torch.bmm, (b, m, k), (b, k, n))
    assert_matches("baddbmm", torch.baddbmm, (b, m, n), (b, m, k), (b, k, n))


@FAST
@given(
    st.lists(st.sampled_from([1, 3]), max_size=2),
    st.lists(st.sampled_from([1, 3]), max_size=2),
    dim,
    dim,
    dim,
)
def test_broadcast_matmul_matches_torch(batch_a, batch_b, m, k, n):
    # torch counts 0 for 1-D operands (aten.mv / aten.dot have no formula there); stefx
    # counts them - see test_matmul_family_closed_forms
    assert_matches("matmul", torch.matmul, (*batch_a, m, k), (*batch_b, k, n))


@pytest.mark.parametrize(
    ("equation", "shapes"),
    [
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
        ("bhqd,bhkd->bhqk", [(2, 3, 4, 8), (2, 3, 5, 8)]),
        ("ij,jk", [(3, 4), (4, 5)]),
        ("...ij,...jk->...ik", [(7, 2, 3, 4), (2, 4, 5)]),
        ("ij,jk->", [(3, 4), (4, 5)]),
        ("bi,bj,bk->ijk", [(2, 3), (2, 4), (2, 5)]),
        ("abc,cd,de->abe", [(2, 3, 4), (4, 5), (5, 6)]),
    ],
)
def test_einsum_macs_match_torch(equation, shapes):
    expected, out = torch_flops(lambda *t: torch.einsum(equation, *t), *shapes)
    assert cost_of(node("einsum", shapes, out, attrs={"equation": equation})).macs * 2 == expected


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@FAST
@given(
    st.sampled_from([1, 2, 3]),
    st.integers(1, 2),
    st.sampled_from([1, 2]),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(0, 1),
    st.integers(1, 2),
    st.integers(5, 8),
)
def test_conv_matches_torch(nd, batch, groups, per_group, stride, padding, dilation, size):
    c_in, c_out, k = groups * per_group, groups * 2, 2
    x, w = (batch, c_in, *(size,) * nd), (c_out, per_group, *(k,) * nd)

    def conv(x, w):
        return CONV[nd](x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)

    assert_matches("conv", conv, x, w, weight_at=1)


@FAST
@given(
    st.sampled_from([1, 2, 3]),
    st.sampled_from([1, 2]),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(2, 5),
)
def test_conv_transpose_matches_torch(nd, groups, per_group, stride, size):
    c_in, k = groups * 2, 3
    x, w = (1, c_in, *(size,) * nd), (c_in, per_group, *(k,) * nd)

    def conv_t(x, w):
        return CONV_T[nd](x, w, stride=stride, groups=groups, output_padding=stride - 1)

    assert_matches("conv_transpose", conv_t, x, w, weight_at=1)


@FAST
@given(dim, st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 2)]), dim, dim, st.sampled_from([4, 8]))
def test_sdpa_matches_torch_math_path(b, heads, lq, lk, d):
    # On CPU and meta, FlopCounterMode sees SDPA's math decomposition (two bmm), which it
    # counts; causal masking is not exploited there, so compare with causal_halving off.
    hq, hkv = heads
    q, k, v = (b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d + 2)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    assert_matches("sdpa", fn, q, k, v)


RNN_CASES = [(k, 1, False, 0) for k in ("lstm", "gru", "rnn")]
RNN_CASES += [(k, 2, True, 0) for k in ("lstm", "gru", "rnn")] + [("lstm", 1, False, 3)]


@pytest.mark.parametrize(("kind", "layers", "bidirectional", "proj"), RNN_CASES)
def test_rnn_matches_torch_on_meta(kind, layers, bidirectional, proj):
    # On real CPU tensors the fused LSTM kernel is invisible to FlopCounterMode (it reports
    # 0); on meta the op decomposes into per-step addmm/mm, which it counts.
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
    extra = {"proj_size": proj} if proj else {}
    module = cls(4, 5, num_layers=layers, bidirectional=bidirectional, device=META, **extra)
    expected, out = torch_flops(module, (3, 2, 4))
    attrs = {"hidden_size": 5, "num_layers": layers, "bidirectional": bidirectional, **extra}
    assert cost_of(node(kind, [(3, 2, 4)], out, attrs=attrs)).flops == expected


@pytest.mark.parametrize(
    ("options", "query", "key"),
    [
        ({}, (5, 2, 16), (7, 2, 16)),
        ({"batch_first": True}, (2, 5, 16), (2, 7, 16)),
        ({"kdim": 6, "vdim": 10}, (5, 2, 16), (7, 2, 6)),
        ({}, (5, 16), (7, 16)),  # unbatched
    ],
)
def test_multihead_attention_matches_torch_on_meta(options, query, key):
    module = torch.nn.MultiheadAttention(16, 4, device=META, **options)
    value = (*key[:-1], options.get("vdim", key[-1]))
    expected, out = torch_flops(lambda q, k, v: module(q, k, v)[0], query, key, value)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    attrs = {"num_heads": 4, "batch_first": options.get("batch_first", False)}
    op = node("attention", [query, key, value], out, params=shapes, attrs=attrs, module="MHA")
    assert cost_of(op).flops == expected
