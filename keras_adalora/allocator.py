"""`RankAllocator`: AdaLoRA's schedule applied to a model's rank masks.

The engine behind `RankBudgetCallback`, public for custom training loops:
the optimizer (an `AdaLoRAOptimizer`) updates the scores at every step, and
`allocator.update(step)` writes the masks when the schedule says so.
"""

import warnings

import numpy as np

from keras_adalora._arrays import to_numpy
from keras_adalora import allocation as allocation_lib
from keras_adalora._validation import check_int
from keras_adalora import schedule
from keras_adalora.targets import require_adapted_layers
from keras_adalora.targets import layer_path

ALLOCATION_KINDS = ("global", "layer")


DEFAULT_TARGET_RANK = 8


def validate_budget_args(
    *,
    target_rank,
    init_rank,
    allocation,
    min_rank,
    max_rank,
    total_rank,
    target_params=None,
):
    """Checks the budget arguments that need no model; returns them, with
    `target_rank` resolved (8 when no budget is given).

    Raises:
        ValueError: naming the argument: a non-integer or out-of-range rank,
            `target_params` given with `target_rank` or `total_rank`,
            `target_rank > init_rank`, `min_rank > max_rank`, or an unknown
            `allocation`.
    """
    target_params = check_int(target_params, "target_params", 1, allow_none=True)
    if target_params is not None:
        given = [
            name
            for name, value in (("target_rank", target_rank), ("total_rank", total_rank))
            if value is not None
        ]
        if given:
            raise ValueError(
                f"Pass one budget: `target_params`={target_params} (in "
                f"parameters) and `{given[0]}`="
                f"{target_rank if given[0] == 'target_rank' else total_rank} "
                "(in components) were both given. Drop one of them."
            )
    elif target_rank is None:
        target_rank = DEFAULT_TARGET_RANK
    if target_rank is not None:
        target_rank = check_int(target_rank, "target_rank", 1)
    init_rank = check_int(init_rank, "init_rank", 1, allow_none=True)
    if init_rank is not None and target_rank is not None and target_rank > init_rank:
        raise ValueError(
            f"`target_rank`={target_rank} is above `init_rank`={init_rank}: "
            "pruning can only lower ranks. Lower target_rank or raise "
            "init_rank."
        )
    min_rank = check_int(min_rank, "min_rank", 0)
    max_rank = check_int(max_rank, "max_rank", 1, allow_none=True)
    if max_rank is not None and min_rank > max_rank:
        raise ValueError(
            f"`min_rank`={min_rank} is above `max_rank`={max_rank}."
        )
    total_rank = check_int(total_rank, "total_rank", 1, allow_none=True)
    if allocation not in ALLOCATION_KINDS:
        raise ValueError(
            f"`allocation` must be one of {ALLOCATION_KINDS}. "
            f"Received: allocation={allocation!r}"
        )
    return (target_rank, init_rank, allocation, min_rank, max_rank, total_rank,
            target_params)


def component_cost(layer):
    """The trainable parameters one rank-1 component of `layer`'s adapter
    holds: a column of `A`, a row of `B` and its `lam`, `d_in + d_out + 1`
    for the kernel read as a `(d_in, d_out)` matrix.

    Example:

    >>> model = keras.Sequential(
    ...     [keras.Input((8,)), keras.layers.Dense(4, name="hidden")])
    >>> component_cost(apply_adalora(model, init_rank=3).get_layer("hidden"))
    13
    """
    d_in, d_out = layer._adapter_matrix_shape()
    return int(d_in) + int(d_out) + 1


