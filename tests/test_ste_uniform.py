"""The ``uniform`` quantizer: numerics against PyTorch's fake-quantize ops and a per-row
reference, closed-form examples, the straight-through gradient, freezing, and invariants.

Expected scales and zero points are computed here, independently of
:func:`stefx.ste.uniform.minmax_qparams`, and every numeric comparison is exact.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stefx
from stefx.ste.uniform import UniformQuantizer
from tests.ste_support import saved_during_forward

ALL_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
PROPERTY = settings(max_examples=40, deadline=None)


def uniform(**spec) -> UniformQuantizer:
    return stefx.make_quantizer({"type": "uniform", **spec})


def codes(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def expected_qparams(rows: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero point per row of a float32 (G, N) tensor, from the definitions."""
    if symmetric:
        scale = rows.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
        return scale, torch.zeros(rows.shape[0], dtype=torch.int32)
    hi = rows.amax(dim=1).clamp(min=0)
    lo = rows.amin(dim=1).clamp(max=0)
    scale = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / scale).clamp(0, 2**bits - 1).to(torch.int32)
    return scale, zero


def per_row_reference(rows: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Hand-written fake quantization, one row at a time: (clamp(round(x·(1/s)) + z) - z)·s."""
    qmin, qmax = codes(bits, symmetric)
    scale, zero = expected_qparams(rows, bits, symmetric)
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        s, z = scale[i], float(zero[i])
        q = torch.clamp(torch.round(row * (1.0 / s)) + z, qmin, qmax)
        out[i] = (q - z) * s
    return out


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    noise = (ref - y).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).mean().item() / noise)


def assert_exact(y: torch.Tensor, expected: torch.Tensor) -> None:
    assert y.shape == expected.shape and y.dtype == expected.dtype
    mismatched = (y != expected).sum().item()
    assert torch.equal(y, expected), (
        f"{mismatched} of {y.numel()} elements differ; SQNR {sqnr_db(expected, y):.1f} dB"
    )


# --------------------------------------------------------------------- reference numerics


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", [(8, 12), (6, 5, 3, 3)], ids=["linear", "conv"])
def test_channel_matches_torch_fake_quantize(bits, symmetric, axis, shape):
    torch.manual_seed(bits * 10 + axis)
    x = (
        torch.randn(shape)
        * torch.linspace(0.1, 3.0, shape[axis]).reshape(
            [-1 if d == axis else 1 for d in range(len(shape))]
        )
    ).requires_grad_()
    qmin, qmax = codes(bits, symmetric)
    scale, zero = expected_qparams(
        x.detach().movedim(axis, 0).reshape(shape[axis], -1), bits, symmetric
    )

    q = uniform(num_bits=bits, strategy="channel", axis=axis, symmetric=symmetric)
    y = q(x)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zero, axis, qmin, qmax)
    assert_exact(y, expected)
    # Same surrogate gradient as torch's op (1 inside the code range).
    gy = torch.randn(shape)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gx_torch,) = torch.autograd.grad(expected, x, gy)
    assert torch.equal(gx, gx_torch)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_tensor_matches_torch_fake_quantize(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(7, 9) * 2 + (0.0 if symmetric else 0.7)
    qmin, qmax = codes(bits, symmetric)
    scale, zero = expected_qparams(x.reshape(1, -1), bits, symmetric)
    expected = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero.item()), qmin, qmax)
    assert_exact(uniform(num_bits=bits, symmetric=symmetric)(x), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("shape", "group_size"),
    [((6, 16), 4), ((6, 16), 16), ((2, 5, 12), 3)],
    ids=["linear-g4", "linear-whole-row", "activation-g3"],
)
def test_group_matches_per_row_reference(bits, symmetric, shape, group_size):
    torch.manual_seed(group_size)
    x = torch.randn(shape) * torch.rand(shape[-1]) * 4
    q = uniform(num_bits=bits, strategy="group", group_size=group_size, symmetric=symmetric)
    expected = per_row_reference(x.reshape(-1, group_size), bits, symmetric).reshape(shape)
    assert_exact(q(x), expected)


def test_group_on_axis_0_matches_per_row_reference():
    torch.manual_seed(0)
    x = torch.randn(8, 3) * torch.tensor([0.1, 1.0, 10.0])
    q = uniform(num_bits=4, strategy="group", group_size=4, axis=0)
    rows = x.t().reshape(-1, 4)  # runs of 4 down each column
    expected = per_row_reference(rows, 4, True).reshape(3, 8).t()
    assert_exact(q(x), expected)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 12)], ids=["linear", "activation"])
def test_token_matches_per_row_reference(bits, symmetric, shape):
    torch.manual_seed(bits)
    x = torch.randn(shape) * torch.rand(shape[:-1]).unsqueeze(-1) * 5
    q = uniform(num_bits=bits, strategy="token", symmetric=symmetric)
    expected = per_row_reference(x.reshape(-1, shape[-1]), bits, symmetric).reshape(shape)
    assert_exact(q(x), expected)


def test_group_size_that_does_not_divide_gives_a_ragged_last_group():
    """12 inputs in groups of 5: 5, 5 and a last group of 2, each its own absmax scale."""
    q = uniform(num_bits=4, strategy="group", group_size=5)
    x = torch.randn(3, 12)
    chunks = [per_row_reference(x[:, i : i + 5], 4, True) for i in range(0, 12, 5)]
    assert_exact(q(x), torch.cat(chunks, dim=1))


# -------------------------------------------------------------------------- closed form


def test_closed_form_symmetric_4bit():
    # absmax 3.5 -> s = 3.5 / 7 = 0.5; x/s = [-7, 1.5, 2.5, 4, 0.4, -0.6]
    # round half to even: 1.5 -> 2, 2.5 -> 2.
    x = torch.tensor([-3.5, 0.75, 1.25, 2.0, 0.2, -0.3])
    y = uniform(num_bits=4)(x)
    assert y.tolist() == [-3.5, 1.0, 1.0, 2.0, 0.0, -0.5]


def test_closed_form_asymmetric_2bit():
    # min -1, max 2 -> s = 3 / 3 = 1, z = round(1 / 1) = 1; codes round(x) + 1 in [0, 3]
    x = torch.tensor([-1.0, 0.0, 0.5, 1.4, 2.0])
    q = uniform(num_bits=2, symmetric=False)
    assert q(x).tolist() == [-1.0, 0.0, 0.0, 1.0, 2.0]


def test_closed_form_per_channel_3bit():
    # row 0: s = 3 / 3 = 1; row 1: s = 0.75 / 3 = 0.25
    x = torch.tensor([[3.0, -1.2, 0.4], [0.75, 0.3, -0.1]])
    y = uniform(num_bits=3, strategy="channel")(x)
    assert y.tolist() == [[3.0, -1.0, 0.0], [0.75, 0.25, -0.0]]


# ---------------------------------------------------------------------------- backward


def frozen_unit_scale(estimator: str) -> UniformQuantizer:
    """4-bit symmetric with s = 1 frozen: codes [-8, 7], so |x| beyond them is clamped."""
    q = uniform(num_bits=4, estimator=estimator)
    q.freeze(torch.tensor([-4.0, 7.0]))
    assert q.scale.tolist() == [1.0]
    return q


CLAMP_INPUT = [-9.0, -8.6, -8.5, -8.0, 0.3, 7.4, 7.5, 7.6, 100.0]


def test_clipped_gradient_is_one_inside_and_zero_where_clamped():
    x = torch.tensor(CLAMP_INPUT, requires_grad=True)
    y = frozen_unit_scale("clipped")(x)
    y.backward(torch.full_like(x, 3.0))
    # -8.5 rounds to -8 (inside); 7.5 rounds to 8 (clamped)
    assert y.tolist() == [-8.0, -8.0, -8.0, -8.0, 0.0, 7.0, 7.0, 7.0, 7.0]
    assert x.grad.tolist() == [0.0, 0.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0]


def test_identity_gradient_is_one_everywhere():
    x = torch.tensor(CLAMP_INPUT, requires_grad=True)
    y = frozen_unit_scale("identity")(x)
    y.backward(torch.full_like(x, 3.0))
    assert x.grad.tolist() == [3.0] * len(CLAMP_INPUT)


def test_dynamic_symmetric_never_clips():
    x = torch.randn(4, 33, requires_grad=True)
    uniform(num_bits=2, strategy="channel")(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_scale_is_a_statistic_not_a_parameter():
    q = uniform(num_bits=4, strategy="channel")
    assert list(q.parameters()) == []
    x = torch.randn(3, 4, requires_grad=True)
    q.freeze(x)
    assert not q.scale.requires_grad
    q(x).sum().backward()
    assert q.scale.grad is None and x.grad is not None


# --------------------------------------------------------------------- freeze and state


def test_freeze_uses_the_sample_scale_until_unfreeze():
    torch.manual_seed(0)
    q = uniform(num_bits=4, strategy="channel")
    calib, x = torch.randn(3, 8), 5 * torch.randn(3, 8)
    q.freeze(calib)
    scale, zero = expected_qparams(calib, 4, True)
    assert torch.equal(q.scale, scale) and q.frozen
    assert_exact(q(x), torch.fake_quantize_per_channel_affine(x, scale, zero, 0, -8, 7))
    q.unfreeze()
    assert not q.frozen
    assert_exact(q(x), uniform(num_bits=4, strategy="channel")(x))
    q.freeze()  # re-freezes with the stored scale
    assert q.frozen and torch.equal(q.scale, scale)


def test_first_freeze_needs_a_sample():
    with pytest.raises(RuntimeError, match="sample tensor"):
        uniform(num_bits=4).freeze()


@pytest.mark.parametrize("symmetric", [True, False])
def test_state_dict_round_trip_of_frozen_quantizer(symmetric):
    torch.manual_seed(1)
    spec = {"num_bits": 3, "strategy": "channel", "symmetric": symmetric}
    q = uniform(**spec)
    q.freeze(torch.randn(4, 6))
    fresh = uniform(**spec)
    assert not fresh.frozen
    fresh.load_state_dict(q.state_dict())
    assert fresh.frozen
    assert torch.equal(fresh.scale, q.scale) and torch.equal(fresh.zero_point, q.zero_point)
    x = 3 * torch.randn(4, 6)
    assert_exact(fresh(x), q(x))


def test_state_dict_of_unfrozen_quantizer_loads_unfrozen():
    spec = {"num_bits": 4, "strategy": "channel"}
    never = uniform(**spec)
    thawed = uniform(**spec)
    thawed.freeze(torch.randn(4, 6))
    thawed.unfreeze()
    for source in (never, thawed):
        fresh = uniform(**spec)
        fresh.load_state_dict(source.state_dict())
        assert not fresh.frozen


@pytest.mark.filterwarnings("ignore:for (scale|zero_point). copying from a non-meta")
def test_load_state_dict_keeps_the_module_device():
    # load_state_dict(torch.load(path, map_location="cpu")) into a model already on its
    # device must not move the quantizer's buffers to the checkpoint's device.
    q = uniform(num_bits=4, strategy="channel")
    q.freeze(torch.randn(4, 6))
    on_meta = uniform(num_bits=4, strategy="channel").to("meta")
    on_meta.load_state_dict(q.state_dict())
    assert on_meta.frozen
    assert on_meta.scale.device.type == "meta" and on_meta.zero_point.device.type == "meta"
    assert on_meta.scale.shape == (4,) and on_meta.zero_point.dtype == torch.int32


# ------------------------------------------------------------------ saved tensors, meta


def saved_by_backward(q: UniformQuantizer, x: torch.Tensor) -> list[torch.Tensor]:
    y, saved = saved_during_forward(q, x)
    y.sum().backward()
    return saved


@pytest.mark.parametrize("strategy", ["tensor", "channel", "token"])
def test_clipped_per_call_absmax_saves_nothing(strategy):
    # Every code of a per-call absmax scale is in range, so the mask would be all ones.
    x = torch.randn(4, 6, requires_grad=True)
    saved = saved_by_backward(uniform(num_bits=4, strategy=strategy, axis=None), x)
    assert saved == []
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("strategy", ["tensor", "channel", "token"])
@pytest.mark.parametrize("how", ["minmax", "frozen"])
def test_clipped_minmax_or_frozen_saves_only_a_bool_mask(strategy, how):
    x = torch.randn(4, 6, requires_grad=True)
    q = uniform(num_bits=4, strategy=strategy, axis=None, symmetric=how != "minmax")
    if how == "frozen":
        q.freeze(x.detach() / 2)  # half the range: about half the codes clip
    saved = saved_by_backward(q, x)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.bool, x.numel())]
    if how == "frozen":
        assert 0 < x.grad.sum() < x.numel()


def test_identity_saves_nothing():
    x = torch.randn(4, 6, requires_grad=True)
    assert saved_by_backward(uniform(num_bits=4, estimator="identity"), x) == []


@pytest.mark.parametrize("strategy", ["tensor", "channel", "token", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_tensor_in_meta_tensor_out(strategy, symmetric, dtype):
    q = uniform(
        num_bits=4,
        strategy=strategy,
        symmetric=symmetric,
        group_size=4 if strategy == "group" else None,
    )
    x = torch.empty(2, 3, 8, device="meta", dtype=dtype, requires_grad=True)
    y = q(x)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape


# ------------------------------------------------------------------ hypothesis invariants


def float_arrays(lo: float = -100.0, hi: float = 100.0, elements=None):
    """Small float32 arrays (1-3 dims, sides 1-8), values in [lo, hi] unless ``elements``."""
    if elements is None:
        elements = st.floats(lo, hi, width=32)
    shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=8)
    return hnp.arrays(np.float32, shapes, elements=elements)


@st.composite
def quantizer_and_input(draw, arrays=None, bits=(2, 3, 4, 8, 16)):
    x = torch.from_numpy(draw(arrays if arrays is not None else float_arrays()))
    strategy = draw(st.sampled_from(["tensor", "channel", "token", "group"]))
    spec = {
        "num_bits": draw(st.sampled_from(bits)),
        "strategy": strategy,
        "symmetric": draw(st.booleans()),
        "estimator": draw(st.sampled_from(["clipped", "identity"])),
    }
    if strategy == "group":
        size = x.shape[-1]
        spec["group_size"] = draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    return uniform(**spec), x


@PROPERTY
@given(quantizer_and_input(bits=(2, 3, 4)))
def test_at_most_2_pow_b_levels_per_scale_group(qx):
    q, x = qx
    rows = q.granularity.rows(q(x))
    for row in rows:
        assert torch.unique(row).numel() <= 2**q.bits


@PROPERTY
@given(quantizer_and_input())
def test_idempotent_with_frozen_scale(qx):
    q, x = qx
    q.freeze(x)
    y = q(x)
    assert_exact(q(y), y)


@PROPERTY
@given(quantizer_and_input(arrays=float_arrays(0.0, 0.0)))
def test_zeros_stay_zeros(qx):
    q, x = qx
    x.requires_grad_()
    y = q(x)
    assert torch.equal(y, torch.zeros_like(x)) and not y.isnan().any()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


NON_FINITE = st.one_of(
    st.floats(-10, 10, width=32), st.sampled_from([math.nan, math.inf, -math.inf])
)


@PROPERTY
@given(quantizer_and_input(arrays=float_arrays(elements=NON_FINITE)))
def test_nan_and_inf_do_not_raise(qx):
    q, x = qx
    x.requires_grad_()
    y = q(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape


@PROPERTY
@given(hnp.arrays(np.float32, (4, 6), elements=NON_FINITE))
def test_non_finite_values_do_not_leak_into_other_channels(a):
    x = torch.from_numpy(a)
    q = uniform(num_bits=4, strategy="channel")
    y = q(x)
    finite = x.isfinite().all(dim=1)
    if finite.any():
        assert_exact(y[finite], q(x[finite]))


@PROPERTY
@given(
    quantizer_and_input(),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_output_dtype_and_shape_follow_the_input(qx, dtype):
    q, x = qx
    x = x.to(dtype).requires_grad_()
    y = q(x)
    assert y.dtype == dtype and y.shape == x.shape
    y.sum().backward()
    assert x.grad.dtype == dtype


@PROPERTY
@given(quantizer_and_input())
def test_strength_half_is_halfway_and_disabled_is_identity(qx):
    q, x = qx
    spec = q.spec.to_dict()
    half = stefx.make_quantizer({**spec, "strength": 0.5})
    assert_exact(half(x), x + 0.5 * (q(x) - x))
    off = stefx.make_quantizer({**spec, "enabled": False})
    assert off(x) is x
    q.enabled = False
    assert q(x) is x


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_non_finite_value_poisons_only_its_own_group(bad, symmetric):
    spec = {"type": "uniform", "num_bits": 4, "strategy": "channel", "symmetric": symmetric}
    q = stefx.make_quantizer(spec)
    x = torch.randn(3, 8)
    clean = q(x)
    x[1, 3] = bad
    y = q(x)
    assert not y[1].isfinite().any()  # visible, not collapsed to zeros
    assert torch.equal(y[[0, 2]], clean[[0, 2]])
