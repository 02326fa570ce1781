"""Compile audit: every Triton kernel, as its launcher runs it, compiled for real GPUs on a CPU.

    python -m amips.kernels.audit [--arch sm_90,sm_80] [--json OUT] [--dump DIR]

For each ``kernels/<op>.py`` the audit imports the module, asks its ``audit_cases(device)``
(see ``_audit.py``) for the configurations that the launcher's own config function picks at
production shapes, and compiles each with ``triton.compile`` for the requested
architectures (no GPU needed: the triton wheel carries the whole compiler and NVIDIA's
``ptxas``, ``cuobjdump`` and ``nvdisasm``). From each cubin it reads

- registers per thread and stack bytes (``cuobjdump -res-usage``),
- spill stores and loads: ``STL`` / ``LDL`` instructions counted in the SASS (``nvdisasm``),
- shared memory: the dynamic shared memory Triton requests at launch,
- tensor-core instructions: ``HGMMA`` (also ``IGMMA``/``QGMMA``) on sm_90, ``HMMA``/``IMMA``
  on sm_80.

A record *violates* when the case does not compile, spills, asks for more shared memory
than the architecture allows, or is a matrix kernel without tensor-core instructions (the
exact-fp32 ``ieee`` variants are exempt from the last rule only). A module that defines
``@triton.jit`` kernels without ``audit_cases`` is reported as ``not declared``; a kernel of
a declaring module that no case covers is ``not covered``. Both are violations.

Arguments are specialised as Triton's JIT does at run time: pointers 16-byte aligned
(launchers pass fresh or contiguous torch tensors), integers listed in a case's
``extra["args"]`` specialised by value (1 becomes a constant, multiples of 16 carry the
divisibility hint). Cases compile in parallel processes; each compiler's own error text is
captured. The exit status is 1 when any violation remains (after ``--expect-undeclared``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import inspect
import json
import multiprocessing as mp
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._audit import PRESETS, AuditCase, DeviceSpec, dedupe

_KERNEL_DIR = Path(__file__).resolve().parent
# Tensor-core instruction families per architecture (SASS opcodes, before the first dot).
TENSOR_CORE_OPS = {90: ("HGMMA", "IGMMA", "QGMMA"), 80: ("HMMA", "IMMA")}
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_RES_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")

# Filled before the worker pool forks, so workers see the cases without pickling kernels.
_JOBS: list[tuple[AuditCase, DeviceSpec, str]] = []


# --------------------------------------------------------------------------------------
# SASS and resource parsing (pure functions; unit-tested on known snippets)
# --------------------------------------------------------------------------------------
def sass_opcodes(sass: str) -> dict[str, int]:
    """Count SASS opcodes (``STL.64`` counts as ``STL``) in ``nvdisasm`` output."""
    counts: dict[str, int] = {}
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def parse_res_usage(text: str) -> dict[str, int]:
    """Registers, stack, static shared and local bytes from ``cuobjdump -res-usage``."""
    m = _RES_LINE.search(text)
    if not m:
        raise ValueError(f"cuobjdump -res-usage: no resource line in {text[:200]!r}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared,
            "local_bytes": local}


def violations(rec: dict, max_shared: int) -> list[str]:
    """The rules the audit enforces, on one record."""
    if rec.get("status") in ("not declared", "not covered"):
        return [rec["status"]]
    if not rec["compiled"]:
        return ["does not compile"]
    out = []
    if rec["spill_stores"] or rec["spill_loads"]:
        out.append(f"spills ({rec['spill_stores']} STL, {rec['spill_loads']} LDL)")
    if rec["shared_bytes"] > max_shared:
        out.append(f"shared memory {rec['shared_bytes']} B > limit {max_shared} B")
    if rec["matrix_kernel"] and not rec["tensor_cores"] and not rec["exact_fp32"]:
        out.append("matrix kernel without tensor-core instructions")
    return out


# --------------------------------------------------------------------------------------
# Triton version adapter
# --------------------------------------------------------------------------------------
def triton_version() -> str:
    import triton

    return triton.__version__


def _version_tuple(v: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", v)
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def tool_path(name: str) -> str:
    """``cuobjdump``/``nvdisasm`` from the triton wheel in use (then from PATH)."""
    import triton

    p = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / name
    if p.is_file():
        return str(p)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name}: not in the triton wheel ({p.parent}) nor on PATH")
    return found


def _specialise_int(value: int) -> tuple[str, object]:
    """Triton's run-time rule for an integer argument: 1 -> constant, %16 -> hint."""
    if value == 1:
        return "constexpr", 1
    return ("i64" if not -(2**31) <= value < 2**31 else "i32"), ("D" if value % 16 == 0 else "")


