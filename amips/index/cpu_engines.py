"""CPU engines behind the scanners: list-major matrix products, and faiss kernels over
amips' own lists and codes.

On CPU the torch paths of the scanners (``ivf_scan_ref``, ``pq_scan_ref``) group the
(query, list) pairs by list and run one small matrix product or table gather per list:
fine on a GPU-sized batch over equal lists, slow for single queries and, on lists of very
unequal size, a cliff as nprobe grows (bench/RESULTS.md): ``ivf_scan_ref`` writes every
scanned score into a buffer as wide as the widest query's probed lists, so the query
chunks shrink, the per-list loop runs once per chunk, and the top-k runs over the whole
buffer. The engines here keep amips' results (fp32 inner products, ties to the lowest
position, compare tie-aware):

- :class:`BatchedExactEngine`: list-major: every probed list is scored once against all
  the batch's queries that probe it (one fp32 matrix product), each (query, list) pair
  keeps at most its k best (k = 1: the row maximum; small k: only pairs that reach a
  per-query lower bound of the k-th score, the k-th largest maximum over runs of keys),
  and a query's few candidates are merged. Cost: about two matrix products per probed
  list, linear in the keys scanned; compute-bound.
- :class:`FaissExactEngine`: a faiss ``IndexIVFFlat`` whose inverted lists hold exactly
  ``keys_by_list`` (label = row of ``keys_by_list``), searched with
  ``search_preassigned`` on the lists the router chose: per query, memory-bound, but with
  no per-list fixed cost; the engine for a few queries.
- :class:`FaissPQEngine`: a faiss ``IndexIVFPQFastScan`` whose PQ codebooks ARE the amips
  (score-aware) codebooks and whose inverted lists hold the amips codes, packed into
  faiss' blocks of 32, searched with ``search_preassigned`` on the router's lists (faiss'
  own ``search`` runs the same code after its coarse quantizer). ``reorder = 0``: faiss'
  4-bit fast-scan (uint8 tables, SIMD shuffles) ranks amips' codes and its best k are
  returned with its scores; these are the torch path's float-table PQ scores up to faiss'
  table rounding (each of the M entries and the list bias on a grid of ~span/255), so the
  results equal the torch path's except among keys that close (top-1 agreed on 98% of
  queries, match@1 within noise, on 100k word-like keys). ``reorder = R``: faiss' best
  ``max(k, R)`` are re-scored exactly against the keys (what faiss' ``IndexRefineFlat``
  does); when R covers every probed key this is the torch path's exact result. No float
  re-score: fetching 2-4x the candidates from faiss and re-scoring them with float tables
  cost 2-3x faiss' own time (issue 13); with ``reorder`` it was redundant anyway.

Selection (``AMIPS_CPU_ENGINE``): ``auto`` (default). Exact scanner: the batched engine
when the batch has at least ``BATCHED_MIN_QUERIES_PER_LIST`` (8) queries per list on
average (``nq * nprobe >= 8 * n_lists``), else faiss (fp32 keys, faiss installed), else
the batched engine (:func:`exact_engine_kind`; the crossover is measured by
bench/bench_cpu_engines.py). PQ scanner: faiss on CPU when it applies (4-bit codes),
torch otherwise. ``torch`` forces the torch paths, ``faiss`` insists on faiss (an error
where faiss cannot serve), ``batched`` forces the batched exact engine (PQ as ``auto``).
Any faiss failure in ``auto`` falls back with one warning.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .._validate import InputError
from ..kernels.ivf_scan import _EMPTY_POS

ENGINES = ("auto", "torch", "faiss", "batched")
_warned: set[str] = set()


def engine_choice() -> str:
    choice = os.environ.get("AMIPS_CPU_ENGINE", "auto").strip().lower() or "auto"
    if choice not in ENGINES:
        raise InputError(f"AMIPS_CPU_ENGINE: expected one of {ENGINES}, got {choice!r}")
    return choice


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _fallback(name: str, exc: Exception) -> None:
    if engine_choice() == "faiss":
        raise exc
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"amips: faiss {name} engine failed ({exc}); using the torch path", stacklevel=3)


def _dedupe(probes: torch.Tensor) -> torch.Tensor:
    from .pq_scanner import _dedupe_probes

    return _dedupe_probes(probes)


def _rank(scores: torch.Tensor, pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k by (score desc, position asc); missing entries (pos < 0) last as (-inf, -1)."""
    scores = torch.where(pos >= 0, scores, torch.full_like(scores, float("-inf")))
    big = torch.where(pos >= 0, pos, torch.full_like(pos, 2**62))
    o1 = torch.argsort(big, dim=1, stable=True)
    s1, p1 = scores.gather(1, o1), pos.gather(1, o1)
    o2 = torch.argsort(s1, dim=1, descending=True, stable=True)[:, :k]
    s, p = s1.gather(1, o2), p1.gather(1, o2)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = torch.cat([s, torch.full((s.shape[0], pad), float("-inf"))], 1)
        p = torch.cat([p, torch.full((p.shape[0], pad), -1, dtype=torch.int64)], 1)
    p = torch.where(torch.isneginf(s), torch.full_like(p, -1), p)
    return s.contiguous(), p.contiguous()


