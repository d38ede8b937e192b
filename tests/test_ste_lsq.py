"""Tests of ``lsq`` and ``lsq+`` (stefx/ste/lsq.py) against the papers' formulas.

References are written here with plain torch ops, independently of the module: LSQ
(arXiv:1902.08153) and LSQ+ (arXiv:2004.09576).
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stefx.ste.lsq  # registers "lsq" and "lsq+"; INIT_BLOCK is patched below
from stefx.errors import RecipeError
from stefx.ste.lsq import LSQPlusQuantizer, LSQQuantizer
from stefx.ste.spec import make_quantizer, parse_spec
from tests.ste_support import saved_during_forward, signature

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TYPES = ("lsq", "lsq+")
PROPS = settings(max_examples=30, deadline=None)


def make(type_="lsq", **spec):
    return make_quantizer({"type": type_, **spec})


def with_params(q, scale, offset=None):
    """Set the learned parameters through load_state_dict (also before initialisation)."""
    state = {"scale": torch.as_tensor(scale, dtype=torch.float32)}
    if offset is not None:
        state["offset"] = torch.as_tensor(offset, dtype=torch.float32)
    q.load_state_dict(state)
    return q


def codes(bits, symmetric=True):
    """(Qn, Qp) as in the LSQ paper: codes in [-Qn, Qp]."""
    if symmetric:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_reference(x, s, beta, qn, qp, upstream):
    """LSQ(+) gradients from the papers' piecewise formulas, rows (G, N), s and beta (G,).

    u = (v - β) / s is formed in float32, as the quantizer must (the boundary tests place
    values exactly on -Qn and Qp in float32); the rest is float64.
    """
    s = s.float().unsqueeze(1)
    b = torch.zeros_like(s) if beta is None else beta.float().unsqueeze(1)
    u = ((x.float() - b) / s).double()
    s, b = s.double(), b.double()
    inside = (u > -qn) & (u < qp)
    below, above = u <= -qn, u >= qp
    y = torch.round(torch.clamp(u, -qn, qp)) * s + b
    g = 1.0 / math.sqrt(x.shape[1] * qp)
    dvds = torch.where(inside, torch.round(u) - u, torch.where(below, -qn, qp))
    G = upstream.double()
    grad_x = G * inside
    grad_s = g * (G * dvds).sum(1)
    grad_b = g * (G * (below | above).double()).sum(1)
    return y, grad_x, grad_s, grad_b


def run(q, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    y = q(x)
    y.backward(upstream)
    return y.detach(), x.grad


# ---------------------------------------------------------------- spec


def test_registered_with_defaults():
    q = make()
    assert isinstance(q, LSQQuantizer) and isinstance(make("lsq+"), LSQPlusQuantizer)
    assert q.bits == 4
    assert (q.spec.scale, q.spec.estimator, q.spec.strategy) == ("learned", "clipped", "tensor")
    assert make("lsq+").spec.options["init"] == "minmax"


@pytest.mark.parametrize(
    ("type_", "spec", "key"),
    [
        ("lsq", {"num_bits": 1}, "num_bits"),
        ("lsq", {"num_bits": 16}, "num_bits"),
        ("lsq", {"strategy": "token"}, "strategy"),
        ("lsq", {"grad_scale": "yes"}, "grad_scale"),
        ("lsq", {"signed": False}, "signed"),
        ("lsq", {"init": "minmax"}, "init"),
        ("lsq+", {"init": "median"}, "init"),
        ("lsq+", {"init": 3}, "init"),
        ("lsq+", {"strategy": "group"}, "group_size"),
    ],
)
def test_bad_options_raise_recipe_error(type_, spec, key):
    with pytest.raises(RecipeError, match=key):
        parse_spec({"type": type_, **spec})


# ---------------------------------------------------------------- forward, closed form


def test_lsq_forward_signed_levels():
    # 3 bits signed: codes -4..3, s = 0.5. u = x / s = [-6, -3.8, -0.6, 0.52, 1.48, 3.2]
    q = with_params(make(num_bits=3), [0.5])
    x = torch.tensor([-3.0, -1.9, -0.3, 0.26, 0.74, 1.6])
    assert q(x).tolist() == [-2.0, -2.0, -0.5, 0.5, 0.5, 1.5]


def test_lsq_forward_unsigned_levels():
    # 2 bits unsigned: codes 0..3, s = 0.5. u = [-2, 0.4, 1.6, 4]
    q = with_params(make(num_bits=2, symmetric=False), [0.5])
    assert q(torch.tensor([-1.0, 0.2, 0.8, 2.0])).tolist() == [0.0, 0.0, 1.0, 1.5]


def test_lsq_forward_per_channel_levels():
    q = with_params(make(num_bits=2, strategy="channel"), [1.0, 0.25])
    x = torch.tensor([[-3.0, 0.4, 0.6], [-3.0, 0.1, 0.2]])
    assert q(x).tolist() == [[-2.0, 0.0, 1.0], [-0.5, 0.0, 0.25]]


def test_lsq_plus_forward_levels():
    # 2 bits unsigned, s = 0.5, beta = -1: u = (x + 1) / 0.5 = [-2, 0.2, 1.4, 2.2, 4]
    q = with_params(make("lsq+", num_bits=2, symmetric=False), [0.5], [-1.0])
    x = torch.tensor([-2.0, -0.9, -0.3, 0.1, 1.0])
    assert q(x).tolist() == [-1.0, -1.0, -0.5, 0.0, 0.5]


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize(("bits", "symmetric"), [(2, True), (4, True), (3, False), (8, False)])
def test_lsq_init_per_tensor(bits, symmetric):
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(bits))
    q = make(num_bits=bits, symmetric=symmetric)
    assert not q.initialized
    q(x)
    _, qp = codes(bits, symmetric)
    expected = 2 * x.abs().mean() / math.sqrt(qp)
    assert q.initialized
    torch.testing.assert_close(q.scale.detach(), expected.reshape(1), rtol=1e-6, atol=0)


def test_lsq_init_per_channel_and_axis():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    q = make(num_bits=4, strategy="channel", axis=1)
    q.init_from(x)
    expected = 2 * x.abs().mean(dim=(0, 2)) / math.sqrt(7)
    torch.testing.assert_close(q.scale.detach(), expected, rtol=1e-6, atol=0)


def test_lsq_init_per_group():
    x = torch.arange(16.0).reshape(2, 8)
    x[0, :4] = 0.0
    q = make(num_bits=2, strategy="group", group_size=4)
    q(x)
    expected = 2 * x.reshape(4, 4).abs().mean(1)  # Qp = 1; the first group is all zero
    expected[0] = 1.0  # a group with no non-zero value starts at s = 1
    assert q.scale.tolist() == expected.tolist()


def test_lsq_init_ignores_non_finite():
    q = make(num_bits=2)
    q.init_from(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    assert q.scale.tolist() == [4.0]  # 2 · mean(1, 3) / sqrt(1)


def test_lsq_plus_init_minmax():
    x = torch.tensor([[-1.0, 0.5, 2.0], [4.0, 1.0, 2.5]])
    q = make("lsq+", num_bits=2, strategy="channel", symmetric=False)  # n = 0, p = 3
    q.init_from(x)
    assert q.scale.tolist() == [1.0, 1.0]  # (max - min) / 3
    assert q.offset.tolist() == [-1.0, 1.0]  # min - 0 · s
    qs = make("lsq+", num_bits=2, strategy="channel")  # n = -2, p = 1
    qs.init_from(x)
    assert qs.scale.tolist() == [1.0, 1.0]
    assert qs.offset.tolist() == [1.0, 3.0]  # min + 2 s


def test_lsq_plus_init_meanstd():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) + 0.3
    for symmetric, shift in ((True, 0.0), (False, -4.0)):
        q = make("lsq+", num_bits=3, strategy="channel", init="meanstd", symmetric=symmetric)
        q.init_from(x)
        mu, sigma = x.mean(1), x.std(1, unbiased=False)
        expected = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 4
        torch.testing.assert_close(q.scale.detach(), expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(q.offset.detach(), shift * expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- backward vs the papers


def _boundary_rows(s, qn, qp, shape, seed):
    """Random rows with a few values exactly on -Qn·s and Qp·s (the boundary convention)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * s.unsqueeze(1) * (qp / 1.5)
    x[:, 0] = -qn * s
    x[:, 1] = qp * s
    return x, torch.randn(shape, generator=gen)


