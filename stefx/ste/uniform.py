"""``uniform``: k-bit affine fake quantization with a straight-through estimator.

Forward, per scale group (see :mod:`stefx.ste.granularity`)::

    q = clamp(round(x / s) + z, qmin, qmax)          codes
    y = (q - z) * s                                  dequantized value

- symmetric (``scale: absmax``): codes in [-2^(b-1), 2^(b-1) - 1], s = max|x| / (2^(b-1) - 1),
  z = 0;
- asymmetric (``scale: minmax``): codes in [0, 2^b - 1], s = (max(x,0) - min(x,0)) / (2^b - 1),
  z = round(-min(x,0) / s), so that 0 is exactly representable;
- sign-preserving (``scale: signed_absmax``, symmetric): s = m / -2^(b-1), m the element
  of largest magnitude with its sign (the first, on a tie), so m lands on the lowest code
  and all 2^b codes are used (llama.cpp's ``Q4_0``); a -m in the same group clamps to
  2^(b-1) - 1.

Two options fix the lattice to the last bit, for formats that store it so:

- ``rounding``: ``half_even`` (default, ``torch.round``), ``half_away`` (C's ``roundf``, as
  llama.cpp's ``Q8_0``), ``half_up`` (⌊v - qmin + ½⌋ + qmin in fp32, as ``Q4_0`` computes it);
- ``scale_dtype``: ``float32`` (default), ``float16`` or ``bfloat16``: the scale that
  multiplies the codes is rounded to it (codes still come from the fp32 scale, as
  llama.cpp computes them), so the fake-quantized value is what a file with fp16 scales
  dequantizes to.

Backward (``estimator``): ``clipped`` (default) passes the gradient where the code was not
clamped and zeroes it where it was, dy/dx = 1{qmin <= round(x/s)+z <= qmax}; ``identity``
passes it everywhere. The scale is a statistic of the input, not a learned parameter: no
gradient flows to it (as in ``torch.fake_quantize_per_channel_affine``, which this
matches bit for bit for the same s and z). Per-token 8-bit absmax is the activation
quantizer of BitNet (arXiv:2310.11453) and LLM.int8 (arXiv:2208.07339).

Non-finite input: a NaN or ±inf in a scale group makes that group's output non-finite
(its scale is NaN or inf), as a float op reading that row would; other groups are unaffected.

``freeze(x)`` computes s and z once and keeps them (static quantization);
``unfreeze()`` returns to per-call statistics.

The op is ``torch.ops.stefx.fake_quant``. What its backward keeps: nothing with
``identity``, nor with ``clipped`` and per-call absmax scales, where no code can be
clamped (|x| <= max|x| puts every code inside [-(2^(b-1) - 1), 2^(b-1) - 1]) so the mask
would be all ones; a boolean mask (one byte per element) with frozen or min/max scales.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from stefx.errors import RecipeError
from stefx.ste import ops
from stefx.ste.base import Quantizer
from stefx.ste.functions import wide
from stefx.ste.spec import register_quantizer

__all__ = ["UniformQuantizer", "code_range", "fake_quant", "minmax_qparams", "stored_scale"]

_EPS = 1e-12
ROUNDINGS = ("half_even", "half_away", "half_up")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stored_scale(scale: Tensor, scale_dtype: str) -> Tensor:
    """The scale that multiplies the codes: ``scale`` (fp32) rounded to ``scale_dtype``,
    nearest, ties to even, as ``.to(dtype)`` rounds. Computed on the fp32 bits rather
    than by a cast, because inductor keeps fused fp16 intermediates in fp32 and would drop
    a ``.to(float16).to(float32)`` round trip: compiled and eager must give the same
    lattice."""
    if scale_dtype == "float32":
        return scale
    s = scale.float()
    drop = 13 if scale_dtype == "float16" else 16  # mantissa bits fp32 has and it lacks
    bits = s.view(torch.int32)
    odd = (bits >> drop) & 1
    rounded = ((bits + ((1 << (drop - 1)) - 1) + odd) & ~((1 << drop) - 1)).view(torch.float32)
    if scale_dtype == "float16":  # below 2^-14 fp16 is subnormal: steps of 2^-24
        tiny = torch.round(s * 2.0**24) * 2.0**-24
        rounded = torch.where(s.abs() < 2.0**-14, tiny, rounded)
        rounded = torch.where(rounded.abs() > 65504.0, s.sign() * float("inf"), rounded)
    return torch.where(torch.isnan(s), s, rounded).to(scale.dtype)


def _round(codes: ops.Scratch, rounding: str, qmin: int) -> ops.Scratch:
    """Round ``codes.t`` in place (eager) by ``rounding``; see the module docstring."""
    if rounding == "half_even":
        return codes.round()
    v = codes.t
    if rounding == "half_up":  # floor(v + (½ - qmin)) + qmin, the sum kept in fp32
        return codes.add(0.5 - qmin).floor().add(qmin)
    # half_away, exactly: |v| = f + r with f = ⌊|v|⌋; round up when 2r >= 1 (no v + ½ rounding)
    a = v.abs()
    f = a.floor()
    return ops.Scratch(torch.sign(v) * (f + torch.floor(2 * (a - f))))


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b - 1] unsigned."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def minmax_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) per group from per-group min and max."""
    qmin, qmax = code_range(bits, symmetric)
    # No nan_to_num: a NaN or inf makes its group's scale NaN, so the whole group comes
    # out NaN - as a float matmul over that row would - instead of silently collapsing
    # to zero and hiding a diverged weight or activation.
    lo = lo.float().clamp(max=0.0)
    hi = hi.float().clamp(min=0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
    zero = (qmin - torch.round(lo / scale)).nan_to_num(qmin).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def _row_qparams(
    rows: Tensor, bits: int, symmetric: bool, signed_max: bool = False
) -> tuple[Tensor, Tensor]:
    if signed_max:  # s = m / qmin, m the (first) element of largest magnitude, signed
        m = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)).squeeze(1).float()
        scale = m / code_range(bits, True)[0]
        scale = torch.where(scale.abs() < _EPS, torch.full_like(scale, _EPS), scale)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    # Two reductions, not torch.aminmax: on CPU its dim= path is 5-10x slower.
    return minmax_qparams(rows.amin(dim=1), rows.amax(dim=1), bits, symmetric)


