"""The IVF index: k-means lists, keys grouped by list, routers, scanners, save and load.

Layout in memory: ``keys_by_list`` [n, d] holds the keys grouped by list (list ``l`` owns
rows ``list_offsets[l] : list_offsets[l + 1]``, keys in original order within a list);
``ids`` [n] maps a grouped row back to the key's original id; ``partitions`` [n] is the
list id of every key in original order (what ``amips train --partitions`` reads).

On disk (``IVFIndex.save``; every file written atomically, ``index.json`` last)::

    INDEXDIR/index.json          format, sizes, metric, partitions_sha256, scanner configs
    INDEXDIR/centroids.npy       [L, d] fp32
    INDEXDIR/partitions.npy      [n] int64, list id of every original key
    INDEXDIR/lists.safetensors   keys_by_list, list_offsets, ids
    INDEXDIR/pq.safetensors      the PQ scanner's state (when built with --pq-subspaces)

``partitions_sha256`` is the sha256 of the bytes of ``partitions.npy``; a router trained on
that file records the same digest, and the index refuses a router trained for another one.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import (
    atomic_save_npy,
    atomic_write,
    check_files,
    fault_point,
    files_record,
    load_npy,
    read_json,
)
from .._io import atomic_write_json as atomic_save_json
from .._io import sha256_file as file_sha256
from .._validate import (
    InputError,
    check_device,
    check_int_vector,
    check_matrix,
    check_positive_int,
    to_tensor,
)
from ..numerics import (
    FLOAT32_MAX,
    check_score_dtype,
    range_exponent,
    row_exponents,
    scale_rows,
    unscale_rows,
)
from ..provenance import check_model_for_index_keys, fingerprint
from .kmeans import METRICS, kmeans
from .routers import (
    CentroidRouter,
    KeyNetRouter,
    Route,
    Router,
    SupportRouter,
    load_router_model,
    parse_router_spec,
    router_dtype,
)
from .scanners import ExactScanner

FORMAT = "amips-ivf"
FORMAT_VERSION = 1
_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def partitions_digest(partitions: np.ndarray) -> str:
    """sha256 of the bytes ``np.save`` writes for ``partitions`` (== the file's sha256)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(partitions, dtype=np.int64))
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _pq_class():
    try:
        from .pq_scanner import PQScanner
    except ImportError as exc:
        raise InputError(
            f"PQ scanner unavailable: amips.index.pq_scanner cannot be imported ({exc})"
        ) from exc
    return PQScanner


@dataclass
class SearchInfo:
    """What a search cost: lists and keys scanned per query, FLOPs per query."""

    nprobe: int
    router: str
    scanner: str
    keys_scanned_per_query: float
    router_flops_per_query: float
    scan_flops_per_query: float
    lists: torch.Tensor | None = field(default=None, repr=False)

    @property
    def flops_per_query(self) -> float:
        return self.router_flops_per_query + self.scan_flops_per_query


class IVFIndex:
    """Inverted-file index over keys, searched with a router and a scanner."""

    def __init__(
        self,
        centroids: torch.Tensor,
        keys_by_list: torch.Tensor,
        list_offsets: torch.Tensor,
        ids: torch.Tensor,
        *,
        metric: str = "ip",
        pq=None,
        meta: dict | None = None,
    ):
        if metric not in METRICS:
            raise InputError(f"metric: expected one of {METRICS}, got {metric!r}")
        self.centroids = centroids.float().contiguous()
        self.keys_by_list = keys_by_list.contiguous()
        self.list_offsets = list_offsets.long().contiguous()
        self.ids = ids.long().contiguous()
        self.metric = metric
        self.pq = pq
        self.meta = dict(meta or {})
        if self.list_offsets.numel() != self.centroids.shape[0] + 1:
            raise InputError("list_offsets: expected n_lists + 1 entries")
        if int(self.list_offsets[-1]) != self.keys_by_list.shape[0] or self.ids.numel() != self.keys_by_list.shape[0]:
            raise InputError("index arrays disagree on the number of keys")
        self.exact = ExactScanner(self.keys_by_list, self.list_offsets)
        self._router_cache: dict[str, Router] = {}
        self._partitions_sha: str | None = None
        self.inputs: dict | None = None  # provenance: fingerprints of the keys it was built from

    # ----------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        keys,
        n_lists: int,
        *,
        metric: str = "ip",
        iters: int = 20,
        seed: int = 0,
        kmeans_backend: str = "auto",
        kmeans_sample: int | None = 256,
        device: str | torch.device | None = None,
        partitions=None,
        centroids=None,
        storage_dtype: str = "float32",
        pq_subspaces: int | None = None,
        pq_bits: int = 4,
        anisotropic_threshold: float | None = None,
        pq_iters: int = 20,
        verbose: bool = False,
    ) -> IVFIndex:
        """k-means the keys into ``n_lists`` lists (or use given ``partitions``) and group them.

        ``metric``: ``"ip"`` (spherical k-means) or ``"l2"``. ``partitions`` (int list id
        per key) and ``centroids`` skip the k-means. ``pq_subspaces`` also trains the PQ
        scanner (``pq_bits`` 4 or 8, score-aware when ``anisotropic_threshold`` is set).
        """
        x = check_matrix(to_tensor(keys, "keys"), "keys")
        n_lists = check_positive_int(n_lists, "n_lists", maximum=x.shape[0])
        if device is not None:
            device = check_device(device, "device")
        if storage_dtype not in _STORAGE:
            raise InputError(f"storage_dtype: expected one of {sorted(_STORAGE)}, got {storage_dtype!r}")
        dev = torch.device(device) if device is not None else x.device
        if pq_subspaces:
            from .pq_scanner import check_threshold

            check_threshold(anisotropic_threshold)  # before the k-means, not after it
        key_log2 = check_storage_range(x, storage_dtype)
        # centroids from keys * 2^-key_log2 (exact): fp32 sums of keys near the ends of the
        # range would under- or overflow; "l2" centroids are scaled back
        xs = x if not key_log2 else x.double().mul(2.0**-key_log2).float()
        t0 = time.time()
        if partitions is None:
            if centroids is not None:
                raise InputError("centroids: given without partitions; pass both or neither")
            cents, part = kmeans(  # scales keys outside the safe range itself
                x, n_lists, metric=metric, iters=iters, seed=seed, backend=kmeans_backend,
                sample=kmeans_sample, device=dev, verbose=verbose,
            )
        else:
            part = check_int_vector(partitions, "partitions", length=x.shape[0]).to(dev)
            if int(part.max()) >= n_lists:
                raise InputError(f"partitions: list id {int(part.max())} >= n_lists = {n_lists}")
            if centroids is None:
                cents = _centroids_of(xs.to(dev), part, n_lists, metric)
                if key_log2 and metric == "l2":
                    cents = cents.double().mul(2.0**key_log2).float()
            else:
                cents = check_matrix(to_tensor(centroids, "centroids"), "centroids", dim=x.shape[1])
                if cents.shape[0] != n_lists:
                    raise InputError(f"centroids: expected {n_lists} rows, got {cents.shape[0]}")
                cents = cents.float().to(dev)
        order = torch.argsort(part, stable=True)
        counts = torch.bincount(part, minlength=n_lists)
        offsets = torch.zeros(n_lists + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.cumsum(counts, 0)
        keys_by_list = x.to(dev)[order.to(dev)]
        keys_by_list = keys_by_list.to(_STORAGE[storage_dtype])
        meta = {
            "build_seconds_kmeans": round(time.time() - t0, 3),
            "kmeans_iters": iters,
            "seed": seed,
            "storage_dtype": storage_dtype,
        }
        index = cls(cents, keys_by_list, offsets, order, metric=metric, meta=meta)
        index.inputs = {"keys": fingerprint(keys), "partitions": fingerprint(part)}
        if pq_subspaces is not None:
            index.train_pq(
                subspaces=pq_subspaces, bits=pq_bits,
                anisotropic_threshold=anisotropic_threshold, iters=pq_iters, seed=seed,
            )
        index.meta["build_seconds"] = round(time.time() - t0, 3)
        return index

    def train_pq(self, *, subspaces: int, bits: int = 4, anisotropic_threshold=None,
                 iters: int = 20, seed: int = 0, by_residual: bool = True) -> None:
        """Train the PQ scanner on the grouped keys (residuals to the list centroids).

        Keys outside the safe range are trained on as ``keys * 2^-e`` (see
        :meth:`scan_range`), the domain the scanners search them in."""
        PQScanner = _pq_class()
        key_log2, scan = self.scan_range()
        cents = self.centroids
        if key_log2 and self.metric == "l2":
            cents = cents.double().mul(2.0**-key_log2).float()
        self.pq = PQScanner.train(
            scan.keys_by_list.float(), self.list_offsets, cents,
            subspaces=int(subspaces), bits=int(bits),
            anisotropic_threshold=anisotropic_threshold, by_residual=by_residual,
            iters=int(iters), seed=int(seed),
        )

    # ----------------------------------------------------------------- facts
    @property
    def n_lists(self) -> int:
        return self.centroids.shape[0]

    @property
    def d(self) -> int:
        return self.centroids.shape[1]

    @property
    def n_keys(self) -> int:
        return self.keys_by_list.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys_by_list.device

    @property
    def list_sizes(self) -> torch.Tensor:
        return self.list_offsets[1:] - self.list_offsets[:-1]

    @property
    def partitions(self) -> torch.Tensor:
        """List id of every key, in the keys' original order (int64 [n])."""
        sizes = self.list_sizes.cpu()
        grouped = torch.repeat_interleave(torch.arange(self.n_lists), sizes)
        out = torch.empty(self.n_keys, dtype=torch.int64)
        out[self.ids.cpu()] = grouped
        return out

    @property
    def partitions_sha256(self) -> str:
        if self._partitions_sha is None:
            self._partitions_sha = partitions_digest(self.partitions.numpy())
        return self._partitions_sha

    @property
    def partitions_digests(self) -> tuple[str, str]:
        """Digests a router may record: of partitions.npy's bytes, and of the raw int64 array.
        Computed once (the lists of an index never change): ``search(router=model)`` wraps
        the model on every call and checks it against these."""
        cached = getattr(self, "_partitions_digests", None)
        if cached is None:
            raw = hashlib.sha256(np.ascontiguousarray(self.partitions.numpy()).tobytes()).hexdigest()
            cached = self._partitions_digests = (self.partitions_sha256, raw)
        return cached

    def keys(self) -> torch.Tensor:
        """The keys in original order (fp32 copy)."""
        out = torch.empty(self.n_keys, self.d, dtype=torch.float32, device=self.device)
        out[self.ids.to(self.device)] = self.keys_by_list.float()
        return out

    def __repr__(self) -> str:
        sizes = self.list_sizes
        pq = "" if self.pq is None else f", pq={self.pq.config()}"
        return (
            f"IVFIndex({self.n_keys:,} keys x {self.d}, {self.n_lists} lists "
            f"(sizes {int(sizes.min())}..{int(sizes.max())}), metric={self.metric}, "
            f"device={self.device}{pq})"
        )

    # ----------------------------------------------------------------- routing
    def router(self, router=None, *, dtype=None) -> Router:
        """A :class:`Router` for this index from None/'centroid', a spec, a model or a Router.

        ``dtype="bf16"``: a multi-head router (SupportNet, router-mlp) scores the lists with a
        bf16 copy of its model, ~3x faster on CPUs with AMX or avx512_bf16 for a few lists
        changed in a thousand queries (bench/RESULTS.md); the default is fp32."""
        if router is None:
            router = "centroid"
        dt = router_dtype(dtype)
        if dt != torch.float32 and (isinstance(router, Router) or router == "centroid"):
            raise InputError("dtype: bf16 list scores are for a multi-head model router (router:DIR, "
                             "supportnet:DIR or a model), not a centroid router or a built Router")
        if isinstance(router, Router):
            if router.n_lists != self.n_lists or router.d != self.d:
                raise InputError(
                    f"router: built for {router.n_lists} lists x d = {router.d}, the index has "
                    f"{self.n_lists} lists x d = {self.d}"
                )
            return router
        if isinstance(router, str):
            key = (router, dt)
            if key in self._router_cache:
                return self._router_cache[key]
            kind, path = parse_router_spec(router)
            if kind == "centroid":
                built: Router = CentroidRouter(self.centroids)
            else:
                built = self._router_from_model(load_router_model(path, self.device), kind, dtype=dt)
            self._router_cache[key] = built
            return built
        if isinstance(router, torch.nn.Module) or hasattr(router, "score"):
            kind = str(getattr(router, "kind", "supportnet"))
            return self._router_from_model(router, "keynet" if kind == "keynet" else "supportnet", dtype=dt)
        raise InputError(f"router: expected None, a spec string, a model or a Router, got {type(router).__name__}")

    def _router_from_model(self, model, kind: str, *, dtype=None) -> Router:
        model_d = (getattr(model, "config", {}) or {}).get("d")
        if model_d is not None and int(model_d) != self.d:
            raise InputError(f"router: the model takes d = {model_d}, the index has d = {self.d}")
        check_model_for_index_keys(model, self)
        if kind in ("keynet", "keynet-route"):
            if router_dtype(dtype) != torch.float32:
                raise InputError("dtype: bf16 list scores are for a multi-head router, not KeyNet routing")
            return KeyNetRouter(model, self.centroids, scan_with="key" if kind == "keynet" else "query")
        return SupportRouter(model, self.n_lists, self.d, self.partitions_digests, dtype=dtype)

    def route(self, queries, nprobe: int, router=None, *, probe_margin=None) -> Route:
        return self.router(router).route(self._queries(queries), nprobe, probe_margin)

    def _queries(self, queries) -> torch.Tensor:
        q = check_matrix(to_tensor(queries, "queries"), "queries", dim=self.d)
        return q.to(self.device, torch.float32)

    # ----------------------------------------------------------------- search
    def _scanner(self, scanner: str | None):
        if scanner is None:
            scanner = "exact"
        if scanner == "exact":
            return self.exact
        if scanner == "pq":
            if self.pq is None:
                raise InputError(
                    "scanner: this index has no PQ codes; build it with --pq-subspaces M "
                    "(IVFIndex.build(..., pq_subspaces=M))"
                )
            return self.pq
        raise InputError(f"scanner: expected 'exact' or 'pq', got {scanner!r}")

    # ----------------------------------------------------------------- range
    def scan_range(self, key_log2: int | None = None) -> tuple[int, ExactScanner]:
        """(e, exact scanner over ``keys_by_list * 2^-e``): the keys as the scanners see them.

        e = 0 (the stored keys, no copy) when the largest |key value| lies in
        [2^-30, 2^30]; otherwise an fp32 copy scaled to [0.5, 1) is kept (exact: a power of
        two), so fp32 scores neither underflow nor overflow; search scales the results back.
        ``key_log2``: use this exponent (a shard of an index uses the whole index's)."""
        cached = getattr(self, "_range", None)
        if cached is not None and (key_log2 is None or cached[0] == key_log2):
            return cached
        if key_log2 is None:
            peak = float(self.keys_by_list.abs().amax()) if self.keys_by_list.numel() else 0.0
            key_log2 = range_exponent(peak)
        if key_log2 == 0:
            scan = self.exact
        else:
            scaled = (self.keys_by_list.double() * 2.0**-key_log2).float()
            scan = ExactScanner(scaled, self.list_offsets)
        self._range = (int(key_log2), scan)
        return self._range

    def prepare_queries(self, queries, rt: Router, nprobe: int, probe_margin=None):
        """Route ``queries`` and bring the scan queries into fp32's safe range.

        Returns ``(route, scan_queries fp32, e)``: the scan scores ``scan_queries`` against
        ``keys * 2^-key_log2``; ``e`` [nq] int64 (or None: nothing was scaled) is the exponent
        that turns those scores into the original ones (query and key scales together). A
        centroid or fixed router ranks lists identically for any power-of-two row scale, so
        it routes the scaled queries; a learned router gets the original ones (float32)."""
        q = check_matrix(to_tensor(queries, "queries"), "queries", dim=self.d).to(self.device)
        key_log2, _ = self.scan_range()
        eq = row_exponents(q)
        if eq is None and q.dtype == torch.float32:
            qs = q
        else:
            qs = scale_rows(q, eq)
        routed_scaled = getattr(rt, "scale_equivariant", False) and probe_margin is None
        if routed_scaled:
            route = rt.route(qs, nprobe, probe_margin)
            if route.scan_queries is qs:
                return route, qs, _add_exponent(eq, key_log2, qs.shape[0], qs.device)
        else:
            if eq is not None and (q.abs().amax() > FLOAT32_MAX or ((q != 0) & (q.float() == 0)).any()):
                raise InputError(
                    "queries: values outside float32's range; a learned router reads float32 "
                    "queries: scale them by a power of two (or route with the centroids)"
                )
            route = rt.route(q.float() if q.dtype != torch.float32 else q, nprobe, probe_margin)
        sq = route.scan_queries.float()
        es = row_exponents(sq)
        if es is not None:
            sq = scale_rows(sq, es)
        if routed_scaled and eq is not None:  # scan queries of the scaled queries: both scales
            es = eq.to(sq.device) if es is None else es + eq.to(sq.device)
        return route, sq, _add_exponent(es, key_log2, sq.shape[0], sq.device)

    def search(
        self,
        queries,
        k: int = 10,
        nprobe: int = 8,
        router=None,
        *,
        scanner: str | None = None,
        reorder: int = 0,
        probe_margin: float | None = None,
        return_info: bool = False,
        score_dtype="float32",
    ):
        """Top-k keys (original ids) for every query, probing ``nprobe`` lists chosen by ``router``.

        Returns ``(scores [nq, k] fp32, ids [nq, k] int64)`` best first (``-inf``/``-1``
        where fewer than k keys were scanned), plus a :class:`SearchInfo` with
        ``return_info=True``. ``scanner``: ``"exact"`` (default) or ``"pq"`` (with
        ``reorder`` exact re-scores). With KeyNet substitution the scores are those of the
        substituted query. ``probe_margin``: adaptive probing; a query probes, of its best
        ``nprobe`` lists, only those the router scores within ``probe_margin`` of its best
        list (always that one), so confident queries scan fewer lists (default: all nprobe).

        Magnitudes: queries and keys of any finite size are searched exactly as at unit
        scale (exact power-of-two scaling, see :meth:`scan_range`); ``score_dtype``
        ``"float32"`` (default) refuses, by name, scores float32 cannot hold (beyond 3.4e38,
        or a query whose scores are all below 1.2e-38), ``"float64"`` returns them exactly.
        """
        k = check_positive_int(k, "k")
        nprobe = check_positive_int(nprobe, "nprobe", maximum=self.n_lists)
        if isinstance(reorder, bool) or not isinstance(reorder, (int, np.integer)) or reorder < 0:
            raise InputError(f"reorder: expected an integer >= 0, got {reorder!r}")
        score_dtype = check_score_dtype(score_dtype)
        rt = self.router(router)
        scan = self._scanner(scanner)
        route, sq, e = self.prepare_queries(queries, rt, nprobe, probe_margin)
        _, exact = self.scan_range()
        if scan is self.exact:
            scores, pos = exact.search(sq, route.lists, k)
        else:
            scores, pos = scan.search(
                sq, route.lists, k, reorder=int(reorder), keys_by_list=exact.keys_by_list
            )
        pos = pos.to(self.device)
        scores = finish_scores(scores, pos, e, score_dtype)
        ids = torch.where(pos >= 0, self.ids[pos.clamp(min=0)], torch.full_like(pos, -1))
        if not return_info:
            return scores, ids
        scanned = _scanned(self.list_sizes, route.lists)
        info = SearchInfo(
            nprobe=nprobe,
            router=rt.describe(),
            scanner=getattr(scan, "name", "?"),
            keys_scanned_per_query=scanned,
            router_flops_per_query=float(rt.flops_per_query(nprobe)),
            scan_flops_per_query=float(scan.flops_per_query(scanned, nprobe, int(reorder))),
            lists=route.lists,
        )
        return scores, ids, info

    def flops_per_query(self, queries, nprobe: int, router=None, *, scanner=None, reorder: int = 0,
                        probe_margin=None) -> float:
        """Router plus scan FLOPs per query, with the actual sizes of the lists ``queries`` probe."""
        rt = self.router(router)
        route = rt.route(self._queries(queries), nprobe, probe_margin)
        scanned = _scanned(self.list_sizes, route.lists)
        scan = self._scanner(scanner)
        return float(rt.flops_per_query(nprobe)) + float(scan.flops_per_query(scanned, nprobe, int(reorder)))

    # ----------------------------------------------------------------- faiss
    def to_faiss(self, kind: str = "flat", **kwargs):
        """Export to a faiss IVF index on these lists (see :mod:`amips.index.faiss_backend`)."""
        from .faiss_backend import to_faiss

        return to_faiss(self, kind=kind, **kwargs)

    def to(self, device) -> IVFIndex:
        dev = torch.device(device)
        out = IVFIndex(
            self.centroids.to(dev), self.keys_by_list.to(dev), self.list_offsets.to(dev),
            self.ids.to(dev), metric=self.metric, pq=self.pq, meta=self.meta,
        )
        out._partitions_sha = self._partitions_sha
        out.inputs = self.inputs
        return out

    # ----------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        # the folder stops looking complete before any of its files changes
        atomic_write(root / ".incomplete", lambda f: f.write(b"index files are being written\n"))
        (root / "index.json").unlink(missing_ok=True)
        atomic_save_npy(root / "centroids.npy", self.centroids.cpu().numpy())
        atomic_save_npy(root / "partitions.npy", self.partitions.numpy())
        tensors = {
            "keys_by_list": self.keys_by_list.cpu().contiguous(),
            "list_offsets": self.list_offsets.cpu().contiguous(),
            "ids": self.ids.cpu().contiguous(),
        }
        atomic_write(root / "lists.safetensors", lambda f: f.write(_safetensors_bytes(tensors)))
        fault_point("index-files")
        pq_cfg = None
        if self.pq is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.pq.state_dict().items()}
            atomic_write(root / "pq.safetensors", lambda f: f.write(_safetensors_bytes(state)))
            pq_cfg = self.pq.config()
        elif (root / "pq.safetensors").exists():
            (root / "pq.safetensors").unlink()
        cfg = {
            "complete": True,
            "inputs": self.inputs,
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "n_keys": self.n_keys,
            "d": self.d,
            "n_lists": self.n_lists,
            "metric": self.metric,
            "storage_dtype": str(self.keys_by_list.dtype).replace("torch.", ""),
            "partitions_sha256": file_sha256(root / "partitions.npy"),
            "list_sizes": {"min": int(self.list_sizes.min()), "max": int(self.list_sizes.max())},
            "pq": pq_cfg,
            "meta": self.meta,
            # size + blake2b of every file, hashed while it was written (no second read)
            "files": files_record(root, _INDEX_DATA_FILES),
        }
        atomic_save_json(root / "index.json", cfg)
        (root / ".incomplete").unlink(missing_ok=True)
        return root

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> IVFIndex:
        from safetensors.torch import load_file

        root = Path(path)
        cfg_path = root / "index.json"
        if not root.is_dir():
            raise InputError(f"index: {root} is not a folder")
        if not cfg_path.exists() or (root / ".incomplete").exists():
            raise InputError(f"index: {root} has no complete index.json (not an amips index, or its build "
                             "did not finish: rerun the same `amips index build` to finish it)")
        cfg = read_index_json(root)
        for name in ("centroids.npy", "partitions.npy", "lists.safetensors"):
            if not (root / name).exists():
                raise InputError(f"index: {root} is missing {name}")
        if cfg.get("files") is not None:
            # every file against the size and content digest recorded when it was written
            check_files(root, cfg["files"], "index", names=[n for n in _INDEX_DATA_FILES if n in cfg["files"]])
        sha = file_sha256(root / "partitions.npy")
        if sha != cfg["partitions_sha256"]:
            raise InputError(f"index: {root}/partitions.npy does not match index.json (modified or corrupt)")
        dev = check_device(device, "device") if device is not None else torch.device("cpu")
        from safetensors import SafetensorError

        try:
            tensors = load_file(str(root / "lists.safetensors"))
            for name in ("keys_by_list", "list_offsets", "ids"):
                if name not in tensors:
                    raise InputError(f"index: {root / 'lists.safetensors'} has no tensor {name!r}")
            centroids = torch.from_numpy(np.ascontiguousarray(load_npy(
                root / "centroids.npy", "index", ndim=2, kind="f", shape=(cfg["n_lists"], cfg["d"]))))
            pq = None
            if cfg.get("pq"):
                PQScanner = _pq_class()
                pq = PQScanner.from_state(load_file(str(root / "pq.safetensors")), cfg["pq"])
        except (SafetensorError, OSError, EOFError, ValueError, KeyError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(
                f"index: {root} has a truncated or corrupt file ({exc.__class__.__name__}: "
                f"{str(exc)[:160]}); rebuild it with `amips index build --overwrite`"
            ) from None
        try:
            index = cls(
                centroids.to(dev), tensors["keys_by_list"].to(dev), tensors["list_offsets"].to(dev),
                tensors["ids"].to(dev), metric=cfg["metric"], pq=pq, meta=cfg.get("meta"),
            )
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"index: {root} arrays are inconsistent ({exc.__class__.__name__}: "
                             f"{str(exc)[:120]}); rebuild it with `amips index build --overwrite`") from None
        index._partitions_sha = sha
        index.inputs = cfg.get("inputs")
        if index.n_keys != cfg["n_keys"] or index.d != cfg["d"] or index.n_lists != cfg["n_lists"]:
            raise InputError(f"index: {root} arrays disagree with index.json")
        return index


