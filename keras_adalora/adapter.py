"""The AdaLoRA adapter, written once and shared by every adapted layer kind.

An adapted layer keeps its pretrained kernel `W` frozen and adds

    delta_W = (alpha / init_rank) * A @ diag(lam * rank_mask) @ B

with `A (d_in, r)`, `lam (r,)`, `B (r, d_out)` trainable and `rank_mask (r,)`
a 0/1 vector that the rank allocator writes (SPEC.md section 2). The layer
kinds differ only in how their kernel reads as a `(d_in, d_out)` matrix and
how an input reaches `A`; `AdaLoRAAdapter` holds everything else: the
variables, the forward term, the orthogonality penalty, the merged kernel,
compaction and (de)serialization of the weights.
"""

import numpy as np
from keras import backend
from keras import initializers
from keras import layers
from keras import ops

from keras_adalora._arrays import to_numpy
from keras_adalora import _distribution
from keras_adalora import _keras
from keras_adalora import quantization
from keras_adalora._validation import check_int
from keras_adalora.regularizers import orthogonality_penalty

# Adapter weights are stored and computed in float32 whatever the layer's
# dtype policy: importance scores and tiny singular values do not survive
# bfloat16 (same choice as Keras's built-in LoRA).
ADAPTER_DTYPE = "float32"
# With `factor_init="orthogonal"`, `alpha=None` gives every adapter the
# scale `sqrt(d_in * d_out) / 12`, what `alpha = sqrt(d_in * d_out)` gives at
# init_rank 12, whatever its rank.
REFERENCE_RANK = 12

A_NAME = "adalora_A"
LAM_NAME = "adalora_lam"
B_NAME = "adalora_B"
MASK_NAME = "rank_mask"

# How `A` and `B` start: drawn from N(0, FACTOR_STDDEV**2) (`"normal"`) or
# as random orthonormal factors (`"orthogonal"`).
FACTOR_INITS = ("normal", "orthogonal")
FACTOR_STDDEV = 0.02
# The orthogonality penalty's form: the mean of the two factors' Frobenius
# norms (`"norm"`) or the sum of their squares (`"squared"`), and the
# weight each form gets when none is given.
ORTH_PENALTIES = ("norm", "squared")
DEFAULT_ORTH_REG_WEIGHT = {"norm": 0.5, "squared": 0.1}
# An adapter's settings, in the order `_adapter_config` gives them.
SETTINGS = (
    "init_rank",
    "alpha",
    "dropout",
    "orth_reg_weight",
    "factor_init",
    "orth_penalty",
    "adapter_rank",
)
# The settings that configurations and files written by keras-adalora 0.1
# lack, with the values those adapters were built with.
SETTINGS_BEFORE_0_2 = {"factor_init": "orthogonal", "orth_penalty": "squared"}


def read_settings_since_0_2(entry, where, source):
    """The settings 0.1 did not write, read from an untrusted `entry` (an
    `_untrusted.Source` checks them): each as written, or its 0.1 value
    where `entry` lacks it."""
    choices = {"factor_init": FACTOR_INITS, "orth_penalty": ORTH_PENALTIES}
    return {
        key: source.get(
            entry, key, where, source.choice, default, choices=choices[key]
        )
        for key, default in SETTINGS_BEFORE_0_2.items()
    }


def layer_orth_reg_weight(orth_reg_weight, orth_penalty, n_layers):
    """Each of `n_layers` adapters' share of a model's penalty weight: the
    `"norm"` form weighs the mean of the layers' penalties (PEFT's), so
    each gets `orth_reg_weight / n_layers`; the `"squared"` form weighs
    every layer's penalty fully."""
    if orth_penalty == "norm":
        return orth_reg_weight / n_layers
    return orth_reg_weight


def with_settings_before_0_2(settings):
    """`settings` (a dict) with `SETTINGS_BEFORE_0_2` filled in where a
    configuration or file written by keras-adalora 0.1 lacks them."""
    return {**SETTINGS_BEFORE_0_2, **settings}


