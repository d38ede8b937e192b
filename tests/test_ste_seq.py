"""Tests of the ``seq`` quantizer: ParetoQ Stretched Elastic Quant, 2-4 bits (stefx/ste/seq.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stefx
import stefx.ste.seq  # registers "seq"
from stefx.ste.seq import SEQQuantizer
from tests.ste_support import grad_of, matrices, saved_during_forward, special

BITS = (2, 3, 4)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CLIP = 1.0 - 1e-2


def make(**spec):
    return stefx.make_quantizer({"type": "seq", **spec})


def with_alpha(alpha, **spec):
    q = make(**spec)
    q.alpha.data = torch.tensor(alpha, dtype=torch.float32)
    return q


# ---------------------------------------------------------------- spec


def test_registered_with_defaults():
    q = make()
    assert isinstance(q, SEQQuantizer)
    assert (q.bits, q.levels) == (2, 4)
    assert (q.spec.strategy, q.spec.scale, q.spec.estimator) == ("channel", "learned", "ste")
    assert q.spec.options["eps"] == 1e-5
    assert [n for n, _ in q.named_parameters()] == ["alpha"]
    assert make(num_bits=3).levels == 8


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"num_bits": 1}, "num_bits"),
        ({"num_bits": 8}, "num_bits"),
        ({"num_bits": "2"}, "num_bits"),
        ({"strategy": "group", "group_size": 4}, "strategy"),
        ({"strategy": "diagonal"}, "strategy"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1.0}, "eps"),
        ({"eps": "tiny"}, "eps"),
        ({"scale": "max"}, "scale"),
        ({"estimator": "clipped"}, "estimator"),
        ({"symmetric": False}, "symmetric"),
        ({"alpha_init": 1.0}, "alpha_init"),
    ],
)
def test_bad_options_name_the_key(spec, key):
    with pytest.raises(stefx.RecipeError, match=key):
        make(**spec)


# ---------------------------------------------------------------- forward levels


def test_two_bit_levels():
    u = torch.tensor([-1.5, -1.0, -0.6, -0.4, -0.1, 0.1, 0.3, 0.7, 0.995, 1.0, 3.0])
    levels = [-0.75, -0.75, -0.75, -0.25, -0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75]
    y = with_alpha([2.0, 4.0])(torch.stack([2.0 * u, 4.0 * u]))
    assert y[0].tolist() == [2.0 * v for v in levels]  # α·{±1/4, ±3/4}, α = 2
    assert y[1].tolist() == [4.0 * v for v in levels]


def test_three_bit_levels():
    u = torch.tensor([-1.0, -0.8, -0.7, -0.3, -0.2, 0.05, 0.2, 0.3, 0.55, 0.8, 1.2])
    eighths = [-7, -7, -5, -3, -1, 1, 1, 3, 5, 7, 7]
    y = with_alpha([1.0, 8.0], num_bits=3)(torch.stack([u, 8.0 * u]))
    assert y[0].tolist() == [v / 8 for v in eighths]  # α·{±1/8, ±3/8, ±5/8, ±7/8}
    assert y[1].tolist() == [float(v) for v in eighths]


def test_tensor_strategy_has_one_alpha():
    q = make(strategy="tensor")
    y = q(torch.tensor([[1.0, -0.1], [4.0, 0.0]]))
    assert q.alpha.tolist() == [4.0]
    assert y.tolist() == [[1.0, -1.0], [3.0, 1.0]]  # levels ±1, ±3


@pytest.mark.parametrize("bits", BITS)
def test_dense_sweep_uses_every_level_evenly(bits):
    n_levels = 2**bits
    per_bin = 1000
    alpha = 2.0
    w = torch.linspace(-1.0, 1.0, n_levels * per_bin + 1).reshape(1, -1) * alpha
    y = with_alpha([alpha], num_bits=bits)(w)
    values, counts = y.unique(return_counts=True)
    k = n_levels // 2
    expected = torch.tensor([alpha * (2 * j + 1) / (2 * k) for j in range(-k, k)])
    assert torch.equal(values, expected)
    assert (counts - per_bin).abs().max() <= 2, counts.tolist()


# ---------------------------------------------------------------- backward


def _reference(w, alpha, g_up, bits, eps=1e-5):
    """ParetoQ's SEQ gradients, written from the formula in float64 (bin-index form)."""
    w, g_up = w.double(), g_up.double()
    alpha = alpha.double()
    a = torch.where(alpha > eps, alpha, torch.full_like(alpha, eps)).unsqueeze(1)
    u = w / a
    k = 2 ** (bits - 1)
    index = torch.floor((u.clamp(-1.0, 1.0 - 1e-9) + 1.0) * k)  # bin 0 .. 2k-1
    level = (2.0 * index + 1.0) / (2.0 * k) - 1.0
    inside = u.abs() <= CLIP
    top = (k - 0.5) / k
    slope = torch.where(inside, level - u, torch.sign(u) * top)
    scale = 1.0 / math.sqrt(w.numel() * (2 ** (bits - 1) - 1))
    return level * a, g_up * inside, (g_up * slope).sum(1) * scale


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_gradients_match_the_formula(bits, strategy):
    torch.manual_seed(bits)
    w = torch.randn(3, 16) * torch.tensor([[1.0], [0.1], [3.0]])
    g_up = torch.randn(3, 16)
    q = make(num_bits=bits, strategy=strategy)
    q.init_from(w)
    q.alpha.data *= 0.7  # some entries clip
    y, g = grad_of(q, w, g_up)
    rows = w if strategy == "channel" else w.reshape(1, -1)
    ref_y, ref_x, ref_alpha = _reference(rows, q.alpha.detach(), g_up.reshape(rows.shape), bits)
    torch.testing.assert_close(y.double(), ref_y.reshape(w.shape), rtol=1e-6, atol=0.0)
    assert torch.equal(g, ref_x.reshape(w.shape).float())
    assert (ref_x == 0).any() and (ref_x != 0).any()  # both regions exercised
    torch.testing.assert_close(q.alpha.grad.double(), ref_alpha, rtol=1e-5, atol=1e-7)