def check_storage_range(keys, storage_dtype: str, *, peak: float | None = None,
                        source_dtype=None) -> int:
    """The keys' range exponent (see :meth:`IVFIndex.scan_range`), after checking that the
    storage dtype holds them: an InputError naming ``storage_dtype`` (or ``keys``) for keys
    it would store as inf, or whose largest value it would store as a subnormal or 0.
    ``peak`` / ``source_dtype``: the largest |value| and dtype of the keys as given, when
    ``keys`` is already a converted copy (a float64 file read as float32)."""
    if storage_dtype not in _STORAGE:
        raise InputError(f"storage_dtype: expected one of {sorted(_STORAGE)}, got {storage_dtype!r}")
    if peak is None:
        peak = float(keys.abs().amax()) if keys.numel() else 0.0
    info = torch.finfo(_STORAGE[storage_dtype])
    same = (source_dtype if source_dtype is not None else keys.dtype) == _STORAGE[storage_dtype]
    if peak > info.max:
        shift = -_frexp_exponent(peak)
        if storage_dtype == "float16":
            raise InputError(
                f"storage_dtype: float16 holds |values| <= {info.max:g}, the keys reach {peak:.3g} "
                f"(they would be stored as inf); use float32 or bfloat16, or scale the keys by "
                f"2**{shift} (which changes no ranking)"
            )
        raise InputError(
            f"keys: values reach {peak:.3g}, beyond float32's range (3.4e38) the index stores "
            f"and scans in; scale the keys by 2**{shift} (which changes no ranking)"
        )
    if 0 < peak < info.tiny and not same:
        shift = -_frexp_exponent(peak)
        raise InputError(
            f"storage_dtype: {storage_dtype} keeps values below {info.tiny:.3g} as subnormals "
            f"or 0, and the keys' largest |value| is {peak:.3g}; use storage_dtype float32, or "
            f"scale the keys by 2**{shift} (which changes no ranking)"
        )
    return range_exponent(peak)


