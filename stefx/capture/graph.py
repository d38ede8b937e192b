"""The records capture produces: one normalised view of a graph, whatever captured it.

``match`` and ``profile`` read only these records (plus ``node.meta``), so they work the
same on a ``symbolic_trace`` graph of torch-level calls and on a ``torch.export`` graph
of aten ops. Nothing here mutates a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

__all__ = ["Capture", "OpNode"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class OpNode:
    """One computing node of the analysis graph, normalised.

    kind:         op kind shared by recipes and cost formulas: "linear", "conv",
                  "conv_transpose", "matmul", "bmm", "addmm", "baddbmm", "einsum", "sdpa",
                  "embedding", "experts" (fused 3D expert weights), "norm", "softmax",
                  "elementwise", "view" (shape-only), "lstm"/"gru"/"rnn", "opaque"
                  (a leaf module stefx could not look inside), or "other".
                  Also "pool" (pooling), "reduce" (sum/mean/max/topk/sort...),
                  "create" (arange/zeros/ones/empty_like...: new tensors, no input
                  data) and "attention" (an ``nn.MultiheadAttention`` leaf).
    target:       printable target, e.g. "aten.linear.default", "torch.matmul", "Linear".
    module:       FQN (as in ``named_modules()``) of the innermost module the node came
                  from; "" for the root.
    module_type:  class name of that module, e.g. "Linear", "Conv1D", "LlamaAttention".
    module_stack: (fqn, class name) pairs from the outermost to the innermost module.
    params:       role -> parameter FQN for parameters the op reads directly, e.g.
                  {"weight": "transformer.h.0.attn.c_attn.weight", "bias": "..."}.
                  Roles: "weight"/"bias" for weight-carrying kinds (the parameter operand
                  of a matmul is its "weight"; addmm's added operand its "bias"); for a
                  leaf module call, its parameter names relative to the module
                  ("weight", "weight_ih_l0", "out_proj.weight"); else the attribute name.
                  A tied weight is named by the alias owned by ``module`` when there is
                  one (GPT-2: wte's embedding reads "transformer.wte.weight", lm_head's
                  linear reads "lm_head.weight"); see ``Capture.tied_params``.
    input_shapes: shapes of tensor inputs in argument order (None for non-tensors).
    output_shape: shape of the (first) tensor output, or None.
    dtype:        dtype of the output as a string, e.g. "torch.float32".
    attrs:        op attributes the cost formulas need (e.g. {"groups": 2},
                  {"equation": "bij,bjk->bik"}, {"is_causal": True}); conv: stride,
                  padding, dilation, groups, transposed; sdpa: is_causal, scale,
                  enable_gqa, dropout_p, has_mask; experts: num_experts; ops listed
                  for an opaque leaf: {"inside_opaque": "<leaf fqn>"}.
    buffers:      role -> buffer FQN for buffers the op reads (running_mean, inv_freq).
    param_shapes: role -> shape of each parameter in ``params``.
    call:         the call's name as ``kinds.call_name`` spells it ("relu", "add",
                  "matmul"); "" for a leaf module call. Op-site ordinals count it
                  (``stefx.sites``).
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
    buffers: dict[str, str] = field(default_factory=dict)
    param_shapes: dict[str, Shape] = field(default_factory=dict)
    call: str = ""


@dataclass
class Capture:
    """The analysis graph of a model and its normalised op records.

    method:  "symbolic_trace" or "export".
    graph:   the fx graph (its ``node.meta["stefx.op"]`` holds the node's OpNode).
    ops:     OpNode records in execution order (placeholders/outputs/get_attr excluded).
             Weight-carrying modules inside an opaque leaf follow the leaf's node as
             records with no graph node (``attrs["inside_opaque"]``).
    leaves:  FQNs of submodules kept opaque because they could not be traced.
    notes:   human-readable notes on what capture had to do (fallbacks, leaves).
    regions: FQNs of the submodules captured one by one when the whole model could
             not be (then ``graph`` holds their graphs side by side, not connected);
             empty when ``graph`` is the whole model.
    tied_params: alias FQN -> canonical FQN (the first name ``named_parameters()``
             gives) for parameters reachable under several names (tied embeddings).
    """

    method: str
    graph: fx.Graph
    ops: list[OpNode]
    leaves: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    tied_params: dict[str, str] = field(default_factory=dict)
