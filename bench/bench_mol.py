"""How much faster than exact, and at what recall, are the MoL top-k methods?

For each method of ``amips.mol.topk`` and a sweep of its parameters: recall@k of the
``exact`` top-k, the share of queries whose exact top-1 is returned, and the latency of one
batch of queries, side by side with ``exact`` and ``bound`` in the same process (providers
interleaved round by round, best of ``--repeats``).

The item set is scaled to ``--items`` (default 2^20) from a trained model's item
representations by a Gaussian kernel density draw (a random trained item plus Gaussian noise
with ``--kde-scale`` times the items' covariance), so the trained query side and gating see
items distributed like the trained ones. The model: ``--model DIR`` (a run folder of
``amips mol train``; queries are its users' test-time representations), or else an MoL head
trained here for a few hundred steps on a synthetic multi-interest task (users with several
topics, items from one topic), so that the gate is trained, not random.

    python bench/bench_mol.py --quick            # 65k items, a few minutes
    python bench/bench_mol.py                    # 1M items
    python bench/bench_mol.py --model runs/ml-mol

Writes bench/out/mol.csv (long format), bench/out/mol.png (recall vs latency), prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import amips.mol as am  # noqa: E402
from bench._common import OUT, device_name, git_sha, write_csv  # noqa: E402

# --- a briefly trained head on a synthetic multi-interest task --------------------------------

class Synthetic:
    """Users with ``interests`` topics; items from one topic; a user's positives come from
    its topics. Representations are noisy topic embeddings (64-d)."""

    def __init__(self, d=64, topics=256, interests=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.g, self.d, self.topics, self.interests = g, d, topics, interests
        self.item_topic_emb = torch.randn(topics, d, generator=g)
        self.user_topic_emb = torch.randn(topics, d, generator=g)

    def items(self, n):
        topic = torch.randint(0, self.topics, (n,), generator=self.g)
        return self.item_topic_emb[topic] + 0.5 * torch.randn(n, self.d, generator=self.g), topic

    def users(self, n):
        topics = torch.randint(0, self.topics, (n, self.interests), generator=self.g)
        w = torch.rand(n, self.interests, generator=self.g) + 0.5
        rep = (w[..., None] * self.user_topic_emb[topics]).sum(1) / self.interests
        return rep + 0.3 * torch.randn(n, self.d, generator=self.g), topics


def train_synthetic_head(steps: int, batch: int = 256, seed: int = 0, log=print):
    torch.manual_seed(seed)
    task = Synthetic(seed=seed)
    items, item_topic = task.items(20000)
    by_topic = [torch.nonzero(item_topic == t).flatten() for t in range(task.topics)]
    head = am.MoL(task.d, task.d, 8, 4, 64, tau=0.05, gate_hidden=128, gate_dropout=0.2)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)
    t0 = time.time()
    for step in range(steps):
        users, topics = task.users(batch)
        pick = topics[torch.arange(batch), torch.randint(0, task.interests, (batch,))]
        pos = torch.stack([by_topic[int(t)][torch.randint(0, len(by_topic[int(t)]), (1,))][0]
                           for t in pick])
        neg = torch.randint(0, items.shape[0], (128,))
        cand = torch.cat([items[pos], items[neg]])
        logits, gates = head(users, cand, grid=True, return_gates=True)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(batch))
        loss = loss + 1e-3 * am.MoL.load_balancing_loss(gates)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  synthetic head step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    head.eval()
    queries, _ = task.users(4096)
    return head, items, queries


def kde_items(items: torch.Tensor, n: int, scale: float, seed: int = 0) -> torch.Tensor:
    """n draws: a random row of ``items`` plus N(0, scale * Cov(items))."""
    g = torch.Generator().manual_seed(seed)
    x = items.double()
    cov = torch.cov(x.T) * scale
    chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(cov.shape[0], dtype=cov.dtype))
    out = torch.empty(n, items.shape[1])
    for a in range(0, n, 1 << 16):
        b = min(n, a + (1 << 16))
        base = x[torch.randint(0, x.shape[0], (b - a,), generator=g)]
        out[a:b] = (base + torch.randn(b - a, x.shape[1], generator=g, dtype=x.dtype) @ chol.T).float()
    return out


def load_model(path: str, nq: int):
    if not hasattr(am, "load"):
        raise SystemExit("bench_mol: --model needs amips.mol.load (the recommender, branch issue-10b)")
    try:
        rec = am.load(path)
    except ValueError as exc:  # amips.InputError: a folder that is not a finished run
        raise SystemExit(f"bench_mol: error: {exc}") from None
    head, _, _ = rec.topk_target()
    users = rec.user_ids[:nq]
    item_repr = rec.item_repr() if callable(rec.item_repr) else rec.item_repr
    return head, item_repr.detach().float(), rec.encode_users(users).detach().float(), rec


# --- the sweep ----------------------------------------------------------------------------

def providers(quick: bool, n_items: int, trained: bool = False):
    nlist = max(64, int(round(math.sqrt(n_items))))
    if trained:  # the trained MovieLens head: sweeps around where recall reaches .99
        out = [("exact", {"backend": "torch"}),
               ("bound", {"lists": "max_logit"}),
               ("per_embedding", {"kprime": 16, "search": "mm"}),
               ("per_embedding", {"kprime": 64, "search": "mm"}),
               ("per_embedding", {"kprime": 256, "search": "mm"})]
        out += [("averaged", {"kprime_avg": kp, "search": "mm"}) for kp in (32, 64, 128, 256, 1024, 4096)]
        out += [("averaged", {"kprime_avg": kp, "search": "ivf", "nlist": nlist, "nprobe": npr})
                for kp, npr in ((128, 16), (128, 64), (256, 16), (256, 64), (256, 128), (256, 256),
                                (1024, 128))]
        out += [("combined", {"kprime": 16, "kprime_avg": 128, "search": "mm"})]
        if quick:
            out = [p for p in out if p[1].get("kprime_avg", 0) <= 1024]
            out += [("bound", {"lists": "per_pair", "kprime": 128, "search": "mm"})]
        return out
    out = [("exact", {"backend": "torch"}),
           ("bound", {"lists": "max_logit"}),
           ("per_embedding", {"kprime": 16, "search": "mm"}),
           ("per_embedding", {"kprime": 128, "search": "mm"}),
           ("averaged", {"kprime_avg": 1024, "search": "mm"}),
           ("averaged", {"kprime_avg": 4096, "search": "mm"}),
           ("averaged", {"kprime_avg": 16384, "search": "mm"}),
           ("averaged", {"kprime_avg": 4096, "search": "ivf", "nlist": nlist, "nprobe": 16}),
           ("averaged", {"kprime_avg": 16384, "search": "ivf", "nlist": nlist, "nprobe": 64}),
           ("combined", {"kprime": 32, "kprime_avg": 4096, "search": "mm"})]
    if quick:  # small item set: also the paper's per-pair bound and per-component IVF
        out = [p for p in out if p[1].get("kprime_avg", 0) <= 4096]
        out += [("bound", {"lists": "per_pair", "kprime": 128, "search": "mm"}),
                ("per_embedding", {"kprime": 32, "search": "ivf", "nlist": nlist, "nprobe": 8})]
    return out


def label(method, params):
    keep = {k: v for k, v in params.items() if k not in ("backend",)}
    return method + ("(" + ",".join(f"{k}={v}" for k, v in keep.items()) + ")" if keep else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a run folder of `amips mol train` (default: synthetic head)")
    ap.add_argument("--items", type=int, default=1 << 20)
    ap.add_argument("--queries", type=int, default=16, help="queries per batch")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150, help="synthetic head training steps")
    ap.add_argument("--kde-scale", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="65k items, 8 queries, 1 repeat")
    ap.add_argument("--out", default=str(OUT / "mol"))
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.queries, args.repeats, args.steps = 1 << 16, 8, 1, min(args.steps, 60)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.model:
        head, item_repr, queries, _ = load_model(args.model, args.queries)
        source = f"model {args.model}"
    else:
        head, item_repr, queries = train_synthetic_head(args.steps)
        queries = queries[: args.queries]
        source = f"synthetic head ({args.steps} steps)"
    items = kde_items(item_repr, args.items, args.kde_scale)
    cache = head.item_cache(items)
    print(f"load average: {os.getloadavg()}")
    print(f"model: {source}; {args.items} items (KDE scale {args.kde_scale}), {queries.shape[0]} "
          f"queries/batch, k={args.k}; setup {time.time() - t0:.0f} s", flush=True)
    qp = head.query_parts(queries)
    provs = providers(args.quick, args.items, trained=bool(args.model))
    # Warm-up: builds the per-method structures (IVF indexes, fp32 key copies) outside timing.
    build = {}
    for method, params in provs:
        t = time.perf_counter()
        am.topk(head, qp.take(slice(0, 1)), args.k, method, items=cache, **params)
        build[label(method, params)] = time.perf_counter() - t
    results: dict[str, dict] = {}
    for rep in range(args.repeats):
        for method, params in provs:
            name = label(method, params)
            t = time.perf_counter()
            s, i, st = am.topk(head, qp, args.k, method, items=cache, return_stats=True, **params)
            dt = time.perf_counter() - t
            r = results.setdefault(name, {"method": method, "params": params, "seconds": []})
            r["seconds"].append(dt)
            r["ids"], r["scores"], r["stats"] = i, s, st
            print(f"  round {rep} {name}: {dt:.2f} s", flush=True)
    exact = results[label("exact", {"backend": "torch"})]
    rows, table = [], []
    ex_ids = exact["ids"]
    ex_best = min(exact["seconds"])
    for name, r in results.items():
        ids = r["ids"]
        hits = [len(set(ids[q].tolist()) & set(ex_ids[q].tolist())) / args.k for q in range(ids.shape[0])]
        recall = sum(hits) / len(hits)
        top1 = sum(int(ex_ids[q, 0]) in set(ids[q].tolist()) for q in range(ids.shape[0])) / ids.shape[0]
        equal = bool(torch.equal(ids, ex_ids) and torch.equal(r["scores"], exact["scores"]))
        best = min(r["seconds"])
        base = {"bench": "mol", "provider": name, "method": r["method"], "items": args.items,
                "queries": queries.shape[0], "k": args.k, "model": source, "device": device_name("cpu"),
                "git_sha": git_sha()}
        for metric, value in (("seconds_per_batch", best), ("recall_at_k", recall), ("top1_returned", top1),
                              ("equals_exact", float(equal)), ("speedup_vs_exact", ex_best / best),
                              ("items_scored_per_query", r["stats"].get("items_scored", float("nan"))),
                              ("warmup_seconds", build[name]),
                              ("items_passing_bound", r["stats"].get("items_passing_bound", float("nan")))):
            rows.append({**base, "metric": metric, "value": value})
        table.append((name, best, ex_best / best, recall, top1, equal, r["stats"].get("items_scored"),
                      r["stats"].get("items_passing_bound")))
    out = Path(args.out)
    write_csv(rows, out.with_suffix(".csv"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        groups: dict[str, list] = {}
        for name, best, _, recall, _, _, _, _ in table:
            r = results[name]
            key = r["method"] + (f" ({r['params']['search']})" if "search" in r["params"] else "")
            short = ",".join(f"{k}={v}" for k, v in r["params"].items()
                             if k in ("kprime", "kprime_avg", "nprobe"))
            groups.setdefault(key, []).append((best * 1000 / queries.shape[0], recall, short))
        for key, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            for x, y, short in pts:
                if short:
                    ax.annotate(short, (x, y), fontsize=5, xytext=(3, -6), textcoords="offset points")
        ax.legend(fontsize=7, loc="lower left")
        ax.set_xscale("log")
        ax.set_xlabel(f"ms per query (batch of {queries.shape[0]}, CPU, best of {args.repeats})")
        ax.set_ylabel(f"recall@{args.k} of exact")
        ax.set_title(f"MoL top-{args.k}, {args.items} items ({source})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        print("(matplotlib missing: no PNG)")
    print(f"\n| provider | s/batch | speed-up vs exact | recall@{args.k} | exact top-1 returned | "
          "equals exact | items scored/query | items passing the bound/query |")
    print("|---|---|---|---|---|---|---|---|")
    for name, best, sp, recall, top1, equal, scored, passing in sorted(table, key=lambda t: -t[1]):
        sc = f"{scored:.0f}" if scored is not None else "-"
        ps = f"{passing:.0f} ({passing / args.items:.1%})" if passing is not None else "-"
        print(f"| {name} | {best:.3f} | {sp:.1f}x | {recall:.3f} | {top1:.3f} | {'yes' if equal else 'no'} "
              f"| {sc} | {ps} |")
    print(f"load average at the end: {os.getloadavg()}")
    print(f"\nwrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
