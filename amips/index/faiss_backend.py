"""faiss backend: faiss IVF indexes on amips lists, searched with any amips router.

``to_faiss(index, kind="flat")`` builds a faiss ``IndexIVFFlat`` whose coarse quantizer
holds the amips centroids and whose inverted lists hold exactly the amips lists (keys added
with their precomputed list ids, labelled with their original ids). ``kind="pqfs"`` builds
``IndexIVFPQFastScan`` (4-bit PQ, residuals to the centroids, ``pq_subspaces`` codes per
key). :class:`FaissIVF` searches such an index through ``search_preassigned``, so the
lists come from any amips router (centroid, SupportNet heads, KeyNet), with an optional
exact re-score of the best ``refine`` candidates against the stored keys.

faiss searches on CPU here (faiss-cpu); its threads follow ``faiss.omp_set_num_threads``.
"""

from __future__ import annotations

import numpy as np
import torch

from .._validate import InputError, check_matrix, check_positive_int, to_tensor
from ..numerics import check_score_dtype, row_exponents, scale_rows
from .ivf import _add_exponent, finish_scores


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise InputError(f"faiss backend: faiss is not installed ({exc})") from exc
    return faiss


def _refine(queries: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor, k: int, chunk: int = 16):
    """Exact re-score of candidate ids [nq, R] (-1 = none); best k by exact score.

    numpy gather + einsum in small query chunks (cache-sized): on one CPU thread this is
    several times faster than torch's batched matrix-vector products here.
    """
    kn, qn, cn = keys.numpy(), queries.numpy(), cand.numpy()
    exact = np.empty(cn.shape, dtype=np.float32)
    for a in range(0, cn.shape[0], chunk):
        c = cn[a : a + chunk]
        exact[a : a + chunk] = np.einsum("qcd,qd->qc", np.take(kn, np.maximum(c, 0), axis=0), qn[a : a + chunk])
    exact_t = torch.from_numpy(exact)
    exact_t = torch.where(cand >= 0, exact_t, torch.full_like(exact_t, float("-inf")))
    top = torch.topk(exact_t, min(k, cand.shape[1]), dim=1)
    ids = torch.where(torch.isfinite(top.values), cand.gather(1, top.indices), torch.full_like(top.indices, -1))
    return top.values, ids


