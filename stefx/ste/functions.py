"""Autograd functions shared by several quantizers.

Each saves the least its backward needs: a boolean mask, or nothing. The fused ATen
fake-quantize kernel does the forward where it is available (it computes the clipping
mask in the same pass); a plain-tensor path serves the meta device and any dtype the
kernel rejects. Both evaluate ``(clamp(round(x * (1/s)) + z, qmin, qmax) - z) * s``
with round-half-to-even, the formula of ``torch.fake_quantize_per_channel_affine``.
"""

from __future__ import annotations

import torch

__all__ = ["fake_quant_rows", "fake_quant_rows_reference", "wide"]


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype quantizer arithmetic runs in: float32, or float64 for float64."""
    return x if x.dtype == torch.float64 else x.float()


def fake_quant_rows_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-tensor fake quantization of rows ``x`` (G, N) with per-row scale and zero point.

    Returns ``(y, mask)`` where mask marks elements whose code fell inside [qmin, qmax].
    """
    inv = (1.0 / scale).unsqueeze(1)
    codes = torch.round(x.float() * inv) + zero_point.unsqueeze(1).float()
    mask = (codes >= qmin) & (codes <= qmax)
    y = (codes.clamp(qmin, qmax) - zero_point.unsqueeze(1).float()) * scale.unsqueeze(1)
    return y.to(x.dtype), mask


def _kernel(x, scale, zero_point, qmin, qmax):
    if x.device.type == "meta":
        return fake_quant_rows_reference(x, scale, zero_point, qmin, qmax)
    return torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
        x, scale, zero_point, 0, qmin, qmax
    )


class _FakeQuantRows(torch.autograd.Function):
    """Forward: affine fake quantization. Backward: dy/dx = 1 inside [qmin, qmax], else 0
    (``clip=True``), or 1 everywhere (``clip=False``). No gradient to scale or zero point."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, clip):
        y, mask = _kernel(x, scale, zero_point, qmin, qmax)
        ctx.clip = clip
        if clip:
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip:
            (mask,) = ctx.saved_tensors
            # where, not grad * mask: a float-by-bool multiply takes a slow casting path.
            grad = torch.where(mask, grad, 0.0)
        return grad, None, None, None, None, None


def fake_quant_rows(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    clip: bool = True,
) -> torch.Tensor:
    """Fake-quantize the rows of ``x`` (G, N); ``scale`` float32 (G,), ``zero_point`` int32 (G,)."""
    return _FakeQuantRows.apply(x.contiguous(), scale, zero_point, qmin, qmax, clip)
