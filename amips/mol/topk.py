"""Top-k retrieval under a Mixture-of-Logits similarity: one API, five methods.

``amips.mol.topk(model, queries, k, method=..., items=None, exclude=None, **params)``

Every method ends the same way: its candidate items are re-scored with the canonical
score (:func:`amips.mol.similarity.score_candidates`: fp64 evaluation of the cached,
rounded item components, rounded to fp32) and ranked by (score descending, item id
ascending), de-duplicated, padded with ``-inf`` / ``-1``. So two methods that find the same
candidates return identical results, and ``exact`` and ``bound`` agree on every query.

Methods
-------
``exact``      all items. Screen: the fused Triton kernel (:mod:`amips.kernels.mol`) on
               CUDA and under the interpreter, blocked fp32 torch on CPU; the screened
               candidates within the screen's error margin are re-scored canonically, so
               the result is the exact top-k of the canonical score.
``per_embedding``  for each of the L pairs the top-``kprime`` items by that pair's inner
               product (``search="exact"``: :func:`amips.exact_topk`; ``"ivf"``: an
               :class:`amips.IVFIndex` per item component, ``nlist``/``nprobe``); union.
``averaged``   one inner-product search: query components summed, item components
               averaged, top-``kprime_avg`` (``search`` as above).
``combined``   the union of the two.
``bound``      exact, via pi-convexity: phi <= m / tau with m the largest pair logit.
               ``lists="max_logit"`` (default): one blocked pass; per block the pair
               logits are one product, m comes from them, and only the (query, item)
               pairs with m >= LB * tau - slack get the pair MLP (LB: a lower bound of the
               k-th canonical score, from ``averaged`` candidates, raised during the pass);
               survivors certified as in ``exact``. ``lists="per_pair"``: the paper's
               per-pair top-k' lists, certified when the union's k-th canonical score
               exceeds U = max_p (k'-th logit of pair p) / tau + margin, else k' widens
               (x4, up to ``max_kprime``) and then a range search.

Exclusion (``exclude``) is per query, inside each method: ``exact`` and ``bound`` mask a
query's excluded items to -inf in their screen and bound; the candidate methods fetch
``kprime + (the query's excluded count)`` per list and keep the first ``kprime``
non-excluded ids.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .._validate import InputError
from .similarity import (
    _BLOCK_ROWS,
    ItemCache,
    MoL,
    QueryParts,
    _gate_weights,
    phi_from_logits,
    score_all,
    score_candidates,
)

METHODS = ("exact", "per_embedding", "averaged", "combined", "bound")
SEARCHES = ("exact", "mm", "ivf")
# The CPU fp32 screen is trusted to within SCREEN_MARGIN / tau of the canonical score
# (about 2,000 fp32 ulps at |phi| = 1/tau; the measured error is ~1e-5 / tau, tests check).
SCREEN_MARGIN = 2.0**-14
# bound: per-pair list thresholds are fp32 roundings of fp64-certified logits (|l| <= ~1),
# and phi is evaluated in fp64: 2^-20 relative covers both with room.
BOUND_MARGIN = 2.0**-20
# bound's range search screens fp32 logits of bf16/fp16 components (d_P-term dots).
RANGE_MARGIN = 2.0**-14


# --- helpers ------------------------------------------------------------------------------

def _dedupe(ids: torch.Tensor) -> torch.Tensor:
    """Sort each row's ids ascending and replace repeats by -1."""
    s, _ = ids.sort(dim=1)
    if s.shape[1] > 1:
        dup = torch.zeros_like(s, dtype=torch.bool)
        dup[:, 1:] = s[:, 1:] == s[:, :-1]
        s = s.masked_fill(dup, -1)
    return s


def rank(scores: torch.Tensor, ids: torch.Tensor, k: int):
    """Top ``k`` of each row by (score desc, id asc); -1 ids last; padded with -inf / -1."""
    scores = scores.masked_fill(ids < 0, float("-inf"))
    big = torch.iinfo(torch.int64).max
    by_id = torch.where(ids < 0, torch.full_like(ids, big), ids)
    o1 = by_id.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, o1), ids.gather(1, o1)
    o2 = scores.argsort(dim=1, descending=True, stable=True)
    scores, ids = scores.gather(1, o2)[:, :k], ids.gather(1, o2)[:, :k]
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
    ids = ids.masked_fill(scores == float("-inf"), -1)
    return scores, ids


def _rescore_rank(head, qp, cache, cand: torch.Tensor, k: int):
    cand = _dedupe(cand)
    return rank(score_candidates(head, qp, cache, cand), cand, k) + ((cand >= 0).sum(1),)


