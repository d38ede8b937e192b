"""stefx.profile.profile: hand-worked numbers, torch's FLOP counter, meta vs real, plans."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stefx
from stefx.errors import StefxError
from stefx.profile import profile
from tests.flop_reference import macs_by_kind, torch_macs
from tests.zoo import HF_ZOO, PLAIN_ZOO, build

# -- hand-worked: MLP fc1 Linear(16, 32), fc2 Linear(32, 4), input [4, 16] ---------------


def test_mlp_hand_worked_before_and_after_w4a8():
    model, inputs = build("mlp")
    rep = profile(model, inputs, recipe="w4a8")
    rows = {r.name: r for r in rep.rows}
    fc1, fc2 = rows["fc1"], rows["fc2"]
    assert fc1.before["macs"] == 4 * 16 * 32 == 2048
    assert fc2.before["macs"] == 4 * 32 * 4 == 512
    assert fc1.before["flops"] == 2 * 2048
    assert fc1.before["bops"] == 2048 * 32 * 32
    assert fc1.after["bops"] == 2048 * 4 * 8
    assert fc2.after["bops"] == 512 * 4 * 8
    # before: every parameter at 32 bits
    assert fc1.before["param_bytes"] == (512 + 32) * 4
    # after: weight at 4 bits, bias kept at 32, one fp32 scale per output channel (32)
    assert fc1.after["param_bytes"] == 512 * 4 / 8 + 32 * 4 + 32 * 4
    assert fc2.after["param_bytes"] == 128 * 4 / 8 + 4 * 4 + 4 * 4
    assert (fc1.bits_before, fc1.bits_after) == ("w32a32", "w4a8")
    # the LayerNorm is in no site: it stays float
    assert rows["norm"].after == rows["norm"].before
    t = rep.totals
    assert t["before"]["macs"] == t["after"]["macs"] == 2560
    assert t["after"]["bops"] == 2560 * 32
    assert t["before"]["params"] == 740


def test_every_op_counted_ignored_or_unsupported():
    model, inputs = build("data_dependent")
    rep = profile(model, inputs)
    counts = rep.counts
    assert sum(counts.values()) == len(rep.ops)
    assert counts["unsupported"] == sum(rep.unsupported.values()) > 0
    assert any(k.startswith("opaque") for k in rep.unsupported)
    assert "opaque" in str(rep).split("unsupported ops")[-1]


def test_graph_nodes_annotated_before_and_after():
    model, inputs = build("mlp")
    cap = stefx.capture(model, inputs)
    profile(model, inputs, recipe="w4a8", capture=cap)
    node = next(n for n in cap.graph.nodes if n.meta.get("stefx.op") and n.target == "fc1")
    cost = node.meta["stefx.cost"]
    assert cost["before"].macs == 2048 and cost["after"].bops == 2048 * 32


# -- torch.utils.flop_counter agrees on matmul-family MACs -------------------------------


FAST = [
    "mlp",
    "residual_cnn",
    "grouped_conv",
    "conv_transpose",
    "functional",
    "plain_vit",
    "lstm",
    "unet",
]
SLOW = ["llama", "gpt2", "bert"]


@pytest.mark.parametrize("name", FAST)
def test_macs_equal_flop_counter_plain(name):
    model, inputs = PLAIN_ZOO[name]()
    rep = profile(model, inputs)
    assert sum(macs_by_kind(rep).values()) == torch_macs(model, inputs)[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_macs_equal_flop_counter_hf(name):
    model, inputs = HF_ZOO[name]()
    rep = profile(model, inputs)
    assert sum(macs_by_kind(rep).values()) == torch_macs(model, inputs)[0] > 0


@pytest.mark.slow
def test_documented_difference_sdpa_on_cpu():
    """torch's counter has no SDPA formula for CPU kernels; stefx counts it on every device
    (docs: costs.py). The difference is exactly stefx's SDPA MACs."""
    model, inputs = HF_ZOO["qwen3"]()
    rep = profile(model, inputs)
    by_kind = macs_by_kind(rep)
    assert by_kind["sdpa"] > 0
    assert sum(by_kind.values()) - by_kind["sdpa"] == torch_macs(model, inputs)[0]


# -- meta vs real tensors ----------------------------------------------------------------


def _on_meta(model: nn.Module, inputs):
    meta = copy.deepcopy(model).to("meta")
    if isinstance(inputs, tuple):
        inputs = tuple(x.to("meta") if torch.is_tensor(x) else x for x in inputs)
    return meta, inputs


