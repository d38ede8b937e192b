"""Match: which sites of a captured model each recipe rule selects. Pure: reads, returns records.

What a site is, and how op sites are named, is :mod:`stefx.sites`.

Selectors (``targets``, ``ignore``, ``within``, pattern elements) are strings:
an op kind (``linear``, ``conv``, ``conv2d``, ``matmul``, ``sdpa``, ``embedding``,
``experts``...), a module class name (any class in the module's MRO, case-sensitive:
``Conv1D`` is Hugging Face's, ``Conv1d`` torch's), ``re:<regex>`` (full match on the
site name), a glob (``*.q_proj``), or a plain name that matches the site name exactly or
as a dotted suffix (``lm_head``, ``q_proj``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

from stefx.capture.graph import Capture, OpNode
from stefx.capture.kinds import FUNCTIONAL_KINDS, MATMUL_KINDS, MODULE_WEIGHT_KINDS, kind_of_module
from stefx.errors import RecipeError
from stefx.pattern import Chains, bn_to_fold, chain_ends, find_chains
from stefx.recipe import FIELDS, FLOAT, Recipe, Rule
from stefx.sites import Site, counter, number_op_sites, op_site_name, weight_spec
from stefx.ste.spec import QuantSpec

__all__ = ["Candidate", "Plan", "Site", "match"]

_KIND_ALIASES = {"conv1d": ("conv", 1), "conv2d": ("conv", 2), "conv3d": ("conv", 3)}
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Candidate:
    """Something a rule can select: a module op or a functional op, in run order."""

    name: str  # module FQN, or "<module>.<kind>_<n>" for an op site
    kind: str
    module: str
    type_names: tuple[str, ...]  # MRO class names of the module (op sites: of the owner)
    params: tuple[str, ...] = ()  # local names of weight parameters the op reads
    ordinal: int | None = None  # op sites: index among calls of its counter in the module
    op: OpNode | None = None
    counter: str = ""  # op sites: what the ordinal counts (stefx.sites)
    expert_in_axis: dict[str, int] = field(default_factory=dict)  # fused [E, ., .] weights


@dataclass
class Plan:
    """What a recipe does to a model: sites, and rules that selected nothing."""

    recipe: Recipe
    sites: list[Site]
    candidates: list[Candidate]
    unmatched: list[Rule] = field(default_factory=list)
    capture: Capture | None = None  # the analysis graph the plan was matched on

    def slim(self) -> Plan:
        """The plan as the quantized model keeps it: recipe, sites and unmatched rules,
        without the analysis graph and the candidates (small, copies and pickles)."""
        return Plan(self.recipe, list(self.sites), [], list(self.unmatched), None)

    def rows(self) -> list[dict[str, str]]:
        """One row per site, for printing (``stefx.explain``)."""
        return [
            {
                "site": s.name or "(the model itself)",  # raw parameters of the root
                "kind": s.kind if s.ran else f"{s.kind} (did not run)",
                "type": s.module_type,
                "weights": (_spec_text(s.weights) if s.params else "-")
                + (f" +folds {s.fold_bn}" if s.fold_bn else ""),
                "input": _spec_text(s.input_activations),
                "output": _spec_text(s.output_activations),
                "rules": ",".join(map(str, s.rules)),
            }
            for s in self.sites
        ]

    def __str__(self) -> str:
        from tabulate import tabulate

        head = f"recipe {self.recipe.name!r}: {len(self.sites)} sites"
        lines = [head, tabulate(self.rows(), headers="keys", tablefmt="simple")]
        for rule in self.unmatched:
            if rule.on_no_match != "ignore":  # presets expect some rules to miss
                lines.append(f"{rule.label} matched nothing: targets={list(rule.targets)}")
        return "\n".join(lines)


def _spec_text(spec: QuantSpec | None) -> str:
    """Short label of a spec for tables, e.g. 'lsq4 channel', 'ternary absmean tensor'."""
    if spec is None:
        return "float"
    head = spec.type if spec.type in ("binary", "ternary") else f"{spec.type}{spec.num_bits}"
    parts = [head]
    if spec.scale not in ("", "none", "absmax", "minmax", "learned"):
        parts.append(spec.scale)
    parts.append(f"{spec.strategy}{spec.group_size or ''}")
    if spec.type == "binary":
        parts.append(spec.estimator)
    text = " ".join(parts)
    return text if spec.enabled else text + " (off)"


def _type_names(module: nn.Module | None) -> tuple[str, ...]:
    if module is None:
        return ()
    return tuple(c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object))


def _local_param(
    model_params: dict, module: nn.Module, prefix: str, fqn: str, nested: bool = False
) -> str | None:
    """Name under ``module`` of the parameter ``fqn`` (tied weights have another FQN).
    ``nested``: a child's parameter the module's own code reads (``out_proj.weight`` of
    nn.MultiheadAttention) counts as the module's."""
    if prefix and fqn.startswith(prefix + "."):
        local = fqn[len(prefix) + 1 :]
        if nested or "." not in local:
            return local
    target = model_params.get(fqn)
    for name, p in module.named_parameters(recurse=False):
        if p is target:
            return name
    return None


