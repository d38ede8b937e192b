"""Granularity: which elements of a tensor share one scale.

Every quantizer works on a 2-D *row view* of its input: one row per scale group, so a
single per-row code path serves per-tensor, per-channel, per-group and per-token
quantization. This module owns that view and nothing else.

- ``tensor``:  one group, shape (1, numel).
- ``channel``: one group per index along ``axis`` (default 0, the output channel of a
  Linear/Conv weight), shape (C, numel / C).
- ``group``:   runs of ``group_size`` consecutive elements along ``axis`` (default -1, the
  input dimension of a Linear weight), shape (numel / group_size, group_size). When
  ``group_size`` does not divide that dimension the last run of each line is shorter
  (a *ragged* group, as GPTQ and AWQ treat a width such as 352 with group 64): the row
  view pads it with zeros, which change neither an absmax nor a min/max range that
  already spans zero (stefx's do), nor LSQ's step gradient (a zero has code 0), and
  :meth:`Granularity.unrows` drops the padding again.
- ``token``:   one group per vector along ``axis`` (default -1: per-token activations),
  shape (numel / D, D); on a fused expert weight [E, out, in], one scale per
  (expert, output row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stefx.errors import RecipeError

__all__ = ["STRATEGIES", "Granularity"]

STRATEGIES = ("tensor", "channel", "group", "token")


@dataclass(frozen=True)
class Granularity:
    strategy: str = "tensor"
    axis: int | None = None
    group_size: int | None = None

    def _axis(self, ndim: int) -> int:
        default = 0 if self.strategy == "channel" else -1
        axis = default if self.axis is None else self.axis
        if not -ndim <= axis < ndim:
            raise RecipeError(
                f"axis {axis} is out of range for a {ndim}-d tensor (strategy {self.strategy!r})"
            )
        return axis % ndim

    def num_groups(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Number of scale groups for an input of ``shape``."""
        numel = 1
        for s in shape:
            numel *= s
        if self.strategy == "tensor" or len(shape) == 0:
            return 1
        axis = self._axis(len(shape))
        if self.strategy == "channel":
            return shape[axis]
        if self.strategy == "token":
            return numel // max(shape[axis], 1)
        size = shape[axis]
        if self.group_size is None:
            raise RecipeError("strategy 'group' needs a group_size")
        if size == 0:
            return 0
        return (numel // size) * -(-size // self.group_size)

    def rows_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
        """The shape of :meth:`rows` for an input of ``shape`` (padding included)."""
        groups = self.num_groups(shape)
        if self.pad(shape):
            return groups, self.group_size
        numel = 1
        for s in shape:
            numel *= s
        return groups, (numel // groups if groups else 0)

    def pad(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Zeros appended to each line along the group axis (0 unless groups are ragged)."""
        if self.strategy != "group" or len(shape) == 0 or not self.group_size:
            return 0
        size = shape[self._axis(len(shape))]
        return -size % self.group_size

    def rows(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Return the (groups, elements) view of ``x`` (a copy only when the axis is inner,
        or groups are ragged: then ``fill`` pads them; NaN for statistics that skip it)."""
        if self.strategy == "tensor" or x.dim() == 0:
            return x.reshape(1, -1)
        axis = self._axis(x.dim())
        groups = self.num_groups(x.shape)
        if self.strategy == "channel":
            return x.movedim(axis, 0).reshape(groups, -1)
        if self.strategy == "token" and axis == x.dim() - 1:
            return x.reshape(groups, -1)
        pad = self.pad(x.shape)
        if pad:  # ragged: zeros complete each line's last group
            lines = x.movedim(axis, -1)
            return torch.nn.functional.pad(lines, (0, pad), value=fill).reshape(groups, -1)
        return x.movedim(axis, -1).reshape(groups, -1)

    def unrows(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`rows`: back to ``shape``."""
        if self.strategy == "tensor" or len(shape) == 0:
            return y.reshape(shape)
        axis = self._axis(len(shape))
        if self.strategy == "token" and axis == len(shape) - 1:
            return y.reshape(shape)
        moved = list(shape)
        moved.insert(0 if self.strategy == "channel" else len(shape), moved.pop(axis))
        pad = self.pad(shape)
        if pad:
            lines = y.reshape(*moved[:-1], moved[-1] + pad)[..., : moved[-1]]
            return lines.movedim(-1, axis)
        return y.reshape(moved).movedim(0 if self.strategy == "channel" else -1, axis)
