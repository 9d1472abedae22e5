"""`AdaLoRAEmbedding`: an `Embedding` with a frozen table and an AdaLoRA adapter."""

import keras
from keras import backend
from keras import ops

from keras_adalora import _keras
from keras_adalora import quantization
from keras_adalora.adapter import AdaptedLayerMixin
from keras_adalora.adapter import LookupTableMixin


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAEmbedding(LookupTableMixin, AdaptedLayerMixin, keras.layers.Embedding):
    """An `Embedding` layer with a frozen table and an AdaLoRA adapter.

    The table `E (input_dim, output_dim)` is frozen; the layer learns
    `delta_E = (alpha / init_rank) * A @ diag(lam * rank_mask) @ B`, with the
    rows of `A (input_dim, r)` looked up by token id like the table's own.

    An `Embedding` that Keras quantized to int8 or int4 (`model.quantize`)
    adapts too: its quantized table and scales stay frozen, lookups run
    through Keras's own quantized path, and the adapter stays float32
    (`keras_adalora.quantization`).

    Args:
        input_dim: Size of the vocabulary.
        output_dim: Dimension of the embedding.
        init_rank: Number of rank-1 components the adapter starts with; at
            most `min(input_dim, output_dim)`.
        alpha: Scale numerator; the adapter is multiplied by
            `alpha / init_rank`. Defaults to `init_rank` (a scale of 1)
            with `factor_init="normal"`, and to
            `init_rank * sqrt(d_in * d_out) / 12` with `"orthogonal"`,
            `(d_in, d_out)` the kernel read as a matrix (set when the layer
            is built).
        dropout: Must be `0`: an embedding's inputs are token ids, which
            dropout does not apply to.
        orth_reg_weight: Weight of this layer's orthogonality penalty,
            added to the model's losses during training; `0` disables it.
            Defaults to 0.5 with `orth_penalty="norm"` and 0.1 with
            `"squared"`.
        factor_init: How `A` and `B` start: `"normal"` (entries drawn from
            N(0, 0.02^2)) or `"orthogonal"` (random orthonormal factors).
        orth_penalty: The penalty's form: `"norm"`,
            `(||A^T A - I||_F + ||B B^T - I||_F) / 2`, or `"squared"`,
            `||A^T A - I||_F^2 + ||B B^T - I||_F^2`.
        adapter_rank: Number of components stored (set by deserialization
            after `compact_adalora`).
        **kwargs: Every other `keras.layers.Embedding` argument.

    Example:

    >>> layer = AdaLoRAEmbedding(100, 16, init_rank=4)
    >>> tuple(layer(np.array([[1, 2, 3]])).shape)
    (1, 3, 16)
    """

    wrapped_class = keras.layers.Embedding

    def __init__(
        self,
        input_dim,
        output_dim,
        init_rank=12,
        alpha=None,
        dropout=0.0,
        orth_reg_weight=None,
        factor_init="normal",
        orth_penalty="norm",
        adapter_rank=None,
        **kwargs,
    ):
        super().__init__(input_dim, output_dim, **kwargs)
        self._init_adapter(
            init_rank,
            alpha,
            dropout,
            orth_reg_weight,
            adapter_rank=adapter_rank,
            factor_init=factor_init,
            orth_penalty=orth_penalty,
        )

    @staticmethod
    def _base_named_weights(layer):
        # The table, then a quantized table's scales.
        return (
            ("embeddings", _keras.kernel_variable(layer)),
        ) + quantization.quantized_weights(layer)

    def _adapter_matrix_shape(self):
        return quantization.kernel_shape(self)

    @property
    def embeddings(self):
        """The effective table `E + delta_E` (a tensor, not a variable)."""
        return self._effective_kernel()

    def call(self, inputs, training=None):
        if backend.standardize_dtype(inputs.dtype) not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        if self.quantization_mode is not None:
            outputs = quantization.frozen_output(self, inputs)
        else:
            outputs = ops.take(_keras.kernel_variable(self), inputs, axis=0)
        outputs = ops.cast(outputs, self.compute_dtype)
        return ops.add(outputs, self.adapter_output(inputs, training=training))
