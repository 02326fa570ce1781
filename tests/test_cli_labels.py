"""`amips labels`: outputs, resume after kill -9, clear errors with no complete-looking output."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from amips.cli import main

PY = [sys.executable, "-m", "amips"]


def _data(tmp_path, nq=60, nk=900, d=20, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((nk, d)).astype(np.float32)
    queries = rng.standard_normal((nq, d)).astype(np.float32)
    np.save(tmp_path / "keys.npy", keys)
    np.save(tmp_path / "queries.npy", queries)
    return keys, queries


def test_labels_cli_writes_exact_outputs(tmp_path):
    keys, queries = _data(tmp_path)
    parts = np.random.default_rng(1).integers(0, 6, size=len(keys))
    np.save(tmp_path / "parts.npy", parts)
    out = tmp_path / "out"
    rc = main(["labels", "--keys", str(tmp_path / "keys.npy"), "--queries", str(tmp_path / "queries.npy"),
               "--out", str(out), "--topk", "5", "--partitions", str(tmp_path / "parts.npy"),
               "--batch-size", "16", "--shard-size", "250", "--quiet"])
    assert rc == 0
    ref = queries.astype(np.float64) @ keys.astype(np.float64).T
    top1 = np.load(out / "top1_index.npy")
    assert top1.dtype == np.int64 and np.load(out / "top1_score.npy").dtype == np.float32
    np.testing.assert_array_equal(top1, ref.argmax(1))
    np.testing.assert_array_equal(np.load(out / "topk_index.npy")[:, 0], top1)
    pidx = np.load(out / "partition_index.npy")
    assert pidx.shape == (60, 6)
    for p in range(6):
        members = np.nonzero(parts == p)[0]
        np.testing.assert_array_equal(pidx[:, p], members[ref[:, members].argmax(1)])
    manifest = json.loads((out / "labels.json").read_text())
    assert manifest["n_queries"] == 60 and not (out / ".amips_labels_partial").exists()
    # same command again: complete, nothing to do
    assert main(["labels", "--keys", str(tmp_path / "keys.npy"), "--queries", str(tmp_path / "queries.npy"),
                 "--out", str(out), "--topk", "5", "--partitions", str(tmp_path / "parts.npy"),
                 "--batch-size", "16", "--shard-size", "250", "--quiet"]) == 0


def test_labels_resume_after_kill_equals_clean_run(tmp_path):
    _data(tmp_path, nq=3000, nk=3000, d=16)
    args = ["labels", "--keys", str(tmp_path / "keys.npy"), "--queries", str(tmp_path / "queries.npy"),
            "--batch-size", "40", "--shard-size", "700", "--topk", "3", "--quiet"]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(PY + args + ["--out", str(killed)], env=env)
    partial = killed / ".amips_labels_partial"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and len(list(partial.glob("batch_*.npz"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "job ended before it could be killed; make it larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "top1_index.npy").exists(), "outputs must not appear before the job is done"
    assert subprocess.run(PY + args + ["--out", str(killed)], env=env).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run(PY + args + ["--out", str(clean)], env=env).returncode == 0
    for name in ("top1_index", "top1_score", "topk_index", "topk_score"):
        a = np.load(killed / f"{name}.npy")
        b = np.load(clean / f"{name}.npy")
        assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_labels_resume_from_mid_batch_shard_state(tmp_path):
    """A state file left after shard j (a kill inside a batch) is picked up, not recomputed."""
    from amips.labels import run_label_job

    keys, queries = _data(tmp_path, nq=20, nk=1000, d=8)
    clean = run_label_job(tmp_path / "keys.npy", tmp_path / "queries.npy", tmp_path / "clean",
                          batch_size=20, shard_size=300, progress=False)
    assert clean["n_queries"] == 20
    out = tmp_path / "out"

    import amips.labels as labels_mod

    calls = {"n": 0}
    real_screen = labels_mod.BatchLabeler.screen

    def dying_screen(self, q, j, state, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # simulated kill after two shards were committed
        return real_screen(self, q, j, state, **kw)

    labels_mod.BatchLabeler.screen = dying_screen
    try:
        with pytest.raises(KeyboardInterrupt):
            run_label_job(tmp_path / "keys.npy", tmp_path / "queries.npy", out,
                          batch_size=20, shard_size=300, progress=False)
    finally:
        labels_mod.BatchLabeler.screen = real_screen
    assert (out / ".amips_labels_partial" / "batch_000000.state.pt").exists()
    seen = []

    def counting_screen(self, q, j, state, **kw):
        seen.append(j)
        return real_screen(self, q, j, state, **kw)

    labels_mod.BatchLabeler.screen = counting_screen
    try:
        run_label_job(tmp_path / "keys.npy", tmp_path / "queries.npy", out,
                      batch_size=20, shard_size=300, progress=False)
    finally:
        labels_mod.BatchLabeler.screen = real_screen
    assert seen == [2, 3]
    for name in ("top1_index", "top1_score"):
        assert np.array_equal(np.load(out / f"{name}.npy"), np.load(tmp_path / "clean" / f"{name}.npy"))


@pytest.mark.parametrize(
    "setup,match",
    [
        ("nan_keys", "keys: contains NaN or inf"),
        ("dim", "dimension mismatch"),
        ("int_queries", "queries: expected numeric"),
        ("parts_len", "partitions: expected 50 entries"),
        ("missing", "no such file"),
        ("topk", "topk: must be <= 128"),
    ],
)
def test_labels_cli_bad_input_exits_nonzero(tmp_path, capsys, setup, match):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((50, 4)).astype(np.float32)
    queries = rng.standard_normal((10, 4)).astype(np.float32)
    extra = []
    if setup == "nan_keys":
        keys[7, 2] = np.nan
    if setup == "dim":
        queries = queries[:, :3]
    if setup == "int_queries":
        queries = np.ones((10, 4), dtype=np.complex64)
    if setup == "parts_len":
        np.save(tmp_path / "p.npy", np.zeros(49, dtype=np.int64))
        extra = ["--partitions", str(tmp_path / "p.npy")]
    if setup == "topk":
        extra = ["--topk", "500"]
    np.save(tmp_path / "keys.npy", keys)
    np.save(tmp_path / "queries.npy", queries)
    kpath = tmp_path / ("nope.npy" if setup == "missing" else "keys.npy")
    out = tmp_path / "out"
    rc = main(["labels", "--keys", str(kpath), "--queries", str(tmp_path / "queries.npy"),
               "--out", str(out), "--quiet", *extra])
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (out / "top1_index.npy").exists() and not (out / "labels.json").exists()


def test_labels_cli_refuses_other_jobs_output(tmp_path, capsys):
    _data(tmp_path, nq=5, nk=30, d=4)
    base = ["labels", "--keys", str(tmp_path / "keys.npy"), "--queries", str(tmp_path / "queries.npy"),
            "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base) == 0
    assert main(base + ["--topk", "2"]) == 2
    assert "different job" in capsys.readouterr().err
    assert main(base + ["--topk", "2", "--overwrite"]) == 0
    assert np.load(tmp_path / "o" / "topk_index.npy").shape == (5, 2)


def test_labels_on_wordnet_reproduces_ground_truth(shared_data, tmp_path):
    """The README's exact top-1 facts for ../shared/data/wordnet (tie-aware)."""
    root = shared_data / "wordnet"
    rc = main(["labels", "--keys", str(root / "keys.npy"), "--queries", str(root / "queries_test.npy"),
               "--out", str(tmp_path / "wn"), "--quiet"])
    assert rc == 0
    idx = np.load(tmp_path / "wn" / "top1_index.npy")
    gt = np.load(root / "gt_test_top1.npy")
    gt_score = np.load(root / "gt_test_top1_score.npy")
    keys = np.load(root / "keys.npy", mmap_mode="r")
    q = np.load(root / "queries_test.npy").astype(np.float64)
    score = np.einsum("ij,ij->i", q, np.asarray(keys[idx], dtype=np.float64))
    assert np.all(np.abs(score - gt_score) <= 1e-9 * np.abs(gt_score))
    # ties broken by the lowest index, as the README's oracle does: identical, not just tie-aware
    np.testing.assert_array_equal(idx, gt)
    assert abs(float(np.load(tmp_path / "wn" / "top1_score.npy").astype(np.float64).mean()) - 0.635679) < 1e-6
