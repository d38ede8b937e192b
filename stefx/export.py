"""Export a stefx-quantized model to a format another runtime loads.

``stefx.export(qmodel, path, format=...)``. Each format writes what its consumer reads,
from the packed weights :func:`stefx.convert` makes (a copy is converted; the model passed
is left as it is), so the consumer computes with exactly the weights stefx trained; a
layer whose lattice the format cannot hold is refused, naming the layer, the mismatch and
the preset that fits, never re-quantized behind the user's back.

- ``"compressed-tensors"``: a Hugging Face folder in the ``pack-quantized`` format (what
  vLLM serves; ``transformers`` loads it with the ``compressed-tensors`` package
  installed): 4- or 8-bit integer weights of ``nn.Linear`` layers, per output channel or in
  groups along the input (a width the group size divides), symmetric or with a zero point,
  weights only (``w4a16-g128`` is its lattice). Symmetric weights load as the format's
  compressed modules; for a zero point, compressed-tensors 0.20 builds its meta skeleton
  with the zero point unpacked and then expects it packed, so load those with
  ``from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))``.

- ``"hf-bitnet"``: a Hugging Face folder in transformers' own BitNet format
  (``quant_method: bitnet``, offline packed ternary ``BitLinear`` weights, four 2-bit codes
  per byte, one scale per tensor, 8-bit per-token activations), which ``from_pretrained``
  loads with no extra package: the lattice of ``bitnet-b158``. transformers computes
  ``linear(round(x·127/max|x|), codes) / (127/max|x| · 1/γ)`` where stefx computes
  ``linear(round(x/(max|x|/127))·max|x|/127, codes·γ)``: the same lattice, rounded in
  another order, so logits agree to float tolerance rather than bit for bit.

GGUF and ONNX are not written yet.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from stefx.convert import ConvertError, PackedWeight, packed_weights

__all__ = ["FORMATS", "export"]

FORMATS = ("compressed-tensors", "hf-bitnet")
_LATER = ("gguf", "onnx")


def export(model: nn.Module, path: str | Path, format: str) -> Path:
    """Write ``model`` (quantized by :func:`stefx.quantize`, converted or not) to ``path``
    in ``format``; returns the path. Raises :class:`~stefx.convert.ConvertError` for a layer
    the format cannot hold (nothing is written)."""
    if format in _LATER:
        raise ConvertError(
            f"export: format {format!r} is not implemented yet; formats: {', '.join(FORMATS)}"
        )
    if format not in FORMATS:
        raise ConvertError(f"export: unknown format {format!r}; choose one of {FORMATS}")
    if format == "hf-bitnet":
        return _hf_bitnet(model, Path(path))
    return _compressed_tensors(model, Path(path))


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


def _compressed_tensors(model: nn.Module, path: Path) -> Path:
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise ConvertError(
            "export compressed-tensors: the compressed-tensors package is not installed; "
            "pip install 'stefx[export]'"
        ) from None
    work, layers, tensors = _converted_copy(model, "compressed-tensors")
    schemes = {name: _ct_scheme(name, m, pw) for name, (m, pw) in layers.items()}
    for name, (_, packed) in layers.items():
        prefix = name.rpartition(".")[0]
        bits, shift = packed.spec.num_bits, 2 ** (packed.spec.num_bits - 1)
        tensors[f"{prefix}.weight_packed"] = pack_to_int32(_signed_codes(packed), bits)
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
    return _write(work, config, tensors, path)


def _converted_copy(model: nn.Module, fmt: str):
    """A converted copy of ``model``'s HF model, its packed layers, and its state dict
    without stefx's quantizer entries."""
    import stefx
    from stefx.api import target_of
    from stefx.ste.base import Quantizer

    if not isinstance(model, nn.Module):
        raise ConvertError(f"export {fmt}: model={type(model).__name__} is not a torch.nn.Module")
    base = target_of(model)
    if not hasattr(base, "config") or not hasattr(base, "save_pretrained"):
        raise ConvertError(
            f"export {fmt}: {type(base).__name__} is not a Hugging Face model; the format is "
            "a transformers checkpoint folder"
        )
    work = copy.deepcopy(base)
    if not packed_weights(work):
        stefx.convert(work)
    quantizer_paths = {n for n, m in work.named_modules() if isinstance(m, Quantizer)}
    tensors = {
        k: v for k, v in work.state_dict().items() if k.rpartition(".")[0] not in quantizer_paths
    }
    return work, packed_weights(work), tensors


def _write(work: nn.Module, config, tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    tied = _tied_keys(work)
    try:
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        if getattr(work, "generation_config", None) is not None:
            work.generation_config.save_pretrained(path)
        save_file(
            {k: v.contiguous() for k, v in tensors.items() if k not in tied},
            str(path / "model.safetensors"),
            metadata={"format": "pt"},
        )
    except OSError as e:
        raise ConvertError(f"export: cannot write the folder {str(path)!r}: {e}") from None
    return path


def _hf_bitnet(model: nn.Module, path: Path) -> Path:
    from transformers.integrations.bitnet import pack_weights

    from stefx.rewrite import STATE_ATTR

    work, layers, tensors = _converted_copy(model, "hf-bitnet")
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
        tensors[f"{prefix}.weight"] = pack_weights(_signed_codes(packed))  # ternary: -1..1
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
    return _write(work, config, tensors, path)


def _signed_codes(packed: PackedWeight) -> torch.Tensor:
    """The layer's codes as int8; an unsigned asymmetric range [0, 2^b - 1] moves to the
    signed [-2^(b-1), 2^(b-1) - 1] compressed-tensors stores (its zero point moves alike,
    so code - zero is unchanged)."""
    codes = packed.int_codes()
    if packed.zero_point is not None:
        codes = codes - 2 ** (packed.spec.num_bits - 1)
    return codes.to(torch.int8)


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys transformers re-ties on load (lm_head.weight = embed_tokens.weight)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(out)]}.weight"}
