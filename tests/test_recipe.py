"""Recipe loading and validation: every fault is a RecipeError naming rule, key, value, fix."""

from __future__ import annotations

import pytest

import stefx  # noqa: F401  (registers every quantizer type)
from stefx.errors import RecipeError, StefxError
from stefx.recipe import FLOAT, Recipe, load_recipe, preset_names

BASE = {
    "name": "t",
    "rules": [{"targets": ["linear"], "weights": {"type": "uniform", "num_bits": 4}}],
}


def test_every_preset_loads_and_cites_a_source():
    names = preset_names()
    assert {"w8a8", "w4a8", "w4a16-g128", "w2a16-g64", "bnn", "xnor", "bireal"} <= set(names)
    assert {"ternary-twn", "bitnet-b158", "paretoq-2bit", "dorefa-w1a2", "pact-w4a4"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.rules
        cites = "arXiv:" in recipe.description or "https://" in recipe.description
        assert cites, f"{name} does not cite its source (a paper or the format's code)"


def test_dict_yaml_and_toml_give_the_same_recipe(tmp_path):
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text(
        "name: t\nrules:\n  - targets: [linear]\n    weights: {type: uniform, num_bits: 4}\n"
    )
    toml_path = tmp_path / "r.toml"
    toml_path.write_text(
        'name = "t"\n[[rules]]\ntargets = ["linear"]\nweights = {type = "uniform", num_bits = 4}\n'
    )
    from_dict = load_recipe(BASE)
    assert load_recipe(yaml_path).rules == from_dict.rules
    assert load_recipe(str(toml_path)).rules == from_dict.rules
    assert load_recipe(from_dict) is from_dict


def test_round_trip_through_to_dict():
    recipe = load_recipe("bnn")
    again = Recipe.from_dict(recipe.to_dict())
    assert again.rules == recipe.rules


def test_false_keeps_a_field_in_float():
    recipe = load_recipe("xnor")
    assert recipe.rules[1].position == "first"
    assert recipe.rules[1].weights == FLOAT


def test_extends_puts_parent_rules_first(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text(
        "name: child\nextends: w8a8\nrules:\n"
        "  - targets: [q_proj]\n    weights: {type: uniform, num_bits: 4}\n"
    )
    child = load_recipe(path)
    parent = load_recipe("w8a8")
    assert child.rules[: len(parent.rules)] == parent.rules
    assert child.rules[-1].targets == ("q_proj",)
    assert child.rules[-1].index == len(parent.rules)


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nextends: b.yaml\nrules: []\n")
    (tmp_path / "b.yaml").write_text("name: b\nextends: a.yaml\nrules: []\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("rule", "needles"),
    [
        ({"targts": ["linear"], "weights": {"type": "uniform"}}, ["rule 0", "targts", "targets"]),
        ({"targets": ["linear"]}, ["rule 0", "weights"]),
        ({"weights": {"type": "uniform"}}, ["rule 0", "targets"]),
        (
            {"targets": ["linear"], "weights": {"type": "uniform", "num_bits": 3.5}},
            ["rule 0 weights", "num_bits", "3.5"],
        ),
        (
            {"targets": ["linear"], "weights": {"type": "unifrom"}},
            ["rule 0 weights", "unifrom", "uniform"],
        ),
        (
            {"targets": ["linear"], "position": "frist", "weights": {"type": "uniform"}},
            ["position", "frist", "first"],
        ),
        ({"targets": "re:(", "weights": {"type": "uniform"}}, ["re:(", "regular expression"]),
        ({"targets": [3], "weights": {"type": "uniform"}}, ["targets", "3"]),
    ],
)
def test_bad_rules_name_rule_key_value_and_fix(rule, needles):
    with pytest.raises(RecipeError) as info:
        load_recipe({"name": "bad", "rules": [rule]})
    assert isinstance(info.value, StefxError)
    for needle in needles:
        assert needle in str(info.value)


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(RecipeError, match="did you mean 'w4a8'"):
        load_recipe("w4a9")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(RecipeError, match="cannot parse"):
        load_recipe(bad)


def test_top_level_faults():
    with pytest.raises(RecipeError, match="on_no_match"):
        load_recipe({**BASE, "on_no_match": "maybe"})
    with pytest.raises(RecipeError, match="rulez"):
        load_recipe({"name": "t", "rulez": []})
    with pytest.raises(RecipeError, match="no rules"):
        load_recipe({"name": "t", "rules": []})
    with pytest.raises(RecipeError, match="expected a preset name"):
        load_recipe(42)


def test_the_users_dict_is_not_mutated():
    import copy

    data = copy.deepcopy(BASE)
    load_recipe(data)
    assert data == BASE


def test_fold_bn_needs_a_bn_pattern_and_weights():
    rule = {"pattern": ["conv", "batch_norm"], "fold_bn": True, "weights": {"type": "uniform"}}
    assert load_recipe({"name": "t", "rules": [rule]}).rules[0].fold_bn is True
    for bad in (
        {**rule, "pattern": ["conv"]},  # nothing after the conv to fold
        {
            "pattern": ["conv", "batch_norm"],
            "fold_bn": True,
            "input_activations": {"type": "uniform"},
        },
        {**rule, "weights": False},
    ):
        with pytest.raises(RecipeError, match=r"rule 0: fold_bn=true .* needs a pattern"):
            load_recipe({"name": "t", "rules": [bad]})
    with pytest.raises(RecipeError, match="fold_bn='yes' is invalid"):
        load_recipe({"name": "t", "rules": [{**rule, "fold_bn": "yes"}]})
