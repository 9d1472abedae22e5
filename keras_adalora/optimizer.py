"""`AdaLoRAOptimizer`: an optimizer wrapper that scores adapter components.

Keras shows callbacks no gradients, but every backend's `fit` hands them to
`optimizer.apply` (the JAX trainer through `stateless_apply`). Wrapping the
user's optimizer is therefore the one place where AdaLoRA's importance scores
can be updated from each step's real gradients inside the compiled train
step, with no host round trip and no extra forward or backward pass (the
same route `keras.optimizers.LossScaleOptimizer` takes).

The scores are optimizer variables: the JAX trainer only carries optimizer
variables through its pure train step, and they are saved and restored with
the optimizer (`model.save`, `BackupAndRestore`, checkpoints). So is the
rank schedule `RankBudgetCallback` resolves when AdaLoRA training starts
(`read_schedule`, `write_schedule`), so that it survives them too.
"""

import math
import warnings

import keras
import numpy as np
from keras import ops
from keras.src.utils import tracking

from keras_adalora import _distribution
from keras_adalora import importance as importance_lib
from keras_adalora.adapter import A_NAME
from keras_adalora.adapter import B_NAME
from keras_adalora.adapter import LAM_NAME

IMPORTANCE_KINDS = ("sensitivity", "frobenius")
_ADAPTER_NAMES = (A_NAME, LAM_NAME, B_NAME)
# The rank schedule as stored in `AdaLoRAOptimizer.schedule`, all in
# optimizer steps except the budgets (components): where AdaLoRA training
# started, the last warm-up step, the step the ranks freeze at, the last
# step of training, and the budgets B0 and BT (SPEC.md section 5).
SCHEDULE_FIELDS = (
    "start",
    "tinit",
    "tfinal",
    "total_steps",
    "initial_budget",
    "target_budget",
)


