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
from . import provenance as _provenance
from ._io import atomic_save_npy, atomic_write_bytes, atomic_write_json, files_record, sha256_file
from ._io import fault_point as _fault_point
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
#: the files of a run that ``state.json`` records (size + blake2b) and readers check
RUN_FILES = ("config.json", "model.safetensors")


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


def _loss(model, q, cfg: TrainConfig, s_star, k_star, part_scores, best_list, *, forward=None,
          score_scale: float = 1.0):
    # forward: the call that runs the model (its DistributedDataParallel wrapper, say);
    # score_scale: this process's share of a mean over a batch split across processes
    forward = model if forward is None else forward
    kind = model.kind
    if kind == "keynet":
        k = forward(q)[:, 0]
        score = (k * q).sum(1)
        loss_s = F.mse_loss(score.float(), s_star)
        loss_k = ((k.float() - k_star) ** 2).sum(1).mean()
        return cfg.w_score * loss_s * score_scale + cfg.w_key * loss_k, loss_s, loss_k
    need_key = kind == "supportnet" and cfg.w_key > 0
    qq = q.detach().requires_grad_(need_key)
    f = forward(qq).float()
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
    return cfg.w_score * loss_s * score_scale + cfg.w_key * loss_k, loss_s, loss_k


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


# --------------------------------------------------------------------------------------
# the run, in parts: inputs, run folder, labels, model set-up, step, checkpoint
# --------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """Validated inputs of a run, on the CPU (``keys_t`` [n, d], ``q_t`` [m, d])."""

    keys_t: torch.Tensor
    q_t: torch.Tensor
    dev: torch.device
    pid: torch.Tensor | None = None
    n_parts: int | None = None
    part_path: Path | None = None
    part_sha: str | None = None
    n_heads: int = 1
    inputs: dict | None = None


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError("device: CUDA requested but not available")
        torch.empty(0, device=dev)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: cannot use {device!r} ({exc})") from None
    return dev


def _load_inputs(keys, queries, partitions, cfg: TrainConfig, device, *, labels_dir=None) -> _Inputs:
    from .data import load_array

    dev = _check_device(device)
    if isinstance(keys, (str, os.PathLike)):
        keys = load_array(keys, name="keys")
    if isinstance(queries, (str, os.PathLike)):
        queries = load_array(queries, name="queries")
    keys_t = check_matrix(to_tensor(np.asarray(keys, dtype=np.float32) if isinstance(keys, np.ndarray) else keys, "keys"), "keys").float()
    q_t = check_matrix(
        to_tensor(np.asarray(queries, dtype=np.float32) if isinstance(queries, np.ndarray) else queries, "queries"),
        "queries", dim=keys_t.shape[1],
    ).float()
    n_keys = keys_t.shape[0]
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
    # fingerprints of what the run is made from; a labels folder or partitions file given
    # with it is checked against the same inputs first
    inputs = _provenance.run_inputs(keys, queries, pid, labels_dir=labels_dir, partitions_path=part_path)
    return _Inputs(keys_t, q_t, dev, pid, n_parts, part_path, part_sha, n_heads, inputs)


