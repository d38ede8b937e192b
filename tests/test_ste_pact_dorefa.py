"""Tests of ``pact`` (stefx/ste/pact.py) and ``dorefa`` (stefx/ste/dorefa.py).

References are written here with plain torch ops: PACT (arXiv:1805.06085) and DoReFa-Net
(arXiv:1606.06160).
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stefx.errors import RecipeError
from stefx.ste.dorefa import DoReFaQuantizer  # importing registers "dorefa"
from stefx.ste.pact import PACTQuantizer  # importing registers "pact"
from stefx.ste.spec import make_quantizer, parse_spec
from tests.ste_support import saved_during_forward, signature

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROPS = settings(max_examples=30, deadline=None)
# (type, extra spec) of every quantizer kind in this file
KINDS = (
    ("pact", {}),
    ("dorefa", {}),
    ("dorefa", {"num_bits": 1}),
    ("dorefa", {"role": "activation"}),
)
KIND_IDS = ("pact", "dorefa-w", "dorefa-w1", "dorefa-a")


def make(type_, **spec):
    return make_quantizer({"type": type_, **spec})


def run(q, x, upstream=None):
    x = x.detach().clone().requires_grad_(True)
    y = q(x)
    y.backward(torch.ones_like(y) if upstream is None else upstream)
    return y.detach(), x.grad


def dorefa_weight_reference(w, bits):
    """The DoReFa weight formula with autograd through tanh and max, STE on the round only."""
    w = w.detach().clone().requires_grad_(True)
    t = torch.tanh(w)
    r = t / (2 * t.abs().max()) + 0.5
    levels = 2**bits - 1
    q = r + (torch.round(r * levels) / levels - r).detach()
    return 2 * q - 1, w


# ---------------------------------------------------------------- spec


def test_registered_with_defaults():
    p, d = make("pact"), make("dorefa")
    assert isinstance(p, PACTQuantizer) and isinstance(d, DoReFaQuantizer)
    assert p.bits == 4 and p.alpha.item() == 10.0 and p.spec.scale == "learned"
    assert d.bits == 4 and d.role == "weight" and list(d.parameters()) == []


@pytest.mark.parametrize(
    ("type_", "spec", "key"),
    [
        ("pact", {"alpha_init": -1.0}, "alpha_init"),
        ("pact", {"alpha_init": 0}, "alpha_init"),
        ("pact", {"alpha_init": float("inf")}, "alpha_init"),
        ("pact", {"alpha_init": "big"}, "alpha_init"),
        ("pact", {"strategy": "channel"}, "strategy"),
        ("pact", {"num_bits": 16}, "num_bits"),
        ("dorefa", {"role": "bias"}, "role"),
        ("dorefa", {"role": 1}, "role"),
        ("dorefa", {"num_bits": 9}, "num_bits"),
        ("dorefa", {"strategy": "channel"}, "strategy"),
        ("dorefa", {"alpha_init": 1.0}, "alpha_init"),
    ],
)
def test_bad_options_raise_recipe_error(type_, spec, key):
    with pytest.raises(RecipeError, match=key):
        parse_spec({"type": type_, **spec})


# ---------------------------------------------------------------- PACT


@pytest.mark.parametrize(
    ("bits", "alpha", "x", "expected"),
    [
        # step α / (2^k - 1) = 1: clamp to [0, 3] then round
        (2, 3.0, [-1.0, 0.0, 0.4, 1.6, 2.7, 3.0, 7.0], [0.0, 0.0, 0.0, 2.0, 3.0, 3.0, 3.0]),
        # step 0.5
        (3, 3.5, [-0.2, 0.2, 0.3, 1.1, 3.4, 9.0], [0.0, 0.0, 0.5, 1.0, 3.5, 3.5]),
        # one bit: levels {0, α}
        (1, 2.0, [-1.0, 0.9, 1.1, 5.0], [0.0, 0.0, 2.0, 2.0]),
    ],
)
def test_pact_forward_levels(bits, alpha, x, expected):
    q = make("pact", num_bits=bits, alpha_init=alpha)
    assert q(torch.tensor(x)).tolist() == expected


@pytest.mark.parametrize("bits", [2, 4])
def test_pact_backward_matches_paper(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(50, generator=gen) * 2 + 1
    x[:3] = torch.tensor([0.0, 1.5, -0.0])  # exactly at 0 and at α
    upstream = torch.randn(50, generator=gen)
    q = make("pact", num_bits=bits, alpha_init=1.5)
    _, gx = run(q, x, upstream)
    assert torch.equal(gx, upstream * ((x >= 0) & (x < 1.5)))
    assert gx[0] == upstream[0] and gx[1] == 0
    expected_alpha = (upstream * (x >= 1.5)).sum()
    torch.testing.assert_close(q.alpha.grad, expected_alpha, rtol=1e-6, atol=1e-6)
    assert q.alpha.grad.shape == q.alpha.shape == ()


def test_pact_alpha_trains_and_round_trips():
    q = make("pact", alpha_init=2.0)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q(torch.tensor([3.0, 4.0, 1.0])).sum().backward()
    opt.step()
    assert q.alpha.item() == pytest.approx(2.0 - 0.1 * 2)
    q2 = make("pact")
    q2.load_state_dict(q.state_dict())
    assert q2.alpha.item() == q.alpha.item()


# ---------------------------------------------------------------- DoReFa weights


def test_dorefa_weight_forward_hand_computed():
    # tanh(w) / max|tanh(w)| = [-0.79, -0.10, 0.30, 1], r = [0.105, 0.448, 0.651, 1]
    # 3 r = [0.32, 1.34, 1.95, 3] -> [0, 1, 2, 3] -> 2 q - 1 = [-1, -1/3, 1/3, 1]
    y = make("dorefa", num_bits=2)(torch.tensor([-1.0, -0.1, 0.3, 2.0]))
    torch.testing.assert_close(y, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weight_forward_and_backward_match_formula(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 9, generator=gen) * 0.7
    upstream = torch.randn(6, 9, generator=gen)
    y, gw = run(make("dorefa", num_bits=bits), w, upstream)
    ref, wr = dorefa_weight_reference(w, bits)
    ref.backward(upstream)
    assert torch.equal(y, ref.detach())
    levels = torch.arange(2**bits) * 2 / (2**bits - 1) - 1
    assert (y.unsqueeze(-1) - levels).abs().amin(-1).max() < 1e-6  # every value is a level
    torch.testing.assert_close(gw, wr.grad, rtol=1e-5, atol=1e-6)


def test_dorefa_weight_backward_splits_tied_max():
    w = torch.tensor([2.0, -0.5, -2.0, 0.3])
    upstream = torch.tensor([0.5, -1.0, 2.0, 0.25])
    _, gw = run(make("dorefa", num_bits=3), w, upstream)
    ref, wr = dorefa_weight_reference(w, 3)
    ref.backward(upstream)
    torch.testing.assert_close(gw, wr.grad, rtol=1e-5, atol=1e-6)


def test_dorefa_one_bit_weights():
    w = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])
    upstream = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    y, gw = run(make("dorefa", num_bits=1), w, upstream)
    e = 0.75  # mean |w| over the whole tensor
    assert y.tolist() == [[-e, e], [e, -e]]  # sign(0) = +1: two levels
    assert torch.equal(gw, upstream)  # identity STE, nothing through E


def test_dorefa_all_zero_weight_is_zero_with_identity_gradient():
    for bits in (1, 2, 5):
        upstream = torch.arange(6.0).reshape(2, 3)
        y, gw = run(make("dorefa", num_bits=bits), torch.zeros(2, 3), upstream)
        assert torch.equal(y, torch.zeros(2, 3))
        assert torch.equal(gw, upstream)


# ---------------------------------------------------------------- DoReFa activations


def test_dorefa_activation_forward_and_mask():
    x = torch.tensor([-0.1, 0.0, 0.3, 0.5, 1.0, 1.2])
    y, gx = run(make("dorefa", num_bits=2, role="activation"), x)
    expected = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 3.0]) / 3  # round(3x) / 3, 1.5 -> 2
    assert torch.equal(y, expected)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # 1{0 <= x <= 1}, both ends in


def test_dorefa_activation_one_bit():
    y = make("dorefa", num_bits=1, role="activation")(torch.tensor([-1.0, 0.4, 0.6, 2.0]))
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]


# ---------------------------------------------------------------- properties (all kinds)


def _arrays(elements, min_dims=2):
    shapes = hnp.array_shapes(min_dims=min_dims, max_dims=2, min_side=1, max_side=8)
    return hnp.arrays(np.float32, shapes, elements=elements)


GRID = st.integers(-512, 512).map(lambda i: i / 64)


@PROPS
@given(x=_arrays(GRID), kind=st.sampled_from(KINDS), bits=st.integers(1, 8))
def test_at_most_2_pow_b_levels(x, kind, bits):
    type_, spec = kind
    q = make(type_, **{**spec, "num_bits": spec.get("num_bits", bits)})
    assert q(torch.from_numpy(x)).unique().numel() <= 2**q.bits


@PROPS
@given(x=_arrays(GRID), kind=st.sampled_from(KINDS[:1] + KINDS[2:]), bits=st.integers(1, 8))
def test_idempotent(x, kind, bits):
    # DoReFa k >= 2 weights are not idempotent by design: tanh of a level is not that level.
    # 1-bit weights recompute E = mean|w| each call: equal up to the float32 sum's rounding.
    type_, spec = kind
    q = make(type_, **{**spec, "num_bits": spec.get("num_bits", bits)})
    y = q(torch.from_numpy(x))
    if q.bits == 1 and type_ == "dorefa" and q.role == "weight":
        torch.testing.assert_close(q(y), y, rtol=1e-6, atol=0)
    else:
        assert torch.equal(q(y), y)


@PROPS
@given(x=_arrays(GRID), kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES))
def test_dtype_is_kept(x, kind, dtype):
    type_, spec = kind
    q = make(type_, **spec)
    xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
    y = q(xt)
    y.sum().backward()
    assert y.dtype == dtype and xt.grad.dtype == dtype
    assert all(p.dtype == torch.float32 for p in q.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("type_", "spec"), KINDS, ids=KIND_IDS)
def test_all_zero_input_gives_zeros(dtype, type_, spec):
    q = make(type_, **spec)
    x = torch.zeros(3, 5, dtype=dtype, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y)) and y.dtype == dtype
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in q.parameters())


@PROPS
@given(
    x=_arrays(st.floats(allow_nan=True, allow_infinity=True, width=32), min_dims=1),
    kind=st.sampled_from(KINDS),
)
def test_nan_and_inf_do_not_raise(x, kind):
    type_, spec = kind
    xt = torch.from_numpy(x).requires_grad_(True)
    y = make(type_, **spec)(xt)
    y.sum().backward()
    assert y.shape == xt.shape


@pytest.mark.parametrize(("type_", "spec"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_saves_only_input_parameters_or_a_mask(type_, spec, dtype):
    q = make(type_, **spec)
    x = torch.randn(8, 32, dtype=dtype).requires_grad_(True)
    y, tensors = saved_during_forward(q, x)
    saved = [signature(t) for t in tensors]
    allowed = {signature(x)} | {signature(p) for p in q.parameters()}
    assert all(s in allowed for s in saved if s[0].is_floating_point), saved
    masks = [s for s in saved if not s[0].is_floating_point]
    assert all(s[0] == torch.bool for s in masks) and len(masks) <= 1
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(("type_", "spec"), KINDS, ids=KIND_IDS)
def test_strength_and_enabled(type_, spec):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(9)) * 3
    q = make(
        type_,
        num_bits=spec.get("num_bits", 2),
        **{k: v for k, v in spec.items() if k != "num_bits"},
    )
    full = q(x).detach()
    assert not torch.equal(full, x)
    q.strength = 0.5
    assert torch.equal(q(x), x + 0.5 * (full - x))
    assert make(type_, enabled=False, **spec)(x) is x


@pytest.mark.parametrize(("type_", "spec"), KINDS, ids=KIND_IDS)
def test_meta_device(type_, spec):
    x = torch.empty(3, 5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = make(type_, **spec)(x)
    assert y.is_meta and y.shape == (3, 5) and y.dtype == torch.bfloat16
    y.sum().backward()
