"""stefx.save / stefx.load: one safetensors file, the recipe and every quantizer state,
bit-identical outputs, and a clear StefxError for each way a file or model can be wrong."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

import stefx
from stefx.errors import StefxError
from stefx.rewrite import quantized_modules
from tests.zoo import build, hf_config

transformers = pytest.importorskip("transformers")


def _ids(vocab=128, batch=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def _train(model, steps=3, **inputs):
    """A few steps so learned scales move away from their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for i in range(steps):
        out = model(input_ids=_ids(seed=i), **inputs)
        out.logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def _learned(model):
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "quantizer" in k and v.is_floating_point() and v.numel()
    }


@pytest.mark.parametrize(
    ("name", "preset"),
    [
        ("llama", "w4a8"),
        ("gpt2", "w4a8"),
        ("qwen2_moe", "w4a8"),
        ("qwen3", "w4a8"),
        ("mistral", "pact-w4a4"),
        ("llama", "paretoq-2bit"),
    ],
)
def test_round_trip_rebuilds_the_hf_model_with_its_learned_state(tmp_path, name, preset):
    model, _ = build(name)
    q = _train(stefx.quantize(model, preset, report=False))
    before = _learned(q)
    assert before  # something learned to carry
    path = tmp_path / "q.safetensors"
    stefx.save(q, path)

    again = stefx.load(path)  # no model: rebuilt from the saved config
    assert type(again) is type(q)
    assert sorted(quantized_modules(again)) == sorted(quantized_modules(q))
    after = _learned(again)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    q.eval(), again.eval()
    ids = _ids(seed=9)
    assert torch.equal(q(ids).logits, again(ids).logits)
    assert again._stefx_plan.recipe == q._stefx_plan.recipe
    assert [s.name for s in again._stefx_plan.sites] == [s.name for s in q._stefx_plan.sites]


