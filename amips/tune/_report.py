"""Frontiers, CSV, plot and the printed report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .._io import atomic_write, atomic_write_json
from .._validate import InputError

CSV_FIELDS = ("family", "provider", "index", "n_lists", "storage", "scanner", "router_label", "router_dtype",
              "nprobe", "reorder", "probe_margin", "metric", "match_at_1", "recall_at_10", "qps", "us_per_query",
              "flops_per_query", "memory_bytes", "on_qps_frontier", "on_memory_frontier", "router", "key")


def frontier(rows: list[dict], x: str, *, higher_x: bool) -> list[dict]:
    """Pareto frontier of (metric higher, ``x`` higher or lower): every point that no other
    point matches or beats on both, best ``x`` first."""
    def better(r):
        return r[x] if higher_x else -r[x]
    pts = [r for r in rows if r.get(x) is not None and math.isfinite(r[x])]
    out, best = [], -math.inf
    for r in sorted(pts, key=lambda r: (-better(r), -r["metric"])):
        if r["metric"] > best:
            out.append(r)
            best = r["metric"]
    return out


def dominated(a: dict, b: dict, x: str, higher_x: bool) -> bool:
    """Is ``a`` dominated by ``b`` (no worse on both, better on one)?"""
    ax, bx = (a[x], b[x]) if higher_x else (-a[x], -b[x])
    return bx >= ax and b["metric"] >= a["metric"] and (bx > ax or b["metric"] > a["metric"])


def write_csv(rows: list[dict], path: Path) -> Path:
    def write(fh):
        import io

        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
        fh.write(text.getvalue().encode())
    return atomic_write(path, write)


def plot(rows: list[dict], report: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    metric, target = report["target"]["metric"], report["target"]["value"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    for ax, x, higher, label in ((axes[0], "qps", True, "queries per second (validation batch)"),
                                 (axes[1], "memory_bytes", False, "index memory (MB)")):
        scale = 1.0 if x == "qps" else 1e-6
        for fam, rs in sorted(fams.items()):
            fr = sorted(frontier(rs, x, higher_x=higher), key=lambda r: r[x])
            style = "o-" if rs[0]["provider"] == "amips" else "s--"
            ax.plot([r[x] * scale for r in fr], [r["metric"] for r in fr], style, ms=3, label=fam, alpha=0.8)
        fr = sorted(frontier(rows, x, higher_x=higher), key=lambda r: r[x])
        ax.plot([r[x] * scale for r in fr], [r["metric"] for r in fr], "k-", lw=2.5, alpha=0.35, label="frontier")
        ax.axhline(target, color="r", ls=":", lw=1)
        ch = report.get("chosen_point")
        if ch:
            ax.plot([ch[x] * scale], [ch["metric"]], "r*", ms=16, label="chosen")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (validation, tie-aware)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"amips tune: target {metric} >= {target:g}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return None


def _fmt_point(r: dict | None) -> str:
    if not r:
        return "-"
    if r["provider"] == "amips":
        extra = f"nprobe {r['nprobe']}"
        if r["scanner"] == "pq":
            extra += f", PQ {r['pq']['subspaces']}x{r['pq']['bits']} T={r['pq'].get('anisotropic_threshold')}, " \
                     f"reorder {r['reorder']}"
        if r.get("probe_margin") is not None:
            extra += f", probe margin {r['probe_margin']:.4g}"
        head = f"{r['n_lists']} lists, {r['storage']}, {r['router_label'].split('/')[-1]} ({r['router_dtype']}), " \
               f"{r['scanner']}, {extra}"
    elif "ef_search" in r:
        head = f"{r['family']}, efSearch {r['ef_search']}"
    else:
        head = f"{r['family']}, nprobe {r['nprobe']}, k_factor {r['k_factor']:g}"
    return f"{head}: {r['metric']:.4f}, {r['qps']:,.0f} QPS, {r['flops_per_query'] / 1e6:.2f} MFLOP, " \
           f"{r['memory_bytes'] / 1e6:.1f} MB"


def lines(report: dict) -> list[str]:
    t = report["target"]
    out = [f"amips tune: target {t['metric']} >= {t['value']:g} ({report['n_points']} operating points, "
           f"{report['elapsed_s'] / 60:.1f} of {report['budget_s'] / 60:.1f} min)"]
    if report["reached"]:
        out.append(f"chosen: {_fmt_point(report['chosen_point'])}")
        out.append(f"why: {report['why']}")
        te = report["test"]
        out.append(f"held-out test ({te['n_queries']:,} queries): {t['metric']} {te['metric']:.4f} "
                   f"(95% interval {te['interval'][0]:.4f}-{te['interval'][1]:.4f}); validation "
                   f"{report['chosen_point']['metric']:.4f}")
        out.append(f"index: {report['index_dir']}")
        out.append("search: IVFIndex.load(index).search(queries, k, " +
                   ", ".join(f"{k}={v!r}" for k, v in report["chosen"].items()) + ")" +
                   (f"  [router dtype {report['chosen_point']['router_dtype']}: "
                    f"index.router(router, dtype='bf16')]" if report["chosen_point"]["router_dtype"] != "fp32" else ""))
    else:
        out.append(f"not reached, best found: {_fmt_point(report.get('best_found'))}")
    a = report.get("anchor")
    if a:
        out.append(f"best anchor: {_fmt_point(a)}" + (f"; chosen / anchor QPS {report['ratio_to_anchor']:.2f}x"
                                                      if report.get("ratio_to_anchor") else ""))
    out.append("frontier (validation, metric vs QPS):")
    for r in report["frontier"]:
        out.append(f"  {_fmt_point(r)}")
    for n in report.get("notes", []):
        out.append(f"note: {n}")
    return out


def write_report(out: Path, report: dict) -> None:
    atomic_write_json(out / "report.json", report)
    atomic_write(out / "report.txt", lambda fh: fh.write(("\n".join(lines(report)) + "\n").encode()))


def read_report(out) -> dict:
    path = Path(out) / "report.json"
    if not Path(out).is_dir():
        raise InputError(f"report: {out} is not a folder")
    if not path.exists():
        raise InputError(f"report: {out} has no report.json (the tune has not finished; rerun it to resume)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"report: {path} is not valid JSON ({exc})") from None
