"""Small models and utilities shared by the tests."""

import keras
import numpy as np


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def mlp(input_dim=16, hidden=32, outputs=3, name="mlp"):
    """A functional two-layer MLP with a named hidden layer and head."""
    inputs = keras.Input((input_dim,), name="features")
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden_2")(x)
    outputs = keras.layers.Dense(outputs, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def randomize_adapters(model, seed=0):
    """Gives every adapter non-zero singular values (lam), so that adapted
    layers compute something different from their base layer."""
    from keras_adalora.targets import adapted_layers

    rng = np.random.default_rng(seed)
    for layer in adapted_layers(model):
        lam = rng.normal(size=layer.adalora_lam.shape).astype("float32")
        layer.adalora_lam.assign(lam)
    return model


def data(n=32, input_dim=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, input_dim)).astype("float32")
    y = rng.integers(0, classes, size=(n,))
    return x, y
