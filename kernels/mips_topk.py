"""Fused MIPS screening: query x key products with a running top-KP per key segment.

Maths
-----
For queries ``Q [nq, d]`` and keys ``K [nk, d]`` the kernel computes, for every query ``i``
and every key *segment* ``s`` (a contiguous key range ``offsets[s]:offsets[s+1]``), the
``KP`` largest scores ``<q_i, k_j>`` over ``j`` in the segment and their key indices. The
``nq x nk`` score matrix is never written to memory: each program owns ``BLOCK_M`` queries
and one segment, walks the segment in tiles of ``BLOCK_N`` keys, computes the tile's scores
with ``tl.dot`` (fp32 accumulation) and merges them into a ``[BLOCK_M, KP]`` running set.

Segments serve two uses: equal splits of the key range (parallelism over keys for top-k;
the launcher merges the splits) and IVF partitions (keys grouped by list: the best key of
every list, one pass over the keys).

Tie rule: among equal scores the lowest key index wins, inside a tile (the lowest column is
extracted first) and across tiles (a later, higher-index key must be strictly greater to
displace an entry; the entry displaced is the smallest, the highest index among equals).

Precision and the screening bound
---------------------------------
``precision`` selects the dot's input precision: ``"ieee"`` (exact fp32 products, fp32
accumulation on FMA units, round to nearest), ``"tf32"`` or ``"bf16"`` (inputs rounded,
tensor cores, fp32 accumulation). For any summation order, with ``u`` the input rounding
unit and ``gamma_n(v) = n v / (1 - n v)``, the computed score ``s~`` obeys

    |s~ - <q, k>| <= ((1 + u)^2 (1 + gamma) - 1) * sum_i |q_i k_i|
                 <= c(d, precision) * ||q|| * ||k||            (Cauchy-Schwarz)

with ``u = 0`` (ieee), ``2^-10`` (tf32, truncation allowed), ``2^-8`` (bf16), and the
accumulation term ``gamma``:

- round-to-nearest fp32 accumulation (``ieee`` on FMA units, CPU BLAS): ``gamma_d(2^-24)``;
- tensor-core accumulation (``tf32``, ``bf16``, fp16, on any path: the fused kernel or
  cuBLAS): ``gamma_2d(2^-23)``. Tensor cores may truncate instead of rounding (unit 2^-23,
  one ulp), and an MMA adds a k-block of b products to the accumulator at once, aligning
  every addend to the largest and truncating each: per block at most b + 1 truncations of
  one unit of the largest term plus the final normalisation, so at most 2d units over d
  products for any b >= 1.

When the result itself is stored in bf16 (the CPU bf16 screen, cuBLAS bf16 output) one
more factor ``(1 + 2^-8)`` applies. ``operands_exact`` drops ``u`` for callers whose
inputs already are in the operand type. :func:`screening_error_bound` returns ``c``,
inflated by 1e-3 relative for the arithmetic of the bound itself. ``amips.labels`` uses it
to *certify* screened results: a key whose screened score plus its bound falls below the
best lower bound cannot be the answer; the remaining candidates are re-scored in fp64, and
a query whose candidate set overflows falls back to a full fp64 scan.

Shapes and dtypes: queries and keys fp32 (fp16/bf16 inputs are upcast by the caller),
contiguous rows; ``offsets`` int64 ``[n_segments + 1]``. Outputs: scores fp32
``[nq, n_segments, KP]`` (``-inf`` where a segment has fewer than KP keys) and indices int64
(``-1`` there), each row's KP entries unsorted.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

from ._backend import launch_or_fallback, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None
    tl = None

PRECISIONS = ("ieee", "tf32", "bf16")
KERNELS = ("tiled", "flat")
_U_IN = {"ieee": 0.0, "fp32": 0.0, "fp64": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-8}
_INT32_MAX = 2**31 - 1


# Precisions that run on tensor cores: fp32 accumulation may truncate (see the module doc).
TENSOR_CORE_PRECISIONS = ("tf32", "bf16")


def accumulation_error_bound(d: int, precision: str) -> float:
    """``gamma`` of the module doc: the fp32 accumulation's share of the screening bound."""
    if precision not in _U_IN:
        raise ValueError(f"precision: expected one of {sorted(_U_IN)}, got {precision!r}")
    if precision == "fp64":
        n, unit = d, 2.0**-53
    elif precision in TENSOR_CORE_PRECISIONS:
        n, unit = 2 * d, 2.0**-23  # truncating, block-aligned accumulation
    else:
        n, unit = d, 2.0**-24  # round to nearest, one addition per product
    if n * unit >= 0.5:
        raise ValueError(f"d: {d} is too large for an fp32 error bound")
    return n * unit / (1 - n * unit)


def screening_error_bound(d: int, precision: str, *, bf16_output: bool = False,
                          operands_exact: bool = False) -> float:
    """Constant ``c`` with ``|s~ - <q,k>| <= c ||q|| ||k||`` for a screened score (see module doc).

    ``operands_exact``: the inputs already are in the operand type (bf16 data screened in
    bf16, say), so no input rounding enters."""
    gamma = accumulation_error_bound(d, precision)
    if precision == "fp64":
        return gamma * (1 + 1e-3)
    u = 0.0 if operands_exact else _U_IN[precision]
    c = (1 + u) ** 2 * (1 + gamma) - 1
    if bf16_output:
        c = (1 + c) * (1 + 2.0**-8) - 1
    return c * (1 + 1e-3)


