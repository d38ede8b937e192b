"""GGUF: the lattice presets are llama.cpp's own quantizers bit for bit, and what the
writer stores dequantizes (by the gguf package, llama.cpp's Python reader) to exactly the
weights stefx trained."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import stefx
from stefx.convert import ConvertError
from stefx.ste.spec import make_quantizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
T = gguf.GGMLQuantizationType


def _llama(hidden=256, inter=512, layers=2, vocab=256, tie=False):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _weights(preset: str) -> dict:
    from stefx.recipe import load_recipe

    return load_recipe(preset).rules[0].weights.to_dict()


def _hard_weights() -> torch.Tensor:
    """Random weights plus the cases rounding rules disagree on: exact halves, a block of
    zeros, +m and -m in one block, a lone nonzero."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 256, generator=g) * 0.02
    w[1] = torch.randint(-16, 17, (256,), generator=g).float() / 2  # many exact .5 ratios
    w[2, :64] = 0.0
    w[3, :32] = torch.linspace(-1, 1, 32)  # +1 and -1: the first one wins the scale
    w[4, 32:64] = 0.0
    w[4, 40] = 0.3
    return w


@pytest.mark.parametrize("preset, kind", [("gguf-q4_0", T.Q4_0), ("gguf-q8_0", T.Q8_0)])
def test_preset_weights_are_llama_cpp_quantizer_bit_for_bit(preset, kind):
    w = _hard_weights()
    fake = make_quantizer(_weights(preset))(w)
    reference = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind)
    assert np.array_equal(fake.numpy(), reference)


def test_q4_0_uses_all_sixteen_codes_and_an_fp16_scale():
    w = _hard_weights()[:, :32]
    q = make_quantizer(_weights("gguf-q4_0"))
    fake = q(w)
    m = w.gather(1, w.abs().argmax(1, keepdim=True))
    d = (m / -8).half().float()  # the fp16 scale the file stores
    codes = fake / torch.where(d == 0, torch.ones_like(d), d)
    assert torch.equal(codes, codes.round()) and codes.min() == -8 and codes.max() <= 7
    assert torch.equal(fake[0] / d[0], torch.round(fake[0] / d[0]))


def test_rounding_options_are_the_c_ones():
    q = make_quantizer({"type": "uniform", "num_bits": 8, "rounding": "half_away"})
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997])
    assert q(x).tolist() == [127.0, 1.0, 2.0, 3.0, -1.0, -3.0, 0.0]
    even = make_quantizer({"type": "uniform", "num_bits": 8})
    assert even(x).tolist() == [127.0, 0.0, 2.0, 2.0, -0.0, -2.0, 0.0]
    with pytest.raises(stefx.RecipeError, match=r"rounding='nearest'.*half_away"):
        make_quantizer({"type": "uniform", "rounding": "nearest"})
    with pytest.raises(stefx.RecipeError, match=r"scale_dtype='fp8'"):
        make_quantizer({"type": "ternary", "scale_dtype": "fp8"})
    with pytest.raises(stefx.RecipeError, match="contradicts symmetric=False"):
        make_quantizer({"type": "uniform", "symmetric": False, "scale": "signed_absmax"})


def test_ternary_blocks_of_256_with_fp16_scales_are_tq2_0_and_tq1_0_exactly():
    w = _hard_weights()
    fake = make_quantizer(_weights("gguf-tq2_0"))(w)
    rows = fake.reshape(-1, 256)
    for row, src in zip(rows, w.reshape(-1, 256), strict=True):
        levels = row.unique()
        assert len(levels) <= 3
        gamma = src.abs().mean()
        assert levels.abs().max() in (0.0, gamma.half().float())
    for kind in (T.TQ2_0, T.TQ1_0):  # the file's blocks hold these values as they are
        back = gguf.quants.dequantize(gguf.quants.quantize(fake.numpy(), kind), kind)
        assert np.array_equal(back, fake.numpy())


