"""Report: the profile of a model as an object (rows, totals) first, printed text second.

A :class:`Report` holds one :class:`OpCost` per op of the analysis graph and groups them
into :class:`LayerRow` records (by layer, block or op kind). It renders a table, JSON,
CSV, Markdown and, with matplotlib installed, a PNG. It computes nothing about costs itself:
:func:`stefx.profile.profile` builds it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stefx.capture.graph import OpNode
from stefx.capture.kinds import MODULE_WEIGHT_KINDS
from stefx.errors import StefxError
from stefx.profile.costs import Cost

__all__ = ["METRICS", "LayerRow", "OpCost", "Report"]

#: Metric keys of every before/after dict, in print order.
METRICS = (
    "params",
    "param_bytes",
    "flops",
    "macs",
    "bops",
    "ops",
    "act_bytes",
    "latency_s",
    "energy_j",
)
CONVENTIONS = (
    "FLOPs = 2 x MACs; BOPs = MACs x b_w x b_a; OPs = MACs of float layers + BOPs/64 of "
    "binary ones, as Bi-Real Net and ReActNet count them (their FLOPs are MACs)."
)
_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")


@dataclass(frozen=True)
class OpCost:
    """One op's costs before and after, and its hardware estimates (latency, bound, J)."""

    op: OpNode
    row: str
    before: Cost
    after: Cost
    bits: Any  # stefx.profile.bits.OpBits
    float_bits: int
    before_hw: tuple[float, str, float]
    after_hw: tuple[float, str, float]
    params: frozenset[str]  # canonical FQNs of the parameters it reads

    def metrics(self, which: str) -> dict[str, Any]:
        cost = self.before if which == "before" else self.after
        latency, bound, joules = self.before_hw if which == "before" else self.after_hw
        binary = which == "after" and self.bits.w_bits == 1 and self.bits.a_bits == 1
        return {
            "params": cost.params,
            "param_bytes": cost.param_bytes,
            "flops": cost.flops,
            "macs": cost.macs,
            "bops": cost.bops,
            # Bi-Real Net (arXiv:1808.00278) and ReActNet (arXiv:2003.03488): OPs =
            # BOPs/64 + the float multiply-accumulates ("FLOPs" in both papers)
            "ops": cost.bops / 64 if binary else float(cost.macs),
            "act_bytes": cost.act_in_bytes + cost.act_out_bytes,
            "latency_s": latency,
            "energy_j": joules,
            "bound": bound,
        }


@dataclass
class LayerRow:
    """One row of the report: a module (FQN as in ``named_modules()``), an op path such as
    ``model.layers.0.self_attn.matmul_0``, a block or an op kind, with its ops aggregated."""

    name: str
    op: str
    module_type: str
    input_shapes: tuple
    output_shape: tuple | None
    bits_before: str
    bits_after: str
    before: dict[str, Any]
    after: dict[str, Any]
    n_ops: int = 1
    status: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "module_type": self.module_type,
            "bits_before": self.bits_before,
            "bits_after": self.bits_after,
            "n_ops": self.n_ops,
            "before": dict(self.before),
            "after": dict(self.after),
        }


def _bits_text(w: float | None, a: float | None, fb: int) -> str:
    def one(b: float | None) -> str:
        return str(int(b)) if b is not None and float(b).is_integer() else str(b or fb)

    return f"w{one(w)}a{one(a)}"


def aggregate(ops: list[OpCost], key) -> list[LayerRow]:
    """Group op costs by ``key(opcost)`` in first-seen order. A parameter read by several
    ops of one group (a reused module) counts once in it."""
    groups: dict[str, list[OpCost]] = {}
    for oc in ops:
        groups.setdefault(key(oc), []).append(oc)
    return [_row(name, members) for name, members in groups.items()]


