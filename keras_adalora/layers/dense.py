"""`AdaLoRADense`: a `Dense` layer with a frozen kernel and an AdaLoRA adapter."""

import keras
from keras import ops

from keras_adalora import _keras
from keras_adalora import quantization
from keras_adalora.adapter import AdaptedLayerMixin


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRADense(AdaptedLayerMixin, keras.layers.Dense):
    """A `Dense` layer whose update is an adaptive-rank SVD-form adapter.

    The kernel `W (d_in, units)` and the bias are frozen; the layer learns

        delta_W = (alpha / init_rank) * A @ diag(lam * rank_mask) @ B

    with `A (d_in, r)`, `lam (r,)` and `B (r, units)` trainable and
    `rank_mask` a non-trainable 0/1 vector that `RankBudgetCallback` writes
    to prune rank-1 components during training. `lam` starts at zero, so a
    freshly adapted layer computes exactly what the plain layer did. The
    forward pass adds `((x @ A) * (scale * lam * rank_mask)) @ B` to
    `x @ W`; on JAX, for a float32 layer without adapter dropout, it
    multiplies `x` by `W + delta_W` instead.

    Most users get these layers from `keras_adalora.apply_adalora(model)`;
    build one directly, or from an existing built `Dense` with
    `AdaLoRADense.from_layer(layer, init_rank=...)`.

    A `Dense` that Keras quantized to int8 or int4 (`model.quantize`)
    adapts too: its quantized kernel and scales stay frozen, `x @ W` runs
    through Keras's own quantized path, and the adapter stays float32
    (`keras_adalora.quantization`).

    Args:
        units: Positive integer, dimensionality of the output space.
        init_rank: Number of rank-1 components the adapter starts with
            (SPEC's `r0`); at most `min(d_in, units)`.
        alpha: Scale numerator; the adapter is multiplied by
            `alpha / init_rank`. Defaults to `init_rank` (a scale of 1)
            with `factor_init="normal"`, and to
            `init_rank * sqrt(d_in * d_out) / 12` with `"orthogonal"`,
            `(d_in, d_out)` the kernel read as a matrix (set when the layer
            is built).
        dropout: Dropout rate applied to the adapter's input only.
        orth_reg_weight: Weight of this layer's orthogonality penalty,
            added to the model's losses during training; `0` disables it.
            Defaults to 0.5 with `orth_penalty="norm"` and 0.1 with
            `"squared"`.
        factor_init: How `A` and `B` start: `"normal"` (entries drawn from
            N(0, 0.02^2)) or `"orthogonal"` (random orthonormal factors).
        orth_penalty: The penalty's form: `"norm"`,
            `(||A^T A - I||_F + ||B B^T - I||_F) / 2`, or `"squared"`,
            `||A^T A - I||_F^2 + ||B B^T - I||_F^2`.
        adapter_rank: Number of components stored; equals `init_rank` until
            `compact_adalora` removes the pruned ones. Set by deserialization,
            not by users.
        **kwargs: Every other `keras.layers.Dense` argument (`activation`,
            `use_bias`, initializers, regularizers, `name`, `dtype`, ...).

    Example:

    >>> layer = AdaLoRADense(16, init_rank=4, activation="relu")
    >>> y = layer(np.ones((2, 8)))
    >>> tuple(y.shape), layer.active_rank
    ((2, 16), 4)
    """

    wrapped_class = keras.layers.Dense

    def __init__(
        self,
        units,
        init_rank=12,
        alpha=None,
        dropout=0.0,
        orth_reg_weight=None,
        factor_init="normal",
        orth_penalty="norm",
        adapter_rank=None,
        **kwargs,
    ):
        super().__init__(units, **kwargs)
        self._init_adapter(
            init_rank,
            alpha,
            dropout,
            orth_reg_weight,
            adapter_rank=adapter_rank,
            factor_init=factor_init,
            orth_penalty=orth_penalty,
        )

    def _adapter_matrix_shape(self):
        return quantization.kernel_shape(self)

    def _kernel_from_matrix(self, matrix):
        return matrix

    def _adapter_project_in(self, inputs, a):
        return ops.matmul(inputs, a)

    def _adapter_project_out(self, h, b):
        return ops.matmul(h, b)

    @property
    def kernel(self):
        """The effective kernel `W + delta_W` (a tensor, not a variable)."""
        return self._effective_kernel()

    folds_into_kernel = True

    def _float_output(self, inputs, kernel=None):
        if kernel is None:
            kernel = _keras.kernel_variable(self)
        return ops.matmul(inputs, kernel)

    def call(self, inputs, training=None):
        return self._forward(inputs, training)
