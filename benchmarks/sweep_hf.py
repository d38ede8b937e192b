"""Try ``stefx.quantize`` on every causal-LM architecture transformers ships, as a new user
would: a tiny config built from the architecture's defaults, ``w4a8``, then a training
step.

    .venv/bin/python benchmarks/sweep_hf.py               # all of them, 2 at a time
    .venv/bin/python benchmarks/sweep_hf.py llama falcon  # some of them

Each architecture runs in its own subprocess (a timeout and a memory cap, so one huge
default config cannot take the sweep down). Outcomes:

- ``ok``: quantized, still its own class, loss finite, backward ran, report printed;
- ``FAIL``: the float model runs, stefx does not - a stefx bug;
- ``no-tiny-config``: the generic shrinking below gives a config the float model cannot
  be built or run with (not stefx's doing: fix ``SMALL`` or skip);
- ``too-big``: still over 30M parameters after shrinking.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import docpage  # noqa: E402

# Attributes shrunk when a config has them (int-valued, not bool).
SMALL = dict(
    hidden_size=64,
    n_embd=64,
    d_model=64,
    num_hidden_layers=2,
    n_layer=2,
    num_layers=2,
    num_attention_heads=4,
    n_head=4,
    num_key_value_heads=2,
    intermediate_size=128,
    ffn_dim=128,
    n_inner=128,
    ffn_hidden_size=128,
    vocab_size=256,
    max_position_embeddings=128,
    n_positions=128,
    head_dim=16,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    kv_lora_rank=16,
    q_lora_rank=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MAX_PARAMS = 30e6
TIMEOUT_S = 180
MEMORY_CAP_KB = 10_000_000


def _shrink(config) -> None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key, value in SMALL.items():
            old = getattr(cfg, key, None)
            if isinstance(old, int) and not isinstance(old, bool):
                with contextlib.suppress(Exception):
                    setattr(cfg, key, value)


def _float_model(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def run_one(model_type: str) -> dict:
    """Quantize one architecture and take a training step (runs in the subprocess)."""
    warnings.simplefilter("ignore")
    import torch

    import stefx

    t0 = time.perf_counter()
    ids = torch.randint(3, 200, (1, 8))
    try:
        model = _float_model(model_type)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad()
    except Exception as e:
        return {"outcome": "no-tiny-config", "why": f"{type(e).__name__}: {str(e)[:160]}"}
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        return {"outcome": "too-big", "why": f"{params / 1e6:.0f}M parameters"}
    cls = type(model)
    try:
        printed = io.StringIO()
        capture = stefx.explain(model, "w4a8").capture  # the quantized model keeps no graph
        with contextlib.redirect_stdout(printed):
            stefx.quantize(model, "w4a8", report=True)
        model.train()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    except Exception as e:
        return {"outcome": "FAIL", "why": f"{type(e).__name__}: {str(e)[:300]}"}
    plan = model._stefx_plan
    checks = {
        "same class": type(model) is cls,
        "finite loss": bool(torch.isfinite(out.loss)),
        "report": "no efficiency report" not in printed.getvalue(),
    }
    bad = [k for k, v in checks.items() if not v]
    return {
        "outcome": "FAIL" if bad else "ok",
        "why": f"failed: {bad}" if bad else "",
        "sites": len(plan.sites),
        "capture": capture.method + (" (regions)" if capture.regions else ""),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _in_subprocess(model_type: str) -> dict:
    code = (
        "import json, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP_KB * 1024},) * 2); "
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
        f"import sweep_hf; print(json.dumps(sweep_hf.run_one({model_type!r})))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "no-tiny-config", "why": f"over {TIMEOUT_S} s"}
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if not lines:  # killed (memory cap) or crashed before reporting
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"outcome": "no-tiny-config", "why": f"crashed: {tail[:160]}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: every causal-LM type")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    docpage.add_argument(parser)
    opts = parser.parse_args()
    out = docpage.Output(opts.write_docs, "sweep_hf" + (" subset" if opts.model_types else ""))
    out.record("transformers")
    from tabulate import tabulate
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = opts.model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    with ThreadPoolExecutor(opts.jobs) as pool:
        results = dict(zip(names, pool.map(_in_subprocess, names), strict=True))
    rows = [
        [name, r["outcome"], r.get("sites", ""), r.get("capture", ""), r.get("why", "")]
        for name, r in results.items()
        if r["outcome"] != "ok" or opts.model_types
    ]
    counts = Counter(r["outcome"] for r in results.values())
    meaning = {
        "ok": "same class, finite loss, backward ran, efficiency report printed",
        "FAIL": "the float model runs but stefx does not",
        "no-tiny-config": "the generic shrinking breaks the float model itself: not a stefx result",
        "too-big": f"still over {MAX_PARAMS / 1e6:.0f}M parameters after shrinking",
    }
    out.print(f"{len(results)} architectures, w4a8, one training step each:\n")
    out.print(docpage.table(["outcome", "count", "meaning"],
                            [[k, counts.get(k, 0), v] for k, v in meaning.items()]))  # fmt: skip
    ok = [r for r in results.values() if r["outcome"] == "ok"]
    if ok:
        regions = sorted(n for n, r in results.items() if "regions" in r.get("capture", ""))
        seconds = sorted(r["seconds"] for r in ok)
        median = seconds[len(seconds) // 2]
        out.print(f"\n{len(ok) - len(regions)} of the {len(ok)} ok were captured whole; "
                  f"per-region capture: {', '.join(regions) or 'none'}. Median time per "
                  f"architecture (build, quantize, one step): {median} s.")  # fmt: skip
    if rows:
        asked = " (and those asked for)" if opts.model_types else ""
        out.print(f"\nEvery architecture not ok{asked}:\n")
        out.print(tabulate(rows, headers=["model type", "outcome", "sites", "capture", "why"],
                           tablefmt="github"))  # fmt: skip
    out.write()
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
