"""QAT quality of the LLM presets on a byte-level LM, against float and a plain STE.

A small Llama (``LlamaConfig``: hidden 128, 4 layers, MLP 352 wide, byte vocabulary) is
trained in float on 90% of the bytes of Python's documentation (``pydoc_data.topics``,
about 466 kB) with AdamW and a cosine schedule; the held-out 10% is the validation split.
The float run prints its validation loss at intervals and checks that it has flattened
without overfitting: the last value is the lowest (within 0.5%) and the one before it
within 1% (1,200 steps; 2,000 steps over-train: the validation loss bottomed out at step
1,600 and rose). Then, from that model:

- ``float +N``: N more float steps (the reference every QAT run is compared to);
- each stefx preset: perplexity after quantizing (PTQ) and after N QAT steps;
- ``plain-*``: the floor to beat, a plain STE written below (absmax / absmean scales
  from the weights each step, identity backward), swapped into every decoder Linear.

QAT: AdamW lr 3e-4, cosine, batch 16 x 128, the same batches for every variant. Per-byte
perplexity on the held-out split; ``--seeds`` repeats everything (model init and batch
order) for mean ± std; ``--jobs`` runs seeds side by side (one process and one thread
each); ``--plot`` draws perplexity against weight bits.

    python benchmarks/bench_quality_lm.py                     # ~10 min a seed on 2 cores
    python benchmarks/bench_quality_lm.py --seeds 3 --jobs 3 --plot docs/img/quality_lm.png
    python benchmarks/bench_quality_lm.py --seeds 1 --presets w4a8,bitnet-b158
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import stefx
from stefx.demo import corpus_split, demo_config, held_out_loss, train_steps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage

PRESETS = [
    "w8a8",
    "w4a8",
    "w4a16-g128",
    "w2a16-g64",
    "paretoq-2bit",
    "bitnet-b158",
    "ternary-twn",
    "w1a8",
    "w1a16",
]
WEIGHT_BITS = {  # for the plot: nominal bits per weight (scales not counted)
    "w8a8": 8, "w4a8": 4, "w4a16-g128": 4, "w2a16-g64": 2, "paretoq-2bit": 2,
    "bitnet-b158": 1.58, "ternary-twn": 1.58, "w1a8": 1, "w1a16": 1,
    "plain-w4a8": 4, "plain-w2": 2, "plain-ternary-a8": 1.58, "plain-w1": 1,
}  # fmt: skip


# -- the plain STE floor --------------------------------------------------------------------


class _STE(torch.autograd.Function):
    """Forward ``fn(x)``, backward the identity."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _absmax(bits, dim):
    def fn(x):
        qmax = 2 ** (bits - 1) - 1
        s = (x.abs().amax(dim, keepdim=True) / qmax).clamp(min=1e-8)
        return torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s

    return fn


def _ternary_absmean(x):
    s = x.abs().mean().clamp(min=1e-8)
    return torch.clamp(torch.round(x / s), -1, 1) * s


def _binary_rowmean(x):
    return torch.where(x >= 0, 1.0, -1.0) * x.abs().mean(1, keepdim=True)


PLAIN = {  # name -> (weight fn, input fn or None)
    "plain-w4a8": (_absmax(4, 1), _absmax(8, -1)),
    "plain-w2": (_absmax(2, 1), None),
    "plain-ternary-a8": (_ternary_absmean, _absmax(8, -1)),
    "plain-w1": (_binary_rowmean, None),
}
PLAIN_LABELS = {
    "plain-w4a8": "absmax W4 per row + A8 per token",
    "plain-w2": "absmax W2 per row",
    "plain-ternary-a8": "absmean per tensor + A8",
    "plain-w1": "sign · per-row mean\\|W\\|",
}


class _PlainLinear(nn.Linear):
    weight_fn = input_fn = None

    def forward(self, x):
        w = _STE.apply(self.weight, self.weight_fn)
        if self.input_fn is not None:
            x = _STE.apply(x, self.input_fn)
        return F.linear(x, w, self.bias)


