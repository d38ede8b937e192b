"""Recipes: which ops to quantize and how, validated once into frozen records.

A recipe is a preset name (``recipes/<name>.yaml``), a YAML or TOML path, a dict, or a
:class:`Recipe`. Its shape::

    name: w4a8
    description: ...
    extends: w8a8                 # optional: a preset name or a path; its rules come first
    on_no_match: error            # error | warn | ignore, for rules that select nothing;
                                  # default: the parent's (else error); a rule may set its own
    rules:
      - targets: [Linear, Conv1D] # op kinds, module types, names (glob) or "re:<regex>"
        ignore: [lm_head]         # same vocabulary; removes sites from this rule
        within: "re:.*self_attn"  # only sites inside modules whose name matches
        position: first           # first | last: keep the first/last site in run order
        pattern: [conv, batch_norm, relu]   # a chain of ops, matched on the graph:
                                  # weights/inputs go to its first op, outputs to its last
        fold_bn: true             # fold the BatchNorm after the first op into its weights
        weights: {type: lsq, num_bits: 4, strategy: channel}
        input_activations: {type: uniform, num_bits: 8, strategy: token}
        output_activations: false # false: keep this tensor in float

**Which rule wins**: rules apply in order and a later rule overrides an earlier one, field
by field: for each site, ``weights``, ``input_activations`` and ``output_activations`` come
from the last matching rule that sets that field (``false`` sets it to float). Rules of an
``extends`` parent come before the child's, so a child refines its parent. Each rule keeps
the ``on_no_match`` of the recipe it was written in (or its own): a preset's rules that miss
on an architecture stay ignored when a child extends it, and a child that does not say
otherwise inherits its parent's policy.

This module only reads and validates; it never touches a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stefx.errors import RecipeError, did_you_mean
from stefx.ste.spec import QuantSpec, parse_spec

__all__ = ["FIELDS", "Recipe", "Rule", "load_recipe", "preset_names", "presets_dir"]

FIELDS = ("weights", "input_activations", "output_activations")
RULE_KEYS = (
    "name",
    "targets",
    "ignore",
    "within",
    "position",
    "pattern",
    "fold_bn",
    "on_no_match",
    *FIELDS,
)
RECIPE_KEYS = ("name", "description", "extends", "on_no_match", "rules", "source")
POSITIONS = ("first", "last")
ON_NO_MATCH = ("error", "warn", "ignore")

#: A field set to ``false``: keep this tensor in float even if an earlier rule quantized it.
FLOAT = "float"


@dataclass(frozen=True)
class Rule:
    """One validated rule. ``weights`` etc. are a QuantSpec, ``FLOAT``, or None (not set)."""

    index: int
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    within: str | None = None
    position: str | None = None
    pattern: tuple[str, ...] = ()
    fold_bn: bool = False
    weights: QuantSpec | str | None = None
    input_activations: QuantSpec | str | None = None
    output_activations: QuantSpec | str | None = None
    name: str = ""
    on_no_match: str = "error"  # what to do when this rule selects nothing

    @property
    def label(self) -> str:
        return f"rule {self.index}" + (f" ({self.name})" if self.name else "")

    def to_dict(self, on_no_match: str = "error") -> dict[str, Any]:
        """The rule as recipe text; ``on_no_match`` is written only where it differs from
        the recipe's (the one passed in)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "index" or value in (None, (), "", False):
                continue
            if f.name == "on_no_match" and value == on_no_match:
                continue
            if isinstance(value, QuantSpec):
                value = value.to_dict()
            elif value == FLOAT:
                value = False
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build one with :func:`load_recipe` or :meth:`from_dict`."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    on_no_match: str = "error"
    source: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> Recipe:
        return _recipe_from_dict(data, base_dir=base_dir, seen=())

    def to_dict(self) -> dict[str, Any]:
        """The recipe as data (``extends`` resolved: the parent's rules are written out);
        :meth:`from_dict` reads it back to an equal Recipe."""
        out = {
            "name": self.name,
            "description": self.description,
            "on_no_match": self.on_no_match,
            "rules": [r.to_dict(self.on_no_match) for r in self.rules],
        }
        return {**out, "source": self.source} if self.source else out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def presets_dir() -> Path:
    """The folder holding the preset recipes shipped with stefx."""
    return Path(__file__).resolve().parent / "recipes"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def load_recipe(recipe: Recipe | Mapping[str, Any] | str | Path) -> Recipe:
    """Turn any accepted recipe form into a validated :class:`Recipe`.

    >>> load_recipe("w8a8").name
    'w8a8'
    """
    return _load(recipe, seen=())


