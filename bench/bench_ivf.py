"""What match@1 does each IVF configuration buy per probe, per FLOP and per second?

On a dataset folder (default ../shared/data/wordnet): one spherical k-means IVF index
(about sqrt(n) lists), searched with
- amips, exact scan: centroid routing, the multi-head router (router-mlp, one head per
  list, MSE on per-list support values), optionally the convex multi-head SupportNet,
  KeyNet substitution (route and scan with KeyNet(q)) and KeyNet route-only;
- faiss on the SAME lists: IndexIVFFlat (its own centroid routing), and
  IndexIVFPQFastScan (4-bit, d/2 subspaces, by residual) + exact refine of 100, routed by
  the centroids and by the learned router (search_preassigned);
- anchors: ScaNN (tree, spherical, score_ah(2, T=0.2), reorder 100) and hnswlib, when
  installed.
Everything runs in one process with the same thread count (default 1), queries in one
batch, best of ``--repeats``. FLOPs per query count a multiply-add as 2 (router + scan;
PQ: LUT + one add per subspace per code + refine); hnswlib's are not counted.

Writes bench/out/bench_ivf_<data>.csv (long format) and .png (match@1 vs probes, vs FLOPs,
vs QPS), prints a table last. ``--quick``: 2,000 test queries, 2-minute training.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, OUT, best_of, device_name, git_sha, write_csv  # noqa: E402

import amips  # noqa: E402
from amips.eval import evaluate  # noqa: E402
from amips.index import IVFIndex  # noqa: E402
from amips.index.faiss_backend import FaissIVF  # noqa: E402
from amips.metrics import GroundTruth, evaluate_results  # noqa: E402


def interp_at(rows, x_key, target, log_x=True):
    """x at which match@1 first reaches ``target`` (linear in log x between points)."""
    pts = sorted((r[x_key], r["match_at_1"]) for r in rows if r.get(x_key))
    if x_key == "qps":
        pts = sorted(pts, key=lambda p: -p[0])  # from fast to slow
    prev = None
    for x, m in pts:
        if m >= target:
            if prev is None or prev[1] >= target:
                return x
            (x0, m0) = prev
            t = (target - m0) / (m - m0)
            if log_x:
                return math.exp(math.log(x0) + t * (math.log(x) - math.log(x0)))
            return x0 + t * (x - x0)
        prev = (x, m)
    return None


def match_at_budget(rows, flops):
    pts = sorted((r["flops_per_query"], r["match_at_1"]) for r in rows)
    if not pts or flops < pts[0][0]:
        return None
    for (x0, m0), (x1, m1) in zip(pts, pts[1:]):
        if x0 <= flops <= x1:
            t = (math.log(flops) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return m0 + t * (m1 - m0)
    return pts[-1][1] if flops >= pts[-1][0] else None


def train_labels(index, q_train, out, block=1024):
    """fp32 top-1 and per-list top-1 of the train queries from the grouped keys.

    Regression targets only (not the certified labels of ``amips labels``: fp32 products,
    a matrix multiply per block of queries, per-list maxima over the list slices), so the
    CPU budget goes to training rather than to certification.
    """
    out = Path(out)
    names = ("top1_index", "top1_score", "partition_index", "partition_score")
    if all((out / f"{n}.npy").exists() for n in names):
        return out
    out.mkdir(parents=True, exist_ok=True)
    q = torch.from_numpy(q_train)
    keys, ids, offs = index.keys_by_list.float(), index.ids, index.list_offsets.tolist()
    L = index.n_lists
    ps = torch.empty(len(q), L)
    pi = torch.empty(len(q), L, dtype=torch.int64)
    for a in range(0, len(q), block):
        s = q[a : a + block] @ keys.T
        for lst in range(L):
            v, j = s[:, offs[lst] : offs[lst + 1]].max(1)
            ps[a : a + block, lst] = v
            pi[a : a + block, lst] = ids[offs[lst] + j]
    best = ps.argmax(1)
    np.save(out / "partition_score.npy", ps.numpy())
    np.save(out / "partition_index.npy", pi.numpy())
    np.save(out / "top1_score.npy", ps.gather(1, best[:, None])[:, 0].numpy())
    np.save(out / "top1_index.npy", pi.gather(1, best[:, None])[:, 0].numpy())
    return out


def train_model(kind, keys, q_train, out, partitions, minutes, width, depth, labels_dir, seed=0):
    from amips.train import TrainConfig, train

    out = Path(out)
    if (out / "model.safetensors").exists() and (out / "done").exists():
        return amips.load_model(out), None
    # noise_fraction = 0: noisy queries would need exact labels on the fly, too slow on 2 CPU cores
    cfg = TrainConfig(model=kind, width=width, depth=depth, steps=100000, batch_size=1024,
                      max_minutes=minutes, eval_every=500, checkpoint_every=500, seed=seed,
                      lr=2e-3, warmup=100, noise_fraction=0.0,
                      w_key=0.0 if kind != "keynet" else 1.0)
    t0 = time.time()
    metrics = train(keys, q_train, out, cfg, partitions=partitions if kind != "keynet" else None,
                    labels_dir=labels_dir, device="cpu", resume=(out / "config.json").exists(),
                    progress=False)
    (out / "done").write_text("ok\n")
    return amips.load_model(out), {"train_seconds": time.time() - t0, **(metrics or {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA / "wordnet"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-lists", type=int, default=None, help="default round(sqrt(n_keys))")
    ap.add_argument("--nprobe", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-minutes", type=float, default=None, help="per model (default 6, quick 2)")
    ap.add_argument("--models", default="router-mlp,keynet", help="learned routers to train/evaluate "
                    "(router-mlp, supportnet, keynet)")
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--max-test", type=int, default=None)
    args = ap.parse_args(argv)

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        print(f"no dataset at {data_dir}; skipping")
        return 0
    ds = amips.load_dataset(data_dir)
    name = data_dir.name
    keys = np.array(ds.keys, dtype=np.float32)
    q_test = np.array(ds.queries_test, dtype=np.float32)
    max_test = args.max_test or (2000 if args.quick else None)
    if max_test:
        q_test = q_test[:max_test]
    q_train = None if ds.queries_train is None else np.array(ds.queries_train, dtype=np.float32)
    n_lists = args.n_lists or int(round(math.sqrt(keys.shape[0])))
    nprobes = [p for p in (int(x) for x in args.nprobe.split(",")) if p <= n_lists]
    minutes = args.train_minutes if args.train_minutes is not None else (2.0 if args.quick else 6.0)
    out_dir = OUT / f"ivf-{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    dev_name, sha = device_name("cpu"), git_sha()
    print(f"{name}: {keys.shape[0]:,} keys x {keys.shape[1]}, {len(q_test):,} test queries, "
          f"{n_lists} lists, {args.threads} thread(s); {dev_name}; torch threads {torch.get_num_threads()}")

    t0 = time.time()
    gt = GroundTruth.compute(q_test, keys, k=10)
    print(f"ground truth (exact top-10): {time.time() - t0:.1f} s")

    index_dir = out_dir / f"index-{n_lists}"
    if (index_dir / "index.json").exists():
        index = IVFIndex.load(index_dir)
    else:
        torch.set_num_threads(2)
        faiss.omp_set_num_threads(2)
        t0 = time.time()
        index = IVFIndex.build(keys, n_lists, metric="ip", seed=0)
        print(f"index build: {time.time() - t0:.1f} s -> {index}")
        index.save(index_dir)
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(index)

    routers: dict[str, object] = {"centroid": "centroid"}
    train_info = {}
    if q_train is not None and args.models:
        torch.set_num_threads(2)
        t0 = time.time()
        labels_dir = train_labels(index, q_train, out_dir / f"labels-train-{n_lists}")
        print(f"train labels (fp32, per list): {time.time() - t0:.1f} s")
        for kind in [m for m in args.models.split(",") if m]:
            width, depth = {"router-mlp": (256, 2), "supportnet": (128, 2), "keynet": (256, 2)}[kind]
            run = out_dir / f"run-{kind}-{n_lists}"
            t0 = time.time()
            model, info = train_model(kind, keys, q_train, run, index_dir / "partitions.npy", minutes, width,
                                      depth, labels_dir)
            train_info[kind] = info
            print(f"{kind}: {sum(p.numel() for p in model.parameters()):,} params, "
                  f"{'trained' if info else 'loaded'} in {time.time() - t0:.0f} s")
            if kind == "keynet":
                routers["keynet-subst"] = "keynet:" + str(run)
                routers["keynet-route-only"] = "keynet-route:" + str(run)
            else:
                routers[f"{kind}-heads"] = ("router:" if kind == "router-mlp" else "supportnet:") + str(run)
        torch.set_num_threads(args.threads)

    rows: list[dict] = []   # wide rows for tables and plots
    for label, spec in routers.items():
        res = evaluate(index, q_test, router=spec, nprobes=nprobes, gt=gt, repeats=args.repeats,
                       qps_single=200, label=label)
        for r in res:
            r["provider"] = "amips-exact"
        rows += res
        print(f"  evaluated {label}")

    keys_t = torch.from_numpy(keys)
    q_t = torch.from_numpy(q_test)

    def add_row(provider, label, param, ids, secs, flops, extra=None):
        quality = evaluate_results(q_t, keys_t, torch.as_tensor(ids), gt, k=10)
        rows.append({"provider": provider, "router": label, "nprobe": param, **quality,
                     "flops_per_query": flops, "qps": len(q_test) / secs, **(extra or {})})

    if not args.no_anchors:
        d = index.d
        sizes = index.list_sizes
        # faiss IVFFlat on our lists, faiss' own routing (IndexFlatIP over our centroids)
        fflat = index.to_faiss("flat")
        for p in nprobes:
            fflat.nprobe = p
            secs, (dist, ids) = best_of(lambda: fflat.search(q_test, 10), args.repeats)
            lists = index.route(q_t, p).lists
            scanned = float(sizes[lists].sum(1).double().mean())
            add_row("faiss-ivfflat", "faiss IVFFlat", p, ids, secs, 2 * n_lists * d + 2 * d * scanned)
        print("  evaluated faiss IVFFlat")
        # faiss IVFPQ fast-scan + refine 100, routed by centroids and by the learned router
        fpq = FaissIVF(index, "pqfs", pq_subspaces=d // 2)
        for label, spec in routers.items():
            if label not in ("centroid", "router-mlp-heads", "supportnet-heads"):
                continue
            rt = index.router(spec)
            for p in nprobes:
                secs, (s, ids, info) = best_of(
                    lambda p=p, rt=rt: fpq.search(q_t, 10, p, rt, refine=100, return_info=True), args.repeats)
                add_row("faiss-ivfpqfs-refine100", f"faiss PQfs+refine100 / {label}", p, ids, secs,
                        info["router_flops_per_query"] + info["scan_flops_per_query"])
        print("  evaluated faiss IVFPQ fast-scan")
        try:
            import scann

            t0 = time.time()
            searcher = (scann.scann_ops_pybind.builder(keys, 10, "dot_product")
                        .tree(num_leaves=n_lists, num_leaves_to_search=8, training_sample_size=keys.shape[0],
                              spherical=True)
                        .score_ah(2, anisotropic_quantization_threshold=0.2)
                        .reorder(100).build())
            build_s = time.time() - t0
            for p in nprobes:
                secs, (ids, dist) = best_of(lambda p=p: searcher.search_batched(
                    q_test, leaves_to_search=p, pre_reorder_num_neighbors=100), args.repeats)
                scanned = float(sizes.double().mean()) * p  # approximate: ScaNN's own lists
                flops = 2 * n_lists * d + 2 * d * 16 + (d / 2) * scanned + 2 * d * 100
                add_row("scann", "ScaNN AH(2,T=.2)+reorder100", p, np.asarray(ids, dtype=np.int64), secs, flops,
                        {"build_seconds": build_s})
            print("  evaluated ScaNN")
        except ImportError:
            print("  ScaNN not installed: skipped")
        try:
            import hnswlib

            t0 = time.time()
            h = hnswlib.Index(space="ip", dim=keys.shape[1])
            h.init_index(max_elements=keys.shape[0], M=16, ef_construction=100, random_seed=0)
            h.set_num_threads(2)
            h.add_items(keys, np.arange(keys.shape[0]))
            h.set_num_threads(args.threads)
            build_s = time.time() - t0
            for ef in (16, 32, 64, 128, 256):
                h.set_ef(ef)
                secs, (ids, _) = best_of(lambda: h.knn_query(q_test, k=10), args.repeats)
                add_row("hnswlib", "hnswlib M16", ef, ids.astype(np.int64), secs, float("nan"),
                        {"build_seconds": build_s})
            print("  evaluated hnswlib")
        except ImportError:
            print("  hnswlib not installed: skipped")

    # ---- CSV (long), plot, table
    long_rows = []
    for r in rows:
        for metric in ("match_at_1", "recall_at_10", "mrr", "flops_per_query", "qps", "qps_single"):
            if r.get(metric) is not None:
                long_rows.append({"bench": "ivf", "provider": r["provider"], "router": r["router"],
                                  "data": name, "n_lists": n_lists, "nprobe": r["nprobe"],
                                  "n_queries": len(q_test), "threads": args.threads,
                                  "metric": metric, "value": r[metric], "device": dev_name,
                                  "git_sha": sha})
    tag = f"{name}{'-quick' if args.quick else ''}"
    csv_path = write_csv(long_rows, OUT / f"bench_ivf_{tag}.csv")
    png = OUT / f"bench_ivf_{tag}.png"
    _plot(rows, png, f"{name}: {keys.shape[0]:,} keys, {len(q_test):,} test queries, {n_lists} lists, "
                     f"{args.threads} thread(s), CPU")
    print(f"wrote {csv_path} and {png}")
    for kind, info in train_info.items():
        if info:
            print(f"train {kind}: {info.get('train_seconds', 0):.0f} s")

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["router"], []).append(r)
    centroid = groups.get("centroid", [])
    budget = interp_at(centroid, "flops_per_query", 0.90)
    print("\nmatch@1 by nprobe (amips exact scan)")
    print("router".ljust(22) + "".join(f"{p:>7}" for p in nprobes))
    for label in routers:
        by = {r["nprobe"]: r["match_at_1"] for r in groups[label]}
        print(label.ljust(22) + "".join(f"{by.get(p, float('nan')):7.3f}" for p in nprobes))
    print(f"\ncentroid reaches match@1 .90 at {budget / 1e6 if budget else float('nan'):.2f} MFLOP/query")
    print(f"{'configuration':40} {'match@1 @budget':>15} {'MFLOP@.90':>10} {'MFLOP@.95':>10} {'QPS@.90':>9} {'QPS@.95':>9}")
    for label, rs in groups.items():
        at_b = match_at_budget(rs, budget) if budget and all(math.isfinite(r["flops_per_query"]) for r in rs) else None
        f90, f95 = interp_at(rs, "flops_per_query", 0.90), interp_at(rs, "flops_per_query", 0.95)
        q90, q95 = interp_at(rs, "qps", 0.90), interp_at(rs, "qps", 0.95)

        def fmt(v, scale=1.0, spec="{:.2f}"):
            return "-" if v is None or not math.isfinite(v) else spec.format(v / scale)
        print(f"{label[:40]:40} {fmt(at_b, 1, '{:.3f}'):>15} {fmt(f90, 1e6):>10} {fmt(f95, 1e6):>10} "
              f"{fmt(q90, 1, '{:,.0f}'):>9} {fmt(q95, 1, '{:,.0f}'):>9}")
    return 0


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["router"], []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["nprobe"])
        m = [r["match_at_1"] for r in rs]
        style = "o-" if rs[0]["provider"] == "amips-exact" else "s--"
        if rs[0]["provider"] != "hnswlib":
            axes[0].plot([r["nprobe"] for r in rs], m, style, label=label)
            axes[1].plot([r["flops_per_query"] / 1e6 for r in rs], m, style, label=label)
        axes[2].plot([r["qps"] for r in rs], m, style, label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("lists probed (nprobe)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("MFLOP per query (router + scan)")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("queries per second (one batch)")
    for ax in axes:
        ax.set_ylabel("match@1 (tie-aware)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(top=1.0)
    axes[2].legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
