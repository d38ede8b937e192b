"""What stefx.convert stores and computes, preset by preset, on a byte-level Llama.

The LM of ``bench_quality_lm.py`` (hidden 128, 4 layers, MLP 352) is trained in float on
``pydoc_data.topics``, then for each convertible preset: quantized, fine-tuned (QAT), and
converted. Per preset: the bits per weight the converted decoder Linears store (codes,
scales and zero points), the size of the ``stefx.save`` file against the float model's,
held-out per-byte perplexity of the fake-quantized and of the converted model, and how far
the converted logits are from the fake-quantized ones (max |Δ|, top-1 agreement).

    python benchmarks/bench_convert.py                   # ~4 min on 2 cores
    python benchmarks/bench_convert.py --float-steps 1200 --qat-steps 300
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import stefx
from stefx.convert import PackedWeight
from stefx.demo import corpus_split, held_out_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage

PRESETS = ["w8a8", "w4a8", "w4a16-g128", "w2a16-g64", "bitnet-b158", "ternary-twn", "w1a16",
           "w4a16-channel"]  # fmt: skip
# a weight-only per-channel int4 recipe: the lattice compressed-tensors holds at any width
W4_CHANNEL = {
    "name": "w4a16-channel",
    "rules": [
        {
            "targets": ["linear"],
            "ignore": ["lm_head"],
            "weights": {"type": "lsq", "num_bits": 4, "strategy": "channel", "init": "mse"},
        }
    ],
}


def _file_bytes(model, path: Path) -> int:
    if stefx.rewrite.quantized_modules(model):
        stefx.save(model, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def _bits_per_weight(model) -> float:
    stored = numel = 0
    for module in model.modules():
        if isinstance(module, PackedWeight):
            stored += sum(t.numel() * t.element_size() for t in module.state_dict().values())
            numel += module.weight_shape.numel()
    return stored * 8 / numel


@torch.no_grad()
def _agreement(a, b, data, seq=128, batches=8):
    worst, same, total = 0.0, 0, 0
    for i in range(batches):
        x = data[i * seq : (i + 1) * seq].unsqueeze(0)
        la, lb = a(input_ids=x).logits, b(input_ids=x).logits
        worst = max(worst, (la - lb).abs().max().item())
        same += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        total += x.numel()
    return worst, same / total


def main(argv: list[str] | None = None) -> None:
    import bench_quality_lm as lm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--float-steps", type=int, default=600)
    parser.add_argument("--qat-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    docpage.add_argument(parser)
    args = parser.parse_args(argv)
    out = docpage.Output(args.write_docs, "bench_convert", argv and [__file__, *argv])
    out.record("transformers", "compressed-tensors")
    torch.set_num_threads(args.threads)
    train, val = corpus_split()
    base = lm.train(lm.build(0), train, args.float_steps, 3e-3, 128, 0)
    tmp = Path(tempfile.mkdtemp())
    float_bytes = _file_bytes(base, tmp / "float.safetensors")
    out.print(f"Float after {args.float_steps} steps: held-out perplexity "
              f"{math.exp(held_out_loss(base, val, 128)):.3f}, safetensors file {float_bytes:,} B. "
              f"Each preset: {args.qat_steps} QAT steps, then `stefx.convert`.\n")  # fmt: skip
    out.print("| preset | bits/weight stored | file vs float | ppl fake-quant | ppl converted "
              "| max abs logit diff | top-1 agreement |")  # fmt: skip
    out.print("|---|---|---|---|---|---|---|")
    exports = []
    for preset in args.presets.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recipe = W4_CHANNEL if preset == "w4a16-channel" else preset
            q = stefx.quantize(copy.deepcopy(base), recipe, report=False)
        lm.train(q, train, args.qat_steps, 3e-4, 128, 1000)
        q.eval()
        fake = copy.deepcopy(q)
        stefx.convert(q)
        ppl_fake = math.exp(held_out_loss(fake, val, 128))
        ppl_conv = math.exp(held_out_loss(q, val, 128))
        worst, top1 = _agreement(fake, q, val)
        size = _file_bytes(q, tmp / f"{preset}.safetensors")
        label = f"{preset} (LSQ int4 per row, weight-only)" if recipe is W4_CHANNEL else preset
        out.print(f"| {label} | {_bits_per_weight(q):.2f} | {size / float_bytes:.3f} | "
                  f"{ppl_fake:.3f} | {ppl_conv:.3f} | {worst:.1e} | "
                  f"{top1 * 100:.2f}% |")  # fmt: skip
        exports.append((preset, fake))
    out.print("\nEach model exported, then loaded by "
              "`transformers.AutoModelForCausalLM.from_pretrained`:\n")  # fmt: skip
    out.print("| preset | format | loaded by transformers: ppl | max abs logit diff | top-1 |")
    out.print("|---|---|---|---|---|")
    for preset, fake in exports:
        for fmt in ("compressed-tensors", "hf-bitnet"):  # the folders transformers loads
            loaded = _exported(fake, fmt, tmp / f"{preset}-{fmt}", val)
            out.print(f"| {preset} | {fmt} | {loaded} |")
    out.write()


def _exported(fake, fmt: str, path: Path, val) -> str:
    import transformers

    try:
        stefx.export(fake, path, format=fmt)
    except stefx.ConvertError as e:
        lines = str(e).splitlines()
        why = lines[1].split(": ", 1)[-1] if len(lines) > 1 else lines[0].split(": ", 2)[-1]
        count = lines[0].split(": ", 1)[-1].split(" layer(s)")[0]
        where = f" ({count} layers)" if count.isdigit() else ""
        return f"refused{where}: {why.strip()} | | "
    kwargs = {"attn_implementation": fake.config._attn_implementation}
    if fmt == "compressed-tensors":  # zero points: see stefx.export
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    worst, top1 = _agreement(fake, back, val)
    return f"{math.exp(held_out_loss(back, val, 128)):.3f} | {worst:.1e} | {top1 * 100:.2f}%"


if __name__ == "__main__":
    main()
