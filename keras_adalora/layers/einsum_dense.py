"""`AdaLoRAEinsumDense`: an `EinsumDense` with a frozen kernel and an AdaLoRA
adapter spanning every contracted input axis."""

import functools
import math
import string

import keras
from keras import ops

from keras_adalora import _keras
from keras_adalora import quantization
from keras_adalora.adapter import AdaptedLayerMixin


class EinsumMatrixView:
    """How an `EinsumDense` kernel reads as a `(d_in, d_out)` matrix.

    The rows are the kernel axes contracted with the input, the columns the
    kernel axes that reach the output, each group in the kernel's own order.
    For an attention output projection `btnh,nhd->btd` with kernel `(n, h, d)`
    that is an `(n*h, d)` matrix, so an adapter on it can reach rank
    `min(n*h, d)`; Keras's built-in `enable_lora` only factors the last axis.

    Args:
        equation: the layer's einsum equation, e.g. `"btnh,nhd->btd"`.
        kernel_shape: the kernel's shape.

    Raises:
        ValueError: for an equation whose kernel is not a plain linear map of
            the input, e.g. an axis shared by input, kernel and output
            (per-expert or per-head weights).
    """

    def __init__(self, equation, kernel_shape):
        try:
            inputs, output = equation.split("->")
            input_spec, kernel_spec = inputs.split(",")
        except ValueError:
            raise ValueError(
                f"Cannot read the einsum equation '{equation}': expected "
                "'<input>,<kernel>-><output>'."
            ) from None
        input_axes = _tokens(input_spec)
        output_axes = _tokens(output)
        kernel_axes = _tokens(kernel_spec)
        if "..." in kernel_axes or len(kernel_axes) != len(kernel_shape):
            raise ValueError(
                f"Cannot read the kernel of equation '{equation}' (kernel "
                f"shape {tuple(kernel_shape)})."
            )
        for axis in kernel_axes:
            if axis in input_axes and axis in output_axes:
                raise ValueError(
                    f"AdaLoRA cannot adapt equation '{equation}': kernel axis "
                    f"'{axis}' also indexes the input and the output, so the "
                    "kernel is a batch of separate matrices rather than one "
                    "linear map. Leave this layer out of `target`."
                )
            if axis not in input_axes and axis not in output_axes:
                raise ValueError(
                    f"AdaLoRA cannot adapt equation '{equation}': kernel axis "
                    f"'{axis}' is summed away. Leave this layer out of "
                    "`target`."
                )
        sizes = dict(zip(kernel_axes, kernel_shape))
        self.contracted = [a for a in kernel_axes if a not in output_axes]
        self.produced = [a for a in kernel_axes if a in output_axes]
        self.contracted_shape = tuple(sizes[a] for a in self.contracted)
        self.produced_shape = tuple(sizes[a] for a in self.produced)
        self.matrix_shape = (
            math.prod(self.contracted_shape),
            math.prod(self.produced_shape),
        )
        # Kernel axes of the matrix's rows and columns, in flattening order.
        self.row_axes = tuple(kernel_axes.index(a) for a in self.contracted)
        self.column_axes = tuple(kernel_axes.index(a) for a in self.produced)
        order = self.contracted + self.produced
        # kernel -> matrix is a transpose to `order`, then a reshape;
        # matrix -> kernel undoes both.
        self._inverse_perm = [order.index(a) for a in kernel_axes]
        used = set(equation)
        rank_axis = next(c for c in string.ascii_letters if c not in used)
        passed = "".join(a for a in output_axes if a not in kernel_axes)
        self.in_equation = (
            f"{input_spec},{''.join(self.contracted)}{rank_axis}"
            f"->{passed}{rank_axis}"
        )
        self.out_equation = (
            f"{passed}{rank_axis},{rank_axis}{''.join(self.produced)}"
            f"->{output}"
        )

    def kernel_from_matrix(self, matrix):
        kernel = ops.reshape(
            matrix, self.contracted_shape + self.produced_shape
        )
        return ops.transpose(kernel, self._inverse_perm)


@functools.lru_cache(maxsize=None)
def _matrix_view(equation, kernel_shape):
    return EinsumMatrixView(equation, kernel_shape)


