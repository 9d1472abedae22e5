"""The orthogonality penalty that keeps AdaLoRA's factors close to an SVD,
and its closed-form gradient."""

import numpy as np
from keras import ops

from keras_adalora._arrays import float32 as _float32


def orthogonality_penalty(a, b, squared=True):
    """Distance of the adapter factors from orthonormality.

    AdaLoRA writes an update as `A @ diag(lam) @ B` and asks `A` to have
    orthonormal columns and `B` orthonormal rows, so that `lam` behaves like
    singular values:

        R = ||A^T A - I||_F^2 + ||B B^T - I||_F^2

    or, with `squared=False`, the sum of the two norms themselves (the
    form Hugging Face PEFT uses).

    Args:
        a: tensor of shape `(d_in, r)`.
        b: tensor of shape `(r, d_out)`.
        squared: whether each Frobenius norm is squared.

    Returns:
        A scalar float32 tensor (`0.0` when `r == 0`).

    Example:

    >>> import numpy as np
    >>> float(orthogonality_penalty(np.eye(3, 2), np.eye(2, 4)))
    0.0
    """
    a = ops.cast(ops.convert_to_tensor(a), "float32")
    b = ops.cast(ops.convert_to_tensor(b), "float32")
    if squared:
        return _squared_penalty(a, b)
    return _norm_penalty(a, b)


def penalty_gradients(a, b, weight, form="squared"):
    """Gradients w.r.t. `A` and `B` of a layer's weighted orthogonality
    penalty, in closed form. With `G_A = A^T A - I` and `G_B = B B^T - I`:

    - `form="squared"`, `weight * (||G_A||^2 + ||G_B||^2)`:
      `4 weight A G_A` and `4 weight G_B B`;
    - `form="norm"`, `weight * (||G_A|| + ||G_B||) / 2`:
      `weight A G_A / ||G_A||` and `weight G_B B / ||G_B||` (0 where a
      factor is exactly orthonormal).

    `a` and `b` may carry a leading batch axis (`(n, d_in, r)` and
    `(n, r, d_out)`: `n` layers of one shape at once), `weight` then one
    value per layer.

    Args:
        a: tensor of shape `(d_in, r)` or `(n, d_in, r)`.
        b: tensor of shape `(r, d_out)` or `(n, r, d_out)`.
        weight: the penalty's weight, or a list of `n` weights.
        form: `"squared"` or `"norm"`.

    Returns:
        `(grad_a, grad_b)`, float32 tensors shaped like `a` and `b`.

    Example:

    >>> import numpy as np
    >>> grad_a, grad_b = penalty_gradients(np.eye(3, 2), np.eye(2, 4), 0.1)
    >>> float(np.abs(ops.convert_to_numpy(grad_a)).max())
    0.0
    """
    a, b = _float32(a), _float32(b)
    squared = form == "squared"
    gram_a, gram_b = _residuals(a, b)
    grad_a, grad_b = _factor_gradients(a, b, gram_a, gram_b, squared)
    if np.ndim(weight) and len(set(np.ravel(weight))) == 1:
        weight = float(np.ravel(weight)[0])  # one weight: a scalar
    if np.ndim(weight):
        weight = ops.convert_to_tensor(
            np.reshape(np.asarray(weight, "float32"), (-1, 1, 1))
        )
    if not squared:  # the norm form is halved: `(||G_A|| + ||G_B||) / 2`
        weight = 0.5 * weight
    return weight * grad_a, weight * grad_b


def grouped_penalty_gradients(factors, weights, forms):
    """`penalty_gradients` of many layers, those of one shape and form in
    one batched computation (a handful of operations per shape, not per
    layer).

    Args:
        factors: a list of `(a, b)` pairs, one per layer.
        weights: each layer's penalty weight.
        forms: each layer's penalty form.

    Returns:
        A list of `(grad_a, grad_b)`, one per layer, in order.
    """
    groups = {}
    for i, ((a, b), form) in enumerate(zip(factors, forms)):
        groups.setdefault((tuple(a.shape), tuple(b.shape), form), []).append(i)
    gradients = [None] * len(factors)
    for (_, _, form), members in groups.items():
        if len(members) == 1:  # no stacking for a shape of its own
            i = members[0]
            gradients[i] = penalty_gradients(*factors[i], weights[i], form)
            continue
        grad_a, grad_b = penalty_gradients(
            ops.stack([_float32(factors[i][0]) for i in members]),
            ops.stack([_float32(factors[i][1]) for i in members]),
            [weights[i] for i in members],
            form,
        )
        for i, pair in zip(
            members, zip(ops.unstack(grad_a), ops.unstack(grad_b))
        ):
            gradients[i] = pair
    return gradients




def _residuals(a, b):
    """`A^T A - I` and `B B^T - I`, over the last two axes."""
    eye = ops.eye(a.shape[-1], dtype="float32")
    swap = list(range(len(a.shape)))
    swap[-2:] = swap[-1], swap[-2]
    gram_a = ops.matmul(ops.transpose(a, swap), a) - eye
    gram_b = ops.matmul(b, ops.transpose(b, swap)) - eye
    return gram_a, gram_b


def _factor_gradients(a, b, gram_a, gram_b, squared):
    """The gradient of the unweighted `orthogonality_penalty(a, b, squared)`:
    `4 A G_A` and `4 G_B B`, or `2 A G_A / ||G_A||` and `2 G_B B / ||G_B||`."""
    grad_a = ops.matmul(a, gram_a)
    grad_b = ops.matmul(gram_b, b)
    if squared:
        return 4.0 * grad_a, 4.0 * grad_b
    return (
        2.0 * grad_a * _inverse_norm(gram_a),
        2.0 * grad_b * _inverse_norm(gram_b),
    )


def _inverse_norm(x):
    """`1 / ||x||_F` over the last two axes, at most `1e15`: finite where
    `x` is 0, so that `x`'s own product with it stays 0 there."""
    squared = ops.sum(ops.square(x), axis=(-2, -1), keepdims=True)
    return ops.rsqrt(ops.maximum(squared, 1e-30))


def _upstream(args, upstream):
    return args[0] if upstream is None else upstream


@ops.custom_gradient
def _squared_penalty(a, b):
    """`||A^T A - I||^2 + ||B B^T - I||^2`, with its closed-form gradient."""
    gram_a, gram_b = _residuals(a, b)

    def grad(*args, upstream=None):
        up = _upstream(args, upstream)
        grad_a, grad_b = _factor_gradients(a, b, gram_a, gram_b, True)
        return up * grad_a, up * grad_b

    return ops.sum(ops.square(gram_a)) + ops.sum(ops.square(gram_b)), grad


@ops.custom_gradient
def _norm_penalty(a, b):
    """`||A^T A - I|| + ||B B^T - I||`, with its closed-form gradient (0
    where a factor is exactly orthonormal)."""
    gram_a, gram_b = _residuals(a, b)

    def grad(*args, upstream=None):
        up = _upstream(args, upstream)
        grad_a, grad_b = _factor_gradients(a, b, gram_a, gram_b, False)
        return up * grad_a, up * grad_b

    norm_a = ops.sqrt(ops.sum(ops.square(gram_a)))
    norm_b = ops.sqrt(ops.sum(ops.square(gram_b)))
    return norm_a + norm_b, grad
