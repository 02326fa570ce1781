"""bench/gpu_check.py: runs from a bare copy of the tree (no install), keeps every finished
row when killed, and turns a failed, crashed, hung or falling-back step into a failure row
while the other steps still run. All through ``--cpu-smoke`` (interpreter, tiny shapes)."""

from __future__ import annotations

import ast
import csv
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "AMIPS_BACKEND", "PYTHONPATH", "AMIPS_GPU_CHECK_INJECT")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _rows(out: Path) -> list[dict]:
    with open(out / "gpu_check.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _status(rows: list[dict]) -> dict[str, str]:
    return {r["step"]: r["value"] for r in rows if r["metric"] == "status" and r["provider"] == "step"}


def test_script_needs_no_faiss_at_module_level_and_parses_as_python_312():
    tree = ast.parse(SCRIPT.read_text(), feature_version=(3, 12))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"faiss", "scann", "amips", "torch", "triton", "numpy"}, names
    assert "import faiss" not in SCRIPT.read_text()


def _archive(dest: Path) -> None:
    """The tree as committed (plus uncommitted edits of tracked files), no install."""
    try:
        ref = subprocess.run(["git", "stash", "create"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip() or "HEAD"
        blob = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no archive to test")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data") if sys.version_info >= (3, 12) else tar.extractall(dest)


def test_cpu_smoke_from_a_bare_archive_runs_every_step_from_that_copy(tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    _archive(tree)
    assert not (tree / "amips" / "kernels").exists()  # kernels/ sits beside amips/, uninstalled
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--cpu-smoke"],
                          cwd=tree, env=_env(), capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    # the archive's own code ran, not the editable install of this checkout
    assert f"source = {tree.resolve()}/amips/__init__.py" in text, text[:3000]
    assert f"kernels {tree.resolve()}/kernels/__init__.py" in text
    rows = _rows(out)
    assert _status(rows) == {s: "ok" for s in ("labels", "pq", "ivf", "icnn", "mol", "tests")}
    md = (out / "gpu_check.md").read_text()
    assert "failures: 0" in md
    values = {(r["step"], r["metric"]): r["value"] for r in rows}
    assert values[("labels", "queries wrong")] == "0"  # checked before timed
    assert values[("pq", "entries wrong")] == "0"
    for bench in ("labels top-1", "pq scan", "ivf search", "icnn train step", "mol screen"):
        assert any(r["bench"] == bench for r in rows) and f"| {bench} |" in md, bench
    for metric in ("TFLOP/s", "GB/s", "queries/s", "samples/s", "query-items/s",
                   "re-screened queries (fp32)", "fp64 fallback queries", "match@1 (fp64 re-scored)"):
        assert any(r["metric"] == metric for r in rows), metric


def _worker_alive(out: Path) -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "--worker" in cmd and str(out) in cmd:
            return True
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
def test_killed_halfway_keeps_a_row_per_finished_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--cpu-smoke"],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.2)
            if (out / "gpu_check.csv").exists() and len(_status(_rows(out))) >= 2:
                break
        else:
            pytest.fail("no step finished within 300 s")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    progress = (out / ".gpu_check_progress").read_text().split("\n")
    finished = [line.split()[1] for line in progress if line.startswith("done ")]
    assert finished, progress
    rows, md = _rows(out), (out / "gpu_check.md").read_text()
    status = _status(rows)
    for step in finished:  # every finished step left its rows and its status
        assert status.get(step) == "ok", (step, status)
        assert any(r["step"] == step and r["metric"] != "status" for r in rows), step
        assert f"| {step} | {step} | step | status | ok |" in md
    assert len(finished) < 6  # it really was killed halfway
    for _ in range(50):  # the worker died with its parent: nothing is left on the device
        if not _worker_alive(out):
            break
        time.sleep(0.2)
    assert not _worker_alive(out)


def test_failures_are_rows_and_the_remaining_steps_still_run(tmp_path):
    out = tmp_path / "out"
    inject = "labels=raise,pq=crash,ivf=hang,mol=fallback"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--cpu-smoke",
                           "--skip", "icnn,tests", "--step-timeout-s", "20"],
                          cwd=ROOT, env=_env(AMIPS_GPU_CHECK_INJECT=inject), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(out)
    status = _status(rows)
    assert status["labels"] == "FAILED"
    assert status["pq"] == "CRASHED"  # its process died: ivf ran in a fresh one
    assert status["ivf"] == "TIMEOUT"  # killed at its deadline: mol ran in a fresh one
    assert status["mol"] == "ok"
    assert any(r["provider"] == "_injected_kernel" and r["value"] == "FALLBACK" for r in rows)
    assert status["icnn"] == status["tests"] == "skipped (--skip)"
    md = (out / "gpu_check.md").read_text()
    assert "failures: 4" in md and "injected failure" in md and "_injected_kernel" in md
    assert any(r["step"] == "mol" and r["metric"] == "query-items/s" for r in rows)


def test_bad_arguments_exit_2(tmp_path):
    for bad in (["--skip", "nonsense"], ["--budget-s", "0"]):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--cpu-smoke", *bad],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "gpu_check: error:" in proc.stderr, proc.stderr


def test_gpu_mode_without_a_gpu_is_refused_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(TRITON_INTERPRET="1", AMIPS_BACKEND="torch"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cleared inherited TRITON_INTERPRET=1" in proc.stderr
    assert "cleared inherited AMIPS_BACKEND=torch" in proc.stderr
    assert "gpu_check: preflight: no CUDA device" in proc.stderr
    assert "REFUSED" in (tmp_path / "gpu_check.md").read_text()
