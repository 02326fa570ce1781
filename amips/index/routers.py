"""Routers: which IVF lists a query probes, in order, and what the scan is fed with.

Every router has one interface::

    route(queries [nq, d] fp32, nprobe) -> Route(lists [nq, nprobe] int64, scan_queries [nq, d])
    flops_per_query(nprobe) -> float      # the router's own cost, scan excluded

``lists`` are valid list ids, distinct per row, ordered best first (ties by lower list id).
``scan_queries`` is what the scanner scores keys with: the query itself, or the KeyNet key
for the drop-in substitution.

- :class:`CentroidRouter`: score every list by <q, centroid> (the IVF baseline).
- :class:`SupportRouter`: a multi-head model (SupportNet, or the unconstrained multi-head
  router) predicts every list's support value max_{k in list} <q, k>; probe the best heads.
- :class:`KeyNetRouter`: replace q by KeyNet(q) (or any model's predicted key) for routing
  by centroids; ``scan_with="key"`` also scans with it (the paper's drop-in replacement),
  ``scan_with="query"`` routes with the key but scans with q.

FLOPs count a multiply-add as 2: centroid scores cost 2·L·d per query; a model costs its
own ``flops_per_query`` (forward, plus the key gradient where the key is used). Picking the
best nprobe of L scores (comparisons) is not counted.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import numpy as np
import torch

from .._validate import InputError, check_matrix, check_positive_int, to_tensor

_MODEL_BATCH = 1024  # CPU: cache-sized blocks beat one big GEMM chain


@dataclass
class Route:
    lists: torch.Tensor  # [nq, nprobe] int64, best first
    scan_queries: torch.Tensor  # [nq, d]


def top_lists(scores: torch.Tensor, nprobe: int) -> torch.Tensor:
    """Best ``nprobe`` columns of ``scores`` [nq, L] per row, best first, ties by lower id.

    A partial selection picks the candidates (numpy ``argpartition`` on CPU, ``torch.topk``
    elsewhere; a full stable sort of every row costs more than a small router's forward on
    CPU); rows where the nprobe-th score is tied with a column
    left out are redone with a stable sort, so the result is exactly the stable order.
    """
    n_lists = scores.shape[1]
    nprobe = check_positive_int(nprobe, "nprobe", maximum=n_lists)
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    if nprobe == n_lists or scores.shape[0] == 0:
        return torch.argsort(scores, dim=1, descending=True, stable=True)[:, :nprobe].contiguous()
    # any top-nprobe set will do (its order is set below): on CPU numpy's introselect is
    # ~3x torch.topk for rows of a few hundred lists (a sorted topk ~1.7x more again)
    if scores.device.type == "cpu":
        part = np.argpartition(scores.detach().numpy(), n_lists - nprobe, axis=1)[:, n_lists - nprobe:]
        idx = torch.from_numpy(np.ascontiguousarray(part)).long()
        vals = scores.gather(1, idx)
    else:
        vals, idx = torch.topk(scores, nprobe, dim=1, sorted=False)
    # a boundary tie: more columns equal to the last kept score than slots left for them
    kth = vals.amin(1, keepdim=True)
    n_ge = (scores >= kth).sum(1)
    bad = torch.nonzero(n_ge > nprobe)[:, 0]
    # order the selection by (score desc, id asc)
    o1 = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, o1), idx.gather(1, o1)
    o2 = torch.argsort(vals, dim=1, descending=True, stable=True)
    idx = idx.gather(1, o2)
    if bad.numel():
        idx[bad] = torch.argsort(scores[bad], dim=1, descending=True, stable=True)[:, :nprobe]
    return idx.contiguous()


def _as_queries(queries, d: int | None) -> torch.Tensor:
    q = check_matrix(to_tensor(queries, "queries"), "queries", dim=d)
    return q.float()


class Router(abc.ABC):
    """Ranks IVF lists for queries; subclasses give the list scores and their FLOP cost."""

    name = "router"
    n_lists: int
    d: int

    @abc.abstractmethod
    def list_scores(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [nq, L] of every list, scan queries [nq, d])."""

    def route(self, queries, nprobe: int) -> Route:
        q = _as_queries(queries, self.d)
        nprobe = check_positive_int(nprobe, "nprobe", maximum=self.n_lists)
        scores, scan_q = self.list_scores(q)
        return Route(top_lists(scores, nprobe), scan_q)

    @abc.abstractmethod
    def flops_per_query(self, nprobe: int) -> float:
        """Routing FLOPs per query (a multiply-add counts 2)."""

    def describe(self) -> str:
        return self.name


