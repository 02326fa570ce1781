"""Evaluate an IVF index and router against exact ground truth, per nprobe.

For every nprobe, :func:`evaluate` reports (one dict per row):

- ``match_at_1``, ``recall_at_10``, ``mrr``: tie-aware, see :mod:`amips.metrics`;
- ``keys_scanned_per_query``: the actual sizes of the probed lists, averaged;
- ``router_flops_per_query`` + ``scan_flops_per_query`` = ``flops_per_query``: a
  multiply-add counts 2; the router is the centroid scores (2·L·d) or the network's own
  count (forward, plus the key gradient where the key is used); the exact scan is 2·d per
  key scanned; the PQ scanner reports its LUT and code costs;
- ``qps``: all queries in one batch, best of ``repeats`` (router included);
  ``qps_single``: the first ``qps_single`` queries searched one at a time.

Timing runs on the index's device with torch's current thread count (``threads``).
"""

from __future__ import annotations

import math
import time

import torch

from ._validate import InputError, check_matrix, check_positive_int, to_tensor
from .metrics import GroundTruth, evaluate_results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_search(fn, repeats: int, device: torch.device) -> float:
    """Best wall-clock seconds of ``fn()`` over ``repeats`` runs."""
    best = math.inf
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def parse_nprobes(text, n_lists: int | None = None) -> list[int]:
    """'1,2,4,8' (or a list) -> sorted distinct ints, each in [1, n_lists]."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"nprobe: expected comma-separated integers, got {text!r}") from None
    else:
        values = [int(v) for v in text]
    if not values:
        raise InputError("nprobe: no values given")
    for v in values:
        if v < 1:
            raise InputError(f"nprobe: {v} out of range, must be >= 1 (lists probed per query)")
        if n_lists is not None and v > n_lists:
            raise InputError(f"nprobe: {v} out of range [1, {n_lists}] (the index has {n_lists} lists)")
    return sorted(set(values))


def evaluate(
    index,
    queries,
    *,
    router="centroid",
    nprobes=(1, 2, 4, 8, 16),
    k: int = 10,
    gt: GroundTruth | None = None,
    scanner: str | None = None,
    reorder: int = 0,
    repeats: int = 3,
    qps_single: int = 200,
    label: str | None = None,
    probe_margin: float | None = None,
) -> list[dict]:
    """Quality, FLOPs and speed of ``index.search`` for every nprobe (see module docstring).
    ``probe_margin``: adaptive probing (``IVFIndex.search``); nprobe is then the most lists a
    query probes and ``lists_per_query`` the mean it did."""
    q = check_matrix(to_tensor(queries, "queries"), "queries", dim=index.d)
    if q.dtype != torch.float64:
        q = q.float()  # float64 queries stay exact: search scales them into fp32's range itself
    k = check_positive_int(k, "k")
    nprobes = parse_nprobes(nprobes, index.n_lists)
    keys = index.keys().cpu()
    if gt is None:
        gt = GroundTruth.compute(q, keys, k=k)
    if gt.scores.shape[0] != q.shape[0]:
        raise InputError(f"gt: ground truth for {gt.scores.shape[0]} queries, got {q.shape[0]} queries")
    rt = index.router(router)
    name = label or rt.describe()
    dev = index.device
    qd = q.to(dev)
    rows = []
    # only the ids are scored (re-scored in fp64 against the keys): float64 search scores
    # never refuse inputs whose scores float32 cannot hold
    opts = {"scanner": scanner, "reorder": reorder, "probe_margin": probe_margin, "score_dtype": "float64"}
    for nprobe in nprobes:
        scores, ids, info = index.search(qd, k, nprobe, rt, return_info=True, **opts)
        quality = evaluate_results(q, keys, ids.cpu(), gt, k=k)
        row = {
            "router": name,
            "scanner": info.scanner,
            "nprobe": nprobe,
            "reorder": int(reorder),
            "probe_margin": probe_margin,
            "lists_per_query": float((info.lists >= 0).sum(1).double().mean()) if q.shape[0] else 0.0,
            **quality,
            "keys_scanned_per_query": info.keys_scanned_per_query,
            "router_flops_per_query": info.router_flops_per_query,
            "scan_flops_per_query": info.scan_flops_per_query,
            "flops_per_query": info.flops_per_query,
        }
        if repeats > 0:
            secs = time_search(lambda nprobe=nprobe: index.search(qd, k, nprobe, rt, **opts), repeats, dev)
            row["qps"] = q.shape[0] / secs
        if qps_single > 0:
            m = min(qps_single, q.shape[0])

            def one_at_a_time(nprobe=nprobe, m=m):
                for i in range(m):
                    index.search(qd[i : i + 1], k, nprobe, rt, **opts)

            row["qps_single"] = m / time_search(one_at_a_time, 1, dev)
        row["device"] = str(dev)
        row["threads"] = torch.get_num_threads()
        row["n_queries"] = int(q.shape[0])
        rows.append(row)
    return rows


def format_table(rows: list[dict], columns=None) -> str:
    """A plain-text table of evaluation rows."""
    columns = columns or [
        ("router", "router", "{}"),
        ("nprobe", "nprobe", "{}"),
        ("lists_per_query", "lists/q", "{:.2f}"),
        ("match_at_1", "match@1", "{:.3f}"),
        ("recall_at_10", "recall@10", "{:.3f}"),
        ("mrr", "MRR", "{:.3f}"),
        ("flops_per_query", "MFLOP/q", "{:.3f}"),
        ("qps", "QPS batch", "{:,.0f}"),
        ("qps_single", "QPS 1-by-1", "{:,.0f}"),
    ]
    head = [title for _, title, _ in columns]
    body = []
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            if v is None:
                line.append("-")
            elif key == "flops_per_query":
                line.append(fmt.format(v / 1e6))
            else:
                line.append(fmt.format(v))
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(out)


def pareto_front(points, *, larger_x_better: bool) -> list:
    """The points (x, y, ...) not dominated by another (better or equal x AND higher y),
    sorted by x ascending: the curve a user can actually choose from."""
    ordered = sorted(points, key=lambda p: (-p[0], -p[1]) if larger_x_better else (p[0], -p[1]))
    front, best = [], -math.inf
    for p in ordered:
        if p[1] > best:
            front.append(p)
            best = p[1]
    return sorted(front, key=lambda p: p[0])


def _compact_number(v: float, _pos=None) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def plot_results(rows: list[dict], path, title: str = "") -> str:
    """match@1 against FLOPs per query and against queries per second, one Pareto curve
    per router (each point labelled with its nprobe; dominated points hollow); saves a PNG.
    Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("router", "?"), []).append(r)
    panels = [("flops_per_query", 1e-6, False, "MFLOP per query (router + scan), log scale")]
    if any("qps" in r for r in rows):
        panels.append(("qps", 1.0, True, "queries per second (one batch), log scale"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    axes = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    handles = []
    for gi, (name, rs) in enumerate(groups.items()):
        colour, marker = colours[gi % len(colours)], markers[gi % len(markers)]
        for ax, (key, scale, larger_better, _) in zip(axes, panels):
            pts = [(r[key] * scale, r["match_at_1"], r.get("nprobe")) for r in rs if r.get(key)]
            if not pts:
                continue
            front = pareto_front(pts, larger_x_better=larger_better)
            (line,) = ax.plot([p[0] for p in front], [p[1] for p in front], "-", marker=marker,
                              color=colour, label=name, markersize=5, linewidth=1.6)
            hidden = [p for p in pts if p not in front]
            if hidden:
                ax.plot([p[0] for p in hidden], [p[1] for p in hidden], linestyle="none",
                        marker=marker, markerfacecolor="none", color=colour, markersize=5, alpha=0.6)
            for x, y, nprobe in pts:
                if nprobe is not None:
                    ax.annotate(str(nprobe), (x, y), textcoords="offset points", xytext=(4, -9),
                                fontsize=7, color=colour)
            if ax is axes[0]:
                handles.append(line)
    for ax, (_, _, _, xlabel) in zip(axes, panels):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_compact_number))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("match@1 (exact top-1 found)")
        ax.grid(True, which="major", alpha=0.3)
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], loc="lower center",
                   ncol=min(len(handles), 4), frameon=False, fontsize=9)
    fig.suptitle((title + "\n" if title else "") + "numbers on points: lists probed (nprobe)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
