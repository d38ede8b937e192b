"""Measuring a model on real tensors: what its inputs hold (samples, tokens) and how long
a forward pass and each layer take. The only part of profiling that runs the model; its
timing hooks are removed afterwards and the train/eval mode is restored.

What ``profile(measure=True)`` times, so that "before" and "after" mean what the estimates
mean:

* **before**: the float model. A stefx-quantized model is timed through a float copy
  (``stefx.dequantize(copy.deepcopy(model))``: quantizers and hooks removed, packed
  weights dequantized); the model itself is not changed.
* **after**: the model as given, when stefx quantized it: *converted* (packed weights,
  dequantized on the fly) when ``stefx.convert`` ran on it, else the *fake-quant
  simulation step*, which is not deployment (it quantizes in float and is slower than the
  float model). A float model profiled with a recipe has no "after" to time: it is None,
  with the reason, never the float timing.

Whole-forward times are taken without hooks. Per-layer times come from separate runs
with a forward pre-/post-hook pair on every module, and are **exclusive**: a module's time
minus the time of its nearest timed descendants, like the estimated rows (which hold a
module's own ops, not its children's). A stefx quantizer module is part of the layer that
owns it (its time stays in that layer). Rows named after an op path
(``...self_attn.matmul_0``) are not modules: their time is in the owning module's.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from stefx.errors import StefxError
from stefx.profile.report import LayerRow

__all__ = ["AFTER_CONVERTED", "AFTER_FAKE_QUANT", "MEASURE_RUNS", "input_sizes", "measure_model"]

AFTER_FAKE_QUANT = "fake-quant (simulation) step, not deployment"
AFTER_CONVERTED = "converted (packed weights, dequantized on the fly)"
NO_AFTER = "not measured: a float model was given (quantize or convert it to time one)"

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
    """Time ``model`` before (float) and after (as given, when quantized): median wall time
    of ``MEASURE_RUNS`` forward passes after one warm-up, in eval mode without autograd,
    and per-module exclusive times (see the module docstring).

    Returns ``{"before": {...}, "after": {...} | None, "after_kind": str, "device",
    "runs", "layers_exclusive": True}``; each side holds ``latency_s``, ``samples_per_s``,
    ``tokens_per_s`` and ``layers`` (module FQN -> exclusive seconds). The top-level
    ``latency_s``, ``samples_per_s``, ``tokens_per_s`` and ``layers`` repeat "before"
    (the float model) for code written before the split.
    """
    quantized = _is_quantized(model)
    if quantized:
        from stefx.convert import converted_weights

        kind = AFTER_CONVERTED if converted_weights(model) else AFTER_FAKE_QUANT
        after = _time(model, example_inputs)
        before = _time(_float_copy(model), example_inputs)
    else:
        kind, after = NO_AFTER, None
        before = _time(model, example_inputs)
    return {
        "before": before,
        "after": after,
        "after_kind": kind,
        "runs": MEASURE_RUNS,
        "layers_exclusive": True,
        "device": _device(model),
        **{k: before[k] for k in ("latency_s", "samples_per_s", "tokens_per_s", "layers")},
    }


def _is_quantized(model: nn.Module) -> bool:
    from stefx.api import target_of
    from stefx.rewrite import quantized_modules

    return bool(quantized_modules(target_of(model)))


def _float_copy(model: nn.Module) -> nn.Module:
    """A float copy of a stefx-quantized model; the model itself keeps its quantizers."""
    import stefx

    return stefx.dequantize(copy.deepcopy(model))


def _device(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return str(param.device) if param is not None else "cpu"


def _time(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    args, kwargs = _bound_inputs(model, example_inputs)
    on_cuda = _device(model).startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)  # warm-up
            times = []
            for _ in range(MEASURE_RUNS):
                sync()
                t0 = time.perf_counter()
                model(*args, **kwargs)
                sync()
                times.append(time.perf_counter() - t0)
            layers = _exclusive_times(model, args, kwargs, sync if on_cuda else None)
    finally:
        model.train(training)
    latency = statistics.median(times)
    samples, tokens = _sizes(args, kwargs)
    return {
        "latency_s": latency,
        "samples_per_s": samples / latency,
        "tokens_per_s": tokens / latency if tokens else None,
        "layers": layers,
    }


def _timed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module but stefx quantizers and what is inside them (their time is their
    owner's, as their cost is)."""
    from stefx.ste.base import Quantizer

    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, Quantizer):
            skip.append(name)
            continue
        out[name] = module
    return out


def _exclusive_times(model: nn.Module, args: tuple, kwargs: dict, sync) -> dict[str, float]:
    """Module FQN -> median exclusive seconds over ``MEASURE_RUNS`` hooked forwards."""
    modules = _timed_modules(model)
    inclusive: dict[str, float] = {}
    open_calls: dict[str, list[float]] = {}

    def pre(name: str):
        def hook(module, inputs):
            if sync is not None:
                sync()
            open_calls.setdefault(name, []).append(time.perf_counter())

        return hook

    def post(name: str):
        def hook(module, inputs, output):
            if sync is not None:
                sync()
            stack = open_calls.get(name)
            if stack:
                inclusive[name] = inclusive.get(name, 0.0) + time.perf_counter() - stack.pop()

        return hook

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre(name), prepend=True))
        handles.append(module.register_forward_hook(post(name)))
    per_run: dict[str, list[float]] = {}
    try:
        model(*args, **kwargs)  # warm-up with hooks
        for _ in range(MEASURE_RUNS):
            inclusive.clear()
            open_calls.clear()
            model(*args, **kwargs)
            for name, seconds in _exclusive(inclusive).items():
                per_run.setdefault(name, []).append(seconds)
    finally:
        for h in handles:
            h.remove()
    return {name: statistics.median(v) for name, v in per_run.items()}


def _exclusive(inclusive: dict[str, float]) -> dict[str, float]:
    """Subtract from each module the inclusive time of its nearest *timed* descendants
    (a ModuleList never runs a forward of its own: its items count against the module
    that holds it). The root's name is ``""``."""
    out = dict(inclusive)
    for name, seconds in inclusive.items():
        if not name:
            continue
        parent = name
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in inclusive:
                out[parent] -= seconds
                break
    return {k: max(v, 0.0) for k, v in out.items()}
