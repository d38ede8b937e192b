r"""``lsq`` and ``lsq+``: learned step size quantization, and its learned-offset extension.

**LSQ** (Esser et al. 2019, arXiv:1902.08153). Per scale group (see
:mod:`stefx.ste.granularity`) a learned step s > 0 maps v to integer codes in [-Qn, Qp]::

    u  = v / s
    v̂  = round(clamp(u, -Qn, Qp)) · s

``symmetric: true`` (default) gives signed codes, Qn = 2^(b-1), Qp = 2^(b-1) - 1;
``symmetric: false`` gives unsigned codes, Qn = 0, Qp = 2^b - 1 (post-ReLU activations).
There is no zero point: "symmetric" names the code range, as in ``uniform``.

Backward (round passed straight through; boundaries as in the paper's step gradient:
strict inside, inclusive outside, so a value exactly on -Qn or Qp counts as clipped)::

    ∂v̂/∂v = 1{-Qn < u < Qp}
    ∂v̂/∂s = round(u) - u  if -Qn < u < Qp;   -Qn  if u <= -Qn;   Qp  if u >= Qp
    ∂L/∂s = g · Σ_group ∂L/∂v̂ · ∂v̂/∂s,      g = 1 / sqrt(N · Qp)

N is the number of elements sharing one step *in the tensor this call sees*:
``numel / groups``. The paper uses N_W (weights in the layer) and N_F (features in the
layer); for activations we count what arrives, so N includes the batch (and sequence)
dimensions, as most public re-implementations do. ``grad_scale: false`` sets g = 1.

Initialisation, lazily from the first tensor seen (or an explicit :meth:`init_from`),
per group, over finite values only (option ``init``):

- ``paper`` (default): s = 2 · mean|v| / sqrt(Qp);
- ``absmax``: s = max|v| / Qp, the plain absmax quantizer's step;
- ``mse``: s = c · max|v| / Qp with c in {0.05, 0.10, ..., 1} minimising the squared
  quantization error of the group: a good PTQ point to start QAT from.

**LSQ+** (Bhalgat et al. 2020, arXiv:2004.09576) adds a learned offset β per group::

    u  = (v - β) / s
    v̂  = round(clamp(u, n, p)) · s + β            [n, p] = [-Qn, Qp] as above

Gradients for v and s are LSQ's on (v - β); the offset gets ∂v̂/∂β = 1 - 1{n < u < p}
(inside, the -1 that reaches β through u cancels the +1 of the added β). Both ∂L/∂s
and ∂L/∂β are scaled by g = 1 / sqrt(N · p). Initialisation (``init``):

- ``minmax`` (default; the paper's activation init): s = (max - min) / (p - n),
  β = min - n · s, so [min, max] maps onto [n, p] exactly.
- ``meanstd`` (the paper's weight init): s = max(|μ - 3σ|, |μ + 3σ|) / 2^(b-1) with the
  population σ, and β = -(n + 2^(b-1)) · s: 0 for signed codes, and for unsigned codes the
  shift that centres them on zero (the paper keeps weights symmetric, without offset).

Guards: the step enters the division as max(s, 1e-12) (the gradient still reaches s);
a group with no non-zero finite value initialises s = 1, which quantizes zeros exactly
and keeps s trainable. Rounding is round-half-to-even (``torch.round``).

The op is ``torch.ops.stefx.lsq``; its backward saves only the input and the learned
parameters (for a weight, the parameter itself: no copy); masks and the codes are
recomputed in backward. The learned parameters stay one ``nn.Parameter``
object each (initialisation assigns ``.data``), so an optimizer built before the first
forward keeps updating them; ``load_state_dict`` accepts saved ones before that.

>>> import torch
>>> from stefx.ste.lsq import LSQQuantizer
>>> q = LSQQuantizer({"num_bits": 2})  # codes -2..1
>>> x = torch.tensor([-1.5, 0.25, 0.0, 2.25], requires_grad=True)
>>> y = q(x)  # first call sets s = 2 · mean|x| / sqrt(1) = 2
>>> q.scale.tolist(), y.tolist()
([2.0], [-2.0, 0.0, 0.0, 2.0])
>>> y.sum().backward()
>>> x.grad.tolist(), q.scale.grad.tolist()  # 0.5 · (-0.25 - 0.125 + 0 + 1)
([1.0, 1.0, 1.0, 0.0], [0.3125])

>>> from stefx.ste.lsq import LSQPlusQuantizer
>>> q = LSQPlusQuantizer({"num_bits": 2, "symmetric": False})  # codes 0..3
>>> x = torch.tensor([-1.0, -0.25, 0.75, 2.0], requires_grad=True)
>>> y = q(x)  # min/max init: s = (2 - (-1)) / 3 = 1, β = -1
>>> q.scale.tolist(), q.offset.tolist(), y.tolist()
([1.0], [-1.0], [-1.0, 0.0, 1.0, 2.0])
>>> y.sum().backward()  # min and max sit on the range ends, so count as clipped
>>> x.grad.tolist(), round(q.offset.grad.item(), 4)  # β: 2 clipped · 1/sqrt(4 · 3)
([0.0, 1.0, 1.0, 0.0], 0.5774)
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import Tensor, nn

from stefx.errors import RecipeError
from stefx.ste import ops
from stefx.ste.base import Quantizer
from stefx.ste.granularity import Granularity
from stefx.ste.spec import register_quantizer
from stefx.ste.uniform import code_range

__all__ = ["LSQPlusQuantizer", "LSQQuantizer"]

_EPS = 1e-12


def _codes(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, gran: Granularity
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unclamped codes u = (v - β) / s as fp32 rows (G, N), with s and β as (G, 1) columns."""
    rows = gran.rows(x).float()
    s = scale.float().clamp_min(_EPS).unsqueeze(1)
    if offset is None:
        return rows / s, s, None
    b = offset.float().unsqueeze(1)
    return (rows - b) / s, s, b


