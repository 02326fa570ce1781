"""Exact scan of the probed IVF lists with a running top-k (``ivf_scan``).

Maths
-----
Keys are stored grouped by list: list ``l`` owns rows ``offsets[l] : offsets[l+1]`` of
``keys`` ([n, d]). For query ``q_i`` and its probed lists ``probes[i, :]`` (ordered, ``-1``
entries are skipped), the candidates are the rows of those lists and

    scores[i, :], positions[i, :] = top-k over candidates p of  <q_i, keys[p]>

Shapes and dtypes
-----------------
queries [nq, d] fp32/fp16/bf16, keys [n, d] fp32/fp16/bf16, offsets [L + 1] int64,
probes [nq, nprobe] int64 (``-1`` = no list), k >= 1.
Returns scores [nq, k] fp32 and positions [nq, k] int64 (rows of ``keys``), best first;
where fewer than k candidates exist the tail holds ``-inf`` and ``-1``.
Products are accumulated in fp32 (inputs upcast on load).

Tie rule
--------
Results are ordered by score (descending), ties by position (ascending): among equal
scores the lower row of ``keys`` wins. Both backends follow the rule on their own scores;
the two backends sum in different orders, so scores may differ in the last bits and a
near-tie may resolve differently (compare tie-aware).

Two Triton kernels, chosen by :func:`ivf_scan_launch_config` (a pure rule of the shapes and
the device, shared with the compile audit):

* **batched** (``_ivf_scan_batched_kernel``): the (query, list) pairs of a chunk of queries
  are grouped by list on the device; one program takes one list and up to ``BLOCK_M`` of
  the queries probing it, reads the list's keys once, scores them against those queries
  with a tensor-core product (fp32 accumulation) and writes the scores (and key positions)
  into each query's candidate row; ``torch.topk`` then selects each row's top-k (ties by
  position). Each probed list is read once per chunk, not once per query. Query operands:
  fp16 keys take the query as two fp16 terms (hi + lo, each row scaled by a power of two
  into fp16's range), bf16 keys as three bf16 terms, so every product is exact and the
  scores are as accurate as an fp32 dot product of the query with the stored keys; fp32
  keys use 3xTF32 (``tf32x3``).
* **per query** (``_ivf_scan_kernel``): one program per query walks its probed lists and
  merges them into a ``K_PAD``-slot top-k in registers (replace the worst slot while the
  block's best beats it). No grouping, no candidate buffer and one launch: kept for a
  handful of queries with little to scan, where the batched path's fixed cost (grouping,
  two extra launches) dominates.

The torch reference groups the (query, list) pairs by list like the batched kernel, scores
each list for all its queries with one matrix multiply, and selects the top-k of every
query's candidates in query chunks.
"""

from __future__ import annotations

import torch

from ._backend import launch_or_fallback, use_triton

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is Linux-only
    triton = None
    tl = None

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# Position sentinel for empty slots: larger than any real row, so a real key always wins.
_EMPTY_POS = 2**62

