"""``ternary``: weights on three levels {-a, 0, +a} per scale group, three ways to find a.

A ternary code carries log2(3) ≈ 1.58 bits; stefx stores it in 2 bits, so ``bits`` (what
the profiler counts) is 2 and ``levels`` is 3. Strategies: ``tensor`` (one scale) or
``channel`` (one per output channel, axis 0). Backward (``estimator: ste``, the only
one) is each method's own straight-through estimator, given below.

``scale: absmean`` (default; BitNet b1.58, Ma et al., arXiv:2402.17764)::

    γ = mean|W|                                    (per tensor by default; per channel allowed)
    y = RoundClip(W / (γ + ε), -1, 1) · γ          RoundClip(v) = clamp(round(v), -1, 1)

``round`` is round-half-to-even; ε is the option ``eps`` (1e-5), so an all-zero W gives
y = 0. Backward: identity STE, dL/dW = dL/dy; γ gets no gradient.

``scale: twn`` (Ternary Weight Networks, Li et al., arXiv:1605.04711)::

    Δ = 0.7 · mean|W|
    α = mean of |W_i| over {i : |W_i| > Δ}        (0 when that set is empty)
    y = α · sign(W) · 1{|W| > Δ}

Backward: identity STE to W; Δ and α get no gradient. A group holding NaN or ±inf has
Δ = NaN or inf; its zeroed entries are then NaN too, so a diverged weight stays visible.

``scale: seq`` (Stretched Elastic Quant, ParetoQ, Liu et al., arXiv:2502.02631), with a
learned α > 0 per group (ParetoQ uses one per output channel: ``strategy: channel``)::

    a = α if α > ε else ε                           (the step never reaches 0)
    u = W / a
    y = a · round(1.5 · clamp(u, -c, c)) / 1.5      c = 1 - 10⁻², levels a·{-2/3, 0, 2/3}

Three equal-width bins split [-a, a] at ±a/3 and each level sits at its bin's centre, so
the levels are spread evenly and all of them are used (the "stretch"); c keeps
round-half-to-even from making a fourth level at |u| = 1. Backward, following ParetoQ's
reference code with LSQ's gradient scale g = 1/sqrt(numel(W)·Q_p), Q_p = 1::

    dL/dW_i = dL/dy_i · 1{|u_i| <= c}
    dL/dα   = g · Σ_row dL/dy_i · (y_i/a - u_i   if |u_i| <= c   else sign(u_i))

In the clipped region ParetoQ's code uses ±Q_p = ±1 (the clip bound) rather than the top
level ±2/3; stefx keeps ±1. The α gradient passes to α even while a = ε. Init: α is an
``nn.Parameter`` of shape (groups,), empty until the first forward (or ``init_from``),
which sets ``alpha.data`` to max|W| per group (as ParetoQ's training script does for
ternary), NaN and ±inf entries ignored. The same Parameter object is kept, so an
optimizer built before the first forward still holds it; the empty α must already be on
W's device (``model.to(...)`` moves it; a CPU α cannot take a meta W). The backward saves
W itself (no copy) and α.

>>> import torch
>>> from stefx.ste.ternary import TernaryQuantizer
>>> q = TernaryQuantizer({"scale": "absmean"})
>>> w = torch.tensor([-1.5, -0.25, 0.75, 3.0], requires_grad=True)
>>> y = q(w)
>>> y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
>>> y.tolist(), w.grad.tolist()
([-1.375, 0.0, 1.375, 1.375], [1.0, 2.0, 3.0, 4.0])
>>> q = TernaryQuantizer({"scale": "seq", "strategy": "channel"})
>>> w = torch.tensor([[1.5, 0.3, -0.9, -1.2]], requires_grad=True)
>>> y = q(w)
>>> y.sum().backward()
>>> y.tolist(), w.grad.tolist(), q.alpha.tolist(), round(q.alpha.grad.item(), 4)
([[1.0, 0.0, -1.0, -1.0]], [[0.0, 1.0, 1.0, 1.0]], [1.5], 0.4333)
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from stefx.errors import RecipeError
from stefx.ste.base import Quantizer
from stefx.ste.spec import register_quantizer

__all__ = ["TernaryQuantizer", "absmean_ternary", "seq_ternary", "twn_ternary"]

TWN_DELTA_FACTOR = 0.7
SEQ_CLIP = 1.0 - 1e-2
SEQ_HALF_LEVELS = 1.5  # ParetoQ's n_levels for 1.58 bit: codes round(1.5·u) ∈ {-1, 0, 1}


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the arithmetic runs in: float32, or float64 for float64 input."""
    return x if x.dtype == torch.float64 else x.float()


def absmean_ternary(rows: torch.Tensor, eps: float) -> torch.Tensor:
    """BitNet b1.58 forward on rows (G, N): RoundClip(W/(γ+ε), -1, 1)·γ, γ = mean|W|."""
    wide = _wide(rows)
    gamma = wide.abs().mean(dim=1, keepdim=True)
    codes = (wide / (gamma + eps)).round().clamp(-1.0, 1.0) + 0.0  # -0 -> +0
    return (codes * gamma).to(rows.dtype)