if triton is not None:

    @triton.jit
    def _mips_top1_kernel(
        q_ptr,
        k_ptr,
        offsets_ptr,
        window_ptr,
        scale_ptr,
        best_s_ptr,
        best_i_ptr,
        near_s_ptr,
        near_i_ptr,
        lost_ptr,
        nq,
        d,
        n_seg,
        stride_qm,
        stride_kn,
        NEAR: tl.constexpr,
        EMIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ONE_CHUNK: tl.constexpr,
        EVEN_D: tl.constexpr,
        ALIGNED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        seg_start = tl.load(offsets_ptr + pid_s).to(tl.int32)
        seg_end = tl.load(offsets_ptr + pid_s + 1).to(tl.int32)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < nq
        n_range = tl.arange(0, BLOCK_N)
        d_range = tl.arange(0, BLOCK_D)
        slots = tl.arange(0, NEAR)
        # window of this (row, segment): keys screened below best - window are not kept
        win = tl.load(window_ptr + rows, mask=row_mask, other=0.0) * tl.load(scale_ptr + pid_s)
        out_row = rows.to(tl.int64) * n_seg + pid_s  # flat (row, segment) index

        # Loads are unmasked: rows past nq and keys past the segment's end are clamped to
        # the last valid one (their scores are discarded), so no mask tensors stay live.
        # 64-bit scalar bases, 32-bit offsets inside a tile.
        q_rows = tl.minimum(rows, nq - 1) - pid_m * BLOCK_M
        q_base = q_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_qm
        q_off = q_rows[:, None] * stride_qm + d_range[None, :]

        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_i = tl.full((BLOCK_M,), -1, tl.int32)
        lost = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        near = tl.full((BLOCK_M, NEAR), float("-inf"), tl.float32)

        if ONE_CHUNK:  # the whole query row fits one chunk: load it once
            if EVEN_D:
                q_ptrs = q_base + q_off
                if ALIGNED:
                    q_ptrs = tl.max_contiguous(tl.multiple_of(q_ptrs, [16, 16]), [1, BLOCK_D])
                q_once = tl.load(q_ptrs)
            else:
                q_once = tl.load(q_base + q_off, mask=(d_range < d)[None, :], other=0.0)
        for t in range(0, tl.cdiv(seg_end - seg_start, BLOCK_N)):
            n0 = seg_start + t * BLOCK_N
            cols = n0 + n_range
            k_base = k_ptr + n0.to(tl.int64) * stride_kn
            k_off = tl.minimum(n_range, seg_end - 1 - n0)[None, :] * stride_kn + d_range[:, None]
            if ONE_CHUNK:
                if EVEN_D:
                    k_ptrs = k_base + k_off
                    if ALIGNED:
                        k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [BLOCK_D, 1])
                    kt = tl.load(k_ptrs)
                else:
                    kt = tl.load(k_base + k_off, mask=(d_range < d)[:, None], other=0.0)
                scores = tl.dot(q_once, kt, input_precision=PRECISION, out_dtype=tl.float32)
            else:
                scores = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for d0 in range(0, d, BLOCK_D):
                    if EVEN_D:
                        q_ptrs = q_base + d0 + q_off
                        k_ptrs = k_base + d0 + k_off
                        if ALIGNED:  # launcher-checked: 16-byte aligned rows
                            q_ptrs = tl.max_contiguous(tl.multiple_of(q_ptrs, [16, 16]), [1, BLOCK_D])
                            k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [BLOCK_D, 1])
                        q = tl.load(q_ptrs)
                        kt = tl.load(k_ptrs)
                    else:
                        q = tl.load(q_base + d0 + q_off, mask=(d0 + d_range < d)[None, :], other=0.0)
                        kt = tl.load(k_base + d0 + k_off, mask=(d0 + d_range < d)[:, None], other=0.0)
                    scores = tl.dot(q, kt, scores, input_precision=PRECISION, out_dtype=tl.float32)
            scores = tl.where((cols < seg_end)[None, :], scores, float("-inf"))

            # Epilogue: row max and lowest-index argmax of the tile.
            m = tl.max(scores, axis=1)
            j = tl.min(tl.where(scores == m[:, None], cols[None, :], 2147483647), axis=1)
            upd = m > best  # strict: an earlier (lower-index) key keeps a tie
            best = tl.where(upd, m, best)
            best_i = tl.where(upd, j, best_i)
            thr = best - win
            emit = (m >= thr) & (m > float("-inf")) & row_mask
            # Rare path: the (at most EMIT) best keys of this tile within the window of the
            # running best replace the smallest entry of the row's NEAR-slot window buffer
            # (scores in registers, unsorted; key indices stored straight to memory); what
            # falls out, or a further key of the tile inside the window, raises `lost`.
            # Unrolled and load-free, so the key loop stays software-pipelined.
            if tl.max(emit.to(tl.int32), axis=0) > 0:
                for _e in tl.static_range(EMIT):
                    low = tl.min(near, axis=1)
                    low_slot = tl.min(tl.where(near == low[:, None], slots[None, :], NEAR), axis=1)
                    put = emit & (m > low)
                    lost = tl.maximum(lost, tl.where(emit, tl.minimum(m, low), float("-inf")))
                    near = tl.where(put[:, None] & (slots[None, :] == low_slot[:, None]), m[:, None], near)
                    tl.store(near_i_ptr + out_row * NEAR + low_slot, j, mask=put)
                    scores = tl.where(cols[None, :] == j[:, None], float("-inf"), scores)
                    m = tl.max(scores, axis=1)
                    j = tl.min(tl.where(scores == m[:, None], cols[None, :], 2147483647), axis=1)
                    emit = (m >= thr) & (m > float("-inf")) & row_mask
                lost = tl.maximum(lost, tl.where(emit, m, float("-inf")))

        tl.store(near_s_ptr + out_row[:, None] * NEAR + slots[None, :], near, mask=row_mask[:, None])
        tl.store(best_s_ptr + out_row, best, mask=row_mask)
        tl.store(best_i_ptr + out_row, best_i, mask=row_mask)
        tl.store(lost_ptr + out_row, lost, mask=row_mask)


