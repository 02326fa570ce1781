"""``amips demo``: the main claim of amips, measured end to end in a few minutes on a CPU.

The claim: an IVF index routed by a network trained on the queries you expect finds the
exact top-1 more often, at the same FLOPs per query, than routing by the lists' centroids.

1. data: :func:`embedding_like`, a seeded set generated at run time that has what real
   embedding collections have and centroid routing ignores (natural norms, topics of very
   unequal size, queries from a distribution unlike the keys), or a folder (``data=``);
2. exact top-10 of the test queries (:mod:`amips.labels`), the ground truth;
3. an IVF index: spherical k-means, about sqrt(n) lists, saved to OUT/index;
4. a multi-head router (one support head per list, started at centroid routing) and a
   KeyNet, trained on the train queries with the demo's own explicit settings
   (:data:`TRAIN_SETTINGS`) for a bounded time, saved to OUT/runs;
5. match@1, recall@10, MRR, FLOPs and QPS per nprobe for centroid routing, the router,
   KeyNet routing (route with KeyNet(q), scan with q) and KeyNet substitution (route and
   scan with KeyNet(q)), saved with the summary as OUT/results.json;
6. the summary: every method's match@1 at the FLOPs per query where centroid routing
   reaches match@1 0.90 (:func:`equal_flops_summary`), stated as a win or a loss;
7. a plot, OUT/demo.png (needs matplotlib; skipped with one line saying so without it).

A folder that holds an earlier demo run is refused unless ``overwrite=True``, which
removes the earlier run's outputs first: a rerun never reuses stale models.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ._validate import InputError

#: what a demo run writes into its output folder (and ``overwrite`` removes)
DEMO_OUTPUTS = ("index", "runs", "results.json", "demo.png")

#: the default data: see :func:`embedding_like`
DEMO_DATA = dict(n_keys=30_000, n_queries=8_000, d=64, n_topics=200, seed=0)
QUICK_DATA = dict(n_keys=2_000, n_queries=900, d=16, n_topics=24, seed=0)

#: explicit training settings, so the demo does not move when library defaults change
TRAIN_SETTINGS = {
    "router-mlp": dict(width=64, depth=1, steps=400, batch_size=512, lr=3e-3, warmup=20,
                       w_score=1.0, w_key=0.0, focus=1.5, centroid_init=True),
    "keynet": dict(width=128, depth=2, steps=800, batch_size=512, lr=2e-3, warmup=20,
                   w_score=1.0, w_key=1.0),
}
QUICK_STEPS = 30

TABLE_COLUMNS = [
    ("router", "router", "{}"),
    ("nprobe", "nprobe", "{}"),
    ("match_at_1", "match@1", "{:.3f}"),
    ("recall_at_10", "recall@10", "{:.3f}"),
    ("mrr", "MRR", "{:.3f}"),
    ("flops_per_query", "MFLOP/q", "{:.3f}"),
    ("qps", "QPS", "{:,.0f}"),
]

ROUTER_LABEL = "learned router"
KEYNET_ROUTE_LABEL = "KeyNet routing"
KEYNET_SUB_LABEL = "KeyNet substitution"


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def embedding_like(
    n_keys: int = 30_000,
    n_queries: int = 8_000,
    d: int = 64,
    *,
    n_topics: int = 200,
    zipf: float = 1.0,
    norm_sigma: float = 0.3,
    topic_norm_sigma: float = 0.2,
    key_spread: float = 0.8,
    query_spread: float = 1.0,
    query_shift: float = 0.4,
    common: float = 0.3,
    test_fraction: float = 0.25,
    seed: int = 0,
):
    """Seeded keys and queries shaped like real embedding collections; returns a Dataset.

    - Keys are items of ``n_topics`` topics whose sizes follow a Zipf law (exponent
      ``zipf``): a few huge topics and a long tail, as words, products and passages come.
      A key is its topic's centre plus Gaussian noise (``key_spread``), in a space whose
      vectors share a common direction (``common``: trained embeddings are anisotropic).
    - Norms are natural, not 1: a per-topic lognormal factor (``topic_norm_sigma``) times
      a per-key one (``norm_sigma``), as frequency or popularity lengthens word and item
      vectors. Maximum inner product then favours long keys, which a list's centroid
      direction does not show.
    - Queries come from another distribution: topic popularity drawn independently of the
      topic sizes (a Dirichlet), a common offset (``query_shift``; the query/document gap
      of dual encoders), a wider spread (``query_spread``), unit norm.

    The first ``test_fraction`` of the queries are the test split, the rest train.
    """
    from .data import Dataset

    ints = {"n_keys": n_keys, "n_queries": n_queries, "d": d, "n_topics": n_topics}
    for name, v in ints.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"{name}: must be an integer >= 1, got {v!r}")
    if n_queries < 2:
        raise InputError(f"n_queries: need at least 2 (a train and a test query), got {n_queries}")
    reals = {"zipf": zipf, "norm_sigma": norm_sigma, "topic_norm_sigma": topic_norm_sigma,
             "key_spread": key_spread, "query_spread": query_spread, "query_shift": query_shift,
             "common": common}
    for name, v in reals.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(f"{name}: must be a finite number >= 0, got {v!r}")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    mean_dir = unit(rng.standard_normal(d))
    centres = unit(unit(rng.standard_normal((n_topics, d))) + common * mean_dir)
    sizes = 1.0 / np.arange(1, n_topics + 1) ** zipf
    topic = rng.choice(n_topics, size=n_keys, p=sizes / sizes.sum())
    keys = unit(centres[topic] + key_spread * rng.standard_normal((n_keys, d)) / math.sqrt(d))
    norms = rng.lognormal(0.0, topic_norm_sigma, n_topics)[topic] * rng.lognormal(0.0, norm_sigma, n_keys)
    keys *= norms[:, None]

    popularity = rng.dirichlet(np.full(n_topics, 0.5))
    q_topic = rng.choice(n_topics, size=n_queries, p=popularity)
    shift = unit(rng.standard_normal(d))
    queries = unit(centres[q_topic] + query_shift * shift
                   + query_spread * rng.standard_normal((n_queries, d)) / math.sqrt(d))
    n_test = min(n_queries - 1, max(1, int(round(n_queries * test_fraction))))
    return Dataset(
        keys=keys.astype(np.float32),
        queries_train=queries[n_test:].astype(np.float32),
        queries_test=queries[:n_test].astype(np.float32),
        name=f"embedding-like-{n_keys}x{d}-seed{seed}",
    )


def _load(data, quick: bool):
    from .data import load_dataset

    if data is None:
        return embedding_like(**(QUICK_DATA if quick else DEMO_DATA))
    ds = load_dataset(data)
    if ds.queries_train is None:
        raise InputError(f"data: {data} has no queries_train.npy; the demo trains routers on it")
    return ds


# --------------------------------------------------------------------------------------
# output folder
# --------------------------------------------------------------------------------------
def prepare_out(out, overwrite: bool) -> Path:
    """The output folder: refused when it holds an earlier demo run, unless ``overwrite``
    (which removes that run's outputs, and only those)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a folder; choose a folder name")
    earlier = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if earlier and not overwrite:
        raise InputError(
            f"out: {out} holds an earlier demo run ({', '.join(earlier)}); "
            "pass --overwrite to replace it, or choose another --out"
        )
    for name in earlier:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------
# the summary: match@1 at equal FLOPs
# --------------------------------------------------------------------------------------
def _curve(rows: list[dict], router: str) -> list[tuple[float, float, int]]:
    pts = sorted((r["flops_per_query"], r["match_at_1"], r["nprobe"]) for r in rows if r["router"] == router)
    return pts


def _at_flops(points, flops: float):
    """match@1 at ``flops`` on a curve: log-linear between measured points; ``(value,
    how)`` with how in {"interpolated", "measured", "below" (the curve starts above the
    budget), "above" (the budget lies past its last point: its best measured value)}."""
    if not points:
        return None, "missing"
    if flops < points[0][0] * (1 - 1e-9):
        return None, "below"
    # best match@1 reachable at or under the budget, interpolating between neighbours
    best = None
    for (f0, m0, _), (f1, m1, _) in zip(points, points[1:]):
        if f0 <= flops <= f1:
            t = 0.0 if f1 <= f0 else (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            v = m0 + t * (m1 - m0)
            best = v if best is None else max(best, v)
    under = [m for f, m, _ in points if f <= flops * (1 + 1e-9)]
    if under:
        best = max(under) if best is None else max(best, max(under))
    if flops > points[-1][0]:
        return best, "above"
    return best, "interpolated"


def equal_flops_summary(rows: list[dict], *, baseline: str = "centroid", target: float = 0.90) -> dict:
    """Every router's match@1 at the FLOPs per query where ``baseline`` reaches ``target``.

    The budget is interpolated on the baseline's curve (log FLOPs, between the measured
    nprobe points); if the baseline never reaches ``target`` in the sweep, the budget is
    its largest measured point. Each other router's match@1 at that budget is interpolated
    the same way (the best it reaches at or under the budget); ``verdict`` is "wins" (at
    least 0.5 point above the baseline), "ties" or "loses"; a router whose cheapest point
    costs more than the budget "cannot run at this budget" and loses.
    """
    base = _curve(rows, baseline)
    if not base:
        raise InputError(f"rows: no rows for the baseline router {baseline!r}")
    x = target
    budget = None
    for (f0, m0, _), (f1, m1, _) in zip(base, base[1:]):
        if m0 < target <= m1 and f1 > f0:
            t = (target - m0) / (m1 - m0)
            budget = math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
            break
    if base[0][1] >= target:
        budget, x = base[0][0], base[0][1]
    if budget is None:
        budget, x = base[-1][0], base[-1][1]
    out = {"baseline": baseline, "target": target, "flops_per_query": budget, "baseline_match_at_1": x,
           "routers": {}}
    for name in dict.fromkeys(r["router"] for r in rows):
        if name == baseline:
            continue
        pts = _curve(rows, name)
        value, how = _at_flops(pts, budget)
        if value is None:
            verdict = "loses"
            entry = {"match_at_1": None, "how": how, "cheapest_flops_per_query": pts[0][0] if pts else None}
        else:
            diff = value - x
            verdict = "wins" if diff >= 0.005 else ("ties" if diff > -0.005 else "loses")
            entry = {"match_at_1": value, "how": how, "points": 100.0 * diff}
        entry["verdict"] = verdict
        out["routers"][name] = entry
    return out


def summary_lines(summary: dict) -> list[str]:
    """The summary in words: one line for the budget, one per router."""
    b = summary["baseline"]
    lines = [f"at {summary['flops_per_query'] / 1e6:.3f} MFLOP/query, where {b} routing reaches "
             f"match@1 {summary['baseline_match_at_1']:.3f}:"]
    for name, e in summary["routers"].items():
        if e["match_at_1"] is None:
            cheapest = e.get("cheapest_flops_per_query")
            extra = f" (its cheapest point costs {cheapest / 1e6:.3f} MFLOP/query)" if cheapest else ""
            lines.append(f"  {name}: cannot run at this budget{extra}: it LOSES")
            continue
        word = {"wins": "wins", "ties": "ties", "loses": "LOSES"}[e["verdict"]]
        approx = " (its best measured; the budget lies past its sweep)" if e["how"] == "above" else ""
        lines.append(f"  {name}: match@1 {e['match_at_1']:.3f}{approx}, {e['points']:+.1f} points: it {word}")
    return lines


# --------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------
def _train_config(kind: str, quick: bool, train_minutes: float):
    from .train import TrainConfig

    settings = dict(TRAIN_SETTINGS[kind])
    if quick:
        settings.update(steps=QUICK_STEPS, batch_size=128, warmup=5,
                        width=min(settings["width"], 32))
    # no query-noise augmentation of any kind: the demo trains on its exact labels only,
    # whatever the library's augmentation defaults are
    settings.update(noise=0.0, noise_fraction=0.0, seed=0, max_minutes=train_minutes,
                    eval_every=10**9, checkpoint_every=10**9)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if "noise_copies" in fields:
        settings["noise_copies"] = 0
    return TrainConfig(model=kind, **settings)


def _check_args(n_lists, nprobes, train_minutes, max_test, max_train, threads):
    if n_lists is not None and (isinstance(n_lists, bool) or not isinstance(n_lists, int) or n_lists < 2):
        raise InputError(f"n_lists: must be an integer >= 2, got {n_lists!r}")
    if not isinstance(train_minutes, (int, float)) or not math.isfinite(train_minutes) or train_minutes <= 0:
        raise InputError(f"train_minutes: must be > 0, got {train_minutes!r}")
    for name, v in (("max_test", max_test), ("max_train", max_train), ("threads", threads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name}: must be an integer >= 1, got {v!r}")
    from .eval import parse_nprobes

    return parse_nprobes(nprobes)


def run_demo(
    data=None,
    out="amips-demo",
    *,
    overwrite: bool = False,
    n_lists: int | None = None,
    nprobes=(1, 2, 4, 8, 16, 32),
    train_minutes: float = 0.6,
    max_test: int | None = 2000,
    max_train: int | None = 50_000,
    quick: bool = False,
    threads: int | None = 1,
    plot: bool = True,
    echo=print,
) -> dict:
    """Run the demo (see the module docstring); returns {"rows", "summary", "plot",
    "results"} (``plot`` is None when the plot was skipped).

    ``threads`` (torch and faiss CPU threads, default 1): the demo's models and batches
    are small, so one thread is about as fast as two on an idle machine and many times
    faster on a busy one (measured: a router training step 0.04 s with one thread, 1.0 s
    with two, while other jobs kept the 2-core machine busy); ``None`` keeps torch's choice.
    """
    from .eval import evaluate, format_table
    from .index import IVFIndex
    from .index.ivf import atomic_save_json
    from .metrics import GroundTruth

    nprobes = _check_args(n_lists, nprobes, train_minutes, max_test, max_train, threads)
    out = prepare_out(out, overwrite)
    if threads is not None:
        torch.set_num_threads(int(threads))
        try:
            import faiss

            faiss.omp_set_num_threads(int(threads))
        except ImportError:  # pragma: no cover - faiss is a dependency, k-means falls back to torch
            pass
    t_all = time.time()
    ds = _load(data, quick)
    keys = np.array(ds.keys, dtype=np.float32)
    q_test = np.array(ds.queries_test[: max_test or None], dtype=np.float32)
    q_train = np.array(ds.queries_train[: max_train or None], dtype=np.float32)
    norms = np.linalg.norm(keys, axis=1)
    echo(f"[1/7] data: {ds.name}: {keys.shape[0]:,} keys x {keys.shape[1]} (norms {norms.min():.2f}.."
         f"{norms.max():.2f}, median {np.median(norms):.2f}), {len(q_train):,} train / "
         f"{len(q_test):,} test queries")

    t0 = time.time()
    gt = GroundTruth.compute(q_test, keys, k=10)
    echo(f"[2/7] ground truth: exact top-10 of the test queries in {time.time() - t0:.1f} s "
         f"(mean top-1 score {float(gt.scores[:, 0].mean()):.4f})")

    n_lists = n_lists or max(2, int(round(math.sqrt(keys.shape[0]))))
    if n_lists > keys.shape[0]:
        raise InputError(f"n_lists: {n_lists} lists for {keys.shape[0]} keys")
    t0 = time.time()
    index = IVFIndex.build(keys, n_lists, metric="ip", seed=0)
    index_dir = index.save(out / "index")
    sizes = index.list_sizes
    echo(f"[3/7] index: {n_lists} lists (sizes {int(sizes.min())}..{int(sizes.max())}) in "
         f"{time.time() - t0:.1f} s -> {index_dir}")

    from .models import load_model
    from .train import train

    routers: dict = {"centroid": "centroid"}
    for kind, label in (("router-mlp", "multi-head router"), ("keynet", "KeyNet")):
        run = out / "runs" / f"{kind}-{n_lists}"
        cfg = _train_config(kind, quick, train_minutes)
        t0 = time.time()
        train(keys, q_train, run, cfg,
              partitions=index_dir / "partitions.npy" if kind == "router-mlp" else None,
              device="cpu", progress=False)
        steps = _finished_steps(run)
        # the demo trains for a time budget: a run that reached it is unfinished by design, so
        # it is loaded as such (its step count is reported here instead of a warning)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = load_model(run, allow_unfinished=True)
        n_params = sum(p.numel() for p in model.parameters())
        budget = f" (the {train_minutes:g}-minute budget)" if steps < cfg.steps else ""
        echo(f"[4/7] trained {label}: {n_params:,} parameters, {steps} steps{budget} of batch "
             f"{cfg.batch_size} in {time.time() - t0:.0f} s (labels included) -> {run}")
        if kind == "router-mlp":
            routers[ROUTER_LABEL] = index._router_from_model(model, "router")
        else:
            routers[KEYNET_ROUTE_LABEL] = index._router_from_model(model, "keynet-route")
            routers[KEYNET_SUB_LABEL] = index._router_from_model(model, "keynet")

    t0 = time.time()
    rows = []
    nprobes = [p for p in nprobes if p <= n_lists]
    for label, spec in routers.items():
        rows += evaluate(index, q_test, router=spec, nprobes=nprobes, gt=gt,
                         repeats=1 if quick else 2, qps_single=0, label=label)
    echo(f"[5/7] evaluation ({len(q_test):,} test queries, {torch.get_num_threads()} thread(s), "
         f"{time.time() - t0:.0f} s); a full scan costs {2 * keys.shape[0] * keys.shape[1] / 1e6:.2f} MFLOP/query:")
    echo(format_table(rows, TABLE_COLUMNS))

    summary = equal_flops_summary(rows)
    lines = summary_lines(summary)
    echo("[6/7] summary: " + lines[0])
    for line in lines[1:]:
        echo(line)
    results = out / "results.json"
    atomic_save_json(results, {"data": ds.name, "n_lists": n_lists, "rows": rows, "summary": summary,
                               "train_settings": {k: _train_config(k, quick, train_minutes).to_dict()
                                                  for k in TRAIN_SETTINGS}})

    plot_path = None
    if plot:
        plot_path = _plot_or_skip(rows, out / "demo.png", f"{ds.name}: {n_lists} lists, "
                                  f"{len(q_test):,} test queries", echo)
    else:
        echo("[7/7] plot: not requested")
    echo(f"done in {time.time() - t_all:.0f} s; results: {results}")
    return {"rows": rows, "summary": summary, "plot": plot_path, "results": str(results)}


def _finished_steps(run: Path) -> int:
    import json

    try:
        return int(json.loads((run / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _plot_or_skip(rows, path: Path, title: str, echo) -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        echo('[7/7] plot: skipped, matplotlib is not installed (pip install matplotlib, or '
             'pip install "amips[dev]")')
        return None
    from .eval import plot_results

    plot = plot_results(rows, path, title=title)
    echo(f"[7/7] plot: {plot}")
    return plot
