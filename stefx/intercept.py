"""Op interception: quantize the operands of functional ops (matmul, bmm, SDPA...), or the
result of a pointwise op that ends a recipe pattern (``F.relu``, ``x + y``), inside one
module's own forward, without tracing or replacing that module.

Hugging Face attention is not fx-traceable and splicing a GraphModule in would cost the
module its class, so op sites are materialised at run time instead: while the owning
module runs, a ``TorchFunctionMode`` sees each torch-level call, counts calls per site key
(``kinds.site_key``: the op kind of a matmul-like call, the call name of a pointwise one,
so the ordinals are the ones ``stefx.match`` read off the analysis graph) and routes the
operands
of the selected calls through their quantizers. Calls made inside child modules are not
counted: the children's own hooks suspend the count while they run.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from stefx.capture.kinds import call_name, kind_of_function, site_key

__all__ = ["OpInterceptor", "operand_positions", "quiet"]


class _Quiet(threading.local):
    """While active, no interceptor counts or touches a call: stefx's own tensor work
    (quantizers running in hooks) is not part of any module's forward as captured."""

    depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


quiet = _Quiet()


@functools.lru_cache(maxsize=1024)
def _key(func: Any) -> str | None:
    """Site key of a torch-level callable, by capture's own tables (None: no op site)."""
    return site_key(kind_of_function(func), call_name(func))


def operand_positions(kind: str, n_inputs: int) -> tuple[int, ...]:
    """Argument positions of the tensor operands an op site quantizes."""
    if kind in ("matmul", "bmm"):
        return (0, 1)
    if kind in ("baddbmm", "addmm"):
        return (1, 2)  # not the additive input
    if kind == "sdpa":
        return (0, 1, 2)  # query, key, value
    if kind == "einsum":
        return tuple(range(1, 1 + n_inputs))
    raise ValueError(f"no op-site operands known for kind {kind!r}")


class OpInterceptor(TorchFunctionMode):
    """Routes the operands and result of selected op calls through quantizers.

    ``table`` maps (site key, ordinal) -> (list of operand quantizers or None, output
    quantizer or None). Only calls whose key is in the table are counted.
    """

    def __init__(self, table: dict[tuple[str, int], tuple[list, nn.Module | None]]) -> None:
        super().__init__()
        self.table = table
        self.counts: Counter[str] = Counter()
        self.keys = frozenset(key for key, _ in table)
        self.suspended = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None if self.suspended or quiet.depth else _key(func)
        if kind not in self.keys:
            return func(*args, **kwargs)
        ordinal = self.counts[kind]
        self.counts[kind] += 1
        entry = self.table.get((kind, ordinal))
        if entry is None:
            return func(*args, **kwargs)
        operand_qs, output_q = entry
        with quiet:
            return self._quantized_call(kind, func, args, kwargs, operand_qs, output_q)

    @staticmethod
    def _quantized_call(kind, func, args, kwargs, operand_qs, output_q):
        if operand_qs:
            args = list(args)
            if kind == "einsum" and len(args) == 2 and isinstance(args[1], (list, tuple)):
                args = [args[0], *args[1]]  # einsum(eq, [a, b]) -> einsum(eq, a, b)
            for pos, q in zip(operand_positions(kind, len(args) - 1), operand_qs, strict=False):
                if q is not None and pos < len(args) and _is_float(args[pos]):
                    args[pos] = q(args[pos])
        out = func(*args, **kwargs)
        if output_q is not None and _is_float(out):
            out = output_q(out)
        return out


def _is_float(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()
