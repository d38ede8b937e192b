"""The named registry behind quantizers, estimators, cost formulas and hardware profiles."""

from __future__ import annotations

import pytest

from stefx import RecipeError
from stefx.registry import Registry


def number_registry() -> Registry[int]:
    return Registry("estimator", check=lambda item: isinstance(item, int))


def test_add_returns_the_item_and_get_finds_it():
    reg = number_registry()
    assert reg.add("clipped", 1) == 1
    assert reg.add("identity", 2) == 2
    assert reg.get("clipped") == 1 and reg.get("identity") == 2
    assert "clipped" in reg and "tanh" not in reg
    assert list(reg) == reg.names() == ["clipped", "identity"]


def test_register_decorator_adds_and_returns_the_item():
    reg: Registry[type] = Registry("formula")

    @reg.register("linear")
    class Linear:
        pass

    assert reg.get("linear") is Linear


def test_duplicate_is_rejected_and_keeps_the_first():
    reg = number_registry()
    reg.add("clipped", 1)
    with pytest.raises(
        ValueError, match=r"estimator 'clipped' is already registered.*replace=True"
    ):
        reg.add("clipped", 2)
    assert reg.get("clipped") == 1


def test_replace_true_overrides():
    reg = number_registry()
    reg.add("clipped", 1)
    assert reg.add("clipped", 2, replace=True) == 2
    assert reg.get("clipped") == 2
    assert reg.names() == ["clipped"]


def test_type_check_rejects_wrong_items():
    reg = number_registry()
    with pytest.raises(TypeError, match="cannot register 'one' as estimator 'clipped': wrong type"):
        reg.add("clipped", "one")
    assert "clipped" not in reg
    with pytest.raises(TypeError, match="wrong type"):
        reg.register("clipped")("one")


@pytest.mark.parametrize("name", ["", None, 3])
def test_name_must_be_a_non_empty_string(name):
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        number_registry().add(name, 1)


def test_miss_suggests_the_nearest_name_and_lists_the_registered():
    reg = number_registry()
    for i, name in enumerate(["clipped", "identity", "tanh"]):
        reg.add(name, i)
    with pytest.raises(RecipeError) as info:
        reg.get("cliped")
    assert str(info.value) == (
        "unknown estimator 'cliped' (did you mean 'clipped'?); registered: clipped, identity, tanh"
    )


def test_miss_without_a_close_name_has_no_suggestion():
    reg = number_registry()
    reg.add("clipped", 1)
    with pytest.raises(RecipeError) as info:
        reg.get("zzz")
    assert "did you mean" not in str(info.value)
    assert "'zzz'" in str(info.value) and "registered: clipped" in str(info.value)


def test_unhashable_name_is_a_miss_not_a_crash():
    reg = number_registry()
    reg.add("clipped", 1)
    with pytest.raises(RecipeError, match=r"unknown estimator \['clipped'\]"):
        reg.get(["clipped"])


def test_remove_forgets_and_tolerates_a_missing_name():
    reg = number_registry()
    reg.add("clipped", 1)
    reg.remove("clipped")
    reg.remove("never-added")
    assert "clipped" not in reg and reg.names() == []
    reg.add("clipped", 2)  # the name is free again
    assert reg.get("clipped") == 2


def test_registries_are_independent():
    a, b = number_registry(), number_registry()
    a.add("clipped", 1)
    assert "clipped" not in b
