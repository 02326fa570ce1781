"""Certified-exact MIPS labels: top-1, top-k and per-partition top-1 over huge key sets.

Every answer equals an fp64 oracle (ties resolved to the lowest key index). The work is
done in three steps, the same on every device:

1. **Screen** in low precision, fast: the fused Triton kernel on a GPU (tf32/bf16 tensor
   cores, or exact fp32), and on CPU a bf16 matrix multiply with a threshold filter (CPUs
   with bf16 instructions) or faiss/torch fp32. Each screened score ``s~`` of key ``k`` comes
   with a rigorous error bound ``err = c * ||q|| * max ||k||`` (the maximum over the key
   block that produced it; ``c`` from :func:`amips.kernels.mips_topk.screening_error_bound`).
2. **Certify**: with ``LB_k`` the k-th largest lower bound ``s~ - err`` among the kept
   candidates and ``upper`` a bound on the exact score of every key *not* kept, the exact
   top-k lies inside the candidates when ``upper < LB_k``; only candidates with
   ``s~ + err >= LB_k`` can belong to it.
3. **Refine**: those candidates are re-scored in fp64 and ranked (score desc, index asc).
   A query whose candidates could not be certified (``upper >= LB_k``: too many keys within
   the bound) is screened again in exact-product fp32, whose bound is ~d·2^-24 instead of
   ~2^-7; what still fails (masses of tied keys) falls back to a full fp64 scan.

Keys larger than memory are streamed in shards from memory-mapped files; queries in
batches. :func:`run_label_job` is the resumable pipeline behind ``amips labels``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import (
    atomic_save_npy,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    file_fingerprint,
)
from ._validate import (
    InputError,
    all_finite,
    check_int_vector,
    check_matrix,
    check_positive_int,
    to_tensor,
)
from .kernels.mips_topk import mips_topk, mips_topk_ref, screening_error_bound

MAX_TOPK = 128
# Per query (or query-list pair), at most max(CANDIDATE_CAP, 4k) screened candidates are
# kept; a query with more goes down the certification cascade (fp32 re-screen, then a full
# fp64 scan). This bounds the padded [batch, width] candidate arrays.
CANDIDATE_CAP = 64


def _cap(k: int) -> int:
    return max(CANDIDATE_CAP, 4 * k)
_CPU_BLOCK_KEYS = 4096
_CPU_TILE_QUERIES = 1024


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


# ----------------------------------------------------------------------------------------
# Screening engines: (query batch, key shard) -> Candidates with global key ids.
# ----------------------------------------------------------------------------------------
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read(200_000)
    except OSError:
        return False
    return " avx512_bf16" in text or " amx_bf16" in text


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA and on CPUs with bf16 instructions, else fp32.

    Results are exact whatever the screening precision (see the module docstring); the
    precision only moves work between the screen and the certification cascade.
    """
    allowed = ("auto", "fp32", "tf32", "bf16")
    if precision not in allowed:
        raise InputError(f"precision: expected one of {allowed}, got {precision!r}")
    if precision != "auto":
        if precision == "tf32" and device.type != "cuda":
            return "fp32"  # tf32 exists only on NVIDIA tensor cores
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if _cpu_has_bf16() else "fp32"


@dataclass
class _Shard:
    start: int
    keys: torch.Tensor  # fp32 [n, d] on the compute device
    norms: torch.Tensor  # fp64 [n]
    keys_bf16: torch.Tensor | None = None
    block_norm_max: torch.Tensor | None = None  # fp64 [n_blocks] for the CPU bf16 screen


def _load_shard(keys: KeySource, start: int, stop: int, device: torch.device, precision: str) -> _Shard:
    block = keys.shard(start, stop, device)
    # fp32 norms, inflated far beyond their rounding error: they only enter upper bounds.
    # NaN/inf in a row make its norm non-finite, so this pass also checks the keys.
    norms = torch.linalg.vector_norm(block, dim=1).double() * (1 + 1e-5)
    if not bool(torch.isfinite(norms).all()) and not all_finite(block):
        raise InputError(f"{keys.name}: contains NaN or inf values (rows {start}..{stop - 1})")
    shard = _Shard(start, block, norms)
    if device.type == "cpu" and precision == "bf16":
        shard.keys_bf16 = block.to(torch.bfloat16)
        n_blocks = math.ceil(block.shape[0] / _CPU_BLOCK_KEYS)
        pad = n_blocks * _CPU_BLOCK_KEYS - block.shape[0]
        shard.block_norm_max = torch.nn.functional.pad(norms, (0, pad)).view(n_blocks, -1).amax(1)
    return shard