@pytest.mark.parametrize(("bits", "symmetric"), [(2, True), (3, True), (4, False)])
def test_lsq_backward_per_tensor(bits, symmetric):
    qn, qp = codes(bits, symmetric)
    s = torch.tensor([0.25])
    x, upstream = _boundary_rows(s, qn, qp, (1, 40), bits)
    q = with_params(make(num_bits=bits, symmetric=symmetric), s.tolist())
    y, gx = run(q, x, upstream)
    ry, rgx, rgs, _ = lsq_reference(x, s, None, qn, qp, upstream)
    assert torch.equal(y, ry.float())
    assert torch.equal(gx, rgx.float())
    assert gx[0, 0] == 0 and gx[0, 1] == 0  # on the boundary counts as clipped
    torch.testing.assert_close(q.scale.grad.double(), rgs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axis", [0, 1])
def test_lsq_backward_per_channel(axis):
    qn, qp = codes(3)
    s = torch.tensor([0.1, 0.5, 2.0])
    rows, upstream = _boundary_rows(s, qn, qp, (3, 24), 7)
    x, up = (rows, upstream) if axis == 0 else (rows.T, upstream.T)
    q = with_params(make(num_bits=3, strategy="channel", axis=axis), s.tolist())
    y, gx = run(q, x, up)
    ry, rgx, rgs, _ = lsq_reference(rows, s, None, qn, qp, upstream)  # N = 24 per channel
    back = (lambda t: t) if axis == 0 else (lambda t: t.T)
    assert torch.equal(y, back(ry.float()))
    assert torch.equal(gx, back(rgx.float()))
    torch.testing.assert_close(q.scale.grad.double(), rgs, rtol=1e-5, atol=1e-7)


def test_lsq_step_gradient_matches_paper_pseudocode():
    """The paper's appendix code: grad_scale(s, g) and round_pass, differentiated by autograd."""
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    qn, qp = codes(4)
    q = make(num_bits=4, strategy="channel")
    y, gx = run(q, x, torch.ones_like(x))
    s = q.scale.detach().clone().requires_grad_(True)
    v = x.clone().requires_grad_(True)
    g = 1.0 / math.sqrt(30 * qp)
    s_scaled = (s - s * g).detach() + s * g
    u = (v / s_scaled.unsqueeze(1)).clamp(-qn, qp)
    u = (u.round() - u).detach() + u
    ref = u * s_scaled.unsqueeze(1)
    ref.sum().backward()
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, v.grad, rtol=0, atol=0)
    torch.testing.assert_close(q.scale.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_grad_scale_false_uses_g_one():
    s = torch.tensor([0.5])
    x, upstream = _boundary_rows(s, 2, 1, (1, 16), 5)
    q = with_params(make(num_bits=2, grad_scale=False), [0.5])
    run(q, x, upstream)
    _, _, rgs, _ = lsq_reference(x, s, None, 2, 1, upstream)
    torch.testing.assert_close(q.scale.grad.double(), rgs * math.sqrt(16 * 1), rtol=1e-5, atol=0)


@pytest.mark.parametrize(("strategy", "symmetric"), [("tensor", False), ("channel", True)])
def test_lsq_plus_backward(strategy, symmetric):
    qn, qp = codes(3, symmetric)
    s = torch.tensor([0.375, 0.25]) if strategy == "channel" else torch.tensor([0.375])
    beta = torch.tensor([-0.5, 0.75]) if strategy == "channel" else torch.tensor([-0.5])
    x, upstream = _boundary_rows(s, qn, qp, (len(s), 20), 11)
    x = x + beta.unsqueeze(1)
    x[:, 2] = qp * s + beta  # exactly on the upper boundary after the shift
    q = with_params(make("lsq+", num_bits=3, strategy=strategy, symmetric=symmetric), s, beta)
    y, gx = run(q, x, upstream)
    ry, rgx, rgs, rgb = lsq_reference(x, s, beta, qn, qp, upstream)
    torch.testing.assert_close(y, ry.float(), rtol=0, atol=1e-6)
    assert torch.equal(gx, rgx.float())
    torch.testing.assert_close(q.scale.grad.double(), rgs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.offset.grad.double(), rgb, rtol=1e-5, atol=1e-7)
    assert (q.offset.grad.abs() > 0).all()


# ---------------------------------------------------------------- properties


def _grid_arrays(max_side=8):
    return hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=max_side),
        elements=st.integers(-1024, 1024).map(lambda i: i / 64),
    )


