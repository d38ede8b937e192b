"""What the exporters share: a converted copy of the model, its codes, a folder writer."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from stefx.convert import ConvertError, PackedWeight, packed_weights

__all__ = ["converted_copy", "signed_codes", "tied_keys", "write_folder"]


def converted_copy(model: nn.Module, fmt: str):
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


def write_folder(work: nn.Module, config, tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    tied = tied_keys(work)
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


def signed_codes(packed: PackedWeight) -> torch.Tensor:
    """The layer's codes as int8; an unsigned asymmetric range [0, 2^b - 1] moves to the
    signed [-2^(b-1), 2^(b-1) - 1] compressed-tensors stores (its zero point moves alike,
    so code - zero is unchanged)."""
    codes = packed.int_codes()
    if packed.zero_point is not None:
        codes = codes - 2 ** (packed.spec.num_bits - 1)
    return codes.to(torch.int8)


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys transformers re-ties on load (lm_head.weight = embed_tokens.weight)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(out)]}.weight"}