def _row(name: str, members: list[OpCost]) -> LayerRow:
    sums = {w: dict.fromkeys(METRICS, 0) for w in ("before", "after")}
    bound_time = {w: Counter() for w in ("before", "after")}
    seen: set[frozenset[str]] = set()
    for oc in members:
        repeat = bool(oc.params) and oc.params in seen
        seen.add(oc.params)
        for which in ("before", "after"):
            m = oc.metrics(which)
            bound_time[which][m.pop("bound")] += m["latency_s"]
            if repeat:
                m["params"], m["param_bytes"] = 0, 0.0
            for k in METRICS:
                sums[which][k] += m[k]
    for which in ("before", "after"):
        sums[which]["bound"] = _bound(bound_time[which])
    main = max(
        members,
        key=lambda oc: (oc.op.kind in MODULE_WEIGHT_KINDS or oc.op.kind == "sdpa", oc.before.flops),
    )
    status = Counter(oc.before.status for oc in members)
    notes = sorted({oc.after.note for oc in members if oc.after.status == "unsupported"})
    return LayerRow(
        name=name,
        op=main.op.kind,
        module_type=main.op.module_type,
        input_shapes=main.op.input_shapes,
        output_shape=main.op.output_shape,
        bits_before=_bits_text(None, None, main.float_bits),
        bits_after=_bits_text(main.bits.w_bits, main.bits.a_bits, main.float_bits),
        before=sums["before"],
        after=sums["after"],
        n_ops=len(members),
        status=dict(status),
        notes=notes,
    )


def _bound(times: Counter) -> str:
    return max(times, key=times.get) if times and sum(times.values()) > 0 else "-"


