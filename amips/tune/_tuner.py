"""The search: build-time options outside, run-time parameters inside, cheap before costly.

Order of work (each step checks the clock first; a step that would start past the budget
is not started):

1. split the queries by query (train / validation / test, seeded) and compute exact labels
   once: the fp64 top-k of the validation and test queries; for the train queries the
   certified per-list top-1 of an index (its lists' support values, the router's targets)
   and, from the same pass, their global top-1, once per index that gets a router;
2. the first index (about sqrt(n) lists, fp32 keys): centroid routing, exact scan, nprobe
   ascending until the target is met (faiss ParameterSpace's rule), then stop;
3. the first PQ codes on it: centroid routing over reorder depths 20 and 50;
4. the anchors (faiss IVF-PQ fast-scan + refine, faiss HNSW) over their own parameters;
5. per-list labels and a multi-head router (the wider one first) for this index: exact and
   PQ curves (reorder 10..100), bf16 router scores, probe margins (quantiles of the training
   queries' gap between their best and second-best list score);
6. the narrower router; further PQ codes (score-aware, other code sizes), each first
   checked at a generous setting and dropped when it cannot reach the target;
7. other list counts (2x and 0.5x sqrt(n)): built and swept with centroid routing; only
   one whose centroid curve reaches the target at fewer FLOPs than the first index's (or
   within 10%) gets labels and a router;
8. fp16 storage of the best index (half the memory), on its best curves.

A curve (one index, router, scanner, reorder depth, probe margin) stops at the first
nprobe that meets the target, or as soon as its points run slower than 0.9x the fastest
point already meeting the target (dominated: more lists only cost more).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_save_npy, atomic_write_json
from .._validate import InputError
from ..index import IVFIndex
from ..provenance import fingerprint
from . import _baselines, _quality, _timing
from ._state import State

NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
REORDERS = (10, 20, 50, 100)
CENTROID_REORDERS = (20, 50)  # centroid routing probes many lists: shallow re-scores miss
REFINES = (20, 50, 100)
HNSW_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
MARGIN_QUANTILES = (0.15, 0.3)
DOMINATED = 0.9


class OutOfBudget(Exception):
    """The clock ran out between two configurations."""


def _rel(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class Tuner:
    def __init__(self, keys: np.ndarray, queries: np.ndarray, test_queries: np.ndarray | None, target,
                 out: Path, *, budget_s: float, memory_bytes: float | None, threads: int, build_threads: int,
                 device: torch.device, seed: int, repeats: int, n_val: int | None, n_test: int | None,
                 router_widths, train_steps: int | None, log, progress: bool, se_margin: float = 1.645):
        self.keys_np, self.queries_np, self.test_np = keys, queries, test_queries
        self.target, self.out, self.state = target, Path(out), State(out)
        self.budget_s, self.memory_limit = float(budget_s), memory_bytes
        self.threads, self.build_threads, self.device = threads, build_threads, device
        self.seed, self.repeats, self.log, self.progress = seed, repeats, log, progress
        self.n_val, self.n_test, self.train_steps = n_val, n_test, train_steps
        self.se_margin = float(se_margin)
        self.k = max(10, target.k)
        # the budget covers every session of this tune: a resumed run starts with the time the
        # earlier ones spent (state/clock.json), so kill-and-rerun never adds budget
        clock = self.state.root / "clock.json"
        spent = float(json.loads(clock.read_text()).get("spent_s", 0.0)) if clock.exists() else 0.0
        self.t0 = time.time() - spent
        n, d = keys.shape
        self.n, self.d = n, d
        if router_widths is None:
            router_widths = (256, 128) if n >= 20_000 else (64, 32)
        self.router_widths = tuple(int(w) for w in router_widths)
        self.indexes: dict[str, IVFIndex] = {}
        self.routers: dict[str, dict] = {}    # label -> {"spec", "dtype", "index", "width", ...}
        self.anchors: dict[str, object] = {}
        self.notes: list[str] = []
        self.best_ok_qps: dict[str, float] = {}  # per provider: amips, faiss
        self.pbar = None
        # reserve for the final phase: re-timing, test split, saving the chosen index
        self.reserve_s = min(90.0, 0.08 * self.budget_s)

    # ------------------------------------------------------------------ clock
    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.budget_s - self.reserve_s - self.elapsed()

    def check_clock(self) -> None:
        if self.left() <= 0:
            raise OutOfBudget

    def _tick(self, desc: str) -> None:
        if self.pbar is not None:
            self.pbar.n = min(int(self.elapsed()), int(self.budget_s))
            self.pbar.set_postfix_str(desc[:60], refresh=True)

    # ------------------------------------------------------------------ data and labels
    def prepare(self) -> None:
        root = self.state.root / "labels"
        root.mkdir(parents=True, exist_ok=True)
        split_path = root / "split.json"
        m = self.queries_np.shape[0]
        if split_path.exists():
            split = json.loads(split_path.read_text())
        else:
            rng = np.random.default_rng(self.seed)
            perm = rng.permutation(m)
            n_val = self.n_val or int(min(3000, max(200, round(0.1 * m))))
            n_test = 0 if self.test_np is not None else (self.n_test or n_val)
            if n_val + n_test >= m - 1:
                raise InputError(f"queries: {m} queries cannot be split into train / validation ({n_val}) / "
                                 f"test ({n_test}); give more queries or --test-queries")
            split = {"seed": self.seed, "val": sorted(perm[:n_val].tolist()),
                     "test": sorted(perm[n_val:n_val + n_test].tolist()),
                     "train": sorted(perm[n_val + n_test:].tolist())}
            atomic_write_json(split_path, split)
        self.split = split
        q = self.queries_np
        self.q_train = np.ascontiguousarray(q[split["train"]])
        self.q_val = np.ascontiguousarray(q[split["val"]])
        if self.test_np is not None:
            tq = self.test_np
            if self.n_test and self.n_test < tq.shape[0]:
                tq = tq[np.sort(np.random.default_rng(self.seed + 1).permutation(tq.shape[0])[:self.n_test])]
            self.q_test = np.ascontiguousarray(tq)
        else:
            self.q_test = np.ascontiguousarray(q[split["test"]])
        if len(self.q_test) == 0:
            raise InputError("test_queries: no held-out queries")
        dev = self.device
        self.keys_t = torch.from_numpy(self.keys_np)
        self.keys_dev = self.keys_t.to(dev)
        self.q_val_t, self.q_test_t = torch.from_numpy(self.q_val), torch.from_numpy(self.q_test)
        self.q_val_dev, self.q_test_dev = self.q_val_t.to(dev), self.q_test_t.to(dev)
        self.q_train_t = torch.from_numpy(self.q_train)
        with _timing.threads(self.build_threads, self.threads):
            self.gt_val = self._gt(root / "gt_val", self.q_val_t)
            self.gt_test = self._gt(root / "gt_test", self.q_test_t)
        self.log(f"queries: {len(self.q_train):,} train / {len(self.q_val):,} validation / {len(self.q_test):,} "
                 f"test{' (given)' if self.test_np is not None else ''}; labels in {root}")

    def _gt(self, stem: Path, queries: torch.Tensor):
        from ..metrics import GroundTruth

        s_path, i_path = stem.with_name(stem.name + "_scores.npy"), stem.with_name(stem.name + "_ids.npy")
        if s_path.exists() and i_path.exists():
            return GroundTruth(torch.from_numpy(np.load(s_path)), torch.from_numpy(np.load(i_path)))
        t = time.time()
        gt = _quality.ground_truth(queries, self.keys_t, self.k)
        atomic_save_npy(s_path, gt.scores.numpy())
        atomic_save_npy(i_path, gt.ids.numpy())
        self.log(f"exact top-{gt.k} of {len(queries):,} queries: {time.time() - t:.1f} s")
        return gt

    # ------------------------------------------------------------------ steps
    def run_step(self, key: str, fn):
        """Run ``fn`` once (recorded in state/steps); a finished step is skipped on resume."""
        done = self.state.step(key)
        if done is not None:
            return done.get("result")
        self.check_clock()
        self._tick(key)
        t = time.time()
        result = fn()
        self.state.save_step(key, {"seconds": round(time.time() - t, 3), "result": result})
        self.save_clock()
        return result

    def save_clock(self) -> None:
        atomic_write_json(self.state.root / "clock.json", {"spent_s": round(self.elapsed(), 3)})

    # ------------------------------------------------------------------ points
    def measure(self, key: str, meta: dict, call, flops, memory_bytes: int) -> dict:
        """One operating point on the validation queries: quality, best-of-repeats QPS."""
        row = self.state.point(key)
        if row is not None:
            return row
        self.check_clock()
        self._tick(key)
        t = time.time()
        with _timing.threads(self.threads, self.build_threads):
            secs, ids = _timing.best_of(call, self.repeats, self.device)
        ids = torch.as_tensor(ids).cpu()
        found = _quality.found_scores(self.q_val_t, self.keys_t, ids)
        val = {}
        for metric in {self.target.metric, "match@1", "recall@10"}:
            if metric.startswith("recall@") and int(metric.split("@")[1]) > ids.shape[1]:
                continue
            v = _quality.per_query(self.q_val_t, self.keys_t, ids, self.gt_val, metric, found=found)
            val[metric.replace("@", "_at_")] = float(v.mean())
            if metric == self.target.metric:
                se = _quality.standard_error(v)
        value = val[self.target.column]
        row = {"key": key, **meta, **val, "metric": value, "se": se,
               "qps": len(self.q_val) / secs, "us_per_query": 1e6 * secs / len(self.q_val),
               "flops_per_query": float(flops() if callable(flops) else flops), "memory_bytes": int(memory_bytes),
               "n_queries": len(self.q_val), "threads": self.threads, "measure_seconds": round(time.time() - t, 3)}
        self.state.save_point(row)
        self.save_clock()
        return row

    def meets(self, row: dict) -> bool:
        """Meets the target on the validation split with ``se_margin`` standard errors to spare
        (1.645: a one-sided 95% bound, so that the choice holds on held-out queries), within
        the memory limit."""
        ok = row["metric"] - self.se_margin * (row.get("se") or 0.0) >= self.target.value
        return ok and (self.memory_limit is None or row["memory_bytes"] <= self.memory_limit)

    def sweep(self, curve: str, params, point) -> list[dict]:
        """Points of one curve in ascending cost; stop at the first that meets the target,
        or when dominated (slower than DOMINATED x the fastest point of the same provider
        meeting it)."""
        rows = []
        for p in params:
            row = point(p)
            rows.append(row)
            prov = row["provider"]  # the anchors are tuned against each other, not cut short by amips
            if self.meets(row):
                self.best_ok_qps[prov] = max(self.best_ok_qps.get(prov, 0.0), row["qps"])
                break
            if row["qps"] < DOMINATED * self.best_ok_qps.get(prov, 0.0):
                break
        return rows

    # ------------------------------------------------------------------ indexes
    def n_lists_options(self) -> list[int]:
        base = math.sqrt(self.n)
        out = []
        for f in (1.0, 2.0, 0.5):
            L = int(min(max(2, round(f * base)), max(2, self.n // 8)))
            if L not in out:
                out.append(L)
        return out

    def pq_options(self) -> list[tuple[int, float | None]]:
        """4-bit PQ codes to try, in order: 2 dimensions per subspace (1 for d <= 128: small
        d affords the finer codes), then the same score-aware (T = 0.2), then the other size."""
        d = self.d
        subs = [m for m in ([d, d // 2] if d <= 128 else [d // 2, d // 4]) if m >= 1 and d % m == 0]
        opts = [(subs[0], None), (subs[0], 0.2)]
        if len(subs) > 1:
            opts += [(subs[1], None), (subs[1], 0.2)]
        return opts

    def build_dir(self, name: str) -> Path:
        return self.state.root / "builds" / name

    def index(self, n_lists: int, storage: str = "float32", pq: tuple | None = None) -> tuple[str, IVFIndex]:
        """The index of ``n_lists`` lists (built once), with the PQ codes ``pq`` attached
        (trained once per option) and its keys stored as ``storage``."""
        base = f"L{n_lists}"
        if base not in self.indexes:
            folder = self.build_dir(base)
            State.unpark(folder)
            if (folder / "index.json").exists():
                self.indexes[base] = IVFIndex.load(folder, device=self.device)
            else:
                def build():
                    t = time.time()
                    with _timing.threads(self.build_threads, self.threads):
                        idx = IVFIndex.build(self.keys_dev, n_lists, metric="ip", seed=self.seed)
                    idx.save(folder)
                    self.log(f"built {idx} in {time.time() - t:.1f} s")
                    return {"build_seconds": round(time.time() - t, 2)}
                self.run_step(f"build {base}", build)
                if not (folder / "index.json").exists():  # a step recorded, its folder lost
                    raise InputError(f"out: {folder} is incomplete; rerun with --overwrite")
                self.indexes[base] = IVFIndex.load(folder, device=self.device)
        idx = self.indexes[base]
        name = base
        if pq is not None:
            m, thr = pq
            pname = f"{base}-pq{m}x4-T{_rel(thr) if thr is not None else 'none'}"
            if pname not in self.indexes:
                folder = self.build_dir(pname)
                State.unpark(folder)
                if (folder / "index.json").exists():
                    self.indexes[pname] = IVFIndex.load(folder, device=self.device)
                else:
                    est = self._pq_estimate(m, thr)
                    if est is not None and est > self.left():
                        raise OutOfBudget
                    def train_pq():
                        t = time.time()
                        cp = IVFIndex(idx.centroids, idx.keys_by_list, idx.list_offsets, idx.ids,
                                      metric=idx.metric, meta=idx.meta)
                        cp.inputs, cp._partitions_sha = idx.inputs, idx._partitions_sha
                        with _timing.threads(self.build_threads, self.threads):
                            cp.train_pq(subspaces=m, bits=4, anisotropic_threshold=thr, seed=self.seed)
                        cp.save(folder)
                        self.log(f"PQ {m} x 4 bits (T = {thr}) on {base}: {time.time() - t:.1f} s")
                        return {"seconds": round(time.time() - t, 2)}
                    self.run_step(f"pq {pname}", train_pq)
                    self.indexes[pname] = IVFIndex.load(folder, device=self.device)
            name = pname
        if storage != "float32":
            sname = f"{name}-{storage}"
            if sname not in self.indexes:
                src = self.indexes[name]
                dt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[storage]
                cp = IVFIndex(src.centroids, src.keys_by_list.to(dt), src.list_offsets, src.ids,
                              metric=src.metric, pq=src.pq, meta={**src.meta, "storage_dtype": storage})
                cp.inputs, cp._partitions_sha = src.inputs, src._partitions_sha
                self.indexes[sname] = cp
            name = sname
        return name, self.indexes[name]

    def _pq_estimate(self, m: int, thr) -> float | None:
        """Seconds a PQ training is expected to take, from the first one measured (score-aware
        assignment costs more: x4), so that a long one is not started past the budget."""
        done = [s for s in self.state.steps() if s["key"].startswith("pq ") and "-Tnone" in s["key"]]
        if not done:
            return None
        first = done[0]
        m0 = int(first["key"].split("-pq")[1].split("x")[0])
        return float(first.get("seconds") or 0) * (m / m0) * (4.0 if thr is not None else 1.0)

    def index_bytes(self, idx: IVFIndex, scanner: str) -> int:
        b = (idx.keys_by_list.numel() * idx.keys_by_list.element_size() + idx.centroids.numel() * 4
             + idx.ids.numel() * 8 + idx.list_offsets.numel() * 8)
        if scanner == "pq" and idx.pq is not None:
            b += sum(v.numel() * v.element_size() for v in idx.pq.state_dict().values())
        return int(b)

    # ------------------------------------------------------------------ routers
    def labels_for(self, base: str) -> Path:
        """Per-list exact labels of the train queries for index ``base``, with the top-1
        computed once for all indexes; written as an ``amips labels`` folder."""
        idx = self.indexes[base]
        root = self.state.root / "labels" / f"train-{base}"

        def compute():
            from ..labels.batch import Labeler

            t = time.time()
            root.mkdir(parents=True, exist_ok=True)
            part = idx.partitions.to(self.device)
            # one certified pass: every list's exact top-1, and the global top-1 (the best list's)
            labeler = Labeler(self.keys_dev, partition_ids=part, n_partitions=idx.n_lists, device=self.device)
            parts: dict[str, list] = {}
            with _timing.threads(self.build_threads, self.threads):
                for a in range(0, len(self.q_train), 4096):
                    for name, v in labeler(self.q_train_t[a:a + 4096].to(self.device)).items():
                        parts.setdefault(name, []).append(torch.as_tensor(v).cpu())
                    self.check_clock()
            atomic_save_npy(root / "top1_score.npy", torch.cat(parts["top1_score"]).float().numpy())
            atomic_save_npy(root / "top1_index.npy", torch.cat(parts["top1_index"]).long().numpy())
            ps, pi = parts["partition_score"], parts["partition_index"]
            atomic_save_npy(root / "partition_score.npy", torch.cat(ps).float().numpy())
            atomic_save_npy(root / "partition_index.npy", torch.cat(pi).long().numpy())
            manifest = {"complete": True,
                        "inputs": {"keys": fingerprint(self.keys_np), "queries": fingerprint(self.q_train),
                                   "partitions": fingerprint(idx.partitions.numpy())},
                        "n_queries": len(self.q_train), "n_keys": self.n, "d": self.d,
                        "n_partitions": idx.n_lists}
            atomic_write_json(root / "labels.json", manifest)
            self.log(f"per-list labels of {len(self.q_train):,} train queries for {base}: {time.time() - t:.1f} s")
            return {"seconds": round(time.time() - t, 2)}

        self.run_step(f"labels {base}", compute)
        return root

    def router(self, base: str, width: int) -> str | None:
        """Train (once) a multi-head router-mlp of ``width`` for index ``base``; its label."""
        from ..train import TrainConfig, train

        if len(self.q_train) < max(500, 2 * self.indexes[base].n_lists):
            self.notes.append(f"{base}: {len(self.q_train)} train queries are too few for a router")
            return None
        label = f"{base}/router-w{width}"
        run = self.state.root / "routers" / f"{base}-w{width}"
        steps = self.train_steps or int(min(8000, max(600, len(self.q_train) // 4)))

        def fit():
            labels = self.labels_for(base)
            self.check_clock()
            # at most a quarter of what is left, so later options still get their turn; a router
            # trained for less than 5% of the budget would only add a useless curve
            minutes = min(12.0, 0.25 * self.left() / 60)
            if minutes < 0.05 * self.budget_s / 60:
                self.notes.append(f"{label}: {minutes:.2f} min left for training; not trained")
                raise OutOfBudget
            def config(n):
                return TrainConfig(model="router-mlp", width=width, depth=2, steps=n, batch_size=1024,
                                   eval_every=max(100, n // 8), checkpoint_every=max(100, n // 8),
                                   seed=self.seed, lr=2e-3, warmup=min(100, n // 10), noise_fraction=0.0,
                                   w_key=0.0, val_fraction=0.02)

            def run_train(folder, n, resume=False):
                with _timing.threads(self.build_threads, self.threads):
                    return train(self.keys_np, self.q_train, folder, config(n),
                                 partitions=str(self.build_dir(base) / "partitions.npy"), labels_dir=labels,
                                 device=str(self.device), resume=resume, progress=False)

            t = time.time()
            # A run cut off by a time limit is an unfinished run, which no reader uses; so the
            # time cap becomes a step count: a short probe run measures this machine's step
            # rate, and the router trains that many steps to the end (a resumed run keeps its
            # planned count, read back from its config)
            cfg_path = run / "config.json"
            if cfg_path.exists():
                n_steps = int(json.loads(cfg_path.read_text())["train"]["steps"])
            else:
                probe_steps = min(steps, 100)
                probe = run.parent / f".{run.name}-probe"
                shutil.rmtree(probe, ignore_errors=True)
                tp = time.time()
                run_train(probe, probe_steps)
                rate = probe_steps / max(time.time() - tp, 1e-3)
                shutil.rmtree(probe, ignore_errors=True)
                n_steps = max(probe_steps, min(steps, int(0.9 * rate * 60 * minutes)))
            metrics = run_train(run, n_steps, resume=cfg_path.exists())
            secs = time.time() - t
            self.log(f"router-mlp {width} x 2 for {base}: {n_steps} steps in {secs:.0f} s ({minutes:.1f} min cap)")
            return {"seconds": round(secs, 1), "metrics": {k: v for k, v in (metrics or {}).items()
                                                           if isinstance(v, (int, float))}}

        info = self.run_step(f"router {label}", fit)
        idx = self.indexes[base]
        spec = f"router:{run.resolve()}"
        idx.router(spec)  # loads and checks the model against this index now
        model_params = int(json.loads((run / "config.json").read_text()).get("n_params") or 0)
        self.routers[label] = {"spec": spec, "dtype": "fp32", "base": base, "width": width,
                               "params": int(model_params), "run": str(run), "train": info}
        return label

    def margins(self, label: str, rt) -> list[float]:
        def compute():
            q = self.q_train_t[:4000].to(self.device)
            with _timing.threads(self.build_threads, self.threads):
                top2 = torch.topk(rt.list_scores(q)[0], 2, dim=1).values.double()
            gap = (top2[:, 0] - top2[:, 1]).cpu()
            return [float(torch.quantile(gap, f)) for f in MARGIN_QUANTILES]
        return self.run_step(f"margins {label}", compute) or []

    def router_obj(self, idx: IVFIndex, label: str, dtype: str = "fp32"):
        if label == "centroid":
            return idx.router("centroid"), 0
        r = self.routers[label]
        rt = idx.router(r["spec"], dtype=None if dtype == "fp32" else dtype)
        return rt, r["params"] * (4 if dtype == "fp32" else 6)

    # ------------------------------------------------------------------ amips curves
    def amips_curve(self, name: str, idx: IVFIndex, router: str, dtype: str, scanner: str, reorder: int,
                    margin: float | None, margin_q: float | None = None, nprobes=None) -> list[dict]:
        rt, router_bytes = self.router_obj(idx, router, dtype)
        spec = "centroid" if router == "centroid" else self.routers[router]["spec"]
        mem = self.index_bytes(idx, scanner) + router_bytes
        family = (f"amips {scanner}{'+reorder' if scanner == 'pq' else ''} / "
                  f"{'centroid' if router == 'centroid' else router.split('/')[1]}{'-bf16' if dtype == 'bf16' else ''}")
        params = [p for p in (nprobes or NPROBES) if p <= idx.n_lists and (margin is None or p >= 2)]
        if scanner == "exact" and router == "centroid" and idx.n_lists not in params:
            params.append(idx.n_lists)  # all lists: brute force, the target is always reachable
        q = self.q_val_dev
        curve = f"{name}|{router}|{dtype}|{scanner}|r{reorder}|m{margin_q}"

        def point(p):
            meta = {"provider": "amips", "family": family, "index": name, "n_lists": idx.n_lists,
                    "storage": str(idx.keys_by_list.dtype).replace("torch.", ""),
                    "pq": None if scanner != "pq" else idx.pq.config(), "router": spec, "router_label": router,
                    "router_dtype": dtype, "scanner": scanner, "nprobe": p, "reorder": reorder,
                    "probe_margin": margin, "margin_quantile": margin_q}
            kw = {"scanner": scanner, "reorder": reorder, "probe_margin": margin}

            info = {}

            def call():
                _, ids, inf = idx.search(q, self.k, p, rt, return_info=True, **kw)
                info["flops"] = inf.flops_per_query  # the probed lists' actual sizes
                return ids
            return self.measure(f"{curve}|p{p}", meta, call, lambda: info["flops"], mem)

        return self.sweep(curve, params, point)

    def runtime_space(self, name: str, idx: IVFIndex, router: str, *, dtypes=("fp32",), reorders=REORDERS,
                      margins=True, exact=True) -> list[dict]:
        """Every run-time curve of one index and router."""
        rows = []
        for dtype in dtypes:
            if exact:
                rows += self.amips_curve(name, idx, router, dtype, "exact", 0, None)
            if idx.pq is not None:
                for r in reorders:
                    rows += self.amips_curve(name, idx, router, dtype, "pq", r, None)
        if margins and router != "centroid":
            rt, _ = self.router_obj(idx, router)
            for mq, m in zip(MARGIN_QUANTILES, self.margins(router, rt)):
                for r in ([0] if idx.pq is None else reorders[:2]):
                    rows += self.amips_curve(name, idx, router, "fp32", "exact" if idx.pq is None else "pq", r, m, mq)
        return rows

    # ------------------------------------------------------------------ anchors
    def run_anchors(self) -> None:
        faiss = _baselines.import_faiss()
        if faiss is None:
            self.notes.append("faiss not installed: the IVF-PQ fast-scan + refine and HNSW anchors were skipped")
            return
        if self.device.type != "cpu":
            self.notes.append("anchors are CPU libraries: skipped on a GPU device")
            return
        base = f"L{self.n_lists_options()[0]}"
        idx = self.indexes[base]
        q = np.ascontiguousarray(self.q_val)
        for m in _baselines.code_sizes(self.d):
            label = f"faiss-ivfpq{m}"

            def make(m=m, label=label):
                def build(m=m, label=label):
                    t = time.time()
                    with _timing.threads(self.build_threads, self.threads):
                        obj = _baselines.IVFPQRefine(faiss, idx, self.keys_np, m,
                                                     self.state.root / "anchors" / f"{base}-ivfpq{m}.faiss")
                    self.anchors[label] = obj
                    return {"seconds": round(time.time() - t, 2)}
                self.run_step(f"anchor {label}", build)
                if label not in self.anchors:
                    self.anchors[label] = _baselines.IVFPQRefine(
                        faiss, idx, self.keys_np, m, self.state.root / "anchors" / f"{base}-ivfpq{m}.faiss")
                return self.anchors[label]
            obj = make()
            family = f"faiss IVF{idx.n_lists},PQ{m}x4fs + IndexRefineFlat"
            for refine in REFINES:
                curve = f"{label}|R{refine}"

                def point(p, refine=refine, obj=obj, family=family, curve=curve):
                    meta = {"provider": "faiss", "family": family, "index": base, "n_lists": idx.n_lists,
                            "nprobe": p, "reorder": refine, "k_factor": refine / self.k, "subspaces": obj.subspaces}
                    return self.measure(f"{curve}|p{p}", meta, lambda: obj.search(q, self.k, p, refine),
                                        obj.flops_per_query(p, refine, self.k), obj.memory_bytes)
                self.sweep(curve, [p for p in NPROBES if p <= idx.n_lists], point)

        def build_hnsw():
            t = time.time()
            with _timing.threads(self.build_threads, self.threads):
                self.anchors["hnsw"] = _baselines.HNSWFlat(faiss, self.keys_np, self.state.root / "anchors" / "hnsw.faiss")
            self.log(f"faiss HNSW (M = 16) build: {time.time() - t:.1f} s")
            return {"seconds": round(time.time() - t, 2)}
        self.run_step("anchor hnsw", build_hnsw)
        if "hnsw" not in self.anchors:
            self.anchors["hnsw"] = _baselines.HNSWFlat(faiss, self.keys_np, self.state.root / "anchors" / "hnsw.faiss")
        h = self.anchors["hnsw"]

        def hpoint(ef):
            meta = {"provider": "faiss", "family": "faiss IndexHNSWFlat M=16", "nprobe": ef, "ef_search": ef}
            return self.measure(f"hnsw|ef{ef}", meta, lambda: h.search(q, self.k, ef), float("nan"), h.memory_bytes)
        self.sweep("hnsw", HNSW_EF, hpoint)

    def anchor_call(self, row: dict, queries: np.ndarray):
        if row["family"].startswith("faiss IndexHNSW"):
            h = self.anchors["hnsw"]
            return lambda: h.search(queries, self.k, row["ef_search"])
        obj = self.anchors[f"faiss-ivfpq{row['subspaces']}"]
        return lambda: obj.search(queries, self.k, row["nprobe"], row["reorder"])

    # ------------------------------------------------------------------ the plan
    def best_point(self, rows, *, meeting=True):
        ok = [r for r in rows if self.meets(r)] if meeting else rows
        return max(ok, key=lambda r: r["qps"]) if ok else None

    def flops_at_target(self, rows) -> float:
        ok = [r for r in rows if r["metric"] >= self.target.value]
        return min((r["flops_per_query"] for r in ok), default=math.inf)

    def run(self) -> None:
        opts = self.n_lists_options()
        pq_opts = self.pq_options()
        L1 = opts[0]
        # 2-3: the first index, centroid routing, exact and the first PQ codes
        base, idx = self.index(L1)
        cent = self.runtime_space(base, idx, "centroid")
        pq_name, pq_idx = self.index(L1, pq=pq_opts[0])
        self.runtime_space(pq_name, pq_idx, "centroid", exact=False, reorders=CENTROID_REORDERS)
        # 4: the anchors (a few minutes of builds: cheaper than labels and a router)
        self.run_anchors()
        # 5: the wider router
        routers = []
        r1 = self.router(base, self.router_widths[0])
        if r1:
            routers.append(r1)
            self.runtime_space(base, idx, r1)
            self.runtime_space(pq_name, pq_idx, r1, dtypes=("fp32", "bf16"), margins=True, exact=False)
        # 6: narrower routers, more PQ codes
        for w in self.router_widths[1:]:
            r = self.router(base, w)
            if r:
                routers.append(r)
                self.runtime_space(base, idx, r, margins=False)
                self.runtime_space(pq_name, pq_idx, r, dtypes=("fp32", "bf16"), exact=False)
        best_router = self._best_router(routers) or "centroid"
        for opt in pq_opts[1:]:
            self.check_clock()
            name, pidx = self.index(L1, pq=opt)
            if not self._pq_can_reach(name, pidx, best_router):
                self.notes.append(f"{name}: cannot reach the target with reorder {max(REORDERS)}; dropped")
                continue
            for rt in ([best_router] + (["centroid"] if best_router != "centroid" else [])):
                self.runtime_space(name, pidx, rt, dtypes=("fp32",) if rt == "centroid" else ("fp32", "bf16"),
                                   exact=False, margins=rt != "centroid",
                                   reorders=CENTROID_REORDERS if rt == "centroid" else REORDERS)
        # 7: other list counts
        best_pq = self._best_pq(L1) or pq_opts[0]
        for L in opts[1:]:
            self.check_clock()
            b2, idx2 = self.index(L)
            cent2 = self.runtime_space(b2, idx2, "centroid", exact=True)
            f1, f2 = self.flops_at_target(cent), self.flops_at_target(cent2)
            if not f2 <= 1.1 * f1:
                self.notes.append(f"{b2}: centroid routing needs {f2 / 1e6:.2f} MFLOP for the target against "
                                  f"{f1 / 1e6:.2f} on {base}; no router trained for it")
                continue
            p2, pidx2 = self.index(L, pq=best_pq)
            self.runtime_space(p2, pidx2, "centroid", exact=False, reorders=CENTROID_REORDERS)
            w = self.routers[best_router]["width"] if best_router != "centroid" else self.router_widths[0]
            r = self.router(b2, w)
            if r:
                self.runtime_space(b2, idx2, r, margins=False)
                self.runtime_space(p2, pidx2, r, dtypes=("fp32", "bf16"), exact=False)
        # 8: fp16 storage of the best configuration's index (same lists, codes and routers)
        best = self.best_point([r for r in self.state.points() if r["provider"] == "amips"])
        if best is not None and best["storage"] == "float32":
            pq = None if best["pq"] is None else (best["pq"]["subspaces"], best["pq"].get("anisotropic_threshold"))
            name, hidx = self.index(best["n_lists"], "float16", pq)
            around = [p for p in NPROBES if best["nprobe"] / 4 <= p <= best["nprobe"] * 4]
            self.amips_curve(name, hidx, best["router_label"], best["router_dtype"], best["scanner"],
                             best["reorder"], best["probe_margin"], best["margin_quantile"], nprobes=around)

    def _best_router(self, labels) -> str | None:
        pts = [r for r in self.state.points() if r.get("router_label") in labels]
        best = self.best_point(pts) or self.best_point(pts, meeting=False)
        return None if best is None else best["router_label"]

    def _best_pq(self, L: int):
        pts = [r for r in self.state.points() if r.get("scanner") == "pq" and r.get("n_lists") == L]
        best = self.best_point(pts)
        if best is None:
            return None
        return best["pq"]["subspaces"], best["pq"].get("anisotropic_threshold")

    def _pq_can_reach(self, name: str, idx: IVFIndex, router: str) -> bool:
        """One generous point (the deepest reorder, the nprobe the exact scan needed x 2)."""
        pts = [r for r in self.state.points() if r.get("router_label") == router and r.get("scanner") == "exact"
               and r.get("n_lists") == idx.n_lists and r["metric"] >= self.target.value]
        p = min((r["nprobe"] for r in pts), default=idx.n_lists // 4 or 1)
        p = min(idx.n_lists, max(2, 2 * p))
        row = self.amips_curve(name, idx, router, "fp32", "pq", max(REORDERS), None, nprobes=[p])
        return bool(row) and row[-1]["metric"] >= self.target.value

    # ------------------------------------------------------------------ lazily rebuilt objects
    def ensure_router(self, label: str) -> None:
        if label == "centroid" or label in self.routers:
            return
        base, _, rest = label.partition("/")
        width = int(rest.split("-w")[1])
        self.index(int(base[1:]))
        run = self.state.root / "routers" / f"{base}-w{width}"
        spec = f"router:{run.resolve()}"
        params = int(json.loads((run / "config.json").read_text()).get("n_params") or 0)
        self.routers[label] = {"spec": spec, "dtype": "fp32", "base": base, "width": width, "params": params,
                               "run": str(run)}

    def point_index(self, row: dict) -> IVFIndex:
        pq = None if row.get("pq") is None else (row["pq"]["subspaces"], row["pq"].get("anisotropic_threshold"))
        return self.index(row["n_lists"], row["storage"], pq)[1]

    def point_call(self, row: dict, queries: torch.Tensor, q_np: np.ndarray):
        if row["provider"] != "amips":
            return self.anchor_call(row, q_np)
        self.ensure_router(row["router_label"])
        idx = self.point_index(row)
        rt, _ = self.router_obj(idx, row["router_label"], row["router_dtype"])
        kw = {"scanner": row["scanner"], "reorder": row["reorder"], "probe_margin": row["probe_margin"]}
        return lambda: idx.search(queries, self.k, row["nprobe"], rt, **kw)[1]

    def load_anchors(self) -> bool:
        faiss = _baselines.import_faiss()
        if faiss is None:
            return False
        root = self.state.root / "anchors"
        base = f"L{self.n_lists_options()[0]}"
        for path in sorted(root.glob(f"{base}-ivfpq*.faiss")):
            m = int(path.stem.split("ivfpq")[1])
            if f"faiss-ivfpq{m}" not in self.anchors:
                self.anchors[f"faiss-ivfpq{m}"] = _baselines.IVFPQRefine(faiss, self.index(int(base[1:]))[1],
                                                                         self.keys_np, m, path)
        if "hnsw" not in self.anchors and (root / "hnsw.faiss").exists():
            self.anchors["hnsw"] = _baselines.HNSWFlat(faiss, self.keys_np, root / "hnsw.faiss")
        return True
