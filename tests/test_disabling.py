"""`disable_adapter`: the adapted model run as its frozen base model."""

import keras
import numpy as np
import pytest
from helpers import data
from helpers import mlp
from helpers import randomize_adapters
from helpers import to_numpy

import keras_adalora
from keras_adalora import apply_adalora
from keras_adalora import disable_adapter


def adapted_mlp():
    """A model, its base outputs on `data()`, and the adapted model (with
    non-zero adapters, so that the two differ)."""
    model = mlp()
    x, _ = data()
    base = to_numpy(model(x))
    apply_adalora(model, init_rank=4, keep_trainable=["head"])
    randomize_adapters(model)
    return model, x, base


def snapshot(model):
    return [(v.path, to_numpy(v).copy()) for v in model.weights]


def test_inside_the_block_the_model_computes_its_base_outputs_exactly():
    model, x, base = adapted_mlp()
    model.compile(loss="mse")
    adapted = model.predict(x, verbose=0)  # traced with the adapters on
    assert np.abs(adapted - base).max() > 1e-3
    weights = snapshot(model)
    with disable_adapter(model) as same:
        assert same is model
        np.testing.assert_array_equal(to_numpy(model(x)), base)
        np.testing.assert_array_equal(model.predict(x, verbose=0), base)
        loss = model.evaluate(x, base, verbose=0)
        assert loss == 0.0
        # The effective kernel that some models read directly is the base one.
        layer = model.get_layer("hidden")
        np.testing.assert_array_equal(to_numpy(layer.kernel), to_numpy(layer._kernel))
    # Leaving the block gives the adapters back, bit for bit.
    np.testing.assert_array_equal(model.predict(x, verbose=0), adapted)
    for (path, before), (_, after) in zip(weights, snapshot(model)):
        np.testing.assert_array_equal(before, after, err_msg=path)


def test_blocks_nest_and_the_outer_one_stays_in_force():
    model, x, base = adapted_mlp()
    with disable_adapter(model):
        with disable_adapter(model):
            np.testing.assert_array_equal(to_numpy(model(x)), base)
        np.testing.assert_array_equal(to_numpy(model(x)), base)
    assert np.abs(to_numpy(model(x)) - base).max() > 1e-3


def test_a_compiled_train_step_gets_the_base_output_as_a_frozen_reference():
    # A custom loss that compares the model's output under the block with
    # the base model's: inside the compiled train step, it must be exactly 0,
    # although the adapted output (y_pred) is not.
    class WithReference(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         training=True):
            with disable_adapter(self):
                reference = self(x, training=False)
            return keras.ops.mean(keras.ops.square(reference - y))

    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="head")(hidden)
    model = WithReference(inputs, outputs)
    x, _ = data()
    base = to_numpy(model(x))
    apply_adalora(model, init_rank=4, keep_trainable=[])
    randomize_adapters(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(x, base, batch_size=8, epochs=2, verbose=0)
    # Zero up to the rounding of a compiled graph against eager ops (TF fuses
    # the matmul and the bias); the adapted outputs are ~1e-3 away and more.
    assert history.history["loss"] == pytest.approx([0.0, 0.0], abs=1e-10)
    assert np.abs(model.predict(x, verbose=0) - base).max() > 1e-3


def test_fit_and_merge_are_refused_inside_the_block_and_nothing_changes():
    model, x, base = adapted_mlp()
    model.compile(optimizer="adam", loss="mse")
    weights = snapshot(model)
    with disable_adapter(model):
        with pytest.raises(ValueError, match="inside `disable_adapter.*Call `fit` outside"):
            model.fit(x, base, verbose=0)
        with pytest.raises(ValueError, match="`merge_adalora` was called inside "
                           "`disable_adapter`.*Merge outside the block"):
            keras_adalora.merge_adalora(model)
    for (path, before), (_, after) in zip(weights, snapshot(model)):
        np.testing.assert_array_equal(before, after, err_msg=path)
    assert len(keras_adalora.get_rank_pattern(model)) == 2


def test_a_merged_or_plain_model_is_refused():
    model, x, _ = adapted_mlp()
    keras_adalora.merge_adalora(model)
    with pytest.raises(ValueError, match="`disable_adapter` found no AdaLoRA layer.*merged"):
        with disable_adapter(model):
            pass
    with pytest.raises(ValueError, match="`disable_adapter` found no AdaLoRA layer.*apply_adalora"):
        with disable_adapter(mlp()):
            pass
    # A merged layer keeps nothing of the block.
    assert "adapter_disabled" not in vars(model.get_layer("hidden"))
