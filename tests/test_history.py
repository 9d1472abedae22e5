"""`rank_history`, `export_rank_history` and `plot_rank_history`: the record
of which layers lost rank and when, through fit, resume, saving and
compaction."""

import csv
import json

import keras
import numpy as np
import pytest
from helpers import fresh_process
from helpers import to_numpy
from test_callback import regression_data
from test_callback import two_branch_model

import keras_adalora
from keras_adalora import AdaLoRAOptimizer
from keras_adalora import RankAllocator
from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import export_rank_history
from keras_adalora import get_rank_pattern
from keras_adalora import plot_rank_history
from keras_adalora import rank_history
from keras_adalora.schedule import budget_at

SCHEDULE = dict(target_rank=1, tinit=4, tfinal=24, delta_t=2)
FIT = dict(batch_size=8, verbose=0, shuffle=False)
PATHS = ["used_1", "used_2", "dead_1", "dead_2"]


def compiled(**kwargs):
    model = two_branch_model(**kwargs)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def trained(epochs=4, **schedule):
    model = compiled()
    model.fit(*regression_data(), epochs=epochs,
              callbacks=[RankBudgetCallback(**{**SCHEDULE, **schedule})], **FIT)
    return model


def by_short_path(history):
    return {path.split("/")[-1]: ranks for path, ranks in history["ranks"].items()}


def test_the_history_follows_every_drop_from_init_rank_to_the_final_pattern():
    model = trained()
    history = rank_history(model)
    steps, ranks = history["steps"], by_short_path(history)
    assert steps[0] == 0 and steps[-1] == 32 and steps == sorted(set(steps))
    assert set(ranks) == set(PATHS)
    # From init_rank everywhere to the rank pattern the model holds.
    assert [ranks[p][0] for p in PATHS] == [4, 4, 4, 4]
    final = {path.split("/")[-1]: r for path, r in get_rank_pattern(model).items()}
    assert {p: ranks[p][-1] for p in PATHS} == final
    assert history["budget_unit"] == "components"
    assert history["budget"] == [
        budget_at(s, initial_budget=16, target_budget=4, tinit=4, tfinal=24) for s in steps]
    for i, step in enumerate(steps[1:-1], start=1):
        # Drops happen at mask steps, inside the pruning phase, and every
        # such step leaves exactly the budget alive.
        assert 4 < step <= 24
        assert sum(ranks[p][i] for p in PATHS) == history["budget"][i]
        for p in PATHS:
            assert ranks[p][i] <= ranks[p][i - 1]
    # The ignored branch goes first.
    assert ranks["dead_1"][-1] == ranks["dead_2"][-1] == 0


def test_a_budget_in_parameters_has_its_history_in_parameters():
    model = compiled()
    model.fit(*regression_data(), epochs=4, callbacks=[RankBudgetCallback(
        target_params=124, tinit=4, tfinal=24, delta_t=2)], **FIT)
    history = rank_history(model)
    assert history["budget_unit"] == "parameters"
    assert history["budget"][0] == 4 * (29 + 33 + 29 + 33) and history["budget"][-1] == 124


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def test_a_resumed_run_continues_the_history(tmp_path):
    schedule = dict(SCHEDULE, tfinal=30)
    keras.utils.set_random_seed(5)
    reference = trained(**schedule)

    keras.utils.set_random_seed(5)
    first = compiled()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(*regression_data(), epochs=4,
                  callbacks=[backup, RankBudgetCallback(**schedule), Interrupt()], **FIT)
    keras.utils.set_random_seed(99)
    resumed = compiled()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    resumed.fit(*regression_data(), epochs=4,
                callbacks=[backup, RankBudgetCallback(**schedule)], **FIT)
    history = rank_history(resumed)
    assert history == rank_history(reference)
    # Drops before the interruption at step 16 (read from the backup) and
    # after it (recorded by the resumed run).
    drops = history["steps"][1:-1]
    assert min(drops) < 16 < max(drops)


def test_compaction_keeps_the_history_and_a_reloaded_model_reads_it(tmp_path):
    model = trained()
    history = rank_history(model)
    compact_adalora(model)
    assert rank_history(model) == history
    path = tmp_path / "compacted.keras"
    model.save(path)
    result = fresh_process(f"""
        import keras, keras_adalora
        model = keras.saving.load_model({str(path)!r})
        history = keras_adalora.rank_history(model)
        report(history=history)
    """)
    assert result["keras_adalora_imported"]
    assert result["history"] == history