def _use_kernel(q: torch.Tensor) -> bool:
    """The fused kernel screens on GPUs; on CPU only when forced (AMIPS_BACKEND=triton)."""
    return q.is_cuda or os.environ.get("AMIPS_BACKEND", "").lower() == "triton"


def _kernel_precision(q: torch.Tensor, precision: str) -> tuple[str, str]:
    """(kernel input precision, precision of the error bound) for this device."""
    if not q.is_cuda:
        return "ieee", "fp32"  # the interpreter computes exact fp32 products
    return {"fp32": "ieee", "tf32": "tf32", "bf16": "bf16"}[precision], precision


def _screen_topk(q: torch.Tensor, shard: _Shard, kp: int, precision: str) -> Candidates:
    """Screened top-kp over a whole shard (kernel on GPU, faiss/torch fp32 on CPU)."""
    d = q.shape[1]
    if _use_kernel(q):
        kernel_precision, bound_precision = _kernel_precision(q, precision)
        s, i = mips_topk(q, shard.keys, kp, precision=kernel_precision)
        s, i = s[:, 0], i[:, 0]
    else:
        s, i = _cpu_fp32_topk(q, shard.keys, kp)
        bound_precision = "fp32"
    c = screening_error_bound(d, bound_precision)
    qn = torch.linalg.vector_norm(q.double(), dim=1)
    err_row = c * qn * shard.norms.max()
    err = err_row[:, None].expand_as(s).clone()
    full = (i >= 0).all(-1) & (shard.keys.shape[0] > kp)
    upper = torch.where(full, s[:, -1].double() + err_row, torch.full_like(err_row, -math.inf))
    index = torch.where(i >= 0, i + shard.start, i)
    return Candidates(s.float(), index, err.masked_fill(i < 0, 0.0), upper)


def _cpu_fp32_topk(q: torch.Tensor, keys: torch.Tensor, kp: int):
    """fp32 screening on CPU: faiss's blocked sgemm + heaps where available, else torch."""
    kp_eff = min(kp, keys.shape[0])
    try:
        import faiss

        s, i = faiss.knn(q.numpy(), keys.numpy(), kp_eff, metric=faiss.METRIC_INNER_PRODUCT)
        s, i = torch.from_numpy(s), torch.from_numpy(i)
    except ImportError:  # pragma: no cover - faiss is a dependency
        best_s = best_i = None
        for a in range(0, keys.shape[0], 16384):
            blk = q @ keys[a : a + 16384].T
            v, j = torch.topk(blk, min(kp_eff, blk.shape[1]), dim=1)
            j = j + a
            if best_s is not None:
                v, pos = torch.topk(torch.cat([best_s, v], 1), kp_eff, dim=1)
                j = torch.cat([best_i, j], 1).gather(1, pos)
            best_s, best_i = v, j
        s, i = best_s, best_i
    if kp_eff < kp:
        s = torch.nn.functional.pad(s, (0, kp - kp_eff), value=-math.inf)
        i = torch.nn.functional.pad(i, (0, kp - kp_eff), value=-1)
    return s, i


