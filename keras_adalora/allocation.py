"""Rank allocation: which components stay alive under a budget (SPEC.md
section 4).

Host-side NumPy on small vectors (a few thousand scores at most), run only at
mask steps. Budgets count components, or, given `costs` (what one component
of each layer costs, such as its trainable parameters), those units. Every
function is exact (a budget in components is met to the component; one in
other units is never exceeded and leaves less unused than any component
that could still be kept costs) and deterministic: among equal scores the
earlier layer, then the earlier component wins, and NaN or -inf scores
always rank last.
"""

import math
from fractions import Fraction

import numpy as np

from keras_adalora._validation import check_int


def rank_bounds(capacities, *, min_rank=0, max_rank=None):
    """The smallest and largest rank each layer may end with.

    A layer cannot keep more components than it holds, so both bounds are
    capped by its capacity: `min(min_rank, cap)` and `min(max_rank, cap)`.

    Args:
        capacities: the number of components of each layer.
        min_rank: the least rank a layer keeps.
        max_rank: the most rank a layer keeps; `None` means its capacity.

    Returns:
        A tuple `(lowest, highest)` of int64 arrays, one entry per layer.

    Example:

    >>> lowest, highest = rank_bounds([4, 1], min_rank=2, max_rank=3)
    >>> lowest.tolist(), highest.tolist()
    ([2, 1], [3, 1])
    """
    capacities = np.asarray(capacities, dtype=np.int64).reshape(-1)
    lowest = np.minimum(min_rank, capacities)
    highest = capacities if max_rank is None else np.minimum(max_rank, capacities)
    return lowest, highest


def _as_costs(costs, count):
    """One positive integer cost per layer (all 1 when `costs` is None)."""
    if costs is None:
        return np.ones(count, dtype=np.int64)
    values = list(np.asarray(costs).reshape(-1).tolist())
    if len(values) != count:
        raise ValueError(
            f"`costs` must hold one cost per layer: got {len(values)} costs "
            f"for {count} layers."
        )
    for value in values:
        check_int(value, "costs", 1)
    return np.asarray(values, dtype=np.int64)


def check_budget(budget, capacities, *, min_rank=0, max_rank=None, costs=None):
    """Checks that `budget` can be spent within the rank bounds.

    Args:
        budget: what the alive components of all layers may hold: a number
            of components, or of `costs` units.
        capacities: the number of components of each layer.
        min_rank: the least rank a layer keeps (capped by its capacity).
        max_rank: the most rank a layer keeps; `None` means its capacity.
        costs: what one component of each layer costs (integers >= 1);
            `None` counts components.

    Raises:
        ValueError: if an argument is negative or not an integer, if
            `min_rank > max_rank`, or if the bounds make `budget` impossible.

    Example:

    >>> check_budget(8, [4, 4, 4], min_rank=2)
    >>> check_budget(8, [4, 4, 4], min_rank=3)
    Traceback (most recent call last):
    ...
    ValueError: min_rank=3 needs at least 9 components alive but the budget is 8: lower min_rank or raise target_rank/total_rank.
    >>> check_budget(20, [4, 4], min_rank=1, costs=[10, 11])
    Traceback (most recent call last):
    ...
    ValueError: min_rank=1 needs at least 21 parameters alive but the budget is 20: lower min_rank or raise target_params.
    """
    budget = check_int(budget, "budget", 0)
    min_rank = check_int(min_rank, "min_rank", 0)
    max_rank = check_int(max_rank, "max_rank", 0, allow_none=True)
    for capacity in capacities:
        check_int(capacity, "capacities", 0)
    weights = _as_costs(costs, len(capacities))
    unit, raise_it = (
        ("components", "target_rank/total_rank")
        if costs is None
        else ("parameters", "target_params")
    )
    if max_rank is not None and min_rank > max_rank:
        raise ValueError(
            f"min_rank={min_rank} is larger than max_rank={max_rank}: lower "
            f"min_rank or raise max_rank."
        )
    lowest, highest = rank_bounds(capacities, min_rank=min_rank, max_rank=max_rank)
    least, most = int((lowest * weights).sum()), int((highest * weights).sum())
    if budget < least:
        raise ValueError(
            f"min_rank={min_rank} needs at least {least} {unit} "
            f"alive but the budget is {budget}: lower min_rank or raise "
            f"{raise_it}."
        )
    if budget > most:
        if max_rank is not None and max_rank < max(capacities, default=0):
            raise ValueError(
                f"max_rank={max_rank} allows at most {most} "
                f"{unit} alive but the budget is {budget}: raise "
                f"max_rank or lower {raise_it}."
            )
        raise ValueError(
            f"budget={budget} is more than the {most} {unit} "
            f"the adapted layers hold: lower {raise_it} or adapt "
            f"with a larger init_rank."
        )