def validate_adapter_args(
    init_rank,
    alpha,
    dropout,
    orth_reg_weight,
    factor_init="normal",
    orth_penalty="norm",
):
    """Checks the adapter hyperparameters; returns them normalised (an
    `orth_reg_weight` of None becomes the default of `orth_penalty`'s form).

    Raises:
        ValueError: naming the argument, for a non-integer or non-positive
            `init_rank`, a non-positive or infinite `alpha`, a `dropout`
            outside `[0, 1)`, a negative or infinite `orth_reg_weight`, or a
            `factor_init` or `orth_penalty` that is none of the choices.
    """
    init_rank = check_int(init_rank, "init_rank", 1)
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(
            alpha, (int, float, np.number)
        ):
            raise ValueError(
                "`alpha` must be a positive number or None (None means "
                "alpha=init_rank, a scale of 1, with factor_init='normal'). "
                f"Received: alpha={alpha!r}"
            )
        if not 0 < alpha < np.inf:
            raise ValueError(
                "`alpha` must be a positive finite number. Received: "
                f"alpha={alpha}"
            )
        alpha = float(alpha)
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float, np.number))
        or not 0 <= dropout < 1
    ):
        raise ValueError(
            f"`dropout` must be a rate in [0, 1). Received: dropout={dropout!r}"
        )
    if factor_init not in FACTOR_INITS:
        raise ValueError(
            f"`factor_init` must be one of {FACTOR_INITS} ('normal': A and B "
            f"drawn from N(0, {FACTOR_STDDEV}^2); 'orthogonal': random "
            f"orthonormal factors). Received: factor_init={factor_init!r}"
        )
    if orth_penalty not in ORTH_PENALTIES:
        raise ValueError(
            f"`orth_penalty` must be one of {ORTH_PENALTIES} ('norm': the "
            "Frobenius norms of A^T A - I and B B^T - I, averaged; "
            "'squared': their squares, summed). Received: "
            f"orth_penalty={orth_penalty!r}"
        )
    if orth_reg_weight is None:
        orth_reg_weight = DEFAULT_ORTH_REG_WEIGHT[orth_penalty]
    if (
        isinstance(orth_reg_weight, bool)
        or not isinstance(orth_reg_weight, (int, float, np.number))
        or not 0 <= orth_reg_weight < np.inf
    ):
        raise ValueError(
            "`orth_reg_weight` must be a finite number >= 0 (0 disables the "
            "orthogonality penalty; None: "
            f"{DEFAULT_ORTH_REG_WEIGHT[orth_penalty]} for "
            f"orth_penalty={orth_penalty!r}). Received: "
            f"orth_reg_weight={orth_reg_weight!r}"
        )
    return (
        init_rank,
        alpha,
        float(dropout),
        float(orth_reg_weight),
        factor_init,
        orth_penalty,
    )


def check_init_rank_fits(init_rank, matrix_shape, name):
    """Raises unless `init_rank` components fit a kernel read as a
    `matrix_shape = (d_in, d_out)` matrix (rank at most the smaller)."""
    d_in, d_out = matrix_shape
    if init_rank > min(d_in, d_out):
        raise ValueError(
            f"`init_rank`={init_rank} is too large for layer '{name}': its "
            f"kernel reads as a {d_in} x {d_out} matrix, whose rank is at "
            f"most {min(d_in, d_out)}. Pass init_rank <= {min(d_in, d_out)}, "
            "or leave this layer out of `target`."
        )


