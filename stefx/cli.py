"""Command line: ``stefx demo``, ``stefx recipes``, ``stefx convert`` (also ``python -m stefx``).

Exit codes: 0 success, 2 a usage or input error (one line on stderr, naming what to fix).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _recipes(args: argparse.Namespace) -> int:
    from stefx.recipe import load_recipe, preset_names

    for name in preset_names():
        recipe = load_recipe(name)
        first = recipe.description.strip().split(". ")[0]
        print(f"{name:14s} {first}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from stefx.demo import run_demo

    run_demo(args.recipe, args.float_steps, args.qat_steps)
    return 0


CONVERT_EXAMPLE = """examples:
  stefx convert runs/qat-llama --to gguf --out llama-q4_0.gguf
  stefx convert runs/qat-llama --to compressed-tensors --out llama-w4a16
  stefx convert runs/qat-llama --to stefx --out llama-packed      # packed, save_pretrained
  stefx convert my-float-llama --recipe gguf-q8_0 --to gguf --out llama.gguf   # PTQ, no QAT
"""


def _convert(args: argparse.Namespace) -> int:
    """Load a Hugging Face folder (a stefx-quantized one, or a float one with --recipe),
    then write it in the chosen format."""
    from pathlib import Path

    from stefx.errors import StefxError

    source = Path(args.source)
    if not (source / "config.json").is_file():
        raise StefxError(
            f"convert: {str(source)!r} is not a Hugging Face model folder (no config.json); "
            "give the folder save_pretrained wrote"
        )
    try:
        import transformers
    except ImportError:
        raise StefxError(
            "convert: transformers is not installed; pip install 'stefx[hf]'"
        ) from None
    import stefx
    import stefx.hf  # registers quant_method: stefx with from_pretrained

    config = transformers.AutoConfig.from_pretrained(source)
    quantized = getattr(config, "quantization_config", None) is not None
    if quantized and args.recipe:
        raise StefxError(
            f"convert: {str(source)!r} is quantized already; drop --recipe {args.recipe} "
            "(or convert the float checkpoint)"
        )
    if not quantized and not args.recipe:
        raise StefxError(
            f"convert: {str(source)!r} is a float checkpoint; pass --recipe NAME to quantize "
            "it first (post-training, without QAT), or give a stefx-quantized model's folder"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    if args.recipe:
        model = stefx.quantize(model, args.recipe, report=False).eval()
    out = Path(args.out)
    if args.to == "stefx":
        stefx.convert(model)
        model.save_pretrained(out)
    else:
        options = {}
        if args.to == "gguf":
            options = {"ternary": args.ternary, "float_type": args.float_type}
        if args.to == "onnx":
            ids = _example_ids(config.vocab_size, args.seq_len)
            options["example_inputs"] = (ids,)
        if args.no_strict:
            options["strict"] = False
        stefx.export(model, out, format=args.to, **options)
    print(f"stefx: wrote {out} ({args.to})")
    return 0


def _example_ids(vocab: int, seq_len: int):
    import torch

    return torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stefx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, quantize and fine-tune a small model offline")
    demo.add_argument("--recipe", default="w4a8", help="preset name or recipe file")
    demo.add_argument("--float-steps", type=int, default=120)
    demo.add_argument("--qat-steps", type=int, default=40)
    demo.set_defaults(func=_demo)
    recipes = sub.add_parser("recipes", help="list the preset recipes")
    recipes.set_defaults(func=_recipes)
    convert = sub.add_parser(
        "convert",
        help="write a quantized model in a format a runtime loads (GGUF, compressed-tensors, ...)",
        description=_convert.__doc__,
        epilog=CONVERT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("source", help="a Hugging Face model folder (save_pretrained)")
    convert.add_argument(
        "--to", required=True, choices=["gguf", "compressed-tensors", "hf-bitnet", "onnx", "stefx"]
    )
    convert.add_argument("--out", required=True, help="the file (gguf, onnx) or folder to write")
    convert.add_argument("--recipe", help="quantize a float checkpoint first (no QAT)")
    convert.add_argument(
        "--no-strict",
        action="store_true",
        help="re-quantize layers the format cannot hold exactly, and report their error",
    )
    convert.add_argument("--ternary", default="tq2_0", choices=["tq2_0", "tq1_0"], help="gguf")
    convert.add_argument("--float-type", default="f16", choices=["f16", "f32"], help="gguf")
    convert.add_argument("--seq-len", type=int, default=16, help="onnx: example input length")
    convert.set_defaults(func=_convert)
    args = parser.parse_args(argv)
    from stefx.errors import StefxError

    try:
        return args.func(args)
    except StefxError as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"stefx: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
