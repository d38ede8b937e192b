"""``stefx convert`` run as a user types it: a quantized folder in, a file a runtime loads out."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import stefx
from stefx.convert import converted_weights

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The one error line (transformers' loading progress bar may come before it)."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("stefx: error:")]
    assert len(lines) == 1 and done.stderr.rstrip().endswith(lines[0]), done.stderr
    return lines[0]


def _stefx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stefx", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "float")
    stefx.quantize(model, "gguf-q4_0", report=False).save_pretrained(root / "q4")
    return root


def test_convert_a_quantized_folder_to_gguf(folders):
    out = folders / "m.gguf"
    done = _stefx("convert", str(folders / "q4"), "--to", "gguf", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert "Q4_0" in kinds


def test_convert_a_float_folder_needs_a_recipe_and_then_quantizes(folders):
    out = folders / "f.gguf"
    done = _stefx("convert", str(folders / "float"), "--to", "gguf", "--out", str(out))
    assert done.returncode == 2 and not out.exists()
    assert "pass --recipe NAME" in _error_line(done)
    done = _stefx(
        "convert",
        str(folders / "float"),
        "--recipe",
        "gguf-q8_0",
        "--to",
        "gguf",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "Q8_0" in {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}


def test_convert_to_stefx_writes_a_packed_folder_from_pretrained_loads(folders):
    out = folders / "packed"
    done = _stefx("convert", str(folders / "q4"), "--to", "stefx", "--out", str(out))
    assert done.returncode == 0, done.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert converted_weights(back)


def test_convert_errors_are_one_line(folders, tmp_path):
    done = _stefx("convert", str(tmp_path / "missing"), "--to", "gguf", "--out", "x.gguf")
    assert done.returncode == 2
    assert done.stderr.startswith("stefx: error: convert:") and done.stderr.count("\n") == 1
    assert "no config.json" in _error_line(done)
    done = _stefx("convert", str(folders / "q4"), "--to", "tflite", "--out", "x")
    assert done.returncode == 2 and "invalid choice: 'tflite'" in done.stderr
    done = _stefx("convert", str(folders / "q4"), "--to", "hf-bitnet", "--out", str(tmp_path / "b"))
    assert done.returncode == 2 and "preset that fits: bitnet-b158" in _error_line(done)