def _needs_mask(frozen: bool, symmetric: bool, clip: bool, signed_max: bool = False) -> bool:
    """Whether the clipping mask can differ from all-ones (see the module docstring)."""
    return clip and (frozen or not symmetric or signed_max)


def _fake(
    x,
    scale,
    zero_point,
    num_bits,
    symmetric,
    strategy,
    axis,
    group_size,
    clip,
    signed_max,
    rounding,
    scale_dtype,
    strength,
):
    g = ops.granularity(strategy, axis, group_size)
    y = ops.fake_rows_output(x)
    if not _needs_mask(scale is not None, symmetric, clip, signed_max) or x.numel() == 0:
        return y, x.new_empty(0, dtype=torch.bool)
    return y, x.new_empty(g.rows_shape(x.shape), dtype=torch.bool)


def _setup(ctx, inputs, output):
    ctx.granularity = ops.granularity(*inputs[5:8])
    mask = output[1]
    ctx.save_for_backward(mask if mask.numel() else None, inputs[-1])


def _backward(ctx, grad, _grad_mask):
    mask, strength = ctx.saved_tensors
    g = ops.scaled(grad, strength)
    if mask is not None:
        gran = ctx.granularity
        g = gran.unrows(ops.apply_mask(gran.rows(g), mask), grad.shape)
    return (ops.mix_input_grad(grad, g, strength), *(None,) * 12)


