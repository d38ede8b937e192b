"""Tests of the ``ternary`` quantizer: BitNet absmean, TWN, ParetoQ SEQ (stefx/ste/ternary.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import stefx
from stefx.ste import ternary  # noqa: F401  (registers "ternary")
from stefx.ste.ternary import TernaryQuantizer
from tests.ste_support import grad_of, matrices, saved_during_forward, special

SCALES = ("absmean", "twn", "seq")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CLIP = 1.0 - 1e-2


def make(**spec):
    return stefx.make_quantizer({"type": "ternary", **spec})


# ---------------------------------------------------------------- spec


def test_registered_with_defaults():
    q = make()
    assert isinstance(q, TernaryQuantizer)
    assert (q.bits, q.levels) == (2, 3)
    assert (q.spec.scale, q.spec.estimator, q.spec.strategy) == ("absmean", "ste", "tensor")
    assert q.spec.options["eps"] == 1e-5


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-5}, "eps"),
        ({"eps": "tiny"}, "eps"),
        ({"scale": "twm"}, "scale"),
        ({"num_bits": 1}, "num_bits"),
        ({"estimator": "clipped"}, "estimator"),
        ({"strategy": "diagonal"}, "strategy"),
        ({"beta": 5.0}, "beta"),
    ],
)
def test_bad_options_name_the_key(spec, key):
    with pytest.raises(stefx.RecipeError, match=key):
        make(**spec)


def test_bad_scale_suggests_the_nearest_name():
    with pytest.raises(stefx.RecipeError, match="did you mean 'twn'"):
        make(scale="twm")


# ---------------------------------------------------------------- BitNet b1.58 absmean


def test_absmean_closed_form():
    w = torch.tensor([-1.5, -0.25, 0.75, 3.0])
    # γ = 5.5/4 = 1.375; W/γ ≈ [-1.09, -0.18, 0.55, 2.18] -> [-1, 0, 1, 1].
    y = make()(w)
    assert y.tolist() == [-1.375, 0.0, 1.375, 1.375]
    assert not y[1].signbit()  # round(-0.18) is -0; stefx returns +0


def test_absmean_per_channel():
    w = torch.tensor([[1.0, -1.0, 0.5, 0.5], [4.0, 0.0, 0.0, 0.0]])
    # γ = [0.75, 1]; W/γ = [1.33, -1.33, 0.67, 0.67], [4, 0, 0, 0].
    expected = torch.tensor([[0.75, -0.75, 0.75, 0.75], [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(make(strategy="channel")(w), expected)


def test_absmean_eps_option():
    w = torch.tensor([1.0, -1.0, 0.5, 0.5])
    # γ = 0.75; with ε = 1, W/(γ+ε) = [0.57, -0.57, 0.29, 0.29] -> [1, -1, 0, 0].
    assert make(eps=1.0)(w).tolist() == [0.75, -0.75, 0.0, 0.0]


def test_absmean_is_not_idempotent_but_keeps_its_codes():
    # q(x) = γ·c; the second pass sees γ' = mean|γ·c| = γ·p (p = share of nonzero codes),
    # so it returns p·q(x): the same codes on a shrunk scale.
    q = make()
    once = q(torch.tensor([-1.5, -0.25, 0.75, 3.0]))
    twice = q(once)
    assert not torch.equal(twice, once)
    assert torch.equal(twice, 0.75 * once)


# ---------------------------------------------------------------- TWN


def test_twn_closed_form():
    w = torch.tensor([0.1, -0.2, 1.0, -2.0, 0.3, 0.0])
    # mean|W| = 0.6, Δ = 0.42, kept: {1, -2}, α = 1.5.
    assert make(scale="twn")(w).tolist() == [0.0, 0.0, 1.5, -1.5, 0.0, 0.0]


def test_twn_per_channel_delta_and_alpha():
    w = torch.tensor([[4.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.25, -2.0]])
    # row 0: Δ = 0.7·1.5 = 1.05, kept {4}, α = 4;
    # row 1: Δ = 0.7·1.0625 = 0.74375, kept {1, -1, -2}, α = 4/3.
    y = make(scale="twn", strategy="channel")(w)
    a = torch.tensor(4.0) / 3
    assert torch.equal(y[0], torch.tensor([4.0, 0.0, 0.0, 0.0]))
    assert torch.equal(y[1], torch.stack([a, -a, torch.tensor(0.0), -a]))


def test_twn_empty_group_and_zeros():
    assert make(scale="twn")(torch.zeros(4)).tolist() == [0.0] * 4
    # all |W| equal: every entry is above Δ = 0.7·|W|.
    assert make(scale="twn")(torch.tensor([-2.0, 2.0])).tolist() == [-2.0, 2.0]


def test_twn_nan_row_stays_nan():
    y = make(scale="twn", strategy="channel")(torch.tensor([[math.nan, 1.0], [1.0, -3.0]]))
    assert torch.isnan(y[0]).all()
    assert y[1].tolist() == [0.0, -3.0]


# ---------------------------------------------------------------- ParetoQ SEQ


def seq_with(alpha, **spec):
    q = make(scale="seq", strategy="channel", **spec)
    q.alpha.data = torch.tensor(alpha)
    return q


def test_seq_levels():
    u = torch.tensor([-1.2, -1.0, -0.5, -0.3, 0.0, 0.2, 0.34, 0.66, 0.995, 1.0, 2.0])
    codes = [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    w = torch.stack([1.5 * u, 3.0 * u])
    y = seq_with([1.5, 3.0])(w)
    # Levels α·{-2/3, 0, 2/3}: ±1 for α = 1.5, ±2 for α = 3.
    assert y[0].tolist() == codes
    assert y[1].tolist() == [2.0 * c for c in codes]
    assert not y[y == 0].signbit().any()  # round(-0.45) is -0; stefx returns +0


def test_seq_init_is_row_max_and_keeps_the_parameter():
    q = make(scale="seq", strategy="channel")
    param = q.alpha
    assert param.shape == (0,)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    w = torch.tensor([[0.5, -2.0, math.inf], [0.25, math.nan, -0.125]])
    q(w).sum().backward()
    assert q.alpha is param and q.alpha.requires_grad
    assert q.alpha.detach().tolist() == [2.0, 0.25]  # NaN and inf ignored
    before = q.alpha.detach().clone()
    q.alpha.grad = torch.ones(2)
    opt.step()
    assert torch.equal(q.alpha.detach(), before - 0.1)


def test_seq_init_from():
    q = make(scale="seq", strategy="channel")
    q.init_from(torch.tensor([[1.0, -3.0], [0.5, 0.0]]))
    assert q.alpha.detach().tolist() == [3.0, 0.5]
    with pytest.raises(ValueError, match="scale groups"):
        q(torch.zeros(3, 2))


def test_seq_uses_all_levels_evenly():
    w = torch.linspace(-1.0, 1.0, 3001).reshape(1, -1) * 2.0
    y = seq_with([2.0])(w)
    counts = torch.stack([(y == v).sum() for v in y.unique()])
    assert counts.numel() == 3
    assert (counts - 1000).abs().max() <= 2


def _seq_reference_grads(w, alpha, g_up, eps=1e-5):
    """ParetoQ's backward, written out in float64."""
    w, g_up = w.double(), g_up.double()
    a = torch.where(alpha.double() > eps, alpha.double(), torch.tensor(eps, dtype=torch.float64))
    u = w / a.unsqueeze(1)
    inside = u.abs() <= CLIP
    q = torch.round(1.5 * u.clamp(-CLIP, CLIP)) / 1.5
    slope = torch.where(inside, q - u, torch.sign(u))
    return g_up * inside, (g_up * slope).sum(1) / math.sqrt(w.numel())


