"""Data-dependent shapes (MoE routing, boolean masks): captured, not crashed on, and
honestly reported - tensor ops of unknown size are unsupported, size arithmetic ignored."""

from __future__ import annotations

import torch
from torch import nn

import stefx


class MaskedRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[x[:, 0] > 0]  # how many rows survive depends on the data
        return self.lin(rows).sum() + rows.shape[0] * 2


def test_unbacked_sizes_are_unknown_shapes_not_a_crash():
    model, x = MaskedRows(), torch.randn(6, 4)
    cap = stefx.capture(model, (x,), method="export")
    linear = next(op for op in cap.ops if op.kind == "linear")
    assert linear.input_shapes[0] is None and linear.output_shape is None
    assert linear.params["weight"] == "lin.weight"
    rep = stefx.profile(model, (x,), capture=cap)
    assert rep.unsupported.get("linear aten.linear.default") == 1  # listed, not a silent 0
    statuses = {(op.op.target, op.before.status) for op in rep.ops}
    assert ("operator.mul", "ignored") in statuses  # rows.shape[0] * 2 is Python arithmetic
    assert not any(k.startswith("elementwise operator.") for k in rep.unsupported)
    stefx.quantize(model, "w4a8", (x,), report=False)  # the Linear is still reachable
    assert model.lin.weight_quantizer is not None
    model(x).backward()
