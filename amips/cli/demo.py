"""``amips demo``: does learned routing beat centroid routing at equal FLOPs? Measured end
to end (labels, index, trained router and KeyNet, evaluation, summary, plot)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from .._outputs import ArtifactLock, check_output_folder, staging_folder
from .._validate import InputError
from ._args import command_line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="measure learned vs centroid routing end to end (about 3 minutes on 2 CPU cores)",
        description=(
            "Generates an embedding-like set (natural norms, topics of very unequal size, "
            "queries unlike the keys) or reads --data DIR, computes exact labels, builds an "
            "IVF index, trains a multi-head router and a KeyNet for a bounded time, then "
            "prints match@1, recall@10, FLOPs and QPS per nprobe, a summary line (each "
            "method's match@1 at the FLOPs where centroid routing reaches match@1 0.90: "
            "win or loss) and writes a plot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None,
                   help="dataset folder with keys.npy, queries_train.npy, queries_test.npy "
                        "(default: the generated embedding-like set, seed 0)")
    p.add_argument("--out", default="amips-demo", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo run in --out (without it, such a folder is refused)")
    p.add_argument("--n-lists", type=int, default=None, help="IVF lists (default: sqrt(n_keys))")
    p.add_argument("--nprobe", default="1,2,4,8,16,32", help="comma-separated nprobe values")
    p.add_argument("--train-minutes", type=float, default=0.6,
                   help="training time limit per model, in minutes")
    p.add_argument("--max-test", type=int, default=2000, help="test queries evaluated")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and faiss CPU threads (one is fastest for the demo's small models)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.add_argument("--quick", action="store_true", help="a tiny version in seconds (for tests)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DEMO_OUTPUTS, run_demo
    from ..eval import parse_nprobes

    if not args.train_minutes > 0:
        raise InputError(f"train-minutes: must be > 0, got {args.train_minutes}")
    if args.max_test is not None and args.max_test < 1:
        raise InputError(f"max-test: must be >= 1, got {args.max_test}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"threads: must be >= 1, got {args.threads}")
    if args.n_lists is not None and args.n_lists < 2:
        raise InputError(f"n-lists: must be >= 2, got {args.n_lists}")
    nprobes = parse_nprobes(args.nprobe)
    if args.data is not None and not Path(args.data).is_dir():
        raise InputError(f"data: {args.data} is not a folder (expected keys.npy, queries_train.npy, "
                         "queries_test.npy)")
    out = check_output_folder(args.out, "out", kind="demo run", overwrite=args.overwrite)
    earlier = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if earlier and not args.overwrite:
        raise InputError(f"out: {out} holds an earlier demo run ({', '.join(earlier)}); "
                         "pass --overwrite to replace it, or choose another --out")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with ArtifactLock(out.resolve(), command_line(args)):
        # a replacement is built beside the earlier run and swapped in only once complete
        work = staging_folder(out) if earlier else out
        try:
            run_demo(args.data, work, overwrite=False, n_lists=args.n_lists, nprobes=nprobes,
                     train_minutes=args.train_minutes, max_test=args.max_test, quick=args.quick,
                     threads=args.threads, plot=not args.no_plot)
        except BaseException:
            if earlier:
                shutil.rmtree(work, ignore_errors=True)
            raise
        if earlier:
            _swap_outputs(work, out, DEMO_OUTPUTS)
    return 0


def _swap_outputs(work: Path, out: Path, outputs) -> None:
    """Move the new demo's outputs into ``out`` one by one (each an atomic rename; the earlier
    run's are moved aside first and deleted at the end); other files in ``out`` stay."""
    aside = out / f".amips-old-{os.getpid()}"
    aside.mkdir(exist_ok=True)
    for name in outputs:
        if (out / name).exists() or (out / name).is_symlink():
            os.rename(out / name, aside / name)
        if (work / name).exists():
            os.rename(work / name, out / name)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