def twn_ternary(rows: torch.Tensor) -> torch.Tensor:
    """TWN forward on rows (G, N): α·sign(W)·1{|W| > Δ}, Δ = 0.7·mean|W|."""
    wide = _wide(rows)
    mag = wide.abs()
    delta = TWN_DELTA_FACTOR * mag.mean(dim=1, keepdim=True)
    keep = mag > delta
    alpha = (mag * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1)
    # delta·0 is 0 for a finite Δ and NaN for a non-finite one (see the module docstring).
    y = torch.where(keep, alpha * torch.sign(wide), delta * 0.0)
    return y.to(rows.dtype)


def _seq_step(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    a = _wide(alpha)
    return torch.where(a > eps, a, eps).unsqueeze(1)


def _seq_levels(u: torch.Tensor) -> torch.Tensor:
    codes = torch.round(u.clamp(-SEQ_CLIP, SEQ_CLIP) * SEQ_HALF_LEVELS) + 0.0  # -0 -> +0
    return codes / SEQ_HALF_LEVELS


class _StraightThrough(torch.autograd.Function):
    """Forward: a ternary method on rows. Backward: dL/dW = dL/dy (nothing saved)."""

    @staticmethod
    def forward(ctx, rows, method, eps):
        return absmean_ternary(rows, eps) if method == "absmean" else twn_ternary(rows)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _StretchedElastic(torch.autograd.Function):
    """ParetoQ SEQ on rows (G, N) with step α (G,); the math is in the module docstring."""

    @staticmethod
    def forward(ctx, rows, alpha, eps, grad_scale):
        ctx.eps, ctx.grad_scale = eps, grad_scale
        ctx.save_for_backward(rows, alpha)
        a = _seq_step(alpha, eps)
        return (_seq_levels(_wide(rows) / a) * a).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        rows, alpha = ctx.saved_tensors
        u = _wide(rows) / _seq_step(alpha, ctx.eps)
        inside = u.abs() <= SEQ_CLIP
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(inside, grad, 0.0)
        if ctx.needs_input_grad[1]:
            slope = torch.where(inside, _seq_levels(u) - u, torch.sign(u))
            grad_alpha = (slope * _wide(grad)).sum(dim=1) * ctx.grad_scale
            grad_alpha = grad_alpha.to(alpha.dtype)
        return grad_x, grad_alpha, None, None


def seq_ternary(rows: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ParetoQ's ternary SEQ of rows (G, N) with learned step ``alpha`` (G,), with its STE."""
    grad_scale = 1.0 / math.sqrt(max(rows.numel(), 1))
    return _StretchedElastic.apply(rows, alpha, eps, grad_scale)


@register_quantizer("ternary")
class TernaryQuantizer(Quantizer):
    """Ternary quantizer {-a, 0, a}; see the module docstring for the math."""

    bits_choices = (2,)
    levels: ClassVar[int] = 3
    strategies = ("tensor", "channel")
    scales = ("absmean", "twn", "seq")
    estimators = ("ste",)
    options = MappingProxyType({"eps": 1e-5})

    @classmethod
    def check_options(cls, options, where):
        eps = options["eps"]
        if not 0 < eps < math.inf:
            raise RecipeError(f"{where}: eps={eps!r} is invalid; expected a small number > 0")

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.eps = self.spec.options["eps"]
        if self.spec.scale == "seq":
            self.alpha = nn.Parameter(torch.empty(0))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """``seq``: set α to max|W| per group (NaN and ±inf ignored). Others: nothing."""
        if self.spec.scale != "seq":
            return
        mag = self.granularity.rows(x.detach()).abs().nan_to_num(0.0, 0.0, 0.0)
        self.alpha.data = mag.amax(dim=1).to(self.alpha.dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.granularity.rows(x)
        if self.spec.scale != "seq":
            y = _StraightThrough.apply(rows, self.spec.scale, self.eps)
            return self.granularity.unrows(y, x.shape)
        if self.alpha.numel() == 0:
            self.init_from(x)
        if self.alpha.shape != (rows.shape[0],):
            raise ValueError(
                f"ternary seq: alpha has shape {tuple(self.alpha.shape)} but the input has "
                f"{rows.shape[0]} scale groups; one quantizer serves one weight shape"
            )
        y = seq_ternary(rows, self.alpha, self.eps)
        return self.granularity.unrows(y, x.shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A learned α saved after its lazy init: give the still-empty Parameter its shape.
        saved = state_dict.get(prefix + "alpha")
        alpha = getattr(self, "alpha", None)
        if saved is not None and alpha is not None and alpha.numel() == 0:
            alpha.data = torch.empty(saved.shape, dtype=alpha.dtype, device=alpha.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
