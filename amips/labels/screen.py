"""Screening engines: (query batch, key shard) -> certified-ready candidates."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .._validate import (
    InputError,
    all_finite,
)
from ..kernels.mips_topk import mips_topk, mips_topk_ref, screening_error_bound
from .certify import Candidates, KeySource, _cap

# CPU bf16 screen tiles: 1024 queries x 4096 keys keep a score tile in cache
_CPU_BLOCK_KEYS = 4096
_CPU_TILE_QUERIES = 1024


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


