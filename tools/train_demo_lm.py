"""Train the byte-level LM that ships inside stefx for ``stefx demo`` (stefx/demo_lm/).

A Llama (hidden 128, 4 layers, MLP 352, byte vocabulary: 0.87M parameters) trained in
float on the first 90% of ``pydoc_data.topics`` (Python's own documentation, about 466 kB)
with AdamW, cosine schedule, batches of 16 x 128 bytes, until the held-out loss on the
last 10% has flattened: the script checks the last evaluation is within 0.5% of the best
and did not rise, and refuses to write the model otherwise. Weights are stored in fp16
(1.7 MB of safetensors); the demo fine-tunes them in fp32.

    python tools/train_demo_lm.py            # ~8 min on 2 cores; writes stefx/demo_lm/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import stefx
from stefx.demo import DEMO_LM, corpus_split, demo_config, held_out_loss, train_steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--out", default=str(DEMO_LM))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    train, val = corpus_split()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(demo_config())
    curve = []
    t0 = time.perf_counter()

    def log(step, loss):
        curve.append(held_out_loss(model, val, 128, 64))
        print(f"step {step}: train {loss:.3f}, held-out {curve[-1]:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    train_steps(model, train, args.steps, 3e-3, seed=0, log_every=args.steps // 6, log=log)
    flat = curve[-1] <= min(curve) * 1.005 and curve[-1] >= curve[-2] * 0.99
    print(f"held-out loss {'has' if flat else 'has NOT'} flattened: {curve}")
    if not flat:
        return 1
    full = held_out_loss(model, val, 128)
    out = Path(args.out)
    model = model.half()
    model.save_pretrained(out, safe_serialization=True)
    meta = {"steps": args.steps, "held_out_loss": full, "held_out_ppl": math.exp(full),
            "curve": curve, "stefx": stefx.__version__}  # fmt: skip
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}: held-out loss {full:.3f} (per-byte perplexity {math.exp(full):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
