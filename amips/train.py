"""Training SupportNet / KeyNet / multi-head routers on exact MIPS labels (``amips train``).

Loss: ``w_score * MSE(score) + w_key * mean ||key - k*||^2``. With a partition of the keys
into IVF lists the SupportNet (and the unconstrained ``router-mlp``) get one head per list
and regress the per-list support values ``max_{k in list c} <q, k>`` (empty lists masked);
their key loss, if any, is on the head of the list holding the global top-1 key. Each
head starts at centroid routing (its linear input term is the list's centroid, read from
``centroids.npy`` beside the partitions file when present), so training learns the
correction to <q, centroid> rather than the whole support function (``centroid_init``).
The per-head squared errors are weighted towards the lists near the top (``focus``, see
:func:`focus_weights`): routing needs the order of the best few lists, not the values of
the hundreds far below.

Queries are split into train and validation BY ORIGINAL QUERY before any augmentation.
Augmentation replaces a fraction of each training batch by noisy copies of the same
queries (Gaussian noise, renormalised to the original norm), made once and labelled in
one bulk pass (:mod:`amips.noisy`); ``noise_online`` labels fresh noise every step instead.

Optimiser: Adam/AdamW, linear warmup then cosine decay, gradient-norm clipping, an EMA of
the weights (evaluated and saved), bf16 autocast on CUDA. Everything needed to continue
(weights, EMA, optimiser moments, RNG states, step) sits in ONE safetensors file written
atomically (tmp + os.replace), so ``resume=True`` continues after a kill -9.

Run folder: ``config.json`` (model + training config, partitions fingerprint),
``model.safetensors`` (EMA weights, what :func:`amips.load_model` reads),
``checkpoint.safetensors``, ``metrics.jsonl``, ``labels/`` (cached labels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import labels as _labels
from . import noisy as _noisy
from ._io import atomic_save_npy, atomic_write_bytes, atomic_write_json, sha256_file
from ._validate import InputError, check_int_vector, check_matrix, to_tensor
from .models import MODEL_KINDS, build_model, count_params, size_width

ROUTING_KS = (1, 4, 8, 16, 32)


@dataclass
class TrainConfig:
    model: str = "keynet"
    width: int | None = None
    depth: int = 3
    param_fraction: float | None = None
    homogeneous: bool = False
    inject_every: int = 1
    residual: bool = True
    steps: int = 2000
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    warmup: int = 100
    clip: float = 1.0
    ema: float = 0.999
    w_score: float = 1.0
    w_key: float = 1.0
    noise: float = 0.05
    noise_fraction: float = 0.5
    noise_copies: int | None = None  # None: amips.noisy.default_copies(device)
    noise_online: bool = False
    val_fraction: float = 0.04
    eval_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    bf16: bool = True
    max_minutes: float | None = None
    centroid_init: bool = True
    focus: float = 1.5

    # fields that may change between a run and its --resume
    MUTABLE = ("eval_every", "checkpoint_every", "max_minutes")

    def validate(self) -> None:
        if self.model not in MODEL_KINDS:
            raise InputError(f"model: expected one of {', '.join(MODEL_KINDS)}, got {self.model!r}")
        for name in ("depth", "steps", "batch_size", "eval_every", "checkpoint_every", "inject_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.width is not None and (not isinstance(self.width, int) or self.width < 1):
            raise InputError(f"width: must be an integer >= 1, got {self.width!r}")
        if self.width is not None and self.param_fraction is not None:
            raise InputError("width and param_fraction: give one, not both")
        if self.param_fraction is not None and not self.param_fraction > 0:
            raise InputError(f"param_fraction: must be > 0, got {self.param_fraction}")
        checks = {
            "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "warmup": self.warmup >= 0,
            "clip": self.clip >= 0, "ema": 0 <= self.ema < 1, "w_score": self.w_score >= 0,
            "w_key": self.w_key >= 0, "noise": self.noise >= 0, "focus": self.focus >= 0,
            "noise_fraction": 0 <= self.noise_fraction <= 1,
            "val_fraction": 0 < self.val_fraction < 1,
        }
        for name, ok in checks.items():
            v = getattr(self, name)
            if not ok or not math.isfinite(v):
                raise InputError(f"{name}: invalid value {v!r}")
        if self.noise_copies is not None:
            _noisy.check_copies(self.noise_copies)
        if self.w_score == 0 and self.w_key == 0:
            raise InputError("w_score and w_key: at least one loss weight must be > 0")
        if self.optimizer not in ("adam", "adamw"):
            raise InputError(f"optimizer: expected 'adam' or 'adamw', got {self.optimizer!r}")
        if self.model == "router-mlp" and self.w_score == 0:
            raise InputError("router-mlp: trains on support values only; w_score must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _atomic_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)


def split_queries(n_queries: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation split by original query index (before any augmentation)."""
    if n_queries < 2:
        raise InputError(f"queries: need at least 2 queries to split off a validation set, got {n_queries}")
    n_val = min(n_queries - 1, max(1, int(round(n_queries * val_fraction))))
    perm = np.random.default_rng(seed).permutation(n_queries)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.05 at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))


