"""Arithmetic helpers shared by several quantizers' kernels."""

from __future__ import annotations

import torch

__all__ = ["wide"]


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype quantizer arithmetic runs in: float32, or float64 for float64."""
    return x if x.dtype == torch.float64 else x.float()
