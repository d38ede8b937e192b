"""Calibrate a hardware profile on this machine: measure what it achieves, write a YAML.

Datasheet peaks are upper bounds no kernel reaches; a roofline built on them predicts a
model several times faster than it runs. :func:`calibrate` runs short micro-benchmarks
with the torch build, thread count and device that will run the model, and writes a
hardware YAML in the schema of the shipped ones (``stefx/profile/hardware/*.yaml``):

* **matmul peak per dtype**: square ``n x n @ n x n`` products for a few sizes; each size
  is timed repeatedly (one warm-up, then at least 3 runs, as many as its time share
  allows), its median gives ``2 n^3 / t`` ops/s, and the best size is the peak (large
  enough to be compute-bound, small enough to fit the time budget).
* **memory bandwidth**: a copy (``dst.copy_(src)``: 2 x bytes) and an add
  (``torch.add(a, b, out=c)``: 3 x bytes) of tensors larger than a server's last-level
  cache; bytes read + written over the median time, the better of the two.
* **launch floor**: the host-side cost of one small op. A tiny eager block (a Linear
  module call, a view and a transpose, softmax, a residual add, a multiply, on a few
  elements) is timed and divided by the 4 ops stefx costs in it: its views take host time
  but launch nothing, and stefx gives them no floor, so their share is spread over the
  costed ops, as in a transformer, where views are about as many as costed ops.

The measured rates *are* the achieved ones, so the file's ``matmul_fraction`` and
``bandwidth_fraction`` are 1.0. It names no energy table (nothing here measures energy):
reports on it use the Horowitz 45 nm default and say so. ``sources``, ``assumptions``
and ``calibration`` record when and how it was measured.

    python -m stefx.profile.calibrate this-machine.yaml     # about 10 s
    stefx.profile(model, inputs, hardware="this-machine.yaml")
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from stefx.errors import RecipeError
from stefx.profile.hardware import HardwareProfile, _parse_device

__all__ = ["MATMUL_SIZES", "calibrate"]

MATMUL_SIZES = (256, 512, 1024, 2048)
_TORCH_DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
_BANDWIDTH_BYTES = 64 * 2**20  # per tensor: above a server's last-level cache
_MIN_RUNS = 3


def calibrate(
    path: str | os.PathLike[str] | None = None,
    *,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    seconds: float = 8.0,
    device: str | torch.device = "cpu",
    name: str = "calibrated",
    sizes: Sequence[int] = MATMUL_SIZES,
) -> HardwareProfile:
    """Measure this machine's matmul peak per dtype, memory bandwidth and launch floor in
    about ``seconds`` (each micro-benchmark gets a share), and return the hardware profile;
    with ``path``, also write it as YAML (load it with ``profile(hardware=path)``).

    Measure with the thread count and device the model will run with: the figures hold
    for those (``torch.get_num_threads()`` is recorded in the file).
    """
    device = torch.device(device)
    unknown = [d for d in dtypes if d not in _TORCH_DTYPES]
    if unknown or "fp32" not in dtypes:
        raise RecipeError(
            f"calibrate(dtypes={list(dtypes)!r}): measurable dtypes are "
            f"{', '.join(_TORCH_DTYPES)}, and fp32 is required (every fallback ends there)"
        )
    if seconds <= 0:
        raise RecipeError(f"calibrate(seconds={seconds!r}): expected a time budget > 0")
    sync = _synchronizer(device)
    started = datetime.datetime.now(datetime.UTC)
    per_matmul = 0.6 * seconds / (len(dtypes) * len(sizes))
    matmul = {d: _matmul_rates(_TORCH_DTYPES[d], sizes, device, sync, per_matmul) for d in dtypes}
    bandwidth = _bandwidth(device, sync, 0.3 * seconds)
    floor = _launch_floor(device, sync, 0.1 * seconds)
    data = _document(name, device, matmul, bandwidth, floor, started, sizes)
    where = str(path) if path is not None else "calibrate()"
    profile = _parse_device(data, where)
    if path is not None:
        Path(path).write_text(_yaml(data), encoding="utf-8")
    return profile


# -- micro-benchmarks ----------------------------------------------------------------------


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _median_time(fn: Callable[[], Any], sync: Callable[[], None], budget: float) -> tuple:
    """(median seconds, runs) of ``fn`` after one warm-up: at least ``_MIN_RUNS`` runs,
    more while the budget lasts."""
    fn()
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < _MIN_RUNS or spent < budget:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if len(times) >= 1000:
            break
    return statistics.median(times), len(times)


def _matmul_rates(dtype, sizes, device, sync, budget: float) -> dict[int, dict[str, float]]:
    """size -> {"ops_per_s", "runs"}; a size whose single product would overrun the budget
    several times over is skipped (the smaller ones already measured the rate)."""
    out: dict[int, dict[str, float]] = {}
    for n in sorted(sizes):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t0 = time.perf_counter()
        a @ b
        sync()
        if out and time.perf_counter() - t0 > 3 * budget:
            break
        median, runs = _median_time(lambda a=a, b=b: a @ b, sync, budget)
        out[n] = {"ops_per_s": 2 * n**3 / median, "runs": runs}
    return out


def _bandwidth(device, sync, budget: float) -> dict[str, dict[str, float]]:
    """Bytes read + written per second of a large copy and a large add."""
    n = _BANDWIDTH_BYTES // 4
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    c = torch.empty_like(a)
    copy_t, copy_runs = _median_time(lambda: c.copy_(a), sync, budget / 2)
    add_t, add_runs = _median_time(lambda: torch.add(a, b, out=c), sync, budget / 2)
    return {
        "copy": {"bytes_per_s": 2 * _BANDWIDTH_BYTES / copy_t, "runs": copy_runs},
        "add": {"bytes_per_s": 3 * _BANDWIDTH_BYTES / add_t, "runs": add_runs},
    }


class _TinyBlock(nn.Module):
    """A transformer's op mix at toy size: 4 costed ops and 2 views."""

    COSTED_OPS = 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x).view(4, 2, 4).transpose(1, 2)
        y = y.softmax(-1).reshape(4, 8)
        return (x + y) * 0.5


