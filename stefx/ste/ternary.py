"""``ternary``: weights on three levels {-a, 0, +a} per scale group, three ways to find a.

A ternary code carries log2(3) ≈ 1.58 bits; stefx stores it in 2 bits, so ``bits`` (what
the profiler counts) is 2 and ``levels`` is 3. Strategies: ``tensor`` (one scale),
``channel`` (one per output channel, axis 0) or ``group`` (runs of ``group_size`` along the
input, as GGUF's ``TQ2_0`` stores one scale per 256 weights). The option ``scale_dtype``
(``float32`` default, ``float16``, ``bfloat16``) rounds the scale a to that type before it
multiplies the codes (the codes still come from the fp32 scale), for formats that store
it so (``TQ2_0``: fp16). Backward (``estimator: ste``, the only
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

from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from stefx.errors import RecipeError
from stefx.ste import ops
from stefx.ste.base import Quantizer
from stefx.ste.functions import wide
from stefx.ste.seq import TERNARY_GRID, check_eps, init_alpha, seq_forward
from stefx.ste.spec import register_quantizer
from stefx.ste.uniform import SCALE_DTYPES, stored_scale

__all__ = ["TernaryQuantizer", "absmean_ternary", "ternarize", "twn_ternary"]

TWN_DELTA_FACTOR = 0.7


def absmean_ternary(rows: torch.Tensor, eps: float, scale_dtype: str = "float32") -> torch.Tensor:
    """BitNet b1.58 forward on rows (G, N): RoundClip(W/(γ+ε), -1, 1)·γ, γ = mean|W|."""
    w = wide(rows)
    gamma = w.abs().mean(dim=1, keepdim=True)
    codes = ops.Scratch(w / (gamma + eps)).round().clamp(-1.0, 1.0).add(0.0)  # -0 -> +0
    return codes.mul(stored_scale(gamma, scale_dtype)).t.to(rows.dtype)


def twn_alpha(mag: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """TWN's α per row: the mean of the kept magnitudes (0 where none is kept)."""
    return (mag * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1)


def twn_ternary(rows: torch.Tensor, scale_dtype: str = "float32") -> torch.Tensor:
    """TWN forward on rows (G, N): α·sign(W)·1{|W| > Δ}, Δ = 0.7·mean|W|."""
    w = wide(rows)
    mag = w.abs()
    delta = TWN_DELTA_FACTOR * mag.mean(dim=1, keepdim=True)
    keep = mag > delta
    alpha = stored_scale(twn_alpha(mag, keep), scale_dtype)
    # delta·0 is 0 for a finite Δ and NaN for a non-finite one (see the module docstring).
    y = torch.where(keep, alpha * torch.sign(w), delta * 0.0)
    return y.to(rows.dtype)


def _ternarize_fake(x, method, eps, strategy, axis, group_size, scale_dtype, strength):
    return ops.fake_rows_output(x)


def _ternarize_setup(ctx, inputs, output):
    pass


def _ternarize_backward(ctx, grad):
    # identity STE: dL/dW = dL/dy, and the λ mix x + λ(q - x) has slope 1 as well
    return grad, None, None, None, None, None, None, None


@ops.define(
    "ternarize",
    fake=_ternarize_fake,
    setup_context=_ternarize_setup,
    backward=_ternarize_backward,
)
def ternarize(
    x: torch.Tensor,
    method: str,
    eps: float,
    strategy: str,
    axis: int | None,
    group_size: int | None,
    scale_dtype: str,
    strength: torch.Tensor | None,
) -> torch.Tensor:
    """Ternary weights by ``method`` ``absmean`` or ``twn`` per scale group, with the
    identity STE (``torch.ops.stefx.ternarize``); nothing is saved for the backward."""
    gran = ops.granularity(strategy, axis, group_size)
    rows = gran.rows(x)
    if method == "absmean":
        y = absmean_ternary(rows, eps, scale_dtype)
    else:
        y = twn_ternary(rows, scale_dtype)
    return ops.from_rows(gran, ops.mix(rows, y, strength), x)


@register_quantizer("ternary")
class TernaryQuantizer(Quantizer):
    """Ternary quantizer {-a, 0, a}; see the module docstring for the math."""

    bits_choices = (2,)
    levels: ClassVar[int] = 3
    strategies = ("tensor", "channel", "token", "group")
    scales = ("absmean", "twn", "seq")
    estimators = ("ste",)
    options = MappingProxyType({"eps": 1e-5, "scale_dtype": "float32"})
    mixes_strength = True

    @classmethod
    def check_options(cls, options, where):
        check_eps(options, where)
        if options["scale_dtype"] not in SCALE_DTYPES:
            raise RecipeError(
                f"{where}: scale_dtype={options['scale_dtype']!r} is invalid; choose one of "
                f"{list(SCALE_DTYPES)}"
            )

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.eps = self.spec.options["eps"]
        if self.spec.scale == "seq" and self.spec.options["scale_dtype"] != "float32":
            raise RecipeError(
                f"ternary: scale_dtype={self.spec.options['scale_dtype']!r} applies to the "
                "absmean and twn scales; scale: seq learns an fp32 α, drop scale_dtype"
            )
        if self.spec.scale == "seq":
            self.alpha = nn.Parameter(torch.empty(0))

    def sharing_key(self) -> tuple | None:
        return None if self.spec.scale == "seq" else self._stateless_key()

    def init_from(self, x: torch.Tensor) -> None:
        """``seq``: set α to max|W| per group (NaN and ±inf ignored). Others: nothing."""
        if self.spec.scale == "seq":
            init_alpha(self, x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.scale == "seq":
            return seq_forward(self, x, TERNARY_GRID)
        s = self.spec
        return ternarize(
            x,
            s.scale,
            self.eps,
            s.strategy,
            s.axis,
            s.group_size,
            s.options["scale_dtype"],
            self.strength_arg(),
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.spec.scale == "seq":
            self._shape_empty_parameter("alpha", state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
