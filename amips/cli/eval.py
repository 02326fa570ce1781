"""``amips eval``: match@1, recall@10, FLOPs and QPS of an index + router, per nprobe."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .._validate import InputError
from ._args import add_device, add_overwrite, add_threads, device_and_threads, output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate an IVF index with a router against exact ground truth, per nprobe",
        description=(
            "Search the test queries with each router at each nprobe and report match@1 "
            "(tie-aware), recall@10, MRR, FLOPs per query (router + scan) and QPS (batched "
            "and one query at a time). Ground truth is the exact top-k over the index's keys."
        ),
    )
    p.add_argument("--index", required=True, help="INDEXDIR from `amips index build`")
    p.add_argument("--queries", required=True, help="test queries (.npy, .fvecs, file.hdf5:test)")
    p.add_argument("--router", action="append", default=None,
                   help="centroid | supportnet:RUNDIR | router:RUNDIR | keynet:RUNDIR | "
                        "keynet-route:RUNDIR (route with KeyNet, scan with q); repeatable "
                        "(default centroid)")
    p.add_argument("--router-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="precision of a multi-head router's list scores: bf16 runs ~3x faster on CPUs "
                        "with AMX/avx512_bf16 for a few lists changed per thousand queries (default fp32)")
    p.add_argument("--nprobe", default=None,
                   help="comma-separated list counts (default 1,2,4,8,16, those <= n_lists)")
    p.add_argument("--probe-margin", type=float, default=None, metavar="DELTA",
                   help="adaptive probing: of its best nprobe lists a query probes only those the router "
                        "scores within DELTA of its best list (router score units; default: all nprobe)")
    p.add_argument("--k", type=int, default=10, help="results per query (1..128, the exact ground truth's limit)")
    p.add_argument("--scanner", choices=["exact", "pq"], default=None,
                   help="exact (default) or pq (default when the index has PQ codes)")
    p.add_argument("--reorder", type=int, default=0, help="PQ: re-score the best R candidates exactly")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries")
    p.add_argument("--repeats", type=int, default=3, help="timed batch repeats (best of; 0 = no timing)")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time (0 = skip)")
    add_threads(p)
    add_device(p)
    p.add_argument("--json", default=None, help="write the results as JSON here (its folder must exist)")
    p.add_argument("--plot", default=None, help="write a PNG of match@1 vs FLOPs and QPS (Pareto curves, nprobe marked) here")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="use the latest checkpoint of an unfinished training run as a router (warns)")
    add_overwrite(p, "the --json / --plot files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import distributed

    # under torchrun: every rank holds some of the index's lists (amips.index.sharded)
    with distributed.session(args.device) as device:
        args.device = device
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .. import distributed
    from ..data import load_array
    from ..eval import evaluate, format_table, parse_nprobes, plot_results
    from ..index.ivf import IVFIndex, atomic_save_json
    from ..labels import MAX_TOPK
    from ..metrics import GroundTruth

    device_and_threads(args)
    if not 1 <= args.k <= MAX_TOPK:
        raise InputError(f"k: must be in [1, {MAX_TOPK}] (the exact ground truth's limit), got {args.k}")
    json_path = output_file(args.json, "json", overwrite=args.overwrite)
    plot_path = output_file(args.plot, "plot", overwrite=args.overwrite)
    for flag in ("repeats", "single"):
        if getattr(args, flag) < 0:
            raise InputError(f"{flag}: must be >= 0 (0 = skip), got {getattr(args, flag)}")
    if args.reorder < 0:
        raise InputError(f"reorder: must be >= 0, got {args.reorder}")
    index = IVFIndex.load(args.index, device=args.device)
    if args.nprobe is None:
        nprobes = [p for p in (1, 2, 4, 8, 16) if p <= index.n_lists]
    else:
        nprobes = parse_nprobes(args.nprobe, index.n_lists)
    q_np = load_array(args.queries, name="queries")
    if q_np.ndim != 2 or q_np.shape[1] != index.d:
        raise InputError(f"queries: expected [n, {index.d}] (the index's d), got shape {q_np.shape}")
    if args.max_queries is not None:
        if args.max_queries < 1:
            raise InputError(f"max-queries: must be >= 1, got {args.max_queries}")
        q_np = q_np[: args.max_queries]
    # float64 files stay float64: their float32 copy would flush queries below 1e-45 to 0
    queries = torch.from_numpy(np.array(q_np, dtype=np.float64 if q_np.dtype == np.float64 else np.float32, order="C"))
    scanner = args.scanner or ("pq" if index.pq is not None else "exact")
    gt = GroundTruth.compute(queries, index.keys().cpu(), k=args.k)
    if distributed.is_distributed():
        from ..index.sharded import ShardedIVFIndex

        index = ShardedIVFIndex(index)
    rows = []
    for spec in args.router or ["centroid"]:
        router = _router(index, spec, args.allow_unfinished, args.router_dtype)
        label = spec.split(":")[0] if ":" in spec else spec
        if args.router_dtype != "fp32" and label not in ("centroid", "keynet", "keynet-route"):
            label += f" ({args.router_dtype})"
        rows += evaluate(index, queries, router=router, nprobes=nprobes, k=args.k, gt=gt,
                         scanner=scanner, reorder=args.reorder, repeats=args.repeats,
                         qps_single=args.single, label=label, probe_margin=args.probe_margin)
    if distributed.rank() > 0:
        return 0
    print(format_table(rows))
    if args.json:
        atomic_save_json(json_path, {
            "index": str(args.index), "queries": str(args.queries), "n_queries": int(queries.shape[0]),
            "scanner": scanner, "reorder": args.reorder, "probe_margin": args.probe_margin, "results": rows,
        })
        print(f"eval: wrote {args.json}")
    if args.plot:
        plot_results(rows, str(plot_path), title=f"{Path(args.index).name}: {queries.shape[0]:,} queries")
        print(f"eval: wrote {args.plot}")
    return 0


def _router(index, spec: str, allow_unfinished: bool, dtype: str = "fp32"):
    """A router spec, its model loaded here so that --allow-unfinished reaches load_model.
    ``dtype`` (--router-dtype) applies to multi-head routers; centroid and KeyNet routing
    stay fp32."""
    from ..index.routers import parse_router_spec
    from ..models import load_model

    kind, path = parse_router_spec(spec)
    dtype = None if kind in ("centroid", "keynet", "keynet-route") else dtype
    if path is None or not allow_unfinished:
        return spec if dtype in (None, "fp32") else index.router(spec, dtype=dtype)
    model = load_model(path, device=index.device, allow_unfinished=True)
    return index._router_from_model(model, kind, dtype=dtype)
