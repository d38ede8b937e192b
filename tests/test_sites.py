"""Sites: the op-site rule, resolved weight specs, and the bugs found where they had
several homes (each test here failed before its fix)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stefx
from stefx.capture.graph import OpNode
from stefx.pattern import op_matches
from stefx.sites import counter, op_site_name, weight_spec
from stefx.ste.spec import parse_spec
from tests.zoo import build

A2 = {"type": "uniform", "num_bits": 2, "strategy": "token"}
A8 = {"type": "uniform", "num_bits": 8, "strategy": "token"}


def _fq(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric absmax fake quantization, by torch's own fake-quantize."""
    rows = x.reshape(-1, x.shape[-1])
    qmax = 2 ** (bits - 1) - 1
    scale = (rows.abs().amax(1) / qmax).clamp(min=1e-12)
    zero = torch.zeros(rows.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(rows, scale, zero, 0, -qmax - 1, qmax).view(
        x.shape
    )


# -- the op-site rule -----------------------------------------------------------------------


def test_counter_is_the_kind_of_a_matmul_and_the_call_name_of_a_pointwise_op():
    assert counter(OpNode("m", "matmul", "torch.matmul", call="matmul")) == "matmul"
    assert counter(OpNode("s", "sdpa", "F.sdpa", call="scaled_dot_product_attention")) == "sdpa"
    relu = OpNode("r", "elementwise", "torch.relu", call="relu", dtype="torch.float32")
    assert counter(relu) == "relu"
    assert counter(OpNode("v", "view", "view", call="view")) is None
    size_math = OpNode("d", "elementwise", "operator.floordiv", call="floordiv")
    assert counter(size_math) is None  # x.size(-1) // 2: plain Python at run time
    assert op_site_name("a.attn", "matmul", 1) == "a.attn.matmul_1"
    assert op_site_name("", "relu", 0) == "relu_0"


class _KeywordSDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(query=q, key=k, value=v)


def test_sdpa_called_with_keyword_operands_is_quantized():
    torch.manual_seed(0)
    model, qkv = _KeywordSDPA(), tuple(torch.randn(2, 2, 5, 8) for _ in range(3))
    recipe = {"name": "sdpa", "rules": [{"targets": ["sdpa"], "input_activations": A2}]}
    ref = F.scaled_dot_product_attention(*(_fq(t, 2) for t in qkv))
    assert not torch.allclose(ref, model(*qkv))
    stefx.quantize(model, recipe, qkv, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the site fires: no "did not run" warning
        out = model(*qkv)
    torch.testing.assert_close(out, ref)


class _TiedLM(nn.Module):
    """One module reads its own weight twice: as an embedding table and as the output
    projection (a tied language model written as one module)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8))

    def forward(self, ids):
        return F.linear(torch.tanh(F.embedding(ids, self.weight)), self.weight)


def test_two_sites_on_one_weight_keep_both_quantizers():
    torch.manual_seed(0)
    model, ids = _TiedLM(), torch.randint(0, 16, (2, 5))
    recipe = {
        "name": "tied",
        "rules": [
            {"targets": ["embedding"], "weights": {"type": "uniform", "num_bits": 8}},
            {"targets": ["linear"], "weights": {"type": "uniform", "num_bits": 2}},
        ],
    }
    plan = stefx.explain(model, recipe, (ids,))
    assert [(s.kind, s.weights.num_bits) for s in plan.sites] == [("embedding", 8), ("linear", 2)]
    w = model.weight.detach()
    w8 = torch.fake_quantize_per_tensor_affine(w, w.abs().max().item() / 127, 0, -128, 127)
    w2 = torch.fake_quantize_per_tensor_affine(w, w.abs().max().item() / 1, 0, -2, 1)
    expected = F.linear(torch.tanh(F.embedding(ids, w8)), w2)
    stefx.quantize(model, recipe, (ids,), report=False)
    assert {"embedding_weight_quantizer", "linear_weight_quantizer"} <= set(
        dict(model.named_children())
    )
    torch.testing.assert_close(model(ids), expected)
    model(ids).sum().backward()
    assert model.weight.grad is not None and isinstance(model.weight, nn.Parameter)
    stefx.dequantize(model)
    assert set(model.state_dict()) == {"weight"}


def test_hugging_face_conv1d_channel_scales_run_along_the_output_axis():
    model, example = build("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn  # Conv1D: weight [in, out]
    n_in, n_out = c_attn.weight.shape
    assert n_out == 3 * n_in
    recipe = {
        "name": "c",
        "rules": [
            {
                "targets": ["Conv1D"],
                "weights": {"type": "lsq", "num_bits": 4, "strategy": "channel"},
            }
        ],
    }
    stefx.quantize(model, recipe, example, report=False)
    assert c_attn.weight_quantizer.scale.shape == (n_out,)
    # one scale per output column: quantizing column j alone gives column j of the result
    w = c_attn.weight.detach()
    qw = c_attn.weight_quantizer(w)
    step = c_attn.weight_quantizer.scale.detach()
    j = 5
    col = (w[:, j] / step[j]).clamp(-8, 7).round() * step[j]
    torch.testing.assert_close(qw[:, j], col)


def test_resolved_weight_specs():
    channel, group = (
        parse_spec({"type": "uniform", "num_bits": 4, "strategy": "channel"}),
        (parse_spec({"type": "uniform", "num_bits": 4, "strategy": "group", "group_size": 4})),
    )
    assert weight_spec(channel, (8, 4), "linear").axis is None  # [out, in]: axis 0
    assert weight_spec(channel, (4, 12), "linear", "Conv1D").axis == 1  # [in, out]
    assert weight_spec(channel, (4, 6, 3, 3), "conv_transpose").axis == 1
    assert weight_spec(group, (8, 4), "linear").axis is None  # along the input, axis -1
    assert weight_spec(group, (4, 12), "linear", "Conv1D").axis == 0
    experts = weight_spec(channel, (3, 8, 4), "experts", in_axis=2)
    assert (experts.strategy, experts.axis, experts.group_size) == ("group", 2, 4)


# -- patterns match names exactly -------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "call", "matches"),
    [
        ("add", "addmm", False),
        ("relu", "leaky_relu", False),
        ("add", "add", True),
        ("relu", "relu", True),
        ("batch_norm", "_native_batch_norm_legit_no_training", True),
        ("norm", "layer_norm", False),
    ],
)
def test_pattern_elements_match_call_names_exactly(selector, call, matches):
    op = OpNode("n", "elementwise", f"aten.{call}.default", call=call, dtype="torch.float32")
    assert op_matches(selector, op) is matches


@pytest.mark.parametrize(
    ("selector", "module_type", "matches"),
    [("relu", "ReLU", True), ("relu", "LeakyReLU", False), ("batch_norm", "BatchNorm2d", True)],
)
def test_pattern_elements_match_module_classes_exactly(selector, module_type, matches):
    op = OpNode("n", "elementwise", module_type, module_type=module_type)
    assert op_matches(selector, op) is matches


class _AddmmThenLeaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.b = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return F.leaky_relu(torch.addmm(self.b, x, self.w))


def test_a_pattern_does_not_match_by_substring():
    model, x = _AddmmThenLeaky(), (torch.randn(2, 8),)
    plan = stefx.explain(
        model,
        {
            "name": "p",
            "on_no_match": "ignore",
            "rules": [{"pattern": ["add", "relu"], "weights": {"type": "uniform"}}],
        },
        x,
    )
    assert plan.sites == [] and len(plan.unmatched) == 1


# -- a planned site that does not fire is reported ----------------------------------------------


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.skip = False

    def forward(self, x):
        return x if self.skip else torch.matmul(x, x.transpose(-1, -2))


def test_a_planned_op_site_that_does_not_run_warns_once():
    model, x = _Branchy(), torch.randn(3, 4)
    recipe = {"name": "m", "rules": [{"targets": ["matmul"], "input_activations": A8}]}
    stefx.quantize(model, recipe, (x,), report=False)
    model.skip = True
    with pytest.warns(UserWarning, match=r"matmul_0 did not run"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once
