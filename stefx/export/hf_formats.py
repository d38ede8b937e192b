"""The two Hugging Face folder formats: compressed-tensors ``pack-quantized`` and
transformers' own BitNet (see :mod:`stefx.export`)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from stefx.convert import ConvertError, PackedWeight
from stefx.export.common import converted_copy, signed_codes, write_folder

__all__ = ["write_bitnet", "write_compressed_tensors"]


def _ct_scheme(name: str, module: nn.Module, packed: PackedWeight) -> dict:
    """The compressed-tensors weight args of one layer, or a ConvertError saying why not."""
    from stefx.rewrite import STATE_ATTR

    s = packed.spec
    fits = "w4a16-g128 (or any uniform/lsq 4- or 8-bit weight-only recipe on Linear layers)"
    problem = None
    state = module.__dict__[STATE_ATTR]
    if type(module) is not nn.Linear:
        problem = f"it is a {type(module).__name__}, compressed-tensors packs nn.Linear weights"
    elif s.type not in ("uniform", "lsq") or s.num_bits not in (4, 8):
        problem = f"its lattice is {s.type} {s.num_bits}-bit, the format holds int4 / int8"
    elif state.input is not None or state.output is not None or state.op_table:
        problem = "its activations are quantized too; pack-quantized is weight-only"
    elif s.strategy not in ("channel", "group") or (s.strategy == "channel" and s.axis):
        problem = f"its scales are per {s.strategy}; the format has per-channel or groups"
    elif s.strategy == "group" and s.axis not in (None, -1, 1):
        problem = f"its groups run along axis {s.axis}; the format groups along the input"
    elif s.strategy == "group" and packed.weight_shape[-1] % s.group_size:
        problem = (
            f"groups of {s.group_size} do not tile its {packed.weight_shape[-1]} inputs; "
            "the format has no ragged last group"
        )
    if problem:
        raise ConvertError(
            f"export compressed-tensors: {name}: {problem}; a preset that fits: {fits}"
        )
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


def write_compressed_tensors(model: nn.Module, path: Path) -> Path:
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise ConvertError(
            "export compressed-tensors: the compressed-tensors package is not installed; "
            "pip install 'stefx[export]'"
        ) from None
    work, layers, tensors = converted_copy(model, "compressed-tensors")
    schemes = {name: _ct_scheme(name, m, pw) for name, (m, pw) in layers.items()}
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


def write_bitnet(model: nn.Module, path: Path) -> Path:
    from transformers.integrations.bitnet import pack_weights

    from stefx.rewrite import STATE_ATTR

    work, layers, tensors = converted_copy(model, "hf-bitnet")
    fits = "bitnet-b158"
    packed_modules = {}
    for name, (module, packed) in layers.items():
        s, state = packed.spec, module.__dict__[STATE_ATTR]
        a = module._modules.get(state.input or "")
        problem = None
        if type(module) is not nn.Linear:
            problem = f"it is a {type(module).__name__}; BitLinear replaces nn.Linear"
        elif (s.type, s.scale, s.strategy) != ("ternary", "absmean", "tensor"):
            problem = (
                f"its weights are {s.type} {s.scale} per {s.strategy}, not absmean ternary "
                "per tensor"
            )
        elif (
            a is None
            or (a.spec.type, a.spec.num_bits, a.spec.strategy, a.spec.symmetric)
            != ("uniform", 8, "token", True)
            or getattr(a, "frozen", False)
        ):
            problem = "its input is not 8-bit symmetric per-token absmax, as BitLinear's is"
        elif state.output is not None or state.op_table:
            problem = "it quantizes more than its input and weight"
        elif packed.weight_shape[0] % 4:
            problem = f"{packed.weight_shape[0]} outputs: BitLinear packs rows in fours"
        if problem:
            raise ConvertError(f"export hf-bitnet: {name}: {problem}; the preset that fits: {fits}")
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
