"""``stefx demo`` as a benchmark: its summary figures, written into docs/benchmarks.md.

Runs the demo exactly as ``make demo`` does (the shipped LM, bitnet-b158, 300 fine-tuning
steps for QAT and for float, convert, save, reload, generate) and keeps its summary table,
the converted and reloaded perplexities, the generated line and the wall time.

    python benchmarks/bench_demo.py --plot docs/img/demo.png --write-docs
    python benchmarks/bench_demo.py --recipe w4a8 --steps 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="bitnet-b158")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--plot", help="the demo's loss-curve and size/quality PNG")
    docpage.add_argument(parser)
    args = parser.parse_args(argv)
    out = docpage.Output(args.write_docs, "bench_demo", argv and [__file__, *argv])
    from stefx.demo import run_demo

    r = run_demo(args.recipe, args.steps, plot=args.plot, progress=False)
    out.print(f"`stefx demo --recipe {args.recipe} --steps {args.steps}` took "
              f"{r['seconds']:.0f} s. Size: the state dict as stored (float in fp32, quantized "
              "converted to packed codes); BOPs and energy: stefx.profile's estimates for one "
              "128-byte window.\n")  # fmt: skip
    ref = r["float_ft"]
    cells = [
        [name, f"{size / 1e6:.2f} MB", f"{bops:.3g}", f"{energy * 1e6:.1f} µJ",
         f"{ppl:.3f}", f"{(ppl / ref - 1) * 100:+.1f}%"]
        for name, size, bops, energy, ppl in r["rows"]
    ]  # fmt: skip
    out.print(docpage.table(
        ["model", "size", "BOPs", "energy", "perplexity per byte", f"vs float + {args.steps}"],
        cells))  # fmt: skip
    out.print(f"\nConverted (packed): {r['converted']:.3f}; saved with `save_pretrained` and "
              f"reloaded with `from_pretrained`: {r['reloaded']:.3f}. The reloaded model "
              f"writes: `{r['text']}`")  # fmt: skip
    if args.plot:
        out.image(args.plot, "the demo's loss curves and size/quality")
    out.write()
    return r


if __name__ == "__main__":
    main()
