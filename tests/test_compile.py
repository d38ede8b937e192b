"""torch.compile(fullgraph=True) of quantized models: one graph, forward and backward
equal to eager within float tolerance."""

from __future__ import annotations

import pytest
import torch

import stefx
from tests.test_quantize import _first_float, _inputs
from tests.test_runtime import ATTENTION_SITES
from tests.zoo import build

CASES = [
    ("llama", "w4a8", "inductor"),
    ("gpt2", "w4a8", "inductor"),
    ("residual_cnn", "w4a8", "inductor"),
    ("llama", ATTENTION_SITES, "aot_eager"),
    ("gpt2", "bitnet-b158", "aot_eager"),
    ("residual_cnn", "bnn", "aot_eager"),
]


def _loss_and_grads(model, args, kwargs, run=None):
    model.zero_grad(set_to_none=True)
    out = _first_float((model if run is None else run)(*args, **kwargs))
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize(
    ("name", "recipe", "backend"),
    CASES,
    ids=[f"{n}-{r if isinstance(r, str) else 'attention-sites'}-{b}" for n, r, b in CASES],
)
def test_fullgraph_compile_matches_eager(name, recipe, backend):
    torch._dynamo.reset()
    model, example = build(name)
    model.eval()  # no dropout, fixed BatchNorm statistics: eager and compiled see one model
    args, kwargs = _inputs(model, example)
    stefx.quantize(model, recipe, example, report=False)
    ref, ref_grads = _loss_and_grads(model, args, kwargs)

    explained = torch._dynamo.explain(model)(*args, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, grads = _loss_and_grads(model, args, kwargs, run=compiled)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        # Under inductor an 8-bit activation code can land on the other side of a rounding
        # boundary (fp32 reassociation in its scale): that moves a few gradient entries by
        # a fraction of a step, up to 3.7e-3 of max|g| on residual_cnn/w4a8 on an AMD EPYC
        # CPU. A wrong surrogate (mask, identity, scale gradient) is off by O(max|g|).
        torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=5e-3 * g.abs().max().item(), msg=n)
    torch._dynamo.reset()


def test_a_strength_ramp_does_not_recompile():
    torch._dynamo.reset()
    model, example = build("mlp")
    stefx.quantize(model, "w4a8", example, report=False)
    quantizers = [m for m in model.modules() if isinstance(m, stefx.Quantizer)]
    graphs = []

    def backend(gm, example):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    outs = []
    for strength in (0.25, 0.5, 0.75, 1.0):
        for q in quantizers:
            q.strength = strength
        outs.append(compiled(*example))
    assert len(graphs) == 2, f"{len(graphs)} graphs for 4 strengths"  # λ < 1, then λ = 1
    for q in quantizers:
        q.strength = 1.0
    torch.testing.assert_close(outs[-1], model(*example))
    torch._dynamo.reset()


def test_learned_activation_state_must_be_initialised_before_compiling():
    torch._dynamo.reset()
    model, example = build("mlp")
    recipe = {
        "name": "lsq-act",
        "rules": [{"targets": ["linear"], "input_activations": {"type": "lsq", "num_bits": 4}}],
    }
    stefx.quantize(model, recipe, example, report=False)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="run one eager forward"):
        compiled(*example)
    torch._dynamo.reset()
    model(*example)  # one eager batch initialises the steps
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*example), model(*example))
    torch._dynamo.reset()
