"""A binarizer fed only non-negative values (after a ReLU) outputs a constant: quantize
says so, naming the layers, instead of letting the network train to chance."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import stefx
from tests.zoo import build


def _warnings(model, recipe, inputs=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stefx.quantize(model, recipe, inputs, report=False)
    return [str(w.message) for w in caught if "never negative" in str(w.message)]


PLAIN_SIGN = {
    "name": "plain-sign",
    "rules": [
        {"targets": ["conv", "linear"], "weights": {"type": "binary"},
         "input_activations": {"type": "binary"}},
        {"targets": ["conv", "linear"], "position": "first", "input_activations": False},
    ],
}  # fmt: skip


def test_binary_inputs_after_relu_are_named():
    model, inputs = build("residual_cnn")
    (msg,) = _warnings(model, PLAIN_SIGN, inputs)
    assert "'conv1' (after ReLU)" in msg and "'conv2' (after relu)" in msg
    assert "'stem.0'" not in msg  # its input is the image, and the recipe keeps it float
    assert "cannot learn" in msg and "input_activations: false" in msg


@pytest.mark.parametrize("preset", ["bnn", "xnor", "bireal"])
def test_the_binary_presets_learn_a_threshold_and_do_not_warn(preset):
    model, inputs = build("residual_cnn")
    assert not _warnings(model, preset, inputs)
    q = model.conv1.input_quantizer
    assert q.spec.options["threshold"] == "learned" and q.threshold.numel() == 0  # lazy
    model(*inputs)  # the first batch sets τ, one per channel
    assert q.threshold.numel() == model.conv1.in_channels


def test_constant_really_is_constant():
    """What the warning is about: sign of a post-ReLU tensor is all +1."""
    q = stefx.make_quantizer({"type": "binary"})
    assert torch.equal(q(torch.relu(torch.randn(100))), torch.ones(100))


def test_learned_threshold_is_rsign():
    """sign(x - τ) per channel, τ initialised to the channel mean of the first batch, and
    dL/dτ = -Σ 1{|x - τ| <= 1}·G (the clipped estimator through x - τ)."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 3, 5, 5)) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    q = stefx.make_quantizer({"type": "binary", "threshold": "learned"})
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    tau = x.mean(dim=(0, 2, 3))
    assert torch.allclose(q.threshold.detach(), tau, atol=1e-6)
    shifted = x - tau.view(1, 3, 1, 1)
    assert torch.equal(y, torch.where(shifted >= 0, 1.0, -1.0))
    assert 0 < (y > 0).float().mean() < 1  # no longer constant
    g = torch.randn_like(y)
    y.backward(g)
    inside = (shifted.abs() <= 1).float()
    assert torch.allclose(xg.grad, g * inside)
    assert torch.allclose(q.threshold.grad, -(g * inside).sum(dim=(0, 2, 3)), atol=1e-5)
    # last axis for (batch, tokens, features) inputs
    t = stefx.make_quantizer({"type": "binary", "threshold": "learned"})
    t(torch.randn(2, 7, 6))
    assert t.threshold.shape == (6,)
    with pytest.raises(stefx.RecipeError, match="threshold='maybe'"):
        stefx.make_quantizer({"type": "binary", "threshold": "maybe"})


def test_learned_threshold_saves_and_loads(tmp_path):
    model, inputs = build("residual_cnn")
    q = stefx.quantize(model, "bnn", inputs, report=False)
    q(*inputs)  # initialise the thresholds
    path = tmp_path / "bnn.safetensors"
    stefx.save(q, path)
    fresh, _ = build("residual_cnn")
    again = stefx.load(path, fresh)
    q.eval(), again.eval()
    assert torch.equal(q(*inputs), again(*inputs))
    assert torch.equal(again.conv1.input_quantizer.threshold, q.conv1.input_quantizer.threshold)


def test_no_warning_for_centred_inputs_or_other_quantizers():
    model, inputs = build("residual_cnn")
    assert not _warnings(model, "w4a8", inputs)  # 8-bit codes of a ReLU output are fine
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    recipe = {"rules": [{"targets": ["conv"], "input_activations": {"type": "binary"}}]}
    assert not _warnings(net, recipe, (torch.randn(1, 3, 8, 8),))  # BN output: centred


def test_no_warning_on_an_llm_and_its_centred_inputs_keep_plain_sign():
    pytest.importorskip("transformers")
    model, _ = build("llama")
    assert not _warnings(model, "bnn")  # SiLU(gate) * up and attention outputs: signed
    thresholds = {
        m.input_quantizer.spec.options["threshold"]
        for m in model.modules()
        if getattr(m, "input_quantizer", None) is not None
    }
    assert thresholds == {"none"}  # threshold: auto resolved; q/k/v still share one sign(x)


def test_auto_resolves_per_site():
    model, inputs = build("residual_cnn")
    stefx.quantize(model, "bireal", inputs, report=False)
    assert model.conv1.input_quantizer.spec.options["threshold"] == "learned"  # after ReLU
    plan = model._stefx_plan
    assert not [s for s in plan.sites if s.input_activations is not None
                and s.input_activations.options.get("threshold") == "auto"]  # fmt: skip