def layer_key(variable):
    """The path of the layer that owns `variable` (`"model/dense"`)."""
    return variable.path.rsplit("/", 1)[0]


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAOptimizer(keras.optimizers.Optimizer):
    """Wraps an optimizer to track AdaLoRA importance scores at every step.

    Each `apply(grads, variables)` first updates the scores of the adapter
    variables (`adalora_A`, `adalora_lam`, `adalora_B`) from this step's
    gradients, then lets the wrapped optimizer apply the gradients. Nothing
    else changes: learning rate, iterations and slots are the inner
    optimizer's.

    `importance="sensitivity"` (SPEC.md section 3) keeps, for every adapter
    entry, the smoothed sensitivity `I_bar` and uncertainty `U_bar` of
    `|theta * grad|`. `importance="frobenius"` keeps one smoothed
    `||delta_W||_F` per layer, of the update the layer adds (its scale and
    rank mask included; the allocator keeps a copy of the masks here). An
    adapter no loss depends on scores as if its gradient were zero, on
    every backend. Steps with non-finite adapter gradients leave
    the scores untouched. With `gradient_accumulation_steps` on the inner
    optimizer, scores are updated once per real update, from the averaged
    accumulated gradients.

    Distributed, every replica scores the gradients of the global batch:
    under `tf.distribute` (create the optimizer in the strategy's scope)
    the gradients are all-reduced for scoring, while the inner optimizer
    still receives the per-replica ones; under a `keras.distribution` that
    shards adapter variables, each gets score buffers with its own layout.

    `RankBudgetCallback` installs this wrapper by itself; use it directly
    only in a custom training loop.

    Args:
        inner_optimizer: the optimizer that updates the weights.
        beta1: EMA factor of the sensitivity (and of the Frobenius score).
        beta2: EMA factor of the uncertainty.
        importance: `"sensitivity"` or `"frobenius"`.
        name: optional name.

    Example:

    >>> optimizer = AdaLoRAOptimizer(keras.optimizers.Adam(1e-3))
    >>> optimizer.learning_rate is optimizer.inner_optimizer.learning_rate
    True
    """

    def __init__(
        self,
        inner_optimizer,
        beta1=0.85,
        beta2=0.85,
        importance="sensitivity",
        name=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                "AdaLoRAOptimizer takes no optimizer arguments of its own "
                f"(got {sorted(kwargs)}); set them on the inner optimizer."
            )
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "`inner_optimizer` must be a keras.optimizers.Optimizer. "
                f"Received: inner_optimizer={inner_optimizer!r}"
            )
        importance_lib.validate_betas(beta1, beta2)
        if importance not in IMPORTANCE_KINDS:
            raise ValueError(
                f"`importance` must be one of {IMPORTANCE_KINDS}. Received: "
                f"importance={importance!r}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.importance = importance
        self.penalty_weights = {}
        self.layer_scales = {}
        # Python flag read when the train step is traced: once the ranks are
        # frozen the callback turns scoring off and retraces, so the final
        # phase costs what plain LoRA costs.
        self.scoring = True

    @tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        _distribution.check_tf_strategy(
            getattr(self, "_distribution_strategy", None), var_list
        )
        layers = {}
        for variable in var_list:
            if variable.name in _ADAPTER_NAMES:
                layers.setdefault(layer_key(variable), {})[variable.name] = variable
        self._adapter_layers = {
            key: parts
            for key, parts in layers.items()
            if set(parts) == set(_ADAPTER_NAMES)
        }
        self._ordered = [
            parts[name]
            for parts in self._adapter_layers.values()
            for name in _ADAPTER_NAMES
        ]
        if self.importance == "sensitivity":
            self._score_groups = self._build_sensitivity_buffers()
            self._score_state = [
                buffer for _, *buffers in self._score_groups for buffer in buffers
            ]
        else:
            self._score_groups = []
            self._score_state = [
                self.add_variable(
                    shape=(len(self._adapter_layers),),
                    initializer="zeros",
                    dtype="float32",
                    aggregation=_distribution.REPLICATED_AGGREGATION,
                    name="frobenius",
                )
            ]
            # The Frobenius score is the norm of what a layer adds, which
            # depends on its rank mask; a JAX train step cannot read model
            # variables from inside the optimizer, so the allocator keeps a
            # copy of the masks here (see `record_masks`).
            self._mask_offsets = {}
            offset = 0
            for key, parts in self._adapter_layers.items():
                size = int(parts[LAM_NAME].shape[0])
                self._mask_offsets[key] = (offset, size)
                offset += size
            self.mask_copy = self.add_variable(
                shape=(offset,),
                initializer="ones",
                dtype="float32",
                aggregation=_distribution.REPLICATED_AGGREGATION,
                name="rank_masks",
            )
        # The step of the last mask update, kept with the optimizer state so
        # that a resumed run continues the same schedule.
        self.last_mask_step = self.add_variable(
            shape=(),
            initializer=keras.initializers.Constant(-1),
            dtype="int",
            aggregation=_distribution.REPLICATED_AGGREGATION,
            name="last_mask_step",
        )
        # The rank schedule, resolved once when AdaLoRA training starts (see
        # `SCHEDULE_FIELDS`); -1 until then.
        self.schedule = self.add_variable(
            shape=(len(SCHEDULE_FIELDS),),
            initializer=keras.initializers.Constant(-1),
            dtype="int",
            aggregation=_distribution.REPLICATED_AGGREGATION,
            name="schedule",
        )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    def _build_sensitivity_buffers(self):
        """The `I_bar`/`U_bar` buffers, as `(variables, ipt, unc)` groups.

        By default all adapter entries share one flat pair of buffers: the
        update is then a dozen fused operations per step instead of a dozen
        per variable (op dispatch dominates on eager torch and XLA CPU).
        When a `keras.distribution` shards some adapter variable, every
        variable gets its own pair instead, laid out like the variable, so
        that scores stay next to their parameters and the step never gathers
        a sharded gradient into one replicated buffer.
        """
        per_variable = any(
            _distribution.is_sharded(variable) for variable in self._ordered
        )
        if per_variable:
            groups = [[variable] for variable in self._ordered]
        else:
            groups = [self._ordered]
        built = []
        # `_slices` says where each variable's entries sit in its group's
        # (flattened) buffers.
        self._slices = {}
        for variables in groups:
            offset = 0
            for variable in variables:
                size = math.prod(variable.shape)
                self._slices[variable.path] = (
                    offset, size, tuple(variable.shape)
                )
                offset += size
            if per_variable:
                (variable,) = variables
                shape = tuple(variable.shape)
                layout = _distribution.variable_layout(variable)
                prefix = variable.path.replace("/", "_") + "_"
            else:
                shape = (offset,)
                layout, prefix = None, ""
            buffers = [
                self.add_variable(
                    shape=shape,
                    initializer="zeros",
                    dtype="float32",
                    aggregation=_distribution.REPLICATED_AGGREGATION,
                    layout=layout,
                    name=prefix + name,
                )
                for name in ("ipt_bar", "unc_bar")
            ]
            built.append((variables, *buffers))
        return built

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        variables = (
            self._trainable_variables
            if trainable_variables is None
            else trainable_variables
        )
        if self.scoring and self._adapter_layers:
            self._update_scores(list(grads), list(variables))
        self.inner_optimizer.apply(grads, trainable_variables)

    def _effective_gradients(self, grads, variables):
        """The gradients the inner optimizer will actually apply this call,
        and whether it applies them at all (gradient accumulation)."""
        inner = self.inner_optimizer
        steps = inner.gradient_accumulation_steps
        if not steps:
            return grads, None
        # `iterations` counts updates here; `_iterations` counts batches.
        is_update = ops.equal(ops.mod(inner._iterations + 1, steps), 0)
        effective = []
        for grad, variable in zip(grads, variables):
            accumulated = inner._accumulated_gradients[
                inner._get_variable_index(variable)
            ]
            effective.append((grad + accumulated) / steps)
        return effective, is_update

    def watch(self, model):
        """Reads what the scores need to know of each adapted layer.

        The orthogonality penalty's gradient on `A` and `B` has a closed
        form; knowing its weight, the sensitivity leaves it out and measures
        the task loss alone (otherwise a layer that does nothing for the task
        still scores from the penalty pulling its factors). The Frobenius
        score needs each layer's scale `alpha / init_rank`. Call it before
        the first training step; `RankBudgetCallback` and `RankAllocator` do.
        """
        from keras_adalora.targets import adapted_layers
        from keras_adalora.targets import layer_path

        layers = adapted_layers(model)
        self.penalty_weights = {
            layer_path(layer): layer.orth_reg_weight for layer in layers
        }
        self.layer_scales = {layer_path(layer): layer.scale for layer in layers}

    def record_masks(self, masks_by_path):
        """Copies the layers' rank masks into the optimizer's state.

        Only the Frobenius score reads them (inside the train step, where
        model variables are out of reach on JAX); a no-op otherwise.

        Args:
            masks_by_path: `{layer path: (r,) 0/1 array}` for the layers
                this optimizer scores.
        """
        if self.importance != "frobenius" or not self._adapter_layers:
            return
        flat = np.ones(int(self.mask_copy.shape[0]), dtype="float32")
        for key, (offset, size) in self._mask_offsets.items():
            if key in masks_by_path:
                flat[offset : offset + size] = np.asarray(
                    masks_by_path[key], dtype="float32"
                ).reshape(-1)
        self.mask_copy.assign(flat)

    def read_schedule(self):
        """The stored rank schedule as a dict of Python ints (the keys of
        `SCHEDULE_FIELDS`), or `None` before AdaLoRA training started."""
        values = [int(v) for v in ops.convert_to_numpy(self.schedule)]
        if values[0] < 0:
            return None
        return dict(zip(SCHEDULE_FIELDS, values))

    def write_schedule(self, schedule):
        """Stores a rank schedule (a dict with the keys of `SCHEDULE_FIELDS`)
        with the optimizer's state, so that checkpoints, resumed runs and
        later `fit` calls continue it."""
        self.schedule.assign(
            np.asarray([int(schedule[k]) for k in SCHEDULE_FIELDS], "int32")
        )

    def _update_scores(self, grads, variables):
        by_path = {
            v.path: g
            for g, v in zip(grads, variables)
            if v.name in _ADAPTER_NAMES
        }
        ordered = self._ordered
        if not all(v.path in by_path for v in ordered):
            # Some adapter is not among the variables this call applies (a
            # custom loop updating part of the model): nothing consistent
            # to score.
            return
        # An adapter that no loss depends on gets no gradient on TensorFlow
        # and torch and a zero one on JAX: score it as zero everywhere.
        grads = [
            ops.zeros(v.shape, "float32")
            if by_path[v.path] is None
            else by_path[v.path]
            for v in ordered
        ]
        grads, is_update = self._effective_gradients(grads, ordered)
        # Replicas must score the same gradients to write the same masks.
        grads = _distribution.global_gradients(grads)
        if self.importance == "sensitivity":
            grads = dict(zip((v.path for v in ordered), grads))
            for key, parts in self._adapter_layers.items():
                weight = self.penalty_weights.get(key, 0.0)
                if weight:
                    a, b = parts[A_NAME], parts[B_NAME]
                    penalty_a, penalty_b = _penalty_gradients(a, b, weight)
                    grads[a.path] = _float32(grads[a.path]) - penalty_a
                    grads[b.path] = _float32(grads[b.path]) - penalty_b
            packed = [
                (
                    _pack(variables, ipt_var.shape),
                    _pack([grads[v.path] for v in variables], ipt_var.shape),
                    ipt_var,
                    unc_var,
                )
                for variables, ipt_var, unc_var in self._score_groups
            ]
            keep = importance_lib.is_finite(*(grad for _, grad, _, _ in packed))
            if is_update is not None:
                keep = ops.logical_and(keep, is_update)
            for theta, grad, ipt_var, unc_var in packed:
                ipt, unc = importance_lib.sensitivity_update(
                    theta,
                    grad,
                    ipt_var.value,
                    unc_var.value,
                    self.beta1,
                    self.beta2,
                )
                ipt_var.assign(ops.where(keep, ipt, ipt_var.value))
                unc_var.assign(ops.where(keep, unc, unc_var.value))
        else:
            keep = importance_lib.is_finite(*grads)
            if is_update is not None:
                keep = ops.logical_and(keep, is_update)
            (score_var,) = self._score_state
            masks = self.mask_copy.value
            norms = []
            for key, parts in self._adapter_layers.items():
                offset, size = self._mask_offsets[key]
                mask = ops.slice(masks, (offset,), (size,))
                lam = _float32(parts[LAM_NAME]) * mask
                # ||scale * A diag(lam * mask) B||_F: what the layer adds.
                norms.append(
                    self.layer_scales.get(key, 1.0)
                    * _delta_frobenius_norm(parts[A_NAME], lam, parts[B_NAME])
                )
            norms = ops.stack(norms)
            new = importance_lib.frobenius_update(
                norms, score_var.value, self.beta1
            )
            score_var.assign(ops.where(keep, new, score_var.value))

    # Scores, read by the callback at mask steps -----------------------------

    def scores_on_host(self, layer_paths, alive=None):
        """Component and layer scores of many layers as NumPy arrays.

        Sensitivity: component `i` scores `s(lam_i) + mean_j s(A_ji) +
        mean_j s(B_ij)` with `s = I_bar * U_bar` (`importance.element_score`
        and `importance.component_scores`), a layer the sum of its
        components. Frobenius: components score `|lam_i|`, a layer its
        smoothed `||delta_W||_F` (of the masked, scaled update it adds).
        Pruned components are never candidates again (the allocator only
        chooses among alive ones), so their stale values do not matter.
        Computed on the host from one read of each
        score buffer: the allocator calls this at every mask step, where one
        small device op per layer would cost more than the allocation.

        Args:
            layer_paths: the layers to score.
            alive: optionally, one boolean mask per layer: a sensitivity
                layer score then sums its alive components only.

        Returns:
            `(component_scores, layer_scores)`: a list of `(r,)` arrays and a
            list of floats, in the order of `layer_paths`.
        """
        if self.importance == "frobenius":
            norms = ops.convert_to_numpy(self._score_state[0].value)
            keys = list(self._adapter_layers)
            components = [
                np.abs(
                    ops.convert_to_numpy(self._adapter_layers[p][LAM_NAME].value)
                )
                for p in layer_paths
            ]
            return components, [float(norms[keys.index(p)]) for p in layer_paths]
        entry_scores = {}
        for variables, ipt_var, unc_var in self._score_groups:
            ipt = ops.convert_to_numpy(ipt_var.value).reshape(-1)
            unc = ops.convert_to_numpy(unc_var.value).reshape(-1)
            flat = ipt * unc  # s = I_bar * U_bar (SPEC.md section 3)
            for variable in variables:
                offset, size, shape = self._slices[variable.path]
                entry_scores[variable.path] = flat[
                    offset : offset + size
                ].reshape(shape)
        components = []
        for path in layer_paths:
            a, lam, b = (
                entry_scores[self._adapter_layers[path][name].path]
                for name in _ADAPTER_NAMES
            )
            # importance.component_scores, in NumPy.
            components.append(lam + a.mean(axis=0) + b.mean(axis=1))
        if alive is None:
            alive = [np.ones(c.shape, dtype=bool) for c in components]
        totals = [
            float(c[np.asarray(m, bool)].sum())
            for c, m in zip(components, alive)
        ]
        return components, totals

    @property
    def adapter_layer_paths(self):
        """Paths of the adapted layers this optimizer scores."""
        return list(self._adapter_layers)

    # Delegation to the inner optimizer -------------------------------------

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def applied_batches(self):
        """Gradients applied so far, counting every micro-batch of gradient
        accumulation (`iterations` counts the updates)."""
        return self.inner_optimizer._iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def save_own_variables(self, store):
        # Only this wrapper's own state: saving walks into `inner_optimizer`
        # and stores its variables there (Keras's default would store them
        # twice, doubling the optimizer part of every file).
        for i, variable in enumerate(self._variables):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        if len(store.keys()) != len(self._variables):
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}': it "
                f"has {len(self._variables)} variables of its own (scores "
                "and schedule) whereas the saved one has "
                f"{len(store.keys())}. The file was saved from another "
                "AdaLoRA setup (other adapters, importance or version).",
                stacklevel=2,
            )
            return
        for i, variable in enumerate(self._variables):
            variable.assign(store[str(i)])

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "beta1": self.beta1,
            "beta2": self.beta2,
            "importance": self.importance,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def _float32(x):
    x = ops.convert_to_tensor(x)
    if keras.backend.standardize_dtype(x.dtype) == "float32":
        return x  # an op fewer per tensor: dispatch is the cost here
    return ops.cast(x, "float32")


