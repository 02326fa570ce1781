"""An IVF index split by lists across the ranks of a ``torch.distributed`` process group.

Every rank holds the routing state (centroids, the router) and the keys of the lists it
owns; lists go to ranks largest first, each to the rank holding the fewest keys so far
(ties: lowest rank), so every rank holds about ``n / W`` keys. A search routes every query
globally (the same ``nprobe`` lists on every rank), each rank scans the probed lists it
owns with the index's own exact scanner, and the ranks' top-k are all-gathered and merged
by (score desc, position asc), position being the key's row in the UNSHARDED index. That
is the scanner's own tie rule, and a list is scored by the same per-list products as in
the unsharded index, so :meth:`ShardedIVFIndex.search` returns what ``IVFIndex.search``
returns. Outside a process group (``world_size`` 1) it is the index itself.

Only the exact scanner is sharded (PQ codes are not split by list).
"""

from __future__ import annotations

import torch

from .._validate import InputError, check_matrix, check_positive_int, to_tensor
from ..numerics import check_score_dtype
from .ivf import IVFIndex, SearchInfo, _scanned, finish_scores


def assign_lists(list_sizes: torch.Tensor, world_size: int) -> torch.Tensor:
    """Owner rank of every list (int64 [L]): largest list first to the least-loaded rank."""
    sizes = list_sizes.long().cpu()
    if world_size > sizes.numel():
        raise InputError(
            f"world size: {world_size} ranks but the index has only {sizes.numel()} lists; "
            "every rank needs at least one list"
        )
    owner = torch.empty_like(sizes)
    load = [0] * world_size
    order = torch.argsort(sizes, descending=True, stable=True).tolist()
    for j, lst in enumerate(order):
        # the first W lists go one per rank, so no rank is left without a list
        r = j if j < world_size else min(range(world_size), key=lambda x: (load[x], x))
        owner[lst] = r
        load[r] += int(sizes[lst])
    return owner


def merge_topk(scores: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, k: int):
    """Top-k of the concatenated per-rank results [nq, W*k] by (score desc, position asc);
    empty slots (position -1) last. Returns (scores, positions, ids) [nq, k]."""
    big = torch.iinfo(torch.int64).max
    order = torch.argsort(positions.masked_fill(positions < 0, big), dim=1, stable=True)
    scores, positions, ids = (t.gather(1, order) for t in (scores, positions, ids))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return tuple(t.gather(1, order) for t in (scores, positions, ids))


class _RoutingView:
    """What :meth:`IVFIndex.router` reads of an index, without its keys."""

    router = IVFIndex.router
    _router_from_model = IVFIndex._router_from_model

    def __init__(self, index: IVFIndex):
        self.centroids = index.centroids
        self.n_lists = index.n_lists
        self.d = index.d
        self.device = index.device
        self.partitions_digests = index.partitions_digests
        self._router_cache = {}


