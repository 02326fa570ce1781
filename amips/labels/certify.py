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
from ..numerics import RANGE_LOG2, range_exponent, unscale_rows  # noqa: F401 (re-exported)

MAX_TOPK = 128
# Per query (or query-list pair), at most max(CANDIDATE_CAP, 4k) screened candidates are
# kept; a query with more goes down the certification cascade (fp32 re-screen, then a full
# fp64 scan). This bounds the padded [batch, width] candidate arrays.
CANDIDATE_CAP = 64


def _cap(k: int) -> int:
    return max(CANDIDATE_CAP, 4 * k)


# ----------------------------------------------------------------------------------------
# Range: the screen runs in fp32/bf16, whose range is 2^-149 .. 2^128. Finite inputs of any
# magnitude are brought into it by exact power-of-two scalings (a per-query scale and one
# key scale), which change no ranking; scores are scaled back in fp64 at the end.
# ----------------------------------------------------------------------------------------
# Vectors whose largest |element| lies in [2^-RANGE_LOG2, 2^RANGE_LOG2] are used as they
# are (the common case: bit-identical to an unscaled run); others are scaled to [0.5, 1).
# In the scaled domain |q_i k_i| <= 2^60 and sums <= d 2^60 < 2^84: no fp32 overflow.
# (RANGE_LOG2 and range_exponent live in amips.numerics, shared with search)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# dtypes whose conversion to fp32 is exact (others add the conversion term of range_slack)
_EXACT_IN_FP32 = {"float32", "float16", "bfloat16", "int8", "uint8", "int16", "uint16", "bool"}


def range_slack(qn: torch.Tensor, key_norm: torch.Tensor, d: int, lossy: bool) -> torch.Tensor:
    """Extra error of a screened score beyond the kernel bound ``c ||q|| ||k||``, per query.

    The kernel bound (``screening_error_bound``) assumes the fp32 operands ARE the inputs and
    that no product underflows. Two terms make it hold for any finite input:
    - conversion of fp64 (or wide-integer) inputs, or of scaled inputs, to fp32: relative
      error u = 2^-24 per operand, so ``|<q,k> - <q32,k32>| <= (2u + u^2) ||q|| ||k||``
      (added when ``lossy``);
    - gradual underflow: a product or an operand below 2^-126 (fp32) or in bf16's subnormal
      range loses at most 2^-134 absolutely, so at most ``2^-130 (sqrt(d)(||q|| + ||k||) + d)``
      over a dot product.
    """
    qn = qn.double()
    k = key_norm.double().to(qn.device)
    # the bound's own range assumption: after scaling, norms stay far inside fp32 (<= 2^84)
    if not (bool((qn <= 2.0**100).all()) and float(k) <= 2.0**100):
        raise RuntimeError(
            "labels: norms beyond 2^100 reached the fp32 screen unscaled; the certification "
            "bound does not hold there (a bug in the range scaling: please report it)"
        )
    slack = 2.0**-130 * (math.sqrt(d) * (qn + k) + d)
    if lossy:
        slack = slack + 2.0**-23 * (1 + 2.0**-16) * qn * k
    return slack


def scale_queries(block, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 screen copy, exact fp64 copy, per-row exponent e) of a query block: each row
    is multiplied by 2^-e (exact), e = 0 for rows already in the safe range."""
    q64 = (block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block)))
    q64 = q64.to(device=device, dtype=torch.float64)
    m = q64.abs().amax(1) if q64.shape[1] else torch.zeros(q64.shape[0], dtype=torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise InputError("queries: contains NaN or inf values")
    outside = (m > 2.0**RANGE_LOG2) | ((m < 2.0**-RANGE_LOG2) & (m > 0))
    e = torch.zeros(q64.shape[0], dtype=torch.int64, device=device)
    if bool(outside.any()):
        e = torch.where(outside, torch.frexp(m).exponent.long(), e)
        q64 = q64 * torch.pow(2.0, -e.double())[:, None]  # exact: powers of two
    return q64.float(), q64, e


def unscale_scores(s64: torch.Tensor, e: torch.Tensor | None, name: str = "scores",
                   score_dtype=torch.float32) -> torch.Tensor:
    """Exact fp64 scores of the scaled problem -> scores of the original one in
    ``score_dtype`` (float32, the default, or float64).

    Raises InputError when an exact score cannot be held by ``score_dtype``: beyond its
    range, or a row whose largest nonzero |score| is below its smallest normal number (fp32:
    1.2e-38, where 0.0 or a few-bit subnormal would stand for an exact score). The ranking
    is exact either way; only the scores' storage is refused.
    """
    return unscale_rows(s64, e, score_dtype, what=f"the exact {name}", names="queries, keys")


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
        self.scale_log2 = 0  # keys are read as keys * 2^-scale_log2 (see fit_range)
        self.lossy = str(keys.dtype).replace("torch.", "") not in _EXACT_IN_FP32

    def max_abs(self, chunk: int = 65536) -> float:
        best = 0.0
        for a in range(0, self.n, chunk):
            if self._tensor is not None:
                block = self._tensor[a : a + chunk].to(torch.float64)
                value = float(block.abs().amax()) if block.numel() else 0.0
            else:
                block = np.asarray(self._array[a : a + chunk], dtype=np.float64)
                value = float(np.abs(block).max()) if block.size else 0.0
            if not math.isfinite(value):
                raise InputError(f"{self.name}: contains NaN or inf values (rows {a}..{min(a + chunk, self.n) - 1})")
            best = max(best, value)
        return best

    def fit_range(self) -> None:
        """Check the keys (NaN/inf) and choose the power-of-two scale that keeps every fp32
        product in range (0, i.e. none, for keys with max |element| in [2^-30, 2^30])."""
        self.scale_log2 = range_exponent(self.max_abs())
        if self.scale_log2:
            self.lossy = True  # fp32 copies of scaled keys may round (subnormals)

    @property
    def device(self) -> torch.device:
        return self._tensor.device if self._tensor is not None else torch.device("cpu")

    def shard64(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows ``start:stop`` in fp64, scaled (exact), for the fp64 fallback scans."""
        if self._tensor is not None:
            block = self._tensor[start:stop].to(device=device, dtype=torch.float64)
        else:
            block = torch.from_numpy(np.array(self._array[start:stop], dtype=np.float64)).to(device)
        if self.scale_log2:
            block = block * 2.0**-self.scale_log2
        return block.contiguous()

    def shard(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        if self.scale_log2:
            return self.shard64(start, stop, device).float().contiguous()
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
            rows = self._tensor[index.to(self._tensor.device)].to(device=device, dtype=torch.float64)
        else:
            rows = self._array[index.cpu().numpy()]
            rows = torch.from_numpy(np.asarray(rows, dtype=np.float64)).to(device)
        return rows * 2.0**-self.scale_log2 if self.scale_log2 else rows


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