class RankBudget:
    """The final rank budget of a model's adapters, checked against them.

    What a schedule needs to know of the model before any optimizer or step
    count exists (what `RankBudgetCallback` checks when it is set on a
    model): the adapted layers, the final budget `BT` (`target_rank` per
    layer or `total_rank` in components, or `target_params` in trainable
    adapter parameters), how it is allocated and the per-layer bounds.

    Args:
        model: the adapted model.
        target_rank, init_rank, allocation, min_rank, max_rank, total_rank,
        target_params: as in `RankBudgetCallback`.
        caller: the name errors give for the public function called.

    Raises:
        ValueError: naming the argument, for a budget the adapters cannot
            hold.

    Example:

    >>> model = keras.Sequential(
    ...     [keras.Input((8,)), keras.layers.Dense(4, name="hidden")])
    >>> model = apply_adalora(model, init_rank=3)
    >>> RankBudget(model, target_rank=1).target_budget
    1
    >>> budget = RankBudget(model, target_params=26)
    >>> budget.target_budget, budget.budget_unit, budget.costs
    (26, 'parameters', [13])
    """

    def __init__(
        self,
        model,
        *,
        target_rank=None,
        init_rank=None,
        allocation="global",
        min_rank=0,
        max_rank=None,
        total_rank=None,
        target_params=None,
        caller="RankAllocator",
    ):
        (
            target_rank,
            init_rank,
            allocation,
            min_rank,
            max_rank,
            total_rank,
            target_params,
        ) = validate_budget_args(
            target_rank=target_rank,
            init_rank=init_rank,
            allocation=allocation,
            min_rank=min_rank,
            max_rank=max_rank,
            total_rank=total_rank,
            target_params=target_params,
        )
        layers = require_adapted_layers(model, caller)
        capacities = [layer.adapter_rank for layer in layers]
        if init_rank is None:
            layer_init = max(layer.init_rank for layer in layers)
            if target_rank is not None and target_rank > layer_init:
                raise ValueError(
                    f"`target_rank`={target_rank} is above the adapters' "
                    f"init_rank ({layer_init}): pruning can only lower "
                    "ranks. Lower target_rank, or adapt with a larger "
                    "init_rank."
                )
        else:
            if init_rank > max(capacities):
                raise ValueError(
                    f"`init_rank`={init_rank} is above what the adapters "
                    f"hold ({max(capacities)} components at most). Leave "
                    "init_rank=None to use the adapters' own."
                )
            alive = [layer.active_rank for layer in layers]
            if init_rank < max(alive):
                raise ValueError(
                    f"`init_rank`={init_rank} is below the rank the adapters "
                    f"hold now (up to {max(alive)} alive components per "
                    f"layer, {sum(alive)} in all): the budget would start "
                    "below what is alive and the first mask update would "
                    "prune down to it at once. Leave init_rank=None (the "
                    "budget starts from what the adapters hold), or adapt "
                    f"with `apply_adalora(model, init_rank={init_rank})`."
                )
        if target_params is not None:
            self.budget_unit = "parameters"
            costs = [component_cost(layer) for layer in layers]
            target_budget = target_params
            held = sum(c * k for c, k in zip(capacities, costs))
            described = f"target_params={target_params}"
            if target_params < min(costs):
                raise ValueError(
                    f"`target_params`={target_params} is below what one "
                    f"component costs in any adapted layer (at least "
                    f"{min(costs)} parameters, `d_in + d_out + 1`), so every "
                    "component would be pruned. Raise target_params (the "
                    f"adapters hold {held} parameters)."
                )
            if target_params > held:
                raise ValueError(
                    f"`target_params`={target_params} is above the {held} "
                    "parameters the adapters hold: lower target_params, or "
                    "adapt with a larger init_rank."
                )
        else:
            self.budget_unit = "components"
            costs = [1] * len(layers)
            target_budget = (
                total_rank if total_rank is not None else target_rank * len(layers)
            )
            held = sum(capacities)
            described = (
                f"total_rank={total_rank}"
                if total_rank is not None
                else f"target_rank={target_rank} x {len(layers)} layers"
            )
            if target_budget > held:
                raise ValueError(
                    f"The final budget ({target_budget} components) is above "
                    f"the initial one ({held}): lower target_rank or "
                    "total_rank."
                )
        self.costs = costs
        allocation_lib.check_budget(
            target_budget,
            capacities,
            min_rank=min_rank,
            max_rank=max_rank,
            costs=self.allocation_costs,
        )
        uncompacted = all(layer.adapter_rank == layer.init_rank for layer in layers)
        if uncompacted and target_budget == held:
            warnings.warn(
                f"{caller}: the final budget ({target_budget} {self.budget_unit}, "
                f"{described}) equals what the adapters hold ({held} "
                f"{self.budget_unit}, init_rank={max(capacities)}), so nothing will "
                "be pruned. Pass a smaller budget, or adapt with a larger "
                "init_rank (`apply_adalora(model, init_rank=...)`).",
                stacklevel=3,
            )
        self.layers = layers
        self.paths = [layer_path(layer) for layer in layers]
        self.allocation = allocation
        self.min_rank, self.max_rank = min_rank, max_rank
        self.target_budget = target_budget

    @property
    def allocation_costs(self):
        """The `costs` argument of the `allocation` functions: the per-layer
        costs for a budget in parameters, `None` for one in components."""
        return self.costs if self.budget_unit == "parameters" else None

    def cost_of(self, ranks):
        """What `ranks` (one rank per layer) cost in the budget's unit."""
        return int(sum(int(r) * c for r, c in zip(ranks, self.costs)))

    def start_budget(self):
        """The budget a new schedule starts from, `B0`: what every component
        alive now holds (all of fresh adapters, fewer when a new schedule
        starts on pruned ones), checked against the final budget.

        Raises:
            ValueError: when the alive components hold less than the final
                budget asks for.
        """
        alive = [int(_read_mask(layer).sum()) for layer in self.layers]
        held = self.cost_of(alive)
        if self.target_budget > held:
            raise ValueError(
                f"The final budget ({self.target_budget} {self.budget_unit}) is above "
                f"the {held} {self.budget_unit} alive in the adapters (pruned by an "
                "earlier schedule): lower "
                + ("target_params." if self.budget_unit == "parameters"
                   else "target_rank or total_rank.")
            )
        allocation_lib.check_budget(
            self.target_budget,
            alive,
            min_rank=self.min_rank,
            max_rank=self.max_rank,
            costs=self.allocation_costs,
        )
        return held


