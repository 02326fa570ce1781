"""CPU engines behind the scanners: faiss kernels over amips' own lists and codes.

On CPU the torch paths of the scanners (``ivf_scan_ref``, ``pq_scan_ref``) group the
(query, list) pairs by list and run one small matrix product or table gather per list:
fine on a GPU-sized batch over equal lists, slow for single queries and, on lists of very
unequal size, a cliff as nprobe grows (bench/RESULTS.md). faiss' IVF scanners walk each
query's probed lists with SIMD kernels, at a cost linear in the keys scanned. This module
hands faiss amips' own data, so results stay amips' results:

- :class:`FaissExactEngine`: a faiss ``IndexIVFFlat`` whose inverted lists hold exactly
  ``keys_by_list`` (label = row of ``keys_by_list``), searched with
  ``search_preassigned`` on the lists the router chose. Scores are fp32 inner products,
  equal to the torch path's up to summation order (compare tie-aware).
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

Selection (``AMIPS_CPU_ENGINE``): ``auto`` (default) uses faiss on CPU when it applies
(fp32 keys for the exact engine; 4-bit codes for PQ) and torch otherwise; ``torch``
forces the torch paths, ``faiss`` insists (an error where faiss cannot serve). Any faiss
failure in ``auto`` falls back to torch with one warning. The rule is fixed (no per-batch
timing): faiss avoids the torch path's cliff on unequal lists reported in issue 13 and its
per-list overhead on small batches (bench/bench_cpu_engines.py measures both).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .._validate import InputError

ENGINES = ("auto", "torch", "faiss")
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


def exact_engine(scanner):
    """The CPU engine of an ExactScanner, built once; None for the torch path."""
    if engine_choice() == "torch":
        return None
    eng = getattr(scanner, "_cpu_engine", None)
    if eng is not None:
        return eng
    if scanner.keys_by_list.dtype != torch.float32 and engine_choice() == "auto":
        return None  # fp16/bf16 storage: a faiss copy would double memory; torch path
    try:
        eng = FaissExactEngine(scanner.keys_by_list, scanner.list_offsets)
    except Exception as exc:  # noqa: BLE001 - any faiss failure falls back
        _fallback("exact", exc)
        return None
    scanner._cpu_engine = eng
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
