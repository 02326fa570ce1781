"""Does amips scale out? Labels and training at 1 and 2 torchrun ranks against one rank.

Every configuration is a real ``torchrun`` (or plain ``python -m amips``) launch of the CLI,
each process with ONE thread (``OMP_NUM_THREADS=1``), gloo on CPU. Configurations are
interleaved within each repeat (the same machine load for all) and the best of the
repeats is kept; the 1-minute load average is recorded next to every figure.

- **labels, weak scaling** (``labels``): 2,000 WordNet test queries against a key set that
  fills every rank: 1 rank x 58,829 keys vs 2 ranks x 58,829 keys (all 117,658), top-1.
  Throughput = query-key pairs / s from ``labels.json`` (the job's own clock: screening,
  certification, the rank-0 merge and the writes; not the process start-up). Per-rank
  throughput = throughput / ranks, against the one-rank figure.
- **labels, strong scaling** (``labels-strong``): the same 117,658 keys on 1 rank vs 2.
- **training** (``train``): KeyNet (width 256, depth 3) on 20,000 WordNet train queries with
  precomputed labels, 256 queries per rank per step (global batch 256 x ranks), no noise;
  samples / s over steps 10..N from ``metrics.jsonl`` (the run's own clock).
- **bit-for-bit check** (``--check``): ``amips labels`` with 2 ranks vs 1 process on real
  data (SciFact: all 1,109 queries x 5,183 keys; WordNet: 2,000 test queries x 117,659
  keys), top-1, top-10 and per-partition (64 k-means lists): every output file compared
  byte for byte.

    python bench/bench_scale.py              # throughput (3 repeats) and the check
    python bench/bench_scale.py --quick      # 1 repeat, smaller sets
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, OUT, ROOT, device_name, git_sha, write_csv  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def amips_cmd(ranks: int, args: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "amips", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-port", str(_port()), "-m", "amips", *args]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_scale: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def labels_run(ranks: int, keys: Path, queries: Path, out: Path, extra=()) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    run(amips_cmd(ranks, ["labels", "--keys", str(keys), "--queries", str(queries), "--out", str(out),
                          "--quiet", *extra]))
    manifest = json.loads((out / "labels.json").read_text())
    pairs = manifest["n_queries"] * manifest["n_keys"]
    return {"seconds": manifest["seconds_last_run"], "pairs_per_s": pairs / manifest["seconds_last_run"],
            "load_1min": round((load0 + os.getloadavg()[0]) / 2, 2), "world_size": manifest.get("world_size", 1)}


def labels_cpu_run(ranks: int, keys: Path, queries: Path, out: Path) -> dict:
    """The same job through :func:`driver`: every rank's CPU seconds inside the job, so the
    pairs per CPU-second of a rank show the distributed overhead apart from the scheduler."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--driver", str(keys), str(queries), str(out)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(_port()), *cmd[1:]]
    run(cmd)
    per = [json.loads((out / f"cpu_rank{r}.json").read_text()) for r in range(ranks)]
    manifest = json.loads((out / "labels.json").read_text())
    pairs_rank = manifest["n_queries"] * manifest["n_keys"] / ranks
    return {"pairs_per_cpu_s_per_rank": min(pairs_rank / p["cpu_s"] for p in per),
            "cpu_s": [round(p["cpu_s"], 2) for p in per]}


def driver(keys: str, queries: str, out: str) -> None:
    """One rank of :func:`labels_cpu_run` (run by torchrun or alone)."""
    from amips import distributed
    from amips.labels import run_label_job

    with distributed.session("cpu"):
        c0 = time.process_time()
        run_label_job(keys, queries, out, progress=False)
        cpu = time.process_time() - c0
        Path(out, f"cpu_rank{distributed.rank()}.json").write_text(json.dumps({"cpu_s": cpu}))


