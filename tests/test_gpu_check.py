"""bench/gpu_check.py: its --cpu-smoke mode runs every step's code at tiny shapes on CPU
(Triton interpreter), and every failed step or kernel fallback makes it exit non-zero."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_script_needs_no_faiss_at_module_level_and_parses_as_python_312():
    tree = ast.parse(SCRIPT.read_text(), feature_version=(3, 12))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"faiss", "scann", "amips", "torch", "triton"}, names
    assert "faiss" not in SCRIPT.read_text().replace("no faiss", "")


def test_cpu_smoke_runs_every_benchmark_step(gpu_check, tmp_path):
    rc = gpu_check.main(["--out", str(tmp_path), "--cpu-smoke", "--skip", "tests"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert rc == 0, md
    csv = (tmp_path / "gpu_check.csv").read_text()
    for bench in ("labels top-1", "icnn train step", "ivf search", "pq scan bandwidth"):
        assert bench in md and bench in csv, bench
    for word in ("TFLOP/s", "samples/s", "queries/s", "share", "torch ", "triton ", "commit "):
        assert word in md, word
    assert "failures: 0" in md and "queries wrong | 0" in md


def test_failed_step_and_kernel_fallback_are_failures(gpu_check, tmp_path, monkeypatch):
    from amips.kernels import _backend

    def failing(chk, shapes):
        raise RuntimeError("simulated failure")

    def falling_back(chk):
        _backend._FALLBACKS.append({"kernel": "_pq_scan_kernel", "error": "simulated"})

    monkeypatch.setattr(gpu_check, "step_ivf", failing)
    monkeypatch.setattr(gpu_check, "step_tests", falling_back)
    rc = gpu_check.main(["--out", str(tmp_path), "--cpu-smoke", "--skip", "labels,icnn,pq"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert rc == 1
    assert "failures: 2" in md and "simulated failure" in md and "_pq_scan_kernel" in md
    _backend.clear_fallback_events()
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-smoke", "--skip", "nonsense"]) == 2
