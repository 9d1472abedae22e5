"""AdaLoRA in hand-written training loops: the optimizer wrapper scores,
`RankAllocator.update(step)` prunes (README: "Custom training loops")."""

import keras
import pytest
from test_callback import regression_data
from test_callback import two_branch_model

from keras_adalora import AdaLoRAOptimizer
from keras_adalora import RankAllocator
from keras_adalora import get_rank_pattern

BACKEND = keras.backend.backend()


def mse(y, pred):
    return keras.ops.mean(keras.ops.square(pred - y))


def run_loop(model, optimizer, allocator, steps, batch=8):
    x, y = regression_data()
    batches = [
        (x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)
    ]
    if BACKEND == "jax":
        return _jax_loop(model, optimizer, allocator, steps, batches)
    for step in range(1, steps + 1):
        xb, yb = batches[(step - 1) % len(batches)]
        variables = model.trainable_variables
        if BACKEND == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = mse(yb, model(xb, training=True)) + sum(model.losses)
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, variables)
        else:
            import torch

            for v in variables:
                v.value.grad = None
            loss = mse(keras.ops.convert_to_tensor(yb), model(xb, training=True))
            (loss + sum(model.losses)).backward()
            grads = [v.value.grad for v in variables]
            with torch.no_grad():
                optimizer.apply(grads, variables)
        allocator.update(step)


def _jax_loop(model, optimizer, allocator, steps, batches):
    import jax

    def loss_fn(trainable, non_trainable, xb, yb):
        pred, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, xb, training=True, return_losses=True
        )
        return mse(yb, pred) + sum(losses), non_trainable

    @jax.jit
    def train_step(trainable, non_trainable, opt_vars, xb, yb):
        (_, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, xb, yb
        )
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars

    state = [
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    ]
    owners = [
        model.trainable_variables,
        model.non_trainable_variables,
        optimizer.variables,
    ]
    for step in range(1, steps + 1):
        xb, yb = batches[(step - 1) % len(batches)]
        state = list(train_step(*state, xb, yb))
        if allocator.due(step):
            # Masks and scores live in variables: write the loop's state
            # back, let the allocator write masks, read them again.
            for variables, values in zip(owners, state):
                for variable, value in zip(variables, values):
                    variable.assign(value)
            allocator.update(step)
            state = [[v.value for v in variables] for variables in owners]
    for variables, values in zip(owners, state):
        for variable, value in zip(variables, values):
            variable.assign(value)


def test_a_custom_loop_prunes_the_ignored_branch_to_the_exact_budget():
    model = two_branch_model()
    optimizer = AdaLoRAOptimizer(keras.optimizers.Adam(0.01))
    optimizer.watch(model)
    optimizer.build(model.trainable_variables)
    allocator = RankAllocator(
        model, optimizer, target_rank=2, tinit=8, tfinal=32, delta_t=4, total_steps=40
    )
    assert allocator.alive == 16 and allocator.budget_at(8) == 16
    run_loop(model, optimizer, allocator, steps=40)
    assert allocator.frozen and allocator.alive == 8
    assert get_rank_pattern(model) == {
        "used_1": 4,
        "used_2": 4,
        "dead_1": 0,
        "dead_2": 0,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_rank": 5}, "target_rank"),
        ({"tinit": 0.2, "tfinal": 0.8}, "total_steps"),
        ({"tinit": 10, "tfinal": 50, "total_steps": 40}, "tfinal"),
        ({"allocation": "by_magic"}, "allocation"),
        ({"min_rank": 3}, "min_rank"),
    ],
)
def test_the_allocator_checks_its_arguments_against_the_model(kwargs, message):
    model = two_branch_model()
    optimizer = AdaLoRAOptimizer(keras.optimizers.Adam(0.01))
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match=message):
        RankAllocator(
            model, optimizer, **{"target_rank": 2, "tinit": 1, "tfinal": 5, **kwargs}
        )