def test_seq_backward_matches_paretoq():
    torch.manual_seed(0)
    w = torch.randn(3, 8) * torch.tensor([[1.0], [0.1], [3.0]])
    g_up = torch.randn(3, 8)
    q = make(scale="seq", strategy="channel")
    q.init_from(w)
    q.alpha.data *= 0.6  # some entries clip
    _, g = grad_of(q, w, g_up)
    ref_x, ref_alpha = _seq_reference_grads(w, q.alpha.detach(), g_up)
    assert torch.equal(g, ref_x.float())
    assert (ref_x == 0).any() and (ref_x != 0).any()
    torch.testing.assert_close(q.alpha.grad.double(), ref_alpha, rtol=1e-5, atol=1e-7)


def test_seq_alpha_gradient_inside_equals_lsq_autograd():
    # Where nothing clips, dL/dα = g·Σ G·(q(u) - u): the LSQ gradient of α·(u + (q - u).detach()).
    torch.manual_seed(1)
    w = torch.rand(2, 5) * 2 - 1
    g_up = torch.randn(2, 5)
    q = seq_with([2.0, 3.0])
    _, g = grad_of(q, w, g_up)
    alpha = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    u = w.double() / alpha.unsqueeze(1)
    levels = torch.round(1.5 * u) / 1.5
    y = alpha.unsqueeze(1) * (u + (levels - u).detach()) / math.sqrt(w.numel())
    y.backward(g_up.double())
    torch.testing.assert_close(q.alpha.grad.double(), alpha.grad, rtol=1e-6, atol=1e-8)
    assert torch.equal(g, g_up)


def test_seq_alpha_floor_eps():
    q = seq_with([0.0])
    w = torch.zeros(1, 4, requires_grad=True)
    y = q(w)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.isfinite(q.alpha.grad).all() and torch.isfinite(w.grad).all()
    # a = ε = 1e-5: W = 1e-5 is past the clip (u = 1) and lands on the level 2ε/3.
    y = q(torch.tensor([[1e-5, -1e-6, 0.0, 0.0]]))
    torch.testing.assert_close(y, torch.tensor([[2e-5 / 3, 0.0, 0.0, 0.0]]))


def test_seq_state_dict_round_trip():
    q = make(scale="seq", strategy="channel")
    q(torch.randn(3, 4))
    fresh = make(scale="seq", strategy="channel")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.alpha, q.alpha)