def test_a_custom_loop_records_the_history_too():
    from test_custom_loop import run_loop

    model = two_branch_model()
    optimizer = AdaLoRAOptimizer(keras.optimizers.Adam(0.01))
    optimizer.watch(model)
    optimizer.build(model.trainable_variables)
    allocator = RankAllocator(model, optimizer, target_rank=2, tinit=8, tfinal=32,
                              delta_t=4, total_steps=40)
    optimizer.write_schedule({
        "start": 0, "tinit": 8, "tfinal": 32, "total_steps": 40,
        "initial_budget": 16, "target_budget": 8, "budget_unit": 0})
    model.optimizer = optimizer
    run_loop(model, optimizer, allocator, steps=40)
    ranks = by_short_path(rank_history(model))
    assert [ranks[p][-1] for p in PATHS] == [4, 4, 0, 0]


def test_export_writes_csv_and_json(tmp_path):
    model = trained()
    history = rank_history(model)
    assert export_rank_history(model, tmp_path / "out" / "ranks.json") == history
    assert json.loads((tmp_path / "out" / "ranks.json").read_text()) == history
    export_rank_history(model, tmp_path / "ranks.csv")
    rows = list(csv.reader((tmp_path / "ranks.csv").open()))
    assert rows[0] == ["step", "budget (components)"] + list(history["ranks"])
    assert [int(r[0]) for r in rows[1:]] == history["steps"]
    assert [int(r[1]) for r in rows[1:]] == history["budget"]
    first = list(history["ranks"])[0]
    assert [int(r[2]) for r in rows[1:]] == history["ranks"][first]
    with pytest.raises(ValueError, match=r"`path` must end in .csv or .json"):
        export_rank_history(model, tmp_path / "ranks.txt")
    assert not (tmp_path / "ranks.txt").exists()


def test_plot_draws_the_budget_and_every_layer(tmp_path):
    pytest.importorskip("matplotlib")
    model = trained()
    figure = plot_rank_history(model, tmp_path / "plots" / "history.png")
    assert (tmp_path / "plots" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top, bottom = figure.axes
    assert len(bottom.get_lines()) == 4
    np.testing.assert_array_equal(top.get_lines()[0].get_ydata(), rank_history(model)["budget"])


def test_a_model_without_a_schedule_has_no_history():
    model = two_branch_model()
    with pytest.raises(ValueError, match="no AdaLoRA schedule.*RankBudgetCallback"):
        rank_history(model)
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="no AdaLoRA schedule"):
        rank_history(model)


def test_an_optimizer_saved_before_the_history_existed_loads_its_scores_and_schedule():
    model = trained(epochs=2, total_steps=32)
    optimizer = model.optimizer
    store = {}
    optimizer.save_own_variables(store)
    names = [v.name for v in optimizer._variables]
    assert names[-1] == "rank_drops"
    del store[str(len(names) - 1)]  # what earlier versions wrote
    saved = {name: np.asarray(store[str(i)]) for i, name in enumerate(names[:-1])}
    for variable in optimizer._variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.load_own_variables(store)
    for i, name in enumerate(names[:-1]):
        np.testing.assert_array_equal(to_numpy(optimizer._variables[i]), saved[name])


def test_a_sequential_model_keeps_its_layer_keys_through_a_reload(tmp_path):
    # Keras names the layers of a Sequential model built from a list under
    # the model ("mlp/hidden"), and Keras 3.15 drops the prefix when it
    # reloads one ("hidden"); the keys of the pattern, the history and the
    # summary do not change.
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(8, activation="tanh", name="mid"),
            keras.layers.Dense(1, name="out"),
        ],
        name="mlp",
    )
    apply_adalora(model, init_rank=4, target=["hidden", "mid"])
    assert model.get_layer("hidden").path == "mlp/hidden"
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(*regression_data(), epochs=4, callbacks=[RankBudgetCallback(**SCHEDULE)], **FIT)
    path = tmp_path / "mlp.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    # Keras 3.15 drops the prefix on reload; its nightlies keep it.
    assert loaded.get_layer("hidden").path in ("hidden", "mlp/hidden")
    assert list(get_rank_pattern(model)) == ["hidden", "mid"]
    assert get_rank_pattern(loaded) == get_rank_pattern(model)
    assert rank_history(loaded) == rank_history(model)
    assert list(rank_history(model)["ranks"]) == ["hidden", "mid"]
    printed = {}
    for name, m in (("trained", model), ("loaded", loaded)):
        printed[name] = []
        keras_adalora.summary(m, print_fn=printed[name].append)
    assert printed["loaded"] == printed["trained"]
    assert printed["trained"][3].startswith("hidden ")