if triton is not None:

    @triton.jit
    def _top1_tile_epilogue(scores, cols, seg_end, best, best_i, lost, near, win, row_mask, slots,
                            near_i_ptr, out_row, NEAR: tl.constexpr, EMIT: tl.constexpr):
        """Fold one tile's scores into the running best and the window buffer (the rule of
        ``_mips_top1_kernel``'s epilogue)."""
        scores = tl.where((cols < seg_end)[None, :], scores, float("-inf"))
        m = tl.max(scores, axis=1)
        j = tl.min(tl.where(scores == m[:, None], cols[None, :], 2147483647), axis=1)
        upd = m > best  # strict: an earlier (lower-index) key keeps a tie
        best = tl.where(upd, m, best)
        best_i = tl.where(upd, j, best_i)
        thr = best - win
        emit = (m >= thr) & (m > float("-inf")) & row_mask
        if tl.max(emit.to(tl.int32), axis=0) > 0:  # rare: a key inside the window
            for _e in tl.static_range(EMIT):
                low = tl.min(near, axis=1)
                low_slot = tl.min(tl.where(near == low[:, None], slots[None, :], NEAR), axis=1)
                put = emit & (m > low)
                lost = tl.maximum(lost, tl.where(emit, tl.minimum(m, low), float("-inf")))
                near = tl.where(put[:, None] & (slots[None, :] == low_slot[:, None]), m[:, None], near)
                tl.store(near_i_ptr + out_row * NEAR + low_slot, j, mask=put)
                scores = tl.where(cols[None, :] == j[:, None], float("-inf"), scores)
                m = tl.max(scores, axis=1)
                j = tl.min(tl.where(scores == m[:, None], cols[None, :], 2147483647), axis=1)
                emit = (m >= thr) & (m > float("-inf")) & row_mask
            lost = tl.maximum(lost, tl.where(emit, m, float("-inf")))
        return best, best_i, lost, near

    @triton.jit
    def _mips_top1_flat_kernel(
        q_ptr,
        k_ptr,
        offsets_ptr,
        window_ptr,
        scale_ptr,
        best_s_ptr,
        best_i_ptr,
        near_s_ptr,
        near_i_ptr,
        lost_ptr,
        nq,
        d,
        n_seg,
        stride_qm,
        stride_kn,
        NEAR: tl.constexpr,
        EMIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr,
        ALIGNED: tl.constexpr,
        PRECISION: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """``_mips_top1_kernel`` with ONE loop over (key tile, d chunk) pairs, so Triton's
        software pipeliner streams operand loads across key tiles: the next tile's first
        chunks are in flight while this tile's last product and its epilogue run, instead of
        every key tile restarting the pipeline's prologue (the d > one-chunk case)."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        seg_start = tl.load(offsets_ptr + pid_s).to(tl.int32)
        seg_end = tl.load(offsets_ptr + pid_s + 1).to(tl.int32)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < nq
        n_range = tl.arange(0, BLOCK_N)
        d_range = tl.arange(0, BLOCK_D)
        slots = tl.arange(0, NEAR)
        win = tl.load(window_ptr + rows, mask=row_mask, other=0.0) * tl.load(scale_ptr + pid_s)
        out_row = rows.to(tl.int64) * n_seg + pid_s

        q_rows = tl.minimum(rows, nq - 1) - pid_m * BLOCK_M
        q_base = q_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_qm
        q_off = q_rows[:, None] * stride_qm + d_range[None, :]

        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_i = tl.full((BLOCK_M,), -1, tl.int32)
        lost = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        near = tl.full((BLOCK_M, NEAR), float("-inf"), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

        n_chunks = tl.cdiv(d, BLOCK_D)
        n_tiles = tl.cdiv(seg_end - seg_start, BLOCK_N)
        for it in tl.range(0, n_tiles * n_chunks, num_stages=STAGES):
            t = it // n_chunks
            d0 = (it - t * n_chunks) * BLOCK_D
            n0 = seg_start + t * BLOCK_N
            k_base = k_ptr + n0.to(tl.int64) * stride_kn
            k_off = tl.minimum(n_range, seg_end - 1 - n0)[None, :] * stride_kn + d_range[:, None]
            if EVEN_D:
                q_ptrs = q_base + d0 + q_off
                k_ptrs = k_base + d0 + k_off
                if ALIGNED:  # launcher-checked: 16-byte aligned rows
                    q_ptrs = tl.max_contiguous(tl.multiple_of(q_ptrs, [16, 16]), [1, BLOCK_D])
                    k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [BLOCK_D, 1])
                q = tl.load(q_ptrs)
                kt = tl.load(k_ptrs)
            else:
                q = tl.load(q_base + d0 + q_off, mask=(d0 + d_range < d)[None, :], other=0.0)
                kt = tl.load(k_base + d0 + k_off, mask=(d0 + d_range < d)[:, None], other=0.0)
            acc = tl.dot(q, kt, acc, input_precision=PRECISION, out_dtype=tl.float32)
            if d0 + BLOCK_D >= d:  # the tile's last chunk: its epilogue, then a fresh tile
                best, best_i, lost, near = _top1_tile_epilogue(
                    acc, n0 + n_range, seg_end, best, best_i, lost, near, win, row_mask, slots,
                    near_i_ptr, out_row, NEAR, EMIT)
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

        tl.store(near_s_ptr + out_row[:, None] * NEAR + slots[None, :], near, mask=row_mask[:, None])
        tl.store(best_s_ptr + out_row, best, mask=row_mask)
        tl.store(best_i_ptr + out_row, best_i, mask=row_mask)
        tl.store(lost_ptr + out_row, lost, mask=row_mask)


def _check_offsets(offsets: torch.Tensor, n_keys: int) -> None:
    if offsets.dim() != 1 or offsets.numel() < 2 or offsets.dtype != torch.int64:
        raise ValueError("offsets: expected an int64 vector [n_segments + 1]")
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_keys:
        raise ValueError("offsets: must start at 0 and end at the number of keys")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets: must be non-decreasing")


def _check_inputs(queries: torch.Tensor, keys: torch.Tensor, kp: int, offsets: torch.Tensor | None):
    if not isinstance(queries, torch.Tensor) or not isinstance(keys, torch.Tensor):
        raise TypeError("queries, keys: expected torch tensors")
    if queries.dim() != 2:
        raise ValueError(f"queries: expected [nq, d], got shape {tuple(queries.shape)}")
    if keys.dim() != 2:
        raise ValueError(f"keys: expected [nk, d], got shape {tuple(keys.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"keys: dimension mismatch, queries have d = {queries.shape[1]}, keys {keys.shape[1]}"
        )
    if queries.dtype not in (torch.float32, torch.float64) or keys.dtype != queries.dtype:
        raise ValueError(
            f"queries, keys: expected matching fp32 or fp64 tensors, got {queries.dtype}, {keys.dtype}"
        )
    if queries.device != keys.device:
        raise ValueError(f"keys: on {keys.device}, queries on {queries.device}")
    if kp < 1:
        raise ValueError(f"kp: must be >= 1, got {kp}")
    if offsets is not None:
        _check_offsets(offsets, keys.shape[0])


def _merge_sorted_topk(scores: torch.Tensor, index: torch.Tensor, kp: int):
    """Sort candidate rows by (score desc, index asc) and keep the first kp (pads stay last)."""
    order = torch.argsort(index.masked_fill(index < 0, torch.iinfo(torch.int64).max), dim=-1, stable=True)
    scores = scores.gather(-1, order)
    index = index.gather(-1, order)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :kp]
    return scores.gather(-1, order), index.gather(-1, order)


def mips_topk_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    kp: int,
    offsets: torch.Tensor | None = None,
    *,
    block_keys: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: blocked matmul (never the full score matrix) + top-KP per segment.

    Computes in the inputs' dtype (fp32 or fp64). Returns ``[nq, n_segments, KP]`` scores and
    indices, sorted by (score desc, index asc), padded with ``-inf`` / ``-1``.
    """
    _check_inputs(queries, keys, kp, offsets)
    nq, nk = queries.shape[0], keys.shape[0]
    if offsets is None:
        offsets = torch.tensor([0, nk], dtype=torch.int64)
    bounds = offsets.tolist()
    n_seg = len(bounds) - 1
    out_s = torch.full((nq, n_seg, kp), float("-inf"), dtype=queries.dtype, device=queries.device)
    out_i = torch.full((nq, n_seg, kp), -1, dtype=torch.int64, device=queries.device)
    for s in range(n_seg):
        lo, hi = bounds[s], bounds[s + 1]
        best_s = best_i = None
        for a in range(lo, hi, block_keys):
            b = min(a + block_keys, hi)
            scores = queries @ keys[a:b].T
            take = min(kp, b - a)
            # topk does not promise the lowest index among ties: widen by sorting stably.
            order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :take]
            cand_s = scores.gather(1, order)
            cand_i = order + a
            if best_s is not None:
                cand_s = torch.cat([best_s, cand_s], dim=1)
                cand_i = torch.cat([best_i, cand_i], dim=1)
                cand_s, cand_i = _merge_sorted_topk(cand_s, cand_i, kp)
            best_s, best_i = cand_s, cand_i
        if best_s is not None:
            out_s[:, s, : best_s.shape[1]] = best_s
            out_i[:, s, : best_i.shape[1]] = best_i
    return out_s, out_i


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


