"""The two Hugging Face folder formats: compressed-tensors ``pack-quantized`` and
transformers' own BitNet (see :mod:`stefx.export`)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from stefx.convert import ConvertError
from stefx.export.common import (
    converted_copy,
    refuse,
    report_requantized,
    requantize,
    signed_codes,
    weight_layers,
    write_folder,
)

__all__ = ["write_bitnet", "write_compressed_tensors"]


_CT_FITS = "w4a16-g128 (or any uniform/lsq 4- or 8-bit weight-only recipe on Linear layers)"


def _ct_problem(module: nn.Module, spec, shape) -> tuple[str | None, bool]:
    """Why compressed-tensors cannot hold this weight's lattice (None: it can), and
    whether the problem is in the weight's lattice (re-quantizable) or elsewhere."""
    from stefx.rewrite import STATE_ATTR

    state = module.__dict__[STATE_ATTR]
    if type(module) is not nn.Linear:
        return f"it is a {type(module).__name__}, compressed-tensors packs nn.Linear weights", False
    if spec.type not in ("uniform", "lsq") or spec.num_bits not in (4, 8):
        return f"its lattice is {spec.type} {spec.num_bits}-bit, the format holds int4 / int8", True
    if spec.strategy not in ("channel", "group") or (spec.strategy == "channel" and spec.axis):
        return f"its scales are per {spec.strategy}; the format has per-channel or groups", True
    if spec.strategy == "group" and spec.axis not in (None, -1, 1):
        return f"its groups run along axis {spec.axis}; the format groups along the input", True
    if spec.strategy == "group" and shape[-1] % spec.group_size:
        return (
            f"groups of {spec.group_size} do not tile its {shape[-1]} inputs; the format has no "
            "ragged last group"
        ), True
    if state.input is not None or state.output is not None or state.op_table:
        return "its activations are quantized too; pack-quantized is weight-only", False
    return None, False


def _ct_fit(spec, shape) -> dict:
    """The int lattice a re-quantized layer gets: the same bits (8, or 4 below that),
    symmetric, its groups if they tile the input, else per output channel."""
    group = (
        spec.strategy == "group" and spec.axis in (None, -1, 1) and not shape[-1] % spec.group_size
    )
    out = {"type": "uniform", "num_bits": 8 if spec.num_bits >= 8 else 4, "symmetric": True}
    return (
        {**out, "strategy": "group", "group_size": spec.group_size}
        if group
        else {**out, "strategy": "channel"}
    )


def _fixer(fmt: str, problem_of, fit_of):
    """``fix(work, strict)`` for :func:`converted_copy`: refuse the layers ``problem_of``
    names (strict), or re-quantize those whose lattice ``fit_of`` can replace and report."""

    def fix(work: nn.Module, strict: bool) -> None:
        problems, report = [], {}
        for name, (module, p, qname, q, shape) in weight_layers(work).items():
            problem, lattice = problem_of(module, q.spec, shape)
            if problem is None:
                continue
            if strict:
                problems.append(f"{name}: {problem}")
            elif lattice:
                spec = fit_of(q.spec, shape)
                err, rel = requantize(module, p, qname, spec)
                bits = spec.get("num_bits", 2)
                kind = f"{spec['type']} {bits}-bit per {spec.get('strategy', 'tensor')}"
                report[name] = f"re-quantized to {kind}, max |Δ| {err:.3g}, rel. RMS {rel:.3g}"
                if err == 0:
                    report[name] = f"its codes and scales kept in {bits}-bit codes (exact)"
            elif "activations" in problem or "input" in problem:
                report[name] = f"{problem}: the export computes them as its format does"
            else:
                raise ConvertError(f"export {fmt}: {name}: {problem}; strict=False cannot fix that")
        if problems:
            err = refuse(fmt, problems)
            hint = _CT_FITS if fmt == "compressed-tensors" else "bitnet-b158"
            raise ConvertError(f"{err}\n  a preset that fits: {hint}")
        report_requantized(fmt, report)

    return fix


def _ct_args(s) -> dict:
    """The compressed-tensors weight args of a lattice that fits."""
    args = {
        "num_bits": s.num_bits,
        "type": "int",
        "symmetric": s.symmetric,
        "strategy": s.strategy,
        "dynamic": False,
        "observer": "minmax",
    }
    if s.strategy == "group":
        args["group_size"] = s.group_size
    return args


