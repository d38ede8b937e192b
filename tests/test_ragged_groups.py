"""Group quantization at any width: a group size that does not divide the input dimension
leaves a shorter last group, quantized as if it were a tensor of its own."""

from __future__ import annotations

import pytest
import torch

import stefx
from stefx.ste.granularity import Granularity
from stefx.ste.lsq import LSQQuantizer


@pytest.mark.parametrize(
    ("shape", "axis", "size"),
    [((6, 10), -1, 4), ((6, 10), 0, 4), ((2, 3, 7), 1, 2), ((5, 9), -1, 9)],
)
def test_rows_pad_and_unrows_drop_the_padding(shape, axis, size):
    x = torch.randn(shape)
    g = Granularity("group", axis, size)
    rows = g.rows(x)
    length = shape[axis]
    assert rows.shape == (x.numel() // length * -(-length // size), size)
    assert g.num_groups(shape) == rows.shape[0]
    assert torch.equal(g.unrows(rows, x.shape), x)
    assert (rows == 0).sum() >= g.pad(shape) * (x.numel() // length)  # zero padding


def _chunks(x, size):
    return [x[:, i : i + size] for i in range(0, x.shape[1], size)]


def test_lsq_on_a_ragged_width_is_lsq_on_each_chunk():
    """Init (2·mean|w|/√Qp over the real values only), forward and input gradient are those
    of one LSQ quantizer per chunk; the step gradient too, up to LSQ's N (elements per
    step), which a ragged layout averages."""
    torch.manual_seed(0)
    w = torch.randn(4, 10)
    q = LSQQuantizer({"num_bits": 4, "strategy": "group", "group_size": 4})
    w1 = w.clone().requires_grad_(True)
    y = q(w1)
    g = torch.randn_like(y)
    y.backward(g)
    parts, grads, scales = [], [], []
    for chunk, g_chunk in zip(_chunks(w, 4), _chunks(g, 4), strict=True):
        width = chunk.shape[1]  # one group per row of the chunk
        qc = LSQQuantizer({"num_bits": 4, "strategy": "group", "group_size": width})
        c = chunk.clone().requires_grad_(True)
        yc = qc(c)
        yc.backward(g_chunk)
        parts.append(yc.detach())
        grads.append(c.grad)
        scales.append(qc.scale.detach())
    assert torch.allclose(q.scale.detach().view(4, 3), torch.stack(scales, 1), atol=1e-7)
    assert torch.equal(y.detach(), torch.cat(parts, 1))
    assert torch.equal(w1.grad, torch.cat(grads, 1))


def test_group_presets_apply_to_any_width():
    """The issue's case: w2a16-g64 on a Llama whose MLP is 352 wide (5.5 groups)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    for preset in ("w2a16-g64", "w4a16-g128"):
        q = stefx.quantize(model, preset, report=False)
        down = q.model.layers[0].mlp.down_proj  # in_features 352
        groups = down.weight_quantizer.granularity.num_groups(down.weight.shape)
        assert groups == 128 * -(-352 // down.weight_quantizer.spec.group_size)
        ids = torch.randint(0, 128, (2, 8))
        loss = q(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss) and down.weight.grad.abs().sum() > 0
        stefx.dequantize(q)
        model.zero_grad()


def test_ragged_groups_compile_without_graph_breaks():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x = torch.randn(4, 10)
    recipe = {
        "rules": [
            {
                "targets": ["linear"],
                "weights": {"type": "lsq", "num_bits": 4, "strategy": "group", "group_size": 4},
            }
        ]
    }
    q = stefx.quantize(net, recipe, (x,), report=False)
    eager = q(x)
    eager.sum().backward()
    grad = q[0].weight.grad.clone()
    q.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-6)
    assert torch.allclose(q[0].weight.grad, grad, atol=1e-6)
