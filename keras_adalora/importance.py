"""Importance scores of adapter components (SPEC.md section 3).

Pure functions over `keras.ops` tensors, in the style of optax's
transformations: the caller owns the state (`I_bar`, `U_bar`, or one smoothed
norm per layer) and passes it in; the functions return the new state. They
contain no Python control flow on tensor values and no host round trips, so
they can run inside the compiled train step on every backend.

Scores are kept in float32 whatever the parameters' dtype: `|theta * grad|`
is tiny and smoothed over many steps, which bfloat16 would round away.
"""

import numbers

from keras import ops


def _float32(x):
    # convert_to_tensor first: JAX's ops refuse raw Keras Variables.
    return ops.cast(ops.convert_to_tensor(x), "float32")


def validate_betas(beta1, beta2):
    """Checks the two smoothing factors of the importance scores.

    Args:
        beta1: smoothing of the importance `I_bar`, a real number in `[0, 1)`.
        beta2: smoothing of the uncertainty `U_bar`, a real number in `[0, 1)`.

    Raises:
        ValueError: naming the first argument that is not a real number in
            `[0, 1)`.

    Example:

    >>> validate_betas(0.85, 0.85)
    """
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not is_real or not 0.0 <= value < 1.0:
            raise ValueError(
                f"`{name}` must be a real number in [0, 1) (an exponential "
                f"moving average factor; the paper uses 0.85), got "
                f"{name}={value!r}."
            )


def sensitivity_update(param, grad, ipt_bar, unc_bar, beta1, beta2):
    """One step of the smoothed sensitivity and its uncertainty.

    For every entry (SPEC.md section 3, the paper's eq. 8 and 9):

        I      = |param * grad|
        I_bar' = beta1 * I_bar + (1 - beta1) * I
        U_bar' = beta2 * U_bar + (1 - beta2) * |I - I_bar'|

    `U_bar'` uses the updated `I_bar'`, as the paper's reference code does.
    The betas are not validated here (it would run at every trace); check
    them once with `validate_betas`.

    Args:
        param: the parameter, a tensor or Keras Variable of any float dtype.
        grad: its gradient, same shape.
        ipt_bar: the previous `I_bar`, same shape.
        unc_bar: the previous `U_bar`, same shape.
        beta1: a Python float in `[0, 1)`.
        beta2: a Python float in `[0, 1)`.

    Returns:
        The tuple `(new_ipt_bar, new_unc_bar)` of float32 tensors.

    Example:

    >>> import numpy as np
    >>> ipt, unc = sensitivity_update(np.array([2.0]), np.array([-3.0]),
    ...                               np.zeros(1), np.zeros(1), 0.5, 0.5)
    >>> ops.convert_to_numpy(ipt).tolist(), ops.convert_to_numpy(unc).tolist()
    ([3.0], [1.5])
    """
    sensitivity = ops.abs(_float32(param) * _float32(grad))
    new_ipt_bar = beta1 * _float32(ipt_bar) + (1.0 - beta1) * sensitivity
    deviation = ops.abs(sensitivity - new_ipt_bar)
    new_unc_bar = beta2 * _float32(unc_bar) + (1.0 - beta2) * deviation
    return new_ipt_bar, new_unc_bar


def element_score(ipt_bar, unc_bar):
    """The score of every entry, `s = I_bar * U_bar` (SPEC.md section 3).

    Args:
        ipt_bar: the smoothed importance `I_bar`.
        unc_bar: the uncertainty `U_bar`, same shape.

    Returns:
        A float32 tensor of the same shape.

    Example:

    >>> ops.convert_to_numpy(element_score([2.0, 3.0], [0.5, 0.0])).tolist()
    [1.0, 0.0]
    """
    return _float32(ipt_bar) * _float32(unc_bar)


def component_scores(score_a, score_lam, score_b):
    """The score of each rank-1 component `(A[:, i], lam[i], B[i, :])`.

    `score_i = s(lam[i]) + mean_j s(A[j, i]) + mean_j s(B[i, j])`
    (SPEC.md section 3, the paper's eq. 10).

    Args:
        score_a: the entry scores of `A`, shape `(d_in, r)`.
        score_lam: the entry scores of `lam`, shape `(r,)`.
        score_b: the entry scores of `B`, shape `(r, d_out)`.

    Returns:
        A float32 tensor of shape `(r,)`.

    Example:

    >>> import numpy as np
    >>> scores = component_scores(np.ones((4, 2)), np.array([1.0, 0.0]),
    ...                           np.full((2, 3), 2.0))
    >>> ops.convert_to_numpy(scores).tolist()
    [4.0, 3.0]
    """
    return (
        _float32(score_lam)
        + ops.mean(_float32(score_a), axis=0)
        + ops.mean(_float32(score_b), axis=1)
    )


def frobenius_update(delta_norm, previous, beta1):
    """One step of the design note's layer score (SPEC.md section 3).

    `s_l' = beta1 * s_l + (1 - beta1) * ||delta_W_l||_F`.

    Args:
        delta_norm: `||delta_W_l||_F` at this step, a scalar tensor.
        previous: the previous smoothed score `s_l`.
        beta1: a Python float in `[0, 1)`.

    Returns:
        The new smoothed score, a float32 tensor.

    Example:

    >>> float(ops.convert_to_numpy(frobenius_update(4.0, 2.0, 0.75)))
    2.5
    """
    return beta1 * _float32(previous) + (1.0 - beta1) * _float32(delta_norm)


def frobenius_component_scores(lam):
    """Component scores inside a layer for the frobenius variant, `|lam|`.

    The layer-level score decides how much rank a layer keeps; inside the
    layer the components with the largest singular values `|lam[i]|` stay.

    Args:
        lam: the layer's singular values, shape `(r,)`.

    Returns:
        A float32 tensor of shape `(r,)`.

    Example:

    >>> ops.convert_to_numpy(frobenius_component_scores([-2.0, 0.5])).tolist()
    [2.0, 0.5]
    """
    return ops.abs(_float32(lam))


def is_finite(*tensors):
    """Whether every entry of every tensor is finite, as a scalar tensor.

    A step with an overflowed gradient (e.g. under a loss scaler) would turn
    the smoothed scores into NaN for good; a caller keeps the old state with
    `ops.where(is_finite(grad), new, old)` instead of branching in Python.

    Args:
        *tensors: any number of tensors (or Keras Variables) of any shape.

    Returns:
        A scalar bool tensor; `True` when no tensor is given.

    Example:

    >>> import numpy as np
    >>> bool(ops.convert_to_numpy(is_finite(np.ones(3), np.array([np.nan]))))
    False
    """
    finite = ops.convert_to_tensor(True)
    for tensor in tensors:
        all_finite = ops.all(ops.isfinite(ops.convert_to_tensor(tensor)))
        finite = ops.logical_and(finite, all_finite)
    return finite