def test_sequence_classifier_trains_and_round_trips(tmp_path):
    """A BERT-style AutoModelForSequenceClassification: loss falls, head stays float,
    stefx.save / stefx.load rebuild it with identical logits."""
    torch.manual_seed(0)
    config = hf_config("bert")
    config.num_labels = 3
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    q = stefx.quantize(model, "w4a8", report=False)
    ids, labels = _ids(batch=8), torch.arange(8) % 3
    opt = torch.optim.AdamW(q.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = q(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    path = tmp_path / "bert.safetensors"
    stefx.save(q, path)
    again = stefx.load(path)
    assert type(again) is type(q) and "classifier" not in quantized_modules(again)
    q.eval(), again.eval()
    assert torch.equal(q(input_ids=ids).logits, again(input_ids=ids).logits)


def test_tied_weights_stay_tied_and_are_stored_once(tmp_path):
    model, _ = build("gpt2")
    q = stefx.quantize(model, "w4a8", report=False)
    path = tmp_path / "q.safetensors"
    stefx.save(q, path)
    header = stefx.saving.read_header(path)
    assert header["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    again = stefx.load(path)
    assert again.lm_head.weight is again.transformer.wte.weight


def test_load_into_a_given_float_model_and_the_file_is_tensors_plus_json(tmp_path):
    model, inputs = build("mlp")
    q = stefx.quantize(model, "w4a8", inputs, report=False)
    path = tmp_path / "mlp.safetensors"
    stefx.save(q, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])  # the safetensors header: JSON, no pickle anywhere
    assert json.loads(header["__metadata__"]["stefx"])["plan"]["recipe"]["name"] == "w4a8"

    fresh, _ = build("mlp")
    again = stefx.load(path, fresh)
    assert again is fresh
    assert torch.equal(again(*inputs), q(*inputs))
    with pytest.raises(StefxError, match="pass model=<a float MLP>"):
        stefx.load(path)


def test_lazy_activation_state_saved_before_and_after_its_first_forward(tmp_path):
    model, inputs = build("mlp")
    lsq = {"type": "lsq", "num_bits": 4}
    recipe = {"rules": [{"targets": ["linear"], "weights": lsq, "input_activations": lsq}]}
    q = stefx.quantize(model, recipe, inputs, report=False)
    path = tmp_path / "a.safetensors"
    stefx.save(q, path)  # the input steps are not initialised yet: empty tensors
    fresh, _ = build("mlp")
    again = stefx.load(path, fresh)
    assert torch.equal(again(*inputs), q(*inputs))  # both initialise from the same batch
    stefx.save(q, path)  # now initialised
    fresh, _ = build("mlp")
    assert torch.equal(stefx.load(path, fresh)(*inputs), q(*inputs))


def test_as_graph_model_round_trips(tmp_path):
    model, inputs = build("mlp")
    gm = stefx.quantize(model, "w4a8", inputs, report=False, as_graph=True)
    path = tmp_path / "g.safetensors"
    stefx.save(gm, path)
    fresh, _ = build("mlp")
    again = stefx.load(path, fresh)
    assert isinstance(again, torch.fx.GraphModule)
    assert torch.equal(again(*inputs), gm(*inputs))


def test_bf16_model_round_trips(tmp_path):
    model, _ = build("llama")
    q = stefx.quantize(model.to(torch.bfloat16), "bitnet-b158", report=False)
    path = tmp_path / "b.safetensors"
    stefx.save(q, path)
    again = stefx.load(path)
    assert again.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = _ids()
    assert torch.equal(q(ids).logits, again(ids).logits)


@pytest.fixture()
def saved(tmp_path):
    model, _ = build("llama")
    q = stefx.quantize(model, "w4a8", report=False)
    path = tmp_path / "llama.safetensors"
    stefx.save(q, path)
    return path


def test_a_truncated_file(saved):
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(StefxError, match="truncated or damaged"):
        stefx.load(saved)


def test_a_tampered_file(saved):
    raw = bytearray(saved.read_bytes())
    raw[-7] ^= 0xFF  # a byte of the last tensor
    saved.write_bytes(bytes(raw))
    with pytest.raises(StefxError, match="checksum"):
        stefx.load(saved)


def test_not_a_stefx_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(StefxError, match="not a stefx one"):
        stefx.load(path)
    with pytest.raises(StefxError, match="no file"):
        stefx.load(tmp_path / "missing.safetensors")


def test_the_wrong_model_is_refused_and_left_float(saved):
    gpt2, _ = build("gpt2")
    with pytest.raises(StefxError, match=r"has no module 'model.layers.0.self_attn.q_proj'"):
        stefx.load(saved, gpt2)
    assert not quantized_modules(gpt2)


def test_another_config_of_the_same_architecture(saved):
    config = hf_config("llama")
    config.intermediate_size = 48
    other = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(StefxError, match=r"gate_proj.weight has shape \(48, 32\) here"):
        stefx.load(saved, other)
    assert not quantized_modules(other)


def test_a_missing_key(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}  # noqa: SIM118
    header = json.loads(meta["stefx"])
    header["sha256"] = stefx.saving._digest(tensors)  # a consistent file, one key short
    path = tmp_path / "short.safetensors"
    save_file(tensors, str(path), metadata={"stefx": json.dumps(header)})
    model, _ = build("llama")
    with pytest.raises(StefxError, match=r"missing from the file: model.norm.weight"):
        stefx.load(path, model)
    assert not quantized_modules(model)


def test_saving_a_float_model_says_what_to_do(tmp_path):
    with pytest.raises(StefxError, match="carries no stefx plan"):
        stefx.save(nn.Linear(2, 2), tmp_path / "f.safetensors")


def test_loading_into_an_already_quantized_model(saved):
    model, _ = build("llama")
    stefx.quantize(model, "w4a8", report=False)
    with pytest.raises(StefxError, match="already quantized"):
        stefx.load(saved, model)


def test_a_shape_that_differs_outside_the_sites_changes_nothing(saved):
    """The embedding is not a quantized site, so only the strict load would notice: it is
    checked before any tensor is copied, and the model keeps its own weights."""
    config = hf_config("llama")
    config.vocab_size = 120
    torch.manual_seed(1)
    other = transformers.AutoModelForCausalLM.from_config(config)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        StefxError, match=r"model.embed_tokens.weight \(128, 32\) \(here \(120, 32\)\)"
    ):
        stefx.load(saved, other)
    assert not quantized_modules(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_bad_arguments_are_named(saved, tmp_path):
    with pytest.raises(StefxError, match=r"model=str is not a torch\.nn\.Module"):
        stefx.load(saved, "llama")
    model, _ = build("llama")
    q = stefx.quantize(model, "w4a8", report=False)
    with pytest.raises(StefxError, match="cannot write"):
        stefx.save(q, tmp_path / "no" / "such" / "dir" / "q.safetensors")