def _reader_weights(path) -> dict:
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type, torch.from_numpy(np.array(values, np.float32)).reshape(shape))
    return reader, out


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize(
    "preset, kind", [("gguf-q4_0", T.Q4_0), ("gguf-q8_0", T.Q8_0), ("gguf-tq2_0", T.TQ2_0)]
)
def test_the_file_dequantizes_to_the_trained_weights(tmp_path, preset, kind):
    q = stefx.quantize(_llama(), preset, report=False).eval()
    trained = {
        n: q.get_submodule(n).weight_quantizer(p).detach()
        for n, m in q.named_modules()
        if (p := getattr(m, "weight", None)) is not None and hasattr(m, "weight_quantizer")
    }
    before = copy.deepcopy(q.state_dict())
    path = stefx.export(q, tmp_path / "m.gguf", format="gguf")
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())  # not modified
    reader, tensors = _reader_weights(path)
    cfg = q.config
    f = reader.fields
    assert bytes(f["general.architecture"].parts[-1]).decode() == "llama"
    assert int(f["llama.block_count"].parts[-1][0]) == cfg.num_hidden_layers
    assert int(f["llama.attention.head_count_kv"].parts[-1][0]) == cfg.num_key_value_heads
    assert len(f["tokenizer.ggml.tokens"].data) == cfg.vocab_size
    assert len(trained) == 7 * cfg.num_hidden_layers
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    for fqn, want in trained.items():
        layer, leaf = fqn.split(".")[2], fqn.rpartition(".")[2]
        got_kind, got = tensors[f"blk.{layer}.{names[leaf]}.weight"]
        if leaf in ("q_proj", "k_proj"):
            heads = cfg.num_attention_heads if leaf == "q_proj" else cfg.num_key_value_heads
            got = _unpermute(got, heads)
        assert got_kind == kind
        assert torch.equal(got, want), fqn
    kind_embd, embd = tensors["token_embd.weight"]
    assert kind_embd == T.F16
    assert torch.equal(embd, q.model.embed_tokens.weight.detach().half().float())
    assert tensors["output_norm.weight"][0] == T.F32
    assert "output.weight" in tensors


