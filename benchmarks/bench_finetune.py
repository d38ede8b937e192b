"""``examples/finetune_lowbit.py`` as a benchmark: its figures, written into docs/benchmarks.md.

Runs the example (a small Llama trained in float on pydoc text, then per preset PTQ, QAT
and QAT + distillation through ``transformers.Trainer``, float given the same extra steps,
save/load round trips, generation) and keeps its perplexity table and checks.

    python benchmarks/bench_finetune.py --write-docs
    python benchmarks/bench_finetune.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import docpage  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the example's smoke-test sizes")
    parser.add_argument("--presets", default="bitnet-b158,w4a8")
    docpage.add_argument(parser)
    args = parser.parse_args(argv)
    out = docpage.Output(args.write_docs, "bench_finetune", argv and [__file__, *argv])
    out.record("transformers")
    import finetune_lowbit

    r = finetune_lowbit.main(["--presets", args.presets] + (["--quick"] if args.quick else []))
    ref = r["float +extra"]
    label = {"float": "float (pretraining steps only)", "float +extra": "float + the QAT steps"}
    cells = [
        [label.get(key, key), f"{value:.3f}", f"{value - ref:+.3f}"]
        for key, value in r.items()
        if isinstance(value, float) and key != "seconds"
    ]
    out.print(f"The example took {r['seconds']:.0f} s. Held-out per-byte perplexity:\n")
    out.print(docpage.table(["model", "ppl", "gap to float + the QAT steps"], cells))
    preset = args.presets.split(",")[0]
    sample = r["sample"][len("The for statement") :].replace("\n", " ").replace("`", "'")
    out.print(f"\nThe {preset} student distilled from float, saved with `save_pretrained` and "
              f"reloaded with `from_pretrained`: logits identical: {r['reload identical']}; "
              f"through `stefx.save` / `stefx.load`: {r['stefx.load identical']}. Reloaded, it "
              f"continues \"The for statement\" with `{sample!r}`.")  # fmt: skip
    out.write()
    return r


if __name__ == "__main__":
    main()
