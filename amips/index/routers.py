"""Routers: which IVF lists a query probes, in order, and what the scan is fed with.

Every router has one interface::

    route(queries [nq, d] fp32, nprobe, margin=None) -> Route(lists [nq, nprobe] int64, scan_queries [nq, d])
    flops_per_query(nprobe) -> float      # the router's own cost, scan excluded

``lists`` are valid list ids, distinct per row, ordered best first (ties by lower list id);
with a probe margin (adaptive probing) the lists left out are -1.
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
import copy
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

    One more column than asked is selected (``torch.topk`` for a few lists, numpy's
    ``argpartition`` beyond), so a tie across the cut shows as the (nprobe+1)-th score
    equalling the nprobe-th without another pass over the row; those rows, and rows whose
    selection holds equal scores, are redone with a stable sort, so the result is exactly
    the stable order. A full stable sort of every row costs more than a small router's
    forward on CPU.
    """
    n_lists = scores.shape[1]
    nprobe = check_positive_int(nprobe, "nprobe", maximum=n_lists)
    scores = scores.float()
    if scores.numel() and bool(torch.isnan(scores.amax())):  # amax propagates NaN: one cheap pass
        scores = torch.nan_to_num(scores, nan=float("-inf"))
    if nprobe >= n_lists - 1 or scores.shape[0] == 0:
        return torch.argsort(scores, dim=1, descending=True, stable=True)[:, :nprobe].contiguous()
    kk = nprobe + 1
    if scores.device.type != "cpu" or kk <= _TOPK_MAX_CPU:
        vals, idx = torch.topk(scores, kk, dim=1, sorted=True)
    else:
        # one thread: numpy's introselect beats torch.topk from ~8 of a few hundred lists
        part = np.argpartition(scores.detach().numpy(), n_lists - kk, axis=1)[:, n_lists - kk:]
        idx = torch.from_numpy(np.ascontiguousarray(part)).long()
        vals, o = torch.sort(scores.gather(1, idx), dim=1, descending=True)
        idx = idx.gather(1, o)
    # rows to redo: a tie across the cut (the set itself is ambiguous), or equal scores
    # inside the selection (topk/sort leave their order arbitrary; the rule is lower id)
    bad = (vals[:, 1:] == vals[:, :-1]).any(1).nonzero().squeeze(1)
    idx = idx[:, :nprobe]
    if bad.numel():
        idx = idx.clone()
        idx[bad] = _stable_top(scores[bad], vals[bad, nprobe - 1], nprobe)
    return idx.contiguous()


def _stable_top(rows: torch.Tensor, kth: torch.Tensor, nprobe: int) -> torch.Tensor:
    """Best ``nprobe`` columns of ``rows`` by (score desc, id asc), given each row's
    nprobe-th largest score ``kth``: only the columns scoring >= it can be chosen, so they
    alone are sorted (a tie run of bf16 router scores is a few columns, not the whole row)."""
    width = int((rows >= kth[:, None]).sum(1).max())
    if 2 * width >= rows.shape[1]:
        return torch.argsort(rows, dim=1, descending=True, stable=True)[:, :nprobe]
    v, i = torch.topk(rows, width, dim=1, sorted=False)
    o = torch.argsort(i, dim=1)
    v, i = v.gather(1, o), i.gather(1, o)
    o = torch.argsort(v, dim=1, descending=True, stable=True)[:, :nprobe]
    return i.gather(1, o)


def check_margin(margin) -> float | None:
    """``probe_margin``: None (probe all nprobe lists) or a finite score difference >= 0."""
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(margin)) or float(margin) < 0:
        raise InputError(f"probe_margin: expected None or a finite number >= 0, got {margin!r}")
    return float(margin)


def within_margin(scores: torch.Tensor, lists: torch.Tensor, margin: float | None) -> torch.Tensor:
    """Adaptive probing: of each query's chosen ``lists`` (best first) keep the first and
    those whose router score is at least (the first's score - ``margin``); the others
    become -1 (not probed). A learned router's scores are predicted best inner products
    per list, so the gap says how sure it is; a confident query probes one list, an unsure
    one up to nprobe. A NaN score is never within the margin."""
    if margin is None or lists.shape[1] < 2:
        return lists
    s = scores.gather(1, lists).float()
    keep = s >= s[:, :1] - margin
    keep[:, 0] = True
    return torch.where(keep, lists, torch.full_like(lists, -1))


