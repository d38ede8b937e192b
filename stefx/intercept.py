"""Op interception: quantize the operands of functional ops (matmul, bmm, SDPA...), the
result of a pointwise op that ends a recipe pattern (``F.relu``, ``x + y``), or a weight
at the one call that reads it, inside one module's own forward, without tracing or
replacing that module.

Hugging Face attention is not fx-traceable and splicing a GraphModule in would cost the
module its class, so op sites are materialised at run time instead: while the owning
module runs, a ``TorchFunctionMode`` sees each torch-level call, counts calls per counter
(the op-site rule of :mod:`stefx.sites`, so the ordinals are the ones match read off the
analysis graph) and routes the operands of the selected calls through their quantizers,
positional or keyword (``F.scaled_dot_product_attention(query=q, key=k, value=v)``).
Calls made inside child modules are not counted: the children's hooks suspend the count
while they run. A quantizer's own work is one ``torch.ops.stefx`` call, which counts
under no counter, so no ancestor's numbering moves when quantizers run.

Dynamo traces this mode (entered in a forward pre-hook, left in the forward hook), so a
model with op sites still compiles into one graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from stefx.capture.kinds import MATMUL_KINDS, kind_of_function
from stefx.sites import counter_of_function, operand_slots

__all__ = ["OpEntry", "OpInterceptor", "weight_kind_of_function"]


@dataclass(frozen=True)
class OpEntry:
    """What one op site quantizes: the names (in the owner's ``op_quantizers``) of the
    quantizer of each operand slot (None: that operand stays float) and of the result's;
    ``site`` is the site's name, for messages."""

    inputs: tuple[str | None, ...] = ()
    output: str | None = None
    site: str = ""


_WEIGHT_KINDS: dict[Any, str] = {}


@torch.compiler.assume_constant_result
def weight_kind_of_function(func: Any) -> str:
    """The site kind of a call that may read a module's weight: ``linear`` for every
    matrix product but fused experts (HF Conv1D's addmm is a linear site), else the kind."""
    try:
        return _WEIGHT_KINDS[func]
    except KeyError:
        kind = kind_of_function(func)
        kind = _WEIGHT_KINDS[func] = "linear" if kind in MATMUL_KINDS - {"experts"} else kind
        return kind


class OpInterceptor(TorchFunctionMode):
    """Routes the operands and result of selected op calls through quantizers.

    ``table`` maps (counter, ordinal) -> :class:`OpEntry`; ``call_weights`` maps a site
    kind -> {weight parameter name: quantizer name} for weights quantized at each call
    of that kind (a weight two ops of one module read with different specs). Only calls
    whose counter appears in the table are counted.
    """

    def __init__(
        self,
        owner: nn.Module,
        table: dict[tuple[str, int], OpEntry],
        call_weights: dict[str, dict[str, str]],
    ) -> None:
        super().__init__()
        self.owner = owner
        self.table = table
        self.call_weights = call_weights
        self.counters = frozenset(key for key, _ in table)
        self.counts: dict[str, int] = {}
        self.suspended = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suspended:
            return func(*args, **kwargs)
        if self.call_weights:
            weights = self.call_weights.get(weight_kind_of_function(func))
            if weights:
                args, kwargs = self._quantize_weights(weights, args, kwargs)
        key = counter_of_function(func) if self.counters else None
        if key is None or key not in self.counters:
            return func(*args, **kwargs)
        ordinal = self.counts.get(key, 0)
        self.counts[key] = ordinal + 1
        entry = self.table.get((key, ordinal))
        if entry is None:
            return func(*args, **kwargs)
        return self._quantized_call(key, func, args, kwargs, entry)

    def _quantize_weights(self, weights: dict[str, str], args, kwargs):
        """Replace each latent weight among the arguments by its quantized value."""
        owner = self.owner
        for param, qname in weights.items():
            latent = owner._parameters.get(param)
            if latent is None:
                continue
            q = owner._modules[qname]
            if any(a is latent for a in args):
                qw = q(latent)
                args = tuple(qw if a is latent else a for a in args)
            if any(v is latent for v in kwargs.values()):
                qw = q(latent)
                kwargs = {k: (qw if v is latent else v) for k, v in kwargs.items()}
        return args, kwargs

    def _quantized_call(self, kind, func, args, kwargs, entry: OpEntry):
        quantizers = self.owner._modules["op_quantizers"]
        if entry.inputs:
            args = list(args)
            if kind == "einsum" and len(args) == 2 and isinstance(args[1], (list, tuple)):
                args = [args[0], *args[1]]  # einsum(eq, [a, b]) -> einsum(eq, a, b)
            slots = operand_slots(kind, max(len(args) - 1, len(entry.inputs)))
            for (pos, name), qname in zip(slots, entry.inputs, strict=False):
                if qname is None:
                    continue
                q = quantizers[qname]
                if pos < len(args) and _is_float(args[pos]):
                    args[pos] = q(args[pos])
                elif name and _is_float(kwargs.get(name)):
                    kwargs = {**kwargs, name: q(kwargs[name])}
        out = func(*args, **kwargs)
        if entry.output is not None and _is_float(out):
            out = quantizers[entry.output](out)
        return out

    def unfired(self) -> list[str]:
        """Names of the op sites in the table that this forward never reached."""
        return [e.site for (key, n), e in self.table.items() if self.counts.get(key, 0) <= n]


def _is_float(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()
