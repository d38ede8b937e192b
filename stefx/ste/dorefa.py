r"""``dorefa``: DoReFa-Net weight and activation quantizers (Zhou et al. 2016, arXiv:1606.06160).

The k-bit quantizer of [0, 1], with the identity straight-through estimator::

    quantize_k(r) = round((2^k - 1) · r) / (2^k - 1)        ∂quantize_k/∂r = 1

**Weights** (``role: weight``, default), k >= 2::

    t   = tanh(w),   m = max |t|   (over the whole tensor)
    w_q = 2 · quantize_k(t / (2m) + 1/2) - 1

The backward differentiates everything but the round, including the max::

    ∂L/∂w_i = (1 - t_i²) · [ G_i / m  -  1{|t_i| = m} / c · sign(t_i) · Σ_j G_j t_j / m² ]

with G = ∂L/∂w_q and c the number of elements attaining the max (the gradient of the max
is split evenly between ties, as ``torch.amax`` does).

k = 1: w_q = E(|w|) · sign(w), E the mean over the whole tensor, with ∂L/∂w = ∂L/∂w_q
(no gradient through E). Here sign(0) = +1 so there are exactly two levels.

**Activations** (``role: activation``), any k::

    a_q = quantize_k(clamp(x, 0, 1))        ∂a_q/∂x = 1{0 <= x <= 1}

DoReFa keeps quantized weights in [-1, 1] and activations in [0, 1]: there is no scale
or learned parameter, and no rescaling back to the weight's magnitude (the paper relies
on batch normalisation after the layer). Rounding is round-half-to-even.

Degenerate case (not in the paper): when max|tanh(w)| = 0 (an all-zero weight) the
normalisation is 0/0; we define w_q = 0 and pass the gradient straight through, so a
zero-initialised weight can still leave zero. m enters divisions as max(m, 1e-12).

The op is ``torch.ops.stefx.dorefa``; its backward saves only the input (weights; nothing
for k = 1) or a boolean mask (activations).

>>> import torch
>>> from stefx.ste.dorefa import DoReFaQuantizer
>>> q = DoReFaQuantizer({"num_bits": 2})  # levels -1, -1/3, 1/3, 1
>>> w = torch.tensor([-1.0, -0.1, 0.3, 2.0], requires_grad=True)
>>> y = q(w)
>>> [round(v, 4) for v in y.tolist()]
[-1.0, -0.3333, 0.3333, 1.0]
>>> y.sum().backward()
>>> [round(v, 4) for v in w.grad.tolist()]
[0.4356, 1.027, 0.9493, 0.0433]
>>> a = torch.tensor([-0.5, 0.2, 0.5, 1.5], requires_grad=True)
>>> y = DoReFaQuantizer({"num_bits": 2, "role": "activation"})(a)
>>> y.sum().backward()
>>> [round(v, 4) for v in y.tolist()], a.grad.tolist()
([0.0, 0.3333, 0.6667, 1.0], [0.0, 1.0, 1.0, 0.0])
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from stefx.errors import RecipeError
from stefx.ste import ops
from stefx.ste.base import Quantizer
from stefx.ste.spec import register_quantizer

__all__ = ["DoReFaQuantizer"]

_EPS = 1e-12


def _tanh_max(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t = tanh(w) in fp32, the raw max |t| (NaN-propagating), and its guarded version."""
    t = torch.tanh(w.float())
    m_raw = t.abs().amax()
    return t, m_raw, m_raw.clamp_min(_EPS)


def _weight_forward(w: torch.Tensor, levels: int) -> torch.Tensor:
    """w_q = 2·quantize_k(tanh(w)/(2 max|tanh(w)|) + 1/2) - 1 (0 for an all-zero w)."""
    t, m_raw, m = _tanh_max(w)
    r = t / (2 * m) + 0.5
    wq = 2 * ((r * levels).round() / levels) - 1
    return torch.where(m_raw == 0, 0.0, wq).to(w.dtype)


def _weight_backward(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The module docstring's ∂L/∂w: every path but the round, the max included."""
    t, m_raw, m = _tanh_max(w)
    g = grad.float()
    at_max = t.abs() == m_raw
    through_max = (g * t).sum() / (m * m) / at_max.sum().clamp_min(1)
    gw = (1 - t * t) * (g / m - at_max * t.sign() * through_max)
    return torch.where(m_raw == 0, g, gw).to(w.dtype)


def _sign_mean(w: torch.Tensor) -> torch.Tensor:
    """w_q = mean|w| · sign(w), sign(0) = +1."""
    wf = w.float()
    e = wf.abs().mean()
    return torch.where(wf >= 0, e, -e).to(w.dtype)


def _dorefa_fake(x, levels, role, strength):
    if role == "activation":
        return ops.fake_rows_output(x), torch.empty_like(x, dtype=torch.bool)
    return ops.fake_rows_output(x), x.new_empty(0, dtype=torch.bool)


def _dorefa_setup(ctx, inputs, output):
    x, levels, role, strength = inputs
    ctx.role = role if role == "activation" or levels > 1 else "sign"
    saved = output[1] if role == "activation" else x if levels > 1 else None
    ctx.save_for_backward(saved, strength)


def _dorefa_backward(ctx, grad, _grad_mask):
    saved, strength = ctx.saved_tensors
    g = ops.scaled(grad, strength)
    if ctx.role == "activation":
        g = ops.apply_mask(g, saved)
    elif ctx.role == "weight" and saved.numel():
        g = _weight_backward(saved, g)
    return ops.mix_input_grad(grad, g, strength), None, None, None


@ops.define("dorefa", fake=_dorefa_fake, setup_context=_dorefa_setup, backward=_dorefa_backward)
def dorefa(
    x: torch.Tensor, levels: int, role: str, strength: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoReFa-Net's quantizer of a weight or an activation (``torch.ops.stefx.dorefa``):
    returns ``(y, mask)``, the mask 1{0 <= x <= 1} for an activation, else empty."""
    empty = x.new_empty(0, dtype=torch.bool)
    if role == "activation":
        xf = x.float()
        mask = (xf >= 0) & (xf <= 1)
        y = ((xf.clamp(0.0, 1.0) * levels).round() / levels).to(x.dtype)
        return ops.mix(x, y, strength), mask
    if x.numel() == 0:
        return ops.fake_rows_output(x), empty
    y = _sign_mean(x) if levels == 1 else _weight_forward(x, levels)
    return ops.mix(x, y, strength), empty


@register_quantizer("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa-Net quantizer (arXiv:1606.06160); see the module docstring."""

    bits_choices = (1, 2, 3, 4, 5, 6, 7, 8)
    default_bits = 4
    strategies = ("tensor",)
    estimators = ("identity",)
    options = MappingProxyType({"role": "weight"})
    roles = ("weight", "activation")
    mixes_strength = True

    @classmethod
    def check_options(cls, options, where):
        if options["role"] not in cls.roles:
            raise RecipeError(
                f"{where}: role={options['role']!r} is invalid; choose one of {list(cls.roles)}"
            )

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.levels = 2**self.bits - 1
        self.role = self.spec.options["role"]

    def sharing_key(self) -> tuple | None:
        return self._stateless_key()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return dorefa(x, self.levels, self.role, self.strength_arg())[0]
