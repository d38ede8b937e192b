"""Straight-through-estimator quantizers: fake-quantize forward, surrogate-gradient backward.

Build one from a spec dict with :func:`make_quantizer`; add a type with
:func:`register_quantizer`. Importing this package registers the built-in types.
"""

from stefx.ste import binary, dorefa, lsq, pact, seq, ternary, uniform  # noqa: F401  (register)
from stefx.ste.base import Quantizer
from stefx.ste.granularity import Granularity
from stefx.ste.spec import QUANTIZERS, QuantSpec, make_quantizer, parse_spec, register_quantizer

__all__ = [
    "QUANTIZERS",
    "Granularity",
    "QuantSpec",
    "Quantizer",
    "make_quantizer",
    "parse_spec",
    "register_quantizer",
]
