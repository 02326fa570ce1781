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
``bound``      exact, via pi-convexity: phi <= max over pairs of the pair logit / tau, so
               an item in none of the per-pair top-k' lists scores at most
               U = max_p (k'-th logit of pair p) / tau. Certified when the k-th canonical
               score S of the union exceeds U + margin; otherwise k' widens (x4, up to
               ``max_kprime``) and then a range search re-scores every item with some pair
               logit >= S * tau - range_margin.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .._validate import InputError
from .similarity import ItemCache, MoL, QueryParts, score_all, score_candidates

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


def _blocked_ip_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, block: int = 1 << 16):
    """Top-k by inner product, blocked fp32 products (for k above amips.exact_topk's cap)."""
    nq = queries.shape[0]
    k = min(k, keys.shape[0])
    best_s = queries.new_full((nq, 0), float("-inf"))
    best_i = torch.empty(nq, 0, dtype=torch.long, device=queries.device)
    for a in range(0, keys.shape[0], block):
        s = queries @ keys[a : a + block].float().T
        v, i = s.topk(min(k, s.shape[1]), dim=1)
        best_s = torch.cat([best_s, v], 1)
        best_i = torch.cat([best_i, i + a], 1)
        if best_s.shape[1] > k:
            best_s, o = best_s.topk(k, dim=1)
            best_i = best_i.gather(1, o)
    return best_s, best_i


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


def _per_pair_lists(head, qp: QueryParts, cache: ItemCache, kprime: int, search: str,
                    nlist, nprobe):
    """Per-pair top-k' item ids [nq, L * k'] and each pair's k'-th logit [nq, L]."""
    nq = qp.n
    ids, kth = [], []
    queries = qp.components.flatten(0, 1).float()  # [nq * P_Q, d]
    for j in range(head.p_x):
        s, i = _ip_search(cache, ("comp", j), lambda j=j: cache.components[:, j].contiguous(),
                          queries, kprime, search, nlist, nprobe)
        ids.append(i.view(nq, head.p_q, -1))
        kth.append(s[:, -1].view(nq, head.p_q))
    ids = torch.stack(ids, 2).flatten(1)  # [nq, P_Q, P_X, k'] -> [nq, L * k']
    kth = torch.stack(kth, 2).flatten(1)  # pair p = i * P_X + j
    return ids, kth


def _averaged_lists(head, qp: QueryParts, cache: ItemCache, kprime: int, search: str,
                    nlist, nprobe):
    q = qp.components.float().sum(1)

    def keys_fn():
        avg = cache.extras.get("averaged")
        if avg is None:
            avg = cache.extras["averaged"] = cache.components.float().mean(1).contiguous()
        return avg

    _, ids = _ip_search(cache, ("avg",), keys_fn, q, kprime, search, nlist, nprobe)
    return ids


# --- the methods (internal ids, k already over-fetched) ----------------------------------

