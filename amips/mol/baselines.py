"""The baselines a reviewer runs first, on the exact protocol of the learned recommender.

Every baseline is fitted on the training part of each user's sequence (all but the last two
items, the part the learned model trains on) and scores the whole catalogue from the history
before the target (``Interactions.history(u, split)``), so its ranks come from the same
:func:`amips.mol.recommender.rank_targets` as the learned model's: full catalogue, the user's
earlier items excluded, ties against the target counted pessimistically.

- ``popular``: items by their count in the training part (the same list for every user).
- ``item_knn``: item-to-item co-occurrence over the user's recent items. Two items co-occur
  when they are at most ``window`` positions apart in a user's training sequence (``window``
  0: anywhere in it, the classic item-kNN); similarity ``C_ij / (n_i n_j) ** 0.5`` (cosine
  on co-occurrence counts). A user's score of item j is
  ``sum_k decay ** k * S[h_{-1-k}, j]`` over its ``n_recent`` most recent items.
- ``ease``: EASE (Steck, 2019), the closed-form ridge regression of the user-item matrix on
  itself with a zero diagonal: ``P = (X^T X + lambda I)^-1``, ``B = I - P / diag(P)``;
  score ``x_history @ B`` with ``x_history`` the binary vector of the user's history.

Their few parameters are tuned on the validation targets only (:func:`tune`), then the
test targets are ranked once with the chosen values.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .._validate import InputError
from .data import Interactions

BASELINES = ("popular", "item_knn", "ease")
KNN_GRID = {"window": (3, 10, 0), "n_recent": (1, 5, 20, 200), "decay": (1.0, 0.7)}
EASE_GRID = {"lam": (10.0, 30.0, 100.0, 300.0, 1000.0)}


def _train_sequences(inter: Interactions) -> list[np.ndarray]:
    return [inter.history(u, "train") for u in range(inter.n_users)]


def popularity_counts(inter: Interactions) -> np.ndarray:
    """[n_items] float64: count of each item in the training part."""
    seqs = _train_sequences(inter)
    flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=inter.n_items).astype(np.float64)


def cooccurrence(inter: Interactions, window: int) -> np.ndarray:
    """[n_items, n_items] float32 symmetric counts of pairs at most ``window`` positions
    apart (0: anywhere) in a user's training sequence, diagonal zero. Repeated items in a
    sequence count once per pair of positions."""
    n = inter.n_items
    c = np.zeros((n, n), dtype=np.float32)  # counts: exact in fp32 below 2**24
    for s in _train_sequences(inter):
        m = len(s)
        if m < 2:
            continue
        w = m - 1 if window <= 0 else min(window, m - 1)
        for lag in range(1, w + 1):
            np.add.at(c, (s[:-lag], s[lag:]), 1.0)
    c = c + c.T
    np.fill_diagonal(c, 0.0)
    return c


class Popular:
    name = "popular"

    def __init__(self, inter: Interactions):
        self.counts = popularity_counts(inter)
        self.params: dict = {}

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), len(self.counts))).copy()


class ItemKNN:
    name = "item_knn"

    def __init__(self, inter: Interactions, window: int = 0, n_recent: int = 20, decay: float = 1.0,
                 *, _cooc: np.ndarray | None = None):
        c = cooccurrence(inter, window) if _cooc is None else _cooc
        norm = np.sqrt(np.maximum(c.sum(1, dtype=np.float64), 1.0)).astype(np.float32)
        self.sim = c / norm[:, None] / norm[None, :]
        self.params = {"window": int(window), "n_recent": int(n_recent), "decay": float(decay)}

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        n_recent, decay = self.params["n_recent"], self.params["decay"]
        out = np.zeros((len(histories), self.sim.shape[0]), dtype=np.float64)
        for r, h in enumerate(histories):
            recent = np.asarray(h[::-1][:n_recent])
            if len(recent):
                w = decay ** np.arange(len(recent))
                out[r] = w @ self.sim[recent].astype(np.float64)
        return out


class EASE:
    name = "ease"

    def __init__(self, inter: Interactions, lam: float = 300.0, *, _gram: torch.Tensor | None = None):
        if not (lam > 0 and np.isfinite(lam)):
            raise InputError(f"lam: must be a positive number, got {lam!r}")
        g = ease_gram(inter) if _gram is None else _gram
        p = torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=g.dtype))
        b = -p / torch.diagonal(p)[None, :]
        b.fill_diagonal_(0.0)
        self.weights = b
        self.n_items = g.shape[0]
        self.params = {"lam": float(lam)}

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        x = torch.zeros(len(histories), self.n_items, dtype=self.weights.dtype)
        for r, h in enumerate(histories):
            if len(h):
                x[r, torch.as_tensor(np.unique(h))] = 1.0
        return (x @ self.weights).double().numpy()


def ease_gram(inter: Interactions) -> torch.Tensor:
    """[n_items, n_items] float64 Gram matrix X^T X of the binary training user-item matrix."""
    x = torch.zeros(inter.n_users, inter.n_items, dtype=torch.float64)
    for u, s in enumerate(_train_sequences(inter)):
        if len(s):
            x[u, torch.as_tensor(np.unique(s))] = 1.0
    return x.T @ x


def baseline_ranks(model, inter: Interactions, split: str, *, batch: int = 128) -> np.ndarray:
    """Ranks of every user's ``split`` target under a baseline's scores (the learned
    model's protocol: history excluded, ties against the target)."""
    from .recommender import rank_targets

    ranks = np.empty(inter.n_users, dtype=np.int64)
    for a in range(0, inter.n_users, batch):
        us = range(a, min(a + batch, inter.n_users))
        hist = [inter.history(u, split) for u in us]
        tgt = np.asarray([inter.target(u, split) for u in us])
        s = torch.as_tensor(model.scores(hist))
        ranks[a:a + len(hist)] = rank_targets(s, hist, tgt)
    return ranks


def _candidates(inter: Interactions, name: str):
    """Each point of a baseline's grid, fitted, one at a time (shared work done once)."""
    if name == "popular":
        yield Popular(inter)
    elif name == "item_knn":
        for window in KNN_GRID["window"]:
            cooc = cooccurrence(inter, window)
            for n_recent, decay in itertools.product(KNN_GRID["n_recent"], KNN_GRID["decay"]):
                if not (n_recent == 1 and decay != 1.0):  # one item: decay changes nothing
                    yield ItemKNN(inter, window, n_recent, decay, _cooc=cooc)
            del cooc
    else:
        gram = ease_gram(inter).float()
        for lam in EASE_GRID["lam"]:
            yield EASE(inter, lam, _gram=gram)


def tune(inter: Interactions, names=BASELINES, *, progress: bool = False) -> list[dict]:
    """Fit each baseline over its grid, pick the values with the best validation HR@10
    (ties: NDCG@10, then the first in the grid), then rank the test targets once.

    Returns one dict per baseline: name, params, validation ranks, test ranks, grid tried
    (each point with its validation HR@10 and NDCG@10)."""
    from .recommender import ranking_metrics

    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in BASELINES:
            raise InputError(f"baselines: unknown baseline {n!r} (expected some of {', '.join(BASELINES)})")
    out = []
    for name in names:
        best, grid = None, []
        for model in _candidates(inter, name):
            val = baseline_ranks(model, inter, "validation")
            m = ranking_metrics(val)
            grid.append({**model.params, "val_hr@10": m["hr@10"], "val_ndcg@10": m["ndcg@10"]})
            if progress:
                print(f"  {name} {model.params}: val HR@10 {m['hr@10']:.4f} NDCG@10 {m['ndcg@10']:.4f}",
                      flush=True)
            key = (m["hr@10"], m["ndcg@10"])
            if best is None or key > best[0]:
                best = (key, model, val)
        _, model, val = best
        out.append({"name": name, "params": model.params, "validation_ranks": val,
                    "test_ranks": baseline_ranks(model, inter, "test"), "grid": grid})
    return out
