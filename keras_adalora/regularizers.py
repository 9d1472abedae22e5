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
    rank = a.shape[-1]
    eye = ops.eye(rank, dtype=a.dtype)
    gram_a = ops.matmul(ops.transpose(a), a) - eye
    gram_b = ops.matmul(b, ops.transpose(b)) - eye
    square_a = ops.sum(ops.square(gram_a))
    square_b = ops.sum(ops.square(gram_b))
    if squared:
        return square_a + square_b
    return _safe_sqrt(square_a) + _safe_sqrt(square_b)


def _safe_sqrt(x):
    """`sqrt(x)` whose gradient is 0 rather than NaN at `x = 0`."""
    positive = ops.greater(x, 0.0)
    return ops.where(positive, ops.sqrt(ops.where(positive, x, 1.0)), 0.0)
