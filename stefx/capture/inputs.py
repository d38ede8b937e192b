"""Example inputs: build them from a Hugging Face config, validate the user's, move to meta.

``example_inputs_for`` makes the small inputs stefx captures HF models with when the user
gives none; ``bind_inputs`` turns what the user gave (a tuple of positional args, a dict of
kwargs, or a single tensor) into ``(args, kwargs)`` checked against ``model.forward``.
transformers is imported only if the user already imported it.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from stefx.errors import CaptureError, did_you_mean

__all__ = ["bind_inputs", "example_inputs_for", "is_hf_model", "model_device", "to_device"]

_SEQ_LEN = 8


def is_hf_model(model: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (without importing transformers)."""
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers else None
    return pretrained is not None and isinstance(model, pretrained)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu when it has none)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    floats = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floats, torch.get_default_dtype())


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor moved to ``device`` (a no-op for tensors already there)."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def _forward_params(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def example_inputs_for(model: nn.Module) -> dict[str, torch.Tensor]:
    """Small example inputs for a Hugging Face model, built from its config.

    Models that read text get ``input_ids`` of shape (1, 8) (image-text LMs too: they run
    on text alone); vision-only models ``pixel_values`` of shape
    (1, num_channels, image_size, image_size); speech encoder-decoders (Whisper)
    ``input_features`` of shape (1, num_mel_bins, 2 * max_source_positions) and
    ``decoder_input_ids``. Tensors are on the model's device (``meta`` for a meta model).

    >>> example_inputs_for(gpt2)["input_ids"].shape   # doctest: +SKIP
    torch.Size([1, 8])
    """
    config = getattr(model, "config", None)
    params = _forward_params(model)
    device, dtype = model_device(model), _model_dtype(model)
    name = type(model).__name__
    if config is None:
        raise CaptureError(
            f"{name} has no .config to build example inputs from; pass "
            "example_inputs=(tensor, ...) or example_inputs={'arg': tensor} to capture()."
        )
    inputs: dict[str, torch.Tensor] = {}
    vocab = _vocab_size(config)
    if "input_features" in params and hasattr(config, "num_mel_bins"):
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        inputs["input_features"] = torch.randn(1, config.num_mel_bins, frames, dtype=dtype)
    elif "input_ids" in params and vocab:
        # A model that reads text reads text first: image-text LMs (Fuyu, LLaVA) run on
        # text alone, but need input_ids beside any pixel_values.
        inputs["input_ids"] = _token_ids(config, vocab)
    elif "pixel_values" in params and hasattr(config, "image_size"):
        size = config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(config, "num_channels", 3))
        inputs["pixel_values"] = torch.randn(1, channels, h, w, dtype=dtype)
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False) and vocab:
        inputs["decoder_input_ids"] = _token_ids(config, vocab)
    if not inputs:
        dummy = getattr(model, "dummy_inputs", None)
        if isinstance(dummy, dict) and dummy:
            inputs = {k: v for k, v in dummy.items() if isinstance(v, torch.Tensor)}
    if not inputs:
        raise CaptureError(
            f"stefx cannot build example inputs for {name} from its config; pass "
            "example_inputs={'input_name': tensor, ...} to capture()."
        )
    return to_device(inputs, device)


def _vocab_size(config: Any) -> int | None:
    """The vocabulary size, also from a composite config's text part (``text_config``)."""
    for cfg in (config, getattr(config, "text_config", None)):
        vocab = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    return None


def _token_ids(config: Any, vocab: int) -> torch.Tensor:
    limit = getattr(config, "max_position_embeddings", None) or getattr(
        config, "max_target_positions", None
    )
    # XLNet has no position limit and reports -1: only a positive limit caps the length.
    length = min(_SEQ_LEN, int(limit)) if isinstance(limit, int) and limit > 0 else _SEQ_LEN
    # Deterministic ids that avoid the low special-token ids when the vocabulary allows.
    low = 3 if vocab > 3 + length else 0
    return (torch.arange(length) % (vocab - low) + low).unsqueeze(0)


def bind_inputs(
    model: nn.Module, example_inputs: Any, extra: dict[str, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise ``example_inputs`` into ``(args, kwargs)`` and check them against forward.

    ``extra`` kwargs (e.g. ``use_cache=False``) are added when forward accepts them and
    the user did not pass them. Raises ``CaptureError`` naming a bad key.
    """
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, list | tuple):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        raise CaptureError(
            f"example_inputs must be a tuple of positional arguments or a dict of keyword "
            f"arguments, got {type(example_inputs).__name__}."
        )
    params = _forward_params(model)
    for key, value in (extra or {}).items():
        if key in params and key not in kwargs:
            kwargs[key] = value
    _check_keys(model, params, args, kwargs)
    return args, kwargs


def _check_keys(
    model: nn.Module, params: dict[str, inspect.Parameter], args: tuple, kwargs: dict
) -> None:
    if not params:
        return
    known = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    extra_ok = _hf_extra_kwargs() if is_hf_model(model) else None
    for key in kwargs:
        if key in known or (var_kw and (extra_ok is None or key in extra_ok)):
            continue
        raise CaptureError(
            f"example_inputs has key {key!r}, which {type(model).__name__}.forward does not "
            f"take{did_you_mean(key, known)}; its arguments are: {', '.join(known)}."
        )
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(
            f"example_inputs do not fit {type(model).__name__}.forward: {exc}. Pass a tuple "
            "of positional arguments or a dict of keyword arguments that forward accepts."
        ) from None


def _hf_extra_kwargs() -> set[str] | None:
    """Keyword arguments HF forwards accept through ``**kwargs`` (None: accept any)."""
    try:
        from transformers.utils.generic import TransformersKwargs
    except ImportError:
        return None
    names = {"return_dict"}  # popped by transformers' @can_return_tuple decorator
    for cls in TransformersKwargs.__mro__:
        names.update(getattr(cls, "__annotations__", {}))
    return names
