"""Matching: selectors, scope, position, pattern chains, and which rule wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import stefx
from stefx.match import Candidate, selects
from stefx.pattern import find_chains
from tests.zoo import build

SNAPSHOTS = Path(__file__).parent / "snapshots"
U4 = {"type": "uniform", "num_bits": 4}
U8 = {"type": "uniform", "num_bits": 8}


def _cand(name, kind="linear", types=("Linear",)):
    return Candidate(name, kind, name, types, ("weight",))


@pytest.mark.parametrize(
    ("selector", "name", "kind", "types", "expected"),
    [
        ("linear", "a.b", "linear", ("Linear",), True),
        ("Linear", "a.b", "linear", ("Linear",), True),
        ("Conv1D", "h.0.attn.c_attn", "linear", ("Conv1D",), True),
        ("Conv1d", "h.0.attn.c_attn", "linear", ("Conv1D",), False),  # case-sensitive types
        ("conv2d", "c", "conv", ("Conv2d", "_ConvNd"), True),
        ("conv2d", "c", "conv", ("Conv1d", "_ConvNd"), False),
        ("q_proj", "model.layers.0.self_attn.q_proj", "linear", ("Linear",), True),
        ("proj", "model.layers.0.self_attn.q_proj", "linear", ("Linear",), False),  # not a suffix
        ("*.q_proj", "model.layers.0.self_attn.q_proj", "linear", ("Linear",), True),
        ("re:.*layers\\.[01]\\..*", "model.layers.1.mlp.up", "linear", ("Linear",), True),
        ("re:layers", "model.layers.1.mlp.up", "linear", ("Linear",), False),  # full match
        ("lm_head", "lm_head", "linear", ("Linear",), True),
    ],
)
def test_selectors(selector, name, kind, types, expected):
    assert selects(selector, Candidate(name, kind, name, types, ("weight",))) is expected


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, (torch.randn(3, 4),)


def test_last_rule_wins_field_by_field():
    model, x = _mlp()
    plan = stefx.explain(
        model,
        {
            "name": "r",
            "rules": [
                {"targets": ["linear"], "weights": U8, "input_activations": U8},
                {"targets": ["2"], "weights": U4},  # overrides weights only
                {"targets": ["linear"], "position": "last", "input_activations": False},
            ],
        },
        x,
    )
    sites = {s.name: s for s in plan.sites}
    assert [s.name for s in plan.sites] == ["0", "2", "4"]
    assert sites["0"].weights.num_bits == 8 and sites["0"].input_activations.num_bits == 8
    assert sites["2"].weights.num_bits == 4 and sites["2"].input_activations.num_bits == 8
    assert sites["4"].input_activations is None and sites["4"].weights.num_bits == 8
    assert sites["2"].rules == (0, 1)


def test_position_first_and_ignore():
    model, x = _mlp()
    plan = stefx.explain(
        model,
        {
            "name": "r",
            "rules": [{"targets": ["linear"], "ignore": ["0"], "position": "first", "weights": U4}],
        },
        x,
    )
    assert [s.name for s in plan.sites] == ["2"]


def test_within_scopes_by_module_name():
    model, _ = build("llama")
    plan = stefx.explain(
        model,
        {
            "name": "r",
            "rules": [{"targets": ["linear"], "within": "model.layers.1", "weights": U4}],
        },
    )
    names = [s.name for s in plan.sites]
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert len(names) == 7  # q, k, v, o, gate, up, down


def test_pattern_finds_conv_bn_relu_chains():
    model, example = build("residual_cnn")
    captured = stefx.capture(model, example)
    chains = find_chains(["conv", "batch_norm", "relu"], captured)
    assert chains, "the stem conv -> bn -> relu chain was not found"
    for chain in chains:
        assert [op.kind for op in chain][:1] == ["conv"]
        assert "BatchNorm" in chain[1].module_type or "batch_norm" in chain[1].target
    plan = stefx.explain(
        model,
        {
            "name": "r",
            "rules": [{"pattern": ["conv", "batch_norm", "relu"], "weights": U4}],
        },
        example,
    )
    assert {s.name for s in plan.sites} == {chain[0].module for chain in chains}
    assert all(s.kind == "conv" for s in plan.sites)


def test_op_sites_are_numbered_per_module():
    model, _ = build("gpt2")
    plan = stefx.explain(
        model,
        {
            "name": "r",
            "rules": [{"targets": ["matmul"], "input_activations": U8}],
        },
    )
    assert [s.name for s in plan.sites] == [
        f"transformer.h.{i}.attn.matmul_{j}" for i in range(2) for j in range(2)
    ]


def _snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("STEFX_UPDATE_SNAPSHOTS") or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with STEFX_UPDATE_SNAPSHOTS=1"


def test_explain_snapshot():
    model, _ = build("llama")
    plan = stefx.explain(model, "bitnet-b158")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _snapshot("explain_llama_bitnet.txt", str(plan) + "\n")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, stefx.Quantizer) for m in model.modules())


class _BlockDiagonalGate(nn.Module):
    """RecurrentGemma's RG-LRU gates: a square [d, d] block per head, run as
    ``baddbmm(bias, x, W)`` (x @ W reduces W's axis 1) or as ``x @ W.mT`` (axis 2)."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        self.weight = nn.Parameter(torch.randn(4, 8, 8))
        self.bias = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, 4, 8).transpose(0, 1)
        if self.transposed:
            y = torch.bmm(h, self.weight.transpose(1, 2)) + self.bias[:, None, :]
        else:
            y = torch.baddbmm(self.bias[:, None, :], h, self.weight)
        return y.transpose(0, 1).reshape(x.shape)


