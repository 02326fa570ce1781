"""Does Mixture-of-Logits beat an equal-size dot product on real feedback?

Trains the sequential recommender (``amips mol train``) on a ratings file with both heads
(``--similarity mol`` and ``dot``: same encoder, same parameter budget) for several seeds,
then tabulates test HR@10 / NDCG@10 (full-corpus ranking, seen items excluded) per seed,
their mean and spread (min-max and sample std), parameter counts and training time.

Runs are resumable: rerunning the script continues unfinished runs (``--resume``) and
reuses finished ones. ``--jobs`` runs trainings side by side (one torch thread each).

    python bench/bench_mol_quality.py --ratings ../shared/data/movielens-small/ratings.csv \
        --out runs/mol_quality --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(ratings: str, out: Path, similarity: str, seed: int, extra: list[str]) -> dict:
    done = out / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "amips", "mol", "train", "--ratings", ratings, "--out", str(out),
           "--similarity", similarity, "--seed", str(seed), "--quiet", *extra]
    if (out / "config.json").exists():
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(out.parent / f"{out.name}.log", "a")
    t0 = time.time()
    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"training {similarity} seed {seed} failed (exit {rc}); see {log.name}")
    print(f"{similarity} seed {seed}: done in {time.time() - t0:.0f} s", flush=True)
    return json.loads(done.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratings", default=str(ROOT.parent / "shared" / "data" / "movielens-small" / "ratings.csv"))
    ap.add_argument("--out", default="runs/mol_quality")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 epochs per run (a smoke test)")
    ap.add_argument("extra", nargs="*", help="more `amips mol train` flags, after --")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(args.extra) + (["--epochs", "2"] if args.quick else [])
    jobs = [(sim, s) for s in args.seeds for sim in ("mol", "dot")]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {job: pool.submit(run_one, args.ratings, out / f"{job[0]}-seed{job[1]}", job[0], job[1], extra)
                   for job in jobs}
        results = {job: f.result() for job, f in futures.items()}

    rows = []
    for (sim, seed), m in results.items():
        t = m["test"]
        rows.append({"similarity": sim, "seed": seed, "hr@10": t["hr@10"], "ndcg@10": t["ndcg@10"],
                     "hr@1": t["hr@1"], "hr@50": t["hr@50"], "hr@200": t["hr@200"], "mrr": t["mrr"],
                     "val_hr@10": m["validation"]["hr@10"], "best_epoch": m["best_epoch"],
                     "epochs_run": m["epochs_run"], "params_total": m["n_params"]["total"],
                     "params_head": m["n_params"]["head"], "train_seconds": m["train_seconds"]})
    with open(out / "quality.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{'head':<5} {'seed':>4} {'HR@10':>7} {'NDCG@10':>8} {'HR@50':>7} {'MRR':>7} "
          f"{'best ep':>7} {'params':>9} {'train s':>8}")
    for r in rows:
        print(f"{r['similarity']:<5} {r['seed']:>4} {r['hr@10']:>7.4f} {r['ndcg@10']:>8.4f} "
              f"{r['hr@50']:>7.4f} {r['mrr']:>7.4f} {r['best_epoch']:>7} {r['params_total']:>9,} "
              f"{r['train_seconds']:>8.0f}")
    summary = {}
    for sim in ("mol", "dot"):
        mine = [r for r in rows if r["similarity"] == sim]
        for key in ("hr@10", "ndcg@10"):
            v = [r[key] for r in mine]
            summary[(sim, key)] = (statistics.mean(v), min(v), max(v),
                                   statistics.stdev(v) if len(v) > 1 else 0.0)
    print("\nmean [min, max] (sample std) over seeds")
    for sim in ("mol", "dot"):
        print(f"{sim:<5} " + "   ".join(
            f"{key.upper()} {m:.4f} [{lo:.4f}, {hi:.4f}] ({sd:.4f})"
            for key in ("hr@10", "ndcg@10") for (m, lo, hi, sd) in [summary[(sim, key)]]))
    for key in ("hr@10", "ndcg@10"):
        d = summary[("mol", key)][0] - summary[("dot", key)][0]
        print(f"MoL - dot, mean {key.upper()}: {d:+.4f} ({'MoL better' if d > 0 else 'MoL not better'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
