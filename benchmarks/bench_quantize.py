"""Wall time and peak memory of ``stefx.quantize`` on real-sized models.

- a GPT-2-small-shaped model (124M parameters, random weights, real tensors);
- a Llama-3.2-1B-shaped model built on the meta device (no weights allocated).

Each case runs in a fresh subprocess so its peak RSS is its own. Reported: the model's
parameter bytes, RSS after building the model, peak RSS during quantize (the peak is reset
after the build, so it is quantize's own), and the ratio
peak / (RSS before quantize) — the "within 1.1x of the model" promise.

    python benchmarks/bench_quantize.py [--recipe w4a8] [--write-docs]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage

CASES = {
    "gpt2-124M": "gpt2",
    "llama-1B (meta)": "llama1b-meta",
}


def _rss(field: str) -> int:
    """Bytes of ``VmRSS`` (resident now) or ``VmHWM`` (its peak) from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"bench_quantize: no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    """Restart the resident-set peak at the current size (Linux 4.0+: clear_refs 5), so
    the peak is quantize's own and not that of building the model; ``ru_maxrss`` cannot be
    reset, and the build's transient peak hid quantize's or not from run to run."""
    Path("/proc/self/clear_refs").write_text("5")


def _child(case: str, recipe: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    import stefx

    torch.manual_seed(0)
    if case == "gpt2":
        config = GPT2Config(attn_implementation="eager")
        model = AutoModelForCausalLM.from_config(config)
    else:
        config = LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    rss_before = _rss("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    stefx.quantize(model, recipe, report=False)
    seconds = time.perf_counter() - t0
    rss_peak = _rss("VmHWM")
    return {
        "params": params,
        "param_bytes": param_bytes,
        "rss_before": rss_before,
        "rss_peak": rss_peak,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w4a8")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    docpage.add_argument(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.recipe)))
        return
    out = docpage.Output(args.write_docs, "bench_quantize")
    out.record("transformers")
    from tabulate import tabulate

    rows = []
    for label, case in CASES.items():
        line = (
            subprocess.run(
                [sys.executable, __file__, "--child", case, "--recipe", args.recipe],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(line)
        gib = 2**30
        rows.append(
            {
                "model": label,
                "params (M)": f"{r['params'] / 1e6:.0f}",
                "param GiB": f"{r['param_bytes'] / gib:.2f}",
                "RSS before GiB": f"{r['rss_before'] / gib:.2f}",
                "peak RSS GiB": f"{r['rss_peak'] / gib:.2f}",
                "peak / before": f"{r['rss_peak'] / r['rss_before']:.2f}x",
                "quantize s": f"{r['seconds']:.1f}",
            }
        )
    out.print(f"Recipe {args.recipe}; each case in a fresh subprocess, \"peak / before\" is the "
              "peak resident set during quantize over the resident set before it.\n")  # fmt: skip
    out.print(tabulate(rows, headers="keys", tablefmt="github"))
    out.write()


if __name__ == "__main__":
    main()
