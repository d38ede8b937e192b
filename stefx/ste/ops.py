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
import threading
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from stefx.ste.granularity import Granularity

__all__ = [
    "NAMESPACE",
    "apply_mask",
    "as_float",
    "define",
    "fake_rows_output",
    "from_rows",
    "granularity",
    "is_stefx_op",
    "mix",
    "mix_input_grad",
    "op_names",
    "scaled",
    "traced",
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
    when given, its autograd formula. Returns the function to call (``.op`` is the op).

    The call takes the registered op wherever someone looks at the ops that run:
    under ``torch.compile`` and ``torch.export``, under any dispatch mode (FlopCounter,
    FakeTensor, a profiler's), on meta tensors or tensor subclasses. Plain eager calls
    take a ``torch.autograd.Function`` over the same kernel, setup and backward: the op's
    Python dispatch costs ~0.1 ms a call, which a training step of a small model feels.
    """

    def deco(fn: Callable):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        _DEFINED.append(name)
        eager = _eager_function(name, fn, setup_context, backward)
        overload = getattr(torch.ops, NAMESPACE).__getattr__(name).default

        _KERNELS.append((overload, fn))

        def call(*args):
            x = args[0]
            if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
                _inductor_decompositions()
            if (
                eager is None
                or type(x) not in _PLAIN
                or x.device.type == "meta"
                or torch.compiler.is_compiling()
                or torch.compiler.is_exporting()
                or _get_current_dispatch_mode() is not None
            ):
                return overload(*args)
            with torch._C.DisableTorchFunction():  # no mode counts the kernel's own calls
                return eager.apply(*args)

        call.op = overload
        call.__name__ = call.__qualname__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call

    return deco


_PLAIN = (Tensor, torch.nn.Parameter)  # tensor subclasses take the op path
_KERNELS: list[tuple[torch._ops.OpOverload, Callable]] = []


def _traced_as_functional(fn: Callable) -> Callable:
    def decomposition(*args):
        before, _functional.on = _functional.on, True
        try:
            return fn(*args)
        finally:
            _functional.on = before

    return decomposition


@torch.compiler.assume_constant_result
def _inductor_decompositions() -> bool:
    """Give inductor each op's kernel as its decomposition, so a compiled graph fuses the
    quantizer's arithmetic with its neighbours instead of calling it as an opaque kernel
    (dynamo's graph still shows the stefx op). Runs while dynamo traces, before inductor
    lowers; a torch without this table keeps the ops opaque (slower, still correct)."""
    try:
        from torch._inductor import decomposition as inductor
    except Exception:  # pragma: no cover - a torch without inductor
        return False
    new = [op for op, _ in _KERNELS if op not in inductor.decompositions]
    for overload, fn in _KERNELS:
        inductor.decompositions.setdefault(overload, _traced_as_functional(fn))
    cached = getattr(inductor, "fast_random_decomps", None)  # a copy made once a process
    if new and hasattr(cached, "cache_clear"):
        cached.cache_clear()
    return True


def _eager_function(name, fn, setup_context, backward):
    """A ``torch.autograd.Function`` running ``fn`` with the op's own setup and backward."""
    if backward is None:
        return None

    def forward(ctx, *args):
        ctx.set_materialize_grads(False)
        out = fn(*args)
        setup_context(ctx, args, out)
        return out

    def eager_backward(ctx, *grads):
        if grads[0] is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, *grads)

    return type(
        f"stefx_{name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(eager_backward)},
    )


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


class _Functional(threading.local):
    on = False


_functional = _Functional()


class Scratch:
    """A buffer a kernel owns and rewrites. Its arithmetic runs in place in eager mode (no
    fresh allocation) and out of place while inductor traces the kernel as a
    decomposition, which must be functional. ``.t`` is the tensor.

    >>> Scratch(torch.tensor([1.25, -0.5])).mul(2.0).round().t
    tensor([ 2., -1.])
    """

    __slots__ = ("t",)

    def __init__(self, t: Tensor) -> None:
        self.t = t

    def _apply(self, name: str, *args, **kwargs) -> Scratch:
        if _functional.on:
            self.t = getattr(self.t, name)(*args, **kwargs)
        else:
            self.t = getattr(self.t, name + "_")(*args, **kwargs)
        return self

    def add(self, *a, **k):
        return self._apply("add", *a, **k)

    def sub(self, *a, **k):
        return self._apply("sub", *a, **k)

    def mul(self, *a, **k):
        return self._apply("mul", *a, **k)

    def div(self, *a, **k):
        return self._apply("div", *a, **k)

    def clamp(self, *a, **k):
        return self._apply("clamp", *a, **k)

    def round(self):
        return self._apply("round")

    def floor(self):
        return self._apply("floor")

    def sign(self):
        return self._apply("sign")

    def logical_and(self, other):
        return self._apply("logical_and", other)


def functional() -> bool:
    """Whether a kernel is being traced as an inductor decomposition (no in-place ops,
    no reading values)."""
    return _functional.on


def mix(x: Tensor, q: Tensor, strength: Tensor | None) -> Tensor:
    """``x + λ·(q - x)`` written into ``q`` (a fresh buffer the op owns); ``q`` if λ = 1."""
    if strength is not None:
        q = Scratch(q).sub(x).mul(strength.to(q.dtype)).add(x).t
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
    if out.stride() == like.stride() or like.numel() <= 1 or _functional.on:
        return out  # (inside a compiled graph inductor picks the layouts itself)
    return torch.empty_like(like).copy_(out)


def traced(t: Tensor) -> bool:
    """Whether ``t`` is a tracer's stand-in (AOTAutograd's functional or fake tensors)
    rather than a real tensor: kernels then write what a compiler fuses best."""
    return type(t) not in _PLAIN


def as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as 0/1 in ``dtype``. In eager mode read as uint8 and widened (one fast
    pass; bool-to-float takes a slow casting path on CPU); traced, a plain cast (inductor
    vectorises it, and a bool-to-uint8 view it does not)."""
    return mask.to(dtype) if traced(mask) else mask.view(torch.uint8).to(dtype)


def apply_mask(grad: Tensor, mask: Tensor) -> Tensor:
    """``grad`` where ``mask`` (bool) holds, else 0, in ``grad``'s dtype: one buffer in
    eager mode (``torch.where`` and a float-by-bool product are slow there on CPU),
    ``torch.where`` when traced (one fused select)."""
    if traced(grad):
        return torch.where(mask, grad, 0.0)
    return as_float(mask, grad.dtype).mul_(grad)
