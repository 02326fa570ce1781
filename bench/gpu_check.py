"""Does amips work, and how fast, on this GPU? One command that cannot waste a short GPU slot.

    python bench/gpu_check.py --out DIR               # a CUDA machine, whole run under --budget-s
    python bench/gpu_check.py --out DIR --cpu-smoke   # the same code path: CPU, interpreter, tiny shapes

Runs from a plain copy of the source tree (no ``pip install``) with only torch, Triton and
numpy. A preflight stops the run with one clear line when the machine cannot give
meaningful figures (no CUDA device, ``TRITON_INTERPRET`` or ``AMIPS_BACKEND`` inherited and
cleared loudly, no C compiler for Triton's launcher, a tiny kernel that does not launch,
too little free memory). Then the steps, in order of value, each checked correct at its
timed configuration before it is timed:

1. ``labels``: certified-exact top-1 (``amips.Labeler``) at 65,536 x 4,194,304 x 384,
   against an fp64 oracle on sampled queries (with the counts of re-screened and fp64
   fallback queries), then its TFLOP/s beside its parts (the bf16 screen kernel on one
   shard, the exact fp32 re-screen kernel, cuBLAS bf16 into L2-sized chunks + ``max``).
2. ``pq``: the PQ scan kernel against ``pq_scan_ref`` on a subset of queries, then its code
   bandwidth on a code set 8x the L2 cache, as a share of a measured HBM copy.
3. ``ivf``: ``amips.IVFIndex`` on 1M keys (exact and PQ scanners), the returned ids
   re-scored in fp64 against the exact top-1; queries/s at match@1 >= 0.95.
4. ``icnn``: one SupportNet training step with the fused kernels, values and gradients
   against torch eager first; samples/s beside eager and ``torch.compile``.
5. ``mol``: the fused Mixture-of-Logits screen against its torch path, then items/s.
6. ``tests``: ``pytest -m gpu`` (skipped when pytest is absent).

Every row is printed and appended to ``DIR/gpu_check.csv`` and ``DIR/gpu_check.md`` the
moment it exists (flushed and fsynced), so a kill at any time keeps every finished row.
Steps run in a worker subprocess: a step past its deadline is killed and reported, a step
that loses the CUDA context is reported, and the remaining steps continue in a fresh
worker. Kernels run strict: a Triton kernel that fails to compile or launch fails its row
by name instead of falling back to torch. Exit status 0 when every row passed, 1 when a
step failed, 2 when the preflight refused the machine. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("labels", "pq", "ivf", "icnn", "mol", "tests")
# Seconds each step may take on a GPU (the budget cuts them further); the smoke run is
# bounded by the budget alone.
STEP_DEADLINE_S = {"labels": 150, "pq": 60, "ivf": 100, "icnn": 70, "mol": 45, "tests": 150}
EXIT_PREFLIGHT = 2
EXIT_CONTEXT_LOST = 3
CSV_FIELDS = ["step", "bench", "provider", "metric", "value", "note", "params", "device", "t_s"]
FAILED_VALUES = ("FAILED", "TIMEOUT", "CRASHED", "FALLBACK")
PROGRESS = ".gpu_check_progress"

GPU_SHAPES = {
    "labels": {"nq": 65_536, "nk": 4_194_304, "d": 384, "shard": 1 << 20, "oracle": 256,
               "rescreen_nq": 4096},
    "pq": {"n_lists": 4096, "list_len": 2048, "subspaces": 96, "nprobe": 32, "k": 10,
           "check_queries": 16},
    "copy_bytes": 1 << 31,
    "ivf": {"n_keys": 1_000_000, "n_queries": 20_000, "d": 384, "n_lists": 1000,
            "nprobe": (1, 2, 4, 8, 16, 32, 64, 128), "pq_subspaces": 96, "reorder": 100},
    "icnn": {"batch": 4096, "width": 1024, "depth": 3, "d": 384, "check_batch": 256},
    "mol": {"nq": 1024, "n_items": 1 << 20, "p_q": 4, "p_x": 4, "d": 64, "hidden": 32,
            "check_queries": 8, "check_items": 1 << 15},
    "free_gib": 24,
}
SMOKE_SHAPES = {
    "labels": {"nq": 48, "nk": 3000, "d": 32, "shard": 1024, "oracle": 16, "rescreen_nq": 16},
    "pq": {"n_lists": 8, "list_len": 24, "subspaces": 8, "nprobe": 2, "k": 4, "check_queries": 2},
    "copy_bytes": 1 << 20,
    # the interpreter's tl.sort costs seconds per call: few queries, two lists
    "ivf": {"n_keys": 64, "n_queries": 5, "d": 16, "n_lists": 2,
            "nprobe": (1, 2), "pq_subspaces": 4, "reorder": 4},
    "icnn": {"batch": 16, "width": 16, "depth": 2, "d": 16, "check_batch": 16},
    "mol": {"nq": 3, "n_items": 200, "p_q": 2, "p_x": 2, "d": 16, "hidden": 16,
            "check_queries": 3, "check_items": 200},
    "free_gib": 0,
}


# --------------------------------------------------------------------------------------
# rows: printed, appended to CSV and markdown, flushed and fsynced as they are made
# --------------------------------------------------------------------------------------
class Rows:
    def __init__(self, out: Path, device: str, t0: float):
        self.out, self.device, self.t0 = out, device, t0
        self.csv, self.md = out / "gpu_check.csv", out / "gpu_check.md"
        self.failures = 0

    def start_files(self, header: str) -> None:
        """Fresh files: the CSV header and the markdown title and table head."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.csv, "w", newline="") as fh:
            csv.writer(fh).writerow(CSV_FIELDS)
            _sync(fh)
        with open(self.md, "w") as fh:
            fh.write(f"# amips gpu_check\n\n{header}\n\n"
                     "| step | bench | provider | metric | value | params | note | t (s) |\n"
                     "|---|---|---|---|---|---|---|---|\n")
            _sync(fh)

    def add(self, step: str, bench: str, provider: str, metric: str, value, note: str = "",
            **params) -> None:
        t = time.time() - self.t0
        ptxt = ", ".join(f"{k} {v}" for k, v in params.items())
        note = str(note).replace("\n", " ").replace("|", "/")[:300]
        if metric == "status" and str(value) in FAILED_VALUES:
            self.failures += 1
        rec = [step, bench, provider, metric, _fmt(value), note, ptxt, self.device, f"{t:.1f}"]
        print(f"[gpu_check] {step} | {bench} | {provider} | {metric} = {_fmt(value)}"
              + (f" | {ptxt}" if ptxt else "") + (f" | {note}" if note else ""), flush=True)
        with open(self.csv, "a", newline="") as fh:
            csv.writer(fh).writerow(rec)
            _sync(fh)
        with open(self.md, "a") as fh:
            fh.write(f"| {step} | {bench} | {provider} | {metric} | {_fmt(value)} | {ptxt} | "
                     f"{note} | {t:.0f} |\n")
            _sync(fh)

    def append_md(self, text: str) -> None:
        with open(self.md, "a") as fh:
            fh.write(text)
            _sync(fh)


