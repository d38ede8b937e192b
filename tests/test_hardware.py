"""Hardware profiles: shipped data loads with sources; roofline and energy by hand."""

from __future__ import annotations

import pytest

from stefx.capture.graph import OpNode
from stefx.errors import StefxError
from stefx.profile import hardware as hw
from stefx.profile.costs import Cost, cost_of
from stefx.profile.hardware import (
    energy,
    hardware_names,
    load_energy_table,
    load_hardware,
    mac_energy_pj,
    peak_ops,
    register_energy_table,
    register_hardware,
    roofline_latency,
)

PJ = 1e-12


def linear(tokens: int, n_in: int, n_out: int) -> OpNode:
    """A module-call Linear node, as capture records it."""
    return OpNode(
        "fc", "linear", "Linear", module="fc", module_type="Linear",
        params={"weight": "fc.weight"}, param_shapes={"weight": (n_out, n_in)},
        input_shapes=((tokens, n_in),), output_shape=(tokens, n_out),
    )  # fmt: skip


DEVICE_YAML = """
name: {name}
kind: device
description: a test device
sources: [https://example.org/datasheet]
peak_ops: {{fp32: 1e12, bf16: 2.0e+12, int8: 4e12, int4: null}}
memory_bandwidth: 1e11
energy: horowitz45nm
"""


@pytest.mark.parametrize("name", ["a100", "h100", "h200", "cpu-x86"])
def test_shipped_profiles_load_with_sources(name):
    p = load_hardware(name)
    assert p.name == name and p.description and p.sources and p.assumptions
    assert all(s.strip() for s in p.sources)
    assert p.peak_ops["fp32"] > 0 and p.memory_bandwidth > 0
    assert set(p.peak_ops) >= {"fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4", "binary"}
    assert p.energy is load_energy_table("horowitz45nm") and p.energy_is_default
    assert name in hardware_names()
    # achievable rates, each with its source among the assumptions
    assert 0 < p.matmul_fraction < 1 and 0 < p.bandwidth_fraction < 1
    assert 1e-6 <= p.launch_floor_s <= 1e-5
    for field in ("matmul_fraction", "bandwidth_fraction", "launch_floor_s"):
        assert any(field in a for a in p.assumptions)


def test_horowitz_table_matches_the_paper():
    t = load_energy_table("horowitz45nm")
    assert "10.1109/ISSCC.2014.6757323" in " ".join(t.sources)
    assert dict(t.add_pj) == {"int8": 0.03, "int32": 0.1, "fp16": 0.4, "fp32": 0.9}
    assert dict(t.mult_pj) == {"int8": 0.2, "int32": 3.1, "fp16": 1.1, "fp32": 3.7}
    # per 64-bit access: 8 KB SRAM 10 pJ, DRAM 1.3-2.6 nJ -> per byte
    assert t.pj_per_byte["sram_8kb"] == 10 / 8
    assert (t.pj_per_byte["dram"], t.pj_per_byte["dram_high"]) == (1300 / 8, 2600 / 8)


def test_peak_ops_picks_the_best_path_that_holds_the_width():
    a100, h100, cpu = load_hardware("a100"), load_hardware("h100"), load_hardware("cpu-x86")
    assert peak_ops(a100, 8) == 624e12
    assert peak_ops(a100, 4) == peak_ops(a100, 3) == 1248e12  # int4 exists on Ampere
    assert peak_ops(a100, 1) == 4992e12
    assert peak_ops(h100, 4) == 1978.9e12  # Hopper has no int4: the int8 path
    assert peak_ops(cpu, 2) == 20.48e12  # VNNI int8
    assert peak_ops(a100, 12) == 19.5e12  # no int16 path: float at float_bits
    assert peak_ops(a100) == 19.5e12 and peak_ops(a100, None, float_bits=16) == 312e12
    assert peak_ops(a100, None, float_bits=8) == 312e12  # no fp8 on Ampere: bf16
    assert peak_ops(h100, None, float_bits=8) == 1978.9e12


