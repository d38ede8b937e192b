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
on the top level and never rounds past it (``SEQ_CLIP``). The ternary quantizer's ``seq``
scale runs on this same code with ``TERNARY_GRID`` (codes round(1.5·u) ∈ {-1, 0, 1}).
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
α must already be on W's device (``model.to(...)`` moves it). The op is ``torch.ops.stefx.seq``;
its backward saves W itself (no copy) and α; u, the mask and the levels are recomputed.

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
from typing import NamedTuple

import torch
from torch import nn

from stefx.errors import RecipeError
from stefx.ste import ops
from stefx.ste.base import Quantizer
from stefx.ste.functions import wide
from stefx.ste.spec import register_quantizer

__all__ = ["SEQ_CLIP", "SEQQuantizer", "SeqGrid", "seq_forward", "seq_levels", "stretched_elastic"]

SEQ_CLIP = 1.0 - 1e-2  # c: clamp(u) stays below the top bin edge, so it never rounds past


class SeqGrid(NamedTuple):
    """A SEQ grid: codes round(n·u - shift) + shift, levels codes/n, LSQ bound Q_p."""

    n_levels: float
    shift: float
    code_bound: int

    @classmethod
    def for_bits(cls, num_bits: int) -> SeqGrid:
        k = 2 ** (num_bits - 1)
        return cls(float(k), 0.5, k - 1)


#: ParetoQ's 1.58-bit grid: codes round(1.5·u) ∈ {-1, 0, 1}, levels {-2/3, 0, 2/3}.
TERNARY_GRID = SeqGrid(1.5, 0.0, 1)


def _step(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    a = wide(alpha)
    return torch.where(a > eps, a, eps).unsqueeze(1)


def seq_levels(u: torch.Tensor, grid: SeqGrid) -> torch.Tensor:
    """q(u): the SEQ level of u = W/α, in units of α (ParetoQ's forward, without α)."""
    return _levels_(u.clone(), grid)


def _levels_(u: torch.Tensor, grid: SeqGrid) -> torch.Tensor:
    """:func:`seq_levels` computed in place in ``u``."""
    n, shift = grid.n_levels, grid.shift
    u = ops.Scratch(u).clamp(-SEQ_CLIP, SEQ_CLIP).mul(n).sub(shift).round()
    return u.add(shift).add(0.0).div(n).t  # + 0.0: -0 -> +0


def _seq_fake(x, alpha, n_levels, shift, code_bound, eps, strategy, axis, strength):
    return ops.fake_rows_output(x)


def _seq_setup(ctx, inputs, output):
    x, alpha, n_levels, shift, code_bound, eps, strategy, axis, strength = inputs
    ctx.save_for_backward(x, alpha, strength)
    ctx.consts = (SeqGrid(n_levels, shift, code_bound), eps, strategy, axis)


def _seq_backward(ctx, grad):
    x, alpha, strength = ctx.saved_tensors
    grid, eps, strategy, axis = ctx.consts
    gran = ops.granularity(strategy, axis, None)
    rows, g_rows = gran.rows(x), gran.rows(ops.scaled(grad, strength))
    u = wide(rows) / _step(alpha, eps)
    inside = u.abs() <= SEQ_CLIP
    grad_x = grad_alpha = None
    if ctx.needs_input_grad[0]:
        grad_x = gran.unrows(ops.apply_mask(g_rows, inside), x.shape)
        grad_x = ops.mix_input_grad(grad, grad_x, strength)
    if ctx.needs_input_grad[1]:
        top = (grid.n_levels - grid.shift) / grid.n_levels  # ParetoQ's Q_p: the top level
        slope = torch.where(inside, seq_levels(u, grid) - u, torch.sign(u) * top)
        grad_scale = 1.0 / math.sqrt(max(x.numel(), 1) * grid.code_bound)
        grad_alpha = (slope * wide(g_rows)).sum(dim=1) * grad_scale
        grad_alpha = grad_alpha.to(alpha.dtype)
    return grad_x, grad_alpha, None, None, None, None, None, None, None


@ops.define("seq", fake=_seq_fake, setup_context=_seq_setup, backward=_seq_backward)
def stretched_elastic(
    x: torch.Tensor,
    alpha: torch.Tensor,
    n_levels: float,
    shift: float,
    code_bound: int,
    eps: float,
    strategy: str,
    axis: int | None,
    strength: torch.Tensor | None,
) -> torch.Tensor:
    """ParetoQ's SEQ of ``x`` per scale group with learned ``alpha`` (G,) on the grid
    (n_levels, shift, code_bound) (``torch.ops.stefx.seq``); the math is in the module
    docstring."""
    gran = ops.granularity(strategy, axis, None)
    rows = gran.rows(x)
    a = _step(alpha, eps)
    y = _levels_(wide(rows) / a, SeqGrid(n_levels, shift, code_bound))
    y = ops.Scratch(y).mul(a).t.to(x.dtype)
    return ops.from_rows(gran, ops.mix(rows, y, strength), x)


@torch.no_grad()
def init_alpha(q: Quantizer, x: torch.Tensor) -> None:
    """Set ``q.alpha`` to max|W| per scale group (NaN, ±inf ignored), same Parameter object."""
    mag = q.granularity.rows(x.detach()).abs().nan_to_num(0.0, 0.0, 0.0)
    q.alpha.data = mag.amax(dim=1).to(q.alpha.dtype)


def seq_forward(q: Quantizer, x: torch.Tensor, grid: SeqGrid) -> torch.Tensor:
    """SEQ of ``x`` with ``q``'s learned per-group ``alpha``, initialised on first use."""
    if q.alpha.numel() == 0:
        q.lazy_init(x)
    groups = q.granularity.num_groups(x.shape)
    if q.alpha.shape != (groups,):
        raise ValueError(
            f"{q.spec.type}: alpha has shape {tuple(q.alpha.shape)} but the input has "
            f"{groups} scale groups; one quantizer serves one weight shape"
        )
    s = q.spec
    return stretched_elastic(x, q.alpha, *grid, q.eps, s.strategy, s.axis, q.strength_arg())


def check_eps(options, where: str) -> None:
    eps = options["eps"]
    if not 0 < eps < math.inf:
        raise RecipeError(f"{where}: eps={eps!r} is invalid; expected a small number > 0")


@register_quantizer("seq")
class SEQQuantizer(Quantizer):
    """ParetoQ Stretched Elastic Quant, 2^b levels in ±α; see the module docstring."""

    bits_choices = (2, 3, 4)
    strategies = ("channel", "tensor", "token")
    scales = ("learned",)
    estimators = ("ste",)
    options = MappingProxyType({"eps": 1e-5})
    mixes_strength = True

    @classmethod
    def check_options(cls, options, where):
        check_eps(options, where)

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.eps = self.spec.options["eps"]
        self.alpha = nn.Parameter(torch.empty(0))

    @property
    def levels(self) -> int:
        """Number of distinct levels, 2^b (none of them zero)."""
        return 2**self.bits

    def init_from(self, x: torch.Tensor) -> None:
        """Set α to max|W| per group (NaN and ±inf ignored), keeping the Parameter object."""
        init_alpha(self, x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return seq_forward(self, x, SeqGrid.for_bits(self.bits))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._shape_empty_parameter("alpha", state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
