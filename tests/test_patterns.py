"""Multi-op patterns: BatchNorm folding for QAT (``fold_bn``) and quantizing a chain's output."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stefx
from stefx.errors import RecipeError
from stefx.rewrite import STATE_ATTR
from tests.zoo import build

W4 = {"type": "uniform", "num_bits": 4, "strategy": "channel", "symmetric": True}
A8 = {"type": "uniform", "num_bits": 8, "strategy": "tensor", "symmetric": True}
LSQ4 = {"type": "lsq", "num_bits": 4, "strategy": "channel"}


def _fold_recipe(pattern=("conv", "batch_norm"), weights=W4, **extra):
    rule = {"pattern": list(pattern), "fold_bn": True, "weights": weights, **extra}
    return {"name": "fold", "rules": [rule]}


def _randomise_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Statistics and affine parameters far from the identity, so folding matters."""
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n))
        bn.running_var.copy_(torch.rand(n) * 3 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(n))
            bn.bias.copy_(torch.randn(n))


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _folded_reference(conv: nn.Module, bn: nn.Module, axis: int, bits: int = 4):
    """The deployed layer by hand: w·γ/σ fake-quantized per output channel with torch's
    own kernel, and the folded bias β + (b − μ)·γ/σ."""
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    s = gamma / torch.sqrt(bn.running_var + bn.eps)
    shape = [1] * conv.weight.dim()
    shape[axis] = -1
    w = conv.weight * s.reshape(shape)
    qmax = 2 ** (bits - 1) - 1
    dims = [d for d in range(w.dim()) if d != axis]
    scale = w.detach().abs().amax(dim=dims) / qmax
    zero = torch.zeros(w.shape[axis], dtype=torch.int32)
    wq = torch.fake_quantize_per_channel_affine(w, scale, zero, axis, -qmax - 1, qmax)
    b = conv.bias if conv.bias is not None else torch.zeros_like(s)
    beta = bn.bias if bn.affine else torch.zeros_like(s)
    return wq, beta + (b - bn.running_mean) * s


CASES = {
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), lambda: nn.BatchNorm2d(6), (2, 3, 8, 8), 0),
    "conv1d_no_bias": (
        lambda: nn.Conv1d(4, 5, 3, bias=False),
        lambda: nn.BatchNorm1d(5),
        (2, 4, 9),
        0,
    ),
    "linear_bn1d": (lambda: nn.Linear(7, 5), lambda: nn.BatchNorm1d(5), (4, 7), 0),
    "conv_transpose": (
        lambda: nn.ConvTranspose2d(3, 4, 3, stride=2),
        lambda: nn.BatchNorm2d(4),
        (2, 3, 5, 5),
        1,
    ),
    "bn_not_affine": (
        lambda: nn.Conv2d(3, 6, 1),
        lambda: nn.BatchNorm2d(6, affine=False),
        (2, 3, 4, 4),
        0,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_folded_qat_in_eval_is_the_deployed_folded_layer(case):
    make_op, make_bn, shape, axis = CASES[case]
    torch.manual_seed(0)
    model = ConvBN(make_op(), make_bn())
    _randomise_bn(model.bn)
    x = torch.randn(shape)
    kinds = {nn.Linear: "linear", nn.ConvTranspose2d: "conv_transpose"}
    kind = kinds.get(type(model.conv), "conv")
    stefx.quantize(model, _fold_recipe((kind, "batch_norm")), (x,), report=False)
    assert model.conv.weight_quantizer is not None
    model.eval()
    wq, bias = _folded_reference(model.conv, model.bn, axis)
    if isinstance(model.conv, nn.Linear):
        expected = F.linear(x, wq, bias)
    elif isinstance(model.conv, nn.ConvTranspose2d):
        expected = F.conv_transpose2d(x, wq, bias, stride=2)
    else:
        conv = F.conv2d if model.conv.weight.dim() == 4 else F.conv1d
        expected = conv(x, wq, bias, padding=model.conv.padding)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_folded_qat_in_train_mode_normalises_with_batch_statistics():
    torch.manual_seed(1)
    model = ConvBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    _randomise_bn(model.bn)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    stefx.quantize(model, _fold_recipe(), (x,), report=False)
    model.train()
    wq, _ = _folded_reference(model.conv, model.bn, 0)
    s = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    unfolded = F.conv2d(x, wq / s.reshape(-1, 1, 1, 1), model.conv.bias)
    expected = ref.bn.train()(unfolded)  # batch statistics, and the running update
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)
    out.square().sum().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    assert model.bn.weight.grad is not None and model.bn.weight.grad.abs().sum() > 0