def test_only_seq_has_a_parameter():
    assert list(make().parameters()) == []
    assert list(make(scale="twn").parameters()) == []
    assert [n for n, _ in make(scale="seq").named_parameters()] == ["alpha"]


# ---------------------------------------------------------------- backward and what it keeps


@pytest.mark.parametrize("scale", ["absmean", "twn"])
def test_identity_ste(scale):
    torch.manual_seed(2)
    w, g_up = torch.randn(3, 5), torch.randn(3, 5)
    _, g = grad_of(make(scale=scale, strategy="channel"), w, g_up)
    assert torch.equal(g, g_up)


@pytest.mark.parametrize("scale", ["absmean", "twn"])
def test_identity_ste_saves_nothing(scale):
    _, saved = saved_during_forward(make(scale=scale), torch.randn(4, 8, requires_grad=True))
    assert saved == []


def test_seq_saves_only_the_input_and_alpha():
    q = make(scale="seq", strategy="channel")
    x = torch.randn(4, 8, requires_grad=True)
    _, saved = saved_during_forward(q, x)
    assert len(saved) == 2
    assert saved[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert saved[1] is q.alpha or saved[1].numel() == 4


# ---------------------------------------------------------------- enabled, strength, meta


def test_disabled_and_strength():
    x = torch.tensor([-1.5, -0.25, 0.75, 3.0], requires_grad=True)
    assert make(enabled=False)(x) is x
    y = make(strength=0.5)(x)
    assert y.tolist() == [-1.4375, -0.125, 1.0625, 2.1875]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 4


@pytest.mark.parametrize("scale", SCALES)
def test_meta_device(scale):
    x = torch.empty(6, 3, 2, device="meta", requires_grad=True)
    q = make(scale=scale, strategy="channel").to("meta")  # as when the model is on meta
    y = q(x)
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape
    if scale == "seq":
        assert q.alpha.shape == (6,) and q.alpha.device.type == "meta"


# ---------------------------------------------------------------- properties


STRATEGIES = st.sampled_from(["tensor", "channel"])


def _rows(t, strategy):
    return t if strategy == "channel" else t.reshape(1, -1)


@settings(max_examples=30, deadline=None)
@given(matrices(), st.sampled_from(SCALES), STRATEGIES)
def test_at_most_three_symmetric_values_per_group(w, scale, strategy):
    y = make(scale=scale, strategy=strategy)(w)
    for yr, wr in zip(_rows(y, strategy), _rows(w, strategy), strict=True):
        assert yr.unique().numel() <= 3
        assert yr.abs().unique().numel() <= 2  # {0, a}
        assert (yr * wr >= 0).all()  # never the opposite sign


@settings(max_examples=30, deadline=None)
@given(matrices(), STRATEGIES)
def test_twn_and_seq_are_idempotent(w, strategy):
    # TWN: q(x) = α·c; Δ' = 0.7·α·p < α keeps the same entries, α' = α (to the rounding
    # of a mean of equal numbers). SEQ with a fixed α: levels map to themselves exactly.
    twn = make(scale="twn", strategy=strategy)
    once = twn(w)
    twice = twn(once)
    assert torch.equal(twice.sign(), once.sign())
    torch.testing.assert_close(twice, once, rtol=1e-6, atol=0.0)
    seq = make(scale="seq", strategy=strategy)
    once = seq(w)
    assert torch.equal(seq(once), once)


@settings(max_examples=30, deadline=None)
@given(matrices(), STRATEGIES)
def test_absmean_second_pass_keeps_codes_and_shrinks_by_nonzero_share(w, strategy):
    # What holds for BitNet absmean: codes are idempotent once γ >> ε, and
    # q(q(x)) = p·q(x) with p the share of nonzero codes in the group.
    assume(bool((_rows(w, strategy).abs().mean(dim=1) > 1e-3).all()))
    q = make(strategy=strategy)
    once, twice = q(w), q(q(w))
    assert torch.equal(twice.sign(), once.sign())
    share = (_rows(once, strategy) != 0).float().mean(dim=1, keepdim=True)
    expected = (share * _rows(once, strategy)).reshape(w.shape)
    torch.testing.assert_close(twice, expected, rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(matrices(), st.sampled_from(SCALES), STRATEGIES, st.sampled_from(DTYPES))
def test_dtype_is_preserved(w, scale, strategy, dtype):
    x = w.clamp(-60000, 60000).to(dtype).requires_grad_(True)
    q = make(scale=scale, strategy=strategy)
    y = q(x)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_zeros_give_zeros(dtype, scale):
    x = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    q = make(scale=scale, strategy="channel")
    y = q(x)
    assert torch.equal(y, torch.zeros_like(y)) and not y.signbit().any()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    if scale == "seq":
        assert torch.isfinite(q.alpha.grad).all()


@settings(max_examples=30, deadline=None)
@given(matrices(special), st.sampled_from(SCALES), STRATEGIES)
def test_nan_and_inf_do_not_raise(w, scale, strategy):
    x = w.requires_grad_(True)
    y = make(scale=scale, strategy=strategy)(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
