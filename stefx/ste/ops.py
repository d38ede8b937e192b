"""The stefx operator library: each quantizer's forward pass is one custom op.

Every quantizer family registers one operator in the ``stefx`` namespace with
``torch.library.custom_op``: ``torch.ops.stefx.fake_quant`` (uniform k-bit),
``stefx.lsq`` (learned step, LSQ and LSQ+), ``stefx.binarize``, ``stefx.ternarize``
(absmean, TWN), ``stefx.seq`` (ParetoQ SEQ, ternary SEQ), ``stefx.pact`` and
``stefx.dorefa``. The math of each lives beside its quantizer (``stefx/ste/<type>.py``);
this module owns what they share: registration, the granularity arguments every op
takes, the strength mix λ and boolean masks.

Why custom ops rather than plain autograd functions:

- **Visible.** ``torch.export`` and ``torch.compile`` see one named node per quantizer,
  with its settings as arguments, around the op it guards.
- **Compile-safe.** Dynamo treats a custom op as one call with a fake kernel for
  shapes: no graph break. Its backward, registered with ``register_autograd``, is plain
  torch code that AOTAutograd traces and inductor fuses.
- **Fast in eager mode.** The kernels are written for few passes over memory: in-place
  arithmetic on one buffer, no fused fake-quant kernel (ATen's per-channel one is ~20x
  slower than three vectorised passes on small rows), and nothing saved that the
  backward can do without.

Strength λ: every op takes ``strength``, None for λ = 1 or a 0-dim tensor, and computes
``y = x + λ·(q(x) - x)`` itself, so a ramped quantizer is still one node; its backward is
``(1 - λ)·g + λ·(dq/dx)ᵀg``, and ``λ·(dq/dθ)ᵀg`` for learned parameters θ. A tensor, not
a float, so that ``torch.compile`` does not recompile for every λ of a ramp.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from stefx.ste.granularity import Granularity

__all__ = [
    "NAMESPACE",
    "apply_mask",
    "define",
    "fake_rows_output",
    "from_rows",
    "granularity",
    "is_stefx_op",
    "mix",
    "mix_input_grad",
    "op_names",
    "scaled",
]

NAMESPACE = "stefx"
_DEFINED: list[str] = []


def define(
    name: str,
    *,
    fake: Callable,
    setup_context: Callable | None = None,
    backward: Callable | None = None,
):
    """Decorator: register ``fn`` as ``torch.ops.stefx.<name>`` with its fake kernel and,
    when given, its autograd formula. Returns the op (call it like the function)."""

    def deco(fn: Callable):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        _DEFINED.append(name)
        return op

    return deco


def op_names() -> tuple[str, ...]:
    """The names of the stefx ops registered so far (``fake_quant``, ``lsq``...)."""
    return tuple(_DEFINED)


def is_stefx_op(target: object) -> bool:
    """Whether an fx node target (an OpOverload or packet) is one of the stefx ops."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == NAMESPACE
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.startswith(f"{NAMESPACE}::")
    return False


@functools.lru_cache(maxsize=256)
def granularity(strategy: str, axis: int | None, group_size: int | None) -> Granularity:
    """The (cached) granularity an op's three scale-group arguments describe."""
    return Granularity(strategy, axis, group_size)


def mix(x: Tensor, q: Tensor, strength: Tensor | None) -> Tensor:
    """``x + λ·(q - x)`` written into ``q`` (a fresh buffer the op owns); ``q`` if λ = 1."""
    if strength is not None:
        q.sub_(x).mul_(strength.to(q.dtype)).add_(x)
    return q


def scaled(grad: Tensor, strength: Tensor | None) -> Tensor:
    """λ·g: the upstream gradient the quantizer ``q`` itself receives."""
    return grad if strength is None else grad * strength.to(grad.dtype)


def mix_input_grad(grad: Tensor, grad_q: Tensor | None, strength: Tensor | None) -> Tensor | None:
    """dL/dx of ``x + λ·(q - x)``: ``grad_q`` = (dq/dx)ᵀ(λ·g) plus the (1 - λ)·g path."""
    if grad_q is None or strength is None:
        return grad_q
    return grad_q + grad * (1.0 - strength.to(grad.dtype))


def fake_rows_output(x: Tensor) -> Tensor:
    """Fake kernel output of every stefx op: ``empty_like(x)``, so the output has the
    input's layout (what the real kernels return, see :func:`from_rows`, and what
    inductor assumes when it picks the input's strides)."""
    return torch.empty_like(x)


def from_rows(gran: Granularity, y: Tensor, like: Tensor) -> Tensor:
    """The row-view result ``y`` back in the shape and layout of ``like`` (the op's
    input): free when both are contiguous, one copy otherwise."""
    out = gran.unrows(y, like.shape)
    if out.stride() == like.stride() or like.numel() <= 1:
        return out
    return torch.empty_like(like).copy_(out)


def apply_mask(grad: Tensor, mask: Tensor) -> Tensor:
    """``grad`` where ``mask`` (bool) holds, else 0, in ``grad``'s dtype.

    A bool tensor read as uint8 and widened costs one fast pass; ``torch.where`` and a
    float-by-bool product take a slow casting path on CPU.
    """
    return grad * mask.view(torch.uint8).to(grad.dtype)