def module_op_kind(op: OpNode) -> str | None:
    """Kind of a module op that reads its own weight, or None for ops that only view it."""
    if op.kind in MATMUL_KINDS and op.kind != "experts":
        return "linear"  # e.g. Hugging Face Conv1D: addmm(bias, x, weight)
    return op.kind if op.kind in MODULE_WEIGHT_KINDS else None


def _expert_in_axis(op: OpNode, role: str, weight_shape: tuple[int, ...]) -> int:
    """Which axis of a fused [E, ., .] expert weight is the input (reduced) dimension:
    as capture read it from the operand's layout, else guessed from the shapes."""
    known = op.attrs.get("expert_in_axis", {})
    if role in known:
        return known[role]
    x = op.input_shapes[0] if op.input_shapes else None
    if x and len(weight_shape) == 3 and weight_shape[1] == x[-1] != weight_shape[2]:
        return 1
    return 2


def candidates(capture: Capture, model: nn.Module) -> list[Candidate]:
    """Every selectable site of the captured model, in run order (first call)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    slots: dict[tuple[str, str], int] = {}
    ordinals = number_op_sites(capture.ops)
    out: list[Candidate] = []
    for op in capture.ops:
        module = modules.get(op.module)
        kind = module_op_kind(op)
        weights = []
        if module is not None and kind is not None:
            for role, fqn in op.params.items():
                local = _local_param(params, module, op.module, fqn, kind == "attention")
                if role != "bias" and local is not None and module.get_parameter(local).dim() >= 2:
                    weights.append((role, local))
        ordinal = ordinals.get(id(op))
        if weights:
            axes = {
                w: _expert_in_axis(op, role, tuple(module.get_parameter(w).shape))
                for role, w in weights
                if kind == "experts"
            }
            weights = [w for _, w in weights]
            # One candidate per (module, kind): a module that runs, say, an embedding and a
            # linear on its own parameters offers both to the rules.
            slot = (op.module, kind)
            if slot not in slots:
                slots[slot] = len(out)
                first = not any(m == op.module for m, _ in slots if (m, _) != slot)
                name = op.module if first else f"{op.module}.{kind}".lstrip(".")
                types = _type_names(module)
                out.append(
                    Candidate(
                        name, kind, op.module, types, tuple(weights), op=op, expert_in_axis=axes
                    )
                )
            else:
                old = out[slots[slot]]
                out[slots[slot]] = dataclasses.replace(
                    old,
                    params=tuple(dict.fromkeys((*old.params, *weights))),
                    expert_in_axis={**old.expert_in_axis, **axes},
                )
        elif ordinal is not None and not op.params and op.kind in FUNCTIONAL_KINDS:
            key = counter(op)
            name = op_site_name(op.module, key, ordinal)
            types = _type_names(module)
            out.append(Candidate(name, op.kind, op.module, types, (), ordinal, op, counter=key))
    out += _not_run(capture, model, {m for m, _ in slots})
    adapters = adapter_scopes(modules)
    return [c for c in out if not _inside(c.module, adapters)] if adapters else out


def adapter_scopes(modules: dict[str, nn.Module]) -> tuple[str, ...]:
    """Module paths of PEFT adapters (LoRA's ``lora_A``/``lora_B``, DoRA's magnitude...):
    every child of a PEFT tuner layer except its ``base_layer``. They are never sites: a
    zero-initialised ``lora_B`` quantized to zero would stop ``lora_A`` from learning."""
    scopes = []
    for fqn, module in modules.items():
        if any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__):
            prefix = f"{fqn}." if fqn else ""
            scopes += [prefix + n for n in module._modules if n != "base_layer"]
    return tuple(scopes)


def _inside(module: str, scopes: tuple[str, ...]) -> bool:
    return any(module == s or module.startswith(s + ".") for s in scopes)


def unread_weights(capture: Capture, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Weight modules whose >=2-D weights no captured op reads, with those weights' local
    names: the module did not run on the example inputs (a branch not taken, an MoE expert
    no token was routed to). A module kept whole owns its children's weights
    (nn.MultiheadAttention's ``out_proj.weight``), as capture records it."""
    tied = capture.tied_params
    read = {f for op in capture.ops for f in op.params.values()}
    read |= {tied.get(f, f) for f in read}
    out: dict[str, tuple[str, ...]] = {}
    owners: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{o}.") for o in owners) or (
            kind_of_module(module) not in MODULE_WEIGHT_KINDS
        ):
            continue
        owners.append(name)
        weights = []
        for local, p in module.named_parameters():
            fqn = f"{name}.{local}".lstrip(".")
            if p.dim() >= 2 and fqn not in read and tied.get(fqn, fqn) not in read:
                weights.append(local)
        if weights:
            out[name] = tuple(weights)
    return out


