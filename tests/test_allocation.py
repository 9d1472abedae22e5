import itertools

import numpy as np
import pytest

from keras_adalora.allocation import allocate_by_layer
from keras_adalora.allocation import allocate_global
from keras_adalora.allocation import check_budget
from keras_adalora.allocation import layer_ranks
from keras_adalora.allocation import rank_bounds


def as_lists(masks):
    return [mask.tolist() for mask in masks]


def random_problem(rng):
    """Random capacities (some empty), scores with ties, and feasible bounds."""
    capacities = rng.integers(0, 6, size=int(rng.integers(1, 5))).tolist()
    min_rank = int(rng.integers(0, 3))
    max_rank = None if rng.random() < 0.4 else int(rng.integers(min_rank, 6))
    lowest, highest = rank_bounds(capacities, min_rank=min_rank, max_rank=max_rank)
    budget = int(rng.integers(lowest.sum(), highest.sum() + 1))
    # Few distinct values, so that ties are common.
    scores = [rng.integers(0, 4, size=c).astype(float) for c in capacities]
    return scores, budget, min_rank, max_rank, lowest, highest


def best_total(scores, budget, lowest, highest):
    """Brute force: the largest sum of kept scores any feasible ranks give."""
    prefix = [np.concatenate([[0.0], np.cumsum(np.sort(s)[::-1])]) for s in scores]
    ranges = [range(lo, hi + 1) for lo, hi in zip(lowest, highest)]
    return max(
        sum(p[r] for p, r in zip(prefix, ranks))
        for ranks in itertools.product(*ranges)
        if sum(ranks) == budget
    )


# check_budget -------------------------------------------------------------------


def test_a_feasible_budget_passes():
    check_budget(8, [4, 4, 4], min_rank=2, max_rank=3)
    check_budget(0, [], min_rank=5)
    check_budget(np.int64(3), np.array([4, 0]))


def test_min_rank_that_needs_more_than_the_budget_is_refused():
    message = (
        "min_rank=3 needs at least 12 components alive but the budget is 8: "
        "lower min_rank or raise target_rank/total_rank"
    )
    with pytest.raises(ValueError, match=message):
        check_budget(8, [4, 4, 4, 4], min_rank=3)


def test_min_rank_counts_small_layers_at_their_capacity():
    check_budget(7, [4, 1, 4], min_rank=3)
    with pytest.raises(ValueError, match="min_rank=3 needs at least 7"):
        check_budget(6, [4, 1, 4], min_rank=3)


def test_max_rank_that_allows_less_than_the_budget_is_refused():
    with pytest.raises(
        ValueError,
        match="max_rank=2 allows at most 8 components alive but the budget is 9: raise max_rank",
    ):
        check_budget(9, [4, 4, 4, 4], max_rank=2)


def test_a_budget_above_the_capacity_of_the_layers_is_refused():
    with pytest.raises(ValueError, match="budget=9 is more than the 8 components"):
        check_budget(9, [4, 4])
    with pytest.raises(ValueError, match="budget=9 is more than the 8 components"):
        check_budget(9, [4, 4], max_rank=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_rank": 3, "max_rank": 2}, "min_rank=3 is larger than max_rank=2"),
        ({"budget": -1}, "budget.*-1"),
        ({"budget": 2.0}, "budget.*2.0"),
        ({"budget": True}, "budget.*True"),
        ({"min_rank": -1}, "min_rank.*-1"),
        ({"max_rank": -2}, "max_rank.*-2"),
        ({"capacities": [4, -1]}, "capacities.*-1"),
    ],
)
def test_check_budget_names_the_bad_argument(kwargs, message):
    arguments = {"budget": 4, "capacities": [4, 4], "min_rank": 0, "max_rank": None}
    arguments.update(kwargs)
    budget, capacities = arguments.pop("budget"), arguments.pop("capacities")
    with pytest.raises(ValueError, match=message):
        check_budget(budget, capacities, **arguments)


@pytest.mark.parametrize("allocate", ["global", "layer"])
def test_both_allocators_check_the_budget_first(allocate):
    scores = [np.ones(4), np.ones(4)]
    with pytest.raises(ValueError, match="min_rank=3"):
        if allocate == "global":
            allocate_global(scores, 4, min_rank=3)
        else:
            allocate_by_layer([1.0, 1.0], scores, 4, min_rank=3)


# allocate_global -------------------------------------------------------------------


def test_global_allocation_keeps_the_best_components_of_the_whole_model():
    masks = allocate_global([[0.1, 0.9, 0.5], [0.8, 0.2], [0.3]], 3)
    assert as_lists(masks) == [[False, True, True], [True, False], [False]]


def test_a_layer_whose_components_score_low_loses_its_rank_first():
    masks = allocate_global([np.full(4, 1e-6), np.arange(1.0, 5.0)], 4)
    assert [int(mask.sum()) for mask in masks] == [0, 4]


