"""Which CPU engine scans IVF lists fastest, at which batch size and nprobe? (issue 13)

For the exact scanner, one thread, providers interleaved in one process, best of
``--repeats``: amips' default CPU engine (``AMIPS_CPU_ENGINE=auto``: the batched list-major
engine from 8 queries per list on average, faiss ``search_preassigned`` below), each engine
forced (``batched``, ``faiss``), amips' torch reference (``torch``), and faiss
``IndexIVFFlat.search`` on the same lists (its own centroid routing). Centroid routing for amips (its cost included).
Batch sizes 1 (one query at a time), 100 and all test queries; nprobe swept. On the
word-vector-like set (``bench/_wordlike.py``: natural norms, lists of very unequal size)
and on WordNet (``../shared/data/wordnet``) when present. Writes
``bench/out/cpu_engines.csv``; prints queries/s, and qps x nprobe (flat = no faster than
1/nprobe falloff).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, OUT, device_name, git_sha, write_csv  # noqa: E402
from _wordlike import word_vector_like  # noqa: E402

from amips.index import IVFIndex  # noqa: E402
from amips.index.faiss_backend import to_faiss  # noqa: E402


def run_set(name, keys, queries, n_lists, nprobes, batches, repeats, rows, common, args_torch_max_nprobe=None):
    index = IVFIndex.build(keys, n_lists, iters=10, seed=0)
    fidx = to_faiss(index, kind="flat")
    sizes = index.list_sizes
    print(f"{name}: {keys.shape[0]:,} x {keys.shape[1]}, {n_lists} lists of {int(sizes.min())}.."
          f"{int(sizes.max())} keys, {queries.shape[0]:,} queries", flush=True)
    q = torch.from_numpy(queries)
    qn = np.ascontiguousarray(queries)
    index.search(q[:2], 1, 2)  # builds the faiss engine once
    index.search(q[:200], 1, 8)  # and the batched one
    for batch in batches:
        nq = min(batch, q.shape[0]) if batch > 1 else min(200, q.shape[0])
        for nprobe in nprobes:
            def amips(engine, nprobe=nprobe, nq=nq, batch=batch):
                os.environ["AMIPS_CPU_ENGINE"] = engine
                try:
                    step = 1 if batch == 1 else nq
                    for a in range(0, nq, step):
                        index.search(q[a:a + step], 10, nprobe)
                finally:
                    os.environ["AMIPS_CPU_ENGINE"] = "auto"

            def faiss_flat(nprobe=nprobe, nq=nq, batch=batch):
                fidx.nprobe = nprobe
                step = 1 if batch == 1 else nq
                for a in range(0, nq, step):
                    fidx.search(qn[a:a + step], 10)

            provs = {"amips-cpu-default": lambda f=amips: f("auto"),
                     "amips-batched": lambda f=amips: f("batched"),
                     "amips-faiss-preassigned": lambda f=amips: f("faiss"),
                     "amips-torch": lambda f=amips: f("torch"),
                     "faiss-ivfflat": faiss_flat}
            if args_torch_max_nprobe is not None and nprobe > args_torch_max_nprobe:
                del provs["amips-torch"]  # the reference's cliff: minutes per call
            best = dict.fromkeys(provs, math.inf)
            for _ in range(repeats):
                for p, fn in provs.items():
                    t = time.perf_counter()
                    fn()
                    best[p] = min(best[p], time.perf_counter() - t)
            line = []
            for p, secs in best.items():
                rows.append({**common, "dataset": name, "provider": p, "batch": batch, "nprobe": nprobe,
                             "metric": "qps", "value": nq / secs})
                line.append(f"{p} {nq / secs:8.0f}")
            print(f"  batch {batch:5d} nprobe {nprobe:3d}: " + " | ".join(line), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordlike", type=int, default=300_000)
    ap.add_argument("--lists", type=int, default=512)
    ap.add_argument("--nprobe", default="8,16,24,32,64")
    ap.add_argument("--batches", default="1,100,3000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wordnet", action="store_true", help="also WordNet (343 lists)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--torch-max-nprobe", type=int, default=None,
                    help="skip the torch reference above this nprobe (its cliff makes a call take minutes)")
    args = ap.parse_args(argv)
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    if args.quick:
        args.wordlike, args.lists, args.batches, args.nprobe = 50_000, 128, "1,1000", "8,32"
    nprobes = [int(x) for x in args.nprobe.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    common = {"bench": "cpu_engines", "device": device_name("cpu"), "git_sha": git_sha()}
    rows = []
    keys, queries = word_vector_like(args.wordlike, 3000, 100, seed=0)
    run_set(f"wordlike{args.wordlike}", keys, queries, args.lists, nprobes, batches, args.repeats, rows, common,
            args.torch_max_nprobe)
    if args.wordnet and (DATA / "wordnet").is_dir():
        keys = np.load(DATA / "wordnet" / "keys.npy").astype(np.float32)
        queries = np.load(DATA / "wordnet" / "queries_test.npy").astype(np.float32)[:3000]
        run_set("wordnet", keys, queries, 343, nprobes, batches, args.repeats, rows, common, args.torch_max_nprobe)
    print(f"wrote {write_csv(rows, OUT / 'cpu_engines.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
