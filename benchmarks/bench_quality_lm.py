"""QAT quality of the LLM presets on a byte-level LM, against float and a plain STE.

A small Llama (``LlamaConfig``: hidden 128, 4 layers, MLP 352 wide, byte vocabulary) is
trained in float on 90% of the bytes of Python's documentation (``pydoc_data.topics``,
about 466 kB) with AdamW and a cosine schedule; the held-out 10% is the validation split.
The float run prints its validation loss at intervals, so one can see it has flattened
(and that train and validation loss stay close: no overfitting). Then, from that model:

- ``float +N``: N more float steps (the reference every QAT run is compared to);
- each stefx preset: perplexity after quantizing (PTQ) and after N QAT steps;
- ``plain-*``: the floor to beat, a plain STE written below (absmax / absmean scales
  from the weights each step, identity backward), swapped into every decoder Linear.

QAT: AdamW lr 3e-4, cosine, batch 16 x 128, the same batches for every variant. Per-byte
perplexity on the held-out split; ``--seeds`` repeats everything (model init and batch
order) for mean ± std.

    python benchmarks/bench_quality_lm.py                     # ~10 min a seed on 2 cores
    python benchmarks/bench_quality_lm.py --seeds 2 --presets w4a8,bitnet-b158
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import stefx
from stefx.demo import corpus, held_out_loss

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
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def batches(data: torch.Tensor, steps: int, seq: int, seed: int, batch: int = 16):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq, (batch,), generator=g).tolist()
        yield torch.stack([data[s : s + seq] for s in starts])


def train(model, data, steps, lr, seq, seed, log=None, val=None):
    opt = torch.optim.AdamW(stefx.train.param_groups(model, lr), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / steps))
        ),
    )
    model.train()
    for step, x in enumerate(batches(data, steps, seq, seed)):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % log == 0:
            held_out = held_out_loss(model, val, seq, 64)
            print(f"  float step {step + 1}: train {loss.item():.3f}, val {held_out:.3f}")
    return model


def run(args) -> dict[str, dict[str, list[float]]]:
    data = corpus()
    split = data.numel() * 9 // 10
    train_data, val = data[:split], data[split:]
    seq = 128
    rows: dict[str, dict[str, list[float]]] = {}

    def record(name, key, model):
        rows.setdefault(name, {"PTQ": [], "QAT": []})[key].append(
            math.exp(held_out_loss(model, val, seq))
        )

    for seed in range(args.seeds):
        t0 = time.perf_counter()
        base = train(build(seed), train_data, args.float_steps, 3e-3, seq, seed,
                     log=args.float_steps // 5, val=val)  # fmt: skip
        record("float", "PTQ", base)
        qat_seed = 1000 + seed
        record(
            "float",
            "QAT",
            train(copy.deepcopy(base), train_data, args.qat_steps, 3e-4, seq, qat_seed),
        )
        for name in [*args.presets.split(","), *PLAIN]:
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--float-steps", type=int, default=2000)
    parser.add_argument("--qat-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args)
    ref = statistics.fmean(rows["float"]["QAT"])
    print(
        f"\nheld-out per-byte perplexity, {args.seeds} seed(s); QAT budget {args.qat_steps} steps"
    )
    print(f"| recipe | after PTQ | after QAT | QAT vs float +{args.qat_steps} |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        gap = (statistics.fmean(row["QAT"]) / ref - 1) * 100
        print(f"| {name} | {_fmt(row['PTQ'])} | {_fmt(row['QAT'])} | {gap:+.1f}% |")
    return rows


if __name__ == "__main__":
    main()
