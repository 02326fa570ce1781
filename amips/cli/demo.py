"""``amips demo``: labels, index, trained routers, evaluation table and plot, end to end."""

from __future__ import annotations

import argparse

from .._validate import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline end to end on a small dataset (a few minutes on CPU)",
        description=(
            "Exact labels, an IVF index, a small multi-head router and a KeyNet trained on "
            "the train queries, then an evaluation table (match@1, recall@10, FLOPs, QPS per "
            "nprobe) and a plot. Default data: a seeded synthetic set; --data DIR uses a "
            "dataset folder (keys.npy, queries_train.npy, queries_test.npy)."
        ),
    )
    p.add_argument("--data", default=None, help="dataset folder (default: synthetic, seed 0)")
    p.add_argument("--out", default="amips-demo", help="output folder (default ./amips-demo)")
    p.add_argument("--n-lists", type=int, default=None, help="IVF lists (default sqrt(n_keys))")
    p.add_argument("--nprobe", default="1,2,4,8,16", help="comma-separated nprobe values")
    p.add_argument("--train-minutes", type=float, default=0.75, help="training time per model (default 0.75)")
    p.add_argument("--max-test", type=int, default=1000, help="test queries evaluated (default 1000)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--quick", action="store_true", help="a tiny version (seconds; for tests)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from ..eval import parse_nprobes

    if args.train_minutes <= 0:
        raise InputError(f"train-minutes: must be > 0, got {args.train_minutes}")
    if args.max_test is not None and args.max_test < 1:
        raise InputError(f"max-test: must be >= 1, got {args.max_test}")
    run_demo(args.data, args.out, n_lists=args.n_lists, nprobes=parse_nprobes(args.nprobe),
             train_minutes=args.train_minutes, max_test=args.max_test, quick=args.quick,
             threads=args.threads)
    return 0
