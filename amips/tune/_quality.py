"""Targets, per-query quality and its confidence interval.

A target is a metric and a value in [0, 1]: ``match@1`` (the returned top-1 is an exact
top-1, tie-aware) or ``recall@k`` (tie-aware, k <= 100). Per-query values are computed
against fp64 ground truth exactly as :mod:`amips.metrics` does (the same tolerances), so
the means equal ``amips.metrics.match_at_1`` / ``recall_at_k``; per-query values are what
the interval needs: Wilson for match@1 (a proportion), a seeded bootstrap over queries for
recall@k (a mean of fractions).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from .._validate import InputError
from ..metrics import ATOL, RTOL, GroundTruth

_METRIC = re.compile(r"^(match@1|recall@(\d+))$")
MAX_K = 100


@dataclass(frozen=True)
class Target:
    """What to reach: ``metric`` (``match@1`` or ``recall@k``) >= ``value``."""

    metric: str
    value: float

    @property
    def k(self) -> int:
        """How many results a search must return to measure the metric."""
        return 1 if self.metric == "match@1" else int(self.metric.split("@")[1])

    @property
    def column(self) -> str:
        return self.metric.replace("@", "_at_")

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def check_metric(metric) -> str:
    if not isinstance(metric, str) or not _METRIC.match(metric.strip().lower()):
        raise InputError(f"metric: unknown metric {metric!r}; expected match@1 or recall@K (K in 1..{MAX_K})")
    metric = metric.strip().lower()
    if metric.startswith("recall@") and not 1 <= int(metric.split("@")[1]) <= MAX_K:
        raise InputError(f"metric: recall@K needs K in 1..{MAX_K}, got {metric!r}")
    return metric


def parse_target(target, metric: str | None = None) -> Target:
    """``"match@1=0.95"``, ``"recall@10=0.9"``, or a number with ``metric`` (default match@1)."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str) and "=" in target:
        name, _, val = target.partition("=")
        name = check_metric(name)
        if metric is not None and check_metric(metric) != name:
            raise InputError(f"target: {target!r} names {name}, but metric is {metric!r}")
        metric, target = name, val
    metric = check_metric(metric or "match@1")
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise InputError(f"target: expected METRIC=VALUE (e.g. match@1=0.95) or a number, got {target!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InputError(f"target: {metric} target must be in [0, 1], got {value!r}")
    return Target(metric, value)


def ground_truth(queries: torch.Tensor, keys: torch.Tensor, k: int) -> GroundTruth:
    return GroundTruth.compute(queries, keys, k=min(max(k, 10), keys.shape[0]))


def found_scores(queries: torch.Tensor, keys: torch.Tensor, ids) -> torch.Tensor:
    """fp64 <q_i, keys[ids[i, j]]> ([nq, k]; -inf where id < 0), as :func:`amips.metrics.rescore`
    computes them, without re-validating the (already checked) key matrix on every call."""
    ids = torch.as_tensor(ids).cpu().long()
    out = torch.empty(ids.shape, dtype=torch.float64)
    for a in range(0, ids.shape[0], 4096):
        sel = ids[a:a + 4096]
        vecs = keys[sel.clamp(min=0)].double()
        s = torch.einsum("qd,qkd->qk", queries[a:a + 4096].double(), vecs)
        out[a:a + 4096] = torch.where(sel >= 0, s, torch.full_like(s, float("-inf")))
    return out


def per_query(queries, keys, ids, gt: GroundTruth, metric: str, *, found: torch.Tensor | None = None) -> np.ndarray:
    """Per-query match@1 (0/1) or recall@k (fraction), as float64 [nq]."""
    k = 1 if metric == "match@1" else int(metric.split("@")[1])
    if found is None:
        found = found_scores(queries, keys, torch.as_tensor(ids)[:, :k])
    found = found[:, :k]
    t = gt.scores.double()
    if metric == "match@1":
        s = t[:, 0]
        return (found[:, 0] >= s - (ATOL + RTOL * s.abs())).double().numpy()
    kth = t[:, k - 1 : k]
    if found.shape[1] < k:
        found = torch.cat([found, torch.full((found.shape[0], k - found.shape[1]), float("-inf"),
                                             dtype=found.dtype)], 1)
    good = (found >= kth - (ATOL + RTOL * kth.abs())).sum(1).clamp(max=k)
    return (good.double() / k).numpy()


def interval(values: np.ndarray, metric: str, *, z: float = 1.959964, seed: int = 0, n_boot: int = 2000):
    """95% interval of the mean of per-query ``values``: Wilson for match@1, bootstrap otherwise."""
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    p = float(np.mean(values))
    if metric == "match@1":
        den = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / den
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
        return (max(0.0, centre - half), min(1.0, centre + half))
    rng = np.random.default_rng(seed)
    means = np.array([values[rng.integers(0, n, n)].mean() for _ in range(n_boot)])
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def standard_error(values: np.ndarray) -> float:
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
