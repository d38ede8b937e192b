"""What the ONNX QDQ export buys in onnxruntime: speed, memory and file size against the
float ONNX export of the same model.

    python benchmarks/bench_onnx.py [--json out.json] [--repeats 20] [--quick]

For each model (a small Llama: hidden 256, 4 layers, intermediate 768, byte vocab, seq
128, batch 1 and 8; an MLP; a CNN) and each preset, the quantized model is exported with
``stefx.export(format="onnx")`` and its float twin (the same weights before quantization)
with ``torch.onnx.export``; both run on onnxruntime's CPU provider with the same session
options (``ORT_ENABLE_ALL``, 2 intra-op threads): once with onnxruntime's defaults (what a
user gets: its ``MatMulNBits`` fusion computes with int8 activations, accuracy level 4)
and once with ``session.qdq_matmulnbits_accuracy_level = 1`` (float32 compute, stefx's
numbers).

Each session runs in a fresh worker process that imports only onnxruntime and numpy, so
its peak resident set (``ru_maxrss``) is onnxruntime's own: the model's initializers,
what the optimizer made of them, and the arena. The table also says which integer kernels
onnxruntime fused the QDQ pairs into (from the optimized model it writes,
``SessionOptions.optimized_model_filepath``) and how far its output is from stefx's
fake-quantized output (max abs; top-1 agreement for the LM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage

INTEGER_KERNELS = (
    "MatMulNBits",
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QLinearConv",
    "ConvInteger",
    "QAttention",
    "DynamicQuantizeLSTM",
)


def _worker(
    model: str, inputs: str, repeats: int, threads: int, optimized: str, accuracy: str
) -> None:
    """Load one session, time it, print JSON (runs in its own process: see the docstring)."""
    import time
    from collections import Counter

    import numpy as np
    import onnxruntime as ort

    def status(key: str) -> float:  # MB, from the kernel's accounting of this process
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    feed = dict(np.load(inputs))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.optimized_model_filepath = optimized
    if accuracy != "default":  # MatMulNBits' compute type: 1 = float32, 4 = int8 (default)
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy)
    before = status("VmRSS")
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = dict(zip(names, feed.values(), strict=True))
    out = sess.run(None, feed)[0]  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    peak = status("VmHWM")
    import onnx  # after the measurement: its import is not onnxruntime's memory

    ops = Counter(n.op_type for n in onnx.load(optimized, load_external_data=False).graph.node)
    np.save(inputs + ".out.npy", out)
    print(
        json.dumps(
            {
                "median_ms": 1e3 * float(np.median(times)),
                "peak_rss_mb": peak,
                "session_rss_mb": peak - before,
                "fused": {k: ops[k] for k in INTEGER_KERNELS if ops[k]},
                "qdq_left": ops["QuantizeLinear"] + ops["DequantizeLinear"],
            }
        )
    )


def _measure(
    path: Path, inputs: dict, repeats: int, threads: int, work: Path, accuracy: str = "default"
) -> dict:
    import numpy as np

    npz = work / f"{path.stem}.npz"
    np.savez(npz, **{f"in{i}": v for i, v in enumerate(inputs.values())})
    cmd = [sys.executable, __file__, "--worker", str(path), str(npz), str(repeats), str(threads)]
    cmd += [str(work / f"{path.stem}.opt.onnx"), accuracy]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"worker failed on {path}:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["output"] = np.load(str(npz) + ".out.npy")
    data = [p for p in path.parent.glob(path.name + "*") if p.suffix != ".onnx" or p == path]
    out["file_mb"] = sum(p.stat().st_size for p in data) / 2**20  # with external data
    return out


def _llama(hidden=256, layers=4, inter=768):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024), nn.GELU(), nn.Linear(1024, 256)
    ).eval()


def _cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip


class _Logits:
    """A Hugging Face model as ``input_ids -> logits`` for the float export."""

    @staticmethod
    def wrap(model):
        from torch import nn

        class Logits(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(input_ids=ids, use_cache=False).logits

        return Logits(model)


def run(args) -> list[dict]:
    import copy
    import warnings

    import numpy as np
    import torch

    import stefx

    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="stefx-bench-onnx-"))
    g = torch.Generator().manual_seed(0)
    cases = []  # (name, builder, is_lm, example, presets)
    batches = (1,) if args.quick else (1, 8)
    for b in batches:
        ids = torch.randint(0, 256, (b, 128), generator=g)
        cases.append((f"llama-h256-l4 b{b} s128", _llama, True, ids, ("w8a8", "w4a16-g128")))
    if not args.quick:
        cases.append(
            ("mlp 1024-4096 b64", _mlp, False, torch.randn(64, 1024, generator=g), ("w8a8", "w4a8"))
        )
        cases.append(
            ("cnn 64x64 b8", _cnn, False, torch.randn(8, 3, 64, 64, generator=g), ("w8a8", "w4a8"))
        )
    rows = []
    for name, build, lm, x, presets in cases:
        float_model = build()
        tag = name.split()[0] + "-" + name.split()[1]
        fpath = work / f"{tag}-float.onnx"
        traced = _Logits.wrap(float_model) if lm else float_model
        with torch.no_grad():
            torch.onnx.export(
                traced, (x,), str(fpath), dynamo=True, opset_version=21, verbose=False,
                external_data=False,
            )  # fmt: skip
        with torch.no_grad():
            ref = traced(x).numpy()
        base = _measure(fpath, {"x": x.numpy()}, args.repeats, args.threads, work)
        rows.append({"model": name, "variant": "float", **_row(base, ref, lm, base)})
        for preset in presets:
            q = stefx.quantize(
                copy.deepcopy(float_model), preset, None if lm else (x,), report=False
            )
            q.eval()
            path = work / f"{tag}-{preset}.onnx"
            stefx.export(q, path, format="onnx", example_inputs=(x,))
            with torch.no_grad():
                want = (q(input_ids=x).logits if lm else q(x)).numpy()
            for accuracy in ("default", "1"):
                got = _measure(path, {"x": x.numpy()}, args.repeats, args.threads, work, accuracy)
                label = preset if accuracy == "default" else f"{preset} (acc. level 1)"
                rows.append({"model": name, "variant": label, **_row(got, want, lm, base)})
                print(_format([rows[-1]], header=False), file=sys.stderr)
    del np
    return rows


def _row(m: dict, want, lm: bool, base: dict) -> dict:
    import numpy as np

    got = m["output"]
    row = {
        "file_mb": round(m["file_mb"], 3),
        "median_ms": round(m["median_ms"], 3),
        "peak_rss_mb": round(m["peak_rss_mb"], 1),
        "session_rss_mb": round(m["session_rss_mb"], 1),
        "latency_vs_float": round(m["median_ms"] / base["median_ms"], 3),
        "rss_vs_float": round(m["session_rss_mb"] / max(base["session_rss_mb"], 1e-9), 3),
        "file_vs_float": round(m["file_mb"] / base["file_mb"], 3),
        "fused": m["fused"],
        "qdq_left": m["qdq_left"],
        "max_abs_err": float(np.abs(got - want).max()),
    }
    if lm:
        row["top1_agree"] = float((got.argmax(-1) == want.argmax(-1)).mean())
    return row


COLUMNS = (
    ("model", "model"),
    ("variant", "variant"),
    ("file_mb", "file MB"),
    ("file_vs_float", "file ×float"),
    ("median_ms", "median ms"),
    ("latency_vs_float", "latency ×float"),
    ("session_rss_mb", "session RSS MB"),
    ("rss_vs_float", "RSS ×float"),
    ("fused", "ORT integer kernels"),
    ("qdq_left", "Q/DQ left"),
    ("max_abs_err", "max abs error vs stefx"),
    ("top1_agree", "top-1"),
)


def _format(rows: list[dict], header: bool = True) -> str:
    def cell(v):
        if isinstance(v, dict):
            return ", ".join(f"{k}×{n}" for k, n in v.items()) or "none"
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = []
    if header:
        lines.append("| " + " | ".join(t for _, t in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, inputs, repeats, threads, optimized, accuracy = sys.argv[2:8]
        _worker(model, inputs, int(repeats), int(threads), optimized, accuracy)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--quick", action="store_true", help="the Llama at batch 1 only")
    docpage.add_argument(parser)
    args = parser.parse_args()
    out = docpage.Output(args.write_docs, "bench_onnx")
    out.record("onnx", "onnxruntime")
    rows = run(args)
    out.print(f"onnxruntime CPU provider, `ORT_ENABLE_ALL`, {args.threads} intra-op threads; "
              f"latency the median of {args.repeats}; RSS the session's own peak.\n")  # fmt: skip
    out.print(_format(rows))
    out.write()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
