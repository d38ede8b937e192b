"""Multi-node patterns: chains of ops such as ``[conv, batch_norm, relu]`` in the graph.

A chain is a run of graph nodes where each node's output is used only by the next one,
so quantizing the chain's end is the same as quantizing what the first op feeds
forward. Pure: reads the captured graph, returns the OpNodes of each chain.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from stefx.capture.graph import Capture, OpNode

__all__ = ["find_chains", "op_matches"]

_CONV_DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}


def _squash(text: str) -> str:
    return text.lower().replace("_", "")


def op_matches(selector: str, op: OpNode) -> bool:
    """Whether a pattern element names this op: by kind, module class, or op target name.

    >>> op_matches("batch_norm", OpNode("bn", "norm", "BatchNorm2d"))
    True
    """
    if selector in _CONV_DIMS:
        return op.kind == "conv" and (
            op.module_type == f"Conv{_CONV_DIMS[selector]}d" or selector in _squash(op.target)
        )
    if selector in (op.kind, op.module_type):
        return True
    return _squash(selector) in _squash(op.target)


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
