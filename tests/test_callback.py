"""RankBudgetCallback in `model.fit`: scores, schedule, budget, resumption."""

import keras
import numpy as np
import pytest
from helpers import to_numpy

from keras_adalora import AdaLoRAOptimizer
from keras_adalora import importance as importance_lib
from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import get_rank_pattern
from keras_adalora.targets import adapted_layers

N = 64  # samples; with batch_size 8, 8 steps per epoch


def two_branch_model(orth_reg_weight=0.1, init_rank=4, orth_penalty="squared"):
    """Two parallel two-layer branches; the second one's output is
    multiplied by zero, so nothing it learns can change the loss."""
    inputs = keras.Input((12,))
    used = keras.layers.Dense(16, activation="tanh", name="used_1")(inputs)
    used = keras.layers.Dense(16, name="used_2")(used)
    dead = keras.layers.Dense(16, activation="tanh", name="dead_1")(inputs)
    dead = keras.layers.Dense(16, name="dead_2")(dead)
    dead = keras.layers.Rescaling(0.0, name="times_zero")(dead)
    x = keras.layers.Add()([used, dead])
    outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs)
    apply_adalora(
        model,
        init_rank=init_rank,
        target=["used", "dead"],
        orth_reg_weight=orth_reg_weight,
        orth_penalty=orth_penalty,
        factor_init="orthogonal",
        keep_trainable=["head"],
    )
    return model


def regression_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 12)).astype("float32")
    y = np.sin(x[:, :1] * 2.0) + x[:, 1:2] * x[:, 2:3]
    return x, y.astype("float32")


def compile_model(model, **kwargs):
    model.compile(
        optimizer=kwargs.pop("optimizer", keras.optimizers.Adam(0.01)),
        loss="mse",
        **kwargs,
    )
    return model


class BatchLog(keras.callbacks.Callback):
    """Records the AdaLoRA entries of every batch log."""

    def __init__(self):
        super().__init__()
        self.budget, self.rank = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.budget.append(logs["adalora_budget"])
        self.rank.append(logs["adalora_rank"])


@pytest.mark.parametrize("orth_reg_weight", [0.0, 0.1])
def test_a_branch_whose_output_is_ignored_loses_all_its_rank(orth_reg_weight):
    model = compile_model(two_branch_model(orth_reg_weight))
    callback = RankBudgetCallback(target_rank=2, tinit=8, tfinal=40, delta_t=4)
    model.fit(*regression_data(), batch_size=8, epochs=6, verbose=0, callbacks=[callback])
    assert get_rank_pattern(model) == {
        "used_1": 4,
        "used_2": 4,
        "dead_1": 0,
        "dead_2": 0,
    }


def test_logged_rank_follows_the_three_phases():
    model = compile_model(two_branch_model())
    log = BatchLog()
    callback = RankBudgetCallback(target_rank=1, tinit=8, tfinal=32, delta_t=2)
    history = model.fit(
        *regression_data(),
        batch_size=8,
        epochs=6,
        verbose=0,
        callbacks=[callback, log],
    )
    rank, budget = np.array(log.rank), np.array(log.budget)
    steps = np.arange(1, len(rank) + 1)
    assert len(rank) == 48
    assert np.all(np.diff(rank) <= 0), "the rank never grows"
    assert np.all(rank[steps <= 8] == 16), "full rank through warm-up"
    assert len(set(rank[(steps > 8) & (steps < 32)])) >= 4
    assert np.all(rank[steps >= 32] == 4), "exactly the target from tfinal on"
    assert np.all(rank >= budget), "never below the budget"
    # The budget is SPEC section 5's cubic, floored.
    t = 20
    expected = int(np.floor(4 + 12 * (1 - (t - 8) / (32 - 8)) ** 3))
    assert budget[t - 1] == expected
    assert history.history["adalora_rank"][-1] == 4
    assert history.history["adalora_budget"][-1] == 4
    assert sum(get_rank_pattern(model).values()) == 4