def _sync(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def read_rows(out: Path) -> list[dict]:
    try:
        with open(out / "gpu_check.csv", newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------------------
# timing: CUDA events / do_bench on a GPU, wall clock in the smoke run (plumbing only)
# --------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn) -> tuple[float, str]:
        """(median seconds per call, how it was measured). The caller has already run ``fn``
        once (its correctness check), so compilation is not timed."""
        if self.device != "cuda":
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0, "1 call, wall clock (CPU smoke: not a speed figure)"
        import torch
        import triton.testing

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est = start.elapsed_time(end) / 1e3
        if est < 0.02:  # short calls: do_bench at its defaults (25 ms warm-up, 100 ms of repeats)
            ms = triton.testing.do_bench(fn, return_mode="median")
            return ms / 1e3, f"do_bench median ({max(1, int(100 / max(est * 1e3, 1e-3)))} reps)"
        reps = int(min(20, max(3, 3.0 // est)))  # long calls: a measured number of repeats
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        times.sort()
        return times[len(times) // 2], f"median of {reps} calls (CUDA events)"


def _sync_device(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# preflight
# --------------------------------------------------------------------------------------
class PreflightError(RuntimeError):
    pass


def _c_compiler() -> str | None:
    for name in [os.environ.get("CC", "")] + ["cc", "gcc", "clang"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _tiny_kernel_launch(device: str) -> None:
    """Compile and launch one tiny Triton kernel and check its result."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _preflight_kernel

    x = torch.arange(1000, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    _preflight_kernel.launch(x, y)
    _sync_device(device)
    if not torch.equal(y, 2 * x + 1):
        raise PreflightError("preflight: a tiny Triton kernel ran but returned wrong values")


def preflight(rows: Rows, smoke: bool, shapes: dict, full: bool) -> None:
    import numpy
    import torch
    import triton

    import amips
    import amips.kernels
    from amips.kernels import _backend

    step = "preflight"
    if full:
        rows.add(step, "environment", "python", "version", platform.python_version(),
                 sys.executable)
        rows.add(step, "environment", "torch", "version", torch.__version__,
                 f"cuda {torch.version.cuda or '-'}")
        rows.add(step, "environment", "triton", "version", triton.__version__)
        rows.add(step, "environment", "numpy", "version", numpy.__version__)
        # which tree runs: a plain copy must import its own amips and kernels
        rows.add(step, "environment", "amips", "source", amips.__file__,
                 f"kernels {amips.kernels.__file__}")
        rows.add(step, "environment", "commit", "id", _commit())
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise PreflightError("preflight: --cpu-smoke needs TRITON_INTERPRET=1 before Triton "
                                 "is imported (the parent process sets it)")
        if full:
            rows.add(step, "device", "cpu", "name", "CPU smoke run: Triton interpreter, tiny "
                     "shapes; no figure here is a GPU figure")
    else:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise PreflightError("preflight: TRITON_INTERPRET is set in the worker: every kernel "
                                 "would run in the interpreter")
        if not torch.cuda.is_available():
            raise PreflightError("preflight: no CUDA device visible to torch (use --cpu-smoke to "
                                 "check the plumbing on a CPU)")
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        if full:
            rows.add(step, "device", "gpu", "name", props.name,
                     f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB")
            rows.add(step, "device", "gpu", "driver", _driver())
            rows.add(step, "device", "gpu", "free memory GiB", free / 2**30,
                     f"of {total / 2**30:.0f} GiB")
        if free < shapes["free_gib"] * 2**30:
            raise PreflightError(f"preflight: only {free / 2**30:.1f} GiB free on {props.name}; "
                                 f"the check needs {shapes['free_gib']} GiB (another process "
                                 f"holds the GPU?)")
    cc = _c_compiler()
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if full:
        rows.add(step, "toolchain", "C compiler", "path", cc or "none",
                 "not needed by the interpreter" if smoke else
                 "Triton builds its launcher with it on first use")
        rows.add(step, "toolchain", "Python.h", "present", include.is_file(), str(include))
    try:
        _tiny_kernel_launch("cpu" if smoke else "cuda")
    except PreflightError:
        raise
    except Exception as exc:  # noqa: BLE001 - the one line says why
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        hint = ""
        if not smoke and cc is None:
            hint = "; no C compiler (cc/gcc/clang) on PATH: Triton cannot build its launcher"
        elif not smoke and not include.is_file():
            hint = f"; {include} is missing: Triton cannot build its launcher"
        raise PreflightError(f"preflight: a tiny Triton kernel failed to compile or launch "
                             f"({type(exc).__name__}: {first}){hint}") from exc
    _backend.set_strict(True)
    if full:
        rows.add(step, "preflight", "tiny Triton kernel", "status", "ok",
                 "compiled, launched, checked; kernels run strict (no torch fallback)")


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - a plain copy of the tree has no git
        return "unknown (no git checkout)"


def _driver() -> str:
    try:
        return subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version",
                                        "--format=csv,noheader"], text=True,
                                       stderr=subprocess.DEVNULL, timeout=20).strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "unknown (nvidia-smi unavailable)"


# --------------------------------------------------------------------------------------
# steps: each checks its output at the timed configuration, then times it
# --------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, rows: Rows, device: str, smoke: bool, shapes: dict):
        self.rows, self.device, self.smoke, self.shapes = rows, device, smoke, shapes
        self.time = Timer(device)
        self.step = ""

    def row(self, bench, provider, metric, value, note="", **params):
        self.rows.add(self.step, bench, provider, metric, value, note, **params)


def _fp64_best(queries, keys, index=None, chunk: int = 1 << 18):
    """fp64 best score per query over all keys (blocked, on the keys' device) and, when
    ``index`` is given, the fp64 score of key ``index[i]`` for query i taken from the same
    products (so equal keys compare equal, with no summation-order noise)."""
    import torch

    q64 = queries.double()
    best = torch.full((q64.shape[0],), -math.inf, dtype=torch.float64, device=q64.device)
    got = torch.full_like(best, -math.inf)
    for a in range(0, keys.shape[0], chunk):
        s64 = q64 @ keys[a:a + chunk].double().T
        best = torch.maximum(best, s64.amax(1))
        if index is not None:
            rows = ((index >= a) & (index < a + s64.shape[1])).nonzero().flatten()
            got[rows] = s64[rows, index[rows] - a]
    return best, got


def step_labels(ctx: Ctx) -> None:
    import torch

    from amips.kernels.mips_topk import mips_top1, screening_error_bound
    from amips.labels import Labeler

    s = ctx.shapes["labels"]
    nq, nk, d, dev = s["nq"], s["nk"], s["d"], ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn(nk, d, device=dev, generator=g)
    queries = torch.randn(nq, d, device=dev, generator=g)
    params = {"nq": nq, "nk": nk, "d": d}
    bench = "labels top-1"
    labeler = Labeler(keys, shard_size=s["shard"])
    out = {}

    def labels():
        out["r"] = labeler(queries)

    # correctness first, on the output of the timed configuration
    labels()
    _sync_device(dev)
    stats = dict(labeler.last_stats)
    n_or = min(nq, s["oracle"])
    pick = torch.linspace(0, nq - 1, n_or, device=dev).round().long()
    best, got = _fp64_best(queries[pick], keys, out["r"]["top1_index"][pick].to(dev))
    wrong = int((got < best).sum())  # tie-aware: any key scoring the best is right
    ctx.row(bench, "fp64 oracle", "queries wrong", wrong, f"{n_or} sampled queries", **params)
    ctx.row(bench, "certification", "re-screened queries (fp32)", stats.get("rescreened_queries", -1),
            f"of {stats.get('queries', nq)}", **params)
    ctx.row(bench, "certification", "fp64 fallback queries", stats.get("fallback_queries", -1),
            f"of {stats.get('queries', nq)}", **params)
    if wrong:
        raise AssertionError(f"Labeler disagrees with the fp64 oracle on {wrong}/{n_or} queries")

    flops = 2.0 * nq * nk * d
    t, how = ctx.time(labels)
    ctx.row(bench, "amips Labeler (certified exact)", "TFLOP/s", flops / t / 1e12, how, **params)
    ctx.row(bench, "amips Labeler (certified exact)", "seconds", t, **params)

    # its parts: the bf16 screen kernel alone on one shard, the exact fp32 re-screen kernel
    shard = min(nk, s["shard"])
    ks, kb, qb = keys[:shard], keys[:shard].bfloat16(), queries.bfloat16()
    kn = float(torch.linalg.vector_norm(ks, dim=1).max()) * (1 + 1e-5)
    c = screening_error_bound(d, "bf16" if dev == "cuda" else "ieee")
    qn = torch.linalg.vector_norm(queries.double(), dim=1) * (1 + 1e-5)
    window = ((2 * c + 1e-6) * qn * (1 + 1e-6)).float()
    scale = torch.tensor([kn], device=dev)
    q_op, k_op = (qb, kb) if dev == "cuda" else (queries, ks)  # the interpreter has no bf16 dot
    res = {}
    shard_best, _ = _fp64_best(queries[pick], ks)
    # both loops of the top-1 kernel: the tile loop (the default) and the flattened one
    for kind in ("tiled", "flat"):
        name = f"bf16 screen kernel, {kind} loop (one shard)"

        def screen(kind=kind):
            res["r"] = mips_top1(q_op, k_op, window=window, segment_scale=scale, near=8, kernel=kind)

        screen()
        _sync_device(dev)
        screened = res["r"].score.amax(1)[pick].double()
        err = (screened - shard_best).abs() / (qn[pick] * kn)
        ctx.row(bench, name, "max |screened - fp64| / (|q| max|k|)", float(err.max()),
                f"bound c = {c:.3g}", nk=shard, nq=nq, d=d)
        if bool((err > c).any()):
            raise AssertionError(f"{name} outside its error bound: {float(err.max()):.3g} > {c:.3g}")
        t_s, how = ctx.time(screen)
        ctx.row(bench, name, "TFLOP/s", 2.0 * nq * shard * d / t_s / 1e12, how, nk=shard, nq=nq, d=d)

    nr = min(nq, s["rescreen_nq"])
    q32 = queries[:nr].contiguous()

    def rescreen():
        res["f"] = mips_top1(q32, ks, window=window[:nr], segment_scale=scale, near=8,
                             precision="ieee")

    rescreen()
    _sync_device(dev)
    exact_err = (res["f"].score.amax(1)[pick[pick < nr]].double() - shard_best[pick < nr]).abs()
    c32 = screening_error_bound(d, "ieee")
    if bool((exact_err > c32 * qn[pick[pick < nr]] * kn).any()):
        raise AssertionError("fp32 re-screen outside its error bound")
    t_f, how = ctx.time(rescreen)
    ctx.row(bench, "fp32 re-screen kernel (one shard)", "TFLOP/s", 2.0 * nr * shard * d / t_f / 1e12,
            how, nk=shard, nq=nr, d=d)

    # cuBLAS: bf16 products into an L2-sized chunk, then the row max (not exact)
    l2 = 50 << 20
    if dev == "cuda":
        l2 = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", l2) or l2)
    q_blk = min(nq, 4096)
    k_blk = max(128, min(nk, (l2 // 2) // (2 * q_blk) // 128 * 128))
    dst = torch.empty(q_blk, k_blk, dtype=torch.bfloat16, device=dev)
    kb_all = keys.bfloat16()

    def mm_max():
        bestv = torch.full((nq,), -math.inf, dtype=torch.bfloat16, device=dev)
        for a in range(0, nq, q_blk):
            qa = qb[a:a + q_blk]
            for b0 in range(0, nk, k_blk):
                b1 = min(nk, b0 + k_blk)
                blk = torch.mm(qa, kb_all[b0:b1].T, out=dst[: qa.shape[0], : b1 - b0])
                bestv[a:a + qa.shape[0]] = torch.maximum(bestv[a:a + qa.shape[0]], blk.amax(1))
        return bestv

    top = mm_max().double()[pick]
    gap = float(((top - best).abs() / (qn[pick] * kn)).max())
    ctx.row(bench, "torch bf16 mm + max (L2-sized chunks)", "max |max - fp64| / (|q| max|k|)", gap,
            "a screen, not exact", chunk=f"{q_blk} x {k_blk}", **params)
    t_mx, how = ctx.time(mm_max)
    ctx.row(bench, "torch bf16 mm + max (L2-sized chunks)", "TFLOP/s", flops / t_mx / 1e12, how,
            chunk=f"{q_blk} x {k_blk}", **params)
    t_mm, how = ctx.time(lambda: torch.mm(qb[:q_blk], kb_all[:k_blk].T, out=dst))
    ctx.row(bench, "torch bf16 mm alone (one chunk)", "TFLOP/s", 2.0 * q_blk * k_blk * d / t_mm / 1e12,
            how, chunk=f"{q_blk} x {k_blk}", d=d)
    ctx.row(bench, "amips / (torch bf16 mm + max)", "ratio", t_mx / t, "target >= 1.3", **params)


def step_pq(ctx: Ctx) -> None:
    import torch

    from amips.kernels.pq_scan import code_bytes, pq_scan, pq_scan_ref

    s = ctx.shapes["pq"]
    dev = ctx.device
    n_lists, list_len, m, nprobe, k = s["n_lists"], s["list_len"], s["subspaces"], s["nprobe"], s["k"]
    n = n_lists * list_len
    g = torch.Generator(device=dev).manual_seed(0)
    width = code_bytes(m, 4)
    codes = torch.randint(0, 256, (n, width), dtype=torch.uint8, device=dev, generator=g)
    offsets = torch.arange(0, n + 1, list_len, device=dev, dtype=torch.int64)
    # each list probed by exactly one query: every code byte is read once per call, from HBM
    nq = n_lists // nprobe
    probes = torch.randperm(n_lists, device=dev, generator=g)[: nq * nprobe].view(nq, nprobe)
    lut = torch.randn(nq, m, 16, device=dev, generator=g)
    params = {"nq": nq, "nprobe": nprobe, "n_codes": n, "bytes_per_code": width}
    res = {}

    def scan():
        res["r"] = pq_scan(lut, codes, offsets, probes, k, bits=4)

    scan()
    _sync_device(dev)
    sub = slice(0, min(nq, s["check_queries"]))
    want_s, want_p = pq_scan_ref(lut[sub], codes, offsets, probes[sub], k, bits=4)
    got_s, got_p = res["r"][0][sub], res["r"][1][sub]
    tol = 1e-5 * float(lut.abs().amax()) * m
    # tie-aware: the k scores agree; each returned position really scores its returned score
    from amips.kernels.pq_scan import unpack_codes

    rows = unpack_codes(codes[got_p.clamp_min(0).flatten()], 4, m).long()  # [nq_sub * k, m]
    lut64 = lut[sub].double().repeat_interleave(k, 0)
    rescored = lut64.gather(2, rows[:, :, None])[:, :, 0].sum(1).view(got_s.shape)
    bad = int(((got_s.double() - want_s.double()).abs() > tol).sum()
              + ((rescored - got_s.double()).abs() > tol).sum())
    ctx.row("pq scan", "pq_scan vs pq_scan_ref", "entries wrong", bad,
            f"{sub.stop} queries x top-{k}, tol {tol:.2g}", **params)
    if bad:
        raise AssertionError(f"pq_scan disagrees with pq_scan_ref on {bad} entries")
    t, how = ctx.time(scan)
    scan_bw = n * width / t
    nbytes = ctx.shapes["copy_bytes"]
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy, how_c = ctx.time(lambda: dst.copy_(src))
    copy_bw = 2.0 * nbytes / t_copy
    l2_note = f"code set {n * width / 2**20:.0f} MiB (8x a 50 MB L2 on the GPU run)"
    ctx.row("pq scan", "device copy (read + write)", "GB/s", copy_bw / 1e9, how_c, bytes=nbytes)
    ctx.row("pq scan", "amips pq_scan (codes read once)", "GB/s", scan_bw / 1e9,
            f"{how}; {l2_note}", **params)
    ctx.row("pq scan", "pq_scan / copy", "share", scan_bw / copy_bw, "target >= 0.60", **params)


def step_ivf(ctx: Ctx) -> None:
    import torch

    import amips

    s = ctx.shapes["ivf"]
    dev = ctx.device
    ds = amips.synthetic(s["n_keys"], s["n_queries"], s["d"],
                         n_clusters=max(8, s["n_keys"] // 2000), seed=0)
    keys = torch.as_tensor(ds.keys, device=dev).float()
    queries = torch.as_tensor(ds.queries_test, device=dev).float()
    _, true_i = amips.exact_top1(queries, keys)
    q64 = queries.double()
    true64 = (q64 * keys[true_i].double()).sum(1)
    t0 = time.perf_counter()
    index = amips.IVFIndex.build(keys, s["n_lists"], device=dev, pq_subspaces=s["pq_subspaces"],
                                 pq_bits=4, iters=10)
    _sync_device(dev)
    params = {"n_keys": s["n_keys"], "n_lists": s["n_lists"], "nq": queries.shape[0]}
    ctx.row("ivf search", "IVFIndex.build (k-means + PQ)", "seconds", time.perf_counter() - t0, **params)
    for scanner, reorder in (("exact", 0), ("pq", s["reorder"])):
        name = scanner + (f" + re-rank {reorder}" if reorder else "")
        reached = None
        for nprobe in s["nprobe"]:
            if nprobe > s["n_lists"]:
                continue
            res = {}

            def search(nprobe=nprobe, scanner=scanner, reorder=reorder, res=res):
                res["r"] = index.search(queries, k=1, nprobe=nprobe, scanner=scanner, reorder=reorder)

            search()
            _sync_device(dev)
            ids = res["r"][1][:, 0].to(dev)
            # the scanner's own scores are not trusted: its ids are re-scored in fp64
            found = torch.where(ids >= 0, (q64 * keys[ids.clamp_min(0)].double()).sum(1),
                                torch.full_like(true64, -math.inf))
            match = float((found >= true64).double().mean())
            t, how = ctx.time(search)
            ctx.row("ivf search", name, "match@1 (fp64 re-scored)", match, nprobe=nprobe, **params)
            ctx.row("ivf search", name, "queries/s", queries.shape[0] / t, how, nprobe=nprobe, **params)
            if match >= 0.95:
                reached = (nprobe, queries.shape[0] / t)
                break
        label = f"{name}: queries/s at match@1 >= 0.95"
        if reached is None:
            ctx.row("ivf search", label, "queries/s", "not reached", f"nprobe up to {max(s['nprobe'])}",
                    **params)
        else:
            ctx.row("ivf search", label, "queries/s", reached[1], f"nprobe {reached[0]}", **params)


def step_icnn(ctx: Ctx) -> None:
    import torch

    from amips.models import SupportNet

    s = ctx.shapes["icnn"]
    dev = ctx.device
    params = {"batch": s["batch"], "width": s["width"], "depth": s["depth"], "d": s["d"]}
    bf16 = dev == "cuda"
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16)

    # values and gradients of the fused network against eager, same weights, same inputs
    torch.manual_seed(0)
    fused = SupportNet(s["d"], width=s["width"], depth=s["depth"], use_kernels=True).to(dev)
    eager = SupportNet(s["d"], width=s["width"], depth=s["depth"], use_kernels=False).to(dev)
    eager.load_state_dict(fused.state_dict())
    gq = torch.Generator(device=dev).manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(s["check_batch"], s["d"], device=dev, generator=gq), dim=1)
    outs = []
    for net in (fused, eager):
        qq = q.clone().requires_grad_(True)
        with amp:
            f = net(qq)[:, 0].float()
        (key,) = torch.autograd.grad(f.sum(), qq, create_graph=True)
        loss = (f ** 2).mean() + (key.float() ** 2).sum(1).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
        outs.append((f.detach(), key.detach().float(),
                     [gr.detach().float() for gr in grads if gr is not None]))
    # bf16 operands on a GPU (the two paths round differently); exact fp32 in the interpreter
    tol = 5e-2 if bf16 else 1e-4
    worst = 0.0
    for a, b in zip([outs[0][0], outs[0][1], *outs[0][2]], [outs[1][0], outs[1][1], *outs[1][2]]):
        scale = float(b.abs().max()) + 1e-12
        worst = max(worst, float((a - b).abs().max()) / scale)
    ctx.row("icnn train step", "amips vs eager", "max rel. difference (values, key, param grads)",
            worst, f"tolerance {tol:g}", **params)
    if worst > tol:
        raise AssertionError(f"fused ICNN differs from eager by {worst:.3g} (> {tol:g})")
    del fused, eager

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_icnn import make_workloads

    providers = ["amips", "torch-eager"] + ([] if ctx.smoke else ["torch-compile"])
    for provider in providers:
        try:
            step = make_workloads(provider, s["batch"], s["width"], s["depth"], s["d"], dev, bf16=bf16)["train"]
            step()
            _sync_device(dev)
            t, how = ctx.time(step)
        except Exception as exc:  # noqa: BLE001
            if provider == "torch-compile":  # inductor's limit (double backward), not amips's
                first = (str(exc).strip().splitlines() or [""])[0]
                ctx.row("icnn train step", provider, "status", "did not run",
                        f"{type(exc).__name__}: {first}"[:200], **params)
                continue
            raise
        ctx.row("icnn train step", provider, "samples/s", s["batch"] / t, how, **params)
    if ctx.smoke:
        ctx.row("icnn train step", "torch-compile", "status", "skipped in --cpu-smoke", **params)


def step_mol(ctx: Ctx) -> None:
    import torch

    from amips.kernels.mol import mol_tile_max, mol_tile_max_ref, screen_margin

    s = ctx.shapes["mol"]
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    nq, n, p_q, p_x, d, h = s["nq"], s["n_items"], s["p_q"], s["p_x"], s["d"], s["hidden"]
    L = p_q * p_x
    tau = 0.05

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, device=dev, generator=g), dim=-1)

    qc = unit(nq, p_q, d)
    items = unit(n, p_x, d).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    qgate = torch.randn(nq, L, device=dev, generator=g)
    igate = torch.randn(n, L, device=dev, generator=g)
    w1 = torch.randn(h, L, device=dev, generator=g) / math.sqrt(L)
    b1 = torch.randn(h, device=dev, generator=g) * 0.1
    w2 = torch.randn(L, h, device=dev, generator=g) / math.sqrt(h)
    b2 = torch.randn(L, device=dev, generator=g) * 0.1
    params = {"nq": nq, "n_items": n, "P_Q": p_q, "P_X": p_x, "d": d, "H": h}
    res = {}

    def screen():
        res["r"] = mol_tile_max(qc, qgate, items, igate, w1, b1, w2, b2, tau)

    screen()
    _sync_device(dev)
    tile_max, bn = res["r"]
    nc, ni = min(nq, s["check_queries"]), min(n, s["check_items"]) // bn * bn or n
    want = mol_tile_max_ref(qc[:nc], qgate[:nc], items[:ni], igate[:ni], w1, b1, w2, b2, tau, bn)
    got = tile_max[:nc, : want.shape[1]]
    err = float((got - want).abs().max()) * tau
    ctx.row("mol screen", "kernel vs torch path", "max |tile max - ref| x tau", err,
            f"margin {screen_margin(items.dtype):.3g}; {nc} queries x {ni} items", **params)
    if not err <= screen_margin(items.dtype):
        raise AssertionError(f"MoL screen outside its margin: {err:.3g} > {screen_margin(items.dtype):.3g}")
    t, how = ctx.time(screen)
    ctx.row("mol screen", "amips mol_tile_max", "query-items/s", nq * n / t, how, **params)
    n_ref = min(n, max(bn, (1 << 17) // bn * bn))  # the torch path on a slice of the items
    t_ref, how = ctx.time(lambda: mol_tile_max_ref(qc, qgate, items[:n_ref], igate[:n_ref], w1, b1, w2,
                                                   b2, tau, bn))
    ctx.row("mol screen", "torch path (mol_tile_max_ref)", "query-items/s", nq * n_ref / t_ref,
            f"{how}; first {n_ref} items", **params)


def step_tests(ctx: Ctx, deadline_s: float) -> None:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        ctx.row("gpu tests", "pytest -m gpu", "status", "skipped: pytest is not installed")
        return
    # only the files that hold gpu-marked tests: collecting the whole suite would import
    # what the GPU image may lack (faiss, scann, hnswlib)
    targets = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                     if "pytest.mark.gpu" in p.read_text())
    if ctx.smoke:
        targets = [t for t in targets if t.endswith("test_pq_scan.py")]
    if not targets:
        ctx.row("gpu tests", "pytest -m gpu", "status", "skipped: no gpu-marked tests found")
        return
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-x", "-p", "no:cacheprovider", *targets]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(5.0, deadline_s - 5))
    except subprocess.TimeoutExpired:
        ctx.row("gpu tests", "pytest -m gpu", "summary", "timed out", f"{time.perf_counter() - t0:.0f} s")
        raise RuntimeError("pytest -m gpu did not finish within the step's deadline") from None
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    ctx.row("gpu tests", "pytest -m gpu", "summary", tail, f"{time.perf_counter() - t0:.0f} s")
    if proc.returncode not in (0, 5):  # 5: nothing selected
        print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
        raise RuntimeError(f"pytest -m gpu failed: {tail}")


STEP_FUNCS = {"labels": step_labels, "pq": step_pq, "ivf": step_ivf, "icnn": step_icnn,
              "mol": step_mol}


# --------------------------------------------------------------------------------------
# worker: runs steps in order; the parent enforces deadlines and restarts after a crash
# --------------------------------------------------------------------------------------
def _context_lost(exc: BaseException, device: str) -> bool:
    if device != "cuda":
        return False
    text = f"{type(exc).__name__} {exc}".lower()
    if any(w in text for w in ("illegal memory access", "device-side assert", "cuda error",
                               "unspecified launch failure", "acceleratorerror")):
        return True
    try:
        import torch

        torch.cuda.synchronize()
        torch.ones(1, device="cuda").sum().item()
    except Exception:  # noqa: BLE001
        return True
    return False


def _set_parent_death_signal() -> None:
    """Linux: the worker dies with its parent (a killed check leaves no orphan on the GPU)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the parent's kill still reaches the group
        return
    if os.getppid() == 1:  # the parent died before the signal was armed
        os._exit(1)


def _inject(step: str) -> None:
    """Failures on purpose, to test the harness itself: ``AMIPS_GPU_CHECK_INJECT`` holds
    ``step=raise|crash|hang|fallback`` pairs (a step that raises, kills its process, never
    returns, or records a kernel fallback)."""
    spec = dict(kv.split("=", 1) for kv in os.environ.get("AMIPS_GPU_CHECK_INJECT", "").split(",")
                if "=" in kv)
    what = spec.get(step)
    if what == "raise":
        raise RuntimeError("injected failure")
    if what == "crash":
        os._exit(70)
    if what == "hang":
        time.sleep(3600)
    if what == "fallback":
        from amips.kernels import _backend

        _backend._FALLBACKS.append({"kernel": "_injected_kernel", "error": "injected fallback"})


def worker(args) -> int:
    _set_parent_death_signal()
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    rows = Rows(args.out, device, args.t0)
    progress = args.out / PROGRESS
    sys.path.insert(0, str(ROOT))  # the tree this script belongs to, before any installed amips
    try:
        import torch

        if smoke:
            torch.set_num_threads(1)
        preflight(rows, smoke, shapes, full=args.first)
    except PreflightError as exc:
        rows.add("preflight", "preflight", "-", "status", "REFUSED", str(exc))
        print(f"gpu_check: {exc}", file=sys.stderr, flush=True)
        return EXIT_PREFLIGHT
    except Exception as exc:  # noqa: BLE001 - e.g. torch or amips does not import
        msg = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        rows.add("preflight", "preflight", "-", "status", "REFUSED", msg)
        traceback.print_exc()
        print(f"gpu_check: preflight: {msg}", file=sys.stderr, flush=True)
        return EXIT_PREFLIGHT
    from amips.kernels._backend import clear_fallback_events, fallback_events

    ctx = Ctx(rows, device, smoke, shapes)
    for name in args.steps.split(","):
        with open(progress, "a") as fh:
            fh.write(f"start {name} {time.time():.3f}\n")
            _sync(fh)
        ctx.step = name
        clear_fallback_events()
        t0 = time.perf_counter()
        lost = False
        try:
            _inject(name)
            if name == "tests":
                step_tests(ctx, args.step_deadline.get(name, 120.0))
            else:
                STEP_FUNCS[name](ctx)
            status, note = "ok", ""
        except Exception as exc:  # noqa: BLE001 - a failed step is reported, then the next runs
            traceback.print_exc()
            status = "FAILED"
            note = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            lost = _context_lost(exc, device)
            if lost:
                note += " (CUDA context lost: the next steps run in a fresh process)"
        for ev in fallback_events():  # strict mode raises instead; kept for a non-strict run
            rows.add(name, name, ev["kernel"], "status", "FALLBACK", ev["error"])
        rows.add(name, name, "step", "status", status,
                 note or f"{time.perf_counter() - t0:.1f} s")
        with open(progress, "a") as fh:
            fh.write(f"done {name} {time.time():.3f}\n")
            _sync(fh)
        if lost:
            return EXIT_CONTEXT_LOST
    return 0


# --------------------------------------------------------------------------------------
# parent: environment, files, worker processes, deadlines, summary
# --------------------------------------------------------------------------------------
def _read_progress(path: Path) -> list[tuple[str, str, float]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], parts[1], float(parts[2])))
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _watch(proc, progress: Path, n_seen: int, end: float, deadlines: dict, budget: float,
           todo: list[str]):
    """Follow a worker's progress file until it exits, or kill it at a step's deadline (or at
    the end of the budget). Returns (n_seen, current step or None, its start, timed_out, todo)."""
    current, started, timed_out = None, None, False
    while proc.poll() is None:
        time.sleep(0.2)
        events = _read_progress(progress)[n_seen:]
        for kind, name, ts in events:
            if kind == "start":
                current, started = name, ts
            elif kind == "done" and name == current:
                current = None
                todo = [s for s in todo if s != name]
        n_seen += len(events)
        limit = min(end, started + deadlines.get(current, budget)) if current else end
        if time.time() > limit:
            _kill_group(proc)
            timed_out = True
            break
    return n_seen, current, started, timed_out, todo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_check.md and .csv")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run the same steps at tiny shapes on CPU (Triton interpreter)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock budget of the whole check, seconds (default 480)")
    ap.add_argument("--step-timeout-s", type=float, default=None,
                    help="one deadline for every step, seconds (default: per step on a GPU, "
                         "the budget in --cpu-smoke)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to skip: {','.join(STEPS)}")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", default="", help=argparse.SUPPRESS)
    ap.add_argument("--first", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--deadlines", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.step_deadline = {k: float(v) for k, v in
                              (kv.split("=") for kv in args.deadlines.split(",") if kv)}
        return worker(args)

    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    if skip - set(STEPS):
        print(f"gpu_check: error: --skip: unknown steps {sorted(skip - set(STEPS))} "
              f"(steps: {','.join(STEPS)})", file=sys.stderr)
        return 2
    if not args.budget_s > 0 or (args.step_timeout_s is not None and not args.step_timeout_s > 0):
        print("gpu_check: error: --budget-s and --step-timeout-s must be positive", file=sys.stderr)
        return 2
    t0 = time.time()
    end = t0 + args.budget_s
    env = dict(os.environ)
    cleared = []
    if args.cpu_smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        for var, harmless in (("TRITON_INTERPRET", ("", "0")), ("AMIPS_BACKEND", ("",))):
            if env.get(var, "") not in harmless:
                cleared.append(f"{var}={env.pop(var)}")
            env.pop(var, None)
    env["AMIPS_STRICT_KERNELS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    rows = Rows(args.out, "cpu" if args.cpu_smoke else "cuda", t0)
    mode = "CPU smoke (interpreter, tiny shapes)" if args.cpu_smoke else "GPU"
    rows.start_files(f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(t0))} · "
                     f"mode {mode} · budget {args.budget_s:.0f} s · script {Path(__file__).resolve()}")
    progress = args.out / PROGRESS
    progress.unlink(missing_ok=True)
    for c in cleared:  # loud: an inherited variable would have made every step measure torch
        print(f"gpu_check: WARNING: cleared inherited {c} (it would bypass the Triton kernels)",
              file=sys.stderr, flush=True)
        rows.add("preflight", "environment", c.split("=")[0], "status", "cleared",
                 f"inherited {c}; unset for the check")
    for name in STEPS:
        if name in skip:
            rows.add(name, name, "step", "status", "skipped (--skip)")
    todo = [s for s in STEPS if s not in skip]
    first = True
    refused = False
    while todo:
        if time.time() >= end:
            for name in todo:
                rows.add(name, name, "step", "status", "TIMEOUT", "budget spent before the step started")
            break
        if args.step_timeout_s is not None:
            deadlines = {s: args.step_timeout_s for s in todo}
        else:
            deadlines = {s: STEP_DEADLINE_S[s] if not args.cpu_smoke else args.budget_s for s in todo}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(args.out),
               "--steps", ",".join(todo), "--t0", f"{t0:.3f}",
               "--deadlines", ",".join(f"{k}={v}" for k, v in deadlines.items())]
        if args.cpu_smoke:
            cmd.append("--cpu-smoke")
        if first:
            cmd.append("--first")
        n_seen = len(_read_progress(progress))
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
        current, started, timed_out = None, None, False
        try:
            n_seen, current, started, timed_out, todo = _watch(proc, progress, n_seen, end, deadlines,
                                                               args.budget_s, todo)
        except BaseException:  # Ctrl-C or a bug here: never leave a worker on the GPU
            _kill_group(proc)
            raise
        for kind, name, _ in _read_progress(progress)[n_seen:]:  # events of the last moments
            if kind == "done":
                todo = [s for s in todo if s != name]
                if name == current:
                    current = None
        rc = proc.returncode
        if first and rc == EXIT_PREFLIGHT:
            refused = True
            break
        first = False
        if current is not None:  # the worker died, or was killed, inside a step
            why = ("TIMEOUT", f"killed at its deadline ({deadlines[current]:.0f} s or the budget)") \
                if timed_out else ("CRASHED", f"worker exited with {rc} inside the step")
            rows.add(current, current, "step", "status", why[0],
                     why[1] + "; the next steps run in a fresh process")
            todo = [s for s in todo if s != current]
        elif timed_out:  # killed between steps (budget)
            continue
        elif rc not in (0, EXIT_CONTEXT_LOST) and todo:
            rows.add(todo[0], todo[0], "step", "status", "CRASHED", f"worker exited with {rc}")
            todo = todo[1:]
    progress.unlink(missing_ok=True)
    done = read_rows(args.out)
    failures = [r for r in done if r["metric"] == "status" and r["value"] in FAILED_VALUES + ("REFUSED",)]
    took = time.time() - t0
    lines = [f"\ntotal {took:.0f} s of a {args.budget_s:.0f} s budget; failures: {len(failures)}\n"]
    if failures:
        lines += ["\n## Failures\n\n"] + [f"- {r['step']}: {r['value']}: {r['note']}\n" for r in failures]
    rows.append_md("".join(lines))
    print(f"gpu_check: {len(failures)} failure(s) in {took:.0f} s; wrote {rows.md} and {rows.csv}",
          flush=True)
    if refused:
        return EXIT_PREFLIGHT
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
