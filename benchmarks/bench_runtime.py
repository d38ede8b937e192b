"""Training-step time and peak memory of stefx-quantized Llama-shaped LMs against float, torchao
QAT, Brevitas and a hand-written STE module swap.

Models: ``LlamaConfig`` + ``AutoModelForCausalLM.from_config`` (random weights, SDPA attention,
byte vocabulary 256), ``3m`` (hidden 256, intermediate 704, 4 layers, 4 heads) and ``30m``
(hidden 512, intermediate 1408, 8 layers, 8 heads); batch 8 x 256 random ids, labels = ids,
AdamW lr 1e-4. One step = forward + ``loss.backward()`` + ``optimizer.step()`` +
``zero_grad(set_to_none=True)``. Every variant is a deep copy of the same float model:

- ``float``;
- ``stefx:<preset>``: ``stefx.quantize(model, preset, report=False)``;
- ``torchao:<preset>``: torchao QAT (``QATConfig(..., step="prepare")`` via ``quantize_``) on
  the decoder's ``nn.Linear`` layers, where torchao can express the preset;
- ``brevitas:<preset>``: each decoder ``nn.Linear`` swapped for ``brevitas.nn.QuantLinear``;
- ``plain-ste``: the reference floor, written below in ~20 lines: int4 absmax per output
  channel weights, int8 absmax per token inputs, identity backward.

lm_head and the embeddings stay in float everywhere. The notes under the table give each
variant's exact scheme and, for the torchao, Brevitas and plain-ste variants, the largest
difference between their fake-quantized weight / input on one Linear and a hand-written
reference, so a reader can see which schemes are really the same math.

Timing: the steps of all variants are interleaved within each repeat (A, B, C, ..., then
again) so that machine drift hits them alike; ``--warmup`` untimed steps first, then
``--repeats`` timed steps. Reported: the median step, and the ratio to float as the median
over repeats of (step / float's step in the same repeat), with its quartiles: on a noisy
machine that paired ratio is far steadier than a ratio of medians. ``--compile`` adds
``torch.compile(model)`` of every variant (float too), timed in a phase of their own after
the eager ones: the median step, the paired ratio to compiled float, and the compile time
(wall time of the first compiled step; the on-disk inductor cache starts empty, but kernels
compiled for an earlier variant are reused). Each compiled variant gets its own subclass
(see ``own_class``) so that no two share dynamo's cache entries.
``--breakdown PRESET`` times float, PRESET, and PRESET with only its weight or only its
input quantizers enabled: where a preset's cost goes.
``--memory`` runs each variant in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (so
glibc gives freed large blocks back at once and RSS tracks live tensors): one warm-up step
(two when compiled, so that a recompile is not counted), then the peak RSS is reset
(``/proc/self/clear_refs``), RSS is read as the baseline (weights, AdamW state, libraries),
and two more steps run. Reported: the peak over that baseline (activations saved for backward,
gradients, temporaries), in MiB and as a ratio to float's. On CUDA the same with
``torch.cuda.max_memory_allocated``.

Denormals: on CPU the benchmark flushes denormal floats to zero (``torch.set_flush_denormal``,
every variant alike; ``--keep-denormals`` to not). A randomly initialised ``bnn`` Llama
(±1 weights and activations, so large logits and tiny gradients) sends denormal gradients
through its backward matmuls, which x86 runs many times slower: one 3m run measured bnn at
1.84x float with denormals kept and 1.17x flushed, its matmuls alone going from 127 ms to
274 ms a step. That is the arithmetic of the model, not of the quantizer runtime, and
any implementation of the same numerics pays it; GPUs do not.

    python benchmarks/bench_runtime.py --quick                  # smoke test, tiny model
    python benchmarks/bench_runtime.py --sizes 3m --presets w4a8 --memory
    python benchmarks/bench_runtime.py --sizes 3m --compile --memory --write-docs  # its block
    python benchmarks/bench_runtime.py --sizes 3m --profile stefx:w4a8   # top-25 ops

torchao and Brevitas come with ``pip install -e .[bench]``; a variant whose library is missing
or that fails to build, step or compile gets the error in its row instead of a number.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docpage

SIZES = {
    "quick": dict(hidden=64, inter=176, layers=2, heads=4, batch=4, seq=64),
    "3m": dict(hidden=256, inter=704, layers=4, heads=4, batch=8, seq=256),
    "30m": dict(hidden=512, inter=1408, layers=8, heads=8, batch=8, seq=256),
}
PRESETS = ("w4a8", "w4a16-g128", "bitnet-b158", "bnn")
GROUP = 128  # the group size of the -g128 presets
_EPS = 1e-12

warnings.filterwarnings("ignore", message="Could not compute output scale factor")


# --------------------------------------------------------------------------- model and step


def build_model(size: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    s = SIZES[size]
    config = LlamaConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        vocab_size=256,
        max_position_embeddings=s["seq"],
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def make_batch(size: str, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (SIZES[size]["batch"], SIZES[size]["seq"]), generator=gen)
    return ids.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Seconds for forward + backward + AdamW step + zero_grad, and the loss."""
    sync(ids.device.type)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(ids.device.type)
    return time.perf_counter() - start, loss.detach()


def decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, Linear) for every plain nn.Linear of the decoder (not lm_head)."""
    return [
        (parent, name, child)
        for parent in model.model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


def short(e: BaseException, n: int = 110) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return (text[: n - 3] + "...") if len(text) > n else text


# --------------------------------------------------------------------------- references


def fq_absmax(x, bits, dim, denom=None, mul_inv=False):
    """Symmetric: scale = max|x| / denom (default qmax), codes [-2^(b-1), 2^(b-1)-1]."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = (x.abs().amax(dim, keepdim=True) / (denom or qmax)).clamp(min=_EPS)
    return torch.clamp(torch.round(x * (1.0 / s) if mul_inv else x / s), qmin, qmax) * s


def fq_minmax(x, bits, dim, qmin=0, mul_inv=False):
    """Asymmetric, integer zero point, the range widened to hold 0."""
    levels = 2**bits - 1
    lo = x.amin(dim, keepdim=True).clamp(max=0)
    hi = x.amax(dim, keepdim=True).clamp(min=0)
    s = ((hi - lo) / levels).clamp(min=_EPS)
    z = torch.clamp(qmin - torch.round(lo / s), qmin, qmin + levels)
    q = torch.round(x * (1.0 / s) if mul_inv else x / s)
    return (torch.clamp(q + z, qmin, qmin + levels) - z) * s


