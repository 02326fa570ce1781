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


def baselines_once(ratings: str, out: Path) -> list[dict]:
    """Most-popular, item-kNN and EASE on the same split, tuned on validation (cached)."""
    done = out / "baselines.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch

    from amips._io import atomic_write_json
    from amips.mol.data import load_interactions
    from amips.mol.evaluate import evaluate_baselines

    torch.set_num_threads(1)
    t0 = time.time()
    rows = evaluate_baselines(load_interactions(ratings), progress=True)
    print(f"baselines: done in {time.time() - t0:.0f} s", flush=True)
    atomic_write_json(done, rows)
    return rows


def main() -> int:
    from amips.mol import stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratings", default=str(ROOT.parent / "shared" / "data" / "movielens-small" / "ratings.csv"))
    ap.add_argument("--out", default="runs/mol_quality")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--similarities", nargs="+", default=["mol", "dot"])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                    help="tune and compare the baselines (cached in --out/baselines.json)")
    ap.add_argument("--quick", action="store_true", help="2 epochs per run (a smoke test)")
    ap.add_argument("extra", nargs="*", help="more `amips mol train` flags, after --")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(args.extra) + (["--epochs", "2"] if args.quick else [])
    jobs = [(sim, s) for s in args.seeds for sim in args.similarities]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {job: pool.submit(run_one, args.ratings, out / f"{job[0]}-seed{job[1]}", job[0], job[1], extra)
                   for job in jobs}
        base = baselines_once(args.ratings, out) if args.baselines else []  # while they train
        results = {job: f.result() for job, f in futures.items()}
    best_base = {key: max(base, key=lambda b: b["test"][key]) for key in ("hr@10", "ndcg@10")} if base else {}

    rows = []
    for b in base:
        ci = stats.summarise(b["test_ranks"])
        rows.append({"model": b["name"], "seed": "", **{f"{k}{s}": v for k in ("hr@10", "ndcg@10", "hr@50")
                     for s, v in zip(("", "_lo", "_hi"), ci[k])}, "params": json.dumps(b["params"])})
    for (sim, seed), m in results.items():
        ci = stats.summarise(m["test_ranks"])
        row = {"model": sim, "seed": seed, **{f"{k}{s}": v for k in ("hr@10", "ndcg@10", "hr@50")
               for s, v in zip(("", "_lo", "_hi"), ci[k])},
               "val_hr@10": m["validation"]["hr@10"], "best_epoch": m["best_epoch"],
               "epochs_run": m["epochs_run"], "params_total": m["n_params"]["total"],
               "params_head": m["n_params"]["head"], "train_seconds": m["train_seconds"]}
        for key in best_base:
            b = best_base[key]
            d = stats.compare(m["test_ranks"], b["test_ranks"], metrics=(key,))[key]
            row[f"vs_best_baseline_{key}"] = f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] ({b['name']})"
            row[f"ratio_best_baseline_{key}"] = m["test"][key] / max(b["test"][key], 1e-12)
        rows.append(row)
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else 99)
    with open(out / "quality.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

    print("\ntest, 95% bootstrap intervals over users")
    print(f"{'model':<9} {'seed':>4} {'HR@10':<24} {'NDCG@10':<24} {'x best base HR/NDCG':<20} {'train s':>8}")
    for r in rows:
        ratio = (f"{r['ratio_best_baseline_hr@10']:.2f} / {r['ratio_best_baseline_ndcg@10']:.2f}"
                 if "ratio_best_baseline_hr@10" in r else "")
        ts = f"{r['train_seconds']:>8.0f}" if "train_seconds" in r else ""
        print(f"{r['model']:<9} {r['seed']!s:>4} "
              f"{r['hr@10']:.4f} [{r['hr@10_lo']:.4f}, {r['hr@10_hi']:.4f}]  "
              f"{r['ndcg@10']:.4f} [{r['ndcg@10_lo']:.4f}, {r['ndcg@10_hi']:.4f}]  {ratio:<20} {ts}")
    if set(args.similarities) >= {"mol", "dot"}:
        print("\nMoL - dot, paired over the same users (95% bootstrap)")
        pooled = {"mol": [], "dot": []}
        for seed in args.seeds:
            a, b = results[("mol", seed)]["test_ranks"], results[("dot", seed)]["test_ranks"]
            d = stats.compare(a, b)
            print(f"  seed {seed}: " + "  ".join(f"{k.upper()} {v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"
                                                  for k, v in d.items()))
            for sim, r in (("mol", a), ("dot", b)):
                pooled[sim].append({k: stats.per_user(r, k) for k in ("hr@10", "ndcg@10")})
        # each user's metric averaged over the seeds, then paired over users
        line = []
        for k in ("hr@10", "ndcg@10"):
            ma = sum(p[k] for p in pooled["mol"]) / len(args.seeds)
            mb = sum(p[k] for p in pooled["dot"]) / len(args.seeds)
            v = stats.paired_ci(ma, mb)
            line.append(f"{k.upper()} {v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]")
        print(f"  all {len(args.seeds)} seeds (per-user mean over seeds): " + "  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