def test_alpha_gradient_by_hand():
    # 2 bits, α = 1, g = 1/sqrt(4): clipped u = ±2 give ±3/4, u = 0.4 gives 1/4 - 0.4.
    q = with_alpha([1.0])
    _, g = grad_of(q, torch.tensor([[2.0, -2.0, 0.4, 3.0]]))
    assert g.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    torch.testing.assert_close(q.alpha.grad, torch.tensor([(0.75 - 0.75 - 0.15 + 0.75) / 2]))
    # 3 bits: g = 1/sqrt(4 · 3), clipped u = 2 gives 7/8.
    q = with_alpha([1.0], num_bits=3)
    grad_of(q, torch.tensor([[2.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(q.alpha.grad, torch.tensor([0.875 / math.sqrt(12)]))


# ---------------------------------------------------------------- learned α: init and state


def test_lazy_init_keeps_the_parameter_for_the_optimizer():
    q = make()
    param = q.alpha
    assert param.shape == (0,)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    w = torch.tensor([[0.5, -2.0, math.inf], [0.25, math.nan, -0.125]])
    q(w).sum().backward()
    assert q.alpha is param and q.alpha.requires_grad
    assert q.alpha.detach().tolist() == [2.0, 0.25]  # max|W| per row, NaN and inf ignored
    before = q.alpha.detach().clone()
    q.alpha.grad = torch.ones(2)
    opt.step()
    assert torch.equal(q.alpha.detach(), before - 0.1)


def test_init_from_and_shape_mismatch():
    q = make()
    q.init_from(torch.tensor([[1.0, -3.0], [0.5, 0.0]]))
    assert q.alpha.detach().tolist() == [3.0, 0.5]
    with pytest.raises(ValueError, match="scale groups"):
        q(torch.zeros(3, 2))


@pytest.mark.parametrize("bits", BITS)
def test_state_dict_round_trip(bits):
    torch.manual_seed(0)
    w = torch.randn(3, 5)
    q = make(num_bits=bits)
    q(w)
    q.alpha.data *= 0.5  # differs from what a fresh init would pick
    fresh = make(num_bits=bits)
    fresh.load_state_dict(q.state_dict())
    param = fresh.alpha
    assert torch.equal(fresh.alpha, q.alpha)
    assert torch.equal(fresh(w), q(w))  # the loaded α is used, not re-initialised
    assert fresh.alpha is param


# ---------------------------------------------------------------- dtypes, non-finite, zeros


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_is_preserved(dtype, bits):
    torch.manual_seed(0)
    x = (torch.randn(4, 8) * 3).to(dtype).requires_grad_(True)
    q = make(num_bits=bits)
    y = q(x)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype
    assert q.alpha.grad.dtype == torch.float32 and torch.isfinite(q.alpha.grad).all()
    ref = with_alpha(q.alpha.detach().tolist(), num_bits=bits)(x.detach().float())
    assert torch.equal(y, ref.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_zeros_give_no_nan(bits, dtype):
    x = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    q = make(num_bits=bits)
    y = q(x)  # α = 0, the step floors at ε: y = ε/(2k), tiny but finite
    assert torch.isfinite(y).all() and (y.float().abs() <= 1e-5).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(q.alpha.grad).all()


@settings(max_examples=25, deadline=None)
@given(matrices(special), st.sampled_from(BITS), st.sampled_from(["channel", "tensor"]))
def test_nan_and_inf_do_not_raise(w, bits, strategy):
    x = w.requires_grad_(True)
    q = make(num_bits=bits, strategy=strategy)
    y = q(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.isfinite(q.alpha).all()


@settings(max_examples=25, deadline=None)
@given(matrices(), st.sampled_from(BITS), st.sampled_from(["channel", "tensor"]))
def test_level_count_sign_and_idempotence(w, bits, strategy):
    q = make(num_bits=bits, strategy=strategy)
    y = q(w)
    rows_y, rows_w = (y, w) if strategy == "channel" else (y.reshape(1, -1), w.reshape(1, -1))
    for row in rows_y:
        assert row.unique().numel() <= 2**bits
    assert (y != 0).all()  # no zero level
    # Never the opposite sign, except where k·u - 1/2 rounds to the tie -1/2 in float32
    # (|u| below ~1e-8, e.g. a row of tiny weights under the ε floor): that goes to +a/(2k).
    a = q.alpha.detach().clamp(min=1e-5).unsqueeze(1)
    clear = rows_w.abs() > 1e-6 * a
    assert (rows_y * rows_w >= 0)[clear].all()
    assert torch.equal(q(y), y)  # with α fixed, levels map to themselves


# ---------------------------------------------------------------- what backward keeps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_saves_only_the_input_and_alpha(dtype, strategy):
    q = make(num_bits=3, strategy=strategy)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    _, saved = saved_during_forward(q, x)
    assert len(saved) == 2
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1
    assert big[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert big[0].dtype == dtype  # W itself, not a widened copy
    assert any(t is q.alpha for t in saved)


# ---------------------------------------------------------------- meta, enabled, strength


def test_meta_device():
    x = torch.empty(6, 3, 2, device="meta", requires_grad=True)
    q = make(num_bits=3).to("meta")
    y = q(x)
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert q.alpha.shape == (6,) and q.alpha.device.type == "meta"


def test_disabled_and_strength():
    x = torch.tensor([[2.0, 0.6, -0.1, -1.2]], requires_grad=True)
    assert make(enabled=False)(x) is x
    y = make(strength=0.5)(x)  # halfway to [1.5, 0.5, -0.5, -1.5]
    torch.testing.assert_close(y, torch.tensor([[1.75, 0.55, -0.3, -1.35]]))