def train_run(ranks: int, work: Path, steps: int, per_rank_batch: int) -> dict:
    out = work / f"train_{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    run(amips_cmd(ranks, ["train", "--keys", str(work / "keys.npy"), "--queries", str(work / "tq.npy"),
                          "--labels", str(work / "tlabels"), "--out", str(out), "--model", "keynet",
                          "--width", "256", "--depth", "3", "--steps", str(steps), "--batch-size",
                          str(per_rank_batch * ranks), "--noise", "0", "--eval-every", str(steps),
                          "--checkpoint-every", str(steps), "--quiet", "--device", "cpu"]))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    t = {r["step"]: r["elapsed_s"] for r in rows if r["split"] == "train"}
    secs = t[steps] - t[10]
    samples = (steps - 10) * per_rank_batch * ranks
    return {"seconds": secs, "samples_per_s": samples / secs,
            "load_1min": round((load0 + os.getloadavg()[0]) / 2, 2)}


def prepare(work: Path, n_queries: int, n_train: int) -> dict:
    wn = DATA / "wordnet"
    keys = np.load(wn / "keys.npy").astype(np.float32)
    n = keys.shape[0] // 2 * 2
    np.save(work / "keys.npy", keys[:n])
    np.save(work / "keys_half.npy", keys[: n // 2])
    np.save(work / "q.npy", np.load(wn / "queries_test.npy")[:n_queries].astype(np.float32))
    np.save(work / "tq.npy", np.load(wn / "queries_train.npy")[:n_train].astype(np.float32))
    return {"n_keys": n, "n_queries": n_queries}


def throughput(work: Path, repeats: int, steps: int, only=()) -> list[dict]:
    from amips.labels import run_label_job

    if not only or "train" in only:
        run_label_job(work / "keys.npy", work / "tq.npy", work / "tlabels", progress=False)
    best: dict[str, dict] = {}
    plan = [("labels", 1, "keys_half.npy"), ("labels", 2, "keys.npy"),
            ("labels-strong", 1, "keys.npy"), ("labels-strong", 2, "keys.npy"),
            ("labels-cpu", 1, "keys_half.npy"), ("labels-cpu", 2, "keys.npy"),
            ("train", 1, None), ("train", 2, None)]
    if only:
        plan = [p for p in plan if p[0] in only]
    for rep in range(repeats):
        for bench, ranks, keys in plan:
            if bench == "train":
                res = train_run(ranks, work, steps, 256)
                metric = "samples_per_s"
            elif bench == "labels-cpu":
                res = labels_cpu_run(ranks, work / keys, work / "q.npy", work / f"{bench}_{ranks}")
                res = {**res, "pairs_per_cpu_s": res["pairs_per_cpu_s_per_rank"] * ranks,
                       "seconds": float("nan"), "load_1min": round(os.getloadavg()[0], 2)}
                metric = "pairs_per_cpu_s"
            else:
                res = labels_run(ranks, work / keys, work / "q.npy", work / f"{bench}_{ranks}")
                metric = "pairs_per_s"
            key = f"{bench}-{ranks}"
            print(f"  repeat {rep + 1}: {key:16s} {res[metric]:,.0f} {metric} (load {res['load_1min']})", flush=True)
            if key not in best or res[metric] > best[key][metric]:
                best[key] = {**res, "metric": metric}
    rows = []
    for key, res in best.items():
        bench, ranks = key.rsplit("-", 1)
        ranks = int(ranks)
        one = best[f"{bench}-1"][res["metric"]]
        rows.append({"bench": bench, "ranks": ranks, "threads_per_rank": 1, "metric": res["metric"],
                     "value": res[res["metric"]], "per_rank": res[res["metric"]] / ranks,
                     "per_rank_vs_one_rank": res[res["metric"]] / ranks / one,
                     "seconds": res["seconds"], "load_1min": res["load_1min"]})
    return rows


def check(work: Path, wordnet_queries: int) -> list[dict]:
    """2 ranks vs 1 process on real data: every output byte-equal?"""
    import torch

    from amips.index.kmeans import kmeans

    rows = []
    sets = []
    sf = DATA / "scifact"
    if (sf / "keys.npy").exists():
        sets.append(("scifact", sf / "keys.npy", sf / "queries_test.npy"))
    if (DATA / "wordnet" / "keys.npy").exists():
        np.save(work / "wn_q_check.npy", np.load(DATA / "wordnet" / "queries_test.npy")[:wordnet_queries])
        sets.append(("wordnet", DATA / "wordnet" / "keys.npy", work / "wn_q_check.npy"))
    for name, keys, queries in sets:
        k = torch.from_numpy(np.load(keys).astype(np.float32))
        part = work / f"{name}_partitions.npy"
        _, assign = kmeans(k, 64, iters=10, seed=0, backend="torch", sample=256)
        np.save(part, assign.numpy().astype(np.int64))
        for what, extra in (("top1", []), ("top10", ["--topk", "10"]),
                            ("per-partition", ["--partitions", str(part)])):
            outs = []
            for ranks in (1, 2):
                out = work / f"check_{name}_{what}_{ranks}"
                labels_run(ranks, keys, queries, out, extra)
                outs.append(out)
            files = sorted(p.name for p in outs[0].glob("*.npy"))
            equal = all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)
            rows.append({"bench": "check", "data": name, "output": what, "files": " ".join(files),
                         "byte_equal": equal})
            print(f"  check {name:8s} {what:14s} {'EQUAL' if equal else 'DIFFERENT'} ({', '.join(files)})", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in ("labels", "labels-strong", "labels-cpu", "train") if any(r["bench"] == b for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.35
    for j, ranks in enumerate((1, 2)):
        vals = [next((r["per_rank_vs_one_rank"] for r in rows if r["bench"] == b and r["ranks"] == ranks), 0)
                for b in benches]
        ax.bar(np.arange(len(benches)) + (j - 0.5) * width, vals, width, label=f"{ranks} rank(s) x 1 thread")
    ax.axhline(0.9, color="gray", ls="--", lw=1, label="target 0.9")
    ax.set_xticks(np.arange(len(benches)), benches)
    ax.set_ylabel("per-rank throughput / one rank")
    ax.set_title("amips on torchrun (gloo, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated benches (labels,labels-strong,labels-cpu,train)")
    ap.add_argument("--driver", nargs=3, metavar=("KEYS", "QUERIES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        return driver(*args.driver)
    if not (DATA / "wordnet" / "keys.npy").exists():
        raise SystemExit("bench_scale: needs ../shared/data/wordnet")
    repeats = 1 if args.quick else args.repeats
    work = Path(tempfile.mkdtemp(prefix="amips_scale_"))
    meta = {"device": device_name("cpu"), "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = []
    try:
        prepare(work, 500 if args.quick else 2000, 5000 if args.quick else 20000)
        if not args.no_throughput:
            rows += throughput(work, repeats, 30 if args.quick else 60, [b for b in args.only.split(',') if b])
        if not args.no_check:
            rows += check(work, 500 if args.quick else 2000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [{**r, **meta} for r in rows]
    OUT.mkdir(parents=True, exist_ok=True)
    stem = "scale" + ("_" + args.only.replace(",", "_") if args.only else "")
    write_csv(rows, OUT / f"{stem}.csv")
    perf = [r for r in rows if r["bench"] != "check"]
    if perf:
        plot(perf, OUT / f"{stem}.png")
    print(f"\n{meta['device']}, {meta['git_sha']}, {meta['date']}, load average now {os.getloadavg()[0]:.1f}")
    print(f"{'bench':14s} {'ranks':>5s} {'throughput':>16s} {'per rank':>14s} {'per rank / 1':>12s} {'load':>6s}")
    for r in perf:
        print(f"{r['bench']:14s} {r['ranks']:5d} {r['value']:16,.0f} {r['per_rank']:14,.0f} "
              f"{r['per_rank_vs_one_rank']:12.3f} {r['load_1min']:6.1f}")
    for r in rows:
        if r["bench"] == "check":
            print(f"check {r['data']:8s} {r['output']:14s} byte-equal: {r['byte_equal']}")
    print(f"wrote {OUT / (stem + '.csv')}" + (f", {OUT / (stem + '.png')}" if perf else ""))


if __name__ == "__main__":
    main()
