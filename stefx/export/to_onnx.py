"""ONNX export: integer weights behind ``DequantizeLinear``, activations as QDQ pairs.

``stefx.export(qmodel, "model.onnx", format="onnx", example_inputs=(x,))`` traces a
converted copy of the model with ``torch.onnx.export(..., dynamo=True)`` (opset 21) and
writes one ``.onnx`` file that ``onnxruntime`` runs:

- **weights** (``uniform`` or ``lsq``, 4- or 8-bit, per tensor, per channel or in groups)
  become integer initializers — INT8/UINT8, or INT4/UINT4 for 4-bit codes — with their
  scales (and zero points) feeding a ``DequantizeLinear``: per tensor, per axis
  (``axis``), or blocked (``axis`` + ``block_size``, opset 21; a ragged last group is
  ONNX's own short last block). The codes and scales are those :func:`stefx.convert`
  packs, so the dequantized weight is bit for bit the fake-quantized one stefx trained.
  A Linear's grouped weight is stored transposed, ``[in, out]`` with blocks along axis 0
  (MatMul's B), so onnxruntime fuses it into ``MatMulNBits``.
- **activations** (``uniform`` 8-bit, per tensor or per token, symmetric or with a zero
  point, dynamic or frozen) become ``QuantizeLinear`` → ``DequantizeLinear``. A dynamic
  scale is computed in the graph as stefx computes it (``ReduceMax(Abs(x)) / 127``, or the
  min/max range and its zero point); a frozen one is a constant. Per-token quantization
  runs on the ``(tokens, features)`` view with one scale per row (``axis=0``).

Rounding: ONNX's ``QuantizeLinear`` computes ``round_half_even(x / s)``, stefx (as
``torch.fake_quantize_*``) ``round_half_even(x · (1/s))``. The two products differ in the
last bit for a few inputs, so an activation code can land one step away where ``x / s``
sits within an ulp of a half: outputs then agree to a tolerance, not bit for bit (the
tests measure it), while every weight matches exactly.

Refused, naming the layer, the mismatch and a preset that fits (nothing is written):
weights that are binary, ternary, SEQ, DoReFa or not 4/8-bit; activation quantizers other
than 8-bit ``uniform`` with ``half_even`` rounding and float32 scales; a ramped quantizer
(strength < 1). ``strict=False`` re-quantizes the weights (binary, ternary and 2-bit codes
keep their scales in 4-bit codes, exactly; the rest are re-rounded per channel) and warns
with each layer's error; activation quantizers that do not fit are refused even then.
Hugging Face models export their logits (``use_cache=False``).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Mapping
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stefx.convert import ConvertError, PackedWeight

__all__ = ["OPSET", "QDQWeight", "write_onnx"]

#: the opset the file is written in: the first with INT4/UINT4 and blocked quantization
OPSET = 21

#: what ``write_onnx`` accepts in ``**options``
_OPTIONS = ("input_names", "output_names", "dynamic_shapes")

_FITS = "w8a8 (8-bit weights and activations), w4a8 or w4a16-g128 (4-bit weights)"


def _fail(where: str, problem: str, fix: str = f"a preset that fits: {_FITS}") -> ConvertError:
    return ConvertError(f"export onnx: {where}: {problem}; {fix}")


# -- the weight op: codes + scales -> DequantizeLinear ---------------------------------------


@torch.library.custom_op("stefx_onnx::dequantize_weight", mutates_args=())
def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int,
    block_size: int,
    num_bits: int,
    transposed: bool,
) -> torch.Tensor:
    """``(codes - zero_point) · scale`` in float32, with ONNX ``DequantizeLinear``'s layout
    of ``scale``: a scalar (per tensor), 1-D along ``axis`` (``block_size`` 0), or the
    codes' rank with ``ceil(n / block_size)`` along ``axis`` (blocked). ``num_bits`` is
    what the file stores the codes in (4: INT4/UINT4); ``transposed``: the codes are the
    2-D weight's transpose, and so is what comes back before the final ``.t()``."""
    s, z = scale, zero_point
    if block_size:
        n = codes.shape[axis]
        s = s.repeat_interleave(block_size, dim=axis).narrow(axis, 0, n)
        if z is not None:
            z = z.repeat_interleave(block_size, dim=axis).narrow(axis, 0, n)
    elif s.dim() == 1:
        shape = [1] * codes.dim()
        shape[axis] = -1
        s = s.reshape(shape)
        if z is not None:
            z = z.reshape(shape)
    values = codes.to(torch.float32)
    if z is not None:
        values = values - z.to(torch.float32)
    out = values * s
    return out.t().contiguous() if transposed else out


