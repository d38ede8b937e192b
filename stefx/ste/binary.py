"""``binary``: 1-bit sign quantization, and the sign estimators its backward can use.

Forward, per scale group (see :mod:`stefx.ste.granularity`)::

    sign(x) = +1 if x >= 0 else -1          (sign(+0) = sign(-0) = +1; NaN stays NaN)
    y       = α · sign(x)

- ``scale: none`` (default): α = 1, y ∈ {-1, +1}. An all-zero input maps to all +1.
- ``scale: absmean`` (XNOR-Net, Rastegari et al., arXiv:1603.05279): α = mean|x| over
  the group, one α per output channel with ``strategy: channel`` (axis 0), else one per
  tensor. α is a statistic of x, not a parameter, and autograd differentiates it
  (dα/dx_i = sign(x_i)/n, with d|x|/dx = 0 at x = 0 as in torch). For a group of n
  elements and upstream gradient G::

      dL/dx_i = α · g'(x_i) · G_i  +  (1/n) · sign(x_i) · Σ_j G_j · sign(x_j)

  XNOR-Net prints the second term as G_i / n (its diagonal j = i only); stefx keeps the
  exact derivative of α · sign(x), which is what the paper's formula abbreviates.

Backward of sign (``estimator``; g' replaces d sign/dx, which is 0 almost everywhere):

==============  ==============================================  ===========================
name            g'(x)                                           paper
==============  ==============================================  ===========================
``clipped``     1{|x| <= 1}                          (default)  BNN, arXiv:1602.02830
``identity``    1                                               STE, arXiv:1308.3432
``approx_sign`` (2 - 2|x|) · 1{|x| <= 1}                        Bi-Real Net, arXiv:1808.00278
``swish_sign``  β(2 - βx·tanh(βx/2)) / (1 + cosh(βx))           BNN+, arXiv:1812.11800
``ede``         k · t · (1 - tanh²(t·x))                        IR-Net, arXiv:1909.10788
==============  ==============================================  ===========================

``swish_sign`` is the derivative of SS_β(x) = 2σ(βx)[1 + βx(1 - σ(βx))] - 1, option ``beta``
(default 5.0); it is evaluated in the equal, overflow- and cancellation-free form
2β·σ(βx)·σ(-βx)·(2 - βx·tanh(βx/2)).

``ede`` (Error Decay Estimator) sharpens during training: t = T_min · 10^(p · log10(T_max /
T_min)) and k = max(1/t, 1), with options ``t_min`` (0.1) and ``t_max`` (10.0), and p the
quantizer's public ``progress`` attribute in [0, 1] (0 at init). The training loop sets it,
e.g. ``q.progress = step / total_steps``; it is a Python float, so no tensor is read.

What the backward keeps: ``clipped`` without a scale saves only the boolean mask
|x| <= 1; ``identity`` without a scale saves nothing; every other combination saves the
input x itself (no copy) and, with ``absmean``, the per-group α. No parameters are learned.

Extend the estimator table with :func:`register_sign_estimator`.

>>> import torch
>>> from stefx.ste.binary import BinaryQuantizer
>>> q = BinaryQuantizer({"estimator": "clipped"})
>>> x = torch.tensor([-1.5, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
>>> y = q(x)
>>> y.sum().backward()
>>> y.tolist(), x.grad.tolist()
([-1.0, -1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.0])
>>> q = BinaryQuantizer({"scale": "absmean", "estimator": "identity"})
>>> x = torch.tensor([-1.0, 3.0], requires_grad=True)
>>> y = q(x)
>>> y.backward(torch.tensor([1.0, 0.0]))
>>> y.tolist(), x.grad.tolist()
([-2.0, 2.0], [2.5, -0.5])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from stefx.errors import RecipeError
from stefx.registry import Registry
from stefx.ste.base import Quantizer
from stefx.ste.spec import register_quantizer

__all__ = [
    "SIGN_ESTIMATORS",
    "BinaryQuantizer",
    "SignEstimator",
    "ede_params",
    "register_sign_estimator",
    "scaled_sign",
    "sign_pm1",
]

Derivative = Callable[[torch.Tensor, Mapping[str, float]], torch.Tensor]


@dataclass(frozen=True)
class SignEstimator:
    """A surrogate derivative g'(x) for sign, used by the backward pass.

    ``derivative(x, params)`` returns g'(x) for ``x`` widened to float32 (float64 kept);
    ``None`` means g' = 1. With ``indicator=True`` it returns a boolean tensor (g' is 0 or
    1) computed on x as it is, and the forward saves that mask instead of x. ``params``
    holds ``beta``, ``t`` and ``k``.
    """

    derivative: Derivative | None
    indicator: bool = False


SIGN_ESTIMATORS: Registry[SignEstimator] = Registry(
    "sign estimator", check=lambda obj: isinstance(obj, SignEstimator)
)


def _swish_sign(x: torch.Tensor, p: Mapping[str, float]) -> torch.Tensor:
    bx = p["beta"] * x
    return (
        2.0 * p["beta"] * torch.sigmoid(bx) * torch.sigmoid(-bx) * (2.0 - bx * torch.tanh(bx / 2))
    )


def _ede(x: torch.Tensor, p: Mapping[str, float]) -> torch.Tensor:
    return p["k"] * p["t"] * (1.0 - torch.tanh(p["t"] * x) ** 2)


SIGN_ESTIMATORS.add("clipped", SignEstimator(lambda x, p: x.abs() <= 1.0, indicator=True))
SIGN_ESTIMATORS.add("identity", SignEstimator(None))
SIGN_ESTIMATORS.add("approx_sign", SignEstimator(lambda x, p: (2.0 - 2.0 * x.abs()).clamp(min=0.0)))
SIGN_ESTIMATORS.add("swish_sign", SignEstimator(_swish_sign))
SIGN_ESTIMATORS.add("ede", SignEstimator(_ede))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the arithmetic runs in: float32, or float64 for float64 input."""
    return x if x.dtype == torch.float64 else x.float()


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(±0) = +1, in x's dtype; NaN stays NaN."""
    # Not torch.sign, which gives sign(NaN) = 0: a third value that would hide the NaN.
    return torch.where(x < 0, -1.0, torch.where(x >= 0, 1.0, x))


