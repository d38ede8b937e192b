"""The stefx command line (also: python -m stefx).

    stefx demo                                      the whole cycle on the shipped LM
    stefx quantize MODEL --recipe R [--out DIR]     quantize (PTQ) and print the report
    stefx explain MODEL --recipe R                  which layers each rule would touch
    stefx profile MODEL [--hardware H] [--measure]  what the model costs, before and after
    stefx train MODEL --recipe R --data FILE        QAT fine-tuning on a text file
    stefx convert DIR --to FORMAT --out PATH        GGUF, compressed-tensors, ONNX, ...
    stefx recipes list | show NAME | validate FILE

MODEL is a Hugging Face model folder (what save_pretrained writes), a config.json (random
weights), package.module:factory (a callable returning a model, or a model and its
example inputs), or a built-in name: demo-lm (the byte-level Llama stefx ships) or cnn
(a small CNN).

Exit codes: 0 done; 1 an unexpected failure (its traceback with --debug); 2 bad
arguments or input (one line on stderr naming what to fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

BUILTINS = ("demo-lm", "cnn")


def _fail(message: str):
    from stefx.errors import StefxError

    return StefxError(message)


# -- models ----------------------------------------------------------------------------------


def _small_cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


def load_model(spec: str, *, batch: int = 1, seq_len: int = 128, meta: bool = False):
    """(model, example inputs, is a Hugging Face model) for a MODEL argument."""
    import torch

    if spec == "cnn":
        return _small_cnn(), (torch.randn(batch, 3, 32, 32),), False
    if spec == "demo-lm":
        from stefx.demo import demo_config, load_demo_lm

        model = _hf_from_config(demo_config()) if meta else load_demo_lm()
        return model, _ids(model.config.vocab_size, batch, seq_len), True
    path = Path(spec)
    if path.is_dir() or path.suffix == ".json":
        return _load_hf(path, batch, seq_len, meta)
    if ":" in spec:
        return _load_factory(spec)
    raise _fail(
        f"model {spec!r} is not a folder, a config.json, a package.module:factory or a "
        f"built-in name ({', '.join(BUILTINS)})"
    )


def _ids(vocab: int, batch: int, seq_len: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=g)}


def _hf_from_config(config):
    import torch
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _load_hf(path: Path, batch: int, seq_len: int, meta: bool):
    if not path.exists():
        raise _fail(f"model: {str(path)!r} does not exist")
    try:
        import transformers
    except ImportError:
        raise _fail(
            "model: a Hugging Face model needs transformers; pip install 'stefx[hf]'"
        ) from None
    import stefx.hf  # noqa: F401  (from_pretrained knows quant_method: stefx)

    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not (path / "config.json").is_file():
        raise _fail(
            f"model: {str(path)!r} has no config.json; give the folder save_pretrained wrote"
        )
    config = transformers.AutoConfig.from_pretrained(path)
    if meta:
        model = _hf_from_config(config)
    elif path.is_dir() and any(folder.glob("*.safetensors")):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    else:  # a bare config: random weights
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model, _ids(config.vocab_size, batch, seq_len), True


def _load_factory(spec: str):
    import importlib

    from torch import nn

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise _fail(f"model: cannot load {spec!r}: {e}") from None
    made = factory()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise _fail(f"model: {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    from stefx.capture.inputs import is_hf_model

    return model, inputs, is_hf_model(model)


def _print_report(report, fmt: str | None, plot: str | None) -> None:
    if fmt == "json":
        print(report.to_json(indent=1))
    elif fmt == "csv":
        print(report.to_csv(), end="")
    elif fmt == "md":
        print(report.to_markdown())
    else:
        print(report)
    if plot:
        report.plot(plot)
        print(f"stefx: plot written to {plot}", file=sys.stderr)


# -- verbs -----------------------------------------------------------------------------------


def _quantize(args: argparse.Namespace) -> int:
    import stefx

    model, inputs, hf = load_model(args.model, batch=args.batch, seq_len=args.seq_len)
    q = stefx.quantize(model, args.recipe, inputs, report=False)
    _print_report(stefx.profile(q, inputs, args.hardware), args.report, args.plot)
    if args.out:
        out = Path(args.out)
        if hf:
            q.save_pretrained(out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            stefx.save(q, out / "model.safetensors")
        print(f"stefx: wrote {out}", file=sys.stderr)
    return 0


def _explain(args: argparse.Namespace) -> int:
    import stefx

    model, inputs, _ = load_model(args.model, batch=1, seq_len=args.seq_len)
    print(stefx.explain(model, args.recipe, inputs))
    return 0


def _profile(args: argparse.Namespace) -> int:
    import stefx

    if args.meta and args.measure:
        raise _fail("profile: --meta builds the model without weights; drop --measure or --meta")
    model, inputs, _ = load_model(
        args.model, batch=args.batch, seq_len=args.seq_len, meta=args.meta
    )
    report = stefx.profile(model, inputs, args.hardware, recipe=args.recipe, measure=args.measure)
    _print_report(report, args.report, args.plot)
    return 0


def _train(args: argparse.Namespace) -> int:
    import stefx
    from stefx.demo import held_out_loss, train_steps

    data_path = Path(args.data)
    if not data_path.is_file():
        raise _fail(f"train: --data {str(data_path)!r} is not a file; give a UTF-8 text file")
    model, inputs, hf = load_model(args.model, seq_len=args.seq_len)
    if not hf:
        raise _fail("train: the loop trains causal language models; MODEL is not one")
    text = data_path.read_text(encoding="utf-8", errors="replace")
    ids = _tokenize(args.model, text, model.config.vocab_size)
    if ids.numel() < 2 * args.seq_len + 2:
        raise _fail(f"train: {data_path} holds {ids.numel()} tokens; it needs more than "
                    f"{2 * args.seq_len + 2} (one training and one held-out window)")  # fmt: skip
    split = max(args.seq_len + 1, ids.numel() * 9 // 10)
    train, val = ids[:split], ids[split:]
    q = stefx.quantize(model, args.recipe, inputs, report=False)
    before = held_out_loss(q, val, min(args.seq_len, val.numel() - 1), 32)
    train_steps(q, train, args.steps, args.lr, seed=0, progress=f"QAT {args.recipe}")
    after = held_out_loss(q, val, min(args.seq_len, val.numel() - 1), 32)
    print(f"held-out loss: {before:.3f} after quantization, {after:.3f} after {args.steps} "
          "QAT steps")  # fmt: skip
    if args.out:
        q.save_pretrained(args.out)
        print(f"stefx: wrote {args.out}", file=sys.stderr)
    return 0


def _tokenize(model_spec: str, text: str, vocab: int):
    """Token ids of ``text``: the model folder's own tokenizer when it has one, else bytes
    (a byte-level model: vocabulary of at least 256)."""
    import torch

    folder = Path(model_spec)
    if folder.is_dir() and any(folder.glob("tokenizer*")):
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(folder)
        return torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    if vocab < 256:
        raise _fail(
            f"train: the model has no tokenizer and {vocab} < 256 tokens, so it cannot read "
            "bytes; save its tokenizer beside it (tokenizer.save_pretrained)"
        )
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def _recipes(args: argparse.Namespace) -> int:
    from stefx.recipe import load_recipe, preset_names

    action = args.action or "list"
    if action == "list":
        for name in preset_names():
            recipe = load_recipe(name)
            first = recipe.description.strip().split(". ")[0]
            print(f"{name:14s} {first}")
        return 0
    if not args.name:
        raise _fail(f"recipes {action}: give a {'preset name' if action == 'show' else 'file'}")
    if action == "show":
        from stefx.recipe import presets_dir

        if args.name not in preset_names():
            load_recipe(args.name)  # the typed error with the nearest preset names
        print((presets_dir() / f"{args.name}.yaml").read_text(), end="")
        return 0
    recipe = load_recipe(args.name)  # validate: a typed error names what is wrong
    print(f"{args.name}: valid recipe {recipe.name!r} with {len(recipe.rules)} rule(s)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from stefx.demo import run_demo

    run_demo(args.recipe, args.steps, plot=args.plot, progress=not args.no_progress)
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
    source = Path(args.source)
    if not (source / "config.json").is_file():
        raise _fail(
            f"convert: {str(source)!r} is not a Hugging Face model folder (no config.json); "
            "give the folder save_pretrained wrote"
        )
    try:
        import transformers
    except ImportError:
        raise _fail("convert: transformers is not installed; pip install 'stefx[hf]'") from None
    import stefx
    import stefx.hf  # registers quant_method: stefx with from_pretrained

    config = transformers.AutoConfig.from_pretrained(source)
    quantized = getattr(config, "quantization_config", None) is not None
    if quantized and args.recipe:
        raise _fail(
            f"convert: {str(source)!r} is quantized already; drop --recipe {args.recipe} "
            "(or convert the float checkpoint)"
        )
    if not quantized and not args.recipe:
        raise _fail(
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
        options: dict[str, Any] = {}
        if args.to == "gguf":
            options = {"ternary": args.ternary, "float_type": args.float_type}
        if args.to == "onnx":
            ids = _ids(config.vocab_size, 1, args.seq_len)["input_ids"]
            options["example_inputs"] = (ids,)
        if args.no_strict:
            options["strict"] = False
        stefx.export(model, out, format=args.to, **options)
    print(f"stefx: wrote {out} ({args.to})")
    return 0


# -- the parser ------------------------------------------------------------------------------

_MODEL_HELP = (
    "a Hugging Face model folder, a config.json, package.module:factory, or a built-in name "
    f"({', '.join(BUILTINS)})"
)


def _positive(text: str) -> int:
    """argparse type: a whole number >= 1 (steps, lengths, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _verb(sub, name: str, help: str, example: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware", default="a100", help="a100, h100, h200, cpu-x86 or a YAML file")
    p.add_argument("--report", choices=["text", "md", "json", "csv"], default="text")
    p.add_argument("--plot", help="also write per-layer bars of size and BOPs to this PNG")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stefx",
        description=__doc__.split("\n\n")[0].strip(),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = _verb(sub, "demo", "the whole cycle on the LM shipped with stefx, offline",
                 "stefx demo --recipe w4a8 --plot demo.png", _demo)  # fmt: skip
    demo.add_argument("--recipe", default="bitnet-b158", help="preset name or recipe file")
    demo.add_argument(
        "--steps", type=_positive, default=300, help="fine-tuning steps (QAT and float)"
    )
    demo.add_argument("--plot", help="write loss curves and size/quality to this PNG")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    q = _verb(sub, "quantize", "quantize a model (post-training) and print its report",
              "stefx quantize demo-lm --recipe w4a8 --out runs/w4a8", _quantize)  # fmt: skip
    q.add_argument("model", help=_MODEL_HELP)
    q.add_argument("--recipe", required=True, help="preset name or recipe file")
    q.add_argument("--out", help="save the quantized model to this folder")
    q.add_argument("--seq-len", type=_positive, default=128)
    q.add_argument("--batch", type=_positive, default=1)
    _report_args(q)

    e = _verb(sub, "explain", "which layers each rule of a recipe would quantize",
              "stefx explain demo-lm --recipe gguf-q4_0", _explain)  # fmt: skip
    e.add_argument("model", help=_MODEL_HELP)
    e.add_argument("--recipe", required=True)
    e.add_argument("--seq-len", type=_positive, default=16)

    p = _verb(sub, "profile", "FLOPs, MACs, BOPs, bytes, latency and energy, per layer",
              "stefx profile demo-lm --recipe bitnet-b158 --hardware h100", _profile)  # fmt: skip
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--recipe", help="profile as this recipe would quantize it")
    p.add_argument("--measure", action="store_true", help="also time it on this machine")
    p.add_argument("--seq-len", type=_positive, default=128)
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--meta", action="store_true", help="no weights (meta device): shapes only")
    _report_args(p)

    t = _verb(sub, "train", "QAT: quantize a causal LM and fine-tune it on a text file",
              "stefx train demo-lm --recipe w4a8 --data notes.txt --steps 200 --out runs/w4a8",
              _train)  # fmt: skip
    t.add_argument("model", help=_MODEL_HELP)
    t.add_argument("--recipe", required=True)
    t.add_argument("--data", required=True, help="a UTF-8 text file (90%% train, 10%% held out)")
    t.add_argument("--steps", type=_positive, default=200)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--seq-len", type=_positive, default=128)
    t.add_argument("--out", help="save_pretrained the fine-tuned model here")

    c = _verb(sub, "convert", "write a quantized model in a format a runtime loads",
              "stefx convert runs/qat-llama --to gguf --out llama.gguf", _convert)  # fmt: skip
    c.epilog = CONVERT_EXAMPLE
    c.add_argument("source", help="a Hugging Face model folder (save_pretrained)")
    c.add_argument(
        "--to", required=True, choices=["gguf", "compressed-tensors", "hf-bitnet", "onnx", "stefx"]
    )
    c.add_argument("--out", required=True, help="the file (gguf, onnx) or folder to write")
    c.add_argument("--recipe", help="quantize a float checkpoint first (no QAT)")
    c.add_argument(
        "--no-strict",
        action="store_true",
        help="re-quantize layers the format cannot hold exactly, and report their error",
    )
    c.add_argument("--ternary", default="tq2_0", choices=["tq2_0", "tq1_0"], help="gguf")
    c.add_argument("--float-type", default="f16", choices=["f16", "f32"], help="gguf")
    c.add_argument("--seq-len", type=_positive, default=16, help="onnx: example input length")

    r = _verb(sub, "recipes", "list the presets, show one, or validate a recipe file",
              "stefx recipes show gguf-q4_0", _recipes)  # fmt: skip
    r.add_argument("action", nargs="?", choices=["list", "show", "validate"], default="list")
    r.add_argument("name", nargs="?", help="a preset name (show) or a recipe file (validate)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from stefx.errors import StefxError

    try:
        return args.func(args)
    except StefxError as e:
        if args.debug:
            raise
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"stefx: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stefx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem: one line, details on --debug
        if args.debug:
            raise
        print(f"stefx: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
