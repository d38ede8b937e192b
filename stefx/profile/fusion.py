"""What a runtime fuses: pointwise chains and activation quantizers, costed as one kernel.

The analysis graph lists every aten op; a runtime does not run them one by one. GPT-2's
``gelu_new`` is eight aten ops, and costing each as a kernel that reads and writes its
tensor in DRAM charges the activation 18 tensor transfers where any compiler (inductor,
XLA, TensorRT, a hand-written CUDA epilogue) reads its input once and writes its output
once. With ``fusion="pointwise"`` (the default) stefx costs the way such a runtime runs:

- **Pointwise chains.** Elementwise ops connected through pure layout ops (views,
  reshapes, transposes) whose intermediate results feed only other elementwise ops form
  one chain. The chain reads each tensor that comes from outside it once and writes each
  tensor that leaves it once; its FLOPs are the sum of its ops'. The chain's cost sits on
  its last op (one kernel); the others keep their FLOPs and move no bytes.
- **Activation quantizers** (after quantization): an input quantizer is a kernel of its
  own that reads the float tensor, writes the narrow one and its scales (one fp32 scale
  per token, per group or per tensor, as the spec says), at 4 FLOPs per element (scale,
  round, clamp, cast); the op then reads the narrow tensor. An output quantizer runs in
  the op's epilogue: the op writes the narrow tensor (4 FLOPs per element), no extra pass.

``fusion="none"`` keeps the unfused view (every op a kernel with its own DRAM traffic),
labelled as such in the report. ``fusion="eager"`` models PyTorch eager mode: unfused,
and every aten op — views, reshapes and eval-mode dropout included — pays the hardware's
launch floor, since each is one dispatch from Python (what ``measure=True`` times).
Norms, softmax and reductions are not fused into chains (a runtime may fuse a residual
add into the norm that follows; stefx does not assume it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any

import torch.fx

from stefx.capture.graph import OpNode
from stefx.profile.costs import QUANTIZE_FLOPS, Cost, dtype_bits

__all__ = ["FUSIONS", "eager_dispatch", "fuse_pointwise", "quantize_cost"]

FUSIONS = ("pointwise", "none", "eager")
_POINTWISE = frozenset({"elementwise"})


def _tensor_bits_bytes(node: torch.fx.Node) -> float:
    """Bytes of the tensor ``node`` produces (0 if unknown or not a tensor)."""
    meta = node.meta.get("tensor_meta")
    val = node.meta.get("val")
    shape = getattr(meta, "shape", None) or getattr(val, "shape", None)
    dtype = getattr(meta, "dtype", None) or getattr(val, "dtype", None)
    if shape is None or dtype is None:
        return 0.0
    return math.prod(int(d) for d in shape) * dtype_bits(str(dtype)) / 8


def fuse_pointwise(
    graph: torch.fx.Graph, ops: list[OpNode], nodes: dict[int, Any], costs: dict[int, list[Cost]]
) -> int:
    """Rewrite ``costs`` (id(op) -> [before, after]) so that each pointwise chain moves its
    external inputs and outputs once; returns the number of chains fused."""
    op_of = {nodes[id(op)]: op for op in ops if id(op) in nodes}

    def is_layout(n: torch.fx.Node) -> bool:  # a view, or an eval-mode dropout: no kernel
        op = op_of.get(n)
        return (
            op is not None and costs[id(op)][0].kernels == 0 and op.kind in ("view", "elementwise")
        )

    def pointwise(n: torch.fx.Node) -> bool:
        op = op_of.get(n)
        return op is not None and op.kind in _POINTWISE and costs[id(op)][0].status == "counted"

    @functools.cache
    def producers(n: torch.fx.Node) -> frozenset[torch.fx.Node]:  # through layout ops
        return frozenset().union(
            *(producers(p) if is_layout(p) else {p} for p in n.all_input_nodes)
        )

    @functools.cache
    def consumers(n: torch.fx.Node) -> frozenset[torch.fx.Node]:
        return frozenset().union(*(consumers(u) if is_layout(u) else {u} for u in n.users))

    parent: dict[torch.fx.Node, torch.fx.Node] = {}

    def find(n):
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    chain_nodes = [n for n in graph.nodes if pointwise(n)]
    for n in chain_nodes:
        parent.setdefault(n, n)
    for n in chain_nodes:
        for p in producers(n):
            if pointwise(p) and all(pointwise(c) for c in consumers(p)):
                parent[find(p)] = find(n)
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for n in chain_nodes:
        groups.setdefault(find(n), []).append(n)
    fused = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        inside = set(members)
        external = {p for m in members for p in producers(m) if p not in inside}
        leaving = [m for m in members if any(c not in inside for c in consumers(m)) or not m.users]
        read = sum(_tensor_bits_bytes(p) for p in external)
        last = members[-1]  # graph order: the chain's last op carries its one kernel
        for which in (0, 1):
            written = sum(costs[id(op_of[m])][which].act_out_bytes for m in leaving)
            for m in members:
                op = op_of[m]
                c = costs[id(op)][which]
                if m is last:
                    note = f"fused pointwise chain of {len(members)} ops (one kernel)"
                    costs[id(op)][which] = replace(
                        c, act_in_bytes=read, act_out_bytes=written, kernels=1.0, note=note
                    )
                else:
                    costs[id(op)][which] = replace(
                        c, act_in_bytes=0.0, act_out_bytes=0.0, kernels=0.0,
                        note=f"fused into {last.name}",
                    )  # fmt: skip
        fused += 1
    return fused


def eager_dispatch(costs: dict[int, list[Cost]]) -> None:
    """``fusion="eager"``: every op is a dispatch of its own, layout ops included."""
    for pair in costs.values():
        for i, c in enumerate(pair):
            if c.kernels == 0:
                pair[i] = replace(c, kernels=1.0)


def quantize_cost(cost: Cost, op: OpNode, inputs: list[tuple[int, float, int]],
                  out_bits: float | None, fb: int) -> Cost:  # fmt: skip
    """``cost`` (an op's after-quantization cost) plus its activation quantizers: an input
    quantizer as a kernel of its own, an output quantizer in the op's epilogue (see the
    module docstring). ``inputs``: (input position, bits, scales written) per quantized
    input."""
    flops, moved, kernels, notes = 0, 0.0, 0.0, []
    for i, bits, groups in inputs:
        x = op.input_shapes[i] if i < len(op.input_shapes) else None
        if not x or bits >= fb:
            continue
        n = math.prod(x)
        scales = groups * 32 / 8
        flops += QUANTIZE_FLOPS * n
        moved += n * fb / 8 + n * bits / 8 + 2 * scales  # read float, write codes + scales
        kernels += 1
        notes.append(f"input {i} quantized: read {fb}-bit, write {bits:g}-bit + {groups} scales")
    if out_bits is not None and out_bits < fb and op.output_shape:
        flops += QUANTIZE_FLOPS * math.prod(op.output_shape)
        notes.append(f"output quantized to {out_bits:g}-bit in the epilogue")
    if not notes:
        return cost
    note = "; ".join(n for n in (cost.note, *notes) if n)
    return replace(
        cost,
        flops=cost.flops + flops,
        act_in_bytes=cost.act_in_bytes + moved,
        kernels=cost.kernels + kernels,
        note=note,
    )
