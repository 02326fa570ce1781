"""``amips labels``: certified-exact top-1 / top-k / per-partition labels, resumable."""

from __future__ import annotations

import argparse
import json

from .._validate import InputError
from ._args import (
    add_device,
    add_overwrite,
    add_threads,
    artifact_output,
    check_input_file,
    command_line,
    device_and_threads,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "labels",
        help="exact top-1 (and top-k, per-partition top-1) labels for queries over keys",
        description=(
            "Compute certified-exact MIPS labels. Writes DIR/top1_index.npy (int64) and "
            "DIR/top1_score.npy (float32); with --topk, topk_index.npy / topk_score.npy; with "
            "--partitions, partition_index.npy / partition_score.npy [nq, n_partitions]. "
            "Interrupted runs resume when the same command is run again."
        ),
    )
    p.add_argument("--keys", required=True, help="keys: .npy, .fvecs/.bvecs/.ivecs, or file.hdf5:train")
    p.add_argument("--queries", required=True, help="queries: same formats (file.hdf5:test)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--partitions", default=None, help=".npy with one int partition id per key")
    p.add_argument("--topk", type=int, default=None, help="also write the exact top-k (k <= 128)")
    add_device(p)
    add_threads(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="queries per committed batch (default 16384 on CPU, 65536 on CUDA)")
    p.add_argument("--shard-size", type=int, default=1 << 20,
                   help="keys per shard read into memory")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16"],
                   help="screening precision; results are exact (fp64-certified) either way")
    add_overwrite(p, "labels or partial work of another job")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _job(args: argparse.Namespace, out, device, *, overwrite: bool) -> dict:
    from ..labels import run_label_job

    return run_label_job(
        args.keys, args.queries, out, partitions_path=args.partitions, topk=args.topk, device=device,
        batch_size=args.batch_size, shard_size=args.shard_size, precision=args.precision,
        progress=not args.quiet, overwrite=overwrite,
    )


def run(args: argparse.Namespace) -> int:
    from .. import distributed

    device_and_threads(args)
    for name in ("keys", "queries", "partitions"):
        check_input_file(getattr(args, name), name)
    for name in ("topk", "batch_size", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"{name.replace('_', '-')}: must be >= 1, got {value}")
    # under torchrun: join the process group (gloo on cpu, nccl on cuda) for this command
    with distributed.session(args.device) as device:
        if distributed.world_size() > 1:
            # the ranks share --out: the job's own manifest logic coordinates them
            manifest = _job(args, args.out, device, overwrite=args.overwrite)
        else:
            with artifact_output(args.out, "out", kind="labels", overwrite=args.overwrite,
                                 command=command_line(args)) as work:
                manifest = _job(args, work, device, overwrite=False)
        is_rank0 = distributed.rank() == 0
    if not args.quiet and is_rank0:
        cert = manifest["certification"]
        print(
            f"labels: {manifest['n_queries']:,} queries x {manifest['n_keys']:,} keys (d = "
            f"{manifest['d']}) on {manifest['device']}, {manifest['seconds_last_run']:.2f} s; "
            f"certified: {cert['queries'] - cert['rescreened_queries']:,} from the screen "
            f"({manifest['screen']['top']}), "
            f"{cert['rescreened_queries'] - cert['fallback_queries']:,} after an fp32 re-screen, "
            f"{cert['fallback_queries']:,} by a full fp64 scan"
        )
        print(json.dumps(manifest["outputs"]))
    return 0
