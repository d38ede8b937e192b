"""examples/finetune_lowbit.py, the script people will copy, runs end to end (--quick)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "finetune_lowbit.py"


def test_the_example_runs_and_its_student_reloads(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_lowbit", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--quick", "--threads", "1", "--out", str(tmp_path / "student")])
    for key in ("float", "float +extra", "bitnet-b158 PTQ", "w4a8 QAT", "w4a8 QAT+KD"):
        assert math.isfinite(results[key]) and results[key] > 1.0, (key, results[key])
    assert results["reload identical"] and results["stefx.load identical"]
    assert (tmp_path / "student" / "config.json").is_file()
    assert results["sample"].startswith("The for statement")
