"""One query batch against all key shards, and the in-memory Python API."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .._validate import (
    InputError,
    check_device,
    check_int_vector,
    check_matrix,
    check_positive_int,
    to_tensor,
)
from ..kernels.mips_topk import mips_topk_ref
from ..numerics import check_score_dtype
from .certify import (
    MAX_TOPK,
    Candidates,
    KeySource,
    _certify_and_refine,
    _merge,
    _rank_exact,
    range_slack,
    scale_queries,
    unscale_scores,
)
from .screen import (
    _load_shard,
    _screen_partitions,
    _screen_partitions_cpu,
    _screen_top1,
    _screen_top1_cpu_bf16,
    _screen_topk,
    _Shard,
    _use_kernel,
    resolve_precision,
)


# ----------------------------------------------------------------------------------------
# One query batch against all key shards.
# ----------------------------------------------------------------------------------------
@dataclass
class LabelSpec:
    topk: int | None = None  # None: top-1 only
    partitions: torch.Tensor | None = None  # int64 [nk] partition id per key
    n_partitions: int = 0
    precision: str = "auto"
    shard_size: int = 1 << 20


def _screen_width(k: int, precision: str) -> int:
    extra = {"fp32": 1, "tf32": 3, "bf16": 7}[precision]
    return k + extra


def _exact_fallback_topk(q64: torch.Tensor, keys: KeySource, k: int, shard_size: int):
    best_s = best_i = None
    for a in range(0, keys.n, shard_size):
        b = min(a + shard_size, keys.n)
        block = keys.shard64(a, b, q64.device)
        s, i = mips_topk_ref(q64, block, k)
        s, i = s[:, 0], torch.where(i[:, 0] >= 0, i[:, 0] + a, i[:, 0])
        if best_s is not None:
            s, i = _rank_exact(torch.cat([best_s, s], 1), torch.cat([best_i, i], 1), k)
        best_s, best_i = s, i
    return best_s, best_i


def _exact_fallback_partition(q64: torch.Tensor, keys: KeySource, part_ids: torch.Tensor, p: int):
    members = torch.nonzero(part_ids == p).ravel()
    rows = keys.rows64(members, q64.device)
    s = q64 @ rows.T
    best = torch.argmax(s, dim=1)  # argmax returns the first maximum: lowest index
    return s.gather(1, best[:, None])[:, 0], members.to(q64.device)[best]


class BatchLabeler:
    """Labels one query batch: streams the key shards, then certifies and refines."""

    def __init__(self, keys: KeySource, spec: LabelSpec, device: torch.device):
        self.keys = keys
        self.spec = spec
        self.device = device
        self.precision = resolve_precision(spec.precision, device)
        self.n_shards = max(1, math.ceil(keys.n / spec.shard_size))
        self._cached: _Shard | None = None

    def shard(self, j: int) -> _Shard:
        if self._cached is not None and self._cached.start == j * self.spec.shard_size:
            return self._cached
        start = j * self.spec.shard_size
        stop = min(start + self.spec.shard_size, self.keys.n)
        shard = _load_shard(self.keys, start, stop, self.device, self.precision)
        if self.n_shards == 1:
            self._cached = shard
        return shard

    def _widen(self, c: Candidates, q: torch.Tensor, shard: _Shard, lossy_queries: bool) -> Candidates:
        """Add :func:`range_slack` to a screen's bounds: lower bounds move down, upper up."""
        if shard.norms.numel() == 0:
            return c
        qn = torch.linalg.vector_norm(q.double(), dim=1) * (1 + 1e-5)
        slack = range_slack(qn, shard.norms.max(), q.shape[1], self.keys.lossy or lossy_queries)
        slack = slack.to(c.err.device)
        lead = [-1] + [1] * (c.upper.dim() - 1)
        err = c.err + slack.view(lead + [1])
        err = err.masked_fill(c.index < 0, 0.0)
        return Candidates(c.scores, c.index, err, c.upper + slack.view(lead).to(c.upper.device))

    def screen(self, q: torch.Tensor, j: int, state: dict[str, Candidates] | None,
               q64: torch.Tensor | None = None):
        """Merge shard ``j``'s screened candidates into ``state`` (None at the start).

        ``q64``: the exact fp64 queries of which ``q`` is the fp32 copy (default ``q``)."""
        state = dict(state or {})
        shard = self.shard(j)
        lossy_q = q64 is not None and not torch.equal(q.double(), q64)
        k = self.spec.topk or 1
        if self._needs_top_screen:
            if self.spec.topk is None and _use_kernel(q):
                cand = _screen_top1(q, shard, self.precision)
            elif self.spec.topk is None and self.precision == "bf16":
                cand = _screen_top1_cpu_bf16(q, shard)
            else:
                cand = _screen_topk(q, shard, _screen_width(k, self.precision), self.precision)
            state["top"] = _merge(state.get("top"), self._widen(cand, q, shard, lossy_q), k)
        if self.spec.partitions is not None:
            ids = self.spec.partitions[shard.start : shard.start + shard.keys.shape[0]].to(q.device)
            if _use_kernel(q):
                kp = _screen_width(1, self.precision)
                part = _screen_partitions(q, shard, ids, self.spec.n_partitions, kp, self.precision)
            else:
                part = _screen_partitions_cpu(q, shard, ids, self.spec.n_partitions)
            state["part"] = _merge(state.get("part"), self._widen(part, q, shard, lossy_q), 1)
        return state

    @property
    def _needs_top_screen(self) -> bool:
        # with partitions, the exact top-1 is the best of the lists' exact top-1s
        return self.spec.partitions is None or self.spec.topk is not None

    def finish(self, q: torch.Tensor, state: dict[str, Candidates], q64: torch.Tensor | None = None,
               score_log2: torch.Tensor | None = None, *,
               exact_scores: bool = False, score_dtype=torch.float32) -> tuple[dict[str, np.ndarray], dict]:
        """Certify and refine. ``q64``: exact fp64 queries (default ``q``); ``score_log2``
        [B]: exponent of the power of two that turns a scaled score into the original one.
        ``exact_scores``: also the exact fp64 scores of the original problem the results were
        ranked by (``*_score64``), which merging results over key slices needs.
        ``score_dtype``: of the ``*_score`` outputs; an exact score it cannot hold (beyond its
        range, or a nonzero score below its normal range) is an InputError, never 0 or inf."""
        if q64 is None:
            q64 = q.double()
        self._lossy_q = not torch.equal(q.double(), q64)
        stats = {"queries": int(q.shape[0]), "rescreened_queries": 0, "fallback_queries": 0}
        out = {}
        if self._needs_top_screen:
            out.update(self._finish_top(q, q64, state["top"], stats))
        if self.spec.partitions is not None:
            ps, pi = self._finish_partitions(q64, state["part"], stats)
            out["partition_score"], out["partition_index"] = ps, pi
            if not self._needs_top_screen:
                # best list first by exact score, then by lowest key index among equal scores
                big = torch.iinfo(torch.int64).max
                s64, i64 = _rank_exact(ps, pi.masked_fill(pi < 0, big), 1)
                out["top1_score"], out["top1_index"] = s64[:, 0], i64[:, 0]
        for name in [n for n in out if n.endswith("_score")]:
            if exact_scores:  # a power-of-two rescaling is exact in fp64
                e = score_log2 if score_log2 is not None else torch.zeros(out[name].shape[0])
                shape = [-1] + [1] * (out[name].dim() - 1)
                out[name + "64"] = out[name] * torch.pow(2.0, e.double().to(out[name].device)).view(shape)
            out[name] = unscale_scores(out[name], score_log2, name.replace("_", " ") + "s",
                                       score_dtype=score_dtype)
        return {name: t.cpu().numpy() for name, t in out.items()}, stats

    def _finish_top(self, q, q64, cand: Candidates, stats: dict) -> dict[str, torch.Tensor]:
        k = self.spec.topk or 1
        s, i, ok = _certify_and_refine(cand, k, q64, self.keys)
        if not bool(ok.all()) and self.precision != "fp32":
            # cascade: a low-precision screen that could not separate the candidates is
            # repeated in exact-product fp32 (bound ~ d * 2^-24) for those queries only
            bad = torch.nonzero(~ok).ravel()
            stats["rescreened_queries"] = int(bad.numel())
            cand = None
            for j in range(self.n_shards):
                shard = self.shard(j)
                if self.spec.topk is None and _use_kernel(q):
                    screened = _screen_top1(q[bad], shard, "fp32")
                else:
                    screened = _screen_topk(q[bad], shard, _screen_width(k, "fp32") + 3, "fp32")
                screened = self._widen(screened, q[bad], shard, self._lossy_q)
                cand = _merge(cand, screened, k)
            rs, ri, rok = _certify_and_refine(cand, k, q64[bad], self.keys)
            s[bad], i[bad] = rs, ri
            ok[bad] = rok
        if not bool(ok.all()):
            bad = torch.nonzero(~ok).ravel()
            stats["fallback_queries"] = int(bad.numel())
            fs, fi = _exact_fallback_topk(q64[bad], self.keys, k, self.spec.shard_size)
            s[bad], i[bad] = fs, fi
        out = {"top1_score": s[:, 0], "top1_index": i[:, 0]}
        if self.spec.topk is not None:
            out["topk_score"], out["topk_index"] = s, i
        return out

    def _finish_partitions(self, q64, cand: Candidates, stats: dict):
        ps, pi, pok = _certify_and_refine(cand, 1, q64, self.keys)
        ps, pi = ps[..., 0], pi[..., 0]
        stats["fallback_pairs"] = int((~pok).sum())
        if not bool(pok.all()):
            for p in torch.unique(torch.nonzero(~pok)[:, 1]).tolist():
                rows = torch.nonzero(~pok[:, p]).ravel()
                fs, fi = _exact_fallback_partition(q64[rows], self.keys, self.spec.partitions, p)
                ps[rows, p], pi[rows, p] = fs, fi
        return ps, pi