def _screen_rank(head, qp, cache, ids: torch.Tensor, k: int, delta: float):
    """The exact top-k of the canonical score among candidate ``ids`` [nq, m] (-1 = none,
    no repeats): an fp32 screen of all of them, the best k + extra re-scored canonically;
    a query whose dropped candidates could come within ``delta`` gets every candidate
    re-scored. Returns (scores, ids, canonical evaluations per query)."""
    m = ids.shape[1]
    k2 = min(m, k + max(16, k // 2))
    count = (ids >= 0).sum(1)
    if k2 >= m:
        s, i, c = _rescore_rank(head, qp, cache, ids, k)
        return s, i, c
    screen = score_candidates(head, qp, cache, ids, dtype=torch.float32)
    v, o = screen.topk(k2, dim=1)
    s, i, c = _rescore_rank(head, qp, cache, ids.gather(1, o), k)
    ok = (count <= k2) | (v[:, -1] + delta < s[:, -1])
    if not bool(ok.all()):
        s3, i3, c3 = _rescore_rank(head, qp.take(~ok), cache, ids[~ok], k)
        s[~ok], i[~ok], c[~ok] = s3, i3, c3
    return s, i, c


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


class _Exclusion:
    """Per-query excluded internal item ids, held as sorted (row, item) pairs.

    Methods mask with it inside their own passes: ``contains`` / ``drop`` for candidate
    lists, ``mask_block`` for a dense block of per-item values, ``take`` for a subset of
    the rows. Nothing is over-fetched for the batch as a whole."""

    def __init__(self, row: torch.Tensor, item: torch.Tensor, nq: int, n: int, device):
        key = torch.unique((row.long() * n + item.long()).to(device))  # sorted, unique
        self.nq, self.n, self.key = nq, n, key
        self.row, self.item = key // n, key % n
        self.counts = torch.bincount(self.row, minlength=nq)
        order = self.item.argsort(stable=True)
        self._by_item, self._row_by_item = self.item[order], self.row[order]

    @classmethod
    def from_rows(cls, rows: list, n: int, device) -> _Exclusion:
        sizes = torch.tensor([int(r.numel()) for r in rows], dtype=torch.long)
        item = torch.cat([r.long() for r in rows]) if rows else torch.empty(0, dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(len(rows)), sizes)
        return cls(row, item, len(rows), n, device)

    def take(self, rows: torch.Tensor) -> _Exclusion:
        rows = rows.to(self.key.device)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        remap = torch.full((self.nq,), -1, dtype=torch.long, device=self.key.device)
        remap[rows] = torch.arange(rows.numel(), device=self.key.device)
        r = remap[self.row]
        keep = r >= 0
        return _Exclusion(r[keep], self.item[keep], rows.numel(), self.n, self.key.device)

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool, shape of ``ids`` [nq, ...]: the id is excluded for its row (-1: False)."""
        if self.key.numel() == 0:
            return torch.zeros_like(ids, dtype=torch.bool)
        rows = torch.arange(ids.shape[0], device=ids.device).view(-1, *([1] * (ids.dim() - 1)))
        k = rows * self.n + ids.clamp_min(0)
        pos = torch.searchsorted(self.key, k.flatten()).clamp_max(self.key.numel() - 1)
        return (self.key[pos].view_as(k) == k) & (ids >= 0)

    def drop(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.masked_fill(self.contains(ids), -1)

    def mask_block(self, values: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Set ``values`` [nq, b - a] (items a..b-1) to -inf at the excluded items."""
        lo = int(torch.searchsorted(self._by_item, torch.tensor([a], device=self.key.device)))
        hi = int(torch.searchsorted(self._by_item, torch.tensor([b], device=self.key.device)))
        if hi > lo:
            values[self._row_by_item[lo:hi], self._by_item[lo:hi] - a] = float("-inf")
        return values


def _take(excl: _Exclusion | None, rows) -> _Exclusion | None:
    return None if excl is None else excl.take(torch.as_tensor(rows))


def _fetch_groups(excl: _Exclusion | None, nq: int, kprime: int, n: int, device):
    """Rows that share one search width: a row with e excluded items fetches kprime + e
    (rounded up to a power of two so few searches run), a row with none fetches kprime."""
    all_rows = torch.arange(nq, device=device)
    if excl is None or excl.key.numel() == 0:
        return [(all_rows, min(n, kprime))]
    want = kprime + excl.counts.to(device)
    width = torch.where(excl.counts.to(device) == 0, torch.full_like(want, kprime),
                        2 ** torch.ceil(torch.log2(want.double())).long()).clamp_max(n)
    return [(all_rows[width == w], int(w)) for w in torch.unique(width).tolist()]


def _compact(ids: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Move each row's (last dim's) valid ids (>= 0) to its front, order kept, and cut the
    last dim to ``width`` (default: the largest valid count), so padding costs nothing."""
    valid = ids >= 0
    if width is None:
        width = max(1, int(valid.sum(-1).max())) if ids.numel() else 1
    order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]
    return ids.gather(-1, order)


def _keep_first(ids: torch.Tensor, excl: _Exclusion | None, kprime: int) -> torch.Tensor:
    """ids [r, G, w] (each list sorted best first): excluded ids dropped, then the first
    ``kprime`` remaining ids of every list kept (the top-kprime of the non-excluded),
    compacted to [r, G, <= kprime]."""
    if excl is None:
        return ids[..., :kprime]
    ids = excl.drop(ids)
    return _compact(ids, min(kprime, ids.shape[-1]))


def _scatter_rows(parts, nq: int, device) -> torch.Tensor:
    """[(rows, ids [r, ...w]) ...] -> ids [nq, ..., max w], -1 padded."""
    width = max(p[1].shape[-1] for p in parts)
    shape = parts[0][1].shape[1:-1]
    out = torch.full((nq, *shape, width), -1, dtype=torch.long, device=device)
    for rows, ids in parts:
        out[rows, ..., : ids.shape[-1]] = ids
    return out


def _blocked_ip_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 256):
    """Top-k by inner product from fp32 products (any k; amips.exact_topk caps k).

    A full top-k over N columns is the slow part on CPU, so it is cut down first: the
    k-th largest maximum T over chunks of ``chunk`` keys is a lower bound of the k-th
    score (k distinct chunks each hold a key scoring >= T), so only keys scoring >= T are
    ranked. Rows are processed in groups so that the score matrix stays <= 2^24 floats."""
    nq, n = queries.shape[0], keys.shape[0]
    k = min(k, n)
    out_s = queries.new_empty(nq, k)
    out_i = torch.empty(nq, k, dtype=torch.long, device=queries.device)
    rows = max(1, (1 << 24) // max(1, n))
    n_full = (n // chunk) * chunk
    for a in range(0, nq, rows):
        s = queries[a : a + rows] @ keys.T  # [r, N]
        r = s.shape[0]
        if 2 * k * chunk > n:  # the chunks at or above T would cover most keys
            v, i = s.topk(k, dim=1)
        else:
            cm = s[:, :n_full].view(r, -1, chunk).amax(-1)
            if n_full < n:
                cm = torch.cat([cm, s[:, n_full:].amax(-1, keepdim=True)], 1)
            t = cm.topk(k, dim=1).values[:, -1:]
            # Only chunks whose maximum reaches T can hold a key >= T: rank those (about
            # k chunks per row instead of N / chunk).
            n_chunks = cm.shape[1]
            hit = cm >= t
            qi, ci = hit.nonzero(as_tuple=True)  # row-major: each row's chunks contiguous
            counts = torch.bincount(qi, minlength=r)
            width = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(qi.numel(), device=s.device) - starts[qi]
            padded = s if n_full == n else torch.nn.functional.pad(s, (0, n_chunks * chunk - n),
                                                                   value=float("-inf"))
            blocks = padded.view(r, n_chunks, chunk)[qi, ci]  # [hits, chunk]
            cand_s = s.new_full((r, width, chunk), float("-inf"))
            cand_s[qi, pos] = blocks
            cand_c = torch.zeros(r, width, dtype=torch.long, device=s.device)
            cand_c[qi, pos] = ci
            cand_s = cand_s.view(r, -1)
            cand_i = (cand_c[:, :, None] * chunk + torch.arange(chunk, device=s.device)).view(r, -1)
            v, o = cand_s.topk(k, dim=1)
            i = cand_i.gather(1, o)
        out_s[a : a + r], out_i[a : a + r] = v, i
    return out_s, out_i


def _ip_search(cache: ItemCache, key: tuple, keys_fn, queries: torch.Tensor, kprime: int,
               search: str, nlist: int | None, nprobe: int):
    """Top-``kprime`` keys by inner product for ``queries`` on amips' search stack; the
    searcher (prepared keys, or an IVF index) is kept in ``cache.extras``."""
    from ..index import IVFIndex
    from ..labels import MAX_TOPK, Labeler

    n = cache.n
    kprime = min(kprime, n)
    if search == "mm":
        keys = cache.extras.get(("keys",) + key)
        if keys is None:
            keys = cache.extras[("keys",) + key] = keys_fn().float().contiguous()
        return _blocked_ip_topk(queries, keys, kprime)
    if search == "exact":
        if kprime <= MAX_TOPK:
            labeler = cache.extras.get(("labeler",) + key + (kprime,))
            if labeler is None:
                labeler = Labeler(keys_fn(), topk=kprime)
                cache.extras[("labeler",) + key + (kprime,)] = labeler
            out = labeler(queries)
            return out["topk_score"], out["topk_index"]
        keys = cache.extras.get(("keys",) + key)
        if keys is None:
            keys = cache.extras[("keys",) + key] = keys_fn().float().contiguous()
        return _blocked_ip_topk(queries, keys, kprime)
    nlist = nlist or max(1, int(round(math.sqrt(n))))
    index = cache.extras.get(("ivf",) + key + (nlist,))
    if index is None:
        index = IVFIndex.build(keys_fn().float(), nlist, metric="ip", seed=0)
        cache.extras[("ivf",) + key + (nlist,)] = index
    return index.search(queries, kprime, min(nprobe, nlist))


def _per_pair_search(head, qp: QueryParts, cache: ItemCache, width: int, search: str, nlist,
                     nprobe):
    """Per-pair top-``width`` item ids [nq, L, width] and each list's last logit [nq, L]."""
    nq = qp.n
    ids, kth = [], []
    queries = qp.components.flatten(0, 1).float()  # [nq * P_Q, d]
    for j in range(head.p_x):
        s, i = _ip_search(cache, ("comp", j), lambda j=j: cache.components[:, j].contiguous(),
                          queries, width, search, nlist, nprobe)
        ids.append(i.view(nq, head.p_q, -1))
        kth.append(s[:, -1].view(nq, head.p_q))
    ids = torch.stack(ids, 2).flatten(1, 2)  # [nq, P_Q, P_X, w] -> [nq, L, w], p = i * P_X + j
    kth = torch.stack(kth, 2).flatten(1)
    return ids, kth


def _lists_per_row(search_fn, nq: int, kprime: int, n: int, excl: _Exclusion | None, device):
    """Each row's top-``kprime`` non-excluded ids of every list: ``search_fn(rows, width)``
    gives ids [r, G, width] (best first, -1 = none). All rows search ``kprime`` deep; a row
    whose exclusions leave some list short is searched again 4x deeper, alone with the
    other short rows, until its lists are full or exhausted. Returns [nq, G, kprime]."""
    parts = []
    pending = torch.arange(nq, device=device)
    width = min(n, kprime)
    while pending.numel():
        ids = search_fn(pending, width)
        ex = _take(excl, pending)
        kept = _keep_first(ids, ex, kprime)
        if ex is None or width >= n:
            parts.append((pending, kept))
            break
        full = (kept >= 0).sum(-1) >= kprime
        exhausted = (ids >= 0).sum(-1) < width  # the search had no more to give
        done = (full | exhausted).all(-1)
        parts.append((pending[done], kept[done]))
        pending = pending[~done]
        width = min(n, 4 * width)
    return _scatter_rows([p for p in parts if p[0].numel()] or parts[:1], nq, device)


def _per_pair_lists(head, qp: QueryParts, cache: ItemCache, kprime: int, search: str,
                    nlist, nprobe, excl: _Exclusion | None = None):
    """Per-pair top-``kprime`` non-excluded item ids [nq, L * kprime] (-1 padded)."""
    def search_fn(rows, width):
        return _per_pair_search(head, qp.take(rows), cache, width, search, nlist, nprobe)[0]

    return _lists_per_row(search_fn, qp.n, kprime, cache.n, excl, cache.device).flatten(1)


def _averaged_lists(head, qp: QueryParts, cache: ItemCache, kprime: int, search: str,
                    nlist, nprobe, excl: _Exclusion | None = None):
    """Top-``kprime`` non-excluded item ids [nq, kprime] of the averaged search."""
    q = qp.components.float().sum(1)

    def keys_fn():
        avg = cache.extras.get("averaged")
        if avg is None:
            avg = cache.extras["averaged"] = cache.components.float().mean(1).contiguous()
        return avg

    def search_fn(rows, width):
        return _ip_search(cache, ("avg",), keys_fn, q[rows], width, search, nlist, nprobe)[1][:, None]

    return _lists_per_row(search_fn, qp.n, kprime, cache.n, excl, cache.device).flatten(1)


# --- the methods (internal ids; exclusion handled per row inside each) ----------------------

def _keep_best(best_s, best_i, s: torch.Tensor, a: int, k2: int):
    """Fold a block's screen scores ``s`` [r, b - a] (items a..b) into the running best
    ``k2`` of every row (values and item ids)."""
    v, i = s.topk(min(k2, s.shape[1]), dim=1)
    best_s = torch.cat([best_s, v], 1)
    best_i = torch.cat([best_i, i + a], 1)
    if best_s.shape[1] > k2:
        best_s, o = best_s.topk(k2, dim=1)
        best_i = best_i.gather(1, o)
    return best_s, best_i


def _exact(head, qp, cache, k, excl=None, *, extra: int | None = None,
           screen_margin: float = SCREEN_MARGIN, backend: str = "auto"):
    from ..kernels import _backend

    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    kernel = head.has_gate and (backend == "triton" or (backend == "auto" and _backend.use_triton(cache.components)))
    if kernel:
        return _exact_tiles(head, qp, cache, k, excl)
    delta = screen_margin / head.tau
    n = cache.n
    k2 = min(n, k + (extra if extra is not None else max(16, k // 2)))
    nq = qp.n
    out_s = torch.empty(nq, k, dtype=torch.float32, device=cache.device)
    out_i = torch.empty(nq, k, dtype=torch.long, device=cache.device)
    scored = torch.zeros(nq, dtype=torch.long)
    pending = torch.arange(nq, device=cache.device)
    while pending.numel():
        sub, ex = qp.take(pending), _take(excl, pending)
        block = max(1, min(n, 1 << 16))
        best_s = torch.empty(pending.numel(), 0, device=cache.device)
        best_i = torch.empty(pending.numel(), 0, dtype=torch.long, device=cache.device)
        for a in range(0, n, block):
            b = min(n, a + block)
            s = score_all(head, sub, cache, start=a, stop=b)
            if ex is not None:
                ex.mask_block(s, a, b)
            best_s, best_i = _keep_best(best_s, best_i, s, a, k2)
        ok, s_k, i_k = _certify(head, sub, cache, best_s, best_i, k, delta, k2 >= n)
        out_s[pending[ok]] = s_k[ok]
        out_i[pending[ok]] = i_k[ok]
        scored[pending.cpu()] += n
        pending = pending[~ok]
        k2 = min(n, 4 * k2)
    return out_s, out_i, {"items_scored": scored.double().mean().item()}


def _certify(head, qp, cache, best_s, best_i, k, delta, complete: bool):
    """Re-score the kept screen candidates (best_s/best_i [nq, w], -inf = excluded or
    pruned) canonically. A query is certified when every item it did not keep screened at
    most the smallest kept screen score, whose canonical score (<= that + delta) cannot
    reach the k-th canonical score; or when it kept every item that survived its screen."""
    best_i = best_i.masked_fill(best_s == float("-inf"), -1)
    s_k, i_k, _ = _rescore_rank(head, qp, cache, best_i, k)
    if complete:
        return torch.ones(qp.n, dtype=torch.bool, device=cache.device), s_k, i_k
    kept_all = (best_s > float("-inf")).sum(1) < best_s.shape[1]
    ok = kept_all | (best_s.min(1).values + delta < s_k[:, -1])
    return ok, s_k, i_k


def _exact_tiles(head, qp, cache, k, excl=None):
    """The fused kernel's screen: per (query, tile of items) the largest fp32 phi; tiles
    within the kernel's margin of the k-th best tile maximum are re-scored canonically.

    With e excluded items a query takes its (k + e)-th best tile maximum T instead: of the
    k + e tiles at or above T, at most e have an excluded item as their maximum, so k
    non-excluded items screen >= T and the k-th best non-excluded item is kept."""
    from ..kernels import mol as mol_kernel

    w = head.pair_gate
    tile_max, block_n = mol_kernel.mol_tile_max(
        qp.components, qp.gate, cache.components, cache.gate,
        w[0].weight.detach(), w[0].bias.detach(), w[2].weight.detach(), w[2].bias.detach(),
        head.tau)
    n = cache.n
    nq, n_tiles = tile_max.shape
    delta = mol_kernel.screen_margin(cache.components.dtype) / head.tau
    kk = torch.full((nq,), k, dtype=torch.long, device=tile_max.device)
    if excl is not None:
        kk = kk + excl.counts.to(kk.device)
    kk = kk.clamp_max(n_tiles)
    ordered = tile_max.sort(dim=1, descending=True).values
    t_k = ordered.gather(1, (kk - 1)[:, None])
    keep = tile_max >= t_k - 2 * delta
    counts = keep.sum(1)
    width = int(counts.max())
    order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
    valid = torch.arange(width, device=keep.device)[None] < counts[:, None]
    items = order[:, :, None] * block_n + torch.arange(block_n, device=keep.device)
    items = torch.where(valid[:, :, None] & (items < n), items, torch.full_like(items, -1))
    items = items.flatten(1)
    if excl is not None:
        items = excl.drop(items)
    s, i, scored = _rescore_rank(head, qp, cache, items, k)
    return s, i, {"items_scored": float(n), "rescored": scored.double().mean().item()}


def _approximate(head, qp, cache, k, lists):
    cand = _compact(_dedupe(torch.cat(lists, 1)))
    s, i, canonical = _screen_rank(head, qp, cache, cand, k, SCREEN_MARGIN / head.tau)
    return s, i, {"items_scored": (cand >= 0).sum(1).double().mean().item(),
                  "canonical": canonical.double().mean().item()}


def _bound(head, qp, cache, k, excl=None, *, lists: str = "max_logit", kprime: int | None = None,
           dense_fraction: float = 0.7, max_kprime: int = 128, margin: float = BOUND_MARGIN,
           range_margin: float = RANGE_MARGIN, search: str = "mm", extra: int | None = None):
    if lists == "max_logit":
        if not (isinstance(dense_fraction, (int, float)) and 0 <= dense_fraction <= 1):
            raise InputError(f"dense_fraction: expected a number in [0, 1], got {dense_fraction!r}")
        return _bound_max_logit(head, qp, cache, k, excl, kprime=kprime, margin=margin,
                                range_margin=range_margin, dense_fraction=float(dense_fraction),
                                extra=extra)
    if lists != "per_pair":
        raise InputError(f"lists: expected 'max_logit' or 'per_pair', got {lists!r}")
    return _bound_per_pair(head, qp, cache, k, excl, kprime=kprime or 32, max_kprime=max_kprime,
                           margin=margin, range_margin=range_margin, search=search)


def _max_pairs(flat: torch.Tensor, r: int, p_q: int, p_x: int) -> torch.Tensor:
    """[r * P_Q, m * P_X] pair logits -> [r, m] largest per item (the max over query
    components first runs on contiguous rows, ~6x faster than one max over dims (1, 3))."""
    return flat.view(r, p_q, -1).amax(1).view(r, -1, p_x).amax(-1)


@torch.no_grad()
def _bound_max_logit(head, qp, cache, k, excl=None, *, kprime, margin, range_margin,
                     dense_fraction: float = 0.7, extra: int | None = None,
                     screen_margin: float = SCREEN_MARGIN):
    """Exact top-k in one blocked pass that skips the pair MLP where the bound allows.

    phi(x) <= m(x) / tau with m(x) = max_p l_p(x) (pi-convexity). A lower bound LB of the
    true k-th canonical score comes first from ``kprime`` averaged-search candidates scored
    canonically, and is raised as the pass goes (the k-th best fp32 screen score so far,
    minus the screen margin). Per block of items the pair logits are one product (as in
    ``exact``); m is taken from them; only (query, item) pairs with
    m >= LB * tau - slack get the pair MLP and softmax (gathered rows), reusing the logits.
    A pruned item's canonical score is below LB, so it cannot enter the top-k. A block in
    which more than ``dense_fraction`` of the pairs pass is evaluated densely (exact's own
    work). The screened survivors are certified as in ``exact``."""
    n, dev, nq = cache.n, cache.device, qp.n
    kprime = min(n, _check_int(kprime, "kprime") if kprime is not None else max(4 * k, 256))
    delta = screen_margin / head.tau
    tau = head.tau
    # 1. A lower bound of every query's true k-th canonical score from k real items.
    cand = _dedupe(_averaged_lists(head, qp, cache, kprime, "mm", None, 1, excl))
    s0, _ = rank(score_candidates(head, qp, cache, cand), cand, k)
    lower = s0[:, -1].double()
    k2 = min(n, k + (extra if extra is not None else max(16, k // 2)))
    out_s = torch.empty(nq, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(nq, k, dtype=torch.long, device=dev)
    passed = torch.zeros(nq, dtype=torch.float64, device=dev)
    w = _gate_weights(head, torch.float32)
    pending = torch.arange(nq, device=dev)
    rounds = 0
    while pending.numel():
        rounds += 1
        sub, ex, lb = qp.take(pending), _take(excl, pending), lower[pending]
        r = sub.n
        qc = sub.components.float().flatten(0, 1)  # [r * P_Q, d]
        qg = sub.gate
        block = max(64, _BLOCK_ROWS // max(1, r))
        best_s = torch.empty(r, 0, device=dev)
        best_i = torch.empty(r, 0, dtype=torch.long, device=dev)
        npass = torch.zeros(r, dtype=torch.float64, device=dev)

        def pair_cols(bs):  # offsets of the L pair logits of one (query, item) in flat
            i = torch.arange(head.p_q, device=dev)[:, None] * (bs * head.p_x)
            return (i + torch.arange(head.p_x, device=dev)[None]).flatten()

        for a in range(0, n, block):
            b = min(n, a + block)
            # [r, bs, P_Q, P_X]: the same products exact's screen makes.
            flat = qc @ cache.components[a:b].float().flatten(0, 1).T  # [r * P_Q, bs * P_X]
            m = _max_pairs(flat, r, head.p_q, head.p_x)
            logits = flat.view(r, head.p_q, b - a, head.p_x).permute(0, 2, 1, 3)
            if ex is not None:
                ex.mask_block(m, a, b)
            low = lb
            if best_s.shape[1] >= k:
                low = torch.maximum(low, best_s[:, k - 1].double() - delta)
            t = low * tau
            thr = (t - range_margin - margin * t.abs()).float()
            hit = (m >= thr[:, None]) & (m > float("-inf"))  # excluded: m = -inf
            count = hit.sum(1)
            npass += count.double()
            total = int(count.sum())
            if total == 0:
                continue
            if total > dense_fraction * hit.numel():
                lg = logits.reshape(r, b - a, head.n_pairs) * (1.0 / tau)
                ig = None if cache.gate is None else cache.gate[None, a:b]
                phi = phi_from_logits(head, lg, None if qg is None else qg[:, None], ig, w)
                phi = phi.masked_fill(~hit, float("-inf"))
            else:
                qi, ii = hit.nonzero(as_tuple=True)
                # flat[q * P_Q + i, x * P_X + j] for every passing (q, x): one take.
                off = qi * (head.p_q * (b - a) * head.p_x) + ii * head.p_x
                lg = flat.view(-1)[off[:, None] + pair_cols(b - a)[None]] * (1.0 / tau)
                ig = None if cache.gate is None else cache.gate[a + ii]
                ph = phi_from_logits(head, lg, None if qg is None else qg[qi], ig, w)
                phi = torch.full((r, b - a), float("-inf"), device=dev)
                phi[qi, ii] = ph
            best_s, best_i = _keep_best(best_s, best_i, phi, a, k2)
        ok, s_k, i_k = _certify(head, sub, cache, best_s, best_i, k, delta, k2 >= n)
        out_s[pending[ok]] = s_k[ok]
        out_i[pending[ok]] = i_k[ok]
        passed[pending] = npass
        lower[pending] = torch.maximum(lb, s_k[:, -1].double())
        pending = pending[~ok]
        k2 = min(n, 4 * k2)
    stats = {"items_scored": (passed.mean().item() + kprime), "items_bounded": float(n),
             "items_passing_bound": passed.mean().item(),
             "passing_fraction": passed.mean().item() / n, "rounds": rounds}
    return out_s, out_i, stats


def _bound_per_pair(head, qp, cache, k, excl=None, *, kprime: int = 32, max_kprime: int = 128,
                    margin: float = BOUND_MARGIN, range_margin: float = RANGE_MARGIN,
                    search: str = "mm"):
    """The paper's form: per-pair lists, certified by U = max_p (list's last logit) / tau.
    With exclusions a query's lists are fetched k' + (its excluded count) long, the excluded
    ids dropped: an item in none of the fetched lists still has every pair logit at or below
    that list's last logit, so U stays a bound."""
    from ..labels import MAX_TOPK

    kprime = _check_int(kprime, "kprime")
    max_kprime = _check_int(max_kprime, "max_kprime")
    if search == "exact":
        max_kprime = min(max_kprime, MAX_TOPK)
    elif search != "mm":
        raise InputError(f"search: bound needs complete per-pair lists: 'mm' or 'exact', got {search!r}")
    # Lists from fp32 products: an unlisted item's true logit is at most the list's k'-th
    # computed logit plus the fp32 dot error (<= d * 2^-24 * |f| |g|, far below range_margin).
    list_slack = range_margin if search == "mm" else 0.0
    n, nq, dev = cache.n, qp.n, cache.device
    out_s = torch.empty(nq, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(nq, k, dtype=torch.long, device=dev)
    scored = torch.zeros(nq, dtype=torch.float64)
    stats = {"certified_first": 0, "range_searched": 0, "kprime_used": []}
    pending = torch.arange(nq, device=dev)
    kp = min(kprime, n)
    first = True
    while pending.numel():
        cand_parts, s_parts, ok_parts = [], [], []
        for rows_local, width in _fetch_groups(_take(excl, pending), pending.numel(), kp, n, dev):
            rows = pending[rows_local]
            sub, ex = qp.take(rows), _take(excl, rows)
            ids, kth = _per_pair_search(head, sub, cache, width, search, None, 1)
            cand = _dedupe((ids if ex is None else ex.drop(ids)).flatten(1))
            s_k, i_k = rank(score_candidates(head, sub, cache, cand), cand, k)
            scored[rows.cpu()] += (cand >= 0).sum(1).double().cpu()
            upper = (kth.double().max(1).values + list_slack) / head.tau
            upper = upper + margin * upper.abs().clamp_min(1.0 / head.tau)
            ok = (s_k[:, -1].double() > upper) | torch.tensor(width >= n, device=dev)
            out_s[rows[ok]] = s_k[ok]
            out_i[rows[ok]] = i_k[ok]
            cand_parts.append((rows_local[~ok], cand[~ok]))
            s_parts.append((rows_local[~ok], s_k[~ok, -1:]))
            ok_parts.append((rows_local, ok))
        ok = torch.zeros(pending.numel(), dtype=torch.bool, device=dev)
        for rows_local, o in ok_parts:
            ok[rows_local] = o
        if first:
            stats["certified_first"] = int(ok.sum())
            first = False
        stats["kprime_used"].append(kp)
        if bool(ok.all()):
            break
        if kp < max_kprime and kp < n:
            pending = pending[~ok]
            kp = min(max_kprime, 4 * kp, n)
            continue
        # Range search: every item whose best pair logit reaches S * tau (S = the k-th
        # canonical score found so far, a lower bound of the true k-th) may belong.
        cand = _scatter_rows([p for p in cand_parts if p[0].numel()], pending.numel(), dev)
        s_low = torch.full((pending.numel(),), float("-inf"), dtype=torch.float64, device=dev)
        for rows_local, s in s_parts:
            s_low[rows_local] = s[:, 0].double()
        rest = (~ok).nonzero().flatten()
        rows = pending[rest]
        sub, ex = qp.take(rows), _take(excl, rows)
        thr = s_low[rest] * head.tau - range_margin
        hits = _range_hits(head, sub, cache, thr)
        cand2 = torch.cat([cand[rest], hits if ex is None else ex.drop(hits)], 1)
        s2, i2, count = _rescore_rank(head, sub, cache, cand2, k)
        out_s[rows], out_i[rows] = s2, i2
        scored[rows.cpu()] = count.double().cpu()
        stats["range_searched"] = int(rows.numel())
        break
    stats["items_scored"] = scored.mean().item()
    return out_s, out_i, stats


@torch.no_grad()
def _range_hits(head, qp, cache, thr: torch.Tensor) -> torch.Tensor:
    """Ids [nq, m] (-1 padded) of items with some pair logit >= thr (per query)."""
    nq, n = qp.n, cache.n
    qc = qp.components.float().flatten(0, 1)
    per_query: list[list[torch.Tensor]] = [[] for _ in range(nq)]
    block = max(1, (1 << 15) // max(1, nq))
    thr = thr.float()[:, None]
    for a in range(0, n, block):
        b = min(n, a + block)
        logits = (qc @ cache.components[a:b].float().flatten(0, 1).T)
        best = _max_pairs(logits, nq, head.p_q, head.p_x)
        rows, cols = (best >= thr).nonzero(as_tuple=True)
        for r in rows.unique().tolist():
            per_query[r].append(cols[rows == r] + a)
    lists = [torch.cat(x) if x else torch.empty(0, dtype=torch.long) for x in per_query]
    width = max(1, max(x.numel() for x in lists))
    out = torch.full((nq, width), -1, dtype=torch.long, device=cache.device)
    for r, x in enumerate(lists):
        out[r, : x.numel()] = x
    return out


# --- input handling -----------------------------------------------------------------------

def _resolve(model, items):
    if hasattr(model, "topk_target") and not isinstance(model, MoL):
        head, cache, item_ids = model.topk_target()
        if items is not None:
            raise InputError("items: not needed with a model that carries its own item cache")
    elif isinstance(model, MoL):
        head, item_ids = model, None
        if items is None:
            raise InputError("items: required when model is a similarity head (pass its item_cache)")
        if isinstance(items, ItemCache):
            cache = items
        elif isinstance(items, torch.Tensor):
            cache = head.item_cache(items)
        else:
            raise InputError(f"items: expected an ItemCache or item representations, got {type(items).__name__}")
    else:
        raise InputError(
            f"model: expected an amips.mol similarity head or a model with topk_target(), got {type(model).__name__}")
    comps = cache.components
    if comps.dim() != 3 or comps.shape[1] != head.p_x or comps.shape[2] != head.d_p:
        raise InputError(
            f"items: cache components have shape {tuple(comps.shape)}, the head expects "
            f"[N, P_X={head.p_x}, d_P={head.d_p}]")
    if head.has_gate and (cache.gate is None or cache.gate.shape != (comps.shape[0], head.n_pairs)):
        raise InputError(f"items: cache gate terms must be [N, L={head.n_pairs}]")
    return head, cache, item_ids


def _query_parts(head, queries) -> QueryParts:
    if isinstance(queries, QueryParts):
        c = queries.components
        if c.dim() != 3 or c.shape[1] != head.p_q or c.shape[2] != head.d_p:
            raise InputError(f"queries: components have shape {tuple(c.shape)}, the head expects "
                             f"[nq, P_Q={head.p_q}, d_P={head.d_p}]")
        return queries
    if isinstance(queries, np.ndarray):
        queries = torch.from_numpy(np.ascontiguousarray(queries))
    qp = head.query_parts(queries)
    if qp.n == 0:
        raise InputError("queries: is empty")
    return qp


def _long_ids(item_ids) -> torch.Tensor:
    if isinstance(item_ids, torch.Tensor):
        return item_ids.detach().long().cpu()
    return torch.as_tensor(np.asarray(item_ids)).long()


def _exclusions(exclude, nq: int, item_ids, n: int) -> list[torch.Tensor] | None:
    """Per-query internal item ids to exclude (list of id lists, or CSR (indptr, indices))."""
    if exclude is None:
        return None
    if isinstance(exclude, tuple) and len(exclude) == 2 and not isinstance(exclude[0], (list, tuple)):
        indptr = torch.as_tensor(np.asarray(exclude[0])).long()
        indices = torch.as_tensor(np.asarray(exclude[1])).long()
        if indptr.dim() != 1 or indptr.numel() != nq + 1:
            raise InputError(f"exclude: CSR indptr must have nq + 1 = {nq + 1} entries, got {tuple(indptr.shape)}")
        rows = [indices[int(indptr[r]) : int(indptr[r + 1])] for r in range(nq)]
    else:
        try:
            rows = [torch.as_tensor(np.asarray(r, dtype=np.int64).reshape(-1)) for r in exclude]
        except (TypeError, ValueError) as exc:
            raise InputError(f"exclude: expected per-query lists of item ids or (indptr, indices): {exc}") from None
        if len(rows) != nq:
            raise InputError(f"exclude: {len(rows)} lists for {nq} queries")
    if item_ids is not None:
        ext = _long_ids(item_ids)
        sorted_ext, perm = ext.sort()
        mapped = []
        for r in rows:
            pos = torch.searchsorted(sorted_ext, r).clamp_max(ext.numel() - 1)
            found = sorted_ext[pos] == r
            mapped.append(perm[pos[found]])
        rows = mapped
    else:
        rows = [r[(r >= 0) & (r < n)] for r in rows]
    return [torch.unique(r) for r in rows]


def topk(model, queries, k: int, method: str = "exact", *, items=None, exclude=None,
         return_stats: bool = False, **params):
    """Top-``k`` items under an MoL (or dot-product) similarity.

    ``model``: an :class:`amips.mol.MoL` / :class:`amips.mol.DotProduct` head (then ``items``
    is its :meth:`~MoL.item_cache`, or item representations to cache), or any object with
    ``topk_target() -> (head, cache, item_ids or None)`` (a trained recommender; returned ids
    and ``exclude`` are then in its external id space). ``queries``: query representations
    [nq, d_query] (or :class:`QueryParts`). ``exclude``: per-query lists of item ids (or CSR
    ``(indptr, indices)``) never returned: each method masks a query's own excluded items
    inside its pass (exact and bound return the exact top-k of the remaining items).

    ``method`` and its ``params``: ``exact`` (``backend``, ``screen_margin``),
    ``per_embedding`` (``kprime``, ``search="exact"|"ivf"``, ``nlist``, ``nprobe``),
    ``averaged`` (``kprime_avg``, same search options), ``combined`` (both), ``bound``
    (``kprime``, ``max_kprime``). Returns ``(scores fp32 [nq, k], ids int64 [nq, k])``
    sorted by (score desc, id asc); with ``return_stats=True`` also a dict
    (``items_scored`` per query, ``seconds``, method-specific counts).
    """
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    head, cache, item_ids = _resolve(model, items)
    k = _check_int(k, "k")
    if k > cache.n:
        raise InputError(f"k: {k} is larger than the number of items ({cache.n})")
    qp = _query_parts(head, queries)
    if qp.components.device != cache.device:
        raise InputError(f"queries: on {qp.components.device} but the items are on {cache.device}")
    rows = _exclusions(exclude, qp.n, item_ids, cache.n)
    excl = None if rows is None else _Exclusion.from_rows(rows, cache.n, cache.device)
    t0 = time.perf_counter()
    given = set(params)
    search = params.pop("search", "exact")
    if search not in SEARCHES:
        raise InputError(f"search: expected one of {SEARCHES}, got {search!r}")
    nlist = params.pop("nlist", None)
    nprobe = _check_int(params.pop("nprobe", 8), "nprobe")
    if nlist is not None:
        nlist = _check_int(nlist, "nlist")
    allowed = {"exact": {"backend", "extra", "screen_margin"},
               "bound": {"lists", "dense_fraction", "kprime", "max_kprime", "margin", "range_margin",
                         "extra"}}.get(method)
    if allowed is not None:
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise InputError(f"{unknown[0]}: not a parameter of method {method!r}")
    if method == "bound":
        params["search"] = search if "search" in given else "mm"
    with torch.no_grad():
        if method == "exact":
            s, i, stats = _exact(head, qp, cache, k, excl, **params)
        elif method == "bound":
            s, i, stats = _bound(head, qp, cache, k, excl, **params)
        else:
            kprime = _check_int(params.pop("kprime", 32), "kprime")
            kprime_avg = _check_int(params.pop("kprime_avg", 256), "kprime_avg")
            if params:
                raise InputError(f"{sorted(params)[0]}: not a parameter of method {method!r}")
            lists = []
            if method in ("per_embedding", "combined"):
                lists.append(_per_pair_lists(head, qp, cache, kprime, search, nlist, nprobe, excl))
            if method in ("averaged", "combined"):
                lists.append(_averaged_lists(head, qp, cache, kprime_avg, search, nlist, nprobe, excl))
            s, i, stats = _approximate(head, qp, cache, k, lists)
    stats["seconds"] = time.perf_counter() - t0
    stats["method"] = method
    if item_ids is not None:
        ext = _long_ids(item_ids).to(i.device)
        i = torch.where(i >= 0, ext[i.clamp_min(0)], i)
    return (s, i, stats) if return_stats else (s, i)