# torch.topk of a few columns beats numpy's argpartition on one CPU thread up to about this
# many (548 and 343 lists, 2,000 rows: 1.9 vs 3.4 us a row at 3 columns, 7.6 vs 3.7 at 9)
_TOPK_MAX_CPU = 5


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def router_dtype(dtype) -> torch.dtype:
    """The precision a multi-head router scores lists in: None/'fp32' (default) or 'bf16'."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InputError(f"dtype: expected 'fp32' or 'bf16' for the router's list scores, got {dtype!r}")


def _as_queries(queries, d: int | None) -> torch.Tensor:
    q = check_matrix(to_tensor(queries, "queries"), "queries", dim=d)
    return q.float()


class Router(abc.ABC):
    """Ranks IVF lists for queries; subclasses give the list scores and their FLOP cost."""

    name = "router"
    n_lists: int
    d: int
    # True when multiplying a query by a power of two (per row) changes none of its lists:
    # search may then route the range-scaled queries (amips.numerics)
    scale_equivariant = False

    @abc.abstractmethod
    def list_scores(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [nq, L] of every list, scan queries [nq, d])."""

    def route(self, queries, nprobe: int, margin=None) -> Route:
        """The best ``nprobe`` lists of every query; with ``margin`` (see
        :func:`within_margin`), only those scoring within ``margin`` of the query's best."""
        q = _as_queries(queries, self.d)
        nprobe = check_positive_int(nprobe, "nprobe", maximum=self.n_lists)
        margin = check_margin(margin)
        scores, scan_q = self.list_scores(q)
        lists = top_lists(scores, nprobe)
        return Route(within_margin(scores, lists, margin), scan_q)

    @abc.abstractmethod
    def flops_per_query(self, nprobe: int) -> float:
        """Routing FLOPs per query (a multiply-add counts 2)."""

    def describe(self) -> str:
        return self.name


class CentroidRouter(Router):
    name = "centroid"
    scale_equivariant = True  # <2^-e q, c> = 2^-e <q, c>: the same order

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
    out = None
    for a in range(0, queries.shape[0], _MODEL_BATCH):
        block = fn(queries[a : a + _MODEL_BATCH].to(dev)).detach()
        if out is None:
            out = torch.empty((queries.shape[0], *block.shape[1:]), dtype=torch.float32, device=queries.device)
        out[a : a + block.shape[0]].copy_(block)  # one pass: the dtype and device change together
    return out if out is not None else torch.empty(0)


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

    def __init__(self, model, n_lists: int, d: int, partitions_sha256=None, *, dtype=None):
        if not hasattr(model, "score"):
            raise InputError("router: the model has no score() method")
        check_model_for_index(model, n_lists, partitions_sha256)
        self.model = model
        self.n_lists, self.d = int(n_lists), int(d)
        self.dtype = router_dtype(dtype)
        self.name = _model_name(model) + ("" if self.dtype == torch.float32 else " (bf16)")
        # bf16: a copy of the model in bf16 scores the lists (CPU AMX / avx512_bf16 and GPU
        # tensor cores run its products ~3-4x faster than fp32); the model itself is untouched
        self._scorer = model if self.dtype == torch.float32 else copy.deepcopy(model).to(self.dtype).eval()

    def list_scores(self, queries):
        with torch.no_grad():
            scores = _run_model(self._scorer.score, self._scorer, queries)
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
    scale_equivariant = True

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

    def route(self, queries, nprobe: int, margin=None) -> Route:
        q = _as_queries(queries, self.d)
        nprobe = check_positive_int(nprobe, "nprobe", maximum=self.lists.shape[1])
        if check_margin(margin) is not None:
            raise InputError("probe_margin: a FixedRouter has no list scores to compare")
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