def test_ranks_freeze_and_scoring_stops_after_tfinal():
    model = compile_model(two_branch_model())
    callback = RankBudgetCallback(target_rank=2, tinit=4, tfinal=16, delta_t=4)
    model.fit(*regression_data(), batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    optimizer = model.optimizer
    assert isinstance(optimizer, AdaLoRAOptimizer) and not optimizer.scoring
    masks = [to_numpy(l.rank_mask).copy() for l in adapted_layers(model)]
    scores = [to_numpy(v).copy() for v in optimizer._variables[2:]]
    model.fit(*regression_data(), batch_size=8, epochs=1, verbose=0, callbacks=[RankBudgetCallback(target_rank=2, tinit=4, tfinal=16, delta_t=4)])
    for layer, mask in zip(adapted_layers(model), masks):
        np.testing.assert_array_equal(to_numpy(layer.rank_mask), mask)
    for variable, before in zip(optimizer._variables[2:], scores):
        np.testing.assert_array_equal(to_numpy(variable), before)


def test_freezing_the_ranks_keeps_the_compiled_train_step():
    model = compile_model(two_branch_model())
    seen, traces = [], []
    # On TensorFlow and JAX the Python `train_step` runs only while the
    # step is traced: a retrace (a state whose structure or dtypes changed
    # at a mask update or at the freeze) would run it again.
    train_step = model.train_step

    def counted_train_step(*args, **kwargs):
        traces.append(1)
        return train_step(*args, **kwargs)

    model.train_step = counted_train_step

    class TrainFunctions(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((self.model.train_function, len(traces)))

    callback = RankBudgetCallback(target_rank=2, tinit=4, tfinal=16, delta_t=4)
    model.fit(
        *regression_data(),
        batch_size=8,
        epochs=4,
        verbose=0,
        callbacks=[callback, TrainFunctions()],
    )
    assert not model.optimizer.scoring and len(seen) == 32
    # Scoring turned off at step 16 through a variable: one train step,
    # traced once, ran the whole fit (no retrace at the freeze).
    assert all(function is seen[0][0] for function, _ in seen)
    if keras.backend.backend() == "torch":
        assert [count for _, count in seen] == list(range(1, 33))  # eager
    else:
        assert all(count == seen[0][1] for _, count in seen)


def test_a_second_fit_continues_the_schedule():
    model = compile_model(two_branch_model())
    log = BatchLog()
    kwargs = dict(target_rank=1, tinit=8, tfinal=40, delta_t=4, total_steps=48)
    data = regression_data()
    model.fit(*data, batch_size=8, epochs=3, verbose=0, callbacks=[RankBudgetCallback(**kwargs), log])
    assert 4 < log.rank[-1] < 16
    model.fit(*data, batch_size=8, epochs=3, verbose=0, callbacks=[RankBudgetCallback(**kwargs), log])
    assert int(to_numpy(model.optimizer.iterations)) == 48
    assert np.all(np.diff(log.rank) <= 0)
    assert log.rank[-1] == 4 and sum(get_rank_pattern(model).values()) == 4


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = regression_data()
    kwargs = dict(target_rank=1, tinit=6, tfinal=30, delta_t=3)
    fit = dict(batch_size=8, epochs=5, verbose=0, shuffle=False)

    keras.utils.set_random_seed(7)
    reference = compile_model(two_branch_model())
    reference.fit(*data, callbacks=[RankBudgetCallback(**kwargs)], **fit)

    keras.utils.set_random_seed(7)
    first = compile_model(two_branch_model())
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(*data, callbacks=[backup, RankBudgetCallback(**kwargs), Interrupt(3)], **fit)
    assert 0 < int(to_numpy(first.optimizer.iterations)) < 40

    # A new process would build the model again; so do we.
    keras.utils.set_random_seed(99)
    resumed = compile_model(two_branch_model())
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    resumed.fit(*data, callbacks=[backup, RankBudgetCallback(**kwargs)], **fit)

    assert get_rank_pattern(resumed) == get_rank_pattern(reference)
    for got, want in zip(resumed.weights, reference.weights):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-6, err_msg=got.path)


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras's torch trainer runs one step per execution",
)
def test_steps_per_execution_reaches_the_exact_budget():
    model = compile_model(two_branch_model(), steps_per_execution=4)
    log = BatchLog()
    callback = RankBudgetCallback(target_rank=1, tinit=8, tfinal=24, delta_t=2)
    model.fit(*regression_data(), batch_size=8, epochs=4, verbose=0, callbacks=[callback, log])
    assert np.all(np.diff(log.rank) <= 0)
    assert log.rank[-1] == 4 and sum(get_rank_pattern(model).values()) == 4


def test_gradient_accumulation_counts_optimizer_updates():
    optimizer = keras.optimizers.Adam(0.01, gradient_accumulation_steps=2)
    model = compile_model(two_branch_model(), optimizer=optimizer)
    log = BatchLog()
    callback = RankBudgetCallback(target_rank=1, tinit=4, tfinal=12, delta_t=2)
    model.fit(*regression_data(), batch_size=8, epochs=4, verbose=0, callbacks=[callback, log])
    # 32 batches are 16 optimizer updates. The first mask is due at update
    # tinit + delta_t = 6, i.e. after the 12th batch (counting batches, it
    # would come after the 6th).
    assert log.rank[10] == 16 and log.rank[11] < 16
    assert log.rank[-1] == 4


