"""stefx.quantize over the model zoo: the contract a user relies on, model by model."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import stefx
from stefx.capture.inputs import bind_inputs, example_inputs_for, is_hf_model
from stefx.rewrite import STATE_ATTR, quantized_modules
from tests.zoo import HF_ZOO, PLAIN_ZOO, build

ZOO = [*PLAIN_ZOO, *HF_ZOO]

RECIPE = {
    "name": "contract",
    "on_no_match": "ignore",
    "rules": [
        {
            "targets": ["linear", "conv", "conv_transpose"],
            "weights": {"type": "lsq", "num_bits": 4, "strategy": "channel"},
            "input_activations": {"type": "uniform", "num_bits": 8, "strategy": "token"},
        },
        {
            "targets": ["experts"],
            "weights": {"type": "uniform", "num_bits": 4, "strategy": "channel"},
        },
    ],
}


def _inputs(model, example):
    if example is None:
        example = example_inputs_for(model)
    args, kwargs = bind_inputs(model, example)
    if is_hf_model(model) and "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return args, kwargs


def _first_float(out):
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    values = out.values() if isinstance(out, dict) else out
    if hasattr(out, "to_tuple"):
        values = out.to_tuple()
    for v in values:
        found = _first_float(v) if isinstance(v, (torch.Tensor, tuple, list, dict)) else None
        if found is not None:
            return found
    return None


def _all_floats(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    values = out.values() if isinstance(out, dict) else out
    if not isinstance(values, (tuple, list, type({}.values()))):
        return []
    return [t for v in values for t in _all_floats(v)]


def _linear_like(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return True
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return True
    return type(module).__name__ == "Conv1D"  # Hugging Face GPT-2


def _modules_that_ran(model, args, kwargs) -> set[str]:
    """Reference set: every Linear/Conv-like module called in a real forward."""
    ran: set[str] = set()
    handles = [
        m.register_forward_hook(lambda mod, a, o, name=name: ran.add(name))
        for name, m in model.named_modules()
        if _linear_like(m)
    ]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return ran


@pytest.mark.parametrize("name", ZOO)
def test_quantize_contract(name):
    model, example = build(name)
    model.eval()
    args, kwargs = _inputs(model, example)
    expected = _modules_that_ran(model, args, kwargs)
    cls, keys = type(model), set(model.state_dict())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = _first_float(model(*args, **kwargs)).clone()

    qmodel = stefx.quantize(model, RECIPE, example, report=False)

    assert qmodel is model and type(qmodel) is cls
    assert keys <= set(qmodel.state_dict()), "an original state-dict key went missing"
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n in ptrs} == ptrs
    touched = {n for n, m in quantized_modules(model).items() if hasattr(m, "weight_quantizer")}
    assert expected <= touched, f"not reached: {sorted(expected - touched)}"

    # Disabled quantizers give the float model bit for bit.
    quantizers = [m for m in model.modules() if isinstance(m, stefx.Quantizer)]
    for q in quantizers:
        q.enabled = False
    with torch.no_grad():
        assert torch.equal(_first_float(model(*args, **kwargs)), ref)
    for q in quantizers:
        q.enabled = True

    # Forward + backward reach the latent float weights and the learned step sizes
    # (in eval mode, so BatchNorm statistics stay put for the round trip below).
    outs = _all_floats(model(*args, **kwargs))
    assert outs and all(torch.isfinite(o).all() for o in outs)
    sum(o.float().pow(2).mean() for o in outs).backward()
    for name, module in quantized_modules(model).items():
        if expected and name not in expected:
            continue  # e.g. a branch of a data-dependent module this input does not take
        for p, qname in getattr(module, STATE_ATTR).swaps.items():
            latent = module.get_parameter(p)
            assert isinstance(latent, nn.Parameter), "latent weight not restored after forward"
            assert latent.grad is not None and latent.grad.abs().sum() > 0, p
            q = module.get_submodule(qname)
            if isinstance(q.scale, nn.Parameter):
                assert q.scale.grad is not None, f"{p}: no gradient reached the learned step"

    # dequantize restores the float model exactly.
    stefx.dequantize(model)
    assert set(model.state_dict()) == keys
    assert not any(isinstance(m, stefx.Quantizer) for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(_first_float(model(*args, **kwargs)), ref)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_quantized_causal_lm_still_generates(name):
    model, _ = build(name)
    stefx.quantize(model, "w4a8", report=False)
    ids = torch.tensor([[1, 5, 7, 9]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_attention_matmuls_are_quantizable(name):
    model, _ = build(name)
    recipe = {
        "name": "attn",
        "rules": [
            {
                "targets": ["matmul"],
                "within": "re:.*(attn|attention).*",
                "input_activations": {"type": "uniform", "num_bits": 4, "strategy": "tensor"},
            }
        ],
    }
    plan = stefx.explain(model, recipe)
    assert plan.sites and all(s.kind == "matmul" for s in plan.sites)
    per_module = {}
    for s in plan.sites:
        per_module.setdefault(s.module, []).append(s.ordinal)
    assert all(sorted(v) == [0, 1] for v in per_module.values()), per_module  # QK^T and PV
    model.eval()
    args, kwargs = _inputs(model, None)
    with torch.no_grad():
        ref = _first_float(model(*args, **kwargs)).clone()
    stefx.quantize(model, recipe, report=False)
    calls = []
    for m in model.modules():
        if hasattr(m, "op_quantizers"):
            for key, q in m.op_quantizers.items():
                q.register_forward_hook(lambda mod, a, o, key=key: calls.append(key))
    with torch.no_grad():
        out = _first_float(model(*args, **kwargs))
    assert not torch.equal(out, ref), "4-bit attention operands changed nothing"
    layers = len(per_module)
    assert sorted(set(calls)) == ["matmul_0_in0", "matmul_0_in1", "matmul_1_in0", "matmul_1_in1"]
    assert len(calls) == 4 * layers


def test_moe_fused_experts_are_quantized_not_skipped():
    model, _ = build("mixtral")
    plan = stefx.explain(model, RECIPE)
    experts = [s for s in plan.sites if s.kind == "experts"]
    assert experts, "fused expert weights were silently skipped"
    for site in experts:
        module = model.get_submodule(site.module)
        for p in site.params:
            assert getattr(module, p).dim() == 3


def test_failure_leaves_the_model_untouched():
    model, example = build("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {
        "name": "bad",
        "rules": [
            {"targets": ["linear"], "weights": {"type": "uniform", "num_bits": 4}},
            {
                "targets": ["linear"],
                "position": "last",
                "weights": {"type": "uniform", "num_bits": 4, "strategy": "channel", "axis": 5},
            },
        ],
    }
    with pytest.raises(stefx.RecipeError, match="axis 5 is out of range"):
        stefx.quantize(model, bad, example, report=False)
    assert not quantized_modules(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_rule_that_matches_nothing():
    model, example = build("mlp")
    recipe = {
        "name": "r",
        "rules": [
            {"targets": ["linear"], "weights": {"type": "uniform"}},
            {"targets": ["Conv2d"], "weights": {"type": "uniform"}},
        ],
    }
    with pytest.raises(stefx.NoMatchError, match="rule 1 matched nothing"):
        stefx.quantize(model, recipe, example, report=False)
    assert not quantized_modules(model)
    with pytest.warns(UserWarning, match="rule 1 matched nothing"):
        stefx.quantize(model, {**recipe, "on_no_match": "warn"}, example, report=False)
    assert quantized_modules(model)


def test_quantizing_twice_is_refused():
    model, example = build("mlp")
    stefx.quantize(model, "w8a8", example, report=False)
    with pytest.raises(stefx.StefxError, match="dequantize"):
        stefx.quantize(model, "w8a8", example, report=False)


@pytest.mark.parametrize("preset", stefx.preset_names())
def test_every_preset_applies(preset):
    torch.manual_seed(0)
    width = 128  # group presets need in-features divisible by 128
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )
    x = torch.randn(2, 3, 4, 4)
    recipe = stefx.load_recipe(preset)
    relaxed = stefx.Recipe(recipe.name, recipe.rules, recipe.description, "ignore")
    stefx.quantize(model, relaxed, (x,), report=False)
    assert quantized_modules(model)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_a_recipe_that_selects_nothing_at_all_fails_even_when_rules_may_miss():
    model, example = build("mlp")
    recipe = {
        "name": "r",
        "on_no_match": "ignore",
        "rules": [{"targets": ["Conv2d"], "weights": {"type": "uniform"}}],
    }
    with pytest.raises(stefx.NoMatchError, match="selected no site"):
        stefx.quantize(model, recipe, example, report=False)


class _MixedMatmuls(nn.Module):
    """A weight-reading matmul, then a weightless torch.mm: the op site is the second call."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w
        return torch.mm(h, h.t())


