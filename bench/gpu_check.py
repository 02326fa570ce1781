"""Does amips work, and how fast, on this GPU? One command, under 8 minutes.

    python bench/gpu_check.py --out DIR            # on a CUDA machine
    python bench/gpu_check.py --out DIR --cpu-smoke  # same code path, tiny shapes, CPU + interpreter

Needs only torch, Triton and numpy (no faiss, no ScaNN). Steps, each timed with
``triton.testing.do_bench`` (median) on CUDA, one timed call in the smoke mode:

1. ``pytest -m gpu``: the GPU-marked tests.
2. Certified-exact top-1 labels through ``amips.exact_top1`` at nq 65,536 x nk 4,194,304 x
   d 384 (fp32 inputs): TFLOP/s (2 nq nk d / time), checked against an fp64 oracle on a
   sample of queries, beside the same device's bf16 ``torch.mm`` ceiling and bf16
   ``torch.mm`` + row max over the same keys, measured in the same run.
3. One SupportNet training step (batch 4096, width 1024, depth 3, d 384, bf16 autocast):
   amips kernels vs torch eager vs ``torch.compile`` (where inductor runs it; a failure of
   torch.compile is recorded, not counted against amips).
4. ``amips.IVFIndex`` on 1M synthetic keys x 384 (1,000 lists): exact and PQ (96 x 4-bit,
   re-rank 100) search, nprobe swept; queries/s at the smallest nprobe whose match@1
   (tie-aware, against ``amips.exact_top1``) reaches 0.95.
5. The PQ scan kernel's code bandwidth as a share of the device's measured copy bandwidth.

Writes ``DIR/gpu_check.md`` (one table) and ``DIR/gpu_check.csv`` (long format), both with
the GPU name, driver, torch, Triton and commit. Every failed step and every entry of
``amips.kernels._backend.fallback_events()`` (a Triton kernel that fell back to torch) is a
failure: the exit status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Shapes of the GPU run and of the CPU smoke run (same code path).
GPU_SHAPES = {
    "labels": {"nq": 65_536, "nk": 4_194_304, "d": 384},
    "icnn": {"batch": 4096, "width": 1024, "depth": 3, "d": 384},
    "ivf": {"n_keys": 1_000_000, "n_queries": 20_000, "d": 384, "n_lists": 1000,
            "nprobe": (1, 2, 4, 8, 16, 32, 64, 128), "pq_subspaces": 96, "reorder": 100},
    "pq_bw": {"nq": 4096, "nprobe": 32},
    "copy_bytes": 1 << 30,
    "oracle_queries": 256,
}
SMOKE_SHAPES = {
    "labels": {"nq": 48, "nk": 3000, "d": 32},
    "icnn": {"batch": 16, "width": 16, "depth": 2, "d": 16},
    # the interpreter's tl.sort costs seconds per call: one query, two lists, one block
    "ivf": {"n_keys": 64, "n_queries": 5, "d": 16, "n_lists": 2,
            "nprobe": (1, 2), "pq_subspaces": 4, "reorder": 4},
    "pq_bw": {"nq": 1, "nprobe": 1},
    "copy_bytes": 1 << 20,
    "oracle_queries": 16,
}
TEST_TIMEOUT_S = 240


class Check:
    """Collects result rows and failures; times callables on the run's device."""

    def __init__(self, device: str, smoke: bool):
        self.device, self.smoke = device, smoke
        self.rows: list[dict] = []
        self.failures: list[str] = []

    def time(self, fn) -> float:
        """Seconds per call: do_bench median on CUDA, best of 3 wall clocks on CPU (one call in
        the smoke mode)."""
        if self.device == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median") / 1e3
        if not self.smoke:  # the smoke run times its single call (plumbing, not speed)
            fn()
        best = math.inf
        for _ in range(1 if self.smoke else 3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def row(self, bench: str, provider: str, metric: str, value, note: str = "", **params):
        self.rows.append({"bench": bench, "provider": provider, "metric": metric,
                          "value": value, "note": note, **params})

    def step(self, name: str, fn) -> None:
        from amips.kernels._backend import clear_fallback_events, fallback_events

        clear_fallback_events()
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a failed step is reported, not hidden
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            self.row(name, "-", "status", "FAILED", f"{type(exc).__name__}: {exc}"[:300])
            traceback.print_exc()
        for ev in fallback_events():
            self.failures.append(f"{name}: Triton kernel {ev['kernel']} fell back to torch "
                                 f"({ev['error']})")
            self.row(name, ev["kernel"], "fallback", 1, ev["error"][:300])
        print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)


