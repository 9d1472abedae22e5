"""AdaLoRA in hand-written training loops: the optimizer wrapper scores,
`RankAllocator.update(step)` prunes (README: "Custom training loops")."""

import pathlib
import sys

import keras
import pytest
from test_callback import regression_data
from test_callback import two_branch_model

from keras_adalora import AdaLoRAOptimizer
from keras_adalora import RankAllocator
from keras_adalora import get_rank_pattern

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from custom_loop import train  # noqa: E402


def mse(y, pred):
    return keras.ops.mean(keras.ops.square(pred - y))


def run_loop(model, optimizer, allocator, steps, batch=8):
    """The loop of examples/custom_loop.py, on the current backend."""
    x, y = regression_data()
    batches = [
        (x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)
    ]
    train(model, optimizer, allocator, batches, mse, steps)


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


def test_a_custom_loop_prunes_to_a_parameter_budget():
    # Components of used_1 (12 x 16) and dead_1 cost 29, of used_2 and dead_2
    # (16 x 16) 33: 4 x 29 + 4 x 33 = 248 parameters fit the used branch.
    model = two_branch_model()
    optimizer = AdaLoRAOptimizer(keras.optimizers.Adam(0.01))
    optimizer.watch(model)
    optimizer.build(model.trainable_variables)
    allocator = RankAllocator(
        model, optimizer, target_params=248, tinit=8, tfinal=32, delta_t=4, total_steps=40
    )
    assert allocator.budget_unit == "parameters"
    assert allocator.alive_params == allocator.budget_at(8) == 496
    run_loop(model, optimizer, allocator, steps=40)
    assert allocator.frozen and allocator.alive_params == allocator.spent == 248
    assert get_rank_pattern(model) == {"used_1": 4, "used_2": 4, "dead_1": 0, "dead_2": 0}
