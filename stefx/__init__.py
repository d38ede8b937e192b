"""stefx: low-bit quantization-aware training on torch.fx.

>>> import stefx
>>> q = stefx.make_quantizer({"type": "uniform", "num_bits": 4})
>>> q.bits
4
"""

from stefx.errors import CaptureError, NoMatchError, RecipeError, StefxError
from stefx.ste import Quantizer, QuantSpec, make_quantizer, register_quantizer

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "NoMatchError",
    "QuantSpec",
    "Quantizer",
    "RecipeError",
    "StefxError",
    "make_quantizer",
    "register_quantizer",
]