def _ranking_key(scores):
    # NaN joins -inf at the bottom; sorting on the negated key puts the best
    # first, and lexsort's stability leaves ties in index order.
    return -np.where(np.isnan(scores), -np.inf, scores)


def _as_score_vectors(component_scores):
    vectors = []
    for layer, scores in enumerate(component_scores):
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1:
            raise ValueError(
                f"`component_scores` must hold one 1-D array per layer, got "
                f"shape {scores.shape} for layer {layer}."
            )
        vectors.append(scores)
    return vectors


def restrict_to_alive(component_scores, alive):
    """The scores of the alive components only, layer by layer.

    Pruning is final (README, "A pruned component stays pruned"): an
    allocation chooses among the components still alive, and the masks it
    returns for them are put back in place with `expand_to_layers`.

    Args:
        component_scores: one 1-D array of scores per layer.
        alive: one boolean array per layer, the same lengths: which
            components are alive.

    Returns:
        One 1-D float64 array per layer, the scores of its alive components
        in component order.

    Example:

    >>> [s.tolist() for s in restrict_to_alive([[3.0, 1.0, 2.0]], [[1, 0, 1]])]
    [[3.0, 2.0]]
    """
    vectors = _as_score_vectors(component_scores)
    if len(alive) != len(vectors):
        raise ValueError(
            f"`alive` must hold one mask per layer: got {len(alive)} masks "
            f"for {len(vectors)} layers."
        )
    restricted = []
    for layer, (scores, mask) in enumerate(zip(vectors, alive)):
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if mask.size != scores.size:
            raise ValueError(
                f"Layer {layer} has {scores.size} scores but an alive mask of "
                f"{mask.size} entries."
            )
        restricted.append(scores[mask])
    return restricted


def expand_to_layers(masks, alive):
    """Puts masks over the alive components back at full layer length.

    The inverse of `restrict_to_alive`: pruned components stay `False`.

    Args:
        masks: one boolean array per layer over its alive components.
        alive: one boolean array per layer over all its components.

    Returns:
        One boolean array per layer, of the length of its `alive` mask.

    Example:

    >>> [m.tolist() for m in expand_to_layers([[False, True]], [[1, 0, 1]])]
    [[False, False, True]]
    """
    expanded = []
    for mask, where in zip(masks, alive):
        where = np.asarray(where, dtype=bool).reshape(-1)
        full = np.zeros(where.size, dtype=bool)
        full[np.flatnonzero(where)] = np.asarray(mask, dtype=bool)
        expanded.append(full)
    return expanded


def _keep_best(scores, count):
    order = np.lexsort((np.arange(scores.size), _ranking_key(scores)))
    mask = np.zeros(scores.size, dtype=bool)
    mask[order[:count]] = True
    return mask


