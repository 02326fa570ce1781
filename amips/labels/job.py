"""The resumable, sharded label job behind ``amips labels``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from .. import distributed as _dist
from .._io import (
    atomic_save_npy,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    check_files,
    file_fingerprint,
    files_record,
)
from .._io import fault_point as _fault_point
from .._validate import (
    InputError,
    check_device,
    check_int_vector,
    check_positive_int,
)
from ..provenance import fingerprint
from .batch import BatchLabeler, LabelSpec, _default_batch_size
from .certify import MAX_TOPK, Candidates, KeySource, scale_queries
from .screen import resolve_precision

# ----------------------------------------------------------------------------------------
# The resumable label job behind `amips labels`.
# ----------------------------------------------------------------------------------------
PARTIAL_DIR = ".amips_labels_partial"
MANIFEST = "labels.json"


OUTPUT_FILES = {
    "top1_index": "top1_index.npy",
    "top1_score": "top1_score.npy",
    "topk_index": "topk_index.npy",
    "topk_score": "topk_score.npy",
    "partition_index": "partition_index.npy",
    "partition_score": "partition_score.npy",
}


def run_label_job(
    keys_path: str | os.PathLike,
    queries_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    partitions_path: str | os.PathLike | None = None,
    topk: int | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    shard_size: int = 1 << 20,
    precision: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Compute labels for files on disk into ``out_dir``; resumable after a kill.

    Each finished query batch is committed atomically to ``out_dir/.amips_labels_partial``
    (and, with several key shards, the running candidates after every shard). Outputs are
    written atomically only when every batch is done; ``labels.json`` is written last.
    Running the same command again after an interruption finishes the job.

    Under ``torchrun`` (an initialised process group) each rank labels its slice of the
    keys into its own ``rankRRRRofWWWW`` folder of partial work, and rank 0 merges the
    slices into the same files one process writes (:mod:`amips.distributed`).
    """
    from tqdm.auto import tqdm

    from ..data import load_array

    out = Path(out_dir)
    keys_arr = load_array(keys_path, name="keys")
    queries_arr = load_array(queries_path, name="queries")
    for name, arr in (("keys", keys_arr), ("queries", queries_arr)):
        if arr.ndim != 2:
            raise InputError(f"{name}: expected a 2-D array [n, d], got shape {arr.shape}")
        if arr.dtype.kind not in "fiu":
            raise InputError(f"{name}: expected numeric vectors, got dtype {arr.dtype}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise InputError(f"{name}: is empty (shape {arr.shape})")
    if keys_arr.shape[1] != queries_arr.shape[1]:
        raise InputError(
            f"queries: dimension mismatch, keys have d = {keys_arr.shape[1]}, "
            f"queries have d = {queries_arr.shape[1]}"
        )
    if topk is not None:
        topk = check_positive_int(topk, "topk", maximum=MAX_TOPK)
    shard_size = check_positive_int(shard_size, "shard_size")
    dev = check_device(device, "device")
    precision_used = resolve_precision(precision, dev)

    part_ids = None
    n_partitions = 0
    if partitions_path is not None:
        raw = load_array(partitions_path, name="partitions", mmap=False)
        if raw.ndim != 1:
            raise InputError(f"partitions: expected a 1-D array of ids, got shape {raw.shape}")
        part_ids = check_int_vector(np.asarray(raw), "partitions", length=keys_arr.shape[0])
        if int(part_ids.max()) >= keys_arr.shape[0]:
            # checked before anything is sized by it (a wild id would allocate [nq, id] scores)
            raise InputError(f"partitions: list id {int(part_ids.max())} is not below the number of keys "
                             f"({keys_arr.shape[0]}); ids must be in [0, n_keys)")
        n_partitions = int(part_ids.max()) + 1
    if batch_size is None:
        batch_size = _default_batch_size(dev, n_partitions)
    batch_size = check_positive_int(batch_size, "batch_size")

    job = {
        "keys": _input_fingerprint(keys_path),
        "queries": _input_fingerprint(queries_path),
        "partitions": _input_fingerprint(partitions_path) if partitions_path else None,
        "topk": topk,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "precision": precision_used,
    }
    rank, world = _dist.rank(), _dist.world_size()
    if world > 1:
        _dist.agree(_dist.label_agreement(job, *keys_arr.shape[:1], *queries_arr.shape), "labels")
    key_lo, key_hi = _dist.key_range(keys_arr.shape[0], rank, world)
    manifest_path = out / MANIFEST
    partial = out / PARTIAL_DIR
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a folder; choose a folder for the labels")

    def decide():
        if manifest_path.exists() and not partial.exists():
            done = _read_manifest(manifest_path)
            if done.get("job") == job and done.get("complete") and not overwrite:
                broken = _broken_output(out, done)
                if broken is None:
                    if progress:
                        print(f"labels in {out} are complete and match this job; nothing to do")
                    return done
                # an output of the finished job was deleted or changed: the job is redone
                if progress:
                    print(f"labels in {out}: {broken}; computing them again")
                overwrite_here = True
            else:
                overwrite_here = overwrite
            if not overwrite_here:
                what = ("labels of a different job" if done.get("complete")
                        else "labels with no complete manifest (an older amips, or a corrupt labels.json)")
                raise InputError(f"out: {out} already holds {what}; pass --overwrite or use another folder")
        else:
            overwrite_here = overwrite
        out.mkdir(parents=True, exist_ok=True)
        if overwrite_here:
            # the old labels stop being complete-looking before anything new is written
            for stale in [MANIFEST, *OUTPUT_FILES.values()]:
                (out / stale).unlink(missing_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        partial.mkdir(exist_ok=True)
        return None

    done = decide() if world == 1 else _dist.from_rank0(decide, "labels")
    if done is not None:
        return done
    # one process works in the partial folder itself; a rank of several in its own folder
    work = partial if world == 1 else partial / f"rank{rank:04d}of{world:04d}"
    if work != partial and overwrite and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    job_file = work / "job.json"
    if job_file.exists():
        previous = _read_manifest(job_file)  # a torn or hand-edited job.json is another job
        if previous != job:
            if not overwrite:
                raise InputError(
                    f"out: {work} holds partial work of a different job (inputs or options "
                    "changed); pass --overwrite to discard it"
                )
    atomic_write_bytes(job_file, json.dumps(job, indent=2).encode())

    nq = queries_arr.shape[0]
    keys_src = KeySource(keys_arr[key_lo:key_hi], "keys")
    # NaN/inf check and the power-of-two scale of this rank's keys (one pass); ranks merge
    # exact fp64 scores of the original problem, so their scales need not agree
    _dist.on_every_rank(keys_src.fit_range, "labels")
    spec = LabelSpec(topk=topk, partitions=part_ids[key_lo:key_hi] if part_ids is not None else None,
                     n_partitions=n_partitions, precision=precision_used, shard_size=shard_size)
    labeler = BatchLabeler(keys_src, spec, dev)
    n_batches = math.ceil(nq / batch_size)
    t0 = time.perf_counter()
    stats_total = {"queries": 0, "rescreened_queries": 0, "fallback_queries": 0}
    if part_ids is not None:
        stats_total["fallback_pairs"] = 0
    bar = tqdm(total=n_batches * labeler.n_shards, desc="labels", unit="shard", disable=not progress or rank > 0)
    for b in range(n_batches):
        part_file = work / f"batch_{b:06d}.npz"
        if part_file.exists():
            try:
                with np.load(part_file) as f:
                    counts = {key: int(f[f"stat_{key}"]) for key in stats_total}
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                part_file.unlink()  # damaged committed batch (written atomically: tampered): redone
            else:
                for key in stats_total:
                    stats_total[key] += counts[key]
                bar.update(labeler.n_shards)
                continue
        a, z = b * batch_size, min((b + 1) * batch_size, nq)
        block = np.array(queries_arr[a:z], dtype=np.float64, order="C")
        if not np.isfinite(block).all():
            raise InputError(f"queries: contains NaN or inf values (rows {a}..{z - 1})")
        q, q64, q_log2 = scale_queries(block, dev)
        state_file = work / f"batch_{b:06d}.state.pt"
        state, first = None, 0
        if state_file.exists():
            try:
                saved = torch.load(state_file, map_location=dev, weights_only=True)
                first = int(saved["next_shard"])
                state = {name: Candidates(**saved[name]) for name in ("top", "part") if name in saved}
            except Exception:  # noqa: BLE001 - a damaged shard state: the batch starts again
                state, first = None, 0
                state_file.unlink()
            bar.update(first)
        for j in range(first, labeler.n_shards):
            state = labeler.screen(q, j, state, q64=q64)
            if labeler.n_shards > 1 and j + 1 < labeler.n_shards:
                blob = {name: c.to("cpu").state() for name, c in state.items()}
                blob["next_shard"] = j + 1
                atomic_torch_save(state_file, blob)
            bar.update(1)
        result, stats = labeler.finish(q, state, q64=q64, score_log2=q_log2 + keys_src.scale_log2,
                                       exact_scores=world > 1)
        if key_lo:  # this rank's key slice starts at key_lo: global key indices
            for name in [n for n in result if n.endswith("_index")]:
                result[name] = np.where(result[name] >= 0, result[name] + key_lo, result[name])
        for key in stats_total:
            stats_total[key] += stats[key]
        payload = {**result, **{f"stat_{k}": np.int64(v) for k, v in stats.items()}}
        atomic_write(part_file, lambda fh, payload=payload: np.savez(fh, **payload))
        if state_file.exists():
            state_file.unlink()
    bar.close()

    # Assemble outputs from the committed batches, each file written atomically. A manifest
    # from an earlier job goes first, so a kill between two output files never leaves a
    # folder that looks complete.
    manifest_path.unlink(missing_ok=True)
    names = ["top1_index", "top1_score"]
    if topk is not None:
        names += ["topk_index", "topk_score"]
    if part_ids is not None:
        names += ["partition_index", "partition_score"]
    if world > 1:
        stats_total = _dist.gather_to_rank0(stats_total)
        parts = _gather_merged(work, n_batches, topk, part_ids is not None)
        if rank > 0:
            _dist.barrier()  # rank 0 writes the files, then releases the others
            shutil.rmtree(work, ignore_errors=True)  # where --out is not shared with rank 0
            with contextlib.suppress(OSError):  # not empty, or another rank removed it
                partial.rmdir()
            return json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        stats_total = {key: sum(st[key] for st in stats_total) for key in stats_total[0]}
        stats_total["queries"] = int(nq)
    else:
        parts = [np.load(partial / f"batch_{b:06d}.npz") for b in range(n_batches)]
    for name in names:
        arr = np.concatenate([p[name] for p in parts])
        if name.endswith("_index"):
            arr = arr.astype(np.int64)
        else:
            arr = arr.astype(np.float32)
        atomic_save_npy(out / OUTPUT_FILES[name], arr)
        _fault_point("labels-outputs")
    for p in parts:
        if hasattr(p, "close"):
            p.close()
    elapsed = time.perf_counter() - t0
    manifest = {
        "complete": True,
        "inputs": {
            "keys": fingerprint(keys_arr),
            "queries": fingerprint(queries_arr),
            "partitions": fingerprint(part_ids) if part_ids is not None else None,
        },
        "job": job,
        "outputs": {name: OUTPUT_FILES[name] for name in names},
        # size + blake2b of every output, hashed while it was written
        "files": files_record(out, [OUTPUT_FILES[name] for name in names]),
        "n_queries": int(nq),
        "n_keys": int(keys_arr.shape[0]),
        "d": int(keys_arr.shape[1]),
        "n_partitions": n_partitions or None,
        "device": str(dev),
        "screen": _screen_description(dev, precision_used, topk, part_ids is not None),
        "certification": stats_total,
        "seconds_last_run": round(elapsed, 3),
    }
    manifest["world_size"] = world
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    shutil.rmtree(partial)
    _dist.barrier()
    return manifest


def _gather_merged(work: Path, n_batches: int, topk: int | None, partitions: bool) -> list[dict]:
    """Every rank's committed batches, merged on rank 0 batch by batch (empty elsewhere)."""
    merged = []
    for b in range(n_batches):
        with np.load(work / f"batch_{b:06d}.npz") as f:
            mine = {k: f[k] for k in f.files if not k.startswith("stat_")}
        parts = _dist.gather_to_rank0(mine)
        if parts is not None:
            merged.append(_dist.merge_label_parts(parts, topk, partitions))
    return merged


def _input_fingerprint(path) -> dict:
    """file_fingerprint of an input, ``file.hdf5:dataset`` naming the file and the dataset."""
    from ..data import _split_hdf5

    file, dataset = _split_hdf5(path)
    fp = file_fingerprint(file)
    if dataset is not None:
        fp["dataset"] = dataset
    return fp


def _broken_output(out: Path, manifest: dict) -> str | None:
    """What is wrong with the outputs of a complete labels folder (None: all as recorded)."""
    try:
        if manifest.get("files") is not None:
            check_files(out, manifest["files"], "labels")
        else:  # an older manifest: outputs must at least exist
            for name in (manifest.get("outputs") or {}).values():
                if not (out / str(name)).is_file():
                    raise InputError(f"labels: {out / str(name)} is missing")
    except InputError as exc:
        return str(exc).partition(": ")[2] or str(exc)
    return None


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # a corrupt manifest is treated as absent: the job is redone


def _screen_description(device: torch.device, precision: str, topk: int | None, partitions: bool) -> dict:
    """Which screen produced each output (the certification makes all of them exact)."""
    if device.type == "cuda":
        kernel = f"triton mips_top1 ({precision})"
        top = kernel if topk is None else f"cuBLAS products + torch.topk ({precision})"
        if partitions and topk is None:
            top = "derived from the per-partition results"
        return {"top": top, "partitions": kernel if partitions else None,
                "rescreen": "triton mips_top1 (ieee fp32)" if topk is None else "cuBLAS fp32 + torch.topk"}
    top = "cpu bf16 threshold" if (precision == "bf16" and topk is None) else "faiss/torch fp32 top-k"
    if partitions and topk is None:
        top = "derived from the per-partition results"
    return {"top": top, "partitions": "cpu fp32 threshold" if partitions else None,
            "rescreen": "faiss/torch fp32"}

