"""Generate ``docs/recipes.md``, the recipe reference, from stefx's code and preset files.

Recipe and rule keys come from :mod:`stefx.recipe`, quantizer spec keys, their valid
values and defaults from the registered quantizer classes (:data:`stefx.ste.spec.QUANTIZERS`),
selector kinds from :mod:`stefx.capture.kinds`, and one section per preset from the YAML
files ``stefx.recipe.presets_dir()`` holds. ``tests/test_docs.py`` fails when the file
on disk differs from what this writes::

    python tools/gen_recipe_docs.py            # rewrite docs/recipes.md
    python tools/gen_recipe_docs.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

import stefx  # noqa: F401  (registers the built-in quantizer types)
from stefx.capture import kinds
from stefx.recipe import ON_NO_MATCH, POSITIONS, RECIPE_KEYS, RULE_KEYS, preset_names, presets_dir
from stefx.ste.spec import COMMON_KEYS, QUANTIZERS
from stefx.ste.uniform import ROUNDINGS, SCALE_DTYPES

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "recipes.md"

# Options whose valid values the classes check in code rather than declare.
OPTION_CHOICES = {
    "rounding": ROUNDINGS,
    "scale_dtype": tuple(SCALE_DTYPES),
    "threshold": ("none", "learned", "auto"),  # stefx.ste.binary.BinaryQuantizer.check_options
}

# What each key means. The keys themselves come from the code; a key without a line here
# (a new one) stops the generator, so the reference cannot silently miss it.
RECIPE_DOC = {
    "name": ("the file's stem", "The recipe's name (reports, saved plans)."),
    "description": ('""', "Free text; the presets cite their source here."),
    "extends": (
        "none",
        "A preset name or a path (relative to this file first). The parent's rules come "
        "first, so the child's rules refine them.",
    ),
    "on_no_match": (
        "the parent's, else `error`",
        f"What a rule that selects nothing does: one of {', '.join(ON_NO_MATCH)}. A recipe "
        "whose rules select nothing at all always fails.",
    ),
    "rules": ("[] (required unless `extends`)", "The list of rules below, applied in order."),
    "source": (
        "the file's path",
        "Set by the loader; where the recipe was read from.",
    ),
}
RULE_DOC = {
    "name": ('""', "A label for messages and `explain`."),
    "targets": (
        "[] (this or `pattern` required)",
        "Selectors: the sites this rule picks (see *Selectors*).",
    ),
    "ignore": ("[]", "Selectors removed from this rule's selection."),
    "within": (
        "none",
        "A name glob or `re:` regex: only sites inside a module whose name matches "
        "(any enclosing module, matched like a selector name).",
    ),
    "position": (
        "none",
        f"One of {', '.join(POSITIONS)}: keep only the first or last of the selected "
        "sites, in run order, among the modules that ran on the example inputs.",
    ),
    "pattern": (
        "[]",
        "A chain of selectors matched on the graph (each op feeds only the next): "
        "`weights` and `input_activations` go to the chain's first op, "
        "`output_activations` to its last.",
    ),
    "fold_bn": (
        "false",
        "Fold the BatchNorm that follows the pattern's first op into its quantized "
        "weights; needs a pattern whose second op is the BatchNorm and a `weights` spec.",
    ),
    "on_no_match": ("the recipe's", f"This rule's own policy: {', '.join(ON_NO_MATCH)}."),
    "weights": ("not set", "A quantizer spec for the site's weight, or `false` (float)."),
    "input_activations": (
        "not set",
        "A quantizer spec for the op's input activation, or `false` (float).",
    ),
    "output_activations": (
        "not set",
        "A quantizer spec for the op's output, or `false` (float).",
    ),
}
SPEC_DOC = {
    "type": "The quantizer type (one of the sections below). Required.",
    "num_bits": "Bits per code. Valid values and default: per type.",
    "strategy": "Scale granularity: `tensor`, `channel` (output channel, axis 0), "
    "`group` (runs of `group_size` along the input), `token` (one per vector along "
    "`axis`, default the last). Valid values per type; the default is the first listed.",
    "axis": "The axis of `channel` / `token` scales (an int); default: the type's.",
    "group_size": "Elements per scale group; required with `strategy: group`, "
    "refused otherwise. The last group of a row may be shorter.",
    "symmetric": "`true` (default): signed codes around zero. `false`: unsigned codes "
    "(with a zero point for `uniform`); only types that allow it.",
    "scale": "How the scale is found; valid values per type.",
    "estimator": "The backward surrogate; valid values per type (see docs/ste.md).",
    "enabled": "`false` makes the quantizer an exact identity. Default `true`.",
    "strength": "λ in [0, 1]: `y = x + λ·(q(x) − x)`. Default 1.0.",
    "lr_scale": "Learning-rate multiplier for the quantizer's learned state "
    "(`stefx.train.param_groups`, `QATTrainer`). Default: none (1).",
    "latent_lr_scale": "On a weight quantizer: multiplier for the float weight it "
    "guards. Default: none (1).",
}
SPEC_DEFAULTS = {
    "type": "required",
    "num_bits": "per type",
    "strategy": "per type",
    "axis": "none",
    "group_size": "none",
    "symmetric": "true",
    "scale": "per type",
    "estimator": "per type",
    "enabled": "true",
    "strength": "1.0",
    "lr_scale": "none",
    "latent_lr_scale": "none",
}


def _check(doc: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in doc]
    stale = [k for k in doc if k not in keys]
    if missing or stale:
        raise SystemExit(
            f"gen_recipe_docs: {what}: undocumented keys {missing}, keys no longer in the "
            f"code {stale}; update the tables in tools/gen_recipe_docs.py"
        )


def _code(values) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out


def _paper(cls: type) -> str:
    """The first line of the quantizer module's docstring: its name and paper."""
    doc = sys.modules[cls.__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def quantizer_section(name: str, cls: type) -> list[str]:
    """The reference of one quantizer type, read off its class attributes."""
    rows = [
        ("num_bits", _code(cls.bits_choices), f"`{cls.default_bits}`"),
        ("strategy", _code(cls.strategies), f"`{cls.strategies[0]}`"),
    ]
    sym = "`true`, `false`" if cls.allows_asymmetric else "`true` only"
    rows.append(("symmetric", sym, "`true`"))
    scale_default = f"`{cls.default_scale(True)}`"
    if cls.allows_asymmetric and cls.default_scale(False) != cls.default_scale(True):
        scale_default += f" (`{cls.default_scale(False)}` with `symmetric: false`)"
    rows.append(("scale", _code(cls.scales), scale_default))
    rows.append(("estimator", _code(cls.estimators), f"`{cls.estimators[0]}`"))
    for key, default in cls.options.items():
        choices = {"init": getattr(cls, "inits", None), "role": getattr(cls, "roles", None)}
        choices = choices.get(key) or OPTION_CHOICES.get(key)
        valid = _code(choices) if choices else f"a {type(default).__name__}"
        rows.append((key, valid, f"`{_yaml_value(default)}`"))
    lines = [f"### `{name}`", "", _paper(cls), ""]
    lines += _table(("key", "valid values", "default"), [(f"`{k}`", v, d) for k, v, d in rows])
    papers = dict.fromkeys(re.findall(r"arXiv:\d{4}\.\d{4,5}", sys.modules[cls.__module__].__doc__))
    lines += ["", f"Class `{cls.__module__}.{cls.__name__}`"]
    if papers:
        lines[-1] += "; papers its docstring cites: " + ", ".join(papers)
    lines[-1] += "."
    return [*lines, ""]


def _preset_body(path: Path) -> str:
    """The preset file without its ``name`` and ``description`` (shown as text above)."""
    lines, skip = [], False
    for line in path.read_text().splitlines():
        top = line[:1] not in ("", " ", "\t", "#")
        if top:
            skip = line.split(":", 1)[0] in ("name", "description")
        if not skip:
            lines.append(line)
    return "\n".join(lines).strip("\n")


def preset_section(name: str) -> list[str]:
    path = presets_dir() / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    description = " ".join(str(data.get("description", "")).split())
    return [
        f"### `{name}`",
        "",
        description,
        "",
        "```yaml",
        _preset_body(path),
        "```",
        "",
    ]


MATCHING = """\
## How rules match, and which one wins

A **site** is a place a quantizer can go: a module op with a weight (a `Linear`, a `Conv`,
an `Embedding`, fused MoE experts, an `nn.MultiheadAttention`...) or a weightless
functional op (attention's `matmul`s, `bmm`, `einsum`, `sdpa`), named by its module path
(`model.layers.0.self_attn.q_proj`) or `<module>.<kind>_<n>` for a functional op. A module
with weights that did not run on the example inputs is still a site (`explain` marks it
`(did not run)`); `position` counts only sites that ran, and patterns, read off the graph,
cannot match it.

**What one rule selects**, in this order:

1. `targets`: every site that any selector picks (with a `pattern`, the heads of the
   chains found on the graph, further restricted by `targets` if given);
2. minus every site any `ignore` selector picks;
3. if `within` is set, only sites inside a module whose name matches it;
4. if `position` is set, only the first (or last) of what is left, in run order.

**Selectors** (strings, used by `targets`, `ignore` and pattern elements; `within`
takes the name forms):

- an op kind: SELECTOR_KINDS; `conv1d`, `conv2d`, `conv3d` narrow `conv` to one
  dimensionality;
- a module class name, case-sensitive, matching any class in the module's MRO
  (`Conv1D` is Hugging Face's, `Conv1d` torch's);
- `re:<regex>`: a full match on the site name;
- a glob (`*`, `?`, `[`): `fnmatch` on the site name (`*.mlp.*`);
- any other string: the site name exactly, or as a dotted suffix (`q_proj` matches
  `model.layers.0.self_attn.q_proj`).

**Which rule wins:** rules apply in order, the rules of an `extends` parent first. For each
site and each field (`weights`, `input_activations`, `output_activations`) the **last**
matching rule that *sets* that field decides; a rule that does not mention a field leaves
the earlier decision alone, and `false` sets the field to float. A site whose three fields
all end up float is not quantized. A pattern rule of two or more ops writes `weights` and
`input_activations` on each chain's first op and `output_activations` on its last.

**Rules that select nothing** follow `on_no_match`: `error` (raise `NoMatchError`,
nothing changed), `warn` or `ignore`. Each rule keeps the policy of the recipe it was
written in (or its own), so a preset's rules that miss on one architecture stay ignored
when a child extends the preset; a child that does not set `on_no_match` inherits its
parent's. Whatever the policies, a recipe that selects nothing at all fails.
"""


def render() -> str:
    """The whole of docs/recipes.md."""
    _check(RECIPE_DOC, RECIPE_KEYS, "recipe keys (stefx.recipe.RECIPE_KEYS)")
    _check(RULE_DOC, RULE_KEYS, "rule keys (stefx.recipe.RULE_KEYS)")
    _check(SPEC_DOC, COMMON_KEYS, "spec keys (stefx.ste.spec.COMMON_KEYS)")
    selector_kinds = sorted(kinds.MODULE_WEIGHT_KINDS | kinds.FUNCTIONAL_KINDS)
    types = QUANTIZERS.names()
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by tools/gen_recipe_docs.py from stefx/recipe.py, the registered",
        "     quantizer classes and the preset files; do not edit by hand. -->",
        "",
        "A recipe says which ops to quantize and how: a preset name, a YAML or TOML file, a "
        "dict or a `stefx.Recipe`. This page lists every key with its valid values and "
        "default, how rules match and which one wins, and every preset with its source. "
        "It is generated from the code and the preset files by `tools/gen_recipe_docs.py`. "
        "The math of each quantizer is in [ste.md](ste.md); the guide is "
        "[guide.md](guide.md).",
        "",
        "## Recipe keys",
        "",
        *_table(
            ("key", "default", "meaning"),
            [(f"`{k}`", RECIPE_DOC[k][0], RECIPE_DOC[k][1]) for k in RECIPE_KEYS],
        ),
        "",
        "## Rule keys",
        "",
        "Each rule needs `targets` or `pattern`, and sets at least one of `weights`, "
        "`input_activations`, `output_activations`.",
        "",
        *_table(
            ("key", "default", "meaning"),
            [(f"`{k}`", RULE_DOC[k][0], RULE_DOC[k][1]) for k in RULE_KEYS],
        ),
        "",
        MATCHING.replace("SELECTOR_KINDS", _code(selector_kinds)),
        "## Quantizer specs",
        "",
        "A spec is a mapping like `{type: lsq, num_bits: 4, strategy: channel}`. Keys every "
        "type takes:",
        "",
        *_table(
            ("key", "default", "meaning"),
            [(f"`{k}`", SPEC_DEFAULTS[k], SPEC_DOC[k]) for k in COMMON_KEYS],
        ),
        "",
        f"Registered types: {_code(types)}. Each type's valid values and defaults, and "
        "its own options (extra keys):",
        "",
    ]
    for name in types:
        lines += quantizer_section(name, QUANTIZERS.get(name))
    lines += ["## Presets", "", f"{len(preset_names())} presets ship in `stefx/recipes/`: "]
    lines[-1] += ", ".join(
        f"[`{n}`](#{n.replace('.', '').replace('+', '')})" for n in preset_names()
    )
    lines[-1] += ". `stefx recipes` lists them."
    lines.append("")
    for name in preset_names():
        lines += preset_section(name)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/recipes.md is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python tools/gen_recipe_docs.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