if triton is not None:

    @triton.jit
    def _ivf_scan_kernel(
        q_ptr,
        keys_ptr,
        offsets_ptr,
        probes_ptr,
        out_s_ptr,
        out_p_ptr,
        d,
        nprobe,
        k,
        stride_qm,
        stride_kn,
        stride_pm,
        stride_om,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        K_PAD: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        slots = tl.arange(0, K_PAD)
        neg_inf = float("-inf")
        pos_inf = float("inf")
        top_s = tl.full([K_PAD], neg_inf, tl.float32)
        top_p = tl.full([K_PAD], 4611686018427387904, tl.int64)  # _EMPTY_POS
        live = slots < k
        for p in range(0, nprobe):
            lst = tl.load(probes_ptr + pid * stride_pm + p)
            safe = tl.maximum(lst, 0)
            start = tl.load(offsets_ptr + safe)
            end = tl.load(offsets_ptr + safe + 1)
            end = tl.where(lst >= 0, end, start)
            for n0 in range(start, end, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                rmask = rows < end
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for d0 in range(0, d, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    cmask = cols < d
                    qv = tl.load(q_ptr + pid * stride_qm + cols, mask=cmask, other=0.0)
                    kv = tl.load(
                        keys_ptr + rows[:, None] * stride_kn + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :],
                        other=0.0,
                    )
                    acc += tl.sum(kv.to(tl.float32) * qv.to(tl.float32)[None, :], axis=1)
                cand = tl.where(rmask, acc, neg_inf)
                go = tl.max(cand, axis=0) > neg_inf
                while go:
                    best_s = tl.max(cand, axis=0)
                    best_p = tl.min(tl.where(cand == best_s, rows, 4611686018427387904), axis=0)
                    masked_top = tl.where(live, top_s, pos_inf)
                    worst_s = tl.min(masked_top, axis=0)
                    worst_p = tl.max(tl.where(masked_top == worst_s, top_p, -1), axis=0)
                    better = (best_s > neg_inf) & (
                        (best_s > worst_s) | ((best_s == worst_s) & (best_p < worst_p))
                    )
                    worst_slot = tl.min(
                        tl.where((masked_top == worst_s) & (top_p == worst_p), slots, K_PAD),
                        axis=0,
                    )
                    # a slot id of K_PAD matches nothing: no replacement
                    hit = slots == tl.where(better, worst_slot, K_PAD)
                    top_s = tl.where(hit, best_s, top_s)
                    top_p = tl.where(hit, best_p, top_p)
                    cand = tl.where(rows == best_p, neg_inf, cand)
                    go = better
        # Emit the k slots best first (selection by score desc, position asc).
        taken = slots >= k
        for j in range(0, k):
            avail_s = tl.where(taken, neg_inf, top_s)
            avail_p = tl.where(taken, 4611686018427387904, top_p)
            b_s = tl.max(avail_s, axis=0)
            b_p = tl.min(tl.where((avail_s == b_s) & (~taken), avail_p, 4611686018427387904), axis=0)
            b_slot = tl.min(
                tl.where((avail_s == b_s) & (avail_p == b_p) & (~taken), slots, K_PAD), axis=0
            )
            out_p = tl.where(b_p == 4611686018427387904, -1, b_p)
            tl.store(out_s_ptr + pid * stride_om + j, b_s)
            tl.store(out_p_ptr + pid * stride_om + j, out_p)
            taken = taken | (slots == b_slot)


    @triton.jit
    def _ivf_scan_batched_kernel(
        q_ptr,
        q_scale_ptr,
        keys_ptr,
        offsets_ptr,
        item_list_ptr,
        item_pair0_ptr,
        item_npairs_ptr,
        pair_q_ptr,
        pair_slot_ptr,
        buf_s_ptr,
        buf_p_ptr,
        d,
        stride_qt,
        stride_qm,
        stride_kn,
        stride_bm,
        TERMS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr,
        ALIGNED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        w = tl.program_id(0)
        lst = tl.load(item_list_ptr + w)
        pair0 = tl.load(item_pair0_ptr + w)
        npairs = tl.load(item_npairs_ptr + w)
        start = tl.load(offsets_ptr + lst).to(tl.int32)
        end = tl.load(offsets_ptr + lst + 1).to(tl.int32)

        r = tl.arange(0, BLOCK_M)
        rmask = r < npairs
        # rows past npairs repeat the item's first pair (valid memory; never stored)
        pr = pair0 + tl.where(rmask, r, 0)
        qi = tl.load(pair_q_ptr + pr)
        slot = tl.load(pair_slot_ptr + pr)
        scale = tl.load(q_scale_ptr + qi)
        n_range = tl.arange(0, BLOCK_N)
        d_range = tl.arange(0, BLOCK_D)
        q_off = qi[:, None] * stride_qm + d_range[None, :]  # the launcher keeps a chunk < 2**31 elements
        out_row = qi.to(tl.int64) * stride_bm + slot

        for t in range(0, tl.cdiv(end - start, BLOCK_N)):
            n0 = start + t * BLOCK_N
            k_base = keys_ptr + n0.to(tl.int64) * stride_kn
            k_off = tl.minimum(n_range, end - 1 - n0)[None, :] * stride_kn + d_range[:, None]
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, d, BLOCK_D):
                k_ptrs = k_base + d0 + k_off
                if ALIGNED:  # launcher-checked: 16-byte aligned rows
                    k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [BLOCK_D, 1])
                if EVEN_D:
                    kt = tl.load(k_ptrs)
                else:
                    kt = tl.load(k_ptrs, mask=(d0 + d_range < d)[:, None], other=0.0)
                for term in tl.static_range(TERMS):
                    q_ptrs = q_ptr + (term * stride_qt + d0) + q_off
                    if ALIGNED:
                        q_ptrs = tl.max_contiguous(tl.multiple_of(q_ptrs, [16, 16]), [1, BLOCK_D])
                    if EVEN_D:
                        q = tl.load(q_ptrs)
                    else:
                        q = tl.load(q_ptrs, mask=(d0 + d_range < d)[None, :], other=0.0)
                    acc = tl.dot(q, kt, acc, input_precision=PRECISION, out_dtype=tl.float32)
            # undo the power-of-two row scaling of the query terms (exact)
            acc = acc * scale[:, None]
            cmask = (n0 + n_range) < end
            dst = out_row[:, None] + (t * BLOCK_N + n_range)[None, :]
            smask = rmask[:, None] & cmask[None, :]
            tl.store(buf_s_ptr + dst, acc, mask=smask)
            tl.store(buf_p_ptr + dst, (n0 + n_range)[None, :] + tl.zeros((BLOCK_M, 1), tl.int32), mask=smask)


def _check(queries, keys, offsets, probes, k):
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected fp32/fp16/bf16, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries: dimension {queries.shape[1]} does not match keys' {keys.shape[1]}"
        )
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError("offsets: expected a 1-D int64 tensor of n_lists + 1 entries")
    if probes.dtype != torch.int64 or probes.dim() != 2 or probes.shape[0] != queries.shape[0]:
        raise ValueError(
            f"probes: expected int64 [nq, nprobe] with nq = {queries.shape[0]}, "
            f"got {probes.dtype} {tuple(probes.shape)}"
        )
    if int(k) < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    devices = {queries.device, keys.device, offsets.device, probes.device}
    if len(devices) != 1:
        raise ValueError(f"ivf_scan: tensors are on different devices {sorted(map(str, devices))}")
    n_lists = offsets.numel() - 1
    if probes.numel() and (int(probes.max()) >= n_lists or int(probes.min()) < -1):
        raise ValueError(f"probes: list ids must lie in [-1, {n_lists - 1}]")


