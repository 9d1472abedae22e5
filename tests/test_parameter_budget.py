"""`RankBudgetCallback(target_params=...)`: a budget in adapter parameters,
through fit, logs, summary, resume, saving, compaction and merging."""

import keras
import numpy as np
import pytest
from helpers import fresh_process
from helpers import to_numpy

from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import merge_adalora
from keras_adalora import summary
from keras_adalora.allocator import component_cost
from keras_adalora.targets import adapted_layers

N = 64  # samples; batch 8: 8 steps an epoch
INIT_RANK = 4
# d_in + d_out + 1 of "narrow" (8 x 8), "wide" (8 x 64) and "back" (64 x 8).
COSTS = {"narrow": 17, "wide": 73, "back": 73}
HELD = INIT_RANK * sum(COSTS.values())  # 652


def uneven_model():
    """Three adapted layers whose components cost 17, 73 and 73."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(8, activation="tanh", name="narrow")(inputs)
    x = keras.layers.Dense(64, activation="tanh", name="wide")(x)
    x = keras.layers.Dense(8, name="back")(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs, name="uneven")
    apply_adalora(model, init_rank=INIT_RANK, target=["narrow", "wide", "back"],
                  keep_trainable=["head"])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def regression_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 8)).astype("float32")
    y = np.sin(2.0 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    return x, y.astype("float32")


def params_alive(model):
    return sum(
        layer.active_rank * component_cost(layer) for layer in adapted_layers(model)
    )


def check_within(model, target):
    """Alive parameters at or below `target`, less than one component below
    it. Pruning is final, so a cheap component pruned at an earlier mask
    step may fit in what is left: the bound is the dearest component."""
    spent = params_alive(model)
    assert spent <= target
    assert target - spent < max(COSTS.values())


class BatchLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


FIT = dict(batch_size=8, verbose=0, shuffle=False)
SCHEDULE = dict(tinit=4, tfinal=24, delta_t=2)


def test_component_costs_are_the_parameters_a_component_holds():
    model = uneven_model()
    for layer in adapted_layers(model):
        held = sum(int(np.prod(v.shape)) for v in
                   (layer.adalora_a, layer.adalora_lam, layer.adalora_b))
        assert component_cost(layer) == COSTS[layer.name] == held // INIT_RANK


@pytest.mark.parametrize("allocation", ["global", "layer"])
def test_fit_ends_within_the_parameter_budget_and_logs_it(allocation):
    model = uneven_model()
    log = BatchLog()
    callback = RankBudgetCallback(target_params=300, allocation=allocation, **SCHEDULE)
    model.fit(*regression_data(), epochs=4, callbacks=[callback, log], **FIT)
    assert callback.budget_unit == "parameters" and callback.target_budget == 300
    check_within(model, 300)
    budgets = [entry["adalora_budget"] for entry in log.logs]
    assert budgets[0] == HELD and budgets[-1] == 300
    assert budgets == sorted(budgets, reverse=True)
    spent = [entry["adalora_params"] for entry in log.logs]
    assert spent[0] == HELD and spent == sorted(spent, reverse=True)
    # Masks are written every delta_t steps: each holds at most the budget
    # of the step it was written at (steps 6, 8, ... 24).
    for step in range(6, 25, 2):
        assert spent[step - 1] <= budgets[step - 1]
    last = log.logs[-1]
    assert last["adalora_params"] == params_alive(model)
    assert last["adalora_rank"] == sum(get_rank_pattern(model).values())
    lines = []
    summary(model, budget=callback, print_fn=lines.append)
    unused = 300 - params_alive(model)
    assert f"Budget: 300 parameters, {params_alive(model)} alive, {unused} unused." in lines


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_params": 300, "target_rank": 2}, "Pass one budget.*target_params.*target_rank"),
        ({"target_params": 300, "total_rank": 6}, "Pass one budget.*total_rank"),
        ({"target_params": 0}, "target_params"),
        ({"target_params": 2.5e3}, "target_params"),
    ],
)
def test_bad_budget_arguments_raise_in_the_constructor(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankBudgetCallback(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_params": HELD + 1}, f"above the {HELD} parameters the adapters hold"),
        ({"target_params": 16}, "below what one component costs.*17 parameters"),
        ({"target_params": 150, "min_rank": 1}, "min_rank=1 needs at least 163 parameters"),
    ],
)
def test_a_parameter_budget_these_adapters_cannot_hold_raises_before_training(kwargs, message):
    model = uneven_model()
    before = [to_numpy(v).copy() for v in model.weights]
    optimizer = model.optimizer
    with pytest.raises(ValueError, match=message):
        model.fit(*regression_data(), epochs=4,
                  callbacks=[RankBudgetCallback(**kwargs, **SCHEDULE)], **FIT)
    for got, want in zip(model.weights, before):
        np.testing.assert_array_equal(to_numpy(got), want)
    assert model.optimizer is optimizer
    assert int(to_numpy(optimizer.iterations)) == 0


def test_the_whole_adapter_as_budget_warns_that_nothing_prunes():
    model = uneven_model()
    with pytest.warns(UserWarning, match=rf"final budget \({HELD} parameters, "
                      rf"target_params={HELD}\) equals what the adapters hold"):
        model.fit(*regression_data(), epochs=4,
                  callbacks=[RankBudgetCallback(target_params=HELD, **SCHEDULE)], **FIT)
    assert params_alive(model) == HELD


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = regression_data()
    kwargs = dict(target_params=250, **SCHEDULE)

    keras.utils.set_random_seed(3)
    reference = uneven_model()
    reference.fit(*data, epochs=4, callbacks=[RankBudgetCallback(**kwargs)], **FIT)

    keras.utils.set_random_seed(3)
    first = uneven_model()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(*data, epochs=4, callbacks=[backup, RankBudgetCallback(**kwargs), Interrupt()],
                  **FIT)

    keras.utils.set_random_seed(99)
    resumed = uneven_model()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    resumed.fit(*data, epochs=4, callbacks=[backup, RankBudgetCallback(**kwargs)], **FIT)

    assert get_rank_pattern(resumed) == get_rank_pattern(reference)
    check_within(resumed, 250)
    for got, want in zip(resumed.weights, reference.weights):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-6,
                                   err_msg=got.path)


def test_a_saved_model_continues_its_parameter_budget_in_a_fresh_process(tmp_path):
    model = uneven_model()
    x, y = regression_data()
    # 12 of 32 steps: pruning has begun.
    model.fit(x[:48], y[:48], epochs=2,
              callbacks=[RankBudgetCallback(target_params=250, total_steps=32, **SCHEDULE)],
              **FIT)
    assert params_alive(model) > 250
    path = tmp_path / "mid.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    result = fresh_process(f"""
        import keras, keras_adalora
        from keras_adalora import RankBudgetCallback, get_rank_pattern
        from keras_adalora.allocator import component_cost
        from keras_adalora.targets import adapted_layers
        model = keras.saving.load_model({str(path)!r})
        x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})
        schedule = model.optimizer.read_schedule()
        try:
            model.fit(x[:40], y[:40], batch_size=8, epochs=1, verbose=0,
                      callbacks=[RankBudgetCallback(target_rank=1, tinit=4, tfinal=24,
                                                    delta_t=2, total_steps=32)])
            refused = ""
        except ValueError as error:
            refused = str(error)
        history = model.fit(
            x[:40], y[:40], batch_size=8, epochs=4, verbose=0,
            callbacks=[RankBudgetCallback(target_params=250, total_steps=32, tinit=4,
                                          tfinal=24, delta_t=2)])
        spent = sum(layer.active_rank * component_cost(layer)
                    for layer in adapted_layers(model))
        report(schedule=schedule, refused=refused, spent=spent,
               steps=int(model.optimizer.iterations.numpy()),
               logged=history.history["adalora_params"][-1],
               budget=history.history["adalora_budget"][-1])
    """)
    assert result["schedule"]["budget_unit"] == 1
    assert result["schedule"]["initial_budget"] == HELD
    assert result["schedule"]["target_budget"] == 250
    assert "budget 652 -> 250 parameters" in result["refused"]
    assert "a budget in components" in result["refused"]
    assert result["steps"] == 32
    assert result["spent"] == result["logged"] <= result["budget"] == 250
    assert result["keras_adalora_imported"]


def test_a_schedule_saved_before_it_recorded_its_unit_loads_as_components():
    model = uneven_model()
    model.fit(*regression_data(), epochs=4,
              callbacks=[RankBudgetCallback(target_rank=2, **SCHEDULE)], **FIT)
    optimizer = model.optimizer
    store = {}
    optimizer.save_own_variables(store)
    index = next(i for i, v in enumerate(optimizer._variables) if v is optimizer.schedule)
    saved = np.asarray(store[str(index)])
    assert saved[-1] == 0
    store[str(index)] = saved[:-1]  # the six fields of earlier versions
    optimizer.schedule.assign(np.full(saved.shape, -1, "int32"))
    optimizer.load_own_variables(store)
    assert optimizer.read_schedule() == dict(
        zip(("start", "tinit", "tfinal", "total_steps", "initial_budget",
             "target_budget", "budget_unit"), saved.tolist()))


def test_compact_and_merge_keep_what_the_parameter_budget_left():
    model = uneven_model()
    x, y = regression_data()
    model.fit(x, y, epochs=4, callbacks=[RankBudgetCallback(target_params=300, **SCHEDULE)],
              **FIT)
    before = to_numpy(model.predict(x, verbose=0))
    pattern = get_rank_pattern(model)
    spent = params_alive(model)
    compact_adalora(model)
    assert [layer.adapter_rank for layer in adapted_layers(model)] == list(pattern.values())
    adapter = sum(int(np.prod(v.shape)) for layer in adapted_layers(model)
                  for v in (layer.adalora_a, layer.adalora_lam, layer.adalora_b))
    assert adapter == spent <= 300
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), before, atol=1e-5)
    merged = merge_adalora(model)
    np.testing.assert_allclose(to_numpy(merged.predict(x, verbose=0)), before, atol=1e-4)
