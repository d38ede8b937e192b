"""`make demo` (README's first command): the whole cycle on the shipped LM, shortened."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def test_the_shipped_lm_is_trained_and_small():
    import json

    from stefx.demo import DEMO_LM

    meta = json.loads((DEMO_LM / "training.json").read_text())
    curve = meta["curve"]
    assert curve[-1] <= min(curve) * 1.005  # trained until the held-out loss flattened
    assert (DEMO_LM / "model.safetensors").stat().st_size < 4e6


def test_demo_runs_the_whole_cycle_and_compares_fairly(capsys):
    from stefx.demo import run_demo

    got = run_demo("w4a8", steps=3, eval_windows=8, progress=False)
    assert all(math.isfinite(got[k]) and 1 < got[k] < 50 for k in ("float", "ptq", "qat"))
    assert got["converted"] == pytest.approx(got["qat"], rel=1e-4)  # packed == fake-quant
    assert got["reloaded"] == pytest.approx(got["converted"], rel=1e-6)
    out = capsys.readouterr().out
    for words in ("float + 3 steps", "w4a8 PTQ", "w4a8 QAT 3 steps", "perplexity/byte",
                  "the reloaded model writes"):  # fmt: skip
        assert words in out


def test_stefx_demo_command_with_a_plot(tmp_path):
    plot = tmp_path / "demo.png"
    done = subprocess.run(
        [sys.executable, "-m", "stefx", "demo", "--steps", "2", "--no-progress",
         "--plot", str(plot)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "bitnet-b158 QAT 2 steps" in done.stdout and plot.stat().st_size > 10_000