def _select_topk(buf_s: torch.Tensor, buf_p: torch.Tensor, k: int, empty: int = _EMPTY_POS):
    """Top-k per row by (score desc, position asc); rows padded with -inf / ``empty``."""
    nq, width = buf_s.shape
    kk = min(k, width)
    vals, idx = torch.topk(buf_s, kk, dim=1)
    pos = buf_p.gather(1, idx)
    # torch.topk breaks ties arbitrarily: rows where the k-th score also occurs outside the
    # selection are redone with a full stable sort on (position, then score).
    kth = vals[:, -1:]
    n_eq_all = (buf_s == kth).sum(1)
    n_eq_sel = (vals == kth).sum(1)
    redo = torch.nonzero(n_eq_all > n_eq_sel).flatten()
    if redo.numel():
        rs, rp = buf_s[redo], buf_p[redo]
        o1 = torch.argsort(rp, dim=1, stable=True)
        rs, rp = rs.gather(1, o1), rp.gather(1, o1)
        o2 = torch.argsort(rs, dim=1, descending=True, stable=True)[:, :kk]
        vals[redo], pos[redo] = rs.gather(1, o2), rp.gather(1, o2)
    # order the selection: position asc, then score desc (stable)
    o1 = torch.argsort(pos, dim=1, stable=True)
    vals, pos = vals.gather(1, o1), pos.gather(1, o1)
    o2 = torch.argsort(vals, dim=1, descending=True, stable=True)
    vals, pos = vals.gather(1, o2), pos.gather(1, o2)
    out_s = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=buf_s.device)
    out_p = torch.full((nq, k), -1, dtype=torch.int64, device=buf_s.device)
    out_s[:, :kk] = vals
    out_p[:, :kk] = torch.where(pos >= empty, torch.full_like(pos, -1), pos)
    return out_s, out_p


