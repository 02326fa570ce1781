"""``amips demo``: the whole pipeline, end to end, in a few minutes on a laptop-class CPU.

1. data: a seeded synthetic set (20,000 clustered keys x 64, 12,000 shifted queries split
   into train/test), or a dataset folder given with ``--data``;
2. exact labels of the test queries (:func:`amips.exact_top1`);
3. an IVF index (spherical k-means, about sqrt(n) lists), saved to OUT/index;
4. a small multi-head router (one support head per list) and a KeyNet, trained on the
   train queries for a bounded time (:func:`amips.train.train`), saved to OUT/runs;
5. an evaluation table (match@1, recall@10, FLOPs and QPS per nprobe) for centroid
   routing, the learned router and KeyNet substitution, saved as OUT/results.json;
6. a plot (match@1 vs nprobe, vs FLOPs, vs QPS) saved as OUT/demo.png.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ._validate import InputError

DEFAULT_SYNTHETIC = dict(n_keys=20_000, n_queries=12_000, d=64, n_clusters=32, cluster_spread=1.0, seed=0)


def _load(data, quick: bool):
    from .data import load_dataset, synthetic

    if data is None:
        cfg = dict(DEFAULT_SYNTHETIC)
        if quick:
            cfg.update(n_keys=2000, n_queries=800, d=16, n_clusters=8)
        return synthetic(**cfg)
    ds = load_dataset(data)
    if ds.queries_train is None:
        raise InputError(f"data: {data} has no queries_train.npy; the demo trains routers on it")
    return ds


def run_demo(
    data=None,
    out="amips-demo",
    *,
    n_lists: int | None = None,
    nprobes=(1, 2, 4, 8, 16),
    train_minutes: float = 0.75,
    max_test: int | None = 1000,
    max_train: int | None = 50_000,
    quick: bool = False,
    threads: int | None = None,
    echo=print,
) -> dict:
    """Run the demo; returns {"rows": evaluation rows, "plot": path, "results": path}."""
    from .eval import evaluate, format_table, plot_results
    from .index import IVFIndex
    from .index.ivf import atomic_save_json
    from .labels import exact_top1
    from .metrics import GroundTruth

    if threads is not None:
        torch.set_num_threads(int(threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    ds = _load(data, quick)
    keys = np.array(ds.keys, dtype=np.float32)
    q_test = np.array(ds.queries_test[: max_test or None], dtype=np.float32)
    q_train = np.array(ds.queries_train[: max_train or None], dtype=np.float32)
    echo(f"[1/6] data: {ds.name}: {keys.shape[0]:,} keys x {keys.shape[1]}, "
         f"{len(q_train):,} train / {len(q_test):,} test queries")

    t0 = time.time()
    s1, i1 = exact_top1(q_test, keys)
    gt = GroundTruth.compute(q_test, keys, k=10)
    echo(f"[2/6] labels: exact top-1 and top-10 of the test queries in {time.time() - t0:.1f} s "
         f"(mean top-1 score {float(s1.mean()):.4f})")

    n_lists = n_lists or max(2, int(round(math.sqrt(keys.shape[0]))))
    t0 = time.time()
    index = IVFIndex.build(keys, n_lists, metric="ip", seed=0)
    index_dir = index.save(out / "index")
    sizes = index.list_sizes
    echo(f"[3/6] index: {n_lists} lists (sizes {int(sizes.min())}..{int(sizes.max())}) in "
         f"{time.time() - t0:.1f} s -> {index_dir}")

    routers: dict[str, object] = {"centroid": "centroid"}
    try:
        from .train import TrainConfig, train
    except ImportError as exc:  # pragma: no cover - depends on the build
        echo(f"[4/6] training: skipped (amips.train unavailable: {exc}); centroid routing only")
    else:
        for kind, label, width in (("router-mlp", "router (multi-head)", 128 if quick else 256),
                                   ("keynet", "KeyNet substitution", 64 if quick else 256)):
            run = out / "runs" / f"{kind}-{n_lists}"
            t0 = time.time()
            if not ((run / "model.safetensors").exists() and (run / "demo-done").exists()):
                cfg = TrainConfig(model=kind, width=width, depth=2, steps=20 if quick else 100_000,
                                  batch_size=256 if quick else 512, lr=2e-3,
                                  warmup=5 if quick else 100,
                                  eval_every=20 if quick else 250,
                                  checkpoint_every=20 if quick else 250,
                                  max_minutes=train_minutes, seed=0,
                                  # no noisy-query augmentation: its on-the-fly exact labels
                                  # would eat the demo's CPU budget
                                  noise_fraction=0.0, w_key=0.0 if kind != "keynet" else 1.0)
                train(keys, q_train, run, cfg,
                      partitions=index_dir / "partitions.npy" if kind != "keynet" else None,
                      device="cpu", resume=(run / "config.json").exists(), progress=False)
                (run / "demo-done").write_text("ok\n")
            spec = ("router:" if kind != "keynet" else "keynet:") + str(run)
            model = index.router(spec)
            n_params = sum(p.numel() for p in model.model.parameters())
            echo(f"[4/6] trained {label}: {n_params:,} parameters in {time.time() - t0:.0f} s -> {run}")
            if kind == "keynet":
                routers["KeyNet route, scan q"] = "keynet-route:" + str(run)
            routers[label] = spec

    t0 = time.time()
    rows = []
    nprobes = [p for p in nprobes if p <= n_lists]
    for label, spec in routers.items():
        rows += evaluate(index, q_test, router=spec, nprobes=nprobes, gt=gt,
                         repeats=1 if quick else 2, qps_single=5 if quick else 50, label=label)
    echo(f"[5/6] evaluation ({len(q_test):,} test queries, {torch.get_num_threads()} thread(s), "
         f"{time.time() - t0:.0f} s); a full scan costs {2 * keys.shape[0] * keys.shape[1] / 1e6:.2f} MFLOP/query:")
    echo(format_table(rows))
    results = out / "results.json"
    atomic_save_json(results, {"data": ds.name, "n_lists": n_lists, "rows": rows})
    plot = plot_results(rows, out / "demo.png",
                        title=f"{ds.name}: {n_lists} lists, {len(q_test):,} test queries")
    echo(f"[6/6] plot: {plot}  (results: {results}); total {time.time() - t_all:.0f} s")
    return {"rows": rows, "plot": plot, "results": str(results)}