def fq_minmax_float_zero(x, bits, dim):
    """Asymmetric with a float offset (min): torchao's Int4WeightOnlyConfig QAT grid."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    s = (hi - lo).clamp(min=1e-6) / (2**bits - 1)
    return torch.clamp(torch.round((x - lo) / s), 0, 2**bits - 1) * s + lo


def grouped(fn, w, *args, **kwargs):
    return fn(w.reshape(w.shape[0], -1, GROUP), *args, dim=-1, **kwargs).reshape(w.shape)


def fq_absmean_ternary(w):
    s = w.abs().mean().clamp(min=_EPS)
    return torch.clamp(torch.round(w / s), -1, 1) * s


def fq_sign(x):
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


# Hand references per scheme: (label, fn) for weights and for inputs (None: input stays float).
REF_W4 = ("absmax/7 per channel", lambda w: fq_absmax(w, 4, 1))
REF_A8 = ("absmax/127 per token", lambda x: fq_absmax(x, 8, -1))
REF_G128 = ("minmax int-zero g128", lambda w: grouped(fq_minmax, w, 4))
REFS = {
    "w4a8": ([REF_W4], [REF_A8]),
    "w4a16-g128": ([REF_G128], []),
    "bitnet-b158": ([("absmean ternary per tensor", fq_absmean_ternary)], [REF_A8]),
    "bnn": ([("sign", fq_sign)], [("sign", fq_sign)]),
}


# --------------------------------------------------------------------------- plain STE


class _FakeQuantSTE(torch.autograd.Function):
    """Symmetric absmax fake quant along ``dim``; the backward is the identity."""

    @staticmethod
    def forward(ctx, x, bits, dim):
        qmax = 2 ** (bits - 1) - 1
        scale = (x.detach().abs().amax(dim, keepdim=True) / qmax).clamp(min=_EPS)
        return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class PlainSTELinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _FakeQuantSTE.apply(self.weight, 4, 1)  # int4 per output channel
        x = _FakeQuantSTE.apply(x, 8, -1)  # int8 per token
        return F.linear(x, w, self.bias)


def plain_ste(model: nn.Module) -> nn.Module:
    for _, _, lin in decoder_linears(model):
        lin.__class__ = PlainSTELinear  # same parameters, new forward
    return model


# --------------------------------------------------------------------------- library variants


TORCHAO_SKIP = {
    "bitnet-b158": "IntxFakeQuantizeConfig has no absmean/ternary weights (int2 symmetric is "
    "codes [-2,1], scale max/1.5) and no symmetric per-token activations",
    "bnn": "no sign quantizer (torch.int1 codes are {-1, 0})",
}
TORCHAO_SCHEME = {
    "w4a8": "QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, 'per_token', "
    "is_symmetric=False), weight_config=IntxFakeQuantizeConfig(torch.int4, 'per_channel', "
    "is_symmetric=True)): weights scale max|W|/7.5, codes [-8,7]; activations ASYMMETRIC "
    "per token (torchao raises NotImplementedError for symmetric per-token)",
    "w4a16-g128": "QATConfig(Int4WeightOnlyConfig(group_size=128)), i.e. "
    "Int4WeightFakeQuantizeConfig: asymmetric g128 with a float zero point (min); "
    "IntxFakeQuantizeConfig(torch.int4/uint4, group_size=128, is_symmetric=False) gives wrong "
    "values in torchao 0.18 (error ~ the weight range), so it is not used",
}
BREVITAS_SCHEME = {
    "w4a8": "weight_quant=Int8WeightPerChannelFloat.let(bit_width=4), input_quant="
    "Int8DynamicActPerRowFloat (brevitas_examples) .let(per-token view, narrow_range=True)",
    "w4a16-g128": "weight_quant=ShiftedUint8WeightGroupQuantFloat.let(bit_width=4, "
    "group_size=128), no input quant",
    "bitnet-b158": "weight_quant=Int8WeightPerTensorFloat.let(bit_width=2, scaling_stats_op="
    "StatsOp.AVE) (absmean, codes [-1,1]), input_quant as w4a8",
    "bnn": "weight_quant=SignedBinaryWeightPerTensorConst.let(scaling_const=1.0), input_quant="
    "SignedBinaryActPerTensorConst; the first decoder Linear's input stays float, as in stefx",
}


def _torchao_apply(preset: str) -> Callable[[nn.Module], nn.Module]:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if preset == "w4a8":
        config = QATConfig(
            activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            weight_config=IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True),
            step="prepare",
        )
    else:
        config = QATConfig(Int4WeightOnlyConfig(group_size=GROUP), step="prepare")

    def apply(model: nn.Module) -> nn.Module:
        quantize_(model, config, filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn != "lm_head")
        return model

    return apply


def _brevitas_quants(preset: str) -> tuple[object, object]:
    from brevitas.inject.enum import StatsOp
    from brevitas.quant.binary import (
        SignedBinaryActPerTensorConst,
        SignedBinaryWeightPerTensorConst,
    )
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat
    from brevitas.quant.shifted_scaled_int import ShiftedUint8WeightGroupQuantFloat
    from brevitas_examples.common.generative.quantizers import Int8DynamicActPerRowFloat

    per_token = Int8DynamicActPerRowFloat.let(
        dynamic_scaling_broadcastable_fn=lambda x, shape: x.view(*shape[:-1], 1),
        permute_dims=None,
        stats_reduce_dim=1,
        narrow_range=True,  # scale max|x|/127 (Brevitas's default divides by 128)
    )
    return {
        "w4a8": (Int8WeightPerChannelFloat.let(bit_width=4), per_token),
        "w4a16-g128": (ShiftedUint8WeightGroupQuantFloat.let(bit_width=4, group_size=GROUP), None),
        "bitnet-b158": (
            Int8WeightPerTensorFloat.let(bit_width=2, scaling_stats_op=StatsOp.AVE),
            per_token,
        ),
        "bnn": (
            SignedBinaryWeightPerTensorConst.let(scaling_const=1.0),
            SignedBinaryActPerTensorConst,
        ),
    }[preset]


def _brevitas_apply(preset: str) -> Callable[[nn.Module], nn.Module]:
    import brevitas.nn as qnn

    weight_quant, input_quant = _brevitas_quants(preset)

    def apply(model: nn.Module) -> nn.Module:
        for i, (parent, name, lin) in enumerate(decoder_linears(model)):
            first_float = preset == "bnn" and i == 0
            q = qnn.QuantLinear(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                weight_quant=weight_quant,
                input_quant=None if first_float else input_quant,
                return_quant_tensor=False,
                device=lin.weight.device,
                dtype=lin.weight.dtype,
            )
            with torch.no_grad():
                q.weight.copy_(lin.weight)
                if lin.bias is not None:
                    q.bias.copy_(lin.bias)
            setattr(parent, name, q)
        return model

    return apply


def _fq_of(family: str, mod: nn.Module, x: torch.Tensor):
    """(fake-quantized weight, fake-quantized input or None) as the library computes them."""
    if family == "torchao":
        w = mod.weight_fake_quantizer(mod.weight)
        aq = getattr(mod, "activation_fake_quantizer", None)
        return w, (aq(x) if aq is not None else None)
    if family == "brevitas":
        w = mod.quant_weight().value
        a = mod.input_quant(x) if mod.input_quant.is_quant_enabled else None
        return w, getattr(a, "value", a)
    return _FakeQuantSTE.apply(mod.weight, 4, 1), _FakeQuantSTE.apply(x, 8, -1)


@dataclass
class Variant:
    name: str
    scheme: str
    apply: Callable[[nn.Module], nn.Module]
    grouped: bool = False  # needs every decoder in_features to be a multiple of GROUP
    checks: list[tuple[str, object, list, list]] = field(default_factory=list)

    def check(self, lin: nn.Linear, x: torch.Tensor) -> str:
        """Max |library fake quant - hand reference| on one Linear, for the notes."""
        family = self.name.split(":")[0]
        if family not in ("torchao", "brevitas", "plain-ste"):
            return ""
        if self.grouped and lin.in_features % GROUP:
            return f"skipped (in_features {lin.in_features})"
        holder = nn.Module()
        holder.model = nn.Module()
        holder.model.first = copy.deepcopy(lin)  # so that "lin" is not the first layer
        holder.model.lin = copy.deepcopy(lin)
        with torch.no_grad():
            self.apply(holder)
            w, a = _fq_of(family, holder.model.lin, x)
            parts = []
            for what, got, refs, arg in (
                ("W", w, self.checks[0], lin.weight),
                ("A", a, self.checks[1], x),
            ):
                if got is None:
                    continue
                diffs = ", ".join(
                    f"{label}: {(got - ref(arg)).abs().max().item():.2g}" for label, ref in refs
                )
                parts.append(f"{what} max|Δ| vs {diffs}")
        return "; ".join(parts)


def make_variant(name: str) -> Variant:
    """The variant called ``name``; ValueError (the reason) when it cannot be expressed."""
    family, _, preset = name.partition(":")
    if family == "float":
        return Variant(name, "no quantization", lambda m: m)
    if family == "plain-ste":
        return Variant(
            name,
            "in-file Linear subclass: int4 absmax/7 per output channel W, int8 absmax/127 per "
            "token input, custom autograd.Function with identity backward",
            plain_ste,
            checks=[[REF_W4], [REF_A8]],
        )
    if preset not in PRESETS and family != "stefx":
        raise ValueError(f"no {family} mapping written for {preset!r}")
    preset, _, only = preset.partition("/")
    is_grouped = preset.endswith(f"-g{GROUP}")
    if family == "stefx":
        import stefx

        if only not in ("", "weights", "inputs"):
            raise ValueError(f"stefx:{preset}/{only}: keep 'weights' or 'inputs' only")

        def apply(m: nn.Module) -> nn.Module:
            stefx.quantize(m, preset, report=False)
            for qname, q in m.named_modules():  # the breakdown: one kind of quantizer on
                if isinstance(q, stefx.Quantizer):
                    is_weight = qname.endswith("weight_quantizer")
                    q.enabled = not only or (only == "weights") == is_weight
            return m

        what = f", {only} quantizers only" if only else ""
        if is_grouped:
            what += f" (a width that {GROUP} does not divide gets a ragged last group)"
        # stefx takes any width; torchao and Brevitas need multiples of the group
        return Variant(name, f"stefx.quantize(model, {preset!r}, report=False){what}", apply)
    w_refs, a_refs = REFS[preset]
    if family == "torchao":
        if preset in TORCHAO_SKIP:
            raise ValueError(TORCHAO_SKIP[preset])
        if preset == "w4a8":
            w_refs = [("absmax/7.5 x·(1/s)", lambda w: fq_absmax(w, 4, 1, 7.5, True)), *w_refs]
            a_refs = [("minmax int-zero per token", lambda x: fq_minmax(x, 8, -1, -128, True))]
            a_refs += [REF_A8]
        else:
            w_refs = [("minmax float-zero g128", lambda w: grouped(fq_minmax_float_zero, w, 4))]
            w_refs += [REF_G128]
        return Variant(
            name, TORCHAO_SCHEME[preset], _torchao_apply(preset), is_grouped, [w_refs, a_refs]
        )
    if family == "brevitas":
        return Variant(
            name, BREVITAS_SCHEME[preset], _brevitas_apply(preset), is_grouped, [w_refs, a_refs]
        )
    raise ValueError(f"unknown variant family {family!r}")


def variant_names(presets: list[str], only: list[str] | None) -> list[str]:
    names = ["float", *(f"{lib}:{p}" for p in presets for lib in ("stefx", "torchao", "brevitas"))]
    names.append("plain-ste")
    if only:
        names = [n for n in names if n in only or n.split(":")[0] in only]
    return names


def build_variant(variant: Variant, float_model: nn.Module, device: str) -> nn.Module:
    if variant.grouped:
        bad = sorted({lin.in_features for _, _, lin in decoder_linears(float_model)} - {0})
        bad = [f for f in bad if f % GROUP]
        if bad:
            raise ValueError(f"skipped: in_features {bad} not multiples of {GROUP}")
    return variant.apply(copy.deepcopy(float_model)).to(device).train()


# --------------------------------------------------------------------------- memory child


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child_memory(name: str, size: str, device: str, compiled: bool) -> dict:
    model = build_variant(make_variant(name), build_model(size), device)
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = make_batch(size, device)
    for _ in range(2 if compiled else 1):
        train_step(model, opt, ids)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with contextlib.suppress(OSError):  # hand freed small blocks back too
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _rss_kib("VmRSS") * 1024
    for _ in range(2):
        train_step(model, opt, ids)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"base_mib": base / 2**20, "extra_mib": (peak - base) / 2**20}


def run_memory(name: str, size: str, args: argparse.Namespace, compiled: bool) -> float | str:
    cmd = [sys.executable, __file__, "--child-memory", name, "--child-size", size]
    cmd += ["--threads", str(args.threads), "--device", args.device]
    cmd += ["--keep-denormals"] if args.keep_denormals else []
    cmd += ["--child-compile"] if compiled else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        return f"failed: {tail[-1][:100] if tail else proc.returncode}"
    return json.loads(lines[-1])["extra_mib"]


# --------------------------------------------------------------------------- the benchmark


def _configure_dynamo() -> None:
    """All compiled variants share the HF forward code objects: keep each variant's graphs apart.

    stefx applies its quantizers in forward hooks, and dynamo does not guard on hooks by
    default (``skip_nnmodule_hook_guards``): a stefx model would then silently run the float
    model's compiled graph. Turning those guards on costs every hooked model tens of ms a
    step in guard checks, which no user compiling one model pays; instead ``own_class`` gives
    each variant its own subclass, which the type guard on ``self`` tells apart. The loss
    check in ``run_size`` catches any other mix-up.
    """
    cfg = torch._dynamo.config
    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, key, 512)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = 4096
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True  # an error, never a silent fall back to eager


def own_class(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """``model`` as an instance of a subclass of its class named after ``variant``."""
    cls = type(model)
    model.__class__ = type(
        f"{cls.__name__}_{variant.replace(':', '_').replace('-', '_')}", (cls,), {}
    )
    return model


def _warm_compiler(device: str) -> None:
    """Compile something tiny first, so the first variant does not pay the one-time setup."""
    lin = nn.Linear(8, 8).to(device)
    fn = torch.compile(lambda x: lin(x).relu().sum())
    fn(torch.randn(4, 8, device=device, requires_grad=True)).backward()
    torch._dynamo.reset()


def run_size(size: str, names: list[str], args: argparse.Namespace) -> tuple[list[dict], list]:
    device = args.device
    float_model = build_model(size)
    n_params = sum(p.numel() for p in float_model.parameters())
    label = f"{size} ({n_params / 1e6:.2f}M)"
    print(f"[{size}] {n_params:,} parameters, batch {SIZES[size]['batch']}x{SIZES[size]['seq']}")
    ids = make_batch(size, device)
    lin = float_model.model.layers[0].mlp.gate_proj
    x = 3 * torch.randn(2, 16, lin.in_features, generator=torch.Generator().manual_seed(2))

    rows: dict[str, dict] = {}
    runners: dict[tuple[str, str], tuple[nn.Module, torch.optim.Optimizer]] = {}
    notes = []
    for name in names:
        row = rows.setdefault(name, {"model": label, "variant": name})
        try:
            variant = make_variant(name)
        except (ValueError, ImportError) as e:
            print(f"  {name}: not run: {e}")
            notes.append(f"{name}: not run: {e}")
            rows.pop(name)
            continue
        try:
            check = variant.check(lin, x)
        except Exception as e:
            check = f"check failed: {short(e)}"
        notes.append(
            f"{name}: {variant.scheme}" + (f". Check on one Linear: {check}" if check else "")
        )
        try:
            model = build_variant(variant, float_model, device)
        except Exception as e:
            row["step ms"] = str(e) if str(e).startswith("skipped") else f"build: {short(e)}"
            continue
        runners[(name, "eager")] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    del float_model

    times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    for _ in range(args.warmup):
        for key, (model, opt) in list(runners.items()):
            try:
                train_step(model, opt, ids)
            except Exception as e:
                rows[key[0]]["step ms"] = f"step: {short(e)}"
                del runners[key], times[key]

    if args.compile:
        torch._dynamo.reset()
        for key, (model, opt) in list(runners.items()):
            name = key[0]
            compiled = torch.compile(own_class(model, name))
            try:
                with torch.no_grad():
                    eager = model(input_ids=ids, labels=ids).loss.item()
                graphs = counters["stats"]["unique_graphs"]
                rows[name]["compile s"], loss = train_step(compiled, opt, ids)
                rows[name]["graphs"] = counters["stats"]["unique_graphs"] - graphs
                for _ in range(args.warmup):
                    train_step(compiled, opt, ids)
            except Exception as e:
                rows[name]["compiled ms"] = f"compile: {short(e)}"
                continue
            if abs(loss.item() - eager) > 1e-2 * max(1.0, abs(eager)):  # not the same model
                rows[name]["compiled ms"] = f"wrong: loss {loss.item():.4f}, eager {eager:.4f}"
                continue
            runners[(name, "compiled")] = (compiled, opt)
            times[(name, "compiled")] = []

    # Eager and compiled variants are timed in separate phases, each interleaving its own
    # variants: an eager step between two compiled ones leaves the allocator and caches in
    # a state the compiled one then pays for.
    for mode in ("eager", "compiled"):
        for _ in range(args.repeats):
            for key, (model, opt) in list(runners.items()):
                if key[1] != mode:
                    continue
                try:
                    times[key].append(train_step(model, opt, ids)[0])
                except Exception as e:
                    col = "step ms" if key[1] == "eager" else "compiled ms"
                    rows[key[0]][col] = f"{key[1]} step: {short(e)}"
                    del runners[key], times[key]

    ms = {k: 1e3 * statistics.median(v) for k, v in times.items() if v}
    for (name, mode), value in ms.items():
        col = "step ms" if mode == "eager" else "compiled ms"
        rows[name][col] = value
        rows[name]["x float" if mode == "eager" else "x float (c)"] = paired_ratio(
            times[(name, mode)], times.get(("float", mode), [])
        )

    if args.memory:
        modes = ["eager", "compiled"] if args.compile else ["eager"]
        for mode in modes:
            col = "step MiB" if mode == "eager" else "compiled MiB"
            extra = {}
            for name in rows:
                if (name, mode) in ms:
                    extra[name] = run_memory(name, size, args, mode == "compiled")
                    rows[name][col] = extra[name]
                    print(f"  memory {name} {mode}: {extra[name]}")
            ref = extra.get("float")
            for name, value in extra.items():
                if isinstance(value, float) and isinstance(ref, float) and ref > 0:
                    rows[name]["x float (m)" if mode == "eager" else "x float (cm)"] = value / ref
    del runners
    gc.collect()
    return list(rows.values()), notes


def paired_ratio(steps: list[float], float_steps: list[float]) -> str | None:
    """Median over repeats of (this step / float's step in the same repeat), with the
    quartiles: steps next to each other in time share the machine's drift."""
    ratios = sorted(a / b for a, b in zip(steps, float_steps, strict=False) if b)
    if not ratios:
        return None
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.2f}x"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f}x ({q1:.2f}-{q3:.2f})"


