"""The records capture produces: one normalised view of a graph, whatever captured it.

``match`` and ``profile`` read only these records (plus ``node.meta``), so they work the
same on a ``symbolic_trace`` graph of torch-level calls and on a ``torch.export`` graph
of aten ops. Nothing here mutates a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

__all__ = ["OpNode", "Capture"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class OpNode:
    """One computing node of the analysis graph, normalised.

    kind:         op kind shared by recipes and cost formulas: "linear", "conv",
                  "conv_transpose", "matmul", "bmm", "addmm", "baddbmm", "einsum", "sdpa",
                  "embedding", "experts" (fused 3D expert weights), "norm", "softmax",
                  "elementwise", "view" (shape-only), "lstm"/"gru"/"rnn", "opaque"
                  (a leaf module stefx could not look inside), or "other".
    target:       printable target, e.g. "aten.linear.default", "torch.matmul", "Linear".
    module:       FQN (as in ``named_modules()``) of the innermost module the node came
                  from; "" for the root.
    module_type:  class name of that module, e.g. "Linear", "Conv1D", "LlamaAttention".
    module_stack: (fqn, class name) pairs from the outermost to the innermost module.
    params:       role -> parameter FQN for parameters the op reads directly, e.g.
                  {"weight": "transformer.h.0.attn.c_attn.weight", "bias": "..."}.
    input_shapes: shapes of tensor inputs in argument order (None for non-tensors).
    output_shape: shape of the (first) tensor output, or None.
    dtype:        dtype of the output as a string, e.g. "torch.float32".
    attrs:        op attributes the cost formulas need (e.g. {"groups": 2},
                  {"equation": "bij,bjk->bik"}, {"is_causal": True}).
    """

    name: str
    kind: str
    target: str
    module: str = ""
    module_type: str = ""
    module_stack: tuple[tuple[str, str], ...] = ()
    params: dict[str, str] = field(default_factory=dict)
    input_shapes: tuple[Shape | None, ...] = ()
    output_shape: Shape | None = None
    dtype: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Capture:
    """The analysis graph of a model and its normalised op records.

    method:  "symbolic_trace" or "export".
    graph:   the fx graph (its ``node.meta["stefx.op"]`` holds the node's OpNode).
    ops:     OpNode records in execution order (placeholders/outputs/get_attr excluded).
    leaves:  FQNs of submodules kept opaque because they could not be traced.
    notes:   human-readable notes on what capture had to do (fallbacks, leaves).
    """

    method: str
    graph: fx.Graph
    ops: list[OpNode]
    leaves: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