def allocate_global(
    component_scores, budget, *, min_rank=0, max_rank=None, costs=None
):
    """Keeps the best components across all layers within `budget`.

    The paper's global allocation (SPEC.md section 4): each layer first keeps
    its `min(min_rank, capacity)` best components, then the rest of the
    budget goes to the best remaining components of the whole model,
    skipping layers that reached `max_rank`.

    With `costs`, the budget is in those units and components are ranked
    by score per unit (`score / cost`); each in turn is kept if it still
    fits (greedy), so the kept components never cost more than `budget`,
    and what is left unused is less than any component that could still be
    kept would cost.

    Args:
        component_scores: one 1-D array of scores per layer; its length is
            the layer's capacity (it may be 0).
        budget: the number of components to keep in all, or the units they
            may cost with `costs`.
        min_rank: the least rank a layer keeps.
        max_rank: the most rank a layer keeps; `None` means its capacity.
        costs: what one component of each layer costs (integers >= 1);
            `None` counts components.

    Returns:
        A list of boolean NumPy arrays, one mask per layer.

    Raises:
        ValueError: as `check_budget`, or if a score array is not 1-D.

    Example:

    >>> masks = allocate_global([[3.0, 1.0], [2.0, 0.5]], 2)
    >>> [mask.tolist() for mask in masks]
    [[True, False], [True, False]]
    >>> masks = allocate_global([[3.0, 1.0], [2.0, 0.5]], 20, costs=[10, 4])
    >>> [mask.tolist() for mask in masks]
    [[True, False], [True, True]]
    """
    scores = _as_score_vectors(component_scores)
    capacities = [vector.size for vector in scores]
    check_budget(
        budget, capacities, min_rank=min_rank, max_rank=max_rank, costs=costs
    )
    weights = _as_costs(costs, len(capacities))
    lowest, highest = rank_bounds(capacities, min_rank=min_rank, max_rank=max_rank)
    masks = [np.zeros(size, dtype=bool) for size in capacities]
    if not capacities or sum(capacities) == 0:
        return masks
    layers = np.repeat(np.arange(len(scores)), capacities)
    components = np.concatenate([np.arange(size) for size in capacities])
    value = np.concatenate(scores)
    if costs is not None:
        value = value / weights[layers]
    order = np.lexsort((components, layers, _ranking_key(value)))
    alive = np.zeros(len(scores), dtype=np.int64)
    # First pass: every layer's guaranteed minimum, its own best first.
    for layer, component in zip(layers[order], components[order]):
        if alive[layer] < lowest[layer]:
            masks[layer][component] = True
            alive[layer] += 1
    left = int(budget) - int((alive * weights).sum())
    for layer, component in zip(layers[order], components[order]):
        if left == 0:
            break
        if (
            not masks[layer][component]
            and alive[layer] < highest[layer]
            and weights[layer] <= left
        ):
            masks[layer][component] = True
            alive[layer] += 1
            left -= int(weights[layer])
    return masks


def _layer_weights(layer_scores):
    weights = []
    for layer, score in enumerate(layer_scores):
        score = float(score)
        if score < 0:
            raise ValueError(
                f"`layer_scores` must be >= 0 (importance magnitudes), got "
                f"{score} for layer {layer}."
            )
        weights.append(score)
    if math.inf in weights:
        # The limit of proportional shares: infinite scores take everything.
        return [Fraction(int(w == math.inf)) for w in weights]
    return [Fraction(w) if math.isfinite(w) else Fraction(0) for w in weights]


def _water_fill(weights, budget, lowest, highest):
    """Exact proportional shares within bounds that add up to `budget`."""
    lowest, highest = [int(b) for b in lowest], [int(b) for b in highest]
    shares = [None] * len(weights)
    free = list(range(len(weights)))
    while free:
        left = budget - sum(s for s in shares if s is not None)
        total = sum(weights[l] for l in free)
        # No score left to share by: split what is left equally.
        weight = {l: weights[l] if total else Fraction(1) for l in free}
        total = total or Fraction(len(free))
        proposal = {l: left * weight[l] / total for l in free}
        over = [l for l in free if proposal[l] > highest[l]]
        under = [l for l in free if proposal[l] < lowest[l]]
        excess = sum(proposal[l] - highest[l] for l in over)
        deficit = sum(lowest[l] - proposal[l] for l in under)
        if not over and not under:
            for l in free:
                shares[l] = proposal[l]
            break
        # Only the larger violation is sure to hold at the final water
        # level: excess means the level must rise, so layers over their
        # upper bound stay there (and symmetrically for a deficit).
        fixed = []
        if excess >= deficit:
            fixed += [(l, highest[l]) for l in over]
        if deficit >= excess:
            fixed += [(l, lowest[l]) for l in under]
        for l, bound in fixed:
            shares[l] = Fraction(bound)
        fixed_layers = {l for l, _ in fixed}
        free = [l for l in free if l not in fixed_layers]
    return shares


