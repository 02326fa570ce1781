"""Magnitude-safe numerics shared by search, labels and metrics.

Two ideas, used by every caller:

- **Exact power-of-two range scaling.** fp32 holds 2^-149 .. 2^128; inputs of any finite
  magnitude are brought into a safe band by multiplying rows by powers of two, which is
  exact (no rounding, as long as nothing leaves fp32's normal range) and changes no ranking.
  Vectors whose largest |element| lies in [2^-RANGE_LOG2, 2^RANGE_LOG2] are used as they are
  (the common case costs one max per row); others are scaled to [0.5, 1). Inside the band
  every product of two elements lies within 2^-60 .. 2^60 and a d-term sum below d 2^60, so
  fp32 neither overflows nor underflows where it matters. Scores are scaled back in fp64 and
  returned in the requested dtype, or refused by name when that dtype cannot hold them
  (:func:`unscale_rows`), never silently 0 or inf.
- **Ties within rounding, relative to the scores' scale.** Two scores of one query tie when
  they differ by at most ``rtol * scale``, ``scale`` being what fp32 rounding is relative to:
  ``||q|| * max_j ||k_j||`` (the Cauchy-Schwarz bound on every score of the query), or, when
  only scores are known, the largest |score| of the row. A fixed absolute tolerance is wrong
  at small magnitudes (every key ties) and at large ones (none does); see
  :func:`tie_tolerance`.
"""

from __future__ import annotations

import math

import torch

from ._validate import InputError

RANGE_LOG2 = 30
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # 2^-126, smallest normal
# scores within TIE_RTOL * scale of each other are not separated by fp32 arithmetic: a few
# dozen ulps of the scale (fp32 dot products of moderate d round to ~sqrt(d) * 2^-24 * scale)
TIE_RTOL = 1e-6
SCORE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------------------
# range scaling
# ----------------------------------------------------------------------------------------
def range_exponent(max_abs: float) -> int:
    """0 when ``max_abs`` is in the safe band (or 0), else e with max_abs * 2^-e in [0.5, 1)."""
    if max_abs == 0.0 or 2.0**-RANGE_LOG2 <= max_abs <= 2.0**RANGE_LOG2:
        return 0
    return math.frexp(max_abs)[1]


def row_exponents(x: torch.Tensor) -> torch.Tensor | None:
    """Per-row exponents (int64 [n]) that bring every row of ``x`` into the safe band, or
    None when every row already is (the common case: one abs-max per row, no copy)."""
    if x.numel() == 0:
        return None
    m = x.abs().amax(1)
    lo, hi = torch.aminmax(m)  # the common case in two scalars (a search's per-call cost)
    if 2.0**-RANGE_LOG2 <= float(lo) and float(hi) <= 2.0**RANGE_LOG2:
        return None
    outside = (m > 2.0**RANGE_LOG2) | ((m < 2.0**-RANGE_LOG2) & (m > 0))
    if not bool(outside.any()):
        return None
    # frexp of the fp64 max: exact for subnormal fp32 rows too
    e = torch.frexp(m.double()).exponent.long()
    return torch.where(outside, e, torch.zeros_like(e))