def _exact(head, qp, cache, k, *, extra: int | None = None, screen_margin: float = SCREEN_MARGIN,
           backend: str = "auto"):
    from ..kernels import _backend

    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    kernel = head.has_gate and (backend == "triton" or (backend == "auto" and _backend.use_triton(cache.components)))
    if kernel:
        return _exact_tiles(head, qp, cache, k)
    delta = screen_margin / head.tau
    n = cache.n
    k2 = min(n, k + (extra if extra is not None else max(16, k // 2)))
    nq = qp.n
    out_s = torch.empty(nq, k, dtype=torch.float32, device=cache.device)
    out_i = torch.empty(nq, k, dtype=torch.long, device=cache.device)
    scored = torch.zeros(nq, dtype=torch.long)
    pending = torch.arange(nq, device=cache.device)
    while pending.numel():
        sub = qp.take(pending)
        block = max(1, min(n, 1 << 16))
        best_s = torch.empty(pending.numel(), 0, device=cache.device)
        best_i = torch.empty(pending.numel(), 0, dtype=torch.long, device=cache.device)
        for a in range(0, n, block):
            s = score_all(head, sub, cache, start=a, stop=min(n, a + block))
            v, i = s.topk(min(k2, s.shape[1]), dim=1)
            best_s = torch.cat([best_s, v], 1)
            best_i = torch.cat([best_i, i + a], 1)
            if best_s.shape[1] > k2:
                best_s, o = best_s.topk(k2, dim=1)
                best_i = best_i.gather(1, o)
        s_k, i_k, _ = _rescore_rank(head, sub, cache, best_i, k)
        if k2 >= n:
            ok = torch.ones(pending.numel(), dtype=torch.bool, device=cache.device)
        else:
            # An unkept item screened <= the smallest kept screen score, so its canonical score
            # is <= that + delta; it cannot enter when the k-th canonical score is above.
            ok = best_s.min(1).values + delta < s_k[:, -1]
        out_s[pending[ok]] = s_k[ok]
        out_i[pending[ok]] = i_k[ok]
        scored[pending.cpu()] += n
        pending = pending[~ok]
        k2 = min(n, 4 * k2)
    return out_s, out_i, {"items_scored": scored.double().mean().item()}


def _exact_tiles(head, qp, cache, k):
    """The fused kernel's screen: per (query, tile of items) the largest fp32 phi; tiles
    within the kernel's margin of the k-th best tile maximum are re-scored canonically."""
    from ..kernels import mol as mol_kernel

    w = head.pair_gate
    tile_max, block_n = mol_kernel.mol_tile_max(
        qp.components, qp.gate, cache.components, cache.gate,
        w[0].weight.detach(), w[0].bias.detach(), w[2].weight.detach(), w[2].bias.detach(),
        head.tau)
    n = cache.n
    nq, n_tiles = tile_max.shape
    delta = mol_kernel.screen_margin(cache.components.dtype) / head.tau
    kk = min(k, n_tiles)
    t_k = tile_max.topk(kk, dim=1).values[:, -1:]
    keep = tile_max >= t_k - 2 * delta
    counts = keep.sum(1)
    width = int(counts.max())
    order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
    valid = torch.arange(width, device=keep.device)[None] < counts[:, None]
    items = order[:, :, None] * block_n + torch.arange(block_n, device=keep.device)
    items = torch.where(valid[:, :, None] & (items < n), items, torch.full_like(items, -1))
    s, i, scored = _rescore_rank(head, qp, cache, items.flatten(1), k)
    return s, i, {"items_scored": float(n), "rescored": scored.double().mean().item()}


def _approximate(head, qp, cache, k, lists):
    cand = _dedupe(torch.cat(lists, 1))
    s, i, canonical = _screen_rank(head, qp, cache, cand, k, SCREEN_MARGIN / head.tau)
    return s, i, {"items_scored": (cand >= 0).sum(1).double().mean().item(),
                  "canonical": canonical.double().mean().item()}


def _bound(head, qp, cache, k, *, lists: str = "max_logit", kprime: int | None = None,
           dense_fraction: float = 0.6,
           max_kprime: int = 128, margin: float = BOUND_MARGIN,
           range_margin: float = RANGE_MARGIN, search: str = "mm"):
    if lists == "max_logit":
        return _bound_max_logit(head, qp, cache, k, kprime=kprime, margin=margin,
                                range_margin=range_margin, dense_fraction=dense_fraction)
    if lists != "per_pair":
        raise InputError(f"lists: expected 'max_logit' or 'per_pair', got {lists!r}")
    return _bound_per_pair(head, qp, cache, k, kprime=kprime or 32, max_kprime=max_kprime,
                           margin=margin, range_margin=range_margin, search=search)


@torch.no_grad()
def _max_pair_logits(head, qp, cache) -> torch.Tensor:
    """[nq, N] fp32: every item's largest computed pair logit (blocked fp32 products)."""
    nq, n = qp.n, cache.n
    qc = qp.components.float().flatten(0, 1)
    out = torch.empty(nq, n, dtype=torch.float32, device=cache.device)
    block = max(256, (1 << 18) // max(1, qc.shape[0]))
    for a in range(0, n, block):
        b = min(n, a + block)
        logits = qc @ cache.components[a:b].float().flatten(0, 1).T
        out[:, a:b] = logits.view(nq, head.p_q, b - a, head.p_x).amax(dim=(1, 3))
    return out


def _bound_max_logit(head, qp, cache, k, *, kprime, margin, range_margin,
                     dense_fraction: float = 0.6, screen_margin: float = SCREEN_MARGIN):
    """phi(x) <= max_p l_p(x) / tau for every item: one pass of pair logits (no pair MLP)
    gives each item its bound m(x); the top-k' items by m are re-scored (S = their k-th
    canonical score); every item with m(x) >= S * tau - range_margin can still enter, and is
    screened in fp32 and certified like ``exact``. A query whose bound keeps more than
    ``dense_fraction`` of the items goes to the exact screen instead (still exact)."""
    n, dev = cache.n, cache.device
    kprime = min(n, _check_int(kprime, "kprime") if kprime is not None else max(4 * k, 64))
    kprime = max(kprime, k)
    delta = screen_margin / head.tau
    out_s = torch.empty(qp.n, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(qp.n, k, dtype=torch.long, device=dev)
    scored = torch.zeros(qp.n, dtype=torch.float64)
    passed = torch.zeros(qp.n, dtype=torch.float64)
    n_dense = 0
    chunk = max(1, (1 << 24) // n)  # [chunk, N] bounds at a time (<= 64 MiB)
    for a in range(0, qp.n, chunk):
        rows = torch.arange(a, min(qp.n, a + chunk), device=dev)
        sub = qp.take(rows)
        m = _max_pair_logits(head, sub, cache)
        _, top_i = m.topk(kprime, dim=1)
        s_k, _ = rank(score_candidates(head, sub, cache, top_i), top_i, k)
        thr = s_k[:, -1:].double() * head.tau - range_margin
        hit = m.double() >= thr  # holds every item that can reach S
        hit.scatter_(1, top_i, True)
        counts = hit.sum(1)
        scored[rows.cpu()] += kprime
        passed[rows.cpu()] = counts.double().cpu()
        dense = counts > dense_fraction * n
        if bool(dense.any()):
            n_dense += int(dense.sum())
            s_d, i_d, _ = _exact(head, sub.take(dense), cache, k, screen_margin=screen_margin,
                                 backend="torch")
            out_s[rows[dense]], out_i[rows[dense]] = s_d, i_d
            scored[rows[dense].cpu()] += n
        sparse = ~dense
        if not bool(sparse.any()):
            continue
        sub_s, c_s = sub.take(sparse), counts[sparse]
        width = int(c_s.max())
        ids = hit[sparse].to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
        ids = ids.masked_fill(torch.arange(width, device=dev)[None] >= c_s[:, None], -1)
        s2, i2, _ = _screen_rank(head, sub_s, cache, ids, k, delta)
        out_s[rows[sparse]], out_i[rows[sparse]] = s2, i2
        scored[rows[sparse].cpu()] += c_s.double().cpu()
    stats = {"items_scored": scored.mean().item(), "items_bounded": float(n),
             "items_passing_bound": passed.mean().item(), "dense_fallback": n_dense}
    return out_s, out_i, stats


def _bound_per_pair(head, qp, cache, k, *, kprime: int = 32, max_kprime: int = 128,
                    margin: float = BOUND_MARGIN, range_margin: float = RANGE_MARGIN,
                    search: str = "mm"):
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
        sub = qp.take(pending)
        ids, kth = _per_pair_lists(head, sub, cache, kp, search, None, 1)
        cand = _dedupe(ids)
        s_k, i_k = rank(score_candidates(head, sub, cache, cand), cand, k)
        scored[pending.cpu()] += (cand >= 0).sum(1).double().cpu()
        upper = (kth.double().max(1).values + list_slack) / head.tau
        upper = upper + margin * upper.abs().clamp_min(1.0 / head.tau)
        ok = (s_k[:, -1].double() > upper) | torch.tensor(kp >= n, device=dev)
        out_s[pending[ok]] = s_k[ok]
        out_i[pending[ok]] = i_k[ok]
        if first:
            stats["certified_first"] = int(ok.sum())
            first = False
        stats["kprime_used"].append(kp)
        pending, sub_rest = pending[~ok], ~ok
        if not pending.numel():
            break
        if kp < max_kprime and kp < n:
            kp = min(max_kprime, 4 * kp, n)
            continue
        # Range search: every item whose best pair logit reaches S * tau (S = the k-th
        # canonical score found so far, a lower bound of the true k-th) may belong.
        sub = qp.take(pending)
        thr = s_k[sub_rest, -1].double() * head.tau - range_margin
        hits = _range_hits(head, sub, cache, thr)
        cand2 = torch.cat([cand[sub_rest], hits], 1)
        s2, i2, count = _rescore_rank(head, sub, cache, cand2, k)
        out_s[pending], out_i[pending] = s2, i2
        scored[pending.cpu()] = count.double().cpu()
        stats["range_searched"] = int(pending.numel())
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
        best = logits.view(nq, head.p_q, b - a, head.p_x).amax(dim=(1, 3))
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
        ext = torch.as_tensor(np.asarray(item_ids)).long()
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
    ``(indptr, indices)``) never returned; the method over-fetches and masks.

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
    excl = _exclusions(exclude, qp.n, item_ids, cache.n)
    k_fetch = k if excl is None else min(cache.n, k + max(int(r.numel()) for r in excl))
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
               "bound": {"lists", "dense_fraction", "kprime", "max_kprime", "margin", "range_margin"}}.get(method)
    if allowed is not None:
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise InputError(f"{unknown[0]}: not a parameter of method {method!r}")
    if method == "bound":
        params["search"] = search if "search" in given else "mm"
    with torch.no_grad():
        if method == "exact":
            s, i, stats = _exact(head, qp, cache, k_fetch, **params)
        elif method == "bound":
            s, i, stats = _bound(head, qp, cache, k_fetch, **params)
        else:
            kprime = _check_int(params.pop("kprime", 32), "kprime")
            kprime_avg = _check_int(params.pop("kprime_avg", 256), "kprime_avg")
            if params:
                raise InputError(f"{sorted(params)[0]}: not a parameter of method {method!r}")
            lists = []
            if method in ("per_embedding", "combined"):
                lists.append(_per_pair_lists(head, qp, cache, kprime, search, nlist, nprobe)[0])
            if method in ("averaged", "combined"):
                lists.append(_averaged_lists(head, qp, cache, kprime_avg, search, nlist, nprobe))
            s, i, stats = _approximate(head, qp, cache, k_fetch, lists)
    if excl is not None:
        masked = torch.zeros_like(i, dtype=torch.bool)
        for r, ex in enumerate(excl):
            if ex.numel():
                masked[r] = torch.isin(i[r], ex.to(i.device))
        s = s.masked_fill(masked, float("-inf"))
        i = i.masked_fill(masked, -1)
        s, i = rank(s, i, k)
    stats["seconds"] = time.perf_counter() - t0
    stats["method"] = method
    if item_ids is not None:
        ext = torch.as_tensor(np.asarray(item_ids)).long().to(i.device)
        i = torch.where(i >= 0, ext[i.clamp_min(0)], i)
    return (s, i, stats) if return_stats else (s, i)