def test_roofline_compute_bound_matmul_by_hand():
    # 4096^3 bf16 mm on an A100: 2 x 4096^3 ops at 312 TFLOP/s x 0.859 achievable, plus
    # the 5 us launch floor; memory: 3 x 4096^2 x 2 bytes at 2.039e12 x 0.9
    n = 4096
    c = cost_of(
        OpNode("mm", "mm", "mm", input_shapes=((n, n), (n, n)), output_shape=(n, n)), float_bits=16
    )
    seconds, bound = roofline_latency(c, load_hardware("a100"), float_bits=16)
    assert bound == "compute-bound"
    assert seconds == pytest.approx(2 * n**3 / (312e12 * 0.859) + 5e-6, rel=1e-12)
    assert c.bytes_moved / (2.039e12 * 0.9) < seconds


def test_roofline_memory_bound_gemv_and_integer_path():
    # batch-1 Linear 4096 -> 4096, int8 weights and activations on an H100
    n = 4096
    op = linear(1, n, n)
    c = cost_of(op, w_bits=8, a_bits=8, out_bits=16)
    h100 = load_hardware("h100")
    seconds, bound = roofline_latency(c, h100, 8, 8)
    assert bound == "memory-bound"
    assert seconds == pytest.approx((n * n + n + 2 * n) / (3.35e12 * 0.9) + 5e-6, rel=1e-12)
    assert 2 * n * n / 1978.9e12 < seconds  # the int8 compute time it hides


def test_roofline_non_mac_flops_use_the_fp32_rate(tmp_path):
    c = Cost(flops=1_000_000, macs=0, act_in_bytes=1.0)
    seconds, bound = roofline_latency(c, load_hardware("a100"), float_bits=16)
    assert (seconds, bound) == (pytest.approx(1e6 / (19.5e12 * 0.859) + 5e-6), "launch-bound")
    path = tmp_path / "ideal.yaml"  # datasheet rates achieved, no launch floor
    path.write_text(DEVICE_YAML.format(name="ideal"))
    seconds, bound = roofline_latency(c, load_hardware(path))
    assert (seconds, bound) == (pytest.approx(1e6 / 1e12), "compute-bound")


def test_launch_floor_is_added_per_kernel_and_views_launch_nothing(tmp_path):
    path = tmp_path / "floor.yaml"
    path.write_text(
        DEVICE_YAML.format(name="floor")
        + "matmul_fraction: 0.5\nbandwidth_fraction: 0.25\nlaunch_floor_s: 4.0e-6\n"
    )
    device = load_hardware(path)
    assert (device.matmul_fraction, device.bandwidth_fraction) == (0.5, 0.25)
    big = Cost(flops=2e9, macs=1e9, act_in_bytes=1e6)  # 2 ms at 1e12 x 0.5
    assert roofline_latency(big, device) == (pytest.approx(4e-3 + 4e-6), "compute-bound")
    moving = Cost(act_in_bytes=1e6)  # 1e6 / (1e11 x 0.25) = 40 us
    assert roofline_latency(moving, device) == (pytest.approx(40e-6 + 4e-6), "memory-bound")
    view = Cost(status="ignored", kernels=0)  # a view launches nothing
    assert roofline_latency(view, device) == (0.0, "memory-bound")
    eager = Cost(status="ignored", kernels=1)  # the same view dispatched by eager PyTorch
    assert roofline_latency(eager, device) == (pytest.approx(4e-6), "launch-bound")


ENERGY_TABLE = """
  name: {name}
  description: a test table
  sources: [https://example.org/energy]
  add_pj: {{int8: 0.01, int32: 0.05, fp16: 0.2, fp32: 0.4}}
  mult_pj: {{int8: 0.1, int32: 1.0, fp16: 0.5, fp32: 1.5}}
  memory_access_pj: {{access_bits: 8, dram: 20}}
"""


