"""Multi-node patterns: chains of ops such as ``[conv, batch_norm, relu]`` in the graph.

A chain is a run of graph nodes where each node's output is used only by the next one,
so quantizing the chain's end is the same as quantizing what the first op feeds
forward. This module finds chains and resolves what a pattern rule does with them: the
BatchNorm a ``fold_bn`` rule folds, and where each chain's output can be quantized.
Pure: reads the captured graph and the model, returns records or raises RecipeError.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from stefx.capture.graph import Capture, OpNode
from stefx.errors import RecipeError
from stefx.recipe import Rule
from stefx.sites import counter

__all__ = ["Chains", "bn_to_fold", "chain_ends", "find_chains", "op_matches", "op_names"]

Chains = list[list[OpNode]]
FOLDABLE_KINDS = ("linear", "conv", "conv_transpose")

_CONV_DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
# aten spellings of one op, to the name a pattern writes
_CANONICAL = {
    "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit_functional": "batch_norm",
    "native_layer_norm": "layer_norm",
    "native_group_norm": "group_norm",
    "_softmax": "softmax",
    "_log_softmax": "log_softmax",
    "convolution": "conv",
    "_convolution": "conv",
}
_DIMS = re.compile(r"[123]d$")


def _squash(text: str) -> str:
    return text.lower().replace("_", "")


def op_names(op: OpNode) -> frozenset[str]:
    """The names a pattern element can call this op by, squashed (lower case, no ``_``):
    a function call by its call name (``relu``, ``add``; aten spellings such as
    ``_native_batch_norm_legit`` by the op's own name, ``batch_norm``), a leaf module by
    its class name with and without a ``1d``/``2d``/``3d`` suffix (``BatchNorm2d`` is
    ``batch_norm`` and ``batch_norm2d``)."""
    if op.call:
        return frozenset({_squash(_CANONICAL.get(op.call, op.call))})
    cls = _squash(op.module_type or op.target)
    return frozenset({cls, _DIMS.sub("", cls)})


def op_matches(selector: str, op: OpNode) -> bool:
    """Whether a pattern element names this op: its kind, its module class, or its name
    (exactly, see :func:`op_names`: ``add`` is not ``addmm``, ``relu`` not ``leaky_relu``).

    >>> op_matches("batch_norm", OpNode("bn", "norm", "BatchNorm2d", module_type="BatchNorm2d"))
    True
    >>> op_matches("add", OpNode("a", "addmm", "aten.addmm.default", call="addmm"))
    False
    """
    if selector in _CONV_DIMS:  # conv2d: an nn.Conv2d, F.conv2d, or a 4-D aten.convolution
        dims = _CONV_DIMS[selector]
        if op.kind != "conv":
            return False
        if op.module_type == f"Conv{dims}d" or op.call == selector:
            return True
        rank = len(op.input_shapes[0] or ()) if op.input_shapes else 0
        return op.call in ("convolution", "_convolution") and rank == dims + 2
    if selector in (op.kind, op.module_type):
        return True
    return _squash(selector) in op_names(op)


def _next(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_chains(pattern: Sequence[str], capture: Capture) -> list[list[OpNode]]:
    """Every chain of graph nodes matching ``pattern`` element by element, in run order."""
    chains: list[list[OpNode]] = []
    for node in capture.graph.nodes:
        op = node.meta.get("stefx.op")
        if op is None or not op_matches(pattern[0], op):
            continue
        chain, cur = [op], node
        for selector in pattern[1:]:
            cur = _next(cur)
            nxt = cur.meta.get("stefx.op") if cur is not None else None
            if nxt is None or not op_matches(selector, nxt):
                break
            chain.append(nxt)
        else:
            chains.append(chain)
    return chains


def bn_to_fold(rule: Rule, head: str, kind: str, chains: Chains, modules: dict) -> str:
    """FQN of the BatchNorm module a ``fold_bn`` rule folds into the weights of ``head``
    (a site of op ``kind``), the second op of each of its ``chains``."""
    where = f"{rule.label}: fold_bn"
    if kind not in FOLDABLE_KINDS:
        raise RecipeError(
            f"{where}: {head!r} is a {kind}; only {', '.join(FOLDABLE_KINDS)} weights can "
            "absorb a BatchNorm. Remove fold_bn from this rule"
        )
    names = sorted({chain[1].module for chain in chains})
    if len(names) != 1:
        raise RecipeError(
            f"{where}: {head!r} feeds {len(names)} BatchNorms ({names}) on different calls; "
            "folding needs exactly one. Remove fold_bn from this rule"
        )
    bn = modules.get(names[0])
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise RecipeError(
            f"{where}: the op after {head!r} is {chains[0][1].target} in module "
            f"{names[0]!r}, not a BatchNorm module; folding needs an nn.BatchNorm1d/2d/3d "
            "(a functional batch_norm has no module to read statistics from)"
        )
    if bn.running_var is None:
        raise RecipeError(
            f"{where}: BatchNorm {names[0]!r} has track_running_stats=False, so there are no "
            "running statistics to fold; build it with track_running_stats=True or remove fold_bn"
        )
    return names[0]


def _module_calls(ops: list[OpNode]) -> tuple[Counter[str], set[int]]:
    """How many separate calls each module's ops form, and id() of each call's last op."""
    calls: Counter[str] = Counter()
    ends: set[int] = set()
    prev: OpNode | None = None
    for op in ops:
        if op.attrs.get("inside_opaque"):
            continue
        if prev is None or op.module != prev.module:
            calls[op.module] += 1
            if prev is not None:
                ends.add(id(prev))
        prev = op
    if prev is not None:
        ends.add(id(prev))
    return calls, ends


def chain_ends(
    rule: Rule, tails: list[OpNode], ops: list[OpNode], modules: dict
) -> list[tuple[str, OpNode]]:
    """Where each chain's output quantizer goes: ``("module", op)`` for the output of the
    leaf module whose call ends the chain (``nn.ReLU``), ``("op", op)`` for an op site on
    the pointwise or matmul call that ends it (``F.relu``, ``x + y``). Raises RecipeError
    for an end stefx cannot hook, or a module that ends the chain on only some calls."""
    calls, ends = _module_calls(ops)
    out: list[tuple[str, OpNode]] = []
    per_module: Counter[str] = Counter()
    for tail in {id(t): t for t in tails}.values():
        module = modules.get(tail.module)
        leaf = tail.module and module is not None and next(module.children(), None) is None
        if leaf and id(tail) in ends:
            per_module[tail.module] += 1
            out.append(("module", tail))
        elif counter(tail) is not None and not tail.params:
            out.append(("op", tail))
        else:
            raise RecipeError(
                f"{rule.label}: output_activations of pattern {list(rule.pattern)}: the chain "
                f"ends at {tail.target} inside {tail.module or 'the model'!r}, which is neither "
                "a module's output nor a pointwise or matmul call stefx can hook; end the "
                "pattern at another op, or drop output_activations from this rule"
            )
    for fqn, n in per_module.items():
        if calls[fqn] > n:
            raise RecipeError(
                f"{rule.label}: output_activations of pattern {list(rule.pattern)}: the chain "
                f"ends at module {fqn!r}, which the model calls {calls[fqn]} times, but only "
                f"{n} of those calls end the pattern; a quantizer on its output would apply "
                "to every call. Give each call its own module (e.g. separate nn.ReLU "
                f"instances), or use targets: [{fqn}] if every call should be quantized"
            )
    return out