def _frexp_exponent(x: float) -> int:
    return math.frexp(x)[1]


def _add_exponent(e: torch.Tensor | None, key_log2: int, n: int, device) -> torch.Tensor | None:
    if not key_log2:
        return e
    base = torch.zeros(n, dtype=torch.int64, device=device) if e is None else e.to(device)
    return base + int(key_log2)


def finish_scores(scores: torch.Tensor, pos: torch.Tensor, e: torch.Tensor | None, score_dtype) -> torch.Tensor:
    """Scan scores (of the scaled problem) -> the original problem's, in ``score_dtype``
    (see :func:`amips.numerics.unscale_rows`); -inf where no key was found."""
    if e is None:  # nothing was scaled: in-range fp32 scores cannot overflow, but say so if they did
        if not bool(torch.isfinite(scores[pos >= 0]).all()):
            raise InputError(
                "queries: scores overflow float32 (|<q, k>| > 3.4e38) for these queries and keys; "
                "scale the queries (or the keys) down by a power of two, which changes no ranking"
            )
        return scores if scores.dtype == score_dtype else scores.to(score_dtype)
    return unscale_rows(scores, e, score_dtype, what="scores", names="queries")


_INDEX_DATA_FILES = ("centroids.npy", "partitions.npy", "lists.safetensors", "pq.safetensors")