def centroids_for(partition_ids: torch.Tensor, keys: torch.Tensor, n_partitions: int, path=None) -> torch.Tensor:
    """Routing centroids: ``centroids.npy`` beside the partitions file if present, else means."""
    if path is not None:
        cpath = Path(path).with_name("centroids.npy")
        if cpath.exists():
            c = torch.from_numpy(np.asarray(np.load(cpath), dtype=np.float32))
            if c.shape != (n_partitions, keys.shape[1]):
                raise InputError(
                    f"centroids: {cpath} has shape {tuple(c.shape)}, expected ({n_partitions}, {keys.shape[1]})"
                )
            return c.to(keys.device)
    sums = torch.zeros(n_partitions, keys.shape[1], dtype=torch.float64, device=keys.device)
    sums.index_add_(0, partition_ids.to(keys.device), keys.double())
    counts = torch.bincount(partition_ids.to(keys.device), minlength=n_partitions).clamp_min(1)
    return (sums / counts[:, None]).float()


# --------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------
def _label_blocks(fn, queries: torch.Tensor, block: int, desc: str, progress: bool):
    outs = []
    for a in tqdm(range(0, queries.shape[0], block), desc=desc, disable=not progress, leave=False):
        outs.append(fn(queries[a:a + block]))
    return [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]


def load_or_compute_labels(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    labels_dir=None,
    cache_dir=None,
    partition_ids: torch.Tensor | None = None,
    n_partitions: int | None = None,
    progress: bool = True,
) -> dict:
    """Exact labels for ``queries``: from ``labels_dir`` (``amips labels``), else computed
    with :mod:`amips.labels` and cached (atomically) under ``cache_dir``."""
    nq = queries.shape[0]
    want = ["top1_index", "top1_score"]
    if partition_ids is not None:
        want += ["partition_index", "partition_score"]
    if labels_dir is not None:
        root = Path(labels_dir)
        if not root.is_dir():
            raise InputError(f"labels: {root} is not a folder")
        out = {}
        for name in want:
            f = root / f"{name}.npy"
            if not f.exists():
                raise InputError(f"labels: {root} has no {name}.npy (run `amips labels` with the same partitions)")
            out[name] = torch.from_numpy(np.array(np.load(f, mmap_mode="r")))
            if out[name].shape[0] != nq:
                raise InputError(f"labels: {f} has {out[name].shape[0]} rows, queries have {nq}")
        if partition_ids is not None and out["partition_score"].shape[1] != n_partitions:
            raise InputError(
                f"labels: partition labels have {out['partition_score'].shape[1]} lists, partitions have {n_partitions}"
            )
        return out
    cache = Path(cache_dir) if cache_dir is not None else None
    out = {}
    if cache is not None and all((cache / f"{n}.npy").exists() for n in want):
        for name in want:
            out[name] = torch.from_numpy(np.load(cache / f"{name}.npy"))
        if all(v.shape[0] == nq for v in out.values()):
            return out
    block = 4096
    s, i = _label_blocks(lambda q: _labels.exact_top1(q, keys), queries, block, "labels top-1", progress)
    out = {"top1_score": s.float().cpu(), "top1_index": i.long().cpu()}
    if partition_ids is not None:
        ps, pi = _label_blocks(
            lambda q: _labels.partition_top1(q, keys, partition_ids, n_partitions), queries, block,
            "labels per list", progress,
        )
        out["partition_score"] = ps.float().cpu()
        out["partition_index"] = pi.long().cpu()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for name, v in out.items():
            atomic_save_npy(cache / f"{name}.npy", v.numpy())
    return out


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------
def _head_scores(model, q: torch.Tensor) -> torch.Tensor:
    out = model(q)
    if model.kind == "keynet":
        out = torch.einsum("nhd,nd->nh", out, q)
    return out


