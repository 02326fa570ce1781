"""``amips tune``: the fastest index that meets a target on held-out queries."""

from __future__ import annotations

import argparse

from .._validate import InputError
from ._args import add_device, add_overwrite, artifact_output, command_line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="search index, PQ, router and run-time options for the fastest index meeting a target",
        description=(
            "Split the queries by query (train / validation / test), compute exact labels once, "
            "then build indexes, PQ codes and learned routers and sweep their run-time parameters "
            "(nprobe, probe margin, reorder depth, bf16 router scores), cheap before costly, "
            "within --budget minutes. Writes the Pareto frontier (CSV, PNG), the chosen index "
            "folder (OUT/index), its router (OUT/router) and OUT/report.json, whose `chosen` holds "
            "the IVFIndex.search arguments. Exit status 0 when the target is met, 3 when it is not "
            "reached (the report says the best found), 2 on bad input. Resumable: rerun the same "
            "command after a kill."
        ),
    )
    p.add_argument("--keys", help="keys (.npy, .fvecs, file.hdf5:train)")
    p.add_argument("--queries", help="queries like the ones to serve (split into train / validation / test)")
    p.add_argument("--test-queries", default=None,
                   help="held-out test queries (default: a seeded split of --queries)")
    p.add_argument("--target", default=None, help="METRIC=VALUE (match@1=0.95, recall@10=0.9) or a value for --metric")
    p.add_argument("--metric", default=None, help="match@1 (default) or recall@K")
    p.add_argument("--budget", type=float, default=30.0, help="minutes of wall time (default 30)")
    p.add_argument("--memory-gb", type=float, default=None, help="the chosen index's memory limit (GiB)")
    p.add_argument("--threads", type=int, default=1, help="search threads while timing (default 1)")
    p.add_argument("--build-threads", type=int, default=None,
                   help="threads for k-means, PQ, labels and router training (default: every core)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point, best of (default 3)")
    p.add_argument("--n-val", type=int, default=None, help="validation queries (default 10%%, 200..3000)")
    p.add_argument("--n-test", type=int, default=None, help="test queries (default as many as validation)")
    p.add_argument("--se-margin", type=float, default=1.645,
                   help="standard errors of the validation metric a point must clear the target by "
                        "(default 1.645: one-sided 95%%)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query split, k-means, PQ and routers (default 0)")
    add_device(p)
    p.add_argument("--out", help="output folder (resumable)")
    p.add_argument("--report", metavar="DIR", default=None, help="only reprint the report of a finished tune in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_overwrite(p, "a previous tune of other inputs or options in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tune import NOT_REACHED, read_report, report_lines, tune

    if args.report:
        report = read_report(args.report)
        print("\n".join(report_lines(report)))
        return 0 if report.get("reached") else NOT_REACHED
    for flag in ("keys", "queries", "target", "out"):
        if getattr(args, flag) is None:
            raise InputError(f"--{flag}: required (or --report DIR to reprint a finished tune)")
    # checked up front (no special file, not inside or over another kind of artifact) and
    # locked against a second writer; a tune resumes in place, so --overwrite is the tune's
    # own (it restarts, after every input has been checked)
    with artifact_output(args.out, "out", kind="tune", overwrite=False, command=command_line(args)) as out:
        result = tune(
            args.keys, args.queries, target=args.target, metric=args.metric, out=out,
            budget_minutes=args.budget, memory_gb=args.memory_gb, threads=args.threads,
            build_threads=args.build_threads, device=args.device, test_queries=args.test_queries,
            overwrite=args.overwrite, seed=args.seed, repeats=args.repeats, n_val=args.n_val, n_test=args.n_test,
            se_margin=args.se_margin,
            progress=not args.no_progress,
        )
    print(result.summary())
    return 0 if result.reached else NOT_REACHED