def test_min_rank_keeps_each_layers_best_components_alive():
    masks = allocate_global([[0.1, 0.2, 0.05], [5.0, 4.0, 3.0]], 3, min_rank=1)
    assert as_lists(masks) == [[False, True, False], [True, True, False]]


def test_max_rank_passes_the_budget_on_to_the_next_best_layer():
    masks = allocate_global([[9.0, 8.0, 7.0], [1.0, 2.0, 0.0]], 4, max_rank=2)
    assert as_lists(masks) == [[True, True, False], [True, True, False]]


def test_ties_go_to_the_earlier_layer_then_the_earlier_component():
    masks = allocate_global([np.ones(3), np.ones(3)], 4)
    assert as_lists(masks) == [[True, True, True], [True, False, False]]
    masks = allocate_global([[1.0, 2.0, 2.0], [2.0, 1.0]], 2)
    assert as_lists(masks) == [[False, True, True], [False, False]]


def test_nan_and_negative_infinity_rank_below_every_finite_score():
    scores = [[np.nan, -1e30, np.inf], [-np.inf, -5.0]]
    masks = allocate_global(scores, 3)
    assert as_lists(masks) == [[False, True, True], [False, True]]
    # Among the non-finite ones, ties go by position.
    masks = allocate_global(scores, 4)
    assert as_lists(masks) == [[True, True, True], [False, True]]


def test_empty_layers_and_a_zero_budget_are_handled():
    masks = allocate_global([np.zeros(0), [1.0, 2.0], []], 0)
    assert as_lists(masks) == [[], [False, False], []]
    assert allocate_global([], 0) == []


def test_global_allocation_is_exact_bounded_and_optimal_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scores, budget, min_rank, max_rank, lowest, highest = random_problem(rng)
        masks = allocate_global(scores, budget, min_rank=min_rank, max_rank=max_rank)
        ranks = np.array([mask.sum() for mask in masks])
        assert [mask.dtype for mask in masks] == [np.bool_] * len(scores)
        assert [mask.shape for mask in masks] == [s.shape for s in scores]
        assert ranks.sum() == budget
        assert np.all(lowest <= ranks) and np.all(ranks <= highest)
        kept = sum(s[mask].sum() for s, mask in zip(scores, masks))
        assert kept == best_total(scores, budget, lowest, highest)
        again = allocate_global(
            [s.copy() for s in scores], budget, min_rank=min_rank, max_rank=max_rank
        )
        assert as_lists(again) == as_lists(masks)


# layer_ranks -------------------------------------------------------------------------


def test_ranks_are_proportional_to_the_layer_scores():
    assert layer_ranks([3.0, 1.0], 8, capacities=[8, 8]).tolist() == [6, 2]
    assert layer_ranks([1.0, 2.0, 5.0], 16, capacities=[16] * 3).tolist() == [2, 4, 10]


def test_a_layer_at_its_capacity_gives_the_rest_to_the_others():
    assert layer_ranks([3.0, 1.0], 8, capacities=[5, 8]).tolist() == [5, 3]


def test_max_and_min_rank_are_water_filled():
    # Shares [10, 1, 1]: the first layer stops at max_rank=6 and the other
    # two re-share the 6 left in proportion 1 : 1.
    ranks = layer_ranks([10.0, 1.0, 1.0], 12, capacities=[8] * 3, max_rank=6)
    assert ranks.tolist() == [6, 3, 3]
    # Shares [12, 0, 0]: the silent layers are lifted to min_rank=2.
    ranks = layer_ranks([10.0, 0.0, 0.0], 12, capacities=[8] * 3, min_rank=2)
    assert ranks.tolist() == [8, 2, 2]


def test_remainders_go_to_the_largest_then_the_earlier_layer():
    assert layer_ranks([1.0, 1.0, 1.0], 4, capacities=[4] * 3).tolist() == [2, 1, 1]
    # Shares 10 * [0.24, 0.38, 0.38] = [2.4, 3.8, 3.8]: one unit left, tie.
    ranks = layer_ranks([0.24, 0.38, 0.38], 10, capacities=[10] * 3)
    assert ranks.tolist() == [2, 4, 4]
    ranks = layer_ranks([0.2, 0.4, 0.4], 9, capacities=[10] * 3)
    assert ranks.tolist() == [2, 4, 3]  # shares [1.8, 3.6, 3.6]


def test_all_zero_scores_share_equally():
    assert layer_ranks([0.0, 0.0, 0.0], 6, capacities=[4] * 3).tolist() == [2, 2, 2]
    assert layer_ranks([0.0, 0.0], 6, capacities=[1, 8]).tolist() == [1, 5]


