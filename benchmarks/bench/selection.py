"""The choice on the validation split: which learning rate (and AdaLoRA
variant) a cell's test runs use.

Pure functions over the selection records, tested without training
(`tests/test_benchmarks.py`); the runner chooses with them and the report
shows the same choice.

The rule: every candidate trains on the selection seeds; a candidate
where any seed *collapsed* (ended no better than always answering the
validation split's majority class, within `COLLAPSE_MARGIN`) is ruled out,
since a rate that fails on one seed in a few fails on test seeds too
(so the runner stops training a candidate at its first collapsed seed:
the rest could not change the choice); among the rest the highest mean
validation accuracy wins, ties broken by the lower mean validation loss,
then by the earlier candidate (the lower rate of the grid, the earlier
variant).
"""

from . import stats

COLLAPSE_MARGIN = 0.01


def collapsed(record, margin=COLLAPSE_MARGIN):
    """Whether one run ended at the majority-class share of its validation
    split or below it (plus `margin`): it learned nothing usable.

    >>> collapsed({"val_accuracy": 0.687, "val_majority_accuracy": 0.687})
    True
    >>> collapsed({"val_accuracy": 0.93, "val_majority_accuracy": 0.687})
    False
    """
    return record["val_accuracy"] <= record["val_majority_accuracy"] + margin


def validation_record(run):
    """A selection record made from a test run of the same configuration
    and seed (the same training: a run's seed, data and settings decide it,
    not whether test is scored after): its validation scores, without its
    test scores and plot, marked `from_test_run`.

    >>> validation_record({"seed": 1, "val_accuracy": 0.9, "test_accuracy": 0.8,
    ...                    "test_loss": 0.4, "plot": "r.png"})
    {'seed': 1, 'val_accuracy': 0.9, 'from_test_run': True}
    """
    out = {k: v for k, v in run.items() if not k.startswith("test_") and k != "plot"}
    out["from_test_run"] = True
    return out


def pick_best(candidates):
    """The candidate with the highest validation accuracy, ties broken by
    the lower validation loss, then by the earlier position; candidates
    marked `collapsed` are passed over unless all are.

    Args:
        candidates: a list of dicts with `val_accuracy` and `val_loss`
            (and optionally `collapsed`).

    >>> pick_best([{"val_accuracy": 0.9, "val_loss": 0.3},
    ...            {"val_accuracy": 0.9, "val_loss": 0.2}])["val_loss"]
    0.2
    >>> pick_best([{"val_accuracy": 0.9, "val_loss": 0.3, "collapsed": True},
    ...            {"val_accuracy": 0.8, "val_loss": 0.4}])["val_accuracy"]
    0.8
    """
    if not candidates:
        raise ValueError("pick_best needs at least one candidate")
    pool = [i for i, c in enumerate(candidates) if not c.get("collapsed")]
    pool = pool or list(range(len(candidates)))
    order = sorted(
        pool,
        key=lambda i: (-candidates[i]["val_accuracy"], candidates[i]["val_loss"], i),
    )
    return candidates[order[0]]


def candidates(selection, cell, variants, grid, seeds):
    """One summary per `(variant, learning rate)` of a cell that trained on
    every seed of `seeds`, or that collapsed on a seed before the rest
    trained (ruled out all the same): means over its seeds, the worst
    seed's accuracy, and the seeds that collapsed.

    Args:
        selection: the selection records (validation only).
        cell: `(task, method, budget)`.
        variants: the variant names to consider, in order.
        grid: the learning rates, in order.
        seeds: the selection seeds every candidate must have.
    """
    task, method, budget = cell
    seeds = list(seeds)
    out = []
    for variant in variants:
        for rate in grid:
            by_seed = {
                r["seed"]: r for r in selection
                if (r["task"], r["method"], r.get("budget"), r.get("variant") or "sqrt",
                    r["learning_rate"]) == (task, method, budget, variant, rate)
            }
            rs = [by_seed[seed] for seed in seeds if seed in by_seed]
            if len(rs) < len(seeds) and not any(collapsed(r) for r in rs):
                continue
            out.append({
                "variant": variant,
                "learning_rate": rate,
                "seeds": [r["seed"] for r in rs],
                "val_accuracy": stats.mean_std([r["val_accuracy"] for r in rs])[0],
                "val_loss": stats.mean_std([r["val_loss"] for r in rs])[0],
                "worst_val_accuracy": min(r["val_accuracy"] for r in rs),
                "collapsed_seeds": [r["seed"] for r in rs if collapsed(r)],
                "collapsed": any(collapsed(r) for r in rs),
            })
    return out


def ruled_out(selection, cell, variant, rate, seeds):
    """Whether a candidate already collapsed on one of `seeds`, so that its
    other seeds need not train.

    >>> runs = [{"task": "spam", "method": "lora", "budget": "low", "variant": "sqrt",
    ...          "learning_rate": 8e-3, "seed": 0, "val_accuracy": 0.687, "val_loss": 1.1,
    ...          "val_majority_accuracy": 0.687}]
    >>> ruled_out(runs, ("spam", "lora", "low"), "sqrt", 8e-3, [0, 1, 2])
    True
    >>> ruled_out(runs, ("spam", "lora", "low"), "sqrt", 4e-3, [0, 1, 2])
    False
    """
    found = candidates(selection, cell, [variant], [rate], seeds)
    return bool(found) and found[0]["collapsed"]


def choose(selection, cell, variants, grid, seeds):
    """The chosen candidate of a cell (see the module's rule), with
    `all_collapsed` True where every candidate collapsed on some seed (the
    best of them is then returned, and the report says so).

    >>> runs = [
    ...     {"task": "spam", "method": "uniform", "budget": "low", "variant": "rank-free",
    ...      "learning_rate": rate, "seed": seed, "val_accuracy": acc, "val_loss": 0.2,
    ...      "val_majority_accuracy": 0.687}
    ...     for rate, seed, acc in [(2e-3, 0, 0.92), (2e-3, 1, 0.93),
    ...                             (8e-3, 0, 0.96), (8e-3, 1, 0.687)]]
    >>> best = choose(runs, ("spam", "uniform", "low"), ["rank-free"], [2e-3, 8e-3], [0, 1])
    >>> best["learning_rate"], best["all_collapsed"]
    (0.002, False)
    """
    found = candidates(selection, cell, variants, grid, seeds)
    if not any(len(c["seeds"]) == len(list(seeds)) for c in found):
        raise ValueError(
            f"no candidate of {cell} trained on every selection seed {list(seeds)}; "
            "run the selection stage first"
        )
    best = dict(pick_best(found))
    best["all_collapsed"] = all(c["collapsed"] for c in found)
    return best
