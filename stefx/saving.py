"""Save and load a quantized model: one safetensors file, tensors plus JSON, never pickle.

:func:`save` writes every tensor of ``model.state_dict()`` (weights and each quantizer's
learned or calibrated state) and, in the file's metadata, a JSON header: the recipe, the
sites the recipe resolved to (so loading needs no capture and no example inputs), the
model's class and, for a Hugging Face model, its config. Tensors that share storage (tied
embeddings) are stored once and named as aliases. A SHA-256 of the tensor bytes guards
against a truncated or edited file.

:func:`load` rebuilds: it puts the saved sites on ``model`` (a float model of the same
architecture), or on a Hugging Face model built from the saved config when ``model`` is
None, and loads every tensor strictly. Each way this can go wrong (not a stefx file, a
corrupt file, another architecture, a missing or extra key, another shape) raises a
:class:`~stefx.errors.StefxError` naming what differs, before the model is changed.

>>> import tempfile, torch, stefx
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> q = stefx.quantize(net, "w4a8", (torch.randn(2, 8),), report=False)
>>> path = tempfile.mktemp(suffix=".safetensors")
>>> stefx.save(q, path)
>>> again = stefx.load(path, torch.nn.Sequential(torch.nn.Linear(8, 8)))
>>> x = torch.randn(2, 8)
>>> torch.equal(again(x), q(x))
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stefx.errors import StefxError

__all__ = ["FORMAT", "load", "plan_from_dict", "plan_to_dict", "read_header", "save"]

FORMAT = "stefx"
VERSION = 1
_KEY = "stefx"  # the metadata entry holding the JSON header


def plan_to_dict(plan) -> dict[str, Any]:
    """A slim plan (recipe, sites, unmatched rules) as plain JSON-able data."""
    return {
        "recipe": plan.recipe.to_dict(),
        "sites": [s.to_dict() for s in plan.sites],
        "unmatched": [r.index for r in plan.unmatched],
    }


def plan_from_dict(data: Mapping[str, Any]):
    """The plan :func:`plan_to_dict` wrote (specs validated again)."""
    from stefx.match import Plan
    from stefx.recipe import Recipe
    from stefx.sites import Site

    recipe = Recipe.from_dict(data["recipe"])
    sites = [Site.from_dict(s) for s in data["sites"]]
    by_index = {r.index: r for r in recipe.rules}
    return Plan(recipe, sites, [], [by_index[i] for i in data.get("unmatched", ())], None)


def _plan_of(model: nn.Module):
    from stefx.api import plan_of

    plan = plan_of(model)
    if plan is None:
        raise StefxError(
            f"{type(model).__name__} carries no stefx plan: save a model that "
            "stefx.quantize returned (for a float model use torch.save or save_pretrained)"
        )
    return plan


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _unique_tensors(state: Mapping[str, torch.Tensor]):
    """Tensors to write, one per storage, and the aliases of the others."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.to("cpu").contiguous()
    return tensors, aliases