def build_source(case: AuditCase):
    """``triton.compiler.ASTSource`` for ``case`` on the installed Triton.

    Triton >= 3.3 (3.6 .. 3.9 audited) takes the full signature keyed by argument name,
    constexpr arguments typed ``"constexpr"``, constants keyed by ``(index,)`` (older
    releases of that API keyed them by name only, newer accept both) and attributes as
    ``{(index,): [["tt.divisibility", 16]]}``. Triton 3.0-3.2 took a different call
    (``constants=``, an ``AttrsDescriptor``); amips does not support those versions and the
    audit says so instead of compiling something that differs from what runs.
    """
    import triton
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params or _version_tuple(triton.__version__) < (3, 3):
        raise RuntimeError(
            f"Triton {triton.__version__}: ASTSource API older than 3.3; amips supports "
            "Triton >= 3.6 (see pyproject.toml)"
        )
    fn = case.kernel
    names = list(fn.arg_names)
    missing = [n for n in names if n not in case.signature]
    extra = [n for n in case.signature if n not in names]
    if missing or extra:
        raise ValueError(f"{case.kernel_name}: signature mismatch (missing {missing}, unknown {extra})")
    values = dict(case.extra.get("args", {}))
    unaligned = set(case.extra.get("unaligned", ()))
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(names):
        ty = case.signature[name]
        if ty == "constexpr":
            if name not in case.constexprs:
                raise ValueError(f"{case.kernel_name}: constexpr {name} has no value")
            signature[name] = "constexpr"
            constexprs[(i,)] = case.constexprs[name]
        elif ty.startswith("*"):
            signature[name] = ty
            if name not in unaligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ty in ("i32", "i64") and name in values:
            spec_ty, hint = _specialise_int(int(values[name]))
            if spec_ty == "constexpr":
                signature[name] = "constexpr"
                constexprs[(i,)] = hint
            else:
                signature[name] = ty if ty == "i64" else spec_ty
                if hint == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = ty
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


