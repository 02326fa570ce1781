"""The final phase: re-time the finalists interleaved, choose, check on the held-out split,
write the chosen index folder, the report, the CSVs and the plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .._io import atomic_write_json
from . import _quality, _report, _timing
from ._report import frontier

FINALISTS = 8


def _finalists(tuner, rows: list[dict]) -> list[dict]:
    """The points to re-time: the FINALISTS fastest amips points meeting the target (by their
    sweep timing), the fastest of every other amips family, and the fastest point of every
    anchor family."""
    ok = sorted((r for r in rows if tuner.meets(r)), key=lambda r: -r["qps"])
    best: dict[str, dict] = {}
    for r in ok:
        best.setdefault(r["family"], r)
    ours = [r for r in ok if r["provider"] == "amips"][:FINALISTS]
    ours += [r for r in best.values() if r["provider"] == "amips" and r not in ours]
    theirs = [r for r in best.values() if r["provider"] != "amips"]
    return ours + theirs


def retime(tuner, finalists: list[dict]) -> dict[str, float]:
    """QPS of every finalist, timed interleaved in one loop (best of repeats + 2), cached in
    state/final.json for this exact set of finalists."""
    path = tuner.state.root / "final.json"
    keys = [r["key"] for r in finalists]
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("keys") == keys:
            return cached["qps"]
    if any(r["provider"] != "amips" for r in finalists) and not tuner.load_anchors():
        finalists = [r for r in finalists if r["provider"] == "amips"]
    finalists = [r for r in finalists if r["provider"] == "amips" or
                 ("hnsw" if "ef_search" in r else f"faiss-ivfpq{r.get('subspaces')}") in tuner.anchors]
    calls = [tuner.point_call(r, tuner.q_val_dev, tuner.q_val) for r in finalists]
    with _timing.threads(tuner.threads, tuner.build_threads):
        for c in calls:  # warm every path once (lazy engines, caches) before timing
            c()
        secs = _timing.interleaved(calls, tuner.repeats + 2, tuner.device)
    qps = {r["key"]: len(tuner.q_val) / s for r, s in zip(finalists, secs)}
    atomic_write_json(path, {"keys": keys, "qps": qps})
    return qps


def _save_chosen(tuner, row: dict) -> tuple[Path, dict]:
    """Write the chosen index (with PQ codes only when it scans them) to OUT/index and its
    router's run to OUT/router; returns the folder and IVFIndex.search's keyword arguments."""
    from ..index import IVFIndex

    out = tuner.out
    idx = tuner.point_index(row)
    dest = out / "index"
    if dest.exists():
        shutil.rmtree(dest)
    keep = IVFIndex(idx.centroids, idx.keys_by_list, idx.list_offsets, idx.ids, metric=idx.metric,
                    pq=idx.pq if row["scanner"] == "pq" else None, meta={**idx.meta, "tuned": True})
    keep.inputs, keep._partitions_sha = idx.inputs, idx._partitions_sha
    keep.save(dest)
    router = "centroid"
    rdest = out / "router"
    if rdest.exists():
        shutil.rmtree(rdest)
    if row["router_label"] != "centroid":
        tuner.ensure_router(row["router_label"])
        run = Path(tuner.routers[row["router_label"]]["run"])
        rdest.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "state.json", "metrics.jsonl"):
            if (run / name).exists():
                shutil.copyfile(run / name, rdest / name)
        router = f"router:{rdest.resolve()}"
    chosen = {"nprobe": int(row["nprobe"]), "router": router, "scanner": row["scanner"],
              "reorder": int(row["reorder"]), "probe_margin": row["probe_margin"]}
    return dest.resolve(), chosen


def _held_out(tuner, index_dir: Path, chosen: dict, dtype: str) -> tuple[dict, np.ndarray]:
    """The chosen point on the test split, searched through the SAVED folder and ``chosen``."""
    from ..index import IVFIndex

    idx = IVFIndex.load(index_dir, device=tuner.device)
    kw = dict(chosen)
    if dtype != "fp32":
        kw["router"] = idx.router(chosen["router"], dtype=dtype)
    with _timing.threads(tuner.threads, tuner.build_threads):
        ids = idx.search(tuner.q_test_dev, tuner.k, **kw)[1].cpu()
    out = {"n_queries": len(tuner.q_test)}
    v = _quality.per_query(tuner.q_test_t, tuner.keys_t, ids, tuner.gt_test, tuner.target.metric)
    out["metric"] = float(v.mean())
    out["interval"] = list(_quality.interval(v, tuner.target.metric, seed=tuner.seed))
    for m in ("match@1", "recall@10"):
        out[m.replace("@", "_at_")] = float(_quality.per_query(tuner.q_test_t, tuner.keys_t, ids, tuner.gt_test,
                                                               m).mean())
    return out, ids


def finish(tuner, *, stopped_by_budget: bool, stopped_at_s: float) -> dict:
    rows = tuner.state.points()
    finalists = _finalists(tuner, rows)
    final_qps = retime(tuner, finalists) if finalists else {}
    for r in rows:
        if r["key"] in final_qps:
            r["qps_sweep"], r["qps"] = r["qps"], final_qps[r["key"]]
            r["us_per_query"] = 1e6 / r["qps"]
    ok = [r for r in rows if r["provider"] == "amips" and r["key"] in final_qps and tuner.meets(r)]
    chosen_row = max(ok, key=lambda r: r["qps"]) if ok else None
    anchors_ok = [r for r in rows if r["provider"] != "amips" and r["key"] in final_qps and tuner.meets(r)]
    anchor = max(anchors_ok, key=lambda r: r["qps"]) if anchors_ok else None
    fr_qps = frontier(rows, "qps", higher_x=True)
    fr_mem = frontier(rows, "memory_bytes", higher_x=False)
    on_q, on_m = {r["key"] for r in fr_qps}, {r["key"] for r in fr_mem}
    for r in rows:
        r["on_qps_frontier"], r["on_memory_frontier"] = r["key"] in on_q, r["key"] in on_m
    t = tuner.target
    report = {"target": {"metric": t.metric, "value": t.value}, "reached": chosen_row is not None,
              "stopped_by_budget": stopped_by_budget, "budget_s": tuner.budget_s,
              "memory_limit_bytes": tuner.memory_limit, "threads": tuner.threads, "device": str(tuner.device),
              "n_points": len(rows), "n_keys": tuner.n, "d": tuner.d,
              "queries": {"train": len(tuner.q_train), "validation": len(tuner.q_val), "test": len(tuner.q_test)},
              "selection_rule": f"fastest point (QPS re-timed interleaved among the finalists) whose validation "
                                f"metric minus {tuner.se_margin:g} standard errors reaches the target, within the "
                                "memory limit",
              "notes": list(dict.fromkeys(tuner.notes))}
    if chosen_row is not None:
        index_dir, chosen = _save_chosen(tuner, chosen_row)
        test, _ = _held_out(tuner, index_dir, chosen, chosen_row["router_dtype"])
        n_val = len(tuner.q_val)
        if t.metric == "match@1":
            hits = int(round(chosen_row["metric"] * n_val))
            v_int = list(_quality.interval(np.r_[np.ones(hits), np.zeros(n_val - hits)], t.metric))
        else:  # normal approximation from the stored standard error
            v_int = [chosen_row["metric"] - 1.96 * chosen_row["se"], chosen_row["metric"] + 1.96 * chosen_row["se"]]
        report.update({
            "chosen": chosen, "chosen_point": chosen_row, "index_dir": str(index_dir),
            "router_dir": None if chosen["router"] == "centroid" else chosen["router"].split(":", 1)[1],
            "test": test,
            "validation": {"metric": chosen_row["metric"], "se": chosen_row["se"], "n_queries": len(tuner.q_val),
                           "interval": v_int},
            "why": (f"the fastest of {len(ok)} amips finalists meeting {t.metric} >= {t.value:g} on the "
                    f"validation split ({chosen_row['metric']:.4f} - {tuner.se_margin:g} x {chosen_row['se']:.4f} >= {t.value:g}) "
                    f"among {len(rows)} operating points; re-timed interleaved with the other finalists"
                    + (f" and within {tuner.memory_limit / 2**30:g} GiB" if tuner.memory_limit else "")),
        })
    else:
        amips_rows = [r for r in rows if r["provider"] == "amips"]
        report["best_found"] = max(amips_rows, key=lambda r: (r["metric"], r["qps"])) if amips_rows else None
        report["chosen"] = None
    if anchor is not None:
        report["anchor"] = anchor
        if chosen_row is not None:
            report["ratio_to_anchor"] = chosen_row["qps"] / anchor["qps"]
    report["frontier"] = fr_qps
    report["memory_frontier"] = fr_mem
    report["stopped_at_s"] = stopped_at_s
    report["elapsed_s"] = tuner.elapsed()
    report["finish_s"] = report["elapsed_s"] - stopped_at_s
    report["steps"] = [{"key": s["key"], "seconds": s.get("seconds")} for s in tuner.state.steps()]
    out = tuner.out
    _report.write_csv(sorted(rows, key=lambda r: (r["family"], r["index"] if "index" in r else "", r["nprobe"])),
                      out / "points.csv")
    _report.write_csv(fr_qps, out / "frontier.csv")
    note = _report.plot(rows, report, out / "frontier.png")
    if note:
        report["notes"].append(note)
    _report.write_report(out, report)
    tuner.state.park_all()
    atomic_write_json(tuner.state.root / "done.json", {"budget_s": tuner.budget_s})
    return report

