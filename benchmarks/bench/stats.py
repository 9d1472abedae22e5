"""Paired comparisons over seeds: mean, spread and a 95% interval.

Pure functions over lists of numbers, tested without training
(`tests/test_benchmarks.py`).
"""

import math

# Two-sided 95% critical values of Student's t, by degrees of freedom
# (1..30); beyond 30 the normal value is within 2% of t's.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_critical(dof):
    """The two-sided 95% critical value of Student's t with `dof` degrees
    of freedom.

    >>> t_critical(4)
    2.776
    """
    if dof < 1:
        raise ValueError(f"dof must be at least 1; got {dof}")
    return _T975[dof - 1] if dof <= len(_T975) else 1.960


def mean_std(values):
    """`(mean, sample standard deviation)`; the deviation is 0 for one value.

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def paired_difference(a, b):
    """Mean of `a[s] - b[s]` over the seeds `s` both have, with its 95%
    t interval.

    Args:
        a, b: `{seed: value}` for the two methods.

    Returns:
        A dict with `n` (paired seeds), `mean`, `std` (of the differences),
        `low` and `high` (the interval; `None` with fewer than 2 pairs) and
        `verdict`: `"higher"` or `"lower"` where the interval excludes 0,
        `"tie"` where it holds 0, `None` with fewer than 2 pairs.

    Example:

    >>> d = paired_difference({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.8, 1: 0.7, 2: 0.8})
    >>> round(d["mean"], 3), d["n"], d["verdict"]
    (0.083, 3, 'higher')
    """
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    if not diffs:
        return {"n": 0, "mean": None, "std": None, "low": None, "high": None,
                "verdict": None, "seeds": []}
    mean, std = mean_std(diffs)
    if len(diffs) < 2:
        return {"n": 1, "mean": mean, "std": 0.0, "low": None, "high": None,
                "verdict": None, "seeds": seeds}
    half = t_critical(len(diffs) - 1) * std / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    verdict = "higher" if low > 0 else "lower" if high < 0 else "tie"
    return {"n": len(diffs), "mean": mean, "std": std, "low": low,
            "high": high, "verdict": verdict, "seeds": seeds}