# Dot operand kinds: 16-bit inputs run on tensor cores with exact products; fp32 inputs run
# as tf32 (tensor cores) or ieee (exact fp32 FMA, no tensor cores).
OPERANDS = ("bf16", "fp16", "tf32", "ieee")
_OPERAND_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "ieee": torch.float32}
_TRITON_TYPE = {"bf16": "bf16", "fp16": "fp16", "tf32": "fp32", "ieee": "fp32"}
# the shared memory a program needs besides its pipelined operand tiles (reductions, epilogue)
_SMEM_SLACK = 16384


def mips_top1_launch_config(nq: int, nk: int, d: int, *, n_segments: int | None = None,
                            operand: str = "bf16", near: int = 8, device,
                            kernel: str = "tiled") -> dict:
    """Block sizes, warps, stages and key splits of :func:`mips_top1` on a CUDA device.

    Pure function of the shapes and ``device`` (a :class:`kernels._audit.DeviceSpec`): the
    launcher and the compile audit call it alike. ``n_segments`` is the number of key
    segments (IVF partitions) when the caller passes ``offsets``; without it the launcher
    splits the key range itself (``splits``) so that small query counts still fill the SMs.

    ``kernel``: ``"tiled"`` (the default: a loop over key tiles, the d chunks inside) or
    ``"flat"`` (one loop over (key tile, d chunk) pairs; docs/kernels.md says why it is not the
    default before a GPU has timed both); with one chunk both are the tile loop.

    Rule: 16-bit operands use 128 x 128 tiles (64 rows when there are at most 64 queries) and
    64-wide d chunks, or one chunk holding the whole query row when d <= 128 (the query tile
    is then loaded once per program); tf32 uses 32-wide chunks (the flat kernel on Hopper
    with 128-row tiles: 32 bf16 / 16 tf32, for its registers); exact ieee fp32 runs on FMA
    units with 64 x 64 tiles and 8 warps. On Ampere (mma.sync, operands in registers) 8
    warps and 64-key tiles always. Stages: as many as fit the device's shared memory, at most 4
    (Hopper) or 3 (Ampere). Splits: enough key ranges that the grid holds >= 2 programs per
    SM, each range at least 4 key tiles.
    """
    if operand not in OPERANDS:
        raise ValueError(f"operand: expected one of {OPERANDS}, got {operand!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if near not in (4, 8, 16):
        raise ValueError(f"near: expected 4, 8 or 16, got {near}")
    elem = 2 if operand in ("bf16", "fp16") else 4
    if operand == "ieee":
        block_m, block_n, warps = 64, 64, 8
        block_d = 16
        one_chunk = False
    else:
        block_m = 128 if nq > 64 else 64
        block_n = 128
        warps = 8 if block_m == 128 else 4
        chunk_cap = 128 if elem == 2 else 32
        if d <= chunk_cap:
            block_d, one_chunk = max(16, _next_pow2(d)), True
        else:
            block_d, one_chunk = (64 if elem == 2 else 32), False
        if kernel == "flat" and not one_chunk and device.arch >= 90 and block_m == 128:
            # the flattened loop keeps every in-flight stage's addresses in registers: with
            # 128 x 128 tiles, 8 KB operand chunks (32 bf16 / 16 tf32 wide) x 4 stages is what
            # fits 255 registers without spilling (64-wide chunks spilled with 4 window slots)
            block_d = 32 if elem == 2 else 16
        if device.arch < 90:
            # mma.sync keeps both operand fragments in registers: 8 warps and 64-key tiles
            # keep the tile and its epilogue spill-free (128-key tiles with the 8-wide
            # window spilled on Triton 3.6)
            warps = 8
            block_n = 64
    max_stages = 4 if device.arch >= 90 else 3
    if operand == "ieee":
        max_stages = 2
    stages = max_stages
    while stages > 1:
        tiles = (block_n * block_d * elem) * stages + block_m * block_d * elem * (1 if one_chunk else stages)
        if tiles + _SMEM_SLACK <= device.max_shared_bytes:
            break
        stages -= 1
    m_blocks = -(-max(nq, 1) // block_m)
    if n_segments is None:
        want = -(-2 * device.sm_count // m_blocks)
        splits = max(1, min(want, nk // (4 * block_n)))
    else:
        splits = None
    if one_chunk:
        kernel = "tiled"  # one chunk: the tile loop already is the one pipelined loop
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "ONE_CHUNK": one_chunk,
            "NEAR": near, "EMIT": 2, "num_warps": warps, "num_stages": stages, "splits": splits,
            "KERNEL": kernel}


_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1}


class Top1(NamedTuple):
    """Screened top-1 per (query, key segment) and the keys kept near it (see mips_top1).

    score, lost: fp32 [nq, S]; index: int64 [nq, S]; near_score fp32 / near_index int64
    [nq, S, NEAR]; offsets: int64 [S + 1], the segments' key ranges.
    """

    score: torch.Tensor
    index: torch.Tensor
    near_score: torch.Tensor
    near_index: torch.Tensor
    lost: torch.Tensor
    offsets: torch.Tensor


def _check_top1_inputs(queries, keys, offsets, window, segment_scale, near):
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: expected fp32, fp16 or bf16, got {t.dtype}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"keys: dimension mismatch, queries have d = {queries.shape[1]}, keys {keys.shape[1]}"
        )
    if queries.dtype != keys.dtype:
        raise ValueError(f"keys: dtype {keys.dtype} differs from the queries' {queries.dtype}")
    if queries.device != keys.device:
        raise ValueError(f"keys: on {keys.device}, queries on {queries.device}")
    if keys.shape[0] >= _INT32_MAX:
        raise ValueError("keys: more than 2**31 - 1 keys in one call; shard them")
    if near not in (4, 8, 16):
        raise ValueError(f"near: expected 4, 8 or 16, got {near}")
    if offsets is not None:
        _check_offsets(offsets, keys.shape[0])
    if window is not None:
        if window.shape != (queries.shape[0],) or bool((window < 0).any()) or not bool(torch.isfinite(window).all()):
            raise ValueError("window: expected finite non-negative values, one per query")
    if segment_scale is not None:
        n_seg = offsets.numel() - 1 if offsets is not None else None
        if segment_scale.dim() != 1 or (n_seg is not None and segment_scale.numel() != n_seg) or (
            n_seg is None and segment_scale.numel() != 1
        ):
            raise ValueError("segment_scale: expected one value per segment (one without offsets)")
        if bool((segment_scale < 0).any()) or not bool(torch.isfinite(segment_scale).all()):
            raise ValueError("segment_scale: expected finite non-negative values")


def mips_top1_ref(queries, keys, offsets=None, *, window=None, segment_scale=None, near: int = 8,
                  splits: int = 1) -> Top1:
    """Torch reference of :func:`mips_top1` (CPU fallback and oracle), fp32 products.

    The best key per (query, segment) with the lowest index among equal scores; ``near``
    holds the ``near`` highest-scoring keys within the window (ties by index), ``lost`` the
    best score of the window's keys that did not fit. Without ``offsets`` the key range is cut
    into ``splits`` equal segments like the kernel's.
    """
    _check_top1_inputs(queries, keys, offsets, window, segment_scale, near)
    nq, nk = queries.shape[0], keys.shape[0]
    dev = queries.device
    if offsets is None:
        offsets = torch.linspace(0, nk, splits + 1, dtype=torch.float64).round().to(torch.int64)
        scale = (segment_scale if segment_scale is not None else torch.ones(1, device=dev)).expand(splits)
    else:
        scale = segment_scale if segment_scale is not None else torch.ones(offsets.numel() - 1, device=dev)
    win = window if window is not None else torch.zeros(nq, device=dev)
    bounds = offsets.tolist()
    n_seg = len(bounds) - 1
    score = torch.full((nq, n_seg), float("-inf"), device=dev)
    index = torch.full((nq, n_seg), -1, dtype=torch.int64, device=dev)
    near_s = torch.full((nq, n_seg, near), float("-inf"), device=dev)
    near_i = torch.full((nq, n_seg, near), -1, dtype=torch.int64, device=dev)
    lost = torch.full((nq, n_seg), float("-inf"), device=dev)
    q32 = queries.float()
    for s in range(n_seg):
        lo, hi = bounds[s], bounds[s + 1]
        if hi == lo:
            continue
        sc = q32 @ keys[lo:hi].float().T
        order = torch.argsort(sc, dim=1, descending=True, stable=True)  # ties: lowest index
        top = sc.gather(1, order)
        score[:, s], index[:, s] = top[:, 0], order[:, 0] + lo
        inside = top >= (top[:, :1] - win[:, None].float() * float(scale[s]))
        w = min(near, hi - lo)
        near_s[:, s, :w] = torch.where(inside[:, :w], top[:, :w], float("-inf"))
        near_i[:, s, :w] = torch.where(inside[:, :w], order[:, :w] + lo, -1)
        if hi - lo > near:
            lost[:, s] = torch.where(inside[:, near], top[:, near], float("-inf"))
    return Top1(score, index, near_s, near_i, lost, offsets.to(dev))


def mips_top1(queries, keys, offsets=None, *, window=None, segment_scale=None, near: int = 8,
              precision: str = "ieee", splits: int | None = None, kernel: str | None = None) -> Top1:
    """Screened top-1 per (query, key segment) on tensor cores, with the keys near it.

    ``queries`` [nq, d] and ``keys`` [nk, d] share a dtype: bf16 or fp16 (tensor-core
    products of the 16-bit values, exact, fp32 accumulation) or fp32 (``precision``
    ``"tf32"`` on tensor cores or ``"ieee"`` exact). Convert the keys once per shard, not per
    call. ``offsets`` (int64 [S + 1]) cuts the keys into segments (IVF partitions); without
    it the launcher splits the key range for parallelism (``Top1.offsets`` says how).

    Guarantee, for each (query i, segment s) with ``w = window[i] * segment_scale[s]``: every
    key of the segment other than ``index`` and ``near_index`` has a screened score below
    ``score - w`` (up to one fp32 rounding of that difference) or at most ``lost``. Callers
    turn that into a certified bound (``amips.labels``).

    ``kernel`` (``"tiled"``: a loop over key tiles with the d chunks inside; ``"flat"``: one
    loop over (key tile, d chunk) pairs) overrides the launch rule's choice, for tests and
    benchmarks; both compute the same result.
    """
    _check_top1_inputs(queries, keys, offsets, window, segment_scale, near)
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision: expected 'ieee' or 'tf32' (16-bit inputs set their own), got {precision!r}")
    if kernel not in (None, *KERNELS):
        raise ValueError(f"kernel: expected one of {KERNELS} or None, got {kernel!r}")
    if not use_triton(queries, keys):
        return mips_top1_ref(queries, keys, offsets, window=window, segment_scale=segment_scale,
                             near=near, splits=splits or 1)
    nq, d = queries.shape
    nk = keys.shape[0]
    dev = queries.device
    operand = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(queries.dtype, precision)
    queries = queries.contiguous()
    keys = keys.contiguous()
    if queries.is_cuda:
        from ._audit import device_spec

        cfg = mips_top1_launch_config(nq, nk, d, n_segments=None if offsets is None else offsets.numel() - 1,
                                      operand=operand, near=near, device=device_spec(dev),
                                      kernel=kernel or "tiled")
    else:
        cfg = dict(_INTERPRETER_CONFIG, ONE_CHUNK=d <= 16, NEAR=near, EMIT=2, splits=1,
                   KERNEL=kernel or "tiled")
    if offsets is None:
        n_split = splits or cfg["splits"]
        offsets = torch.linspace(0, nk, n_split + 1, dtype=torch.float64).round().to(torch.int64)
        scale = (segment_scale.float() if segment_scale is not None else torch.ones(1)).to(dev).expand(n_split)
    else:
        scale = segment_scale.float() if segment_scale is not None else torch.ones(offsets.numel() - 1)
    offsets = offsets.to(dev)
    scale = scale.to(dev).contiguous()
    win = (window.float() if window is not None else torch.zeros(nq)).to(dev).contiguous()
    n_seg = offsets.numel() - 1
    score = torch.empty((nq, n_seg), dtype=torch.float32, device=dev)
    index = torch.empty((nq, n_seg), dtype=torch.int32, device=dev)
    near_s = torch.empty((nq, n_seg, near), dtype=torch.float32, device=dev)
    near_i = torch.empty((nq, n_seg, near), dtype=torch.int32, device=dev)
    lost = torch.empty((nq, n_seg), dtype=torch.float32, device=dev)
    if nq == 0:
        return Top1(score, index.long(), near_s, near_i.long(), lost, offsets)

    # 16-byte aligned bases and rows let the kernel promise vector loads (cp.async pipelining)
    aligned = all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (queries, keys))

    def launch():
        grid = (triton.cdiv(nq, cfg["BLOCK_M"]), n_seg)
        if cfg["KERNEL"] == "flat":
            _mips_top1_flat_kernel[grid](
                queries, keys, offsets, win, scale, score, index, near_s, near_i, lost,
                nq, d, n_seg, queries.stride(0), keys.stride(0),
                NEAR=near, EMIT=cfg["EMIT"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_D=cfg["BLOCK_D"], EVEN_D=d % cfg["BLOCK_D"] == 0, ALIGNED=aligned,
                PRECISION="tf32" if operand != "ieee" else "ieee", STAGES=cfg["num_stages"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        else:
            _mips_top1_kernel[grid](
                queries, keys, offsets, win, scale, score, index, near_s, near_i, lost,
                nq, d, n_seg, queries.stride(0), keys.stride(0),
                NEAR=near, EMIT=cfg["EMIT"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                ONE_CHUNK=cfg["ONE_CHUNK"], EVEN_D=d % cfg["BLOCK_D"] == 0, ALIGNED=aligned, PRECISION="tf32" if operand != "ieee" else "ieee",
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        near_index = torch.where(torch.isneginf(near_s), torch.full_like(near_i, -1), near_i).long()
        return Top1(score, index.long(), near_s, near_index, lost, offsets)

    def fallback():
        return mips_top1_ref(queries, keys, offsets, window=window, segment_scale=scale, near=near)

    return launch_or_fallback("_mips_top1_kernel", launch, fallback)


def top1_merged(result: Top1) -> tuple[torch.Tensor, torch.Tensor]:
    """(score [nq], index [nq]): the best over all segments, lowest index among ties."""
    big = torch.iinfo(torch.int64).max
    idx = result.index.masked_fill(result.index < 0, big)
    s, i = _merge_sorted_topk(result.score, idx, 1)
    i = i.masked_fill(i == big, -1)
    return s[:, 0], i[:, 0]


def mips_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    kp: int,
    offsets: torch.Tensor | None = None,
    *,
    precision: str = "ieee",
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-KP keys per query and per key segment, sorted by (score desc, index asc).

    ``kp == 1`` runs the top-1 kernel (:func:`mips_top1`) on CUDA tensors (or under
    ``TRITON_INTERPRET=1``); ``kp > 1`` runs :func:`mips_topk_ref` (blocked matrix products
    and a sort, on the tensors' device: for top-k, cuBLAS products with a top-k selection
    beat a streaming top-k held in a kernel's registers). Without ``offsets`` the result is
    ``[nq, 1, KP]``; with them ``[nq, n_segments, KP]``.
    """
    _check_inputs(queries, keys, kp, offsets)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if keys.shape[0] >= _INT32_MAX:
        raise ValueError("keys: more than 2**31 - 1 keys in one call; shard them")
    if kp > 1 or queries.dtype == torch.float64 or not use_triton(queries, keys):
        return mips_topk_ref(queries, keys, kp, offsets)
    if precision == "bf16":
        queries, keys = queries.to(torch.bfloat16), keys.to(torch.bfloat16)
        precision = "ieee"
    res = mips_top1(queries, keys, offsets, precision=precision, splits=splits)
    if offsets is None:
        s, i = top1_merged(res)
        return s[:, None, None], i[:, None, None]
    return res.score[..., None], res.index[..., None]


def backend_name(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: what :func:`mips_topk` would run for these tensors."""
    return "triton" if use_triton(*tensors) else "torch"


# --- compile audit: the production shapes, through the launcher's own config rule ---------

_AUDIT_D = (64, 128, 384, 768)
_AUDIT_NQ = (1, 64, 1000, 4096, 65536, 262144)
_AUDIT_NK = 1 << 20  # the labeler's default shard
_AUDIT_PARTITIONS = 1000  # IVF lists of 1M keys


def audit_cases(device) -> list:
    """Every distinct compiled configuration of ``_mips_top1_kernel`` at production shapes.

    Labels at d in {64, 128, 384, 768}, nq from 1 to 262,144, one key shard of 2**20 keys,
    screening operand bf16 (the CUDA default), tf32 and exact ieee fp32 (the certification's
    re-screen), without partitions (near = 8) and with 1,000 partitions (near = 4). Top-k for
    k in {10, 100} screens with cuBLAS products and ``torch.topk`` (no Triton kernel).
    """
    from ._audit import AuditCase, dedupe

    if triton is None:  # pragma: no cover
        return []
    cases = []
    for operand in OPERANDS:
        if operand == "fp16":
            continue  # labels never screen in fp16; same code path as bf16
        for d in _AUDIT_D:
            for nq in _AUDIT_NQ:
                for (n_seg, near), kernel_kind in itertools.product(((None, 8), (_AUDIT_PARTITIONS, 4)), KERNELS):
                    cfg = mips_top1_launch_config(nq, _AUDIT_NK, d, n_segments=n_seg, operand=operand,
                                                  near=near, device=device, kernel=kernel_kind)
                    if cfg["KERNEL"] != kernel_kind:
                        continue  # one chunk: the flat choice is the tile loop itself
                    ty = _TRITON_TYPE[operand]
                    sig = {
                        "q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "offsets_ptr": "*i64", "window_ptr": "*fp32",
                        "scale_ptr": "*fp32", "best_s_ptr": "*fp32", "best_i_ptr": "*i32",
                        "near_s_ptr": "*fp32", "near_i_ptr": "*i32", "lost_ptr": "*fp32",
                        "nq": "i32", "d": "i32", "n_seg": "i32", "stride_qm": "i32", "stride_kn": "i32",
                        "NEAR": "constexpr", "EMIT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                        "BLOCK_D": "constexpr", "ONE_CHUNK": "constexpr", "EVEN_D": "constexpr",
                        "ALIGNED": "constexpr", "PRECISION": "constexpr",
                    }
                    const = {"NEAR": near, "EMIT": cfg["EMIT"], "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                             "BLOCK_D": cfg["BLOCK_D"], "ONE_CHUNK": cfg["ONE_CHUNK"],
                             "EVEN_D": d % cfg["BLOCK_D"] == 0, "ALIGNED": d % 16 == 0,
                             "PRECISION": "ieee" if operand == "ieee" else "tf32"}
                    kernel = _mips_top1_kernel
                    if cfg["KERNEL"] == "flat":
                        kernel = _mips_top1_flat_kernel
                        del sig["ONE_CHUNK"], const["ONE_CHUNK"]
                        sig["STAGES"] = "constexpr"
                        const["STAGES"] = cfg["num_stages"]
                    name = (f"{'flat_' if kernel_kind == 'flat' else ''}{operand}_m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}d{cfg['BLOCK_D']}"
                            f"{'' if d % cfg['BLOCK_D'] == 0 else '_oddd'}{'_once' if cfg['ONE_CHUNK'] else ''}_near{near}_w{cfg['num_warps']}"
                            f"s{cfg['num_stages']}")
                    shapes = f"d={d} nq={nq} " + ("partitions=1000" if n_seg else f"splits={cfg['splits']}")
                    cases.append(AuditCase(kernel, sig, const, cfg["num_warps"], cfg["num_stages"],
                                           name, matrix=True, exact_fp32=operand == "ieee", shapes=shapes))
    return dedupe(cases)


__all__ = [
    "PRECISIONS",
    "OPERANDS",
    "Top1",
    "mips_top1",
    "mips_top1_ref",
    "mips_top1_launch_config",
    "top1_merged",
    "audit_cases",
    "screening_error_bound",
    "accumulation_error_bound",
    "TENSOR_CORE_PRECISIONS",
    "mips_topk",
    "mips_topk_ref",
    "backend_name",
]
