r"""``pact``: parameterized clipping activation (Choi et al. 2018, arXiv:1805.06085).

A learned clipping level α (one ``nn.Parameter`` scalar for the tensor) bounds the
activation, which is then quantized to k-bit unsigned levels::

    y   = clamp(x, 0, α)
    y_q = round(y · (2^k - 1) / α) · α / (2^k - 1)

Backward, with the straight-through estimator on round (the paper's choice)::

    ∂y_q/∂x = 1{0 <= x < α}
    ∂y_q/∂α = 1{x >= α}          ∂L/∂α = Σ ∂L/∂y_q · 1{x >= α}

The boundaries are complementary: x = α sends its gradient to α, not to x; x = 0 passes
it to x. Rounding is round-half-to-even. α enters as max(α, 1e-12) so a trained α <= 0
cannot divide by zero (the gradient still reaches α itself).

Initialisation: α = ``alpha_init`` (default 10.0, a positive float), fixed at
construction — no data-driven init. The paper regularises α with an L2 penalty; here that
is the optimizer's weight decay on ``alpha``. Strategy ``tensor`` only (one α per layer,
as in the paper).

The op is ``torch.ops.stefx.pact``; its backward saves only the input and α; masks are
recomputed in backward.

>>> import torch
>>> from stefx.ste.pact import PACTQuantizer
>>> q = PACTQuantizer({"num_bits": 2, "alpha_init": 3.0})  # levels 0, 1, 2, 3
>>> x = torch.tensor([-1.0, 0.4, 1.6, 2.7, 4.0], requires_grad=True)
>>> y = q(x)
>>> y.tolist()
[0.0, 0.0, 2.0, 3.0, 3.0]
>>> y.sum().backward()
>>> x.grad.tolist(), q.alpha.grad.item()
([0.0, 1.0, 1.0, 1.0, 0.0], 1.0)
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
from torch import nn

from stefx.errors import RecipeError
from stefx.ste import ops
from stefx.ste.base import Quantizer
from stefx.ste.spec import register_quantizer

__all__ = ["PACTQuantizer"]

_EPS = 1e-12


def _pact_fake(x, alpha, levels, strength):
    return ops.fake_rows_output(x)


def _pact_setup(ctx, inputs, output):
    x, alpha, _levels, strength = inputs
    ctx.save_for_backward(x, alpha, strength)


def _pact_backward(ctx, grad):
    x, alpha, strength = ctx.saved_tensors
    g = ops.scaled(grad, strength).float()
    a = alpha.float().clamp_min(_EPS)
    xf = x.float()
    gx = ga = None
    if ctx.needs_input_grad[0]:
        gx = ops.apply_mask(g, (xf >= 0).logical_and_(xf < a)).to(x.dtype)
        gx = ops.mix_input_grad(grad, gx, strength)
    if ctx.needs_input_grad[1]:
        ga = ops.apply_mask(g, xf >= a).sum().reshape(alpha.shape).to(alpha.dtype)
    return gx, ga, None, None


@ops.define("pact", fake=_pact_fake, setup_context=_pact_setup, backward=_pact_backward)
def pact(
    x: torch.Tensor, alpha: torch.Tensor, levels: int, strength: torch.Tensor | None
) -> torch.Tensor:
    """y_q = round(clamp(x, 0, α)/Δ)·Δ, Δ = α/(2^k - 1) (``torch.ops.stefx.pact``);
    gradients 1{0 <= x < α} to x and 1{x >= α} to α."""
    a = alpha.float().clamp_min(_EPS)
    step = a / levels
    y = ops.Scratch(x.float().clamp_min(0.0)).clamp(max=a)  # min(max(x, 0), α), one buffer
    y = y.div(step).round().mul(step).t.to(x.dtype)
    return ops.mix(x, y, strength)


@register_quantizer("pact")
class PACTQuantizer(Quantizer):
    """PACT activation quantizer (arXiv:1805.06085); see the module docstring."""

    bits_choices = (1, 2, 3, 4, 5, 6, 7, 8)
    default_bits = 4
    strategies = ("tensor",)
    scales = ("learned",)
    estimators = ("clipped",)
    options = MappingProxyType({"alpha_init": 10.0})
    mixes_strength = True

    @classmethod
    def check_options(cls, options, where):
        alpha = options["alpha_init"]
        if not (math.isfinite(alpha) and alpha > 0):
            raise RecipeError(
                f"{where}: alpha_init={alpha!r} is invalid; expected a positive finite float "
                "(the paper starts at 10.0)"
            )

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.levels = 2**self.bits - 1
        self.alpha = nn.Parameter(torch.tensor(float(self.spec.options["alpha_init"])))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        if x.is_meta and not alpha.is_meta:  # shape-only pass: a stand-in without values
            alpha = torch.empty((), device="meta")
        return pact(x, alpha, self.levels, self.strength_arg())