# --------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------
def step_tests(chk: Check) -> None:
    targets = ["tests/test_pq_scan.py"] if chk.smoke else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *targets]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    chk.row("gpu tests", "pytest -m gpu", "summary", tail, f"{time.perf_counter() - t0:.0f} s")
    # pytest exit 5 = nothing selected; on a CPU machine the gpu tests are skipped
    if proc.returncode not in (0, 5):
        print(proc.stdout[-4000:], proc.stderr[-2000:])
        raise RuntimeError(f"pytest -m gpu failed: {tail}")


def step_labels(chk: Check, shp: dict) -> None:
    import torch

    import amips

    nq, nk, d = shp["labels"]["nq"], shp["labels"]["nk"], shp["labels"]["d"]
    dev = chk.device
    g = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn(nk, d, device=dev, generator=g)
    queries = torch.randn(nq, d, device=dev, generator=g)
    flops = 2.0 * nq * nk * d
    params = {"nq": nq, "nk": nk, "d": d}

    out = {}

    def labels():
        out["r"] = amips.exact_top1(queries, keys)

    t = chk.time(labels)
    chk.sync()
    scores, index = out["r"]
    chk.row("labels top-1", "amips.exact_top1 (certified)", "TFLOP/s", flops / t / 1e12, **params)
    chk.row("labels top-1", "amips.exact_top1 (certified)", "seconds", t, **params)
    # fp64 oracle on a sample of queries: score equal, index tie-aware
    n_or = min(nq, shp["oracle_queries"])
    qs = queries[:n_or].double()
    idx = index[:n_or].to(dev)
    best = torch.full((n_or,), -math.inf, dtype=torch.float64, device=dev)
    got = torch.full((n_or,), -math.inf, dtype=torch.float64, device=dev)
    step = 1 << 18
    for a in range(0, nk, step):  # the same fp64 products for the best and the returned key
        s64 = qs @ keys[a:a + step].double().T
        best = torch.maximum(best, s64.amax(1))
        inside = (idx >= a) & (idx < a + s64.shape[1])
        rows = inside.nonzero().flatten()
        got[rows] = s64[rows, idx[rows] - a]
    wrong = int((got < best).sum())  # tie-aware: any key scoring the best is right
    chk.row("labels top-1", "fp64 oracle", "queries wrong", wrong, f"{n_or} sampled", **params)
    if wrong:
        raise AssertionError(f"exact_top1 disagrees with the fp64 oracle on {wrong}/{n_or} queries")
    del scores
    # the device's bf16 ceiling and the plain bf16 mm + max at the same shape
    qb, kb = queries.bfloat16(), keys.bfloat16()
    chunk = min(nk, 16384)
    dst = torch.empty(nq, chunk, dtype=torch.bfloat16, device=dev)
    t_mm = chk.time(lambda: torch.mm(qb, kb[:chunk].T, out=dst))
    chk.row("labels top-1", "torch.mm bf16 ceiling", "TFLOP/s", 2.0 * nq * chunk * d / t_mm / 1e12,
            f"[{nq} x {d}] @ [{d} x {chunk}]", **params)

    def mm_max():
        bestv = torch.full((nq,), -math.inf, dtype=torch.bfloat16, device=dev)
        for a in range(0, nk, chunk):
            b = min(nk, a + chunk)
            torch.mm(qb, kb[a:b].T, out=dst[:, : b - a])
            bestv = torch.maximum(bestv, dst[:, : b - a].amax(1))
        return bestv

    t_mx = chk.time(mm_max)
    chk.row("labels top-1", "torch.mm bf16 + max (not exact)", "TFLOP/s", flops / t_mx / 1e12, **params)
    chk.row("labels top-1", "amips / (torch bf16 mm + max)", "ratio", t_mx / t, "target >= 1.3", **params)