def test_what_scoring_layers_cannot_take_goes_equally_to_the_others():
    ranks = layer_ranks([5.0, 0.0, 0.0], 10, capacities=[4, 8, 8])
    assert ranks.tolist() == [4, 3, 3]


def test_nan_layer_scores_count_as_zero_and_infinite_ones_take_all_they_can():
    assert layer_ranks([np.nan, 1.0], 4, capacities=[4, 4]).tolist() == [0, 4]
    assert layer_ranks([np.inf, 1e30], 4, capacities=[3, 4]).tolist() == [3, 1]


def test_shares_that_are_whole_in_exact_arithmetic_stay_whole():
    ranks = layer_ranks([0.1, 0.2, 0.3], 6, capacities=[6] * 3)
    assert ranks.tolist() == [1, 2, 3]


def continuous_shares(weights, budget, lowest, highest):
    """Reference: `clip(level * w, lo, hi)` with the water level by bisection."""
    low, high = 0.0, 1.0
    while np.clip(high * weights, lowest, highest).sum() < budget:
        high *= 2
    for _ in range(200):
        level = (low + high) / 2
        if np.clip(level * weights, lowest, highest).sum() < budget:
            low = level
        else:
            high = level
    return np.clip(high * weights, lowest, highest)


def test_layer_ranks_are_exact_bounded_and_round_the_water_filled_shares():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 7))
        capacities = rng.integers(0, 10, size=n).tolist()
        min_rank = int(rng.integers(0, 4))
        max_rank = None if rng.random() < 0.4 else int(rng.integers(min_rank, 10))
        lowest, highest = rank_bounds(capacities, min_rank=min_rank, max_rank=max_rank)
        budget = int(rng.integers(lowest.sum(), highest.sum() + 1))
        weights = rng.random(n) + 0.01
        ranks = layer_ranks(weights, budget, capacities=capacities,
                            min_rank=min_rank, max_rank=max_rank)
        assert ranks.dtype == np.int64
        assert ranks.sum() == budget
        assert np.all(lowest <= ranks) and np.all(ranks <= highest)
        shares = continuous_shares(weights, budget, lowest, highest)
        assert np.all(np.abs(ranks - shares) < 1 + 1e-9)
        # A layer never gets less than a lower-scoring one with the same bounds.
        for a, b in itertools.permutations(range(n), 2):
            same_bounds = lowest[a] == lowest[b] and highest[a] == highest[b]
            if same_bounds and weights[a] > weights[b]:
                assert ranks[a] >= ranks[b]


def test_layer_ranks_refuses_negative_scores_and_a_length_mismatch():
    with pytest.raises(ValueError, match="layer_scores.*-1.0.*layer 1"):
        layer_ranks([1.0, -1.0], 2, capacities=[2, 2])
    with pytest.raises(ValueError, match="layer_scores.*3 scores for 2"):
        layer_ranks([1.0, 1.0, 1.0], 2, capacities=[2, 2])


# allocate_by_layer --------------------------------------------------------------------


def test_each_layer_keeps_its_rank_of_best_components():
    masks = allocate_by_layer([1.0, 3.0], [[0.1, 0.9, 0.5, 0.2], [0.5, 0.4, 0.7, 0.1]], 4)
    # Ranks 4 * [1/4, 3/4] = [1, 3].
    assert as_lists(masks) == [[False, True, False, False], [True, True, True, False]]


def test_by_layer_ties_and_nan_components_are_deterministic():
    masks = allocate_by_layer([1.0, 1.0], [[np.nan, 2.0, 2.0], [1.0, 1.0, -np.inf]], 4)
    assert as_lists(masks) == [[False, True, True], [True, True, False]]


def test_by_layer_allocation_matches_layer_ranks_on_random_cases():
    rng = np.random.default_rng(2)
    for _ in range(200):
        scores, budget, min_rank, max_rank, lowest, highest = random_problem(rng)
        layer_scores = rng.random(len(scores))
        masks = allocate_by_layer(
            layer_scores, scores, budget, min_rank=min_rank, max_rank=max_rank
        )
        ranks = layer_ranks(
            layer_scores, budget, capacities=[s.size for s in scores],
            min_rank=min_rank, max_rank=max_rank,
        )
        assert [int(mask.sum()) for mask in masks] == ranks.tolist()
        for s, mask in zip(scores, masks):
            if mask.any() and not mask.all():
                assert s[mask].min() >= s[~mask].max()


# Budgets in parameters (`costs`) -------------------------------------------------


def random_costed_problem(rng):
    scores, _, min_rank, max_rank, lowest, highest = random_problem(rng)
    costs = rng.integers(1, 40, size=len(scores))
    least, most = int((lowest * costs).sum()), int((highest * costs).sum())
    budget = int(rng.integers(least, most + 1))
    return scores, budget, min_rank, max_rank, lowest, highest, costs