def _not_run(capture: Capture, model: nn.Module, seen: set[str]) -> list[Candidate]:
    """Candidates for modules that did not run (``unread_weights``): ``targets`` still
    select them (a rule for Linear means every Linear); they come after the run order and
    carry no op."""
    out = []
    for name, weights in unread_weights(capture, model).items():
        if name in seen:  # it ran; some weight of it is just read by no op
            continue
        module = model.get_submodule(name)
        kind = kind_of_module(module)
        kind = "linear" if kind in MATMUL_KINDS and kind != "experts" else kind  # HF Conv1D
        out.append(Candidate(name, kind, name, _type_names(module), weights))
    return out


def selects(selector: str, cand: Candidate) -> bool:
    """Whether one selector string picks a candidate (see the module docstring)."""
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], cand.name) is not None
    if selector in _KIND_ALIASES:
        kind, dims = _KIND_ALIASES[selector]
        return cand.kind == kind and f"Conv{dims}d" in cand.type_names
    if selector == cand.kind or selector in cand.type_names:
        return True
    if _GLOB.search(selector):
        return fnmatch.fnmatchcase(cand.name, selector)
    return cand.name == selector or cand.name.endswith("." + selector)


def _within(scope: str, cand: Candidate) -> bool:
    parts = cand.module.split(".") if cand.module else []
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for name in scopes:
        if scope.startswith("re:"):
            if re.fullmatch(scope[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, scope) or name == scope or name.endswith("." + scope):
            return True
    return False


def _rule_selection(
    rule: Rule, cands: list[Candidate], capture: Capture
) -> list[tuple[Candidate, Chains]]:
    """The candidates a rule selects, each with the pattern chains it heads (none for a
    rule without a pattern)."""
    if rule.pattern:
        by_head: dict[object, Chains] = {}
        for chain in find_chains(rule.pattern, capture):
            head = chain[0]
            key = (head.module, module_op_kind(head)) if head.params else id(head)
            by_head.setdefault(key, []).append(chain)
        chosen = []
        for c in cands:
            chains = by_head.get((c.module, c.kind) if c.params else id(c.op))
            if chains:
                chosen.append((c, chains))
        if rule.targets:
            chosen = [(c, ch) for c, ch in chosen if any(selects(t, c) for t in rule.targets)]
    else:
        chosen = [(c, []) for c in cands if any(selects(t, c) for t in rule.targets)]
    chosen = [(c, ch) for c, ch in chosen if not any(selects(t, c) for t in rule.ignore)]
    if rule.within is not None:
        chosen = [(c, ch) for c, ch in chosen if _within(rule.within, c)]
    if rule.position is not None:  # first/last in run order: of the sites that ran
        ran = [(c, ch) for c, ch in chosen if c.op is not None]
        chosen = ran[:1] if rule.position == "first" else ran[-1:]
    return chosen


def _decide(decided: dict, name: str, rule: Rule, fields: tuple[str, ...]) -> dict:
    entry = decided.setdefault(name, {"rules": []})
    if rule.index not in entry["rules"]:
        entry["rules"].append(rule.index)
    for f in fields:
        value = getattr(rule, f)
        if value is not None:
            entry[f] = value
    return entry


def _tail_sites(
    rule: Rule, tails: list[OpNode], capture: Capture, modules: dict, by_name: dict
) -> list[Candidate]:
    """Candidates for the outputs of a pattern rule's chains (see ``pattern.chain_ends``)."""
    ordinals = number_op_sites(capture.ops)
    out: dict[str, Candidate] = {}
    for where, tail in chain_ends(rule, tails, capture.ops, modules):
        module = modules.get(tail.module)
        if where == "module":
            cand = by_name.get(tail.module) or Candidate(
                tail.module, tail.kind, tail.module, _type_names(module), op=tail
            )
        else:
            n, key = ordinals[id(tail)], counter(tail)
            name = op_site_name(tail.module, key, n)
            types = _type_names(module)
            cand = by_name.get(name) or Candidate(
                name, key, tail.module, types, (), n, tail, counter=key
            )
        out.setdefault(cand.name, cand)
    return list(out.values())


def match(recipe: Recipe, capture: Capture, model: nn.Module) -> Plan:
    """Apply the recipe's rules to the captured model; later rules override per field.

    A pattern rule of several ops puts ``weights`` and ``input_activations`` on the
    chain's first op, ``output_activations`` on its last, and with ``fold_bn`` folds
    the BatchNorm that follows the first op into its quantized weights."""
    cands = candidates(capture, model)
    modules = dict(model.named_modules(remove_duplicate=False))
    by_name = {c.name: c for c in cands}
    decided: dict[str, dict[str, object]] = {}
    unmatched: list[Rule] = []
    for rule in recipe.rules:
        chosen = _rule_selection(rule, cands, capture)
        if not chosen:
            unmatched.append(rule)
        multi = len(rule.pattern) > 1
        tails = []
        for cand, chains in chosen:
            entry = _decide(decided, cand.name, rule, FIELDS[:2] if multi else FIELDS)
            if multi and rule.fold_bn:
                entry["fold_bn"] = bn_to_fold(rule, cand.name, cand.kind, chains, modules)
            if multi and rule.output_activations is not None:
                tails.extend(chain[-1] for chain in chains)
        for cand in _tail_sites(rule, tails, capture, modules, by_name) if tails else ():
            by_name.setdefault(cand.name, cand)
            _decide(decided, cand.name, rule, ("output_activations",))
    order = {id(op): i for i, op in enumerate(capture.ops)}
    sites = []
    for cand in sorted(by_name.values(), key=lambda c: order.get(id(c.op), len(order))):
        entry = decided.get(cand.name)
        if entry is None:
            continue
        specs = {f: entry.get(f) for f in FIELDS}
        specs = {f: (None if v == FLOAT else v) for f, v in specs.items()}
        if not cand.params:
            specs["weights"] = None
        if all(v is None for v in specs.values()):
            continue
        sites.append(_site(cand, entry, specs, modules))
    from stefx.binary_inputs import resolve_thresholds

    return resolve_thresholds(Plan(recipe, sites, cands, unmatched, capture))


def _site(cand: Candidate, entry: dict, specs: dict, modules: dict) -> Site:
    """The Site record of a selected candidate, its weight specs and fold axis resolved."""
    module = modules[cand.module]
    module_type = cand.type_names[0] if cand.type_names else ""
    weighted = specs["weights"] is not None
    params = cand.params if weighted else ()
    weight_specs = {
        p: weight_spec(
            specs["weights"],
            tuple(module.get_parameter(p).shape),
            cand.kind,
            "Conv1D" if "Conv1D" in cand.type_names else module_type,
            cand.expert_in_axis.get(p),
        )
        for p in params
    }
    fold_bn = str(entry.get("fold_bn", "")) if weighted else ""
    fold_axis = None
    if fold_bn and "weight" in params:
        fold_axis = _fold_axis(module, modules[fold_bn], f"site {cand.name!r}")
    return Site(
        name=cand.name,
        kind=cand.kind,
        module=cand.module,
        module_type=module_type,
        params=params,
        ordinal=cand.ordinal,
        rules=tuple(entry["rules"]),
        expert_in_axis=cand.expert_in_axis,
        operands=sum(s is not None for s in cand.op.input_shapes) if cand.op else 0,
        fold_bn=fold_bn,
        fold_axis=fold_axis,
        ran=cand.op is not None,
        counter=cand.counter,
        weight_specs=weight_specs,
        **specs,
    )


def _fold_axis(module: nn.Module, bn: nn.Module, where: str) -> int:
    """The output-channel axis of ``module.weight`` that ``bn``'s statistics scale."""
    axis = 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise RecipeError(
                f"{where}: fold_bn on a grouped ConvTranspose (groups={module.groups}) is not "
                "supported: its output channels are not one weight axis; remove fold_bn"
            )
        axis = 1  # weight [in, out, *k]
    elif type(module).__name__ == "Conv1D":
        axis = 1  # Hugging Face Conv1D: weight [in, out]
    n = module.weight.shape[axis]
    if n != bn.num_features:
        raise RecipeError(
            f"{where}: fold_bn: the weight has {n} output channels but the BatchNorm has "
            f"{bn.num_features} features; only a BatchNorm over this op's outputs can fold"
        )
    return axis
