"""The examples run end to end (tiny settings) on the current backend."""

import os
import pathlib
import subprocess
import sys

import keras
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["quickstart.py"])
def test_example_runs(script, tmp_path):
    pytest.importorskip("sklearn")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / script),
            "--smoke",
            "--backend",
            keras.backend.backend(),
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Test accuracy" in result.stdout
    assert (tmp_path / "merged.keras").exists()
