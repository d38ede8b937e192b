"""Plot the forward curve and the backward surrogate of each stefx quantizer family.

Every curve comes from stefx's own quantizer modules, run forward and differentiated with
autograd: nothing here re-implements a formula. Writes ``docs/img/ste_<family>.png``
(uniform, binary, lsq, pact, dorefa, ternary, seq), the figures of ``docs/ste.md``::

    python tools/plot_ste.py [--out docs/img]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import stefx

ROOT = Path(__file__).resolve().parents[1]
POINTS = 801
X = torch.linspace(-2.0, 2.0, POINTS, dtype=torch.float64)


def forward_and_grad(q: torch.nn.Module, x: torch.Tensor = X) -> tuple[torch.Tensor, torch.Tensor]:
    """``q(x)`` and dL/dx for L = Σ q(x): the surrogate derivative at each point (exact for
    element-wise quantizers, whose Jacobian is diagonal)."""
    x = x.clone().requires_grad_(True)
    y = q(x)
    y.sum().backward()
    return y.detach(), x.grad.detach()


def pointwise(
    make: Callable[[], torch.nn.Module], param: str, x: torch.Tensor = X
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, dy/dx and dy/d``param`` one point at a time (a fresh quantizer per point), for
    quantizers whose learned parameter or scale statistic spans the whole tensor."""
    ys, gxs, gps = [], [], []
    for v in x.tolist():
        q = make()
        xi = torch.tensor([[v]], dtype=torch.float64, requires_grad=True)
        y = q(xi)
        y.sum().backward()
        ys.append(y.item())
        gxs.append(xi.grad.item())
        gps.append(getattr(q, param).grad.sum().item())
    return torch.tensor(ys), torch.tensor(gxs), torch.tensor(gps)


def _axes(title: str, n: int = 2, width: float = 5.0):
    fig, axes = plt.subplots(1, n, figsize=(width * n, 3.6), constrained_layout=True)
    fig.suptitle(title)
    for ax in axes:
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.grid(alpha=0.3)
        ax.set_xlabel("x")
    return fig, axes


def _label(ax, forward: bool, extra: str = "") -> None:
    ax.set_title(("forward: y = q(x)" if forward else "backward: surrogate dy/dx") + extra)
    ax.legend(fontsize=8)


def plot_uniform(out: Path) -> Path:
    """``uniform`` 2-bit, scale frozen at max|x| = 1: clipped versus identity STE."""
    fig, (f, b) = _axes("uniform, 2 bits, scale frozen at absmax 1 (s = 1): codes -2..1")
    for est, style in (("clipped", "-"), ("identity", "--")):
        q = stefx.make_quantizer({"type": "uniform", "num_bits": 2, "estimator": est})
        q.freeze(torch.tensor([-1.0, 1.0], dtype=torch.float64))
        y, g = forward_and_grad(q)
        if est == "clipped":
            f.plot(X, y, label="q(x) = clamp(round(x/s), -2, 1)·s")
            f.plot(X, X, ":", color="0.5", label="y = x")
        b.plot(X, g, style, label=f"estimator: {est}")
    _label(f, True)
    _label(b, False)
    return _save(fig, out / "ste_uniform.png")


def plot_binary(out: Path) -> Path:
    """``binary``: sign forward, the five sign estimators backward (EDE at three points)."""
    fig, (f, b) = _axes("binary: y = sign(x), surrogate derivatives g'(x) of sign")
    y, _ = forward_and_grad(stefx.make_quantizer({"type": "binary"}))
    f.plot(X, y, label="sign(x)")
    ss = stefx.make_quantizer({"type": "binary", "estimator": "swish_sign"})
    cases = [
        ("clipped (BNN)", {"estimator": "clipped"}, None),
        ("identity", {"estimator": "identity"}, None),
        ("approx_sign (Bi-Real)", {"estimator": "approx_sign"}, None),
        ("swish_sign β=5 (BNN+)", {"estimator": "swish_sign"}, None),
        ("ede p=0 (IR-Net)", {"estimator": "ede"}, 0.0),
        ("ede p=0.5", {"estimator": "ede"}, 0.5),
        ("ede p=1", {"estimator": "ede"}, 1.0),
    ]
    for label, spec, progress in cases:
        q = stefx.make_quantizer({"type": "binary", **spec})
        if progress is not None:
            q.progress = progress
        _, g = forward_and_grad(q)
        b.plot(X, g, label=label, lw=1.2)
    # SwishSign's own forward (the smooth curve its derivative belongs to) is not what stefx
    # computes forward; the integral of the surrogate shows it, from the same quantizer.
    _, g = forward_and_grad(ss)
    dx = float(X[1] - X[0])
    f.plot(X, torch.cumsum(g, 0) * dx - 1.0, "--", label="∫ swish_sign g' (SS_5, for shape)")
    b.set_ylim(-0.2, 10.5)
    _label(f, True)
    _label(b, False)
    return _save(fig, out / "ste_binary.png")


def _lsq(kind: str, num_bits: int, symmetric: bool, s: float, beta: float | None = None):
    def make():
        q = stefx.make_quantizer(
            {
                "type": kind,
                "num_bits": num_bits,
                "symmetric": symmetric,
                "strategy": "channel",
                "grad_scale": False,
            }
        )
        q.scale.data = torch.full((1,), s, dtype=torch.float64)
        if beta is not None:
            q.offset.data = torch.full((1,), beta, dtype=torch.float64)
        return q

    return make


