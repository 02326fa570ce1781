"""Scale-out on ``torch.distributed``: the process group, label key slices, data-parallel training.

amips runs on the engine users already launch, ``torchrun``; nothing here starts processes.
``torchrun --nproc-per-node N -m amips labels|train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`session` sees them and joins the
process group: **gloo** for ``--device cpu``, **nccl** for ``--device cuda`` (one GPU per
process, ``cuda:LOCAL_RANK``). There is no silent fallback: asking for CUDA where NCCL or a
GPU is missing is an error. ``AMIPS_DIST_TIMEOUT`` (seconds, default 1800) bounds every
collective, so a rank that dies or never arrives ends the job with an error, not a hang.

Labels (:func:`key_range`, :func:`merge_label_parts`): rank ``r`` of ``W`` owns the keys
``[r*n//W, (r+1)*n//W)`` of the memory-mapped key file, labels every query against them with
the certified pipeline, and keeps the exact fp64 scores of its candidates. Rank 0 merges the
ranks' results of each query batch by (exact score desc, global key index asc): the rule the
single-process pipeline ranks by, so the files are byte-for-byte what one process writes.

Training (:func:`train_distributed`): DistributedDataParallel over the parts of
:mod:`amips.train`. Every rank draws the same GLOBAL batch from the run's seeded generators
and trains on its slice, so the generators' state, the checkpoint and ``--resume`` do not
depend on the world size; rank 0 alone reads and writes the run folder.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ._validate import InputError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800.0


# --------------------------------------------------------------------------------------
# the process group
# --------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when the torchrun variables are all set (and describe more than one process)."""
    return all(v in os.environ for v in TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def timeout_s() -> float:
    raw = os.environ.get("AMIPS_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value != value:
        raise InputError(f"AMIPS_DIST_TIMEOUT: expected a number of seconds > 0, got {raw!r}")
    return value


def backend_for(device: str) -> str:
    """gloo for CPU, nccl for CUDA; an error (never a fallback) when NCCL or CUDA is missing."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "gloo"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device: cuda requested under torchrun but no CUDA device is available")
        if not dist.is_nccl_available():
            raise InputError("device: cuda requested under torchrun but this torch has no NCCL backend")
        return "nccl"
    raise InputError(f"device: {device!r} cannot run distributed (use cpu with gloo or cuda with nccl)")


@contextlib.contextmanager
def session(device: str = "cpu"):
    """Join the torchrun process group for the duration of a command; yields the device this
    process uses (``cuda`` becomes ``cuda:LOCAL_RANK``). Without torchrun: does nothing."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield device
        return
    if not dist.is_available():
        raise InputError("torchrun: this torch build has no torch.distributed")
    backend = backend_for(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"device: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible "
                "(use --nproc-per-node <= the number of GPUs)"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    kwargs = {}
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = torch.device(device)  # binds the communicator now (torch >= 2.3)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()), **kwargs)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def all_gather_object(obj) -> list:
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def checked(fn, what: str):
    """Run ``fn()`` on every rank; if it raises :class:`InputError` on any rank, raise it on
    every rank (naming the rank), so no rank waits in a collective for one that gave up."""
    result, error = None, None
    try:
        result = fn()
    except InputError as exc:
        error = str(exc)
    errors = all_gather_object(error)
    for r, e in enumerate(errors):
        if e is not None:
            raise InputError(e if r == rank() else f"{e} (on rank {r}; {what} stopped on every rank)")
    return result


def agree(payload: dict, what: str) -> None:
    """Every rank must hold the same ``payload`` (the arguments of the job); otherwise an
    :class:`InputError` on every rank naming the fields that differ."""
    payloads = all_gather_object(payload)
    for r, other in enumerate(payloads):
        if other != payloads[0]:
            fields = sorted(k for k in set(other) | set(payloads[0]) if other.get(k) != payloads[0].get(k))
            raise InputError(
                f"{what}: arguments differ across ranks (rank 0 vs rank {r}: {', '.join(fields)}); "
                "every rank must run the same command"
            )


def on_every_rank(fn, what: str):
    """Run ``fn()`` on every rank; an :class:`InputError` on any rank is raised on every rank
    (instead of the other ranks waiting for it in the next collective)."""
    err, result = None, None
    try:
        result = fn()
    except InputError as exc:
        err = str(exc)
    if world_size() > 1:
        errs = all_gather_object(err)
        failed = [(r, e) for r, e in enumerate(errs) if e is not None]
        if failed:
            r, e = failed[0]
            raise InputError(e if r == rank() else f"{e} (on rank {r}; {what} stopped on every rank)")
    elif err is not None:
        raise InputError(err)
    return result


def from_rank0(fn, what: str):
    """Run ``fn()`` on rank 0 only and hand its result (or its InputError) to every rank."""
    box = [None, None]
    if rank() == 0:
        try:
            box[0] = fn()
        except InputError as exc:
            box[1] = str(exc)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise InputError(box[1] if rank() == 0 else f"{box[1]} (on rank 0; {what} stopped on every rank)")
    return box[0]


# --------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------
def key_range(n_keys: int, r: int, w: int) -> tuple[int, int]:
    """The keys ``[lo, hi)`` rank ``r`` of ``w`` labels against (balanced, contiguous)."""
    if w > n_keys:
        raise InputError(
            f"world size: {w} processes but only {n_keys} keys; every rank needs at least one key "
            "(use --nproc-per-node <= the number of keys)"
        )
    return r * n_keys // w, (r + 1) * n_keys // w


def label_agreement(job: dict, n_keys: int, n_queries: int, d: int) -> dict:
    """What must be equal on every rank of a label job: the inputs' contents and options
    (file paths and mtimes may differ between machines)."""
    def content(fp):
        return None if fp is None else {"size": fp["size"], "sha256_head_tail": fp["sha256_head_tail"]}

    return {
        "keys": content(job["keys"]), "queries": content(job["queries"]),
        "partitions": content(job.get("partitions")),
        **{k: v for k, v in job.items() if k not in ("keys", "queries", "partitions")},
        "n_keys": n_keys, "n_queries": n_queries, "d": d,
    }


def merge_label_parts(parts: list[dict], topk: int | None, partitions: bool) -> dict:
    """Merge the ranks' results of one query batch (global key indices, exact fp64 scores
    under ``*_score64``) into what one process writes: rank by (score desc, index asc)."""
    from .labels.certify import _rank_exact

    big = torch.iinfo(torch.int64).max
    out: dict[str, np.ndarray] = {}
    if "top1_score64" in parts[0]:
        if topk is not None:
            s = torch.cat([torch.from_numpy(p["topk_score64"]) for p in parts], 1)
            i = torch.cat([torch.from_numpy(p["topk_index"]).long() for p in parts], 1)
        else:
            s = torch.stack([torch.from_numpy(p["top1_score64"]) for p in parts], 1)
            i = torch.stack([torch.from_numpy(p["top1_index"]).long() for p in parts], 1)
        s, i = _rank_exact(s, i, topk or 1)
        out["top1_score"], out["top1_index"] = s[:, 0].float().numpy(), i[:, 0].numpy()
        if topk is not None:
            out["topk_score"], out["topk_index"] = s.float().numpy(), i.numpy()
    if partitions:
        s = torch.stack([torch.from_numpy(p["partition_score64"]) for p in parts], -1)
        i = torch.stack([torch.from_numpy(p["partition_index"]).long() for p in parts], -1)
        ps, pi = _rank_exact(s, i, 1)
        ps, pi = ps[..., 0], pi[..., 0]
        out["partition_score"], out["partition_index"] = ps.float().numpy(), pi.numpy()
        if "top1_score64" not in parts[0]:
            s64, i64 = _rank_exact(ps, pi.masked_fill(pi < 0, big), 1)
            out["top1_score"], out["top1_index"] = s64[:, 0].float().numpy(), i64[:, 0].numpy()
    return out


def gather_to_rank0(obj) -> list | None:
    """``obj`` of every rank, on rank 0 (None elsewhere)."""
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def _fingerprint(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t[: min(len(t), 1024)].contiguous().numpy().tobytes()).hexdigest()


def train_distributed(keys, queries, out, config=None, *, labels_dir=None, partitions=None,
                      device: str = "cpu", resume: bool = False, progress: bool = True) -> dict:
    """:func:`amips.train.train` across the processes of the current process group.

    Every rank validates its arguments (errors reach every rank); rank 0 prepares the run
    folder, the labels and the checkpoint and hands them to the others; each rank trains
    a ``batch_size / world_size`` slice of every global batch under DistributedDataParallel;
    rank 0 evaluates and writes metrics and checkpoints. Returns rank 0's final metrics on
    every rank."""
    from torch.nn.parallel import DistributedDataParallel

    from . import train as T

    r, w = rank(), world_size()
    cfg = config or T.TrainConfig()

    def prepare():
        cfg.validate()
        if cfg.batch_size % w:
            raise InputError(f"batch_size: {cfg.batch_size} is not a multiple of the world size {w}")
        return T._load_inputs(keys, queries, partitions, cfg, device, labels_dir=labels_dir)

    inp = checked(prepare, "train")
    if inp.dev.type == "cuda" and inp.dev.index is None:
        inp.dev = torch.device("cuda", torch.cuda.current_device())
    agree({
        **{k: v for k, v in cfg.to_dict().items() if k not in T.TrainConfig.MUTABLE},
        "keys": [list(inp.keys_t.shape), _fingerprint(inp.keys_t)],
        "queries": [list(inp.q_t.shape), _fingerprint(inp.q_t)],
        "partitions": inp.part_sha, "resume": bool(resume), "labels": labels_dir is not None,
        "device": inp.dev.type,
    }, "train")
    root = Path(out)

    def folder():
        cfg2, model_cfg, run_cfg = T._prepare_run_folder(root, cfg, inp, resume)
        lab, train_idx, val_idx = T._run_labels(root, cfg2, inp, labels_dir, progress)
        # rank 0 makes and labels the noisy copies once; the others then read its cache
        T._noisy.prepare(cfg2, inp.q_t, inp.keys_t, train_idx, root, partition_ids=inp.pid,
                         n_partitions=inp.n_parts, device=inp.dev, progress=progress)
        ckpt = T._read_checkpoint(root) if resume else None
        T._resume_metrics(root, ckpt[1] if ckpt is not None else None)
        return cfg2, model_cfg, run_cfg, lab, train_idx, val_idx, ckpt

    cfg, model_cfg, run_cfg, lab, train_idx, val_idx, ckpt = from_rank0(folder, "train")
    m = T._setup_model(cfg, model_cfg, inp, lab, train_idx)
    start = 0
    if ckpt is not None:
        T._restore(ckpt[0], m.model, m.ema, m.optimizer, m.gen_cpu, m.gen_dev, inp.dev)
        start = ckpt[1]
    ddp = DistributedDataParallel(m.model, device_ids=[inp.dev.index] if inp.dev.type == "cuda" else None)
    pool = T._noisy.prepare(cfg, inp.q_t, inp.keys_t, train_idx, root, partition_ids=inp.pid,
                            n_partitions=inp.n_parts, device=inp.dev, progress=False)
    stepper = T._Stepper(cfg, inp, lab, train_idx, m, forward=ddp, rank=r, world_size=w, reduce=all_reduce_sum,
                         noisy_pool=pool)

    def agree_stop(flag: bool) -> bool:
        # rank 0's clock decides, so every rank stops after the same step
        box = [bool(flag)]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    last = T._train_loop(root, cfg, model_cfg, run_cfg, inp, lab, val_idx, m, stepper, start, progress,
                         writer=(r == 0), agree_stop=agree_stop)
    box = [last]
    dist.broadcast_object_list(box, src=0)
    return box[0]