def block_of(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3``; else the top-level module."""
    found = _BLOCK.match(name)
    return found.group(1) if found else name.split(".")[0]


class Report:
    """A profile: ``.rows`` (per layer), ``.totals`` (before/after), sections, renderers."""

    def __init__(
        self,
        ops: list[OpCost],
        *,
        hardware: str,
        energy_table: str,
        recipe: str | None,
        model_name: str = "",
        samples: int = 1,
        tokens: int | None = None,
        not_covered: list[dict[str, Any]] | None = None,
        notes: list[str] | None = None,
        roofline: str = "",
        energy_label: str = "",
        energy_per_device: bool = True,
    ) -> None:
        self.ops = ops
        self.hardware, self.energy_table, self.recipe = hardware, energy_table, recipe
        self.model_name = model_name
        self.samples, self.tokens = samples, tokens
        self.not_covered = not_covered or []
        #: lines about the cost model (capture notes, fusion...), printed in the header
        self.notes = notes or []
        #: how latency was estimated, and which energy table was used and why
        self.roofline = roofline
        self.energy_label = energy_label or energy_table
        self.energy_per_device = energy_per_device  # False: a table shared by every device
        self.measured: dict[str, Any] | None = None
        self.group_by, self.top_k, self.depth = "layer", None, None
        self.sort_by = "latency_s"
        self.rows = self.grouped("layer")
        self.totals = self._totals()

    # -- construction --------------------------------------------------------------------

    @classmethod
    def build(cls, ops, cap, plan, device, table, *, model_name="", samples=1, tokens=None):
        from stefx.profile.hardware import energy_label

        return cls(
            ops,
            hardware=device.name,
            energy_table=table.name,
            recipe=plan.recipe.name if plan is not None else None,
            model_name=model_name,
            samples=samples,
            tokens=tokens,
            not_covered=_not_covered(ops, cap.tied_params),
            notes=list(cap.notes),
            roofline=roofline_text(device),
            energy_label=energy_label(device, table),
            energy_per_device=table is device.energy and not device.energy_is_default,
        )

    def grouped(self, group_by: str = "layer", depth: int | None = None) -> list[LayerRow]:
        """Rows by ``"layer"`` (module FQN or op path), ``"block"`` (``model.layers.3``) or
        ``"op"`` (op kind); ``depth`` cuts layer names to that many dotted parts."""
        keys = {
            "layer": lambda oc: oc.row,
            "block": lambda oc: block_of(oc.row),
            "op": lambda oc: oc.op.kind,
        }
        if group_by not in keys:
            raise StefxError(f"group_by={group_by!r}: choose one of {list(keys)}")
        key = keys[group_by]
        if depth is not None and group_by != "op":
            key = lambda oc, k=key: ".".join(k(oc).split(".")[:depth])  # noqa: E731
        rows = aggregate(self.ops, key)
        return [r for r in rows if _nonzero(r)]

    def _totals(self) -> dict[str, dict[str, Any]]:
        out = {w: dict.fromkeys(METRICS, 0) for w in ("before", "after")}
        seen: set[str] = set()
        for oc in self.ops:
            repeat = bool(oc.params) and oc.params <= seen  # tied or reused weights: once
            seen |= oc.params
            for which in ("before", "after"):
                m = oc.metrics(which)
                m.pop("bound")
                if repeat:
                    m["params"], m["param_bytes"] = 0, 0.0
                for k in METRICS:
                    out[which][k] += m[k]
        for which in ("before", "after"):
            t = out[which]
            t["samples_per_s"] = self.samples / t["latency_s"] if t["latency_s"] else None
            tps = self.tokens / t["latency_s"] if self.tokens and t["latency_s"] else None
            t["tokens_per_s"] = tps
        return out

    # -- derived numbers -----------------------------------------------------------------

    @property
    def counts(self) -> dict[str, int]:
        """How many ops were counted, ignored (documented zero) or unsupported."""
        c = Counter(oc.before.status for oc in self.ops)
        return {s: c.get(s, 0) for s in ("counted", "ignored", "unsupported")}

    @property
    def unsupported(self) -> dict[str, int]:
        """``"<kind> <target>"`` -> number of ops with no cost formula (listed, never zero)."""
        c = Counter(
            f"{oc.op.kind} {oc.op.target}" for oc in self.ops if oc.before.status == "unsupported"
        )
        return dict(sorted(c.items()))

    @property
    def causal(self) -> str | None:
        """How causal attention was counted (halved or not), from the attention ops' own
        notes; None when the model has no causal attention."""
        found = {
            part.strip()
            for oc in self.ops
            for part in oc.before.note.split(";")
            if part.strip().startswith("causal")
        }
        return "; ".join(sorted(found)) or None

    @property
    def ratios(self) -> dict[str, float | None]:
        """before / after for size (param bytes), BOPs and estimated energy."""
        b, a = self.totals["before"], self.totals["after"]
        return {
            "size": _ratio(b["param_bytes"], a["param_bytes"]),
            "bops": _ratio(b["bops"], a["bops"]),
            "energy": _ratio(b["energy_j"], a["energy_j"]),
        }

    # -- renderers -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"totals": {"before", "after"}, "layers": [{"name", "op", "before", "after"}]}``.

        With ``measure=True`` also ``"measured"`` (device, runs, what "after" timed) and, in
        ``totals[w]``, ``measured_latency_s`` / ``measured_samples_per_s`` /
        ``measured_tokens_per_s`` / ``measured_kind``: "before" is the float model, "after"
        the quantized model as given (converted or the fake-quant step; ``measured_kind``
        says which) or None with the reason when there is none. Layers get
        ``measured_exclusive_s`` (the module's own time, children excluded, as the
        estimated rows) where the row is a module.
        """
        totals = {w: dict(v) for w, v in self.totals.items()}
        layers = [r.to_dict() for r in self.rows]
        out: dict[str, Any] = {"totals": totals, "layers": layers}
        if not self.measured:
            return out
        m = self.measured
        kinds = {"before": "float model", "after": m["after_kind"]}
        for which in ("before", "after"):
            side = m.get(which)
            t = totals[which]
            t["measured_kind"] = kinds[which]
            for key in ("latency_s", "samples_per_s", "tokens_per_s"):
                t[f"measured_{key}"] = side[key] if side else None
            for layer in layers:
                exclusive = side["layers"].get(layer["name"]) if side else None
                if exclusive is not None:
                    layer[which]["measured_exclusive_s"] = exclusive
        out["measured"] = {
            "device": m["device"],
            "runs": m["runs"],
            "after_kind": m["after_kind"],
            "per_layer": "exclusive: a module's time minus its timed children's",
        }
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_csv(self) -> str:
        """One line per layer: name, op, then ``before_<metric>`` and ``after_<metric>``."""
        buf = io.StringIO()
        keys = [*METRICS, "bound"]
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["name", "op", *(f"{w}_{k}" for w in ("before", "after") for k in keys)])
        for r in self.rows:
            writer.writerow(
                [r.name, r.op, *(getattr(r, w)[k] for w in ("before", "after") for k in keys)]
            )
        return buf.getvalue()

    def to_markdown(self) -> str:
        from stefx.profile.render import markdown

        return markdown(self)

    def table(
        self,
        group_by: str | None = None,
        top_k: int | None = None,
        depth=None,
        sort_by: str | None = None,
    ) -> str:
        """The printed report; ``top_k`` keeps the rows largest in ``sort_by`` after
        quantization (a :data:`METRICS` key; default ``latency_s``, so the slowest rows,
        memory-bound ones included, stay visible)."""
        from stefx.profile.render import text

        sort_by = sort_by or self.sort_by
        if sort_by not in METRICS:
            raise StefxError(f"sort_by={sort_by!r}: choose one of {list(METRICS)}")
        return text(
            self,
            group_by or self.group_by,
            top_k if top_k is not None else self.top_k,
            depth if depth is not None else self.depth,
            sort_by,
        )

    def summary(self) -> str:
        """The short form: the five classic metrics before -> after, and which of them
        depend on the hardware (the full report is ``str(report)``)."""
        from stefx.profile.render import summary

        return summary(self)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        t = self.totals
        return (
            f"Report({self.model_name}, {len(self.rows)} rows, "
            f"params={t['before']['params']}, macs={t['before']['macs']})"
        )

    def plot(self, path: str) -> str:
        """Per-layer before/after bars of size and BOPs, saved as a PNG (needs matplotlib)."""
        from stefx.profile.render import plot

        return plot(self, path)


