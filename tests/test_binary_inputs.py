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


def test_binary_inputs_after_relu_are_named():
    model, inputs = build("residual_cnn")
    (msg,) = _warnings(model, "bnn", inputs)
    assert "'conv1' (after ReLU)" in msg and "'conv2' (after relu)" in msg
    assert "'stem.0'" not in msg  # its input is the image, and the preset keeps it float
    assert "cannot learn" in msg and "input_activations: false" in msg


def test_constant_really_is_constant():
    """What the warning is about: sign of a post-ReLU tensor is all +1."""
    q = stefx.make_quantizer({"type": "binary"})
    assert torch.equal(q(torch.relu(torch.randn(100))), torch.ones(100))


def test_no_warning_for_centred_inputs_or_other_quantizers():
    model, inputs = build("residual_cnn")
    assert not _warnings(model, "w4a8", inputs)  # 8-bit codes of a ReLU output are fine
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    recipe = {"rules": [{"targets": ["conv"], "input_activations": {"type": "binary"}}]}
    assert not _warnings(net, recipe, (torch.randn(1, 3, 8, 8),))  # BN output: centred


def test_no_warning_on_an_llm():
    pytest.importorskip("transformers")
    model, _ = build("llama")
    assert not _warnings(model, "bnn")  # SiLU(gate) * up and attention outputs: signed