@PROPS
@given(x=_grid_arrays(), bits=st.integers(2, 8), type_=st.sampled_from(TYPES), sym=st.booleans())
def test_at_most_2_pow_b_levels_per_channel(x, bits, type_, sym):
    q = make(type_, num_bits=bits, strategy="channel", symmetric=sym)
    y = q(torch.from_numpy(x))
    for row in y:
        assert row.unique().numel() <= 2**bits


@PROPS
@given(x=_grid_arrays(), bits=st.integers(2, 8), type_=st.sampled_from(TYPES), sym=st.booleans())
def test_idempotent_with_learned_params_fixed(x, bits, type_, sym):
    q = make(type_, num_bits=bits, strategy="channel", symmetric=sym)
    y = q(torch.from_numpy(x)).detach()
    assert torch.equal(q(y), y)


@PROPS
@given(
    x=_grid_arrays(),
    dtype=st.sampled_from(DTYPES),
    type_=st.sampled_from(TYPES),
    strategy=st.sampled_from(["tensor", "channel"]),
)
def test_dtype_is_kept(x, dtype, type_, strategy):
    q = make(type_, strategy=strategy)
    xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
    y = q(xt)
    y.sum().backward()
    assert y.dtype == dtype and xt.grad.dtype == dtype
    assert q.scale.dtype == torch.float32 and q.scale.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("type_", TYPES)
