"""Quantizer specs: the dicts recipes carry, validated into frozen records.

A spec is the same small dict everywhere (recipe files, ``make_quantizer``, saved
checkpoints)::

    {"type": "uniform", "num_bits": 4, "strategy": "channel", "symmetric": True}

Common keys are fields of :class:`QuantSpec`; keys a quantizer type adds (``beta`` for
SwishSign, ``alpha_init`` for PACT...) are declared by that type in ``options`` and land
in ``QuantSpec.options``. Validation happens once, here, and every error names the key,
the value and the valid choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from stefx.errors import RecipeError, did_you_mean
from stefx.registry import Registry

__all__ = [
    "COMMON_KEYS",
    "QUANTIZERS",
    "Options",
    "QuantSpec",
    "make_quantizer",
    "parse_spec",
    "register_quantizer",
]

COMMON_KEYS = (
    "type",
    "num_bits",
    "strategy",
    "axis",
    "group_size",
    "symmetric",
    "scale",
    "estimator",
    "enabled",
    "strength",
    "lr_scale",
    "latent_lr_scale",
)


def _is_quantizer_class(obj: object) -> bool:
    from stefx.ste.base import Quantizer

    return isinstance(obj, type) and issubclass(obj, Quantizer)


QUANTIZERS: Registry[type] = Registry("quantizer type", check=_is_quantizer_class)


class Options(Mapping[str, Any]):
    """The per-type options of a spec: a read-only mapping that hashes, compares, copies
    and pickles like the plain values it holds (a ``MappingProxyType`` does not pickle).

    >>> o = Options({"beta": 5.0})
    >>> o["beta"], dict(o), o == {"beta": 5.0}
    (5.0, {'beta': 5.0}, True)
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_items", dict(items or {}))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __eq__(self, other: object) -> bool:
        return dict(self._items) == dict(other) if isinstance(other, Mapping) else NotImplemented

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Options are read-only; use QuantSpec.replace(...)")

    def __reduce__(self):
        return (Options, (dict(self._items),))

    def __repr__(self) -> str:
        return f"Options({self._items!r})"


@dataclass(frozen=True)
class QuantSpec:
    """A validated quantizer spec. Build one with :func:`parse_spec`."""

    type: str
    num_bits: int
    strategy: str = "tensor"
    axis: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    scale: str = ""
    estimator: str = ""
    enabled: bool = True
    strength: float = 1.0
    # learning-rate multipliers that stefx.train.param_groups applies (None: 1): to this
    # quantizer's own learned state, and to the float ("latent") weight it guards
    lr_scale: float | None = None
    latent_lr_scale: float | None = None
    options: Options = field(default_factory=Options)

    def to_dict(self) -> dict[str, Any]:
        """The flat dict form, as written in a recipe (round-trips through parse_spec)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d.update(self.options)
        return {k: v for k, v in d.items() if v is not None}

    def replace(self, **changes: Any) -> QuantSpec:
        return parse_spec({**self.to_dict(), **changes})


def register_quantizer(name: str, *, replace: bool = False):
    """Class decorator adding a :class:`~stefx.ste.base.Quantizer` subclass under ``name``.

    >>> import stefx
    >>> @stefx.register_quantizer("my_sign")
    ... class MySign(stefx.Quantizer):
    ...     bits_choices = (1,)
    ...     def quantize(self, x):
    ...         return x + (x.sign() - x).detach()
    >>> stefx.make_quantizer({"type": "my_sign"}).bits
    1
    >>> stefx.ste.spec.QUANTIZERS.remove("my_sign")
    """

    def deco(cls: type) -> type:
        QUANTIZERS.add(name, cls, replace=replace)
        cls.type_name = name
        return cls

    return deco


def _fail(where: str, key: str, value: object, fix: str) -> RecipeError:
    return RecipeError(f"{where}: {key}={value!r} is invalid; {fix}")


def _choice(where: str, key: str, value: object, choices: tuple) -> None:
    if value not in choices:
        hint = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise _fail(where, key, value, f"choose one of {list(choices)}{hint}")


def _check_type(where: str, key: str, value: object, default: object) -> object:
    """Options are typed by their default: bool stays bool, int may widen to float."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise _fail(where, key, value, f"expected a {type(default).__name__}")
    return value


