"""Does the MoL head recover a mixture-shaped similarity that a dot product cannot?

On generated data whose true similarity is ``max_j <q, b_j>`` over two item facets
(``amips.mol.synthetic``), trains MoL (1 x 2 components) and the equal-budget dot product
for several seeds and prints test HR@1 / HR@10 of the truly best of 200 items.

    python bench/bench_mol_mixture.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

from amips.mol.synthetic import fit_mixture_task

OUT = Path(__file__).resolve().parent / "out"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 100 steps")
    ap.add_argument("--out", default=str(OUT / "mol_mixture.csv"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds, steps = (args.seeds[:2], 100) if args.quick else (args.seeds, args.steps)
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for kind in ("mol", "dot"):
            r = fit_mixture_task(kind, seed=seed, steps=steps)
            rows.append(r)
            print(f"{kind} seed {seed}: HR@1 {r['hr@1']:.3f}  HR@10 {r['hr@10']:.3f}  "
                  f"params {r['n_params']}", flush=True)
            with open(args.out, "w", newline="") as fh:  # rewritten as results come
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    for kind in ("mol", "dot"):
        mine = [r for r in rows if r["kind"] == kind]
        print(f"{kind}: mean HR@1 {statistics.mean(r['hr@1'] for r in mine):.3f}  "
              f"HR@10 {statistics.mean(r['hr@10'] for r in mine):.3f}  over {len(mine)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