def ivf_scan_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
    *,
    max_buffer: int = 1 << 23,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference (CPU fallback and oracle): per-list matrix multiplies, then top-k."""
    nq = queries.shape[0]
    if nq <= 4:
        return _scan_few(queries, keys, offsets, probes, k)
    dev = queries.device
    sizes = offsets[1:] - offsets[:-1]
    valid = probes >= 0
    psize = torch.where(valid, sizes[probes.clamp(min=0)], torch.zeros_like(probes))
    totals = psize.sum(1)
    starts = torch.cumsum(psize, 1) - psize  # offset of each probe slot in a query's buffer
    out_s = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=dev)
    out_p = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
    q32 = queries.float()
    a = 0
    while a < nq:
        # grow the chunk while its padded candidate buffer stays under max_buffer entries
        b = a + 1
        width = int(totals[a])
        step = 256
        while b < nq:
            nb = min(nq, b + step)
            w = max(width, int(totals[b:nb].max()))
            if (nb - a) * max(w, 1) > max_buffer:
                break
            b, width = nb, w
        width = max(width, 1)
        c = b - a
        buf_s = torch.full((c, width), float("-inf"), dtype=torch.float32, device=dev)
        buf_p = torch.full((c, width), _EMPTY_POS, dtype=torch.int64, device=dev)
        pr = probes[a:b]
        flat = pr.reshape(-1)
        keep = torch.nonzero(flat >= 0).flatten()
        if keep.numel():
            lists = flat[keep]
            order = torch.argsort(lists, stable=True)
            keep, lists = keep[order], lists[order]
            uniq, counts = torch.unique_consecutive(lists, return_counts=True)
            bounds = torch.cumsum(counts, 0).tolist()
            lo = 0
            nprobe = pr.shape[1]
            for lst, hi in zip(uniq.tolist(), bounds):
                pairs = keep[lo:hi]
                lo = hi
                s0, s1 = int(offsets[lst]), int(offsets[lst + 1])
                if s1 == s0:
                    continue
                qi = pairs // nprobe
                slot = pairs % nprobe
                block = keys[s0:s1].float()
                scores = q32[a + qi] @ block.T
                cols = starts[a + qi, slot][:, None] + torch.arange(s1 - s0, device=dev)[None, :]
                buf_s[qi[:, None], cols] = scores
                buf_p[qi[:, None], cols] = torch.arange(s0, s1, device=dev)[None, :].expand_as(cols)
        s, p = _select_topk(buf_s, buf_p, k)
        out_s[a:b], out_p[a:b] = s, p
        a = b
    return out_s, out_p


def _scan_few(queries, keys, offsets, probes, k):
    """A handful of queries (one-at-a-time search): gather each query's lists, one product."""
    nq = queries.shape[0]
    dev = queries.device
    out_s = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=dev)
    out_p = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
    off = offsets.tolist()
    for i, row in enumerate(probes.tolist()):
        spans = [(off[lst], off[lst + 1]) for lst in row if lst >= 0 and off[lst + 1] > off[lst]]
        if not spans:
            continue
        block = torch.cat([keys[a:b] for a, b in spans]).float()
        pos = torch.cat([torch.arange(a, b, device=dev) for a, b in spans])
        scores = block @ queries[i].float()
        s, p = _select_topk(scores[None, :], pos[None, :], k)
        out_s[i], out_p[i] = s[0], p[0]
    return out_s, out_p


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# Model behind the per-query / batched choice (not measured: no GPU was available when it
# was written; calibrate with bench/ on a GPU). One program streams about _PER_SM_BYTES_S
# bytes/s of keys; the batched path costs about _BATCHED_FIXED_S seconds of grouping and
# extra launches before it scans anything.
_PER_SM_BYTES_S = 40e9
_BATCHED_FIXED_S = 60e-6
_KEY_DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}
_MAX_BUFFER = 1 << 27  # candidate-buffer entries per chunk (scores fp32 + positions int32: 1 GiB)


