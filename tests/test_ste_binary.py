"""Tests of the ``binary`` quantizer and its sign estimators (stefx/ste/binary.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stefx
from stefx.ste import binary  # noqa: F401  (registers "binary")
from stefx.ste.binary import (
    SIGN_ESTIMATORS,
    BinaryQuantizer,
    SignEstimator,
    ede_params,
    register_sign_estimator,
)
from tests.ste_support import grad_of, matrices, saved_during_forward, special

ESTIMATORS = ("clipped", "identity", "approx_sign", "swish_sign", "ede")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make(**spec):
    return stefx.make_quantizer({"type": "binary", **spec})


# ---------------------------------------------------------------- spec and registry


def test_registered_with_defaults():
    q = make()
    assert isinstance(q, BinaryQuantizer)
    assert q.bits == 1
    assert (q.spec.scale, q.spec.estimator, q.spec.strategy) == ("none", "clipped", "tensor")
    assert set(ESTIMATORS) <= set(SIGN_ESTIMATORS.names())
    assert set(BinaryQuantizer.estimators) == set(SIGN_ESTIMATORS.names())


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1}, "beta"),
        ({"beta": "big"}, "beta"),
        ({"t_min": 0.0}, "t_min"),
        ({"t_min": 1.0, "t_max": 0.5}, "t_max"),
        ({"t_max": math.inf}, "t_max"),
        ({"estimator": "clippd"}, "estimator"),
        ({"scale": "twn"}, "scale"),
        ({"num_bits": 2}, "num_bits"),
        ({"strategy": "group", "group_size": 4}, "strategy"),
        ({"strength": 1.5}, "strength"),
    ],
)
def test_bad_options_name_the_key(spec, key):
    with pytest.raises(stefx.RecipeError, match=key):
        make(**spec)


def test_bad_estimator_suggests_the_nearest_name():
    with pytest.raises(stefx.RecipeError, match="did you mean 'clipped'"):
        make(estimator="clippd")


def test_progress_is_validated():
    q = make(estimator="ede")
    q.progress = 1.0
    assert q.progress == 1.0
    with pytest.raises(stefx.RecipeError, match="progress"):
        q.progress = 1.5


def test_register_sign_estimator_makes_it_a_valid_spec_value():
    est = SignEstimator(lambda x, p: torch.full_like(x, 3.0))
    try:
        register_sign_estimator("triple", est)
        _, g = grad_of(make(estimator="triple"), torch.tensor([0.5, -4.0]))
        assert g.tolist() == [3.0, 3.0]
        with pytest.raises(ValueError, match="already registered"):
            register_sign_estimator("triple", est)
    finally:
        SIGN_ESTIMATORS.remove("triple")
        BinaryQuantizer.estimators = tuple(e for e in BinaryQuantizer.estimators if e != "triple")


# ---------------------------------------------------------------- forward, closed form


def test_sign_of_zero_is_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0])
    assert make()(x).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]


def test_xnor_absmean_per_channel():
    w = torch.tensor([[1.0, -2.0, 3.0, -2.0], [-0.5, 0.5, 0.0, 1.0]])
    y = make(scale="absmean", strategy="channel")(w)
    # α = mean|W| per row: 8/4 = 2 and 2/4 = 0.5.
    expected = torch.tensor([[2.0, -2.0, 2.0, -2.0], [-0.5, 0.5, 0.5, 0.5]])
    assert torch.equal(y, expected)


def test_xnor_absmean_per_tensor():
    w = torch.tensor([[1.0, -2.0, 3.0, -2.0], [-0.5, 0.5, 0.0, 1.0]])
    y = make(scale="absmean")(w)
    assert torch.equal(y, 1.25 * torch.tensor([[1.0, -1, 1, -1], [-1, 1, 1, 1]]))


def test_channel_axis_0_of_a_conv_weight():
    w = torch.tensor([1.0, -3.0, 2.0, 2.0, -0.25, 0.25, 0.25, -0.25]).reshape(2, 1, 2, 2)
    y = make(scale="absmean", strategy="channel")(w)
    expected = torch.tensor([2.0, -2.0, 2.0, 2.0, -0.25, 0.25, 0.25, -0.25]).reshape(2, 1, 2, 2)
    assert torch.equal(y, expected)


def test_scale_none_ignores_the_strategy():
    w = torch.randn(3, 5)
    assert torch.equal(make(strategy="channel")(w), make()(w))


# ---------------------------------------------------------------- backward, per estimator


X = torch.cat([torch.linspace(-2.0, 2.0, 41), torch.tensor([-1.0, 1.0, 0.0, 0.999, 1.001])])


def _upstream(n):
    return torch.linspace(0.5, 1.5, n, dtype=torch.float64).float()


def _swish_derivative(x, beta):
    bx = beta * x
    return beta * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx))


def _ede_derivative(x, progress, t_min=0.1, t_max=10.0):
    t = t_min * 10.0 ** (progress * math.log10(t_max / t_min))
    k = max(1.0 / t, 1.0)
    return k * t * (1.0 - torch.tanh(t * x) ** 2)


REFERENCE = {
    "clipped": lambda x: (x.abs() <= 1.0).double(),
    "identity": lambda x: torch.ones_like(x),
    "approx_sign": lambda x: (2.0 - 2.0 * x.abs()) * (x.abs() <= 1.0),
    "swish_sign": lambda x: _swish_derivative(x, 5.0),
    "ede": lambda x: _ede_derivative(x, 0.0),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_backward_matches_its_formula(name):
    g_up = _upstream(X.numel())
    y, g = grad_of(make(estimator=name), X, g_up)
    assert torch.equal(y, torch.where(X >= 0, 1.0, -1.0))
    expected = (g_up.double() * REFERENCE[name](X.double())).float()
    if name in ("clipped", "identity"):
        assert torch.equal(g, expected)
    else:
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


def test_clipped_boundary_is_inclusive():
    _, g = grad_of(make(), torch.tensor([-1.0, 1.0, -1.0000001, 1.0000001]))
    assert g.tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("beta", [5.0, 2.0, 0.5])
def test_swish_sign_is_the_derivative_of_ss_beta(beta):
    x64 = X.double().requires_grad_(True)
    s = torch.sigmoid(beta * x64)
    ss = 2.0 * s * (1.0 + beta * x64 * (1.0 - s)) - 1.0
    (autograd_derivative,) = torch.autograd.grad(ss.sum(), x64)
    _, g = grad_of(make(estimator="swish_sign", beta=beta), X)
    torch.testing.assert_close(g.double(), autograd_derivative, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        g.double(), _swish_derivative(X.double(), beta), rtol=1e-5, atol=1e-6
    )


def test_swish_sign_has_no_overflow_for_large_inputs():
    _, g = grad_of(make(estimator="swish_sign"), torch.tensor([-1e4, 1e4, 60.0]))
    assert torch.isfinite(g).all()
    assert g.abs().max() < 1e-20


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_ede_follows_its_schedule(progress):
    q = make(estimator="ede")
    q.progress = progress
    _, g = grad_of(q, X)
    expected = _ede_derivative(X.double(), progress).float()
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


def test_ede_schedule_end_points():
    assert ede_params(0.0, 0.1, 10.0) == pytest.approx((0.1, 10.0))
    assert ede_params(0.5, 0.1, 10.0) == pytest.approx((1.0, 1.0))
    assert ede_params(1.0, 0.1, 10.0) == pytest.approx((10.0, 1.0))
    # At p = 0 EDE is ≈ identity near 0; at p = 1 it is sharp: 10 at 0, ≈ 0 at |x| = 1.
    q = make(estimator="ede")
    _, g0 = grad_of(q, torch.tensor([0.0, 1.0]))
    q.progress = 1.0
    _, g1 = grad_of(q, torch.tensor([0.0, 1.0]))
    assert g0[0] == pytest.approx(1.0)
    assert g1[0] == pytest.approx(10.0)
    assert g1[1] < 1e-6


def test_ede_options_t_min_t_max():
    q = make(estimator="ede", t_min=1.0, t_max=4.0)
    q.progress = 0.5
    _, g = grad_of(q, torch.tensor([0.0, 0.5]))
    expected = _ede_derivative(torch.tensor([0.0, 0.5], dtype=torch.float64), 0.5, 1.0, 4.0)
    torch.testing.assert_close(g, expected.float())


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_xnor_gradient_is_alpha_ste_plus_the_mean_term(name, strategy):
    torch.manual_seed(0)
    w = torch.randn(3, 7)
    g_up = torch.randn(3, 7)
    _, g = grad_of(make(scale="absmean", strategy=strategy, estimator=name), w, g_up)
    rows_w = w.reshape(1, -1) if strategy == "tensor" else w
    rows_g = g_up.reshape(1, -1) if strategy == "tensor" else g_up
    w64, g64 = rows_w.double(), rows_g.double()
    n = w64.shape[1]
    alpha = w64.abs().mean(dim=1, keepdim=True)
    s = torch.where(w64 >= 0, 1.0, -1.0)
    expected = alpha * REFERENCE[name](w64) * g64 + s * (g64 * s).sum(1, keepdim=True) / n
    torch.testing.assert_close(g.double(), expected.reshape(3, 7), rtol=1e-5, atol=1e-6)


def test_xnor_gradient_equals_autograd_through_alpha():
    torch.manual_seed(1)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g_up = torch.randn(4, 6, dtype=torch.float64)
    alpha = w.abs().mean(dim=1, keepdim=True)
    s = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    ste = w + (s - w).detach()  # identity STE
    (alpha * ste).backward(g_up)
    _, g = grad_of(make(scale="absmean", strategy="channel", estimator="identity"), w, g_up)
    torch.testing.assert_close(g, w.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- what the backward keeps


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_clipped_saves_only_a_bool_mask(strategy):
    x = torch.randn(4, 8, requires_grad=True)
    _, saved = saved_during_forward(make(strategy=strategy), x)
    assert [t.dtype for t in saved] == [torch.bool]
    assert saved[0].numel() == x.numel()


def test_identity_saves_nothing():
    _, saved = saved_during_forward(make(estimator="identity"), torch.randn(8, requires_grad=True))
    assert saved == []


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("scale", ["none", "absmean"])
def test_no_full_size_float_is_saved_beyond_the_input(name, scale):
    x = torch.randn(4, 8, requires_grad=True)
    y, saved = saved_during_forward(make(estimator=name, scale=scale, strategy="channel"), x)
    for t in saved:
        small = t.numel() <= x.shape[0]
        is_input = t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        assert t.dtype == torch.bool or small or is_input, (t.dtype, t.shape)
    y.sum().backward()
    assert x.grad is not None


# ---------------------------------------------------------------- enabled and strength


def test_disabled_is_the_exact_identity():
    x = torch.randn(5)
    assert make(enabled=False)(x) is x
    assert make(strength=0.0)(x) is x


def test_strength_ramps_between_x_and_q():
    x = torch.tensor([-0.5, 0.25, 2.0], requires_grad=True)
    q = make(strength=0.5)
    y = q(x)
    assert y.tolist() == [-0.75, 0.625, 1.5]
    y.sum().backward()
    # 0.5 · 1 (from x) + 0.5 · 1{|x| <= 1} (from the estimator)
    assert x.grad.tolist() == [1.0, 1.0, 0.5]
    q.strength = 1.0
    assert q(x).tolist() == [-1.0, 1.0, 1.0]


# ---------------------------------------------------------------- devices and dtypes


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("scale", ["none", "absmean"])
def test_meta_device(name, scale):
    x = torch.empty(6, 3, 2, device="meta", requires_grad=True)
    y = make(estimator=name, scale=scale, strategy="channel")(x)
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_nan_propagates_and_inf_binarizes():
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.5])
    y = make()(x)
    assert math.isnan(y[0]) and y[1:].tolist() == [1.0, -1.0, 1.0]


# ---------------------------------------------------------------- properties


SPECS = st.fixed_dictionaries(
    {
        "estimator": st.sampled_from(ESTIMATORS),
        "scale": st.sampled_from(["none", "absmean"]),
        "strategy": st.sampled_from(["tensor", "channel"]),
    }
)


@settings(max_examples=30, deadline=None)
@given(matrices(), SPECS)
def test_at_most_two_values_per_group_and_they_are_plus_minus_alpha(w, spec):
    y = make(**spec)(w)
    rows = y if spec["strategy"] == "channel" else y.reshape(1, -1)
    wrows = w if spec["strategy"] == "channel" else w.reshape(1, -1)
    for yr, wr in zip(rows, wrows, strict=True):
        assert yr.unique().numel() <= 2
        alpha = wr.abs().mean() if spec["scale"] == "absmean" else torch.tensor(1.0)
        assert torch.equal(yr.abs(), alpha.expand_as(yr))
        assert torch.equal(yr >= 0, wr >= 0)


@settings(max_examples=30, deadline=None)
@given(matrices(), st.sampled_from(["tensor", "channel"]))
def test_idempotent(w, strategy):
    # sign(sign(x)) = sign(x) exactly; with absmean, α' = mean|α·s| = α up to the rounding
    # of a mean of equal numbers, so q(q(x)) = q(x) holds to float precision.
    q = make(strategy=strategy)
    assert torch.equal(q(q(w)), q(w))
    q = make(strategy=strategy, scale="absmean")
    torch.testing.assert_close(q(q(w)), q(w), rtol=1e-6, atol=0.0)


@settings(max_examples=30, deadline=None)
@given(matrices(), SPECS, st.sampled_from(DTYPES))
def test_dtype_is_preserved(w, spec, dtype):
    x = w.clamp(-60000, 60000).to(dtype).requires_grad_(True)
    y = make(**spec)(x)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_zeros(dtype, name):
    # absmean: α = 0 gives exact zeros; without a scale sign(0) = +1 gives ones.
    x = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    y = make(estimator=name, scale="absmean", strategy="channel")(x)
    assert torch.equal(y, torch.zeros_like(y)) and not y.signbit().any()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(make(estimator=name)(x.detach()), torch.ones_like(x))


@settings(max_examples=30, deadline=None)
@given(matrices(special), SPECS)
def test_nan_and_inf_do_not_raise(w, spec):
    x = w.requires_grad_(True)
    y = make(**spec)(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("scale", ["none", "absmean"])
def test_ste_estimator_passes_the_gradient_through_the_whole_quantizer(scale):
    """BitNet's w + (q(w) - w).detach(): the forward is α·sign(w), the backward dL/dw = G,
    with no α term and no clipping."""
    torch.manual_seed(0)
    x = (torch.randn(4, 6) * 3).requires_grad_(True)
    spec = {"type": "binary", "scale": scale, "strategy": "channel", "estimator": "ste"}
    q = stefx.make_quantizer(spec)
    y = q(x)
    alpha = x.detach().abs().mean(1, keepdim=True) if scale == "absmean" else 1.0
    assert torch.allclose(y, torch.where(x >= 0, 1.0, -1.0) * alpha)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)