def _launch_floor(device, sync, budget: float) -> dict[str, float]:
    block = _TinyBlock().to(device)
    x = torch.randn(4, 8, device=device)
    with torch.no_grad():
        median, runs = _median_time(lambda: block(x), sync, budget)
    return {"launch_floor_s": median / _TinyBlock.COSTED_OPS, "block_s": median, "runs": runs}


# -- the YAML ------------------------------------------------------------------------------


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads"


def _document(name, device, matmul, bandwidth, floor, started, sizes) -> dict[str, Any]:
    peaks: dict[str, float | None] = dict.fromkeys(
        ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4", "binary")
    )
    for dtype, by_size in matmul.items():
        peaks[dtype] = max(r["ops_per_s"] for r in by_size.values())
    best_bw = max(r["bytes_per_s"] for r in bandwidth.values())
    when = started.strftime("%Y-%m-%d %H:%M UTC")
    machine = _machine(device)
    return {
        "name": name,
        "kind": "device",
        "description": f"{machine} ({device.type}), measured by stefx.profile.calibrate",
        "sources": [
            f"measured on this machine by stefx.profile.calibrate on {when} "
            f"(torch {torch.__version__!s}, {platform.platform()})"
        ],
        "assumptions": [
            f"matmul: square n x n products, n in {list(sizes)} (larger sizes skipped when "
            "over the time budget); one warm-up, then median of >= 3 runs; the best size "
            "is the peak. Dtypes not measured are null (they fall back to a measured one).",
            "memory_bandwidth: bytes read + written per second of a 64 MiB copy "
            "(2 x 64 MiB) and add (3 x 64 MiB), median time, the better of the two.",
            "launch_floor_s: median time of a tiny eager block (Linear call, view, "
            "transpose, softmax, add, multiply) divided by its 4 costed ops.",
            "The measured rates are the achieved ones: matmul_fraction and "
            "bandwidth_fraction are 1.0.",
            f"Valid for {machine}: rerun after changing threads, device or torch.",
            "Energy: no energy table (nothing here measures energy); reports use the "
            "Horowitz 45 nm default and say so.",
        ],
        "peak_ops": {k: (float(v) if v else None) for k, v in peaks.items()},
        "memory_bandwidth": float(best_bw),
        "matmul_fraction": 1.0,
        "bandwidth_fraction": 1.0,
        "launch_floor_s": float(floor["launch_floor_s"]),
        "calibration": {
            "date": when,
            "torch": str(torch.__version__),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "matmul_ops_per_s": {
                d: {int(n): float(r["ops_per_s"]) for n, r in by.items()}
                for d, by in matmul.items()
            },
            "matmul_runs": {
                d: {int(n): int(r["runs"]) for n, r in by.items()} for d, by in matmul.items()
            },
            "bandwidth_bytes_per_s": {k: float(v["bytes_per_s"]) for k, v in bandwidth.items()},
            "launch_block_s": float(floor["block_s"]),
            "launch_runs": int(floor["runs"]),
        },
    }


def _yaml(data: dict[str, Any]) -> str:
    header = "# Written by stefx.profile.calibrate: measured rates of this machine.\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=100)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stefx.profile.calibrate [PATH] [--seconds S] [--dtypes fp32,bf16]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="calibrated.yaml")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="calibrated")
    args = parser.parse_args(argv)
    p = calibrate(
        args.path,
        dtypes=tuple(args.dtypes.split(",")),
        seconds=args.seconds,
        device=args.device,
        name=args.name,
    )
    peaks = ", ".join(f"{d} {v / 1e9:.1f} G" for d, v in p.peak_ops.items() if v)
    print(
        f"{args.path}: {peaks} ops/s; {p.memory_bandwidth / 1e9:.1f} GB/s; "
        f"launch floor {p.launch_floor_s * 1e6:.2f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
