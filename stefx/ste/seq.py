"""``seq``: ParetoQ's Stretched Elastic Quant for 2-, 3- and 4-bit weights.

Stretched Elastic Quant (ParetoQ, Liu et al., arXiv:2502.02631) puts b-bit weights on
2^b levels spread evenly over [-α, α], with no level at zero, and learns α > 0 per scale
group (ParetoQ uses one per output row: ``strategy: channel``, the default; ``tensor``
gives one α for the whole weight). With k = 2^(b-1) levels per side::

    a = α if α > ε else ε                                 (the step never reaches 0)
    u = W / a
    y = a · (round(k · clamp(u, -c, c) - 1/2) + 1/2) / k   c = 1 - 10⁻²

2 bits: levels a·{±1/4, ±3/4}; 3 bits: a·{±1/8, ±3/8, ±5/8, ±7/8}; 4 bits: a·{±1/16, ...,
±15/16}. The 2k equal-width bins split [-a, a] at multiples of a/k and each level sits at
its bin's centre (the "stretch"); c < 1 keeps k·c - 1/2 below k - 1/2, so |u| >= 1 lands
on the top level and never rounds past it (the clip ternary SEQ uses, ``SEQ_CLIP``).
``round`` is round-half-to-even, as in ParetoQ's code, so a tie on a bin edge u = j/k goes
to the even code: u = 0 gives +a/(2k), u = -1/k gives -3a/(2k) but u = +1/k gives +a/(2k).
Ties have measure zero in training; stefx keeps the reference behaviour.

Backward, following ParetoQ's ``StretchedElasticQuant`` (models/utils_quant.py)::

    dL/dW_i = dL/dy_i · 1{|u_i| <= c}
    dL/dα   = g · Σ_group dL/dy_i · (q(u_i) - u_i          if |u_i| <= c
                                     sign(u_i) · (k - 1/2)/k  otherwise)

with q(u) = y/a, the level of u. Inside the clip range this is LSQ's d y/dα with round
passed straight through (y = a·(u + (q(u) - u)) and d(a·u)/da = 0). In the clipped region
ParetoQ's code uses ±Q_p with Q_p = (k - shift)/k = (k - 1/2)/k: the top level itself,
which is d y/dα exactly there (y = ±a·(k - 1/2)/k). (For ternary the same formula gives
1.5/1.5 = 1, which is why :mod:`stefx.ste.ternary` uses ±1.) The gradient scale is LSQ's
as in ParetoQ's code: g = 1/sqrt(numel(W) · Q_p) with the integer code bound
Q_p = 2^(b-1) - 1, so g = 1/sqrt(numel) for 2 bits (as ternary), 1/sqrt(3·numel) for
3 bits, 1/sqrt(7·numel) for 4 bits; numel counts the whole weight even with one α per
row, as ParetoQ does. The α gradient passes to α even while a = ε. A NaN u is not inside,
so its W gradient is 0 and its α gradient is NaN (a diverged weight stays visible).

Init: α is an ``nn.Parameter`` of shape (groups,), empty until the first forward (or
``init_from``), which sets ``alpha.data`` to max|W| per group, NaN and ±inf ignored. This
is ParetoQ's training-script init for 2 bits (``torch.max(|W|, dim=-1)``); for 3 and 4
bits ParetoQ's script switches to LSQ with α = max|W|/(2^(b-1) - 1), but here α is the
clip range of the same SEQ grid, so max|W| is kept for every width. The same Parameter
object is kept, so an optimizer built before the first forward still holds it; the empty
α must already be on W's device (``model.to(...)`` moves it). The backward saves W itself
(no copy) and α; u, the mask and the levels are recomputed.

Note: ParetoQ's reference code uses SEQ for 2 bits (and ternary) and LSQ (``lsq`` here) for
3 and 4 bits; ``seq`` with ``num_bits: 3`` or ``4`` is the same SEQ grid at that width.

>>> import torch
>>> from stefx.ste.seq import SEQQuantizer
>>> q = SEQQuantizer({"num_bits": 2})                      # one α per row; α = max|W| = 2
>>> w = torch.tensor([[2.0, 0.6, -0.1, -1.2]], requires_grad=True)
>>> y = q(w)                                               # u = [1, 0.3, -0.05, -0.6]
>>> y.sum().backward()
>>> y.tolist(), w.grad.tolist()
([[1.5, 0.5, -0.5, -1.5]], [[0.0, 1.0, 1.0, 1.0]])
>>> q.alpha.tolist(), round(q.alpha.grad.item(), 4)         # (3/4 - .05 - .2 - .15) / 2
([2.0], 0.175)
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
from torch import nn

from stefx.errors import RecipeError
from stefx.ste.base import Quantizer
from stefx.ste.spec import register_quantizer
from stefx.ste.ternary import SEQ_CLIP

__all__ = ["SEQQuantizer", "seq_levels", "stretched_elastic"]

SEQ_SHIFT = 0.5  # ParetoQ's shift for b >= 2 bits: codes are half-integers, none at zero


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the arithmetic runs in: float32, or float64 for float64 input."""
    return x if x.dtype == torch.float64 else x.float()


