"""AdaLoRA in a hand-written training loop, on every Keras backend.

`model.fit` with `RankBudgetCallback` is all most users need. When you
write your own loop, two objects do the callback's work:

- `AdaLoRAOptimizer` wraps your optimizer and updates every component's
  importance score from the gradients it applies;
- `RankAllocator` applies the budget schedule: `allocator.update(step)` after
  each optimizer step writes the rank masks when a mask step is due.

This script builds a functional-API classifier for scikit-learn's bundled
handwritten digits (offline), adapts its hidden layers and trains it with
the loop of the current backend: `tf.GradientTape` on TensorFlow,
`loss.backward()` on PyTorch, and a jitted `stateless_call` /
`stateless_apply` step on JAX (where the loop holds the state, so it is
written back to the variables around each mask update).

    python examples/custom_loop.py --backend jax
    python examples/custom_loop.py --backend torch --steps 600
"""

import argparse
import os


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=["jax", "tensorflow", "torch"],
        default=os.environ.get("KERAS_BACKEND", "jax"),
    )
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--smoke", action="store_true", help="tiny run, for CI")
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error("--steps must be at least 10 (the schedule needs room)")
    if args.smoke:
        args.steps = 40
    return args


def train(model, optimizer, allocator, batches, loss_fn, steps):
    """Trains `model` for `steps` optimizer steps, pruning on schedule.

    Args:
        model: an adapted Keras model.
        optimizer: its `AdaLoRAOptimizer`, built for
            `model.trainable_variables`.
        allocator: the `RankAllocator` of `model` and `optimizer`.
        batches: a list of `(x, y)` batches, cycled through.
        loss_fn: `loss_fn(y, predictions)`, a scalar.
        steps: number of optimizer steps.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        return _train_jax(model, optimizer, allocator, batches, loss_fn, steps)
    variables = model.trainable_variables
    for step in range(1, steps + 1):
        x, y = batches[(step - 1) % len(batches)]
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                # model.losses holds any other losses: the optimizer applies
                # the adapters' orthogonality penalty (it watches the model).
                loss = loss_fn(y, model(x, training=True)) + sum(model.losses)
            optimizer.apply(tape.gradient(loss, variables), variables)
        else:
            import torch

            for variable in variables:
                variable.value.grad = None
            loss = loss_fn(keras.ops.convert_to_tensor(y), model(x, training=True))
            (loss + sum(model.losses)).backward()
            with torch.no_grad():
                optimizer.apply([v.value.grad for v in variables], variables)
        allocator.update(step)  # writes the masks when a mask step is due


def _train_jax(model, optimizer, allocator, batches, loss_fn, steps):
    import jax

    def compute_loss(trainable, non_trainable, x, y):
        predictions, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        return loss_fn(y, predictions) + sum(losses), non_trainable

    @jax.jit
    def train_step(trainable, non_trainable, optimizer_state, x, y):
        (_, non_trainable), grads = jax.value_and_grad(
            compute_loss, has_aux=True
        )(trainable, non_trainable, x, y)
        trainable, optimizer_state = optimizer.stateless_apply(
            optimizer_state, grads, trainable
        )
        return trainable, non_trainable, optimizer_state

    owners = [
        model.trainable_variables,
        model.non_trainable_variables,
        optimizer.variables,
    ]

    def write_back(state):
        for variables, values in zip(owners, state):
            for variable, value in zip(variables, values):
                variable.assign(value)

    state = [[v.value for v in variables] for variables in owners]
    for step in range(1, steps + 1):
        x, y = batches[(step - 1) % len(batches)]
        state = list(train_step(*state, x, y))
        if allocator.due(step):
            # Scores and masks live in variables: hand the loop's state to
            # them, let the allocator write the masks, read everything back.
            write_back(state)
            allocator.update(step)
            state = [[v.value for v in variables] for variables in owners]
    write_back(state)


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import keras_adalora

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    # A functional model; its hidden layers get AdaLoRA, its head trains.
    inputs = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(64, activation="relu", name="hidden_1")(inputs)
    h = keras.layers.Dense(64, activation="relu", name="hidden_2")(h)
    outputs = keras.layers.Dense(10, name="head")(h)
    model = keras.Model(inputs, outputs, name="digits")
    keras_adalora.apply_adalora(model, init_rank=8, keep_trainable=["head"])

    optimizer = keras_adalora.AdaLoRAOptimizer(keras.optimizers.Adam(1e-2))
    optimizer.watch(model)  # it applies the orthogonality penalty
    optimizer.build(model.trainable_variables)
    allocator = keras_adalora.RankAllocator(
        model,
        optimizer,
        target_rank=4,
        tinit=0.1,
        tfinal=0.7,
        total_steps=args.steps,
        delta_t=5,
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    batches = [
        (x_train[i : i + 32], y_train[i : i + 32])
        for i in range(0, len(x_train) - 31, 32)
    ]
    train(model, optimizer, allocator, batches, loss, args.steps)

    accuracy = float(
        np.mean(np.argmax(keras.ops.convert_to_numpy(model(x_test)), -1) == y_test)
    )
    print(f"Backend {keras.backend.backend()}: {args.steps} steps")
    print(f"Test accuracy: {accuracy:.3f}")
    print(f"Budget {allocator.target_budget} components; ranks frozen: {allocator.frozen}")
    keras_adalora.summary(model, budget=allocator)
    return accuracy


if __name__ == "__main__":
    main()
