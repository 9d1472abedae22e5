"""Tensors and Keras variables to NumPy, without NumPy 2's warnings, and to
float32 tensors."""

import keras
import numpy as np
from keras import ops


def to_numpy(x):
    """`x` (a tensor, a `keras.Variable` or an array) as a NumPy array.

    NumPy 2 warns (`DeprecationWarning`, "`__array__` ... copy keyword")
    when it converts a Keras variable (JAX), a TensorFlow variable or a
    torch tensor through `__array__`, as `ops.convert_to_numpy` does: a
    variable is read through its `value`, and a TensorFlow or torch tensor
    through its own `numpy()`.

    >>> to_numpy(keras.Variable([1.0, 2.0])).tolist()
    [1.0, 2.0]
    """
    if isinstance(x, keras.Variable):
        x = x.value
    if keras.backend.backend() == "torch" and hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    if keras.backend.backend() == "tensorflow" and hasattr(x, "numpy"):
        return np.asarray(x.numpy())
    return np.asarray(ops.convert_to_numpy(x))


def float32(x):
    """`x` (a tensor, a `keras.Variable` or an array) as a float32 tensor,
    with no operation where it already is one (on eager torch each
    operation costs its dispatch)."""
    # convert_to_tensor first: JAX's ops refuse raw Keras Variables.
    x = ops.convert_to_tensor(x)
    if keras.backend.standardize_dtype(x.dtype) == "float32":
        return x
    return ops.cast(x, "float32")
