"""``amips index``: build an IVF index (k-means lists, optional PQ codes), inspect, export."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .._validate import InputError
from ._args import add_device, add_overwrite, add_threads, device_and_threads, output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build an IVF index over keys (k-means lists, optional PQ), inspect or export it",
        description="Build, inspect or export an amips IVF index.",
    )
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")
    b = isub.add_parser(
        "build",
        help="k-means the keys into lists and write INDEXDIR",
        description=(
            "Partition the keys with k-means and write INDEXDIR: index.json, centroids.npy, "
            "partitions.npy (list id of every key, for `amips train --partitions`), "
            "lists.safetensors, and pq.safetensors with --pq-subspaces. Every file is written "
            "atomically; a killed build resumes from its k-means when rerun."
        ),
    )
    b.add_argument("--keys", required=True, help="keys: .npy, .fvecs/.bvecs, or file.hdf5:train")
    b.add_argument("--n-lists", type=int, required=True, help="number of IVF lists (about sqrt(n_keys))")
    b.add_argument("--out", required=True, help="output folder INDEXDIR")
    b.add_argument("--metric", choices=["ip", "l2"], default="ip",
                   help="k-means: ip = spherical (default), l2 = Euclidean")
    b.add_argument("--iters", type=int, default=20, help="k-means iterations (default 20)")
    b.add_argument("--seed", type=int, default=0, help="k-means seed")
    add_device(b)
    add_threads(b)
    b.add_argument("--kmeans-backend", choices=["auto", "torch", "faiss"], default="auto",
                   help="auto: faiss on CPU, torch on CUDA")
    b.add_argument("--partitions", default=None,
                   help="use this .npy of list ids (one per key) instead of k-means")
    b.add_argument("--storage", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the stored keys (default float32)")
    b.add_argument("--pq-subspaces", type=int, default=None, help="also train a PQ scanner with M subspaces")
    b.add_argument("--pq-bits", type=int, choices=[4, 8], default=4, help="bits per PQ code (4 or 8)")
    b.add_argument("--anisotropic-threshold", type=float, default=None,
                   help="score-aware PQ loss threshold T in [0, 1), relative to each key's norm "
                        "(0.2 is ScaNN's usual value; default: reconstruction loss)")
    add_overwrite(b, "an index")
    b.add_argument("--force", action="store_true", dest="overwrite", help=argparse.SUPPRESS)
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    b.set_defaults(func=run_build)

    i = isub.add_parser("info", help="print an index's summary")
    i.add_argument("index", help="INDEXDIR")
    i.set_defaults(func=run_info)

    e = isub.add_parser("export-faiss", help="write the index as a faiss IVF index file")
    e.add_argument("index", help="INDEXDIR")
    e.add_argument("--out", required=True, help="faiss index file to write")
    e.add_argument("--kind", choices=["flat", "pqfs"], default="flat",
                   help="flat = IndexIVFFlat, pqfs = IndexIVFPQFastScan (4-bit)")
    e.add_argument("--pq-subspaces", type=int, default=None, help="PQ subspaces for --kind pqfs (default d/2)")
    add_overwrite(e, "a file")
    e.set_defaults(func=run_export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _stage_record(args, keys: np.ndarray) -> dict:
    """What a k-means stage was computed from: the options and the keys' content (the whole
    file's blake2b, and the values' fingerprint), so a replaced keys file is never reused."""
    from .._io import content_fingerprint
    from ..data import _split_hdf5
    from ..provenance import fingerprint

    file, dataset = _split_hdf5(args.keys)
    return {
        "keys_file": {**content_fingerprint(file), "dataset": dataset},
        "keys": fingerprint(keys),
        "n_lists": args.n_lists,
        "metric": args.metric,
        "iters": args.iters,
        "seed": args.seed,
    }


def _reusable_stage(out: Path, record: dict, n_keys: int, d: int, n_lists: int):
    """(centroids, partitions) of an interrupted build of this very job, or None."""
    from .._io import check_files, load_npy, read_json

    stage_path = out / ".kmeans-stage.json"
    if not stage_path.exists():
        return None
    try:
        stage = read_json(stage_path, "out", fields={"job": dict, "files": dict})
    except InputError:
        return None  # a torn or foreign stage file: redo the k-means
    if stage["job"] != record:
        return None
    try:
        check_files(out, stage["files"], "out", names=["centroids.npy", "partitions.npy"])
        centroids = load_npy(out / "centroids.npy", "centroids", ndim=2, kind="f", shape=(n_lists, d))
        partitions = load_npy(out / "partitions.npy", "partitions", ndim=1, kind="iu", shape=(n_keys,))
    except InputError:
        return None
    if partitions.size and (int(partitions.min()) < 0 or int(partitions.max()) >= n_lists):
        return None
    return centroids, partitions


def run_build(args: argparse.Namespace) -> int:
    import torch

    from .._io import files_record
    from ..data import load_array
    from ..index.ivf import IVFIndex, atomic_save_json, atomic_save_npy
    from ..index.kmeans import kmeans
    from ._args import artifact_output, check_input_file, command_line, load_partitions

    # every argument and input is checked before the output folder is touched
    device_and_threads(args)
    check_input_file(args.keys, "keys")
    check_input_file(args.partitions, "partitions")
    if args.iters < 1:
        raise InputError(f"iters: must be >= 1, got {args.iters}")
    if args.pq_subspaces is not None:
        if args.pq_subspaces < 1:
            raise InputError(f"pq-subspaces: must be >= 1, got {args.pq_subspaces}")
        from ..index.pq_scanner import check_threshold

        check_threshold(args.anisotropic_threshold)
    elif args.anisotropic_threshold is not None:
        raise InputError("anisotropic-threshold: applies to PQ codes only; pass --pq-subspaces too")
    from .._outputs import check_output_folder

    out = check_output_folder(args.out, "out", kind="index", overwrite=args.overwrite)
    if (out / "index.json").exists() and not (out / ".incomplete").exists() and not args.overwrite:
        raise InputError(f"out: {out} already holds an index; pass --overwrite to rebuild it")
    keys_np = load_array(args.keys, name="keys")
    if keys_np.ndim != 2:
        raise InputError(f"keys: expected a 2-D array [n, d], got shape {keys_np.shape}")
    if keys_np.shape[0] == 0 or keys_np.shape[1] == 0:
        raise InputError(f"keys: is empty (shape {keys_np.shape}); an index needs at least one key")
    if keys_np.dtype.kind not in "fiu":
        raise InputError(f"keys: expected numeric vectors, got dtype {keys_np.dtype}")
    if args.n_lists < 1 or args.n_lists > keys_np.shape[0]:
        raise InputError(f"n-lists: must be in [1, {keys_np.shape[0]}] (the number of keys), got {args.n_lists}")
    if args.pq_subspaces is not None:
        from ..quantize import check_pq_shape

        check_pq_shape(keys_np.shape[1], args.pq_subspaces, args.pq_bits)
    partitions_in = None
    if args.partitions:
        partitions_in = load_partitions(args.partitions, keys_np.shape[0])
        if int(partitions_in.max()) >= args.n_lists:
            raise InputError(f"partitions: list id {int(partitions_in.max())} >= n-lists = {args.n_lists}")
    keys = torch.from_numpy(np.array(keys_np, dtype=np.float32, order="C"))
    if not bool(torch.isfinite(keys).all()):
        raise InputError("keys: contains NaN or inf values (or values beyond the float32 range)")
    # before any disk work: the storage dtype must hold the keys (float64 files: as given,
    # not as their float32 copy, which flushes values below 1e-45 to 0)
    from ..index.ivf import check_storage_range

    check_storage_range(keys, args.storage, peak=float(np.abs(keys_np).max()) if keys_np.dtype == np.float64 else None,
                        source_dtype=torch.float64 if keys_np.dtype == np.float64 else None)
    say = (lambda *a: None) if args.quiet else print
    record = None if partitions_in is not None else _stage_record(args, keys_np)
    with artifact_output(args.out, "out", kind="index", overwrite=args.overwrite,
                         command=command_line(args)) as work:
        work.mkdir(parents=True, exist_ok=True)
        stage_path = work / ".kmeans-stage.json"
        partitions = centroids = None
        reused = None if record is None else _reusable_stage(work, record, *keys_np.shape, args.n_lists)
        if partitions_in is not None:
            partitions = partitions_in
        elif reused is not None:
            centroids, partitions = reused
            say(f"index: resuming, reusing the k-means in {out}")
        else:
            say(f"index: k-means of {keys.shape[0]:,} keys x {keys.shape[1]} into {args.n_lists} lists ({args.metric})")
            cents, part = kmeans(keys, args.n_lists, metric=args.metric, iters=args.iters, seed=args.seed,
                                 backend=args.kmeans_backend, device=args.device)
            centroids, partitions = cents.cpu().numpy(), part.cpu().numpy().astype(np.int64)
            stage_path.unlink(missing_ok=True)
            atomic_save_npy(work / "centroids.npy", centroids)
            atomic_save_npy(work / "partitions.npy", partitions)
            atomic_save_json(stage_path, {"job": record,
                                          "files": files_record(work, ["centroids.npy", "partitions.npy"])})
        index = IVFIndex.build(
            keys, args.n_lists, metric=args.metric, seed=args.seed, device=args.device,
            partitions=partitions, centroids=centroids, storage_dtype=args.storage,
            pq_subspaces=args.pq_subspaces, pq_bits=args.pq_bits,
            anisotropic_threshold=args.anisotropic_threshold,
        )
        from ..provenance import fingerprint

        index.inputs = {**(index.inputs or {}), "keys": fingerprint(keys_np)}  # the file's values, not fp32's
        index.save(work)
        stage_path.unlink(missing_ok=True)
    say(f"index: wrote {out}: {index}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..index.ivf import IVFIndex

    index = IVFIndex.load(args.index)
    sizes = index.list_sizes.double()
    print(index)
    print(f"list sizes: mean {float(sizes.mean()):.1f}, median {float(sizes.median()):.0f}, "
          f"min {int(sizes.min())}, max {int(sizes.max())}, empty {int((sizes == 0).sum())}")
    print(f"partitions_sha256: {index.partitions_sha256}")
    print(f"full scan: {2.0 * index.n_keys * index.d / 1e6:.2f} MFLOP per query")
    return 0


def run_export(args: argparse.Namespace) -> int:
    import faiss

    from .._io import atomic_write_bytes
    from ..index.ivf import IVFIndex

    out = output_file(args.out, "out", overwrite=args.overwrite)
    index = IVFIndex.load(args.index)
    if args.kind == "pqfs" and args.pq_subspaces is not None and (
            args.pq_subspaces < 1 or index.d % args.pq_subspaces):
        raise InputError(f"pq-subspaces: must divide d = {index.d}, got {args.pq_subspaces}")
    fidx = index.to_faiss(args.kind, pq_subspaces=args.pq_subspaces)
    atomic_write_bytes(out, faiss.serialize_index(fidx).tobytes())
    print(f"index: wrote faiss {type(fidx).__name__} ({fidx.ntotal:,} keys, {fidx.nlist} lists) to {args.out}")
    return 0
