"""`AdaLoRAConv1D`, `AdaLoRAConv2D`, `AdaLoRAConv3D`: convolutions with a
frozen kernel and an AdaLoRA adapter.

A convolution kernel `(k_1, ..., k_n, c_in / groups, c_out)` reads as a
`(k_1 * ... * k_n * c_in / groups) x c_out` matrix, and the adapter lives in
that matrix space. The forward pass never forms `delta_W`: `A`, reshaped to
`(k_1, ..., k_n, c_in / groups, r)`, is a convolution with the layer's own
strides, padding, dilation and data format, and `B` is a 1x1 convolution
(a matmul over channels) from `r` to `c_out`.

Grouped convolutions (`groups > 1`) use the same matrix view: every group's
filters get `delta_W`'s columns for their output channels. `A` runs on each
input group (one convolution with `A` tiled `groups` times) and `B` only
mixes components of the group an output channel reads.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_adalora import _keras
from keras_adalora.adapter import AdaptedLayerMixin


class _AdaLoRAConv(AdaptedLayerMixin):
    """What the three convolution kinds share; each adds its Keras class."""

    def __init__(
        self,
        filters,
        kernel_size,
        init_rank=12,
        alpha=None,
        dropout=0.0,
        orth_reg_weight=None,
        factor_init="normal",
        orth_penalty="norm",
        adapter_rank=None,
        **kwargs,
    ):
        super().__init__(filters, kernel_size, **kwargs)
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
        # Also called on a plain convolution by `check_wrappable`.
        shape = tuple(_keras.kernel_variable(self).shape)
        return (math.prod(shape[:-1]), shape[-1])

    def _kernel_from_matrix(self, matrix):
        return ops.reshape(matrix, tuple(self._base_kernel_variable().shape))

    def _kernel_matrix_axes(self):
        n = len(self._base_kernel_variable().shape)
        return tuple(range(n - 1)), (n - 1,)

    # Forward ---------------------------------------------------------------

    def _convolve(self, inputs, kernel):
        """`inputs` convolved with `kernel` as this layer convolves (its
        strides, dilation, data format, and Conv1D's causal padding)."""
        padding = self.padding
        if padding == "causal":
            inputs = ops.pad(inputs, self._compute_causal_padding())
            padding = "valid"
        return ops.conv(
            inputs,
            kernel,
            strides=list(self.strides),
            padding=padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def _adapter_project_in(self, inputs, a):
        rank = a.shape[-1]
        kernel_shape = tuple(self._base_kernel_variable().shape)
        a = ops.reshape(a, kernel_shape[:-1] + (rank,))
        if self.groups > 1:
            # Output channel `g * r + j` is component j on input group g.
            a = ops.tile(a, (1,) * (len(kernel_shape) - 1) + (self.groups,))
        h = self._convolve(inputs, a)
        if self.data_format == "channels_first":
            h = ops.moveaxis(h, 1, -1)
        return h

    def _scale_components(self, h):
        scale = self._component_scale()
        if self.groups > 1:
            scale = ops.tile(scale, (self.groups,))
        return h * scale

    def _adapter_project_out(self, h, b):
        if self.groups > 1:
            # Rows `g * r + j` hold B's row j for the output channels of
            # group g only.
            b = ops.tile(b, (self.groups, 1)) * self._group_mask(b.shape[0])
        out = ops.matmul(h, b)
        if self.data_format == "channels_first":
            out = ops.moveaxis(out, -1, 1)
        return out

    def _group_mask(self, rank):
        per_group = self.filters // self.groups
        rows = np.repeat(np.arange(self.groups), rank)
        columns = np.arange(self.filters) // per_group
        return ops.convert_to_tensor(
            (rows[:, None] == columns[None, :]).astype("float32")
        )

    @property
    def kernel(self):
        """The effective kernel `W + delta_W` (a tensor, not a variable)."""
        return self._effective_kernel()

    def call(self, inputs, training=None):
        outputs = self._convolve(inputs, _keras.kernel_variable(self))
        if self.adapter_rank:
            # Compaction can leave no component; torch refuses a
            # convolution to zero channels.
            outputs = ops.add(outputs, self.adapter_output(inputs, training=training))
        if self.use_bias:
            if self.data_format == "channels_last":
                shape = (1,) * (self.rank + 1) + (self.filters,)
            else:
                shape = (1, self.filters) + (1,) * self.rank
            outputs = ops.add(outputs, ops.reshape(self.bias, shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


_ARGS_DOC = """
    Args:
        filters: Number of output channels, as for the Keras layer.
        kernel_size: Size of the convolution window, as for the Keras layer.
        init_rank: Number of rank-1 components the adapter starts with; at
            most `min(prod(kernel_size) * c_in / groups, filters)`.
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
        adapter_rank: Number of components stored (set by deserialization
            after `compact_adalora`).
        **kwargs: Every other argument of the Keras layer (`strides`,
            `padding`, `data_format`, `dilation_rate`, `groups`,
            `activation`, `use_bias`, initializers, `name`, `dtype`, ...).
"""


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAConv1D(_AdaLoRAConv, keras.layers.Conv1D):
    wrapped_class = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAConv2D(_AdaLoRAConv, keras.layers.Conv2D):
    wrapped_class = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAConv3D(_AdaLoRAConv, keras.layers.Conv3D):
    wrapped_class = keras.layers.Conv3D


AdaLoRAConv1D.__doc__ = (
    """A `Conv1D` layer with a frozen kernel and an AdaLoRA adapter.

    The kernel `(k, c_in / groups, filters)` reads as a
    `(k * c_in / groups) x filters` matrix (see the module docstring); the
    adapter's `A` convolves with the layer's strides, padding (`"causal"`
    included) and dilation, and `B` maps its `r` channels to `filters`.
"""
    + _ARGS_DOC
    + """
    Example:

    >>> layer = AdaLoRAConv1D(8, 3, init_rank=4, padding="causal")
    >>> tuple(layer(np.ones((2, 10, 6))).shape), layer.active_rank
    ((2, 10, 8), 4)
    """
)
AdaLoRAConv2D.__doc__ = (
    """A `Conv2D` layer with a frozen kernel and an AdaLoRA adapter.

    The kernel `(k_h, k_w, c_in / groups, filters)` reads as a
    `(k_h * k_w * c_in / groups) x filters` matrix (see the module
    docstring); the adapter's `A` is a convolution to `r` channels with the
    layer's strides, padding and dilation, `B` a 1x1 convolution to
    `filters`, so `delta_W` is never formed.
"""
    + _ARGS_DOC
    + """
    Example:

    >>> layer = AdaLoRAConv2D(8, 3, init_rank=4, strides=2, padding="same")
    >>> tuple(layer(np.ones((2, 12, 12, 3))).shape)
    (2, 6, 6, 8)
    >>> tuple(layer.delta_matrix().shape)
    (27, 8)
    """
)
AdaLoRAConv3D.__doc__ = (
    """A `Conv3D` layer with a frozen kernel and an AdaLoRA adapter.

    The kernel `(k_1, k_2, k_3, c_in / groups, filters)` reads as a
    `(k_1 * k_2 * k_3 * c_in / groups) x filters` matrix (see the module
    docstring).
"""
    + _ARGS_DOC
    + """
    Example:

    >>> layer = AdaLoRAConv3D(4, 2, init_rank=2)
    >>> tuple(layer(np.ones((1, 5, 5, 5, 3))).shape)
    (1, 4, 4, 4, 4)
    """
)
