"""The compile audit (``python -m amips.kernels.audit``) and the launch-config functions.

The audit compiles for real GPUs (sm_90, sm_80) on this CPU machine, so it runs in a
subprocess without ``TRITON_INTERPRET`` (which conftest sets for the kernel tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from amips.kernels import audit
from amips.kernels._audit import A100, H100

ROOT = Path(__file__).resolve().parents[1]

# Every kernel file declares its audit cases: none is tolerated as "not declared".
EXPECTED_UNDECLARED: set[str] = set()

FIELDS = ("kernel", "config", "arch", "triton", "compiled", "error", "registers", "spill_stores",
          "spill_loads", "shared_bytes", "matrix_kernel", "tensor_cores", "cubin")


def _compile_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=_compile_env(), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------
# the whole audit on the installed Triton
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audit_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "amips.kernels.audit", "--arch", "sm_90,sm_80", "--quiet",
         "--json", str(out)],
        cwd=ROOT, env=_compile_env(), capture_output=True, text=True, timeout=1200)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    records_ok = all(not r["violations"] or r["expected"] for r in records)
    assert (proc.returncode == 0) == records_ok, proc.stdout[-3000:]
    return records


def test_audit_every_kernel_compiles_without_spills_on_tensor_cores(audit_records):
    assert audit_records, "the audit found no cases"
    for r in audit_records:
        for f in FIELDS:
            assert f in r, f"record lacks {f}: {r}"
    bad = [f"{r['arch']} {r['kernel']} [{r['config']}]: {'; '.join(r['violations'])} "
           f"{r['error'] or ''}"
           for r in audit_records
           if r["violations"] and not (r["module"] in EXPECTED_UNDECLARED
                                       and r["status"] == "not declared")]
    assert not bad, "\n".join(bad)
    compiled = [r for r in audit_records if r["compiled"]]
    assert {r["arch"] for r in compiled} == {"sm_90", "sm_80"}
    # every kernel file is covered on both architectures
    for module in ("icnn", "pq_scan", "mips_topk", "ivf_scan", "mol"):
        for arch in ("sm_90", "sm_80"):
            assert any(r["module"] == module and r["arch"] == arch for r in compiled), (module, arch)
    for r in compiled:
        limit = (H100 if r["arch"] == "sm_90" else A100).max_shared_bytes
        assert 0 <= r["shared_bytes"] <= limit
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0
        if r["matrix_kernel"] and not r["exact_fp32"]:
            assert r["tensor_cores"], r
        if r["matrix_kernel"] and r["tensor_cores"]:
            want = "HGMMA" if r["arch"] == "sm_90" else "HMMA"
            assert want in r["tensor_core_ops"], r


def test_audit_covers_icnn_precisions_the_training_loop_feeds(audit_records):
    icnn = [r for r in audit_records if r["module"] == "icnn" and r["arch"] == "sm_90"]
    configs = " ".join(r["config"] for r in icnn)
    for kind in ("fwd", "bwd_input", "bwd_weight"):
        for prec in ("bf16,bfloat16", "ieee,float32", "tf32,float32"):
            assert f"{kind},{prec}" in configs, (kind, prec)
    pq = [r for r in audit_records if r["module"] == "pq_scan"]
    assert {"bits4", "bits8"} <= {r["config"].split(",")[0] for r in pq}


# --------------------------------------------------------------------------------------
# the checker can fail
# --------------------------------------------------------------------------------------
SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   STL.64 [R1+0x8], R4 ;
        /*0020*/              @!P0 STL [R1], R2 ;
        /*0030*/                   LDL.LU R3, [R1+0x4] ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0050*/              @P1  HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0060*/                   EXIT ;
"""
RES = """Resource usage:
 Function _k:
  REG:255 STACK:576 SHARED:1024 LOCAL:0 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_sass_and_resource_parsers_on_known_snippets():
    ops = audit.sass_opcodes(SASS)
    assert ops["STL"] == 2 and ops["LDL"] == 1 and ops["HGMMA"] == 1 and ops["HMMA"] == 1
    assert ops["LDC"] == 1 and ops["EXIT"] == 1
    assert audit.parse_res_usage(RES) == {"registers": 255, "stack_bytes": 576,
                                          "static_shared_bytes": 1024, "local_bytes": 0}
    with pytest.raises(ValueError):
        audit.parse_res_usage("nothing here")


def test_violation_rules():
    ok = {"status": "", "compiled": True, "spill_stores": 0, "spill_loads": 0,
          "shared_bytes": 1000, "matrix_kernel": True, "tensor_cores": True, "exact_fp32": False}
    assert audit.violations(ok, 2000) == []
    assert audit.violations(dict(ok, spill_stores=3), 2000)[0].startswith("spills")
    assert audit.violations(dict(ok, spill_loads=1), 2000)[0].startswith("spills")
    assert "shared memory" in audit.violations(ok, 999)[0]
    assert audit.violations(dict(ok, tensor_cores=False), 2000) == [
        "matrix kernel without tensor-core instructions"]
    assert audit.violations(dict(ok, tensor_cores=False, exact_fp32=True), 2000) == []
    assert audit.violations(dict(ok, tensor_cores=False, exact_fp32=True, spill_stores=1), 2000)
    assert audit.violations(dict(ok, compiled=False), 2000) == ["does not compile"]
    assert audit.violations({"status": "not declared"}, 2000) == ["not declared"]


def test_audit_flags_a_real_spilling_config_and_a_compile_error(tmp_path):
    """The ICNN exact forward at its old tile (64 x 64, 32-deep step, 4 warps) spills on
    sm_90; an invalid input precision does not compile. Both must be reported."""
    proc = _run_python(f"""
        import dataclasses, json
        from amips.kernels import audit, icnn
        from amips.kernels._audit import H100
        case = next(c for c in icnn.audit_cases(H100) if c.config.startswith("fwd,ieee")
                    and ",n=1" not in c.config)
        old = dataclasses.replace(case, constexprs=dict(case.constexprs, BLOCK_K=32),
                                  num_warps=4, config="old-tile")
        bad = dataclasses.replace(case, constexprs=dict(case.constexprs, PRECISION="bogus"),
                                  config="bad-precision")
        audit._JOBS[:] = [(old, H100, "icnn"), (bad, H100, "icnn")]
        print(json.dumps([audit._run_job(0, {str(tmp_path)!r}), audit._run_job(1, {str(tmp_path)!r})]))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old, bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert old["compiled"] and old["spill_stores"] > 0 and old["registers"] == 255
    assert any(v.startswith("spills") for v in old["violations"])
    assert not bad["compiled"] and bad["error"] and bad["violations"] == ["does not compile"]


