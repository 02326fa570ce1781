"""The anchors in the same frontier: faiss IndexIVFPQFastScan + IndexRefineFlat (over
nprobe and k_factor, a couple of code sizes, on the same k-means lists as amips' first
index, routed by faiss' own coarse quantizer) and faiss IndexHNSWFlat (over efSearch).
Skipped cleanly (with a note) when faiss is not installed or the device is not the CPU."""

from __future__ import annotations

import numpy as np


def import_faiss():
    """faiss, or None when it is not installed (tests monkeypatch this)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def code_sizes(d: int) -> list[int]:
    """PQ subspaces of the IVF-PQ anchor: 2 and 4 dimensions each (1 and 2 for small d)."""
    sizes = [d // 2, d // 4] if d >= 256 else [d, d // 2]
    return [m for m in sizes if m >= 2 and d % m == 0 and m % 2 == 0] or [d]


class IVFPQRefine:
    """faiss IVFPQFastScan (4-bit, by residual, amips' lists) + IndexRefineFlat."""

    def __init__(self, faiss, index, keys: np.ndarray, subspaces: int, path=None):
        from ..index.faiss_backend import FaissIVF

        self.faiss = faiss
        if path is not None and path.exists():
            self.base = faiss.read_index(str(path))
        else:
            self.base = FaissIVF(index, "pqfs", pq_subspaces=subspaces).faiss_index
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                faiss.write_index(self.base, str(tmp))
                tmp.replace(path)
        self.keys = np.ascontiguousarray(keys, dtype=np.float32)  # kept alive: faiss holds a pointer
        self.refine = faiss.IndexRefineFlat(self.base, faiss.swig_ptr(self.keys))
        self.subspaces, self.n_lists, self.d = subspaces, index.n_lists, index.d
        self.mean_list = float(index.list_sizes.double().mean())
        n = keys.shape[0]
        self.memory_bytes = int(n * subspaces * 4 // 8 + 8 * n + 4 * index.n_lists * index.d + 4 * n * index.d)

    def search(self, queries: np.ndarray, k: int, nprobe: int, refine: int):
        self.base.nprobe = int(nprobe)
        self.refine.k_factor = max(1.0, refine / k)
        return self.refine.search(queries, k)[1]

    def flops_per_query(self, nprobe: int, refine: int, k: int) -> float:
        d = self.d
        return (2.0 * self.n_lists * d + 2.0 * d * 16 * nprobe + self.subspaces * self.mean_list * nprobe
                + 2.0 * d * max(refine, k))


class HNSWFlat:
    """faiss IndexHNSWFlat (M = 16, efConstruction = 100), inner-product metric."""

    def __init__(self, faiss, keys: np.ndarray, path=None, m: int = 16, ef_construction: int = 100):
        self.faiss = faiss
        if path is not None and path.exists():
            self.index = faiss.read_index(str(path))
        else:
            self.index = faiss.IndexHNSWFlat(keys.shape[1], m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.add(np.ascontiguousarray(keys, dtype=np.float32))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                faiss.write_index(self.index, str(tmp))
                tmp.replace(path)
        self.memory_bytes = int(faiss.serialize_index(self.index).nbytes)
        self.m = m

    def search(self, queries: np.ndarray, k: int, ef: int):
        self.index.hnsw.efSearch = int(max(ef, k))
        return self.index.search(queries, k)[1]
