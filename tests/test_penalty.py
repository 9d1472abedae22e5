"""The orthogonality penalty: its closed-form gradient, and who applies it
(the layers' losses, or the `AdaLoRAOptimizer` that watches them)."""

import keras
import numpy as np
import pytest
from helpers import to_numpy

from keras_adalora import AdaLoRAOptimizer
from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora.regularizers import grouped_penalty_gradients
from keras_adalora.regularizers import penalty_gradients
from keras_adalora.targets import adapted_layers


def reference_gradients(a, b, weight, form):
    """Central finite differences (float64) of the weighted layer penalty."""

    def penalty(a_, b_):
        ga = a_.T @ a_ - np.eye(a_.shape[1])
        gb = b_ @ b_.T - np.eye(b_.shape[0])
        if form == "squared":
            return weight * (np.sum(ga**2) + np.sum(gb**2))
        return weight * (np.linalg.norm(ga) + np.linalg.norm(gb)) / 2

    grads = []
    for which in (0, 1):
        x = (a, b)[which].astype("float64")
        grad = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            step = np.zeros_like(x)
            step[index] = 1e-6
            args = [a.astype("float64"), b.astype("float64")]
            args[which] = x + step
            up = penalty(*args)
            args[which] = x - step
            grad[index] = (up - penalty(*args)) / 2e-6
        grads.append(grad)
    return grads


@pytest.mark.parametrize("form", ["squared", "norm"])
def test_the_closed_form_gradient_equals_finite_differences(form):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4)).astype("float32")
    b = rng.normal(size=(4, 5)).astype("float32")
    for got, expected in zip(
        penalty_gradients(a, b, 0.3, form), reference_gradients(a, b, 0.3, form)
    ):
        np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("form", ["squared", "norm"])
def test_many_layers_at_once_equal_one_at_a_time(form):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 6, 4)).astype("float32")
    b = rng.normal(size=(3, 4, 5)).astype("float32")
    a[1] = np.eye(6, 4)  # orthonormal: a zero gradient in the norm form
    weights = [0.1, 0.2, 0.5]
    batched = penalty_gradients(a, b, weights, form)
    for i, weight in enumerate(weights):
        single = penalty_gradients(a[i], b[i], weight, form)
        for many, one in zip(batched, single):
            np.testing.assert_allclose(to_numpy(many)[i], to_numpy(one), rtol=1e-5, atol=1e-7)


def test_grouped_gradients_keep_each_layer_in_its_place():
    # Layers of two shapes and both forms, interleaved: each gets its own.
    rng = np.random.default_rng(1)
    shapes = [((6, 4), (4, 5)), ((3, 2), (2, 7)), ((6, 4), (4, 5)), ((6, 4), (4, 5))]
    factors = [
        (rng.normal(size=sa).astype("float32"), rng.normal(size=sb).astype("float32"))
        for sa, sb in shapes
    ]
    weights = [0.1, 0.2, 0.3, 0.4]
    forms = ["squared", "squared", "norm", "squared"]
    grouped = grouped_penalty_gradients(factors, weights, forms)
    for (a, b), weight, form, got in zip(factors, weights, forms, grouped):
        for g, e in zip(got, penalty_gradients(a, b, weight, form)):
            np.testing.assert_allclose(to_numpy(g), to_numpy(e), rtol=1e-5, atol=1e-7)


def small_model(form):
    inputs = keras.Input((12,))
    h = keras.layers.Dense(16, activation="tanh", name="h1")(inputs)
    h = keras.layers.Dense(16, activation="tanh", name="h2")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = keras.Model(inputs, outputs)
    apply_adalora(
        model, init_rank=4, target=["h1", "h2"], orth_penalty=form,
        orth_reg_weight=0.3, keep_trainable=["head"],
    )
    return model


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 12)).astype("float32")
    return x, np.sin(x[:, :1]).astype("float32")


def weights_of(model):
    return [to_numpy(v).copy() for v in model.trainable_variables]


