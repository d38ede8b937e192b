"""stefx.profile.report: the Report object, its renderers and the printed table's snapshot.

Regenerate the snapshot after an intended change with ``STEFX_UPDATE_SNAPSHOTS=1 pytest
tests/test_report.py`` and review the diff.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import stefx
from stefx.errors import StefxError
from stefx.profile import profile
from stefx.profile.report import METRICS, block_of
from tests.zoo import build

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture(scope="module")
def mlp_report():
    model, inputs = build("mlp")
    return profile(model, inputs, recipe="w4a8")


@pytest.fixture(scope="module")
def llama_report():
    model, _ = build("llama")
    return profile(model, recipe="w4a8")


def test_to_dict_shape_and_keys(mlp_report):
    d = mlp_report.to_dict()
    assert set(d) == {"totals", "layers"}
    assert set(d["totals"]) == {"before", "after"}
    required = {
        "params",
        "param_bytes",
        "flops",
        "macs",
        "bops",
        "act_bytes",
        "latency_s",
        "energy_j",
    }
    for which in ("before", "after"):
        assert required <= set(d["totals"][which])
    assert [layer["name"] for layer in d["layers"]] == ["fc1", "act", "norm", "fc2"]
    for layer in d["layers"]:
        assert {"name", "op", "before", "after"} <= set(layer)
        assert required <= set(layer["before"]) and required <= set(layer["after"])
    assert d["layers"][0]["op"] == "linear"


def test_layer_names_are_module_fqns(llama_report):
    names = [r.name for r in llama_report.rows]
    assert "model.layers.0.self_attn.q_proj" in names
    assert "model.layers.0.self_attn.matmul_0" in names  # QK^T, the op-site name
    assert "model.layers.1.self_attn.matmul_1" in names  # PV
    assert "lm_head" in names


def test_json_round_trip(mlp_report):
    assert json.loads(mlp_report.to_json()) == mlp_report.to_dict()


def test_csv_round_trip(mlp_report):
    rows = list(csv.DictReader(io.StringIO(mlp_report.to_csv())))
    layers = mlp_report.to_dict()["layers"]
    assert [r["name"] for r in rows] == [layer["name"] for layer in layers]
    for row, layer in zip(rows, layers, strict=True):
        for which in ("before", "after"):
            for key in METRICS:
                assert float(row[f"{which}_{key}"]) == layer[which][key]


def test_markdown_round_trip(mlp_report):
    md = mlp_report.to_markdown()
    table = [
        line
        for line in md.splitlines()
        if line.startswith("| fc") or line.startswith("| act") or line.startswith("| norm")
    ]
    parsed = {}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        parsed[cells[0]] = cells
    layers = {layer["name"]: layer for layer in mlp_report.to_dict()["layers"]}
    assert set(parsed) == set(layers)
    keys = ("params", "param_bytes", "macs", "bops", "latency_s", "energy_j")
    for name, cells in parsed.items():
        values = [float(c) for c in cells[2:]]
        expected = [layers[name][w][k] for w in ("before", "after") for k in keys]
        assert values == expected
    assert "### not covered" in md and "### unsupported ops" in md


def test_printed_table_snapshot(mlp_report):
    text = str(mlp_report) + "\n"
    path = SNAPSHOTS / "mlp_w4a8_report.txt"
    if os.environ.get("STEFX_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), (
        "report table changed; if intended, rerun with STEFX_UPDATE_SNAPSHOTS=1 and review"
    )


def test_printed_sections(mlp_report):
    text = str(mlp_report)
    assert "FLOPs = 2 x MACs" in text and "BOPs = MACs x b_w x b_a" in text
    assert "BOPs/64" in text
    five = text.split("five classic metrics")[1].split("not covered")[0]
    for metric, dependent in (
        ("parameter size", "no"),
        ("FLOPs / MACs / BOPs", "no"),
        ("latency", "yes"),
        ("energy", "no (one table for every device)"),  # Horowitz 45 nm, the default
        ("throughput", "yes"),
    ):
        line = next(x for x in five.splitlines() if x.startswith(metric))
        assert f" {dependent} " in line
    assert "estimate" in five
    # every metric before -> after, BOPs included (2.62M -> 81.9k for w4a8)
    from stefx.profile.render import _si

    b, a = mlp_report.totals["before"], mlp_report.totals["after"]
    flops = next(x for x in five.splitlines() if x.startswith("FLOPs / MACs / BOPs"))
    cell = " / ".join(_si(b[k]) for k in ("flops", "macs", "bops")) + " -> "
    cell += " / ".join(_si(a[k]) for k in ("flops", "macs", "bops"))
    assert cell in flops and "2.62M -> " in flops and "/ 81.9k" in flops
    # the layer table says its latency / energy columns are after quantization
    assert "latency after (est.)" in text and "energy after (est.)" in text


def _header_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("STEFX_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), (
        f"{name} changed; if intended, rerun with STEFX_UPDATE_SNAPSHOTS=1 and review"
    )


def test_header_snapshot_names_latency_model_energy_table_causal_and_notes():
    model, inputs = build("functional")  # SDPA with is_causal=True: the causal label
    rep = profile(model, inputs, recipe="w4a8", hardware="h100")
    header = str(rep).split("\n\n")[0] + "\n"
    _header_snapshot("functional_w4a8_h100_header.txt", header)
    assert "latency: roofline on h100 at achievable rates" in header
    assert "x 0.801" in header and "5us launch floor per kernel" in header
    assert "energy: horowitz45nm (default: Horowitz 45 nm" in header
    assert "attention: causal mask not exploited" in header
    assert all(f"note: {n}" in header for n in rep.notes)
    halved = profile(model, inputs, recipe="w4a8", causal_halving=True)
    halved = str(halved).split("\n\n")[0]
    assert "attention: causal: only unmasked score entries counted" in halved


def test_top_k_ranks_by_latency_or_a_chosen_key(llama_report):
    rows = llama_report.rows
    slowest = max(rows, key=lambda r: r.after["latency_s"])
    text = llama_report.table(top_k=3)
    assert "top_k=3 by latency_s after quantization" in text
    table = text.split("\n\n")[1]
    assert f"\n{slowest.name} " in table
    by_flops = llama_report.table(top_k=1, sort_by="flops").split("\n\n")[1]
    biggest = max(rows, key=lambda r: r.after["flops"])
    assert f"\n{biggest.name} " in by_flops
    with pytest.raises(StefxError, match="sort_by"):
        llama_report.table(top_k=3, sort_by="speed")


def test_not_covered_lists_ignored_lm_head_with_bytes(llama_report):
    entries = {n["param"]: n for n in llama_report.not_covered}
    assert entries["lm_head.weight"]["bytes"] == 128 * 32 * 4
    assert entries["lm_head.weight"]["shape"] == (128, 32)
    assert "model.layers.0.self_attn.q_proj.weight" not in entries  # quantized
    section = str(llama_report).split("not covered")[1]
    assert "lm_head.weight" in section and "16 KiB" in section


def test_not_covered_lists_a_tied_weight_once_with_its_aliases():
    model, _ = build("gpt2")  # wte.weight is lm_head.weight
    rep = profile(model, recipe="w4a8")  # the preset keeps embeddings and lm_head float
    tied = [n for n in rep.not_covered if "lm_head.weight" in (n["param"], *n["aliases"])]
    assert len(tied) == 1
    assert {tied[0]["param"], *tied[0]["aliases"]} == {"transformer.wte.weight", "lm_head.weight"}
    assert not tied[0]["partly_quantized"]
    assert "transformer.wte.weight (= lm_head.weight)" in str(rep)
    head = {"name": "h", "rules": [{"targets": ["lm_head"], "weights": {"type": "uniform"}}]}
    rep = profile(model, recipe=head)  # quantized where lm_head reads it, float in wte
    tied = [n for n in rep.not_covered if n["param"] == "transformer.wte.weight"]
    assert len(tied) == 1 and tied[0]["partly_quantized"]
    assert "lm_head.weight" in tied[0]["aliases"]
    assert all(n["param"] != "lm_head.weight" for n in rep.not_covered)


def test_not_covered_lists_fused_moe_experts():
    model, _ = build("mixtral")
    linear_only = {"rules": [{"targets": ["linear"], "weights": {"type": "lsq", "num_bits": 4}}]}
    rep = profile(model, recipe=linear_only)  # the fused 3D experts stay float
    experts = [n for n in rep.not_covered if n["op"] == "experts"]
    assert experts and all(len(n["shape"]) == 3 for n in experts)
    rep = profile(model, recipe="w4a8")  # the presets quantize them
    assert not [n for n in rep.not_covered if n["op"] == "experts"]


def test_compression_ratios(mlp_report):
    t, r = mlp_report.totals, mlp_report.ratios
    assert r["size"] == t["before"]["param_bytes"] / t["after"]["param_bytes"] == 2960 / 864
    assert r["bops"] == pytest.approx(32 * 32 / (4 * 8))
    assert r["energy"] == t["before"]["energy_j"] / t["after"]["energy_j"] > 1
    assert f"{r['size']:.2f}x" in str(mlp_report)


def test_group_by_block_op_and_top_k(llama_report):
    blocks = [r.name for r in llama_report.grouped("block")]
    assert "model.layers.0" in blocks and "model.layers.1" in blocks
    by_op = {r.name: r for r in llama_report.grouped("op")}
    assert (
        by_op["linear"].before["macs"] + by_op["matmul"].before["macs"]
        == (llama_report.totals["before"]["macs"])
    )
    text = llama_report.table(top_k=3)
    assert "more rows (top_k=3" in text
    assert block_of("model.layers.12.mlp.up_proj") == "model.layers.12"
    with pytest.raises(StefxError, match="group_by"):
        llama_report.grouped("module")


def test_plot_without_matplotlib_says_how_to_get_it(mlp_report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(StefxError, match="pip install matplotlib"):
        mlp_report.plot(tmp_path / "p.png")


def test_plot_writes_a_png(mlp_report, tmp_path):
    import matplotlib  # noqa: F401  (the dev extra installs it)

    path = mlp_report.plot(tmp_path / "p.png")
    data = Path(path).read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 5000


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.rare, self.out = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 1e9:  # never taken on the example inputs
            y = self.rare(y)[:, :4]
        return self.out(y)


def test_modules_that_did_not_run_are_still_targeted_or_listed():
    x = torch.randn(2, 4)
    named = {"name": "n", "rules": [{"targets": ["fc", "out"], "weights": {"type": "uniform"}}]}
    rep = profile(_Branch(), (x,), recipe=named)
    entries = {n["param"]: n for n in rep.not_covered}
    assert entries["rare.weight"]["op"] == "did not run"
    assert entries["rare.weight"]["bytes"] == 6 * 4 * 4
    assert "fc.weight" not in entries and "out.weight" not in entries
    assert "rare.weight" in str(rep).split("not covered")[1]
    # a rule for every Linear reaches it too: the branch is quantized when it is taken
    model = _Branch()
    plan = stefx.explain(model, "w4a8", (x,))
    rare = next(s for s in plan.sites if s.name == "rare")
    assert not rare.ran and rare.params == ("weight",) and "did not run" in str(plan)
    stefx.quantize(model, "w4a8", (x,), report=False)
    assert model.rare.weight_quantizer is not None
    assert "rare.weight" not in {n["param"] for n in profile(model, (x,)).not_covered}
    last = {
        "name": "l",
        "rules": [{"targets": ["linear"], "position": "last", "weights": {"type": "uniform"}}],
    }
    assert [s.name for s in stefx.explain(_Branch(), last, (x,)).sites] == ["out"]  # ran last


# -- measure=True ----------------------------------------------------------------------


def test_measure_float_model_with_a_recipe_has_no_after():
    """A float model plus a recipe: "before" is the float model; there is no quantized
    model to time, so "after" is None with the reason, never the float timing."""
    model, inputs = build("mlp")
    d = profile(model, inputs, recipe="w4a8", measure=True).to_dict()
    before, after = d["totals"]["before"], d["totals"]["after"]
    assert before["measured_latency_s"] > 0 and before["measured_kind"] == "float model"
    assert after["measured_latency_s"] is None and after["measured_samples_per_s"] is None
    assert after["measured_kind"].startswith("not measured")
    assert d["measured"]["per_layer"].startswith("exclusive")
    layers = {layer["name"]: layer for layer in d["layers"]}
    assert layers["fc1"]["before"]["measured_exclusive_s"] > 0
    assert "measured_exclusive_s" not in layers["fc1"]["after"]


def test_measure_quantized_model_times_float_before_and_fake_quant_after():
    model, inputs = build("mlp")
    stefx.quantize(model, "w4a8", inputs, report=False)
    rep = profile(model, inputs, measure=True)
    m, d = rep.measured, rep.to_dict()
    assert m["after_kind"] == "fake-quant (simulation) step, not deployment"
    assert d["totals"]["after"]["measured_kind"] == m["after_kind"]
    assert d["totals"]["after"]["measured_latency_s"] == m["after"]["latency_s"] > 0
    assert d["totals"]["before"]["measured_latency_s"] == m["before"]["latency_s"] > 0
    assert model.fc1.weight_quantizer is not None  # timing the float copy left it quantized
    text = str(rep)
    assert "after: fake-quant (simulation) step, not deployment" in text


def test_measure_converted_model_is_labelled_converted():
    from stefx.profile.measure import AFTER_CONVERTED, measure_model

    model, inputs = build("mlp")
    stefx.quantize(model, "w4a16-g128", inputs, report=False)
    stefx.convert(model.eval())
    m = measure_model(model, inputs, [])
    assert m["after_kind"] == AFTER_CONVERTED
    assert m["before"]["latency_s"] > 0 and m["after"]["latency_s"] > 0


class _Sleepy(nn.Module):
    def __init__(self, seconds: float, child: nn.Module | None = None) -> None:
        super().__init__()
        self.seconds, self.child = seconds, child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.seconds)
        return self.child(x) if self.child is not None else x


def test_measured_layer_times_exclude_children():
    """inner sleeps 10 ms inside outer, which sleeps 20 ms of its own: outer's measured
    time is its own 20 ms (as its estimated row holds only its own ops), not 30 ms."""
    from stefx.profile.measure import _exclusive, measure_model

    model = nn.Sequential(_Sleepy(0.02, _Sleepy(0.01)))
    layers = measure_model(model, (torch.randn(1),), [])["before"]["layers"]
    assert layers["0"] == pytest.approx(0.02, abs=0.008)
    assert layers["0.child"] == pytest.approx(0.01, abs=0.008)
    assert layers[""] < 0.005  # the Sequential itself does nothing
    # a container that never runs (ModuleList "c") passes its items up to the next timed one
    assert _exclusive({"": 5.0, "a": 3.0, "a.b": 1.0, "c.0": 1.0}) == {
        "": 1.0,
        "a": 2.0,
        "a.b": 1.0,
        "c.0": 1.0,
    }