class CentroidRouter(Router):
    name = "centroid"

    def __init__(self, centroids: torch.Tensor):
        self.centroids = check_matrix(to_tensor(centroids, "centroids"), "centroids").float()
        self.n_lists, self.d = self.centroids.shape

    def list_scores(self, queries):
        c = self.centroids if self.centroids.device == queries.device else self.centroids.to(queries.device)
        return queries @ c.T, queries

    def flops_per_query(self, nprobe: int) -> float:
        return 2.0 * self.n_lists * self.d


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _run_model(fn, model, queries: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` (a model method) in batches, on the model's device, result on queries'."""
    dev = _model_device(model)
    outs = []
    for a in range(0, queries.shape[0], _MODEL_BATCH):
        block = queries[a : a + _MODEL_BATCH].to(dev)
        out = fn(block)
        outs.append(out.detach().float().to(queries.device))
    return torch.cat(outs) if outs else torch.empty(0)


def _model_name(model) -> str:
    return str(getattr(model, "kind", type(model).__name__))


def check_model_for_index(model, n_lists: int, partitions_sha256=None) -> None:
    """Reject a multi-head router trained for another partition of the keys.

    ``partitions_sha256``: the index's digest, or a tuple of accepted digests.
    """
    n_heads = int(getattr(model, "n_heads", 1))
    cfg = getattr(model, "config", {}) or {}
    trained_for = cfg.get("n_partitions")
    if n_heads != n_lists or (trained_for is not None and int(trained_for) != n_lists):
        raise InputError(
            f"router: the {_model_name(model)} model has {n_heads} heads "
            f"({'trained without partitions' if trained_for is None else f'trained for {trained_for} partitions'}) "
            f"but the index has {n_lists} lists; "
            "train it with `amips train --partitions INDEXDIR/partitions.npy` for this index"
        )
    theirs = cfg.get("partitions_sha256")
    ours = (partitions_sha256,) if isinstance(partitions_sha256, str) else partitions_sha256
    if ours and theirs is not None and theirs not in ours:
        raise InputError(
            "router: the model was trained for another index (partitions_sha256 "
            f"{str(theirs)[:12]}... != this index's {ours[0][:12]}...); retrain it "
            "with `amips train --partitions INDEXDIR/partitions.npy`"
        )


class SupportRouter(Router):
    """Multi-head model: one predicted support value per list; probe the best heads."""

    def __init__(self, model, n_lists: int, d: int, partitions_sha256=None):
        if not hasattr(model, "score"):
            raise InputError("router: the model has no score() method")
        check_model_for_index(model, n_lists, partitions_sha256)
        self.model = model
        self.n_lists, self.d = int(n_lists), int(d)
        self.name = _model_name(model)

    def list_scores(self, queries):
        with torch.no_grad():
            scores = _run_model(self.model.score, self.model, queries)
        if scores.dim() != 2 or scores.shape[1] != self.n_lists:
            raise InputError(
                f"router: model.score returned shape {tuple(scores.shape)}, expected "
                f"[{queries.shape[0]}, {self.n_lists}]"
            )
        return scores, queries

    def flops_per_query(self, nprobe: int) -> float:
        return float(self.model.flops_per_query(with_key=False))


class KeyNetRouter(Router):
    """Route by <KeyNet(q), centroid>; scan with the key (``scan_with="key"``) or with q."""

    def __init__(self, model, centroids: torch.Tensor, scan_with: str = "key"):
        if scan_with not in ("key", "query"):
            raise InputError(f"scan_with: expected 'key' or 'query', got {scan_with!r}")
        if not hasattr(model, "predict_key"):
            raise InputError("router: the model has no predict_key() method")
        if int(getattr(model, "n_heads", 1)) != 1:
            raise InputError(
                f"router: KeyNet substitution needs a single-head model, got "
                f"{getattr(model, 'n_heads', '?')} heads (use supportnet:RUNDIR for multi-head)"
            )
        self.model = model
        self.centroids = check_matrix(to_tensor(centroids, "centroids"), "centroids").float()
        self.n_lists, self.d = self.centroids.shape
        self.scan_with = scan_with
        self.name = _model_name(model) + ("" if scan_with == "key" else "-route-only")

    def list_scores(self, queries):
        with torch.no_grad():  # a SupportNet's predict_key enables grad itself
            key = _run_model(self.model.predict_key, self.model, queries)
        if key.dim() == 3 and key.shape[1] == 1:
            key = key[:, 0]
        if key.shape != queries.shape:
            raise InputError(
                f"router: model.predict_key returned shape {tuple(key.shape)}, expected "
                f"{tuple(queries.shape)}"
            )
        c = self.centroids.to(queries.device)
        scan_q = key if self.scan_with == "key" else queries
        return key @ c.T, scan_q.contiguous()

    def flops_per_query(self, nprobe: int) -> float:
        return float(self.model.flops_per_query(with_key=True)) + 2.0 * self.n_lists * self.d


class FixedRouter(Router):
    """Routes given in advance (tests, external routers): lists [nq, >= nprobe]."""

    name = "fixed"

    def __init__(self, lists: torch.Tensor, n_lists: int, d: int, cost: float = 0.0):
        self.lists = lists.long()
        self.n_lists, self.d, self.cost = int(n_lists), int(d), float(cost)

    def list_scores(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The given order as scores: the r-th given list scores -r, lists not given -inf."""
        q = _as_queries(queries, self.d)
        if self.lists.shape[0] != q.shape[0]:
            raise InputError(f"router: {self.lists.shape[0]} fixed routes for {q.shape[0]} queries")
        lists = self.lists.to(q.device)
        scores = torch.full((q.shape[0], self.n_lists), -math.inf, device=q.device)
        rank = -torch.arange(lists.shape[1], device=q.device, dtype=scores.dtype).expand_as(lists)
        valid = lists >= 0
        scores[torch.nonzero(valid)[:, 0], lists[valid]] = rank[valid]
        return scores, q

    def route(self, queries, nprobe: int) -> Route:
        q = _as_queries(queries, self.d)
        nprobe = check_positive_int(nprobe, "nprobe", maximum=self.lists.shape[1])
        if self.lists.shape[0] != q.shape[0]:
            raise InputError(f"router: {self.lists.shape[0]} fixed routes for {q.shape[0]} queries")
        return Route(self.lists[:, :nprobe].to(q.device).contiguous(), q)

    def flops_per_query(self, nprobe: int) -> float:
        return self.cost


ROUTER_KINDS = ("centroid", "supportnet", "router", "keynet", "keynet-route")


def parse_router_spec(spec: str) -> tuple[str, str | None]:
    """'centroid' | 'supportnet:RUNDIR' | 'router:RUNDIR' | 'keynet:RUNDIR' | 'keynet-route:RUNDIR'."""
    if not isinstance(spec, str) or not spec:
        raise InputError(f"router: expected a router spec string, got {spec!r}")
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in ROUTER_KINDS:
        raise InputError(
            f"router: unknown kind {kind!r} in {spec!r}; expected centroid, supportnet:RUNDIR, "
            "router:RUNDIR, keynet:RUNDIR or keynet-route:RUNDIR"
        )
    if kind == "centroid":
        if path:
            raise InputError(f"router: 'centroid' takes no RUNDIR, got {spec!r}")
        return kind, None
    if not path:
        raise InputError(f"router: {kind} needs a run folder, e.g. {kind}:runs/my-model")
    return kind, path


def load_router_model(path: str, device: str | torch.device = "cpu"):
    """``amips.load_model`` (the SupportNet/KeyNet module) on ``device`` (the index's, so the
    router runs where the scan does), with a clear error when absent."""
    try:
        from ..models import load_model
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise InputError(f"router: learned routers need amips.models ({exc})") from exc
    return load_model(path, device=device)