def test_mixed_float16_scores_unscaled_gradients():
    keras.config.set_dtype_policy("mixed_float16")
    model = compile_model(two_branch_model())
    callback = RankBudgetCallback(target_rank=2, tinit=8, tfinal=32, delta_t=4)
    model.fit(*regression_data(), batch_size=8, epochs=5, verbose=0, callbacks=[callback])
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, AdaLoRAOptimizer)
    assert get_rank_pattern(model) == {"used_1": 4, "used_2": 4, "dead_1": 0, "dead_2": 0}


@pytest.mark.parametrize(
    "importance, allocation",
    [("frobenius", "layer"), ("sensitivity", "layer"), ("frobenius", "global")],
)
def test_other_importance_and_allocation_reach_the_exact_budget(importance, allocation):
    model = compile_model(two_branch_model())
    callback = RankBudgetCallback(
        target_rank=2,
        tinit=8,
        tfinal=32,
        delta_t=4,
        importance=importance,
        allocation=allocation,
        min_rank=1,
    )
    model.fit(*regression_data(), batch_size=8, epochs=5, verbose=0, callbacks=[callback])
    pattern = get_rank_pattern(model)
    assert sum(pattern.values()) == 8 and min(pattern.values()) >= 1


def test_the_model_saves_and_reloads_with_its_scores(tmp_path):
    model = compile_model(two_branch_model())
    callback = RankBudgetCallback(
        target_rank=2, tinit=8, tfinal=40, delta_t=4, total_steps=48
    )
    model.fit(*regression_data(), batch_size=8, epochs=3, verbose=0, callbacks=[callback])
    model.save(tmp_path / "mid_schedule.keras")
    loaded = keras.saving.load_model(tmp_path / "mid_schedule.keras")
    assert isinstance(loaded.optimizer, AdaLoRAOptimizer)
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for got, want in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


def test_non_finite_gradients_leave_the_scores_untouched():
    model = two_branch_model()
    optimizer = AdaLoRAOptimizer(keras.optimizers.SGD(0.1))
    variables = model.trainable_variables
    optimizer.build(variables)
    grads = [np.ones(v.shape, "float32") for v in variables]
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    before = [to_numpy(v).copy() for v in optimizer._variables]
    grads[0][0, 0] = np.nan
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    for variable, value in zip(optimizer._variables[2:], before[2:]):
        np.testing.assert_array_equal(to_numpy(variable), value, err_msg=variable.path)


