"""The presets on the models people fine-tune: MoE experts quantized, routers and heads float,
and recipes that extend a preset keep its tolerance of rules that miss."""

from __future__ import annotations

import pytest
import torch

import stefx
from stefx.errors import NoMatchError
from stefx.recipe import load_recipe, preset_names
from stefx.rewrite import quantized_modules
from tests.zoo import build, hf_config

transformers = pytest.importorskip("transformers")

LLM_PRESETS = [p for p in preset_names() if "linear" in load_recipe(p).rules[0].targets]
ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")


def _ids(model, batch=2, seq=8):
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator())


@pytest.mark.parametrize("preset", LLM_PRESETS)
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_llm_presets_quantize_experts_and_keep_routers_float(name, preset):
    model, _ = build(name)  # widths of 32: group presets get one ragged group
    q = stefx.quantize(model, preset, report=False)
    mods = quantized_modules(q)
    experts = [n for n in mods if n.endswith("mlp.experts")]
    assert len(experts) == model.config.num_hidden_layers, sorted(mods)
    for n in experts:  # every fused expert weight has its own quantizer
        params = {p for p, _ in mods[n].named_parameters(recurse=False)}
        quantizers = {c.removesuffix("_quantizer") for c, _ in mods[n].named_children()}
        assert params & {"gate_up_proj", "down_proj"} <= quantizers, (params, quantizers)
    assert not [n for n in mods if n.endswith(ROUTERS)], sorted(mods)
    assert "lm_head" not in mods
    out = q(_ids(q)).logits
    out.float().pow(2).mean().backward()
    grads = [p.grad for n, p in q.named_parameters() if n.endswith("experts.down_proj")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("preset", ["w4a8", "bitnet-b158", "bnn"])
def test_classification_heads_and_pooler_stay_float(preset):
    torch.manual_seed(0)
    config = hf_config("bert")
    config.num_labels = 3
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    q = stefx.quantize(model, preset, report=False)
    mods = quantized_modules(q)
    assert "classifier" not in mods and "bert.pooler.dense" not in mods
    assert "bert.encoder.layer.0.attention.self.query" in mods

    torch.manual_seed(0)
    llama = transformers.AutoModelForSequenceClassification.from_config(hf_config("llama"))
    mods = quantized_modules(stefx.quantize(llama, preset, report=False))
    assert "score" not in mods and "model.layers.0.self_attn.q_proj" in mods


def test_router_names_do_not_catch_gate_proj_or_blocks_named_gate():
    """'gate' is a dotted-suffix name: a Llama MLP's gate_proj is quantized, and so are the
    convs inside a block that happens to be called ``gate`` (the zoo's UNet)."""
    llama, _ = build("llama")
    mods = quantized_modules(stefx.quantize(llama, "w4a8", report=False))
    assert "model.layers.0.mlp.gate_proj" in mods
    unet, inputs = build("unet")
    mods = quantized_modules(stefx.quantize(unet, "w4a8", inputs, report=False))
    assert [n for n in mods if n.startswith("gate.")], sorted(mods)


def _child(**extra):
    rules = [{"targets": ["lm_head"], "weights": {"type": "uniform", "num_bits": 8}}]
    return {"name": "child", "extends": "w4a8", "rules": rules, **extra}


def test_extends_inherits_the_parents_on_no_match():
    """The guide's example: a preset plus one rule, on an LLM that has no convolution."""
    recipe = load_recipe(_child())
    assert recipe.on_no_match == "ignore"
    model, _ = build("llama")
    q = stefx.quantize(model, recipe, report=False)
    assert "lm_head" in quantized_modules(q)


def test_a_child_that_wants_errors_gets_them_for_its_own_rules_only():
    """The parent's conv rule, written to miss on LLMs, stays ignored; the child's own rule
    follows the child's policy."""
    miss = {"targets": ["no_such_layer"], "weights": {"type": "uniform", "num_bits": 8}}
    recipe = load_recipe({**_child(on_no_match="error"), "rules": [miss]})
    assert [r.on_no_match for r in recipe.rules] == ["ignore", "ignore", "error"]
    model, _ = build("llama")
    with pytest.raises(NoMatchError, match=r"rule 2 matched nothing.*no_such_layer"):
        stefx.quantize(model, recipe, report=False)
    assert not quantized_modules(model)  # nothing half-done
    ok = load_recipe({**_child(on_no_match="error")})  # the child's lm_head rule matches
    assert quantized_modules(stefx.quantize(model, ok, report=False))


def test_a_rule_can_set_its_own_on_no_match():
    miss = {"targets": ["conv"], "weights": {"type": "uniform", "num_bits": 8}}
    recipe = load_recipe(
        {
            "rules": [
                {"targets": ["linear"], "weights": {"type": "uniform", "num_bits": 8}},
                {**miss, "on_no_match": "ignore"},
            ]
        }
    )
    assert [r.on_no_match for r in recipe.rules] == ["error", "ignore"]
    model, _ = build("llama")
    stefx.quantize(model, recipe, report=False)  # no NoMatchError for the conv rule
    with pytest.raises(stefx.RecipeError, match="on_no_match='sometimes'"):
        load_recipe({"rules": [{**miss, "on_no_match": "sometimes"}]})


def test_on_no_match_round_trips_through_to_dict():
    recipe = load_recipe({**_child(on_no_match="error")})
    again = stefx.Recipe.from_dict(recipe.to_dict())
    assert again.rules == recipe.rules and again.on_no_match == "error"


@pytest.mark.parametrize("in_axis", [1, 2])
def test_token_rows_along_any_axis_round_trip(in_axis):
    from stefx.ste.granularity import Granularity

    x = torch.randn(3, 5, 7)
    g = Granularity("token", axis=in_axis)
    rows = g.rows(x)
    assert rows.shape == (x.numel() // x.shape[in_axis], x.shape[in_axis])
    assert torch.equal(rows, x.movedim(in_axis, -1).reshape(rows.shape))
    assert torch.equal(g.unrows(rows, x.shape), x)


@pytest.mark.parametrize("in_axis", [1, 2])
def test_binary_channel_on_a_fused_expert_weight_scales_each_expert_row(in_axis):
    """bireal's per-channel mean|W| on [E, out, in] (or [E, in, out]): one α per
    (expert, output row), the closed form sign(W)·mean|W| over the input axis."""
    from stefx.sites import weight_spec

    spec = load_recipe("bireal").rules[0].weights
    w = torch.randn(4, 6, 10)
    resolved = weight_spec(spec, tuple(w.shape), "experts", in_axis=in_axis)
    q = stefx.make_quantizer(resolved.to_dict())
    expected = torch.sign(w) * w.abs().mean(dim=in_axis, keepdim=True)
    assert torch.allclose(q(w), expected, atol=1e-6)


@pytest.mark.parametrize("preset", ["w1a8", "w1a16"])
def test_binary_weight_llm_presets(preset):
    """Each row of a quantized weight is sign(W)·mean|W| of that row; w1a8 also has 8-bit
    per-token inputs, w1a16 float ones."""
    model, _ = build("llama")
    q = stefx.quantize(model, preset, report=False)
    lin = q.model.layers[0].self_attn.q_proj
    w = lin.weight.detach()
    expected = torch.sign(w) * w.abs().mean(dim=1, keepdim=True)
    assert torch.allclose(lin.weight_quantizer(w), expected, atol=1e-7)
    assert (getattr(lin, "input_quantizer", None) is not None) == (preset == "w1a8")
    ids = torch.randint(3, 128, (2, 8))
    loss = q(input_ids=ids, labels=ids).loss
    loss.backward()
    assert lin.weight.grad.abs().sum() > 0


def test_param_groups_split_weights_and_quantizer_steps():
    model, _ = build("llama")
    q = stefx.quantize(model, "w4a8", report=False)
    groups = stefx.train.param_groups(q, 1e-3, weight_decay=0.1, quantizer_lr=1e-4)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == {id(p) for p in q.parameters() if p.requires_grad}
    assert ids[1] == {id(p) for _, p in stefx.train.quantizer_parameters(q)}
    assert (groups[1]["lr"], groups[1]["weight_decay"]) == (1e-4, 0.0)
    torch.optim.AdamW(groups).step()  # a valid optimizer spec


SCALED = {  # LSQ steps at a tenth of the rate, the latent weights of one layer at 10x
    "name": "scaled",
    "rules": [
        {
            "targets": ["linear"],
            "ignore": ["lm_head"],
            "weights": {"type": "lsq", "num_bits": 4, "strategy": "channel", "lr_scale": 0.1},
        },
        {
            "targets": ["*layers.0.mlp.down_proj"],
            "weights": {"type": "binary", "strategy": "channel", "latent_lr_scale": 10},
        },
    ],
}


def _lr_of(groups):
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_param_groups_apply_the_recipes_lr_scales(tmp_path):
    model, _ = build("llama")
    q = stefx.quantize(model, SCALED, report=False)
    groups = stefx.train.param_groups(q, 1e-3, weight_decay=0.1)
    lr = _lr_of(groups)
    # every trainable parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(lr)
    assert set(lr) == {id(p) for p in q.parameters() if p.requires_grad}
    down = q.model.layers[0].mlp.down_proj
    assert lr[id(down.weight)] == (pytest.approx(1e-2), 0.1)  # binary latent weight
    steps = dict(stefx.train.quantizer_parameters(q))
    assert steps and all(lr[id(p)] == (pytest.approx(1e-4), 0.0) for p in steps.values())
    assert lr[id(q.model.layers[0].self_attn.q_proj.weight)] == (1e-3, 0.1)
    assert lr[id(q.model.embed_tokens.weight)] == (1e-3, 0.1)
    assert groups[0]["lr"] == 1e-3  # the model's own group comes first
    # the scales are part of the plan: they survive stefx.save / stefx.load
    stefx.save(q, tmp_path / "q.safetensors")
    back = stefx.load(tmp_path / "q.safetensors", build("llama")[0])
    lr_back = _lr_of(stefx.train.param_groups(back, 1e-3, weight_decay=0.1))
    names = dict(q.named_parameters())
    for name, p in back.named_parameters():
        assert lr_back[id(p)] == lr[id(names[name])], name


@pytest.mark.parametrize("value", [0, -1.0, "fast", True])
@pytest.mark.parametrize("key", ["lr_scale", "latent_lr_scale"])
def test_lr_scales_must_be_positive_numbers(key, value):
    with pytest.raises(stefx.RecipeError, match=rf"{key}.*multiplier > 0"):
        stefx.make_quantizer({"type": "lsq", key: value})