def read_index_json(root: Path) -> dict:
    """``index.json`` through the checked loader: one-line errors naming the field."""
    cfg_path = Path(root) / "index.json"
    cfg = read_json(cfg_path, "index", fields={"format": str})
    if cfg.get("format") != FORMAT:
        raise InputError(f"index: {cfg_path} is not an amips IVF index (format {cfg.get('format')!r})")
    cfg = read_json(cfg_path, "index", fields={
        "version": int, "n_keys": int, "d": int, "n_lists": int, "metric": str,
        "partitions_sha256": str, "pq": (dict, type(None)), "files": (dict, type(None)),
        "inputs": (dict, type(None)),
    })
    if not isinstance(cfg.get("meta"), (dict, type(None))):
        raise InputError(f"index: {cfg_path} field 'meta' must be an object, got {cfg['meta']!r:.60}")
    if cfg["version"] > FORMAT_VERSION:
        raise InputError(f"index: {cfg_path} has format version {cfg['version']}, newer than this amips reads")
    if cfg["metric"] not in ("ip", "l2"):
        raise InputError(f"index: {cfg_path} field 'metric' must be 'ip' or 'l2', got {cfg['metric']!r}")
    for name in ("n_keys", "d", "n_lists"):
        if cfg[name] < 1:
            raise InputError(f"index: {cfg_path} field {name!r} must be >= 1, got {cfg[name]}")
    return cfg


def _scanned(list_sizes: torch.Tensor, lists: torch.Tensor) -> float:
    """Mean keys per query in the probed ``lists`` (-1 = not probed)."""
    if not lists.shape[0]:
        return 0.0
    sizes = torch.where(lists >= 0, list_sizes.to(lists.device)[lists.clamp_min(0)], 0)
    return float(sizes.sum(1).double().mean())


def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _centroids_of(x: torch.Tensor, part: torch.Tensor, n_lists: int, metric: str) -> torch.Tensor:
    sums = torch.zeros(n_lists, x.shape[1], dtype=torch.float32, device=x.device)
    for a in range(0, x.shape[0], 65536):
        sums.index_add_(0, part[a : a + 65536], x[a : a + 65536].float())
    counts = torch.bincount(part, minlength=n_lists).clamp(min=1).float()
    cents = sums / counts[:, None]
    if metric == "ip":
        cents = torch.nn.functional.normalize(cents, dim=1)
    return cents