def _at_least(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``scores >= threshold[:, None]`` for a bf16 score tile, without upcasting the tile.

    For a bf16 value ``s``, ``s >= t`` exactly when ``s >= ceil(t)``, ``ceil`` the smallest
    bf16 (or fp32) value not below ``t``. For positive thresholds the comparison then runs on
    the int16 bit patterns: non-negative bf16 values order like their bits, and negative ones
    have the sign bit set (negative as int16), below any positive threshold.
    """
    if bool((threshold > 0).all()):
        t16 = threshold.to(torch.bfloat16)
        t16 = torch.where(t16.double() < threshold, (t16.view(torch.int16) + 1).view(torch.bfloat16), t16)
        return scores.view(torch.int16) >= t16.view(torch.int16)[:, None]
    t32 = threshold.float()
    t32 = torch.where(t32.double() < threshold, torch.nextafter(t32, torch.full_like(t32, math.inf)), t32)
    return scores >= t32[:, None]


def _screen_top1_cpu_bf16(q: torch.Tensor, shard: _Shard) -> Candidates:
    """CPU top-1 screen: bf16 matmul tiles, keep every key within the bound of the best.

    With ``L`` the best certified lower bound so far (max of ``s~ - E_b``), a key of key
    block ``b`` is kept when ``s~ + E_b >= L - delta``, ``delta = 1e-6 ||q|| max||k||``; a
    dropped key's exact score is then below ``L - delta/2`` (the margin absorbs the fp32
    rounding of the threshold), and ``upper`` is that. Tiles of 1024 queries x 4096 keys keep
    the score tile in cache for the max / compare / gather passes.
    """
    d = q.shape[1]
    c = screening_error_bound(d, "bf16", bf16_output=True)
    q_lp = q.to(torch.bfloat16)
    qn = torch.linalg.vector_norm(q, dim=1).double() * (1 + 1e-5)
    delta = 1e-6 * qn * float(shard.block_norm_max.max()) + 1e-30
    best_lower = torch.full((q.shape[0],), -math.inf, dtype=torch.float64)
    rows_l, cols_l, s_l, e_l = [], [], [], []
    raw_candidates = 0
    n_keys = shard.keys.shape[0]
    for t0 in range(0, q.shape[0], _CPU_TILE_QUERIES):
        t1 = min(t0 + _CPU_TILE_QUERIES, q.shape[0])
        q_tile = q_lp[t0:t1]
        lower = best_lower[t0:t1]
        tile_start = len(rows_l)
        for b, a in enumerate(range(0, n_keys, _CPU_BLOCK_KEYS)):
            scores = q_tile @ shard.keys_bf16[a : a + _CPU_BLOCK_KEYS].T
            err = c * qn[t0:t1] * shard.block_norm_max[b]
            if b == 0:  # seed the bound with this block's maxima
                lower = torch.maximum(lower, scores.amax(1).double() - err)
            # Compare against the bound *before* this block: a superset of the keys the
            # updated bound keeps, and the update then needs the maxima of those keys only.
            threshold = lower - err - delta[t0:t1]
            # numpy's flatnonzero is an order of magnitude faster than torch.nonzero on CPU
            flat = torch.from_numpy(np.flatnonzero(_at_least(scores, threshold).numpy()))
            if flat.numel() == 0:
                continue
            r, cols = flat // scores.shape[1], flat % scores.shape[1]
            cand = scores[r, cols].double()
            block_lower = torch.full_like(lower, -math.inf).scatter_reduce_(
                0, r, cand - err[r], reduce="amax"
            )
            lower = torch.maximum(lower, block_lower)
            rows_l.append(r + t0)
            cols_l.append(cols + a)
            s_l.append(cand.float())
            e_l.append(err[r])
        best_lower[t0:t1] = lower
        if len(rows_l) > tile_start:  # keep only what this tile's final bound admits
            r, cl, sc, er = (torch.cat(x[tile_start:]) for x in (rows_l, cols_l, s_l, e_l))
            keep = sc.double() + er >= best_lower[r]
            del rows_l[tile_start:], cols_l[tile_start:], s_l[tile_start:], e_l[tile_start:]
            rows_l.append(r[keep])
            cols_l.append(cl[keep])
            s_l.append(sc[keep])
            e_l.append(er[keep])
            raw_candidates += int(r.numel())
    rows, cols, s, e = torch.cat(rows_l), torch.cat(cols_l), torch.cat(s_l), torch.cat(e_l)
    if os.environ.get("AMIPS_DEBUG_SCREEN"):
        print(f"screen: {raw_candidates / q.shape[0]:.1f} raw, {rows.numel() / q.shape[0]:.1f} kept per query")
    out_s, out_i, out_e, evicted = _pad_groups(rows, q.shape[0], cols + shard.start, s, e, _cap(1))
    return Candidates(out_s, out_i, out_e, torch.maximum(best_lower - delta / 2, evicted))


def _pad_groups(group: torch.Tensor, n_groups: int, index: torch.Tensor, scores: torch.Tensor,
                err: torch.Tensor, cap: int):
    """Scatter flat candidates (group id, key index, score, bound) into padded [G, W] rows.

    A group with more than ``cap`` candidates keeps its ``cap`` best screened scores; the
    returned ``evicted`` [G] is the largest ``score + err`` it dropped (-inf if none), an
    upper bound on the exact score of every evicted key.
    """
    device = group.device
    # order by group, then by screened score descending
    order = torch.argsort(scores.double(), descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    group, index, scores, err = group[order], index[order], scores[order], err[order]
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(group.shape[0], device=device) - starts[group]
    evicted = torch.full((n_groups,), -math.inf, dtype=torch.float64, device=device)
    over = pos >= cap
    if bool(over.any()):
        evicted.scatter_reduce_(0, group[over], scores[over].double() + err[over].double(), reduce="amax")
        keep = ~over
        group, index, scores, err, pos = group[keep], index[keep], scores[keep], err[keep], pos[keep]
    width = max(1, min(cap, int(counts.max()))) if counts.numel() and group.numel() else 1
    out_s = torch.full((n_groups, width), -math.inf, dtype=torch.float32, device=device)
    out_i = torch.full((n_groups, width), -1, dtype=torch.int64, device=device)
    out_e = torch.zeros((n_groups, width), dtype=torch.float64, device=device)
    out_s[group, pos] = scores.float()
    out_i[group, pos] = index
    out_e[group, pos] = err.double()
    return out_s, out_i, out_e, evicted


def _screen_partitions_cpu(
    q: torch.Tensor, shard: _Shard, part_ids: torch.Tensor, n_partitions: int
) -> Candidates:
    """CPU per-partition screen: fp32 matmul blocks, a running max per (query, partition),
    and every key within ``2 E`` of its partition's max kept (``E = c ||q|| max_p ||k||``).

    No sorting: a scatter-max per block, one compare against the per-column threshold, and
    numpy's flatnonzero. A dropped key has ``s~ + E < m - E - delta = LB - delta``, with ``m``
    the partition's screened max and ``LB`` its certified lower bound, so ``upper`` is
    ``LB - delta/2``. Candidates come out as [B, P, W].
    """
    B, P = q.shape[0], n_partitions
    c = screening_error_bound(q.shape[1], "fp32")
    qn = torch.linalg.vector_norm(q, dim=1).double() * (1 + 1e-5)
    seg_norm = torch.zeros(P, dtype=torch.float64)
    seg_norm.scatter_reduce_(0, part_ids, shard.norms, reduce="amax")
    err = c * qn[:, None] * seg_norm[None, :]  # [B, P]
    delta = 1e-6 * qn[:, None] * seg_norm[None, :] + 1e-30
    running = torch.full((B, P), -math.inf, dtype=torch.float32)
    q_rows, cols_l, s_l = [], [], []
    block = 16384
    for a in range(0, shard.keys.shape[0], block):
        scores = q @ shard.keys[a : a + block].T
        seg = part_ids[a : a + block]
        running.scatter_reduce_(1, seg[None, :].expand_as(scores), scores, reduce="amax")
        threshold = (running.double() - 2 * err - delta).float()
        flat = torch.from_numpy(np.flatnonzero((scores >= threshold[:, seg]).numpy()))
        r, col = flat // scores.shape[1], flat % scores.shape[1]
        q_rows.append(r)
        cols_l.append(col + a)
        s_l.append(scores[r, col])
    rows = torch.cat(q_rows)
    cols = torch.cat(cols_l)
    parts = part_ids[cols]
    group = rows * P + parts
    out_s, out_i, out_e, evicted = _pad_groups(group, B * P, cols + shard.start, torch.cat(s_l),
                                               err.reshape(-1)[group], _cap(1))
    width = out_s.shape[1]
    lower = running.double() - err
    upper = torch.where(torch.isneginf(lower), lower, lower - delta / 2)
    upper = torch.maximum(upper, evicted.view(B, P))
    return Candidates(out_s.view(B, P, width), out_i.view(B, P, width),
                      out_e.view(B, P, width), upper)


def _screen_partitions(
    q: torch.Tensor, shard: _Shard, part_ids: torch.Tensor, n_partitions: int, kp: int, precision: str
) -> Candidates:
    """Screened top-kp inside every partition of the shard: Candidates of shape [B, P, kp]."""
    device = q.device
    order = torch.argsort(part_ids, stable=True)
    counts = torch.bincount(part_ids, minlength=n_partitions)
    offsets = torch.zeros(n_partitions + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    grouped = shard.keys[order].contiguous()
    if _use_kernel(q):
        kernel_precision, bound_precision = _kernel_precision(q, precision)
        s, i = mips_topk(q, grouped, kp, offsets, precision=kernel_precision)
    else:
        s, i = mips_topk_ref(q, grouped, kp, offsets.cpu())
        bound_precision = "fp32"
    c = screening_error_bound(q.shape[1], bound_precision)
    seg_norm = torch.zeros(n_partitions, dtype=torch.float64, device=device)
    seg_norm.scatter_reduce_(0, part_ids, shard.norms, reduce="amax")
    qn = torch.linalg.vector_norm(q.double(), dim=1)
    err_bp = c * qn[:, None] * seg_norm[None, :]
    err = err_bp[..., None].expand_as(s).clone().masked_fill(i < 0, 0.0)
    full = (counts > kp)[None, :] & (i[..., -1] >= 0)
    upper = torch.where(full, s[..., -1].double() + err_bp, torch.full_like(err_bp, -math.inf))
    index = torch.where(i >= 0, order[i.clamp_min(0)] + shard.start, i)
    return Candidates(s.float(), index, err, upper)


# ----------------------------------------------------------------------------------------
# One query batch against all key shards.
# ----------------------------------------------------------------------------------------
@dataclass
class LabelSpec:
    topk: int | None = None  # None: top-1 only
    partitions: torch.Tensor | None = None  # int64 [nk] partition id per key
    n_partitions: int = 0
    precision: str = "auto"
    shard_size: int = 1 << 20


def _screen_width(k: int, precision: str) -> int:
    extra = {"fp32": 1, "tf32": 3, "bf16": 7}[precision]
    return k + extra


def _exact_fallback_topk(q64: torch.Tensor, keys: KeySource, k: int, shard_size: int):
    best_s = best_i = None
    for a in range(0, keys.n, shard_size):
        b = min(a + shard_size, keys.n)
        block = keys.shard(a, b, q64.device).double()
        s, i = mips_topk_ref(q64, block, k)
        s, i = s[:, 0], torch.where(i[:, 0] >= 0, i[:, 0] + a, i[:, 0])
        if best_s is not None:
            s, i = _rank_exact(torch.cat([best_s, s], 1), torch.cat([best_i, i], 1), k)
        best_s, best_i = s, i
    return best_s, best_i


def _exact_fallback_partition(q64: torch.Tensor, keys: KeySource, part_ids: torch.Tensor, p: int):
    members = torch.nonzero(part_ids == p).ravel()
    rows = keys.rows64(members, q64.device)
    s = q64 @ rows.T
    best = torch.argmax(s, dim=1)  # argmax returns the first maximum: lowest index
    return s.gather(1, best[:, None])[:, 0], members.to(q64.device)[best]


class BatchLabeler:
    """Labels one query batch: streams the key shards, then certifies and refines."""

    def __init__(self, keys: KeySource, spec: LabelSpec, device: torch.device):
        self.keys = keys
        self.spec = spec
        self.device = device
        self.precision = resolve_precision(spec.precision, device)
        self.n_shards = max(1, math.ceil(keys.n / spec.shard_size))
        self._cached: _Shard | None = None

    def shard(self, j: int) -> _Shard:
        if self._cached is not None and self._cached.start == j * self.spec.shard_size:
            return self._cached
        start = j * self.spec.shard_size
        stop = min(start + self.spec.shard_size, self.keys.n)
        shard = _load_shard(self.keys, start, stop, self.device, self.precision)
        if self.n_shards == 1:
            self._cached = shard
        return shard

    def screen(self, q: torch.Tensor, j: int, state: dict[str, Candidates] | None):
        """Merge shard ``j``'s screened candidates into ``state`` (None at the start)."""
        state = dict(state or {})
        shard = self.shard(j)
        k = self.spec.topk or 1
        if self._needs_top_screen:
            if self.spec.topk is None and not _use_kernel(q) and self.precision == "bf16":
                cand = _screen_top1_cpu_bf16(q, shard)
            else:
                cand = _screen_topk(q, shard, _screen_width(k, self.precision), self.precision)
            state["top"] = _merge(state.get("top"), cand, k)
        if self.spec.partitions is not None:
            ids = self.spec.partitions[shard.start : shard.start + shard.keys.shape[0]].to(q.device)
            if _use_kernel(q):
                kp = _screen_width(1, self.precision)
                part = _screen_partitions(q, shard, ids, self.spec.n_partitions, kp, self.precision)
            else:
                part = _screen_partitions_cpu(q, shard, ids, self.spec.n_partitions)
            state["part"] = _merge(state.get("part"), part, 1)
        return state

    @property
    def _needs_top_screen(self) -> bool:
        # with partitions, the exact top-1 is the best of the lists' exact top-1s
        return self.spec.partitions is None or self.spec.topk is not None

    def finish(self, q: torch.Tensor, state: dict[str, Candidates]) -> tuple[dict[str, np.ndarray], dict]:
        q64 = q.double()
        stats = {"queries": int(q.shape[0]), "rescreened_queries": 0, "fallback_queries": 0}
        out = {}
        if self._needs_top_screen:
            out.update(self._finish_top(q, q64, state["top"], stats))
        if self.spec.partitions is not None:
            ps, pi = self._finish_partitions(q64, state["part"], stats)
            out["partition_score"], out["partition_index"] = ps.float(), pi
            if not self._needs_top_screen:
                # best list first by exact score, then by lowest key index among equal scores
                big = torch.iinfo(torch.int64).max
                s64, i64 = _rank_exact(ps, pi.masked_fill(pi < 0, big), 1)
                out["top1_score"], out["top1_index"] = s64[:, 0].float(), i64[:, 0]
        return {name: t.cpu().numpy() for name, t in out.items()}, stats

    def _finish_top(self, q, q64, cand: Candidates, stats: dict) -> dict[str, torch.Tensor]:
        k = self.spec.topk or 1
        s, i, ok = _certify_and_refine(cand, k, q64, self.keys)
        if not bool(ok.all()) and self.precision != "fp32":
            # cascade: a low-precision screen that could not separate the candidates is
            # repeated in exact-product fp32 (bound ~ d * 2^-24) for those queries only
            bad = torch.nonzero(~ok).ravel()
            stats["rescreened_queries"] = int(bad.numel())
            cand = None
            for j in range(self.n_shards):
                screened = _screen_topk(q[bad], self.shard(j), _screen_width(k, "fp32") + 3, "fp32")
                cand = _merge(cand, screened, k)
            rs, ri, rok = _certify_and_refine(cand, k, q64[bad], self.keys)
            s[bad], i[bad] = rs, ri
            ok[bad] = rok
        if not bool(ok.all()):
            bad = torch.nonzero(~ok).ravel()
            stats["fallback_queries"] = int(bad.numel())
            fs, fi = _exact_fallback_topk(q64[bad], self.keys, k, self.spec.shard_size)
            s[bad], i[bad] = fs, fi
        out = {"top1_score": s[:, 0].float(), "top1_index": i[:, 0]}
        if self.spec.topk is not None:
            out["topk_score"], out["topk_index"] = s.float(), i
        return out

    def _finish_partitions(self, q64, cand: Candidates, stats: dict):
        ps, pi, pok = _certify_and_refine(cand, 1, q64, self.keys)
        ps, pi = ps[..., 0], pi[..., 0]
        stats["fallback_pairs"] = int((~pok).sum())
        if not bool(pok.all()):
            for p in torch.unique(torch.nonzero(~pok)[:, 1]).tolist():
                rows = torch.nonzero(~pok[:, p]).ravel()
                fs, fi = _exact_fallback_partition(q64[rows], self.keys, self.spec.partitions, p)
                ps[rows, p], pi[rows, p] = fs, fi
        return ps, pi