def _pack(tensors, shape):
    """`tensors` as one float32 tensor of `shape`: a lone tensor reshaped
    (a no-op when it already has that shape, keeping its sharding), several
    flattened and concatenated in order."""
    if len(tensors) == 1:
        return ops.reshape(_float32(tensors[0]), shape)
    return ops.concatenate([ops.reshape(_float32(t), (-1,)) for t in tensors])


def _penalty_gradients(a, b, weight):
    """Gradients of `weight * (||A^T A - I||^2 + ||B B^T - I||^2)` w.r.t.
    `A` and `B`: `4 weight A (A^T A - I)` and `4 weight (B B^T - I) B`,
    written as `A (A^T A) - A` to save the identity matrix."""
    a, b = _float32(a), _float32(b)
    grad_a = ops.matmul(a, ops.matmul(ops.transpose(a), a)) - a
    grad_b = ops.matmul(ops.matmul(b, ops.transpose(b)), b) - b
    return 4.0 * weight * grad_a, 4.0 * weight * grad_b


def _delta_frobenius_norm(a, lam, b):
    """`||A diag(lam) B||_F` from r x r Gram matrices, never forming the
    d_in x d_out product: `sum_ij lam_i lam_j (A^T A)_ij (B B^T)_ij`."""
    a = ops.convert_to_tensor(a)
    b = ops.convert_to_tensor(b)
    lam = ops.convert_to_tensor(lam)
    gram = ops.matmul(ops.transpose(a), a) * ops.matmul(b, ops.transpose(b))
    squared = ops.sum(gram * ops.expand_dims(lam, 0) * ops.expand_dims(lam, 1))
    return ops.sqrt(ops.maximum(squared, 0.0))
