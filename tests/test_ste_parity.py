"""Parity: every quantizer family and granularity against a plain-torch reference
(tests/ste_reference.py): bit-exact forward, gradients within float tolerance, on both
roads a call can take (the eager autograd function, and the registered torch.ops.stefx
op that compile, export and dispatch modes see), with and without a strength λ."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stefx
from stefx.ste.granularity import Granularity
from tests import ste_reference as ref


class _OpRoad(TorchDispatchMode):
    """Any active dispatch mode sends stefx calls through the registered op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run(q, x, road):
    x = x.detach().clone().requires_grad_(True)
    if road == "op":
        with _OpRoad():
            y = q(x)
    else:
        y = q(x)
    upstream = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    y.backward(upstream)
    grads = [p.grad.clone() for p in q.parameters() if p.grad is not None]
    for p in q.parameters():
        p.grad = None
    return y.detach(), x.grad, grads, upstream


def _reference(value_surrogate, x_leaf, params, upstream):
    value, surrogate = value_surrogate
    surrogate.backward(upstream)
    return value, x_leaf.grad, [p.grad for p in params if p.grad is not None]


def _x(shape=(6, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.8


ROADS = ["eager", "op"]
STRATEGIES = [("tensor", None), ("channel", None), ("token", None), ("group", 4)]


def _rows_ref(q, x, fn):
    """Apply a reference on q's row view of x and map the result back to x's shape."""
    gran = Granularity(q.spec.strategy, q.spec.axis, q.spec.group_size)
    leaf = x.detach().clone().requires_grad_(True)
    value, surrogate = fn(gran.rows(leaf))
    return (gran.unrows(value, x.shape), gran.unrows(surrogate, x.shape)), leaf


def _check(q, x, fn, road, params=(), atol=1e-6):
    y, gx, gp, upstream = _run(q, x, road)
    (value, surrogate), leaf = _rows_ref(q, x, fn)
    surrogate.backward(upstream)
    assert torch.equal(y, value), (y - value).abs().max()
    torch.testing.assert_close(gx, leaf.grad, rtol=1e-5, atol=atol)
    ref_grads = [p.grad for p in params]
    for mine, theirs in zip(gp, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize(("strategy", "group"), STRATEGIES)
@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (4, True), (4, False), (2, False)])
def test_uniform(road, strategy, group, bits, symmetric):
    q = stefx.make_quantizer(
        {
            "type": "uniform",
            "num_bits": bits,
            "strategy": strategy,
            "group_size": group,
            "symmetric": symmetric,
        }
    )
    _check(q, _x(), lambda r: ref.uniform(r, bits, symmetric), road)


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize("strategy", ["tensor", "channel", "group"])
@pytest.mark.parametrize("type_", ["lsq", "lsq+"])
def test_lsq(road, strategy, type_):
    spec = {"type": type_, "num_bits": 3, "strategy": strategy}
    if strategy == "group":
        spec["group_size"] = 4
    q = stefx.make_quantizer(spec)
    x = _x()
    q.init_from(x)
    with torch.no_grad():  # a step that clips some values and leaves others inside
        q.scale.mul_(0.7)
    scale = q.scale.detach().clone().requires_grad_(True)
    offset = q.offset.detach().clone().requires_grad_(True) if type_ == "lsq+" else None
    params = [scale] + ([offset] if offset is not None else [])
    fn = lambda r: ref.lsq(r, scale, offset, q.qmin, q.qmax)  # noqa: E731
    _check(q, x, fn, road, params)


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize("estimator", ["clipped", "identity", "approx_sign", "swish_sign", "ede"])
@pytest.mark.parametrize(
    ("scale", "strategy"), [("none", "tensor"), ("absmean", "tensor"), ("absmean", "channel")]
)
def test_binary(road, estimator, scale, strategy):
    q = stefx.make_quantizer(
        {"type": "binary", "estimator": estimator, "scale": scale, "strategy": strategy}
    )
    q.progress = 0.3
    params = q.estimator_params()
    x = _x() * 1.5
    # autograd of SwishSign's own formula loses digits to cancellation near 0
    atol = 1e-5 if estimator == "swish_sign" else 1e-6
    _check(q, x, lambda r: ref.binary(r, estimator, scale, params), road, atol=atol)


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize("method", ["absmean", "twn"])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_ternary(road, method, strategy):
    q = stefx.make_quantizer({"type": "ternary", "scale": method, "strategy": strategy})
    _check(q, _x(), lambda r: ref.ternary(r, method), road)


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize(
    ("spec", "grid"),
    [
        ({"type": "seq", "num_bits": 2}, (2.0, 0.5, 1)),
        ({"type": "seq", "num_bits": 3, "strategy": "tensor"}, (4.0, 0.5, 3)),
        ({"type": "ternary", "scale": "seq", "strategy": "channel"}, (1.5, 0.0, 1)),
    ],
)
def test_seq(road, spec, grid):
    q = stefx.make_quantizer(spec)
    x = _x()
    q.init_from(x)
    with torch.no_grad():
        q.alpha.mul_(0.6)  # some weights beyond the clip range
    alpha = q.alpha.detach().clone().requires_grad_(True)
    _check(q, x, lambda r: ref.seq(r, alpha, *grid), road, [alpha])


@pytest.mark.parametrize("road", ROADS)
def test_pact(road):
    q = stefx.make_quantizer({"type": "pact", "num_bits": 3, "alpha_init": 1.0})
    alpha = q.alpha.detach().clone().requires_grad_(True)
    _check(q, _x() * 2, lambda r: ref.pact(r, alpha, 3), road, [alpha])


@pytest.mark.parametrize("road", ROADS)
def test_dorefa_weight(road):
    q = stefx.make_quantizer({"type": "dorefa", "num_bits": 3})
    _check(q, _x(), lambda r: ref.dorefa_weight(r, 3), road)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "uniform", "num_bits": 4, "strategy": "channel"},
        {"type": "lsq", "num_bits": 4},
        {"type": "binary", "scale": "absmean", "estimator": "approx_sign"},
        {"type": "ternary", "scale": "absmean"},
        {"type": "seq", "num_bits": 2},
        {"type": "pact", "num_bits": 4, "alpha_init": 1.0},
        {"type": "dorefa", "num_bits": 2, "role": "activation"},
    ],
    ids=lambda s: s["type"],
)
def test_strength_mixes_on_both_roads(spec):
    """y = x + λ(q(x) - x), and both roads agree to the bit, gradients included."""
    x = _x()
    full = stefx.make_quantizer(spec)
    ramped = stefx.make_quantizer({**spec, "strength": 0.25})
    full.init_from(x)
    ramped.init_from(x)
    ramped.load_state_dict(full.state_dict())
    eager = _run(ramped, x, "eager")
    op = _run(ramped, x, "op")
    with torch.no_grad():
        expected = x + 0.25 * (full(x) - x)
    torch.testing.assert_close(eager[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(eager[0], op[0])
    torch.testing.assert_close(eager[1], op[1], rtol=0, atol=0)
    for a, b in zip(eager[2], op[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
