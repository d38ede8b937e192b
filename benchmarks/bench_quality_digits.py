"""QAT quality of the CNN presets on scikit-learn's digits (8x8 handwritten digits).

A small conv-bn-relu CNN (3 convolutions, 32-64-64 channels, max-pool, global average
pool, a Linear classifier) is trained in float (40 epochs, Adam 1e-3, batch 64) on 80% of
the 1,797 digits (stratified split, seed 0), then for each preset: accuracy on the other
20% after quantizing (PTQ) and after 15 more epochs of QAT (Adam 1e-3 cosine, with the
preset's learning-rate scales through ``stefx.train.param_groups``), next to the
float model given the same 15 epochs. Each preset's own rules decide which layers stay
float (first/last layers, as their papers). Mean ± std over ``--seeds`` seeds (the seed
sets the model's initialisation and the batch order).

    pip install -e .[bench]              # scikit-learn
    python benchmarks/bench_quality_digits.py
    python benchmarks/bench_quality_digits.py --presets bnn,xnor --seeds 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import stefx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage

PRESETS = ["w4a8", "pact-w4a4", "ternary-twn", "xnor", "bireal", "bnn"]


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=y, random_state=seed)
    return (x[tr], y[tr]), (x[te], y[te])


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def fit(model, data, epochs, lr, seed):
    x, y = data
    opt = torch.optim.Adam(stefx.train.param_groups(model, lr))  # a preset's own lr scales
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (len(x) // 64 + 1))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data
    return (model(x).argmax(1) == y).float().mean().item() * 100


def run(presets, seeds, float_epochs, qat_epochs):
    train, test = digits()
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        base = fit(CNN(), train, float_epochs, 1e-3, seed)
        rows.setdefault("float", {"PTQ": [], "QAT": []})["PTQ"].append(accuracy(base, test))
        more = fit(copy.deepcopy(base), train, qat_epochs, 1e-3, seed + 100)
        rows["float"]["QAT"].append(accuracy(more, test))
        for preset in presets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = stefx.quantize(copy.deepcopy(base), preset, (train[0][:2],), report=False)
            row = rows.setdefault(preset, {"PTQ": [], "QAT": []})
            q.train()
            with torch.no_grad():  # one pass to initialise data-driven steps, as QAT would
                q(train[0][:256])
            row["PTQ"].append(accuracy(q, test))
            row["QAT"].append(accuracy(fit(q, train, qat_epochs, 1e-3, seed + 100), test))
    return rows


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--float-epochs", type=int, default=40)
    parser.add_argument("--qat-epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    docpage.add_argument(parser)
    args = parser.parse_args(argv)
    out = docpage.Output(args.write_docs, "bench_quality_digits", argv and [__file__, *argv])
    out.record("scikit-learn")
    torch.set_num_threads(args.threads)
    rows = run(args.presets.split(","), args.seeds, args.float_epochs, args.qat_epochs)
    out.print(f"Test accuracy %, mean ± std over {args.seeds} seeds:\n")
    cells = []
    for name, row in rows.items():
        if name == "float":
            name = f"float ({args.float_epochs} epochs / +{args.qat_epochs})"
        cells.append([name, _fmt(row["PTQ"]), _fmt(row["QAT"])])
    out.print(docpage.table(["recipe", "after PTQ", "after QAT"], cells))
    qat = {name: statistics.fmean(row["QAT"]) for name, row in rows.items()}
    goals = [(f"{n} within 0.5 point of float", qat[n] >= qat["float"] - 0.5)
             for n in ("xnor", "bireal") if n in qat]  # fmt: skip
    if "bnn" in qat:
        goals.append(("bnn >= 97%", qat["bnn"] >= 97.0))
    if goals:
        out.print("\nGoals after QAT (means): " + "; ".join(
            f"{what}: {'met' if ok else 'NOT met'}" for what, ok in goals) + ".")  # fmt: skip
    out.write()
    return rows


if __name__ == "__main__":
    main()