def profile_variant(name: str, size: str, args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    model = build_variant(make_variant(name), build_model(size), args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = make_batch(size, args.device)
    for _ in range(args.warmup):
        train_step(model, opt, ids)
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        seconds, _ = train_step(model, opt, ids)
    print(f"{name} on {size}: one step, {1e3 * seconds:.1f} ms under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


COLUMNS = ["model", "variant", "step ms", "x float", "compiled ms", "x float (c)", "compile s"]
COLUMNS += ["graphs"]
COLUMNS += ["step MiB", "x float (m)", "compiled MiB", "x float (cm)"]


def format_rows(rows: list[dict]) -> list[dict]:
    present = [c for c in COLUMNS if any(c in r for r in rows)]
    out = []
    for r in rows:
        cells = {}
        for c in present:
            v = r.get(c, "")
            if isinstance(v, float):
                v = f"{v:.2f}x" if c.startswith("x float") else f"{v:.1f}"
            cells[c] = "" if v is None else str(v).replace("|", "/")
        out.append(cells)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3m,30m", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--presets", default=",".join(PRESETS), help="stefx presets to compare")
    parser.add_argument(
        "--variants", default=None, help="only these variants or families, e.g. float,stefx:w4a8"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (median); 7")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--compile", action="store_true", help="also torch.compile every variant")
    parser.add_argument("--memory", action="store_true", help="peak step memory, subprocesses")
    parser.add_argument("--profile", default=None, metavar="VARIANT", help="top-25 ops, one step")
    parser.add_argument(
        "--breakdown",
        default=None,
        metavar="PRESET",
        help="float, PRESET, and PRESET with only its weight / only its input quantizers on",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush denormals to zero on CPU (see the docstring: bnn's matmuls slow down)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repeats (smoke test)")
    docpage.add_argument(parser)
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.keep_denormals:
        torch.set_flush_denormal(True)

    if args.child_memory:
        result = child_memory(args.child_memory, args.child_size, args.device, args.child_compile)
        print(json.dumps(result))
        return []
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    sizes = ["quick"] if args.quick else args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.profile:
        for size in sizes:
            profile_variant(args.profile, size, args)
        return []

    inductor_dir = None
    if args.compile:
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold on-disk caches every run
            inductor_dir = tempfile.mkdtemp(prefix="bench_runtime_inductor_")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
        _configure_dynamo()
        _warm_compiler(args.device)
    # one block of docs/benchmarks.md per kind of run
    key = f"bench_runtime {','.join(sizes)}"
    key += f" --breakdown {args.breakdown}" if args.breakdown else ""
    key += f" --variants {args.variants}" if args.variants and not args.breakdown else ""
    out = docpage.Output(args.write_docs, key, argv and [__file__, *argv])
    out.record("torchao", "brevitas")
    presets = args.presets.split(",")
    names = variant_names(presets, args.variants.split(",") if args.variants else None)
    if args.breakdown:
        p = args.breakdown
        names = ["float", f"stefx:{p}", f"stefx:{p}/weights", f"stefx:{p}/inputs"]
    rows, notes = [], []
    try:
        for size in sizes:
            size_rows, size_notes = run_size(size, names, args)
            rows += size_rows
            notes += [n for n in size_notes if n not in notes]
    finally:
        if inductor_dir:
            shutil.rmtree(inductor_dir, ignore_errors=True)

    b, t = SIZES[sizes[0]]["batch"], SIZES[sizes[0]]["seq"]
    denormals = "denormals kept" if args.keep_denormals else "denormals flushed"
    title = (
        f"Training step (fwd + bwd + AdamW), {args.device}, torch {torch.__version__}, "
        f"{args.threads} threads, {denormals}, batch {b}x{t}, median of {args.repeats} after "
        f"{args.warmup} warm-up, interleaved"
    )
    legend = (
        "x float: median over repeats of the step time over float's step in the same repeat, "
        "quartiles in brackets (c: compiled, m: memory)"
    )
    if args.compile:
        legend += (
            "; compile s: wall time of the first compiled step; graphs: dynamo graphs compiled"
            " on that step (1 = no graph break)"
        )
    if args.memory:
        legend += "; MiB: peak RSS of a step above the RSS after warm-up (fresh process each)"
    notes.insert(0, legend)
    cells = format_rows(rows)
    out.print(f"\n{title}.\n")
    out.print(tabulate(cells, headers="keys", tablefmt="github", disable_numparse=True))
    out.print("\n" + "\n".join(f"- {n}" for n in notes))
    out.write()
    return rows


if __name__ == "__main__":
    main()
