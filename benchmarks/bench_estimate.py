"""How close the roofline estimate lands to the measured time on *this* machine.

Calibrates this machine (``stefx.profile.calibrate``: matmul peak per dtype, memory
bandwidth, launch floor), then profiles float models with ``measure=True`` on the
calibrated profile and prints estimate / measured for the whole forward and for the 3
largest layers (by MACs; a layer's estimate is its module's rows, op-path rows such as
``...self_attn.matmul_0`` included, against the module's exclusive measured time).

    .venv/bin/python benchmarks/bench_estimate.py              # 1 torch thread
    .venv/bin/python benchmarks/bench_estimate.py --threads 2

Each model is estimated twice: as a fused runtime would run it (the default, pointwise
chains one kernel, views free) and as PyTorch eager mode runs it (``fusion="eager"``:
every aten op a dispatch paying the launch floor, views included), which is what the
measurement times.

Models: the test zoo's Llama, GPT-2 and residual CNN (tiny: launch and Python overhead
dominate) and a larger Llama and GPT-2 (hidden 512, 4 layers, 128 tokens) where the
matmuls dominate. One thread by default: on a machine shared with other jobs, several
OpenMP threads stall each other and the timings say more about the neighbours than the
model; the calibration runs with the same thread count, so the two agree on the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import docpage  # noqa: E402


def _larger(kind: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=4096,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=256,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=4096,
            n_embd=512,
            n_layer=4,
            n_head=8,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(config)
    model.config._attn_implementation = "eager"
    ids = torch.randint(3, 4096, (1, 128))
    return model, {"input_ids": ids}


def _models():
    from tests.zoo import build

    yield "llama (zoo)", *build("llama")
    yield "gpt2 (zoo)", *build("gpt2")
    yield "residual_cnn (zoo)", *build("residual_cnn")
    yield "llama 512x4, 128 tok", *_larger("llama")
    yield "gpt2 512x4, 128 tok", *_larger("gpt2")


def _owner(row: str, modules: set[str]) -> str:
    """The module a row's time is measured in: the row itself, or the nearest module
    above an op-path row."""
    name = row
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def compare(model, inputs, hardware) -> dict:
    from stefx.profile import profile

    rep = profile(model, inputs, hardware=hardware, measure=True)
    eager = profile(model, inputs, hardware=hardware, fusion="eager")
    est_total = rep.totals["before"]["latency_s"]
    measured = rep.measured["before"]
    modules = set(measured["layers"])
    estimate: dict[str, float] = {}
    macs: dict[str, int] = {}
    for row in rep.rows:
        owner = _owner(row.name, modules)
        estimate[owner] = estimate.get(owner, 0.0) + row.before["latency_s"]
        macs[owner] = macs.get(owner, 0) + row.before["macs"]
    largest = sorted((n for n in macs if n), key=lambda n: macs[n], reverse=True)[:3]
    layers = [(n, estimate[n], measured["layers"].get(n)) for n in largest]
    return {
        "estimate_s": est_total,
        "measured_s": measured["latency_s"],
        "ratio": est_total / measured["latency_s"],
        "eager_ratio": eager.totals["before"]["latency_s"] / measured["latency_s"],
        "layers": layers,
    }


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    docpage.add_argument(parser)
    args = parser.parse_args()
    out = docpage.Output(args.write_docs, "bench_estimate")
    import torch

    from stefx.profile.calibrate import calibrate

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "this-machine.yaml"
        t0 = time.perf_counter()
        hw = calibrate(path, seconds=args.seconds, name="this-machine")
        took = time.perf_counter() - t0
        out.print(
            f"`calibrate()` took {took:.1f} s ({torch.get_num_threads()} threads): "
            f"fp32 {hw.peak_ops['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
            f"{(hw.peak_ops['bf16'] or 0) / 1e9:.1f} GFLOP/s, "
            f"{hw.memory_bandwidth / 1e9:.1f} GB/s, launch floor {hw.launch_floor_s * 1e6:.2f} µs."
        )
        out.print()
        out.print(
            "| model | estimate ms | measured ms | estimate / measured | fusion='eager' / "
            "measured | 3 largest layers: estimate / measured (exclusive) |"
        )
        out.print("|---|---|---|---|---|---|")
        for name, model, inputs in _models():
            r = compare(model, inputs, hw)
            layers = "; ".join(
                f"{n.split('.', 1)[-1] if n.count('.') > 2 else n} "
                f"{_ms(e)}/{_ms(m) if m else '-'} ms = {e / m:.2f}x"
                if m
                else f"{n} {_ms(e)} ms / not measured"
                for n, e, m in r["layers"]
            )
            out.print(
                f"| {name} | {_ms(r['estimate_s'])} | {_ms(r['measured_s'])} | "
                f"{r['ratio']:.2f}x | {r['eager_ratio']:.2f}x | {layers} |"
            )
    out.write()


if __name__ == "__main__":
    main()
