"""Key sources, screened candidate sets, and their certification and fp64 refinement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validate import (
    InputError,
    check_matrix,
)

MAX_TOPK = 128
# Per query (or query-list pair), at most max(CANDIDATE_CAP, 4k) screened candidates are
# kept; a query with more goes down the certification cascade (fp32 re-screen, then a full
# fp64 scan). This bounds the padded [batch, width] candidate arrays.
CANDIDATE_CAP = 64


def _cap(k: int) -> int:
    return max(CANDIDATE_CAP, 4 * k)


# ----------------------------------------------------------------------------------------
# Key sources: in-memory tensors or (memory-mapped) numpy arrays, read shard by shard.
# ----------------------------------------------------------------------------------------
class KeySource:
    """Rows of a key matrix, read in shards as fp32 on a device (checked for NaN/inf)."""

    def __init__(self, keys: Any, name: str = "keys"):
        self.name = name
        if isinstance(keys, torch.Tensor):
            check_matrix(keys, name, finite=False)
            self._tensor = keys
            self._array = None
        elif isinstance(keys, np.ndarray):
            if keys.dtype.kind not in "fiu":
                raise InputError(f"{name}: expected a numeric array, got dtype {keys.dtype}")
            if keys.ndim != 2:
                raise InputError(f"{name}: expected a 2-D array [n, d], got shape {keys.shape}")
            if keys.shape[0] == 0 or keys.shape[1] == 0:
                raise InputError(f"{name}: is empty (shape {keys.shape})")
            self._tensor = None
            self._array = keys
        else:
            raise InputError(
                f"{name}: expected a numpy array or a torch tensor, got {type(keys).__name__}"
            )
        self.n, self.d = (int(x) for x in (keys.shape[0], keys.shape[1]))

    @property
    def device(self) -> torch.device:
        return self._tensor.device if self._tensor is not None else torch.device("cpu")

    def shard(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        if self._tensor is not None:
            block = self._tensor[start:stop].to(device=device, dtype=torch.float32)
        else:
            rows = self._array[start:stop]
            if rows.dtype == np.float32 and rows.flags.c_contiguous and rows.flags.writeable:
                block = torch.from_numpy(rows)  # in-memory fp32: no copy
            else:
                block = torch.from_numpy(np.array(rows, dtype=np.float32, order="C"))
            block = block.to(device)
        return block.contiguous()

    def rows64(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """fp64 rows for the (sorted, unique) key indices ``index``."""
        if self._tensor is not None:
            return self._tensor[index.to(self._tensor.device)].to(device=device, dtype=torch.float64)
        rows = self._array[index.cpu().numpy()]
        return torch.from_numpy(np.asarray(rows, dtype=np.float64)).to(device)


# ----------------------------------------------------------------------------------------
# Candidate sets and their certification.
# ----------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """Screened candidates per row (a query, or a query-partition pair).

    scores: [..., W] fp32 screened scores (-inf padding); index: [..., W] int64 key ids (-1);
    err: [..., W] fp64 error bounds (0); upper: [...] fp64, every key not among the
    candidates has an exact score <= upper (-inf when no key was left out).
    """

    scores: torch.Tensor
    index: torch.Tensor
    err: torch.Tensor
    upper: torch.Tensor

    def to(self, device) -> Candidates:
        return Candidates(*(t.to(device) for t in (self.scores, self.index, self.err, self.upper)))

    def state(self) -> dict[str, torch.Tensor]:
        return {"scores": self.scores, "index": self.index, "err": self.err, "upper": self.upper}


def _kth_lower_bound(c: Candidates, k: int) -> torch.Tensor:
    lower = c.scores.double() - c.err
    lower = lower.masked_fill(c.index < 0, -math.inf)
    if lower.shape[-1] < k:
        return torch.full(lower.shape[:-1], -math.inf, dtype=torch.float64, device=lower.device)
    return torch.topk(lower, k, dim=-1).values[..., k - 1]


def _compact(c: Candidates, keep: torch.Tensor) -> Candidates:
    """Drop entries where ``keep`` is false; rows keep (score desc) order, width shrinks."""
    scores = c.scores.masked_fill(~keep, -math.inf)
    index = c.index.masked_fill(~keep, -1)
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    width = max(width, 1)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :width]
    return Candidates(
        scores.gather(-1, order),
        index.gather(-1, order),
        c.err.masked_fill(~keep, 0.0).gather(-1, order),
        c.upper,
    )


def _prune(c: Candidates, k: int) -> Candidates:
    """Drop candidates that cannot be in the top-k; enforce the per-row cap."""
    cap = _cap(k)
    valid = c.index >= 0
    lb = _kth_lower_bound(c, k)
    hi = c.scores.double() + c.err
    keep = valid & (hi >= lb[..., None])
    dropped = (valid & ~keep)
    upper = torch.maximum(c.upper, hi.masked_fill(~dropped, -math.inf).amax(-1) if hi.shape[-1] else c.upper)
    out = _compact(Candidates(c.scores, c.index, c.err, upper), keep)
    if out.scores.shape[-1] > cap:
        evicted = out.index[..., cap:] >= 0
        ev_hi = (out.scores[..., cap:].double() + out.err[..., cap:]).masked_fill(~evicted, -math.inf)
        upper = torch.maximum(out.upper, ev_hi.amax(-1))
        out = Candidates(out.scores[..., :cap], out.index[..., :cap], out.err[..., :cap], upper)
    return out


def _merge(a: Candidates | None, b: Candidates, k: int) -> Candidates:
    if a is None:
        return _prune(b, k)
    return _prune(
        Candidates(
            torch.cat([a.scores, b.scores], -1),
            torch.cat([a.index, b.index], -1),
            torch.cat([a.err, b.err], -1),
            torch.maximum(a.upper, b.upper),
        ),
        k,
    )


def _exact_scores(
    queries64: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, keys: KeySource
) -> torch.Tensor:
    """fp64 <queries64[rows], keys[index]> for candidate pairs, in chunks."""
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=queries64.device)
    if rows.numel() == 0:
        return out
    uniq, inverse = torch.unique(index, return_inverse=True)
    key_rows = keys.rows64(uniq, queries64.device)
    chunk = 4096  # pairs per step: two [chunk, d] fp64 gathers stay small
    for a in range(0, rows.shape[0], chunk):
        b = min(a + chunk, rows.shape[0])
        out[a:b] = (queries64[rows[a:b]] * key_rows[inverse[a:b]]).sum(-1)
    return out


def _rank_exact(scores64: torch.Tensor, index: torch.Tensor, k: int):
    """Top-k of rows by (exact score desc, index asc); pads (-inf, -1) stay last."""
    big = torch.iinfo(torch.int64).max
    order = torch.argsort(index.masked_fill(index < 0, big), dim=-1, stable=True)
    scores64 = scores64.gather(-1, order)
    index = index.gather(-1, order)
    order = torch.argsort(scores64, dim=-1, descending=True, stable=True)[..., :k]
    return scores64.gather(-1, order), index.gather(-1, order)


def _certify_and_refine(
    c: Candidates, k: int, queries64: torch.Tensor, keys: KeySource
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-k from candidates. Returns (scores64 [..., k], index [..., k], certified [...]).

    Leading dims of ``c`` are [B] or [B, P]; ``queries64`` is [B, d].
    """
    lb = _kth_lower_bound(c, k)
    certified = (c.upper < lb) | torch.isneginf(c.upper)
    hi = c.scores.double() + c.err
    member = (c.index >= 0) & (hi >= lb[..., None]) & certified[..., None]
    flat_member = member.reshape(member.shape[0], -1)
    rows, cols = torch.nonzero(flat_member, as_tuple=True)
    index_flat = c.index.reshape(c.index.shape[0], -1)
    exact = torch.full(flat_member.shape, -math.inf, dtype=torch.float64, device=c.scores.device)
    exact[rows, cols] = _exact_scores(queries64, rows, index_flat[rows, cols], keys)
    exact = exact.reshape(member.shape)
    idx = c.index.masked_fill(~member, -1)
    if idx.shape[-1] < k:
        pad = k - idx.shape[-1]
        exact = torch.nn.functional.pad(exact, (0, pad), value=-math.inf)
        idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
    s, i = _rank_exact(exact, idx, k)
    return s, i, certified