class ShardedIVFIndex:
    """This rank's share of an :class:`IVFIndex` (see the module docstring).

    ``rank`` / ``world_size`` default to the current process group (1 without one); pass
    them to build a given rank's share outside one (its search then covers its lists only).
    """

    def __init__(self, index: IVFIndex, *, rank: int | None = None, world_size: int | None = None):
        from .. import distributed

        if not isinstance(index, IVFIndex):
            raise InputError(f"index: expected an IVFIndex, got {type(index).__name__}")
        self.world_size = distributed.world_size() if world_size is None else int(world_size)
        self.rank = distributed.rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"rank: expected 0 <= rank < {self.world_size}, got {self.rank}")
        self.collective = world_size is None and distributed.is_distributed()
        self.metric = index.metric
        self.meta = dict(index.meta)
        self.global_list_sizes = index.list_sizes.clone()
        self.n_keys_total = index.n_keys
        self.owner = assign_lists(index.list_sizes, self.world_size)
        self.owned = (self.owner == self.rank).to(index.device)
        # this rank's lists, in list order (so local rows keep the global rows' order); the
        # lists of other ranks stay in the offsets, empty
        offsets = index.list_offsets.cpu()
        sizes = torch.where(self.owned.cpu(), index.list_sizes.cpu(), torch.zeros_like(index.list_sizes.cpu()))
        rows = torch.cat([torch.arange(int(offsets[lst]), int(offsets[lst + 1]))
                          for lst in torch.nonzero(self.owned.cpu()).ravel().tolist()])
        rows_dev = rows.to(index.device)
        local_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
        self.global_rows = rows_dev
        self.local = IVFIndex(
            index.centroids, index.keys_by_list[rows_dev].clone(), local_offsets.to(index.device),
            index.ids[rows_dev].clone(), metric=index.metric, meta=index.meta,
        )
        self._view = _RoutingView(index)
        # every rank scans in the whole index's key scale, so the ranks' scores merge as they are
        self.key_log2, _ = index.scan_range()
        self.local.scan_range(self.key_log2)

    # the facts evaluation reads
    @property
    def n_lists(self) -> int:
        return self._view.n_lists

    @property
    def d(self) -> int:
        return self._view.d

    @property
    def n_keys(self) -> int:
        return self.n_keys_total

    @property
    def device(self) -> torch.device:
        return self._view.device

    @property
    def pq(self):
        return None

    def router(self, router=None):
        return self._view.router(router)

    def __repr__(self) -> str:
        return (f"ShardedIVFIndex(rank {self.rank} of {self.world_size}: {int(self.owned.sum())} of "
                f"{self.n_lists} lists, {self.local.n_keys:,} of {self.n_keys_total:,} keys)")

    def keys(self) -> torch.Tensor:
        """All keys in original order, gathered from every rank (fp32)."""
        ids, keys = self.local.ids.cpu(), self.local.keys_by_list.float().cpu()
        if self.collective:
            from .. import distributed

            parts = distributed.all_gather_object((ids, keys))
            ids = torch.cat([p[0] for p in parts])
            keys = torch.cat([p[1] for p in parts])
        if ids.numel() != self.n_keys_total:
            raise InputError("keys: this rank holds only its own lists outside a process group")
        out = torch.empty(self.n_keys_total, self.d, dtype=torch.float32)
        out[ids] = keys
        return out.to(self.device)

    def search(self, queries, k: int = 10, nprobe: int = 8, router=None, *, scanner: str | None = None,
               reorder: int = 0, probe_margin=None, return_info: bool = False, score_dtype="float32"):
        """``IVFIndex.search`` over the lists of every rank (a collective call: every rank
        calls it with the same queries and arguments)."""
        if scanner not in (None, "exact"):
            raise InputError(f"scanner: a sharded index scans exactly; got {scanner!r}")
        check_matrix(to_tensor(queries, "queries"), "queries", dim=self.d)
        k = check_positive_int(k, "k")
        nprobe = check_positive_int(nprobe, "nprobe", maximum=self.n_lists)
        score_dtype = check_score_dtype(score_dtype)
        rt = self.router(router)
        # scaled as the whole index would: every rank derives the same exponents
        route, sq, e = self.local.prepare_queries(queries, rt, nprobe, probe_margin)
        mine = torch.where(self.owned[route.lists], route.lists, torch.full_like(route.lists, -1))
        _, exact = self.local.scan_range(self.key_log2)
        scores, pos = exact.search(sq, mine, k)
        pos = pos.to(self.device)
        gpos = torch.where(pos >= 0, self.global_rows[pos.clamp(min=0)], torch.full_like(pos, -1))
        ids = torch.where(pos >= 0, self.local.ids[pos.clamp(min=0)], torch.full_like(pos, -1))
        if self.collective:
            import torch.distributed as dist

            gathered = []
            for t in (scores.contiguous(), gpos.contiguous(), ids.contiguous()):
                parts = [torch.empty_like(t) for _ in range(self.world_size)]
                dist.all_gather(parts, t)
                gathered.append(torch.cat(parts, 1))
            scores, gpos, ids = merge_topk(*gathered, k)
        scores = finish_scores(scores, gpos, e, score_dtype)
        if not return_info:
            return scores, ids
        scanned = _scanned(self.global_list_sizes, route.lists)
        info = SearchInfo(
            nprobe=nprobe, router=rt.describe(), scanner=f"exact, {self.world_size} shards",
            keys_scanned_per_query=scanned, router_flops_per_query=float(rt.flops_per_query(nprobe)),
            scan_flops_per_query=float(self.local._scanner("exact").flops_per_query(scanned, nprobe, 0)),
            lists=route.lists,
        )
        return scores, ids, info
