"""`AdaLoRAReversibleEmbedding`: a token embedding that is also the output
projection (KerasHub causal LMs), with a frozen table and an AdaLoRA
adapter."""

import keras
from keras import ops

from keras_adalora import _keras
from keras_adalora import quantization
from keras_adalora.adapter import ADAPTER_DTYPE
from keras_adalora.layers.embedding import AdaLoRAEmbedding


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAReversibleEmbedding(AdaLoRAEmbedding, keras.layers.ReversibleEmbedding):
    """A `ReversibleEmbedding` with a frozen table and an AdaLoRA adapter.

    KerasHub's GPT-2, Gemma, Llama and other causal LMs keep their token
    embeddings in a `ReversibleEmbedding`: called on token ids it looks rows
    up; called with `reverse=True` on hidden states it projects them onto
    the vocabulary (the logits). The adapter
    `delta_E = (alpha / init_rank) * A @ diag(lam * rank_mask) @ B` acts on
    the table `E (input_dim, output_dim)`:

    - lookups add the rows of `delta_E`, as `AdaLoRAEmbedding` does;
    - with `tie_weights=True` (one table both ways) the logits use
      `E + delta_E` too: `h @ E^T + ((h @ B^T) * c) @ A^T`, never forming
      `delta_E`, so the adapted layer computes what its merged table does;
    - with `tie_weights=False` the reverse projection is its own frozen
      matrix (`reverse_embeddings`), which the adapter leaves alone, as
      merging does.

    `reverse_dtype` and `logit_soft_cap` act as in the Keras layer. A
    layer that Keras quantized to int8 or int4 keeps its quantized tables
    frozen and runs both directions through Keras's own quantized path,
    the adapter term added before the soft cap.

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
        dropout: Must be `0`: lookups take token ids, which dropout does
            not apply to.
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
        **kwargs: Every other `keras.layers.ReversibleEmbedding` argument
            (`tie_weights`, `reverse_dtype`, `logit_soft_cap`, ...).

    Example:

    >>> layer = AdaLoRAReversibleEmbedding(100, 16, init_rank=4)
    >>> hidden = layer(np.array([[1, 2, 3]]))
    >>> tuple(layer(hidden, reverse=True).shape)
    (1, 3, 100)
    """

    wrapped_class = keras.layers.ReversibleEmbedding

    @staticmethod
    def _base_named_weights(layer):
        # The table, an untied layer's reverse table, then the scales of
        # quantized tables.
        named = [("embeddings", _keras.kernel_variable(layer))]
        if not layer.tie_weights:
            named.append(("reverse_embeddings", layer.reverse_embeddings))
        return tuple(named) + quantization.quantized_weights(layer)

    def call(self, inputs, reverse=False, training=None):
        if not reverse:
            outputs = super().call(inputs, training=training)
            mask = keras.layers.Embedding.compute_mask(self, inputs)
            if mask is not None:
                _keras.set_keras_mask(outputs, mask)
            return outputs
        if self.tie_weights:
            logits = self._tied_logits(inputs)
        elif self.quantization_mode is not None:
            logits = quantization.frozen_output(self, inputs, reverse=True)
        else:
            kernel = self.reverse_embeddings
            if self.reverse_dtype is not None:
                inputs = ops.cast(inputs, self.reverse_dtype)
                kernel = ops.cast(kernel, self.reverse_dtype)
            logits = ops.matmul(inputs, kernel)
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def _tied_logits(self, inputs):
        """`inputs @ (E + delta_E)^T`, with `delta_E` kept factored."""
        h = ops.cast(inputs, ADAPTER_DTYPE)
        h = ops.matmul(h, ops.transpose(self.adalora_b))
        h = self._scale_components(h)
        delta = ops.matmul(h, ops.transpose(self.adalora_a))
        if self.quantization_mode is not None:
            base = quantization.frozen_output(self, inputs, reverse=True)
        else:
            dtype = self.reverse_dtype or self.compute_dtype
            table = ops.transpose(_keras.kernel_variable(self))
            base = ops.matmul(ops.cast(inputs, dtype), ops.cast(table, dtype))
        return ops.add(base, ops.cast(delta, base.dtype))