@pytest.mark.parametrize("form", ["squared", "norm"])
@pytest.mark.parametrize("accumulate", [None, 2])
def test_the_optimizer_applying_the_penalty_trains_as_the_layers_losses_do(form, accumulate):
    # The same model, optimizer and data, trained twice: once with the
    # penalty in the layers' losses, once with the watching optimizer adding
    # its gradient. The weights end up the same; only the logged loss
    # differs, by the penalty.
    x, y = data()
    trained, losses = [], []
    for owned in (False, True):
        keras.utils.set_random_seed(0)
        model = small_model(form)
        for layer in adapted_layers(model):  # off orthonormal
            layer.adalora_a.assign(1.3 * to_numpy(layer.adalora_a))
        optimizer = AdaLoRAOptimizer(
            keras.optimizers.Adam(0.01, gradient_accumulation_steps=accumulate)
        )
        optimizer.watch(model)
        if not owned:
            optimizer.release_penalty()
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        owners = {layer.penalty_owner is not None for layer in adapted_layers(model)}
        assert owners == {owned}
        trained.append(weights_of(model))
        losses.append(history.history["loss"][-1])
    for one, other in zip(*trained):
        np.testing.assert_allclose(one, other, rtol=1e-4, atol=1e-6)
    # The layers' losses hold the penalty: their logged loss is the larger.
    assert losses[0] > losses[1] + 1e-3


def test_the_callback_hands_the_penalty_back_after_fit():
    # During a fit with the callback the optimizer applies the penalty;
    # afterwards the layers carry it again, so that a model recompiled with
    # a plain optimizer still trains under it.
    x, y = data()
    model = small_model("norm")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(
                all(
                    layer.penalty_owner is not None
                    and layer.penalty_owner() is self.model.optimizer
                    for layer in adapted_layers(self.model)
                )
            )

    callback = RankBudgetCallback(target_rank=2, tinit=1, tfinal=3, total_steps=8)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback, Probe()])
    assert seen and all(seen)
    assert all(layer.penalty_owner is None for layer in adapted_layers(model))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model(x, training=True)
    assert len(model.losses) == 2  # one penalty per adapted layer


def test_a_rebuilt_optimizer_takes_the_penalty_over():
    # Compaction rebuilds the compiled optimizer for the new variables: the
    # new wrapper applies the penalty the old one did.
    x, y = data()
    model = small_model("squared")
    optimizer = AdaLoRAOptimizer(keras.optimizers.Adam(0.01))
    optimizer.watch(model)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    layer = adapted_layers(model)[0]
    layer.rank_mask.assign([1.0, 0.0, 1.0, 1.0])
    compact_adalora(model)
    assert model.optimizer is not optimizer
    for layer in adapted_layers(model):
        assert layer.penalty_owner() is model.optimizer
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model(x, training=True)
    assert len(model.losses) == 0


@pytest.mark.parametrize("form", ["squared", "norm"])
def test_apply_adds_the_penalty_gradient_even_to_part_of_the_model(form):
    # A custom loop that applies one layer's gradients (zero here) with a
    # watching optimizer: plain SGD moves A and B by exactly the penalty's
    # gradient, and leaves lam and the other layer alone.
    model = small_model(form)
    first, second = adapted_layers(model)
    for layer in (first, second):
        layer.adalora_a.assign(1.3 * to_numpy(layer.adalora_a))
    optimizer = AdaLoRAOptimizer(keras.optimizers.SGD(0.1))
    optimizer.watch(model)
    optimizer.build(model.trainable_variables)
    variables = [first.adalora_a, first.adalora_lam, first.adalora_b]
    before = [to_numpy(v).copy() for v in variables + [second.adalora_a]]
    expected_a, expected_b = (
        to_numpy(g)
        for g in penalty_gradients(before[0], before[2], first.orth_reg_weight, form)
    )
    optimizer.apply([keras.ops.zeros(v.shape, "float32") for v in variables], variables)
    np.testing.assert_allclose(to_numpy(first.adalora_a), before[0] - 0.1 * expected_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(to_numpy(first.adalora_b), before[2] - 0.1 * expected_b, rtol=1e-5, atol=1e-7)
    assert np.abs(expected_a).max() > 1e-3
    np.testing.assert_array_equal(to_numpy(first.adalora_lam), before[1])
    np.testing.assert_array_equal(to_numpy(second.adalora_a), before[3])
