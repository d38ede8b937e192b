"""Rendering a :class:`~stefx.profile.report.Report`: the printed tables, Markdown and the
PNG plot. Formatting only; every number comes from the report.
"""

from __future__ import annotations

from stefx.errors import StefxError
from stefx.profile.report import CONVENTIONS, LayerRow, Report

__all__ = ["markdown", "plot", "text"]


def _si(x: float | None, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 1234567 -> '1.23M'."""
    if x is None:
        return "-"
    if x == 0:
        return f"0{unit}"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    for factor, prefix in ((1e-3, "m"), (1e-6, "u"), (1e-9, "n"), (1e-12, "p")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _bytes(x: float) -> str:
    for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= factor:
            return f"{x / factor:.3g} {unit}"
    return f"{x:.4g} B"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _layer_table(rows: list[LayerRow]) -> list[list[str]]:
    return [
        [
            r.name or "<root>",
            r.op,
            f"{r.bits_before}->{r.bits_after}",
            _si(r.before["params"]),
            f"{_bytes(r.before['param_bytes'])} -> {_bytes(r.after['param_bytes'])}",
            _si(r.before["macs"]),
            f"{_si(r.before['bops'])} -> {_si(r.after['bops'])}",
            _si(r.after["latency_s"], "s"),
            r.after["bound"],
            _si(r.after["energy_j"], "J"),
        ]
        for r in rows
    ]


def _measured_cell(report: Report, key: str, unit: str = "") -> str:
    """``before -> after`` of a measured quantity; "not measured" for a missing side."""
    m = report.measured
    b = m["before"][key] if m.get("before") else None
    a = m["after"][key] if m.get("after") else None
    after = _si(a, unit) if a is not None else "not measured"
    return f"{_si(b, unit)} -> {after}"


LAYER_HEADERS = [
    "layer",
    "op",
    "bits",
    "params",
    "size before -> after",
    "MACs",
    "BOPs before -> after",
    "latency after (est.)",
    "bound after",
    "energy after (est.)",
]


def _five(report: Report) -> list[list[str]]:
    b, a, m = report.totals["before"], report.totals["after"], report.measured
    lat = f"{_si(b['latency_s'], 's')} -> {_si(a['latency_s'], 's')}"
    thr = f"{_si(b['samples_per_s'])} -> {_si(a['samples_per_s'])} samples/s"
    if b["tokens_per_s"]:
        thr += f" ({_si(b['tokens_per_s'])} -> {_si(a['tokens_per_s'])} tokens/s)"
    rows = [
        [
            "parameter size",
            f"{_bytes(b['param_bytes'])} -> {_bytes(a['param_bytes'])}",
            "no",
            "counted",
        ],
        [
            "FLOPs / MACs / BOPs",
            f"{_si(b['flops'])} / {_si(b['macs'])} / {_si(b['bops'])} -> "
            f"{_si(a['flops'])} / {_si(a['macs'])} / {_si(a['bops'])}",
            "no",
            "counted",
        ],
        ["latency", lat, "yes", f"estimate ({report.hardware} roofline)"],
        [
            "energy",
            f"{_si(b['energy_j'], 'J')} -> {_si(a['energy_j'], 'J')}",
            "yes" if report.energy_per_device else "no (one table for every device)",
            f"estimate ({report.energy_table})",
        ],
        ["throughput", thr, "yes", f"estimate ({report.hardware} roofline)"],
    ]
    if m:
        source = f"measured ({m['device']}); before: float model; after: {m['after_kind']}"
        rows.append(["latency", _measured_cell(report, "latency_s", "s"), "yes", source])
        thr = _measured_cell(report, "samples_per_s") + " samples/s"
        if m["before"].get("tokens_per_s"):
            thr += f" ({_measured_cell(report, 'tokens_per_s')} tokens/s)"
        rows.append(["throughput", thr, "yes", source])
    return rows


def _sections(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of every table after the per-layer one."""
    t, r = report.totals, report.ratios
    totals = [
        [
            w,
            _si(t[w]["params"]),
            _bytes(t[w]["param_bytes"]),
            _si(t[w]["macs"]),
            _si(t[w]["flops"]),
            _si(t[w]["bops"]),
            _si(t[w]["ops"]),
            _bytes(t[w]["act_bytes"]),
            _si(t[w]["latency_s"], "s"),
            _si(t[w]["energy_j"], "J"),
        ]
        for w in ("before", "after")
    ]
    totals.append(["ratio", "", _x(r["size"]), "", "", _x(r["bops"]), "", "", "", _x(r["energy"])])
    out = [
        (
            "totals (tied weights counted once)",
            [
                "",
                "params",
                "size",
                "MACs",
                "FLOPs",
                "BOPs",
                "OPs",
                "act bytes",
                "latency (est.)",
                "energy (est.)",
            ],
            totals,
        ),
        (
            "five classic metrics",
            ["metric", "before -> after", "hardware-dependent", "source"],
            _five(report),
        ),
    ]
    if report.recipe is None:
        out.append(("not covered", ["note"], [["no recipe or plan: every weight stays float"]]))
    else:
        nc = [
            [_param_label(n), n["op"], "x".join(map(str, n["shape"])), _bytes(n["bytes"])]
            for n in report.not_covered
        ]
        total = sum(n["bytes"] for n in report.not_covered)
        nc.append(["total", "", "", _bytes(total)])
        out.append(
            (
                "not covered (weights the recipe did not reach, still float)",
                ["parameter", "op", "shape", "bytes"],
                nc,
            )
        )
    un = [[k, v] for k, v in report.unsupported.items()] or [["none", 0]]
    out.append(
        (
            "unsupported ops (no cost formula; their arithmetic is not in the totals)",
            ["op", "count"],
            un,
        )
    )
    return out


def _header(report: Report) -> list[str]:
    """What the numbers mean: conventions, the latency model, the energy table and why,
    how causal attention was counted, the cost model's notes, what was counted."""
    c = report.counts
    lines = [
        f"stefx profile: {report.model_name or 'model'}, recipe {report.recipe or 'none'}, "
        f"hardware {report.hardware}, energy {report.energy_table}",
        CONVENTIONS,
        "MACs: matmul-family multiply-accumulates (bias adds not counted). Latency, energy "
        "and throughput are estimates unless labelled measured.",
    ]
    if report.roofline:
        lines.append(f"latency: {report.roofline}")
    lines.append(f"energy: {report.energy_label}")
    if report.causal:
        lines.append(f"attention: {report.causal}")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(
        f"ops: {c['counted']} counted, {c['ignored']} ignored (views), "
        f"{c['unsupported']} unsupported"
    )
    return lines


def _limited(report: Report, group_by: str, top_k, depth, sort_by: str = "latency_s"):
    """The rows to print: all, or the ``top_k`` largest in ``after[sort_by]`` (in table
    order) and how many were left out."""
    rows = report.grouped(group_by, depth)
    if top_k is None or len(rows) <= top_k:
        return rows, 0
    keep = sorted(rows, key=lambda r: r.after[sort_by], reverse=True)[:top_k]
    kept = {id(r) for r in keep}
    return [r for r in rows if id(r) in kept], len(rows) - top_k


def text(
    report: Report, group_by: str, top_k: int | None, depth: int | None, sort_by="latency_s"
) -> str:
    from tabulate import tabulate

    rows, hidden = _limited(report, group_by, top_k, depth, sort_by)
    lines = [*_header(report), ""]
    lines.append(tabulate(_layer_table(rows), headers=LAYER_HEADERS, tablefmt="simple"))
    if hidden:
        lines.append(f"... {hidden} more rows (top_k={top_k} by {sort_by} after quantization)")
    for title, headers, body in _sections(report):
        lines += ["", title, tabulate(body, headers=headers, tablefmt="simple")]
    return "\n".join(lines)


def summary(report: Report) -> str:
    """One line of what was profiled, then the five classic metrics, before -> after."""
    from tabulate import tabulate

    title = f"stefx profile: {report.model_name}"
    if report.recipe:
        title += f", recipe {report.recipe}"
    title += f", hardware {report.hardware} (estimates)"
    headers = ["metric", "before -> after", "hardware-dependent"]
    return title + "\n" + tabulate([r[:3] for r in _five(report)], headers=headers)


def markdown(report: Report) -> str:
    """Markdown: the layer table with exact numbers, then the same sections as the text."""
    from tabulate import tabulate

    keys = ("params", "param_bytes", "macs", "bops", "latency_s", "energy_j")
    headers = ["layer", "op", *(f"{w} {k}" for w in ("before", "after") for k in keys)]
    body = [
        [r.name, r.op, *(repr(getattr(r, w)[k]) for w in ("before", "after") for k in keys)]
        for r in report.rows
    ]
    lines = [f"## {line}" if i == 0 else line for i, line in enumerate(_header(report))]
    lines += ["", tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)]
    for title, hdrs, rows in _sections(report):
        lines += ["", f"### {title}", "", tabulate(rows, headers=hdrs, tablefmt="github")]
    return "\n".join(lines) + "\n"


def plot(report: Report, path: str) -> str:
    """Per-layer before/after bars of size and BOPs, saved as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StefxError("Report.plot needs matplotlib: pip install matplotlib") from None
    rows = [r for r in report.rows if r.before["params"] or r.before["bops"]]
    names = [r.name or "<root>" for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(rows) * 0.4), 8))
    for ax, key in zip(axes, ("param_bytes", "bops"), strict=True):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r.before[key] for r in rows], 0.4, label="before")
        ax.bar([x + 0.2 for x in xs], [r.after[key] for r in rows], 0.4, label="after")
        ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _param_label(entry: dict) -> str:
    """A not-covered weight's name, with its tied aliases: ``wte.weight (= lm_head.weight)``."""
    label = entry["param"]
    if entry.get("aliases"):
        label += f" (= {', '.join(entry['aliases'])})"
    if entry.get("partly_quantized"):
        label += " [quantized where read as another name]"
    return label
