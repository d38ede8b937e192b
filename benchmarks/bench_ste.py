"""Forward + backward time of the ``uniform`` STE against PyTorch's built-in fake quantizer.

Two cases, each timed as one training step of the quantizer alone (forward, then backward
with a fixed upstream gradient), the scale statistics computed inside the timed region:

- ``weight``: per-channel 4-bit symmetric on a 4096x4096 weight (``requires_grad``);
- ``act``:    per-token 8-bit symmetric on an (8, 512, 4096) activation.

Each stefx run is compared with

- ``torch``: ``torch.fake_quantize_per_channel_affine`` with the same absmax qparams
  (tokens as rows for ``act``), i.e. the same math and the same clipped gradient;
- ``naive``: ``x + (q - x).detach()`` in plain torch ops (identity gradient).

The three are interleaved within every repeat so that machine drift hits them alike; the
reported time is the median over repeats, after warm-up. Thread count is torch's default.

    python benchmarks/bench_ste.py                 # full size (a minute or two on 2 cores)
    python benchmarks/bench_ste.py --quick         # small shapes, a smoke test
    python benchmarks/bench_ste.py --write-docs    # its block of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tabulate import tabulate

import stefx
from stefx.ste.uniform import code_range

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage

_EPS = 1e-12
Step = Callable[[torch.Tensor], torch.Tensor]


def stefx_step(spec: dict) -> Step:
    quantizer = stefx.make_quantizer(spec)
    return quantizer


def torch_step(bits: int) -> Step:
    """Built-in fake quant, absmax scale per row of the (rows, D) view; axis 0."""
    qmin, qmax = code_range(bits, symmetric=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            scale = (rows.abs().amax(dim=1) / qmax).clamp(min=_EPS)
            zero = torch.zeros_like(scale, dtype=torch.int32)
        y = torch.fake_quantize_per_channel_affine(rows, scale, zero, 0, qmin, qmax)
        return y.reshape(x.shape)

    return step


def naive_step(bits: int) -> Step:
    """``x + (q - x).detach()`` in plain ops: identity gradient, no fused kernel."""
    qmin, qmax = code_range(bits, symmetric=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            scale = (rows.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=_EPS)
            q = torch.clamp(torch.round(rows / scale), qmin, qmax) * scale
        return (rows + (q - rows).detach()).reshape(x.shape)

    return step


def time_step(step: Step, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward + backward."""
    x.grad = None
    start = time.perf_counter()
    y = step(x)
    y.backward(grad)
    return time.perf_counter() - start


def run_case(name: str, shape: tuple[int, ...], spec: dict, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    steps = {
        "stefx": stefx_step(spec),
        "torch": torch_step(spec["num_bits"]),
        "naive": naive_step(spec["num_bits"]),
    }
    with torch.no_grad():  # same math, or the comparison means nothing
        same = torch.equal(steps["stefx"](x), steps["torch"](x))
    if not same:
        raise AssertionError(f"{name}: stefx and torch.fake_quantize disagree")
    for _ in range(warmup):
        for step in steps.values():
            time_step(step, x, grad)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            times[key].append(time_step(step, x, grad))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "case": name,
        "shape": "x".join(map(str, shape)),
        "spec": f"{spec['num_bits']}-bit {spec['strategy']}",
        "stefx ms": ms["stefx"],
        "torch ms": ms["torch"],
        "naive ms": ms["naive"],
        "stefx/torch": ms["stefx"] / ms["torch"],
        "stefx/naive": ms["stefx"] / ms["naive"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per case first")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    docpage.add_argument(parser)
    args = parser.parse_args(argv)
    out = docpage.Output(args.write_docs, "bench_ste", argv and [__file__, *argv])

    weight = (512, 512) if args.quick else (4096, 4096)
    act = (2, 64, 512) if args.quick else (8, 512, 4096)
    cases = [
        ("weight", weight, {"type": "uniform", "num_bits": 4, "strategy": "channel"}),
        ("act", act, {"type": "uniform", "num_bits": 8, "strategy": "token"}),
    ]
    rows = [run_case(*case, repeats=args.repeats, warmup=args.warmup) for case in cases]

    out.print(f"Forward + backward, median of {args.repeats} after {args.warmup} warm-up runs.\n")
    out.print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".2f"))
    out.write()
    return rows


if __name__ == "__main__":
    main()
