"""The orthogonality penalty that keeps AdaLoRA's factors close to an SVD."""

from keras import ops


def orthogonality_penalty(a, b, squared=True):
    """Distance of the adapter factors from orthonormality.

    AdaLoRA writes an update as `A @ diag(lam) @ B` and asks `A` to have
    orthonormal columns and `B` orthonormal rows, so that `lam` behaves like
    singular values (paper eq. 4, SPEC.md section 2):

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


def _residuals(a, b):
    """`A^T A - I` and `B B^T - I`."""
    eye = ops.eye(a.shape[-1], dtype="float32")
    gram_a = ops.matmul(ops.transpose(a), a) - eye
    gram_b = ops.matmul(b, ops.transpose(b)) - eye
    return gram_a, gram_b


def _upstream(args, upstream):
    return args[0] if upstream is None else upstream


# Both penalties carry their closed-form gradient: one product per factor on
# the way back, where differentiating the forward pass op by op costs about
# twice its operations (what dominates a small model's step on eager torch).


@ops.custom_gradient
def _squared_penalty(a, b):
    """`||A^T A - I||^2 + ||B B^T - I||^2`; gradient `4 A G_A`, `4 G_B B`."""
    gram_a, gram_b = _residuals(a, b)

    def grad(*args, upstream=None):
        factor = 4.0 * _upstream(args, upstream)
        return factor * ops.matmul(a, gram_a), factor * ops.matmul(gram_b, b)

    return ops.sum(ops.square(gram_a)) + ops.sum(ops.square(gram_b)), grad


@ops.custom_gradient
def _norm_penalty(a, b):
    """`||A^T A - I|| + ||B B^T - I||`; gradient `2 A G_A / ||G_A||` and
    `2 G_B B / ||G_B||`, 0 where a factor is exactly orthonormal."""
    gram_a, gram_b = _residuals(a, b)
    norm_a = ops.sqrt(ops.sum(ops.square(gram_a)))
    norm_b = ops.sqrt(ops.sum(ops.square(gram_b)))

    def grad(*args, upstream=None):
        factor = 2.0 * _upstream(args, upstream)
        return (
            factor * ops.matmul(a, gram_a) * _inverse(norm_a),
            factor * ops.matmul(gram_b, b) * _inverse(norm_b),
        )

    return norm_a + norm_b, grad


def _inverse(x):
    """`1 / x`, and 0 where `x` is 0."""
    positive = ops.greater(x, 0.0)
    return ops.where(positive, 1.0 / ops.where(positive, x, 1.0), 0.0)