def test_energy_uses_the_devices_own_table(tmp_path):
    """Two device files with different energy tables give different energy; a file with
    none uses Horowitz 45 nm and is labelled as the default."""
    from stefx.profile.hardware import energy_label, resolve_energy_table

    plain, own = tmp_path / "plain.yaml", tmp_path / "own.yaml"
    plain.write_text(DEVICE_YAML.format(name="plain").replace("energy: horowitz45nm\n", ""))
    own.write_text(
        DEVICE_YAML.format(name="own").replace("energy: horowitz45nm", "energy:")
        + ENERGY_TABLE.format(name="own-7nm")
    )
    plain_dev, own_dev = load_hardware(plain), load_hardware(own)
    assert plain_dev.energy_is_default and plain_dev.energy.name == "horowitz45nm"
    assert not own_dev.energy_is_default and own_dev.energy.name == "own-7nm"
    c = cost_of(linear(3, 4, 5))  # 60 MACs, 188 bytes
    e_plain = energy(c, resolve_energy_table(plain_dev))
    e_own = energy(c, resolve_energy_table(own_dev))
    assert e_plain == pytest.approx((60 * 4.6 + 188 * 162.5) * PJ)
    assert e_own == pytest.approx((60 * 1.9 + 188 * 20) * PJ)
    assert "own table" in energy_label(own_dev, own_dev.energy)
    assert "default" in energy_label(plain_dev, plain_dev.energy)
    chosen = resolve_energy_table(own_dev, "horowitz45nm")  # an explicit choice wins
    assert chosen.name == "horowitz45nm" and "chosen" in energy_label(own_dev, chosen)


def test_profile_energy_none_uses_the_devices_table_and_says_so(tmp_path):
    """profile(energy=None): the device's table; the report names it and whether energy
    then depends on the device."""
    import inspect

    import torch
    from torch import nn

    from stefx.profile import profile

    plain, own = tmp_path / "plain.yaml", tmp_path / "own.yaml"
    plain.write_text(DEVICE_YAML.format(name="plain").replace("energy: horowitz45nm\n", ""))
    own.write_text(
        DEVICE_YAML.format(name="own").replace("energy: horowitz45nm", "energy:")
        + ENERGY_TABLE.format(name="own-7nm")
    )
    plain_dev, own_dev = load_hardware(plain), load_hardware(own)
    model, x = nn.Sequential(nn.Linear(4, 5)), (torch.randn(3, 4),)
    if inspect.signature(profile).parameters["energy"].default is None:
        rep_plain = profile(model, x, hardware=plain_dev)
        rep_own = profile(model, x, hardware=own_dev)
    else:  # until profile()'s default is energy=None: name the device's own table
        register_energy_table(own_dev.energy)
        try:
            rep_plain = profile(model, x, hardware=plain_dev, energy="horowitz45nm")
            rep_own = profile(model, x, hardware=own_dev, energy="own-7nm")
        finally:
            hw._ENERGY.remove("own-7nm")
    assert rep_own.totals["before"]["energy_j"] != rep_plain.totals["before"]["energy_j"]
    assert "own-7nm (the own profile's own table)" in str(rep_own)
    assert "default: Horowitz 45 nm" in str(rep_plain)
    five = {
        line.split()[0]: line for line in str(rep_own).split("five classic")[1].splitlines() if line
    }
    assert " yes " in five["energy"]
    five = {
        line.split()[0]: line
        for line in str(rep_plain).split("five classic")[1].splitlines()
        if line
    }
    assert "no (one table for every device)" in five["energy"]


def test_mac_energy_scaling_rules():
    t = load_energy_table("horowitz45nm")
    assert mac_energy_pj(t) == pytest.approx(3.7 + 0.9)  # fp32
    assert mac_energy_pj(t, float_bits=16) == pytest.approx(1.1 + 0.4)
    assert mac_energy_pj(t, 8, None) == pytest.approx(4.6)  # weight-only: float multiply
    # w8a8: 0.2 pJ multiply; 16-bit accumulator between int8 (0.03) and int32 (0.1)
    assert mac_energy_pj(t, 8, 8) == pytest.approx(0.2 + 0.03 + 0.07 * 8 / 24)
    assert mac_energy_pj(t, 8, 8, acc_bits=32) == pytest.approx(0.2 + 0.1)
    # w4a8: multiplier scales with 4 x 8 / (8 x 8); 12-bit accumulator
    assert mac_energy_pj(t, 4, 8) == pytest.approx(0.1 + 0.03 + 0.07 * 4 / 24)
    # w1a1 (binary): below the table, proportional: 0.2 / 64 and 0.03 x 2 / 8
    assert mac_energy_pj(t, 1, 1) == pytest.approx(0.2 / 64 + 0.0075)
    # 16 x 16: between int8 (64) and int32 (1024) products, linear
    assert mac_energy_pj(t, 16, 16, acc_bits=32) == pytest.approx(0.2 + 2.9 * 192 / 960 + 0.1)


