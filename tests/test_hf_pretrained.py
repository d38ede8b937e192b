"""save_pretrained / from_pretrained of a stefx-quantized model: it comes back quantized,
with its learned state, through transformers' quantization plug-in."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import stefx
from stefx.rewrite import quantized_modules
from tests.zoo import build, hf_config

transformers = pytest.importorskip("transformers")
import stefx.hf  # noqa: E402  (the plug-in, as a process that only loads would import it)


def _ids(seed=0, batch=2, seq=8):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for i in range(steps):
        model(_ids(i)).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def _quantizer_state(model):
    return {k: v for k, v in model.state_dict().items() if "quantizer" in k}


def _reload(path, auto="AutoModelForCausalLM", attn="eager", **kw):
    """from_pretrained, with the attention the zoo model used (eager and SDPA round apart)."""
    model, info = getattr(transformers, auto).from_pretrained(
        path, attn_implementation=attn, output_loading_info=True, **kw
    )
    return model, info


@pytest.mark.parametrize(
    ("name", "preset"),
    [
        ("llama", "w4a8"),
        ("gpt2", "pact-w4a4"),
        ("qwen3", "w4a8"),
        ("qwen2_moe", "w4a8"),
        ("mixtral", "bitnet-b158"),
    ],
)
def test_from_pretrained_restores_the_quantized_model(tmp_path, name, preset):
    model, _ = build(name)
    q = _train(stefx.quantize(model, preset, report=False))
    q.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "stefx"
    assert config["quantization_config"]["plan"]["recipe"]["name"] == preset

    again, info = _reload(tmp_path, attn=q.config._attn_implementation)
    assert type(again) is type(q)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert sorted(quantized_modules(again)) == sorted(quantized_modules(q))
    want, got = _quantizer_state(q), _quantizer_state(again)
    assert want.keys() == got.keys() and want
    assert all(torch.equal(want[k], got[k]) for k in want)
    q.eval(), again.eval()
    ids = _ids(7)
    assert torch.equal(q(ids).logits, again(ids).logits)
    out = again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_tied_embeddings_stay_tied(tmp_path):
    model, _ = build("gpt2")
    stefx.quantize(model, "w4a8", report=False).save_pretrained(tmp_path)
    again, _ = _reload(tmp_path)
    assert again.lm_head.weight is again.transformer.wte.weight


def test_reloaded_model_trains_and_saves_again(tmp_path):
    model, _ = build("llama")
    stefx.quantize(model, "w4a8", report=False).save_pretrained(tmp_path / "a")
    again, _ = _reload(tmp_path / "a")
    scale = again.model.layers[0].self_attn.q_proj.weight_quantizer.scale
    before = scale.detach().clone()
    _train(again, steps=3)
    assert not torch.equal(before, scale.detach())  # the learned steps are trainable
    again.save_pretrained(tmp_path / "b")
    twice, _ = _reload(tmp_path / "b")
    again.eval(), twice.eval()
    assert torch.equal(again(_ids()).logits, twice(_ids()).logits)


def test_quantize_on_load_from_a_float_checkpoint(tmp_path):
    model, _ = build("llama")
    model.save_pretrained(tmp_path)
    q, _ = _reload(tmp_path, quantization_config=stefx.hf.StefxConfig(recipe="w4a8"))
    reference = stefx.quantize(build("llama")[0], "w4a8", report=False)
    assert sorted(quantized_modules(q)) == sorted(quantized_modules(reference))
    q.eval(), reference.eval()
    assert torch.equal(q(_ids()).logits, reference(_ids()).logits)


def test_sequence_classification_round_trip(tmp_path):
    torch.manual_seed(0)
    config = hf_config("bert")
    config.num_labels = 3
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    q = stefx.quantize(model, "w4a8", report=False)
    q.save_pretrained(tmp_path)
    again, info = _reload(tmp_path, auto="AutoModelForSequenceClassification")
    assert not info["unexpected_keys"] and not info["missing_keys"]
    q.eval(), again.eval()
    assert torch.equal(q(_ids()).logits, again(_ids()).logits)


def test_dequantize_forgets_the_quantization_config(tmp_path):
    model, _ = build("llama")
    q = stefx.quantize(model, "w4a8", report=False)
    assert q.config.quantization_config.quant_method == "stefx"
    stefx.dequantize(q)
    assert getattr(q.config, "quantization_config", None) is None
    q.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_copies_keep_the_config_and_a_model_quantized_elsewhere_is_refused():
    model, _ = build("llama")
    q = stefx.quantize(model, "w4a8", report=False)
    for twin in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert twin.config.quantization_config.plan == q.config.quantization_config.plan
    other, _ = build("llama")
    other.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(stefx.StefxError, match="already quantized with 'bitsandbytes'"):
        stefx.quantize(other, "w4a8", report=False)
    assert not quantized_modules(other)


def test_stefx_config_needs_a_plan_or_a_recipe():
    with pytest.raises(stefx.StefxError, match="exactly one of plan="):
        stefx.hf.StefxConfig()
    with pytest.raises(stefx.StefxError, match="newer stefx"):
        stefx.hf.StefxConfig(recipe="w4a8", version=99)


def test_a_reloaded_model_trains_with_trainer_and_dequantizes(tmp_path):
    pytest.importorskip("accelerate")
    model, _ = build("llama")
    stefx.quantize(model, "w4a8", report=False).save_pretrained(tmp_path / "q")
    again, _ = _reload(tmp_path / "q")
    assert again.is_quantized  # transformers' own flag: its Trainer checks QAT support
    data = [{"input_ids": _ids(i)[0], "labels": _ids(i)[0]} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    scale = again.model.layers[0].self_attn.q_proj.weight_quantizer.scale
    before = scale.detach().clone()
    transformers.Trainer(model=again, args=args, train_dataset=data).train()
    assert not torch.equal(before, scale.detach())
    float_model = again.dequantize()  # transformers' API, through the plug-in
    assert not quantized_modules(float_model)
    assert getattr(float_model.config, "quantization_config", None) is None