def _lsq_grad_scale(x: Tensor, groups: int, qmax: int, on: bool) -> float:
    """g = 1 / sqrt(N · Qp) with N = numel / groups elements per step (1 when off)."""
    return 1.0 / math.sqrt(max(x.numel() // max(groups, 1), 1) * qmax) if on else 1.0


def _lsq_fake(x, scale, offset, qmin, qmax, grad_scale, strategy, axis, group_size, strength):
    return ops.fake_rows_output(x)


def _lsq_setup(ctx, inputs, output):
    x, scale, offset, qmin, qmax, grad_scale, strategy, axis, group_size, strength = inputs
    ctx.save_for_backward(x, scale, offset, strength)
    ctx.consts = (ops.granularity(strategy, axis, group_size), qmin, qmax, grad_scale)


def _lsq_backward(ctx, grad):
    x, scale, offset, strength = ctx.saved_tensors
    gran, qmin, qmax, on = ctx.consts
    # Two full-size buffers (u, and dL/dx) and a bool mask; everything else in place,
    # because on CPU every fresh large allocation costs page faults.
    u, _, _ = _codes(x, scale, offset, gran)
    g_rows = gran.rows(ops.scaled(grad, strength)).float()
    inside = (u > qmin).logical_and_(u < qmax)  # strictly inside: a code on a bound is clipped
    g = _lsq_grad_scale(x, u.shape[0], qmax, on)
    gs = gb = None
    buf = ops.as_float(inside, u.dtype)  # 1{inside}
    if ctx.needs_input_grad[1]:
        # dv̂/ds = round(u) - u inside, the bound outside: c - 1{inside}·u with c the code
        buf.mul_(u)
        dv_ds = u.clamp_(qmin, qmax).round_().sub_(buf)
        gs = (dv_ds.mul_(g_rows).sum(1) * g).to(scale.dtype)
        buf = (
            ops.as_float(inside, u.dtype)
            if ops.traced(buf)
            else buf.copy_(inside.view(torch.uint8))
        )
    gx_rows = buf.mul_(g_rows)
    if offset is not None and ctx.needs_input_grad[2]:
        gb = ((g_rows.sum(1) - gx_rows.sum(1)) * g).to(offset.dtype)  # Σ g·1{clipped}
    gx = None
    if ctx.needs_input_grad[0]:
        gx = ops.from_rows(gran, gx_rows, x).to(x.dtype)
        gx = ops.mix_input_grad(grad, gx, strength)
    return gx, gs, gb, None, None, None, None, None, None, None


@ops.define("lsq", fake=_lsq_fake, setup_context=_lsq_setup, backward=_lsq_backward)
def learned_step(
    x: Tensor,
    scale: Tensor,
    offset: Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: bool,
    strategy: str,
    axis: int | None,
    group_size: int | None,
    strength: Tensor | None,
) -> Tensor:
    """v̂ = round(clamp((v - β)/s, qmin, qmax))·s + β with LSQ(+) gradients for v, s, β
    (``torch.ops.stefx.lsq``); ``grad_scale``: scale the step gradients by LSQ's g."""
    gran = ops.granularity(strategy, axis, group_size)
    u, s, b = _codes(x, scale, offset, gran)
    y = ops.Scratch(u).clamp(qmin, qmax).round().mul(s)
    y = (y.add(b) if b is not None else y).t
    # u is a fresh buffer (the division), so y never aliases x
    return ops.mix(x, ops.from_rows(gran, y, x).to(x.dtype), strength)


INIT_BLOCK = 1 << 18  # elements of the rows one init step reads at a time (1 MiB of float)


def _finite_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite-value mask of ``rows`` and its per-row count (at least 1, to divide by)."""
    finite = rows.isfinite()
    return finite, finite.sum(1).clamp_min(1)


def _positive_or_one(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > _EPS, s, torch.ones_like(s))


class _LearnedStepQuantizer(Quantizer):
    """Shared machinery of ``lsq`` and ``lsq+``: learned per-group step (and offset)."""

    bits_choices = (2, 3, 4, 5, 6, 7, 8)
    default_bits = 4
    strategies = ("tensor", "channel", "group")
    scales = ("learned",)
    estimators = ("clipped",)
    allows_asymmetric = True
    has_offset: ClassVar[bool] = False
    mixes_strength = True
    inits: ClassVar[tuple[str, ...]] = ()  # the values option ``init`` takes

    @classmethod
    def check_options(cls, options, where):
        if options["init"] not in cls.inits:
            raise RecipeError(
                f"{where}: init={options['init']!r} is invalid; choose one of {list(cls.inits)}"
            )

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.qmin, self.qmax = code_range(self.bits, self.spec.symmetric)
        self.scale = nn.Parameter(torch.empty(0))
        if self.has_offset:
            self.offset = nn.Parameter(torch.empty(0))
        else:
            self.register_parameter("offset", None)

    @property
    def initialized(self) -> bool:
        """Whether the learned parameters hold values (from data or a state dict): they
        are empty until then. Read off the tensors themselves, so any loader that sets
        them (``load_state_dict``, transformers' ``from_pretrained``, FSDP) counts."""
        return self.scale.numel() > 0

    def _learned(self) -> tuple[str, ...]:
        return ("scale", "offset") if self.has_offset else ("scale",)

    def _initial_values(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set the learned parameters from ``x`` (a meta or empty tensor carries no values:
        nothing happens and the first real tensor initialises)."""
        if x.is_meta or x.numel() == 0:
            return
        # NaN pads a ragged last group: the statistics below skip non-finite values
        rows = self.granularity.rows(x.detach(), fill=float("nan"))
        # Every statistic is per row: take the rows a block at a time, so the temporaries
        # (a float copy, the mask, |v|, the MSE grid's errors) stay small next to the weight
        # and quantize's peak memory stays near the model's (benchmarks/bench_quantize.py)
        block = max(1, INIT_BLOCK // max(1, rows.shape[1]))
        parts = [self._initial_values(part.float()) for part in rows.split(block)]
        values = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        for name, value in values.items():
            param = getattr(self, name)
            if param.is_meta:
                raise RuntimeError(
                    f"{self.type_name}: {name} is on the meta device; materialise the module "
                    "with .to_empty(device=...) before feeding it real tensors"
                )
            dtype = param.dtype if param.is_floating_point() else torch.float32
            param.data = value.to(dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        if not self.initialized:
            self.lazy_init(x)
        groups = self.granularity.num_groups(x.shape)
        params = [getattr(self, name) for name in self._learned()]
        if x.is_meta:  # shape-only pass: stand-ins unless the parameters live on meta too
            params = [
                p if p.is_meta and p.numel() == groups else torch.empty(groups, device="meta")
                for p in params
            ]
        elif params[0].numel() != groups:
            raise RuntimeError(
                f"{self.type_name}: learned step has {params[0].numel()} groups but an input "
                f"of shape {tuple(x.shape)} has {groups} (strategy {self.spec.strategy!r}); "
                "use one quantizer per tensor"
            )
        offset = params[1] if self.has_offset else None
        s = self.spec
        return learned_step(
            x,
            params[0],
            offset,
            self.qmin,
            self.qmax,
            s.options["grad_scale"],
            s.strategy,
            s.axis,
            s.group_size,
            self.strength_arg(),
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Before the first forward the parameters are empty: take the saved shape, as long
        # as it is one value per group (exactly one for per-tensor).
        if not self.initialized:
            for name in self._learned():
                saved = state_dict.get(prefix + name)
                param = getattr(self, name)
                fits = (
                    isinstance(saved, torch.Tensor)
                    and saved.dim() == 1
                    and saved.numel() > 0
                    and (self.spec.strategy != "tensor" or saved.numel() == 1)
                )
                if fits and saved.shape != param.shape:
                    param.data = torch.empty(saved.shape, dtype=param.dtype, device=param.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_quantizer("lsq")
class LSQQuantizer(_LearnedStepQuantizer):
    """Learned step size quantization (arXiv:1902.08153); see the module docstring."""

    options = MappingProxyType({"grad_scale": True, "init": "paper"})
    inits = ("paper", "absmax", "mse")

    def _initial_values(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        finite, count = _finite_rows(rows)
        init = self.spec.options["init"]
        if init == "paper":
            mean_abs = torch.where(finite, rows.abs(), 0.0).sum(1) / count
            return {"scale": _positive_or_one(2.0 * mean_abs / math.sqrt(self.qmax))}
        top = torch.where(finite, rows.abs(), 0.0).amax(1)
        if init == "absmax":
            return {"scale": _positive_or_one(top / self.qmax)}
        return {"scale": _positive_or_one(_mse_step(rows, finite, top, self.qmin, self.qmax))}


MSE_GRID = 20  # clipping ratios tried by init: mse, from 1/MSE_GRID to 1 of max|v|


def _mse_step(rows, finite, top, qmin: int, qmax: int) -> torch.Tensor:
    """Per row, the step c·max|v|/Qp (c on a grid in (0, 1]) whose quantization of the row
    has the least squared error: clipping a few outliers buys finer steps for the rest,
    the usual PTQ starting point (e.g. Banner et al., arXiv:1810.05723)."""
    values = torch.where(finite, rows, 0.0)
    best_err = torch.full_like(top, float("inf"))
    best = top / qmax
    for i in range(1, MSE_GRID + 1):
        step = (top * (i / MSE_GRID) / qmax).clamp_min(_EPS).unsqueeze(1)
        err = ((values / step).round().clamp(qmin, qmax) * step - values).square().sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, step.squeeze(1), best)
    return best


@register_quantizer("lsq+")
class LSQPlusQuantizer(_LearnedStepQuantizer):
    """LSQ with a learned offset (arXiv:2004.09576); see the module docstring."""

    options = MappingProxyType({"grad_scale": True, "init": "minmax"})
    has_offset = True
    inits = ("minmax", "meanstd")

    def _initial_values(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        finite, count = _finite_rows(rows)
        n, p = self.qmin, self.qmax
        if self.spec.options["init"] == "minmax":
            inf = torch.tensor(float("inf"), device=rows.device)
            lo = torch.where(finite, rows, inf).amin(1)
            hi = torch.where(finite, rows, -inf).amax(1)
            none = finite.sum(1) == 0
            lo, hi = lo.masked_fill(none, 0.0), hi.masked_fill(none, 0.0)
            scale = _positive_or_one((hi - lo) / (p - n))
            return {"scale": scale, "offset": lo - n * scale}
        values = torch.where(finite, rows, 0.0)
        mu = values.sum(1) / count
        var = (torch.where(finite, rows - mu.unsqueeze(1), 0.0) ** 2).sum(1) / count
        sigma = var.sqrt()
        half = 2 ** (self.bits - 1)
        scale = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / half
        scale = _positive_or_one(scale)
        return {"scale": scale, "offset": -(n + half) * scale}