def test_op_site_numbering_agrees_with_the_run_time_count():
    torch.manual_seed(0)
    model, x = _MixedMatmuls(), torch.randn(4, 8)
    recipe = {
        "name": "mm",
        "rules": [{"targets": ["matmul"], "input_activations": {"type": "uniform", "num_bits": 2}}],
    }
    plan = stefx.explain(model, recipe, (x,))
    assert [s.name for s in plan.sites] == ["matmul_1"]
    ref = model(x)
    stefx.quantize(model, recipe, (x,), report=False)
    fired = []
    for name, q in model.op_quantizers.items():
        q.register_forward_hook(lambda mod, a, o, name=name: fired.append(name))
    out = model(x)
    assert fired == ["matmul_1_in0", "matmul_1_in1"]
    assert not torch.equal(out, ref)


def test_quantizers_live_where_the_module_computes():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    recipe = {
        "name": "m",
        "rules": [
            {
                "targets": ["linear"],
                "weights": {"type": "lsq", "num_bits": 4},
                "input_activations": {"type": "pact", "num_bits": 4},
            }
        ],
    }
    stefx.quantize(model, recipe, report=False)
    quantizers = [m for m in model.modules() if isinstance(m, stefx.Quantizer)]
    assert len(quantizers) == 4
    assert all(t.device.type == "meta" for q in quantizers for t in q.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())


def test_quantize_report_reuses_the_analysis_graph(capsys):
    model, example = build("residual_cnn")
    stefx.quantize(model, "w4a8", example)
    printed = capsys.readouterr().out
    fresh = stefx.profile(model, example)  # re-captures; must agree with the printed report
    assert str(fresh).split("totals", 1)[1] in printed


def test_quantize_report_without_shapes_says_what_to_pass(capsys):
    model, _ = build("mlp")
    stefx.quantize(model, "w4a8")
    assert "no efficiency report" in capsys.readouterr().out
    with pytest.raises(stefx.CaptureError, match="pass example_inputs"):
        stefx.profile(model)