def ede_params(progress: float, t_min: float, t_max: float) -> tuple[float, float]:
    """IR-Net's EDE schedule: t = T_min·10^(p·log10(T_max/T_min)), k = max(1/t, 1)."""
    t = t_min * 10.0 ** (progress * math.log10(t_max / t_min))
    return t, max(1.0 / t, 1.0)


def _times_derivative(grad, est, saved, params):
    """grad · g'(x), from the saved mask (indicator estimators) or the saved x."""
    if est.indicator:
        # where, not grad * mask: a float-by-bool multiply takes a slow casting path.
        return torch.where(saved, grad, 0.0)
    return (grad * est.derivative(_wide(saved), params)).to(grad.dtype)


class _ScaledSign(torch.autograd.Function):
    """Forward α·sign(x) on rows (G, N), α (G,) or None. Backward: G·α·g'(x) to x and
    Σ_row G·sign(x) to α (which the caller computed from x, so autograd adds dα/dx)."""

    @staticmethod
    def forward(ctx, x, alpha, estimator, params):
        ctx.estimator, ctx.params, ctx.scaled = estimator, params, alpha is not None
        s = sign_pm1(x)
        if alpha is None:
            if estimator.indicator:
                ctx.save_for_backward(estimator.derivative(x, params))
            elif estimator.derivative is not None:
                ctx.save_for_backward(x)
            return s
        ctx.save_for_backward(x, alpha)
        return s * alpha.unsqueeze(1)

    @staticmethod
    def backward(ctx, grad):
        est = ctx.estimator
        if not ctx.scaled:
            if est.derivative is None:
                return grad, None, None, None
            (saved,) = ctx.saved_tensors
            return _times_derivative(grad, est, saved, ctx.params), None, None, None
        x, alpha = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            g = grad * alpha.unsqueeze(1)
            if est.derivative is not None:
                d = est.derivative(x, ctx.params) if est.indicator else x
                g = _times_derivative(g, est, d, ctx.params)
            grad_x = g
        if ctx.needs_input_grad[1]:
            grad_alpha = (_wide(grad) * sign_pm1(x)).sum(dim=1).to(alpha.dtype)
        return grad_x, grad_alpha, None, None