def _best_head_key(model, q: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted key [n, d]; for several heads, the key of ``heads`` (default: argmax head)."""
    if model.kind == "keynet":
        with torch.no_grad():
            k = model(q)
        if heads is None:
            heads = torch.einsum("nhd,nd->nh", k, q).argmax(1)
        return k[torch.arange(q.shape[0], device=q.device), heads]
    with torch.enable_grad():
        qq = q.detach().requires_grad_(True)
        f = model(qq)
        if heads is None:
            heads = f.argmax(1)
        (g,) = torch.autograd.grad(f.gather(1, heads[:, None]).sum(), qq)
    return g.detach()


def evaluate(
    model,
    queries,
    keys,
    top1_index,
    top1_score,
    *,
    partition_ids=None,
    centroids=None,
    partition_score=None,
    block: int = 2048,
    ks=ROUTING_KS,
) -> dict:
    """Score error, relative key error ``||k_pred - k*|| / ||q - k*||`` and, with a
    partition, routing accuracy@k of the model next to raw-query centroid routing."""
    model_was_training = model.training
    model.eval()
    p = next(model.parameters())
    q_all = check_matrix(to_tensor(queries, "queries"), "queries", dim=model.d).to(p.device, torch.float32)
    keys = to_tensor(keys, "keys").to(p.device, torch.float32)
    top1_index = torch.as_tensor(top1_index).to(p.device).long()
    top1_score = torch.as_tensor(top1_score).to(p.device).float()
    score_err, rel_err, sq_score = [], [], []
    hits = {k: 0 for k in ks}
    hits_c = {k: 0 for k in ks}
    per_head_se = []
    n_trivial = 0
    pid = None
    if partition_ids is not None:
        pid = torch.as_tensor(partition_ids).to(p.device).long()
        centroids = torch.as_tensor(centroids).to(p.device).float()
    for a in range(0, q_all.shape[0], block):
        q = q_all[a:a + block]
        kstar = keys[top1_index[a:a + block]]
        with torch.no_grad():
            heads = _head_scores(model, q).float()
        score = heads.max(1).values
        score_err.append((score - top1_score[a:a + block]).abs())
        sq_score.append((score - top1_score[a:a + block]) ** 2)
        key_heads = None
        if heads.shape[1] > 1 and pid is not None:
            key_heads = heads.argmax(1)
        kpred = _best_head_key(model, q, key_heads).float()
        # a query that equals its best key (up to rounding) has no meaningful relative error
        denom = (q - kstar).norm(dim=1)
        ok = denom > 1e-4 * kstar.norm(dim=1).clamp_min(1e-30)
        rel_err.append((kpred - kstar).norm(dim=1)[ok] / denom[ok])
        n_trivial += int((~ok).sum())
        if pid is not None:
            true_list = pid[top1_index[a:a + block]]
            if heads.shape[1] > 1:
                rank_scores = heads
            else:
                rank_scores = kpred @ centroids.T
            base_scores = q @ centroids.T
            kmax = min(max(ks), rank_scores.shape[1])
            top_m = rank_scores.topk(kmax, dim=1).indices
            top_c = base_scores.topk(kmax, dim=1).indices
            for k in ks:
                hits[k] += int((top_m[:, :k] == true_list[:, None]).any(1).sum())
                hits_c[k] += int((top_c[:, :k] == true_list[:, None]).any(1).sum())
            if partition_score is not None and heads.shape[1] > 1:
                lab = torch.as_tensor(partition_score[a:a + block]).to(p.device).float()
                valid = torch.isfinite(lab)
                per_head_se.append(((heads - lab.nan_to_num(0.0)) ** 2)[valid])
    n = q_all.shape[0]
    rel = torch.cat(rel_err)
    metrics = {
        "n_queries": n,
        "score_mae": float(torch.cat(score_err).mean()),
        "score_rmse": float(torch.cat(sq_score).mean().sqrt()),
        "rel_key_error_mean": float(rel.mean()),
        "rel_key_error_median": float(rel.median()) if rel.numel() else float("nan"),
        "n_query_equals_key": n_trivial,
    }
    if pid is not None:
        for k in ks:
            metrics[f"routing_acc@{k}"] = hits[k] / n
            metrics[f"centroid_acc@{k}"] = hits_c[k] / n
        if per_head_se:
            metrics["per_list_score_rmse"] = float(torch.cat(per_head_se).mean().sqrt())
    if model_was_training:
        model.train()
    return metrics


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def _ema_update(ema: dict, model, decay: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            ema[name].mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def focus_weights(part_scores: torch.Tensor, valid: torch.Tensor, focus: float) -> torch.Tensor:
    """Per-head loss weights [nq, L] that favour the lists competing for the top-1.

    w = 1/3 + 2/3 · n_valid · softmax((s - max s) / (focus · std s)) per query, over its
    non-empty lists: mean 1, a floor of 1/3 for every head, and most of the weight on the
    lists whose support value is within about ``focus`` standard deviations of the best,
    the ones whose ORDER decides the first probes. The temperature is relative to each
    query's spread of support values, so it does not depend on the scale of the data.
    """
    s = part_scores.float().masked_fill(~valid, float("-inf"))
    top = s.max(1, keepdim=True).values
    spread = torch.where(valid, part_scores.float(), torch.nan)
    std = torch.sqrt(torch.nanmean((spread - torch.nanmean(spread, 1, keepdim=True)) ** 2, 1, keepdim=True))
    tau = (focus * std).clamp_min(1e-12)
    soft = torch.softmax((s - top) / tau, dim=1).nan_to_num(0.0)
    n = valid.sum(1, keepdim=True).to(soft.dtype)
    return (1.0 + 2.0 * n * soft) / 3.0


def _loss(model, q, cfg: TrainConfig, s_star, k_star, part_scores, best_list):
    kind = model.kind
    if kind == "keynet":
        k = model(q)[:, 0]
        score = (k * q).sum(1)
        loss_s = F.mse_loss(score.float(), s_star)
        loss_k = ((k.float() - k_star) ** 2).sum(1).mean()
        return cfg.w_score * loss_s + cfg.w_key * loss_k, loss_s, loss_k
    need_key = kind == "supportnet" and cfg.w_key > 0
    qq = q.detach().requires_grad_(need_key)
    f = model(qq).float()
    if part_scores is not None:
        valid = torch.isfinite(part_scores)
        sq = (f - part_scores.nan_to_num(0.0, posinf=0.0, neginf=0.0)) ** 2
        if cfg.focus > 0:
            sq = sq * focus_weights(part_scores, valid, cfg.focus)
        loss_s = sq[valid].mean()
        head_out = f.gather(1, best_list[:, None])[:, 0]
    else:
        loss_s = F.mse_loss(f[:, 0], s_star)
        head_out = f[:, 0]
    loss_k = torch.zeros((), device=q.device)
    if need_key:
        (key,) = torch.autograd.grad(head_out.sum(), qq, create_graph=True)
        loss_k = ((key.float() - k_star) ** 2).sum(1).mean()
    return cfg.w_score * loss_s + cfg.w_key * loss_k, loss_s, loss_k


def _state_tensors(model, ema, optimizer, gen_cpu, gen_dev) -> dict:
    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    t.update({f"ema.{k}": v for k, v in ema.items()})
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            t[f"opt.{n}.exp_avg"] = st["exp_avg"]
            t[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"]
            t[f"opt.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    t["rng.cpu"] = gen_cpu.get_state()
    t["rng.device"] = gen_dev.get_state()
    return t


def _restore(tensors: dict, model, ema, optimizer, gen_cpu, gen_dev, device) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    for n, p in model.named_parameters():
        if f"opt.{n}.exp_avg" in tensors:
            optimizer.state[p] = {
                "exp_avg": tensors[f"opt.{n}.exp_avg"].to(device),
                "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"].to(device),
                "step": torch.tensor(float(tensors[f"opt.{n}.step"][0])),
            }
    gen_cpu.set_state(tensors["rng.cpu"])
    gen_dev.set_state(tensors["rng.device"])


def _model_config(cfg: TrainConfig, d: int, n_keys: int, n_heads: int, queries: torch.Tensor) -> dict:
    # scale queries to entries of unit variance (norm sqrt(d)): unit-norm embeddings would
    # otherwise give pre-activations of std 1/sqrt(d) and a nearly linear network at init
    median_norm = float(queries[: min(len(queries), 100_000)].norm(dim=1).median())
    scale = float(f"{math.sqrt(d) / max(median_norm, 1e-12):.6g}")
    base = {"kind": cfg.model, "d": d, "depth": cfg.depth, "n_heads": n_heads, "input_scale": scale}
    if cfg.model == "supportnet":
        base.update(inject_every=cfg.inject_every, homogeneous=cfg.homogeneous)
    else:
        base["residual"] = cfg.residual
    if cfg.model == "router-mlp" and n_heads > 1 and cfg.centroid_init:
        base["linear_heads"] = True
    if cfg.param_fraction is not None:
        budget = int(cfg.param_fraction * n_keys * d)
        base["width"] = size_width(base, budget)
    else:
        base["width"] = cfg.width if cfg.width is not None else (512 if cfg.model != "router-mlp" else 256)
    return base


def train(
    keys,
    queries,
    out,
    config: TrainConfig | None = None,
    *,
    labels_dir=None,
    partitions=None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train a model on exact labels; returns the final validation metrics (EMA weights).

    ``keys`` [n, d] and ``queries`` [m, d]: arrays or paths (``.npy`` and what
    :func:`amips.data.load_array` reads). ``partitions``: path of a ``partitions.npy``
    (list id per key) or an int array; makes SupportNet / router-mlp multi-head.
    """
    from safetensors import safe_open

    from .data import load_array

    cfg = config or TrainConfig()
    cfg.validate()
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError("device: CUDA requested but not available")
        torch.empty(0, device=dev)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: cannot use {device!r} ({exc})") from None
    if isinstance(keys, (str, os.PathLike)):
        keys = load_array(keys, name="keys")
    if isinstance(queries, (str, os.PathLike)):
        queries = load_array(queries, name="queries")
    keys_t = check_matrix(to_tensor(np.asarray(keys, dtype=np.float32) if isinstance(keys, np.ndarray) else keys, "keys"), "keys").float()
    q_t = check_matrix(
        to_tensor(np.asarray(queries, dtype=np.float32) if isinstance(queries, np.ndarray) else queries, "queries"),
        "queries", dim=keys_t.shape[1],
    ).float()
    n_keys, d = keys_t.shape
    part_path, pid, n_parts, part_sha = None, None, None, None
    if partitions is not None:
        if isinstance(partitions, (str, os.PathLike)):
            part_path = Path(partitions)
            if not part_path.exists():
                raise InputError(f"partitions: {part_path} does not exist")
            part_sha = sha256_file(part_path)
            partitions = np.load(part_path)
        else:
            part_sha = hashlib.sha256(np.ascontiguousarray(np.asarray(partitions)).tobytes()).hexdigest()
        pid = check_int_vector(partitions, "partitions", length=n_keys)
        n_parts = int(pid.max()) + 1
        if n_parts < 2:
            raise InputError("partitions: need at least 2 lists")
    n_heads = n_parts if (pid is not None and cfg.model in ("supportnet", "router-mlp")) else 1

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(f"out: {root} exists and is not a folder")
    ckpt_path = root / "checkpoint.safetensors"
    cfg_path = root / "config.json"
    if cfg_path.exists() and not resume:
        raise InputError(f"out: {root} already holds a run; pass --resume to continue it or choose a new folder")
    root.mkdir(parents=True, exist_ok=True)

    old = json.loads(cfg_path.read_text()) if resume and cfg_path.exists() else None
    if old is not None:
        # a run started before an option existed resumes with the behaviour it started with
        legacy = {"centroid_init": False, "focus": 0.0, "noise_copies": 0, "noise_online": True}
        missing = {k: v for k, v in legacy.items() if k not in old.get("train", {})}
        if missing:
            cfg = dataclasses.replace(cfg, **missing)
    if cfg.noise_copies is None:
        cfg = dataclasses.replace(cfg, noise_copies=_noisy.default_copies(dev))
    model_cfg = _model_config(cfg, d, n_keys, n_heads, q_t)
    run_cfg = {
        "model": model_cfg,
        "train": cfg.to_dict(),
        "n_keys": n_keys,
        "d": d,
        "n_queries": int(q_t.shape[0]),
        "n_params": count_params(model_cfg),
        "param_fraction_of_keys": count_params(model_cfg) / (n_keys * d),
        "n_partitions": n_parts,
        "partitions_sha256": part_sha,
        "partitions_path": str(part_path) if part_path else None,
        "keys_fingerprint": hashlib.sha256(keys_t[: min(n_keys, 1024)].numpy().tobytes()).hexdigest(),
    }
    if old is not None:
        for key in ("model", "n_keys", "d", "n_queries", "n_partitions", "partitions_sha256", "keys_fingerprint"):
            if old.get(key) != run_cfg.get(key):
                raise InputError(f"resume: {key} differs from the run in {root} ({old.get(key)} vs {run_cfg.get(key)})")
        for key, v in old["train"].items():
            if key not in TrainConfig.MUTABLE and run_cfg["train"].get(key) != v:
                raise InputError(f"resume: training option {key} differs from the run in {root} ({v} vs {run_cfg['train'].get(key)})")
    atomic_write_json(cfg_path, run_cfg)

    lab = load_or_compute_labels(
        q_t, keys_t, labels_dir=labels_dir, cache_dir=root / "labels",
        partition_ids=pid, n_partitions=n_parts, progress=progress,
    )
    train_idx, val_idx = split_queries(q_t.shape[0], cfg.val_fraction, cfg.seed)
    atomic_write_json(root / "split.json", {"seed": cfg.seed, "val_index": val_idx.tolist()})
    noisy_pool = _noisy.prepare(cfg, q_t, keys_t, train_idx, root, partition_ids=pid,
                                n_partitions=n_parts, device=dev, progress=progress)

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(dev)
    centroids = centroids_for(pid, keys_t, n_parts, part_path) if pid is not None else None
    if n_heads > 1 and cfg.centroid_init:
        # start at centroid routing; the network learns the correction to it
        model.init_from_centroids(centroids.to(dev))
    # start each head's output at its mean label so early steps learn shape, not offset
    with torch.no_grad():
        tr = torch.as_tensor(train_idx)
        if n_heads > 1:
            ps = lab["partition_score"][tr]
            mean = torch.where(torch.isfinite(ps), ps, torch.nan).nanmean(0).nan_to_num(0.0)
        else:
            mean = lab["top1_score"][tr].float().mean().expand(n_heads)
        bias = None
        if model.kind == "supportnet" and model.b_out is not None:
            bias = model.b_out
        elif model.kind == "router-mlp":
            bias = model.out.bias
        if bias is not None:
            probe = q_t[tr[: min(len(tr), 2048)]].to(dev)
            bias.add_(mean.to(dev) - model(probe).float().mean(0))
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.optimizer_groups(cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen_cpu = torch.Generator().manual_seed(cfg.seed + 1)
    gen_dev = torch.Generator(device=dev).manual_seed(cfg.seed + 2)

    start = 0
    metrics_path = root / "metrics.jsonl"
    if resume and ckpt_path.exists():
        with safe_open(str(ckpt_path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        _restore(tensors, model, ema, optimizer, gen_cpu, gen_dev, dev)
        start = int(meta.get("step", 0))
        if metrics_path.exists():  # drop lines written after the checkpoint we resume from
            lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= start]
            atomic_write_bytes(metrics_path, ("\n".join(kept) + "\n").encode() if kept else b"")
    elif metrics_path.exists():
        metrics_path.unlink()

    keys_dev = keys_t.to(dev)
    q_dev = q_t.to(dev)
    pid_dev = pid.to(dev) if pid is not None else None
    # one labeler for the whole run: the key shard is prepared once, not at every step
    noisy_labeler = _labels.Labeler(
        keys_dev, partition_ids=pid_dev, n_partitions=n_parts if pid_dev is not None else None
    ) if cfg.noise_online else None
    top1_i = lab["top1_index"].to(dev)
    top1_s = lab["top1_score"].float().to(dev)
    part_s = lab["partition_score"].float().to(dev) if pid is not None else None
    train_t = torch.as_tensor(train_idx, device=dev)
    use_amp = cfg.bf16 and dev.type == "cuda"

    def ema_model():
        m = build_model(model_cfg).to(dev)
        m.load_state_dict({**model.state_dict(), **ema})
        return m.eval()

    def run_eval(step):
        m = ema_model()
        vi = torch.as_tensor(val_idx)
        res = evaluate(
            m, q_t[vi], keys_t, lab["top1_index"][vi], lab["top1_score"][vi],
            partition_ids=pid, centroids=centroids,
            partition_score=lab["partition_score"][vi] if pid is not None else None,
        )
        return {"step": step, "split": "val", **res}

    def save(step):
        meta = {"step": str(step), "config": json.dumps(run_cfg)}
        _atomic_safetensors(ckpt_path, _state_tensors(model, ema, optimizer, gen_cpu, gen_dev), meta)
        _atomic_safetensors(root / "model.safetensors", {**model.state_dict(), **ema}, {"step": str(step)})

    t0 = time.time()
    last = {}
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", disable=not progress)
    clock = _noisy.StepClock(start, cfg.steps, write=tqdm.write if progress else (lambda _m: None))
    step = start
    model.train()
    with open(metrics_path, "a") as mfh:
        while step < cfg.steps:
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, cfg.warmup, cfg.steps)
            pos = torch.randint(0, train_t.shape[0], (cfg.batch_size,), generator=gen_cpu).to(dev)
            idx = train_t[pos]
            q = q_dev[idx]
            s_star, i_star = top1_s[idx], top1_i[idx]
            ps = part_s[idx] if part_s is not None else None
            if noisy_pool is not None:
                q, s_star, i_star, ps = noisy_pool.draw(pos, q, s_star, i_star, ps, gen_dev)
            elif cfg.noise_online and cfg.noise > 0 and cfg.noise_fraction > 0:
                noisy = torch.rand(cfg.batch_size, generator=gen_dev, device=dev) < cfg.noise_fraction
                eps = torch.randn(q.shape, generator=gen_dev, device=dev)
                if bool(noisy.any()):
                    qn = q[noisy]
                    norms = qn.norm(dim=1, keepdim=True)
                    qn = qn + cfg.noise * norms * eps[noisy] / math.sqrt(d)
                    qn = qn * (norms / qn.norm(dim=1, keepdim=True).clamp_min(1e-12))
                    fresh = noisy_labeler(qn)
                    sn, in_ = fresh["top1_score"], fresh["top1_index"]
                    q = q.clone()
                    q[noisy] = qn
                    s_star = s_star.clone()
                    i_star = i_star.clone()
                    s_star[noisy] = sn.float().to(dev)
                    i_star[noisy] = in_.long().to(dev)
                    if ps is not None:
                        psn = fresh["partition_score"]
                        ps = ps.clone()
                        ps[noisy] = psn.float().to(dev)
            k_star = keys_dev[i_star]
            best_list = pid_dev[i_star] if pid_dev is not None else None
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, loss_s, loss_k = _loss(model, q, cfg, s_star, k_star, ps, best_list)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
            if not torch.isfinite(loss):
                raise RuntimeError(f"train: loss became {float(loss)} at step {step}; lower --lr")
            optimizer.step()
            # the average starts short and lengthens (1+t)/(10+t), so that short runs are not
            # dominated by their first, untrained steps
            _ema_update(ema, model, min(cfg.ema, (1.0 + step) / (10.0 + step)))
            step += 1
            rec = {"step": step, "split": "train", "loss": float(loss.detach()),
                   "loss_score": float(loss_s.detach()), "loss_key": float(loss_k.detach()), "grad_norm": float(gnorm), "lr": optimizer.param_groups[0]["lr"],
                   "elapsed_s": round(time.time() - t0, 2)}
            out_of_time = cfg.max_minutes is not None and (time.time() - t0) > 60 * cfg.max_minutes
            if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
                last = run_eval(step)
                mfh.write(json.dumps(last) + "\n")
                rec.update({f"val_{k}": v for k, v in last.items() if k not in ("step", "split")})
            if step % 10 == 0 or step == 1 or step == cfg.steps:
                mfh.write(json.dumps(rec) + "\n")
                mfh.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                mfh.flush()
                save(step)
            bar.update(1)
            clock.tick(step)
            post = {"loss": f"{rec['loss']:.4g}"}
            if last:
                post["key_err"] = f"{last['rel_key_error_median']:.3f}"
                if "routing_acc@1" in last:
                    post["acc@1"] = f"{last['routing_acc@1']:.3f}"
            bar.set_postfix(post)
            if out_of_time:
                break
    bar.close()
    if not last or last.get("step") != step:
        last = run_eval(step)
        with open(metrics_path, "a") as mfh:
            mfh.write(json.dumps(last) + "\n")
        save(step)
    state = {"step": step, "steps": cfg.steps, "finished": step >= cfg.steps, "elapsed_s": time.time() - t0,
             "val": last}
    atomic_write_json(root / "state.json", state)
    return last
