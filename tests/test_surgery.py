"""quantize(..., as_graph=True): a GraphModule with the quantizers as nodes, and
torch.export of a quantized model showing one named stefx op per quantizer."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import stefx
from stefx.ste.ops import is_stefx_op
from tests.test_quantize import _first_float, _inputs
from tests.zoo import build

RECIPE = {
    "name": "graph",
    "on_no_match": "ignore",
    "rules": [
        {
            "targets": ["linear", "conv", "conv_transpose", "embedding"],
            "weights": {"type": "lsq", "num_bits": 4, "strategy": "channel"},
            "input_activations": {"type": "uniform", "num_bits": 8},
        },
        {
            "targets": ["matmul", "sdpa", "bmm", "einsum"],
            "input_activations": {"type": "uniform", "num_bits": 8, "strategy": "token"},
        },
    ],
}
GRAPH_ZOO = ["mlp", "residual_cnn", "plain_vit", "functional", "conv_transpose", "grouped_conv"]


def _both(name):
    """The same model quantized as a GraphModule and with hooks, sharing one state."""
    model, example = build(name)
    model.eval()
    float_keys = set(model.state_dict())
    gm = stefx.quantize(model, RECIPE, example, report=False, as_graph=True)
    hooked, _ = build(name)
    hooked.eval()
    hooked.load_state_dict(model.state_dict())
    stefx.quantize(hooked, RECIPE, example, report=False)
    hooked.load_state_dict(gm.state_dict())  # the two state dicts are one layout
    return model, float_keys, gm, hooked, example


@pytest.mark.parametrize("name", GRAPH_ZOO)
def test_graph_module_computes_what_the_hooked_model_computes(name):
    model, float_keys, gm, hooked, example = _both(name)
    args, kwargs = _inputs(model, example)
    assert isinstance(gm, fx.GraphModule) and type(model) is not type(gm)
    assert set(gm.state_dict()) == set(hooked.state_dict())
    gm.graph.lint()
    out, ref = _first_float(gm(*args, **kwargs)), _first_float(hooked(*args, **kwargs))
    torch.testing.assert_close(out, ref)
    out.pow(2).mean().backward()
    ref.pow(2).mean().backward()
    grads = {n: p.grad for n, p in hooked.named_parameters() if p.grad is not None}
    assert grads
    for n, g in grads.items():
        torch.testing.assert_close(gm.get_parameter(n).grad, g, msg=n)
    # the user's model is as it was: its keys, no quantizer, no hook
    assert set(model.state_dict()) == float_keys
    assert not any(isinstance(m, stefx.Quantizer) for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_quantizer_nodes_sit_before_the_ops_they_guard():
    model, example = build("mlp")
    gm = stefx.quantize(model, RECIPE, example, report=False, as_graph=True)
    quantizers = [n for n in gm.graph.nodes if "stefx.quantizer" in n.meta]
    assert [n.target for n in quantizers] == [
        "fc1.input_quantizer",
        "fc1.weight_quantizer",
        "fc2.input_quantizer",
        "fc2.weight_quantizer",
    ]
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    assert len(linears) == 2
    for lin, prefix in zip(linears, ("fc1", "fc2"), strict=True):
        x, w, _ = lin.args
        assert (x.target, w.target) == (f"{prefix}.input_quantizer", f"{prefix}.weight_quantizer")
    assert "self.fc1.weight_quantizer(fc1_weight)" in gm.code
    assert quantizers[1].meta["stefx.quantizer"].num_bits == 4


def test_op_site_quantizers_wrap_each_operand():
    model, example = build("functional")
    gm = stefx.quantize(model, RECIPE, example, report=False, as_graph=True)
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert [a.target for a in sdpa.args[:3]] == [f"op_quantizers.sdpa_0_in{i}" for i in range(3)]


class _Shifted(fx.Transformer):
    """Another fx pass: relu becomes gelu."""

    def call_module(self, target, args, kwargs):
        if isinstance(self.fetch_attr(target), nn.ReLU):
            return F.gelu(*args)
        return super().call_module(target, args, kwargs)


def test_the_graph_module_composes_with_other_fx_passes_and_copies():
    model, example = build("residual_cnn")
    model.eval()
    gm = stefx.quantize(model, RECIPE, example, report=False, as_graph=True)
    ShapeProp(gm).propagate(*example)
    shapes = [n.meta["tensor_meta"].shape for n in gm.graph.nodes if "stefx.quantizer" in n.meta]
    assert shapes and all(len(s) >= 1 for s in shapes)
    shifted = _Shifted(gm).transform()
    shifted.graph.lint()
    assert not torch.equal(shifted(*example), gm(*example))
    for twin in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        torch.testing.assert_close(twin(*example), gm(*example))


def test_export_of_the_graph_module_shows_stefx_ops():
    model, example = build("mlp")
    gm = stefx.quantize(model, RECIPE, example, report=False, as_graph=True)
    exported = torch.export.export(gm, example)
    ops = [n.target._opname for n in exported.graph.nodes if is_stefx_op(n.target)]
    assert ops == ["fake_quant", "lsq", "fake_quant", "lsq"]


def test_models_symbolic_trace_cannot_trace_are_refused_and_left_alone():
    model, example = build("llama")
    keys = set(model.state_dict())
    with pytest.raises(stefx.CaptureError, match="as_graph=True needs a model"):
        stefx.quantize(model, "w4a8", example, report=False, as_graph=True)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize(
    ("name", "recipe", "message"),
    [
        (
            "lstm",
            {"name": "l", "rules": [{"targets": ["lstm"], "weights": {"type": "uniform"}}]},
            "reads the weights",
        ),
        (
            "residual_cnn",
            {
                "name": "f",
                "rules": [
                    {
                        "pattern": ["conv", "batch_norm"],
                        "fold_bn": True,
                        "weights": {"type": "uniform", "num_bits": 4, "strategy": "channel"},
                    }
                ],
            },
            "fold_bn",
        ),
    ],
)
def test_sites_graphs_cannot_express_are_refused(name, recipe, message):
    model, example = build(name)
    with pytest.raises(stefx.RecipeError, match=message):
        stefx.quantize(model, recipe, example, report=False, as_graph=True)
    assert not any(isinstance(m, stefx.Quantizer) for m in model.modules())


# -- torch.export of a hook-quantized model -------------------------------------------------


@pytest.mark.parametrize(("name", "recipe"), [("mlp", "w4a8"), ("llama", "w4a8")])
def test_export_shows_one_named_stefx_op_per_quantizer_around_its_op(name, recipe):
    model, example = build(name)
    model.eval()
    args, kwargs = _inputs(model, example)
    stefx.quantize(model, recipe, example, report=False)
    exported = torch.export.export(model, args, kwargs)
    nodes = list(exported.graph.nodes)
    stefx_nodes = [n for n in nodes if is_stefx_op(n.target)]
    quantizers = [m for m in model.modules() if isinstance(m, stefx.Quantizer)]
    weight_qs = [m for n, m in model.named_modules() if n.endswith("weight_quantizer")]
    assert sum(n.target._opname == "lsq" for n in stefx_nodes) == len(weight_qs)
    assert 0 < len(stefx_nodes) <= len(quantizers)  # shared inputs are quantized once
    for lin in (n for n in nodes if n.target is torch.ops.aten.linear.default):
        x, w = lin.args[:2]
        if w.op == "placeholder":
            continue  # lm_head stays float
        assert is_stefx_op(w.target) and w.target._opname == "lsq"
        assert x.target is __import__("operator").getitem and is_stefx_op(x.args[0].target)
