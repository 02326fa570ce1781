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
from ..kernels.mips_topk import mips_top1, mips_topk, screening_error_bound
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
    grouped: dict | None = None  # keys grouped by partition, for the kernel (built once)

    def keys_as(self, operand: str) -> torch.Tensor:
        """The shard's keys in a screening operand's dtype, converted once per shard."""
        if operand != "bf16":
            return self.keys
        if self.keys_bf16 is None:
            self.keys_bf16 = self.keys.to(torch.bfloat16)
        return self.keys_bf16


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


# A key kept by the top-1 kernel's window is within 2E + delta of its segment's best
# screened score, delta = _DELTA ||q|| max||k|| absorbing the fp32 rounding of the window.
_DELTA = 1e-6


def _top1_window(q: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(qn fp64 [B], window fp32 [B]) with window >= (2c + _DELTA) * qn after rounding."""
    qn = torch.linalg.vector_norm(q.double(), dim=1) * (1 + 1e-5)
    window = ((2 * c + _DELTA) * qn * (1 + 1e-6)).float()
    return qn, window


def _up32(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> the smallest fp32 values not below ``x``."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def _window_candidates(res, scale_err: torch.Tensor, scale_delta: torch.Tensor, start: int,
                       remap: torch.Tensor | None = None):
    """(scores, index, err, best, upper) from a mips_top1 result.

    ``scale_err`` / ``scale_delta`` [B, S] are E and delta per (query, segment). Every key not
    returned has exact score <= upper (see mips_top1's guarantee and the module docstring).
    """
    near_i = res.near_index.masked_fill(res.near_index == res.index[..., None], -1)
    idx = torch.cat([res.index[..., None], near_i], -1)
    s = torch.cat([res.score[..., None], res.near_score.masked_fill(near_i < 0, -math.inf)], -1)
    if remap is not None:
        idx = torch.where(idx >= 0, remap[idx.clamp_min(0)], idx)
    idx = torch.where(idx >= 0, idx + start, idx)
    best = res.score.double()
    # keys outside the window: exact < best - E - delta/2; keys that fell out: <= lost + E
    upper = torch.maximum(best - scale_err - scale_delta / 2, res.lost.double() + scale_err)
    err = scale_err[..., None].expand_as(s).masked_fill(idx < 0, 0.0)
    return s, idx, err, upper


def _screen_top1(q: torch.Tensor, shard: _Shard, precision: str) -> Candidates:
    """Top-1 screen with the fused kernel: each split's best key and the keys in its window."""
    operand, bound_precision = _kernel_precision(q, precision)
    c = screening_error_bound(q.shape[1], bound_precision)
    qn, window = _top1_window(q, c)
    kn = shard.norms.max()
    q_op = q.to(torch.bfloat16) if operand == "bf16" else q
    res = mips_top1(q_op, shard.keys_as(operand), window=window, segment_scale=_up32(kn.reshape(1)),
                    near=8, precision="ieee" if operand == "bf16" else operand)
    n_split = res.score.shape[1]
    e = (c * qn * kn)[:, None].expand(-1, n_split)
    s, idx, err, upper = _window_candidates(res, e, (_DELTA * qn * kn)[:, None].expand(-1, n_split), shard.start)
    b = q.shape[0]
    upper = upper.amax(1)
    return Candidates(s.reshape(b, -1).float(), idx.reshape(b, -1), err.reshape(b, -1), upper)


class _matmul_flags:
    """cuBLAS in the precision the bound assumes: tf32 only when asked; no reduced-precision
    (16-bit) split-K reductions, so a bf16 product is fp32-accumulated and rounded once."""

    def __init__(self, tf32: bool):
        self.tf32 = tf32

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self.saved = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction)
        m.allow_tf32 = self.tf32
        m.allow_bf16_reduced_precision_reduction = False

    def __exit__(self, *exc):
        m = torch.backends.cuda.matmul
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = self.saved


def _cuda_topk(q: torch.Tensor, shard: _Shard, kp: int, precision: str):
    """Screened top-kp on CUDA: chunked cuBLAS products + torch.topk. Returns (s, i, bound)."""
    operand = {"fp32": "ieee", "tf32": "tf32", "bf16": "bf16"}[precision]
    keys = shard.keys_as(operand)
    q_op = q.to(keys.dtype)
    n = keys.shape[0]
    kp_eff = min(kp, n)
    chunk = max(kp_eff, min(n, (1 << 28) // max(1, q.shape[0])))  # <= 2**28 scores per product
    best_s = best_i = None
    with _matmul_flags(operand == "tf32"):
        for a in range(0, n, chunk):
            blk = q_op @ keys[a : a + chunk].T
            v, j = torch.topk(blk, min(kp_eff, blk.shape[1]), dim=1)
            v, j = v.float(), j + a
            if best_s is not None:
                v, pos = torch.topk(torch.cat([best_s, v], 1), kp_eff, dim=1)
                j = torch.cat([best_i, j], 1).gather(1, pos)
            best_s, best_i = v, j
    if kp_eff < kp:
        best_s = torch.nn.functional.pad(best_s, (0, kp - kp_eff), value=-math.inf)
        best_i = torch.nn.functional.pad(best_i, (0, kp - kp_eff), value=-1)
    bound = screening_error_bound(q.shape[1], precision if precision != "bf16" else "bf16",
                                  bf16_output=precision == "bf16")
    return best_s, best_i, bound


def _screen_topk(q: torch.Tensor, shard: _Shard, kp: int, precision: str) -> Candidates:
    """Screened top-kp over a whole shard (kernel on GPU, faiss/torch fp32 on CPU)."""
    d = q.shape[1]
    if q.is_cuda:
        s, i, c = _cuda_topk(q, shard, kp, precision)
    else:
        if _use_kernel(q):  # forced Triton on CPU (interpreter): the reference top-k
            s, i = mips_topk(q, shard.keys, kp)
            s, i = s[:, 0], i[:, 0]
        else:
            s, i = _cpu_fp32_topk(q, shard.keys, kp)
        c = screening_error_bound(d, "fp32")
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
    """Per-partition top-1 screen with the fused kernel: Candidates of shape [B, P, 1 + 4].

    Each (query, partition) keeps its best screened key and the keys inside its window;
    ``kp`` is unused (kept for callers of the old top-kp screen).
    """
    operand, bound_precision = _kernel_precision(q, precision)
    if shard.grouped is None or shard.grouped["n"] != n_partitions:
        order = torch.argsort(part_ids, stable=True)
        counts = torch.bincount(part_ids, minlength=n_partitions)
        offsets = torch.zeros(n_partitions + 1, dtype=torch.int64, device=part_ids.device)
        offsets[1:] = torch.cumsum(counts, 0)
        seg_norm = torch.zeros(n_partitions, dtype=torch.float64, device=part_ids.device)
        seg_norm.scatter_reduce_(0, part_ids, shard.norms, reduce="amax")
        shard.grouped = {"n": n_partitions, "order": order, "offsets": offsets, "seg_norm": seg_norm,
                         "keys": {}}
    g = shard.grouped
    if operand not in g["keys"]:  # grouped and converted once per shard
        g["keys"][operand] = shard.keys_as(operand)[g["order"]].contiguous()
    c = screening_error_bound(q.shape[1], bound_precision)
    qn, window = _top1_window(q, c)
    q_op = q.to(torch.bfloat16) if operand == "bf16" else q
    res = mips_top1(q_op, g["keys"][operand], g["offsets"], window=window, segment_scale=_up32(g["seg_norm"]),
                    near=4, precision="ieee" if operand == "bf16" else operand)
    e = c * qn[:, None] * g["seg_norm"][None, :]
    s, idx, err, upper = _window_candidates(res, e, _DELTA * qn[:, None] * g["seg_norm"][None, :],
                                            shard.start, remap=g["order"])
    return Candidates(s.float(), idx, err, upper)
