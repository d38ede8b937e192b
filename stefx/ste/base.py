"""The quantizer base class: what every fake-quantizer module shares.

A quantizer maps a float tensor to a fake-quantized one of the same shape and dtype;
its backward is a surrogate gradient (the straight-through estimator). Subclasses
implement :meth:`Quantizer.quantize` and declare, as class attributes, the spec values
they accept — ``parse_spec`` validates against those declarations, so a new quantizer
type documents its own vocabulary.

Shared behaviour lives here: ``enabled`` (off = exact identity), ``strength`` λ in [0, 1]
for ramping (``y = x + λ·(q(x) − x)``), ``bits`` for the profiler, and lazy data-driven
initialisation of learned state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from stefx.errors import RecipeError, StefxError
from stefx.ste.granularity import Granularity
from stefx.ste.spec import QuantSpec

__all__ = ["Quantizer"]


class Quantizer(nn.Module):
    """Base class of every stefx quantizer.

    Class attributes a subclass sets (the first entry of each tuple is the default):

    - ``bits_choices``: accepted ``num_bits``; ``default_bits`` the default.
    - ``strategies``: accepted granularities (``tensor``, ``channel``, ``group``, ``token``).
    - ``scales``: accepted ways of finding the scale; ``default_scale(symmetric)`` picks one.
    - ``estimators``: accepted backward surrogates.
    - ``options``: extra spec keys -> default value (the default fixes the type).
    - ``allows_asymmetric``: whether ``symmetric: false`` is meaningful.
    - ``mixes_strength``: whether :meth:`quantize` applies the strength λ itself (the
      built-in types do, inside their one op); otherwise ``forward`` mixes
      ``x + λ·(quantize(x) - x)``.
    """

    type_name: ClassVar[str] = ""
    bits_choices: ClassVar[tuple[int, ...]] = (8,)
    default_bits: ClassVar[int | None] = None
    strategies: ClassVar[tuple[str, ...]] = ("tensor",)
    scales: ClassVar[tuple[str, ...]] = ("none",)
    estimators: ClassVar[tuple[str, ...]] = ("identity",)
    options: ClassVar[Mapping[str, Any]] = {}
    allows_asymmetric: ClassVar[bool] = False
    mixes_strength: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.default_bits is None:
            cls.default_bits = cls.bits_choices[0]

    @classmethod
    def default_scale(cls, symmetric: bool) -> str:
        return cls.scales[0]

    @classmethod
    def check_options(cls, options: dict[str, Any], where: str) -> None:
        """Hook for cross-field checks of per-type options; raise RecipeError on a fault."""

    @classmethod
    def check_scale(cls, scale: str, symmetric: bool, where: str) -> None:
        """Hook: reject a ``scale`` that contradicts ``symmetric``; raise RecipeError."""

    def __init__(self, spec: QuantSpec | Mapping[str, Any]) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            from stefx.ste.spec import parse_spec

            spec = parse_spec({"type": self.type_name, **spec})
        self.spec = spec
        self.enabled = spec.enabled
        # λ as a tensor the ops read (not in the state dict): see strength_arg
        self.register_buffer("_strength_t", torch.ones(()), persistent=False)
        self.strength = spec.strength
        self.granularity = Granularity(spec.strategy, spec.axis, spec.group_size)

    @property
    def bits(self) -> int:
        """Bit width of one stored code (what the profiler reads)."""
        return self.spec.num_bits

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise RecipeError(f"strength={value!r} is invalid; expected a number in [0, 1]")
        self._strength = float(value)
        # bools, not the float, are what forward branches on: torch.compile guards on them
        self._off, self._full = self._strength == 0.0, self._strength == 1.0
        self._sync_buffers()

    def strength_arg(self) -> torch.Tensor | None:
        """λ as the stefx ops take it: None for λ = 1, else a 0-dim tensor. Under
        ``torch.compile`` only λ = 1 versus λ < 1 is a guard, so a ramp does not
        recompile for every value."""
        return None if self._full else self._strength_t

    def _sync_buffers(self) -> None:
        """Write the Python-side settings into the buffers the ops read."""
        t = self.__dict__.get("_buffers", {}).get("_strength_t")
        if t is not None and not t.is_meta and hasattr(self, "_strength"):
            with torch.no_grad():
                t.fill_(self._strength)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._sync_buffers()  # a move to meta and back (to_empty) loses the values
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self._off:
            return x
        y = self.quantize(x)
        if not self._full and not self.mixes_strength:
            y = x + self._strength_t.to(y.dtype) * (y - x)
        return y

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized tensor, with the surrogate gradient attached (and, when
        ``mixes_strength``, already mixed with ``x`` by the strength λ)."""
        raise NotImplementedError

    def sharing_key(self) -> tuple | None:
        """A key equal for two quantizers exactly when they map every tensor to the same
        output (no learned or frozen state): the run time then quantizes a tensor that
        several modules read once. None (the default): never shared."""
        return None

    def _stateless_key(self, *extra: object) -> tuple:
        """The sharing key of a quantizer that is a pure function of its spec."""
        s = self.spec
        return (
            type(self),
            s.num_bits,
            s.strategy,
            s.axis,
            s.group_size,
            s.symmetric,
            s.scale,
            s.estimator,
            s.options,
            self.enabled,
            self._strength,
            *extra,
        )

    def init_from(self, x: torch.Tensor) -> None:
        """Initialise learned state (scales, offsets) from a sample tensor. Default: none."""

    def lazy_init(self, x: torch.Tensor) -> None:
        """:meth:`init_from` on the first tensor a forward brings (an activation's first
        batch). Not inside ``torch.compile``: run one eager forward first."""
        if torch.compiler.is_compiling():
            raise StefxError(
                f"{type(self).__name__}: its learned state is initialised from the first "
                "tensor it sees, which cannot happen inside torch.compile; run one eager "
                "forward (one batch) before compiling, or call init_from(sample) yourself"
            )
        with torch._C.DisableTorchFunction():  # not part of any module's counted calls
            self.init_from(x)

    def _shape_empty_parameter(self, name: str, state_dict: dict, prefix: str) -> None:
        """A lazily initialised parameter still empty when a checkpoint loads: give it the
        saved shape, so ``load_state_dict`` fills it instead of failing on the size."""
        saved = state_dict.get(prefix + name)
        param = getattr(self, name)
        if saved is not None and param.numel() == 0:
            param.data = torch.empty(saved.shape, dtype=param.dtype, device=param.device)

    def extra_repr(self) -> str:
        s = self.spec
        parts = [f"type={s.type}", f"bits={self.bits}", f"strategy={s.strategy}"]
        if s.group_size:
            parts.append(f"group_size={s.group_size}")
        if not s.symmetric:
            parts.append("symmetric=False")
        if s.scale and s.scale != "none":
            parts.append(f"scale={s.scale}")
        parts.append(f"estimator={s.estimator}")
        if not self.enabled:
            parts.append("enabled=False")
        if self._strength != 1.0:
            parts.append(f"strength={self._strength:g}")
        return ", ".join(parts)
