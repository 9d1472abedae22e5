"""`RankBudgetCallback`: AdaLoRA's rank schedule inside `model.fit`."""

import keras
from keras import ops

from keras_adalora import _distribution
from keras_adalora import importance as importance_lib
from keras_adalora import schedule
from keras_adalora.allocator import RankAllocator
from keras_adalora.allocator import check_int
from keras_adalora.allocator import validate_budget_args
from keras_adalora.optimizer import IMPORTANCE_KINDS
from keras_adalora.optimizer import AdaLoRAOptimizer


class RankBudgetCallback(keras.callbacks.Callback):
    """Prunes AdaLoRA adapters to a global rank budget during `fit`.

    Add it to `fit` and nothing else changes in your code:

        model.fit(x, y, epochs=3, callbacks=[RankBudgetCallback(target_rank=4)])

    At the start of training the callback wraps the model's optimizer in an
    `AdaLoRAOptimizer`, which updates every adapter component's importance
    score from each step's gradients inside the compiled train step (SPEC.md
    section 3). The callback then follows AdaLoRA's three phases (SPEC.md
    section 5), counting `t` in optimizer steps:

    - `t <= tinit`: warm-up, every component alive;
    - `tinit < t < tfinal`: every `delta_t` steps the budget
      `b(t) = BT + (B0 - BT) * (1 - (t - tinit) / (tfinal - tinit))^3`
      (floored) is recomputed and only the `b(t)` best components stay
      alive (`rank_mask` = 1);
    - `t >= tfinal`: exactly `BT` components alive, masks frozen, scoring
      off (the rest of training costs what LoRA costs).

    `B0 = init_rank * n` and `BT = target_rank * n` (or `total_rank`) for
    `n` adapted layers. `t` is the optimizer's step counter, so several
    `fit` calls continue one schedule, and everything the schedule needs
    (scores, last mask step, masks, step) lives in variables saved with the
    model and its optimizer: `BackupAndRestore` and checkpoints resume it
    exactly. Every batch and epoch log gains `adalora_budget` (`b(t)`) and
    `adalora_rank` (alive components in all); put this callback before
    `TensorBoard` or `CSVLogger` in the list so they record them.

    Args:
        target_rank: average rank per adapted layer at the end of pruning.
        init_rank: average rank per layer at the start of pruning; defaults
            to the adapters' own `init_rank`.
        tinit: last warm-up step: an optimizer step, or a float in (0, 1)
            for that fraction of `total_steps`.
        tfinal: step from which ranks are frozen (absolute, unlike PEFT's
            `tfinal`, which counts the final phase's length), or a fraction.
        total_steps: last optimizer step of training. Defaults to where this
            `fit` call will end; when given, it wins.
        delta_t: steps between two mask updates while pruning.
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of the uncertainty.
        importance: `"sensitivity"` (the paper's `|theta * grad|`, smoothed,
            times its uncertainty) or `"frobenius"` (the design note's
            smoothed `||delta_W||_F` per layer, components ranked by
            `|lam|`; needs `tinit > 0`).
        allocation: `"global"` (the best components across all layers) or
            `"layer"` (each layer gets rank in proportion to its score,
            `clip(min_rank, max_rank, b * s_l / sum s)`).
        min_rank: fewest components any layer keeps.
        max_rank: most components any layer keeps (default: its capacity).
        total_rank: the final budget `BT` in components, instead of
            `target_rank * n`.

    Raises:
        ValueError: in the constructor, or when training begins (before any
            weight changes), for inconsistent arguments: see the messages.

    Example:

    >>> callback = RankBudgetCallback(target_rank=4, tinit=0.1, tfinal=0.7)
    >>> model.fit(x, y, epochs=10, callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(
        self,
        target_rank=8,
        init_rank=None,
        tinit=0.1,
        tfinal=0.7,
        total_steps=None,
        delta_t=10,
        beta1=0.85,
        beta2=0.85,
        importance="sensitivity",
        allocation="global",
        min_rank=0,
        max_rank=None,
        total_rank=None,
    ):
        super().__init__()
        (
            self.target_rank,
            self.init_rank,
            self.allocation,
            self.min_rank,
            self.max_rank,
            self.total_rank,
        ) = validate_budget_args(
            target_rank=target_rank,
            init_rank=init_rank,
            allocation=allocation,
            min_rank=min_rank,
            max_rank=max_rank,
            total_rank=total_rank,
        )
        self.total_steps = check_int(
            total_steps, "total_steps", 1, allow_none=True
        )
        self.delta_t = check_int(delta_t, "delta_t", 1)
        if importance not in IMPORTANCE_KINDS:
            raise ValueError(
                f"`importance` must be one of {IMPORTANCE_KINDS}. "
                f"Received: importance={importance!r}"
            )
        self.importance = importance
        importance_lib.validate_betas(beta1, beta2)
        self.beta1 = beta1
        self.beta2 = beta2
        # The form of tinit/tfinal is checked now (a step count of 1 stands
        # in for an unknown total); their order now when both are of one
        # kind, else once total_steps is known.
        for name, value in (("tinit", tinit), ("tfinal", tfinal)):
            schedule.resolve_step(value, self.total_steps or 1, name)
        same_kind = isinstance(tinit, float) == isinstance(tfinal, float)
        if same_kind and not tinit < tfinal:
            raise ValueError(
                f"`tinit`={tinit} must come before `tfinal`={tfinal}: "
                "pruning runs from tinit to tfinal."
            )
        self.tinit = tinit
        self.tfinal = tfinal
        self._installed = None
        self._allocator = None

    @property
    def target_budget(self):
        """The final budget `BT` in rank-1 components (`target_rank` times
        the number of adapted layers, or `total_rank`); `None` until the
        callback is set on a model (by `fit`)."""
        if self._allocator is None:
            return None
        return self._allocator.target_budget

    # Setup ----------------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        self._allocator = RankAllocator.for_model(
            model,
            caller="RankBudgetCallback",
            target_rank=self.target_rank,
            init_rank=self.init_rank,
            allocation=self.allocation,
            min_rank=self.min_rank,
            max_rank=self.max_rank,
            total_rank=self.total_rank,
        )
        # The optimizer wrapper goes in before any other callback's
        # `on_train_begin`, so that `BackupAndRestore` restores the scores.
        self._install_optimizer(model)
        self._allocator.optimizer = self._optimizer

    def _install_optimizer(self, model):
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                "RankBudgetCallback needs a compiled model: call "
                "`model.compile(optimizer=..., loss=...)` before `fit`."
            )
        holder, attribute = model, "optimizer"
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # Scores must see unscaled gradients: go inside the loss scaler.
            holder, attribute = optimizer, "inner_optimizer"
            optimizer = optimizer.inner_optimizer
        if isinstance(optimizer, AdaLoRAOptimizer):
            if (optimizer.beta1, optimizer.beta2, optimizer.importance) != (
                self.beta1,
                self.beta2,
                self.importance,
            ):
                raise ValueError(
                    "This model's optimizer already tracks AdaLoRA scores "
                    f"with beta1={optimizer.beta1}, beta2={optimizer.beta2}, "
                    f"importance={optimizer.importance!r}; a second fit "
                    "continues that schedule and must use the same values."
                )
            optimizer.watch(model)
            self._optimizer = optimizer
            self._installed = None
            return
        # Under tf.distribute the wrapper and its score variables belong in
        # the strategy the model was compiled under (fit runs outside it).
        with _distribution.optimizer_scope(model):
            wrapper = AdaLoRAOptimizer(
                optimizer, self.beta1, self.beta2, self.importance
            )
            wrapper.watch(model)
            wrapper.build(model.trainable_variables)
        missing = [
            path
            for path in self._allocator.paths
            if path not in wrapper.adapter_layer_paths
        ]
        if missing:
            raise ValueError(
                f"The adapters of {missing} are not trainable, so no "
                "gradient reaches them. Unfreeze them (`layer.trainable = "
                "True`) and compile again."
            )
        setattr(holder, attribute, wrapper)
        compile_config = getattr(model, "_compile_config", None)
        if compile_config is not None and holder is model:
            compile_config.config["optimizer"] = wrapper
        # Retrace: an existing train function would call the bare optimizer.
        model.train_function = None
        self._optimizer = wrapper
        self._installed = (holder, attribute, optimizer)

    def _uninstall_optimizer(self):
        if self._installed is None:
            return
        holder, attribute, optimizer = self._installed
        setattr(holder, attribute, optimizer)
        compile_config = getattr(self.model, "_compile_config", None)
        if compile_config is not None and holder is self.model:
            compile_config.config["optimizer"] = optimizer
        self.model.train_function = None
        self._installed = None

    def _steps_per_update(self):
        return self._optimizer.inner_optimizer.gradient_accumulation_steps or 1

    def _read_state(self, first_epoch):
        """Resolves the schedule from where training stands (the JAX state
        synced); raises before training if it is invalid."""
        self.model  # noqa: B018 -- syncs the JAX state
        per_update = self._steps_per_update()
        self._micro_step = int(
            ops.convert_to_numpy(self._optimizer.applied_batches)
        )
        step = self._micro_step // per_update
        total = self.total_steps
        if total is None:
            steps = self.params.get("steps") if self.params else None
            epochs = self.params.get("epochs") if self.params else None
            if not steps or not epochs:
                raise ValueError(
                    "RankBudgetCallback cannot tell how many steps this "
                    "training runs (the dataset has no length). Pass "
                    "`total_steps=` (optimizer steps), or `steps_per_epoch=` "
                    "to fit."
                )
            total = step + (epochs - first_epoch) * steps // per_update
        self._allocator.configure_schedule(
            tinit=schedule.resolve_step(self.tinit, total, "tinit"),
            tfinal=schedule.resolve_step(self.tfinal, total, "tfinal"),
            total_steps=total,
            delta_t=self.delta_t,
        )
        self._allocator.sync_state()
        self._set_scoring(not self._allocator.frozen)

    def _set_scoring(self, on):
        if self._optimizer.scoring != on:
            self._optimizer.scoring = on
            self.model.make_train_function(force=True)

    # Training hooks -------------------------------------------------------

    def on_train_begin(self, logs=None):
        try:
            self._read_state(first_epoch=0)
        except Exception:
            self._uninstall_optimizer()
            raise
        self._first_epoch_seen = False

    def on_epoch_begin(self, epoch, logs=None):
        self._batch_in_epoch = -1
        if not self._first_epoch_seen:
            # Another callback may have restored a backup, or fit may start
            # at `initial_epoch`: resolve the schedule from where it stands.
            self._first_epoch_seen = True
            self._read_state(first_epoch=epoch)

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last step of this execution within the epoch; with
        # steps_per_execution > 1 several steps ran since the last call.
        self._micro_step += batch - self._batch_in_epoch
        self._batch_in_epoch = batch
        step = self._micro_step // self._steps_per_update()
        if self._allocator.due(step):
            self.model  # noqa: B018 -- syncs the JAX state before writing
            # Steps the loss scaler skipped never reached the optimizer:
            # trust its counter over ours.
            self._micro_step = int(
                ops.convert_to_numpy(self._optimizer.applied_batches)
            )
            step = self._micro_step // self._steps_per_update()
            if self._allocator.update(step) and self._allocator.frozen:
                self._set_scoring(False)
        self._log(step, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._log(self._micro_step // self._steps_per_update(), logs)

    def _log(self, step, logs):
        if logs is None:
            return
        logs["adalora_budget"] = self._allocator.budget_at(step)
        logs["adalora_rank"] = self._allocator.alive