def test_fold_with_learned_scale_trains_the_scale():
    torch.manual_seed(2)
    model = ConvBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    _randomise_bn(model.bn)
    lsq = {"type": "lsq", "num_bits": 4, "strategy": "channel"}
    stefx.quantize(model, _fold_recipe(weights=lsq), (torch.randn(2, 3, 8, 8),), report=False)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = [p.grad for p in model.conv.weight_quantizer.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_disabled_folded_quantizer_is_bit_identical():
    torch.manual_seed(3)
    model = ConvBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    _randomise_bn(model.bn)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    stefx.quantize(model, _fold_recipe(weights={**W4, "enabled": False}), (x,), report=False)
    assert torch.equal(model(x), before)


def test_fold_shows_in_explain_and_dequantize_restores():
    torch.manual_seed(4)
    model = ConvBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    x = torch.randn(2, 3, 8, 8)
    plan = stefx.explain(model, _fold_recipe(), (x,))
    assert [(s.name, s.fold_bn) for s in plan.sites] == [("conv", "bn")]
    assert "uniform4 channel +folds bn" in str(plan)
    keys = set(model.state_dict())
    stefx.quantize(model, _fold_recipe(), (x,), report=False)
    stefx.dequantize(model)
    assert set(model.state_dict()) == keys and not hasattr(model.conv, STATE_ATTR)


class _Unfoldable(nn.Module):
    def __init__(self, after: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=after != "bn_no_stats")
        self.after = after
        self.gamma = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.after == "functional":
            return F.batch_norm(y, None, None, self.gamma, None, training=True)
        if self.after == "relu":
            return torch.relu(y)
        return self.bn(y)


@pytest.mark.parametrize(
    ("after", "pattern", "message"),
    [
        ("functional", ("conv", "batch_norm"), "not a BatchNorm module"),
        ("relu", ("conv", "relu"), "not a BatchNorm module"),
        ("bn_no_stats", ("conv", "batch_norm"), "track_running_stats=False"),
    ],
)
def test_unfoldable_chains_are_refused_and_the_model_is_untouched(after, pattern, message):
    model = _Unfoldable(after)
    keys = set(model.state_dict())
    with pytest.raises(RecipeError, match=f"rule 0: fold_bn: .*{message}"):
        stefx.quantize(model, _fold_recipe(pattern), (torch.randn(1, 3, 6, 6),), report=False)
    assert set(model.state_dict()) == keys
    assert not any(hasattr(m, STATE_ATTR) for m in model.modules())


# -- output_activations at the end of a pattern --------------------------------------------


def _relu_output_recipe(pattern=("conv", "batch_norm", "relu")):
    return {"name": "out", "rules": [{"pattern": list(pattern), "output_activations": A8}]}


def _fake_quant_8bit(t: torch.Tensor) -> torch.Tensor:
    scale = float(t.detach().abs().max()) / 127
    return torch.fake_quantize_per_tensor_affine(t, scale, 0, -128, 127)


def test_pattern_output_goes_to_the_module_or_call_that_ends_each_chain():
    model, (x,) = build("residual_cnn")
    model.eval()
    float_model = copy.deepcopy(model)
    plan = stefx.explain(model, _relu_output_recipe(), (x,))
    # stem: Conv -> BN -> nn.ReLU module; conv1 -> bn1 -> F.relu in the root's forward
    assert [(s.name, s.kind, s.output_activations is not None) for s in plan.sites] == [
        ("stem.2", "elementwise", True),
        ("relu_0", "relu", True),
    ]
    seen: dict[str, torch.Tensor] = {}
    stefx.quantize(model, _relu_output_recipe(), (x,), report=False)
    model.conv1.register_forward_pre_hook(lambda m, a: seen.setdefault("conv1", a[0]))
    model.conv2.register_forward_pre_hook(lambda m, a: seen.setdefault("conv2", a[0]))
    model(x)
    stem = float_model.stem(x)
    expected_stem = _fake_quant_8bit(stem)
    torch.testing.assert_close(seen["conv1"], expected_stem)
    y = F.relu(float_model.bn1(float_model.conv1(expected_stem)))
    torch.testing.assert_close(seen["conv2"], _fake_quant_8bit(y))
    assert not torch.equal(seen["conv2"], y)


def test_pattern_output_on_an_add_tail():
    model, (x,) = build("residual_cnn")
    plan = stefx.explain(model, _relu_output_recipe(("conv", "batch_norm", "add")), (x,))
    assert [s.name for s in plan.sites] == ["add_0"]
    stefx.quantize(model, _relu_output_recipe(("conv", "batch_norm", "add")), (x,), report=False)
    calls = []
    model.op_quantizers["add_0_out"].register_forward_hook(lambda m, a, o: calls.append(o.shape))
    model(x)
    assert calls == [torch.Size([x.shape[0], 8, *x.shape[2:]])]


class _SharedReLU(nn.Module):
    """torchvision's BasicBlock style: one nn.ReLU module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.relu(self.bn(self.conv(x))))


class _PoolTail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.bn(self.conv(x)), 2)


@pytest.mark.parametrize(
    ("model", "pattern", "message"),
    [
        (_SharedReLU, ("conv", "batch_norm", "relu"), "calls 2 times, but only 1"),
        (_PoolTail, ("conv", "batch_norm", "max_pool2d"), "neither a module's output"),
    ],
)
def test_pattern_outputs_stefx_cannot_place_are_refused(model, pattern, message):
    model = model()
    with pytest.raises(RecipeError, match=message):
        stefx.quantize(model, _relu_output_recipe(pattern), (torch.randn(1, 4, 6, 6),))
    assert not any(hasattr(m, STATE_ATTR) for m in model.modules())


def test_conv_bn_relu_qat_recipe_end_to_end():
    """The classic CNN QAT recipe: folded 4-bit weights, 8-bit inputs and block outputs."""
    model, (x,) = build("residual_cnn")
    recipe = {
        "name": "cnn-w4a8-folded",
        "rules": [
            {
                "pattern": ["conv", "batch_norm", "relu"],
                "fold_bn": True,
                "weights": W4,
                "input_activations": A8,
                "output_activations": A8,
            }
        ],
    }
    stefx.quantize(model, recipe, (x,), report=False)
    plan = model._stefx_plan
    assert {s.name: s.fold_bn for s in plan.sites if s.params} == {
        "stem.0": "stem.1",
        "conv1": "bn1",
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss0 = None
    for _ in range(5):
        loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss0 = loss0 if loss0 is not None else loss.item()
    assert torch.isfinite(loss) and loss.item() < loss0


def test_profile_charges_a_folded_batchnorm_as_gone():
    torch.manual_seed(5)
    model = ConvBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    x = torch.randn(2, 3, 8, 8)
    unfolded = stefx.profile(
        model, (x,), recipe={"name": "w", "rules": [{"targets": ["conv"], "weights": W4}]}
    )
    folded = stefx.profile(model, (x,), recipe=_fold_recipe())
    bn_before = {r["name"]: r for r in unfolded.to_dict()["layers"]}["bn"]
    bn_after = {r["name"]: r for r in folded.to_dict()["layers"]}["bn"]
    assert bn_before["after"]["flops"] == bn_before["before"]["flops"] > 0
    assert bn_after["after"]["flops"] == 0 and bn_after["after"]["act_bytes"] == 0
    assert bn_after["after"]["params"] == 6  # the folded per-channel bias
    conv = {r["name"]: r for r in folded.to_dict()["layers"]}["conv"]
    assert conv["after"]["param_bytes"] < conv["before"]["param_bytes"]


def test_quantizers_of_child_modules_do_not_shift_the_owners_call_count():
    """The root counts its own ``add`` calls; the quantizers running in its children's
    hooks (conv weights, inputs: mul, div, add inside) must not be counted."""
    model, (x,) = build("residual_cnn")
    model.eval()
    recipe = {
        "name": "r",
        "rules": [
            {"targets": ["conv"], "weights": LSQ4, "input_activations": {**A8, "strength": 0.5}},
            {"pattern": ["conv", "batch_norm", "add"], "output_activations": A8},
        ],
    }
    stefx.quantize(model, recipe, (x,), report=False)
    seen = []
    model.op_quantizers["add_0_out"].register_forward_hook(lambda m, a, o: seen.append(a[0]))
    residual = {}
    model.stem.register_forward_hook(lambda m, a, o: residual.setdefault("x", o))
    model.bn2.register_forward_hook(lambda m, a, o: residual.setdefault("bn2", o))
    model(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], residual["x"] + residual["bn2"])


def test_fold_and_outputs_on_a_hugging_face_resnet_captured_by_export():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(6)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    model = ResNetForImageClassification(config)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise_bn(m)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    float_logits = model(pixel_values=x).logits
    recipe = _fold_recipe(("conv", "batch_norm", "relu"), output_activations=A8)
    assert stefx.explain(model, recipe, {"pixel_values": x}).capture.method == "export"
    stefx.quantize(model, recipe, {"pixel_values": x}, report=False)
    plan = model._stefx_plan
    folds = {s.name: s.fold_bn for s in plan.sites if s.fold_bn}
    stem = "resnet.embedder.embedder"
    assert folds[f"{stem}.convolution"] == f"{stem}.normalization"
    assert any(s.name == f"{stem}.activation" and s.output_activations for s in plan.sites)
    assert type(model) is ResNetForImageClassification
    logits = model(pixel_values=x).logits
    assert logits.shape == float_logits.shape and not torch.equal(logits, float_logits)