def scaled_sign(
    x: torch.Tensor,
    alpha: torch.Tensor | None = None,
    estimator: str = "clipped",
    **params: float,
) -> torch.Tensor:
    """α·sign(x) for rows ``x`` (G, N) and ``alpha`` (G,) or None, with a sign estimator.

    ``params``: ``beta`` (swish_sign), ``t`` and ``k`` (ede); see the module docstring.
    """
    full = {"beta": 5.0, "t": 1.0, "k": 1.0, **params}
    return _ScaledSign.apply(x, alpha, SIGN_ESTIMATORS.get(estimator), full)


def _bad_option(where: str, key: str, value: object, fix: str) -> RecipeError:
    return RecipeError(f"{where}: {key}={value!r} is invalid; {fix}")


@register_quantizer("binary")
class BinaryQuantizer(Quantizer):
    """1-bit sign quantizer; see the module docstring for the math."""

    bits_choices = (1,)
    strategies = ("tensor", "channel")
    scales = ("none", "absmean")
    estimators = ("clipped", *(n for n in SIGN_ESTIMATORS.names() if n != "clipped"))
    options = MappingProxyType({"beta": 5.0, "t_min": 0.1, "t_max": 10.0})

    @classmethod
    def check_options(cls, options, where):
        if not options["beta"] > 0:
            raise _bad_option(where, "beta", options["beta"], "expected a number > 0")
        t_min, t_max = options["t_min"], options["t_max"]
        if not 0 < t_min < math.inf:
            raise _bad_option(where, "t_min", t_min, "expected a finite number > 0")
        if not t_min <= t_max < math.inf:
            raise _bad_option(where, "t_max", t_max, f"expected a finite number >= t_min={t_min}")

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self._estimator = SIGN_ESTIMATORS.get(self.spec.estimator)
        self.progress = 0.0

    @property
    def progress(self) -> float:
        """Training progress p in [0, 1]; drives the EDE schedule (ignored by others)."""
        return self._progress

    @progress.setter
    def progress(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise RecipeError(f"progress={value!r} is invalid; expected a number in [0, 1]")
        self._progress = float(value)

    def estimator_params(self) -> dict[str, float]:
        """The numbers the estimator reads: ``beta``, and EDE's ``t`` and ``k`` now."""
        o = self.spec.options
        t, k = ede_params(self._progress, o["t_min"], o["t_max"])
        return {"beta": o["beta"], "t": t, "k": k}

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.granularity.rows(x)
        alpha = None
        if self.spec.scale == "absmean":
            # mean(dtype=...) accumulates wide without saving a widened copy of x.
            wide = torch.promote_types(x.dtype, torch.float32)
            alpha = rows.abs().mean(dim=1, dtype=wide).to(x.dtype)
        y = _ScaledSign.apply(rows, alpha, self._estimator, self.estimator_params())
        return self.granularity.unrows(y, x.shape)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.spec.estimator == "ede":
            text += f", progress={self._progress:g}"
        return text


def register_sign_estimator(name: str, estimator: SignEstimator, *, replace: bool = False):
    """Add a sign estimator and make it a valid ``estimator`` of the ``binary`` type."""
    SIGN_ESTIMATORS.add(name, estimator, replace=replace)
    if name not in BinaryQuantizer.estimators:
        BinaryQuantizer.estimators = (*BinaryQuantizer.estimators, name)
    return estimator