class AdaLoRAAdapter:
    """Mixin holding the AdaLoRA adapter of a layer with a frozen kernel.

    A layer kind combines it with the Keras layer it adapts
    (`class AdaLoRADense(AdaLoRAAdapter, keras.layers.Dense)`) and supplies:

    - `_base_kernel_variable()`: the frozen kernel (or embedding table);
    - `_base_named_weights(layer)` (a static method, also asked of the plain
      layer): `(name, variable or None)` pairs of the frozen weights, in the
      order the plain Keras layer saves them (`AdaptedLayerMixin` gives
      both for a layer with a `kernel` and a `bias`, and `build`);
    - `_adapter_matrix_shape()`: `(d_in, d_out)` of the kernel as a matrix;
    - `_kernel_from_matrix(matrix)`: reshape a `(d_in, d_out)` matrix into
      the kernel's own shape;
    - `_adapter_project_in(inputs, a)`: the inputs times `A`, shape `(..., r)`;
    - `_adapter_project_out(h, b)`: `h` times `B`, in the layer's output shape.

    and, where its kernel is not a 2-D `(d_in, d_out)` matrix,
    `_kernel_matrix_axes()`.
    """

    # Configuration ---------------------------------------------------------

    def _init_adapter(
        self,
        init_rank,
        alpha,
        dropout,
        orth_reg_weight,
        adapter_rank=None,
        factor_init="normal",
        orth_penalty="norm",
    ):
        self._set_adapter_args(
            **type(self).validate_args(
                init_rank,
                alpha,
                dropout,
                orth_reg_weight,
                adapter_rank=adapter_rank,
                factor_init=factor_init,
                orth_penalty=orth_penalty,
            )
        )

    @classmethod
    def validate_args(
        cls,
        init_rank,
        alpha,
        dropout,
        orth_reg_weight,
        adapter_rank=None,
        factor_init="normal",
        orth_penalty="norm",
    ):
        """Checks the adapter arguments for this layer kind (the one place
        they are checked); returns them normalised as a dict of `SETTINGS`,
        `adapter_rank` and a default `orth_reg_weight` resolved.

        Raises:
            ValueError: naming the argument at fault.
        """
        (
            init_rank,
            alpha,
            dropout,
            orth_reg_weight,
            factor_init,
            orth_penalty,
        ) = validate_adapter_args(
            init_rank, alpha, dropout, orth_reg_weight, factor_init, orth_penalty
        )
        cls.check_dropout(dropout)
        if adapter_rank is None:
            adapter_rank = init_rank
        if (
            isinstance(adapter_rank, bool)
            or not isinstance(adapter_rank, (int, np.integer))
            or not 0 <= adapter_rank <= init_rank
        ):
            raise ValueError(
                "`adapter_rank` (the number of components the adapter "
                "stores, smaller than `init_rank` only after "
                "`compact_adalora`) must be an integer in [0, init_rank]. "
                f"Received: adapter_rank={adapter_rank!r}, "
                f"init_rank={init_rank}"
            )
        return {
            "init_rank": init_rank,
            "alpha": alpha,
            "dropout": dropout,
            "orth_reg_weight": orth_reg_weight,
            "factor_init": factor_init,
            "orth_penalty": orth_penalty,
            "adapter_rank": int(adapter_rank),
        }

    def _set_adapter_args(self, **settings):
        for name in SETTINGS:
            setattr(self, name, settings[name])
        self.adapter_dropout = (
            layers.Dropout(self.dropout, name="adapter_dropout")
            if self.dropout
            else None
        )

    def _adapter_config(self):
        return {name: getattr(self, name) for name in SETTINGS}

    @classmethod
    def from_config(cls, config):
        # A configuration saved by keras-adalora 0.1 lacks the settings
        # added since; its adapter was built with their old values.
        return super().from_config(with_settings_before_0_2(config))

    @property
    def scale(self):
        """The constant `alpha / init_rank` in front of the adapter."""
        return self.alpha / self.init_rank

    def _resolve_alpha(self):
        """`alpha=None` means `init_rank` (a scale of 1) with normal
        factors, and `init_rank * sqrt(d_in * d_out) / 12` (a scale of
        `sqrt(d_in * d_out) / 12` whatever the rank) with orthogonal ones;
        known once the kernel is."""
        if self.alpha is not None:
            return
        if self.factor_init == "normal":
            self.alpha = float(self.init_rank)
        else:
            d_in, d_out = self._adapter_matrix_shape()
            root = float(np.sqrt(float(d_in) * float(d_out)))
            self.alpha = self.init_rank * root / REFERENCE_RANK

    # Variables -------------------------------------------------------------

    def _check_init_rank_fits(self):
        check_init_rank_fits(
            self.init_rank, self._adapter_matrix_shape(), self.name
        )

    def _freeze_base_weights(self):
        """Makes the pretrained weights non-trainable for good.

        Moving them to the non-trainable store (rather than only setting
        `variable.trainable = False`) keeps them frozen when a user later sets
        `model.trainable = True`: Keras's setter only flips the variables in
        the trainable store.
        """
        for variable in self._base_weights():
            _keras.refile_variable(self, variable, trainable=False)

    def _base_weights(self):
        weights = []
        for _, variable in self._base_named_weights(self):
            if variable is not None:
                weights.append(variable)
        return weights

    def _build_adapter(self, initial_values=None):
        """Creates `A`, `lam`, `B` and `rank_mask` at width `adapter_rank`.

        Args:
            initial_values: optional dict from weight name to an array, used
                instead of the initialisers (compaction rebuilds this way).
        """
        self._check_init_rank_fits()
        self._resolve_alpha()
        d_in, d_out = self._adapter_matrix_shape()
        rank = self.adapter_rank
        if self.factor_init == "normal":
            factors = initializers.RandomNormal(stddev=FACTOR_STDDEV)
        else:
            factors = initializers.Orthogonal()
        specs = {
            A_NAME: ((d_in, rank), factors),
            LAM_NAME: ((rank,), initializers.Zeros()),
            B_NAME: ((rank, d_out), factors),
            MASK_NAME: ((rank,), initializers.Ones()),
        }
        created = {}
        for name, (shape, initializer) in specs.items():
            if initial_values is not None:
                value = np.asarray(initial_values[name], dtype=ADAPTER_DTYPE)
                initializer = _constant_initializer(value)
            created[name] = self.add_weight(
                name=name,
                shape=shape,
                initializer=initializer,
                dtype=ADAPTER_DTYPE,
                trainable=name != MASK_NAME,
                autocast=False,
            )
        self.adalora_a = created[A_NAME]
        self.adalora_lam = created[LAM_NAME]
        self.adalora_b = created[B_NAME]
        self.rank_mask = created[MASK_NAME]
        _distribution.shard_adapter_like_kernel(self)

    def _kernel_matrix_axes(self):
        """Kernel axes that make the rows and the columns of its matrix view,
        each in flattening order: `((0,), (1,))` for a 2-D kernel read as
        is. Used to shard the adapter like the kernel."""
        return (0,), (1,)

    def _adapter_variables(self):
        return {
            A_NAME: self.adalora_a,
            LAM_NAME: self.adalora_lam,
            B_NAME: self.adalora_b,
            MASK_NAME: self.rank_mask,
        }

    # Maths -----------------------------------------------------------------

    # Set by `disable_adapter` while the layer runs as its base layer.
    adapter_disabled = False
    # A weak reference to the `AdaLoRAOptimizer` that applies this layer's
    # orthogonality penalty (`AdaLoRAOptimizer.watch`), or None: the layer
    # then adds the penalty to its own losses.
    penalty_owner = None

    def _component_scale(self):
        """`(alpha / init_rank) * lam * rank_mask`: one factor per component
        (zeros inside `disable_adapter`, so the adapter adds exactly 0)."""
        if self.adapter_disabled:
            return ops.zeros(tuple(self.adalora_lam.shape), dtype=ADAPTER_DTYPE)
        return self.scale * (self.adalora_lam * self.rank_mask)

    def _scale_components(self, h):
        """`h` (the inputs times `A`, components on the last axis) times
        each component's factor; a layer kind whose `h` repeats the
        components (grouped convolutions) overrides it."""
        return h * self._component_scale()

    def adapter_output(self, inputs, training=None):
        """The adapter's term of the layer output, in the compute dtype.

        Adds the orthogonality penalty to the layer's losses when training,
        unless an `AdaLoRAOptimizer` applies it (`penalty_owner`).
        """
        x = inputs
        if backend.is_float_dtype(backend.standardize_dtype(x.dtype)):
            x = ops.cast(x, ADAPTER_DTYPE)
        if self.adapter_dropout is not None:
            x = self.adapter_dropout(x, training=training)
        h = self._adapter_project_in(x, self.adalora_a)
        h = self._scale_components(h)
        out = self._adapter_project_out(h, self.adalora_b)
        self._add_penalty(training)
        return ops.cast(out, self.compute_dtype)

    def _add_penalty(self, training):
        """Adds the weighted orthogonality penalty to the layer's losses
        when training, unless an optimizer applies it."""
        if (
            training
            and self.orth_reg_weight > 0
            and not self.adapter_disabled
            and (self.penalty_owner is None or self.penalty_owner() is None)
        ):
            self.add_loss(self.orth_reg_weight * self.orthogonality_penalty())

    def delta_matrix(self):
        """`delta_W` as a float32 `(d_in, d_out)` matrix (SPEC.md section 2)."""
        return ops.matmul(
            self.adalora_a * self._component_scale(), self.adalora_b
        )

    def delta_kernel(self):
        """`delta_W` in the shape of the layer's kernel, float32."""
        return self._kernel_from_matrix(self.delta_matrix())

    def merged_kernel(self):
        """The frozen kernel plus `delta_W`, in the kernel's storage dtype
        (float32 for a quantized kernel, dequantized first)."""
        merged = ops.add(quantization.float_kernel(self), self.delta_kernel())
        if self.quantization_mode is not None:
            return merged
        return ops.cast(merged, self._base_kernel_variable().dtype)

    @property
    def active_rank(self):
        """Number of alive rank-1 components (the sum of `rank_mask`)."""
        return int(round(float(ops.sum(self.rank_mask))))

    def orthogonality_penalty(self):
        """This layer's orthogonality penalty, unweighted: with
        `orth_penalty="norm"`, `(||A^T A - I||_F + ||B B^T - I||_F) / 2`;
        with `"squared"`, `||A^T A - I||_F^2 + ||B B^T - I||_F^2`."""
        if self.orth_penalty == "squared":
            return orthogonality_penalty(self.adalora_a, self.adalora_b)
        return 0.5 * orthogonality_penalty(
            self.adalora_a, self.adalora_b, squared=False
        )

    # Compaction ------------------------------------------------------------

    def _compact_adapter(self):
        """Drops the pruned components; the layer's outputs do not change.

        Returns:
            The number of components removed.
        """
        mask = to_numpy(self.rank_mask)
        keep = np.flatnonzero(mask > 0.5)
        removed = self.adapter_rank - keep.size
        if removed == 0:
            return 0
        values = {
            A_NAME: to_numpy(self.adalora_a)[:, keep],
            LAM_NAME: to_numpy(self.adalora_lam)[keep],
            B_NAME: to_numpy(self.adalora_b)[keep, :],
            MASK_NAME: mask[keep],
        }
        with _keras.unlocked_tracker(self):
            for variable in self._adapter_variables().values():
                _keras.untrack_variable(self, variable)
            self.adapter_rank = int(keep.size)
            self._build_adapter(initial_values=values)
        return int(removed)

    # Saving ----------------------------------------------------------------

    def _named_weights(self):
        named = []
        for name, variable in self._base_named_weights(self):
            if variable is not None:
                named.append((name, variable))
        named.extend(self._adapter_variables().items())
        return named

    def save_own_variables(self, store):
        if not self.built:
            return
        for name, variable in self._named_weights():
            store[name] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        named = self._named_weights()
        keys = set(store.keys())
        missing = [name for name, _ in named if name not in keys]
        if missing:
            raise ValueError(
                f"Layer '{self.name}' could not load its weights: the saved "
                f"entry lacks {missing} (it holds {sorted(keys)}). The file "
                "was saved from a different layer; adapt the model the same "
                "way before loading."
            )
        unknown = sorted(keys - {name for name, _ in named})
        if unknown:
            raise ValueError(
                f"Layer '{self.name}' could not load its weights: the saved "
                f"entry holds {unknown}, which the layer does not have (it "
                f"has {[name for name, _ in named]}). The file is damaged, or "
                "was saved from a different layer; adapt the model the same "
                "way before loading."
            )
        for name, variable in named:
            value = store[name]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Layer '{self.name}': saved weight '{name}' has shape "
                    f"{tuple(value.shape)} but the layer's has "
                    f"{tuple(variable.shape)}. Was the file saved from a "
                    "compacted model? Compact this one the same way first."
                )
            variable.assign(value)