def test_a_lattice_gguf_cannot_hold_is_refused_unless_strict_false(tmp_path):
    q = stefx.quantize(_llama(), "bitnet-b158", report=False).eval()
    out = tmp_path / "m.gguf"
    with pytest.raises(ConvertError, match=r"q_proj\.weight: its scales are float32.*gguf-tq2_0"):
        stefx.export(q, out, format="gguf")
    assert not out.exists() and not list(tmp_path.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stefx.export(q, out, format="gguf", strict=False)
    (message,) = [str(w.message) for w in caught if "re-quantized" in str(w.message)]
    assert "model.layers.0.self_attn.q_proj.weight: -> TQ2_0" in message
    _, tensors = _reader_weights(out)
    kind, got = tensors["blk.0.attn_v.weight"]
    want = q.model.layers[0].self_attn.v_proj.weight_quantizer(
        q.model.layers[0].self_attn.v_proj.weight
    )
    assert kind == T.TQ2_0
    # the codes survive; only the per-tensor scale is rounded to fp16 in each block
    rel = (got - want).abs().max() / want.abs().max()
    assert 0 < rel < 1e-3


def test_refusals_name_the_layer_the_mismatch_and_the_fix(tmp_path):
    narrow = stefx.quantize(_llama(hidden=128, inter=256), "gguf-tq2_0", report=False)
    with pytest.raises(ConvertError, match=r"q_proj\.weight: 128 inputs, not whole TQ2_0 blocks"):
        stefx.export(narrow, tmp_path / "a.gguf", format="gguf")
    asym = stefx.quantize(_llama(), "w4a16-g128", report=False)
    with pytest.raises(ConvertError, match=r"a zero point; Q4_0/Q8_0 are symmetric.*gguf-q4_0"):
        stefx.export(asym, tmp_path / "b.gguf", format="gguf")
    a4 = {
        "name": "a4",
        "rules": [{"targets": ["linear"], "ignore": ["lm_head"],
                   "weights": _weights("gguf-q4_0"),
                   "input_activations": {"type": "uniform", "num_bits": 4}}],
    }  # fmt: skip
    with pytest.raises(ConvertError, match=r"4-bit uniform activations; llama\.cpp computes 8-bit"):
        stefx.export(stefx.quantize(_llama(), a4, report=False), tmp_path / "c.gguf", "gguf")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2))
    with pytest.raises(ConvertError, match="GPT2LMHeadModel is not a model the GGUF writer maps"):
        stefx.export(stefx.quantize(gpt2, "gguf-q8_0", report=False), tmp_path / "d.gguf", "gguf")
    q = stefx.quantize(_llama(), "gguf-q8_0", report=False)
    with pytest.raises(ConvertError, match="ternary='tq3'"):
        stefx.export(q, tmp_path / "e.gguf", format="gguf", ternary="tq3")
    with pytest.raises(ConvertError, match="is a folder"):
        stefx.export(q, tmp_path, format="gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_tq1_0_f32_floats_tied_embeddings_and_a_converted_model(tmp_path):
    q = stefx.quantize(_llama(tie=True), "gguf-tq2_0", report=False).eval()
    stefx.convert(q)
    path = stefx.export(q, tmp_path / "m.gguf", format="gguf", ternary="tq1_0", float_type="f32")
    _, tensors = _reader_weights(path)
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert tensors["token_embd.weight"][0] == T.F32
    kind, got = tensors["blk.1.ffn_down.weight"]
    assert kind == T.TQ1_0
    want = q.model.layers[1].mlp.down_proj.weight_quantizer()
    assert torch.equal(got, want)
    assert path.stat().st_size < 0.3 * sum(
        v.numel() * 4 for v in _llama(tie=True).state_dict().values()
    )


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def test_fused_moe_experts_are_written_as_llama_cpp_expert_tensors(tmp_path):
    q = stefx.quantize(_mixtral(), "gguf-q4_0", report=False).eval()
    path = stefx.export(q, tmp_path / "moe.gguf", format="gguf")
    reader, tensors = _reader_weights(path)
    assert int(reader.fields["llama.expert_count"].parts[-1][0]) == 4
    assert int(reader.fields["llama.expert_used_count"].parts[-1][0]) == 2
    experts = q.model.layers[1].mlp.experts
    with torch.no_grad():
        gate_up = experts.gate_up_proj_quantizer(experts.gate_up_proj)
        down = experts.down_proj_quantizer(experts.down_proj)
    half = gate_up.shape[1] // 2
    for name, want in (("gate", gate_up[:, :half]), ("up", gate_up[:, half:]), ("down", down)):
        kind, got = tensors[f"blk.1.ffn_{name}_exps.weight"]
        assert kind == T.Q4_0 and got.shape == want.shape
        assert torch.equal(got, want), name
    kind, router = tensors["blk.1.ffn_gate_inp.weight"]
    assert kind == T.F32 and torch.equal(router, q.model.layers[1].mlp.gate.weight.detach())


@pytest.mark.slow
def test_llama_cpp_loads_the_file_and_computes_what_stefx_computes(tmp_path):
    """llama-cpp-python builds from source (about an hour on 2 cores): not in CI's install."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(5))

    def run(path):
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False
        )
        llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(llm.scores[:32], np.float32))

    for model in (_llama(layers=2), _mixtral()):
        with torch.no_grad():
            want = model(input_ids=ids).logits[0]
        got = run(stefx.export(model, tmp_path / "f32.gguf", format="gguf", float_type="f32"))
        assert (got - want).abs().max() < 2e-3  # names, layout and Q/K permutation are right
        for preset in ("gguf-q8_0", "gguf-q4_0", "gguf-tq2_0"):
            q = stefx.quantize(copy.deepcopy(model), preset, report=False).eval()
            with torch.no_grad():
                want = q(input_ids=ids).logits[0]
            got = run(stefx.export(q, tmp_path / "q.gguf", format="gguf", float_type="f32"))
            # activation codes flip where upstream floats differ by an ulp (F16 KV cache);
            # on the MoE model such a flip can also swap a near-tied expert for a token
            err = (got - want).abs()
            assert err.median() < 0.01 * want.abs().max(), preset
            if not isinstance(model, transformers.MixtralForCausalLM):
                assert err.max() < 0.03 * want.abs().max(), preset


@pytest.mark.parametrize("preset", ["gguf-q4_0", "gguf-q8_0", "gguf-tq2_0"])
def test_fp16_scales_survive_torch_compile(preset):
    """inductor keeps fused fp16 casts in fp32; stefx rounds the scale on its bits, so a
    compiled quantizer is on the same lattice as the eager one (and the file)."""
    from stefx.recipe import load_recipe

    rule = load_recipe(preset).rules[0]
    g = torch.Generator().manual_seed(0)
    cases = [(rule.weights, torch.randn(64, 256, generator=g)),
             (rule.input_activations, 3 * torch.randn(2, 16, 256, generator=g))]  # fmt: skip
    for spec, x in cases:
        q = make_quantizer(spec).eval()
        with torch.no_grad():
            assert torch.equal(torch.compile(q, fullgraph=True)(x), q(x))


def test_scale_rounding_is_the_cast_bit_for_bit():
    from stefx.ste.uniform import stored_scale

    g = torch.Generator().manual_seed(1)
    v = torch.randn(200_000, generator=g) * 10 ** torch.empty(200_000).uniform_(-9, 5, generator=g)
    v = torch.cat([v, torch.tensor([0.0, 6.1e-5, 65504.0, 65520.0, 1e6, 2.0**-24 * 1.5])])
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        assert torch.equal(stored_scale(v, name), v.to(dtype).float()), name