@pytest.mark.parametrize("name", ["mlp", "residual_cnn", "plain_vit"])
def test_meta_equals_real_counts(name):
    model, inputs = build(name)
    real = profile(model, inputs, recipe="w4a8").to_dict()
    meta = profile(*_on_meta(model, inputs), recipe="w4a8").to_dict()
    assert meta == real


@pytest.mark.slow
def test_meta_equals_real_counts_hf():
    model, inputs = build("llama")
    real = profile(model, inputs, recipe="w4a8").to_dict()
    meta = profile(copy.deepcopy(model).to("meta"), inputs, recipe="w4a8").to_dict()
    assert meta == real


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field))
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_meta_llama_profiles_without_allocating():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128256,  # 2 x 128256 x 256 fp32 = 263 MB if it were allocated
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    can_measure = _rss_peak_reset()
    before = _vm("VmRSS:")
    rep = profile(model, recipe="w4a8")
    expected = sum(p.numel() for p in model.parameters())
    assert rep.totals["before"]["params"] == expected
    assert all(p.is_meta for p in model.parameters())
    if can_measure:
        assert _vm("VmHWM:") - before < 150 * 2**20
    with pytest.raises(StefxError, match="meta device"):
        profile(model, measure=True)


# -- plans -------------------------------------------------------------------------------


def test_quantized_model_picks_up_its_plan():
    model, inputs = build("mlp")
    expected = profile(model, inputs, recipe="w4a8").to_dict()
    stefx.quantize(model, "w4a8", inputs, report=False)
    got = profile(model, inputs)
    assert got.recipe == "w4a8"
    assert got.to_dict() == expected  # quantizer scales are not counted as weights
    assert got.totals["after"]["bops"] < got.totals["before"]["bops"]


@pytest.mark.slow
def test_quantized_hf_model_picks_up_its_plan():
    model, _ = build("llama")
    expected = profile(model, recipe="w4a8").to_dict()
    stefx.quantize(model, "w4a8", report=False)
    assert profile(model).to_dict() == expected


def test_no_plan_after_equals_before_and_profile_does_not_mutate():
    model, inputs = build("mlp")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rep = profile(model, inputs, recipe="w4a8")
    assert not hasattr(model, "_stefx_plan")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    rep = profile(model, inputs)
    assert rep.totals["before"] == rep.totals["after"]


def test_op_sites_get_activation_bits():
    model, inputs = build("plain_vit")
    recipe = {
        "name": "attn8",
        "rules": [{"targets": ["matmul"], "input_activations": {"type": "uniform", "num_bits": 8}}],
    }
    rep = profile(model, inputs, recipe=recipe)
    row = next(r for r in rep.rows if r.name == "blocks.0.attn.matmul_0")
    assert row.after["bops"] == row.before["macs"] * 8 * 8
    assert row.bits_after == "w8a8"


def test_tied_weights_counted_once():
    model, _ = build("gpt2")
    rep = profile(model)
    wte = model.transformer.wte.weight.numel()
    rows = {r.name: r for r in rep.rows}
    assert rows["lm_head"].before["params"] == wte  # the row shows what lm_head reads
    assert rep.totals["before"]["params"] == sum(p.numel() for p in model.parameters())


def test_measure_times_real_model():
    model, inputs = build("mlp")
    rep = profile(model, inputs, measure=True)
    m = rep.measured
    assert m["latency_s"] > 0 and m["samples_per_s"] == pytest.approx(4 / m["latency_s"])
    assert set(m["layers"]) >= {"fc1", "fc2"}
    assert "measured" in str(rep) and "estimate" in str(rep)
    assert rep.to_dict()["totals"]["before"]["measured_latency_s"] == m["latency_s"]


def test_torch_transformer_encoder_is_counted_inside_its_opaque_container():
    """nn.TransformerEncoder cannot be traced (control flow), so it stays opaque, but the
    modules inside it are costed from the shapes they ran with: the total equals torch's
    counter (on meta, where it counts the attention kernel too)."""
    model, inputs = PLAIN_ZOO["torch_transformer"]()
    rep = profile(model, inputs)
    by_kind = macs_by_kind(rep)
    batch, seq, embed, ffn, layers = 2, 6, 16, 32, 2
    tokens = batch * seq
    attention = layers * (tokens * 3 * embed * embed + tokens * seq * embed * 2 + tokens * embed**2)
    assert by_kind["attention"] == attention  # closed form: in_proj, QK^T + PV, out_proj
    assert by_kind["linear"] == layers * 2 * tokens * embed * ffn + tokens * embed * 5
    assert sum(by_kind.values()) == torch_macs(model, inputs)[0]
