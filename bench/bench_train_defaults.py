"""How long does a default ``amips train`` take on a CPU? (issue 13, part 1)

On a word-vector-like set (``bench/_wordlike.py``: natural norms, clusters of very unequal
size; default 300k keys x 100, 6k training queries (labelling time scales linearly)), for KeyNet and for a SupportNet with
one head per list of a 512-list k-means, in ONE process:

- the exact labels of the training queries (paid by every run, noise or not);
- the bulk labelling of the noisy copies (the default ``noise_copies``);
- seconds per training step, interleaved: default options, ``noise 0``, and the old
  on-the-fly labelling (``noise_online``), each timed on the same steps of the run
  (evaluation and checkpoints excluded), best of ``--repeats`` segments;
- the projected wall time of a default 400-step run = labels + copies + 400 steps.

Writes ``bench/out/train_defaults.csv`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, device_name, git_sha, write_csv  # noqa: E402
from _wordlike import word_vector_like  # noqa: E402

import amips.noisy as N  # noqa: E402
from amips.index import IVFIndex  # noqa: E402
from amips.train import TrainConfig, load_or_compute_labels, split_queries, train  # noqa: E402


def step_seconds(run: Path, skip: int) -> float:
    """Median seconds per step from metrics.jsonl (train rows), evaluation steps excluded."""
    import json

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tr = [(r["step"], r["elapsed_s"]) for r in rows if r.get("split") == "train" and r["step"] > skip]
    d = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(tr, tr[1:])]
    return float(np.median(d)) if d else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=300_000)
    ap.add_argument("--queries", type=int, default=6_000)
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--lists", type=int, default=512)
    ap.add_argument("--steps", type=int, default=41, help="timed steps per configuration")
    ap.add_argument("--online-steps", type=int, default=11)
    ap.add_argument("--models", default="keynet,supportnet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="60k keys, 3k queries, 64 lists")
    args = ap.parse_args(argv)
    if args.quick:
        args.keys, args.queries, args.lists, args.steps, args.online_steps = 60_000, 3_000, 64, 21, 6
    torch.set_num_threads(args.threads)
    keys, queries = word_vector_like(args.keys, args.queries, args.d, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="amips_bench_train_"))
    rows, table = [], []
    common = dict(bench="train_defaults", keys=args.keys, queries=args.queries, d=args.d,
                  device=device_name("cpu"), git_sha=git_sha())
    try:
        t = time.perf_counter()
        index = IVFIndex.build(keys, args.lists, iters=10, seed=0)
        kmeans_s = time.perf_counter() - t
        part = index.partitions.numpy()
        sizes = index.list_sizes
        print(f"{args.keys:,} x {args.d} keys, {args.lists} lists of {int(sizes.min())}..{int(sizes.max())} keys "
              f"(k-means {kmeans_s:.0f} s), {args.queries:,} queries, {args.threads} threads")
        for kind in args.models.split(","):
            parts = part if kind == "supportnet" else None
            base = tmp / f"{kind}_labels"
            t = time.perf_counter()
            load_or_compute_labels(torch.from_numpy(queries), torch.from_numpy(keys), cache_dir=base,
                                   partition_ids=None if parts is None else torch.from_numpy(parts),
                                   n_partitions=args.lists if parts is not None else None, progress=False)
            label_s = time.perf_counter() - t
            default = TrainConfig(model=kind, batch_size=N.default_batch_size("cpu"), eval_every=10_000,
                                  checkpoint_every=10_000)
            configs = {"default": dataclasses.replace(default, steps=args.steps),
                       "noise 0": dataclasses.replace(default, noise=0.0, steps=args.steps),
                       "online (old default)": dataclasses.replace(default, noise_online=True,
                                                                   steps=args.online_steps)}
            per_step, copies_s, noisy_cache = {}, None, None
            # default and noise 0 alternate (same load for both), best of --repeats; the
            # noisy copies are labelled once (first default run) and their cache reused
            order = [n for _ in range(args.repeats) for n in ("default", "noise 0")] + ["online (old default)"]
            for rep, name in enumerate(order):
                cfg = configs[name]
                run = tmp / f"{kind}_{rep}"
                shutil.copytree(base, run / "labels")
                if name == "default" and noisy_cache is not None:
                    shutil.copytree(noisy_cache, run / "noisy")
                t = time.perf_counter()
                train(keys, queries, run, cfg, partitions=parts, progress=False)
                total = time.perf_counter() - t
                secs = step_seconds(run, skip=0)
                per_step[name] = min(per_step.get(name, float("inf")), secs)
                if name == "default" and noisy_cache is None:
                    import json

                    noisy_cache = run / "noisy"
                    copies_s = json.loads((noisy_cache / "manifest.json").read_text())["label_seconds"]
                print(f"  {kind:10s} {name:22s} {secs:7.3f} s/step  (run {total:.0f} s)", flush=True)
            for name, secs in per_step.items():
                rows.append({**common, "provider": kind, "config": name, "metric": "seconds_per_step",
                             "value": secs})
            n_train = len(split_queries(args.queries, default.val_fraction, 0)[0])
            k = N.DEFAULT_COPIES_CPU
            projected = label_s + copies_s + 400 * per_step["default"]
            ratio = per_step["default"] / per_step["noise 0"]
            rows += [{**common, "provider": kind, "config": "default", "metric": m, "value": v} for m, v in (
                ("label_seconds", label_s), ("copy_label_seconds", copies_s), ("copies", k * n_train),
                ("ratio_default_vs_noise0", ratio), ("projected_400_step_seconds", projected))]
            table.append((kind, label_s, copies_s, k * n_train, per_step["default"], per_step["noise 0"],
                          per_step["online (old default)"], ratio, projected))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = write_csv(rows, OUT / "train_defaults.csv")
    print(f"\nwrote {path}")
    print("| model | labels (s) | noisy copies | copies labels (s) | s/step default | s/step noise 0 | "
          "s/step online | default / noise 0 | 400-step run (projected) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, ls, cs, nc, d0, dn, do, r, p in table:
        print(f"| {kind} | {ls:.0f} | {nc:,} | {cs:.0f} | {d0:.3f} | {dn:.3f} | {do:.2f} | {r:.2f}x | "
              f"{p / 60:.1f} min |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
