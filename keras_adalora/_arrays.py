"""Tensors and Keras variables to NumPy, without NumPy 2's warnings."""

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
