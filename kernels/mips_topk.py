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
accumulation), ``"tf32"`` or ``"bf16"`` (inputs rounded, tensor cores; fp32 accumulation).
For any summation order, with ``u`` the input rounding unit and ``gamma_d = d*2^-24 /
(1 - d*2^-24)``, the computed score ``s~`` obeys

    |s~ - <q, k>| <= ((1 + u)^2 (1 + gamma_d) - 1) * sum_i |q_i k_i|
                 <= c(d, precision) * ||q|| * ||k||            (Cauchy-Schwarz)

with ``u = 0`` (ieee), ``2^-10`` (tf32, truncation allowed), ``2^-8`` (bf16). When the result
itself is stored in bf16 (the CPU bf16 screen) one more factor ``(1 + 2^-8)`` applies.
:func:`screening_error_bound` returns ``c``, inflated by 1e-3 relative for the arithmetic of
the bound itself. ``amips.labels`` uses it to *certify* screened results: a key whose
screened score plus its bound falls below the best lower bound cannot be the answer; the
remaining candidates are re-scored in fp64, and a query whose candidate set overflows falls
back to a full fp64 scan.

Shapes and dtypes: queries and keys fp32 (fp16/bf16 inputs are upcast by the caller),
contiguous rows; ``offsets`` int64 ``[n_segments + 1]``. Outputs: scores fp32
``[nq, n_segments, KP]`` (``-inf`` where a segment has fewer than KP keys) and indices int64
(``-1`` there), each row's KP entries unsorted.
"""

from __future__ import annotations

import math

import torch

from ._backend import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None
    tl = None

PRECISIONS = ("ieee", "tf32", "bf16")
_U_IN = {"ieee": 0.0, "fp32": 0.0, "fp64": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-8}
_INT32_MAX = 2**31 - 1


def screening_error_bound(d: int, precision: str, *, bf16_output: bool = False) -> float:
    """Constant ``c`` with ``|s~ - <q,k>| <= c ||q|| ||k||`` for a screened score (see module doc)."""
    if precision not in _U_IN:
        raise ValueError(f"precision: expected one of {sorted(_U_IN)}, got {precision!r}")
    if precision == "fp64":
        acc_u = 2.0**-53
        gamma = d * acc_u / (1 - d * acc_u)
        return gamma * (1 + 1e-3)
    acc_u = 2.0**-24
    if d * acc_u >= 0.5:
        raise ValueError(f"d: {d} is too large for an fp32 error bound")
    gamma = d * acc_u / (1 - d * acc_u)
    u = _U_IN[precision]
    c = (1 + u) ** 2 * (1 + gamma) - 1
    if bf16_output:
        c = (1 + c) * (1 + 2.0**-8) - 1
    return c * (1 + 1e-3)


if triton is not None:

    @triton.jit
    def _mips_topk_kernel(
        q_ptr,
        k_ptr,
        offsets_ptr,
        out_s_ptr,
        out_i_ptr,
        nq,
        d,
        stride_qm,
        stride_qd,
        stride_kn,
        stride_kd,
        stride_om,
        stride_os,
        KP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        seg_start = tl.load(offsets_ptr + pid_s)
        seg_end = tl.load(offsets_ptr + pid_s + 1)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < nq
        rows64 = rows.to(tl.int64)
        slot_ids = tl.arange(0, KP)
        d_range = tl.arange(0, BLOCK_D)
        n_range = tl.arange(0, BLOCK_N)

        acc_s = tl.full((BLOCK_M, KP), float("-inf"), tl.float32)
        acc_i = tl.full((BLOCK_M, KP), -1, tl.int64)
        kth = tl.min(acc_s, axis=1)

        for n0 in range(seg_start, seg_end, BLOCK_N):
            cols = n0 + n_range
            col_mask = cols < seg_end
            cols64 = cols.to(tl.int64)
            scores = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, d, BLOCK_D):
                dd = d0 + d_range
                d_mask = dd < d
                q = tl.load(
                    q_ptr + rows64[:, None] * stride_qm + dd[None, :] * stride_qd,
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                kt = tl.load(
                    k_ptr + cols64[None, :] * stride_kn + dd[:, None] * stride_kd,
                    mask=col_mask[None, :] & d_mask[:, None],
                    other=0.0,
                )
                if PRECISION == "bf16":
                    scores = tl.dot(q.to(tl.bfloat16), kt.to(tl.bfloat16), scores)
                else:
                    scores = tl.dot(q, kt, scores, input_precision=PRECISION)
            scores = tl.where(col_mask[None, :], scores, float("-inf"))

            # Merge the tile: extract its best entries in (score desc, index asc) order for
            # as long as some row still has an entry that beats its current KP-th best.
            tile_max = tl.max(scores, axis=1)
            need = (tile_max > kth) & row_mask
            while tl.max(need.to(tl.int32), axis=0) > 0:
                best = tl.max(scores, axis=1)
                best_col = tl.min(
                    tl.where(scores == best[:, None], cols[None, :], 2147483647), axis=1
                )
                take = (best > kth) & row_mask
                # the slot to overwrite: the smallest entry, the highest index among equals
                is_min = acc_s == kth[:, None]
                worst_idx = tl.max(tl.where(is_min, acc_i, -2), axis=1)
                slot = tl.max(
                    tl.where(is_min & (acc_i == worst_idx[:, None]), slot_ids[None, :], -1), axis=1
                )
                write = take[:, None] & (slot_ids[None, :] == slot[:, None])
                acc_s = tl.where(write, best[:, None], acc_s)
                acc_i = tl.where(write, best_col.to(tl.int64)[:, None], acc_i)
                scores = tl.where(cols[None, :] == best_col[:, None], float("-inf"), scores)
                kth = tl.min(acc_s, axis=1)
                need = (tl.max(scores, axis=1) > kth) & row_mask

        out_off = rows64[:, None] * stride_om + pid_s * stride_os + slot_ids[None, :]
        tl.store(out_s_ptr + out_off, acc_s, mask=row_mask[:, None])
        tl.store(out_i_ptr + out_off, acc_i, mask=row_mask[:, None])


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
        if offsets.dim() != 1 or offsets.numel() < 2 or offsets.dtype != torch.int64:
            raise ValueError("offsets: expected an int64 vector [n_segments + 1]")
        if int(offsets[0]) != 0 or int(offsets[-1]) != keys.shape[0]:
            raise ValueError("offsets: must start at 0 and end at the number of keys")
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets: must be non-decreasing")


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

    Runs the Triton kernel on CUDA tensors (or under ``TRITON_INTERPRET=1``), else
    :func:`mips_topk_ref`. Without ``offsets`` the key range is cut into ``splits`` equal
    segments for parallelism and the result merged to ``[nq, 1, KP]``.
    """
    _check_inputs(queries, keys, kp, offsets)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if keys.shape[0] >= _INT32_MAX:
        raise ValueError("keys: more than 2**31 - 1 keys in one call; shard them")
    forced_ref = queries.dtype == torch.float64 or not use_triton(queries, keys)
    if forced_ref:
        return mips_topk_ref(queries, keys, kp, offsets)

    nq, d = queries.shape
    nk = keys.shape[0]
    queries = queries.contiguous()
    keys = keys.contiguous()
    merge = offsets is None
    interpret = not queries.is_cuda
    if merge:
        if splits is None:
            if interpret:
                splits = 1
            else:
                sms = torch.cuda.get_device_properties(queries.device).multi_processor_count
                m_blocks = triton.cdiv(nq, 64)
                splits = max(1, min(triton.cdiv(nk, 1024), triton.cdiv(4 * sms, m_blocks)))
        bounds = torch.linspace(0, nk, splits + 1, dtype=torch.float64).round().to(torch.int64)
        offsets = bounds.to(queries.device)
    else:
        offsets = offsets.to(queries.device)
    n_seg = offsets.numel() - 1
    kp_pow2 = _next_pow2(kp)
    if interpret:
        block_m, block_n, block_d = 16, 16, 16
    else:
        block_m, block_n = 64, 128
        block_d = 64 if d >= 64 else max(16, _next_pow2(d))
    out_s = torch.empty((nq, n_seg, kp_pow2), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((nq, n_seg, kp_pow2), dtype=torch.int64, device=queries.device)
    grid = (triton.cdiv(nq, block_m), n_seg)
    _mips_topk_kernel[grid](
        queries,
        keys,
        offsets,
        out_s,
        out_i,
        nq,
        d,
        queries.stride(0),
        queries.stride(1),
        keys.stride(0),
        keys.stride(1),
        out_s.stride(0),
        out_s.stride(1),
        KP=kp_pow2,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PRECISION=precision,
        num_warps=4 if interpret else 8,
    )
    if merge:
        flat_s = out_s.reshape(nq, 1, n_seg * kp_pow2)
        flat_i = out_i.reshape(nq, 1, n_seg * kp_pow2)
        return _merge_sorted_topk(flat_s, flat_i, kp)
    return _merge_sorted_topk(out_s, out_i, kp)


def backend_name(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: what :func:`mips_topk` would run for these tensors."""
    return "triton" if use_triton(*tensors) else "torch"


__all__ = [
    "PRECISIONS",
    "screening_error_bound",
    "mips_topk",
    "mips_topk_ref",
    "backend_name",
]
