"""Measuring a model on real tensors: what its inputs hold (samples, tokens) and how long
a forward pass and each layer take. The only part of profiling that runs the model; its
timing hooks are removed afterwards and the train/eval mode is restored.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from stefx.errors import StefxError
from stefx.profile.report import LayerRow

__all__ = ["MEASURE_RUNS", "input_sizes", "measure_model"]

MEASURE_RUNS = 5


def _bound_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    from stefx.capture.inputs import bind_inputs, example_inputs_for, is_hf_model

    hf = is_hf_model(model)
    if example_inputs is None:
        if not hf:
            raise StefxError("profile(measure=True) needs example_inputs for a plain model")
        example_inputs = example_inputs_for(model)
    return bind_inputs(model, example_inputs, {"use_cache": False} if hf else {})


def input_sizes(model: nn.Module, example_inputs: Any) -> tuple[int, int | None]:
    """(samples, tokens) of the inputs the profile describes, for estimated throughput."""
    try:
        return _sizes(*_bound_inputs(model, example_inputs))
    except Exception:  # no inputs to read a batch from: per-sample numbers
        return 1, None


def _sizes(args: tuple, kwargs: dict) -> tuple[int, int | None]:
    """(samples, tokens or None): batch of the first tensor input; tokens for [B, T] ids."""
    first = next(
        (v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None
    )
    if first is None:
        return 1, None
    tokens = first.numel() if not first.is_floating_point() and first.dim() >= 2 else None
    return first.shape[0], tokens


def measure_model(model: nn.Module, example_inputs: Any, rows: list[LayerRow]) -> dict:
    """Median wall time of ``MEASURE_RUNS`` forward passes after one warm-up, in eval mode
    and without autograd, plus per-module times from forward hooks (removed afterwards)."""
    args, kwargs = _bound_inputs(model, example_inputs)
    wanted = {r.name for r in rows}
    per_module: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if name in wanted and name:
            handles.append(module.register_forward_pre_hook(_start(name, starts)))
            handles.append(module.register_forward_hook(_stop(name, starts, per_module)))
    training = model.training
    model.eval()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    try:
        with torch.no_grad():
            model(*args, **kwargs)  # warm-up
            per_module.clear()
            for _ in range(MEASURE_RUNS):
                sync()
                t0 = time.perf_counter()
                model(*args, **kwargs)
                sync()
                times.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    latency = statistics.median(times)
    samples, tokens = _sizes(args, kwargs)
    layers = {n: statistics.median(v) for n, v in per_module.items()}
    return {
        "latency_s": latency,
        "samples_per_s": samples / latency,
        "tokens_per_s": tokens / latency if tokens else None,
        "runs": MEASURE_RUNS,
        "layers": layers,
        "device": str(next(model.parameters()).device)
        if any(True for _ in model.parameters())
        else "cpu",
    }


def _start(name: str, starts: dict[str, float]):
    def hook(module, args):
        starts[name] = time.perf_counter()

    return hook


def _stop(name: str, starts: dict[str, float], out: dict[str, list[float]]):
    def hook(module, args, output):
        if name in starts:
            out.setdefault(name, []).append(time.perf_counter() - starts.pop(name))

    return hook
