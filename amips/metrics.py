"""Search quality against exact ground truth: match@1, recall@k and MRR, all tie-aware.

Every metric compares SCORES, not ids: the returned keys are re-scored in float64 against
the true query (:func:`rescore`) and compared with the exact float64 top-k scores, so a
search that returns any one of several tied keys is counted correct. A returned key counts
as good as the exact j-th answer when its score is within ``tol = atol + rtol * scale`` of
it, ``scale`` being the query's score scale (``||q|| * max ||k||``, which
:class:`GroundTruth` records; the largest |exact score| of the row when no scale is given)
and rtol 1e-6, atol 0 by default: fp32 search arithmetic cannot separate closer scores, and
a tolerance relative to the scale gives the same answer at every magnitude (a fixed absolute
one makes every key a tie for small vectors). See :mod:`amips.numerics`.

- ``match_at_1``: fraction of queries whose returned top-1 is an exact top-1.
- ``recall_at_k``: per query, |{returned j <= k : s(q, j) >= s*_k - tol}| / k, where s*_k
  is the exact k-th best score (the returned ids are distinct, so this is the tie-aware
  form of |returned top-k ∩ exact top-k| / k), averaged over queries.
- ``mrr``: mean over queries of 1 / (rank of the first returned key that is an exact
  top-1), 0 when none is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._validate import InputError, check_matrix, check_positive_int, to_tensor
from .numerics import TIE_RTOL, reaches, row_scale, score_scale, tie_tolerance

RTOL = TIE_RTOL
ATOL = 0.0


def _ids_tensor(ids, name: str) -> torch.Tensor:
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise InputError(f"{name}: expected integer ids, got dtype {ids.dtype}")
        ids = torch.from_numpy(ids.astype(np.int64))
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point:
        raise InputError(f"{name}: expected an integer tensor or array")
    if ids.dim() == 1:
        ids = ids[:, None]
    if ids.dim() != 2:
        raise InputError(f"{name}: expected [nq, k] ids, got shape {tuple(ids.shape)}")
    return ids.long()


def rescore(queries, keys, ids, *, block: int = 4096) -> torch.Tensor:
    """float64 <q_i, keys[ids[i, j]]> for every returned id ([nq, k]; -inf where id < 0)."""
    q = check_matrix(to_tensor(queries, "queries"), "queries")
    kk = check_matrix(to_tensor(keys, "keys"), "keys", dim=q.shape[1])
    ids = _ids_tensor(ids, "ids").cpu()
    if ids.shape[0] != q.shape[0]:
        raise InputError(f"ids: {ids.shape[0]} rows for {q.shape[0]} queries")
    if ids.numel() and int(ids.max()) >= kk.shape[0]:
        raise InputError(f"ids: id {int(ids.max())} out of range for {kk.shape[0]} keys")
    q, kk = q.cpu(), kk.cpu()
    out = torch.empty(ids.shape, dtype=torch.float64)
    for a in range(0, q.shape[0], block):
        b = min(q.shape[0], a + block)
        sel = ids[a:b]
        vecs = kk[sel.clamp(min=0)].double()
        s = torch.einsum("qd,qkd->qk", q[a:b].double(), vecs)
        out[a:b] = torch.where(sel >= 0, s, torch.full_like(s, float("-inf")))
    return out


def _tol(t: torch.Tensor, scale, rtol: float, atol: float) -> torch.Tensor:
    """Per-query tie tolerance [nq]: relative to ``scale`` (default: the row's largest
    |exact score|)."""
    if scale is None:
        scale = row_scale(t)
    else:
        scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
        if scale.shape[0] != t.shape[0]:
            raise InputError(f"scale: {scale.shape[0]} values for {t.shape[0]} queries")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise InputError("scale: expected finite values >= 0 (||q|| * max ||k|| per query)")
    return tie_tolerance(scale, rtol=rtol, atol=atol)


def _pair(found_scores, true_scores) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.as_tensor(found_scores).double()
    t = torch.as_tensor(true_scores).double()
    if f.dim() == 1:
        f = f[:, None]
    if t.dim() == 1:
        t = t[:, None]
    if f.dim() != 2 or t.dim() != 2 or f.shape[0] != t.shape[0]:
        raise InputError(
            f"scores: found {tuple(f.shape)} and true {tuple(t.shape)} must be [nq, k] with the same nq"
        )
    if f.shape[0] == 0:
        raise InputError("scores: no queries")
    return f, t


def match_at_1(found_scores, true_scores, *, rtol: float = RTOL, atol: float = ATOL,
               scale=None) -> float:
    """Fraction of queries whose returned top-1 scores as an exact top-1 (tie-aware;
    ``scale`` [nq]: what the tolerance is relative to, see the module docstring)."""
    f, t = _pair(found_scores, true_scores)
    return float(reaches(f[:, 0], t[:, 0], _tol(t, scale, rtol, atol)).double().mean())


def recall_at_k(found_scores, true_scores, k: int, *, rtol: float = RTOL, atol: float = ATOL,
                scale=None) -> float:
    """Tie-aware recall@k: returned keys scoring at least the exact k-th score, over k."""
    k = check_positive_int(k, "k")
    f, t = _pair(found_scores, true_scores)
    if t.shape[1] < k:
        raise InputError(f"true_scores: need the exact top-{k}, got top-{t.shape[1]}")
    kth = t[:, k - 1 : k]
    good = reaches(f[:, :k], kth, _tol(t, scale, rtol, atol)).sum(1).clamp(max=k)
    return float((good.double() / k).mean())


def mrr(found_scores, true_scores, *, rtol: float = RTOL, atol: float = ATOL, scale=None) -> float:
    """Mean reciprocal rank of the first returned exact top-1 (0 when absent)."""
    f, t = _pair(found_scores, true_scores)
    hit = reaches(f, t[:, :1], _tol(t, scale, rtol, atol))
    ranks = torch.arange(1, f.shape[1] + 1, dtype=torch.float64)
    first = torch.where(hit, ranks[None, :], torch.full_like(f, float("inf"))).min(1).values
    return float((1.0 / first).mean())


@dataclass
class GroundTruth:
    """Exact top-k of every query: float64 scores [nq, k] (best first) and ids [nq, k];
    ``scale`` [nq] fp64: ``||q|| * max ||k||``, what tie tolerances are relative to (None:
    the largest |score| of each row)."""

    scores: torch.Tensor
    ids: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    @classmethod
    def compute(cls, queries, keys, k: int = 10) -> GroundTruth:
        """Exact top-k with :func:`amips.labels.exact_topk`, scores recomputed in float64."""
        from .labels import exact_topk

        k = check_positive_int(k, "k")
        q = check_matrix(to_tensor(queries, "queries"), "queries")
        kk = check_matrix(to_tensor(keys, "keys"), "keys", dim=q.shape[1])
        # only the ids are used (the scores are recomputed below): float64 never refuses
        _, ids = exact_topk(q, kk, min(k, kk.shape[0]), score_dtype="float64")
        ids = ids.cpu().long()
        scores = rescore(q, kk, ids)
        # the labels are exact in their own arithmetic; order by the fp64 scores
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        return cls(scores.gather(1, order), ids.gather(1, order), score_scale(q.cpu(), kk.cpu()))


def evaluate_results(queries, keys, found_ids, gt: GroundTruth, *, k: int = 10) -> dict:
    """match@1, recall@k and MRR of ``found_ids`` [nq, >=1] against ``gt``."""
    found = rescore(queries, keys, found_ids)
    scale = gt.scale
    out = {"match_at_1": match_at_1(found, gt.scores, scale=scale), "mrr": mrr(found, gt.scores, scale=scale)}
    if found.shape[1] >= k and gt.k >= k:
        out[f"recall_at_{k}"] = recall_at_k(found, gt.scores, k, scale=scale)
    return out
