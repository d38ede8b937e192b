"""Profiling: what each op of a captured graph costs, and what that means on a device.

``costs`` holds the per-op cost formulas and their conventions; ``hardware`` holds device
profiles and energy tables (YAML data with sources) and the roofline and energy estimates;
``profiler.profile`` costs a whole model before and after quantization into a ``report.Report``.
"""

from stefx.profile.costs import Cost, CostSettings, cost_formula, cost_of, dtype_bits, register_cost
from stefx.profile.hardware import (
    EnergyTable,
    HardwareProfile,
    energy,
    hardware_names,
    load_energy_table,
    load_hardware,
    peak_ops,
    register_energy_table,
    register_hardware,
    resolve_energy_table,
    roofline_latency,
)
from stefx.profile.profiler import profile
from stefx.profile.report import LayerRow, Report

__all__ = [
    "Cost",
    "CostSettings",
    "EnergyTable",
    "HardwareProfile",
    "LayerRow",
    "Report",
    "cost_formula",
    "cost_of",
    "dtype_bits",
    "energy",
    "hardware_names",
    "load_energy_table",
    "load_hardware",
    "peak_ops",
    "profile",
    "register_cost",
    "register_energy_table",
    "register_hardware",
    "resolve_energy_table",
    "roofline_latency",
]