def _model_info(model: nn.Module) -> dict[str, Any]:
    cls = type(model)
    info: dict[str, Any] = {"class": cls.__name__, "module": cls.__module__}
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1:
        info["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(model, "_from_config"):
        info["hf_config"] = config.to_dict()
        attn = getattr(config, "_attn_implementation", None)
        if isinstance(attn, str):  # not in to_dict(); eager and sdpa round differently
            info["attn_implementation"] = attn
    return info


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model`` (quantized by :func:`stefx.quantize`) to ``path``, a safetensors file.
    A PEFT model is saved as its base model, adapters included."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from stefx.api import target_of
    from stefx.convert import converted_weights

    plan = _plan_of(model)
    peft = target_of(model) is not model
    model = target_of(model)
    tensors, aliases = _unique_tensors(model.state_dict())
    header = {
        "format": FORMAT,
        "version": VERSION,
        "plan": plan_to_dict(plan),
        "as_graph": isinstance(model, torch.fx.GraphModule),
        "model": {**_model_info(model), "peft": peft},
        "aliases": aliases,
        "converted": converted_weights(model),  # weights stored packed (stefx.convert)
        "sha256": _digest(tensors),
    }
    try:
        save_file(tensors, str(path), metadata={_KEY: json.dumps(header)})
    except (OSError, SafetensorError) as e:
        raise StefxError(f"stefx.save: cannot write {str(path)!r}: {e}") from None


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a stefx file (recipe, sites, model class, config)."""
    header, _ = _read(path, tensors=False)
    return header


def _read(path: str | Path, tensors: bool = True) -> tuple[dict[str, Any], dict]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise StefxError(f"stefx.load: no file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = f.keys()  # a safetensors handle, not a dict
            data = {k: f.get_tensor(k) for k in keys} if tensors else {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise StefxError(
            f"stefx.load: {str(path)!r} is not a readable safetensors file ({e}); it may be "
            "truncated or damaged: save it again with stefx.save"
        ) from None
    if _KEY not in meta:
        raise StefxError(
            f"stefx.load: {str(path)!r} is a safetensors file but not a stefx one (no "
            f"{_KEY!r} metadata); write it with stefx.save(model, path)"
        )
    try:
        header = json.loads(meta[_KEY])
    except json.JSONDecodeError as e:
        raise StefxError(f"stefx.load: {str(path)!r}: its stefx header is not JSON ({e})") from None
    if header.get("format") != FORMAT or not isinstance(header.get("version"), int):
        raise StefxError(f"stefx.load: {str(path)!r}: not a stefx header: {header!r:.200}")
    if header["version"] > VERSION:
        raise StefxError(
            f"stefx.load: {str(path)!r} was written by a newer stefx (format version "
            f"{header['version']}, this one reads up to {VERSION}); upgrade stefx"
        )
    if tensors and _digest(data) != header.get("sha256"):
        raise StefxError(
            f"stefx.load: {str(path)!r}: the tensors do not match the checksum saved with "
            "them; the file was modified or damaged after stefx.save"
        )
    return header, data


def _build_hf(info: Mapping[str, Any]) -> nn.Module:
    if "hf_config" not in info:
        raise StefxError(
            f"stefx.load: the file holds a {info['class']} (not a Hugging Face model), so it "
            f"cannot be rebuilt from the file alone; pass model=<a float {info['class']}>"
        )
    import transformers

    cls = getattr(transformers, info["class"], None)
    if cls is None:
        raise StefxError(
            f"stefx.load: transformers has no class {info['class']!r} (the file's model); "
            "install the transformers version that wrote it, or pass model="
        )
    config_data = dict(info["hf_config"])
    config = transformers.AutoConfig.for_model(config_data.pop("model_type"), **config_data)
    attn = info.get("attn_implementation")
    model = cls._from_config(config, **({"attn_implementation": attn} if attn else {}))
    dtype = getattr(torch, str(info.get("dtype", "")), None)
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def _check_model(model: nn.Module, plan, state: Mapping[str, torch.Tensor], info) -> None:
    """The saved sites fit ``model``: every module, its type, every weight and its shape."""
    modules = dict(model.named_modules())
    for site in plan.sites:
        module = modules.get(site.module)
        where = f"stefx.load: site {site.name!r}"
        if module is None:
            raise StefxError(
                f"{where}: {type(model).__name__} has no module {site.module!r}; the file "
                f"was saved from a {info['class']} of another architecture"
            )
        if type(module).__name__ != site.module_type:
            raise StefxError(
                f"{where}: module {site.module!r} is a {type(module).__name__}, the file's is a "
                f"{site.module_type}; pass a model of the saved architecture ({info['class']})"
            )
        for p in site.params:
            key = f"{site.module}.{p}" if site.module else p
            saved = state.get(key)
            have = module.get_parameter(p)
            if saved is not None and tuple(saved.shape) != tuple(have.shape):
                raise StefxError(
                    f"{where}: {key} has shape {tuple(have.shape)} here and "
                    f"{tuple(saved.shape)} in the file; the model's config differs from the "
                    "saved one"
                )


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Read what :func:`save` wrote: ``model`` (a float model of the saved architecture,
    quantized in place) or, when None, the saved Hugging Face model rebuilt from its config;
    returns the quantized model with every saved tensor loaded (outputs bit-identical).
    A PEFT model passed as ``model`` gets the saved state in its base model (adapters too)."""
    from stefx.api import PLAN_ATTR, target_of
    from stefx.rewrite import apply_plan, dequantize, quantized_modules
    from stefx.surgery import to_graph_module

    if model is not None and not isinstance(model, nn.Module):
        raise StefxError(
            f"stefx.load: model={type(model).__name__} is not a torch.nn.Module; pass a float "
            "model of the saved architecture, or None to rebuild a Hugging Face model"
        )
    header, tensors = _read(path)
    info = {"class": "model", **(header.get("model") or {})}
    try:
        plan = plan_from_dict(header["plan"])
    except (KeyError, TypeError, StefxError) as e:
        raise StefxError(f"stefx.load: {str(path)!r}: its plan cannot be read ({e})") from None
    state = dict(tensors)
    for key, target in header.get("aliases", {}).items():
        if target not in tensors:
            raise StefxError(f"stefx.load: {str(path)!r}: alias {key!r} -> missing {target!r}")
        state[key] = tensors[target]
    outer = model
    if model is None and info.get("peft"):
        raise StefxError(
            f"stefx.load: {str(path)!r} holds a PEFT model (adapters on a {info['class']}); "
            "pass model=peft.get_peft_model(<float model>, <the same LoraConfig>)"
        )
    if model is None:
        outer = model = _build_hf(info)
    model = target_of(model)
    if quantized_modules(model):
        raise StefxError(
            f"stefx.load: the {type(model).__name__} passed is already quantized; pass a "
            "float model (stefx.dequantize(model) first)"
        )
    _check_model(model, plan, state, info)
    if header.get("as_graph"):  # the graph is rebuilt from the model, as quantize did
        from stefx.capture import capture

        traced = dataclasses.replace(plan, capture=capture(model, method="symbolic_trace"))
        result = to_graph_module(model, traced)
    else:
        result = model
        apply_plan(model, plan)
    try:
        if header.get("converted"):  # packed storage first, then the file's codes go in
            from stefx.convert import convert

            convert(model, only=header["converted"], layout=True)
        missing, unexpected = _keys(result, state)
        if missing or unexpected:
            raise StefxError(
                f"stefx.load: {str(path)!r} does not fit this {type(model).__name__}: "
                + (f"missing from the file: {_few(missing)}; " if missing else "")
                + (
                    f"in the file but not the model (or shaped otherwise): {_few(unexpected)}; "
                    if unexpected
                    else ""
                )
                + f"the file holds a {info['class']} quantized with recipe "
                f"{plan.recipe.name!r}"
            )
        try:
            result.load_state_dict(state, strict=True)
        except RuntimeError as e:  # a shape differs outside the quantized sites
            raise StefxError(
                f"stefx.load: {str(path)!r} does not fit this {type(model).__name__}: {e}"
            ) from None
    except Exception:
        if result is model:
            dequantize(model)  # leave the model as it came
        raise
    object.__setattr__(result, PLAN_ATTR, plan)
    if "hf_config" in info and not header.get("as_graph"):
        import stefx.hf

        stefx.hf.attach_config(result)
    return outer if result is model else result


def _keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Keys missing from the file, and keys the model lacks or holds in another shape
    (a still-empty, lazily initialised quantizer state takes any saved shape)."""
    want = model.state_dict()
    wrong = [
        f"{k} {tuple(state[k].shape)} (here {tuple(t.shape)})"
        for k, t in want.items()
        if k in state and t.numel() and tuple(t.shape) != tuple(state[k].shape)
    ]
    return sorted(set(want) - set(state)), sorted(set(state) - set(want)) + wrong


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