def _prepare_run_folder(out, cfg: TrainConfig, inp: _Inputs, resume: bool) -> tuple[TrainConfig, dict, dict]:
    """Create or check the run folder: returns (config in force, model config, run config).

    A new run refuses a folder that holds one; ``resume`` refuses a changed model, data or
    training option (except :attr:`TrainConfig.MUTABLE`). Writes ``config.json``."""
    n_keys, d = inp.keys_t.shape
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(f"out: {root} exists and is not a folder")
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
        cfg = dataclasses.replace(cfg, noise_copies=_noisy.default_copies(inp.dev))
    model_cfg = _model_config(cfg, d, n_keys, inp.n_heads, inp.q_t)
    run_cfg = {
        "model": model_cfg,
        "train": cfg.to_dict(),
        "n_keys": n_keys,
        "d": d,
        "n_queries": int(inp.q_t.shape[0]),
        "n_params": count_params(model_cfg),
        "param_fraction_of_keys": count_params(model_cfg) / (n_keys * d),
        "n_partitions": inp.n_parts,
        "partitions_sha256": inp.part_sha,
        "partitions_path": str(inp.part_path) if inp.part_path else None,
        "inputs": inp.inputs,
        "keys_fingerprint": hashlib.sha256(inp.keys_t[: min(n_keys, 1024)].numpy().tobytes()).hexdigest(),
    }
    if old is not None:
        _provenance.check_resume(old.get("inputs"), inp.inputs, root)
        for key in ("model", "n_keys", "d", "n_queries", "n_partitions", "partitions_sha256", "keys_fingerprint"):
            if old.get(key) != run_cfg.get(key):
                raise InputError(f"resume: {key} differs from the run in {root} ({old.get(key)} vs {run_cfg.get(key)})")
        for key, v in old["train"].items():
            if key not in TrainConfig.MUTABLE and run_cfg["train"].get(key) != v:
                raise InputError(f"resume: training option {key} differs from the run in {root} ({v} vs {run_cfg['train'].get(key)})")
    atomic_write_json(cfg_path, run_cfg)
    return cfg, model_cfg, run_cfg


def _run_labels(root: Path, cfg: TrainConfig, inp: _Inputs, labels_dir, progress: bool):
    """The run's exact labels and its train/validation split (``split.json``)."""
    lab = load_or_compute_labels(
        inp.q_t, inp.keys_t, labels_dir=labels_dir, cache_dir=root / "labels",
        partition_ids=inp.pid, n_partitions=inp.n_parts, progress=progress,
    )
    train_idx, val_idx = split_queries(inp.q_t.shape[0], cfg.val_fraction, cfg.seed)
    atomic_write_json(root / "split.json", {"seed": cfg.seed, "val_index": val_idx.tolist()})
    return lab, train_idx, val_idx


@dataclass
class _Model:
    """Everything a step changes (and a checkpoint holds): weights, EMA, optimiser, RNGs."""

    model: torch.nn.Module
    ema: dict
    optimizer: torch.optim.Optimizer
    gen_cpu: torch.Generator
    gen_dev: torch.Generator
    centroids: torch.Tensor | None