# Bad input: errors before any weight changes.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_rank": 0}, "target_rank"),
        ({"target_rank": 5, "init_rank": 4}, "target_rank.*above.*init_rank"),
        ({"tinit": 10, "tfinal": 10}, "tinit.*before.*tfinal"),
        ({"tinit": 0.5, "tfinal": 0.2}, "tinit.*before.*tfinal"),
        ({"tinit": 1.5}, "tinit"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"delta_t": 0}, "delta_t"),
        ({"importance": "magnitude"}, "importance"),
        ({"allocation": "random"}, "allocation"),
        ({"min_rank": 3, "max_rank": 2}, "min_rank.*max_rank"),
        ({"total_steps": 0}, "total_steps"),
    ],
)
def test_bad_arguments_raise_in_the_constructor(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankBudgetCallback(**{"tinit": 2, "tfinal": 10, **kwargs})


def snapshot(model):
    return [to_numpy(v).copy() for v in model.weights]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_rank": 5}, "target_rank.*above"),
        ({"tinit": 2, "tfinal": 100}, "tfinal.*beyond"),
        ({"tinit": 0, "tfinal": 10, "importance": "frobenius"}, "tinit > 0"),
        ({"min_rank": 3}, "min_rank"),
        ({"max_rank": 1, "target_rank": 2}, "max_rank"),
        ({"total_rank": 17}, "total_rank|budget"),
    ],
)
def test_bad_settings_for_this_model_raise_at_fit_and_train_nothing(kwargs, message):
    model = compile_model(two_branch_model())
    before = snapshot(model)
    optimizer = model.optimizer
    callback = RankBudgetCallback(**{"target_rank": 2, "tinit": 2, "tfinal": 10, **kwargs})
    with pytest.raises(ValueError, match=message):
        model.fit(*regression_data(), batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    for got, want in zip(snapshot(model), before):
        np.testing.assert_array_equal(got, want)
    assert model.optimizer is optimizer
    assert int(to_numpy(optimizer.iterations)) == 0


def test_a_final_budget_equal_to_what_the_adapters_hold_warns_that_nothing_prunes():
    # The defaults (target_rank=8) on adapters of init_rank 8 prune nothing.
    model = compile_model(two_branch_model(init_rank=4))
    callback = RankBudgetCallback(target_rank=4, tinit=2, tfinal=10)
    with pytest.warns(UserWarning, match=r"final budget \(16 components.*equals what the "
                      r"adapters hold \(16 components, init_rank=4\).*nothing will be pruned"):
        model.fit(*regression_data(), batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    # A budget below it, and a compacted model continuing at its budget, say nothing.
    import warnings

    model = compile_model(two_branch_model(init_rank=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        callback = RankBudgetCallback(target_rank=2, tinit=2, tfinal=10)
        model.fit(*regression_data(), batch_size=8, epochs=2, verbose=0, callbacks=[callback])
        compact_adalora(model)
        callback = RankBudgetCallback(target_rank=2, tinit=2, tfinal=10)
        model.fit(*regression_data(), batch_size=8, epochs=1, verbose=0, callbacks=[callback])


def test_a_model_without_adalora_layers_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="no AdaLoRA layer"):
        model.fit(np.ones((8, 4)), np.ones((8, 2)), verbose=0, callbacks=[RankBudgetCallback(tinit=1, tfinal=2)])


def test_unknown_length_needs_total_steps():
    model = compile_model(two_branch_model())
    x, y = regression_data()

    def batches():
        for start in range(0, N, 8):
            yield x[start : start + 8], y[start : start + 8]

    callback = RankBudgetCallback(target_rank=2, tinit=0.2, tfinal=0.6)
    with pytest.raises(ValueError, match="total_steps"):
        model.fit(batches(), epochs=1, verbose=0, callbacks=[callback])
    assert int(to_numpy(model.optimizer.iterations)) == 0
    callback = RankBudgetCallback(target_rank=2, tinit=2, tfinal=6, delta_t=2, total_steps=8)
    model.fit(batches(), epochs=1, verbose=0, callbacks=[callback])
    assert sum(get_rank_pattern(model).values()) == 8


def test_max_rank_caps_the_budget_while_pruning():
    model = compile_model(two_branch_model())
    log = BatchLog()
    callback = RankBudgetCallback(
        target_rank=2, max_rank=3, tinit=8, tfinal=32, delta_t=2
    )
    model.fit(*regression_data(), batch_size=8, epochs=5, verbose=0, callbacks=[callback, log])
    # b(10) = 14 > 4 layers * max_rank 3: every layer keeps 3.
    assert log.budget[9] == 12 and log.rank[9] == 12
    assert max(get_rank_pattern(model).values()) <= 3
    assert sum(get_rank_pattern(model).values()) == 8


def test_compacting_mid_schedule_keeps_the_schedule_and_trains_on(tmp_path):
    optimizer = keras.optimizers.Adam(0.01, gradient_accumulation_steps=2)
    model = compile_model(two_branch_model(), optimizer=optimizer)
    kwargs = dict(target_rank=1, tinit=4, tfinal=16, delta_t=2, total_steps=32)
    data = regression_data()
    model.fit(*data, batch_size=8, epochs=4, verbose=0, callbacks=[RankBudgetCallback(**kwargs)])
    assert sum(get_rank_pattern(model).values()) == 4
    compact_adalora(model)
    assert int(to_numpy(model.optimizer.iterations)) == 16
    assert int(to_numpy(model.optimizer.last_mask_step)) >= 16
    model.fit(*data, batch_size=8, epochs=4, verbose=0, callbacks=[RankBudgetCallback(**kwargs)])
    assert int(to_numpy(model.optimizer.iterations)) == 32
    assert sum(get_rank_pattern(model).values()) == 4
    model.save(tmp_path / "compacted.keras")
    keras.saving.load_model(tmp_path / "compacted.keras")


def test_compacting_during_pruning_still_reaches_the_exact_budget():
    model = compile_model(two_branch_model())
    kwargs = dict(target_rank=1, tinit=4, tfinal=24, delta_t=2, total_steps=32)
    x, y = regression_data()
    # 12 of 32 steps: pruning has begun and is not done.
    model.fit(x[:48], y[:48], batch_size=8, epochs=2, verbose=0,
              callbacks=[RankBudgetCallback(**kwargs)])
    alive = sum(get_rank_pattern(model).values())
    assert 4 < alive < 16
    compact_adalora(model)
    assert [layer.adapter_rank for layer in adapted_layers(model)] == list(
        get_rank_pattern(model).values())
    log = BatchLog()
    model.fit(x[:40], y[:40], batch_size=8, epochs=4, verbose=0,
              callbacks=[RankBudgetCallback(**kwargs), log])
    assert int(to_numpy(model.optimizer.iterations)) == 32
    # The budget goes on down from where it was, to exactly 4 by tfinal.
    assert log.budget[0] <= alive and log.budget == sorted(log.budget, reverse=True)
    assert log.rank[-1] == log.budget[-1] == 4
    assert sum(get_rank_pattern(model).values()) == 4


@pytest.mark.parametrize("form, weight", [("squared", 0.1), ("norm", 0.5)])
def test_in_fit_scores_equal_scores_from_independently_computed_gradients(form, weight):
    # One step of `fit` (the whole data in one batch) from zero score state:
    # I_bar = (1 - beta1) * |theta * dL_task/dtheta|, theta before the step,
    # L_task the loss without the orthogonality penalty (of either form).
    from helpers import randomize_adapters
    from helpers import task_gradients

    model = compile_model(two_branch_model(orth_reg_weight=weight, orth_penalty=form))
    randomize_adapters(model, seed=3)
    for layer in adapted_layers(model):
        # Off orthonormal, so that the penalty's gradient is not zero.
        layer.adalora_a.assign(1.3 * to_numpy(layer.adalora_a))
        layer.adalora_b.assign(0.8 * to_numpy(layer.adalora_b))
    x, y = regression_data()
    callback = RankBudgetCallback(target_rank=2, tinit=4, tfinal=8, total_steps=10)
    callback.set_model(model)  # installs the scoring optimizer
    optimizer = model.optimizer
    ordered = [v for _, a, lam, b in optimizer._variable_parts for v in (a, lam, b)]
    before = [to_numpy(v).copy() for v in ordered]
    grads = task_gradients(model, x, y, ordered)
    # The used branch has task gradients, the dead one (times zero) none.
    largest = [float(np.abs(g).max()) for g in grads]
    assert max(largest) > 1e-4 and min(largest) == 0.0
    model.fit(x, y, batch_size=N, epochs=1, verbose=0, callbacks=[callback])
    ipt_bar = to_numpy(optimizer._score_state[0])
    expected = np.concatenate(
        [(1 - callback.beta1) * np.abs(t * g).reshape(-1) for t, g in zip(before, grads)])
    assert ipt_bar.shape == expected.shape
    np.testing.assert_allclose(ipt_bar, expected, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("importance", ["sensitivity", "frobenius"])
def test_host_scores_equal_the_in_graph_scores(importance):
    model = compile_model(two_branch_model())
    callback = RankBudgetCallback(
        target_rank=2, tinit=8, tfinal=40, delta_t=4, total_steps=48, importance=importance
    )
    model.fit(*regression_data(), batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    optimizer = model.optimizer
    paths = optimizer.adapter_layer_paths
    components, layer_scores = optimizer.scores_on_host(paths)
    for path, on_host, total in zip(paths, components, layer_scores):
        layer = model.get_layer(path)
        if importance == "frobenius":
            want = importance_lib.frobenius_component_scores(layer.adalora_lam)
            index = paths.index(path)
            want_total = to_numpy(optimizer._score_state[0])[index]
        else:
            # One flat pair of buffers over every adapter entry, in order.
            ipt, unc = (to_numpy(v) for v in optimizer._score_state)
            offset = 0
            for key in paths[: paths.index(path)]:
                other = model.get_layer(key)
                for v in (other.adalora_a, other.adalora_lam, other.adalora_b):
                    offset += int(np.prod(v.shape))
            parts = []
            for variable in (layer.adalora_a, layer.adalora_lam, layer.adalora_b):
                size = int(np.prod(variable.shape))
                entries = slice(offset, offset + size)
                parts.append(
                    importance_lib.element_score(
                        ipt[entries].reshape(variable.shape),
                        unc[entries].reshape(variable.shape),
                    )
                )
                offset += size
            want = importance_lib.component_scores(*parts)
            want_total = to_numpy(want).sum()
        np.testing.assert_allclose(on_host, to_numpy(want), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(total, want_total, rtol=1e-5, atol=1e-12)