def _load(recipe: Any, *, seen: tuple[str, ...], base_dir: Path | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return _recipe_from_dict(recipe, base_dir=base_dir, seen=seen)
    if not isinstance(recipe, (str, Path)):
        raise RecipeError(
            f"recipe: expected a preset name, a path, a dict or a stefx.Recipe, got "
            f"{type(recipe).__name__}"
        )
    path = _resolve_path(recipe, base_dir)
    key = str(path)
    if key in seen:
        raise RecipeError(f"recipe: 'extends' forms a cycle: {' -> '.join((*seen, key))}")
    data = _read_file(path)
    data.setdefault("name", path.stem)
    data["source"] = str(path)
    return _recipe_from_dict(data, base_dir=path.parent, seen=(*seen, key))


def _resolve_path(recipe: str | Path, base_dir: Path | None) -> Path:
    text = str(recipe)
    candidates = [Path(text)]
    if base_dir is not None:
        candidates.insert(0, base_dir / text)
    for path in candidates:
        if path.is_file():
            return path
    looks_like_file = isinstance(recipe, Path) or "/" in text or Path(text).suffix
    if not looks_like_file:
        preset = presets_dir() / f"{text}.yaml"
        if preset.is_file():
            return preset
        names = preset_names()
        raise RecipeError(
            f"recipe: no preset named {text!r}{did_you_mean(text, names)}; "
            f"presets: {', '.join(names)} (or pass a path to a .yaml/.toml file)"
        )
    raise RecipeError(f"recipe: file not found: {text!r}")


def _read_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:  # a parse error: say where, keep the parser's own words
        raise RecipeError(f"recipe {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping at top level, got {data!r}")
    return data


def _str_list(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(
            f"{where}: {key}={value!r} is invalid; expected a list of non-empty strings"
        )
    return tuple(value)


def _field(value: Any, where: str) -> QuantSpec | str | None:
    if value is None:
        return None
    if value is False:
        return FLOAT
    return parse_spec(value, where)


def _on_no_match(value: Any, where: str) -> str:
    if value not in ON_NO_MATCH:
        raise RecipeError(
            f"{where}: on_no_match={value!r} is invalid; choose one of {list(ON_NO_MATCH)}"
        )
    return value


def _rule_from_dict(data: Any, index: int, where_recipe: str, on_no_match: str) -> Rule:
    where = f"{where_recipe} rule {index}"
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping with 'targets', got {data!r}")
    for key in data:
        if key not in RULE_KEYS:
            raise RecipeError(
                f"{where}: unknown key {key!r}{did_you_mean(key, RULE_KEYS)}; "
                f"valid keys: {', '.join(RULE_KEYS)}"
            )
    targets = _str_list(data.get("targets"), where, "targets")
    pattern = _str_list(data.get("pattern"), where, "pattern")
    if not targets and not pattern:
        raise RecipeError(
            f"{where}: needs 'targets' (e.g. targets: [Linear]) or a 'pattern' "
            f"(e.g. pattern: [conv, batch_norm, relu])"
        )
    position = data.get("position")
    if position is not None and position not in POSITIONS:
        raise RecipeError(
            f"{where}: position={position!r} is invalid; choose one of {list(POSITIONS)}"
            f"{did_you_mean(position, POSITIONS) if isinstance(position, str) else ''}"
        )
    within = data.get("within")
    if within is not None and (not isinstance(within, str) or not within):
        raise RecipeError(f"{where}: within={within!r} is invalid; expected a name glob or re:")
    fold_bn = data.get("fold_bn", False)
    if not isinstance(fold_bn, bool):
        raise RecipeError(f"{where}: fold_bn={fold_bn!r} is invalid; expected true or false")
    fields = {f: _field(data.get(f), f"{where} {f}") for f in FIELDS}
    if fold_bn and (len(pattern) < 2 or not isinstance(fields["weights"], QuantSpec)):
        raise RecipeError(
            f"{where}: fold_bn=true folds the BatchNorm that follows a weighted op into the "
            "quantized weights, so it needs a pattern whose second op is the BatchNorm and "
            "a weights spec, e.g. pattern: [conv, batch_norm, relu] with weights: {...}"
        )
    if all(v is None for v in fields.values()):
        raise RecipeError(
            f"{where}: sets none of {', '.join(FIELDS)}; add e.g. "
            f"weights: {{type: uniform, num_bits: 8}}"
        )
    _check_patterns((*targets, *_str_list(data.get("ignore"), where, "ignore")), where)
    return Rule(
        index=index,
        targets=targets,
        ignore=_str_list(data.get("ignore"), where, "ignore"),
        within=within,
        position=position,
        pattern=pattern,
        fold_bn=fold_bn,
        name=str(data.get("name", "")),
        on_no_match=_on_no_match(data.get("on_no_match", on_no_match), where),
        **fields,
    )


def _check_patterns(selectors: Sequence[str], where: str) -> None:
    import re

    for s in selectors:
        if s.startswith("re:"):
            try:
                re.compile(s[3:])
            except re.error as e:
                raise RecipeError(
                    f"{where}: {s!r} is not a valid regular expression: {e}"
                ) from None


def _recipe_from_dict(
    data: Mapping[str, Any], *, base_dir: Path | None, seen: tuple[str, ...]
) -> Recipe:
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe: expected a mapping, got {data!r}")
    name = str(data.get("name", "recipe"))
    where = f"recipe {name!r}"
    for key in data:
        if key not in RECIPE_KEYS:
            raise RecipeError(
                f"{where}: unknown key {key!r}{did_you_mean(key, RECIPE_KEYS)}; "
                f"valid keys: {', '.join(RECIPE_KEYS)}"
            )
    parent_rules: tuple[Rule, ...] = ()
    inherited = "error"
    if data.get("extends") is not None:
        parent = _load(data["extends"], seen=seen, base_dir=base_dir)
        parent_rules, inherited = parent.rules, parent.on_no_match
    on_no_match = _on_no_match(data.get("on_no_match", inherited), where)
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise RecipeError(f"{where}: rules={raw_rules!r} is invalid; expected a list of rules")
    if not raw_rules and not parent_rules:
        raise RecipeError(f"{where}: has no rules; add at least one under 'rules:'")
    rules = list(parent_rules)
    for raw in raw_rules:
        rules.append(_rule_from_dict(raw, len(rules), where, on_no_match))
    return Recipe(
        name=name,
        rules=tuple(rules),
        description=str(data.get("description", "")),
        on_no_match=on_no_match,
        source=str(data.get("source", "")),
    )
