"""`RankBudgetCallback`: AdaLoRA's rank schedule inside `model.fit`."""

import warnings

import keras

from keras_adalora._arrays import to_numpy
from keras_adalora import _distribution
from keras_adalora import adapted_model
from keras_adalora._backend import set_compiled_optimizer
from keras_adalora import importance as importance_lib
from keras_adalora import schedule
from keras_adalora.allocator import RankAllocator
from keras_adalora.allocator import RankBudget
from keras_adalora._validation import check_int
from keras_adalora.allocator import validate_budget_args
from keras_adalora.optimizer import AdaLoRAOptimizer
from keras_adalora.optimizer import BUDGET_UNITS


class RankBudgetCallback(keras.callbacks.Callback):
    """Prunes AdaLoRA adapters to a global rank budget during `fit`.

    Add it to `fit` and nothing else changes in your code:

        model.fit(x, y, epochs=3, callbacks=[RankBudgetCallback(target_rank=4)])

    At the start of training the callback wraps the model's optimizer in an
    `AdaLoRAOptimizer`, which updates every adapter component's importance
    score from each step's gradients inside the compiled train step (SPEC.md
    section 3). The callback then follows AdaLoRA's three phases (SPEC.md
    section 5), counting `t` in optimizer steps from where AdaLoRA training
    starts (step 0 on a freshly compiled model; later on a model that
    trained before it was adapted):

    - `t <= tinit`: warm-up, every component alive;
    - `tinit < t < tfinal`: every `delta_t` steps the budget
      `b(t) = BT + (B0 - BT) * (1 - (t - tinit) / (tfinal - tinit))^3`
      (floored) is recomputed and only the `b(t)` best components among the
      alive ones stay alive (`rank_mask` = 1): a pruned component never
      comes back;
    - `t >= tfinal`: exactly `BT` components alive, masks frozen, scoring
      off (the rest of training costs what LoRA costs).

    `B0` is every component alive when the schedule starts (`init_rank * n`
    on fresh adapters) and `BT = target_rank * n` (or `total_rank`) for `n`
    adapted layers.

    With `target_params` the budget counts parameters instead: the
    trainable adapter parameters the alive components hold, each
    component costing its layer's `d_in + d_out + 1` (the kernel read as a
    `(d_in, d_out)` matrix, as `summary` shows it). `B0` is what the alive
    components hold, `BT = target_params`, and a mask update keeps the
    components with the best score per parameter that fit in `b(t)`: the
    adapters end at or below `target_params`, less than one component's
    cost below it.

    One schedule per compiled model. It is resolved once, at the first
    `fit` with this callback (fractions of `tinit`, `tfinal` taken of that
    fit's length unless `total_steps` says otherwise), and stored with the
    optimizer's state together with the scores and the last mask step; the
    masks are model variables. Later `fit` calls continue it (a schedule
    frozen in one fit stays frozen in the next), and `BackupAndRestore`,
    `ModelCheckpoint` files and `model.save` resume it exactly. A later
    `fit` whose callback asks for another schedule is refused before
    training; compile the model again to start a new one on the ranks that
    are alive. At the end of `fit`, weights restored behind the callback's
    back (`EarlyStopping(restore_best_weights=True)`) keep the masks the
    callback last wrote, with a warning: the model always holds the ranks
    the logs report.

    Every batch and epoch log gains `adalora_budget` (`b(t)`, in the
    budget's unit) and `adalora_rank` (alive components in all), and with
    `target_params` also `adalora_params` (the parameters they hold); put
    this callback before `TensorBoard` or `CSVLogger` in the list so they
    record them.

    Args:
        target_rank: average rank per adapted layer at the end of pruning;
            `None` (the default) means 8 unless `total_rank` or
            `target_params` gives the budget.
        init_rank: rank per layer at the start of pruning. Only a check: it
            must lie between the largest alive rank of an adapter and the
            largest rank an adapter holds; `None` (the default) uses what
            the adapters hold.
        tinit: last warm-up step, counted from where AdaLoRA training
            starts: a number of optimizer steps, or a float in (0, 1) for
            that fraction of `total_steps`.
        tfinal: step from which ranks are frozen, counted like `tinit`
            (unlike PEFT's `tfinal`, which counts the final phase's length),
            or a fraction.
        total_steps: optimizer steps of AdaLoRA training in all. Defaults to
            the length of the first `fit` (give it to spread one schedule
            over several fits).
        delta_t: steps between two mask updates while pruning.
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of the uncertainty.
        importance: `"sensitivity"` (the paper's `|theta * grad|`, smoothed,
            times its uncertainty) or `"frobenius"` (the design note's
            smoothed `||delta_W||_F` per layer, of the scaled and masked
            update the layer adds; components ranked by `|lam|`; needs
            `tinit > 0`), or a kind of your own, an
            `keras_adalora.importance.Importance` instance.
        allocation: `"global"` (the best components across all layers) or
            `"layer"` (each layer gets rank in proportion to its score,
            `clip(min_rank, max_rank, b * s_l / sum s)`).
        min_rank: fewest components any layer keeps.
        max_rank: most components any layer keeps (default: its capacity).
        total_rank: the final budget `BT` in components, instead of
            `target_rank * n`.
        target_params: the final budget `BT` in trainable adapter
            parameters, instead of a budget in components (not with
            `target_rank` or `total_rank`).

    Raises:
        ValueError: in the constructor, or when training begins (before any
            weight changes), for inconsistent arguments: see the messages.

    Example:

    >>> callback = RankBudgetCallback(target_rank=4, tinit=0.1, tfinal=0.7)
    >>> model.fit(x, y, epochs=10, callbacks=[callback])  # doctest: +SKIP
    >>> by_size = RankBudgetCallback(target_params=200_000)
    """

    def __init__(
        self,
        target_rank=None,
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
        target_params=None,
    ):
        super().__init__()
        (
            self.target_rank,
            self.init_rank,
            self.allocation,
            self.min_rank,
            self.max_rank,
            self.total_rank,
            self.target_params,
        ) = validate_budget_args(
            target_rank=target_rank,
            init_rank=init_rank,
            allocation=allocation,
            min_rank=min_rank,
            max_rank=max_rank,
            total_rank=total_rank,
            target_params=target_params,
        )
        self.total_steps = check_int(
            total_steps, "total_steps", 1, allow_none=True
        )
        self.delta_t = check_int(delta_t, "delta_t", 1)
        importance_lib.validate_betas(beta1, beta2)
        importance_lib.get(importance, beta1, beta2)  # checks it
        self.importance = importance
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
        self._budget = None
        self._allocator = None

    @property
    def target_budget(self):
        """The final budget `BT`: in rank-1 components (`target_rank` times
        the number of adapted layers, or `total_rank`), or `target_params`
        parameters; `None` until the callback is set on a model (by
        `fit`)."""
        if self._budget is None:
            return None
        return self._budget.target_budget

    @property
    def budget_unit(self):
        """What the budget counts: `"components"`, or `"parameters"` with
        `target_params`."""
        return "parameters" if self.target_params is not None else "components"

    # Setup ----------------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        self._budget = RankBudget(
            model,
            caller="RankBudgetCallback",
            target_rank=self.target_rank,
            init_rank=self.init_rank,
            allocation=self.allocation,
            min_rank=self.min_rank,
            max_rank=self.max_rank,
            total_rank=self.total_rank,
            target_params=self.target_params,
        )
        # The optimizer wrapper goes in before any other callback's
        # `on_train_begin`, so that `BackupAndRestore` restores the scores.
        self._install_optimizer(model)
        # Made whole once training starts and the schedule is known.
        self._allocator = None

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
            for path in self._budget.paths
            if path not in wrapper.adapter_layer_paths
        ]
        if missing:
            raise ValueError(
                f"The adapters of {missing} are not trainable, so no "
                "gradient reaches them. Unfreeze them (`layer.trainable = "
                "True`) and compile again."
            )
        self._swap_optimizer(holder, attribute, optimizer, wrapper)
        self._optimizer = wrapper
        self._installed = (holder, attribute, optimizer, wrapper)

    def _swap_optimizer(self, holder, attribute, old, new):
        setattr(holder, attribute, new)
        # `model.save` records the wrapper, so that a reloaded model
        # continues with its scores and schedule.
        set_compiled_optimizer(self.model, old, new)
        # Retrace: an existing train function would call the old optimizer.
        self.model.train_function = None

    def _uninstall_optimizer(self):
        self._optimizer.release_penalty()
        if self._installed is None:
            return
        holder, attribute, optimizer, wrapper = self._installed
        self._swap_optimizer(holder, attribute, wrapper, optimizer)
        self._installed = None

    def _steps_per_update(self):
        return self._optimizer.inner_optimizer.gradient_accumulation_steps or 1

    def _read_state(self, first_epoch, store):
        """Sets the allocator up from where training stands (the JAX state
        synced): the stored schedule if AdaLoRA training already started on
        this model (checked against this callback's arguments), else a new
        one starting now (stored when `store`). Raises before training if
        either is invalid."""
        self.model  # noqa: B018 -- syncs the JAX state
        self._micro_step = int(
            to_numpy(self._optimizer.applied_batches)
        )
        step = self._micro_step // self._steps_per_update()
        stored = self._optimizer.read_schedule()
        if stored is None:
            stored = self._new_schedule(step, first_epoch)
            if store:
                self._optimizer.write_schedule(stored)
        else:
            self._check_schedule(stored)
        self._allocator = RankAllocator(
            self.model,
            self._optimizer,
            tinit=stored["tinit"],
            tfinal=stored["tfinal"],
            total_steps=stored["total_steps"],
            delta_t=self.delta_t,
            budget=self._budget,
            start=stored["start"],
            initial_budget=stored["initial_budget"],
        )
        self._set_scoring(not self._allocator.frozen)

    def _new_schedule(self, step, first_epoch):
        """The schedule of AdaLoRA training starting at optimizer step
        `step`: `tinit`, `tfinal` and `total_steps` count from there."""
        length = self.total_steps
        if length is None:
            steps = self.params.get("steps") if self.params else None
            epochs = self.params.get("epochs") if self.params else None
            if not steps or not epochs:
                raise ValueError(
                    "RankBudgetCallback cannot tell how many steps this "
                    "training runs (the dataset has no length). Pass "
                    "`total_steps=` (optimizer steps), or `steps_per_epoch=` "
                    "to fit."
                )
            length = (epochs - first_epoch) * steps // self._steps_per_update()
        tinit = schedule.resolve_step(self.tinit, length, "tinit")
        tfinal = schedule.resolve_step(self.tfinal, length, "tfinal")
        schedule.validate_schedule(
            tinit=tinit, tfinal=tfinal, total_steps=length, delta_t=self.delta_t
        )
        return {
            "start": step,
            "tinit": step + tinit,
            "tfinal": step + tfinal,
            "total_steps": step + length,
            "initial_budget": self._budget.start_budget(),
            "target_budget": self._budget.target_budget,
            "budget_unit": BUDGET_UNITS.index(self._budget.budget_unit),
        }

    def _check_schedule(self, stored):
        """Raises unless this callback asks for the schedule `stored`."""
        start = stored["start"]
        length = stored["total_steps"] - start
        asked = {
            "tinit": start + schedule.resolve_step(self.tinit, length, "tinit"),
            "tfinal": start + schedule.resolve_step(self.tfinal, length, "tfinal"),
            "target_budget": self._budget.target_budget,
            "budget_unit": BUDGET_UNITS.index(self._budget.budget_unit),
        }
        if self.total_steps is not None:
            asked["total_steps"] = start + self.total_steps
        differ = [key for key, value in asked.items() if value != stored[key]]
        if not differ:
            return

        def describe(values):
            shown = []
            for key in differ:
                if key == "budget_unit":
                    shown.append(f"a budget in {BUDGET_UNITS[values[key]]}")
                elif key == "target_budget":
                    shown.append(f"{key}={values[key]}")
                else:
                    shown.append(f"{key}={values[key] - start}")
            return ", ".join(shown)

        raise ValueError(
            "This model's AdaLoRA schedule was fixed when its AdaLoRA "
            f"training started, at optimizer step {start}: warm-up to step "
            f"{stored['tinit'] - start}, pruning to step "
            f"{stored['tfinal'] - start}, {stored['total_steps'] - start} "
            f"steps in all, budget {stored['initial_budget']} -> "
            f"{stored['target_budget']} {BUDGET_UNITS[stored['budget_unit']]} "
            "(steps counted from "
            f"{start}). This RankBudgetCallback asks for {describe(asked)} "
            f"instead of {describe(stored)}. A later `fit` continues the "
            "stored schedule: pass the arguments it was made with (the same "
            "callback, or `total_steps=` for a schedule over several fits "
            "from the start). To start a new schedule on the ranks that are "
            "alive now, compile the model again (a fresh optimizer)."
        )

    def _set_scoring(self, on):
        # A value the compiled step reads: no retrace.
        self._optimizer.scoring = on

    # Training hooks -------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._started = False
        try:
            # Checks the schedule now, before any other callback acts; it is
            # stored at the first epoch, once a `BackupAndRestore` listed
            # after this callback has restored a stored one.
            self._read_state(first_epoch=0, store=False)
        except Exception:
            self._uninstall_optimizer()
            raise
        self._first_epoch_seen = False
        self._started = True
        adapted_model.join_fit(self.model, self)

    def on_epoch_begin(self, epoch, logs=None):
        self._batch_in_epoch = -1
        if not self._first_epoch_seen:
            # Another callback may have restored a backup, or fit may start
            # at `initial_epoch`: resolve the schedule from where it stands.
            self._first_epoch_seen = True
            try:
                self._read_state(first_epoch=epoch, store=True)
            except Exception:
                self._uninstall_optimizer()
                raise

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
                to_numpy(self._optimizer.applied_batches)
            )
            step = self._micro_step // self._steps_per_update()
            if self._allocator.update(step) and self._allocator.frozen:
                self._set_scoring(False)
        self._log(step, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._log(self._micro_step // self._steps_per_update(), logs)

    def on_train_end(self, logs=None):
        self.check_final_ranks()
        # Outside this callback's `fit` the layers carry their penalty in
        # their losses again (another optimizer may train them next).
        self._optimizer.release_penalty()

    def check_final_ranks(self):
        """Makes the adapters hold the ranks this callback last reported.

        Restoring a snapshot taken while pruning (as
        `EarlyStopping(restore_best_weights=True)` does at the end of
        training) would bring back the rank masks of that step: more
        components alive than the callback logged, above the budget. The
        masks it last wrote are re-applied (pruned components stay pruned;
        the other restored weights are kept), with a warning. Runs at the
        end of training and, for a model adapted with `apply_adalora`,
        once more when `fit` returns, after every callback.
        """
        if not getattr(self, "_started", False):
            return
        self.model  # noqa: B018 -- syncs the JAX state
        changed = self._allocator.masks_differ()
        if not changed:
            return
        restored = sum(layer.active_rank for layer in self._allocator.layers)
        self._allocator.write_masks(self._allocator.masks)
        steps = self.params.get("steps") if self.params else None
        tfinal = self._allocator.tfinal
        epochs_hint = (
            f" (`start_from_epoch={-(-tfinal // steps)}` with "
            f"{steps} steps per epoch)"
            if steps
            else ""
        )
        warnings.warn(
            f"The rank masks of {len(changed)} AdaLoRA layers (e.g. "
            f"'{changed[0]}') were restored to an earlier state by another "
            f"callback or a `set_weights` (such as "
            "`EarlyStopping(restore_best_weights=True)`), with "
            f"{restored} components alive where the schedule had kept "
            f"{self._allocator.alive}. The schedule's masks are back in "
            "place, so the model holds the ranks training logged; the other "
            "restored weights were trained with more components alive, so "
            "the outputs differ from the restored snapshot's. To restore "
            "only weights trained at the final ranks, start EarlyStopping "
            f"after the ranks freeze at step {tfinal}{epochs_hint}.",
            stacklevel=2,
        )

    def _log(self, step, logs):
        if logs is None:
            return
        logs["adalora_budget"] = self._allocator.budget_at(step)
        logs["adalora_rank"] = self._allocator.alive
        if self._allocator.budget_unit == "parameters":
            logs["adalora_params"] = self._allocator.alive_params
