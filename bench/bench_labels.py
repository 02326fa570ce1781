"""How fast are exact labels? amips vs torch matmul + max vs faiss IndexFlatIP (k = 1).

One run, providers side by side on the same data and machine:
- ``amips``: certified-exact top-1 (`amips.exact_top1`): Triton screening on GPU, the
  bf16/fp32 torch/faiss screen on CPU; fp64-refined, so its answers equal the fp64 oracle.
- ``torch-fp32`` (and ``torch-tf32`` on GPU): matmul in chunks + running max (not certified).
- ``faiss-flat``: faiss IndexFlatIP k = 1 (faiss-cpu; faiss-gpu where installed).

Reports query-key pairs/s, effective TFLOP/s (2 nq nk d / time), the ratio to this device's
measured matmul ceiling at the provider's precision, peak memory (CPU: resident memory above
the loaded data, sampled every 2 ms; GPU: torch's peak allocation) and the fraction of queries
whose answer equals the fp64 oracle (tie-aware). Data: ``../shared/data/wordnet`` (117,659
keys x 384, 10,000 test queries); on GPU also a synthetic scale-up (nq = 256k, nk = 4M).

    python bench/bench_labels.py            # full run
    python bench/bench_labels.py --quick    # 2,000 queries, one repeat
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, OUT, device_name, git_sha, write_csv  # noqa: E402


# ---------------------------------------------------------------- providers
def run_amips(queries, keys, device):
    import amips

    if device == "cuda":
        q = torch.from_numpy(queries).cuda()
        k = torch.from_numpy(keys).cuda()
        s, i = amips.exact_top1(q, k)
        torch.cuda.synchronize()
        return i.cpu().numpy()
    return amips.exact_top1(queries, keys)[1].numpy()


def run_torch(queries, keys, device, tf32=False, block_q=10_000, block_k=4096):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    q_all = torch.from_numpy(queries).to(device)
    k_all = torch.from_numpy(keys).to(device)
    out = []
    for a in range(0, q_all.shape[0], block_q):
        q = q_all[a : a + block_q]
        best = torch.full((q.shape[0],), -float("inf"), device=device)
        arg = torch.zeros(q.shape[0], dtype=torch.int64, device=device)
        for b in range(0, k_all.shape[0], block_k):
            m, j = (q @ k_all[b : b + block_k].T).max(1)
            better = m > best
            best = torch.where(better, m, best)
            arg = torch.where(better, j + b, arg)
        out.append(arg)
    if device == "cuda":
        torch.cuda.synchronize()
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.cat(out).cpu().numpy()


def run_faiss(queries, keys, device):
    import faiss

    index = faiss.IndexFlatIP(keys.shape[1])
    if device == "cuda":
        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError("faiss-gpu is not installed")
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(keys)
    return index.search(queries, 1)[1][:, 0].astype(np.int64)


PROVIDERS = {
    "amips": (run_amips, "amips"),
    "torch-fp32": (lambda q, k, dev: run_torch(q, k, dev, tf32=False), "fp32"),
    "torch-tf32": (lambda q, k, dev: run_torch(q, k, dev, tf32=True), "tf32"),
    "faiss-flat": (run_faiss, "fp32"),
}


class RssSampler:
    """Peak resident memory above the level at entry, sampled every 2 ms (CPU runs)."""

    def __init__(self):
        self.extra_bytes = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self.rss())
            self._stop.wait(0.002)

    def __enter__(self):
        import threading

        self._base = self._peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.rss())
        self.extra_bytes = max(self.extra_bytes, self._peak - self._base)


def _child(name, spec, device, repeats, threads, conn):
    """Run one provider in a fresh process (loading the data itself) so that its peak memory
    above the loaded data is its own."""
    torch.set_num_threads(threads)
    _, queries, keys, _ = load_spec(spec)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    fn = PROVIDERS[name][0]
    sampler = RssSampler()
    times = []
    result = None
    try:
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            with sampler:
                result = fn(queries, keys, device)
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else sampler.extra_bytes
        conn.send(("ok", min(times), result, peak))
    except Exception as exc:  # a provider that cannot run here is reported, not fatal
        conn.send(("error", repr(exc), None, 0))


def measure(name, spec, device, repeats, threads):
    if device == "cuda":  # GPU peak memory is measured by torch; run in this process
        class Pipe:
            def send(self, x):
                self.x = x
        pipe = Pipe()
        _child(name, spec, device, repeats, threads, pipe)
        return pipe.x
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(name, spec, device, repeats, threads, child))
    proc.start()
    msg = parent.recv()
    proc.join()
    return msg


def matmul_ceiling(device, precision, d, threads):
    """Measured dense matmul rate (TFLOP/s) for a label-shaped product on this device."""
    torch.set_num_threads(threads)
    m, n = (4096, 16384) if device == "cpu" else (16384, 65536)
    dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}[precision]
    a = torch.randn(m, d, device=device).to(dtype)
    b = torch.randn(n, d, device=device).to(dtype)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if device == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: a @ b.T)
        sec = ms / 1e3
    else:
        a @ b.T
        sec = min(_timed(lambda: a @ b.T) for _ in range(3))
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * m * n * d / sec / 1e12


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def exact_fraction(pred, queries, keys, gt_score):
    """Fraction of queries whose returned key's fp64 score equals the fp64 best (tie-aware)."""
    got = np.einsum("ij,ij->i", queries.astype(np.float64), keys[pred].astype(np.float64))
    return float(np.mean(np.abs(got - gt_score) <= 1e-9 * np.abs(gt_score)))


