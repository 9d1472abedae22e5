"""Argument checks shared by every public entry point, with one message
format: the argument's name, what it must be, and what was received."""

import numbers


def is_int(value):
    """Whether `value` is an integer (NumPy's too), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name, minimum=0, allow_none=False, hint=""):
    """Returns `value` as an int if it is an integer >= `minimum` (or None
    where allowed); raises a `ValueError` naming `name` otherwise.

    Example:

    >>> check_int(3, "delta_t", 1)
    3
    >>> check_int(0, "delta_t", 1)
    Traceback (most recent call last):
    ...
    ValueError: `delta_t` must be an integer >= 1. Received: delta_t=0.
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:
        expected = f"an integer >= {minimum}" + (
            " or None" if allow_none else ""
        )
        raise ValueError(
            f"`{name}` must be {expected}. Received: {name}={value!r}."
            + (f" {hint}" if hint else "")
        )
    return int(value)
