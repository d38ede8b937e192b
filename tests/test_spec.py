"""Quantizer specs: ``parse_spec`` / ``make_quantizer`` validation and ``register_quantizer``.

Every rejected spec raises :class:`stefx.RecipeError` whose message names the key, the
bad value and the fix (the valid choices, or the nearest valid name).
"""

from __future__ import annotations

import copy
import dataclasses
from types import MappingProxyType

import pytest
import torch

import stefx
from stefx import RecipeError, StefxError
from stefx.ste.spec import QUANTIZERS, QuantSpec, parse_spec, register_quantizer
from stefx.ste.uniform import UniformQuantizer

U = {"type": "uniform"}

# (bad spec, fragments its message must contain)
BAD_SPECS = [
    pytest.param(
        {**U, "num_bit": 4},
        ["'num_bit'", "did you mean 'num_bits'?", "valid keys:", "strategy"],
        id="key-typo",
    ),
    pytest.param(
        {"type": "unifrom"}, ["type", "'unifrom'", "did you mean 'uniform'?"], id="type-typo"
    ),
    pytest.param({"type": ["uniform"]}, ["type", "['uniform']", "registered:"], id="type-list"),
    pytest.param(
        {**U, "strategy": "chanel"},
        ["strategy='chanel'", "did you mean 'channel'?", "'tensor', 'channel', 'group', 'token'"],
        id="strategy-typo",
    ),
    pytest.param(
        {**U, "strategy": "group"},
        ["group_size=None", "strategy 'group' needs a positive int"],
        id="group-without-group-size",
    ),
    pytest.param(
        {**U, "strategy": "group", "group_size": 0},
        ["group_size=0", "positive int"],
        id="group-size-zero",
    ),
    pytest.param(
        {**U, "strategy": "group", "group_size": True},
        ["group_size=True", "positive int"],
        id="group-size-bool",
    ),
    pytest.param(
        {**U, "strategy": "channel", "group_size": 32},
        ["group_size=32", "only valid with strategy: group"],
        id="group-size-without-group",
    ),
    pytest.param({**U, "strength": 1.5}, ["strength=1.5", "[0, 1]"], id="strength-high"),
    pytest.param({**U, "strength": -0.1}, ["strength=-0.1", "[0, 1]"], id="strength-low"),
    pytest.param({**U, "strength": "1"}, ["strength='1'", "[0, 1]"], id="strength-str"),
    pytest.param({**U, "strength": True}, ["strength=True", "[0, 1]"], id="strength-bool"),
    pytest.param(
        {**U, "symmetric": "false"}, ["symmetric='false'", "true or false"], id="symmetric-str"
    ),
    pytest.param({**U, "enabled": "yes"}, ["enabled='yes'", "true or false"], id="enabled-str"),
    pytest.param({**U, "enabled": 1}, ["enabled=1", "true or false"], id="enabled-int"),
    pytest.param(
        {**U, "num_bits": 9}, ["num_bits=9", "[2, 3, 4, 5, 6, 7, 8, 16]"], id="bits-choice"
    ),
    pytest.param({**U, "num_bits": "4"}, ["num_bits='4'", "choose one of"], id="bits-str"),
    pytest.param(
        {**U, "scale": "absmx"}, ["scale='absmx'", "did you mean 'absmax'?", "'minmax'"], id="scale"
    ),
    pytest.param(
        {**U, "estimator": "clip"},
        ["estimator='clip'", "did you mean 'clipped'?", "'identity'"],
        id="estimator",
    ),
    pytest.param({**U, "axis": "0"}, ["axis='0'", "expected an int"], id="axis-str"),
    pytest.param({**U, "axis": False}, ["axis=False", "expected an int"], id="axis-bool"),
    pytest.param(["uniform"], ["expected a mapping", "['uniform']"], id="not-a-mapping"),
    pytest.param("uniform", ["expected a mapping", "'uniform'"], id="a-string"),
    pytest.param({"num_bits": 4}, ["missing key 'type'", "'uniform'"], id="missing-type"),
]


@pytest.mark.parametrize(("spec", "fragments"), BAD_SPECS)
@pytest.mark.parametrize("entry", [parse_spec, stefx.make_quantizer])
def test_bad_spec_raises_recipe_error_naming_key_value_and_fix(entry, spec, fragments):
    with pytest.raises(RecipeError) as info:
        entry(spec, where="rule 'attn'")
    message = str(info.value)
    assert message.startswith("rule 'attn': ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_recipe_error_is_a_stefx_error_and_a_value_error():
    assert issubclass(RecipeError, StefxError) and issubclass(RecipeError, ValueError)
    with pytest.raises(ValueError):
        parse_spec({"type": "uniform", "num_bits": 1})


def test_defaults_come_from_the_quantizer_type():
    spec = parse_spec({"type": "uniform"})
    assert (spec.num_bits, spec.strategy, spec.scale, spec.estimator) == (
        8,
        "tensor",
        "absmax",
        "clipped",
    )
    assert parse_spec({"type": "uniform", "symmetric": False}).scale == "minmax"
    assert spec.enabled is True and spec.strength == 1.0 and spec.axis is None


def test_integer_strength_becomes_float():
    spec = parse_spec({"type": "uniform", "strength": 0})
    assert spec.strength == 0.0 and isinstance(spec.strength, float)


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "uniform"},
        {"type": "uniform", "num_bits": 4, "strategy": "channel", "axis": 1},
        {"type": "uniform", "num_bits": 3, "strategy": "group", "group_size": 64},
        {"type": "uniform", "num_bits": 8, "strategy": "token", "symmetric": False},
        {"type": "uniform", "estimator": "identity", "enabled": False, "strength": 0.25},
    ],
)
def test_to_dict_round_trips_through_parse_spec(raw):
    spec = parse_spec(raw)
    flat = spec.to_dict()
    assert all(flat[k] == v for k, v in raw.items())
    assert parse_spec(flat) == spec
    assert parse_spec(spec) is spec


