"""Op kind tables: which torch-level or aten target, or which module class, is which kind.

One table serves both capture methods: a ``symbolic_trace`` graph calls ``torch.matmul``,
``F.linear`` or ``x.softmax`` and leaf modules, a ``torch.export`` graph calls
``aten.matmul.default`` and ``aten.linear.default``. Both reduce to a *base name*
(``"matmul"``, ``"linear"``) that the tables below map to an ``OpNode.kind``. Pure data
and pure functions; nothing here looks at a graph.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "FUNCTIONAL_KINDS",
    "MATMUL_KINDS",
    "MODULE_WEIGHT_KINDS",
    "SKIPPED",
    "WEIGHT_KINDS",
    "base_name",
    "call_name",
    "kind_of_function",
    "kind_of_module",
    "target_name",
]

# Kinds whose cost is a matrix product; a 3D parameter read by one of them is a fused
# mixture-of-experts weight and turns the node into kind "experts".
MATMUL_KINDS = frozenset({"linear", "matmul", "bmm", "addmm", "baddbmm", "einsum", "experts"})
# Kinds that carry a weight a recipe quantizes.
WEIGHT_KINDS = frozenset(MATMUL_KINDS | {"conv", "conv_transpose", "embedding"})
# Module ops whose weights live in the module itself: what a ``weights`` rule can reach
# and what the report lists as covered or not (recurrent cells, nn.MultiheadAttention).
MODULE_WEIGHT_KINDS = frozenset(WEIGHT_KINDS | {"lstm", "gru", "rnn", "attention"})
# Weightless ops that can carry an op site (attention QK^T / PV, bmm, einsum, SDPA). The
# run-time interceptor classifies calls with ``kind_of_function`` too, so both agree.
FUNCTIONAL_KINDS = frozenset({"matmul", "bmm", "addmm", "baddbmm", "einsum", "sdpa"})

_KIND_BY_NAME: dict[str, str] = {}


def _register(kind: str, *names: str) -> None:
    for name in names:
        assert name not in _KIND_BY_NAME, f"duplicate op name {name!r}"
        _KIND_BY_NAME[name] = kind


_register("linear", "linear")
_register("conv", "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_tbc")
_register("conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_register("matmul", "matmul", "mm", "__matmul__", "__rmatmul__", "dot", "mv", "vdot")
_register("bmm", "bmm")
_register("addmm", "addmm", "_addmm_activation", "addmv")
_register("baddbmm", "baddbmm", "addbmm")
_register("einsum", "einsum")
_register(
    "sdpa",
    "scaled_dot_product_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
_register(
    "embedding", "embedding", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only"
)
_register("experts", "grouped_mm", "_grouped_mm", "grouped_mm_fallback")
_register(
    "norm",
    "layer_norm",
    "native_layer_norm",
    "rms_norm",
    "_fused_rms_norm",
    "batch_norm",
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional",
    "group_norm",
    "native_group_norm",
    "instance_norm",
    "normalize",
)
_register("softmax", "softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
_register("lstm", "lstm", "lstm_cell")
_register("gru", "gru", "gru_cell")
_register("rnn", "rnn_tanh", "rnn_relu", "rnn_tanh_cell", "rnn_relu_cell")
_register(
    "pool",
    *(f"{p}_pool{d}d" for p in ("max", "avg", "lp") for d in (1, 2, 3)),
    *(f"adaptive_{p}_pool{d}d" for p in ("max", "avg") for d in (1, 2, 3)),
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
)
_register(
    "reduce",
    *("sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean"),
    *("norm", "logsumexp", "cumsum", "cumprod", "argmax", "argmin", "topk", "sort", "histc"),
    *("any", "all", "count_nonzero", "nonzero", "bincount", "argsort"),
)
_register(
    "elementwise",
    *("add", "sub", "mul", "div", "truediv", "floordiv", "floor_divide", "remainder", "pow"),
    *("neg", "abs", "exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh"),
    *("sigmoid", "relu", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "elu"),
    *("leaky_relu", "softplus", "hardtanh", "clamp", "clamp_min", "clamp_max", "clip"),
    *("where", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "greater", "less", "lerp"),
    *("logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or", "bitwise_not"),
    *("and_", "or_", "not_", "invert", "__and__", "__or__", "__invert__", "iadd", "imul"),
    *("dropout", "native_dropout", "feature_dropout", "alpha_dropout", "erf", "sign"),
    *("square", "diff", "addcmul", "addcdiv", "round", "floor", "ceil", "trunc", "isnan", "isinf"),
    *("rsub", "true_divide", "fmod", "minimum", "maximum", "gelu_", "silu_", "relu_", "tril"),
    *("triu", "cos_", "sin_", "logit", "glu", "threshold", "prelu", "celu", "selu"),
)
_register(
    "create",
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "new_ones",
    "new_zeros",
    "new_full",
    "new_empty",
    "rand",
    "randn",
    "randint",
    "rand_like",
    "randn_like",
    "scalar_tensor",
    "tensor",
    "eye",
    "linspace",
    "empty_strided",
    "one_hot",
)
_register(
    "view",
    *("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "expand_as"),
    *("numpy_T", "T", "mT", "adjoint", "item", "_local_scalar_dense", "tolist"),
    *("squeeze", "unsqueeze", "flatten", "unflatten", "contiguous", "clone", "to", "_to_copy"),
    *("type", "type_as", "float", "half", "bfloat16", "double", "int", "long", "bool"),
    *("cat", "concat", "concatenate", "stack", "split", "split_with_sizes", "chunk", "unbind"),
    *("getitem", "slice", "select", "index", "index_select", "gather", "narrow", "alias"),
    *("detach", "movedim", "swapaxes", "roll", "flip", "repeat", "repeat_interleave", "tile"),
    *("pad", "constant_pad_nd", "view_as", "lift_fresh_copy", "_assert_tensor_metadata"),
    *("dim", "size", "numel", "sym_size", "sym_numel", "getattr", "split_tensor", "clone_"),
    *("index_put", "index_put_", "copy_", "scatter", "scatter_add", "masked_select"),
)
# Bookkeeping nodes that compute nothing and are left out of Capture.ops.
SKIPPED = frozenset(
    {"_assert_is_none", "_assert", "_assert_async", "_set_grad_enabled", "_assert_scalar"}
    | {"sym_constrain_range", "sym_constrain_range_for_size", "_check_is_size"}
)

# Module classes, most specific first (isinstance order matters: LazyLinear < Linear).
_KIND_BY_MODULE: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "linear"),
    (nn.Bilinear, "linear"),
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Embedding, "embedding"),
    (nn.EmbeddingBag, "embedding"),
    (nn.LSTM, "lstm"),
    (nn.GRU, "gru"),
    (nn.RNN, "rnn"),
    (nn.LSTMCell, "lstm"),
    (nn.GRUCell, "gru"),
    (nn.RNNCell, "rnn"),
    (nn.MultiheadAttention, "attention"),
    (nn.modules.batchnorm._NormBase, "norm"),
    (nn.LayerNorm, "norm"),
    (nn.GroupNorm, "norm"),
    (nn.LocalResponseNorm, "norm"),
    (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "softmax"),
    (nn.Softmax2d, "softmax"),
    (nn.Flatten, "view"),
    (nn.Unflatten, "view"),
    (nn.Identity, "view"),
    (nn.modules.pooling._MaxPoolNd, "pool"),
    (nn.modules.pooling._AvgPoolNd, "pool"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "pool"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "pool"),
    (nn.modules.dropout._DropoutNd, "elementwise"),
)
if hasattr(nn, "RMSNorm"):
    _KIND_BY_MODULE += ((nn.RMSNorm, "norm"),)

# Activation modules live in torch.nn.modules.activation; all are pointwise except these.
_NOT_POINTWISE = (nn.MultiheadAttention, nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Softmin)


_RENAMES = (
    ("torch._C._nn.", "torch.nn.functional."),
    ("torch._C._VariableFunctions.", "torch."),
    ("torch.functional.", "torch."),
    ("_operator.", "operator."),
)


def target_name(target: Any) -> str:
    """A printable name for an fx node target: ``"aten.linear.default"``, ``"torch.matmul"``."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    if target is operator.getitem:
        return "getitem"
    try:
        name = fx.node._get_qualified_name(target)
    except Exception:  # a callable fx cannot name (a lambda, a bound method)
        return getattr(target, "__name__", repr(target))
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def base_name(target: Any) -> str:
    """The op's name without namespace or overload: ``aten.conv2d.default`` -> ``"conv2d"``."""
    if isinstance(target, torch._ops.OpOverload):
        name = target._opname
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.split("::")[-1]
    elif isinstance(target, str):
        name = target
    else:
        name = getattr(target, "__name__", "") or str(target)
    name = name.rsplit(".", 1)[-1]
    # In-place variants (add_, relu_) cost what the out-of-place op costs.
    if name.endswith("_") and not name.endswith("__") and name[:-1] in _KIND_BY_NAME:
        name = name[:-1]
    return name


