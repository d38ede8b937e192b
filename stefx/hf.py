"""Hugging Face integration: a quantized model saves with ``save_pretrained`` and comes back
quantized from ``from_pretrained``, through transformers' quantization plug-in.

``stefx.quantize`` of a ``PreTrainedModel`` sets ``model.config.quantization_config`` to a
:class:`StefxConfig` holding the plan (recipe and resolved sites, plain JSON), so
``save_pretrained`` writes it into ``config.json`` beside the weights and every quantizer
tensor. ``from_pretrained`` finds ``quant_method: stefx`` there and hands the model to
:class:`StefxHfQuantizer`, which puts the saved sites on the (still empty) model before the
weights load, so each quantizer key has a home: no "unexpected keys", learned steps and
offsets restored, logits identical. Passing ``quantization_config=StefxConfig(recipe=...)``
to ``from_pretrained`` of a float checkpoint quantizes it on load instead.

The plug-in is registered when stefx is imported after transformers, when an HF model is
quantized or loaded by stefx, and by ``import stefx.hf``; a process that only calls
``from_pretrained`` should ``import stefx.hf`` (or ``import stefx`` after transformers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from stefx.errors import StefxError

__all__ = [
    "METHOD",
    "StefxConfig",
    "StefxHfQuantizer",
    "attach_config",
    "check_config",
    "detach_config",
    "register",
]

METHOD = "stefx"
VERSION = 1


class StefxConfig(QuantizationConfigMixin):
    """``quantization_config`` of a stefx-quantized model: ``plan`` (what
    :func:`stefx.saving.plan_to_dict` writes) for a saved quantized model, or ``recipe``
    (any form :func:`stefx.quantize` takes that is plain data: a preset name, a path or a
    dict) to quantize a float checkpoint as it loads."""

    def __init__(
        self,
        plan: dict[str, Any] | None = None,
        recipe: str | dict[str, Any] | None = None,
        version: int = VERSION,
        converted: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = METHOD
        if (plan is None) == (recipe is None):
            raise StefxError(
                "StefxConfig: give exactly one of plan= (a saved stefx model) or recipe= "
                "(quantize a float checkpoint on load, e.g. recipe='w4a8')"
            )
        if isinstance(version, int) and version > VERSION:
            raise StefxError(
                f"StefxConfig: version {version} was written by a newer stefx (this one reads "
                f"up to {VERSION}); upgrade stefx"
            )
        self.plan = plan
        self.recipe = recipe
        self.version = version
        self.converted = list(converted or [])  # weights stored packed (stefx.convert)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": METHOD, "version": self.version}
        if self.plan is not None:
            out["plan"] = self.plan
        if self.recipe is not None:
            out["recipe"] = self.recipe
        if self.converted:
            out["converted"] = self.converted
        return out


def _is_quantizer_state(model: nn.Module, key: str) -> bool:
    from stefx.ste.base import Quantizer

    module_path = key.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(module_path), Quantizer)
    except AttributeError:
        return False


class StefxHfQuantizer(HfQuantizer):
    """Rebuilds a stefx-quantized model inside ``from_pretrained`` (see the module docstring)."""

    requires_calibration = False

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized and self.quantization_config.plan is None:
            raise StefxError(
                "this checkpoint's quantization_config (quant_method: stefx) has no plan; it "
                "was not written by save_pretrained of a stefx-quantized model"
            )

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        # Lets a lazily-initialised quantizer state (an empty step until the first forward)
        # take the saved shape: the loader checks shapes except for these keys.
        return _is_quantizer_state(model, param_name)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.quantization_config.plan is None:  # recipe=: quantized after loading
            return model
        from stefx.api import PLAN_ATTR
        from stefx.rewrite import apply_plan
        from stefx.saving import plan_from_dict

        plan = plan_from_dict(self.quantization_config.plan)
        with torch.device("meta"):  # the skeleton is on meta; its quantizers go there too
            apply_plan(model, plan)
            if self.quantization_config.converted:  # packed storage for the saved codes
                from stefx.convert import convert

                convert(model, only=self.quantization_config.converted, layout=True)
        object.__setattr__(model, PLAN_ATTR, plan)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from stefx.ste.base import Quantizer

        if self.quantization_config.plan is None:
            import stefx

            stefx.quantize(model, self.quantization_config.recipe, report=False)
            return model
        for q in model.modules():
            if isinstance(q, Quantizer):
                q._sync_buffers()  # non-persistent buffers left the meta device empty
        model.config.quantization_config = self.quantization_config
        return model

    def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
        import stefx  # model.dequantize(): the float model, quantizers gone

        return stefx.dequantize(model)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Make ``quant_method: stefx`` known to transformers (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(METHOD, StefxConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(METHOD, StefxHfQuantizer)


def check_config(model: nn.Module) -> None:
    """Refuse a model another method already quantized (its config says so)."""
    existing = getattr(model.config, "quantization_config", None)
    if existing is not None and _method(existing) != METHOD:
        raise StefxError(
            f"{type(model).__name__} is already quantized with "
            f"{_method(existing)!r} (config.quantization_config); stefx trains from a float "
            "model: load the float checkpoint, or dequantize it first"
        )


def attach_config(model: nn.Module) -> None:
    """Record ``model``'s stefx plan as its ``config.quantization_config``."""
    from stefx.api import plan_of
    from stefx.convert import converted_weights
    from stefx.saving import plan_to_dict

    if _method(getattr(model.config, "quantization_config", None)) != METHOD:
        _own_config(model)
    model.config.quantization_config = StefxConfig(
        plan=plan_to_dict(plan_of(model)), converted=converted_weights(model)
    )


def _own_config(model: nn.Module) -> None:
    """Give ``model`` a config object of its own before stefx writes into it: transformers
    5's ``from_config(config)`` keeps the caller's object, and writing the plan there would
    make every model later built from it look quantized. Modules inside that share the
    config keep sharing the copy."""
    import copy

    old = model.config
    new = copy.deepcopy(old)
    for module in model.modules():
        if module.__dict__.get("config") is old:
            module.config = new


def detach_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if _method(getattr(config, "quantization_config", None)) == METHOD:
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if model.__dict__.get("is_quantized"):
        model.is_quantized = False


def _method(qc: Any) -> Any:
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return getattr(method, "value", method)


register()
