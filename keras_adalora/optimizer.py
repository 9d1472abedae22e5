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

import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_adalora._arrays import float32 as _float32
from keras_adalora._arrays import to_numpy
from keras_adalora import _distribution
from keras_adalora import _keras
from keras_adalora import importance as importance_lib
from keras_adalora import regularizers
from keras_adalora._validation import check_int
from keras_adalora.adapter import A_NAME
from keras_adalora.adapter import B_NAME
from keras_adalora.adapter import LAM_NAME

IMPORTANCE_KINDS = tuple(importance_lib.KINDS)
_ADAPTER_NAMES = (A_NAME, LAM_NAME, B_NAME)
# The rank schedule as stored in `AdaLoRAOptimizer.schedule`, all in
# optimizer steps except the budgets: where AdaLoRA training started, the
# last warm-up step, the step the ranks freeze at, the last step of
# training, the budgets B0 and BT (SPEC.md section 5), and what they count
# (an index into `BUDGET_UNITS`; files saved before it existed count
# components).
SCHEDULE_FIELDS = (
    "start",
    "tinit",
    "tfinal",
    "total_steps",
    "initial_budget",
    "target_budget",
    "budget_unit",
)
BUDGET_UNITS = ("components", "parameters")


def layer_key(variable):
    """The path of the layer that owns `variable` (`"model/dense"`)."""
    return _keras.variable_path_layer(variable)