def layer_ranks(
    layer_scores, budget, *, capacities, min_rank=0, max_rank=None, costs=None
):
    """Per-layer ranks proportional to the layer scores, summing to `budget`.

    The design note's `r_l = clip(min_rank, max_rank, budget * s_l / sum_k
    s_k)` (SPEC.md section 4, `allocation="layer"`), made exact: a layer whose
    share crosses a bound is fixed at it and the others re-share what is left
    (water-filling, in exact rational arithmetic); the shares are then
    rounded down and the missing units go to the largest remainders (ties to
    the earlier layer). All-zero scores share equally; NaN and -inf count as
    zero, and +inf layers take all they can before the others.

    With `costs`, the shares are of the budget in those units (a layer's
    bounds cost `rank * cost`); each layer's share rounds down to whole
    components, and what is left goes, one component at a time, to the
    largest remainder (in components) whose component still fits. The ranks
    then cost at most `budget`, and less than any component that could
    still be added would cost is left unused.

    Args:
        layer_scores: one non-negative score per layer.
        budget: the total rank to hand out, or the units the ranks may
            cost with `costs`.
        capacities: the number of components of each layer.
        min_rank: the least rank a layer gets.
        max_rank: the most rank a layer gets; `None` means its capacity.
        costs: what one component of each layer costs (integers >= 1);
            `None` counts components.

    Returns:
        An int64 NumPy array of ranks: `sum == budget` in components, or
        `sum(ranks * costs) <= budget`.

    Raises:
        ValueError: as `check_budget`, if a score is negative, or if the
            lengths of `layer_scores` and `capacities` differ.

    Example:

    >>> layer_ranks([3.0, 1.0], 8, capacities=[8, 8]).tolist()
    [6, 2]
    >>> layer_ranks([3.0, 1.0], 8, capacities=[5, 8]).tolist()
    [5, 3]
    >>> layer_ranks([1.0, 1.0], 100, capacities=[8, 8], costs=[10, 30]).tolist()
    [7, 1]
    """
    layer_scores = np.asarray(layer_scores, dtype=np.float64).reshape(-1)
    capacities = list(capacities)
    if layer_scores.size != len(capacities):
        raise ValueError(
            f"`layer_scores` must hold one score per layer: got "
            f"{layer_scores.size} scores for {len(capacities)} capacities."
        )
    check_budget(
        budget, capacities, min_rank=min_rank, max_rank=max_rank, costs=costs
    )
    weights = _as_costs(costs, len(capacities))
    lowest, highest = rank_bounds(capacities, min_rank=min_rank, max_rank=max_rank)
    shares = _water_fill(
        _layer_weights(layer_scores),
        int(budget),
        lowest * weights,
        highest * weights,
    )
    # Shares in components: a layer's share of the units over its cost.
    shares = [share / int(cost) for share, cost in zip(shares, weights)]
    ranks = np.array([math.floor(s) for s in shares], dtype=np.int64)
    remainders = [s - r for s, r in zip(shares, ranks)]
    left = int(budget) - int((ranks * weights).sum())
    # In components, remainders are < 1 and add up to the shortfall, so
    # each winner has a positive remainder and room below its upper bound.
    # In other units, one component at a time to the largest remainder
    # whose component fits, until none does.
    while True:
        fits = [
            l
            for l in range(len(shares))
            if ranks[l] < highest[l] and weights[l] <= left
        ]
        if not fits:
            break
        winner = min(fits, key=lambda l: (-remainders[l], l))
        ranks[winner] += 1
        remainders[winner] -= 1
        left -= int(weights[winner])
    return ranks


def allocate_by_layer(
    layer_scores, component_scores, budget, *, min_rank=0, max_rank=None, costs=None
):
    """Gives each layer a rank by its score, then keeps its best components.

    The ranks come from `layer_ranks` (capacities are the lengths of
    `component_scores`); each layer then keeps its `r_l` best components,
    ties to the earlier component and NaN or -inf scores last.

    Args:
        layer_scores: one non-negative score per layer.
        component_scores: one 1-D array of scores per layer.
        budget: the number of components to keep in all, or the units they
            may cost with `costs`.
        min_rank: the least rank a layer keeps.
        max_rank: the most rank a layer keeps; `None` means its capacity.
        costs: what one component of each layer costs (integers >= 1);
            `None` counts components.

    Returns:
        A list of boolean NumPy arrays, one mask per layer.

    Raises:
        ValueError: as `layer_ranks`.

    Example:

    >>> masks = allocate_by_layer([1.0, 3.0], [[0.1, 0.9], [0.5, 0.4]], 2)
    >>> [mask.tolist() for mask in masks]
    [[False, True], [True, False]]
    """
    scores = _as_score_vectors(component_scores)
    ranks = layer_ranks(
        layer_scores,
        budget,
        capacities=[vector.size for vector in scores],
        min_rank=min_rank,
        max_rank=max_rank,
        costs=costs,
    )
    return [_keep_best(vector, rank) for vector, rank in zip(scores, ranks)]