# --------------------------------------------------------------------------------------
# one case (runs in a worker process)
# --------------------------------------------------------------------------------------
def _compiler_error(exc: BaseException, stderr_text: str) -> str:
    lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
    err = [ln for ln in stderr_text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
    text = " | ".join(lines[:3] + err[:4])
    return text[:800]


def _run_job(index: int, cubin_dir: str) -> dict:
    case, dev, module = _JOBS[index]
    rec = base_record(case, dev, module)
    import triton
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    options.update(case.extra.get("options", {}))
    t0 = time.perf_counter()
    # Capture the compiler's own stderr (MLIR pass failures print there, not in the exception).
    err_file = tempfile.TemporaryFile(mode="w+b")
    saved = os.dup(2)
    try:
        os.dup2(err_file.fileno(), 2)
        try:
            kern = triton.compile(build_source(case), target=GPUTarget("cuda", dev.arch, 32),
                                  options=options)
            error = None
        except Exception as exc:  # noqa: BLE001 - the compiler's error is the result
            kern, error = None, exc
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    if error is not None:
        err_file.seek(0)
        rec["error"] = _compiler_error(error, err_file.read().decode(errors="replace"))
        err_file.close()
        rec["violations"] = violations(rec, dev.max_shared_bytes)
        return rec
    err_file.close()
    rec["compiled"] = True
    cubin = Path(cubin_dir) / f"sm_{dev.arch}" / f"{_safe(case.kernel_name)}__{_safe(case.config)}.cubin"
    cubin.parent.mkdir(parents=True, exist_ok=True)
    cubin.write_bytes(kern.asm["cubin"])
    res = subprocess.run([tool_path("cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                         text=True, check=True).stdout
    rec.update(parse_res_usage(res))
    sass = subprocess.run([tool_path("nvdisasm"), str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    ops = sass_opcodes(sass)
    if not ops:
        raise RuntimeError(f"nvdisasm produced no instructions for {cubin}")
    rec["spill_stores"] = ops.get("STL", 0)
    rec["spill_loads"] = ops.get("LDL", 0)
    rec["shared_bytes"] = int(getattr(kern.metadata, "shared", 0) or 0)
    tc_ops = TENSOR_CORE_OPS.get(dev.arch, ())
    rec["tensor_core_ops"] = {op: ops[op] for op in tc_ops if op in ops}
    rec["tensor_cores"] = bool(rec["tensor_core_ops"])
    rec["cubin"] = str(cubin)
    rec["violations"] = violations(rec, dev.max_shared_bytes)
    return rec


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s)


def base_record(case: AuditCase | None, dev: DeviceSpec, module: str, kernel: str = "") -> dict:
    return {
        "module": module,
        "kernel": case.kernel_name if case else kernel,
        "config": case.config if case else "",
        "arch": f"sm_{dev.arch}",
        "triton": triton_version(),
        "status": "",
        "compiled": False,
        "error": None,
        "registers": None,
        "stack_bytes": None,
        "spill_stores": None,
        "spill_loads": None,
        "shared_bytes": None,
        "shared_limit": dev.max_shared_bytes,
        "matrix_kernel": bool(case.matrix) if case else False,
        "exact_fp32": bool(case.exact_fp32) if case else False,
        "tensor_cores": False,
        "tensor_core_ops": {},
        "num_warps": case.num_warps if case else None,
        "num_stages": case.num_stages if case else None,
        "shapes": case.shapes if case else "",
        "cubin": "",
        "violations": [],
    }


# --------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------
def kernel_modules() -> list[str]:
    """Names of the kernel files (``kernels/<op>.py``; private and this module excluded)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(_KERNEL_DIR)])
                  if not m.name.startswith("_") and m.name != "audit")


def jit_kernels(module) -> dict[str, object]:
    """The ``@triton.jit`` entry points of a module: jitted functions that no other jitted
    function of the module calls (helpers such as ``_softplus`` are excluded)."""
    from triton.runtime.jit import JITFunction

    fns = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
    srcs = {name: getattr(obj, "src", "") for name, obj in fns.items()}
    out = {}
    for name, obj in fns.items():
        called = any(re.search(rf"\b{re.escape(name)}\s*\(", s) for other, s in srcs.items()
                     if other != name)
        if name.endswith("_kernel") or not called:
            out[name] = obj
    return out


def collect(archs: list[int], modules: list[str] | None = None) -> tuple[list, list[dict]]:
    """(jobs, static records): jobs to compile and records for undeclared/uncovered kernels."""
    jobs, static = [], []
    for name in modules if modules is not None else kernel_modules():
        module = importlib.import_module(f"{__package__}.{name}")
        kernels = jit_kernels(module)
        if not kernels:
            continue
        for arch in archs:
            dev = PRESETS[arch]
            if not hasattr(module, "audit_cases"):
                for kname in kernels:
                    rec = base_record(None, dev, name, kname)
                    rec["status"] = "not declared"
                    rec["error"] = f"{name}.py defines @triton.jit kernels but no audit_cases()"
                    rec["violations"] = violations(rec, dev.max_shared_bytes)
                    static.append(rec)
                continue
            cases = dedupe(list(module.audit_cases(dev)))
            covered = {c.kernel_name for c in cases}
            for kname in sorted(set(kernels) - covered):
                rec = base_record(None, dev, name, kname)
                rec["status"] = "not covered"
                rec["error"] = f"no audit case of {name}.audit_cases() compiles {kname}"
                rec["violations"] = violations(rec, dev.max_shared_bytes)
                static.append(rec)
            jobs.extend((c, dev, name) for c in cases)
    return jobs, static


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def _crash_record(index: int, why: str) -> dict:
    case, dev, module = _JOBS[index]
    rec = base_record(case, dev, module)
    rec["error"] = why
    rec["violations"] = violations(rec, dev.max_shared_bytes)
    return rec


def run_audit(archs: list[int], cubin_dir: str, workers: int | None = None,
              modules: list[str] | None = None, progress=None) -> list[dict]:
    """Compile every case; return one record per (case, arch) plus static records."""
    jobs, static = collect(archs, modules)
    _JOBS[:] = jobs
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    results: dict[int, dict] = {}
    pending = list(range(len(jobs)))
    alone = False  # after a worker crash, the survivors run one per pool to find the culprit
    ctx = mp.get_context("fork")
    while pending:
        groups = [[i] for i in pending] if alone else [pending]
        pending = []
        for group in groups:
            with cf.ProcessPoolExecutor(max_workers=1 if alone else workers, mp_context=ctx) as pool:
                futs = {pool.submit(_run_job, i, cubin_dir): i for i in group}
                for fut in cf.as_completed(futs):
                    i = futs[fut]
                    try:
                        results[i] = fut.result()
                        if progress:
                            progress(results[i])
                    except cf.process.BrokenProcessPool:
                        if alone:
                            results[i] = _crash_record(i, "the compiler process crashed")
                        else:
                            pending.append(i)
                    except Exception as exc:  # noqa: BLE001 - a tool failed: report, don't hide
                        results[i] = _crash_record(i, f"audit tooling: {type(exc).__name__}: {exc}"[:800])
        alone = True
    return [results[i] for i in range(len(jobs))] + static


def format_table(records: list[dict]) -> str:
    head = ("kernel", "config", "arch", "compiled", "regs", "STL/LDL", "smem KiB", "TC", "verdict")
    rows = []
    for r in records:
        tc = ",".join(f"{k}x{v}" for k, v in r["tensor_core_ops"].items()) if r["tensor_cores"] else (
            "exact fp32" if r["exact_fp32"] and r["matrix_kernel"] else ("none" if r["matrix_kernel"] else "-"))
        rows.append((
            r["kernel"], r["config"], r["arch"],
            "yes" if r["compiled"] else (r["status"] or "NO"),
            "" if r["registers"] is None else str(r["registers"]),
            "" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}",
            "" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.1f}",
            tc,
            "ok" if not r["violations"] else "; ".join(r["violations"]),
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def _parse_archs(text: str) -> list[int]:
    archs = []
    for tok in text.split(","):
        tok = tok.strip().lower().removeprefix("sm_").removeprefix("sm")
        if not tok.isdigit() or int(tok) not in PRESETS:
            raise argparse.ArgumentTypeError(
                f"--arch: unknown architecture {tok!r}; known: "
                + ",".join(f"sm_{a}" for a in sorted(PRESETS)))
        archs.append(int(tok))
    return archs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m amips.kernels.audit", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=_parse_archs, default=[90, 80], help="e.g. sm_90,sm_80")
    ap.add_argument("--json", type=Path, default=None, help="write the records as a JSON list")
    ap.add_argument("--dump", type=Path, default=None, help="keep cubins as DIR/sm_XX/<kernel>__<config>.cubin")
    ap.add_argument("--modules", default=None, help="comma-separated kernel modules (default: all)")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--expect-undeclared", default="",
                    help="modules allowed to lack audit_cases() (reported, not counted)")
    ap.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("amips audit: error: TRITON_INTERPRET=1 is set; the audit compiles for real GPUs "
              "(unset it)", file=sys.stderr)
        return 2
    modules = [m.strip() for m in args.modules.split(",")] if args.modules else None
    expected = {m.strip() for m in args.expect_undeclared.split(",") if m.strip()}
    t0 = time.perf_counter()
    tmp = None
    if args.dump is not None:
        cubin_dir = str(args.dump)
        Path(cubin_dir).mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="amips-audit-")
        cubin_dir = tmp.name

    def progress(r):
        if not args.quiet:
            flag = "ok" if not r["violations"] else "VIOLATION"
            print(f"  {r['arch']} {r['kernel']} [{r['config']}] {flag} ({r.get('compile_s', 0)} s)",
                  file=sys.stderr, flush=True)

    records = run_audit(args.arch, cubin_dir, args.workers, modules, progress)
    if tmp is not None:
        for r in records:
            r["cubin"] = ""
        tmp.cleanup()
    for r in records:
        r["expected"] = r["status"] == "not declared" and r["module"] in expected
    print(f"amips compile audit: Triton {triton_version()}, "
          f"{', '.join(f'sm_{a}' for a in args.arch)}, {len(records)} records, "
          f"{time.perf_counter() - t0:.0f} s")
    print(format_table(records))
    bad = [r for r in records if r["violations"] and not r["expected"]]
    skipped = [r for r in records if r["expected"]]
    if skipped:
        print(f"expected undeclared (not counted): {sorted({r['module'] for r in skipped})}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_json.write_text(json.dumps(records, indent=1, default=str))
        os.replace(tmp_json, args.json)
    print(f"{len(bad)} violation(s)" if bad else "no violations")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's run-time default; silences 3.9's notice
    sys.exit(main())
