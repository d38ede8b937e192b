"""The quantizer run time: copy and save like any module, the float path when disabled,
one quantized input shared by its readers, and no memory growth."""

from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import stefx
from stefx.rewrite import STATE_ATTR, quantized_modules
from stefx.ste.ops import is_stefx_op
from tests.test_quantize import _first_float, _inputs
from tests.zoo import build

ATTENTION_SITES = {
    "name": "att",
    "on_no_match": "ignore",
    "rules": [
        {
            "targets": ["linear"],
            "ignore": ["lm_head"],
            "weights": {"type": "lsq", "num_bits": 4, "strategy": "channel"},
            "input_activations": {"type": "uniform", "num_bits": 8, "strategy": "token"},
        },
        {"targets": ["matmul"], "input_activations": {"type": "uniform", "num_bits": 8}},
    ],
}
CASES = [("mlp", "w4a8"), ("residual_cnn", "bnn"), ("llama", ATTENTION_SITES), ("gpt2", "w4a8")]


class StefxOps(TorchDispatchMode):
    """Counts the stefx ops that run, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_stefx_op(func):
            self.calls.append(func._opname)
        return func(*args, **(kwargs or {}))


def _quantized(name, recipe):
    model, example = build(name)
    model.eval()
    args, kwargs = _inputs(model, example)
    stefx.quantize(model, recipe, example, report=False)
    return model, args, kwargs


def _torch_save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize(("name", "recipe"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(
    "round_trip",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _torch_save_load],
    ids=["deepcopy", "pickle", "torch.save"],
)
def test_a_quantized_model_copies_and_saves_like_any_module(name, recipe, round_trip):
    model, args, kwargs = _quantized(name, recipe)
    with torch.no_grad():
        ref = _first_float(model(*args, **kwargs))
    twin = round_trip(model)
    assert type(twin) is type(model) and set(twin.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        assert torch.equal(_first_float(twin(*args, **kwargs)), ref)
    # the copy is its own model: its quantizers, hooks and dequantize leave the original alone
    for q in (m for m in twin.modules() if isinstance(m, stefx.Quantizer)):
        q.enabled = False
    stefx.dequantize(twin)
    assert not quantized_modules(twin)
    with torch.no_grad():
        assert torch.equal(_first_float(model(*args, **kwargs)), ref)
    assert quantized_modules(model)


def test_the_plan_the_model_keeps_is_small():
    model, _, _ = _quantized("llama", "w4a8")
    plan = model._stefx_plan
    assert plan.capture is None and plan.candidates == []
    assert [s.name for s in plan.sites] and plan.recipe.name == "w4a8"
    assert len(pickle.dumps(plan)) < 64 * 1024
    state = next(iter(quantized_modules(model).values())).__dict__[STATE_ATTR]
    assert state.latent == {} and state.interceptor is None


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "uniform", "num_bits": 4, "strategy": "channel"},
        {"type": "lsq", "num_bits": 3},
        {"type": "lsq+", "num_bits": 3},
        {"type": "binary", "scale": "absmean", "estimator": "swish_sign", "beta": 3.0},
        {"type": "ternary", "scale": "seq", "strategy": "channel"},
        {"type": "seq", "num_bits": 2},
        {"type": "pact", "num_bits": 4, "alpha_init": 6.0},
        {"type": "dorefa", "num_bits": 2, "role": "activation"},
    ],
    ids=lambda s: s["type"],
)
def test_every_quantizer_deep_copies_and_pickles(spec):
    q = stefx.make_quantizer(spec)
    x = torch.randn(4, 8)
    y = q(x)
    for twin in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert twin.spec == q.spec and hash(twin.spec.options) == hash(q.spec.options)
        assert torch.equal(twin(x), y)


@pytest.mark.parametrize(("name", "recipe"), CASES, ids=[c[0] for c in CASES])
def test_disabled_quantizers_run_the_float_forward(name, recipe):
    model, args, kwargs = _quantized(name, recipe)
    for q in (m for m in model.modules() if isinstance(m, stefx.Quantizer)):
        q.enabled = False
    with StefxOps() as seen, torch.no_grad():
        out = _first_float(model(*args, **kwargs))
    assert seen.calls == []
    stefx.dequantize(model)
    with torch.no_grad():
        assert torch.equal(_first_float(model(*args, **kwargs)), out)


def test_one_input_read_by_several_projections_is_quantized_once():
    model, args, kwargs = _quantized("llama", "w4a8")
    layers = model.config.num_hidden_layers
    with StefxOps() as seen:
        out = _first_float(model(*args, **kwargs))
    # per layer: one input quantization for q/k/v, one for o, one for gate/up, one for down
    assert seen.calls.count("fake_quant") == 4 * layers
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    from stefx import runtime

    unshared = runtime.shared
    runtime.shared = lambda q, x: q(x)
    try:
        with StefxOps() as seen:
            again = _first_float(model(*args, **kwargs))
        again.float().pow(2).mean().backward()
    finally:
        runtime.shared = unshared
    assert seen.calls.count("fake_quant") == 7 * layers
    assert torch.equal(out, again)
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, msg=n)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_memory_growth_over_a_thousand_training_steps():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )
    x, y = torch.randn(16, 32), torch.randint(0, 8, (16,))
    stefx.quantize(model, "w4a8", (x,), report=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def steps(n):
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    steps(100)
    tensors, rss = _live_tensors(), _rss_bytes()
    steps(1000)
    # a leak grows with the steps; a few tensors of other tests' garbage may come and go
    assert _live_tensors() - tensors <= 4, (tensors, _live_tensors())
    assert _rss_bytes() - rss < 16 * 2**20


def test_no_memory_growth_over_a_hundred_quantize_dequantize_cycles():
    model, example = build("mlp")
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    keys = set(model.state_dict())

    def cycles(n):
        for _ in range(n):
            stefx.quantize(model, "w4a8", example, report=False)
            model(*example).sum().backward()
            stefx.dequantize(model)
            model.zero_grad(set_to_none=True)

    cycles(10)
    tensors, rss = _live_tensors(), _rss_bytes()
    cycles(100)
    assert _live_tensors() - tensors <= 4, (tensors, _live_tensors())
    assert _rss_bytes() - rss < 32 * 2**20
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    assert set(model.state_dict()) == keys


def _saved_weight_reads(out: torch.Tensor, shapes: set) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every weight-shaped tensor the autograd graph of ``out`` keeps, read twice (both
    reads kept alive): a saved copy gives one storage twice, a recomputed weight two."""
    pairs, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                first = getattr(node, name)
                if isinstance(first, torch.Tensor) and tuple(first.shape) in shapes:
                    pairs.append((first, getattr(node, name)))
        stack += [f for f, _ in node.next_functions]
    return pairs


