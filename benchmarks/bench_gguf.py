"""GGUF export of a byte-level Llama trained on real text: size, quality, and llama.cpp.

A Llama (hidden 256, 4 layers, MLP 768, byte vocabulary: rows of 256, so every block type
fits) is trained in float on ``pydoc_data.topics``; float gets the same extra steps as
QAT. Then for each GGUF preset: QAT, convert, ``stefx.export(format="gguf")``. Per preset:
the file's size and bits per weight of the quantized tensors (scales included), held-out
per-byte perplexity of float, fake-quant, converted, and of the file's own weights
(``gguf.quants.dequantize`` loaded back into the model: what any GGUF reader gets), and,
when ``llama_cpp`` (llama-cpp-python) is importable, of the file run by llama.cpp, with
its logits against stefx's (max |Δ|, top-1 agreement) and its speed and memory against
llama.cpp's run of the float model's own F32 and F16 exports.

    python benchmarks/bench_gguf.py              # ~1 h on 2 cores
    python benchmarks/bench_gguf.py --float-steps 300 --qat-steps 50 --presets gguf-q8_0
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import stefx
from stefx.demo import corpus, corpus_split, held_out_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage

PRESETS = ["gguf-q8_0", "gguf-q4_0", "gguf-tq2_0"]
SEQ = 128


def build(seed: int = 0):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def file_weights(path: Path, model) -> dict[str, torch.Tensor]:
    """The file's tensors, dequantized by the gguf package, under the model's names."""
    import gguf

    from stefx.export.to_gguf import _gguf_name, _permutation

    names = {_gguf_name(k): k for k in model.state_dict() if not _is_quantizer(k)}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
        key = names[t.name]
        w = w.reshape(shape)
        perm = _permutation(key, shape[0], model.config)
        if perm is not None:
            w = w[torch.argsort(perm)]
        out[key] = w
    return out


def _is_quantizer(key: str) -> bool:
    return "_quantizer." in key or key.endswith("_quantizer")


def _bits_per_weight(path: Path) -> float:
    import gguf

    stored = numel = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type.name in ("Q8_0", "Q4_0", "TQ2_0", "TQ1_0"):
            stored += int(t.n_bytes)
            numel += int(t.n_elements)
    return stored * 8 / numel


@torch.no_grad()
def _logits(model, data, windows: int) -> torch.Tensor:
    model.eval()
    xs = data[: windows * SEQ].view(windows, SEQ)
    return torch.cat([model(input_ids=x[None]).logits[0] for x in xs])


def _ppl_from_logits(logits: torch.Tensor, data, windows: int) -> float:
    xs = data[: windows * SEQ].view(windows, SEQ)
    lg = logits.view(windows, SEQ, -1)[:, :-1]
    loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), xs[:, 1:].reshape(-1))
    return math.exp(loss.item())


def llama_cpp_run(path: Path, data, windows: int, threads: int, repeats: int = 3):
    """llama.cpp's logits over ``windows`` windows (each from an empty context), its
    prompt-processing and generation speed (tokens/s, median of ``repeats``), and the
    bytes of its model's tensors in memory, as llama.cpp counts them (``llama_model_size``;
    the file is memory-mapped, so a resident-set delta would count only pages touched)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=SEQ * 2, n_batch=SEQ, logits_all=True,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    loaded = llm._model.size() / 1e6
    xs = data[: windows * SEQ].view(windows, SEQ)
    logits = []
    for x in xs:
        llm.reset()
        llm.eval(x.tolist())
        logits.append(torch.from_numpy(np.array(llm.scores[:SEQ], np.float32)))
    prompt, gen = [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(xs[0].tolist())
        prompt.append(SEQ / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for tok in xs[0, :32].tolist():  # after the prompt: 32 more tokens, one by one
            llm.eval([tok])
        gen.append(32 / (time.perf_counter() - t0))
    del llm
    return torch.cat(logits), statistics.median(prompt), statistics.median(gen), loaded


def main(argv: list[str] | None = None) -> None:
    import bench_quality_lm as lm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--float-steps", type=int, default=1500)
    parser.add_argument("--qat-steps", type=int, default=300)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 128 bytes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="llama.cpp speed and memory only, on untrained weights (speed does not depend "
        "on their values): re-measure on a quiet machine",
    )
    parser.add_argument("--rounds", type=int, default=4,
                        help="--speed-only: rounds over all files, interleaved")  # fmt: skip
    docpage.add_argument(parser)
    args = parser.parse_args(argv)
    key = "bench_gguf --speed-only" if args.speed_only else "bench_gguf"
    out = docpage.Output(args.write_docs, key, argv and [__file__, *argv])
    out.record("gguf", "llama-cpp-python")
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
    torch.set_num_threads(args.threads)
    if args.speed_only:
        if not have_llama:
            raise SystemExit("--speed-only needs llama_cpp: pip install llama-cpp-python")
        return speed_only(args, out)
    train, val = corpus_split()
    t0 = time.perf_counter()
    curve: list[float] = []
    base = lm.train(build(0), train, args.float_steps, 3e-3, SEQ, 0,
                    log=max(1, args.float_steps // 6), val=val, curve=curve)  # fmt: skip
    flat = len(curve) > 1 and curve[-1] <= min(curve) * 1.005 and curve[-1] >= curve[-2] * 0.99
    flat_line = (f"the float validation loss {'has' if flat else 'has NOT'} flattened (last "
                 f"{curve[-1]:.3f}, lowest {min(curve):.3f})")  # fmt: skip
    print(flat_line)
    tmp = Path(tempfile.mkdtemp())
    ref = lm.train(copy.deepcopy(base), train, args.qat_steps, 3e-4, SEQ, 1000).eval()
    ppl_float = math.exp(held_out_loss(ref, val, SEQ, args.windows))
    print(f"float ({args.float_steps} + {args.qat_steps} steps, {time.perf_counter() - t0:.0f} s):"
          f" ppl {ppl_float:.3f}")  # fmt: skip
    rows, speed = [], []
    if have_llama:
        floats = {}
        for ft in ("f32", "f16"):
            # the float model's own GGUF (a model without quantizers exports as floats)
            path = tmp / f"float-{ft}.gguf"
            floats[ft] = stefx.export(ref, path, format="gguf", float_type=ft)
            logits, pp, tg, mem = llama_cpp_run(path, val, args.windows, args.threads)
            speed.append((f"float {ft.upper()}", path.stat().st_size, pp, tg, mem))
    for preset in args.presets.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = stefx.quantize(copy.deepcopy(base), preset, report=False)
        lm.train(q, train, args.qat_steps, 3e-4, SEQ, 1000)
        q.eval()
        fake_logits = _logits(q, val, args.windows)
        ppl_fake = _ppl_from_logits(fake_logits, val, args.windows)
        conv = stefx.convert(copy.deepcopy(q))
        ppl_conv = math.exp(held_out_loss(conv, val, SEQ, args.windows))
        path = stefx.export(q, tmp / f"{preset}.gguf", format="gguf")
        back = copy.deepcopy(ref)  # the file's weights in a float model (activations float)
        back.load_state_dict(file_weights(path, q), strict=False)
        ppl_file = math.exp(held_out_loss(back, val, SEQ, args.windows))
        row = {
            "preset": preset,
            "size": path.stat().st_size,
            "bpw": _bits_per_weight(path),
            "fake": ppl_fake,
            "conv": ppl_conv,
            "file": ppl_file,
        }
        if have_llama:
            logits, pp, tg, mem = llama_cpp_run(path, val, args.windows, args.threads)
            row["llama"] = _ppl_from_logits(logits, val, args.windows)
            row["diff"] = (logits - fake_logits).abs().max().item()
            row["top1"] = (logits.argmax(-1) == fake_logits.argmax(-1)).float().mean().item()
            speed.append((preset, path.stat().st_size, pp, tg, mem))
        rows.append(row)
    out.print(f"{args.float_steps} float steps ({flat_line}), then {args.qat_steps} more for "
              f"float and {args.qat_steps} QAT steps for each preset. Held-out per-byte "
              f"perplexity over {args.windows} windows of {SEQ} bytes; float + "
              f"{args.qat_steps} steps: {ppl_float:.3f}.\n")  # fmt: skip
    head = "| preset | file (kB) | bits/weight | ppl fake-quant | ppl converted | ppl file |"
    if have_llama:
        head += " ppl llama.cpp | max abs logit diff vs stefx | top-1 agreement |"
    out.print(head)
    out.print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (f"| {r['preset']} | {r['size'] / 1e3:.0f} | {r['bpw']:.3f} | {r['fake']:.3f} | "
                f"{r['conv']:.3f} | {r['file']:.3f} |")  # fmt: skip
        if have_llama:
            line += f" {r['llama']:.3f} | {r['diff']:.3g} | {r['top1'] * 100:.2f}% |"
        out.print(line)
    if not have_llama:
        out.print("\nllama_cpp is not importable: no llama.cpp figures "
                  "(pip install llama-cpp-python)")  # fmt: skip
    out.write()
    if not have_llama:
        return
    # speed on a machine busy with training is not a figure to publish: printed only
    print(
        f"\nllama.cpp on {args.threads} threads, median of 3: prompt {SEQ} tokens, then 32 "
        "tokens one at a time (--speed-only, on a quiet machine, for the published one)\n"
    )
    print("| file | size (kB) | model in memory (MB) | prompt tok/s | generation tok/s |"
          " prompt, generation vs F16 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    f16 = next(s for s in speed if s[0] == "float F16")
    for name, size, pp, tg, mem in speed:
        print(f"| {name} | {size / 1e3:.0f} | {mem:.2f} | {pp:.0f} | {tg:.0f} | "
              f"{pp / f16[2]:.2f}x, {tg / f16[3]:.2f}x |")  # fmt: skip


def speed_only(args, out) -> None:
    """The speed table alone: float F32/F16 and each preset's file, untrained weights; with
    each file's largest logit difference from stefx's own model over one 128-token window
    (the float files against the float model, F32 weights and activations in llama.cpp).
    ``args.rounds`` rounds go over every file in turn, so that drift hits them alike; each
    file's speed is a median of 5 within a round, and its ratio to F16 is taken per round."""
    data = corpus()
    tmp = Path(tempfile.mkdtemp())
    model = build(0).eval()
    files = [
        (f"float {ft.upper()}", model,
         stefx.export(model, tmp / f"f-{ft}.gguf", "gguf", float_type=ft))
        for ft in ("f32", "f16")
    ]  # fmt: skip
    for preset in args.presets.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = stefx.quantize(copy.deepcopy(model), preset, report=False).eval()
        files.append((preset, q, stefx.export(q, tmp / f"{preset}.gguf", format="gguf")))
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in files}
    facts = {}
    for _ in range(args.rounds):
        for name, ours, path in files:
            logits, pp, tg, mem = llama_cpp_run(path, data, 1, args.threads, 5)
            runs[name].append((pp, tg))
            if name not in facts:
                want = _logits(ours, data, 1)
                facts[name] = (path.stat().st_size, mem, (logits - want).abs().max().item(),
                               want.abs().max().item())  # fmt: skip
    f16 = runs["float F16"]

    def ratios(name: str, k: int) -> str:
        rs = sorted(r[k] / f[k] for r, f in zip(runs[name], f16, strict=True))
        return f"{statistics.median(rs):.2f}x ({rs[0]:.2f}–{rs[-1]:.2f})"

    out.print(f"llama.cpp on {args.threads} threads: a prompt of {SEQ} tokens, then 32 tokens one "
              f"at a time; {args.rounds} rounds over the files in turn, each file's speed a median "
              f"of 5 within a round; against F16 the median of the per-round ratios (range). "
              f"Memory: the bytes of the model's tensors as llama.cpp counts them "
              f"(`llama_model_size`; the file is mmap'ed). The logit difference is over one "
              f"window of {SEQ} tokens, untrained weights.\n")  # fmt: skip
    out.print("| file | size | model in memory | prompt vs F16 | generation vs F16 "
              "| max abs logit diff vs stefx (largest logit) |")  # fmt: skip
    out.print("|---|---|---|---|---|---|")
    for name, _, _ in files:
        size, mem, diff, top = facts[name]
        pp, tg = ratios(name, 0), ratios(name, 1)
        if name == "float F16":
            pp = f"{statistics.median(r[0] for r in f16) / 1e3:.1f}k tok/s"
            tg = f"{statistics.median(r[1] for r in f16) / 1e3:.1f}k tok/s"
        out.print(f"| {name} | {size / 1e6:.2f} MB | {mem:.2f} MB | {pp} | {tg} | "
                  f"{diff:.2g} ({top:.2f}) |")  # fmt: skip
    out.write()


if __name__ == "__main__":
    main()
