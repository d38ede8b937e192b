"""`make demo` (README's first command) runs: the built-in default end to end, shortened."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")


def test_demo_runs_and_reports_three_losses(capsys):
    from stefx.demo import run_demo

    losses = run_demo(float_steps=3, qat_steps=2)
    assert set(losses) == {"float", "quantized", "qat"}
    assert all(math.isfinite(v) and 0 < v < 10 for v in losses.values())
    out = capsys.readouterr().out
    assert "w4a8" in out and "perplexity per byte" in out