class RankAllocator:
    """Writes the rank masks of a model's AdaLoRA layers on a budget schedule.

    Budgets follow SPEC.md sections 4 and 5: `B0` components alive through
    `tinit` (all the adapters hold when the schedule starts), the cubic
    decay to `BT = target_rank * n` (or `total_rank`) by `tfinal`,
    recomputed every `delta_t` steps, then frozen. With `target_params`
    the budgets count the parameters the alive components hold (each
    costs its layer's `d_in + d_out + 1`, `component_cost`) and the
    components with the best score per parameter stay alive. Which components stay
    alive comes from the scores that `optimizer` (an `AdaLoRAOptimizer`
    built for the model's trainable variables) keeps. Pruning is final: a
    mask update chooses among the components still alive, so a pruned
    component never comes back.

    It has `optimizer` watch the model (`AdaLoRAOptimizer.watch`): from then
    on the optimizer applies the orthogonality penalty, and `model.losses`
    leaves it out. In a custom training loop, call `update(step)` after each
    optimizer step (`step` counting optimizer updates from 1). It reads nothing from the
    device except at mask steps. On JAX, write your loop's state back into
    the model and optimizer variables before an `update` that is due
    (`allocator.due(step)`), and read the masks back after it.

    Args:
        model: the adapted model.
        optimizer: its `AdaLoRAOptimizer`, built.
        target_rank, init_rank, tinit, tfinal, total_steps, delta_t,
        allocation, min_rank, max_rank, total_rank, target_params: as in
            `RankBudgetCallback`; `tinit`/`tfinal` given as fractions need
            `total_steps`.
        budget: a `RankBudget` already checked against `model`, instead of
            the budget arguments.
        start: the optimizer step the schedule counts from (steps stay
            absolute); `initial_budget`: its `B0`, instead of every
            component alive now (a stored schedule's).

    Example:

    >>> model = keras.Sequential(
    ...     [keras.Input((8,)), keras.layers.Dense(4, name="hidden")])
    >>> model = apply_adalora(model, init_rank=3)
    >>> optimizer = AdaLoRAOptimizer(keras.optimizers.Adam(1e-3))
    >>> optimizer.build(model.trainable_variables)
    >>> allocator = RankAllocator(model, optimizer, target_rank=1,
    ...                           tinit=100, tfinal=800, total_steps=1000)
    >>> allocator.budget_at(100), allocator.budget_at(450), allocator.budget_at(800)
    (3, 1, 1)
    >>> for step in range(1, 1001):  # doctest: +SKIP
    ...     grads = ...  # your loss and gradients
    ...     optimizer.apply(grads, model.trainable_variables)
    ...     allocator.update(step)
    """

    def __init__(
        self,
        model,
        optimizer,
        target_rank=None,
        init_rank=None,
        tinit=0.1,
        tfinal=0.7,
        total_steps=None,
        delta_t=10,
        allocation="global",
        min_rank=0,
        max_rank=None,
        total_rank=None,
        target_params=None,
        *,
        budget=None,
        start=0,
        initial_budget=None,
    ):
        if budget is None:
            budget = RankBudget(
                model,
                target_rank=target_rank,
                init_rank=init_rank,
                allocation=allocation,
                min_rank=min_rank,
                max_rank=max_rank,
                total_rank=total_rank,
                target_params=target_params,
            )
        self.budget = budget
        self.budget_unit = budget.budget_unit
        self.layers, self.paths = budget.layers, budget.paths
        self.allocation = budget.allocation
        self.min_rank, self.max_rank = budget.min_rank, budget.max_rank
        self.target_budget = budget.target_budget
        self.optimizer = optimizer
        optimizer.watch(model)
        self.sync_state()
        self.configure_schedule(
            tinit=schedule.resolve_step(tinit, total_steps, "tinit"),
            tfinal=schedule.resolve_step(tfinal, total_steps, "tfinal"),
            total_steps=total_steps,
            delta_t=delta_t,
            initial_budget=(
                budget.start_budget()
                if initial_budget is None
                else initial_budget
            ),
            start=start,
        )

    def start_budget(self):
        """`RankBudget.start_budget` of this allocator's budget."""
        return self.budget.start_budget()

    def configure_schedule(
        self,
        *,
        tinit,
        tfinal,
        total_steps,
        delta_t,
        initial_budget=None,
        target_budget=None,
        start=0,
    ):
        """Sets the (absolute) schedule, checked by `validate_schedule`;
        `initial_budget`/`target_budget` replace the budgets computed from
        the model (a stored schedule's), `start` is the step AdaLoRA
        training started at."""
        schedule.validate_schedule(
            tinit=tinit, tfinal=tfinal, total_steps=total_steps, delta_t=delta_t
        )
        if self.optimizer.kind.needs_warmup and tinit <= start:
            raise ValueError(
                f"importance={self.optimizer.importance!r} scores layers by "
                "what their adapters add, which is 0 until training moves "
                "lam: pass tinit > 0 (a warm-up)."
            )
        self.tinit, self.tfinal, self.delta_t = tinit, tfinal, delta_t
        self.total_steps = total_steps
        if initial_budget is not None:
            self.initial_budget = initial_budget
        if target_budget is not None:
            self.target_budget = target_budget

    def sync_state(self):
        """Re-reads the last mask step and the masks from the variables
        (after a restore, or a JAX loop's write-back)."""
        last = int(to_numpy(self.optimizer.last_mask_step))
        self.last_mask_step = None if last < 0 else last
        self._set_masks([_read_mask(layer) for layer in self.layers])

    @property
    def alive(self):
        """Alive components in all layers, as the allocator last wrote or
        read them."""
        return int(sum(mask.sum() for mask in self.masks))

    @property
    def alive_params(self):
        """Trainable parameters of the alive components in all layers (each
        component costs its layer's `component_cost`)."""
        return int(
            sum(
                int(mask.sum()) * component_cost(layer)
                for layer, mask in zip(self.layers, self.masks)
            )
        )

    @property
    def spent(self):
        """What the alive components hold in the budget's unit (`alive`,
        or `alive_params` for a budget in parameters)."""
        return self.budget.cost_of(int(mask.sum()) for mask in self.masks)

    @property
    def frozen(self):
        """Whether the final allocation was made (ranks fixed for good)."""
        return (
            self.last_mask_step is not None
            and self.last_mask_step >= self.tfinal
        )

    def budget_at(self, step):
        """`b(step)` in the budget's unit (SPEC.md section 5). A budget in
        components is capped by what the alive components and `max_rank`
        let the layers hold; one in parameters is the schedule's (the alive
        components may hold less: whole components rarely add up to it)."""
        budget = schedule.budget_at(
            step,
            initial_budget=self.initial_budget,
            target_budget=self.target_budget,
            tinit=self.tinit,
            tfinal=self.tfinal,
        )
        if self.budget_unit == "parameters":
            return budget
        return min(budget, self._most_alive)

    def due(self, step):
        """Whether `update(step)` would write the masks."""
        return schedule.mask_due(
            step,
            self.last_mask_step,
            tinit=self.tinit,
            tfinal=self.tfinal,
            delta_t=self.delta_t,
        )

    def update(self, step):
        """Writes the masks if the schedule says so at `step`.

        The `b(step)` best components among the alive ones stay alive (all
        of them when fewer are alive, or when `max_rank` lets the layers
        keep fewer); with a budget in parameters, the best by score per
        parameter that fit in `b(step)` parameters.

        Returns:
            Whether the masks were written.
        """
        if not self.due(step):
            return False
        alive = [mask > 0.5 for mask in self.masks]
        scores, layer_scores = self.optimizer.scores_on_host(self.paths, alive)
        candidates = allocation_lib.restrict_to_alive(scores, alive)
        budget = min(self.budget_at(step), self._most_alive)
        if self.allocation == "global":
            kept = allocation_lib.allocate_global(
                candidates,
                budget,
                min_rank=self.min_rank,
                max_rank=self.max_rank,
                costs=self.budget.allocation_costs,
            )
        else:
            kept = allocation_lib.allocate_by_layer(
                layer_scores,
                candidates,
                budget,
                min_rank=self.min_rank,
                max_rank=self.max_rank,
                costs=self.budget.allocation_costs,
            )
        masks = allocation_lib.expand_to_layers(kept, alive)
        self.optimizer.record_rank_drops(
            {
                path: int(before.sum()) - int(after.sum())
                for path, before, after in zip(self.paths, alive, masks)
            },
            step,
        )
        self.write_masks(masks)
        self.optimizer.last_mask_step.assign(step)
        self.last_mask_step = step
        return True

    def write_masks(self, masks):
        """Sets the layers' rank masks (and the allocator's record of them)."""
        self._set_masks(masks)
        for layer, mask in zip(self.layers, self.masks):
            layer.rank_mask.assign(mask)

    def _set_masks(self, masks):
        self.masks = [np.asarray(mask, dtype="float32") for mask in masks]
        # While pruning, b(t) can exceed what max_rank lets the alive
        # components hold; then every layer keeps its most (SPEC.md
        # section 5).
        self._most_alive = self.budget.cost_of(
            allocation_lib.rank_bounds(
                [int(mask.sum()) for mask in self.masks],
                min_rank=self.min_rank,
                max_rank=self.max_rank,
            )[1]
        )
        self.optimizer.record_masks(dict(zip(self.paths, self.masks)))

    def masks_differ(self):
        """The layers whose rank masks differ from what the allocator last
        wrote or read (weights restored behind its back): their paths."""
        return [
            path
            for path, layer, mask in zip(self.paths, self.layers, self.masks)
            if not np.array_equal(_read_mask(layer), mask)
        ]


def _read_mask(layer):
    return to_numpy(layer.rank_mask).astype("float32")