@pytest.mark.parametrize("init", ["minmax", "meanstd"])
def test_all_zero_input_gives_zeros(dtype, type_, init):
    q = make(type_, strategy="channel", **({"init": init} if type_ == "lsq+" else {}))
    x = torch.zeros(3, 6, dtype=dtype, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y)) and y.dtype == dtype
    for t in (x.grad, q.scale, q.scale.grad):
        assert torch.isfinite(t).all()


@PROPS
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
    ),
    type_=st.sampled_from(TYPES),
)
def test_nan_and_inf_do_not_raise(x, type_):
    q = make(type_)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = q(xt)
    y.sum().backward()
    assert y.shape == xt.shape


# ---------------------------------------------------------------- memory: what backward keeps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("type_", TYPES)
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_backward_saves_only_input_and_parameters(dtype, type_, strategy, strength):
    q = make(type_, strategy=strategy, strength=strength)
    x = torch.randn(4, 64, dtype=dtype).requires_grad_(True)
    q.init_from(x)
    y, tensors = saved_during_forward(q, x)
    saved = [signature(t) for t in tensors]
    allowed = {signature(x)} | {signature(p) for p in (*q.parameters(), *q.buffers())}
    floats = [s for s in saved if s[0].is_floating_point]
    assert floats and all(s in allowed for s in floats), saved
    assert all(s[0] == torch.bool for s in saved if not s[0].is_floating_point)
    y.sum().backward()
    assert x.grad is not None and q.scale.grad is not None


# ---------------------------------------------------------------- strength, enabled, state


@pytest.mark.parametrize("type_", TYPES)
def test_strength_and_enabled(type_):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    q = make(type_, num_bits=2, strategy="channel")
    full = q(x).detach()
    assert not torch.equal(full, x)
    q.strength = 0.5
    assert torch.equal(q(x), x + 0.5 * (full - x))
    off = make(type_, enabled=False)
    assert off(x) is x
    assert not off.initialized  # disabled: nothing learned from the data either