def _setup_model(cfg: TrainConfig, model_cfg: dict, inp: _Inputs, lab: dict, train_idx) -> _Model:
    dev = inp.dev
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(dev)
    centroids = centroids_for(inp.pid, inp.keys_t, inp.n_parts, inp.part_path) if inp.pid is not None else None
    if inp.n_heads > 1 and cfg.centroid_init:
        # start at centroid routing; the network learns the correction to it
        model.init_from_centroids(centroids.to(dev))
    # start each head's output at its mean label so early steps learn shape, not offset
    with torch.no_grad():
        tr = torch.as_tensor(train_idx)
        if inp.n_heads > 1:
            ps = lab["partition_score"][tr]
            mean = torch.where(torch.isfinite(ps), ps, torch.nan).nanmean(0).nan_to_num(0.0)
        else:
            mean = lab["top1_score"][tr].float().mean().expand(inp.n_heads)
        bias = None
        if model.kind == "supportnet" and model.b_out is not None:
            bias = model.b_out
        elif model.kind == "router-mlp":
            bias = model.out.bias
        if bias is not None:
            probe = inp.q_t[tr[: min(len(tr), 2048)]].to(dev)
            bias.add_(mean.to(dev) - model(probe).float().mean(0))
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.optimizer_groups(cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen_cpu = torch.Generator().manual_seed(cfg.seed + 1)
    gen_dev = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    return _Model(model, ema, optimizer, gen_cpu, gen_dev, centroids)


def _read_checkpoint(root: Path) -> tuple[dict, int] | None:
    """The tensors and step of ``root/checkpoint.safetensors``; None when there is none."""
    from safetensors import safe_open

    ckpt_path = root / "checkpoint.safetensors"
    if not ckpt_path.exists():
        return None
    try:
        with safe_open(str(ckpt_path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        return tensors, int(meta.get("step", 0))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a torn file
        raise InputError(
            f"resume: {ckpt_path} is truncated or corrupt ({exc.__class__.__name__}: {str(exc)[:120]}); "
            "start the run again with --overwrite"
        ) from None


def _resume_metrics(root: Path, start: int | None) -> None:
    """Drop ``metrics.jsonl`` lines written after the checkpoint we resume from (all of
    them when the run starts afresh, ``start`` None)."""
    metrics_path = root / "metrics.jsonl"
    if start is None:
        if metrics_path.exists():
            metrics_path.unlink()
        return
    if metrics_path.exists():
        lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= start]
        atomic_write_bytes(metrics_path, ("\n".join(kept) + "\n").encode() if kept else b"")


def _save_checkpoint(root: Path, run_cfg: dict, step: int, m: _Model) -> None:
    """Write the checkpoint, then the EMA weights, each atomically."""
    meta = {"step": str(step), "config": json.dumps(run_cfg)}
    _atomic_safetensors(root / "checkpoint.safetensors",
                        _state_tensors(m.model, m.ema, m.optimizer, m.gen_cpu, m.gen_dev), meta)
    _atomic_safetensors(root / "model.safetensors", {**m.model.state_dict(), **m.ema}, {"step": str(step)})


class _Stepper:
    """One optimisation step on a global batch of ``cfg.batch_size`` training queries.

    The batch (positions, noise mask, noise) is drawn from the run's generators for the
    WHOLE global batch, so the RNG state after a step does not depend on how many
    processes share it; this process then trains on its slice ``[lo, hi)`` of the batch.
    ``forward`` is the model call (the model itself, or its DistributedDataParallel
    wrapper); ``reduce`` sums small tensors across processes (None: one process).
    """

    def __init__(self, cfg: TrainConfig, inp: _Inputs, lab: dict, train_idx, m: _Model,
                 *, forward=None, rank: int = 0, world_size: int = 1, reduce=None, noisy_pool=None):
        dev = inp.dev
        self.cfg, self.m, self.dev = cfg, m, dev
        self.forward = forward if forward is not None else m.model
        self.world_size, self.reduce = world_size, reduce
        per = cfg.batch_size // world_size
        self.lo, self.hi = rank * per, (rank + 1) * per
        self.d = inp.keys_t.shape[1]
        self.keys_dev = inp.keys_t.to(dev)
        self.q_dev = inp.q_t.to(dev)
        self.pid_dev = inp.pid.to(dev) if inp.pid is not None else None
        # noisy copies made once (amips.noisy), or, for runs that ask for it, fresh noise
        # labelled every step by one labeler whose key shard is prepared once
        self.noisy_pool = noisy_pool
        self.noisy_labeler = _labels.Labeler(
            self.keys_dev, partition_ids=self.pid_dev,
            n_partitions=inp.n_parts if self.pid_dev is not None else None,
        ) if cfg.noise_online else None
        self.top1_i = lab["top1_index"].to(dev)
        self.top1_s = lab["top1_score"].float().to(dev)
        self.part_s = lab["partition_score"].float().to(dev) if inp.pid is not None else None
        self.train_t = torch.as_tensor(train_idx, device=dev)
        self.use_amp = cfg.bf16 and dev.type == "cuda"

    def batch(self):
        """This process's slice of the next global batch: (q, s*, i*, per-list s* or None)."""
        cfg, dev, m = self.cfg, self.dev, self.m
        lo, hi = self.lo, self.hi
        pos = torch.randint(0, self.train_t.shape[0], (cfg.batch_size,), generator=m.gen_cpu).to(dev)
        if self.noisy_pool is not None:
            # the copies are drawn for the whole global batch (world-size-independent RNG)
            idx = self.train_t[pos]
            ps = self.part_s[idx] if self.part_s is not None else None
            q, s_star, i_star, ps = self.noisy_pool.draw(
                pos, self.q_dev[idx], self.top1_s[idx], self.top1_i[idx], ps, m.gen_dev)
            return q[lo:hi], s_star[lo:hi], i_star[lo:hi], ps[lo:hi] if ps is not None else None
        idx = self.train_t[pos][lo:hi]
        q = self.q_dev[idx]
        s_star, i_star = self.top1_s[idx], self.top1_i[idx]
        ps = self.part_s[idx] if self.part_s is not None else None
        if cfg.noise_online and cfg.noise > 0 and cfg.noise_fraction > 0:
            noisy = torch.rand(cfg.batch_size, generator=m.gen_dev, device=dev) < cfg.noise_fraction
            eps = torch.randn((cfg.batch_size, self.d), generator=m.gen_dev, device=dev)
            noisy, eps = noisy[lo:hi], eps[lo:hi]
            if bool(noisy.any()):
                qn = q[noisy]
                norms = qn.norm(dim=1, keepdim=True)
                qn = qn + cfg.noise * norms * eps[noisy] / math.sqrt(self.d)
                qn = qn * (norms / qn.norm(dim=1, keepdim=True).clamp_min(1e-12))
                fresh = self.noisy_labeler(qn)
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
        return q, s_star, i_star, ps

    def __call__(self, step: int) -> dict:
        """Train step ``step`` (0-based); returns its training record (global values)."""
        cfg, m = self.cfg, self.m
        for g in m.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, cfg.warmup, cfg.steps)
        q, s_star, i_star, ps = self.batch()
        k_star = self.keys_dev[i_star]
        best_list = self.pid_dev[i_star] if self.pid_dev is not None else None
        score_scale = 1.0
        if self.reduce is not None and ps is not None:
            # the per-list loss is a mean over the valid (query, list) pairs of the GLOBAL
            # batch; the gradient average across processes divides by their number
            n_local = torch.isfinite(ps).sum().double()
            n_global = self.reduce(n_local.reshape(1))[0]
            score_scale = float(n_local * self.world_size / n_global.clamp_min(1))
        with torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.use_amp):
            extra = {} if self.reduce is None else {"forward": self.forward, "score_scale": score_scale}
            loss, loss_s, loss_k = _loss(m.model, q, cfg, s_star, k_star, ps, best_list, **extra)
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(m.model.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
        losses = torch.stack([loss.detach().double(), (loss_s.detach() * score_scale).double(),
                              loss_k.detach().double()])
        if self.reduce is not None:
            losses = self.reduce(losses) / self.world_size
        if not torch.isfinite(losses[0]):
            raise RuntimeError(f"train: loss became {float(losses[0])} at step {step}; lower --lr")
        m.optimizer.step()
        # the average starts short and lengthens (1+t)/(10+t), so that short runs are not
        # dominated by their first, untrained steps
        _ema_update(m.ema, m.model, min(cfg.ema, (1.0 + step) / (10.0 + step)))
        return {"step": step + 1, "split": "train", "loss": float(losses[0]),
                "loss_score": float(losses[1]), "loss_key": float(losses[2]), "grad_norm": float(gnorm),
                "lr": m.optimizer.param_groups[0]["lr"]}


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

    Inside an initialised ``torch.distributed`` process group (``torchrun``) the run is
    data-parallel: see :func:`amips.distributed.train_distributed`.
    """
    from . import distributed

    if distributed.is_distributed():
        return distributed.train_distributed(
            keys, queries, out, config, labels_dir=labels_dir, partitions=partitions,
            device=device, resume=resume, progress=progress,
        )
    cfg = config or TrainConfig()
    cfg.validate()
    inp = _load_inputs(keys, queries, partitions, cfg, device, labels_dir=labels_dir)
    root = Path(out)
    # a torn checkpoint is refused before the run folder is touched
    ckpt = _read_checkpoint(root) if resume else None
    cfg, model_cfg, run_cfg = _prepare_run_folder(root, cfg, inp, resume)
    lab, train_idx, val_idx = _run_labels(root, cfg, inp, labels_dir, progress)
    m = _setup_model(cfg, model_cfg, inp, lab, train_idx)
    start = 0
    if ckpt is not None:
        _restore(ckpt[0], m.model, m.ema, m.optimizer, m.gen_cpu, m.gen_dev, inp.dev)
        start = ckpt[1]
    _resume_metrics(root, start if ckpt is not None else None)
    pool = _noisy.prepare(cfg, inp.q_t, inp.keys_t, train_idx, root, partition_ids=inp.pid,
                          n_partitions=inp.n_parts, device=inp.dev, progress=progress)
    stepper = _Stepper(cfg, inp, lab, train_idx, m, noisy_pool=pool)
    return _train_loop(root, cfg, model_cfg, run_cfg, inp, lab, val_idx, m, stepper, start, progress)


def _train_loop(root: Path, cfg: TrainConfig, model_cfg: dict, run_cfg: dict, inp: _Inputs, lab: dict,
                val_idx, m: _Model, stepper, start: int, progress: bool, *, writer: bool = True,
                agree_stop=None) -> dict:
    """Steps from ``start`` to ``cfg.steps`` (or ``max_minutes``), with evaluation, metrics
    and checkpoints; only the ``writer`` process evaluates and writes. ``agree_stop``
    makes the time limit one decision for all processes."""
    dev = inp.dev
    metrics_path = root / "metrics.jsonl"

    def run_eval(step):
        ema_model = build_model(model_cfg).to(dev)
        ema_model.load_state_dict({**m.model.state_dict(), **m.ema})
        ema_model.eval()
        vi = torch.as_tensor(val_idx)
        res = evaluate(
            ema_model, inp.q_t[vi], inp.keys_t, lab["top1_index"][vi], lab["top1_score"][vi],
            partition_ids=inp.pid, centroids=m.centroids,
            partition_score=lab["partition_score"][vi] if inp.pid is not None else None,
        )
        return {"step": step, "split": "val", **res}

    t0 = time.time()
    last = {}
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", disable=not (progress and writer))
    clock = _noisy.StepClock(start, cfg.steps, write=tqdm.write if (progress and writer) else (lambda _m: None))
    step = start
    m.model.train()
    mfh = open(metrics_path, "a") if writer else None
    try:
        while step < cfg.steps:
            rec = stepper(step)
            step += 1
            rec["elapsed_s"] = round(time.time() - t0, 2)
            out_of_time = cfg.max_minutes is not None and (time.time() - t0) > 60 * cfg.max_minutes
            if agree_stop is not None and cfg.max_minutes is not None:
                out_of_time = agree_stop(out_of_time)
            if not writer:
                if out_of_time:
                    break
                continue
            if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
                last = run_eval(step)
                mfh.write(json.dumps(last) + "\n")
                rec.update({f"val_{k}": v for k, v in last.items() if k not in ("step", "split")})
            if step % 10 == 0 or step == 1 or step == cfg.steps:
                mfh.write(json.dumps(rec) + "\n")
                mfh.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                mfh.flush()
                _save_checkpoint(root, run_cfg, step, m)
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
    finally:
        if mfh is not None:
            mfh.close()
    bar.close()
    if not writer:
        return {}
    if not last or last.get("step") != step:
        last = run_eval(step)
        with open(metrics_path, "a") as mfh:
            mfh.write(json.dumps(last) + "\n")
        _save_checkpoint(root, run_cfg, step, m)
    # "finished" only when every step ran: a run stopped by max_minutes (or any other stop)
    # is unfinished, and its files are recorded so that a reader can check them
    state = {"step": step, "steps": cfg.steps, "finished": step >= cfg.steps,
             "stopped_early": step < cfg.steps, "elapsed_s": time.time() - t0, "val": last,
             "files": files_record(root, RUN_FILES)}
    _fault_point("train-final")
    atomic_write_json(root / "state.json", state)
    return last