def test_replace_validates_and_leaves_the_original():
    spec = parse_spec({"type": "uniform", "num_bits": 4})
    assert spec.replace(num_bits=2).num_bits == 2 and spec.num_bits == 4
    with pytest.raises(RecipeError, match="num_bits=1"):
        spec.replace(num_bits=1)


def test_spec_dict_is_not_mutated_or_kept():
    raw = {"type": "uniform", "num_bits": 4, "strategy": "group", "group_size": 8}
    before = copy.deepcopy(raw)
    spec = parse_spec(raw)
    q = stefx.make_quantizer(raw)
    UniformQuantizer({k: v for k, v in raw.items() if k != "type"})
    spec.replace(num_bits=2)
    assert raw == before
    raw["num_bits"] = 2  # later edits by the caller do not reach the parsed spec
    assert spec.num_bits == 4 and q.spec.num_bits == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_bits = 2


def test_quantizer_accepts_a_dict_without_type():
    q = UniformQuantizer({"num_bits": 4, "strategy": "channel"})
    assert q.spec.type == "uniform" and q.bits == 4 and q.spec.strategy == "channel"


def test_strength_setter_validates():
    q = stefx.make_quantizer({"type": "uniform"})
    q.strength = 0.3
    assert q.strength == 0.3
    with pytest.raises(RecipeError, match=r"strength=2 .*\[0, 1\]"):
        q.strength = 2


# ------------------------------------------------------------------------ registration


@pytest.fixture
def sign_type():
    """A one-bit test quantizer with typed options, registered for one test."""
    name = "test_sign"

    @register_quantizer(name)
    class SignForTest(stefx.Quantizer):
        bits_choices = (1,)
        estimators = ("identity", "clipped")
        options = MappingProxyType({"beta": 1.0, "hard": False, "mode": "a"})

        @classmethod
        def check_options(cls, options, where):
            if options["mode"] not in ("a", "b"):
                raise RecipeError(f"{where}: mode={options['mode']!r} is invalid; use 'a' or 'b'")

        def quantize(self, x):
            return x + (torch.sign(x) * self.spec.options["beta"] - x).detach()

    try:
        yield name, SignForTest
    finally:
        QUANTIZERS.remove(name)
    assert name not in QUANTIZERS


def test_registered_type_is_usable(sign_type):
    name, cls = sign_type
    assert cls.type_name == name and cls.default_bits == 1
    q = stefx.make_quantizer({"type": name, "beta": 2})
    assert isinstance(q, cls) and q.bits == 1
    assert q.spec.options == {"beta": 2.0, "hard": False, "mode": "a"}
    assert isinstance(q.spec.options["beta"], float)
    x = torch.tensor([-0.5, 0.25], requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert y.tolist() == [-2.0, 2.0] and x.grad.tolist() == [1.0, 1.0]
    assert parse_spec(q.spec.to_dict()) == q.spec  # options round-trip flat
    with pytest.raises(TypeError):
        q.spec.options["beta"] = 3.0  # read-only


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"beta": "2"}, ["beta='2'", "expected a float"]),
        ({"beta": True}, ["beta=True", "expected a float"]),
        ({"hard": "no"}, ["hard='no'", "expected a bool"]),
        ({"mode": 1}, ["mode=1", "expected a str"]),
        ({"mode": "c"}, ["mode='c'", "use 'a' or 'b'"]),
        ({"symmetric": False}, ["symmetric=False", "symmetric only"]),
        ({"num_bits": 2}, ["num_bits=2", "[1]"]),
        ({"strategy": "channel"}, ["strategy='channel'", "['tensor']"]),
        ({"bet": 1.0}, ["'bet'", "did you mean 'beta'?", "beta, hard, mode"]),
    ],
)
def test_registered_type_validates_its_own_vocabulary(sign_type, changes, fragments):
    name, _ = sign_type
    with pytest.raises(RecipeError) as info:
        stefx.make_quantizer({"type": name, **changes})
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


def test_register_rejects_a_duplicate_name(sign_type):
    name, cls = sign_type

    class Other(stefx.Quantizer):
        pass

    with pytest.raises(ValueError, match=f"'{name}' is already registered.*replace=True"):
        register_quantizer(name)(Other)
    assert QUANTIZERS.get(name) is cls
    with pytest.raises(ValueError, match="'uniform' is already registered"):
        register_quantizer("uniform")(Other)
    assert QUANTIZERS.get("uniform") is UniformQuantizer


def test_register_replace_true_overrides(sign_type):
    name, _ = sign_type

    class Newer(stefx.Quantizer):
        bits_choices = (1,)

    assert register_quantizer(name, replace=True)(Newer) is Newer
    assert type(stefx.make_quantizer({"type": name})) is Newer


def test_register_rejects_a_non_quantizer():
    with pytest.raises(TypeError, match="wrong type"):
        register_quantizer("test_not_a_quantizer")(dict)
    assert "test_not_a_quantizer" not in QUANTIZERS


def test_quantspec_direct_construction_keeps_defaults():
    spec = QuantSpec(type="uniform", num_bits=4)
    assert spec.options == {} and spec.to_dict()["strategy"] == "tensor"


def test_uniform_scale_must_agree_with_symmetric():
    with pytest.raises(RecipeError, match="scale='absmax' contradicts symmetric=False"):
        stefx.make_quantizer({"type": "uniform", "symmetric": False, "scale": "absmax"})
    assert stefx.make_quantizer({"type": "uniform", "symmetric": False}).spec.scale == "minmax"
