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


LAYER_HEADERS = [
    "layer",
    "op",
    "bits",
    "params",
    "size before -> after",
    "MACs",
    "BOPs before -> after",
    "latency (est.)",
    "bound",
    "energy (est.)",
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
        ["FLOPs / MACs", f"{_si(b['flops'])} / {_si(b['macs'])}", "no", "counted"],
        ["latency", lat, "yes", f"estimate ({report.hardware} roofline)"],
        [
            "energy",
            f"{_si(b['energy_j'], 'J')} -> {_si(a['energy_j'], 'J')}",
            "yes",
            f"estimate ({report.energy_table})",
        ],
        ["throughput", thr, "yes", f"estimate ({report.hardware} roofline)"],
    ]
    if m:
        tok = f", {_si(m['tokens_per_s'])} tokens/s" if m.get("tokens_per_s") else ""
        rows.append(["latency", _si(m["latency_s"], "s"), "yes", f"measured ({m['device']})"])
        rows.append(
            [
                "throughput",
                f"{_si(m['samples_per_s'])} samples/s{tok}",
                "yes",
                f"measured ({m['device']})",
            ]
        )
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
    c = report.counts
    return [
        f"stefx profile: {report.model_name or 'model'}, recipe {report.recipe or 'none'}, "
        f"hardware {report.hardware}, energy {report.energy_table}",
        CONVENTIONS,
        "MACs: matmul-family multiply-accumulates (bias adds not counted). Latency, energy "
        "and throughput are estimates unless labelled measured.",
        f"ops: {c['counted']} counted, {c['ignored']} ignored (views), "
        f"{c['unsupported']} unsupported",
    ]


def _limited(report: Report, group_by: str, top_k: int | None, depth: int | None):
    rows = report.grouped(group_by, depth)
    if top_k is None or len(rows) <= top_k:
        return rows, 0
    keep = sorted(rows, key=lambda r: r.before["flops"], reverse=True)[:top_k]
    kept = {id(r) for r in keep}
    return [r for r in rows if id(r) in kept], len(rows) - top_k


def text(report: Report, group_by: str, top_k: int | None, depth: int | None) -> str:
    from tabulate import tabulate

    rows, hidden = _limited(report, group_by, top_k, depth)
    lines = [*_header(report), ""]
    lines.append(tabulate(_layer_table(rows), headers=LAYER_HEADERS, tablefmt="simple"))
    if hidden:
        lines.append(f"... {hidden} more rows (top_k={top_k} by FLOPs)")
    for title, headers, body in _sections(report):
        lines += ["", title, tabulate(body, headers=headers, tablefmt="simple")]
    return "\n".join(lines)


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
