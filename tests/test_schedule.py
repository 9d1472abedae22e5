import math
from fractions import Fraction

import numpy as np
import pytest

from keras_adalora.schedule import budget_at
from keras_adalora.schedule import mask_due
from keras_adalora.schedule import resolve_step
from keras_adalora.schedule import validate_schedule


def exact_budget(step, b0, bt, tinit, tfinal):
    """SPEC.md section 5 in rational arithmetic, as an independent oracle."""
    if step <= tinit:
        return b0
    if step >= tfinal:
        return bt
    fraction = 1 - Fraction(step - tinit, tfinal - tinit)
    return math.floor(bt + (b0 - bt) * fraction**3)


# resolve_step ---------------------------------------------------------------


def test_an_int_step_is_returned_as_is():
    assert resolve_step(0, None, "tinit") == 0
    assert resolve_step(200, 1000, "tinit") == 200
    assert resolve_step(np.int64(7), None, "tinit") == 7
    assert type(resolve_step(np.int64(7), None, "tinit")) is int


def test_a_fraction_becomes_the_nearest_step_of_total_steps():
    assert resolve_step(0.25, 1000, "tfinal") == 250
    assert resolve_step(0.1, 7, "tinit") == 1  # 0.7 -> 1
    assert resolve_step(0.3, 7, "tinit") == 2  # 2.1 -> 2
    assert resolve_step(0.5, 5, "tinit") == 3  # halves round up


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_step_is_refused(value):
    with pytest.raises(ValueError, match="tinit"):
        resolve_step(value, 100, "tinit")


def test_a_negative_step_is_refused():
    with pytest.raises(ValueError, match="tfinal.*-3"):
        resolve_step(-3, 100, "tfinal")


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.2, float("nan")])
def test_a_float_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match=r"tinit.*fractions in \(0, 1\) of total_steps"):
        resolve_step(value, 100, "tinit")


def test_a_fraction_without_total_steps_asks_for_total_steps():
    with pytest.raises(ValueError, match="tfinal.*pass total_steps"):
        resolve_step(0.5, None, "tfinal")


def test_a_step_that_is_not_a_number_is_refused():
    with pytest.raises(ValueError, match="tinit.*'10'"):
        resolve_step("10", 100, "tinit")


# budget_at ------------------------------------------------------------------


def test_budget_follows_the_three_phases_on_a_hand_computed_example():
    # 96 - 32 = 64; at t=15 the cubic factor is (5/10)^3 = 1/8 -> 32 + 8.
    budgets = [
        budget_at(t, initial_budget=96, target_budget=32, tinit=10, tfinal=20)
        for t in (0, 10, 11, 15, 19, 20, 99)
    ]
    assert budgets == [96, 96, 32 + math.floor(64 * 0.729), 40, 32, 32, 32]


def test_budget_is_exact_on_random_schedules_and_never_increases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tinit = int(rng.integers(0, 50))
        tfinal = tinit + int(rng.integers(1, 300))
        bt = int(rng.integers(0, 200))
        b0 = bt + int(rng.integers(0, 5000))
        previous = b0
        for step in range(tinit - 2, tfinal + 3):
            budget = budget_at(
                step, initial_budget=b0, target_budget=bt, tinit=tinit, tfinal=tfinal
            )
            assert budget == exact_budget(step, b0, bt, tinit, tfinal)
            assert bt <= budget <= previous <= b0
            previous = budget


def test_budget_is_exact_where_floats_would_round_the_wrong_way():
    # 2916 * (2/9)^3 = 32 exactly, but in floats it is 31.999999999999993.
    assert math.floor(2916 * (1 - 7 / 9) ** 3) == 31
    budget = budget_at(7, initial_budget=2916, target_budget=0, tinit=0, tfinal=9)
    assert budget == 32


