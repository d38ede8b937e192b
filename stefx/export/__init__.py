"""Export a stefx-quantized model to a format another runtime loads.

``stefx.export(qmodel, path, format=...)``. Each format writes what its consumer reads,
from the packed weights :func:`stefx.convert` makes (a copy is converted; the model passed
is left as it is), so the consumer computes with exactly the weights stefx trained; a
layer whose lattice the format cannot hold is refused, naming the layer, the mismatch and
the preset that fits, never re-quantized behind the user's back (``strict=False``
re-quantizes such a layer onto the format's lattice and reports each one's error).

- ``"gguf"``: one GGUF file (llama.cpp; see :mod:`stefx.export.to_gguf`) for a Llama-family
  model: ``Q4_0``, ``Q8_0``, ``TQ2_0``/``TQ1_0`` weights bit for bit from the presets
  ``gguf-q4_0``, ``gguf-q8_0``, ``gguf-tq2_0``; float tensors as F16 (or F32).

- ``"onnx"``: one ONNX file (opset 21, :mod:`stefx.export.to_onnx`) for ``onnxruntime``:
  4- and 8-bit integer weights behind ``DequantizeLinear`` (per tensor, per channel,
  blocked), 8-bit activations as ``QuantizeLinear``/``DequantizeLinear`` pairs with their
  scales computed in the graph; weights exact, activations to float tolerance (ONNX
  divides by the scale where stefx multiplies by its reciprocal). Needs
  ``example_inputs``.

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

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from stefx.convert import ConvertError

__all__ = ["FORMATS", "export"]

FORMATS = ("gguf", "compressed-tensors", "hf-bitnet", "onnx")


def export(
    model: nn.Module,
    path: str | Path,
    format: str,
    *,
    strict: bool = True,
    example_inputs: tuple | None = None,
    **options: Any,
) -> Path:
    """Write ``model`` (quantized by :func:`stefx.quantize`, converted or not) to ``path``
    in ``format``; returns the path. Raises :class:`~stefx.convert.ConvertError` for a layer
    the format cannot hold (nothing is written); with ``strict=False`` such a layer is
    re-quantized onto the format's own lattice and each one's error reported in a
    :class:`~stefx.RequantizedWarning` (codes that fit a wider lattice with the same scales
    are kept exactly: binary, ternary or 2-bit codes as int4).
    ``example_inputs``: what ONNX traces the model with. ``options``: the format's own
    (GGUF: ``ternary="tq2_0"|"tq1_0"``, ``float_type="f16"|"f32"``)."""
    if format not in FORMATS:
        raise ConvertError(f"export: unknown format {format!r}; choose one of {FORMATS}")
    path = Path(path)
    if format == "gguf":
        from stefx.export.to_gguf import write_gguf

        return write_gguf(model, path, strict=strict, **options)
    if format == "onnx":
        from stefx.export.to_onnx import write_onnx

        return write_onnx(model, path, example_inputs=example_inputs, strict=strict, **options)
    if options or example_inputs is not None:
        extra = sorted(options) + ([] if example_inputs is None else ["example_inputs"])
        raise ConvertError(f"export {format}: no options {extra} for this format")
    from stefx.export.hf_formats import write_bitnet, write_compressed_tensors

    if format == "hf-bitnet":
        return write_bitnet(model, path, strict)
    return write_compressed_tensors(model, path, strict)
