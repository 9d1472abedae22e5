"""`AdaLoRAPositionEmbedding`: KerasHub's learned `PositionEmbedding` with a
frozen table and an AdaLoRA adapter."""

import sys

import keras
from keras import ops

from keras_adalora._validation import check_int
from keras_adalora.adapter import AdaptedLayerMixin
from keras_adalora.adapter import LookupTableMixin


class _KerasHubClass:
    """A class attribute that is KerasHub's layer class `name`, imported the
    first time it is read: keras-hub is optional, and importing it costs
    seconds that a user of plain Keras layers should not pay."""

    def __init__(self, name):
        self.name = name

    def __get__(self, instance, owner):
        try:
            import keras_hub
        except ImportError:
            raise ImportError(
                f"{owner.__name__} adapts KerasHub's `{self.name}` and merges "
                "back into it, which needs keras-hub: "
                "`pip install keras-hub`."
            ) from None
        return getattr(keras_hub.layers, self.name)


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAPositionEmbedding(
    LookupTableMixin, AdaptedLayerMixin, keras.layers.Layer
):
    """KerasHub's `PositionEmbedding` with a frozen table and an AdaLoRA adapter.

    GPT-2, BERT, OPT and other KerasHub models learn one vector per position
    in a `keras_hub.layers.PositionEmbedding` table
    `P (sequence_length, hidden_dim)`. Adapted, `P` is frozen and the layer
    learns `delta_P = (alpha / init_rank) * A @ diag(lam * rank_mask) @ B`,
    the rows of `A (sequence_length, r)` picked by position like the
    table's own; like the KerasHub layer it returns the rows for the
    positions of `inputs` (from `start_index`, or the given `positions`),
    broadcast to the shape of `inputs`. Merging gives back a KerasHub
    `PositionEmbedding` holding `P + delta_P`.

    `position_embeddings` stays the frozen table (KerasHub's checkpoint
    converters assign to it); `merged_kernel()` is the adapted one. Merge
    before serving with vLLM: this layer does not read vLLM's packed
    positions.

    Args:
        sequence_length: Number of positions in the table.
        initializer: Initializer of the table (used when the layer is built
            from its config; the weights are then loaded over it).
        init_rank: Number of rank-1 components the adapter starts with; at
            most `min(sequence_length, hidden_dim)`.
        alpha: Scale numerator; the adapter is multiplied by
            `alpha / init_rank`. Defaults to `init_rank` (a scale of 1)
            with `factor_init="normal"`, and to
            `init_rank * sqrt(d_in * d_out) / 12` with `"orthogonal"`,
            `(d_in, d_out)` the kernel read as a matrix (set when the layer
            is built).
        dropout: Must be `0`: the adapter's inputs are positions, which
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
        **kwargs: Every other `keras.layers.Layer` argument (`name`,
            `dtype`, ...).

    Example:

    >>> layer = AdaLoRAPositionEmbedding(sequence_length=10, init_rank=4)
    >>> tuple(layer(np.zeros((2, 6, 16))).shape)
    (2, 6, 16)
    """

    wrapped_class = _KerasHubClass("PositionEmbedding")

    def __init__(
        self,
        sequence_length,
        initializer="glorot_uniform",
        init_rank=12,
        alpha=None,
        dropout=0.0,
        orth_reg_weight=None,
        factor_init="normal",
        orth_penalty="norm",
        adapter_rank=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sequence_length = check_int(sequence_length, "sequence_length", 1)
        self.initializer = keras.initializers.get(initializer)
        self._init_adapter(
            init_rank,
            alpha,
            dropout,
            orth_reg_weight,
            adapter_rank=adapter_rank,
            factor_init=factor_init,
            orth_penalty=orth_penalty,
        )

    @classmethod
    def plain_class(cls):
        # No layer can be a KerasHub `PositionEmbedding` before keras_hub is
        # imported; asking then would import it for nothing.
        if "keras_hub" not in sys.modules:
            return None
        return cls.wrapped_class

    def get_config(self):
        config = super().get_config()
        config.update(
            sequence_length=self.sequence_length,
            initializer=keras.initializers.serialize(self.initializer),
        )
        return config

    def build(self, input_shape):
        if self.built:
            return
        # The table as KerasHub's layer creates it (one row per position,
        # the inputs' feature size), frozen from the start.
        self.position_embeddings = self.add_weight(
            name="embeddings",
            shape=(self.sequence_length, input_shape[-1]),
            initializer=self.initializer,
            trainable=False,
        )
        self._build_adapter()
        self.built = True

    @staticmethod
    def _base_named_weights(layer):
        return (("embeddings", layer.position_embeddings),)

    def _adapter_matrix_shape(self):
        return tuple(self.position_embeddings.shape)

    def call(self, inputs, start_index=0, positions=None, training=None):
        shape = ops.shape(inputs)
        if positions is None:
            positions = ops.arange(shape[-2], dtype="int32")
            positions = ops.add(positions, ops.cast(start_index, "int32"))
        else:
            positions = ops.cast(positions, "int32")
            if len(positions.shape) == 1:
                positions = ops.expand_dims(positions, axis=0)
        rows = ops.take(self.position_embeddings, positions, axis=0)
        rows = ops.cast(rows, self.compute_dtype)
        rows = ops.add(rows, self.adapter_output(positions, training=training))
        return ops.broadcast_to(rows, shape)

    def compute_output_shape(self, input_shape):
        return input_shape
