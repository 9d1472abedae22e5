"""Small models and utilities shared by the tests."""

import json
import os
import subprocess
import sys
import textwrap

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


def randomize_adapters(model, seed=0, std=1.0):
    """Gives every adapter non-zero singular values (lam, normal with
    standard deviation `std`), so that adapted layers compute something
    different from their base layer."""
    from keras_adalora.targets import adapted_layers

    rng = np.random.default_rng(seed)
    for layer in adapted_layers(model):
        lam = std * rng.normal(size=layer.adalora_lam.shape)
        lam = lam.astype("float32")
        layer.adalora_lam.assign(lam)
    return model


def data(n=32, input_dim=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, input_dim)).astype("float32")
    y = rng.integers(0, classes, size=(n,))
    return x, y


def embedding_mlp(hidden=32, classes=3, head_bias=True):
    """A base model with every adaptable kind: an embedding branch, a Dense
    and an EinsumDense layer, and a Dense head."""
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    features = keras.Input((16,), name="features")
    e = keras.layers.Embedding(40, 16, name="embed")(tokens)
    e = keras.layers.GlobalAveragePooling1D()(e)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(features)
    x = keras.layers.Concatenate()([x, e])
    x = keras.layers.EinsumDense("ab,bc->ac", output_shape=24, name="mix")(x)
    head = keras.layers.Dense(classes, use_bias=head_bias, name="head")
    return keras.Model([tokens, features], head(x))


def pruned_model(model=None, **kwargs):
    """`embedding_mlp` adapted, with some components pruned and non-zero
    singular values, so every saved number matters."""
    from keras_adalora import apply_adalora

    model = embedding_mlp() if model is None else model
    apply_adalora(model, init_rank=4, target=["embed", "hidden", "mix"], **kwargs)
    randomize_adapters(model)
    masks = {"embed": [1, 0, 1, 1], "hidden": [0, 0, 1, 0], "mix": [0, 0, 0, 0]}
    for name, mask in masks.items():
        model.get_layer(name).rank_mask.assign(np.array(mask, "float32"))
    return model


def inputs(seed=0):
    """A batch for `embedding_mlp`."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 40, size=(6, 5)).astype("int32"),
        rng.normal(size=(6, 16)).astype("float32"),
    ]


def run_in_fresh_process(backend, code):
    """Runs `code` under `backend` in a new Python process; its stdout."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Run first in every `fresh_process`: the tests folder on the path and a
# `report(**values)` that prints them as the last line of output, with
# whether keras_adalora was imported.
_FRESH_PROLOGUE = f"""
import json, sys, warnings
sys.path.insert(0, {TESTS_DIR!r})
import numpy as np

def report(**values):
    values["keras_adalora_imported"] = any(
        name.split(".")[0] == "keras_adalora" for name in sys.modules
    )
    print(json.dumps(values))
"""


def fresh_process(code, backend=None):
    """Runs `code` in a new Python process (the current backend unless
    `backend` is given) and returns what it passed to `report(...)`.

    Warnings are what a user would see: Python's default filters apply.
    """
    backend = backend or keras.backend.backend()
    out = run_in_fresh_process(backend, _FRESH_PROLOGUE + textwrap.dedent(code))
    return json.loads(out.strip().splitlines()[-1])


def task_gradients(model, x, y, variables):
    """The gradients of `mean((model(x, training=True) - y) ** 2)` with
    respect to `variables`, by the backend's own autodiff (`jax.grad`,
    `tf.GradientTape`, `backward()`), outside any Keras training code: the
    task loss alone, without the model's added losses."""
    backend = keras.backend.backend()
    x = keras.ops.convert_to_tensor(x)
    y = keras.ops.convert_to_tensor(y)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        def loss(values):
            out, _ = model.stateless_call(values, frozen, x, training=True)
            return jnp.mean((out - y) ** 2)

        grads = jax.grad(loss)(trainable)
        by_path = {v.path: g for v, g in zip(model.trainable_variables, grads)}
        return [to_numpy(by_path[v.path]) for v in variables]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean((out - y) ** 2)
        return [to_numpy(g) for g in tape.gradient(loss, [v.value for v in variables])]
    import torch

    for v in variables:
        v.value.grad = None
    out = model(x, training=True)
    torch.mean((out - y) ** 2).backward()
    grads = [to_numpy(v.value.grad) for v in variables]
    for v in variables:
        v.value.grad = None
    return grads
