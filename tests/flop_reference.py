"""torch.utils.flop_counter as the reference for stefx's MAC counts: shared by the profile
tests and benchmarks/bench_profile.py, so both compare the same op kinds the same way."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stefx.capture.inputs import bind_inputs, example_inputs_for, is_hf_model

__all__ = ["MATMUL_FAMILY", "bound_inputs", "macs_by_kind", "torch_macs"]

# Op kinds whose cost is multiply-accumulates, as FlopCounterMode counts them.
MATMUL_FAMILY = (
    "linear",
    "addmm",
    "conv",
    "conv_transpose",
    "matmul",
    "mm",
    "bmm",
    "baddbmm",
    "einsum",
    "sdpa",
    "lstm",
    "gru",
    "attention",
    "experts",
)


def macs_by_kind(report: Any) -> dict[str, int]:
    """stefx's before-quantization MACs per matmul-family kind."""
    out: dict[str, int] = {}
    for oc in report.ops:
        if oc.op.kind in MATMUL_FAMILY:
            out[oc.op.kind] = out.get(oc.op.kind, 0) + oc.before.macs
    return out


def bound_inputs(model: nn.Module, inputs: Any) -> tuple[tuple, dict]:
    """The (args, kwargs) a zoo model runs on (HF models: built from the config)."""
    hf = is_hf_model(model)
    return bind_inputs(
        model,
        inputs if inputs is not None else example_inputs_for(model),
        {"use_cache": False} if hf else {},
    )


def torch_macs(model: nn.Module, inputs: Any) -> tuple[int, str]:
    """FlopCounterMode's total / 2 and the device it ran on: meta tensors, or real ones
    where meta fails. Raises what the CPU run raises."""
    args, kwargs = bound_inputs(model, inputs)
    for device in ("meta", "cpu"):
        try:
            m = copy.deepcopy(model).to(device).eval()
            a = tuple(x.to(device) if torch.is_tensor(x) else x for x in args)
            k = {n: v.to(device) if torch.is_tensor(v) else v for n, v in kwargs.items()}
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                m(*a, **k)
            return counter.get_total_flops() // 2, device
        except Exception:
            if device == "cpu":
                raise
    raise AssertionError("unreachable")