def ivf_scan_launch_config(nq: int, nprobe: int, d: int, mean_list: float, k: int, *,
                           key_dtype: str = "fp16", device) -> dict:
    """Which kernel and which blocks :func:`ivf_scan` launches on a CUDA device.

    Pure function of the shapes and ``device`` (a :class:`kernels._audit.DeviceSpec`),
    shared by the launcher and the compile audit. ``mean_list`` is the mean size of the
    probed lists (keys). Rule: the per-query kernel when there are no more queries than SMs
    and one query's scan (``nprobe * mean_list * d`` key bytes at ``_PER_SM_BYTES_S`` on one
    SM) is shorter than the batched path's fixed cost ``_BATCHED_FIXED_S``; otherwise the
    batched kernel (64-query x 64-key tiles on tensor cores, 64-wide d chunks for 16-bit
    keys, 32 for fp32; 8 warps, 3 stages).
    """
    if key_dtype not in _KEY_DTYPES:
        raise ValueError(f"key_dtype: expected one of {sorted(_KEY_DTYPES)}, got {key_dtype!r}")
    elem = _KEY_DTYPES[key_dtype]
    per_query_s = nprobe * mean_list * d * elem / _PER_SM_BYTES_S
    if nq <= device.sm_count and per_query_s < _BATCHED_FIXED_S:
        return _per_query_config(d, k)
    return _batched_config(key_dtype)


def _per_query_config(d: int, k: int) -> dict:
    return {"mode": "per_query", "BLOCK_N": 32, "BLOCK_D": min(32, max(16, _next_pow2(d))),
            "K_PAD": max(16, _next_pow2(k)), "num_warps": 8, "num_stages": 1}


def _batched_config(key_dtype: str) -> dict:
    elem = _KEY_DTYPES[key_dtype]
    terms = {"fp16": 2, "bf16": 3, "fp32": 1}[key_dtype]
    return {"mode": "batched", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64 if elem == 2 else 32,
            "TERMS": terms, "num_warps": 8, "num_stages": 3}


