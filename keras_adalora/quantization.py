"""How an adapted layer reads a base layer that Keras quantized.

Keras quantizes `Dense`, `EinsumDense` and `Embedding` layers in place
(`model.quantize("int8")`, `"int4"`): the kernel (or table) becomes an int8
variable (int4 values packed two per byte) with its scales, and the layer's
forward pass becomes its quantized pass, whose custom gradients dequantize
the kernel inside the backward pass only. An adapted quantized layer runs
that same pass for `x @ W` (`frozen_output`: for an embedding, the lookup
and the reverse projection), so it keeps Keras's memory and speed, and adds
the float32 adapter term, the bias and the activation (or soft cap)
itself. `merge_adalora` re-quantizes `W + delta_W` with Keras's
own `quantize` (`requantized_layer`), so a merged layer holds what
`model.quantize` gives the merged float model.

The quantized forward pass, the scale layout of `EinsumDense` and the int4
attributes are private Keras (as in `_keras.py`); everything here that
depends on them is checked by tests on each backend and on Keras nightly.
"""

import keras
import numpy as np
from keras import ops
from keras import quantizers

from keras_adalora._arrays import to_numpy
from keras_adalora import _keras

# The modes Keras trains through (its `enable_lora` runs on both).
TRAINABLE_MODES = ("int8", "int4")
_REFUSED = {
    "gptq": "post-training GPTQ quantization, whose calibrated kernel Keras "
    "runs for inference only (its own `enable_lora` refuses it)",
    "awq": "post-training AWQ quantization, whose calibrated kernel Keras "
    "runs for inference only",
    "float8": "float8 training, whose forward pass quantizes the inputs and "
    "gradients with scales it updates every step (Keras's own "
    "`enable_lora` does not run on it)",
}


def check_mode(layer, name):
    """Raises `ValueError` unless AdaLoRA can adapt `layer` in its
    quantization mode: `None`, or `int8`/`int4` on a `Dense`, an
    `EinsumDense` or an `Embedding`."""
    mode = layer.quantization_mode
    if mode is None:
        return
    fix = (
        "Adapt the float model, or one quantized with "
        "`model.quantize('int8')` or `model.quantize('int4')`"
    )
    if mode in _REFUSED:
        raise ValueError(
            f"Layer '{name}' is quantized with mode '{mode}': "
            f"{_REFUSED[mode]}, so AdaLoRA cannot train an adapter on it. "
            f"{fix}; or leave this layer out of `target`."
        )
    if mode not in TRAINABLE_MODES:
        raise ValueError(
            f"Layer '{name}' has quantization mode '{mode}', which AdaLoRA "
            f"does not know. {fix}."
        )
    kinds = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)
    if not isinstance(layer, kinds):
        raise ValueError(
            f"Layer '{name}' is a {type(layer).__name__} quantized to "
            f"'{mode}'; AdaLoRA adapts quantized Dense, EinsumDense and "
            "Embedding (ReversibleEmbedding included) layers only. Adapt the "
            "float layer (quantize only the others: "
            "`model.quantize(mode, filters=...)`), or leave this layer out "
            "of `target`."
        )


def _weight_view(layer):
    """Keras's `QuantizedWeight` view of a quantized layer's kernel (Keras
    3.16 and later: it knows the float shape and dequantizes), or `None`
    (a float layer, or an earlier Keras, read field by field below)."""
    if layer.quantization_mode is None or not hasattr(layer, "_quantized_weight"):
        return None
    return layer._quantized_weight()


def kernel_shape(layer):
    """The shape of `layer`'s kernel (or embedding table) as the float layer
    has it: int4 kernels are stored packed, in another shape."""
    view = _weight_view(layer)
    if view is not None:
        return tuple(view.shape)
    if layer.quantization_mode == "int4":
        if isinstance(layer, keras.layers.EinsumDense):
            return tuple(layer.original_kernel_shape)
        if isinstance(layer, keras.layers.Embedding):
            return (layer.input_dim, layer.output_dim)
        return (_keras.kernel_variable(layer).shape[0], layer.units)
    return tuple(_keras.kernel_variable(layer).shape)