def _same_storage(pair) -> bool:
    return pair[0].untyped_storage().data_ptr() == pair[1].untyped_storage().data_ptr()


def test_quantized_weights_are_recomputed_in_backward_not_saved(monkeypatch):
    from stefx import runtime

    model, args, kwargs = _quantized("llama", "w4a8")
    model.train()
    shapes = {
        tuple(m.weight.shape[::-1]) for m in model.modules() if hasattr(m, "weight_quantizer")
    }
    out = _first_float(model(*args, **kwargs))
    reads = _saved_weight_reads(out, shapes)
    assert reads and not any(_same_storage(p) for p in reads)  # each read: a recompute
    for a, b in reads:
        assert torch.equal(a, b)
    del reads
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    monkeypatch.setattr(runtime, "RECOMPUTE_WEIGHTS", False)
    again = _first_float(model(*args, **kwargs))
    kept = _saved_weight_reads(again, shapes)
    assert kept and all(_same_storage(p) for p in kept)  # the saved copies
    del kept
    again.float().pow(2).mean().backward()
    assert torch.equal(out, again)
    for n, g in grads.items():
        assert torch.equal(model.get_parameter(n).grad, g), n


def test_recompute_is_off_under_other_saved_tensor_hooks_and_checkpointing():
    from torch.utils.checkpoint import checkpoint

    model, args, _ = _quantized("mlp", "w4a8")
    x = args[0].requires_grad_(True)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = checkpoint(model, x, use_reentrant=False)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, msg=n)


def test_a_latent_weight_changed_between_forward_and_backward_is_an_error():
    model, args, _ = _quantized("mlp", "w4a8")
    out = model(*args)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified"):
        out.sum().backward()