_INTERPRETER_PER_QUERY = {"mode": "per_query", "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
_INTERPRETER_BATCHED = {"mode": "batched", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16,
                        "num_warps": 4, "num_stages": 1}


def _query_terms(queries: torch.Tensor, key_dtype: torch.dtype):
    """(terms [T, nq, d] in the keys' dtype, row scale [nq] fp32) with sum(terms) * scale ~ q.

    fp16: two terms of the query scaled by 2**e per row into fp16's range; bf16: three
    terms; fp32: the query itself. Each product of a term with a stored key is exact in fp32.
    """
    q = queries.float()
    nq = q.shape[0]
    if key_dtype == torch.float32:
        return q[None].contiguous(), torch.ones(nq, device=q.device)
    if key_dtype == torch.float16:
        amax = q.abs().amax(1)
        e = torch.where(amax > 0, 14 - torch.floor(torch.log2(amax.clamp_min(1e-30))), torch.zeros_like(amax))
        e = e.clamp(-100, 100)
        q = q * torch.exp2(e)[:, None]
        n_terms, scale = 2, torch.exp2(-e)
    else:
        n_terms, scale = 3, torch.ones(nq, device=q.device)
    terms = []
    rest = q
    for _ in range(n_terms):
        t = rest.to(key_dtype)
        terms.append(t)
        rest = rest - t.float()
    return torch.stack(terms).contiguous(), scale.float().contiguous()


def _group_pairs(probes: torch.Tensor, sizes: torch.Tensor, block_m: int):
    """Group a chunk's (query, list) pairs by list: work items of up to block_m pairs.

    Returns (item_list, item_pair0, item_npairs, pair_q, pair_slot, width), int32 on the
    probes' device; pair_slot is the pair's first column in its query's candidate row.
    """
    c, nprobe = probes.shape
    valid = probes >= 0
    psize = torch.where(valid, sizes[probes.clamp(min=0)], torch.zeros_like(probes))
    starts = torch.cumsum(psize, 1) - psize
    width = int(psize.sum(1).max()) if c else 0
    flat = probes.reshape(-1)
    keep = torch.nonzero((flat >= 0) & (psize.reshape(-1) > 0)).flatten()
    lists = flat[keep]
    order = torch.argsort(lists, stable=True)
    keep, lists = keep[order], lists[order]
    pair_q = (keep // nprobe).to(torch.int32)
    pair_slot = starts.reshape(-1)[keep].to(torch.int32)
    uniq, counts = torch.unique_consecutive(lists, return_counts=True)
    n_items = (counts + block_m - 1) // block_m
    item_list = torch.repeat_interleave(uniq, n_items)
    first_item = torch.cumsum(n_items, 0) - n_items
    within = torch.arange(item_list.numel(), device=probes.device) - torch.repeat_interleave(first_item, n_items)
    group_start = torch.cumsum(counts, 0) - counts
    item_pair0 = torch.repeat_interleave(group_start, n_items) + within * block_m
    item_np = torch.clamp(torch.repeat_interleave(counts, n_items) - within * block_m, max=block_m)
    return (item_list.to(torch.int32), item_pair0.to(torch.int32), item_np.to(torch.int32),
            pair_q, pair_slot, width)


def _aligned(*tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0 for t in tensors)


def _scan_batched(queries, keys, offsets, probes, k, cfg, max_buffer=_MAX_BUFFER):
    nq, d = queries.shape
    dev = queries.device
    terms, scale = _query_terms(queries, keys.dtype)
    if not keys.is_cuda:  # the interpreter has no fp16/bf16 dot: exact fp32 products of the terms
        terms = terms.float()
        keys = keys.float()
    sizes = offsets[1:] - offsets[:-1]
    psize = torch.where(probes >= 0, sizes[probes.clamp(min=0)], torch.zeros_like(probes))
    max_width = max(1, int(psize.sum(1).max()))
    # int32 offsets inside the kernel: a chunk's query terms and buffer stay below 2**31
    chunk = max(1, min(nq, max_buffer // max_width, (2**31 - 1) // max(1, d)))
    out_s = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=dev)
    out_p = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
    block_d = cfg["BLOCK_D"]
    precision = "tf32x3" if keys.dtype == torch.float32 and keys.is_cuda else "ieee"
    aligned = keys.is_cuda and _aligned(terms[0], keys)
    empty = torch.iinfo(torch.int32).max
    for a in range(0, nq, chunk):
        b = min(nq, a + chunk)
        item_list, item_pair0, item_np, pair_q, pair_slot, width = _group_pairs(probes[a:b], sizes, cfg["BLOCK_M"])
        if width == 0 or item_list.numel() == 0:
            continue
        buf_s = torch.full((b - a, width), float("-inf"), dtype=torch.float32, device=dev)
        buf_p = torch.full((b - a, width), empty, dtype=torch.int32, device=dev)
        q_chunk = terms[:, a:b]
        _ivf_scan_batched_kernel[(item_list.numel(),)](
            q_chunk, scale[a:b], keys, offsets, item_list, item_pair0, item_np, pair_q, pair_slot,
            buf_s, buf_p, d, q_chunk.stride(0), q_chunk.stride(1), keys.stride(0), buf_s.stride(0),
            TERMS=terms.shape[0], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
            EVEN_D=d % block_d == 0, ALIGNED=aligned, PRECISION=precision,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        s, p = _select_topk(buf_s, buf_p, k, empty=empty)
        out_s[a:b], out_p[a:b] = s, p
    return out_s, out_p


def _scan_per_query(queries, keys, offsets, probes, k, cfg):
    nq, d = queries.shape
    out_s = torch.empty((nq, k), dtype=torch.float32, device=queries.device)
    out_p = torch.empty((nq, k), dtype=torch.int64, device=queries.device)
    block_d = cfg.get("BLOCK_D") or min(128, max(16, _next_pow2(d)))
    k_pad = cfg.get("K_PAD") or max(16, _next_pow2(k))
    _ivf_scan_kernel[(nq,)](
        queries, keys, offsets, probes, out_s, out_p, d, probes.shape[1], k,
        queries.stride(0), keys.stride(0), probes.stride(0), out_s.stride(0),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, K_PAD=k_pad,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out_s, out_p


def ivf_scan(
    queries: torch.Tensor,
    keys: torch.Tensor,
    offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
    *,
    mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the probed lists' keys for every query (see the module docstring).

    ``mode`` (``"batched"`` or ``"per_query"``) overrides :func:`ivf_scan_launch_config`'s
    choice, for tests and benchmarks.
    """
    _check(queries, keys, offsets, probes, k)
    k = int(k)
    if mode not in (None, "batched", "per_query"):
        raise ValueError(f"mode: expected 'batched', 'per_query' or None, got {mode!r}")
    if not use_triton(queries, keys, offsets, probes):
        return ivf_scan_ref(queries, keys, offsets, probes, k)
    nq, d = queries.shape
    queries = queries.contiguous()
    keys = keys.contiguous()
    probes = probes.contiguous()
    if nq == 0:
        return (torch.empty((0, k), dtype=torch.float32, device=queries.device),
                torch.empty((0, k), dtype=torch.int64, device=queries.device))
    if queries.is_cuda:
        from ._audit import device_spec

        n_lists = offsets.numel() - 1
        mean_list = float(offsets[-1]) / max(1, n_lists)
        key_dtype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[keys.dtype]
        if mode == "batched":
            cfg = _batched_config(key_dtype)
        elif mode == "per_query":
            cfg = _per_query_config(d, k)
        else:
            cfg = ivf_scan_launch_config(nq, probes.shape[1], d, mean_list, k, key_dtype=key_dtype,
                                         device=device_spec(queries.device))
    else:
        cfg = _INTERPRETER_BATCHED if (mode or "batched") == "batched" else _INTERPRETER_PER_QUERY
    if cfg["mode"] == "batched":
        name = "_ivf_scan_batched_kernel"

        def launch():
            return _scan_batched(queries, keys, offsets, probes, k, cfg)
    else:
        name = "_ivf_scan_kernel"

        def launch():
            return _scan_per_query(queries, keys, offsets, probes, k, cfg)

    return launch_or_fallback(name, launch, lambda: ivf_scan_ref(queries, keys, offsets, probes, k))


# --- compile audit: the production shapes, through the launcher's own config rule ---------

_AUDIT_D = (64, 128, 384, 768)
_AUDIT_NQ = (1, 16, 256, 4096, 65536)
_AUDIT_NPROBE = (1, 8, 32, 64)
_AUDIT_LISTS = (250, 1000, 4000)  # mean list sizes of 1M keys in 4,000 / 1,000 / 250 lists
_AUDIT_K = (1, 10, 100)


def audit_cases(device) -> list:
    """Every distinct compiled configuration of the two list-scan kernels at production
    shapes: 1M keys in 250 to 4,000 lists, nprobe 1 to 64, nq 1 to 65,536, d in {64, 128,
    384, 768}, k in {1, 10, 100}, keys fp16 / bf16 / fp32."""
    from ._audit import AuditCase, dedupe

    if triton is None:  # pragma: no cover
        return []
    cases = []
    for key_dtype in ("fp16", "bf16", "fp32"):
        for d in _AUDIT_D:
            for nq in _AUDIT_NQ:
                for nprobe in _AUDIT_NPROBE:
                    for mean_list in _AUDIT_LISTS:
                        for k in _AUDIT_K:
                            cfg = ivf_scan_launch_config(nq, nprobe, d, mean_list, k, key_dtype=key_dtype,
                                                         device=device)
                            shapes = f"{key_dtype} d={d} nq={nq} nprobe={nprobe} list~{mean_list} k={k}"
                            if cfg["mode"] == "per_query":
                                cases.append(_per_query_case(cfg, key_dtype, d, shapes, AuditCase))
                            else:
                                cases.append(_batched_case(cfg, key_dtype, d, shapes, AuditCase))
    return dedupe(cases)


def _per_query_case(cfg, key_dtype, d, shapes, AuditCase):
    sig = {"q_ptr": "*fp32", "keys_ptr": f"*{key_dtype}", "offsets_ptr": "*i64", "probes_ptr": "*i64",
           "out_s_ptr": "*fp32", "out_p_ptr": "*i64", "d": "i32", "nprobe": "i32", "k": "i32",
           "stride_qm": "i32", "stride_kn": "i32", "stride_pm": "i32", "stride_om": "i32",
           "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "K_PAD": "constexpr"}
    const = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"], "K_PAD": cfg["K_PAD"]}
    name = f"{key_dtype}_n{cfg['BLOCK_N']}d{cfg['BLOCK_D']}k{cfg['K_PAD']}_w{cfg['num_warps']}"
    return AuditCase(_ivf_scan_kernel, sig, const, cfg["num_warps"], cfg["num_stages"], name,
                     matrix=False, shapes=shapes)


def _batched_case(cfg, key_dtype, d, shapes, AuditCase):
    sig = {"q_ptr": f"*{key_dtype}", "q_scale_ptr": "*fp32", "keys_ptr": f"*{key_dtype}",
           "offsets_ptr": "*i64", "item_list_ptr": "*i32", "item_pair0_ptr": "*i32",
           "item_npairs_ptr": "*i32", "pair_q_ptr": "*i32", "pair_slot_ptr": "*i32",
           "buf_s_ptr": "*fp32", "buf_p_ptr": "*i32", "d": "i32", "stride_qt": "i32",
           "stride_qm": "i32", "stride_kn": "i32", "stride_bm": "i32",
           "TERMS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
           "EVEN_D": "constexpr", "ALIGNED": "constexpr", "PRECISION": "constexpr"}
    precision = "tf32x3" if key_dtype == "fp32" else "ieee"
    const = {"TERMS": cfg["TERMS"], "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
             "BLOCK_D": cfg["BLOCK_D"], "EVEN_D": d % cfg["BLOCK_D"] == 0, "ALIGNED": d % 16 == 0,
             "PRECISION": precision}
    name = (f"{key_dtype}_t{cfg['TERMS']}_m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}d{cfg['BLOCK_D']}"
            f"_w{cfg['num_warps']}s{cfg['num_stages']}")
    return AuditCase(_ivf_scan_batched_kernel, sig, const, cfg["num_warps"], cfg["num_stages"], name,
                     matrix=True, shapes=shapes)