# ----------------------------------------------------------------------------------------
# Python API.
# ----------------------------------------------------------------------------------------
def _as_output(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device)


def _default_batch_size(device: torch.device, n_partitions: int = 0) -> int:
    """Queries per batch: large for throughput, smaller when [batch, lists] state is kept."""
    size = 65536 if device.type == "cuda" else 16384
    if n_partitions:
        size = min(size, max(1024, (1 << 24) // n_partitions))
    return size


class Labeler:
    """Exact labels for any number of query sets against one key set.

    Construction checks the keys and their options once; the prepared key shard (norms, and
    on CPU the bf16 copy) is kept between calls when the keys fit in one shard, so a training
    loop that labels a noisy batch every step pays only for the screen and the fp64
    refinement. ``labeler(queries)`` returns a dict of tensors on the queries' device:
    ``top1_score`` / ``top1_index``, plus ``topk_score`` / ``topk_index`` with ``topk`` and
    ``partition_score`` / ``partition_index`` [nq, P] with ``partition_ids``.
    ``score_dtype``: ``"float32"`` (default) or ``"float64"``; exact scores that float32
    cannot hold (beyond 3.4e38, or nonzero below 1.2e-38: inputs of extreme magnitudes) are
    an InputError naming ``score_dtype`` in float32, and exact in float64.
    """

    def __init__(self, keys, *, topk: int | None = None, partition_ids=None,
                 n_partitions: int | None = None, precision: str = "auto",
                 shard_size: int = 1 << 20, batch_size: int | None = None, device=None,
                 score_dtype="float32"):
        self.score_dtype = check_score_dtype(score_dtype)
        if isinstance(keys, torch.Tensor):
            keys = keys.detach()  # labels are not differentiable: a tensor that requires grad is read as is
        self.keys = KeySource(keys, "keys")
        self._keys_device = keys.device if isinstance(keys, torch.Tensor) else None
        if topk is not None:
            topk = check_positive_int(topk, "k", maximum=MAX_TOPK)
        shard_size = check_positive_int(shard_size, "shard_size")
        ids = None
        if partition_ids is not None:
            ids = check_int_vector(partition_ids, "partition_ids", length=self.keys.n)
            max_id = int(ids.max()) + 1
            if n_partitions is None:
                if max_id > self.keys.n:
                    # refused before a [nq, id] score table is sized by a wild id
                    raise InputError(f"partition_ids: id {max_id - 1} is not below the number of keys "
                                     f"({self.keys.n}); pass n_partitions to allow empty partitions")
                n_partitions = max_id
            n_partitions = check_positive_int(n_partitions, "n_partitions")
            if max_id > n_partitions:
                raise InputError(f"partition_ids: id {max_id - 1} >= n_partitions = {n_partitions}")
        self.spec = LabelSpec(topk=topk, partitions=ids, n_partitions=n_partitions or 0,
                              precision=precision, shard_size=shard_size)
        self.device = (check_device(device, "device") if device is not None
                       else (self._keys_device or torch.device("cpu")))
        self.batch_size = (check_positive_int(batch_size, "batch_size") if batch_size is not None
                           else _default_batch_size(self.device, self.spec.n_partitions))
        self.keys.fit_range()  # NaN/inf check and the power-of-two scale of the keys
        self._batch = BatchLabeler(self.keys, self.spec, self.device)
        # the certification cascade of the last call: how many queries needed the fp32
        # re-screen, and how many the full fp64 scan
        self.last_stats: dict[str, int] = {}

    def __call__(self, queries) -> dict[str, torch.Tensor]:
        q = check_matrix(to_tensor(queries, "queries"), "queries")
        if q.requires_grad:
            q = q.detach()
        if q.shape[1] != self.keys.d:
            raise InputError(
                f"keys: dimension mismatch, queries have d = {q.shape[1]}, keys have d = {self.keys.d}"
            )
        if self._keys_device is not None and self._keys_device != q.device:
            raise InputError(
                f"keys: on {self._keys_device} but queries on {q.device}; move them to one device"
            )
        parts: dict[str, list[np.ndarray]] = {}
        totals: dict[str, int] = {}
        for a in range(0, q.shape[0], self.batch_size):
            qb, qb64, e = scale_queries(q[a : a + self.batch_size], self.device)
            state = None
            for j in range(self._batch.n_shards):
                state = self._batch.screen(qb, j, state, q64=qb64)
            out, stats = self._batch.finish(qb, state, q64=qb64, score_log2=e + self.keys.scale_log2,
                                            score_dtype=self.score_dtype)
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + int(value)
            for name, arr in out.items():
                parts.setdefault(name, []).append(arr)
        self.last_stats = totals  # queries, rescreened_queries, fallback_queries (, fallback_pairs)
        return {name: _as_output(np.concatenate(arrs), q.device) for name, arrs in parts.items()}


def exact_top1(queries, keys, *, precision: str = "auto", batch_size: int | None = None,
               shard_size: int = 1 << 20, device=None, score_dtype="float32"):
    """Exact maximum inner product: for each query, the best key's score and index.

    ``queries`` [nq, d] and ``keys`` [nk, d]: numpy arrays (memory maps are streamed in
    shards of ``shard_size`` keys) or torch tensors (fp16/bf16/fp32/fp64; computed in fp32
    and certified in fp64). Ties resolve to the lowest key index. Returns ``(scores fp32
    [nq], indices int64 [nq])`` on the queries' device. To label many query sets against
    the same keys, build a :class:`Labeler` once. Inputs of any finite magnitude are exact;
    scores float32 cannot hold are an InputError unless ``score_dtype="float64"``.
    """
    out = Labeler(keys, precision=precision, shard_size=shard_size, batch_size=batch_size,
                  device=device, score_dtype=score_dtype)(queries)
    return out["top1_score"], out["top1_index"]


def exact_topk(queries, keys, k: int, *, precision: str = "auto", batch_size: int | None = None,
               shard_size: int = 1 << 20, device=None, score_dtype="float32"):
    """Exact top-k (k <= 128) by inner product, sorted (score desc, index asc).

    Returns ``(scores fp32 [nq, k], indices int64 [nq, k])``; when ``k`` exceeds the number of
    keys the tail is padded with ``-inf`` / ``-1``.
    """
    k = check_positive_int(k, "k", maximum=MAX_TOPK)
    out = Labeler(keys, topk=k, precision=precision, shard_size=shard_size,
                  batch_size=batch_size, device=device, score_dtype=score_dtype)(queries)
    return out["topk_score"], out["topk_index"]


def partition_top1(queries, keys, partition_ids, n_partitions: int | None = None, *,
                   precision: str = "auto", batch_size: int | None = None,
                   shard_size: int = 1 << 20, device=None, score_dtype="float32"):
    """Per-partition exact top-1 (each IVF list's support value and its best key).

    ``partition_ids`` [nk] holds one partition id per key (any order). Returns ``(scores fp32
    [nq, P], indices int64 [nq, P])``; an empty partition gives ``-inf`` and ``-1``.
    """
    out = Labeler(keys, partition_ids=partition_ids, n_partitions=n_partitions,
                  precision=precision, shard_size=shard_size, batch_size=batch_size,
                  device=device, score_dtype=score_dtype)(queries)
    return out["partition_score"], out["partition_index"]
