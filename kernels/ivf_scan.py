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

The Triton kernel runs one program per query: it walks the query's probed lists in blocks
of ``BLOCK_N`` keys, computes the block's scores in registers and merges them into a
``K_PAD``-slot top-k held in registers (replace the worst slot while the block's best
beats it), so no score matrix is ever written to memory. The torch reference groups the
(query, list) pairs by list, scores each list for all its queries with one matrix
multiply, and selects the top-k of every query's candidates in query chunks.
"""

from __future__ import annotations

import torch

from ._backend import use_triton

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


def _select_topk(buf_s: torch.Tensor, buf_p: torch.Tensor, k: int):
    """Top-k per row by (score desc, position asc); rows padded with -inf / _EMPTY_POS."""
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
    out_p[:, :kk] = torch.where(pos >= _EMPTY_POS, torch.full_like(pos, -1), pos)
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


def ivf_scan(
    queries: torch.Tensor,
    keys: torch.Tensor,
    offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the probed lists' keys for every query (see the module docstring)."""
    _check(queries, keys, offsets, probes, k)
    k = int(k)
    if not use_triton(queries, keys, offsets, probes):
        return ivf_scan_ref(queries, keys, offsets, probes, k)
    nq, d = queries.shape
    queries = queries.contiguous()
    keys = keys.contiguous()
    probes = probes.contiguous()
    out_s = torch.empty((nq, k), dtype=torch.float32, device=queries.device)
    out_p = torch.empty((nq, k), dtype=torch.int64, device=queries.device)
    if nq == 0:
        return out_s, out_p
    block_d = min(128, max(16, _next_pow2(d)))
    k_pad = max(16, _next_pow2(k))
    _ivf_scan_kernel[(nq,)](
        queries,
        keys,
        offsets,
        probes,
        out_s,
        out_p,
        d,
        probes.shape[1],
        k,
        queries.stride(0),
        keys.stride(0),
        probes.stride(0),
        out_s.stride(0),
        BLOCK_N=64,
        BLOCK_D=block_d,
        K_PAD=k_pad,
    )
    return out_s, out_p