@pytest.mark.parametrize("type_", TYPES)
def test_optimizer_built_before_first_forward_updates_lazy_params(type_):
    q = make(type_, num_bits=3, strategy="channel")
    params = list(q.parameters())
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    (q(x) * torch.linspace(-1, 1, 16)).sum().backward()
    assert all(a is b for a, b in zip(params, q.parameters(), strict=True))
    before = [p.detach().clone() for p in q.parameters()]
    grads = [p.grad.clone() for p in q.parameters()]
    assert all(g.shape == (4,) and g.abs().sum() > 0 for g in grads)
    opt.step()
    for p, b, g in zip(q.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


@pytest.mark.parametrize("type_", TYPES)
def test_state_dict_round_trip(type_):
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(6))
    q1 = make(type_, strategy="channel")
    opt = torch.optim.SGD(q1.parameters(), lr=0.5)
    q1(x).pow(2).sum().backward()
    opt.step()
    q2 = make(type_, strategy="channel")
    q2.load_state_dict(q1.state_dict())
    assert q2.initialized
    for a, b in zip(q1.parameters(), q2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(q2(x * 3), q1(x * 3))  # not re-initialised from the new tensor


def test_state_dict_of_the_wrong_shape_is_rejected():
    with pytest.raises(RuntimeError, match="size mismatch"):
        make(strategy="tensor").load_state_dict({"scale": torch.ones(3)})
    q = make(strategy="channel")
    q(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="size mismatch"):
        q.load_state_dict({"scale": torch.ones(2)})


def test_group_count_mismatch_raises():
    q = make(strategy="channel")
    q(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="3 groups"):
        q(torch.ones(5, 4))


@pytest.mark.parametrize("type_", TYPES)
def test_meta_device(type_):
    q = make(type_, strategy="channel")
    x = torch.empty(3, 5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    assert y.is_meta and y.shape == (3, 5) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == (3, 5)
    assert not q.initialized  # no values on meta: the first real tensor initialises
    q(torch.ones(3, 5))
    assert q.initialized and q.scale.shape == (3,)
    assert q(torch.empty(3, 5, device="meta")).is_meta  # real params, meta input


# -- initialisation options ------------------------------------------------------------------


def test_init_absmax_is_the_plain_absmax_step():
    w = torch.randn(16, 64)
    q = LSQQuantizer({"num_bits": 4, "strategy": "channel", "init": "absmax"})
    q.init_from(w)
    assert torch.allclose(q.scale, w.abs().amax(1) / 7)


def test_init_mse_is_no_worse_than_absmax_and_picks_the_best_grid_point():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    errors = {}
    for init in ("absmax", "mse", "paper"):
        q = LSQQuantizer({"num_bits": 4, "strategy": "channel", "init": init})
        errors[init] = (q(w) - w).detach().square().sum(1)
    assert torch.all(errors["mse"] <= errors["absmax"] + 1e-6)
    assert errors["mse"].sum() < 0.9 * errors["absmax"].sum() < errors["paper"].sum()
    # brute force over the same grid for one row
    row, top = w[0], w[0].abs().max()
    best = min(
        ((torch.clamp(torch.round(row / s), -8, 7) * s - row).square().sum().item(), s.item())
        for s in (top * i / 20 / 7 for i in range(1, 21))
    )
    q = LSQQuantizer({"num_bits": 4, "strategy": "channel", "init": "mse"})
    q.init_from(w)
    assert q.scale[0].item() == pytest.approx(best[1], rel=1e-6)


@pytest.mark.parametrize(
    ("type_", "spec"),
    [
        ("lsq", {"strategy": "channel", "init": "mse"}),
        ("lsq", {"strategy": "channel", "init": "paper", "axis": 1}),
        ("lsq", {"strategy": "group", "group_size": 48, "init": "mse"}),  # ragged: NaN pads
        ("lsq+", {"strategy": "channel", "init": "minmax"}),
        ("lsq+", {"strategy": "group", "group_size": 48}),
    ],
)
def test_init_reads_the_rows_a_block_at_a_time_with_the_same_result(monkeypatch, type_, spec):
    """init_from takes the rows INIT_BLOCK elements at a time (small temporaries, so
    quantize's peak stays near the model's): the steps are those of one pass over all rows."""
    torch.manual_seed(0)
    w = torch.randn(37, 100).to(torch.bfloat16)
    whole = make(type_, num_bits=4, **spec)
    whole.init_from(w)
    monkeypatch.setattr(stefx.ste.lsq, "INIT_BLOCK", 150)  # 1 row of 100, or 3 groups of 48
    blocked = make(type_, num_bits=4, **spec)
    blocked.init_from(w)
    for name, value in whole.named_parameters():
        assert value.numel() == whole.granularity.num_groups(w.shape)
        assert torch.equal(value, dict(blocked.named_parameters())[name])


def test_init_option_is_checked():
    with pytest.raises(RecipeError, match="init='median'"):
        LSQQuantizer({"num_bits": 4, "init": "median"})
