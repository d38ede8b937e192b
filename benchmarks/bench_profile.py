"""Benchmark stefx.profile: time and peak memory on a Llama-3-8B-shaped meta model, and
stefx's matmul-family MACs side by side with torch.utils.flop_counter (the tests' own
reference, tests/flop_reference.py), fvcore and ptflops over the test zoo.

    .venv/bin/python benchmarks/bench_profile.py            # both parts
    .venv/bin/python benchmarks/bench_profile.py --llama    # the 8B profile only
    .venv/bin/python benchmarks/bench_profile.py --zoo      # the side-by-side only

The 8B profile runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own.
Goal: under 20 s and 3 GB. The fvcore and ptflops columns need ``pip install -e .[bench]``
(``make bench`` installs it); without them they say "not installed".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import docpage  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
)
SEQ_LEN = 2048


def llama_child() -> dict:
    """Build the meta model, profile it with w4a8, return timings and peak RSS."""
    t0 = time.perf_counter()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stefx.profile import profile

    t_import = time.perf_counter() - t0
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
    ids = torch.zeros(1, SEQ_LEN, dtype=torch.long, device="meta")
    t1 = time.perf_counter()
    rep = profile(model, {"input_ids": ids}, recipe="w4a8", hardware="h100")
    t_profile = time.perf_counter() - t1
    t2 = time.perf_counter()
    text = str(rep)
    t_render = time.perf_counter() - t2
    b, a = rep.totals["before"], rep.totals["after"]
    return {
        "import_s": t_import,
        "profile_s": t_profile,
        "render_s": t_render,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "ops": len(rep.ops),
        "rows": len(rep.rows),
        "params": b["params"],
        "macs": b["macs"],
        "size_before_gb": b["param_bytes"] / 2**30,
        "size_after_gb": a["param_bytes"] / 2**30,
        "latency_before_s": b["latency_s"],
        "latency_after_s": a["latency_s"],
        "table_lines": text.count("\n"),
    }


def run_llama(page) -> dict:
    out = docpage.Output(page, "bench_profile --llama")
    child = subprocess.run(
        [sys.executable, __file__, "--child"], capture_output=True, text=True, check=True
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    out.print("Llama-3-8B shape on meta, 2048 tokens, recipe w4a8, hardware h100, in a fresh "
              "subprocess (peak RSS is its own):\n")  # fmt: skip
    cells = [[k, f"{v:.4g}" if isinstance(v, float) else f"{v:,}"] for k, v in result.items()]
    out.print(docpage.table(["measure", "value"], cells))
    ok = result["profile_s"] < 20 and result["peak_rss_gb"] < 3
    out.print(f"\nGoal (profile under 20 s and 3 GB): {'met' if ok else 'NOT met'}.")
    out.write()
    return result


def _positional(model, kwargs):
    """``model(*batch, **kwargs)`` behind positional arguments and a tuple output: the
    calling convention fvcore's tracer and ptflops' input_constructor both accept. (torch
    is imported here, not at the top: the 8B child times its own imports.)"""
    from torch import nn

    class Call(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args, batch=None):  # ptflops passes batch=..., fvcore *args
            out = self.model(*(args if batch is None else batch), **kwargs)
            return out.to_tuple() if hasattr(out, "to_tuple") else out

    return Call().eval()


# Operator names each tool files matrix products under (fvcore: its handle names).
_FVCORE_MATMUL = ("addmm", "bmm", "conv", "einsum", "matmul", "linear", "mm", "baddbmm")


def _optional_counters(model, args, kwargs) -> dict[str, str]:
    """fvcore and ptflops totals in MACs (both count one per multiply-accumulate), or why
    not. fvcore: matrix-product operators only (its total also counts norms and pooling).
    ptflops: its default ``pytorch`` backend (module hooks plus patched functionals) and
    its ``aten`` backend (matmul/addmm/bmm/convolution at dispatch)."""
    import io
    import warnings

    cols: dict[str, str] = {}
    wrapped = _positional(model, kwargs)
    try:
        from fvcore.nn import FlopCountAnalysis

        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(wrapped, tuple(args))
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_op = fca.by_operator()
        cols["fvcore"] = str(sum(v for k, v in by_op.items() if k in _FVCORE_MATMUL))
    except ImportError:
        cols["fvcore"] = "not installed"
    except Exception as e:  # fvcore traces with torch.jit
        cols["fvcore"] = f"fails: {type(e).__name__}"
    try:
        from ptflops import get_model_complexity_info
    except ImportError:
        return {**cols, "ptflops": "not installed", "ptflops aten": "not installed"}
    for col, backend in (("ptflops", "pytorch"), ("ptflops aten", "aten")):
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                macs, _ = get_model_complexity_info(
                    wrapped,
                    (1,),  # unused: input_constructor builds the real inputs
                    input_constructor=lambda _: {"batch": tuple(args)},
                    as_strings=False,
                    print_per_layer_stat=False,
                    backend=backend,
                )
            cols[col] = str(int(macs)) if macs is not None else "fails"
        except Exception as e:
            cols[col] = f"fails: {type(e).__name__}"
    return cols


def run_zoo(page) -> None:
    from tabulate import tabulate

    from stefx.profile import profile
    from tests.flop_reference import bound_inputs, macs_by_kind
    from tests.flop_reference import torch_macs as reference_macs
    from tests.zoo import HF_ZOO, PLAIN_ZOO

    rows = []
    for name, builder in {**PLAIN_ZOO, **HF_ZOO}.items():
        model, inputs = builder()
        t0 = time.perf_counter()
        rep = profile(model, inputs)
        dt = time.perf_counter() - t0
        stefx_macs = sum(macs_by_kind(rep).values())
        try:
            torch_macs, where = reference_macs(model, inputs)
        except Exception:
            torch_macs, where = None, ""
        same = "yes" if stefx_macs == torch_macs else "no"
        why = ""
        if same == "no":
            sdpa = sum(oc.before.macs for oc in rep.ops if oc.op.kind == "sdpa")
            moe = sum(oc.before.macs for oc in rep.ops if oc.op.kind == "experts")
            why = f"sdpa {sdpa}, experts {moe} (torch counts 0 for these kernels on CPU)"
        row = [name, stefx_macs, torch_macs, where, same, f"{dt:.2f}", why]
        extra = _optional_counters(model, *bound_inputs(model, inputs))
        rows.append(row + list(extra.values()))
    headers = [
        "model",
        "stefx MACs",
        "FlopCounterMode MACs",
        "device",
        "equal",
        "profile s",
        "difference",
        *extra,
    ]
    out = docpage.Output(page, "bench_profile --zoo")
    out.record("fvcore", "ptflops")
    out.print("Every column in MACs, matrix-product kinds only for stefx and FlopCounterMode:\n")
    out.print(tabulate(rows, headers=headers, tablefmt="github"))
    agree = {col: sum(str(r[1]) == str(r[i]) for r in rows) for i, col in enumerate(headers)
             if i == 2 or i >= 7}  # fmt: skip
    out.print("\nEqual to stefx: " + ", ".join(
        f"{col} on {n} of {len(rows)}" for col, n in agree.items()) + ".")  # fmt: skip
    out.write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama", action="store_true")
    parser.add_argument("--zoo", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    docpage.add_argument(parser)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(llama_child()))
        return
    both = not (opts.llama or opts.zoo)
    if opts.llama or both:
        run_llama(opts.write_docs)
    if opts.zoo or both:
        run_zoo(opts.write_docs)


if __name__ == "__main__":
    main()