def _step(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    a = _wide(alpha)
    return torch.where(a > eps, a, eps).unsqueeze(1)


def seq_levels(u: torch.Tensor, num_bits: int) -> torch.Tensor:
    """q(u): the SEQ level of u = W/α, in units of α (ParetoQ's forward, without α)."""
    k = 2 ** (num_bits - 1)
    codes = torch.round(u.clamp(-SEQ_CLIP, SEQ_CLIP) * k - SEQ_SHIFT) + SEQ_SHIFT
    return codes / k


class _StretchedElastic(torch.autograd.Function):
    """SEQ on rows (G, N) with step α (G,); the math is in the module docstring."""

    @staticmethod
    def forward(ctx, rows, alpha, num_bits, eps, grad_scale):
        ctx.num_bits, ctx.eps, ctx.grad_scale = num_bits, eps, grad_scale
        ctx.save_for_backward(rows, alpha)
        a = _step(alpha, eps)
        return (seq_levels(_wide(rows) / a, num_bits) * a).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        rows, alpha = ctx.saved_tensors
        u = _wide(rows) / _step(alpha, ctx.eps)
        inside = u.abs() <= SEQ_CLIP
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(inside, grad, 0.0)
        if ctx.needs_input_grad[1]:
            k = 2 ** (ctx.num_bits - 1)
            top = (k - SEQ_SHIFT) / k
            slope = torch.where(inside, seq_levels(u, ctx.num_bits) - u, torch.sign(u) * top)
            grad_alpha = (slope * _wide(grad)).sum(dim=1) * ctx.grad_scale
            grad_alpha = grad_alpha.to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None


def stretched_elastic(
    rows: torch.Tensor, alpha: torch.Tensor, num_bits: int, eps: float = 1e-5
) -> torch.Tensor:
    """ParetoQ's b-bit SEQ of rows (G, N) with learned ``alpha`` (G,), with its STE."""
    code_bound = 2 ** (num_bits - 1) - 1  # LSQ's Q_p, as ParetoQ's grad_scale uses
    grad_scale = 1.0 / math.sqrt(max(rows.numel(), 1) * code_bound)
    return _StretchedElastic.apply(rows, alpha, num_bits, eps, grad_scale)


@register_quantizer("seq")
class SEQQuantizer(Quantizer):
    """ParetoQ Stretched Elastic Quant, 2^b levels in ±α; see the module docstring."""

    bits_choices = (2, 3, 4)
    strategies = ("channel", "tensor")
    scales = ("learned",)
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
        self.alpha = nn.Parameter(torch.empty(0))

    @property
    def levels(self) -> int:
        """Number of distinct levels, 2^b (none of them zero)."""
        return 2**self.bits

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set α to max|W| per group (NaN and ±inf ignored), keeping the Parameter object."""
        mag = self.granularity.rows(x.detach()).abs().nan_to_num(0.0, 0.0, 0.0)
        self.alpha.data = mag.amax(dim=1).to(self.alpha.dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.granularity.rows(x)
        if self.alpha.numel() == 0:
            self.init_from(x)
        if self.alpha.shape != (rows.shape[0],):
            raise ValueError(
                f"seq: alpha has shape {tuple(self.alpha.shape)} but the input has "
                f"{rows.shape[0]} scale groups; one quantizer serves one weight shape"
            )
        y = stretched_elastic(rows, self.alpha, self.bits, self.eps)
        return self.granularity.unrows(y, x.shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A learned α saved after its lazy init: give the still-empty Parameter its shape.
        saved = state_dict.get(prefix + "alpha")
        if saved is not None and self.alpha.numel() == 0:
            self.alpha.data = torch.empty(
                saved.shape, dtype=self.alpha.dtype, device=self.alpha.device
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
