"""Hardware profiles and energy tables, and the estimates drawn from them.

Peaks, bandwidths and energies are data: YAML files under ``stefx/profile/hardware/``, each
with its sources and assumptions (``a100``, ``h100``, ``h200``, ``cpu-x86`` and the
``horowitz45nm`` energy table, the default energy model). This module loads and validates
them, and turns a :class:`~stefx.profile.costs.Cost` into an estimate:

* :func:`peak_ops` - the dense ops/s of the best path for a bit width. Integer widths use
  the fastest integer path wide enough (``binary`` 1, ``int4``, ``int8``): w4a8 runs on int8,
  w3a3 on int4 where it exists, else int8. Wider integers, and unquantized ops, use the
  float path of ``float_bits`` (32 -> fp32, 16 -> bf16 then fp16, 8 -> fp8), falling back to
  a wider float dtype where a path is missing. One MAC counts as two ops, as vendors count.
* :func:`roofline_latency` - seconds per kernel from *achievable* rates, not datasheet ones::

      max(compute / (peak x matmul_fraction), bytes / (bandwidth x bandwidth_fraction))
        + launch_floor_s

  MACs run on the path above; other FLOPs (norms, softmax, elementwise) on the fp32 rate.
  The launch floor is *added*, not taken as a third term of the max: in eager PyTorch the
  host-side cost of an op (Python, dispatch, kernel launch) is paid before its kernel runs
  and is not hidden behind it, so a tiny op costs the floor plus its (tiny) execution.
  Zero-cost ops (views) launch nothing and get no floor. The bound is whichever of compute,
  memory or the launch floor is largest ("launch-bound": the op is overhead, not work).
* :func:`energy` - joules: MACs x (multiplier + adder energy) + other FLOPs x a float add
  + bytes moved x the memory level's energy per byte (DRAM by default).
* :func:`resolve_energy_table` - the table ``profile(energy=...)`` uses: the one asked for,
  else the device's own (``energy:`` in its YAML), else Horowitz 45 nm, labelled as such.

Achievable fractions and the launch floor are data too (``matmul_fraction``,
``bandwidth_fraction``, ``launch_floor_s`` in a device YAML, each with its source). A file
written by :func:`stefx.profile.calibrate.calibrate` holds measured rates, so its fractions
are 1.0.

Energy scaling for widths not in the table, anchored on the table's entries: a multiplier's
energy is proportional to the product of its operand widths (an array multiplier has
b_w x b_a partial products; Horowitz's int8 0.2 pJ x 16 = 3.2 ~ int32 3.1 pJ), an adder's
to its width (int8 0.03 pJ x 4 = 0.12 ~ int32 0.1 pJ); between two entries it is linear.
An integer MAC's accumulator is b_w + b_a bits wide (the product's width; ``acc_bits``
overrides it, e.g. 32 for int32 accumulation). A MAC is integer only when both operands
are quantized; weight-only quantization dequantizes and multiplies in float.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from stefx.errors import RecipeError, did_you_mean
from stefx.profile.costs import Cost
from stefx.registry import Registry

__all__ = [
    "DTYPES",
    "EnergyTable",
    "HardwareProfile",
    "energy",
    "energy_label",
    "hardware_names",
    "load_energy_table",
    "load_hardware",
    "mac_energy_pj",
    "peak_ops",
    "register_energy_table",
    "register_hardware",
    "resolve_energy_table",
    "roofline_latency",
]

DEFAULT_ENERGY = "horowitz45nm"

DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4", "binary")
_INT_PATHS = {"binary": 1, "int4": 4, "int8": 8}
_FLOAT_PATHS = {64: ("fp64", "fp32"), 32: ("fp32",), 16: ("bf16", "fp16", "fp32")}
_FLOAT_PATHS[8] = ("fp8", *_FLOAT_PATHS[16])


@dataclass(frozen=True)
class EnergyTable:
    """Energy per arithmetic op (pJ, keyed ``int8``/``fp32``...) and per byte moved."""

    name: str
    description: str
    sources: tuple[str, ...]
    add_pj: Mapping[str, float]
    mult_pj: Mapping[str, float]
    pj_per_byte: Mapping[str, float]  # memory level -> pJ per byte
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class HardwareProfile:
    """A device: dense peak ops/s per dtype (None: no such path), bandwidth, energy table,
    and what of those peaks real kernels achieve (fractions, a per-kernel launch floor).

    ``energy_is_default``: the YAML names no energy table, so ``energy`` is the Horowitz
    45 nm default (the report says so instead of presenting it as the device's own).
    """

    name: str
    description: str
    sources: tuple[str, ...]
    peak_ops: Mapping[str, float | None]
    memory_bandwidth: float  # bytes/s
    energy: EnergyTable
    assumptions: tuple[str, ...] = ()
    matmul_fraction: float = 1.0  # achieved / datasheet matmul rate
    bandwidth_fraction: float = 1.0  # achieved / datasheet memory bandwidth
    launch_floor_s: float = 0.0  # host-side cost of one kernel (eager PyTorch)
    energy_is_default: bool = False


_HARDWARE: Registry[HardwareProfile] = Registry(
    "hardware profile", check=lambda x: isinstance(x, HardwareProfile)
)
_ENERGY: Registry[EnergyTable] = Registry(
    "energy table", check=lambda x: isinstance(x, EnergyTable)
)
_builtins_loaded = False


def register_hardware(
    profile: HardwareProfile | str | os.PathLike[str], *, replace: bool = False
) -> HardwareProfile:
    """Make a profile (or a YAML file of one) loadable by name; duplicates are rejected."""
    if not isinstance(profile, HardwareProfile):
        profile = load_hardware(profile)
    _load_builtins()
    return _HARDWARE.add(profile.name, profile, replace=replace)


def register_energy_table(
    table: EnergyTable | str | os.PathLike[str], *, replace: bool = False
) -> EnergyTable:
    """Make an energy table (or a YAML file of one) loadable by name."""
    if not isinstance(table, EnergyTable):
        table = load_energy_table(table)
    _load_builtins()
    return _ENERGY.add(table.name, table, replace=replace)


def hardware_names() -> list[str]:
    _load_builtins()
    return _HARDWARE.names()


def load_hardware(name_or_path: HardwareProfile | str | os.PathLike[str]) -> HardwareProfile:
    """A registered profile by name (``"a100"``), one read from a YAML file, or a
    :class:`HardwareProfile` as is (e.g. what :func:`~stefx.profile.calibrate.calibrate`
    returns).

    An unknown name raises :class:`~stefx.errors.RecipeError` naming the nearest one.
    """
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    _load_builtins()
    path = _as_path(name_or_path)
    if path is None:
        return _HARDWARE.get(str(name_or_path))
    profile = _parse(_read_yaml(path), str(path))
    if not isinstance(profile, HardwareProfile):
        raise RecipeError(f"{path}: kind is 'energy'; load it with load_energy_table()")
    return profile


def load_energy_table(name_or_path: str | os.PathLike[str]) -> EnergyTable:
    """A registered energy table by name (``"horowitz45nm"``), or one read from YAML."""
    _load_builtins()
    path = _as_path(name_or_path)
    if path is None:
        return _ENERGY.get(str(name_or_path))
    table = _parse(_read_yaml(path), str(path))
    if not isinstance(table, EnergyTable):
        raise RecipeError(f"{path}: kind is 'device'; load it with load_hardware()")
    return table


# -- estimates ---------------------------------------------------------------------------


def peak_ops(profile: HardwareProfile, bits: float | None = None, *, float_bits: int = 32) -> float:
    """Dense ops/s of the best path holding ``bits``-wide integers (None: the float path)."""
    if bits is not None:
        fits = [profile.peak_ops.get(d) for d, width in _INT_PATHS.items() if width >= bits]
        fits = [p for p in fits if p]
        if fits:
            return max(fits)
    for dtype in _FLOAT_PATHS.get(float_bits, ("fp32",)):
        if profile.peak_ops.get(dtype):
            return float(profile.peak_ops[dtype])
    raise RecipeError(f"hardware profile {profile.name!r} has no float path for {float_bits} bits")


def _integer(w_bits: float | None, a_bits: float | None) -> float | None:
    """The integer width of a MAC, or None when an operand stays in float."""
    return None if w_bits is None or a_bits is None else max(w_bits, a_bits)


def roofline_latency(
    cost: Cost,
    profile: HardwareProfile,
    w_bits: float | None = None,
    a_bits: float | None = None,
    *,
    float_bits: int = 32,
) -> tuple[float, str]:
    """(seconds, "compute-bound" | "memory-bound" | "launch-bound") of one op: the larger
    of compute and memory time at the achievable rates, plus the launch floor per kernel
    (see the module docstring). A cost may say how many kernels it launches
    (``cost.kernels``, default 1; 0 for a view, an eval-mode no-op or an op fused into its
    neighbour)."""
    mac_ops = 2 * cost.macs
    rate = profile.matmul_fraction
    compute = mac_ops / (peak_ops(profile, _integer(w_bits, a_bits), float_bits=float_bits) * rate)
    compute += max(cost.flops - mac_ops, 0) / (peak_ops(profile, None, float_bits=32) * rate)
    memory = cost.bytes_moved / (profile.memory_bandwidth * profile.bandwidth_fraction)
    launch = profile.launch_floor_s * cost.kernels
    bound = "compute-bound" if compute > memory else "memory-bound"
    if launch > max(compute, memory):
        bound = "launch-bound"
    return max(compute, memory) + launch, bound


def resolve_energy_table(
    device: HardwareProfile, energy: EnergyTable | str | os.PathLike[str] | None = None
) -> EnergyTable:
    """The energy table a profile on ``device`` uses: ``energy`` when given (a name, a YAML
    path or a table), else the device's own table (``energy:`` in its YAML), else the
    Horowitz 45 nm default (``device.energy_is_default`` then says so)."""
    if energy is None:
        return device.energy
    if isinstance(energy, EnergyTable):
        return energy
    return load_energy_table(energy)


def energy_label(device: HardwareProfile, table: EnergyTable) -> str:
    """How a report names its energy table: the device's own, the default, or chosen."""
    if table is device.energy and not device.energy_is_default:
        return f"{table.name} (the {device.name} profile's own table)"
    if table.name == DEFAULT_ENERGY and (device.energy_is_default or table is device.energy):
        return (
            f"{table.name} (default: Horowitz 45 nm; {device.name} has no energy table of "
            "its own, so energy is the same on every device)"
        )
    return f"{table.name} (chosen with energy=)"


def _energy_table(hardware: HardwareProfile | EnergyTable | str) -> EnergyTable:
    if isinstance(hardware, HardwareProfile):
        return hardware.energy
    if isinstance(hardware, EnergyTable):
        return hardware
    _load_builtins()
    if hardware in _HARDWARE:
        return _HARDWARE.get(hardware).energy
    if hardware in _ENERGY:
        return _ENERGY.get(hardware)
    names = _HARDWARE.names() + _ENERGY.names()
    raise RecipeError(
        f"unknown hardware profile or energy table {hardware!r}{did_you_mean(hardware, names)}; "
        f"registered: {', '.join(names)}"
    )


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through ``points``; proportional to x below and above them."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1] * x / points[0][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1] * x / points[-1][0]


def _entries(table: Mapping[str, float], prefix: str) -> dict[int, float]:
    return {int(k[len(prefix) :]): v for k, v in table.items() if k.startswith(prefix)}


def mac_energy_pj(
    table: EnergyTable,
    w_bits: float | None = None,
    a_bits: float | None = None,
    *,
    float_bits: int = 32,
    acc_bits: float | None = None,
) -> float:
    """Energy of one multiply-accumulate in pJ, by the scaling rules in the module docstring."""
    bits = _integer(w_bits, a_bits)
    prefix = "fp" if bits is None else "int"
    mult, add = _entries(table.mult_pj, prefix), _entries(table.add_pj, prefix)
    if not mult or not add:
        raise RecipeError(f"energy table {table.name!r} has no {prefix}* add/mult entries")
    if bits is None:  # float MAC at float_bits (bf16 uses the fp16 entry)
        product, width = float_bits**2, float_bits
    else:
        product, width = w_bits * a_bits, acc_bits or w_bits + a_bits
    mult_pj = _interpolate([(b * b, e) for b, e in mult.items()], product)
    return mult_pj + _interpolate(list(add.items()), width)


def energy(
    cost: Cost,
    hardware: HardwareProfile | EnergyTable | str,
    w_bits: float | None = None,
    a_bits: float | None = None,
    *,
    float_bits: int = 32,
    memory: str = "dram",
    acc_bits: float | None = None,
) -> float:
    """Joules for one op: MACs, other FLOPs (as float adds) and bytes moved at ``memory``."""
    table = _energy_table(hardware)
    if memory not in table.pj_per_byte:
        hint = did_you_mean(memory, table.pj_per_byte)
        raise RecipeError(f"energy table {table.name!r} has no memory level {memory!r}{hint}")
    pj = cost.macs * mac_energy_pj(table, w_bits, a_bits, float_bits=float_bits, acc_bits=acc_bits)
    fadd = _interpolate(list(_entries(table.add_pj, "fp").items()), float_bits)
    pj += max(cost.flops - 2 * cost.macs, 0) * fadd
    pj += cost.bytes_moved * table.pj_per_byte[memory]
    return pj * 1e-12


# -- loading and validation --------------------------------------------------------------


def _as_path(name_or_path: str | os.PathLike[str]) -> Path | None:
    """A path when the argument names a YAML file; None when it is a registry name."""
    if isinstance(name_or_path, os.PathLike) or str(name_or_path).endswith((".yaml", ".yml")):
        return Path(name_or_path)
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"cannot read hardware file {str(path)!r}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    return data


def _field(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise RecipeError(f"{where}: missing field {key!r}")
    return data[key]


def _number(value: Any, where: str) -> float:
    try:  # YAML 1.1 reads '1e12' (no dot or sign) as a string: accept numeric strings
        number = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: expected a number, got {value!r}") from None
    if not number >= 0 or math.isinf(number):
        raise RecipeError(f"{where}: expected a finite number >= 0, got {value!r}")
    return number


def _sources(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    sources = _field(data, "sources", where)
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{where}: 'sources' must be a non-empty list of citations")
    return tuple(str(s) for s in sources)


_DEVICE_KEYS = (
    "name",
    "kind",
    "description",
    "sources",
    "assumptions",
    "peak_ops",
    "memory_bandwidth",
    "energy",
    "matmul_fraction",
    "bandwidth_fraction",
    "launch_floor_s",
    "calibration",
)
_ENERGY_KEYS = (
    "name",
    "kind",
    "description",
    "sources",
    "notes",
    "add_pj",
    "mult_pj",
    "memory_access_pj",
)


def _check_keys(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    """A misspelt field would be silently ignored (``matmul_fracton``): refuse it."""
    for key in data:
        if key not in known:
            raise RecipeError(
                f"{where}: unknown field {key!r}{did_you_mean(str(key), known)}; "
                f"known fields: {', '.join(known)}"
            )


def _fraction(data: Mapping[str, Any], key: str, where: str) -> float:
    """An achievable fraction: 0 < value <= 1 (1.0 when absent: the peak is achieved)."""
    value = data.get(key, 1.0)
    number = _number(value, f"{where}: {key}")
    if not 0 < number <= 1:
        raise RecipeError(
            f"{where}: {key} must be in (0, 1] (achieved rate / datasheet rate), got {value!r}; "
            "a measured rate goes in peak_ops or memory_bandwidth with the fraction 1.0"
        )
    return number


def _parse_energy(data: Mapping[str, Any], where: str) -> EnergyTable:
    _check_keys(data, _ENERGY_KEYS, where)
    tables = {}
    for key in ("add_pj", "mult_pj"):
        table = _field(data, key, where)
        tables[key] = {str(k): _number(v, f"{where}: {key}.{k}") for k, v in table.items()}
    access = dict(_field(data, "memory_access_pj", where))
    access_bytes = _number(access.pop("access_bits", 8), f"{where}: access_bits") / 8
    per_byte = {
        k: _number(v, f"{where}: memory_access_pj.{k}") / access_bytes for k, v in access.items()
    }
    return EnergyTable(
        name=str(_field(data, "name", where)),
        description=str(data.get("description", "")).strip(),
        sources=_sources(data, where),
        add_pj=MappingProxyType(tables["add_pj"]),
        mult_pj=MappingProxyType(tables["mult_pj"]),
        pj_per_byte=MappingProxyType(per_byte),
        notes=tuple(data.get("notes") or ()),
    )


def _parse_device(data: Mapping[str, Any], where: str) -> HardwareProfile:
    _check_keys(data, _DEVICE_KEYS, where)
    peaks: dict[str, float | None] = {}
    for dtype, value in dict(_field(data, "peak_ops", where)).items():
        if dtype not in DTYPES:
            hint = did_you_mean(dtype, DTYPES)
            raise RecipeError(f"{where}: unknown dtype {dtype!r} in peak_ops{hint}")
        peaks[dtype] = None if value is None else _number(value, f"{where}: peak_ops.{dtype}")
    if not peaks.get("fp32"):
        raise RecipeError(f"{where}: peak_ops.fp32 is required (every fallback ends there)")
    bandwidth = _number(_field(data, "memory_bandwidth", where), f"{where}: memory_bandwidth")
    if bandwidth <= 0:
        raise RecipeError(f"{where}: memory_bandwidth must be > 0 bytes/s")
    floor = _number(data.get("launch_floor_s", 0.0), f"{where}: launch_floor_s")
    if floor >= 0.1:
        raise RecipeError(
            f"{where}: launch_floor_s is {data['launch_floor_s']!r} seconds per kernel; "
            "expected microseconds (e.g. 5.0e-6), written in seconds"
        )
    return HardwareProfile(
        name=str(_field(data, "name", where)),
        description=str(_field(data, "description", where)).strip(),
        sources=_sources(data, where),
        peak_ops=MappingProxyType(peaks),
        memory_bandwidth=bandwidth,
        energy=_device_energy(data.get("energy"), where),
        assumptions=tuple(data.get("assumptions") or ()),
        matmul_fraction=_fraction(data, "matmul_fraction", where),
        bandwidth_fraction=_fraction(data, "bandwidth_fraction", where),
        launch_floor_s=floor,
        energy_is_default=data.get("energy") is None,
    )


def _device_energy(table: Any, where: str) -> EnergyTable:
    """A device's ``energy:`` field: absent (the default table), a registered name, or an
    inline table (the same fields as an energy YAML, ``kind`` optional)."""
    _load_builtins()
    if table is None:
        return _ENERGY.get(DEFAULT_ENERGY)
    if isinstance(table, dict):
        return _parse_energy({k: v for k, v in table.items() if k != "kind"}, f"{where}: energy")
    if str(table) not in _ENERGY:
        names = _ENERGY.names()
        raise RecipeError(
            f"{where}: energy: unknown energy table {table!r}{did_you_mean(str(table), names)}; "
            f"registered: {', '.join(names)} (register_energy_table() adds one, or write the "
            "table inline under energy:)"
        )
    return _ENERGY.get(str(table))


def _parse(data: Mapping[str, Any], where: str) -> HardwareProfile | EnergyTable:
    kind = data.get("kind", "device")
    if kind == "energy":
        return _parse_energy(data, where)
    if kind == "device":
        return _parse_device(data, where)
    raise RecipeError(f"{where}: kind must be 'device' or 'energy', got {kind!r}")


def _load_builtins() -> None:
    """Register the shipped YAML files once, energy tables first (devices refer to them)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    files = [f for f in resources.files("stefx.profile").joinpath("hardware").iterdir()]
    parsed = [(f.name, yaml.safe_load(f.read_text(encoding="utf-8"))) for f in files]
    parsed = [(name, d) for name, d in parsed if name.endswith(".yaml")]
    for name, data in sorted(parsed, key=lambda item: item[1].get("kind") != "energy"):
        item = _parse(data, f"stefx/profile/hardware/{name}")
        registry = _ENERGY if isinstance(item, EnergyTable) else _HARDWARE
        registry.add(item.name, item)