def write_compressed_tensors(model: nn.Module, path: Path, strict: bool = True) -> Path:
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise ConvertError(
            "export compressed-tensors: the compressed-tensors package is not installed; "
            "pip install 'stefx[export]'"
        ) from None
    fix = _fixer("compressed-tensors", _ct_problem, _ct_fit)
    work, layers, tensors = converted_copy(model, "compressed-tensors", fix, strict)
    schemes = {name: _ct_args(pw.spec) for name, (_, pw) in layers.items()}
    for name, (_, packed) in layers.items():
        prefix = name.rpartition(".")[0]
        bits, shift = packed.spec.num_bits, 2 ** (packed.spec.num_bits - 1)
        tensors[f"{prefix}.weight_packed"] = pack_to_int32(signed_codes(packed), bits)
        groups = packed.scale.numel() // packed.weight_shape[0]
        tensors[f"{prefix}.weight_scale"] = packed.scale.reshape(-1, groups).to(packed.weight_dtype)
        tensors[f"{prefix}.weight_shape"] = torch.tensor(list(packed.weight_shape))
        if packed.zero_point is not None:
            zero = packed.zero_point.to(torch.int32).reshape(-1, groups) - shift
            tensors[f"{prefix}.weight_zero_point"] = pack_to_int32(
                zero.to(torch.int8), bits, packed_dim=0
            )
    groups_cfg: dict[str, dict] = {}
    for name, args in schemes.items():
        key = json.dumps(args, sort_keys=True)
        group = groups_cfg.setdefault(key, {"targets": [], "weights": args})
        group["targets"].append("re:^" + re.escape(name.rpartition(".")[0]) + "$")
    linear = [n for n, m in work.named_modules() if isinstance(m, nn.Linear)]
    packed_modules = {n.rpartition(".")[0] for n in layers}
    config = copy.deepcopy(work.config)
    config.quantization_config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {**g, "input_activations": None, "output_activations": None}
            for i, g in enumerate(groups_cfg.values())
        },
        "ignore": [n for n in linear if n not in packed_modules],
    }
    return write_folder(work, config, tensors, path)


def _bitnet_problem(module: nn.Module, spec, shape) -> tuple[str | None, bool]:
    """Why BitLinear cannot compute this layer as stefx trained it (None: it can)."""
    from stefx.rewrite import STATE_ATTR

    state = module.__dict__[STATE_ATTR]
    a = module._modules.get(state.input or "")
    if type(module) is not nn.Linear:
        return f"it is a {type(module).__name__}; BitLinear replaces nn.Linear", False
    if shape[0] % 4:
        return f"{shape[0]} outputs: BitLinear packs rows in fours", False
    if (spec.type, spec.scale, spec.strategy) != ("ternary", "absmean", "tensor"):
        return (
            f"its weights are {spec.type} {spec.scale} per {spec.strategy}, not absmean "
            "ternary per tensor"
        ), True
    if (
        a is None
        or (a.spec.type, a.spec.num_bits, a.spec.strategy, a.spec.symmetric)
        != ("uniform", 8, "token", True)
        or getattr(a, "frozen", False)
    ):
        return "its input is not 8-bit symmetric per-token absmax, as BitLinear's is", False
    if state.output is not None or state.op_table:
        return "it quantizes more than its input and weight (activations)", False
    return None, False


def write_bitnet(model: nn.Module, path: Path, strict: bool = True) -> Path:
    from transformers.integrations.bitnet import pack_weights

    fix = _fixer("hf-bitnet", _bitnet_problem, lambda spec, shape: {"type": "ternary"})
    work, layers, tensors = converted_copy(model, "hf-bitnet", fix, strict)
    packed_modules = {}
    for name, (module, packed) in layers.items():
        prefix = name.rpartition(".")[0]
        tensors[f"{prefix}.weight"] = pack_weights(signed_codes(packed))  # ternary: -1..1
        gamma = packed.scale.reshape(())
        safe = gamma if gamma > 0 else torch.ones_like(gamma)
        tensors[f"{prefix}.weight_scale"] = (1.0 / safe).reshape(1).to(packed.weight_dtype)
        packed_modules[prefix] = module
    linear = [n for n, m in work.named_modules() if isinstance(m, nn.Linear)]
    config = copy.deepcopy(work.config)
    config.quantization_config = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
        "modules_to_not_convert": [n for n in linear if n not in packed_modules],
    }
    return write_folder(work, config, tensors, path)
