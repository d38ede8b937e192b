"""Tests for stefx.capture over the model zoo: coverage of weights, names, shapes, no mutation."""

from __future__ import annotations

import resource
import sys
from typing import Any

import pytest
import torch
from torch import nn

from stefx.capture import Capture, capture, example_inputs_for
from stefx.capture.ops import ModelView, normalise_fqn
from stefx.errors import CaptureError
from stefx.match import module_op_kind
from tests.zoo import HF_ZOO, PLAIN_ZOO, build, hf_config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ALL = [*PLAIN_ZOO, *HF_ZOO]
_CAPTURES: dict[str, tuple[nn.Module, Any, Capture]] = {}


def _weight_kind(module: nn.Module) -> str | None:
    """The OpNode kind a weight-carrying module's op must have (None: not one)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D":
        return "addmm"
    return None


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "config": model.config.to_dict() if hasattr(model, "config") else None,
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _captured(name: str) -> tuple[nn.Module, Any, Capture]:
    """Capture each zoo model once, in train mode with one submodule in eval mode."""
    if name not in _CAPTURES:
        model, inputs = build(name)
        model.train()
        for child in list(model.children())[:1]:
            child.eval()  # mixed flags must come back exactly
        before = _snapshot(model)
        cap = capture(model, inputs)
        after = _snapshot(model)
        assert before["state"].keys() == after["state"].keys()
        for key, value in before["state"].items():
            assert torch.equal(value, after["state"][key]), key
        assert before["training"] == after["training"]
        assert before["config"] == after["config"]
        assert before["hooks"] == after["hooks"] == 0
        _CAPTURES[name] = (model, inputs, cap)
    return _CAPTURES[name]


def _ran_modules(model: nn.Module, inputs: Any) -> set[str]:
    """FQNs of modules called by one real forward pass."""
    ran: set[str] = set()
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=name: ran.add(n))
        for name, m in model.named_modules()
    ]
    inputs = example_inputs_for(model) if inputs is None else inputs
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return ran


@pytest.mark.parametrize("name", ALL)
def test_capture_names_every_op_after_the_model(name: str) -> None:
    model, _, cap = _captured(name)
    assert cap.method == ("symbolic_trace" if name in PLAIN_ZOO else "export")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    assert cap.ops, "no ops captured"
    for op in cap.ops:
        assert op.module in modules, (op.name, op.module)
        assert op.module_type == type(modules[op.module]).__name__
        assert all(
            fqn in modules and cls == type(modules[fqn]).__name__ for fqn, cls in op.module_stack
        )
        assert op.module_stack[-1][0] == op.module if op.module else not op.module_stack
        for fqn in op.params.values():
            assert fqn in params, (op.name, fqn)
            assert op.param_shapes[next(r for r, f in op.params.items() if f == fqn)] == tuple(
                params[fqn].shape
            )
    in_graph = [n.meta["stefx.op"] for n in cap.graph.nodes if "stefx.op" in n.meta]
    assert in_graph == [op for op in cap.ops if "inside_opaque" not in op.attrs]
    cap.graph.lint()


@pytest.mark.parametrize("name", [n for n in ALL if n != "functional"])  # raw parameters only
def test_every_weight_module_that_runs_has_its_op(name: str) -> None:
    model, inputs, cap = _captured(name)
    ran = _ran_modules(model, inputs)
    expected = {
        fqn: kind
        for fqn, m in model.named_modules()
        if fqn in ran and (kind := _weight_kind(m)) is not None
    }
    assert expected, "the zoo model has no weight-carrying module"
    found = {  # a Linear may compute x @ w.T (Falcon): a matmul reading its weight
        (op.module, kind)
        for op in cap.ops
        if op.params.get("weight") == f"{op.module}.weight"
        for kind in (op.kind, module_op_kind(op))
    }
    missing = {fqn: kind for fqn, kind in expected.items() if (fqn, kind) not in found}
    assert not missing


@pytest.mark.parametrize("name", ALL)
def test_shapes_are_propagated(name: str) -> None:
    _, _, cap = _captured(name)
    weighted = [
        op
        for op in cap.ops
        if op.kind in ("linear", "conv", "addmm", "embedding") and "inside_opaque" not in op.attrs
    ]
    assert weighted
    for op in weighted:
        assert op.output_shape is not None and op.dtype == "torch.float32", op.name
        assert op.input_shapes and all(s is not None for s in op.input_shapes[:1]), op.name


def test_linear_shapes_match_the_modules() -> None:
    _, _, cap = _captured("llama")
    q = next(op for op in cap.ops if op.module == "model.layers.0.self_attn.q_proj")
    assert (q.kind, q.output_shape, q.input_shapes[0]) == ("linear", (1, 8, 32), (1, 8, 32))
    assert q.params == {"weight": "model.layers.0.self_attn.q_proj.weight"}
    assert q.param_shapes == {"weight": (32, 32)}
    k = next(op for op in cap.ops if op.module == "model.layers.0.self_attn.k_proj")
    assert k.output_shape == (1, 8, 16)  # 2 KV heads of 8


def test_gpt2_conv1d_addmm_and_tied_lm_head() -> None:
    model, _, cap = _captured("gpt2")
    c_attn = [op for op in cap.ops if op.module == "transformer.h.0.attn.c_attn" and op.params]
    assert [(op.kind, op.module_type) for op in c_attn] == [("addmm", "Conv1D")]
    assert c_attn[0].params == {
        "weight": "transformer.h.0.attn.c_attn.weight",
        "bias": "transformer.h.0.attn.c_attn.bias",
    }
    assert c_attn[0].input_shapes == ((96,), (8, 32), (32, 96))
    # lm_head is tied to wte: each op names the alias its own module owns.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert cap.tied_params == {"lm_head.weight": "transformer.wte.weight"}
    head = [op for op in cap.ops if op.module == "lm_head"]
    wte = [op for op in cap.ops if op.module == "transformer.wte"]
    assert [op.params for op in head] == [{"weight": "lm_head.weight"}]
    assert [(op.kind, op.params) for op in wte] == [
        ("embedding", {"weight": "transformer.wte.weight"})
    ]


@pytest.mark.parametrize(
    "name, attention",
    [
        ("gpt2", "transformer.h.{}.attn"),
        ("llama", "model.layers.{}.self_attn"),
        ("bert", "bert.encoder.layer.{}.attention.self"),
        ("plain_vit", "blocks.{}.attn"),
    ],
)
def test_eager_attention_matmuls_are_inside_the_attention_module(name: str, attention: str) -> None:
    _, _, cap = _captured(name)
    for layer in range(2):
        fqn = attention.format(layer)
        mms = [op for op in cap.ops if op.kind == "matmul" and op.module == fqn]
        assert len(mms) == 2, [(op.name, op.module) for op in cap.ops if op.kind == "matmul"]
        qk, pv = mms
        heads, t = qk.output_shape[1], qk.output_shape[-1]
        assert qk.output_shape[-2:] == (t, t) and heads == 4
        assert pv.input_shapes[0] == qk.output_shape  # softmax(QK^T) feeds PV
        assert pv.output_shape[-2] == t and pv.output_shape[-1] == 8
        assert not qk.params and not pv.params  # activations only


@pytest.mark.parametrize("name", ["qwen3", "roberta", "functional"])
def test_sdpa_attention_and_its_attrs(name: str) -> None:
    _, _, cap = _captured(name)
    sdpa = [op for op in cap.ops if op.kind == "sdpa"]
    assert sdpa and all(op.module_type.endswith(("Attention", "Functional")) for op in sdpa)
    assert set(sdpa[0].attrs) >= {"is_causal", "scale", "enable_gqa", "has_mask"}
    if name == "functional":
        assert sdpa[0].attrs["is_causal"] is True and sdpa[0].attrs["has_mask"] is False


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_expert_tensors_show_up_as_experts_ops(name: str) -> None:
    model, _, cap = _captured(name)
    fused = {f: p for f, p in model.named_parameters() if p.dim() == 3}
    assert len(fused) == 4  # gate_up_proj and down_proj in each of 2 layers
    experts = {op.params["weight"]: op for op in cap.ops if op.kind == "experts"}
    assert set(experts) == set(fused)
    for fqn, op in experts.items():
        assert op.attrs["num_experts"] == fused[fqn].shape[0] == 4
        assert op.module == fqn.rpartition(".")[0] and op.module_type.endswith("Experts")


def test_moe_batched_mm_experts_read_gathered_expert_weights() -> None:
    config = hf_config("qwen2_moe")
    config.num_hidden_layers = 1
    model = transformers.AutoModelForCausalLM.from_config(
        config, experts_implementation="batched_mm"
    )
    experts = [op for op in capture(model).ops if op.kind == "experts"]
    assert [(op.target, op.params["weight"].rsplit(".", 1)[1]) for op in experts] == [
        ("aten.bmm.default", "gate_up_proj"),
        ("aten.bmm.default", "down_proj"),
    ]
    assert experts[0].input_shapes[0] == (16, 64, 32)  # 8 tokens x top-2 gathered weights


def test_moe_that_does_not_export_whole_falls_back_to_regions() -> None:
    config = hf_config("mixtral")
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    cap = capture(model)
    assert cap.method == "export" and cap.leaves == ["model.layers.0.mlp.experts"]
    assert "lm_head" in cap.regions and "model.layers.0.self_attn" in cap.regions
    assert any("torch.export of the whole model failed" in note for note in cap.notes)
    opaque = [op for op in cap.ops if op.kind == "opaque"]
    assert [op.module for op in opaque] == ["model.layers.0.mlp.experts"]
    assert opaque[0].output_shape == (8, 32)
    inner = [op for op in cap.ops if op.attrs.get("inside_opaque") == "model.layers.0.mlp.experts"]
    assert sorted(op.params["weight"].rsplit(".", 1)[1] for op in inner) == [
        "down_proj",
        "gate_up_proj",
    ]
    assert all(op.kind == "experts" for op in inner)
    linears = {f for f, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= {op.module for op in cap.ops if op.kind == "linear"}
    cap.graph.lint()


def test_untraceable_submodule_becomes_an_opaque_leaf_with_its_linears_listed() -> None:
    _, inputs, cap = _captured("data_dependent")
    assert cap.leaves == ["block"]
    assert [op.kind for op in cap.ops if op.module == "block"] == ["opaque"]
    inner = {op.module: op for op in cap.ops if op.attrs.get("inside_opaque") == "block"}
    assert set(inner) == {"block.pos", "block.neg"}
    assert all(
        op.kind == "linear" and op.params["weight"] == f"{m}.weight" for m, op in inner.items()
    )
    model = _CAPTURES["data_dependent"][0]
    (branch,) = {"block.pos", "block.neg"} & _ran_modules(model, inputs)
    assert inner[branch].output_shape == (3, 16)  # shapes seen by the real fallback pass
    assert [
        op.module for op in cap.ops if op.kind == "linear" and "inside_opaque" not in op.attrs
    ] == ["inp", "out"]


def test_export_regions_keep_a_data_dependent_block_whole() -> None:
    model, inputs = build("data_dependent")
    cap = capture(model, inputs, method="export")
    assert cap.leaves == ["block"] and cap.regions == ["inp", "out"]
    inner = {op.module for op in cap.ops if op.attrs.get("inside_opaque") == "block"}
    assert inner == {"block.pos", "block.neg"}  # the branch that did not run is listed too
    assert [op.kind for op in cap.ops if op.module == "block"] == ["opaque"]


def test_conv_attrs() -> None:
    _, _, cap = _captured("grouped_conv")
    by_module = {op.module: op for op in cap.ops if op.kind == "conv"}
    assert by_module["depthwise"].attrs["groups"] == 8
    grouped = by_module["grouped"].attrs
    assert (grouped["groups"], grouped["stride"], grouped["transposed"]) == (2, (2, 2), False)
    assert by_module["conv3d"].output_shape == (1, 2, 4, 4, 4)
    _, _, cap = _captured("conv_transpose")
    up = next(op for op in cap.ops if op.module == "up1d")
    assert (up.kind, up.attrs["transposed"], up.attrs["groups"]) == ("conv_transpose", True, 2)


def test_export_of_a_plain_model_gives_the_same_conv_attrs() -> None:
    model, inputs = build("grouped_conv")
    traced = {op.module: op for op in capture(model, inputs).ops if op.kind == "conv"}
    exported = {
        op.module: op for op in capture(model, inputs, method="export").ops if op.kind == "conv"
    }
    assert set(traced) == set(exported)
    for fqn, op in traced.items():
        other = exported[fqn]
        assert other.target.startswith("aten.") and other.params == op.params
        assert other.output_shape == op.output_shape
        assert {k: other.attrs[k] for k in ("groups", "stride", "padding", "dilation")} == {
            k: op.attrs[k] for k in ("groups", "stride", "padding", "dilation")
        }


def test_functional_ops_read_their_parameters() -> None:
    _, _, cap = _captured("functional")
    by_kind = {op.kind: op for op in cap.ops if op.params}
    assert by_kind["embedding"].params == {"weight": "table"}
    assert by_kind["linear"].params == {"weight": "w", "bias": "b"}
    assert by_kind["einsum"].params == {"weight": "mix"}
    assert by_kind["einsum"].attrs == {"equation": "btd,de->bte"}
    assert by_kind["addmm"].params == {"bias": "b", "weight": "w"}
    bmm = next(op for op in cap.ops if op.kind == "bmm")
    assert bmm.input_shapes == ((2, 6, 16), (2, 16, 6)) and not bmm.params


@pytest.mark.parametrize("name, kind", [("lstm", "lstm"), ("gru", "gru")])
def test_recurrent_leaves(name: str, kind: str) -> None:
    _, _, cap = _captured(name)
    rnn = [op for op in cap.ops if op.kind == kind]
    assert [op.module for op in rnn] == ["rnn"]
    assert {"weight_ih_l0", "weight_hh_l1"} <= set(rnn[0].params)
    assert rnn[0].output_shape == (2, 7, 24)


def test_without_inputs_a_plain_model_is_traced_without_shapes() -> None:
    model, _ = build("mlp")
    cap = capture(model)
    assert [op.kind for op in cap.ops] == ["linear", "elementwise", "norm", "linear"]
    assert all(op.output_shape is None for op in cap.ops)
    assert cap.ops[0].param_shapes == {"weight": (32, 16), "bias": (32,)}


def test_meta_llama_captures_like_a_real_one() -> None:
    config = hf_config("llama")
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    cap = capture(meta)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(b.device.type == "meta" for b in meta.buffers())
    _, _, real = _captured("llama")

    def view(c: Capture) -> list[tuple]:
        return [(o.kind, o.module, o.params, o.input_shapes, o.output_shape) for o in c.ops]

    assert view(cap) == view(real)


def test_meta_capture_allocates_no_weights() -> None:
    """A 1.2 GB meta Llama must capture without the process growing by its size."""
    config = hf_config("llama")
    config.update(
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=4,
            vocab_size=32000,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=128,
        )
    )
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    size = sum(p.numel() * p.element_size() for p in meta.parameters())
    assert size > 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cap = capture(meta)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    assert grown < 0.25 * size, f"peak RSS grew by {grown / 1e6:.0f} MB"
    assert len([op for op in cap.ops if op.kind == "linear"]) == 4 * 7 + 1


def test_meta_plain_model_propagates_shapes() -> None:
    with torch.device("meta"):
        model, inputs = build("residual_cnn")
    cap = capture(model, inputs)
    assert cap.ops[-1].output_shape == (2, 10)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_example_inputs_from_configs() -> None:
    model, _ = build("whisper")
    inputs = example_inputs_for(model)
    assert inputs["input_features"].shape == (1, 16, 32)
    assert inputs["decoder_input_ids"].shape == (1, 8)
    model, _ = build("vit")
    assert example_inputs_for(model)["pixel_values"].shape == (1, 3, 16, 16)
    model, _ = build("llama")
    ids = example_inputs_for(model)["input_ids"]
    assert ids.shape == (1, 8) and int(ids.max()) < 128
    with pytest.raises(CaptureError, match="example_inputs"):
        example_inputs_for(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "name, inputs, match",
    [
        ("mlp", {"y": torch.randn(4, 16)}, "'y'.*arguments are: x"),
        ("mlp", (torch.randn(4, 15),), "failed on example_inputs at node"),
        ("mlp", "not inputs", "tuple of positional"),
        ("llama", {"input_idz": torch.zeros(1, 8, dtype=torch.long)}, "did you mean 'input_ids'"),
        ("vit", {"pixel_values": torch.randn(1, 5, 16, 16)}, "ViTForImageClassification"),
    ],
)
def test_bad_example_inputs_raise_capture_error(name: str, inputs: Any, match: str) -> None:
    model, _ = build(name)
    with pytest.raises(CaptureError, match=match):
        capture(model, inputs)


def test_bad_arguments_raise_capture_error() -> None:
    model, inputs = build("mlp")
    with pytest.raises(CaptureError, match="did you mean 'export'"):
        capture(model, inputs, method="exprot")
    with pytest.raises(CaptureError, match=r"nn\.Module"):
        capture(lambda x: x)  # type: ignore[arg-type]
    llama, _ = build("llama")
    with pytest.raises(CaptureError, match=r"LlamaForCausalLM.*method='export'"):
        capture(llama, method="symbolic_trace")


class _UntraceableRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_untraceable_root_needs_inputs_then_exports_by_regions() -> None:
    model = _UntraceableRoot()
    with pytest.raises(CaptureError, match="pass example_inputs"):
        capture(model)
    cap = capture(model, (torch.ones(2, 4),))
    assert cap.method == "export" and cap.regions == ["fc"]
    assert [(op.kind, op.module) for op in cap.ops if op.params] == [("linear", "fc")]


def test_normalise_fqn_formats() -> None:
    view = ModelView({"": nn.Module(), "model": nn.Module(), "model.layers.0": nn.Module()})
    for raw in (
        "model.layers.0",
        "L['self'].model.layers[0]",
        "L['self']._modules['model']._modules['layers']['0']",
        "model.layers.0@1",
    ):
        assert normalise_fqn(raw, view) == "model.layers.0", raw
    assert normalise_fqn("L['self']", view) == ""
    assert normalise_fqn("model.missing", view) is None


def test_plain_capture_does_not_import_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes any `import transformers` raise ImportError.
    monkeypatch.setitem(sys.modules, "transformers", None)
    model, inputs = build("mlp")
    assert capture(model, inputs).ops[0].kind == "linear"
    with pytest.raises(ImportError):
        import transformers as _  # noqa: F401  (proves the block is in place)
