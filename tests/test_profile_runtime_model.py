"""The profile costs what a runtime would run: fused pointwise chains, quantizers where a
tensor changes width, eval-mode no-ops at zero, real copies at their bytes, every MoE
weight once. Expected values are worked by hand from the shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stefx
from stefx.capture.graph import OpNode
from stefx.profile.costs import cost_of

transformers = pytest.importorskip("transformers")


def _row(report, name):
    return next(r for r in report.rows if r.name == name)


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=128, n_layer=1, n_head=4, vocab_size=512)
    return transformers.GPT2LMHeadModel(config).eval(), torch.randint(0, 512, (8, 64))


def test_gelu_new_is_one_fused_kernel_and_unfused_on_request():
    model, ids = _gpt2()
    n = 8 * 64 * 512  # the MLP's hidden activations, fp32
    fused = _row(stefx.profile(model, (ids,)), "transformer.h.0.mlp.act").before
    # gelu_new = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): 8 aten ops, 1 FLOP/element each
    assert fused["flops"] == 8 * n
    assert fused["act_bytes"] == 2 * n * 4  # reads x once, writes the result once
    unfused = _row(stefx.profile(model, (ids,), fusion="none"), "transformer.h.0.mlp.act").before
    # mul, pow, mul, add(x, ·), mul, tanh, add, mul(·, ·): 18 tensor reads and writes
    assert unfused["act_bytes"] == 18 * n * 4
    assert unfused["flops"] == fused["flops"]
    with pytest.raises(stefx.StefxError, match="fusion='all'"):
        stefx.profile(model, (ids,), fusion="all")


def test_a_chain_stops_where_a_tensor_is_also_read_outside_it():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            h = torch.relu(x) * 2.0  # h is read by the chain's add and by fc: written once
            return self.fc(h) + h

    x = torch.randn(4, 16)
    rep = stefx.profile(Residual().eval(), (x,))
    root = _row(rep, "").before
    n = 4 * 16
    # relu+mul fused (read x, write h) and add (read fc's output and h, write): 5 tensors
    assert root["act_bytes"] == 5 * n * 4
    assert root["flops"] == 3 * n


def test_an_input_quantizer_costs_a_pass_that_changes_the_width():
    fc = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(8, 64)
    recipe = {
        "name": "a8",
        "rules": [
            {
                "targets": ["linear"],
                "weights": {"type": "uniform", "num_bits": 4, "strategy": "channel"},
                "input_activations": {"type": "uniform", "num_bits": 8, "strategy": "token"},
            }
        ],
    }
    after = _row(stefx.profile(fc, (x,), recipe=recipe), "0").after
    n, tokens = 8 * 64, 8
    linear_reads = n * 1  # the linear reads 8-bit codes...
    linear_writes = 8 * 32 * 4  # ...and writes fp32
    quantize = n * 4 + n * 1 + 2 * tokens * 4  # reads fp32, writes codes and 8 fp32 scales
    assert after["act_bytes"] == linear_reads + linear_writes + quantize
    assert after["flops"] == 2 * 8 * 64 * 32 + 4 * n  # + scale, round, clamp, cast


def _op(kind, call, inputs, output):
    return OpNode(call, kind, f"aten.{call}.default", call=call, input_shapes=inputs,
                  output_shape=output, dtype="torch.float32")  # fmt: skip


def test_eval_dropout_is_free_and_copies_cost_their_bytes():
    c = cost_of(_op("elementwise", "dropout", ((4, 8),), (4, 8)))
    assert c.status == "ignored" and c.bytes_moved == 0 and c.kernels == 0
    c = cost_of(_op("view", "cat", ((4, 8), (4, 24)), (4, 32)))
    assert c.status == "counted" and c.act_in_bytes == 4 * 32 * 4 and c.act_out_bytes == 4 * 32 * 4
    c = cost_of(_op("view", "index_select", ((100, 8), (5,)), (5, 8)))
    assert c.act_in_bytes == 5 * 8 * 4 + 5 * 8 and c.act_out_bytes == 5 * 8 * 4
    reshape = _op("view", "reshape", ((4, 8),), (32,))
    assert cost_of(reshape).bytes_moved == 0 and cost_of(reshape).kernels == 0


class _CBR(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y) if self.functional else self.relu(y)


@pytest.mark.parametrize("functional", [False, True])
def test_a_pattern_output_quantizer_on_nn_relu_is_costed_like_f_relu(functional):
    recipe = {
        "name": "cbr",
        "rules": [
            {
                "pattern": ["conv", "batch_norm", "relu"],
                "weights": {"type": "uniform", "num_bits": 4, "strategy": "channel"},
                "output_activations": {"type": "uniform", "num_bits": 8},
            }
        ],
    }
    rep = stefx.profile(_CBR(functional).eval(), (torch.randn(1, 8, 16, 16),), recipe=recipe)
    relu = next(r for r in rep.rows if r.op == "elementwise")
    n = 8 * 16 * 16
    assert relu.after["act_bytes"] == n * 4 + n * 1  # reads fp32, writes its 8-bit output


def test_a_scale_free_binary_layer_stores_no_scale():
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 10))  # fmt: skip
    rep = stefx.profile(net, (torch.randn(2, 64),), recipe="bnn")
    # the hidden layers are sign(w) alone; bnn's last layer keeps a scale per channel
    binary = [r for r in rep.rows if r.bits_after.startswith("w1") and r.output_shape[-1] == 64]
    assert binary
    for row in binary:
        weights = 64 * row.output_shape[-1]
        bias = row.output_shape[-1]
        assert row.after["param_bytes"] == weights / 8 + bias * 4  # sign bits + float bias


def _mixtral(impl: str):
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    config._experts_implementation = impl
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "eager"])
def test_moe_totals_are_the_real_parameter_count(impl):
    model = _mixtral(impl)
    ids = torch.randint(0, 256, (2, 16))
    real = sum(p.numel() for p in model.parameters())
    rep = stefx.profile(model, (ids,), recipe="w4a16-g128")
    assert rep.totals["before"]["params"] == real
    experts = sum(
        p.numel() for n, p in model.named_parameters() if "experts" in n
    )  # fused [E, out, in] tensors
    saved = rep.totals["before"]["param_bytes"] - rep.totals["after"]["param_bytes"]
    # 4-bit experts save at least 7/8 of 32 bits per weight less their scales (one per 128)
    assert saved > experts * 4 * (7 / 8) - experts / 64 * 4.5
    row = _row(rep, "model.layers.0.mlp.experts")
    assert row.before["params"] == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0.mlp.experts")
    )
    assert math.isclose(row.after["param_bytes"] * 8 / row.before["params"], 4.5, rel_tol=0.2)


def test_the_accumulator_width_is_a_setting():
    net = nn.Sequential(nn.Linear(256, 256))
    x = torch.randn(64, 256)
    narrow = stefx.profile(net, (x,), recipe="w8a8")
    wide = stefx.profile(net, (x,), recipe="w8a8", acc_bits=32)
    # an int8 x int8 MAC accumulates in 16 bits by default; int32 adders cost more energy
    assert wide.totals["after"]["energy_j"] > narrow.totals["after"]["energy_j"]
    assert wide.totals["before"]["energy_j"] == narrow.totals["before"]["energy_j"]


def test_eager_fusion_charges_every_dispatch_views_included():
    model, ids = _gpt2()
    fused = stefx.profile(model, (ids,), "a100")
    eager = stefx.profile(model, (ids,), "a100", fusion="eager")
    unfused = stefx.profile(model, (ids,), "a100", fusion="none")
    floor = 5e-6  # a100.yaml's launch floor per kernel
    views = sum(row.status.get("ignored", 0) for row in eager.rows)
    extra = eager.totals["before"]["latency_s"] - unfused.totals["before"]["latency_s"]
    dispatches = extra / floor  # a whole number of floors: one per view or no-op
    assert dispatches == pytest.approx(round(dispatches), abs=1e-6) and dispatches >= views
    assert fused.totals["before"]["latency_s"] < unfused.totals["before"]["latency_s"]
    assert any("fusion='eager'" in n for n in eager.notes)