def scale_rows(x: torch.Tensor, e: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """``x * 2^-e`` per row, in ``dtype`` (computed in fp64: exact for fp32/fp16/bf16 inputs)."""
    if e is None:
        return x.to(dtype)
    return (x.double() * torch.pow(2.0, -e.double().to(x.device))[:, None]).to(dtype)


def check_score_dtype(score_dtype) -> torch.dtype:
    """'float32' | 'float64' | torch.float32 | torch.float64 -> the torch dtype."""
    if isinstance(score_dtype, torch.dtype) and score_dtype in SCORE_DTYPES.values():
        return score_dtype
    name = str(score_dtype).replace("torch.", "")
    if name not in SCORE_DTYPES:
        raise InputError(f"score_dtype: expected 'float32' or 'float64', got {score_dtype!r}")
    return SCORE_DTYPES[name]


def unrepresentable_rows(out64: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(overflow, underflow) masks [rows] of fp64 scores ``out64`` [rows, ...] in ``dtype``.

    Overflow: a finite score beyond the dtype's largest value. Underflow: a row whose largest
    finite |score| is nonzero but below the dtype's smallest normal number, where the dtype
    keeps fewer bits than the scores need (smaller scores of a row whose largest is normal
    round, at worst, to an ulp of that row's scale: the arithmetic's own rounding)."""
    info = torch.finfo(dtype)
    fin = torch.isfinite(out64)
    mag = torch.where(fin, out64.abs(), torch.zeros_like(out64))
    if mag.dim() > 1:
        mag = mag.flatten(1).amax(1)
    over = mag > info.max
    under = (mag > 0) & (mag < info.tiny)
    return over, under


def unscale_rows(scores: torch.Tensor, e: torch.Tensor | None, score_dtype=torch.float32, *,
                 what: str = "scores", names: str = "queries, keys") -> torch.Tensor:
    """Scores of a problem scaled by ``2^-e`` per row -> scores of the original problem.

    ``scores`` [rows, ...] (any float dtype), ``e`` [rows] int64 (None: unscaled). The scaling
    back is exact in fp64; the result is returned in ``score_dtype``, or an InputError names
    ``names`` and ``score_dtype`` when that dtype cannot hold it (see
    :func:`unrepresentable_rows`). -inf padding stays -inf.
    """
    dtype = check_score_dtype(score_dtype)
    if e is None or not bool((e != 0).any()):
        if scores.dtype == dtype:
            out64 = None
        else:
            out64 = scores.double()
    else:
        shape = [-1] + [1] * (scores.dim() - 1)
        out64 = scores.double() * torch.pow(2.0, e.double().to(scores.device)).view(shape)
    if out64 is None:
        return scores
    over, under = unrepresentable_rows(out64, dtype)
    beyond64 = torch.isfinite(scores) & ~torch.isfinite(out64)  # past even fp64's range
    if bool(beyond64.any()):
        over = over | (beyond64.flatten(1).any(1) if beyond64.dim() > 1 else beyond64)
    if bool(over.any()) or bool(under.any()):
        fin = torch.isfinite(out64)
        mags = out64.abs()[fin]
        mags = mags[mags > 0]
        kind = "overflow" if bool(over.any()) else "underflow"
        if not mags.numel():
            peak = math.inf
        else:
            peak = float(mags.max()) if kind == "overflow" else float(mags[mags < torch.finfo(dtype).tiny].max())
        limit = (f"|score| <= {torch.finfo(dtype).max:.3g}" if kind == "overflow"
                 else f"|score| >= {torch.finfo(dtype).tiny:.3g}")
        hint = (" (in Python, score_dtype='float64' returns them exactly)" if dtype == torch.float32
                else "")
        shift = -math.frexp(peak)[1] if math.isfinite(peak) and peak > 0 else -64
        raise InputError(
            f"{names}: {what} {kind} {str(dtype).replace('torch.', '')} (they reach {peak:.3g}, "
            f"{limit}); scale the queries or the keys by a power of two (e.g. keys * "
            f"2**{shift}), which changes no ranking{hint}"
        )
    return out64.to(dtype)


# ----------------------------------------------------------------------------------------
# ties within rounding
# ----------------------------------------------------------------------------------------
def score_scale(queries: torch.Tensor, keys: torch.Tensor, *, block: int = 65536) -> torch.Tensor:
    """``||q_i|| * max_j ||k_j||`` per query, fp64 [nq]: the scale fp32 score rounding is
    relative to (an upper bound on every |<q_i, k_j>|)."""
    qn = torch.linalg.vector_norm(queries.double(), dim=1)
    kmax = 0.0
    for a in range(0, keys.shape[0], block):
        kmax = max(kmax, float(torch.linalg.vector_norm(keys[a : a + block].double(), dim=1).max()))
    return qn.cpu() * kmax


def row_scale(scores: torch.Tensor) -> torch.Tensor:
    """Largest finite |score| of every row (fp64 [rows]): the scale when only scores are known."""
    s = torch.as_tensor(scores).double()
    if s.dim() == 1:
        s = s[:, None]
    mag = torch.where(torch.isfinite(s), s.abs(), torch.zeros_like(s))
    return mag.amax(1) if s.shape[1] else torch.zeros(s.shape[0], dtype=torch.float64)


def tie_tolerance(scale: torch.Tensor, *, rtol: float = TIE_RTOL, atol: float = 0.0) -> torch.Tensor:
    """How far apart two scores of a row may be and still tie: ``atol + rtol * scale``."""
    return atol + rtol * torch.as_tensor(scale, dtype=torch.float64)


def reaches(found: torch.Tensor, best: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """``found >= best - tol`` (tie-aware "as good as"), broadcasting ``tol`` [rows] over rows."""
    tol = torch.as_tensor(tol, dtype=torch.float64)
    while tol.dim() < found.dim():
        tol = tol[..., None]
    return found >= best - tol
