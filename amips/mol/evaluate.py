"""Evaluating a trained recommender: ranking quality and the top-k methods against exact.

Ranking quality: every user's test target is ranked against the whole catalogue (the
head's fp32 grid, the user's earlier items excluded, ties counted against the target):
HR@1/10/50/200, NDCG@10 and MRR.

Baselines (``baselines=True``): most-popular, item-kNN over the user's recent items and EASE
(:mod:`amips.mol.baselines`), tuned on the validation targets, ranked by the same rule on the
same test targets. Every figure comes with a 95% bootstrap interval over users, and each
baseline with the paired per-user difference model - baseline (:mod:`amips.mol.stats`).

Top-k methods: the test queries of all users go through ``amips.mol.topk`` with every
method (default parameters, seen items excluded); recall@k is the share of the ``exact``
top-k ids a method returns (tie-aware: an id counts when its canonical score reaches the
exact k-th score), ``top1_found`` the share of queries whose exact top-1 score is reached
by the method's best, and latency the best of ``repeats`` wall-clock runs of the batch.
"""

from __future__ import annotations

import os
import time

import torch

from .._validate import InputError
from .data import load_interactions
from .recommender import Recommender, load, ranking_metrics, target_ranks


def _method_runs(methods: str) -> list[tuple[str, str, dict]]:
    from .topk import METHODS

    if methods == "none":
        return []
    names = list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    for n in names:
        if n not in METHODS:
            raise InputError(f"methods: unknown top-k method {n!r} (expected some of {', '.join(METHODS)})")
    runs = []
    for n in names:
        if n == "exact":
            continue
        runs.append((n, n, {}))
    return runs


def compare_methods(rec: Recommender, queries: torch.Tensor, k: int, *, exclude=None,
                    methods: str = "all", repeats: int = 3) -> list[dict]:
    """Recall@k of each top-k method against ``exact`` and its best-of-``repeats`` latency."""
    from .topk import topk

    def timed(method, **params):
        best, res = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = topk(rec, queries, k, method=method, exclude=exclude, return_stats=True, **params)
            best = min(best, time.perf_counter() - t0)
        return res, best

    (es, ei, estats), et = timed("exact")
    rows = [{"method": "exact", "params": {}, "recall": 1.0, "top1_found": 1.0, "ms": 1e3 * et,
             "items_scored": estats.get("items_scored")}]
    kth = es[:, -1:]
    for label, method, params in _method_runs(methods):
        (s, i, stats), t = timed(method, **params)
        # tie-aware recall: a returned id counts when its score reaches the exact k-th score
        hit = (s >= kth) & (i >= 0) & torch.isfinite(s)
        n_valid = torch.isfinite(es).sum(1).clamp_min(1)
        recall = (hit.sum(1).clamp(max=n_valid) / n_valid).double().mean().item()
        top1 = (s[:, 0] >= es[:, 0]).double().mean().item()
        rows.append({"method": label, "params": params, "recall": recall, "top1_found": top1,
                     "ms": 1e3 * t, "items_scored": stats.get("items_scored")})
    return rows


def evaluate_baselines(inter, model_ranks=None, *, names=None, progress: bool = False) -> list[dict]:
    """Tune and rank every baseline on ``inter``; one JSON-ready row per baseline with its
    test metrics, their intervals and (given the model's test ranks) model - baseline."""
    from . import baselines, stats

    rows = []
    for r in baselines.tune(inter, names or baselines.BASELINES, progress=progress):
        row = {"name": r["name"], "params": r["params"], "test": ranking_metrics(r["test_ranks"]),
               "test_ci": stats.summarise(r["test_ranks"]),
               "validation": ranking_metrics(r["validation_ranks"]), "grid": r["grid"],
               "test_ranks": r["test_ranks"].tolist()}
        if model_ranks is not None:
            row["model_minus_baseline"] = stats.compare(model_ranks, r["test_ranks"])
        rows.append(row)
    return rows


def evaluate(model_dir: str | os.PathLike, ratings: str | os.PathLike, *, device: str = "cpu",
             k: int = 10, methods: str = "all", repeats: int = 3, baselines: bool = False,
             progress: bool = False) -> dict:
    """Test-set ranking metrics of the model in ``model_dir`` on ``ratings`` (with 95%
    bootstrap intervals over users), optionally the baselines beside it, and, for each
    top-k method, recall against exact and latency. Returns a JSON-ready dict."""
    from . import stats

    rec = load(model_dir, device=device)
    inter = load_interactions(ratings, item_ids=rec.item_ids, drop_short=rec.config.get("drop_short", False))
    rec = Recommender(rec.model, inter, rec.config, rec.path)
    if k > inter.n_items:
        raise InputError(f"k: {k} is larger than the number of items ({inter.n_items})")
    with torch.no_grad():
        ranks = target_ranks(rec.model, inter, "test", device=device)
        test = ranking_metrics(ranks)
        out = {"model": str(model_dir), "ratings": str(ratings), "similarity": rec.similarity,
               "n_params": rec.param_counts(), "n_items": inter.n_items, "test": test,
               "test_ci": stats.summarise(ranks), "test_ranks": ranks.tolist(), "k": k,
               "n_queries": inter.n_users, "device": str(device), "methods": []}
        if baselines:
            out["baselines"] = evaluate_baselines(inter, ranks, progress=progress)
        runs = _method_runs(methods) if methods != "none" else None
        if runs is not None:
            queries = rec.encode_users(inter.user_ids)
            seen = rec.seen_items(inter.user_ids)
            out["methods"] = compare_methods(rec, queries, k, exclude=seen, methods=methods,
                                             repeats=repeats)
    out["torch_threads"] = torch.get_num_threads()
    return out