# ----------------------------------------------------------------------------------------
# Python API.
# ----------------------------------------------------------------------------------------
def _prepare(queries, keys):
    q = check_matrix(to_tensor(queries, "queries"), "queries")
    ksrc = KeySource(keys, "keys")
    if ksrc.d != q.shape[1]:
        raise InputError(
            f"keys: dimension mismatch, queries have d = {q.shape[1]}, keys have d = {ksrc.d}"
        )
    if isinstance(keys, torch.Tensor) and keys.device != q.device:
        raise InputError(f"keys: on {keys.device} but queries on {q.device}; move them to one device")
    return q, ksrc


def _as_output(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device)


def _default_batch_size(device: torch.device, n_partitions: int = 0) -> int:
    """Queries per batch: large for throughput, smaller when [batch, lists] state is kept."""
    size = 65536 if device.type == "cuda" else 16384
    if n_partitions:
        size = min(size, max(1024, (1 << 24) // n_partitions))
    return size


def _run_in_memory(q: torch.Tensor, ksrc: KeySource, spec: LabelSpec, batch_size: int | None,
                   device=None):
    device = torch.device(device) if device is not None else q.device
    labeler = BatchLabeler(ksrc, spec, device)
    if batch_size is None:
        batch_size = _default_batch_size(device, spec.n_partitions)
    parts: dict[str, list[np.ndarray]] = {}
    for a in range(0, q.shape[0], batch_size):
        qb = q[a : a + batch_size].to(device=device, dtype=torch.float32).contiguous()
        state = None
        for j in range(labeler.n_shards):
            state = labeler.screen(qb, j, state)
        out, _ = labeler.finish(qb, state)
        for name, arr in out.items():
            parts.setdefault(name, []).append(arr)
    return {name: _as_output(np.concatenate(arrs), q.device) for name, arrs in parts.items()}


def exact_top1(queries, keys, *, precision: str = "auto", batch_size: int | None = None,
               shard_size: int = 1 << 20, device=None):
    """Exact maximum inner product: for each query, the best key's score and index.

    ``queries`` [nq, d] and ``keys`` [nk, d]: numpy arrays (memory maps are streamed in
    shards of ``shard_size`` keys) or torch tensors (fp16/bf16/fp32/fp64; computed in fp32
    and certified in fp64). Ties resolve to the lowest key index. Returns ``(scores fp32
    [nq], indices int64 [nq])`` on the queries' device.
    """
    shard_size = check_positive_int(shard_size, "shard_size")
    q, ksrc = _prepare(queries, keys)
    out = _run_in_memory(q, ksrc, LabelSpec(precision=precision, shard_size=shard_size),
                         batch_size, device)
    return out["top1_score"], out["top1_index"]


def exact_topk(queries, keys, k: int, *, precision: str = "auto", batch_size: int | None = None,
               shard_size: int = 1 << 20, device=None):
    """Exact top-k (k <= 128) by inner product, sorted (score desc, index asc).

    Returns ``(scores fp32 [nq, k], indices int64 [nq, k])``; when ``k`` exceeds the number of
    keys the tail is padded with ``-inf`` / ``-1``.
    """
    k = check_positive_int(k, "k", maximum=MAX_TOPK)
    shard_size = check_positive_int(shard_size, "shard_size")
    q, ksrc = _prepare(queries, keys)
    out = _run_in_memory(q, ksrc, LabelSpec(topk=k, precision=precision, shard_size=shard_size),
                         batch_size, device)
    return out["topk_score"], out["topk_index"]


def partition_top1(queries, keys, partition_ids, n_partitions: int | None = None, *,
                   precision: str = "auto", batch_size: int | None = None,
                   shard_size: int = 1 << 20, device=None):
    """Per-partition exact top-1 (each IVF list's support value and its best key).

    ``partition_ids`` [nk] holds one partition id per key (any order). Returns ``(scores fp32
    [nq, P], indices int64 [nq, P])``; an empty partition gives ``-inf`` and ``-1``.
    """
    q, ksrc = _prepare(queries, keys)
    ids = check_int_vector(partition_ids, "partition_ids", length=ksrc.n)
    max_id = int(ids.max()) + 1
    if n_partitions is None:
        n_partitions = max_id
    n_partitions = check_positive_int(n_partitions, "n_partitions")
    if max_id > n_partitions:
        raise InputError(f"partition_ids: id {max_id - 1} >= n_partitions = {n_partitions}")
    shard_size = check_positive_int(shard_size, "shard_size")
    spec = LabelSpec(partitions=ids, n_partitions=n_partitions, precision=precision,
                     shard_size=shard_size)
    out = _run_in_memory(q, ksrc, spec, batch_size, device)
    return out["partition_score"], out["partition_index"]


# ----------------------------------------------------------------------------------------
# The resumable label job behind `amips labels`.
# ----------------------------------------------------------------------------------------
PARTIAL_DIR = ".amips_labels_partial"
MANIFEST = "labels.json"


OUTPUT_FILES = {
    "top1_index": "top1_index.npy",
    "top1_score": "top1_score.npy",
    "topk_index": "topk_index.npy",
    "topk_score": "topk_score.npy",
    "partition_index": "partition_index.npy",
    "partition_score": "partition_score.npy",
}


def run_label_job(
    keys_path: str | os.PathLike,
    queries_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    partitions_path: str | os.PathLike | None = None,
    topk: int | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    shard_size: int = 1 << 20,
    precision: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Compute labels for files on disk into ``out_dir``; resumable after a kill.

    Each finished query batch is committed atomically to ``out_dir/.amips_labels_partial``
    (and, with several key shards, the running candidates after every shard). Outputs are
    written atomically only when every batch is done; ``labels.json`` is written last.
    Running the same command again after an interruption finishes the job.
    """
    from tqdm.auto import tqdm

    from .data import load_array

    out = Path(out_dir)
    keys_arr = load_array(keys_path, name="keys")
    queries_arr = load_array(queries_path, name="queries")
    for name, arr in (("keys", keys_arr), ("queries", queries_arr)):
        if arr.ndim != 2:
            raise InputError(f"{name}: expected a 2-D array [n, d], got shape {arr.shape}")
        if arr.dtype.kind not in "fiu":
            raise InputError(f"{name}: expected numeric vectors, got dtype {arr.dtype}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise InputError(f"{name}: is empty (shape {arr.shape})")
    if keys_arr.shape[1] != queries_arr.shape[1]:
        raise InputError(
            f"queries: dimension mismatch, keys have d = {keys_arr.shape[1]}, "
            f"queries have d = {queries_arr.shape[1]}"
        )
    if topk is not None:
        topk = check_positive_int(topk, "topk", maximum=MAX_TOPK)
    shard_size = check_positive_int(shard_size, "shard_size")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda requested but no CUDA device is available")
    precision_used = resolve_precision(precision, dev)

    part_ids = None
    n_partitions = 0
    if partitions_path is not None:
        raw = load_array(partitions_path, name="partitions", mmap=False)
        if raw.ndim != 1:
            raise InputError(f"partitions: expected a 1-D array of ids, got shape {raw.shape}")
        part_ids = check_int_vector(np.asarray(raw), "partitions", length=keys_arr.shape[0])
        n_partitions = int(part_ids.max()) + 1
    if batch_size is None:
        batch_size = _default_batch_size(dev, n_partitions)
    batch_size = check_positive_int(batch_size, "batch_size")

    job = {
        "keys": file_fingerprint(keys_path),
        "queries": file_fingerprint(queries_path),
        "partitions": file_fingerprint(partitions_path) if partitions_path else None,
        "topk": topk,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "precision": precision_used,
    }
    manifest_path = out / MANIFEST
    partial = out / PARTIAL_DIR
    if manifest_path.exists() and not partial.exists():
        done = json.loads(manifest_path.read_text())
        if done.get("job") == job and not overwrite:
            if progress:
                print(f"labels in {out} are complete and match this job; nothing to do")
            return done
        if not overwrite:
            raise InputError(
                f"out: {out} already holds labels of a different job; pass --overwrite or use another folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(exist_ok=True)
    job_file = partial / "job.json"
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        if previous != job:
            if not overwrite:
                raise InputError(
                    f"out: {partial} holds partial work of a different job (inputs or options "
                    "changed); pass --overwrite to discard it"
                )
    atomic_write_bytes(job_file, json.dumps(job, indent=2).encode())

    nq = queries_arr.shape[0]
    keys_src = KeySource(keys_arr, "keys")
    spec = LabelSpec(topk=topk, partitions=part_ids, n_partitions=n_partitions,
                     precision=precision_used, shard_size=shard_size)
    labeler = BatchLabeler(keys_src, spec, dev)
    n_batches = math.ceil(nq / batch_size)
    t0 = time.perf_counter()
    stats_total = {"queries": 0, "rescreened_queries": 0, "fallback_queries": 0}
    if part_ids is not None:
        stats_total["fallback_pairs"] = 0
    bar = tqdm(total=n_batches * labeler.n_shards, desc="labels", unit="shard", disable=not progress)
    for b in range(n_batches):
        part_file = partial / f"batch_{b:06d}.npz"
        if part_file.exists():
            with np.load(part_file) as f:
                for key in stats_total:
                    stats_total[key] += int(f[f"stat_{key}"])
            bar.update(labeler.n_shards)
            continue
        a, z = b * batch_size, min((b + 1) * batch_size, nq)
        block = np.array(queries_arr[a:z], dtype=np.float32, order="C")
        if not np.isfinite(block).all():
            raise InputError(f"queries: contains NaN or inf values (rows {a}..{z - 1})")
        q = torch.from_numpy(block).to(dev)
        state_file = partial / f"batch_{b:06d}.state.pt"
        state, first = None, 0
        if state_file.exists():
            saved = torch.load(state_file, map_location=dev, weights_only=True)
            first = int(saved["next_shard"])
            state = {name: Candidates(**saved[name]) for name in ("top", "part") if name in saved}
            bar.update(first)
        for j in range(first, labeler.n_shards):
            state = labeler.screen(q, j, state)
            if labeler.n_shards > 1 and j + 1 < labeler.n_shards:
                blob = {name: c.to("cpu").state() for name, c in state.items()}
                blob["next_shard"] = j + 1
                atomic_torch_save(state_file, blob)
            bar.update(1)
        result, stats = labeler.finish(q, state)
        for key in stats_total:
            stats_total[key] += stats[key]
        payload = {**result, **{f"stat_{k}": np.int64(v) for k, v in stats.items()}}
        atomic_write(part_file, lambda fh, payload=payload: np.savez(fh, **payload))
        if state_file.exists():
            state_file.unlink()
    bar.close()

    # Assemble outputs from the committed batches, each file written atomically.
    names = ["top1_index", "top1_score"]
    if topk is not None:
        names += ["topk_index", "topk_score"]
    if part_ids is not None:
        names += ["partition_index", "partition_score"]
    parts = [np.load(partial / f"batch_{b:06d}.npz") for b in range(n_batches)]
    for name in names:
        arr = np.concatenate([p[name] for p in parts])
        if name.endswith("_index"):
            arr = arr.astype(np.int64)
        else:
            arr = arr.astype(np.float32)
        atomic_save_npy(out / OUTPUT_FILES[name], arr)
    for p in parts:
        p.close()
    elapsed = time.perf_counter() - t0
    manifest = {
        "job": job,
        "outputs": {name: OUTPUT_FILES[name] for name in names},
        "n_queries": int(nq),
        "n_keys": int(keys_arr.shape[0]),
        "d": int(keys_arr.shape[1]),
        "n_partitions": n_partitions or None,
        "device": str(dev),
        "certification": stats_total,
        "seconds_last_run": round(elapsed, 3),
    }
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    shutil.rmtree(partial)
    return manifest
