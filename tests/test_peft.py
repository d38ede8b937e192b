"""PEFT in both orders: LoRA on an STE-quantized base, and stefx.quantize of a PEFT model.
Adapters stay float, only they train, and stefx.save / stefx.load carry everything."""

from __future__ import annotations

import pytest
import torch

import stefx
from stefx.rewrite import quantized_modules
from tests.zoo import build

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def _lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _ids(seed=0):
    return torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(seed))


def _fit(model, steps=20):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=_ids(), labels=_ids()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _quantize_peft():
    model, _ = build("llama")
    pm = peft.get_peft_model(model, _lora())
    assert stefx.quantize(pm, "w4a8", report=False) is pm  # no example inputs needed
    return pm


def _peft_on_quantized():
    model, _ = build("llama")
    stefx.quantize(model, "w4a8", report=False)
    return peft.get_peft_model(model, _lora())


def test_quantizing_a_peft_model_leaves_the_adapters_float():
    pm = _quantize_peft()
    mods = quantized_modules(pm.get_base_model())
    assert "model.layers.0.self_attn.q_proj.base_layer" in mods
    assert "model.layers.0.self_attn.k_proj" in mods
    assert not [n for n in mods if "lora" in n]
    names = [s.name for s in stefx.explain(pm, "w4a8").sites]
    assert not [n for n in names if "lora" in n]


@pytest.mark.parametrize("order", ["quantize-then-lora", "lora-then-quantize"])
def test_only_the_adapters_train_and_the_loss_falls(order):
    pm = _peft_on_quantized() if order == "quantize-then-lora" else _quantize_peft()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = pm.get_base_model().model.layers[0].self_attn.k_proj.weight.detach().clone()
    lora_a = pm.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    a0 = lora_a.detach().clone()
    losses = _fit(pm)
    assert losses[-1] < losses[0] - 0.2
    # lora_A moved: it got gradient. When stefx quantized the adapters too, the
    # zero-initialised lora_B took step 1.0, stayed at code 0, and lora_A's gradient was 0.
    assert not torch.equal(a0, lora_a.detach())
    assert torch.equal(base, pm.get_base_model().model.layers[0].self_attn.k_proj.weight)


@pytest.mark.parametrize("order", ["quantize-then-lora", "lora-then-quantize"])
def test_scales_can_train_beside_the_adapters(order):
    pm = _peft_on_quantized() if order == "quantize-then-lora" else _quantize_peft()
    scales = [p for _, p in stefx.train.quantizer_parameters(pm)]
    assert scales and not any(p.requires_grad for p in scales)  # frozen with the base
    stefx.train.set_quantizers_trainable(pm)
    assert all(p.requires_grad for p in scales)
    before = [p.detach().clone() for p in scales]
    _fit(pm, steps=3)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, scales, strict=True))


@pytest.mark.parametrize("order", ["quantize-then-lora", "lora-then-quantize"])
def test_save_and_load_with_adapters(tmp_path, order):
    pm = _peft_on_quantized() if order == "quantize-then-lora" else _quantize_peft()
    _fit(pm, steps=3)
    path = tmp_path / "peft.safetensors"
    stefx.save(pm, path)
    model, _ = build("llama")
    fresh = peft.get_peft_model(model, _lora())
    assert stefx.load(path, fresh) is fresh
    pm.eval(), fresh.eval()
    assert torch.equal(pm(input_ids=_ids(3)).logits, fresh(input_ids=_ids(3)).logits)
    with pytest.raises(stefx.StefxError, match="holds a PEFT model"):
        stefx.load(path)


def test_dequantize_a_peft_model():
    pm = _quantize_peft()
    assert stefx.dequantize(pm) is pm
    assert not quantized_modules(pm.get_base_model())