def plot_lsq(out: Path) -> Path:
    """``lsq`` 2-bit (s = 0.5) and ``lsq+`` 2-bit unsigned (s = 0.5, β = -0.75)."""
    fig, (f, b, s_ax) = _axes(
        "lsq 2-bit signed (s = 0.5) and lsq+ 2-bit unsigned (s = 0.5, β = -0.75)", 3, 4.4
    )
    for label, make, style in (
        ("lsq", _lsq("lsq", 2, True, 0.5), "-"),
        ("lsq+", _lsq("lsq+", 2, False, 0.5, -0.75), "--"),
    ):
        y, gx, gs = pointwise(make, "scale")
        f.plot(X, y, style, label=label)
        b.plot(X, gx, style, label=label)
        s_ax.plot(X, gs, style, label=f"{label}: ∂y/∂s")
        if label == "lsq+":
            _, _, gb = pointwise(make, "offset")
            s_ax.plot(X, gb, ":", label="lsq+: ∂y/∂β")
    _label(f, True)
    _label(b, False)
    s_ax.set_title("backward: step (and offset) gradient, g = 1")
    s_ax.legend(fontsize=8)
    return _save(fig, out / "ste_lsq.png")


def plot_pact(out: Path) -> Path:
    """``pact`` 2-bit with α = 1.5."""
    fig, (f, b) = _axes("pact, 2 bits, α = 1.5: levels 0, 0.5, 1, 1.5")

    def make():
        return stefx.make_quantizer({"type": "pact", "num_bits": 2, "alpha_init": 1.5})

    y, gx, ga = pointwise(make, "alpha")
    f.plot(X, y, label="round(clamp(x, 0, α)/Δ)·Δ")
    b.plot(X, gx, label="∂y/∂x = 1{0 <= x < α}")
    b.plot(X, ga, "--", label="∂y/∂α = 1{x >= α}")
    _label(f, True)
    _label(b, False, " and dy/dα")
    return _save(fig, out / "ste_pact.png")


def plot_dorefa(out: Path) -> Path:
    """``dorefa`` 2-bit weights (the tensor is x itself) and 2-bit activations."""
    fig, (f, b) = _axes("dorefa, 2 bits: weights (the tensor is the x axis) and activations")
    w = stefx.make_quantizer({"type": "dorefa", "num_bits": 2})
    a = stefx.make_quantizer({"type": "dorefa", "num_bits": 2, "role": "activation"})
    # the Jacobian's diagonal: ∂y_i/∂x_i (the max term couples the two end points)
    jac = torch.autograd.functional.jacobian(w, X)
    f.plot(X, w(X), label="weight: 2·quantize_k(tanh(x)/(2m) + 1/2) - 1")
    b.plot(X, jac.diagonal(), label="weight: ∂y_i/∂x_i")
    y, g = forward_and_grad(a)
    f.plot(X, y, "--", label="activation: quantize_k(clamp(x, 0, 1))")
    b.plot(X, g, "--", label="activation: 1{0 <= x <= 1}")
    _label(f, True)
    _label(b, False)
    return _save(fig, out / "ste_dorefa.png")


def _seq(kind: str, num_bits: int, alpha: float):
    def make():
        spec = {"type": kind, "num_bits": num_bits, "strategy": "channel"}
        if kind == "ternary":
            spec["scale"] = "seq"
        q = stefx.make_quantizer(spec)
        q.alpha.data = torch.full((1,), alpha, dtype=torch.float64)
        return q

    return make


def plot_ternary(out: Path) -> Path:
    """``ternary``: absmean and twn (their scale is a statistic of the tensor, here x) and
    seq (learned α = 1.5)."""
    fig, (f, b, a_ax) = _axes("ternary: absmean and twn on the tensor x, seq with α = 1.5", 3, 4.4)
    for scale in ("absmean", "twn"):
        y, g = forward_and_grad(stefx.make_quantizer({"type": "ternary", "scale": scale}))
        f.plot(X, y, label=scale)
        b.plot(X, g, label=f"{scale}: identity STE")
    y, gx, ga = pointwise(_seq("ternary", 2, 1.5), "alpha")
    f.plot(X, y, "--", label="seq")
    b.plot(X, gx, "--", label="seq: 1{|x/α| <= c}")
    a_ax.plot(X, ga, "--", color="C2", label="seq: ∂y/∂α (g = 1)")
    _label(f, True)
    _label(b, False)
    a_ax.set_title("backward: dy/dα")
    a_ax.legend(fontsize=8)
    return _save(fig, out / "ste_ternary.png")


def plot_seq(out: Path) -> Path:
    """``seq`` (ParetoQ SEQ) at 2 and 3 bits with α = 1.5."""
    fig, (f, b, a_ax) = _axes("seq (ParetoQ SEQ), α = 1.5: 2 and 3 bits", 3, 4.4)
    for bits, style in ((2, "-"), (3, "--")):
        y, gx, ga = pointwise(_seq("seq", bits, 1.5), "alpha")
        f.plot(X, y, style, label=f"{bits} bits")
        b.plot(X, gx, style, label=f"{bits} bits: 1{{|x/α| <= c}}")
        # one point at a time, so g = 1/sqrt(1·Q_p); undo it to show ∂y/∂α itself
        qp = 2 ** (bits - 1) - 1
        a_ax.plot(X, ga * qp**0.5, style, label=f"{bits} bits: ∂y/∂α")
    _label(f, True)
    _label(b, False)
    a_ax.set_title("backward: dy/dα (without g)")
    a_ax.legend(fontsize=8)
    return _save(fig, out / "ste_seq.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # no timestamp in the metadata: the same code writes the same bytes
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path


PLOTS = (plot_uniform, plot_binary, plot_lsq, plot_pact, plot_dorefa, plot_ternary, plot_seq)


def main(argv: list[str] | None = None) -> list[Path]:
    """Write every figure; returns their paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    paths = [plot(args.out) for plot in PLOTS]
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