def step_icnn(chk: Check, shp: dict) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_icnn import make_workloads

    s = shp["icnn"]
    params = {"batch": s["batch"], "width": s["width"], "depth": s["depth"], "d": s["d"]}
    providers = ["amips", "torch-eager"] + ([] if chk.smoke else ["torch-compile"])
    for provider in providers:
        try:
            step = make_workloads(provider, s["batch"], s["width"], s["depth"], s["d"], chk.device,
                                  bf16=chk.device == "cuda")["train"]
            t = chk.time(step)
            chk.sync()
        except Exception as exc:  # noqa: BLE001
            if provider == "torch-compile":  # "where it runs": inductor's limit, not ours
                chk.row("icnn train step", provider, "status", "did not run",
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200],
                        **params)
                continue
            raise
        chk.row("icnn train step", provider, "samples/s", s["batch"] / t, **params)
    if chk.smoke:
        chk.row("icnn train step", "torch-compile", "status", "skipped in --cpu-smoke", **params)
    del torch


def step_ivf(chk: Check, shp: dict) -> None:
    import torch

    import amips
    from amips.metrics import match_at_1

    s = shp["ivf"]
    ds = amips.synthetic(s["n_keys"], s["n_queries"], s["d"],
                         n_clusters=max(8, s["n_keys"] // 2000), seed=0)
    keys = torch.as_tensor(ds.keys, device=chk.device).float()
    queries = torch.as_tensor(ds.queries_test,
                              device=chk.device).float()
    true_s, _ = amips.exact_top1(queries, keys)
    t0 = time.perf_counter()
    index = amips.IVFIndex.build(keys, s["n_lists"], device=chk.device, pq_subspaces=s["pq_subspaces"],
                                 pq_bits=4, iters=10)
    chk.sync()
    params = {"n_keys": s["n_keys"], "n_lists": s["n_lists"], "nq": queries.shape[0]}
    chk.row("ivf search", "IVFIndex.build (k-means + PQ)", "seconds", time.perf_counter() - t0, **params)
    for scanner, reorder in (("exact", 0), ("pq", s["reorder"])):
        reached = None
        for nprobe in s["nprobe"]:
            if nprobe > s["n_lists"]:
                continue
            res = {}

            def search(nprobe=nprobe, scanner=scanner, reorder=reorder, res=res):
                res["r"] = index.search(queries, k=1, nprobe=nprobe, scanner=scanner, reorder=reorder)

            t = chk.time(search)
            chk.sync()
            m = match_at_1(res["r"][0].cpu(), true_s.cpu())
            qps = queries.shape[0] / t
            chk.row("ivf search", f"{scanner}" + (f" + re-rank {reorder}" if reorder else ""),
                    "match@1, queries/s", f"{m:.4f}, {qps:,.0f}", nprobe=nprobe, **params)
            if m >= 0.95 and reached is None:
                reached = (nprobe, qps)
                break
        label = f"{scanner} queries/s at match@1 >= 0.95"
        if reached is None:
            chk.row("ivf search", label, "queries/s", "not reached", f"nprobe up to {max(s['nprobe'])}", **params)
        else:
            chk.row("ivf search", label, "queries/s", reached[1], f"nprobe {reached[0]}", **params)


def step_pq_bandwidth(chk: Check, shp: dict) -> None:
    import torch

    from amips.kernels.pq_scan import pq_scan

    n = shp["ivf"]["n_keys"]
    n_lists = shp["ivf"]["n_lists"]
    m = shp["ivf"]["pq_subspaces"]
    nq, nprobe = shp["pq_bw"]["nq"], shp["pq_bw"]["nprobe"]
    dev = chk.device
    g = torch.Generator(device=dev).manual_seed(0)
    codes = torch.randint(0, 256, (n, (m + 1) // 2), dtype=torch.uint8, device=dev, generator=g)
    offsets = torch.linspace(0, n, n_lists + 1, device=dev).round().long()
    lut = torch.randn(nq, m, 16, device=dev, generator=g)
    probes = torch.stack([torch.randperm(n_lists, device=dev, generator=g)[:nprobe] for _ in range(nq)])
    t = chk.time(lambda: pq_scan(lut, codes, offsets, probes, 10, bits=4))
    sizes = (offsets[1:] - offsets[:-1])[probes]
    code_bytes = float(sizes.sum()) * codes.shape[1]
    nbytes = shp["copy_bytes"]
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = chk.time(lambda: dst.copy_(src))
    copy_bw = 2.0 * nbytes / t_copy
    scan_bw = code_bytes / t
    params = {"nq": nq, "nprobe": nprobe, "n_keys": n, "bytes_per_code": codes.shape[1]}
    chk.row("pq scan bandwidth", "device copy (read + write)", "GB/s", copy_bw / 1e9, **params)
    chk.row("pq scan bandwidth", "amips pq_scan (codes read)", "GB/s", scan_bw / 1e9, **params)
    chk.row("pq scan bandwidth", "pq_scan / copy", "share", scan_bw / copy_bw, "target >= 0.60", **params)


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import numpy
    import torch
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "numpy": numpy.__version__, "device": device}
    try:
        env["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        env["commit"] = "unknown"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda or ""
        try:
            env["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                text=True, stderr=subprocess.DEVNULL).strip().splitlines()[0]
        except Exception:
            env["driver"] = "unknown (nvidia-smi unavailable)"
    else:
        env["gpu"] = "none (CPU smoke run: Triton interpreter, tiny shapes; not a GPU figure)"
        env["driver"] = "-"
    return env


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def write_report(out: Path, env: dict, chk: Check, seconds: float) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "gpu_check.csv", out / "gpu_check.md"
    fields = ["bench", "provider", "metric", "value", "note"]
    for r in chk.rows:
        fields += [k for k in r if k not in fields]
    fields += [k for k in env if k not in fields]
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in chk.rows:
            w.writerow({**env, **r})
    os.replace(tmp, csv_path)
    lines = [
        "# amips gpu_check",
        "",
        " · ".join(f"{k} {v}" for k, v in env.items()),
        f"total {seconds:.0f} s; failures: {len(chk.failures)}",
        "",
        "| bench | provider | metric | value | params | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in chk.rows:
        params = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("bench", "provider", "metric", "value", "note"))
        lines.append(f"| {r['bench']} | {r['provider']} | {r['metric']} | {_fmt(r['value'])} | {params} | {r['note']} |")
    if chk.failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in chk.failures]
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md_path)
    return md_path, csv_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_check.md and .csv")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run the same steps at tiny shapes on CPU (Triton interpreter)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: tests,labels,icnn,ivf,pq")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    if args.cpu_smoke:
        device, shapes = "cpu", SMOKE_SHAPES
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: error: no CUDA device (use --cpu-smoke to check the plumbing)",
                  file=sys.stderr)
            return 2
        device, shapes = "cuda", GPU_SHAPES
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"tests", "labels", "icnn", "ivf", "pq"}
    if unknown:
        print(f"gpu_check: error: --skip: unknown steps {sorted(unknown)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    chk = Check(device, args.cpu_smoke)
    t0 = time.perf_counter()
    steps = [("tests", lambda: step_tests(chk)), ("labels", lambda: step_labels(chk, shapes)),
             ("icnn", lambda: step_icnn(chk, shapes)), ("ivf", lambda: step_ivf(chk, shapes)),
             ("pq", lambda: step_pq_bandwidth(chk, shapes))]
    for name, fn in steps:
        if name in skip:
            chk.row(name, "-", "status", "skipped (--skip)")
            continue
        chk.step(name, fn)
    env = environment(device)
    md, csv_path = write_report(args.out, env, chk, time.perf_counter() - t0)
    print(md.read_text())
    print(f"wrote {md} and {csv_path}")
    if chk.failures:
        print(f"gpu_check: {len(chk.failures)} failure(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