def test_equal_budgets_give_a_flat_schedule():
    for step in range(0, 30):
        assert budget_at(step, initial_budget=8, target_budget=8, tinit=5, tfinal=20) == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tinit": 10, "tfinal": 10}, "tinit.*tfinal"),
        ({"tinit": 11, "tfinal": 10}, "tinit.*tfinal"),
        ({"tinit": -1}, "tinit"),
        ({"target_budget": 97}, "target_budget=97.*initial_budget=96"),
        ({"target_budget": -1}, "target_budget"),
        ({"initial_budget": 1.5}, "initial_budget"),
        ({"tfinal": True}, "tfinal"),
    ],
)
def test_budget_at_refuses_bad_arguments(kwargs, message):
    arguments = {"initial_budget": 96, "target_budget": 32, "tinit": 0, "tfinal": 10}
    with pytest.raises(ValueError, match=message):
        budget_at(5, **{**arguments, **kwargs})


def test_budget_at_refuses_a_step_that_is_not_an_int():
    with pytest.raises(ValueError, match="step"):
        budget_at(5.0, initial_budget=96, target_budget=32, tinit=0, tfinal=10)


# mask_due -------------------------------------------------------------------

SCHEDULE = {"tinit": 10, "tfinal": 50, "delta_t": 10}


def test_masks_are_never_due_during_warm_up():
    assert not any(mask_due(step, None, **SCHEDULE) for step in range(-1, 11))


def test_the_first_mask_comes_delta_t_steps_after_tinit():
    assert not mask_due(19, None, **SCHEDULE)
    assert mask_due(20, None, **SCHEDULE)
    # A mask made at tinit or before counts from tinit.
    assert mask_due(20, 3, **SCHEDULE)


def test_masks_are_due_every_delta_t_steps_while_pruning():
    assert not mask_due(29, 20, **SCHEDULE)
    assert mask_due(30, 20, **SCHEDULE)
    assert mask_due(37, 20, **SCHEDULE)  # a late look still catches up


def test_the_final_mask_is_due_at_tfinal_even_between_two_intervals():
    assert mask_due(50, 45, **SCHEDULE)
    assert mask_due(80, None, **SCHEDULE)


def test_ranks_are_frozen_after_the_final_mask():
    assert not mask_due(51, 50, **SCHEDULE)
    assert not mask_due(10**6, 60, **SCHEDULE)


@pytest.mark.parametrize("stride", [1, 3, 7, 25, 100])
def test_a_callback_that_sees_every_nth_step_updates_at_the_right_steps(stride):
    mask_steps, last = [], None
    for step in range(0, 131, stride):
        if mask_due(step, last, **SCHEDULE):
            mask_steps.append(step)
            last = step
    assert all(step > SCHEDULE["tinit"] for step in mask_steps)
    assert sum(step >= SCHEDULE["tfinal"] for step in mask_steps) == 1
    assert mask_steps[-1] >= SCHEDULE["tfinal"]
    starts = [SCHEDULE["tinit"]] + mask_steps[:-2]
    assert all(b - a >= SCHEDULE["delta_t"] for a, b in zip(starts, mask_steps[:-1]))
    if stride == 1:
        assert mask_steps == [20, 30, 40, 50]


# validate_schedule ------------------------------------------------------------


def test_a_sensible_schedule_passes():
    validate_schedule(tinit=0, tfinal=100, total_steps=100, delta_t=1)
    validate_schedule(tinit=10, tfinal=100, total_steps=None, delta_t=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tinit": -1}, "tinit.*-1"),
        ({"tinit": 100, "tfinal": 100}, "tinit.*smaller than.*tfinal"),
        ({"tinit": 120}, "tinit.*smaller than.*tfinal"),
        (
            {"tfinal": 101},
            r"tfinal=101 is beyond the last step of training \(total_steps=100\)",
        ),
        ({"total_steps": 0}, "total_steps"),
        ({"delta_t": 0}, "delta_t=0"),
        ({"delta_t": 2.0}, "delta_t=2.0"),
        ({"delta_t": True}, "delta_t=True"),
    ],
)
def test_validate_schedule_names_the_argument_at_fault(kwargs, message):
    arguments = {"tinit": 10, "tfinal": 100, "total_steps": 100, "delta_t": 10}
    with pytest.raises(ValueError, match=message):
        validate_schedule(**{**arguments, **kwargs})
