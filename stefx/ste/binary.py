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

``threshold: learned`` (ReActNet's RSign, Liu et al., arXiv:2003.03488) binarizes
``x - τ`` with a learned threshold τ per channel (axis 1 of an (N, C, ...) input of 4 or
more dimensions, a convolution's; the last axis otherwise), initialised from the first
batch as the per-channel mean. Autograd gives dL/dτ = -Σ g'(x - τ)·G. This is what lets
a binarizer that sits after a ReLU learn: sign of a non-negative x is a constant +1, sign
of ``x - τ`` is not. ``threshold: none`` (default) is plain sign. ``threshold: auto`` (the
binary presets): ``stefx.quantize`` makes it ``learned`` where the input is never negative
(it follows a ReLU, a sigmoid...) and ``none`` elsewhere; a quantizer built by hand with
``auto`` is plain sign.

Backward of sign (``estimator``; g' replaces d sign/dx, which is 0 almost everywhere):

==============  ==============================================  ===========================
name            g'(x)                                           paper
==============  ==============================================  ===========================
``clipped``     1{|x| <= 1}                          (default)  BNN, arXiv:1602.02830
``identity``    1                                               STE, arXiv:1308.3432
``ste``         dL/dx = dL/dy for the whole α·sign(x), α too    BitNet, arXiv:2310.11453
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

The op is ``torch.ops.stefx.binarize``. What its backward keeps: ``clipped`` without a
scale saves only the boolean mask |x| <= 1 (for a weight, the parameter itself instead:
it is alive anyway); ``identity`` without a scale saves nothing; every other combination
saves the input x itself (no copy), and α is recomputed from it. No parameters are learned.

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
from torch import nn

from stefx.errors import RecipeError
from stefx.registry import Registry
from stefx.ste import ops
from stefx.ste.base import Quantizer
from stefx.ste.spec import register_quantizer

__all__ = [
    "SIGN_ESTIMATORS",
    "BinaryQuantizer",
    "SignEstimator",
    "binarize",
    "ede_params",
    "register_sign_estimator",
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
    through_scale: bool = False  # the whole α·sign(x) passes the gradient unchanged


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


def _clipped(x: torch.Tensor, p: Mapping[str, float]) -> torch.Tensor:
    # two one-byte masks, not a float |x|: fewer fresh full-size buffers
    return ops.Scratch(x >= -1.0).logical_and(x <= 1.0).t


SIGN_ESTIMATORS.add("clipped", SignEstimator(_clipped, indicator=True))
SIGN_ESTIMATORS.add("identity", SignEstimator(None))
SIGN_ESTIMATORS.add("ste", SignEstimator(None, through_scale=True))
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
        mask = saved if saved.dtype == torch.bool else est.derivative(saved, params)
        return ops.apply_mask(grad, mask)
    return (grad * est.derivative(_wide(saved), params)).to(grad.dtype)


def _pm1(x: torch.Tensor) -> torch.Tensor:
    """±1 with sign(±0) = +1 in vectorised passes: sign(x) + 1/2 is never 0. NaN gives +1
    (torch.sign(NaN) is 0): used where a NaN reaches the result through α anyway."""
    return ops.Scratch(torch.sign(x)).add(0.5).sign().t


def _fast_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign_pm1``: :func:`_pm1`, or the exact NaN-keeping path for a tensor whose sum
    is not finite (a NaN, or an inf). Forward kernels only (it reads a value)."""
    if ops.functional() or (x.numel() and not torch.isfinite(x.sum())):
        return sign_pm1(x)
    return _pm1(x)


def _binarize_fake(x, scale, estimator, params, strategy, axis, mask_out, strength):
    est = SIGN_ESTIMATORS.get(estimator)
    keep_mask = mask_out and est.indicator and scale == "none" and x.numel() > 0
    mask = torch.empty_like(x, dtype=torch.bool) if keep_mask else x.new_empty(0, dtype=torch.bool)
    return ops.fake_rows_output(x), mask


def _binarize_setup(ctx, inputs, output):
    x, scale, estimator, params, strategy, axis, _mask_out, strength = inputs
    est = SIGN_ESTIMATORS.get(estimator)
    ctx.consts = (est, scale, strategy, axis)
    mask = output[1]
    if mask.numel():
        saved = mask
    elif est.through_scale:
        saved = None
    elif scale != "none" or est.derivative is not None:
        saved = x
    else:
        saved = None
    needs_params = saved is x and est.derivative is not None  # g'(x) read in backward
    ctx.save_for_backward(saved, params if needs_params else None, strength)


def _estimator_params(params: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"beta": params[0], "t": params[1], "k": params[2]}


def _binarize_backward(ctx, grad, _grad_mask):
    saved, params, strength = ctx.saved_tensors
    est, scale, strategy, axis = ctx.consts
    params = _estimator_params(params) if params is not None else {}
    g = ops.scaled(grad, strength)
    if est.through_scale:  # dL/dx = dL/dy: the quantizer is the identity in backward
        return (ops.mix_input_grad(grad, g, strength), *(None,) * 7)
    if scale == "none":
        if est.derivative is not None:
            g = _times_derivative(g, est, saved, params)
        return (ops.mix_input_grad(grad, g, strength), *(None,) * 7)
    gran = ops.granularity(strategy, axis, None)
    rows, g_rows = gran.rows(saved), gran.rows(g)
    alpha = _absmean(rows)
    gx = g_rows * alpha.unsqueeze(1)
    if est.derivative is not None:
        gx = _times_derivative(gx, est, rows, params)
    # α = mean|x| depends on x too: dα/dx_i = sgn(x_i)/n (d|x|/dx = 0 at 0, as torch).
    g_alpha = (_wide(g_rows) * _pm1(rows)).sum(dim=1, keepdim=True) / rows.shape[1]
    gx = gx + (torch.sign(_wide(rows)) * g_alpha).to(gx.dtype)
    gx = gran.unrows(gx, saved.shape)
    return (ops.mix_input_grad(grad, gx, strength), *(None,) * 7)


def _absmean(rows: torch.Tensor) -> torch.Tensor:
    # mean(dtype=...) accumulates wide without saving a widened copy of x.
    wide = torch.promote_types(rows.dtype, torch.float32)
    return rows.abs().mean(dim=1, dtype=wide).to(rows.dtype)


@ops.define(
    "binarize", fake=_binarize_fake, setup_context=_binarize_setup, backward=_binarize_backward
)
def binarize(
    x: torch.Tensor,
    scale: str,
    estimator: str,
    params: torch.Tensor,
    strategy: str,
    axis: int | None,
    mask_out: bool,
    strength: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """α·sign(x) per scale group (``torch.ops.stefx.binarize``); α = 1 (``scale: none``)
    or mean|x| (``absmean``). Returns ``(y, mask)``: with ``mask_out`` and an indicator
    estimator without a scale, the mask g'(x) the backward keeps; else an empty tensor."""
    est = SIGN_ESTIMATORS.get(estimator)
    gran = ops.granularity(strategy, axis, None)
    rows = gran.rows(x)
    y = _fast_sign(rows)
    if scale != "none" and x.numel():
        y = ops.Scratch(y).mul(_absmean(rows).unsqueeze(1)).t
    y = ops.mix(rows, y, strength)
    keep_mask = mask_out and est.indicator and scale == "none" and x.numel() > 0
    mask = (
        est.derivative(x, _estimator_params(params))
        if keep_mask
        else x.new_empty(0, dtype=torch.bool)
    )
    return ops.from_rows(gran, y, x), mask


def _bad_option(where: str, key: str, value: object, fix: str) -> RecipeError:
    return RecipeError(f"{where}: {key}={value!r} is invalid; {fix}")


@register_quantizer("binary")
class BinaryQuantizer(Quantizer):
    """1-bit sign quantizer; see the module docstring for the math."""

    bits_choices = (1,)
    strategies = ("tensor", "channel", "token")
    scales = ("none", "absmean")
    estimators = ("clipped", *(n for n in SIGN_ESTIMATORS.names() if n != "clipped"))
    mixes_strength = True
    options = MappingProxyType({"beta": 5.0, "t_min": 0.1, "t_max": 10.0, "threshold": "none"})

    @classmethod
    def check_options(cls, options, where):
        if not options["beta"] > 0:
            raise _bad_option(where, "beta", options["beta"], "expected a number > 0")
        t_min, t_max = options["t_min"], options["t_max"]
        if not 0 < t_min < math.inf:
            raise _bad_option(where, "t_min", t_min, "expected a finite number > 0")
        if not t_min <= t_max < math.inf:
            raise _bad_option(where, "t_max", t_max, f"expected a finite number >= t_min={t_min}")
        if options["threshold"] not in ("none", "learned", "auto"):
            raise _bad_option(
                where,
                "threshold",
                options["threshold"],
                "choose one of ['none', 'learned', 'auto']",
            )

    def __init__(self, spec) -> None:
        super().__init__(spec)
        # β, t, k as a tensor the op reads: a changing EDE t does not recompile a graph
        self.register_buffer("_estimator_params", torch.zeros(3), persistent=False)
        self.progress = 0.0
        if self.spec.options["threshold"] == "learned":  # RSign: per-channel τ, lazily
            self.threshold = nn.Parameter(torch.empty(0))

    @property
    def progress(self) -> float:
        """Training progress p in [0, 1]; drives the EDE schedule (ignored by others)."""
        return self._progress

    @progress.setter
    def progress(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise RecipeError(f"progress={value!r} is invalid; expected a number in [0, 1]")
        self._progress = float(value)
        self._sync_buffers()

    def _sync_buffers(self) -> None:
        super()._sync_buffers()
        params = self.__dict__.get("_buffers", {}).get("_estimator_params")
        if params is not None and not params.is_meta and hasattr(self, "_progress"):
            with torch.no_grad():
                params.copy_(torch.tensor(list(self.estimator_params().values())))

    def sharing_key(self) -> tuple | None:
        if self._learns_threshold:
            return None
        return self._stateless_key(tuple(self.estimator_params().values()))

    @property
    def _learns_threshold(self) -> bool:
        return self.spec.options["threshold"] == "learned"

    @staticmethod
    def _channel_axis(x: torch.Tensor) -> int:
        return 1 if x.dim() >= 4 else x.dim() - 1

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """``threshold: learned``: τ = the per-channel mean of ``x`` (finite values)."""
        if not self._learns_threshold or x.is_meta or x.numel() == 0:
            return
        axis = self._channel_axis(x)
        rows = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1).float()
        finite = rows.isfinite()
        mean = torch.where(finite, rows, 0.0).sum(1) / finite.sum(1).clamp_min(1)
        self.threshold.data = mean.to(self.threshold.dtype)

    def _shifted(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold.numel() == 0:
            self.lazy_init(x)
        axis = self._channel_axis(x)
        if self.threshold.numel() != x.shape[axis]:
            raise RuntimeError(
                f"binary: the learned threshold has {self.threshold.numel()} channels but "
                f"the input {tuple(x.shape)} has {x.shape[axis]} on axis {axis}; one "
                "quantizer per tensor"
            )
        shape = [1] * x.dim()
        shape[axis] = -1
        return x - self.threshold.view(shape).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._learns_threshold:
            self._shape_empty_parameter("threshold", state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def estimator_params(self) -> dict[str, float]:
        """The numbers the estimator reads: ``beta``, and EDE's ``t`` and ``k`` now."""
        o = self.spec.options
        t, k = ede_params(self._progress, o["t_min"], o["t_max"])
        return {"beta": o["beta"], "t": t, "k": k}

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        shifted = self._learns_threshold and x.numel() > 0
        y, _ = binarize(
            self._shifted(x) if shifted else x,
            s.scale,
            s.estimator,
            self._estimator_params,
            s.strategy,
            s.axis,
            # a weight stays alive anyway: the backward re-reads it instead of a mask
            not isinstance(x, nn.Parameter),
            None if shifted else self.strength_arg(),
        )
        if shifted and not self._full:  # λ mixes with the input itself, not with x - τ
            y = x + self._strength_t.to(y.dtype) * (y - x)
        return y

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
