"""Plain-torch reference quantizers for the parity tests, written the textbook way and
independent of stefx's kernels. Each returns ``(value, surrogate)``: ``value`` the
quantized tensor computed directly (compared bit for bit), ``surrogate`` an expression
whose autograd gradient is the estimator's (compared within float tolerance). Inputs
are row views (G, N)."""

from __future__ import annotations

import math

import torch

__all__ = ["binary", "dorefa_weight", "lsq", "pact", "seq", "ternary", "uniform"]


def _ste(value: torch.Tensor, surrogate: torch.Tensor):
    return value.detach(), surrogate


def uniform(rows, bits, symmetric, clip=True):
    """Per-row absmax / min-max fake quantization by torch's own fake-quantize."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = (rows.detach().abs().amax(1) / qmax).clamp(min=1e-12)
        zero = torch.zeros(rows.shape[0], dtype=torch.int32)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = rows.detach().amin(1).clamp(max=0), rows.detach().amax(1).clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    y = torch.fake_quantize_per_channel_affine(rows, scale, zero, 0, qmin, qmax)
    return _ste(y, y if clip else rows)


def _grad_scaled(p, g):
    """p in the forward, g·dL/dp in the backward (LSQ's gradient scale)."""
    return p * g + (p - p * g).detach()


def lsq(rows, scale, offset, qmin, qmax, grad_scale=True):
    g = 1.0 / math.sqrt(rows.shape[1] * qmax) if grad_scale else 1.0
    s = scale.clamp_min(1e-12).unsqueeze(1)
    b = offset.unsqueeze(1) if offset is not None else 0.0
    value = ((rows - b) / s).clamp(qmin, qmax).round() * s + b
    s_g = _grad_scaled(scale, g).clamp_min(1e-12).unsqueeze(1)
    b_g = _grad_scaled(offset, g).unsqueeze(1) if offset is not None else 0.0
    u = (rows - b_g) / s_g
    # strictly inside passes x's gradient; a code on a bound counts as clipped
    inside = ((u > qmin) & (u < qmax)).detach()
    uc = torch.where(inside, u, u.detach().clamp(qmin, qmax))
    return _ste(value, (uc + (uc.round() - uc).detach()) * s_g + b_g)


_SURROGATES = {
    "identity": lambda x, p: x,
    "clipped": lambda x, p: x.clamp(-1, 1),
    "approx_sign": lambda x, p: torch.where(x.abs() <= 1, 2 * x - x * x.abs(), x.sign()),
    "swish_sign": lambda x, p: (
        2 * torch.sigmoid(p["beta"] * x) * (1 + p["beta"] * x * (1 - torch.sigmoid(p["beta"] * x)))
        - 1
    ),
    "ede": lambda x, p: p["k"] * torch.tanh(p["t"] * x),
}


def binary(rows, estimator, scale, params):
    """α·sign(x), sign(0) = +1, with the estimator's surrogate F (dF/dx = g'(x))."""
    sign = torch.where(rows < 0, -1.0, 1.0)
    f = _SURROGATES[estimator](rows, params)
    y = f + (sign - f).detach()
    if scale == "absmean":
        alpha = rows.abs().mean(1, keepdim=True)
        return _ste(sign * alpha, y * alpha)
    return _ste(sign, y)


def ternary(rows, method, eps=1e-5):
    w = rows.detach()
    if method == "absmean":
        gamma = w.abs().mean(1, keepdim=True)
        q = (w / (gamma + eps)).round().clamp(-1, 1) * gamma
    else:
        delta = 0.7 * w.abs().mean(1, keepdim=True)
        keep = w.abs() > delta
        alpha = (w.abs() * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
        q = torch.where(keep, alpha * w.sign(), torch.zeros_like(w))
    return _ste(q + 0.0, rows)


def seq(rows, alpha, n_levels, shift, code_bound, eps=1e-5, clip=1 - 1e-2):
    """ParetoQ's SEQ; the gradients of ParetoQ's StretchedElasticQuant as zero-valued
    terms: dy/dW = 1{|u| <= c}, dy/dα = g·(q(u) - u inside, sign(u)·top outside)."""
    g = 1.0 / math.sqrt(rows.numel() * code_bound)
    a = torch.where(alpha > eps, alpha, torch.full_like(alpha, eps)).unsqueeze(1)
    u = rows.detach() / a.detach()
    inside = u.abs() <= clip
    levels = (torch.round(u.clamp(-clip, clip) * n_levels - shift) + shift + 0.0) / n_levels
    top = (n_levels - shift) / n_levels
    slope = torch.where(inside, levels - u, torch.sign(u) * top)
    a_g = _grad_scaled(a, g)
    surrogate = (rows - rows.detach()) * inside + (a_g - a_g.detach()) * slope
    return _ste(levels * a.detach(), surrogate)


def pact(x, alpha, bits):
    levels = 2**bits - 1
    a = alpha.clamp_min(1e-12)
    step = a / levels
    value = (torch.minimum(x.clamp_min(0), a) / step).round() * step
    # x's gradient on 0 <= x < α, α's where x >= α
    surrogate = torch.where(x >= a.detach(), a, torch.where(x >= 0, x, x.detach() * 0))
    return _ste(value, surrogate)


def dorefa_weight(w, bits):
    levels = 2**bits - 1
    t = torch.tanh(w)
    r = t / (2 * t.abs().amax()) + 0.5
    value = 2 * ((r * levels).round() / levels) - 1
    return _ste(value, 2 * r - 1)
