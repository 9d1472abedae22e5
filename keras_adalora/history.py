"""`rank_history`: which layers lost rank, and when, during a schedule."""

import csv
import json
import os

from keras_adalora._arrays import to_numpy
from keras_adalora import schedule as schedule_lib
from keras_adalora.optimizer import AdaLoRAOptimizer
from keras_adalora.optimizer import BUDGET_UNITS
from keras_adalora.targets import layer_path
from keras_adalora.targets import model_path
from keras_adalora.targets import require_adapted_layers


def _adalora_optimizer(model, caller):
    optimizer = getattr(model, "optimizer", None)
    while optimizer is not None and not isinstance(optimizer, AdaLoRAOptimizer):
        optimizer = getattr(optimizer, "inner_optimizer", None)
    if optimizer is None or not optimizer.built:
        raise ValueError(
            f"`{caller}` found no AdaLoRA schedule on model '{model.name}': "
            "the rank history is kept with the optimizer that "
            "`RankBudgetCallback` installs. Train with "
            "`model.fit(..., callbacks=[RankBudgetCallback(...)])` first "
            "(a model reloaded from a `.keras` file keeps it)."
        )
    return optimizer


def rank_history(model):
    """The rank of every adapted layer, and the budget, over training.

    `RankBudgetCallback` (and `RankAllocator`) record, at each mask update,
    the components every layer loses, with the optimizer's state; the
    record survives `model.save`, checkpoints, resumed runs and
    `compact_adalora`. This function reads it back: one entry per step at
    which some layer lost rank, after one for the step the schedule started
    at (every layer at the rank it then held) and before one for the
    optimizer's current step.

    Args:
        model: a model trained with `RankBudgetCallback` (or a custom loop
            with `RankAllocator`), whose optimizer is still the one that
            trained it.

    Returns:
        A dict with `steps` (optimizer steps, increasing), `budget` (the
        schedule's budget `b(t)` at each, in `budget_unit`: `"components"`
        or `"parameters"`) and `ranks` (`{layer path: [rank at each
        step]}`, the paths of `get_rank_pattern`).

    Raises:
        ValueError: if no AdaLoRA schedule has run with this model's
            optimizer (a model compiled again starts a new record).

    Example:

    >>> history = keras_adalora.rank_history(model)  # doctest: +SKIP
    >>> history["steps"], history["ranks"]["hidden"]  # doctest: +SKIP
    ([0, 6, 10, 32], [4, 3, 2, 2])
    """
    layers = require_adapted_layers(model, "rank_history")
    optimizer = _adalora_optimizer(model, "rank_history")
    stored = optimizer.read_schedule()
    if stored is None:
        raise ValueError(
            f"`rank_history`: model '{model.name}' has an AdaLoRA optimizer "
            "but no schedule has started on it yet. Train with "
            "`RankBudgetCallback` first."
        )
    drops = optimizer.rank_drops_on_host()
    paths = [layer_path(layer) for layer in layers]
    now = int(to_numpy(optimizer.iterations))
    steps = sorted(
        {stored["start"], now} | {s for path in paths for s in drops.get(path, [])}
    )
    ranks = {}
    for layer, path in zip(layers, paths):
        lost = drops.get(path, [])
        start = layer.active_rank + len(lost)
        ranks[model_path(model, layer)] = [
            start - sum(1 for s in lost if s <= step) for step in steps
        ]
    budget = [
        schedule_lib.budget_at(
            max(step, 0),
            initial_budget=stored["initial_budget"],
            target_budget=stored["target_budget"],
            tinit=stored["tinit"],
            tfinal=stored["tfinal"],
        )
        for step in steps
    ]
    return {
        "steps": steps,
        "budget": budget,
        "budget_unit": BUDGET_UNITS[stored["budget_unit"]],
        "ranks": ranks,
    }


def export_rank_history(model, path):
    """Writes `rank_history(model)` to a `.csv` or `.json` file.

    The CSV has one row per step: `step`, `budget`, then one column per
    adapted layer (its path) holding its rank; the JSON file holds the dict
    `rank_history` returns.

    Args:
        model: as in `rank_history`.
        path: the file to write, ending in `.csv` or `.json` (its folder
            is created if missing).

    Returns:
        The dict `rank_history(model)`.

    Raises:
        ValueError: for another file extension (before anything is
            written), or as `rank_history`.

    Example:

    >>> keras_adalora.export_rank_history(model, "ranks.csv")  # doctest: +SKIP
    """
    extension = os.path.splitext(str(path))[1].lower()
    if extension not in (".csv", ".json"):
        raise ValueError(
            "`path` must end in .csv or .json (the format to write). "
            f"Received: path={str(path)!r}"
        )
    history = rank_history(model)
    folder = os.path.dirname(os.path.abspath(str(path)))
    os.makedirs(folder, exist_ok=True)
    if extension == ".json":
        with open(path, "w") as f:
            json.dump(history, f, indent=1)
        return history
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        paths = list(history["ranks"])
        writer.writerow(["step", f"budget ({history['budget_unit']})"] + paths)
        for i, step in enumerate(history["steps"]):
            writer.writerow(
                [step, history["budget"][i]] + [history["ranks"][p][i] for p in paths]
            )
    return history
