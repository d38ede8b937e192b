"""stefx.export: what stefx trained, loaded by another project's loader, computes the same."""

from __future__ import annotations

import copy

import pytest
import torch

import stefx
from stefx.convert import ConvertError, converted_weights
from tests.zoo import build

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from safetensors import safe_open  # noqa: E402


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _weights(bits, strategy, symmetric=True, kind="uniform", **extra):
    spec = {"type": kind, "num_bits": bits, "strategy": strategy, **extra}
    if kind == "uniform":
        spec["symmetric"] = symmetric
    return {
        "name": "ct",
        "rules": [{"targets": ["linear"], "ignore": ["lm_head"], "weights": spec}],
    }


CASES = {
    "w4a16-g128": ("w4a16-g128", True),  # asymmetric: loaded dequantized (see stefx.export)
    "int8-channel": (_weights(8, "channel"), False),
    "lsq4-g32": (_weights(4, "group", kind="lsq", group_size=32), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_export_and_computes_the_same(tmp_path, case):
    recipe, dequantize = CASES[case]
    q = stefx.quantize(_llama(), recipe, report=False).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = q(input_ids=ids).logits
    stefx.export(q, tmp_path, format="compressed-tensors")
    assert not converted_weights(q)  # the model passed is left as it was
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    assert packed.dtype == torch.int32
    bits = 4 if "4" in case else 8
    assert packed.numel() * 32 == 128 * 256 * bits  # 32 // bits codes per int32
    kwargs = {}
    if dequantize:
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", **kwargs
    ).eval()
    with torch.no_grad():
        got = back(input_ids=ids).logits
    assert torch.equal(got, want)


def test_what_the_format_cannot_hold_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    q = stefx.quantize(_llama(), "w4a8", report=False)
    with pytest.raises(ConvertError, match=r"(?s)q_proj.*weight-only.*w4a16-g128"):
        stefx.export(q, out, format="compressed-tensors")
    ragged, _ = build("llama")  # 32-wide layers: groups of 128 do not tile them
    with pytest.raises(ConvertError, match="do not tile its 32 inputs"):
        stefx.export(
            stefx.quantize(ragged, "w4a16-g128", report=False), out, format="compressed-tensors"
        )
    with pytest.raises(ConvertError, match=r"no options \['ternary'\] for this format"):
        stefx.export(q, out, format="compressed-tensors", ternary="tq1_0")
    with pytest.raises(ConvertError, match="unknown format 'tflite'"):
        stefx.export(q, out, format="tflite")
    assert not out.exists()
    q2 = stefx.quantize(_llama(), "w4a16-g128", report=False)
    before = copy.deepcopy(q2.state_dict())
    stefx.export(q2, out, format="compressed-tensors")
    assert all(torch.equal(v, before[k]) for k, v in q2.state_dict().items())


def test_transformers_loads_the_bitnet_export_as_bitlinear(tmp_path):
    from transformers.integrations.bitnet import BitLinear

    q = stefx.quantize(_llama(), "bitnet-b158", report=False).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = q(input_ids=ids).logits
    stefx.export(q, tmp_path, format="hf-bitnet")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    back.eval()
    assert isinstance(back.model.layers[1].mlp.down_proj, BitLinear)
    assert type(back.lm_head) is torch.nn.Linear  # kept float, as the preset keeps it
    with torch.no_grad():
        got = back(input_ids=ids).logits
    # the same lattice, rounded in another order (see stefx.export)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    with pytest.raises(ConvertError, match=r"(?s)q_proj.weight: its weights are lsq.*bitnet-b158"):
        stefx.export(stefx.quantize(_llama(), "w4a8", report=False), tmp_path / "x", "hf-bitnet")


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    q = stefx.quantize(_llama(), "w4a16-g128", report=False)
    with pytest.raises(ConvertError, match="cannot write the folder"):
        stefx.export(q, tmp_path / "file", format="compressed-tensors")
    with pytest.raises(ConvertError, match=r"model=int is not a torch\.nn\.Module"):
        stefx.export(3, tmp_path / "x", format="hf-bitnet")


def test_strict_false_requantizes_what_the_format_cannot_hold_and_reports_it(tmp_path):
    q = stefx.quantize(_llama(), "w2a16-g64", report=False).eval()  # 2-bit: no int2 here
    with pytest.raises(ConvertError, match=r"(?s)2-bit, the format holds int4 / int8"):
        stefx.export(q, tmp_path / "ct", format="compressed-tensors")
    with pytest.warns(stefx.RequantizedWarning) as caught:
        stefx.export(q, tmp_path / "ct", format="compressed-tensors", strict=False)
    message = str(caught[0].message)
    # 2-bit codes with their learned steps are 4-bit codes with the same steps: exact
    assert "mlp.down_proj.weight: its codes and scales kept in 4-bit codes (exact)" in message
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = q(input_ids=ids).logits, back(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5  # the loader's own kernels: float tolerance
    # per-channel TWN ternary onto BitLinear's per-tensor absmean: re-rounded, reported
    twn = stefx.quantize(_llama(), "ternary-twn", report=False).eval()
    with pytest.raises(ConvertError, match=r"(?s)not absmean ternary per tensor"):
        stefx.export(twn, tmp_path / "b", format="hf-bitnet")
    with pytest.warns(stefx.RequantizedWarning, match=r"re-quantized to ternary.*rel\. RMS"):
        stefx.export(twn, tmp_path / "b", format="hf-bitnet", strict=False)
    assert (tmp_path / "b" / "model.safetensors").exists()
