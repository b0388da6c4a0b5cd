"""Small statistics shared by the evaluator's reports (pure functions over numbers).

The percentile bootstraps of every report live here: :func:`bootstrap_ci` (one sample's mean, paired
differences included) and :func:`mean_of_means_ci` (the mean over several samples' means, scipy's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    percentiles: tuple[float, float] = (2.5, 97.5),
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, 95% unless other ``percentiles`` are asked for (a single
    value gives a zero-width interval). Paired comparisons pass the per-unit differences."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, list(percentiles))
    return float(low), float(high)


def mean_of_means_ci(
    samples: Sequence[np.ndarray], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile CI of the mean over samples of each sample's mean (each resampled on its own, by
    scipy's ``bootstrap``); None without samples."""
    from scipy.stats import bootstrap

    samples = [np.asarray(s, dtype=float) for s in samples if len(s)]
    if not samples:
        return None
    if all(np.all(s == s[0]) for s in samples):  # no spread: the CI is the point itself
        point = float(np.mean([s.mean() for s in samples]))
        return point, point

    def statistic(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([np.mean(a, axis=axis) for a in arrays], axis=0)

    result = bootstrap(
        tuple(samples),
        statistic,
        n_resamples=resamples,
        confidence_level=0.95,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