def _ivf_shell(faiss, centroids: np.ndarray):
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return quantizer


class FaissExactEngine:
    """Exact scan of amips lists by faiss IndexIVFFlat.search_preassigned."""

    def __init__(self, keys_by_list: torch.Tensor, list_offsets: torch.Tensor):
        faiss = _faiss()
        if faiss is None:
            raise RuntimeError("faiss is not installed")
        keys = np.ascontiguousarray(keys_by_list.detach().cpu().float().numpy())
        off = list_offsets.cpu().long()
        n_lists, d = off.numel() - 1, keys.shape[1]
        # the coarse quantizer is never used (lists come from the router); it only has to exist
        self._quantizer = _ivf_shell(faiss, np.zeros((n_lists, d), np.float32))
        self.index = faiss.IndexIVFFlat(self._quantizer, d, n_lists, faiss.METRIC_INNER_PRODUCT)
        lists = torch.repeat_interleave(torch.arange(n_lists), off[1:] - off[:-1]).numpy().astype(np.int64)
        ids = np.arange(keys.shape[0], dtype=np.int64)
        self.index.add_core(keys.shape[0], faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        self.index.parallel_mode = 0
        self._keys, self._offsets = keys_by_list, off

    # faiss keeps an arbitrary one of several keys tied at the k-th score; amips' rule is the
    # lowest position. Fetching a few more settles almost every row; a row whose tie runs
    # past what was fetched is scanned again by the torch path, which applies the rule.
    TIE_MARGIN = 8

    def search(self, queries: torch.Tensor, probes: torch.Tensor, k: int):
        x = np.ascontiguousarray(queries.detach().cpu().float().numpy())
        iq = np.ascontiguousarray(_dedupe(probes.cpu().long()).numpy())
        self.index.nprobe = max(1, iq.shape[1])
        kk = k + self.TIE_MARGIN
        dist, labels = self.index.search_preassigned(x, kk, iq, np.zeros(iq.shape, np.float32))
        s, p = _rank(torch.from_numpy(dist), torch.from_numpy(labels), kk)
        unsettled = (p[:, -1] >= 0) & (s[:, k - 1] == s[:, -1])
        s, p = s[:, :k].contiguous(), p[:, :k].contiguous()
        if bool(unsettled.any()):
            from ..kernels.ivf_scan import ivf_scan

            rows = unsettled.nonzero().squeeze(1)
            rs, rp = ivf_scan(queries[rows].float().cpu(), self._keys, self._offsets, probes[rows].cpu().long(), k)
            s[rows], p[rows] = rs.to(s.dtype), rp.to(p.dtype)
        return s, p


class BatchedExactEngine:
    """List-major exact scan of a batch: one matrix product per probed list.

    The (query, list) pairs of the batch are grouped by list; each probed list is read
    once and scored against all the queries that probe it with one fp32 matrix multiply
    (compute-bound, where a per-query scan streams every probed list once per query).
    Selection never builds a buffer as wide as a query's probed keys (the torch
    reference's cliff on unequal lists):

    - k = 1: each pair keeps its maximum (the first, i.e. lowest position, among ties);
    - small k: every probed list is cut into at most 16 runs of keys and each run's best
      score is kept; a query's k-th largest run maximum (less a rounding margin) is a lower
      bound of its k-th score, so only the (query, list) pairs whose best run reaches it
      are scored again and k-selected (few pairs per query survive);
    - otherwise (large k, or nprobe <= 2): a k-selection per pair (ties to the lowest
      position) and a merge of the ``nprobe * k`` candidates.

    Candidates are merged by (score desc, position asc). fp16/bf16 keys are upcast one
    list at a time.
    """

    MAX_BLOCK = 1 << 22  # score entries per product (16 MiB of fp32): larger lists are split by queries
    MAX_BOUND_K = 64  # above this k, per-pair k-selection
    BOUND_CHUNKS = 16  # runs per probed list whose maxima bound a query's k-th score

    def __init__(self, keys_by_list: torch.Tensor, list_offsets: torch.Tensor):
        self._keys = keys_by_list
        self._offsets = list_offsets.cpu().long()
        self._off = self._offsets.tolist()
        self._sizes = self._offsets[1:] - self._offsets[:-1]
        norms = keys_by_list.float().norm(dim=1) if keys_by_list.shape[0] else torch.zeros(1)
        self._max_norm = float(norms.max()) if norms.numel() else 0.0

    def _blocks(self, probes: torch.Tensor):
        """(list, pair ids) per probed non-empty list, pairs = flat (query, slot) ids, in
        query order within a list; long lists come split so a product stays under MAX_BLOCK."""
        flat = probes.reshape(-1)
        live = (flat >= 0) & (self._sizes[flat.clamp_min(0)] > 0)
        pair = live.nonzero().squeeze(1)
        lists = flat[pair]
        order = torch.argsort(lists, stable=True)
        pair, lists = pair[order], lists[order]
        uniq, counts = torch.unique_consecutive(lists, return_counts=True)
        lo = 0
        for lst, cnt in zip(uniq.tolist(), counts.tolist()):
            n = self._off[lst + 1] - self._off[lst]
            step = max(1, self.MAX_BLOCK // n)
            for a in range(lo, lo + cnt, step):
                yield lst, pair[a:min(lo + cnt, a + step)]
            lo += cnt

    def _list_keys(self, lst: int) -> tuple[torch.Tensor, int]:
        s0, s1 = self._off[lst], self._off[lst + 1]
        block = self._keys[s0:s1]
        return (block if block.dtype == torch.float32 else block.float()), s0

    def search(self, queries: torch.Tensor, probes: torch.Tensor, k: int):
        q = queries.detach().cpu().float().contiguous()
        probes = _dedupe(probes.cpu().long())
        if k == 1:
            return self._search_top1(q, probes)
        if k <= self.MAX_BOUND_K and probes.shape[1] > 2:
            return self._search_bounded(q, probes, k)
        return self._search_per_pair(q, probes, k)

    def _search_top1(self, q, probes):
        nq, nprobe = probes.shape
        cand_s = torch.full((nq * nprobe,), float("-inf"))
        cand_p = torch.full((nq * nprobe,), _EMPTY_POS, dtype=torch.int64)
        for lst, pairs in self._blocks(probes):
            block, s0 = self._list_keys(lst)
            v, j = (q.index_select(0, pairs // nprobe) @ block.T).max(1)  # first maximum
            cand_s[pairs] = v
            cand_p[pairs] = j + s0
        return _merge(cand_s.view(nq, nprobe), cand_p.view(nq, nprobe), 1)

    def _search_per_pair(self, q, probes, k):
        nq, nprobe = probes.shape
        cand_s = torch.full((nq * nprobe, k), float("-inf"))
        cand_p = torch.full((nq * nprobe, k), _EMPTY_POS, dtype=torch.int64)
        for lst, pairs in self._blocks(probes):
            block, s0 = self._list_keys(lst)
            scores = q.index_select(0, pairs // nprobe) @ block.T  # [m, n]
            n = scores.shape[1]
            if n <= k:
                cand_s[pairs, :n] = scores
                cand_p[pairs, :n] = torch.arange(s0, s0 + n)
            else:
                v, j = _list_topk(scores, k)
                cand_s[pairs] = v
                cand_p[pairs] = j + s0
        return _merge(cand_s.view(nq, nprobe * k), cand_p.view(nq, nprobe * k), k)

    def _search_bounded(self, q, probes, k):
        nq, nprobe = probes.shape
        chunks = max(self.BOUND_CHUNKS, k)
        slots = chunks + 1
        # 1. bound: split every probed list into at most `chunks` runs of keys and take each
        # run's best score; the k-th largest of a query's run maxima is at most its k-th
        # score (k distinct runs reach it). It is lowered by twice the worst fp32 rounding
        # of a dot product (d * 2**-24 * |q| * max|key| per summation order) so the second
        # pass's scores of the same keys stay above it whatever order the product sums in.
        run_max = torch.full((nq * nprobe, slots), float("-inf"))
        for lst, pairs in self._blocks(probes):
            block, _ = self._list_keys(lst)
            st = block @ q.index_select(0, pairs // nprobe).T  # [n, m]: reductions over rows vectorise
            n, m = st.shape
            w = -(-n // chunks)
            full = n // w
            cm = st[: full * w].view(full, w, m).amax(1)
            run_max[pairs, :full] = cm.T
            if full * w < n:
                run_max[pairs, full] = st[full * w:].amax(0)
        run_max = run_max.view(nq, nprobe * slots)
        thr = torch.topk(run_max, min(k, run_max.shape[1]), dim=1, sorted=False).values.min(1).values
        margin = 2.0 * q.shape[1] * 2.0**-24 * q.norm(dim=1) * self._max_norm
        thr = thr - margin * 1.01
        # 2. only pairs whose best score (their best run maximum) reaches the bound can hold
        # a top-k key: those are scored again, in rows, and keep their k best
        pair_max = run_max.view(nq * nprobe, slots).amax(1)
        live = pair_max >= thr.repeat_interleave(nprobe)
        live_probes = torch.where(live.view(nq, nprobe), probes, torch.full_like(probes, -1))
        fill = torch.zeros(nq, dtype=torch.int64)
        parts = []
        for lst, pairs in self._blocks(live_probes):
            block, s0 = self._list_keys(lst)
            qi = pairs // nprobe
            scores = q.index_select(0, qi) @ block.T  # [m_live, n]
            n = scores.shape[1]
            if n <= k:
                v = torch.full((qi.numel(), k), float("-inf"))
                j = torch.full((qi.numel(), k), _EMPTY_POS - s0, dtype=torch.int64)
                v[:, :n] = scores
                j[:, :n] = torch.arange(n)
            else:
                v, j = _list_topk(scores, k)
            parts.append((qi, fill.index_select(0, qi), v, j + s0))
            fill.index_add_(0, qi, torch.ones_like(qi))
        width = max(1, int(fill.max()) if nq else 1) * k
        buf_s = torch.full((nq, width), float("-inf"))
        buf_p = torch.full((nq, width), _EMPTY_POS, dtype=torch.int64)
        if parts:
            ql, base, v, pos = (torch.cat(t) for t in zip(*parts))
            cols = base[:, None] * k + torch.arange(k)[None, :]
            rows = ql[:, None].expand_as(cols)
            buf_s[rows, cols] = v
            buf_p[rows, cols] = pos
        return _merge(buf_s, buf_p, k)


def _merge(cand_s: torch.Tensor, cand_p: torch.Tensor, k: int):
    """Best k of every row's candidates by (score desc, position asc); -inf / -1 padding."""
    if k == 1:
        best = cand_s.max(1, keepdim=True).values
        p = torch.where(cand_s == best, cand_p, torch.full_like(cand_p, _EMPTY_POS)).min(1, keepdim=True).values
        empty = p >= _EMPTY_POS
        return (torch.where(empty, torch.full_like(best, float("-inf")), best).contiguous(),
                torch.where(empty, torch.full_like(p, -1), p).contiguous())
    from ..kernels.ivf_scan import _select_topk

    return _select_topk(cand_s, cand_p, k)


def _list_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns per row, ties to the lowest column (torch.topk breaks them arbitrarily).

    One more than k is selected: where the (k+1)-th score is below the k-th, the first k
    are exactly the scores >= the k-th (no tie crosses the cut); rows where they are equal
    are redone with a stable sort, which puts the lowest columns of a tied run first."""
    kk = min(k + 1, scores.shape[1])
    v, j = torch.topk(scores, kk, dim=1)
    if kk > k:
        redo = (v[:, k] == v[:, k - 1]).nonzero().squeeze(1)
        v, j = v[:, :k], j[:, :k]
        if redo.numel():
            rv, rj = torch.sort(scores[redo], dim=1, descending=True, stable=True)
            v[redo], j[redo] = rv[:, :k], rj[:, :k]
    return v, j


class FaissPQEngine:
    """4-bit fast-scan over the amips PQ codes and codebooks; with ``reorder``, exact re-scores."""

    def __init__(self, pq):
        faiss = _faiss()
        if faiss is None:
            raise RuntimeError("faiss is not installed")
        if pq.bits != 4:
            raise RuntimeError("faiss fast-scan takes 4-bit codes only")
        m, ksub, dsub = pq.codebooks.shape
        d = m * dsub
        cents = pq.centroids.detach().cpu().float().numpy()
        n_lists = cents.shape[0]
        self._quantizer = _ivf_shell(faiss, cents)
        idx = faiss.IndexIVFPQFastScan(self._quantizer, d, n_lists, m, 4, faiss.METRIC_INNER_PRODUCT)
        idx.by_residual = bool(pq.by_residual)
        faiss.copy_array_to_vector(
            np.ascontiguousarray(pq.codebooks.detach().cpu().float().numpy()).ravel(), idx.pq.centroids)
        idx.is_trained = True
        codes = np.ascontiguousarray(pq.codes.detach().cpu().numpy())  # low nibble = even subspace
        if codes.shape[1] != idx.code_size:
            raise RuntimeError(f"code size {codes.shape[1]} != faiss' {idx.code_size}")
        from .faiss_backend import pack_fastscan_lists

        pack_fastscan_lists(faiss, idx, codes, pq.list_offsets.cpu().tolist(),
                            np.arange(codes.shape[0], dtype=np.int64))
        idx.ntotal = codes.shape[0]
        self.index = idx
        self.by_residual = bool(pq.by_residual)
        self._faiss = faiss
        self._centroids_t = pq.centroids.detach().cpu().float().T.contiguous()  # [d, L]

    def search(self, queries: torch.Tensor, probes: torch.Tensor, k: int, *, reorder: int = 0,
               keys_by_list: torch.Tensor | None = None):
        """``probes`` [nq, nprobe]: distinct list ids per row, -1 = none (the scanner dedupes)."""
        faiss = self._faiss
        q = queries.detach().cpu().float().contiguous()
        iq = probes.cpu().long().contiguous()
        if self.by_residual:
            # faiss adds the given <q, centroid> to each residual score (and quantizes it with
            # the tables), so it must be the true centroid score of each probed list
            # (for a few lists per query, their centroids' products alone; else one product:
            # the gather costs ~100x a product's share per list, one thread, d 100-384)
            if 128 * iq.shape[1] <= self._centroids_t.shape[1]:
                dq = torch.einsum("qd,qpd->qp", q, self._centroids_t.T[iq.clamp_min(0)])
            else:
                dq = (q @ self._centroids_t).gather(1, iq.clamp_min(0))
        else:
            dq = torch.zeros(iq.shape, dtype=torch.float32)
        want = max(k, reorder) if reorder > 0 else k
        self.index.nprobe = max(1, iq.shape[1])
        x = q.numpy()
        dist, labels = self.index.search_preassigned(x, want, iq.numpy(), dq.numpy())
        pos = torch.from_numpy(labels)
        if reorder <= 0:
            scores = torch.from_numpy(dist)
            return torch.where(pos >= 0, scores, torch.full_like(scores, float("-inf"))), pos
        from ..kernels.pq_scan import _INT64_MIN, _finish, _pack_keys, pq_reorder

        keys = keys_by_list.detach().cpu()
        if keys.dtype != torch.float32 or not keys.is_contiguous():
            return pq_reorder(q, keys, pos, k)  # fp16/bf16 storage: upcast gathers in torch
        exact = np.empty(labels.shape, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(exact), faiss.swig_ptr(x), faiss.swig_ptr(keys.numpy()),
            faiss.swig_ptr(labels), x.shape[1], labels.shape[0], labels.shape[1])
        packed = _pack_keys(torch.from_numpy(exact), pos.clamp_min(0))
        packed = torch.where(pos >= 0, packed, torch.full_like(packed, _INT64_MIN))
        return _finish(packed, k)


# Engine choice for the exact scanner, by the mean number of the batch's queries that probe
# each list (nq * nprobe / n_lists): below it faiss' per-query scan wins (each list would be
# scored against too few queries for a matrix product to pay), above it the list-major
# products do. Measured with bench/bench_cpu_engines.py (bench/RESULTS.md, issue 13 session 3):
# on 300k word-like keys in 548 lists, one thread, the two cross between 3.7 and 15 queries
# per list at nprobe 8 and 32.
BATCHED_MIN_QUERIES_PER_LIST = 8.0


def exact_engine_kind(nq: int, nprobe: float, n_lists: int, *, key_dtype=torch.float32,
                      faiss_available: bool = True) -> str:
    """Which CPU engine scans a batch for the exact scanner: ``"batched"``, ``"faiss"`` or
    ``"torch"`` (the torch reference ``ivf_scan_ref``), after ``AMIPS_CPU_ENGINE``.

    ``auto``: ``"batched"`` when ``nq * nprobe >= BATCHED_MIN_QUERIES_PER_LIST * n_lists``,
    else ``"faiss"`` (fp32 keys, faiss installed) or ``"batched"``. ``torch``, ``faiss`` and
    ``batched`` force that engine.
    """
    choice = engine_choice()
    if choice != "auto":
        return choice
    if nq * nprobe >= BATCHED_MIN_QUERIES_PER_LIST * max(1, n_lists):
        return "batched"
    if faiss_available and key_dtype == torch.float32:
        return "faiss"
    return "batched"


def exact_engine(scanner, nq: int | None = None, nprobe: float | None = None):
    """The CPU engine of an ExactScanner for a batch of ``nq`` queries probing ``nprobe``
    lists (each engine built once and kept on the scanner); None for the torch reference.
    Without ``nq``/``nprobe``: the engine for a large batch."""
    if nq is None or nprobe is None:
        nq, nprobe = 1 << 30, 1
    kind = exact_engine_kind(nq, nprobe, scanner.n_lists, key_dtype=scanner.keys_by_list.dtype,
                             faiss_available=_faiss() is not None)
    if kind == "torch":
        return None
    engines = scanner.__dict__.setdefault("_cpu_engines", {})
    eng = engines.get(kind)
    if eng is not None:
        return eng
    if kind == "batched":
        eng = BatchedExactEngine(scanner.keys_by_list, scanner.list_offsets)
    else:
        try:
            eng = FaissExactEngine(scanner.keys_by_list, scanner.list_offsets)
        except Exception as exc:  # noqa: BLE001 - any faiss failure falls back
            _fallback("exact", exc)
            eng = engines.get("batched") or BatchedExactEngine(scanner.keys_by_list, scanner.list_offsets)
            kind = "batched"
    engines[kind] = eng
    return eng


def pq_engine(scanner):
    """The CPU engine of a PQScanner, built once; None for the torch path."""
    if engine_choice() == "torch":
        return None
    eng = getattr(scanner, "_cpu_engine", None)
    if eng is not None:
        return eng
    if scanner.bits != 4 and engine_choice() == "auto":
        return None
    try:
        eng = FaissPQEngine(scanner)
    except Exception as exc:  # noqa: BLE001
        _fallback("fast-scan", exc)
        return None
    scanner._cpu_engine = eng
    return eng