def _tokens(spec):
    """Splits an einsum operand into axes, keeping `...` as one token."""
    head, dots, tail = spec.partition("...")
    return list(head) + ([dots] if dots else []) + list(tail)


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAEinsumDense(AdaptedLayerMixin, keras.layers.EinsumDense):
    """An `EinsumDense` layer with a frozen kernel and an AdaLoRA adapter.

    The kernel is read as a matrix from the equation: contracted input axes
    by output axes (see `EinsumMatrixView`), and the adapter
    `(alpha / init_rank) * A @ diag(lam * rank_mask) @ B` lives in that
    matrix space. For the query projection of multi-head attention,
    `abc,cde->abde` with kernel `(c, d, e)`, the matrix is `c x (d*e)`; for
    the output projection `abcd,cde->abe` it is `(c*d) x e`. The forward pass
    contracts the input with `A` and expands with `B` by two einsums, never
    forming `delta_W`.

    A `EinsumDense` that Keras quantized to int8 or int4 (`model.quantize`)
    adapts too: its quantized kernel and scales stay frozen, `x @ W` runs
    through Keras's own quantized path, and the adapter stays float32
    (`keras_adalora.quantization`).

    Args:
        equation: The einsum equation, as for `keras.layers.EinsumDense`.
        output_shape: The output shape without the batch axis, as for
            `keras.layers.EinsumDense`.
        init_rank: Number of rank-1 components the adapter starts with; at
            most `min(d_in, d_out)` of the kernel's matrix view.
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
        adapter_rank: Number of components stored (set by
            deserialization after `compact_adalora`).
        **kwargs: Every other `keras.layers.EinsumDense` argument.

    Example:

    >>> layer = AdaLoRAEinsumDense(
    ...     "btnh,nhd->btd", output_shape=(None, 16), init_rank=8)
    >>> y = layer(np.ones((2, 5, 4, 3)))
    >>> tuple(y.shape), tuple(layer.delta_matrix().shape)
    ((2, 5, 16), (12, 16))
    """

    wrapped_class = keras.layers.EinsumDense

    def __init__(
        self,
        equation,
        output_shape,
        init_rank=12,
        alpha=None,
        dropout=0.0,
        orth_reg_weight=None,
        factor_init="normal",
        orth_penalty="norm",
        adapter_rank=None,
        **kwargs,
    ):
        super().__init__(equation, output_shape, **kwargs)
        self._init_adapter(
            init_rank,
            alpha,
            dropout,
            orth_reg_weight,
            adapter_rank=adapter_rank,
            factor_init=factor_init,
            orth_penalty=orth_penalty,
        )

    @property
    def matrix_view(self):
        """The `EinsumMatrixView` of this layer's kernel."""
        return _matrix_view(self.equation, quantization.kernel_shape(self))

    def _adapter_matrix_shape(self):
        # Also called on a plain EinsumDense by `check_wrappable`.
        return _matrix_view(
            self.equation, quantization.kernel_shape(self)
        ).matrix_shape

    def _kernel_from_matrix(self, matrix):
        return self.matrix_view.kernel_from_matrix(matrix)

    def _kernel_matrix_axes(self):
        view = self.matrix_view
        return view.row_axes, view.column_axes

    def _adapter_project_in(self, inputs, a):
        view = self.matrix_view
        a = ops.reshape(a, view.contracted_shape + (a.shape[-1],))
        return ops.einsum(view.in_equation, inputs, a)

    def _adapter_project_out(self, h, b):
        view = self.matrix_view
        b = ops.reshape(b, (b.shape[0],) + view.produced_shape)
        return ops.einsum(view.out_equation, h, b)

    @property
    def kernel(self):
        """The effective kernel `W + delta_W` (a tensor, not a variable)."""
        return self._effective_kernel()

    folds_into_kernel = True

    def _float_output(self, inputs, kernel=None):
        if kernel is None:
            kernel = _keras.kernel_variable(self)
        return ops.einsum(self.equation, inputs, kernel)

    def call(self, inputs, training=None):
        return self._forward(inputs, training)