def plain(model: nn.Module, name: str) -> nn.Module:
    weight_fn, input_fn = PLAIN[name]
    cls = type(f"Plain_{name}", (_PlainLinear,), {})
    cls.weight_fn, cls.input_fn = staticmethod(weight_fn), staticmethod(input_fn or (lambda x: x))
    if input_fn is None:
        cls.input_fn = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not mod_name.endswith("lm_head"):
            mod.__class__ = cls
    return model


# -- data, model, training --------------------------------------------------------------------


def build(seed: int) -> nn.Module:
    """The demo LM's architecture (:func:`stefx.demo.demo_config`), initialised by ``seed``."""
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(demo_config())


def train(model, data, steps, lr, seq, seed, log=None, val=None, curve=None):
    """:func:`stefx.demo.train_steps` (AdamW, warm-up and cosine, the recipe's learning
    rates), printing the held-out loss every ``log`` steps (and keeping it in ``curve``)."""

    def report(step: int, loss: float) -> None:
        held_out = held_out_loss(model, val, seq, 64)
        print(f"  float step {step}: train {loss:.3f}, val {held_out:.3f}")
        if curve is not None:
            curve.append(held_out)

    train_steps(model, data, steps, lr, seed, seq=seq, log_every=log or 0,
                log=report if log else None)  # fmt: skip
    return model