@pytest.mark.parametrize(("transposed", "in_axis"), [(False, 1), (True, 2)])
def test_square_block_weights_scale_along_the_axis_the_op_reduces(transposed, in_axis):
    """Square [E, d, d] weights cannot tell their input axis by shape: it comes from the
    operand's layout. The [E, d] bias baddbmm reads first is no weight (it was taken for
    one and crashed weight_spec: recurrent_gemma in benchmarks/sweep_hf.py)."""
    torch.manual_seed(0)
    model = _BlockDiagonalGate(transposed)
    x = torch.randn(5, 32)
    recipe = {
        "rules": [
            {
                "targets": ["experts"],
                "weights": {"type": "binary", "strategy": "channel", "scale": "absmean"},
            }
        ]
    }
    plan = stefx.explain(model, recipe, (x,))
    (site,) = plan.sites
    assert site.params == ("weight",) and site.expert_in_axis == {"weight": in_axis}
    w = model.weight.detach().clone()
    stefx.quantize(model, recipe, (x,), report=False)
    wq = torch.sign(w) * w.abs().mean(dim=in_axis, keepdim=True)
    wq_used = wq.transpose(1, 2) if transposed else wq
    h = x.reshape(-1, 4, 8).transpose(0, 1)
    expected = (torch.bmm(h, wq_used) + model.bias.detach()[:, None, :]).transpose(0, 1)
    assert torch.allclose(model(x), expected.reshape(x.shape), atol=1e-5)


def test_square_hf_experts_read_their_input_axis_from_grouped_mm_fallback():
    """transformers computes fused experts on CPU with grouped_mm_fallback(x, W^T, offs)
    over [E, out, in] parameters; gate_up_proj is square here (2·16 = 32 = hidden), so only
    the operand's strides say its input is axis 2, as down_proj's shape does."""
    from transformers import AutoModelForCausalLM

    from stefx.capture import capture
    from tests.zoo import hf_config

    config = hf_config("qwen2_moe")
    config.moe_intermediate_size = 16
    model = AutoModelForCausalLM.from_config(config)
    experts = [op for op in capture(model).ops if op.kind == "experts"]
    assert {tuple(op.param_shapes["weight"]) for op in experts} == {(4, 32, 32), (4, 32, 16)}
    assert all(op.attrs["expert_in_axis"] == {"weight": 2} for op in experts)
