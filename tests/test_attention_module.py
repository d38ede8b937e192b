"""nn.MultiheadAttention as one site: both its weights (in_proj_weight and the out_proj
weight its own code reads) are quantized, and its input is quantized once for q, k, v."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import stefx
from tests.zoo import build

W4 = {"type": "uniform", "num_bits": 4, "strategy": "channel", "symmetric": True}
A8 = {"type": "uniform", "num_bits": 8, "strategy": "tensor", "symmetric": True}
RECIPE = {
    "name": "mha",
    "rules": [{"targets": ["attention"], "weights": W4, "input_activations": A8}],
}


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _per_row(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=1) / qmax
    zero = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.detach(), scale, zero, 0, -qmax - 1, qmax)


def test_both_weights_and_the_shared_input_are_quantized():
    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = torch.randn(2, 5, 16)
    plan = stefx.explain(model, RECIPE, (x,))
    assert [(s.name, s.params) for s in plan.sites] == [
        ("attn", ("in_proj_weight", "out_proj.weight"))
    ]
    stefx.quantize(model, RECIPE, (x,), report=False)
    a = model.attn
    scale = float(x.abs().max()) / 127
    xq = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    with torch.no_grad():
        expected, _ = F.multi_head_attention_forward(
            *(xq.transpose(0, 1),) * 3,
            16,
            4,
            _per_row(a.in_proj_weight),
            a.in_proj_bias,
            None,
            None,
            False,
            0.0,
            _per_row(a.out_proj.weight),
            a.out_proj.bias,
            training=False,
            need_weights=False,
        )
        out = model(x)
    torch.testing.assert_close(out, expected.transpose(0, 1), rtol=1e-5, atol=1e-5)
    # outside forward the latent float weights are back in place, as Parameters
    assert isinstance(a.out_proj.weight, nn.Parameter) and a.out_proj.weight.requires_grad


def test_gradients_reach_both_latent_weights_and_dequantize_restores():
    torch.manual_seed(1)
    model = SelfAttention()
    x = torch.randn(2, 5, 16)
    keys = set(model.state_dict())
    stefx.quantize(model, RECIPE, (x,), report=False)
    model(x).sum().backward()
    assert model.attn.in_proj_weight.grad.abs().sum() > 0
    assert model.attn.out_proj.weight.grad.abs().sum() > 0
    stefx.dequantize(model)
    assert set(model.state_dict()) == keys


def test_transformer_encoder_fully_quantized_in_eval():
    """Quantized layers carry hooks, which turns torch's fused encoder fast path off, so
    evaluation under no_grad runs the quantized weights too."""
    model, (ids,) = build("torch_transformer")
    model.eval()
    with torch.no_grad():
        before = model(ids)
    recipe = {"name": "r", "rules": [{"targets": ["linear", "attention"], "weights": W4}]}
    stefx.quantize(model, recipe, (ids,), report=False)
    assert [n["param"] for n in stefx.profile(model, (ids,)).not_covered] == ["embed.weight"]
    with torch.no_grad():
        after = model(ids)
    assert not torch.allclose(after, before)
    stefx.dequantize(model)
    with torch.no_grad():
        assert torch.equal(model(ids), before)
