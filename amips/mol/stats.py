"""Intervals a reader can trust: bootstrap over users, paired differences, per-user metrics.

Every figure of a ranking evaluation is a mean over users of a per-user value (HR@k: 1 when
the target ranks below k; NDCG@10: 1 / log2(rank + 2) below 10; MRR: 1 / (rank + 1)).
:func:`bootstrap_ci` resamples users with replacement (percentile interval); comparing two
models on the same users, :func:`paired_ci` resamples the per-user differences, which
removes the between-user variance both models share.
"""

from __future__ import annotations

import numpy as np

from .._validate import InputError

METRICS = ("hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "mrr")


def per_user(ranks, metric: str) -> np.ndarray:
    """0-based target ranks [n] -> the per-user value of ``metric`` [n] (float64)."""
    r = np.asarray(ranks, dtype=np.float64)
    if metric.startswith("hr@"):
        return (r < int(metric[3:])).astype(np.float64)
    if metric == "ndcg@10":
        return np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0)
    if metric == "mrr":
        return 1.0 / (r + 1.0)
    raise InputError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")


def bootstrap_ci(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` [n] and its percentile bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise InputError(f"values: expected a non-empty 1-D array, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise InputError("values: contains NaN or inf")
    if not (0 < level < 1):
        raise InputError(f"level: must be in (0, 1), got {level}")
    if n_boot < 1:
        raise InputError(f"n_boot: must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for a in range(0, n_boot, 256):  # bounded memory: 256 resamples at a time
        b = min(n_boot, a + 256)
        means[a:b] = v[rng.integers(0, v.size, size=(b - a, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def paired_ci(a, b, **kw) -> tuple[float, float, float]:
    """(mean, low, high) of the per-user difference ``a - b`` (same users, same order)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"paired_ci: a and b cover different users (shapes {a.shape} and {b.shape})")
    return bootstrap_ci(a - b, **kw)


def summarise(ranks, metrics=("hr@10", "ndcg@10", "hr@50", "mrr"), **kw) -> dict:
    """{metric: [mean, low, high]} with bootstrap intervals over users."""
    return {m: list(bootstrap_ci(per_user(ranks, m), **kw)) for m in metrics}


def compare(ranks_a, ranks_b, metrics=("hr@10", "ndcg@10"), **kw) -> dict:
    """{metric: [mean, low, high]} of the paired per-user difference a - b."""
    return {m: list(paired_ci(per_user(ranks_a, m), per_user(ranks_b, m), **kw)) for m in metrics}