@ops.define("fake_quant", fake=_fake, setup_context=_setup, backward=_backward)
def fake_quant(
    x: Tensor,
    scale: Tensor | None,
    zero_point: Tensor | None,
    num_bits: int,
    symmetric: bool,
    strategy: str,
    axis: int | None,
    group_size: int | None,
    clip: bool,
    signed_max: bool,
    rounding: str,
    scale_dtype: str,
    strength: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Uniform affine fake quantization; returns ``(y, mask)``, the mask empty when the
    backward needs none. ``scale`` / ``zero_point`` None: absmax (signed with
    ``signed_max``) or min/max per group."""
    gran = ops.granularity(strategy, axis, group_size)
    rows = gran.rows(x)
    if x.numel() == 0:
        return ops.fake_rows_output(x), x.new_empty(0, dtype=torch.bool)
    qmin, qmax = code_range(num_bits, symmetric)
    frozen = scale is not None
    if not frozen:
        scale, zero_point = _row_qparams(rows, num_bits, symmetric, signed_max)
    s = scale.unsqueeze(1)
    # (clamp(round(x · (1/s)) + z, qmin, qmax) - z) · s, as torch.fake_quantize_* computes it
    codes = _round(ops.Scratch(wide(rows) * s.reciprocal()), rounding, qmin)
    z = None
    if not symmetric:  # symmetric codes have z = 0
        z = zero_point.unsqueeze(1).to(codes.t.dtype)
        codes.add(z)
    if _needs_mask(frozen, symmetric, clip, signed_max):
        mask = ops.Scratch(codes.t >= qmin).logical_and(codes.t <= qmax).t
    else:
        mask = x.new_empty(0, dtype=torch.bool)
    if frozen or not symmetric or signed_max:
        # (a symmetric absmax scale of this very call maps every |x| to at most
        # qmax·(1 + ε), which rounds to qmax: the clamp would be a pass that changes nothing)
        codes.clamp(qmin, qmax)
    if z is not None:
        codes.sub(z)
    y = codes.mul(stored_scale(s, scale_dtype)).t.to(x.dtype)
    y = ops.mix(rows, y, strength)
    return ops.from_rows(gran, y, x), mask


@register_quantizer("uniform")
class UniformQuantizer(Quantizer):
    bits_choices = (2, 3, 4, 5, 6, 7, 8, 16)
    default_bits = 8
    strategies = ("tensor", "channel", "group", "token")
    scales = ("absmax", "minmax", "signed_absmax")
    estimators = ("clipped", "identity")
    options = MappingProxyType({"rounding": "half_even", "scale_dtype": "float32"})
    allows_asymmetric = True
    mixes_strength = True

    @classmethod
    def check_options(cls, options, where: str) -> None:
        for key, choices in (("rounding", ROUNDINGS), ("scale_dtype", tuple(SCALE_DTYPES))):
            if options[key] not in choices:
                raise RecipeError(
                    f"{where}: {key}={options[key]!r} is invalid; choose one of {list(choices)}"
                )

    @classmethod
    def default_scale(cls, symmetric: bool) -> str:
        return "absmax" if symmetric else "minmax"

    @classmethod
    def check_scale(cls, scale: str, symmetric: bool, where: str) -> None:
        # The scale rule *is* the range choice: absmax gives signed codes around zero,
        # minmax an unsigned range with a zero point. Refuse contradictions, not guess.
        wanted = "absmax" if symmetric else "minmax"
        if scale != wanted and not (symmetric and scale == "signed_absmax"):
            raise RecipeError(
                f"{where}: scale={scale!r} contradicts symmetric={symmetric}; "
                f"use scale: {wanted} (or symmetric: {str(not symmetric).lower()})"
            )

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.qmin, self.qmax = code_range(self.bits, self.spec.symmetric)
        self.frozen = False
        self.register_buffer("scale", torch.empty(0), persistent=True)
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32), persistent=True)

    def sharing_key(self) -> tuple | None:
        return None if self.frozen else self._stateless_key()

    def qparams(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for each row of ``rows`` (frozen ones if frozen)."""
        if self.frozen:
            return self.scale, self.zero_point
        with torch.no_grad():
            return _row_qparams(rows, self.bits, self.spec.symmetric, self._signed_max)

    @property
    def _signed_max(self) -> bool:
        return self.spec.scale == "signed_absmax"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        scale, zero = (self.scale, self.zero_point) if self.frozen else (None, None)
        y, _ = fake_quant(
            x,
            scale,
            zero,
            s.num_bits,
            s.symmetric,
            s.strategy,
            s.axis,
            s.group_size,
            s.estimator == "clipped",
            self._signed_max,
            s.options["rounding"],
            s.options["scale_dtype"],
            self.strength_arg(),
        )
        return y

    @torch.no_grad()
    def freeze(self, x: torch.Tensor | None = None) -> None:
        """Fix s and z from ``x`` (or keep the ones already stored) for later calls."""
        if x is not None:
            self.frozen = False
            scale, zero = self.qparams(self.granularity.rows(x))
            self.scale = scale.clone()
            self.zero_point = zero.clone()
        if self.scale.numel() == 0:
            raise RuntimeError("freeze() needs a sample tensor the first time")
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.frozen:  # scales kept after unfreeze() must not load as frozen
            for name in ("scale", "zero_point"):
                destination[prefix + name] = getattr(self, name)[:0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Stored scales mean the quantizer was frozen when saved: resize and re-freeze.
        # Resize on the module's own device and dtype (the checkpoint may be on the CPU).
        for name in ("scale", "zero_point"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, getattr(self, name).new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.frozen = self.scale.numel() > 0