def spent(ranks, costs):
    return int(sum(int(r) * int(c) for r, c in zip(ranks, costs)))


def test_components_are_ranked_by_score_per_parameter():
    # By score the wide layer's components win; per parameter the narrow
    # layer's do (3/10 > 8/100 > 2/10 > 5/100).
    scores = [[8.0, 5.0], [3.0, 2.0]]
    costs = [100, 10]
    by_score = allocate_global(scores, 2)
    assert as_lists(by_score) == [[True, True], [False, False]]
    masks = allocate_global(scores, 120, costs=costs)
    assert as_lists(masks) == [[True, False], [True, True]]
    # 110 fits the narrow layer's two and none of the wide layer's.
    assert as_lists(allocate_global(scores, 110, costs=costs)) == [
        [False, False], [True, True]]


def test_a_component_that_does_not_fit_is_skipped_for_a_cheaper_one():
    # The best ratio (wide, 60 / 50) fits; the next (wide, 50 / 50) does not
    # in the 30 left, so the narrow component (10 / 10) takes its place.
    masks = allocate_global([[60.0, 50.0], [10.0]], 80, costs=[50, 10])
    assert as_lists(masks) == [[True, False], [True]]


def test_unit_costs_allocate_exactly_as_a_budget_in_components():
    rng = np.random.default_rng(7)
    for _ in range(300):
        scores, budget, min_rank, max_rank, *_ = random_problem(rng)
        ones = [1] * len(scores)
        kwargs = dict(min_rank=min_rank, max_rank=max_rank)
        assert as_lists(allocate_global(scores, budget, costs=ones, **kwargs)) == as_lists(
            allocate_global(scores, budget, **kwargs))
        layer_scores = [float(s.sum()) for s in scores]
        capacities = [s.size for s in scores]
        np.testing.assert_array_equal(
            layer_ranks(layer_scores, budget, capacities=capacities, costs=ones, **kwargs),
            layer_ranks(layer_scores, budget, capacities=capacities, **kwargs))


@pytest.mark.parametrize("by_layer", [False, True])
def test_a_budget_in_parameters_is_never_exceeded_and_never_wasted(by_layer):
    rng = np.random.default_rng(11)
    for _ in range(300):
        scores, budget, min_rank, max_rank, lowest, highest, costs = (
            random_costed_problem(rng))
        kwargs = dict(min_rank=min_rank, max_rank=max_rank, costs=costs)
        if by_layer:
            layer_scores = rng.random(len(scores)) * (rng.random(len(scores)) > 0.3)
            masks = allocate_by_layer(layer_scores, scores, budget, **kwargs)
        else:
            masks = allocate_global(scores, budget, **kwargs)
        ranks = np.array([int(m.sum()) for m in masks])
        assert np.all(ranks >= lowest) and np.all(ranks <= highest)
        left = budget - spent(ranks, costs)
        assert left >= 0
        # Every layer that could take one more component costs more than
        # what is left.
        room = ranks < highest
        assert np.all(np.asarray(costs)[room] > left)


def test_layer_shares_of_a_budget_in_parameters_follow_the_scores():
    # Equal scores: half the budget each, 50 / 10 = 5 components and
    # 50 / 30 -> 1; the 20 left buy two more of the cheap layer's.
    ranks = layer_ranks([1.0, 1.0], 100, capacities=[8, 8], costs=[10, 30])
    assert ranks.tolist() == [7, 1]
    # Three times the score: 25 -> 2 components of 10 and 75 -> 2 of 30,
    # both remainders 0.5; the 20 left go to the earlier layer (the later
    # one's component does not fit), twice.
    ranks = layer_ranks([1.0, 3.0], 100, capacities=[8, 8], costs=[10, 30])
    assert ranks.tolist() == [4, 2]
    # 55 each: 5.5 and 1.83 components, so the 30 left go to the larger
    # remainder, the dear layer's, whose component fits.
    ranks = layer_ranks([1.0, 1.0], 110, capacities=[8, 8], costs=[10, 30])
    assert ranks.tolist() == [5, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 20, "min_rank": 1}, "min_rank=1 needs at least 21 parameters.*target_params"),
        ({"budget": 90, "max_rank": 2}, "max_rank=2 allows at most 42 parameters"),
        ({"budget": 100}, "more than the 84 parameters"),
        ({"budget": 10, "costs": [10, 0]}, "costs"),
        ({"budget": 10, "costs": [10]}, "one cost per layer"),
    ],
)
def test_budgets_in_parameters_are_checked_in_parameters(kwargs, message):
    kwargs = {"costs": [10, 11], **kwargs}
    budget = kwargs.pop("budget")
    with pytest.raises(ValueError, match=message):
        check_budget(budget, [4, 4], **kwargs)
