"""What the exporters share: a converted copy of the model, its codes, a folder writer."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from stefx.convert import ConvertError, PackedWeight, packed_weights

__all__ = [
    "RequantizedWarning",
    "converted_copy",
    "float_state",
    "refuse",
    "report_requantized",
    "requantize",
    "signed_codes",
    "tied_keys",
    "weight_layers",
    "write_folder",
]


class RequantizedWarning(UserWarning):
    """``strict=False`` re-quantized layers whose lattice the format cannot hold."""


def weight_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str, str, nn.Module, tuple]]:
    """FQN of each quantized weight -> (module, parameter, quantizer name, quantizer,
    weight shape), converted (:class:`PackedWeight`) or not; disabled ones left out."""
    from stefx.rewrite import STATE_ATTR, quantized_modules

    out = {}
    for fqn, module in quantized_modules(model).items():
        for p, qname in module.__dict__[STATE_ATTR].swaps.items():
            q = module._modules[qname]
            if not q.enabled:
                continue
            shape = q.weight_shape if isinstance(q, PackedWeight) else module.get_parameter(p).shape
            out[f"{fqn}.{p}" if fqn else p] = (module, p, qname, q, tuple(shape))
    return out


@torch.no_grad()
def requantize(module: nn.Module, param: str, qname: str, spec: dict) -> tuple[float, float]:
    """Put the weight's fake-quantized values on the lattice of ``spec`` (a quantizer
    spec) in place of its own quantizer; returns (max |Δ|, relative RMS) between the two
    fake-quantized weights. A symmetric lattice whose codes fit in ``spec``'s bits and
    whose scale groups ``spec`` shares (or a per-tensor one, under per-channel) keeps its
    scales: the codes are the same numbers in a wider field, and nothing changes."""
    from stefx.runtime import param_slot
    from stefx.ste.spec import make_quantizer

    q = module._modules[qname]
    owner, key = param_slot(module, param)
    w = owner._parameters.get(key)
    fake = (q.dequantized() if isinstance(q, PackedWeight) else q(w)).detach()
    step = _kept_step(q, w, fake.shape, spec)
    if step is not None:
        spec = {**spec, "type": "lsq"}
        spec.pop("symmetric", None)
    new = make_quantizer(spec, where=f"re-quantizing {param}").to(fake.device)
    if step is not None:
        new.scale.data = step.to(fake.device)
    owner._parameters[key] = nn.Parameter(fake.clone())
    module._modules[qname] = new
    diff = (new(fake) - fake).float()
    rel = diff.pow(2).mean().sqrt() / fake.float().pow(2).mean().sqrt().clamp_min(1e-30)
    return diff.abs().max().item(), rel.item()


def _kept_step(q, w, shape, spec: dict) -> torch.Tensor | None:
    """The per-group scale of ``q``'s lattice on ``spec``'s groups, when its codes fit
    ``spec``'s signed range (None: the values must be re-rounded)."""
    from stefx.convert import _lattice, _qmin
    from stefx.ste.granularity import Granularity
    from stefx.ste.uniform import code_range

    old = q.spec
    if not old.symmetric or spec.get("type", "uniform") not in ("uniform", "lsq"):
        return None
    lo, hi = code_range(spec["num_bits"], True)
    top = 1 if old.type in ("binary", "ternary") else code_range(old.num_bits, True)[1]
    if _qmin(q) < lo or top > hi:
        return None
    if isinstance(q, PackedWeight):
        scale = q.scale
    else:
        try:
            lat = _lattice(q, q.granularity.rows(w.detach()), "")
        except ConvertError:
            return None
        if lat.zero is not None:
            return None
        scale = lat.scale.reshape(-1).float()
    new = Granularity(spec["strategy"], spec.get("axis"), spec.get("group_size"))
    if new == q.granularity:
        return scale.clone()
    if old.strategy == "tensor" and spec["strategy"] == "channel" and spec.get("axis") in (None, 0):
        return scale.reshape(1).expand(shape[0]).clone()
    return None


def report_requantized(fmt: str, report: dict[str, str]) -> None:
    """One warning listing what ``strict=False`` changed, layer by layer."""
    if report:
        lines = "; ".join(f"{k}: {v}" for k, v in report.items())
        warnings.warn(f"export {fmt}: strict=False changed {lines}", RequantizedWarning, 4)


def refuse(fmt: str, problems: list[str]) -> ConvertError:
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return ConvertError(
        f"export {fmt}: {len(problems)} layer(s) are not on the format's lattice (nothing was "
        "written; strict=False re-quantizes them and reports the error):\n  "
        + "\n  ".join(problems[:8])
        + more
    )


def converted_copy(model: nn.Module, fmt: str, fix=None, strict: bool = True):
    """A converted copy of ``model``'s HF model, its packed layers, and its state dict
    without stefx's quantizer entries. ``fix(work, strict)``, when given, runs on the copy
    before it is converted: it checks each layer against the format and (strict=False)
    re-quantizes what does not fit."""
    import stefx
    from stefx.api import target_of

    if not isinstance(model, nn.Module):
        raise ConvertError(f"export {fmt}: model={type(model).__name__} is not a torch.nn.Module")
    base = target_of(model)
    if not hasattr(base, "config") or not hasattr(base, "save_pretrained"):
        raise ConvertError(
            f"export {fmt}: {type(base).__name__} is not a Hugging Face model; the format is "
            "a transformers checkpoint folder"
        )
    work = copy.deepcopy(base)
    if fix is not None:
        fix(work, strict)
    layers = weight_layers(work)
    todo = [n for n, (_, _, _, q, _) in layers.items() if not isinstance(q, PackedWeight)]
    if todo:
        stefx.convert(work, only=todo)
    return work, packed_weights(work), float_state(work)


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict without stefx's quantizer entries (codes, scales, steps)."""
    from stefx.ste.base import Quantizer

    quantizer_paths = {n for n, m in model.named_modules() if isinstance(m, Quantizer)}
    return {
        k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in quantizer_paths
    }


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
