"""stefx.convert: packed integer weights that compute exactly what the fake-quantized model
computed, in a fraction of the bytes, through copy, pickle, save/load, save_pretrained /
from_pretrained, generate and torch.compile."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stefx
from stefx.convert import ConvertError, PackedWeight, converted_weights, pack, unpack
from tests.test_patterns import ConvBN, _fold_recipe, _folded_reference, _randomise_bn
from tests.zoo import build

transformers = pytest.importorskip("transformers")

PRESETS = ["w8a8", "w4a8", "w4a16-g128", "w2a16-g64", "bitnet-b158", "ternary-twn", "w1a8",
           "xnor", "bnn"]  # fmt: skip
MODELS = ["llama", "gpt2", "qwen3", "qwen2_moe", "residual_cnn"]


def _run(model, inputs):
    with torch.no_grad():
        out = model(input_ids=inputs) if isinstance(inputs, torch.Tensor) else model(*inputs)
    return getattr(out, "logits", out)


def _quantized(name, preset):
    model, inputs = build(name)
    if inputs is None:
        inputs = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bnn on a CNN: binary inputs after ReLUs
        q = stefx.quantize(model, preset, report=False)
    return q.eval(), inputs


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", MODELS)
def test_converted_model_computes_exactly_what_it_trained_with(name, preset):
    q, inputs = _quantized(name, preset)
    cls, before = type(q), _run(q, inputs)
    weights = {n: p.detach().clone() for n, p in q.named_parameters()}
    fake = {}
    for fqn, module in stefx.rewrite.quantized_modules(q).items():
        for p, qname in module.__dict__[stefx.rewrite.STATE_ATTR].swaps.items():
            with torch.no_grad():
                fake[f"{fqn}.{p}"] = module._modules[qname](module.get_parameter(p))
    stefx.convert(q)
    assert type(q) is cls
    assert torch.equal(_run(q, inputs), before)
    assert sorted(converted_weights(q)) == sorted(fake)
    for key, want in fake.items():
        module_name, _, p = key.rpartition(".")
        packed = q.get_submodule(module_name)._modules[f"{p}_quantizer"]
        assert isinstance(packed, PackedWeight)
        assert torch.equal(packed.dequantized(), want), key  # bit-exact weights
        assert key not in q.state_dict()  # the float weight is gone
        del weights[key]
    # nothing else changed
    for n, p in q.named_parameters():
        assert torch.equal(p, weights[n]), n


def _bits_per_weight(packed: PackedWeight) -> float:
    stored = sum(t.numel() * t.element_size() for t in packed.state_dict().values())
    return stored * 8 / packed.weight_shape.numel()


@pytest.mark.parametrize(
    ("preset", "bits"),
    [("w8a8", 8), ("w4a8", 4), ("w2a16-g64", 2), ("bitnet-b158", 2), ("w1a8", 1)],
)
def test_packed_bytes_are_the_bits_plus_the_scales(preset, bits):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    q = stefx.convert(stefx.quantize(model, preset, report=False))
    for name in converted_weights(q):
        module_name, _, p = name.rpartition(".")
        packed = q.get_submodule(module_name)._modules[f"{p}_quantizer"]
        groups = packed.scale.numel()
        zero = packed.zero_point.numel() if packed.zero_point is not None else 0
        ideal = bits + (32 * groups + 8 * zero) / packed.weight_shape.numel()
        assert _bits_per_weight(packed) <= 1.10 * ideal, name
        assert packed.codes.numel() == math.ceil(packed.weight_shape.numel() * bits / 8)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 67), seed=st.integers(0, 99))
def test_pack_then_unpack_is_the_identity(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def test_a_folded_batchnorm_is_folded_for_good():
    torch.manual_seed(0)
    model = ConvBN(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8))
    _randomise_bn(model.bn)
    x = torch.randn(2, 3, 6, 6)
    q = stefx.quantize(model, _fold_recipe(), (x,), report=False).eval()
    want_w, want_b = _folded_reference(q.conv, q.bn, axis=0)
    before = q(x)
    stefx.convert(q)
    assert isinstance(q.bn, nn.Identity)
    assert torch.equal(q.conv.weight_quantizer.dequantized(), want_w)  # q(w·γ/σ), packed
    assert torch.allclose(q.conv.bias, want_b, atol=1e-6)
    assert torch.allclose(q(x), before, atol=1e-5)


def test_copy_pickle_save_and_load_keep_the_packed_model(tmp_path):
    q, ids = _quantized("llama", "w4a8")
    stefx.convert(q)
    want = _run(q, ids)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    for other in (
        copy.deepcopy(q),
        pickle.loads(pickle.dumps(q)),
        torch.load(buf, weights_only=False),
    ):
        assert torch.equal(_run(other, ids), want)
    stefx.save(q, tmp_path / "packed.safetensors")
    back = stefx.load(tmp_path / "packed.safetensors", build("llama")[0]).eval()
    assert converted_weights(back) == converted_weights(q)
    assert torch.equal(_run(back, ids), want)
    assert back.model.layers[0].self_attn.q_proj.weight is None


def test_save_pretrained_and_from_pretrained_keep_the_packed_model(tmp_path):
    q, ids = _quantized("llama", "bitnet-b158")
    stefx.convert(q)
    want = _run(q, ids)
    q.save_pretrained(tmp_path)
    attn = q.config._attn_implementation  # the zoo builds eager; the default is sdpa
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn)
    back.eval()
    assert type(back) is type(q)
    assert converted_weights(back) == converted_weights(q)
    assert torch.equal(_run(back, ids), want)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)


def test_generate_and_compile_on_the_packed_model():
    q, ids = _quantized("llama", "w4a16-g128")
    want = q.generate(ids, max_new_tokens=4, do_sample=False)
    stefx.convert(q)
    assert torch.equal(q.generate(ids, max_new_tokens=4, do_sample=False), want)
    logits = _run(q, ids)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=ids).logits, logits, atol=1e-5)


def test_dequantize_gives_the_float_model_with_the_packed_values():
    q, ids = _quantized("llama", "w4a16-g128")  # weight-only: no activation quantizer
    stefx.convert(q)
    want = _run(q, ids)
    stefx.dequantize(q)
    assert not stefx.rewrite.quantized_modules(q)
    assert isinstance(q.model.layers[0].mlp.down_proj.weight, nn.Parameter)
    assert torch.equal(_run(q, ids), want)


def test_what_cannot_be_packed_is_refused_and_nothing_changes():
    with pytest.raises(ConvertError, match="no stefx quantizers"):
        stefx.convert(build("llama")[0])
    q, ids = _quantized("llama", "paretoq-2bit")  # SEQ: levels at half-integers
    before = _run(q, ids)
    with pytest.raises(ConvertError, match=r"model\.layers\.0\..*seq quantizer"):
        stefx.convert(q)
    assert not converted_weights(q)
    assert torch.equal(_run(q, ids), before)
    q, ids = _quantized("llama", "w4a8")
    stefx.train.set_strength(q, 0.5)
    with pytest.raises(ConvertError, match=r"ramped.*strength 0\.5"):
        stefx.convert(q)
    assert not converted_weights(q)


def test_bad_arguments_are_named():
    with pytest.raises(ConvertError, match=r"model=str is not a torch\.nn\.Module"):
        stefx.convert("model")
    q, _ = _quantized("llama", "w4a8")
    with pytest.raises(ConvertError, match=r"only= names \['lm_head.weight'\]"):
        stefx.convert(q, only=["lm_head.weight"])
    assert not converted_weights(q)