def to_faiss(index, kind: str = "flat", *, pq_subspaces: int | None = None, train_size: int = 65536, seed: int = 0):
    """A faiss IVF index with the lists of ``index`` (an :class:`amips.IVFIndex`)."""
    faiss = _faiss()
    d, n_lists = index.d, index.n_lists
    metric = faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(index.centroids.cpu().numpy(), dtype=np.float32))
    # the keys as amips scans them (scaled by a power of two when outside fp32's safe range)
    _, scan = index.scan_range()
    keys = np.ascontiguousarray(scan.keys_by_list.float().cpu().numpy())
    lists = torch.repeat_interleave(torch.arange(n_lists), index.list_sizes.cpu()).numpy().astype(np.int64)
    ids = np.ascontiguousarray(index.ids.cpu().numpy(), dtype=np.int64)
    if kind == "flat":
        out = faiss.IndexIVFFlat(quantizer, d, n_lists, metric)
    elif kind == "pqfs":
        m = pq_subspaces if pq_subspaces is not None else max(1, d // 2)
        m = check_positive_int(m, "pq_subspaces")
        if d % m:
            raise InputError(f"pq_subspaces: d = {d} is not divisible by {m}")
        out = faiss.IndexIVFPQFastScan(quantizer, d, n_lists, m, 4, metric)
        out.by_residual = True
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(keys.shape[0], size=min(train_size, keys.shape[0]), replace=False))
        out.cp.seed = seed
        out.train(keys[pick])  # quantizer already holds n_lists centroids: only the PQ trains
    else:
        raise InputError(f"kind: expected 'flat' or 'pqfs', got {kind!r}")
    if kind == "flat":
        out.add_core(keys.shape[0], faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    else:
        _add_fastscan_preassigned(faiss, out, keys, ids, lists, index.list_offsets.cpu().tolist())
    return out


def _add_fastscan_preassigned(faiss, out, keys, ids, lists, offsets) -> None:
    """Add keys with their amips list ids to a fast-scan IVF index.

    Fast-scan inverted lists store codes interleaved in blocks of 32, so the codes are
    encoded against the given lists (residuals to those centroids) and packed block by
    block with the index's code packer before ``add_entries``.
    """
    n = keys.shape[0]
    codes = np.empty((n, out.code_size), dtype=np.uint8)
    out.encode_vectors(n, faiss.swig_ptr(keys), faiss.swig_ptr(lists), faiss.swig_ptr(codes), False)
    pack_fastscan_lists(faiss, out, codes, offsets, ids)
    out.ntotal = n


class FaissIVF:
    """A faiss IVF index on amips lists, routed by an amips router.

    ``search(queries, k, nprobe, router=None, refine=0)`` -> (scores, ids) like
    :meth:`amips.IVFIndex.search`; ``refine`` > 0 takes that many faiss candidates and
    re-scores them exactly against the amips keys (faiss' IndexRefineFlat, preassigned).
    Queries and keys of any magnitude are scaled as ``IVFIndex.search`` scales them
    (``score_dtype`` as there).
    """

    def __init__(self, index, kind: str = "flat", **kwargs):
        self.index = index
        self.kind = kind
        self.faiss_index = to_faiss(index, kind=kind, **kwargs)
        self._keys = None

    @property
    def name(self) -> str:
        return f"faiss-{self.kind}"

    def search(self, queries, k: int = 10, nprobe: int = 8, router=None, *, refine: int = 0,
               return_info: bool = False, score_dtype="float32"):
        idx = self.index
        q = check_matrix(to_tensor(queries, "queries"), "queries", dim=idx.d).cpu()
        k = check_positive_int(k, "k")
        nprobe = check_positive_int(nprobe, "nprobe", maximum=idx.n_lists)
        score_dtype = check_score_dtype(score_dtype)
        rt = idx.router(router)
        if idx.device.type != "cpu":
            raise InputError(f"index: the faiss backend searches a CPU index, this one is on {idx.device}")
        route, sq, e = idx.prepare_queries(q, rt, nprobe)
        out = self._search_scaled(sq, route.lists, k, refine=refine, return_info=return_info, router=rt)
        pos = out[1]
        scores = finish_scores(out[0], pos, e, score_dtype)
        return (scores, *out[1:])

    def search_routed(self, queries, scan_queries, lists, k: int, *, refine: int = 0, return_info=False, router=None,
                      score_dtype="float32"):
        """Search with precomputed routes (``lists`` [nq, nprobe]); see :meth:`search`."""
        score_dtype = check_score_dtype(score_dtype)
        sq = check_matrix(to_tensor(scan_queries, "scan_queries"), "scan_queries", dim=self.index.d).cpu()
        key_log2, _ = self.index.scan_range()
        es = row_exponents(sq)
        e = _add_exponent(es, key_log2, sq.shape[0], sq.device)
        out = self._search_scaled(scale_rows(sq, es), lists, k, refine=refine, return_info=return_info,
                                  router=router)
        scores = finish_scores(out[0], out[1], e, score_dtype)
        return (scores, *out[1:])

    def _search_scaled(self, scan_queries, lists, k: int, *, refine: int = 0, return_info=False, router=None):
        idx = self.index
        x = np.ascontiguousarray(scan_queries.float().cpu().numpy())
        iq = np.ascontiguousarray(lists.cpu().numpy(), dtype=np.int64)
        nprobe = iq.shape[1]
        # faiss adds <q, centroid> to residual PQ scores, so Dq must be the true centroid scores
        sq = scan_queries.float().cpu()
        dq = np.ascontiguousarray((sq @ idx.centroids.cpu().T).gather(1, lists.cpu()).numpy(), dtype=np.float32)
        self.faiss_index.nprobe = nprobe
        kk = max(k, int(refine)) if refine else k
        dist, labels = self.faiss_index.search_preassigned(x, kk, iq, dq)
        labels_t = torch.from_numpy(labels)
        scores_t = torch.from_numpy(dist)
        if refine:
            if self._keys is None:
                key_log2, _ = idx.scan_range()
                keys = idx.keys().cpu()
                if key_log2:
                    keys = (keys.double() * 2.0**-key_log2).float()
                self._keys = keys.contiguous()
            scores_t, labels_t = _refine(sq, self._keys, labels_t, k)
        else:
            scores_t = torch.where(labels_t >= 0, scores_t, torch.full_like(scores_t, float("-inf")))
        if not return_info:
            return scores_t, labels_t
        sizes = idx.list_sizes.cpu()
        scanned = float(sizes[lists.cpu()].sum(1).double().mean())
        return scores_t, labels_t, {
            "keys_scanned_per_query": scanned,
            "router_flops_per_query": float(router.flops_per_query(nprobe)) if router is not None else 0.0,
            "scan_flops_per_query": self.flops_per_query(scanned, nprobe, refine),
        }

    def flops_per_query(self, n_codes_scanned: float, nprobe: int, refine: int = 0) -> float:
        d = self.index.d
        if self.kind == "flat":
            return 2.0 * d * n_codes_scanned
        m = self.faiss_index.pq.M
        # per probed list a 16-entry table per subspace (residual form: 2·d·16 per list, as
        # faiss builds it from q and the list centroid), then one add per subspace per code
        lut = 2.0 * d * 16 * nprobe
        return lut + m * float(n_codes_scanned) + 2.0 * d * float(refine)


def pack_fastscan_lists(faiss, index, codes: np.ndarray, offsets, ids: np.ndarray) -> None:
    """Put flat PQ ``codes`` [n, code_size], grouped by list (``offsets`` [n_lists + 1]),
    into a fast-scan IVF index: its inverted lists hold codes interleaved in blocks of 32,
    so each list is padded to whole blocks and packed with the index's code packer."""
    packer = index.get_CodePacker()
    nvec, block_size = packer.nvec, packer.block_size
    for lst in range(len(offsets) - 1):
        a, b = offsets[lst], offsets[lst + 1]
        if b == a:
            continue
        n_blocks = (b - a + nvec - 1) // nvec
        flat = np.zeros((n_blocks * nvec, index.code_size), dtype=np.uint8)
        flat[: b - a] = codes[a:b]
        blocks = np.zeros(n_blocks * block_size, dtype=np.uint8)
        for j in range(n_blocks):
            chunk = np.ascontiguousarray(flat[j * nvec : (j + 1) * nvec])
            packer.pack_all(faiss.swig_ptr(chunk), faiss.swig_ptr(blocks[j * block_size :]))
        index.invlists.add_entries(lst, b - a, faiss.swig_ptr(np.ascontiguousarray(ids[a:b])),
                                   faiss.swig_ptr(blocks))

