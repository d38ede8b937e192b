"""stefx: low-bit quantization-aware training on torch.fx.

>>> import stefx
>>> q = stefx.make_quantizer({"type": "uniform", "num_bits": 4})
>>> q.bits
4
"""

from stefx import train
from stefx.api import dequantize, explain, quantize
from stefx.capture import capture
from stefx.convert import ConvertError, convert
from stefx.errors import CaptureError, NoMatchError, RecipeError, StefxError
from stefx.export import export
from stefx.export.common import RequantizedWarning
from stefx.profile import profile
from stefx.recipe import Recipe, Rule, load_recipe, preset_names
from stefx.saving import load, save
from stefx.ste import Quantizer, QuantSpec, make_quantizer, register_quantizer

__version__ = "0.1.0"

if "transformers" in __import__("sys").modules:  # from_pretrained knows quant_method: stefx
    import stefx.hf  # noqa: F401  (registers the plug-in; transformers is loaded already)


def __getattr__(name: str):
    """``stefx.trainer`` (needs transformers) and ``stefx.hf`` load on first use."""
    if name in ("trainer", "hf"):
        import importlib

        return importlib.import_module(f"stefx.{name}")
    raise AttributeError(f"module 'stefx' has no attribute {name!r}")


__all__ = [
    "CaptureError",
    "ConvertError",
    "NoMatchError",
    "QuantSpec",
    "Quantizer",
    "Recipe",
    "RecipeError",
    "RequantizedWarning",
    "Rule",
    "StefxError",
    "capture",
    "convert",
    "dequantize",
    "explain",
    "export",
    "load",
    "load_recipe",
    "make_quantizer",
    "preset_names",
    "profile",
    "quantize",
    "register_quantizer",
    "save",
    "train",
]