def kind_of_function(target: Any, args: tuple[Any, ...] = ()) -> str:
    """The kind of a call_function / call_method target (``"other"`` when unknown)."""
    name = base_name(target)
    kind = _KIND_BY_NAME.get(name) or _KIND_BY_NAME.get(call_name(target), "other")
    if name in ("convolution", "_convolution") and len(args) > 6 and args[6] is True:
        kind = "conv_transpose"  # aten.convolution(input, weight, bias, ..., transposed, ...)
    return kind


def kind_of_module(module: nn.Module) -> str:
    """The kind of a leaf module call (``"other"`` when unknown)."""
    for cls, kind in _KIND_BY_MODULE:
        if isinstance(module, cls):
            return kind
    if type(module).__module__ == "torch.nn.modules.activation" and not isinstance(
        module, _NOT_POINTWISE
    ):
        return "elementwise"
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D is a linear layer
        return "addmm"
    return "other"


# Spellings of one pointwise call that differ between an fx graph and the run time:
# ``x + y`` is ``operator.add`` when traced, ``Tensor.__add__`` when run, and ``x += y``
# is ``operator.iadd``, ``Tensor.__iadd__`` or ``aten.add_``.
_CALL_ALIASES = {
    "radd": "add",
    "iadd": "add",
    "rmul": "mul",
    "imul": "mul",
    "truediv": "div",
    "rtruediv": "div",
    "itruediv": "div",
    "isub": "sub",
}


def call_name(target: Any) -> str:
    """The name a call is counted under, the same for a graph node and a run-time call.

    >>> call_name(operator.add), call_name(torch.Tensor.__radd__), call_name(torch.relu_)
    ('add', 'add', 'relu')
    """
    name = base_name(target)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    name = _CALL_ALIASES.get(name, name)
    if name.endswith("_") and name[:-1] in _KIND_BY_NAME:
        name = name[:-1]
    return name
