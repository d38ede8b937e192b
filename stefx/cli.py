"""Command line: ``stefx demo`` and ``stefx recipes`` (also ``python -m stefx``)."""

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
    args = parser.parse_args(argv)
    from stefx.errors import StefxError

    try:
        return args.func(args)
    except StefxError as e:
        print(f"stefx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
