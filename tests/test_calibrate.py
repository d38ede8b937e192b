"""stefx.profile.calibrate: short micro-benchmarks write a loadable hardware YAML."""

from __future__ import annotations

import pytest
import yaml

from stefx.errors import StefxError
from stefx.profile import hardware as hw
from stefx.profile.calibrate import calibrate
from stefx.profile.costs import Cost
from stefx.profile.hardware import load_hardware, peak_ops, roofline_latency


def test_calibrate_writes_a_profile_that_loads_and_says_how_it_was_measured(tmp_path):
    path = tmp_path / "here.yaml"
    measured = calibrate(path, dtypes=("fp32",), seconds=0.5, sizes=(64, 128), name="here")
    loaded = load_hardware(path)
    assert loaded == measured
    assert loaded.peak_ops["fp32"] > 1e8 and loaded.peak_ops["bf16"] is None
    assert loaded.memory_bandwidth > 1e8 and 0 < loaded.launch_floor_s < 0.1
    assert (loaded.matmul_fraction, loaded.bandwidth_fraction) == (1.0, 1.0)  # achieved rates
    assert loaded.energy_is_default  # nothing measured energy: the default table, labelled
    assert "measured on this machine by stefx.profile.calibrate" in loaded.sources[0]
    text = " ".join(loaded.assumptions)
    assert "median" in text and "[64, 128]" in text and "64 MiB" in text
    data = yaml.safe_load(path.read_text())
    assert set(data["calibration"]["matmul_ops_per_s"]["fp32"]) == {64, 128}
    assert data["calibration"]["threads"] >= 1
    # the roofline on it: measured peak, no fraction, the measured floor per kernel
    assert peak_ops(loaded, None, float_bits=16) == loaded.peak_ops["fp32"]  # bf16 -> fp32
    seconds, _ = roofline_latency(Cost(flops=2e9, macs=1e9), loaded)
    assert seconds == pytest.approx(2e9 / loaded.peak_ops["fp32"] + loaded.launch_floor_s)


def test_calibrate_without_a_path_returns_the_profile(tmp_path):
    p = calibrate(dtypes=("fp32",), seconds=0.2, sizes=(32,))
    assert p.name == "calibrated" and p.peak_ops["fp32"] > 0
    assert not list(tmp_path.iterdir())
    assert "calibrated" not in hw.hardware_names()  # not registered behind the user's back


def test_calibrate_rejects_unknown_dtypes_and_budgets():
    with pytest.raises(StefxError, match="measurable dtypes"):
        calibrate(dtypes=("fp32", "int3"))
    with pytest.raises(StefxError, match="fp32 is required"):
        calibrate(dtypes=("bf16",))
    with pytest.raises(StefxError, match="time budget"):
        calibrate(seconds=0)
