"""k-means for IVF partitioning: inner-product (spherical) and Euclidean, in torch.

Spherical k-means ("ip") assigns every key to the centroid with the largest inner product
and re-normalises the centroids to unit norm after each mean update (the partitioning
that works for unit-norm embeddings; ScaNN's ``spherical=True``). Euclidean k-means
("l2") assigns to the nearest centroid and keeps the plain means. Both run blocked over
the keys (no n x L matrix held at once), on the keys' device, fp32 accumulation.
On CPU, ``backend="faiss"`` uses ``faiss.Kmeans`` (faster there); ``"auto"`` picks faiss
on CPU (torch where faiss is not installed) and torch on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch

from .._validate import InputError, check_matrix, check_positive_int, to_tensor
from ..numerics import range_exponent

METRICS = ("ip", "l2")


def _assign_block(x: torch.Tensor, centroids: torch.Tensor, metric: str):
    scores = x @ centroids.T
    if metric == "l2":
        scores = scores - 0.5 * (centroids * centroids).sum(1)[None, :]
    best, idx = scores.max(1)
    return best, idx


def assign(
    keys: torch.Tensor, centroids: torch.Tensor, metric: str = "ip", block: int = 16384
) -> torch.Tensor:
    """List id (int64) of every key: best inner product, or nearest centroid for ``l2``."""
    if metric not in METRICS:
        raise InputError(f"metric: expected one of {METRICS}, got {metric!r}")
    out = torch.empty(keys.shape[0], dtype=torch.int64, device=keys.device)
    c = centroids.float()
    for a in range(0, keys.shape[0], block):
        _, out[a : a + block] = _assign_block(keys[a : a + block].float(), c, metric)
    return out


def _init_plus_plus(x: torch.Tensor, n_lists: int, gen: torch.Generator, metric: str):
    """k-means++ seeding on a sample (D^2 sampling by squared distance)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, n_lists):
        probs = d2.clamp(min=0).double().cpu()
        if float(probs.sum()) <= 0:
            nxt = int(torch.randint(n, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[torch.tensor(chosen, device=x.device)].clone()


def kmeans(
    keys,
    n_lists: int,
    *,
    metric: str = "ip",
    iters: int = 20,
    seed: int = 0,
    backend: str = "auto",
    sample: int | None = 256,
    device: str | torch.device | None = None,
    verbose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``n_lists`` centroids on ``keys``; returns (centroids fp32 [L, d], assignment int64 [n]).

    ``sample``: train on at most ``sample * n_lists`` keys (seeded random subset), then
    assign every key; ``None`` trains on all keys. ``metric``: ``"ip"`` (spherical) or
    ``"l2"``. The returned assignment uses the same metric.
    """
    x = check_matrix(to_tensor(keys, "keys"), "keys")
    n_lists = check_positive_int(n_lists, "n_lists", maximum=x.shape[0])
    iters = check_positive_int(iters, "iters")
    if metric not in METRICS:
        raise InputError(f"metric: expected one of {METRICS}, got {metric!r}")
    if backend not in ("auto", "torch", "faiss"):
        raise InputError(f"backend: expected 'auto', 'torch' or 'faiss', got {backend!r}")
    dev = torch.device(device) if device is not None else x.device
    # keys far outside fp32's safe range train as keys * 2^-e (exact, one power of two for
    # all): fp32 distances of 1e-25 keys underflow to 0 and of 1e36 keys overflow, which
    # left one list holding every key; "l2" centroids are scaled back at the end
    key_log2 = range_exponent(float(x.abs().amax()))
    if key_log2:
        x = (x.double() * 2.0**-key_log2).float()
    if backend == "auto":
        backend = "faiss" if dev.type == "cpu" and _has_faiss() else "torch"
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    if sample is not None and n > sample * n_lists:
        pick = torch.randperm(n, generator=gen)[: sample * n_lists].sort().values
        train = x[pick]
    else:
        train = x
    train = train.to(dev, torch.float32)
    if backend == "faiss":
        centroids = _kmeans_faiss(train, n_lists, metric, iters, seed, verbose)
    else:
        centroids = _kmeans_torch(train, n_lists, metric, iters, gen, verbose)
    centroids = centroids.to(dev)
    full = x if x.device == dev else x.to(dev)
    part = assign(full, centroids, metric)
    if key_log2 and metric == "l2":
        centroids = (centroids.double() * 2.0**key_log2).float()
    return centroids, part


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _kmeans_faiss(train, n_lists, metric, iters, seed, verbose):
    import faiss

    km = faiss.Kmeans(
        train.shape[1],
        n_lists,
        niter=iters,
        seed=int(seed),
        spherical=(metric == "ip"),
        verbose=verbose,
        max_points_per_centroid=max(1, train.shape[0] // n_lists + 1),
    )
    km.train(np.ascontiguousarray(train.cpu().numpy(), dtype=np.float32))
    return torch.from_numpy(np.array(km.centroids, dtype=np.float32))


def _kmeans_torch(train, n_lists, metric, iters, gen, verbose):
    n, d = train.shape
    seed_pool = train
    if n > 64 * n_lists:  # k-means++ on a subsample keeps seeding O(64 L^2 d)
        seed_pool = train[torch.randperm(n, generator=gen)[: 64 * n_lists].to(train.device)]
    centroids = _init_plus_plus(seed_pool, n_lists, gen, metric)
    if metric == "ip":
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    for it in range(iters):
        idx = assign(train, centroids, metric)
        sums = torch.zeros_like(centroids).index_add_(0, idx, train)
        counts = torch.bincount(idx, minlength=n_lists).to(train.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        new = sums / counts.clamp(min=1)[:, None]
        if empty.numel():
            # re-seed empty lists by splitting the largest ones (a perturbed copy of their centroid)
            big = torch.argsort(counts, descending=True)[: empty.numel()]
            noise = torch.randn(empty.numel(), d, generator=gen).to(train.device)
            new[empty] = new[big] + 1e-3 * noise * new[big].norm(dim=1, keepdim=True).clamp(min=1e-6)
        if metric == "ip":
            new = torch.nn.functional.normalize(new, dim=1)
        shift = float((new - centroids).norm())
        centroids = new
        if verbose:
            print(f"kmeans iter {it + 1}/{iters}: {int(empty.numel())} empty, shift {shift:.3e}")
        if shift == 0.0:
            break
    return centroids