def test_audit_refuses_the_interpreter():
    env = _compile_env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "amips.kernels.audit", "--modules", "pq_scan"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr


def test_arch_argument_is_checked():
    assert audit._parse_archs("sm_90,sm_80") == [90, 80]
    assert audit._parse_archs("90") == [90]
    with pytest.raises(Exception, match="unknown architecture"):
        audit._parse_archs("sm_75")


# --------------------------------------------------------------------------------------
# launch-config functions at the audited shapes
# --------------------------------------------------------------------------------------
def _pow2(x):
    return x >= 16 and x & (x - 1) == 0


@pytest.mark.parametrize("device", [H100, A100], ids=["sm_90", "sm_80"])
def test_icnn_launch_config_at_audit_shapes(device):
    from amips.kernels.icnn import icnn_launch_config

    for width in (256, 512, 1024, 2048):
        for n in (width, 1, 1024):
            for kind in ("fwd", "bwd_input", "bwd_weight"):
                for prec in ("ieee", "tf32", "bf16"):
                    cfg = icnn_launch_config(kind, 4096, n, width, prec, device)
                    assert all(_pow2(cfg[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), cfg
                    assert cfg["num_stages"] >= 1
                    if prec == "ieee":  # FMA tiles sized not to spill
                        assert cfg["num_warps"] == 8 and min(
                            cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == 16
                    else:  # one warpgroup over 64 rows: what wgmma needs
                        assert cfg["num_warps"] == 4
                        rows = {"fwd": "BLOCK_M", "bwd_input": "BLOCK_M",
                                "bwd_weight": "BLOCK_N"}[kind]
                        assert cfg[rows] == 64
    # enough programs to fill the SMs from width 512 up (width 256: 128 programs on sm_90)
    cfg = icnn_launch_config("fwd", 4096, 512, 512, "bf16", device)
    assert (4096 // cfg["BLOCK_M"]) * (512 // cfg["BLOCK_N"]) >= device.sm_count
    with pytest.raises(ValueError, match="kind"):
        icnn_launch_config("sideways", 1, 1, 1, "ieee", device)
    with pytest.raises(ValueError, match="precision"):
        icnn_launch_config("fwd", 1, 1, 1, "fp8", device)


def test_icnn_precision_rule():
    from amips.kernels.icnn import icnn_precision

    assert icnn_precision(torch.bfloat16, True) == "bf16"
    assert icnn_precision(torch.float32, True, allow_tf32=False) == "ieee"
    assert icnn_precision(torch.float32, True, allow_tf32=True) == "tf32"
    assert icnn_precision(torch.float32, False, allow_tf32=True) == "ieee"  # interpreter


@pytest.mark.parametrize("device", [H100, A100], ids=["sm_90", "sm_80"])
def test_pq_scan_launch_config_at_audit_shapes(device):
    from amips.kernels.pq_scan import MAX_TRITON_K, pq_scan_launch_config

    for k in (1, 10, 100, MAX_TRITON_K):
        for n_bytes in (8, 48, 96):
            cfg = pq_scan_launch_config(1024, 32, 4096, n_bytes, k, device)
            assert cfg["BLOCK_N"] >= max(64, k) and _pow2(cfg["BLOCK_N"])
            assert cfg["BLOCK_W"] == 16 and cfg["n_split"] == 1 and cfg["num_warps"] == 8
    one = pq_scan_launch_config(1, 64, 4096, 96, 100, device)
    assert one["n_split"] > 1 and 64 * one["n_split"] >= 4 * device.sm_count
    assert pq_scan_launch_config(1, 1, 10, 96, 10, device)["n_split"] == 1  # short list
    with pytest.raises(ValueError, match="k"):
        pq_scan_launch_config(1, 1, 10, 96, MAX_TRITON_K + 1, device)


# --------------------------------------------------------------------------------------
# a kernel that fails on a device falls back to torch, with one warning, counted
# --------------------------------------------------------------------------------------
class _Broken:
    """A kernel whose launch fails inside Triton (out of shared memory, simulated)."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(300000, 232448, "shared memory (simulated)")
        return launch


def _as_device(monkeypatch, module, name):
    from amips.kernels import _backend

    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    monkeypatch.delenv("AMIPS_BACKEND", raising=False)
    monkeypatch.setattr(module, name, _Broken())
    if hasattr(module, "use_triton"):  # CPU tensors stand in for device tensors
        monkeypatch.setattr(module, "use_triton", lambda *tensors: True)
    _backend.clear_fallback_events()


def test_icnn_fallback_warns_names_the_kernel_and_is_counted(monkeypatch):
    from amips.kernels import _backend, icnn

    g = torch.Generator().manual_seed(0)
    z, q = torch.randn(20, 24, generator=g), torch.randn(20, 16, generator=g)
    w, a, b = torch.randn(8, 24, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    want = icnn.icnn_layer_ref(z.double(), q.double(), w.double(), a.double(), b.double())
    _as_device(monkeypatch, icnn, "_icnn_fwd_kernel")
    with pytest.warns(RuntimeWarning, match="_icnn_fwd_kernel.*OutOfResources"):
        pre, out = icnn.icnn_layer_forward(z, q, w, a, b, "softleaky", 0.1, 1.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    events = _backend.fallback_events()
    assert len(events) == 1 and events[0]["kernel"] == "_icnn_fwd_kernel"
    _backend.clear_fallback_events()


def test_pq_scan_fallback_warns_and_matches_reference(monkeypatch):
    from amips.kernels import _backend, pq_scan

    g = torch.Generator().manual_seed(1)
    lut = torch.randn(3, 4, 16, generator=g)
    codes = pq_scan.pack_codes(torch.randint(0, 16, (50, 4), generator=g), 4)
    offsets = torch.tensor([0, 20, 50])
    probes = torch.tensor([[0, 1], [1, -1], [0, 0]])
    want = pq_scan.pq_scan_ref(lut, codes, offsets, probes, 5, bits=4)
    _as_device(monkeypatch, pq_scan, "_pq_scan_kernel")
    with pytest.warns(RuntimeWarning, match="_pq_scan_kernel"):
        got = pq_scan.pq_scan(lut, codes, offsets, probes, 5, bits=4)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert [e["kernel"] for e in _backend.fallback_events()] == ["_pq_scan_kernel"]
    _backend.clear_fallback_events()


def test_only_triton_failures_fall_back_and_strict_mode_names_the_kernel(monkeypatch):
    """An error of the torch code around a launch (here: a bug in the result's post-processing)
    propagates; a Triton launch failure falls back, or in strict mode raises naming the kernel."""
    from amips.kernels import _backend

    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    monkeypatch.delenv("AMIPS_BACKEND", raising=False)
    monkeypatch.delenv("AMIPS_STRICT_KERNELS", raising=False)
    _backend.clear_fallback_events()

    def torch_side_bug():
        return torch.zeros(3).view(2, 2)  # a shape error in amips code, not in Triton

    with pytest.raises(RuntimeError, match="shape"):
        _backend.launch_or_fallback("_k", torch_side_bug, lambda: "fallback")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        def oom():
            raise torch.cuda.OutOfMemoryError("simulated")
        _backend.launch_or_fallback("_k", oom, lambda: "fallback")
    assert _backend.fallback_events() == []

    broken = _Broken()[None]
    with pytest.warns(RuntimeWarning, match="_k"):
        assert _backend.launch_or_fallback("_k", broken, lambda: "fallback") == "fallback"
    assert [e["kernel"] for e in _backend.fallback_events()] == ["_k"]
    _backend.clear_fallback_events()

    def nan_result():
        raise _backend.KernelFailure("NaN tile maxima")

    with pytest.warns(RuntimeWarning, match="NaN"):
        assert _backend.launch_or_fallback("_k", nan_result, lambda: "fallback") == "fallback"
    _backend.clear_fallback_events()

    monkeypatch.setenv("AMIPS_STRICT_KERNELS", "1")
    with pytest.raises(_backend.KernelFallbackError, match="Triton kernel _k failed.*strict"):
        _backend.launch_or_fallback("_k", broken, lambda: "fallback")
    monkeypatch.delenv("AMIPS_STRICT_KERNELS")
    _backend.set_strict(True)
    try:
        with pytest.raises(_backend.KernelFallbackError):
            _backend.launch_or_fallback("_k", broken, lambda: "fallback")
    finally:
        _backend.set_strict(False)
    assert _backend.fallback_events() == []