@keras.saving.register_keras_serializable(package="keras_adalora")
class AdaLoRAOptimizer(keras.optimizers.Optimizer):
    """Wraps an optimizer to track AdaLoRA importance scores at every step.

    Each `apply(grads, variables)` first updates the scores of the adapter
    variables (`adalora_A`, `adalora_lam`, `adalora_B`) from this step's
    gradients, then lets the wrapped optimizer apply the gradients, with
    the orthogonality penalty's gradient added for the layers it watches
    (`watch`). Nothing else changes: learning rate, iterations and slots
    are the inner optimizer's.

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
        importance: `"sensitivity"`, `"frobenius"`, or an
            `importance.Importance` of your own (which carries its own
            betas; see `keras_adalora.importance`).
        history_capacity: how many rank drops the rank history keeps per
            layer (`rank_drops`); `None` sizes it at `build` to the
            largest adapter, which holds every drop a schedule can make.
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
        history_capacity=None,
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
        kind = importance_lib.get(importance, beta1, beta2)
        history_capacity = check_int(
            history_capacity, "history_capacity", 1, allow_none=True
        )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.history_capacity = history_capacity
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        # The kind of score (`importance.Importance`); `importance` is its
        # name for the built-in kinds, the object itself otherwise.
        self.kind = kind
        self.importance = importance if isinstance(importance, str) else kind
        # `{layer path: _Watched}`, from `watch`.
        self.watched = {}
        self._scoring_before_build = True

    @_keras.no_automatic_dependency_tracking
    def build(self, var_list):
        _distribution.check_tf_strategy(
            _keras.distribution_strategy(self), var_list
        )
        layers = {}
        for variable in var_list:
            if variable.name in _ADAPTER_NAMES:
                layers.setdefault(layer_key(variable), {})[
                    variable.name
                ] = variable
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
        self._score_state = [
            self.add_variable(
                shape=spec.shape,
                initializer="zeros",
                dtype="float32",
                aggregation=_distribution.REPLICATED_AGGREGATION,
                layout=(
                    None
                    if spec.like is None
                    else _distribution.variable_layout(spec.like)
                ),
                name=spec.name,
            )
            for spec in self.kind.init(self._views(self._variable_parts))
        ]
        self._mask_offsets = {}
        if self.kind.needs_masks:
            # A kind that reads the rank masks in the step gets a copy here:
            # a JAX train step cannot read model variables from inside the
            # optimizer, so the allocator writes them (`record_masks`).
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
        # Whether the step updates the scores: a value the compiled step
        # reads, so that turning scoring off when the ranks freeze costs no
        # retrace; the step then skips the scoring branch (`ops.cond`).
        self._scoring = self.add_variable(
            shape=(),
            initializer=keras.initializers.Constant(
                int(self._scoring_before_build)
            ),
            dtype="int",
            aggregation=_distribution.REPLICATED_AGGREGATION,
            name="scoring",
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
        # The rank history: per scored layer, the optimizer steps at which
        # it lost a component, in order, -1 in the slots not used yet (see
        # `record_rank_drops`). Sized once (then kept in the config), so
        # that compaction and reloading carry it over. Created last: files
        # saved before it existed lack only this variable.
        if self.history_capacity is None:
            self.history_capacity = max(
                (int(p[LAM_NAME].shape[0]) for p in self._adapter_layers.values()),
                default=1,
            ) or 1
        self.rank_drops = self.add_variable(
            shape=(len(self._adapter_layers), self.history_capacity),
            initializer=keras.initializers.Constant(-1),
            dtype="int",
            aggregation=_distribution.REPLICATED_AGGREGATION,
            name="rank_drops",
        )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def _variable_parts(self):
        """`(path, A, lam, B)` variables of every scored layer, in order."""
        return [
            (key, parts[A_NAME], parts[LAM_NAME], parts[B_NAME])
            for key, parts in self._adapter_layers.items()
        ]

    def _views(self, factors, masks=None):
        """`importance.AdapterView`s of the scored layers from their
        `(path, a, lam, b)` (variables, tensors or arrays)."""
        return [
            importance_lib.AdapterView(
                key,
                a,
                lam,
                b,
                mask=None if masks is None else masks[i],
                scale=self.watched[key].scale if key in self.watched else 1.0,
                penalty_weight=self._penalty_weight(key),
                penalty_form=self._penalty_form(key),
            )
            for i, (key, a, lam, b) in enumerate(factors)
        ]

    def _penalty_weight(self, key):
        return self.watched[key].penalty_weight if key in self.watched else 0.0

    def _penalty_form(self, key):
        return (
            self.watched[key].penalty_form if key in self.watched else "squared"
        )

    @property
    def scoring(self):
        """Whether each step updates the scores (off once the ranks are
        frozen). Setting it changes a value the compiled step reads: no
        retrace."""
        if not self.built:
            return self._scoring_before_build
        return bool(int(to_numpy(self._scoring)))

    @scoring.setter
    def scoring(self, on):
        if not self.built:
            self._scoring_before_build = bool(on)
        else:
            self._scoring.assign(int(bool(on)))

    @property
    def variables(self):
        return (
            _keras.optimizer_own_variables(self)
            + self.inner_optimizer.variables
        )

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        variables = (
            _keras.optimizer_trainable_variables(self)
            if trainable_variables is None
            else trainable_variables
        )
        grads, variables = list(grads), list(variables)
        if self._adapter_layers:
            grads = self._update_scores(grads, variables)
        self.inner_optimizer.apply(grads, trainable_variables)

    def _effective_gradients(self, grads, variables):
        """The gradients the inner optimizer will actually apply this call,
        and whether it applies them at all (gradient accumulation)."""
        inner = self.inner_optimizer
        steps = inner.gradient_accumulation_steps
        if not steps:
            return grads, None
        # `iterations` counts updates here; `applied_batches` counts batches.
        is_update = ops.equal(
            ops.mod(_keras.applied_batches(inner) + 1, steps), 0
        )
        effective = []
        for grad, variable in zip(grads, variables):
            accumulated = _keras.accumulated_gradient(inner, variable)
            effective.append((grad + accumulated) / steps)
        return effective, is_update

    @_keras.no_automatic_dependency_tracking
    def watch(self, model):
        """Takes over the orthogonality penalty of `model`'s adapted layers
        and reads what the scores need to know of them.

        From then on the layers leave the penalty out of their losses and
        this optimizer adds its gradient (a closed form, computed for all
        layers of one shape at once) to the gradients of `A` and `B` in
        `apply`, after scoring them: the scores measure the task loss
        alone. The loss `fit` reports is then the task loss. The Frobenius
        score also reads each layer's scale `alpha / init_rank`.

        Call it before the first training step; `RankBudgetCallback` (for
        the length of each `fit`) and `RankAllocator` do. `release_penalty`
        hands the penalty back to the layers.

        Args:
            model: the adapted model this optimizer trains.
        """
        from keras_adalora.targets import adapted_layers
        from keras_adalora.targets import layer_path

        self.release_penalty()
        self.watched = {
            layer_path(layer): _Watched(
                layer.scale,
                layer.orth_reg_weight,
                layer.orth_penalty,
                weakref.ref(layer),
            )
            for layer in adapted_layers(model)
        }
        self._claim_penalty()

    @_keras.no_automatic_dependency_tracking
    def take_over(self, other):
        """Watches what `other` (an `AdaLoRAOptimizer` this one replaces)
        watched, and applies the penalties it applied."""
        owned = {
            key
            for key, info in other.watched.items()
            if info.layer() is not None and _owner(info.layer()) is other
        }
        other.release_penalty()
        self.release_penalty()
        self.watched = dict(other.watched)
        for key in owned:
            self.watched[key].layer().penalty_owner = weakref.ref(self)

    def _claim_penalty(self):
        for info in self.watched.values():
            layer = info.layer()
            if layer is not None and info.penalty_weight:
                layer.penalty_owner = weakref.ref(self)

    def release_penalty(self):
        """Hands the orthogonality penalty back to the watched layers: they
        add it to their losses again, and `apply` no longer does."""
        for info in self.watched.values():
            layer = info.layer()
            if layer is not None and _owner(layer) is self:
                layer.penalty_owner = None

    def _owned_penalties(self):
        """Indices (in `_variable_parts` order) of the layers whose penalty
        this optimizer applies now: watched, penalised, switched on."""
        owned = []
        for i, (key, *_) in enumerate(self._variable_parts):
            info = self.watched.get(key)
            layer = None if info is None else info.layer()
            if (
                layer is not None
                and info.penalty_weight
                and _owner(layer) is self
                and not layer.adapter_disabled
            ):
                owned.append(i)
        return owned

    def _penalty_gradients(self, indices, parts):
        """`{index: (grad_a, grad_b)}`: the weighted penalty's gradients of
        the layers at `indices` of `parts` (`(path, a, lam, b)` tensors),
        but for those compacted to rank 0 (no penalty, nothing to add)."""
        indices = [i for i in indices if int(parts[i][2].shape[0])]
        gradients = regularizers.grouped_penalty_gradients(
            [(parts[i][1], parts[i][3]) for i in indices],
            [self._penalty_weight(parts[i][0]) for i in indices],
            [self._penalty_form(parts[i][0]) for i in indices],
        )
        return dict(zip(indices, gradients))

    def record_masks(self, masks_by_path):
        """Copies the layers' rank masks into the optimizer's state.

        Only the Frobenius score reads them (inside the train step, where
        model variables are out of reach on JAX); a no-op otherwise.

        Args:
            masks_by_path: `{layer path: (r,) 0/1 array}` for the layers
                this optimizer scores.
        """
        if not self.kind.needs_masks or not self._adapter_layers:
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
        values = [int(v) for v in to_numpy(self.schedule)]
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

    def record_rank_drops(self, dropped_by_path, step):
        """Adds to the rank history: each layer in `dropped_by_path` lost
        that many components at optimizer `step`."""
        drops = np.array(to_numpy(self.rank_drops), dtype="int32")
        keys = list(self._adapter_layers)
        for path, count in dropped_by_path.items():
            if count <= 0 or path not in keys:
                continue
            row = drops[keys.index(path)]
            free = np.flatnonzero(row < 0)[: int(count)]
            row[free] = step
        self.rank_drops.assign(drops)

    def rank_drops_on_host(self):
        """`{layer path: [steps]}`: the steps at which each scored layer
        lost a component, once per component, in order."""
        drops = to_numpy(self.rank_drops)
        return {
            key: [int(s) for s in drops[i] if s >= 0]
            for i, key in enumerate(self._adapter_layers)
        }

    def _update_scores(self, grads, variables):
        """Adds the orthogonality penalty's gradient where this optimizer
        owns it (see `watch`), scores the step, and returns the gradients
        the inner optimizer applies."""
        position = {
            v.path: i
            for i, v in enumerate(variables)
            if v.name in _ADAPTER_NAMES
        }
        ordered = self._ordered
        parts = [
            (key, a.value, lam.value, b.value)
            for key, a, lam, b in self._variable_parts
        ]
        # An adapter that no loss depends on gets no gradient on TensorFlow
        # and torch and a zero one on JAX: zero everywhere.
        task = [
            (
                ops.zeros(v.shape, "float32")
                if v.path not in position or grads[position[v.path]] is None
                else grads[position[v.path]]
            )
            for v in ordered
        ]
        applied = list(task)
        penalties = self._penalty_gradients(
            [
                i
                for i in self._owned_penalties()
                if ordered[3 * i].path in position
                and ordered[3 * i + 2].path in position
            ],
            parts,
        )
        if penalties:
            # Each replica adds its share: the optimizer sums the replicas'
            # gradients (in which the task loss is already divided).
            share = _distribution.replica_share()
            grads = list(grads)
            for i, pair in penalties.items():
                for k, penalty in zip((3 * i, 3 * i + 2), pair):
                    if share != 1.0:
                        penalty = penalty * share
                    applied[k] = ops.add(applied[k], _like(penalty, applied[k]))
                    grads[position[ordered[k].path]] = applied[k]
        if not all(v.path in position for v in ordered):
            # Some adapter is not among the variables this call applies (a
            # custom loop updating part of the model): nothing consistent
            # to score.
            return grads
        # With gradient accumulation the scores read the inner optimizer's
        # accumulated gradients, which hold the penalty's: take it out of
        # their mean below. Otherwise they score this step's task gradients.
        accumulating = bool(self.inner_optimizer.gradient_accumulation_steps)
        state = [variable.value for variable in self._score_state]
        effective, is_update = self._effective_gradients(
            applied if accumulating else task, ordered
        )
        # Replicas must score the same gradients to write the same masks.
        # (Outside the branch below: tf.distribute cannot all-reduce inside
        # a `cond`. Elsewhere this is the identity.)
        effective = _distribution.global_gradients(effective)

        def score():
            masks = None
            if self.kind.needs_masks:
                copy = self.mask_copy.value
                masks = [
                    ops.slice(copy, (offset,), (size,))
                    for offset, size in self._mask_offsets.values()
                ]
            views = self._views(parts, masks)
            # The scores measure the task loss: take out the penalty's
            # gradient where the layer's loss carried it (or it was
            # accumulated with the task's).
            scored = list(effective)
            in_losses = [
                i
                for i, view in enumerate(views)
                if view.penalty_weight and i not in penalties
            ]
            taken_out = self._penalty_gradients(in_losses, parts)
            if accumulating:
                taken_out.update(penalties)
            for i, (penalty_a, penalty_b) in taken_out.items():
                scored[3 * i] = _float32(scored[3 * i]) - penalty_a
                scored[3 * i + 2] = _float32(scored[3 * i + 2]) - penalty_b
            per_layer = [scored[3 * i : 3 * i + 3] for i in range(len(views))]
            new = self.kind.update(state, views, per_layer)
            # Non-finite gradients (an overflowed step) leave the scores as
            # they were; so does a micro-batch of gradient accumulation.
            keep = self.kind.accepts(scored, new)
            if is_update is not None:
                keep = ops.logical_and(keep, is_update)
            return [ops.where(keep, n, o) for n, o in zip(new, state)]

        new = ops.cond(
            ops.greater(self._scoring.value, 0), score, lambda: list(state)
        )
        for variable, value in zip(self._score_state, new):
            variable.assign(value)
        return grads

    # Scores, read by the callback at mask steps -----------------------------

    def scores_on_host(self, layer_paths, alive=None):
        """Component and layer scores of many layers as NumPy arrays.

        The kind's `scores` (`importance.Sensitivity.scores`: component `i`
        scores `s(lam_i) + mean_j s(A_ji) + mean_j s(B_ij)` with
        `s = I_bar * U_bar`, a layer the sum of its alive components;
        `importance.Frobenius.scores`: components score `|lam_i|`, a layer
        its smoothed `||delta_W||_F`), from one read of each score buffer:
        the allocator calls this at every mask step, where one small device
        op per layer would cost more than the allocation. Pruned components
        are never candidates again (the allocator only chooses among alive
        ones), so their stale values do not matter.

        Args:
            layer_paths: the layers to score.
            alive: optionally, one boolean mask per layer of `layer_paths`.

        Returns:
            `(component_scores, layer_scores)`: a list of `(r,)` arrays and a
            list of floats, in the order of `layer_paths`.
        """
        keys = list(self._adapter_layers)
        alive_by_key = (
            dict(zip(layer_paths, alive)) if alive is not None else {}
        )
        views = self._views(
            [
                (key, a, to_numpy(lam.value), b)
                for key, a, lam, b in self._variable_parts
            ]
        )
        alive_all = [
            (
                np.asarray(alive_by_key[key], bool)
                if key in alive_by_key
                else np.ones(int(view.lam.shape[0]), bool)
            )
            for key, view in zip(keys, views)
        ]
        state = [to_numpy(v.value) for v in self._score_state]
        components, totals = self.kind.scores(state, views, alive_all)
        index = [keys.index(path) for path in layer_paths]
        return [components[i] for i in index], [totals[i] for i in index]

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
        return _keras.applied_batches(self.inner_optimizer)

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def save_own_variables(self, store):
        # Only this wrapper's own state: saving walks into `inner_optimizer`
        # and stores its variables there (Keras's default would store them
        # twice, doubling the optimizer part of every file).
        for i, variable in enumerate(_keras.optimizer_own_variables(self)):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        own = _keras.optimizer_own_variables(self)
        if len(store.keys()) == len(own) - 1 and own[-1] is self.rank_drops:
            # Saved before the rank history existed: it starts empty.
            own = own[:-1]
        if len(store.keys()) != len(own):
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}': it "
                f"has {len(own)} variables of its own (scores "
                "and schedule) whereas the saved one has "
                f"{len(store.keys())}. The file was saved from another "
                "AdaLoRA setup (other adapters, importance or version).",
                stacklevel=2,
            )
            return
        for i, variable in enumerate(own):
            value = np.asarray(store[str(i)])
            if variable is self.schedule and value.shape[0] < len(SCHEDULE_FIELDS):
                # Saved before the schedule recorded its budget's unit.
                value = np.concatenate([value, [0]]).astype(value.dtype)
            variable.assign(value)

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
            "importance": (
                self.importance
                if isinstance(self.importance, str)
                else keras.saving.serialize_keras_object(self.importance)
            ),
            "history_capacity": self.history_capacity,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        if isinstance(config.get("importance"), dict):
            config["importance"] = keras.saving.deserialize_keras_object(
                config["importance"], custom_objects=custom_objects
            )
        return cls(inner, **config)


class _Watched:
    """What `AdaLoRAOptimizer.watch` keeps of one adapted layer."""

    def __init__(self, scale, penalty_weight, penalty_form, layer):
        self.scale = scale
        self.penalty_weight = penalty_weight
        self.penalty_form = penalty_form
        self.layer = layer  # a weak reference


def _owner(layer):
    """The optimizer that applies `layer`'s penalty, or None."""
    owner = getattr(layer, "penalty_owner", None)
    return None if owner is None else owner()




def _like(x, other):
    """`x` in the dtype of the tensor `other` (or the dtype `other`), with no
    operation where it already is."""
    dtype = keras.backend.standardize_dtype(
        other if isinstance(other, str) else other.dtype
    )
    if keras.backend.standardize_dtype(x.dtype) == dtype:
        return x
    return ops.cast(x, dtype)
