"""Noisy training queries made once: K seeded noisy copies per training query, labelled in bulk.

Augmenting the training queries with noise helps a support/key network generalise to
queries near, not at, the training ones. Labelling the noisy queries on the fly costs an
exact MIPS pass over all keys (and every list) for half of every batch, every step: on a
2-core CPU that is most of the step. Here the copies are drawn ONCE:

- copy ``j`` of training query ``q`` is ``(q + noise * ||q|| / sqrt(d) * eps_j)`` rescaled
  to ``||q||`` (the same noise model as the on-the-fly path), ``eps`` from one
  ``torch.Generator`` seeded with the run's seed, so the copies are a pure function of
  (queries, training split, K, noise, seed);
- only queries of the training split get copies (the split is by original query, made
  before augmentation), so no copy of a validation query ever trains;
- the copies are labelled in one bulk pass by the certified label pipeline
  (:class:`amips.labels.Labeler`: exact top-1 and, with partitions, the per-list support
  values), in chunks committed atomically to ``RUNDIR/noisy/parts/``; a killed run resumes
  at the first missing chunk; when all are done the labels are consolidated into
  ``RUNDIR/noisy/*.npy`` and ``manifest.json`` says ``complete``;
- during training each batch row is replaced, with probability ``noise_fraction``, by a
  uniformly chosen copy of the same original query (:meth:`NoisyPool.draw`).

Row ``i * K + j`` of the copies is copy ``j`` of the ``i``-th training query (in the
order of the training split).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import atomic_save_npy, atomic_write_bytes, atomic_write_json
from ._validate import InputError

# Copies per training query when --noise-copies is not given. Measured (bench/RESULTS.md,
# "Training defaults"): a step costs the same for any K, the bulk labelling grows with K.
# On a 2-core CPU the per-list labels of 300k keys x 512 lists run ~100 queries/s, so each
# copy of 30k queries is ~5 minutes; a GPU labels them in seconds.
DEFAULT_COPIES_CPU = 1
DEFAULT_COPIES_CUDA = 16
CHUNK = 8192  # queries per committed labelling chunk
NOISY_DIR = "noisy"


def default_copies(device) -> int:
    """Noisy copies per training query when not given: 16 on CUDA, 1 on CPU."""
    return DEFAULT_COPIES_CUDA if torch.device(device).type == "cuda" else DEFAULT_COPIES_CPU


def default_batch_size(device) -> int:
    """``amips train --batch-size`` when not given: 4096 on CUDA (keeps a GPU busy), 1024 on
    CPU (a step of a default KeyNet stays well under a second on 2 cores)."""
    return 4096 if torch.device(device).type == "cuda" else 1024


def check_copies(copies) -> int:
    if isinstance(copies, bool) or not isinstance(copies, (int, np.integer)) or copies < 0:
        raise InputError(f"noise_copies: must be an integer >= 0, got {copies!r}")
    return int(copies)


def make_copies(queries: torch.Tensor, base: np.ndarray, copies: int, noise: float, seed: int,
                ) -> torch.Tensor:
    """``[len(base) * copies, d]`` fp32: row ``i * copies + j`` is copy ``j`` of ``queries[base[i]]``."""
    copies = check_copies(copies)
    if not (math.isfinite(noise) and noise >= 0):
        raise InputError(f"noise: must be a finite number >= 0, got {noise!r}")
    base = np.asarray(base, dtype=np.int64)
    if base.ndim != 1 or (base.size and (base.min() < 0 or base.max() >= queries.shape[0])):
        raise InputError(f"base: expected query indices in [0, {queries.shape[0]}), got shape {base.shape}")
    d = queries.shape[1]
    q = queries.detach().float().cpu()[torch.from_numpy(base)].repeat_interleave(copies, dim=0)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    eps = torch.randn(q.shape, generator=gen)
    norms = q.norm(dim=1, keepdim=True)
    qn = q + noise * norms * eps / math.sqrt(d)
    return qn * (norms / qn.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _fingerprint(queries: torch.Tensor, base: np.ndarray, keys: torch.Tensor, copies: int,
                 noise: float, seed: int, partition_ids, n_partitions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"copies": copies, "noise": noise, "seed": seed, "n_partitions": n_partitions,
                         "q": list(queries.shape), "k": list(keys.shape)}).encode())
    h.update(np.ascontiguousarray(base, dtype=np.int64).tobytes())
    h.update(queries[: min(len(queries), 1024)].detach().float().cpu().numpy().tobytes())
    h.update(keys[: min(len(keys), 1024)].detach().float().cpu().numpy().tobytes())
    if partition_ids is not None:
        h.update(torch.as_tensor(partition_ids).cpu().long().numpy().tobytes())
    return h.hexdigest()


def _names(with_partitions: bool) -> list[str]:
    return ["top1_index", "top1_score"] + (["partition_score"] if with_partitions else [])


def label_copies(copies: torch.Tensor, keys: torch.Tensor, out_dir, *, fingerprint: str,
                 partition_ids=None, n_partitions: int | None = None, device="cpu",
                 chunk: int = CHUNK, progress: bool = True) -> dict[str, torch.Tensor]:
    """Exact labels of ``copies`` against ``keys``, cached (resumable) under ``out_dir``.

    Returns ``top1_index`` int64 [N], ``top1_score`` fp32 [N] and, with ``partition_ids``,
    ``partition_score`` fp32 [N, P] (``-inf`` for empty lists). A cache whose manifest
    carries another ``fingerprint`` is discarded."""
    from . import labels as _labels

    root = Path(out_dir)
    parts = root / "parts"
    names = _names(partition_ids is not None)
    n = int(copies.shape[0])
    manifest = {"fingerprint": fingerprint, "n": n, "chunk": int(chunk), "outputs": names}
    mpath = root / "manifest.json"
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            old = {}
        if {k: old.get(k) for k in manifest} != manifest:
            shutil.rmtree(root)  # another run's (or a corrupt) cache: start over
        elif old.get("complete"):
            out = {}
            for name in names:
                arr = np.load(root / f"{name}.npy")
                if arr.shape[0] != n:
                    break
                out[name] = torch.from_numpy(arr)
            else:
                return out
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(mpath, {**manifest, "complete": False})
    n_chunks = (n + chunk - 1) // chunk
    labeler = None
    t0 = time.time()
    todo = [c for c in range(n_chunks) if not (parts / f"{c:06d}.npz").exists()]
    for c in tqdm(todo, desc=f"labels of {n:,} noisy copies", disable=not progress, leave=False):
        if labeler is None:
            labeler = _labels.Labeler(
                keys.to(device), partition_ids=None if partition_ids is None else torch.as_tensor(partition_ids).to(device),
                n_partitions=n_partitions if partition_ids is not None else None)
        res = labeler(copies[c * chunk:(c + 1) * chunk].to(device))
        buf = io.BytesIO()
        np.savez(buf, **{name: res[name].cpu().numpy().astype(np.float32 if "score" in name else np.int64)
                         for name in names})
        atomic_write_bytes(parts / f"{c:06d}.npz", buf.getvalue())
    out = {}
    loaded = [np.load(parts / f"{c:06d}.npz") for c in range(n_chunks)]
    for name in names:
        arr = np.concatenate([f[name] for f in loaded]) if loaded else np.zeros((0,), np.float32)
        atomic_save_npy(root / f"{name}.npy", arr)
        out[name] = torch.from_numpy(arr)
    atomic_write_json(mpath, {**manifest, "complete": True, "label_seconds": round(time.time() - t0, 2)})
    shutil.rmtree(parts, ignore_errors=True)
    return out


class NoisyPool:
    """The labelled copies, drawn in place of original queries during training."""

    def __init__(self, queries, labels: dict, copies: int, noise_fraction: float, device):
        self.copies = int(copies)
        self.noise_fraction = float(noise_fraction)
        self.queries = queries.to(device)
        self.top1_index = labels["top1_index"].long().to(device)
        self.top1_score = labels["top1_score"].float().to(device)
        ps = labels.get("partition_score")
        self.partition_score = ps.float().to(device) if ps is not None else None

    def draw(self, pos, q, s_star, i_star, ps, gen):
        """Replace each row of the batch (training positions ``pos``), with probability
        ``noise_fraction``, by a uniformly chosen copy of the same query."""
        dev = q.device
        noisy = torch.rand(pos.shape[0], generator=gen, device=dev) < self.noise_fraction
        which = torch.randint(0, self.copies, (pos.shape[0],), generator=gen, device=dev)
        if not bool(noisy.any()):
            return q, s_star, i_star, ps
        rows = pos[noisy] * self.copies + which[noisy]
        q, s_star, i_star = q.clone(), s_star.clone(), i_star.clone()
        q[noisy] = self.queries[rows]
        s_star[noisy] = self.top1_score[rows]
        i_star[noisy] = self.top1_index[rows]
        if ps is not None and self.partition_score is not None:
            ps = ps.clone()
            ps[noisy] = self.partition_score[rows]
        return q, s_star, i_star, ps


def prepare(cfg, queries: torch.Tensor, keys: torch.Tensor, train_idx: np.ndarray, run_dir, *,
            partition_ids=None, n_partitions=None, device="cpu", progress: bool = True):
    """The :class:`NoisyPool` of a run, or None (no noise, on-the-fly noise, or K = 0)."""
    copies = check_copies(cfg.noise_copies)
    if cfg.noise_online or cfg.noise <= 0 or cfg.noise_fraction <= 0 or copies == 0:
        return None
    base = np.asarray(train_idx, dtype=np.int64)
    q_copies = make_copies(queries, base, copies, cfg.noise, cfg.seed)
    fp = _fingerprint(queries, base, keys, copies, cfg.noise, cfg.seed, partition_ids, n_partitions)
    labels = label_copies(q_copies, keys, Path(run_dir) / NOISY_DIR, fingerprint=fp,
                          partition_ids=partition_ids, n_partitions=n_partitions, device=device,
                          progress=progress)
    return NoisyPool(q_copies, labels, copies, cfg.noise_fraction, device)


class StepClock:
    """Prints the expected time per step (and for the rest of the run) after the first steps."""

    def __init__(self, start: int, steps: int, after: int = 5, write=print):
        self.start, self.steps, self.after, self.write = start, steps, after, write
        self.t1 = None

    def tick(self, step: int) -> None:
        # the first step pays for warm-up (allocations, thread pools): time from step 1 on
        if step == self.start + 1:
            self.t1 = time.perf_counter()
        elif self.t1 is not None and step == self.start + 1 + self.after:
            per = (time.perf_counter() - self.t1) / self.after
            left = per * (self.steps - step)
            self.write(f"train: {per:.3f} s per step; about {_duration(left)} for the remaining "
                       f"{self.steps - step:,} steps (evaluations not included)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