def load_spec(spec):
    kind, args = spec
    return load_wordnet(*args) if kind == "wordnet" else synthetic_scale(*args)


def load_wordnet(quick):
    root = DATA / "wordnet"
    keys = np.load(root / "keys.npy").astype(np.float32)
    queries = np.load(root / "queries_test.npy").astype(np.float32)
    gt_score = np.load(root / "gt_test_top1_score.npy")
    if quick:
        queries, gt_score = queries[:2000], gt_score[:2000]
    return "wordnet", queries, keys, gt_score


def synthetic_scale(nq, nk, d, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((nk, d), dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = rng.standard_normal((nq, d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return f"synthetic-{nq}x{nk}", queries, keys, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--providers", default="amips,torch-fp32,torch-tf32,faiss-flat")
    args = parser.parse_args(argv)
    device = args.device
    repeats = args.repeats or (1 if args.quick else 3)
    OUT.mkdir(parents=True, exist_ok=True)
    sha = git_sha()

    specs = []
    if (DATA / "wordnet").is_dir():
        specs.append(("wordnet", (args.quick,)))
    else:
        print("../shared/data/wordnet not found; using a synthetic set of the same shape")
        specs.append(("synthetic", (2000 if args.quick else 10_000, 117_659, 384)))
    if device == "cuda":
        specs.append(("synthetic", (16_384 if args.quick else 262_144,
                                    262_144 if args.quick else 4_194_304, 384)))

    providers = [p for p in args.providers.split(",") if p]
    if device == "cpu":
        providers = [p for p in providers if p != "torch-tf32"]
    ceilings = {}
    for precision in ("fp32", "bf16") + (("tf32",) if device == "cuda" else ()):
        ceilings[precision] = matmul_ceiling(device, precision, 384, args.threads)
    from amips.labels import resolve_precision

    amips_precision = resolve_precision("auto", torch.device(device))
    rows = []
    table = []
    for spec in specs:
        name, queries, keys, gt_score = load_spec(spec)
        nq, nk, d = queries.shape[0], keys.shape[0], keys.shape[1]
        if gt_score is None and nq * nk <= 2e10:
            import amips

            gt_score = amips.exact_top1(queries, keys)[0].double().numpy()
        for prov in providers:
            status, sec, pred, peak = measure(prov, spec, device, repeats, args.threads)
            if status != "ok":
                print(f"{prov}: skipped ({sec})")
                continue
            precision = PROVIDERS[prov][1]
            if precision == "amips":
                precision = amips_precision
            tflops = 2 * nq * nk * d / sec / 1e12
            exact = exact_fraction(pred, queries, keys, gt_score) if gt_score is not None else float("nan")
            metrics = {
                "seconds": sec,
                "pairs_per_s": nq * nk / sec,
                "tflops": tflops,
                "ceiling_tflops": ceilings[precision],
                "ratio_to_ceiling": tflops / ceilings[precision],
                "peak_mem_mb": peak / 2**20,
                "exact_fraction": exact,
            }
            for metric, value in metrics.items():
                rows.append({"bench": "labels", "provider": prov, "dataset": name, "nq": nq, "nk": nk,
                             "d": d, "precision": precision, "metric": metric, "value": value,
                             "device": device_name(device), "git_sha": sha})
            table.append((name, prov, precision, sec, tflops, metrics["ratio_to_ceiling"],
                          metrics["peak_mem_mb"], exact))

    csv_path = write_csv(rows, OUT / f"labels_{device}.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{t[0]}\n{t[1]}" for t in table]
        ax.barh(labels, [t[4] for t in table], color=["C0" if t[1] == "amips" else "C7" for t in table])
        ax.set_xlabel("effective TFLOP/s (2 nq nk d / time)")
        ax.set_title(f"exact top-1 labels on {device_name(device)[:40]}")
        fig.tight_layout()
        fig.savefig(OUT / f"labels_{device}.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")

    print("\nceilings (measured matmul, TFLOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in ceilings.items()))
    print(f"device: {device_name(device)}; commit {sha}; CSV {csv_path}")
    print(f"{'dataset':<22} {'provider':<11} {'prec':<5} {'time s':>8} {'TFLOP/s':>8} {'/ceil':>6} {'peak MB':>8} {'exact':>7}")
    for t in table:
        print(f"{t[0]:<22} {t[1]:<11} {t[2]:<5} {t[3]:8.3f} {t[4]:8.3f} {t[5]:6.2f} {t[6]:8.0f} {t[7]:7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
