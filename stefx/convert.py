"""Convert a fake-quantized model into real low-bit weights.

``stefx.convert(qmodel)`` replaces every fake-quantized weight by its integer codes,
packed (8 per byte for binary, 4 for 2-bit and ternary, 2 for 3- and 4-bit, 1 for 8-bit),
and one scale (and, for an asymmetric lattice, one zero point) per scale group. The
module computes with the weight dequantized on the fly, ``(code - zero) · scale``, which
is bit for bit the fake-quantized weight it trained with: convert recovers each code from
the quantizer's own output and checks that the codes give that output back exactly, so a
lattice it cannot store is refused, never approximated. Activation quantizers stay as
they are (the runtime would compute them anyway).

A BatchNorm that the recipe folded into a conv or Linear (``fold_bn``) is folded for
good: the packed weight is ``q(w·γ/σ)``, the BatchNorm's shift becomes the layer's bias,
and the BatchNorm module becomes an ``nn.Identity`` (its running statistics are frozen
from then on). Everything else — the model's class, ``generate``, the other modules —
stays; the state dict holds ``<module>.weight_quantizer.codes`` / ``.scale`` /
``.zero_point`` in place of ``<module>.weight``.

Convertible: ``uniform`` (any granularity, symmetric or not, dynamic or frozen scales),
``lsq``, ``binary`` and ``ternary`` (``absmean`` / ``twn``). Not (yet): ``lsq+`` (a float
offset), ``seq`` and ternary ``scale: seq`` (non-integer levels), ``dorefa``, weights
quantized per call (a weight that two ops read with different specs); convert names each
such layer and changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stefx.errors import StefxError
from stefx.ste.base import Quantizer
from stefx.ste.functions import wide
from stefx.ste.uniform import code_range

__all__ = [
    "ConvertError",
    "PackedWeight",
    "convert",
    "converted_weights",
    "pack",
    "packed_slots",
    "packed_weights",
    "unpack",
]


class ConvertError(StefxError, ValueError):
    """A weight stefx cannot store as packed integer codes (the model is left unchanged)."""


#: stored bits per code for a lattice of ``num_bits`` (3-bit codes take a 4-bit slot)
_SLOT = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (< 2**bits) into a flat uint8 tensor, ``8 // bits`` per byte, the
    first code in the lowest bits.

    >>> pack(torch.tensor([1, 2, 3, 0, 3]), 2)
    tensor([57,  3], dtype=torch.uint8)
    """
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.reshape(-1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    return (lanes << shifts).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes, as uint8.

    >>> unpack(pack(torch.tensor([1, 2, 3, 0, 3]), 2), 2, 5)
    tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    """
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel]


@dataclass
class _Lattice:
    """``value = (code - zero) · scale`` per scale group; codes in [qmin, qmax]."""

    scale: torch.Tensor  # (G,)
    zero: torch.Tensor | None  # (G,) integer, or None for 0
    qmin: int
    qmax: int


def _lattice(q: Quantizer, rows: torch.Tensor, where: str) -> _Lattice:
    """The integer lattice ``q`` quantizes ``rows`` (its row view of one weight) onto."""
    from stefx.ste.binary import BinaryQuantizer, _absmean
    from stefx.ste.lsq import LSQQuantizer
    from stefx.ste.ternary import TWN_DELTA_FACTOR, TernaryQuantizer, twn_alpha
    from stefx.ste.uniform import UniformQuantizer, stored_scale

    s = q.spec
    if type(q) is UniformQuantizer:
        scale, zero = q.qparams(rows)
        qmin, qmax = code_range(s.num_bits, s.symmetric)
        scale = stored_scale(scale, s.options["scale_dtype"])
        return _Lattice(scale, None if s.symmetric else zero, qmin, qmax)
    if type(q) is LSQQuantizer:
        return _Lattice(q.scale.detach().float().clamp_min(1e-12), None, q.qmin, q.qmax)
    if type(q) is BinaryQuantizer:
        if q._learns_threshold:
            raise ConvertError(f"{where}: a binary weight with a learned threshold τ")
        if s.scale == "none":
            return _Lattice(torch.ones(rows.shape[0], dtype=rows.dtype), None, -1, 1)
        return _Lattice(_absmean(rows), None, -1, 1)
    if type(q) is TernaryQuantizer and s.scale in ("absmean", "twn"):
        mag = wide(rows).abs()
        if s.scale == "absmean":
            a = mag.mean(dim=1)
        else:
            a = twn_alpha(mag, mag > TWN_DELTA_FACTOR * mag.mean(dim=1, keepdim=True))[:, 0]
        return _Lattice(stored_scale(a, s.options["scale_dtype"]), None, -1, 1)
    raise ConvertError(
        f"{where}: a {s.type} quantizer (scale {s.scale!r}) has no integer lattice stefx can "
        "pack yet (convertible: uniform, lsq, binary, ternary absmean/twn); keep this layer "
        "fake-quantized by leaving it out of the recipe, or dequantize it"
    )


def _qmin(q: Quantizer) -> int:
    """The lowest code of ``q``'s lattice (binary: -1, stored as bit 0)."""
    if q.spec.type in ("binary", "ternary"):
        return -1
    if hasattr(q, "qmin"):  # lsq
        return q.qmin
    return code_range(q.spec.num_bits, q.spec.symmetric)[0]


class PackedWeight(Quantizer):
    """A weight stored as packed codes plus per-group scales; its forward returns the
    dequantized weight (bit-exact to the fake-quantized one it replaced), whatever it is
    given. It takes the place of the weight's quantizer, so the runtime that swapped the
    fake-quantized weight in for each forward now swaps this one in."""

    def __init__(self, spec, shape: torch.Size, dtype: torch.dtype, qmin: int) -> None:
        super().__init__(spec)
        self.weight_shape, self.weight_dtype, self.qmin = torch.Size(shape), dtype, qmin
        groups = self.granularity.num_groups(self.weight_shape)
        self.slot = _SLOT[spec.num_bits]
        codes = math.ceil(self.weight_shape.numel() * self.slot / 8)
        self.register_buffer("codes", torch.zeros(codes, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(groups, dtype=torch.float32))
        if not spec.symmetric:
            self.register_buffer("zero_point", torch.zeros(groups, dtype=torch.uint8))
        else:
            self.zero_point = None

    @torch.no_grad()
    def store(self, codes: torch.Tensor, lattice: _Lattice) -> None:
        """``codes``: the row view's integer codes; packed in the weight's own element
        order (a ragged group's padding is not stored)."""
        u = (codes > 0) if self.spec.type == "binary" else codes - self.qmin  # ±1 -> 1 bit
        self.codes = pack(self.granularity.unrows(u, self.weight_shape), self.slot)
        self.scale = lattice.scale.reshape(-1).clone()
        if lattice.zero is not None:
            self.zero_point = lattice.zero.reshape(-1).to(torch.uint8)

    def int_codes(self) -> torch.Tensor:
        """The integer codes, shaped like the weight (binary: ±1; asymmetric: before the
        zero point is taken off)."""
        u = unpack(self.codes, self.slot, self.weight_shape.numel()).to(torch.int32)
        codes = 2 * u - 1 if self.spec.type == "binary" else u + self.qmin
        return codes.reshape(self.weight_shape)

    def dequantized(self) -> torch.Tensor:
        # a ragged group's padding is code 0 here and dropped again by unrows
        codes = self.granularity.rows(self.int_codes().to(self.scale.dtype))
        if self.zero_point is not None:
            codes = codes - self.zero_point.to(codes.dtype).unsqueeze(1)
        rows = (codes * self.scale.unsqueeze(1)).to(self.weight_dtype)
        return self.granularity.unrows(rows, self.weight_shape)  # drops ragged padding

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.dequantized()

    def sharing_key(self) -> tuple | None:
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed={self.slot}-bit, shape={tuple(self.weight_shape)}"


def _codes(q: Quantizer, x: torch.Tensor, where: str) -> tuple[torch.Tensor, _Lattice]:
    """Integer codes (row view) of weight ``x`` under ``q``, checked to reproduce ``q(x)``."""
    if not q._full:  # a disabled quantizer never gets here: its weight stays float
        raise ConvertError(
            f"{where}: its quantizer is ramped (strength {q.strength:g}); convert stores the "
            "fully quantized weight: set strength 1 on every weight quantizer first"
        )
    gran = q.granularity
    with torch.no_grad():
        fake = gran.rows(q(x))
        rows = gran.rows(x)
        lat = _lattice(q, rows, where)
        scale = lat.scale.to(wide(fake).dtype).unsqueeze(1)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round(wide(fake) / safe)
        if lat.zero is not None:
            codes = codes + lat.zero.to(codes.dtype).unsqueeze(1)
        codes = codes.clamp(lat.qmin, lat.qmax)
        back = codes if lat.zero is None else codes - lat.zero.to(codes.dtype).unsqueeze(1)
        back = (back * scale).to(x.dtype)
        if not torch.equal(back, fake):
            bad = (back != fake).sum().item()
            raise ConvertError(
                f"{where}: {bad} of {fake.numel()} values of the fake-quantized weight are "
                f"not (code - zero) · scale on the {q.spec.type} lattice; nothing was converted"
            )
    lat.scale = lat.scale.float()
    return codes.to(torch.int16), lat


def packed_weights(model: nn.Module) -> dict[str, tuple[nn.Module, PackedWeight]]:
    """FQN of each weight of ``model`` stored packed -> (the module that reads it, its
    :class:`PackedWeight`)."""
    from stefx.rewrite import STATE_ATTR, quantized_modules

    out = {}
    for fqn, module in quantized_modules(model).items():
        for p, qname in module.__dict__[STATE_ATTR].swaps.items():
            packed = module._modules.get(qname)
            if isinstance(packed, PackedWeight):
                out[f"{fqn}.{p}" if fqn else p] = (module, packed)
    return out


def packed_slots(model: nn.Module) -> list[tuple[nn.Module, str, PackedWeight]]:
    """(the module whose ``_parameters`` holds the weight's empty slot, the key there, its
    :class:`PackedWeight`) for each weight of ``model`` stored packed."""
    from stefx.rewrite import STATE_ATTR, quantized_modules
    from stefx.runtime import param_slot

    out = []
    for module in quantized_modules(model).values():
        for p, qname in module.__dict__[STATE_ATTR].swaps.items():
            packed = module._modules.get(qname)
            if isinstance(packed, PackedWeight):
                out.append((*param_slot(module, p), packed))
    return out


def converted_weights(model: nn.Module) -> list[str]:
    """FQNs of the weights of ``model`` stored packed (what :func:`stefx.save` records)."""
    return list(packed_weights(model))


def convert(model: nn.Module, *, only: list[str] | None = None, layout: bool = False) -> nn.Module:
    """Replace every fake-quantized weight of a stefx-quantized ``model`` by packed integer
    codes and scales (in place; the model is returned). Outputs are those of the
    fake-quantized model in eval mode; a BatchNorm the recipe folded is folded for good.
    ``only``: convert just these weights (FQNs); ``layout``: build the packed storage with
    zeros, without computing codes (for loading a converted checkpoint into it).

    >>> import torch, stefx
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 8))
    >>> q = stefx.quantize(net, "w4a16-g128", (torch.randn(2, 64),), report=False).eval()
    >>> x = torch.randn(3, 64)
    >>> before = q(x)
    >>> torch.equal(stefx.convert(q)(x), before), q[0].weight is None
    (True, True)
    """
    from stefx.api import _hf_plugin, target_of
    from stefx.rewrite import STATE_ATTR, quantized_modules
    from stefx.runtime import param_slot

    if not isinstance(model, nn.Module):
        raise ConvertError(
            f"convert: model={type(model).__name__} is not a torch.nn.Module; pass the model "
            "stefx.quantize returned"
        )
    base = target_of(model)
    modules = quantized_modules(base)
    if not modules and isinstance(base, torch.fx.GraphModule):
        raise ConvertError(
            "convert: a GraphModule from quantize(..., as_graph=True) holds its quantizers "
            "as graph nodes; convert the model quantize returns by default (as_graph=False)"
        )
    if not modules:
        raise ConvertError(
            f"convert: {type(model).__name__} carries no stefx quantizers; run "
            "stefx.quantize(model, recipe) first"
        )
    names = {id(m): n for n, m in base.named_modules()}
    work = []  # everything computed before anything changes: no half-converted model
    seen: set[str] = set()
    for fqn, module in modules.items():
        state = module.__dict__[STATE_ATTR]
        if state.call_weights:
            raise ConvertError(
                f"{fqn}: weight(s) {sorted({w for t in state.call_weights.values() for w in t})} "
                "are quantized per call (two ops read them with different specs); convert "
                "cannot store one packed copy for both yet"
            )
        for p, qname in state.swaps.items():
            q = module._modules[qname]
            where = f"{fqn}.{p}" if fqn else p
            seen.add(where)
            if isinstance(q, PackedWeight) or not q.enabled:
                continue  # converted already, or left float on purpose
            if only is not None and where not in only:
                continue
            w = module.get_parameter(p).detach()
            fold = state.fold.get(p)
            if layout:
                work.append((module, state, p, qname, q, w, fold, None, None))
                continue
            x = w
            if fold is not None:
                from stefx.runtime import fold_scale

                x = w * fold_scale(*fold, w)
            codes, lat = _codes(q, x, where)
            work.append((module, state, p, qname, q, w, fold, codes, lat))
    unknown = sorted(set(only or ()) - seen)
    if unknown:
        raise ConvertError(
            f"convert: only= names {unknown} are not fake-quantized weights of this model; "
            f"its quantized weights are e.g. {sorted(seen)[:3]}"
        )
    for module, state, p, qname, q, w, fold, codes, lat in work:
        packed = PackedWeight(q.spec, w.shape, w.dtype, _qmin(q)).to(w.device)
        if lat is not None:
            packed.store(codes, lat)
        module._modules[qname] = packed
        owner, key = param_slot(module, p)
        owner._parameters[key] = None  # the runtime swaps the dequantized weight in
        if fold is not None:
            _fold_for_good(base, names, module, state, p, fold, values=not layout)
    hf = None if layout else _hf_plugin(base)
    if hf is not None:  # save_pretrained records which weights are packed
        hf.attach_config(base)
    return model


@torch.no_grad()
def _fold_for_good(base, names, module, state, p, fold, values: bool = True) -> None:
    """conv(x, q(w·s)/s) then BatchNorm(eval) == conv(x, q(w·s)) + (β - μ·s + b·s):
    the layer takes that bias and the BatchNorm becomes an identity."""
    from stefx.runtime import fold_scale

    bn, axis = fold
    if not values:  # the bias comes from a checkpoint
        if module.bias is None:
            module.bias = nn.Parameter(bn.running_mean.new_zeros(bn.num_features))
        parent_name, _, child = names[id(bn)].rpartition(".")
        (base.get_submodule(parent_name) if parent_name else base)._modules[child] = nn.Identity()
        del state.fold[p]
        return
    weight_like = torch.empty([1] * (axis + 1), device=bn.running_mean.device)
    s = fold_scale(bn, axis, weight_like).reshape(-1)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(s)
    bias = shift - bn.running_mean * s
    if module.bias is not None:
        bias = bias + module.bias.detach() * s
    dtype = module._modules[state.swaps[p]].weight_dtype
    module.bias = nn.Parameter(bias.to(dtype))
    parent_name, _, child = names[id(bn)].rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    parent._modules[child] = nn.Identity()
    del state.fold[p]
