"""Helpers shared by the quantizer tests: gradients, saved tensors, hypothesis matrices."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

__all__ = ["finite", "grad_of", "matrices", "saved_during_forward", "signature", "special"]

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -3.0])


def grad_of(q, x, upstream=None):
    """``(q(x), dq/dx · upstream)`` for a fresh leaf copy of ``x`` (upstream defaults to ones)."""
    x = x.detach().clone().requires_grad_(True)
    y = q(x)
    y.backward(torch.ones_like(y) if upstream is None else upstream)
    return y.detach(), x.grad


def saved_during_forward(q, x):
    """``(q(x), tensors autograd saved for the backward)``."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    return y, saved


def signature(t: torch.Tensor) -> tuple:
    """What identifies a saved tensor without comparing values: dtype, shape, storage."""
    return (t.dtype, tuple(t.shape), t.data_ptr())


@st.composite
def matrices(draw, elements=finite):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 6))
    values = draw(st.lists(elements, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