def _constant_initializer(value):
    def initializer(shape, dtype=None):
        return ops.cast(ops.convert_to_tensor(value), dtype or ADAPTER_DTYPE)

    return initializer


class AdaptedLayerMixin(AdaLoRAAdapter):
    """Construction shared by the adapted layer classes.

    `wrapped_class` names the plain Keras layer a class adapts; its instances
    can be adapted in place (what `apply_adalora` does) or copied into a new
    adapted layer with `from_layer`.
    """

    wrapped_class = None
    # Whether the adapter's input can take dropout (not token ids).
    supports_dropout = True

    @classmethod
    def plain_class(cls):
        """`wrapped_class`, or None while the package that defines it is not
        imported (so that no layer of the model can be one)."""
        return cls.wrapped_class

    @classmethod
    def check_dropout(cls, dropout):
        if dropout and not cls.supports_dropout:
            raise ValueError(
                f"{cls.__name__} takes token ids as inputs, which dropout "
                f"does not apply to: pass dropout=0. Received: "
                f"dropout={dropout!r}"
            )

    def get_config(self):
        return {**super().get_config(), **self._adapter_config()}

    def build(self, input_shape=None):
        if self.built:
            return
        super().build(input_shape)
        self._freeze_base_weights()
        self._build_adapter()

    def _base_kernel_variable(self):
        return _keras.kernel_variable(self)

    @staticmethod
    def _base_named_weights(layer):
        # A kernel and a bias (None without one), then a quantized kernel's
        # scales; `Embedding` overrides it.
        return (
            ("kernel", _keras.kernel_variable(layer)),
            ("bias", layer.bias),
        ) + quantization.quantized_weights(layer)

    def quantized_call(self, *args, **kwargs):
        # Keras runs this instead of `call` on a quantized layer; `call`
        # reaches Keras's quantized pass through `_frozen_output`.
        return self.call(*args, **kwargs)

    def _frozen_output(self, inputs, training=None):
        """`inputs @ W` with the frozen kernel (Keras's own quantized pass
        for a quantized one), before bias and activation."""
        if self.quantization_mode is not None:
            return quantization.frozen_output(self, inputs, training=training)
        return self._float_output(inputs)

    def _effective_kernel(self):
        """`W + delta_W` in the compute dtype, for the plain layer's
        `kernel`/`embeddings` property (read directly by some models)."""
        if not self.built:
            raise AttributeError(
                "You must build the layer before accessing its kernel."
            )
        return ops.cast(self.merged_kernel(), self.compute_dtype)

    # Layer kinds whose product with the kernel can take `W + delta_W`.
    folds_into_kernel = False

    def _runs_folded(self):
        """Whether the forward pass multiplies the inputs by `W + delta_W`
        (one product, as Keras's LoRA does) rather than adding the adapter's
        own term `((x @ A) * c) @ B`: on JAX, for a float32 kernel computed
        in float32 (under a lower-precision policy `W + delta_W` would round
        a small `delta_W` away), without adapter dropout. XLA on CPU runs
        the two thin products far slower than the one product with the
        kernel."""
        return (
            self.folds_into_kernel
            and backend.backend() == "jax"
            and self.quantization_mode is None
            and self.adapter_dropout is None
            and backend.standardize_dtype(self.compute_dtype) == ADAPTER_DTYPE
        )

    def _forward(self, inputs, training):
        """A Dense-like forward pass: `x @ W` plus the adapter's term (or
        `x @ (W + delta_W)`), the bias, the activation."""
        if self._runs_folded():
            x = self._float_output(inputs, self.merged_kernel())
            self._add_penalty(training)
            return self._add_bias_activation(x)
        return self._add_adapter_bias_activation(
            self._frozen_output(inputs, training), inputs, training
        )

    def _add_adapter_bias_activation(self, base_output, inputs, training):
        """Completes a Dense-like forward pass from `x @ W`."""
        x = ops.add(base_output, self.adapter_output(inputs, training=training))
        return self._add_bias_activation(x)

    def _add_bias_activation(self, x):
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    @classmethod
    def check_wrappable(cls, layer, init_rank):
        """Raises `ValueError` if `layer` cannot be adapted by this class."""
        name = getattr(layer, "path", None) or layer.name
        if isinstance(layer, AdaLoRAAdapter):
            raise ValueError(
                f"Layer '{name}' is already adapted with AdaLoRA (init_rank="
                f"{layer.init_rank}). Leave it out of `target`, or merge it "
                "first with `merge_adalora`."
            )
        if type(layer) is not cls.wrapped_class:
            plain = cls.wrapped_class
            raise ValueError(
                f"{cls.__name__} adapts `{plain.__module__.split('.')[0]}."
                f"layers.{plain.__name__}` layers; layer '{name}' is a "
                f"{type(layer).__name__}, whose call() may differ. Leave it "
                "out of `target`."
            )
        if not layer.built:
            raise ValueError(
                f"Layer '{name}' is not built, so its kernel does not exist "
                "yet. Build the model first (call it on a batch, or "
                "`model.build(input_shape)`), then adapt it."
            )
        quantization.check_mode(layer, name)
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{name}' has Keras's built-in LoRA enabled (lora_rank="
                f"{layer.lora_rank}). Adapt a layer without LoRA (build it "
                "without `lora_rank`, or fold the LoRA weights into the "
                "kernel first)."
            )
        init_rank = check_int(init_rank, "init_rank", 1)
        check_init_rank_fits(init_rank, cls._adapter_matrix_shape(layer), name)

    @classmethod
    def adapt_in_place(
        cls,
        layer,
        init_rank=12,
        alpha=None,
        dropout=0.0,
        orth_reg_weight=None,
        adapter_rank=None,
        initial_values=None,
        factor_init="normal",
        orth_penalty="norm",
    ):
        """Turns a built plain layer into an adapted one, keeping the object.

        The layer keeps its name, path, weights and place in the model; its
        kernel and bias become frozen and the adapter starts at `lam = 0`, so
        its outputs do not change. `adapter_rank` and `initial_values` (a
        dict from adapter weight name to array, checked by the caller) give
        the adapter saved values instead, as `load_adapter` does.
        """
        cls.check_wrappable(layer, init_rank)
        settings = cls.validate_args(
            init_rank,
            alpha,
            dropout,
            orth_reg_weight,
            adapter_rank=adapter_rank,
            factor_init=factor_init,
            orth_penalty=orth_penalty,
        )
        with _keras.unlocked_tracker(layer):
            _keras.swap_class(layer, cls)
            layer._set_adapter_args(**settings)
            layer._freeze_base_weights()
            layer._build_adapter(initial_values=initial_values)
        return layer

    @classmethod
    def from_layer(
        cls,
        layer,
        init_rank=12,
        alpha=None,
        dropout=0.0,
        orth_reg_weight=None,
        factor_init="normal",
        orth_penalty="norm",
    ):
        """A new adapted layer holding a copy of `layer`'s weights.

        `layer` itself is left untouched. The new layer has the same
        configuration, is built for the same input shape, and gives the same
        outputs until it is trained.
        """
        cls.check_wrappable(layer, init_rank)
        config = layer.get_config()
        config.update(
            init_rank=init_rank,
            alpha=alpha,
            dropout=dropout,
            orth_reg_weight=orth_reg_weight,
            factor_init=factor_init,
            orth_penalty=orth_penalty,
        )
        new = cls.from_config(config)
        new.build_from_config(layer.get_build_config())
        for (_, target), (_, source) in zip(
            new._base_named_weights(new), cls._base_named_weights(layer)
        ):
            if source is not None:
                target.assign(source)
        return new

    def revert_in_place(self, report=None):
        """Turns this layer back into its plain Keras class, holding the
        merged kernel `W + delta_W` (what `merge_adalora` does per layer).

        The kernel and bias become ordinary trainable weights again, as in a
        freshly built plain layer. A quantized layer stays quantized in its
        mode: `W + delta_W` is re-quantized as `model.quantize` quantizes a
        float layer, and only its bias is trainable (as Keras has it).

        Args:
            report: optional dict; a quantized layer adds to it its path and
                the re-quantization error relative to `||delta_W||`
                (`quantization.requantize`).
        """
        named = self._base_named_weights(self)
        if self.quantization_mode is None:
            # The kernel (or table) comes first.
            values = {named[0][0]: self.merged_kernel()}
        else:
            # Re-quantized as `model.quantize` would the merged float layer.
            values, error = quantization.requantize(self, self.delta_kernel())
            if report is not None:
                report[self.path or self.name] = error
        with _keras.unlocked_tracker(self):
            for variable in self._adapter_variables().values():
                _keras.untrack_variable(self, variable)
            if self.adapter_dropout is not None:
                _keras.untrack_layer(self, self.adapter_dropout)
            for name, variable in named:
                if variable is None:
                    continue
                if name in values:
                    variable.assign(ops.convert_to_tensor(values[name]))
                # Trainable as in a plain layer: a quantized kernel and its
                # scales never are, its bias is.
                _keras.refile_variable(
                    self,
                    variable,
                    trainable=self.quantization_mode is None or name == "bias",
                )
            for attribute in _ADAPTER_ATTRIBUTES:
                # Skips Keras's `Layer.__delattr__` (a `gc.collect()` per
                # variable) but keeps the backend's own attribute bookkeeping.
                super(layers.Layer, self).__delattr__(attribute)
            # Left by a `disable_adapter` block.
            self.__dict__.pop("adapter_disabled", None)
            _keras.swap_class(self, self.wrapped_class)
        return self


class LookupTableMixin:
    """What the adapted lookup tables (token and position embeddings) share:
    the table is the adapter's matrix as it is, an input of row indices
    (token ids, positions) picks rows of `A`, and dropout does not apply to
    indices."""

    supports_dropout = False

    def _kernel_from_matrix(self, matrix):
        return matrix

    def _adapter_project_in(self, inputs, a):
        return ops.take(a, inputs, axis=0)

    def _adapter_project_out(self, h, b):
        return ops.matmul(h, b)


_ADAPTER_ATTRIBUTES = (
    "adalora_a",
    "adalora_lam",
    "adalora_b",
    "rank_mask",
    "adapter_dropout",
    *SETTINGS,
)