def run(args) -> dict[str, dict[str, list[float]]]:
    train_data, val = corpus_split()
    seq = 128
    rows: dict[str, dict[str, list[float]]] = {}

    def record(name, key, model):
        rows.setdefault(name, {"PTQ": [], "QAT": []})[key].append(
            math.exp(held_out_loss(model, val, seq))
        )

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t0 = time.perf_counter()
        curve: list[float] = []
        base = train(build(seed), train_data, args.float_steps, 3e-3, seq, seed,
                     log=args.float_steps // 6, val=val, curve=curve)  # fmt: skip
        flat = curve[-1] <= min(curve) * 1.005 and curve[-1] >= curve[-2] * 0.99
        print(f"  float seed {seed}: validation loss {'has' if flat else 'has NOT'} flattened "
              f"without rising (last {curve[-1]:.3f}, lowest {min(curve):.3f})")  # fmt: skip
        rows.setdefault("_checks", {"flattened": []})["flattened"].append(float(flat))
        record("float", "PTQ", base)
        qat_seed = 1000 + seed
        record(
            "float",
            "QAT",
            train(copy.deepcopy(base), train_data, args.qat_steps, 3e-4, seq, qat_seed),
        )
        plains = [] if args.plain == "none" else args.plain.split(",")
        for name in [*args.presets.split(","), *plains]:
            model = copy.deepcopy(base)
            if name in PLAIN:
                model = plain(model, name)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = stefx.quantize(model, name, report=False)
            record(name, "PTQ", model)
            record(name, "QAT", train(model, train_data, args.qat_steps, 3e-4, seq, qat_seed))
            ptq, qat = rows[name]["PTQ"][-1], rows[name]["QAT"][-1]
            print(f"  seed {seed} {name}: PTQ {ptq:.3f}, QAT {qat:.3f}")
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s")
    return rows


def _fmt(values):
    m = statistics.fmean(values)
    return f"{m:.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def _run_in_processes(args) -> dict[str, dict[str, list[float]]]:
    """One child process per seed, ``args.jobs`` at a time, each one thread; rows merged."""
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(range(args.first_seed, args.first_seed + args.seeds))
        running: list[tuple[subprocess.Popen, Path]] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                seed = pending.pop(0)
                out = Path(tmp) / f"seed{seed}.json"
                cmd = [sys.executable, __file__, "--presets", args.presets, "--seeds", "1",
                       "--plain", args.plain,
                       "--first-seed", str(seed), "--float-steps", str(args.float_steps),
                       "--qat-steps", str(args.qat_steps), "--threads", "1",
                       "--json", str(out)]  # fmt: skip
                running.append((subprocess.Popen(cmd), out))
            time.sleep(2)
            for proc, out in [r for r in running if r[0].poll() is not None]:
                running.remove((proc, out))
                if proc.returncode:
                    raise SystemExit(f"seed run {out.stem} failed (exit {proc.returncode})")
                for name, row in json.loads(out.read_text()).items():
                    for key, values in row.items():
                        rows.setdefault(name, {}).setdefault(key, []).extend(values)
    return rows


def plot(rows, path: str, qat_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = rows["float"]["QAT"]
    ax.axhline(statistics.fmean(ref), color="k", lw=1, label=f"float +{qat_steps} steps")
    for plain_rows, marker, label in ((False, "o", "stefx preset"), (True, "x", "plain STE")):
        xs, ys, es, names = [], [], [], []
        for name, row in rows.items():
            if name in WEIGHT_BITS and name.startswith("plain-") == plain_rows:
                xs.append(WEIGHT_BITS[name])
                ys.append(statistics.fmean(row["QAT"]))
                es.append(statistics.stdev(row["QAT"]) if len(row["QAT"]) > 1 else 0.0)
                names.append(name)
        ax.errorbar(xs, ys, yerr=es, fmt=marker, capsize=3, label=label)
        for x, y, n in zip(xs, ys, names, strict=True):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 1.58, 2, 4, 8], ["1", "1.58", "2", "4", "8"])
    ax.set_xlabel("weight bits")
    ax.set_ylabel(f"held-out per-byte perplexity after {qat_steps} QAT steps")
    ax.set_title(f"byte-level Llama on pydoc_data.topics, {len(ref)} seed(s), mean ± std")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--plain", default=",".join(PLAIN), help="plain-STE rows, or none")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side")
    parser.add_argument("--float-steps", type=int, default=1200)
    parser.add_argument("--qat-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows (every seed's values) here")
    parser.add_argument("--plot", help="write perplexity vs weight bits here (PNG)")
    parser.add_argument("--block", default="bench_quality_lm",
                        help="the docs block --write-docs replaces")  # fmt: skip
    docpage.add_argument(parser)
    args = parser.parse_args(argv)
    out = docpage.Output(args.write_docs, args.block, argv and [__file__, *argv])
    torch.set_num_threads(args.threads)
    rows = _run_in_processes(args) if args.jobs > 1 else run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    checks = rows.pop("_checks", {}).get("flattened", [])
    ref = statistics.fmean(rows["float"]["QAT"])
    out.print(
        f"\nHeld-out per-byte perplexity, {len(rows['float']['QAT'])} seed(s), mean ± std; "
        f"{args.float_steps} float steps, then {args.qat_steps} steps for every row; the float "
        f"validation loss flattened without rising in {int(sum(checks))} of {len(checks)} seeds.\n"
    )
    out.print(f"| recipe | after PTQ | after QAT | QAT vs float +{args.qat_steps} |")
    out.print("|---|---|---|---|")
    # float first, then by weight bits, each plain STE after the presets of its width
    order = sorted(rows, key=lambda n: (n != "float", -WEIGHT_BITS.get(n, 0), n[:6] == "plain-"))
    for name in order:
        row = rows[name]
        gap = (statistics.fmean(row["QAT"]) / ref - 1) * 100
        label = f"{name} ({PLAIN_LABELS[name]})" if name in PLAIN_LABELS else name
        if name == "float":
            label = f"float ({args.float_steps:,} / +{args.qat_steps} steps)"
        out.print(f"| {label} | {_fmt(row['PTQ'])} | {_fmt(row['QAT'])} | {gap:+.1f}% |")
    if args.plot:
        plot(rows, args.plot, args.qat_steps)
        out.image(args.plot, "held-out perplexity against weight bits")
    out.write()
    return rows


if __name__ == "__main__":
    main()