@dequantize_weight.register_fake
def _(codes, scale, zero_point, axis, block_size, num_bits, transposed):
    shape = codes.shape[::-1] if transposed else codes.shape
    return torch.empty(shape, dtype=torch.float32, device=codes.device)


def _dequantize_weight_onnx(codes, scale, zero_point, axis, block_size, num_bits, transposed):
    from onnxscript import opset21 as op

    if num_bits == 4:  # INT4/UINT4 initializers: folded by _store_int4 after tracing
        from onnxscript import ir

        signed = codes.dtype == ir.DataType.INT8
        codes = op.Cast(codes, to=22 if signed else 21)  # TensorProto.INT4 / UINT4
        if zero_point is not None:
            zero_point = op.Cast(zero_point, to=21)
    kwargs = {"axis": axis}
    if block_size:
        kwargs["block_size"] = block_size
    if zero_point is None:
        w = op.DequantizeLinear(codes, scale, **kwargs)
    else:
        w = op.DequantizeLinear(codes, scale, zero_point, **kwargs)
    return op.Transpose(w, perm=[1, 0]) if transposed else w


class QDQWeight(nn.Module):
    """Stands in for a :class:`~stefx.convert.PackedWeight` in the copy that is traced:
    its codes (int8/uint8, one per element) and scales laid out as ONNX's
    ``DequantizeLinear`` reads them; its forward is the dequantized weight, equal to the
    packed one (checked when it is built)."""

    enabled, _off, _full = True, False, True  # what the runtime's hooks read

    def __init__(self, packed: PackedWeight, where: str) -> None:
        super().__init__()
        s, shape = packed.spec, packed.weight_shape
        codes = packed.int_codes()
        unsigned = packed.zero_point is not None or packed.qmin >= 0
        lo, hi = (
            (0, 2**s.num_bits - 1)
            if unsigned
            else (-(2 ** (s.num_bits - 1)), 2 ** (s.num_bits - 1) - 1)
        )
        if codes.numel() and (codes.min() < lo or codes.max() > hi):
            raise _fail(
                where, f"its codes span [{codes.min()}, {codes.max()}], beyond {s.num_bits}-bit"
            )
        self.codes_dtype = torch.uint8 if unsigned else torch.int8
        self.num_bits, self.weight_dtype = s.num_bits, packed.weight_dtype
        gran = packed.granularity
        self.axis, self.block_size = 0, 0
        scale, zero = packed.scale, packed.zero_point
        if s.strategy == "tensor" or len(shape) == 0:
            scale = scale.reshape(())
            zero = None if zero is None else zero.reshape(())
        elif s.strategy == "channel":
            self.axis = gran._axis(len(shape))
        else:  # group: the row view's groups are (other dims..., blocks), blocks last
            self.axis, self.block_size = gran._axis(len(shape)), s.group_size
            moved = [n for i, n in enumerate(shape) if i != self.axis]
            blocks = -(-shape[self.axis] // s.group_size)
            scale = scale.reshape(*moved, blocks).movedim(-1, self.axis)
            if zero is not None:
                zero = zero.reshape(*moved, blocks).movedim(-1, self.axis)
        codes = codes.to(self.codes_dtype)
        # A Linear's grouped weight [out, in] is stored as [in, out] with blocks along axis
        # 0: the layout of MatMul's B, so onnxruntime's DequantizeLinear + MatMul fusion
        # (MatMulNBits) finds it once the two transposes cancel.
        self.transposed = s.strategy == "group" and len(shape) == 2 and self.axis == 1
        if self.transposed:
            codes, scale, self.axis = codes.t(), scale.t(), 0
            zero = None if zero is None else zero.t()
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer(
            "zero_point", None if zero is None else zero.to(torch.uint8).contiguous()
        )
        got = self()
        if not torch.equal(got, packed.dequantized()):  # never export another lattice
            raise _fail(
                where,
                "its DequantizeLinear form does not reproduce the packed weight",
                "report this as a stefx bug",
            )

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        w = dequantize_weight(
            self.codes,
            self.scale,
            self.zero_point,
            self.axis,
            self.block_size,
            self.num_bits,
            self.transposed,
        )
        return w if self.weight_dtype == torch.float32 else w.to(self.weight_dtype)


# -- the activation op: stefx.fake_quant -> QuantizeLinear / DequantizeLinear ----------------


def _fake_quant_onnx(
    x,
    scale,
    zero_point,
    num_bits,
    symmetric,
    strategy,
    axis,
    group_size,
    clip,
    signed_max,
    rounding,
    scale_dtype,
    strength,
):
    """QDQ for one stefx ``fake_quant`` call (checked supportable by :func:`_check_activation`
    before tracing); returns ``(y, empty mask)`` like the op."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset21 as op

    def const(value, dtype):
        return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    out_type = 3 if symmetric else 2  # TensorProto.INT8 / UINT8
    qmin, qmax = (-128, 127) if symmetric else (0, 255)
    per_token = strategy == "token"
    rows = x
    if per_token:  # (tokens, features): one scale per row, per-axis on axis 0
        rows = op.Reshape(x, op.Constant(value_ints=[-1, x.shape[-1]]))
    reduce_axes = op.Constant(value_ints=[1] if per_token else [0, 1])
    keep = 0
    if scale is None:  # dynamic: the statistics stefx computes, in float32
        flat = rows if per_token else op.Reshape(x, op.Constant(value_ints=[1, -1]))
        f = op.Cast(flat, to=1)
        eps = const(1e-12, np.float32)
        if symmetric:
            top = op.ReduceMax(op.Abs(f), reduce_axes, keepdims=keep)
            scale = op.Max(op.Div(top, const(127.0, np.float32)), eps)
        else:
            zero = const(0.0, np.float32)
            lo = op.Min(op.ReduceMin(f, reduce_axes, keepdims=keep), zero)
            hi = op.Max(op.ReduceMax(f, reduce_axes, keepdims=keep), zero)
            scale = op.Max(op.Div(op.Sub(hi, lo), const(255.0, np.float32)), eps)
            z = op.Sub(const(float(qmin), np.float32), op.Round(op.Div(lo, scale)))
            z = op.Clip(z, const(float(qmin), np.float32), const(float(qmax), np.float32))
            zero_point = op.Cast(z, to=out_type)
    else:  # frozen: the stored scale (one per tensor, or one per token row)
        shape = const([-1] if per_token else [], np.int64)
        scale = op.Reshape(op.Cast(scale, to=1), shape)
        zero_point = None if symmetric else op.Reshape(op.Cast(zero_point, to=out_type), shape)
    if not per_token:
        scale = op.Reshape(scale, const([], np.int64))
        if zero_point is not None:
            zero_point = op.Reshape(zero_point, const([], np.int64))
    scale = op.CastLike(scale, rows)
    if zero_point is None:
        zero_point = op.Cast(op.CastLike(const(0, np.int8), scale), to=out_type)
        if per_token:
            zero_point = op.Expand(zero_point, op.Shape(scale))
    q = op.QuantizeLinear(rows, scale, zero_point, axis=0)
    y = op.DequantizeLinear(q, scale, zero_point, axis=0)
    if per_token:
        y = op.Reshape(y, op.Shape(x))
    return y, const(np.zeros((0,), dtype=np.bool_), np.bool_)


# -- what can be exported ---------------------------------------------------------------------


def _check_weight(where: str, q: nn.Module) -> None:
    if isinstance(q, PackedWeight):
        spec = q.spec
    else:
        spec = q.spec
        if not q.enabled:
            return
        if not q._full:
            raise _fail(
                where,
                f"its weight quantizer is ramped (strength {q.strength:g})",
                "set strength 1 on every quantizer before exporting",
            )
    if spec.type not in ("uniform", "lsq"):
        raise _fail(
            where,
            f"its weights are {spec.type}, which ONNX QuantizeLinear/DequantizeLinear cannot "
            "express (integer codes of 4 or 8 bits on a uniform lattice)",
        )
    if spec.num_bits not in (4, 8):
        raise _fail(where, f"its weights are {spec.num_bits}-bit; ONNX stores int4 or int8 codes")
    if spec.strategy not in ("tensor", "channel", "group"):
        raise _fail(
            where,
            f"its weight scales are per {spec.strategy}; DequantizeLinear has per-tensor, "
            "per-axis or blocked scales",
        )


def _check_activation(where: str, q: nn.Module) -> None:
    from stefx.ste.uniform import UniformQuantizer

    spec = q.spec
    if not q.enabled or q._off:
        return
    fix = f"a preset that fits: {_FITS}"
    if type(q) is not UniformQuantizer:
        raise _fail(
            where,
            f"its activations are quantized by {spec.type}, ONNX QDQ holds uniform 8-bit",
            fix,
        )
    if spec.num_bits != 8:
        raise _fail(
            where, f"its activations are {spec.num_bits}-bit; ONNX QDQ activations are 8-bit", fix
        )
    if not q._full:
        raise _fail(
            where,
            f"its activation quantizer is ramped (strength {q.strength:g})",
            "set strength 1 on every quantizer before exporting",
        )
    if spec.strategy not in ("tensor", "token") or (
        spec.strategy == "token" and spec.axis not in (None, -1)
    ):
        raise _fail(
            where,
            f"its activations are quantized per {spec.strategy} (axis {spec.axis}); the export "
            "has per-tensor and last-axis per-token scales",
            fix,
        )
    if (
        spec.scale == "signed_absmax"
        or spec.options["rounding"] != "half_even"
        or spec.options["scale_dtype"] != "float32"
    ):
        raise _fail(
            where,
            f"its activation lattice uses scale {spec.scale!r}, rounding "
            f"{spec.options['rounding']!r}, scale_dtype {spec.options['scale_dtype']!r}; "
            "QuantizeLinear rounds half to even with float32 scales",
            fix,
        )


def _check(model: nn.Module) -> None:
    """Refuse, before anything is copied or written, what the file cannot hold."""
    from stefx.rewrite import STATE_ATTR, quantized_modules

    modules = quantized_modules(model)
    if not modules:
        raise ConvertError(
            f"export onnx: model={type(model).__name__} carries no stefx quantizers; run "
            "stefx.quantize(model, recipe) first (a float model exports with torch.onnx.export "
            "itself)"
        )
    for fqn, module in modules.items():
        state = module.__dict__[STATE_ATTR]
        for p, qname in state.weight_quantizers():
            _check_weight(f"{fqn}.{p}" if fqn else p, module._modules[qname])
        for qname in (state.input, state.output):
            if qname is not None:
                _check_activation(f"{fqn}.{qname}" if fqn else qname, module._modules[qname])
        if state.op_table:
            for name, q in module._modules["op_quantizers"].items():
                _check_activation(f"{fqn}.op_quantizers.{name}", q)


def _requantize_weights(model: nn.Module) -> None:
    """strict=False: put each weight ONNX cannot hold on a 4- or 8-bit per-channel lattice
    (binary, ternary and codes of fewer bits keep their scales: exact), and report."""
    from stefx.export.common import report_requantized, requantize, weight_layers

    report = {}
    for name, (module, p, qname, q, _) in weight_layers(model).items():
        try:
            _check_weight(name, q)
        except ConvertError:
            if not isinstance(q, PackedWeight) and not q._full:
                raise
            s = q.spec
            bits = 4 if s.type in ("binary", "ternary") or s.num_bits <= 4 else 8
            spec = {"type": "uniform", "num_bits": bits, "strategy": "channel", "symmetric": True}
            if s.strategy in ("tensor", "group"):  # ONNX has those scales too: keep them
                spec.update(strategy=s.strategy, axis=s.axis, group_size=s.group_size)
            err, rel = requantize(module, p, qname, spec)
            report[name] = (
                f"its codes and scales kept in {bits}-bit codes (exact)"
                if err == 0
                else f"re-quantized to {bits}-bit per {spec['strategy']}, max |Δ| {err:.3g}, "
                f"rel. RMS {rel:.3g}"
            )
    report_requantized("onnx", report)


# -- the traced copy --------------------------------------------------------------------------


class _Logits(nn.Module):
    """A Hugging Face model seen as ``inputs -> logits`` (no cache: one static graph)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        out = self.model(*args, use_cache=False, return_dict=True, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]


def _traced_copy(model: nn.Module) -> nn.Module:
    """A converted deep copy of ``model`` whose packed weights are :class:`QDQWeight`."""
    import stefx
    from stefx.convert import packed_weights

    work = copy.deepcopy(model)
    try:
        stefx.convert(work)  # skips weights packed already
    except ConvertError as e:
        raise ConvertError(f"export onnx: {e}") from None
    for name, (module, packed) in packed_weights(work).items():
        for qname, child in module._modules.items():
            if child is packed:
                module._modules[qname] = QDQWeight(packed, name)
    work.eval()
    if hasattr(work, "config") and hasattr(work, "save_pretrained"):
        return _Logits(work)
    return work


def _store_int4(proto) -> None:
    """Make each 4-bit weight's codes (and zero point) an INT4/UINT4 initializer named
    ``<module>.weight_quantizer.codes`` (``.zero_point``), like its 8-bit peers.

    The translation casts the int8/uint8 buffers to INT4/UINT4; torch.onnx's optimizer
    folds most of those casts into fresh ``val_*`` initializers, the rest are folded here.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    four = (TensorProto.INT4, TensorProto.UINT4)
    renamed, keep = {}, []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        src = node.input[0] if node.op_type == "Cast" and node.input else None
        if to in four and src in inits:
            values = numpy_helper.to_array(inits[src])
            nibbles = (values.reshape(-1).astype("int16") & 0xF).astype("uint8")
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(0))
            raw = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()  # first code: low 4 bits
            new = helper.make_tensor(node.output[0], to, values.shape, raw, raw=True)
            graph.initializer.append(new)
            inits[new.name] = new
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)  # (copies: the nodes are graph.node's from here on)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
        inits.pop(t.name, None)
    for node in graph.node:  # name the 4-bit codes and zero point after the scale beside them
        if node.op_type != "DequantizeLinear" or not node.input[1].endswith(".scale"):
            continue
        stem = node.input[1][: -len(".scale")]
        for i, role in ((0, "codes"), (2, "zero_point")):
            name = node.input[i] if i < len(node.input) else ""
            t = inits.get(name)
            if t is not None and t.data_type in four and name != f"{stem}.{role}":
                renamed[name] = f"{stem}.{role}"
    for t in graph.initializer:
        t.name = renamed.get(t.name, t.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)


def write_onnx(
    model: nn.Module,
    path: Path,
    *,
    example_inputs: tuple | Mapping | None,
    strict: bool = True,
    **options: Any,
) -> Path:
    """Write ``model`` (quantized by :func:`stefx.quantize`, converted or not) as one ONNX
    file at ``path``; returns the path. ``example_inputs``: a tuple of positional inputs or
    a dict of keyword inputs the model is traced with. ``options``: ``input_names``,
    ``output_names``, ``dynamic_shapes`` (passed to ``torch.onnx.export``). The model passed
    is left as it is; on any refusal nothing is written."""
    from stefx.api import target_of

    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConvertError(f"export onnx: no options {unknown}; the format takes {list(_OPTIONS)}")
    if example_inputs is None:
        raise ConvertError(
            "export onnx: example_inputs=None: torch.onnx traces the model; pass "
            "example_inputs=(x,) (or a dict of keyword inputs) shaped like what the consumer will "
            "feed"
        )
    if not isinstance(example_inputs, (tuple, Mapping)):
        raise ConvertError(
            f"export onnx: example_inputs is a {type(example_inputs).__name__}; pass a tuple of "
            "positional inputs or a dict of keyword inputs"
        )
    if not isinstance(model, nn.Module):
        raise ConvertError(f"export onnx: model={type(model).__name__} is not a torch.nn.Module")
    base = target_of(model)
    if not strict:
        base = copy.deepcopy(base)
        _requantize_weights(base)
    _check(base)
    traced = _traced_copy(base)
    args, kwargs = (
        (example_inputs, None) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    )
    table = {
        torch.ops.stefx.fake_quant.default: _fake_quant_onnx,
        torch.ops.stefx_onnx.dequantize_weight.default: _dequantize_weight_onnx,
    }
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                traced,
                args,
                kwargs=kwargs,
                dynamo=True,
                opset_version=OPSET,
                custom_translation_table=table,
                verbose=False,
                **options,
            )
    except Exception as e:  # the exporter's own errors are many types
        raise ConvertError(
            f"export onnx: torch.onnx could not trace {type(base).__name__}: {type(e).__name__}: "
            f"{e}"
        ) from e
    proto = program.model_proto
    _store_int4(proto)
    import onnx

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(proto, str(path))
    except (OSError, ValueError) as e:
        raise ConvertError(f"export onnx: cannot write {str(path)!r}: {e}") from None
    return path