def roofline_text(device: Any) -> str:
    """The latency model of a hardware profile, as the report header prints it."""
    from stefx.profile.render import _si

    return (
        f"roofline on {device.name} at achievable rates: max(compute / (peak x "
        f"{device.matmul_fraction:g}), bytes / (bandwidth x {device.bandwidth_fraction:g})) "
        f"+ {_si(device.launch_floor_s, 's')} launch floor per kernel"
    )


def _ratio(before: float, after: float) -> float | None:
    return before / after if after else None


def _nonzero(row: LayerRow) -> bool:
    return bool(row.status.get("unsupported")) or any(
        row.before[k] for k in ("params", "flops", "act_bytes")
    )


def _not_covered(ops: list[OpCost], tied: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every >=2-D weight of a weighted op that stays float after the plan, once.

    A tied weight (GPT-2's ``wte.weight`` is ``lm_head.weight``) is one tensor: it is
    listed once, under its canonical name, with its other names in ``aliases``; when
    the recipe quantizes it where one alias reads it, ``partly_quantized`` says so (the
    float reads still need the float tensor, so its bytes stay listed).
    """
    tied = tied or {}
    quantized = {tied.get(f, f) for oc in ops for f in oc.bits.quantized_params}
    entries: dict[str, dict[str, Any]] = {}
    for oc in ops:
        if oc.op.kind not in MODULE_WEIGHT_KINDS:
            continue
        for role, fqn in oc.op.params.items():
            shape = tuple(oc.op.param_shapes.get(role, ()))
            if len(shape) < 2 or fqn in oc.bits.quantized_params:
                continue
            canonical = tied.get(fqn, fqn)
            entry = entries.get(canonical)
            if entry is not None:
                if fqn != canonical and fqn not in entry["aliases"]:
                    entry["aliases"].append(fqn)
                continue
            n = math.prod(shape)
            entries[canonical] = {
                "param": canonical,
                "module": oc.op.module,
                "op": oc.op.kind,
                "shape": shape,
                "params": n,
                "bytes": n * oc.float_bits / 8,
                "aliases": [fqn] if fqn != canonical else [],
                "partly_quantized": canonical in quantized,
            }
    for canonical, entry in entries.items():  # aliases the plan quantized are names too
        entry["aliases"] += sorted(
            a for a, c in tied.items() if c == canonical and a not in entry["aliases"]
        )
    return list(entries.values())


# -- text rendering ------------------------------------------------------------------------