def parse_spec(spec: Mapping[str, Any] | QuantSpec, where: str = "quantizer spec") -> QuantSpec:
    """Validate a spec dict into a :class:`QuantSpec`; raise :class:`RecipeError` on any fault."""
    if isinstance(spec, QuantSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise RecipeError(f"{where}: expected a mapping like {{'type': 'uniform'}}, got {spec!r}")
    if "type" not in spec:
        raise RecipeError(f"{where}: missing key 'type'; choose one of {QUANTIZERS.names()}")
    try:
        cls = QUANTIZERS.get(spec["type"])
    except RecipeError as e:
        raise RecipeError(f"{where}: type: {e}") from None
    valid = COMMON_KEYS + tuple(cls.options)
    for key in spec:
        if key not in valid:
            raise RecipeError(
                f"{where}: unknown key {key!r} for type {spec['type']!r}"
                f"{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}"
            )
    get = spec.get
    bits = get("num_bits", cls.default_bits)
    _choice(where, "num_bits", bits, cls.bits_choices)
    strategy = get("strategy", cls.strategies[0])
    _choice(where, "strategy", strategy, cls.strategies)
    symmetric = get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise _fail(where, "symmetric", symmetric, "expected true or false")
    if not symmetric and not cls.allows_asymmetric:
        raise _fail(where, "symmetric", symmetric, f"type {spec['type']!r} is symmetric only")
    group_size = get("group_size")
    if strategy == "group":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise _fail(where, "group_size", group_size, "strategy 'group' needs a positive int")
    elif group_size is not None:
        raise _fail(where, "group_size", group_size, "only valid with strategy: group")
    axis = get("axis")
    if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
        raise _fail(where, "axis", axis, "expected an int (e.g. 0 for output channels)")
    scale = get("scale", cls.default_scale(symmetric))
    _choice(where, "scale", scale, cls.scales)
    estimator = get("estimator", cls.estimators[0])
    _choice(where, "estimator", estimator, cls.estimators)
    enabled = get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail(where, "enabled", enabled, "expected true or false")
    strength = get("strength", 1.0)
    if not isinstance(strength, (int, float)) or isinstance(strength, bool):
        raise _fail(where, "strength", strength, "expected a number in [0, 1]")
    if not 0.0 <= strength <= 1.0:
        raise _fail(where, "strength", strength, "expected a number in [0, 1]")
    lr_scales = {}
    for key in ("lr_scale", "latent_lr_scale"):
        value = get(key)
        if value is not None and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0
        ):
            raise _fail(where, key, value, "expected a learning-rate multiplier > 0, e.g. 0.1")
        lr_scales[key] = None if value is None else float(value)
    options = {
        k: _check_type(where, k, get(k, default), default) for k, default in cls.options.items()
    }
    cls.check_options(options, where)
    cls.check_scale(scale, symmetric, where)
    return QuantSpec(
        type=spec["type"],
        num_bits=bits,
        strategy=strategy,
        axis=axis,
        group_size=group_size,
        symmetric=symmetric,
        scale=scale,
        estimator=estimator,
        enabled=enabled,
        strength=float(strength),
        **lr_scales,
        options=Options(options),
    )


def make_quantizer(spec: Mapping[str, Any] | QuantSpec, where: str = "quantizer spec"):
    """Build the quantizer module a spec describes.

    >>> import torch, stefx
    >>> q = stefx.make_quantizer({"type": "uniform", "num_bits": 4, "strategy": "channel"})
    >>> q.bits
    4
    >>> q(torch.tensor([[0.1, -0.7, 0.35]]))
    tensor([[ 0.1000, -0.7000,  0.4000]])
    """
    parsed = parse_spec(spec, where)
    return QUANTIZERS.get(parsed.type)(parsed)
