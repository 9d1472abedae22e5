"""AdaLoRA's three-phase rank budget schedule (SPEC.md section 5).

Everything here works on host-side Python integers: the rank budget callback
calls these functions at the end of a batch with the optimizer step, so no
tensor ever enters. Steps are absolute optimizer steps; `tinit` is the step
where pruning starts and `tfinal` the step where it ends.
"""

import numbers

from keras_adalora._validation import check_int
from keras_adalora._validation import is_int as _is_int


def _check_steps(value, name, minimum=0):
    return check_int(
        value,
        name,
        minimum,
        hint="Pass a whole number of optimizer steps or components.",
    )


def resolve_step(value, total_steps, name):
    """Turns a step given as an absolute count or a fraction into a step.

    `tinit` and `tfinal` may be given either as an optimizer step or as a
    fraction of training, e.g. `tinit=0.1` for "after 10% of the steps".

    Args:
        value: an int >= 0 (an absolute optimizer step), or a float in
            `(0, 1)`, a fraction of `total_steps`.
        total_steps: the number of optimizer steps in training, or `None`
            when unknown (then `value` must be an int).
        name: the argument's name, used in error messages.

    Returns:
        The step as a Python int; fractions are rounded to the nearest step
        (halves round up).

    Raises:
        ValueError: if `value` is a bool, negative, a float outside `(0, 1)`,
            not a number, or a fraction while `total_steps` is `None`.

    Example:

    >>> resolve_step(200, None, "tinit")
    200
    >>> resolve_step(0.25, 1000, "tfinal")
    250
    """
    if _is_int(value):
        return _check_steps(value, name)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(
            f"`{name}` must be an int (an optimizer step) or a float in (0, 1) "
            f"(a fraction of total_steps), got {name}={value!r}."
        )
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"`{name}` got the float {value!r}: floats must be fractions in "
            f"(0, 1) of total_steps. Pass an int for an absolute step."
        )
    if total_steps is None:
        raise ValueError(
            f"`{name}={value!r}` is a fraction of training, but the number of "
            f"steps is unknown: pass total_steps, or give {name} as an int."
        )
    total_steps = _check_steps(total_steps, "total_steps", minimum=1)
    # Round half up rather than Python's round-half-to-even: 0.5 * 5 -> 3.
    return int(value * total_steps + 0.5)


def budget_at(step, *, initial_budget, target_budget, tinit, tfinal):
    """Number of rank components allowed alive at an optimizer step.

    The cubic schedule of SPEC.md section 5: the full budget `B0` up to
    `tinit`, a cubic decay to `BT` between `tinit` and `tfinal`, then `BT`.
    It is computed in exact integer arithmetic, so the result never leaves
    `[target_budget, initial_budget]` and never increases with `step`.

    Args:
        step: the optimizer step, an int.
        initial_budget: `B0`, components alive before pruning starts.
        target_budget: `BT`, components alive from `tfinal` on.
        tinit: the step where pruning starts.
        tfinal: the step where pruning ends, `> tinit`.

    Returns:
        The budget `b(step)`, a Python int.

    Raises:
        ValueError: if an argument is not an integer, `tinit >= tfinal`, or
            not `0 <= target_budget <= initial_budget`.

    Example:

    >>> [budget_at(t, initial_budget=96, target_budget=32, tinit=10,
    ...            tfinal=20) for t in (0, 10, 15, 19, 20, 99)]
    [96, 96, 40, 32, 32, 32]
    """
    if not _is_int(step):
        raise ValueError(f"`step` must be an integer, got step={step!r}.")
    tinit = _check_steps(tinit, "tinit")
    tfinal = _check_steps(tfinal, "tfinal")
    if tinit >= tfinal:
        raise ValueError(
            f"`tinit` must be smaller than `tfinal`, got tinit={tinit} and "
            f"tfinal={tfinal}. Pruning runs from tinit to tfinal."
        )
    target_budget = _check_steps(target_budget, "target_budget")
    initial_budget = _check_steps(initial_budget, "initial_budget")
    if target_budget > initial_budget:
        raise ValueError(
            f"`target_budget` must not exceed `initial_budget`, got "
            f"target_budget={target_budget} and initial_budget={initial_budget}. "
            f"Lower target_rank/total_rank or raise init_rank."
        )
    if step <= tinit:
        return initial_budget
    if step >= tfinal:
        return target_budget
    # (1 - (t - tinit) / span) ** 3 == (tfinal - t) ** 3 / span ** 3; integer
    # floor division gives the floor of SPEC section 5 without float rounding.
    span = tfinal - tinit
    left = tfinal - int(step)
    extra = (initial_budget - target_budget) * left**3 // span**3
    return target_budget + extra


def mask_due(step, last_mask_step, *, tinit, tfinal, delta_t):
    """Whether the rank masks must be recomputed at an optimizer step.

    Masks are recomputed every `delta_t` steps while pruning (between `tinit`
    and `tfinal`), once more at or after `tfinal` for the final allocation at
    the target budget, and never after that. The callback may see only every
    Nth step, so the rules compare steps with inequalities, not modulo.

    Args:
        step: the current optimizer step.
        last_mask_step: the step of the previous mask update, or `None` if
            masks were never computed.
        tinit: the step where pruning starts.
        tfinal: the step where pruning ends.
        delta_t: steps between two mask updates while pruning.

    Returns:
        A Python bool.

    Example:

    >>> kwargs = dict(tinit=10, tfinal=50, delta_t=10)
    >>> mask_due(10, None, **kwargs), mask_due(20, None, **kwargs)
    (False, True)
    >>> mask_due(25, 20, **kwargs), mask_due(50, 40, **kwargs)
    (False, True)
    >>> mask_due(60, 50, **kwargs)
    False
    """
    if step <= tinit:
        return False
    if last_mask_step is not None and last_mask_step >= tfinal:
        # The final allocation was made: ranks stay frozen (phase 3).
        return False
    if step >= tfinal:
        return True
    since = tinit if last_mask_step is None else max(last_mask_step, tinit)
    return step - since >= delta_t


def validate_schedule(*, tinit, tfinal, total_steps, delta_t):
    """Checks that a resolved schedule makes sense before training starts.

    Args:
        tinit: the step where pruning starts, an int >= 0.
        tfinal: the step where pruning ends, an int > `tinit`.
        total_steps: the number of optimizer steps in training, or `None`
            when unknown (then `tfinal` is not checked against it).
        delta_t: steps between two mask updates, an int >= 1.

    Raises:
        ValueError: naming the argument at fault and what to change.

    Example:

    >>> validate_schedule(tinit=100, tfinal=800, total_steps=1000, delta_t=10)
    """
    _check_steps(tinit, "tinit")
    _check_steps(tfinal, "tfinal")
    if tinit >= tfinal:
        raise ValueError(
            f"`tinit` must be smaller than `tfinal`, got tinit={tinit} and "
            f"tfinal={tfinal}. tinit is where pruning starts and tfinal where "
            f"it ends; give tfinal a later step."
        )
    if total_steps is not None:
        _check_steps(total_steps, "total_steps", minimum=1)
        if tfinal > total_steps:
            raise ValueError(
                f"tfinal={tfinal} is beyond the last step of training "
                f"(total_steps={total_steps}): the target rank would never be "
                f"reached. Lower tfinal or train for more steps."
            )
    check_int(
        delta_t, "delta_t", 1, hint="(Optimizer steps between two mask updates.)"
    )
