"""What match@1 does each IVF configuration buy per probe, per FLOP and per second?

On a dataset folder (default ../shared/data/wordnet), or a generated set (``--wordlike N``:
the natural-norm word-vector-like set of bench/_wordlike.py; ``--synthetic N``): one
spherical k-means IVF index (about sqrt(n) lists), searched with
- amips through ``index.search`` (router cost included): the exact scanner (the CPU
  default engine, chosen by batch size) and the PQ scanner (``--pq-subspaces M`` x 4 bits,
  default d/2, plain
  or score-aware codes with ``--pq-threshold``, exact re-score of ``--refine`` candidates),
  each routed by the centroids and by the learned routers: the multi-head router
  (router-mlp, one head per list), the convex multi-head SupportNet (both regress the
  per-list support values with the focus-weighted MSE of ``amips.train``), and KeyNet
  substitution / route-only (exact scanner);
- anchors, all on CPU: faiss IndexIVFFlat on the SAME lists (its own centroid routing),
  faiss IndexIVFPQFastScan (4-bit, the same M subspaces, by residual, same lists) +
  IndexRefineFlat, ScaNN (tree, spherical, score_ah(d/M, T=0.2), reorder R) and hnswlib
  (M=16, ef sweep ``--hnsw-ef``), when installed. ``--router-bf16`` adds every multi-head
  router again with bf16 list scores.
Every configuration of every provider runs in one timing loop, interleaved (each round
calls every configuration once), best of ``--repeats``, with the same thread count
(default 1), queries in one batch, k = 10. PQ-like families are swept over nprobe and R
and compared on their best curve. The summary prints QPS at match@1 .90 / .95 / .97 for
every provider (interpolated on log QPS) and the ratio of the best amips row to the best
anchor at .95. FLOPs per query count a multiply-add as 2 (router + scan; PQ: LUT + one add
per subspace per code + refine); hnswlib's are not counted. Router training labels are
exact (``amips.labels``).

``--device cuda`` runs the index, labels, router training and search on the GPU (amips rows
only); ``--synthetic N`` replaces the dataset by N seeded synthetic keys (the 1M-key GPU
target: ``--synthetic 1000000 --device cuda``).

Writes bench/out/bench_ivf_<data>.csv (long format) and .png (match@1 vs probes, vs FLOPs,
vs QPS), prints tables last. ``--quick``: 2,000 test queries, 2,000 training steps.
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

import amips  # noqa: E402
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


def frontier(rows):
    """The (QPS, match@1) Pareto frontier of a family of configurations: every point that no
    faster point matches or beats, fastest first."""
    out, best = [], -1.0
    for r in sorted(rows, key=lambda r: -r["qps"]):
        if r["match_at_1"] > best:
            out.append(r)
            best = r["match_at_1"]
    return out


def train_labels(keys, index, q_train, out):
    """Exact (fp64-certified) top-1 and per-list top-1 of the train queries, cached in ``out``.

    The labels ``amips labels --partitions`` writes; computed once, shared by every router.
    """
    import json

    from amips._io import atomic_write_bytes
    from amips.provenance import fingerprint
    from amips.train import load_or_compute_labels

    keys = torch.as_tensor(keys)
    load_or_compute_labels(torch.from_numpy(q_train).to(keys.device), keys, cache_dir=out,
                           partition_ids=index.partitions.to(keys.device), n_partitions=index.n_lists,
                           progress=False)
    # the manifest `amips labels` writes, so that `train(labels_dir=...)` accepts the folder
    manifest = {"complete": True, "inputs": {"keys": fingerprint(keys.cpu().numpy()), "queries": fingerprint(q_train),
                                             "partitions": fingerprint(index.partitions.cpu().numpy())},
                "n_queries": int(q_train.shape[0]), "n_keys": int(keys.shape[0]), "d": int(keys.shape[1]),
                "n_partitions": int(index.n_lists)}
    atomic_write_bytes(Path(out) / "labels.json", json.dumps(manifest, indent=2).encode())
    return Path(out)


def train_model(kind, keys, q_train, out, partitions, steps, minutes, width, depth, labels_dir, seed=0,
                device="cpu"):
    from amips.train import TrainConfig, train

    out = Path(out)
    if (out / "model.safetensors").exists() and (out / "done").exists():
        return amips.load_model(out, allow_unfinished=True), None  # may have stopped at the budget
    # noise_fraction = 0: noisy queries need exact per-list labels on the fly, too slow on 2
    # CPU cores (and Gaussian noise of 0.1 gave nothing measurable for the router here)
    cfg = TrainConfig(model=kind, width=width, depth=depth, steps=steps, batch_size=1024,
                      max_minutes=minutes, eval_every=500, checkpoint_every=500, seed=seed,
                      lr=2e-3, warmup=100, noise_fraction=0.0,
                      w_key=0.0 if kind != "keynet" else 1.0)
    t0 = time.time()
    metrics = train(keys, q_train, out, cfg, partitions=partitions if kind != "keynet" else None,
                    labels_dir=labels_dir, device=str(device), resume=(out / "config.json").exists(),
                    progress=False)
    (out / "done").write_text("ok\n")
    return amips.load_model(out, allow_unfinished=True), {"train_seconds": time.time() - t0, **(metrics or {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA / "wordnet"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-lists", type=int, default=None, help="default round(sqrt(n_keys))")
    ap.add_argument("--nprobe", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=None, help="per model, batch 1024 (default 8000, quick 2000)")
    ap.add_argument("--train-minutes", type=float, default=None,
                    help="per model, a cap that stops training early (default 12, quick 3)")
    ap.add_argument("--models", default="router-mlp,supportnet,keynet", help="learned routers to train/evaluate "
                    "(router-mlp, supportnet, keynet)")
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--router-width", type=int, default=None,
                    help="router-mlp hidden width (default 256; a narrower router costs less per query)")
    ap.add_argument("--router-bf16", action="store_true",
                    help="also time every multi-head router with bf16 list scores (IVFIndex.router(..., dtype='bf16'))")
    ap.add_argument("--refine", default="20,50,100", help="PQ providers: exact re-scores swept")
    ap.add_argument("--pq-nprobe", default="4,8,12,16,24,32,48,64,96", help="PQ providers: lists probed")
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--no-pq", dest="pq", action="store_false", help="skip amips' PQ scanner rows")
    ap.add_argument("--pq-threshold", type=lambda v: None if v.lower() == "none" else float(v), default=None,
                    help="amips PQ (M subspaces x 4 bits): score-aware threshold T of the codes, or none "
                         "(default: plain codes; the score-aware assignment is slow on 2 CPU cores)")
    ap.add_argument("--pq-subspaces", type=int, default=None,
                    help="PQ families (amips, faiss IVF-PQ; ScaNN gets d/M dimensions per block): M x 4-bit "
                         "codes (default d/2)")
    ap.add_argument("--probe-margins", default="0.15,0.3,0.5",
                    help="learned routers, PQ scanner: also time adaptive probing (probe_margin) at these "
                         "quantiles of the training queries' top-2 router score gap ('' = off)")
    ap.add_argument("--hnsw-ef", default="16,32,64,128,256,512", help="hnswlib: ef values swept")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the index, routers and training run "
                    "(on cuda only amips rows: the anchors are CPU libraries)")
    ap.add_argument("--synthetic", type=int, default=None, metavar="N_KEYS",
                    help="instead of --data: a seeded synthetic set of N_KEYS unit-norm keys x 384 with "
                         "110,000 shifted queries (100,000 train / 10,000 test), e.g. 1000000 for the GPU target")
    ap.add_argument("--wordlike", type=int, default=None, metavar="N_KEYS",
                    help="instead of --data: a seeded word-vector-like set (bench/_wordlike.py: natural "
                         "norms, clusters of very unequal size) of N_KEYS x 100, 40,000 train / 3,000 test queries")
    ap.add_argument("--wordlike-spread", default=None, metavar="LO,HI",
                    help="--wordlike: the clusters' spread range (default 0.35,0.8; 1.0,2.0 puts centroid "
                         "routing's match@1 at nprobe 32 of 548 lists at .72, near the .736 the issue "
                         "reports for real word vectors)")
    ap.add_argument("--from-csv", default=None, help="only re-print the tables of a previous run's CSV")
    args = ap.parse_args(argv)
    if args.from_csv:
        rows = rows_from_csv(args.from_csv)
        summarize(rows, sorted({r["nprobe"] for r in rows if r["provider"] == "amips-exact"}))
        return 0

    try:
        import faiss
    except ImportError:  # the GPU image has no faiss: amips rows only
        faiss = None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; skipping")
        return 0
    anchors = not args.no_anchors and device.type == "cpu" and faiss is not None
    build_threads = os.cpu_count() or 1

    def set_threads(n):
        torch.set_num_threads(n)
        if faiss is not None:
            faiss.omp_set_num_threads(n)

    set_threads(args.threads)
    if args.wordlike:
        from types import SimpleNamespace

        from _wordlike import word_vector_like

        extra, name = {}, f"wordlike{args.wordlike}"
        if args.wordlike_spread:
            lo, hi = (float(x) for x in args.wordlike_spread.split(","))
            extra, name = {"spread": (lo, hi)}, f"{name}-spread{lo:g}-{hi:g}"
        wk, wq = word_vector_like(args.wordlike, 43_000, 100, seed=0, **extra)
        ds = SimpleNamespace(keys=wk, queries_train=wq[:40_000], queries_test=wq[40_000:])
    elif args.synthetic:
        ds = amips.data.synthetic(args.synthetic, 110_000, 384, n_clusters=max(64, args.synthetic // 2000),
                                  test_fraction=10_000 / 110_000, seed=0)
        name = f"synthetic{args.synthetic}"
    else:
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
    minutes = args.train_minutes if args.train_minutes is not None else (3.0 if args.quick else 12.0)
    steps = args.train_steps if args.train_steps is not None else (2000 if args.quick else 8000)
    out_dir = OUT / f"ivf-{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    dev_name, sha = device_name(device.type), git_sha()
    print(f"{name}: {keys.shape[0]:,} keys x {keys.shape[1]}, {len(q_test):,} test queries, "
          f"{n_lists} lists, {args.threads} thread(s); {dev_name}; torch threads {torch.get_num_threads()}")

    t0 = time.time()
    keys_dev = torch.from_numpy(keys).to(device)
    gt = GroundTruth.compute(torch.from_numpy(q_test).to(device), keys_dev, k=10)
    print(f"ground truth (exact top-10): {time.time() - t0:.1f} s")

    index_dir = out_dir / f"index-{n_lists}"
    if (index_dir / "index.json").exists():
        index = IVFIndex.load(index_dir, device=device)
    else:
        set_threads(build_threads)
        t0 = time.time()
        index = IVFIndex.build(keys_dev, n_lists, metric="ip", seed=0)
        print(f"index build: {time.time() - t0:.1f} s -> {index}")
        index.save(index_dir)
        set_threads(args.threads)
    print(index)

    routers: dict[str, object] = {"centroid": "centroid"}
    train_info = {}
    if q_train is not None and args.models:
        set_threads(build_threads)
        t0 = time.time()
        labels_dir = train_labels(keys_dev, index, q_train, out_dir / f"labels-exact-{n_lists}")
        print(f"train labels (exact top-1 and per-list top-1): {time.time() - t0:.1f} s")
        for kind in [m for m in args.models.split(",") if m]:
            width, depth = {"router-mlp": (256, 2), "supportnet": (128, 2), "keynet": (256, 2)}[kind]
            run = out_dir / f"run-{kind}-{n_lists}"
            if kind == "router-mlp" and args.router_width and args.router_width != width:
                width, run = args.router_width, out_dir / f"run-{kind}-{n_lists}-w{args.router_width}"
            t0 = time.time()
            model, info = train_model(kind, keys, q_train, run, index_dir / "partitions.npy", steps, minutes, width,
                                      depth, labels_dir, device=device)
            train_info[kind] = info
            print(f"{kind}: {sum(p.numel() for p in model.parameters()):,} params, "
                  f"{'trained' if info else 'loaded'} in {time.time() - t0:.0f} s")
            if kind == "keynet":
                routers["keynet-subst"] = "keynet:" + str(run)
                routers["keynet-route-only"] = "keynet-route:" + str(run)
            else:
                routers[f"{kind}-heads"] = ("router:" if kind == "router-mlp" else "supportnet:") + str(run)
                if args.router_bf16:
                    routers[f"{kind}-heads-bf16"] = (routers[f"{kind}-heads"], "bf16")
        set_threads(args.threads)

    rows: list[dict] = []   # wide rows for tables and plots
    keys_t = torch.from_numpy(keys)
    q_t = torch.from_numpy(q_test)
    q_dev = q_t.to(device)
    d = index.d
    sizes = index.list_sizes
    refines = [int(x) for x in args.refine.split(",") if x]
    m_sub = args.pq_subspaces or d // 2
    if d % m_sub:
        raise SystemExit(f"--pq-subspaces: {m_sub} does not divide d = {d}")
    pq_nprobes = [p for p in (int(x) for x in args.pq_nprobe.split(",")) if p <= n_lists]
    # Every configuration of every provider is a (row, call) pair; all calls run in one
    # process, interleaved (round r calls every configuration once), best of --repeats.
    configs: list[tuple[dict, object]] = []

    def add(provider, label, param, fn, flops, extra=None):
        configs.append(({"provider": provider, "router": label, "nprobe": param, "flops_per_query": flops,
                         "refine": 0, "family": label, **(extra or {})}, fn))

    def router_of(spec):
        from amips.index.routers import parse_router_spec

        spec, dtype = spec if isinstance(spec, tuple) else (spec, None)
        kind, path = parse_router_spec(spec)
        if path is None:
            return index.router(spec, dtype=dtype)
        # runs trained to a time budget (--minutes) are unfinished by design: loaded as such
        model = amips.load_model(path, device=index.device, allow_unfinished=True)
        return index._router_from_model(model, kind, dtype=dtype)

    for label, spec in routers.items():
        rt = router_of(spec)  # loaded once; its cost per query is in every timed call
        for p in nprobes:
            flops = index.flops_per_query(q_dev, p, rt)
            add("amips-exact", label, p, lambda p=p, rt=rt: index.search(q_dev, 10, p, rt)[1], flops,
                {"family": f"amips exact / {label}"})
    if args.pq:
        pq_dir = out_dir / f"index-{n_lists}-pq{m_sub}x4-T{args.pq_threshold}"
        if index.pq is None and (pq_dir / "index.json").exists():
            index.pq = IVFIndex.load(pq_dir, device=device).pq  # same lists: built from index_dir's
        if index.pq is None:
            t0 = time.time()
            set_threads(build_threads)
            index.train_pq(subspaces=m_sub, bits=4, anisotropic_threshold=args.pq_threshold, seed=0)
            set_threads(args.threads)
            print(f"amips PQ ({m_sub} subspaces x 4 bits, T={args.pq_threshold}): {time.time() - t0:.1f} s")
            index.save(pq_dir)
        learned = ("router-mlp-heads", "supportnet-heads", "router-mlp-heads-bf16", "supportnet-heads-bf16")

        def add_pq(label, rt, p, refine, margin=None, tag=""):
            """One amips PQ configuration (FLOPs from a 256-query probe run)."""
            opts = {"scanner": "pq", "reorder": refine, "probe_margin": margin}
            info = index.search(q_dev[:256], 10, p, rt, return_info=True, **opts)[2]
            add("amips-pq", f"amips PQ+reorder{refine}{tag} / {label}", p,
                lambda p=p, rt=rt, opts=opts: index.search(q_dev, 10, p, rt, **opts)[1],
                info.router_flops_per_query + info.scan_flops_per_query,
                {"family": f"amips PQ({m_sub}x4, T={args.pq_threshold}) + reorder / {label}", "refine": refine})

        for label, spec in routers.items():
            if label != "centroid" and label not in learned:
                continue
            rt = router_of(spec)
            for refine in refines:
                for p in pq_nprobes:
                    add_pq(label, rt, p, refine)
        if args.probe_margins and q_train is not None:
            # adaptive probing (index.search(..., probe_margin=δ)): each δ is a quantile of the
            # TRAINING queries' gap between their best and second-best router score, i.e. about
            # that fraction of queries probes more than one list
            fracs = [float(x) for x in args.probe_margins.split(",") if x]
            q_gap = torch.from_numpy(q_train[:4000]).to(device)
            for label, spec in routers.items():
                if label not in learned:
                    continue
                rt = router_of(spec)
                top2 = torch.topk(rt.list_scores(q_gap)[0], 2, dim=1).values.double()
                gap = (top2[:, 0] - top2[:, 1]).cpu()
                for frac in fracs:
                    delta = float(torch.quantile(gap, frac))
                    for refine in [r for r in refines if r <= 50]:
                        for p in [p for p in pq_nprobes if 2 <= p <= 64]:
                            add_pq(label, rt, p, refine, delta, f"+margin{frac:g}")

    if anchors:
        # faiss IVFFlat on our lists, faiss' own routing (IndexFlatIP over our centroids)
        fflat = index.to_faiss("flat")
        for p in nprobes:
            lists = index.route(q_t, p).lists
            scanned = float(sizes[lists].sum(1).double().mean())

            def run_flat(p=p):
                fflat.nprobe = p
                return fflat.search(q_test, 10)[1]
            add("faiss-ivfflat", "faiss IVFFlat", p, run_flat, 2 * n_lists * d + 2 * d * scanned,
                {"family": "faiss IVFFlat (same lists)"})
        # faiss alone: IVF-PQ fast-scan (the same M x 4 bits, by residual, same lists) + IndexRefineFlat
        fpq = FaissIVF(index, "pqfs", pq_subspaces=m_sub)
        native = faiss.IndexRefineFlat(fpq.faiss_index, faiss.swig_ptr(np.ascontiguousarray(keys)))
        for refine in refines:
            for p in pq_nprobes:
                def run_native(p=p, refine=refine):
                    native.k_factor = refine / 10.0
                    fpq.faiss_index.nprobe = p
                    return native.search(q_test, 10)[1]
                flops = 2 * n_lists * d + fpq.flops_per_query(float(sizes.double().mean()) * p, p, refine)
                add("faiss-native", f"faiss IVFPQfs+RefineFlat{refine}", p, run_native, flops,
                    {"family": "faiss IVF-PQ fast-scan + IndexRefineFlat", "refine": refine})
        try:
            import scann

            t0 = time.time()
            searcher = (scann.scann_ops_pybind.builder(keys, 10, "dot_product")
                        .tree(num_leaves=n_lists, num_leaves_to_search=8, training_sample_size=keys.shape[0],
                              spherical=True)
                        .score_ah(d // m_sub, anisotropic_quantization_threshold=0.2)
                        .reorder(max(refines)).build())
            build_s = time.time() - t0
            print(f"ScaNN build: {build_s:.1f} s")
            for refine in refines:
                for p in pq_nprobes:
                    scanned = float(sizes.double().mean()) * p  # approximate: ScaNN's own lists
                    flops = 2 * n_lists * d + 2 * d * 16 + m_sub * scanned + 2 * d * refine
                    add("scann", f"ScaNN AH({d // m_sub},T=.2)+reorder{refine}", p,
                        lambda p=p, refine=refine: np.asarray(searcher.search_batched(
                            q_test, leaves_to_search=p, pre_reorder_num_neighbors=refine)[0], dtype=np.int64),
                        flops, {"build_seconds": build_s, "family": f"ScaNN tree + AH({d // m_sub}, T=.2) + reorder",
                                "refine": refine})
        except ImportError:
            print("  ScaNN not installed: skipped")
        try:
            import hnswlib

            t0 = time.time()
            h = hnswlib.Index(space="ip", dim=keys.shape[1])
            h.init_index(max_elements=keys.shape[0], M=16, ef_construction=100, random_seed=0)
            h.set_num_threads(build_threads)
            h.add_items(keys, np.arange(keys.shape[0]))
            h.set_num_threads(args.threads)
            build_s = time.time() - t0
            print(f"hnswlib build: {build_s:.1f} s")
            for ef in [int(x) for x in args.hnsw_ef.split(",")]:
                def run_h(ef=ef):
                    h.set_ef(ef)
                    return h.knn_query(q_test, k=10)[0].astype(np.int64)
                add("hnswlib", "hnswlib M16", ef, run_h, float("nan"),
                    {"build_seconds": build_s, "family": "hnswlib M=16 (ef sweep)"})
        except ImportError:
            print("  hnswlib not installed: skipped")

    print(f"timing {len(configs)} configurations, interleaved, best of {args.repeats} ...", flush=True)
    best = [math.inf] * len(configs)
    results: list[object] = [None] * len(configs)
    for _ in range(args.repeats):
        for i, (_, fn) in enumerate(configs):
            t = time.perf_counter()
            out = fn()
            best[i] = min(best[i], time.perf_counter() - t)
            results[i] = out
    for (row, _), secs, ids in zip(configs, best, results):
        quality = evaluate_results(q_t, keys_t, torch.as_tensor(ids).cpu(), gt, k=10)
        rows.append({**row, **quality, "qps": len(q_test) / secs})

    # ---- CSV (long), plot, table
    long_rows = []
    for r in rows:
        for metric in ("match_at_1", "recall_at_10", "mrr", "flops_per_query", "qps", "qps_single"):
            if r.get(metric) is not None:
                long_rows.append({"bench": "ivf", "provider": r["provider"], "router": r["router"],
                                  "data": name, "n_lists": n_lists, "nprobe": r["nprobe"],
                                  "refine": r.get("refine", ""), "family": r.get("family", ""),
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

    summarize(rows, nprobes)
    return 0


def rows_from_csv(path):
    """The wide rows of a previous run, from its long CSV (to re-print the tables)."""
    import csv

    wide: dict[tuple, dict] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            key = (r["provider"], r["router"], r["nprobe"])
            row = wide.setdefault(key, {"provider": r["provider"], "router": r["router"], "nprobe": int(r["nprobe"])})
            if r.get("family"):
                row["family"], row["refine"] = r["family"], int(r["refine"])
            row[r["metric"]] = float(r["value"])
    return list(wide.values())


def qps_at(rows, target):
    """QPS at match@1 = target of a PQ family: the best of its curves, one per refine (and
    probe margin), each interpolated on log QPS between its measured nprobe points."""
    curves: dict[str, list[dict]] = {}  # one per label: a refine (and probe margin), over nprobe
    for r in rows:
        curves.setdefault(r["router"], []).append(r)
    vals = [v for rs in curves.values() if (v := interp_at(rs, "qps", target)) is not None]
    return max(vals) if vals else None


def summarize(rows, nprobes):
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["router"], []).append(r)
    centroid = groups.get("centroid", [])
    budget = interp_at(centroid, "flops_per_query", 0.90)
    amips_labels = [g for g, rs in groups.items() if rs[0]["provider"] == "amips-exact"]
    print("\nmatch@1 by nprobe (amips exact scan)")
    print("router".ljust(22) + "".join(f"{p:>7}" for p in nprobes))
    for label in amips_labels:
        by = {r["nprobe"]: r["match_at_1"] for r in groups[label]}
        print(label.ljust(22) + "".join(f"{by.get(p, float('nan')):7.3f}" for p in nprobes))
    print(f"\ncentroid reaches match@1 .90 at {budget / 1e6 if budget else float('nan'):.2f} MFLOP/query")
    print(f"{'configuration':40} {'match@1 @budget':>15} {'MFLOP@.90':>10} {'MFLOP@.95':>10} {'QPS@.90':>9} {'QPS@.95':>9}")

    def fmt(v, scale=1.0, spec="{:.2f}"):
        return "-" if v is None or not math.isfinite(v) else spec.format(v / scale)

    for label, rs in groups.items():
        at_b = match_at_budget(rs, budget) if budget and all(math.isfinite(r["flops_per_query"]) for r in rs) else None
        f90, f95 = interp_at(rs, "flops_per_query", 0.90), interp_at(rs, "flops_per_query", 0.95)
        q90, q95 = interp_at(rs, "qps", 0.90), interp_at(rs, "qps", 0.95)
        print(f"{label[:40]:40} {fmt(at_b, 1, '{:.3f}'):>15} {fmt(f90, 1e6):>10} {fmt(f95, 1e6):>10} "
              f"{fmt(q90, 1, '{:,.0f}'):>9} {fmt(q95, 1, '{:,.0f}'):>9}")
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("family"):
            families.setdefault(r["family"], []).append(r)
    if not families:
        return
    print("\nEvery provider (PQ families: best over refine), QPS interpolated on log QPS per curve;")
    print("'fastest measured' = the fastest single configuration with match@1 >= .95:")
    print(f"{'family':60} {'QPS@.90':>8} {'QPS@.95':>8} {'QPS@.97':>8}  fastest measured >= .95")
    for fam, rs in families.items():
        cells = [qps_at(rs, t) for t in (0.90, 0.95, 0.97)]
        ok = [r for r in rs if r["match_at_1"] >= 0.95]
        fast = max(ok, key=lambda r: r["qps"]) if ok else None
        margin = ""
        if fast and "+margin" in fast["router"]:
            margin = f", probe margin at gap quantile {fast['router'].split('+margin')[1].split(' ')[0]}"
        meas = (f"{fast['qps']:,.0f} QPS (nprobe {fast['nprobe']}, refine {fast['refine']}{margin}, "
                f"match@1 {fast['match_at_1']:.4f})") if fast else "-"
        print(f"{fam[:60]:60} " + " ".join(f"{fmt(v, 1, '{:,.0f}'):>8}" for v in cells) + f"  {meas}")
    at95 = {fam: qps_at(rs, 0.95) for fam, rs in families.items()}
    ours = {f: v for f, v in at95.items() if f.startswith("amips") and v}
    theirs = {f: v for f, v in at95.items() if not f.startswith("amips") and v}
    if ours:
        f_o = max(ours, key=ours.get)
        print(f"\nbest amips at match@1 .95: {ours[f_o]:,.0f} QPS ({f_o})")
    if theirs:
        f_t = max(theirs, key=theirs.get)
        print(f"best anchor at match@1 .95: {theirs[f_t]:,.0f} QPS ({f_t})")
    if ours and theirs:
        ratio = ours[f_o] / theirs[f_t]
        print(f"ratio amips-best / anchor-best at .95: {ratio:.2f}x (target >= 1.5x: "
              f"{'met' if ratio >= 1.5 else 'NOT met'})")


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["router"], []).append(r)
    families: dict[str, list[dict]] = {}
    for label, rs in groups.items():
        if rs[0].get("refine"):
            families.setdefault(rs[0]["family"], []).extend(rs)
            if rs[0].get("refine") != 100:  # probe/FLOP panels: the refine-100 sweep of each family
                continue
        rs = sorted(rs, key=lambda r: r["nprobe"])
        m = [r["match_at_1"] for r in rs]
        style = "o-" if rs[0]["provider"] == "amips-exact" else "s--"
        if rs[0]["provider"] != "hnswlib":
            axes[0].plot([r["nprobe"] for r in rs], m, style, label=label)
            axes[1].plot([r["flops_per_query"] / 1e6 for r in rs], m, style, label=label)
        if not rs[0].get("refine"):
            axes[2].plot([r["qps"] for r in rs], m, style, label=label)
    for fam, rs in families.items():  # QPS panel: each PQ family's best frontier over refine
        fr = frontier(rs)
        axes[2].plot([r["qps"] for r in fr], [r["match_at_1"] for r in fr], "s--", label=fam + " (frontier)")
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
    axes[1].legend(fontsize=6, loc="lower right")
    axes[2].legend(fontsize=6, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
