"""``uniform``: k-bit affine fake quantization with a straight-through estimator.

Forward, per scale group (see :mod:`stefx.ste.granularity`)::

    q = clamp(round(x / s) + z, qmin, qmax)          codes
    y = (q - z) * s                                  dequantized value

- symmetric (``scale: absmax``): codes in [-2^(b-1), 2^(b-1) - 1], s = max|x| / (2^(b-1) - 1),
  z = 0;
- asymmetric (``scale: minmax``): codes in [0, 2^b - 1], s = (max(x,0) - min(x,0)) / (2^b - 1),
  z = round(-min(x,0) / s), so that 0 is exactly representable.

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

import torch
from torch import Tensor

from stefx.errors import RecipeError
from stefx.ste import ops
from stefx.ste.base import Quantizer
from stefx.ste.functions import wide
from stefx.ste.spec import register_quantizer

__all__ = ["UniformQuantizer", "code_range", "fake_quant", "minmax_qparams"]

_EPS = 1e-12


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


def _row_qparams(rows: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    # Two reductions, not torch.aminmax: on CPU its dim= path is 5-10x slower.
    return minmax_qparams(rows.amin(dim=1), rows.amax(dim=1), bits, symmetric)


def _needs_mask(frozen: bool, symmetric: bool, clip: bool) -> bool:
    """Whether the clipping mask can differ from all-ones (see the module docstring)."""
    return clip and (frozen or not symmetric)


def _fake(x, scale, zero_point, num_bits, symmetric, strategy, axis, group_size, clip, strength):
    g = ops.granularity(strategy, axis, group_size)
    y = ops.fake_rows_output(x)
    if not _needs_mask(scale is not None, symmetric, clip) or x.numel() == 0:
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
    return (ops.mix_input_grad(grad, g, strength), *(None,) * 9)


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
    strength: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Uniform affine fake quantization; returns ``(y, mask)``, the mask empty when the
    backward needs none. ``scale`` / ``zero_point`` None: absmax or min/max per group."""
    gran = ops.granularity(strategy, axis, group_size)
    rows = gran.rows(x)
    if x.numel() == 0:
        return ops.fake_rows_output(x), x.new_empty(0, dtype=torch.bool)
    qmin, qmax = code_range(num_bits, symmetric)
    frozen = scale is not None
    if not frozen:
        scale, zero_point = _row_qparams(rows, num_bits, symmetric)
    s = scale.unsqueeze(1)
    # (clamp(round(x · (1/s)) + z, qmin, qmax) - z) · s, as torch.fake_quantize_* computes it
    codes = ops.Scratch(wide(rows) * s.reciprocal()).round()
    z = None
    if not symmetric:  # symmetric codes have z = 0
        z = zero_point.unsqueeze(1).to(codes.t.dtype)
        codes.add(z)
    if _needs_mask(frozen, symmetric, clip):
        mask = ops.Scratch(codes.t >= qmin).logical_and(codes.t <= qmax).t
    else:
        mask = x.new_empty(0, dtype=torch.bool)
    if frozen or not symmetric:
        # (a symmetric absmax scale of this very call maps every |x| to at most
        # qmax·(1 + ε), which rounds to qmax: the clamp would be a pass that changes nothing)
        codes.clamp(qmin, qmax)
    if z is not None:
        codes.sub(z)
    y = codes.mul(s).t.to(x.dtype)
    y = ops.mix(rows, y, strength)
    return ops.from_rows(gran, y, x), mask


@register_quantizer("uniform")
class UniformQuantizer(Quantizer):
    bits_choices = (2, 3, 4, 5, 6, 7, 8, 16)
    default_bits = 8
    strategies = ("tensor", "channel", "group", "token")
    scales = ("absmax", "minmax")
    estimators = ("clipped", "identity")
    allows_asymmetric = True
    mixes_strength = True

    @classmethod
    def default_scale(cls, symmetric: bool) -> str:
        return "absmax" if symmetric else "minmax"

    @classmethod
    def check_scale(cls, scale: str, symmetric: bool, where: str) -> None:
        # The scale rule *is* the range choice: absmax gives signed codes around zero,
        # minmax an unsigned range with a zero point. Refuse contradictions, not guess.
        wanted = "absmax" if symmetric else "minmax"
        if scale != wanted:
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
            return _row_qparams(rows, self.bits, self.spec.symmetric)

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
