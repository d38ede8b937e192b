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
        ("FLOPs / MACs", "no"),
        ("latency", "yes"),
        ("energy", "yes"),
        ("throughput", "yes"),
    ):
        line = next(x for x in five.splitlines() if x.startswith(metric))
        assert f" {dependent} " in line
    assert "estimate" in five


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