def quantized_weights(layer):
    """`(name, variable)` pairs of the quantization state beside the kernel
    (or table) and bias: scales, and for grouped int4 zero points and
    `g_idx`, as Keras names them (an untied `ReversibleEmbedding`'s reverse
    table's too), in the order the layer created them; `()` for a float
    layer."""
    if layer.quantization_mode not in TRAINABLE_MODES:
        return ()
    trainable, non_trainable = _keras.own_variables(layer)
    # The prefixes leave out the kernel, table, reverse table and bias
    # themselves ("kernel", "embeddings", "reverse_embeddings", "bias").
    prefixes = (
        "kernel_",
        "zero_point",
        "g_idx",
        "embeddings_",
        "reverse_embeddings_",
    )
    return tuple(
        (variable.name, variable)
        for variable in trainable + non_trainable
        if variable.name.startswith(prefixes)
    )


def _int4_block_size(layer):
    size = getattr(layer, "_int4_block_size", None)
    return None if size in (None, -1) else int(size)


def float_kernel(layer):
    """`layer`'s kernel as float32, dequantized if it is quantized, in the
    float layer's kernel shape."""
    kernel = ops.convert_to_tensor(_keras.kernel_variable(layer))
    mode = layer.quantization_mode
    if mode is None:
        return ops.cast(kernel, "float32")
    view = _weight_view(layer)
    if view is not None:
        return view.dequantize("float32")
    # Keras 3.15: the same arithmetic as its layers' own dequantization.
    if isinstance(layer, keras.layers.Embedding):
        return _float_table(layer, kernel)
    scale = ops.cast(ops.convert_to_tensor(layer.kernel_scale), "float32")
    if mode == "int8":
        if isinstance(layer, keras.layers.EinsumDense):
            scale = layer._adjust_scale_for_dequant(scale)
        return ops.divide(ops.cast(kernel, "float32"), scale)
    # int4: a (rows, ceil(columns / 2)) matrix of packed values, rows the
    # contracted axes, quantized per column or per block of rows.
    if isinstance(layer, keras.layers.EinsumDense):
        columns = layer._int4_unpacked_column_size
    else:
        columns = layer.units
    values = ops.cast(quantizers.unpack_int4(kernel, columns, axis=-1), "float32")
    if _int4_block_size(layer) is None:
        matrix = ops.divide(values, scale)
    else:
        groups = ops.cast(ops.convert_to_tensor(layer.g_idx), "int32")
        zero = ops.cast(ops.convert_to_tensor(layer.kernel_zero), "float32")
        matrix = ops.multiply(
            ops.subtract(values, ops.take(zero, groups, axis=0)),
            ops.take(scale, groups, axis=0),
        )
    return ops.reshape(matrix, kernel_shape(layer))


def _float_table(layer, table):
    """A quantized `Embedding`'s table as float32 (Keras 3.15): int8 or
    int4 values per row (a token) over the row's scale, or over its groups
    of columns (grouped int4, with zero points)."""
    scale = ops.cast(ops.convert_to_tensor(layer.embeddings_scale), "float32")
    if layer.quantization_mode == "int8":
        return ops.divide(ops.cast(table, "float32"), ops.expand_dims(scale, -1))
    values = quantizers.unpack_int4(table, layer.output_dim, axis=-1)
    values = ops.cast(values, "float32")
    if _int4_block_size(layer) is None:
        return ops.divide(values, ops.expand_dims(scale, -1))
    groups = ops.cast(ops.convert_to_tensor(layer.g_idx), "int32")
    zero = ops.cast(ops.convert_to_tensor(layer.embeddings_zero), "float32")
    return ops.multiply(
        ops.subtract(values, ops.take(zero, groups, axis=1)),
        ops.take(scale, groups, axis=1),
    )


class _WithoutEpilogue:
    """`layer` as Keras's quantized forward pass sees it, with its bias,
    activation, logit soft cap and LoRA held aside: that pass then computes
    `x @ W` (a lookup, or `h @ E^T`) alone. The layer itself is never
    changed (this is safe inside a trace)."""

    bias = None
    activation = None
    logit_soft_cap = None
    lora_enabled = False

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name):
        return getattr(self._layer, name)