def test_energy_by_hand():
    # Linear 4 -> 5 on [3, 4], fp32: 60 MACs, 80 + 48 + 60 bytes from DRAM
    op = linear(3, 4, 5)
    fp32 = cost_of(op)
    assert energy(fp32, "a100") == pytest.approx((60 * 4.6 + 188 * 162.5) * PJ)
    sram = energy(fp32, load_energy_table("horowitz45nm"), memory="sram_8kb")
    assert sram == pytest.approx((60 * 4.6 + 188 * 1.25) * PJ)
    w4a8 = cost_of(op, w_bits=4, a_bits=8)  # 10 + 12 + 60 bytes
    expected = 60 * (0.1 + 0.03 + 0.07 * 4 / 24) + 82 * 162.5
    assert energy(w4a8, load_hardware("h100"), 4, 8) == pytest.approx(expected * PJ)
    norm = Cost(flops=100)  # non-MAC FLOPs: one fp32 add each
    assert energy(norm, "horowitz45nm") == pytest.approx(100 * 0.9 * PJ)


def test_unknown_names_raise_with_suggestions():
    with pytest.raises(StefxError, match="did you mean 'h100'"):
        load_hardware("h10")
    with pytest.raises(StefxError, match="did you mean 'horowitz45nm'"):
        load_energy_table("horowitz45")
    with pytest.raises(StefxError, match="did you mean 'a100'"):
        energy(Cost(), "a10")
    with pytest.raises(StefxError, match="did you mean 'dram'"):
        energy(Cost(), "a100", memory="dramm")


def test_profile_from_a_yaml_file_and_registration(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(DEVICE_YAML.format(name="stefx-test-toy"))
    toy = load_hardware(path)
    assert toy.peak_ops["fp32"] == 1e12 and toy.peak_ops["int4"] is None  # '1e12' accepted
    assert peak_ops(toy, 4) == 4e12 and toy.memory_bandwidth == 1e11
    try:
        assert register_hardware(str(path)) == toy
        assert load_hardware("stefx-test-toy") == toy
        with pytest.raises(ValueError, match="already registered"):
            register_hardware(toy)
    finally:
        hw._HARDWARE.remove("stefx-test-toy")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("fp32:", "fp23:"), "did you mean 'fp32'"),
        (lambda t: t.replace("sources: [https://example.org/datasheet]", ""), "'sources'"),
        (lambda t: t.replace("fp32: 1e12", "fp32: null"), "fp32 is required"),
        (lambda t: t.replace("memory_bandwidth: 1e11", "memory_bandwidth: fast"), "number"),
        (lambda t: t.replace("kind: device", "kind: gpu"), "kind must be"),
        (lambda t: t + "matmul_fracton: 0.8\n", "did you mean 'matmul_fraction'"),
        (lambda t: t + "matmul_fraction: 80\n", r"matmul_fraction must be in \(0, 1\]"),
        (lambda t: t + "bandwidth_fraction: 0\n", "bandwidth_fraction must be in"),
        (lambda t: t + "launch_floor_s: 5\n", "expected microseconds"),
        (lambda t: t.replace("energy: horowitz45nm", "energy: horowitz"), "did you mean"),
    ],
)
def test_invalid_files_name_the_field(tmp_path, edit, message):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(DEVICE_YAML.format(name="bad")))
    with pytest.raises(StefxError, match=message):
        load_hardware(path)
    with pytest.raises(StefxError, match="cannot read"):
        load_hardware(tmp_path / "missing.yaml")
