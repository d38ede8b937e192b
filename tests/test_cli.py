"""The command line as a user types it: every verb's help, the main paths, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stefx.cli import build_parser, main

VERBS = ["demo", "quantize", "explain", "profile", "train", "convert", "recipes"]


def _stefx(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stefx", *args], capture_output=True, text=True, timeout=300,
        cwd=cwd,
    )  # fmt: skip


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("stefx: error:")]
    assert len(lines) == 1 and done.stderr.rstrip().endswith(lines[0]), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as done:
        main([verb, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"stefx {verb}" in out


def test_top_level_help_lists_verbs_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(v in out for v in VERBS) and "Exit codes" in out
    assert {a.dest for a in build_parser()._actions} >= {"debug", "command"}


def test_recipes_list_show_validate(tmp_path):
    done = _stefx("recipes", "list")
    assert done.returncode == 0 and "bitnet-b158" in done.stdout and "gguf-q4_0" in done.stdout
    done = _stefx("recipes", "show", "w4a8")
    assert done.returncode == 0 and done.stdout.startswith("name: w4a8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nrules:\n  - targets: [linear]\n    weights: {type: uniform, num_bits: 9}\n"
    )
    done = _stefx("recipes", "validate", str(bad))
    assert done.returncode == 2 and "num_bits=9" in _one_error_line(done)
    done = _stefx("recipes", "show", "w4a9")
    assert done.returncode == 2 and "did you mean" in _one_error_line(done)


def test_quantize_and_profile_a_builtin_cnn(tmp_path):
    done = _stefx("quantize", "cnn", "--recipe", "w8a8", "--report", "json",
                  "--out", str(tmp_path / "q"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["totals"]["after"]["param_bytes"] < report["totals"]["before"]["param_bytes"]
    assert (tmp_path / "q" / "model.safetensors").is_file()
    done = _stefx("profile", "cnn", "--recipe", "w4a8", "--report", "csv")
    assert done.returncode == 0 and done.stdout.splitlines()[0].startswith("name,")


def test_profile_a_config_on_the_meta_device(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    config.save_pretrained(tmp_path)
    done = _stefx("profile", str(tmp_path / "config.json"), "--meta", "--recipe", "w4a8",
                  "--hardware", "h100", "--seq-len", "32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "hardware h100" in done.stdout and "model.layers.1.mlp.down_proj" in done.stdout


def test_bad_arguments_and_missing_files_are_one_line_errors(tmp_path):
    done = _stefx("quantize", str(tmp_path / "nothing"), "--recipe", "w4a8")
    assert done.returncode == 2 and "is not a folder" in _one_error_line(done)
    done = _stefx("quantize", "cnn", "--recipe", "w5a5")
    assert done.returncode == 2 and "no preset named 'w5a5'" in _one_error_line(done)
    done = _stefx("train", "demo-lm", "--recipe", "w4a8", "--data", str(tmp_path / "none.txt"))
    assert done.returncode == 2 and "is not a file" in _one_error_line(done)
    done = _stefx("profile", "cnn", "--hardware", "tpu-v9")
    assert done.returncode == 2 and "tpu-v9" in _one_error_line(done)
    done = _stefx("train", "demo-lm", "--recipe", "w4a8", "--data", "x.txt", "--steps", "0")
    assert done.returncode == 2 and "'0' is not a whole number >= 1" in done.stderr
    done = _stefx("frobnicate")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_train_fine_tunes_the_shipped_lm_on_a_text_file(tmp_path):
    pytest.importorskip("transformers")
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    done = _stefx("train", "demo-lm", "--recipe", "w4a8", "--data", str(text), "--steps", "3",
                  "--seq-len", "64", "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "after 3 QAT steps" in done.stdout
    assert (tmp_path / "run" / "config.json").is_file()