def frozen_output(layer, inputs, training=None, reverse=False):
    """`inputs @ W` of a quantized `layer`, computed by Keras's own
    quantized forward pass (its custom gradient included), without bias or
    activation. For an `Embedding`, the lookup of the token ids `inputs`;
    with `reverse=True` (a `ReversibleEmbedding`), the logits before any
    soft cap."""
    view = _WithoutEpilogue(layer)
    mode = layer.quantization_mode
    if not hasattr(keras.layers.Dense, "_int8_call"):
        # Keras 3.16 and later: one quantized pass per mode, dispatched by
        # `Layer.quantized_call` (called on the view directly: the layers'
        # own overrides reach it through `super()`, which needs the layer).
        if isinstance(layer, keras.layers.ReversibleEmbedding):
            return keras.layers.Layer.quantized_call(view, inputs, reverse=reverse)
        if isinstance(layer, keras.layers.Embedding):
            return keras.layers.Layer.quantized_call(view, inputs)
        return keras.layers.Layer.quantized_call(view, inputs, training=training)
    name = f"_{mode}_call"
    if reverse:
        return getattr(keras.layers.ReversibleEmbedding, name)(
            view, inputs, reverse=True
        )
    if isinstance(layer, keras.layers.Embedding):
        # The lookup, as `ReversibleEmbedding` runs it through `super()`.
        return getattr(keras.layers.Embedding, name)(view, inputs)
    # A plain layer, or an adapted one inheriting its pass.
    return getattr(type(layer), name)(view, inputs, training=training)


def requantized_layer(layer, kernel):
    """A plain Keras layer like `layer`, holding the float `kernel`
    quantized as `model.quantize` quantizes it (the same mode, block size
    and configuration). Its kernel (or table) and `quantized_weights` are
    what a merged `layer` holds (an untied `ReversibleEmbedding`'s reverse
    table excepted: the adapter leaves it as it is)."""
    mode = layer.quantization_mode
    plain_class = layer.wrapped_class
    config = plain_class.get_config(layer)
    config.pop("quantization_config", None)
    config["dtype"] = layer.variable_dtype
    plain = plain_class.from_config(config)
    plain.build_from_config(layer.get_build_config())
    target = _keras.kernel_variable(plain)
    target.assign(ops.cast(kernel, target.dtype))
    quantization_config = layer.quantization_config
    if mode == "int4" and quantization_config is None:
        # The block size may come from the dtype policy ("int4/128").
        quantization_config = keras.quantizers.Int4QuantizationConfig(
            block_size=getattr(layer.dtype_policy, "block_size", -1)
        )
    plain.quantize(mode, config=quantization_config)
    return plain


def requantize(layer, delta):
    """`layer`'s dequantized kernel plus `delta` (float, the float layer's
    kernel shape), quantized as `layer` is.

    Returns:
        `(values, error)`: a dict from weight name (`kernel` or
        `embeddings`, and the `quantized_weights` names of the kernel or
        table) to the value `layer` takes, and the relative error
        `||dequantized - (W + delta)||_F / ||delta||_F`, `W` the layer's
        dequantized kernel: how much of the update re-quantization changes
        (0 when there is no update).
    """
    delta = ops.convert_to_numpy(delta)  # no gradient to carry
    kernel = to_numpy(float_kernel(layer)) + delta
    plain = requantized_layer(layer, kernel)
    first = "embeddings" if isinstance(layer, keras.layers.Embedding) else "kernel"
    values = {
        name: ops.convert_to_tensor(variable)
        for name, variable in ((first, _keras.kernel_variable(plain)),)
        + quantized_weights(plain)
        if not name.startswith("reverse_")
    }
    error = np.linalg.norm(to_numpy(float_kernel(plain)) - kernel)
    update = np.linalg.norm(delta)
    return values, float(error / update) if update > 0 else 0.0
