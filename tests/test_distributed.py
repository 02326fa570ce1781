"""torch.distributed scale-out: 2 gloo processes on CPU against one process.

One torchrun launch runs every collective scenario (tests/_dist_worker.py); a second pair
of processes is killed mid-job and rerun. Every launch has a timeout, and collectives
time out through AMIPS_DIST_TIMEOUT, so a broken check fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import amips.train as T
from amips import distributed
from amips._validate import InputError
from amips.index.ivf import IVFIndex
from amips.index.sharded import ShardedIVFIndex, assign_lists, merge_topk
from amips.labels import run_label_job
from amips.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("top1_index", "top1_score", "topk_index", "topk_score", "partition_index", "partition_score")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _torch_backend():
    # the torch references (the CPU path): under the Triton interpreter the kernels would
    # make every search take minutes; the kernels have their own tests
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AMIPS_BACKEND", "torch")
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", AMIPS_BACKEND="torch", AMIPS_DIST_TIMEOUT="60")
    env.update(extra)
    return env


def _spec() -> dict:
    train_base = dict(width=16, depth=2, steps=6, batch_size=32, lr=3e-3, warmup=2, eval_every=3,
                      checkpoint_every=3, val_fraction=0.1, ema=0.9, noise=0.2, noise_fraction=0.5)
    return {
        "labels": {
            "top1": {"batch_size": 40, "shard_size": 50},
            "topk_parts": {"topk": 5, "partitions": True, "batch_size": 40, "shard_size": 50},
            "parts": {"partitions": True, "batch_size": 64},
        },
        "train": {
            "keynet": {**train_base, "model": "keynet"},
            "supportnet": {**train_base, "model": "supportnet", "w_key": 0.5},
        },
        "resume": {**train_base, "model": "keynet", "steps": 8, "checkpoint_every": 4, "eval_every": 4},
        "nprobes": [1, 3, 6],
        "k": 7,
    }


def _tie_data(root: Path, n_keys=240, n_queries=120, d=8, seed=0):
    """Small-integer vectors: many exactly tied scores, and duplicated keys across the
    boundary between the two ranks' key slices."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-2, 3, (n_keys, d)).astype(np.float32)
    keys[n_keys // 2 + 3: n_keys // 2 + 13] = keys[10:20]
    np.save(root / "keys.npy", keys)
    np.save(root / "queries.npy", rng.integers(-2, 3, (n_queries, d)).astype(np.float32))
    np.save(root / "partitions.npy", rng.integers(0, 6, n_keys).astype(np.int64))
    np.save(root / "one_key.npy", keys[:1])
    return keys


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Single-process references, then ONE torchrun launch of 2 gloo ranks."""
    case = tmp_path_factory.mktemp("case")
    out = tmp_path_factory.mktemp("out")
    spec = _spec()
    (case / "spec.json").write_text(json.dumps(spec))
    keys = _tie_data(case)
    IVFIndex.build(keys, 6, seed=0, kmeans_backend="torch").save(case / "index")
    # a single-process run interrupted after its step-4 checkpoint, resumed by 2 ranks
    real = T._ema_update

    def dying(ema, model, decay):
        if decay == min(0.9, 5.0 / 14.0):  # the 5th step
            raise KeyboardInterrupt
        real(ema, model, decay)

    T._ema_update = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            train(case / "keys.npy", case / "queries.npy", case / "resume_run", TrainConfig(**spec["resume"]),
                  progress=False)
    finally:
        T._ema_update = real
    assert (case / "resume_run" / "checkpoint.safetensors").exists()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), str(ROOT / "tests" / "_dist_worker.py"), str(case), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return case, out, spec, ranks


def _same_files(a: Path, b: Path, names=OUTPUTS):
    compared = 0
    for name in names:
        fa, fb = a / f"{name}.npy", b / f"{name}.npy"
        assert fa.exists() == fb.exists(), name
        if fa.exists():
            assert fa.read_bytes() == fb.read_bytes(), f"{name} differs"
            compared += 1
    return compared


def test_distributed_labels_equal_single_process_byte_for_byte(launched, tmp_path):
    case, out, spec, _ = launched
    for name, kw in spec["labels"].items():
        kw = dict(kw)
        parts = case / "partitions.npy" if kw.pop("partitions", False) else None
        run_label_job(case / "keys.npy", case / "queries.npy", tmp_path / name, partitions_path=parts,
                      progress=False, **kw)
        assert _same_files(tmp_path / name, out / f"labels_{name}") >= 2
        manifest = json.loads((out / f"labels_{name}" / "labels.json").read_text())
        assert manifest["world_size"] == 2
        assert manifest["job"] == json.loads((tmp_path / name / "labels.json").read_text())["job"]
        assert not (out / f"labels_{name}" / ".amips_labels_partial").exists()
    # the tie structure is really exercised: duplicated keys on both ranks' slices
    top1 = np.load(out / "labels_top1" / "top1_index.npy")
    assert (top1 < 120).any() and (top1 >= 120).any()


def test_bad_configurations_fail_on_every_rank(launched):
    _, _, _, ranks = launched
    for seen in ranks:
        assert seen["world_size"] == 2
        assert "arguments differ across ranks" in seen["errors"]["mismatched"]
        assert "topk" in seen["errors"]["mismatched"]
        assert "only 1 keys" in seen["errors"]["too_few_keys"]
        assert "not a multiple of the world size" in seen["errors"]["batch_not_multiple"]
        assert "arguments differ across ranks" in seen["errors"]["train_mismatched"]
        assert "steps" in seen["errors"]["train_mismatched"]
        assert "already holds a run" in seen["errors"]["existing_run"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _close_runs(a: Path, b: Path, tol=1e-4):
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=tol, rtol=tol)
    ma, mb = _metrics(a), _metrics(b)
    assert [(m["step"], m["split"]) for m in ma] == [(m["step"], m["split"]) for m in mb]
    for x, y in zip(ma, mb):
        for key, v in x.items():
            if isinstance(v, float) and key not in ("elapsed_s",):
                assert y[key] == pytest.approx(v, rel=tol, abs=tol), (key, x["step"])


@pytest.mark.parametrize("kind", ["keynet", "supportnet"])
def test_ddp_training_equals_single_process(launched, tmp_path, kind):
    case, out, spec, _ = launched
    train(case / "keys.npy", case / "queries.npy", tmp_path / "one", TrainConfig(**spec["train"][kind]),
          partitions=case / "partitions.npy" if kind != "keynet" else None, progress=False)
    _close_runs(tmp_path / "one", out / f"train_{kind}")
    # rank 0 wrote the checkpoint; its generators equal one process's after the same steps
    ca = load_file(str(tmp_path / "one" / "checkpoint.safetensors"))
    cb = load_file(str(out / f"train_{kind}" / "checkpoint.safetensors"))
    assert torch.equal(ca["rng.cpu"], cb["rng.cpu"]) and torch.equal(ca["rng.device"], cb["rng.device"])


def test_resume_on_a_different_world_size(launched, tmp_path):
    case, _, spec, _ = launched
    train(case / "keys.npy", case / "queries.npy", tmp_path / "whole", TrainConfig(**spec["resume"]),
          progress=False)
    state = json.loads((case / "resume_run" / "state.json").read_text())
    assert state["finished"] and state["step"] == 8
    _close_runs(tmp_path / "whole", case / "resume_run")


def test_sharded_search_equals_unsharded(launched):
    case, out, spec, ranks = launched
    index = IVFIndex.load(case / "index")
    assert sorted(r["owned_lists"] for r in ranks) and sum(r["owned_lists"] for r in ranks) == index.n_lists
    assert all(r["keys_equal"] for r in ranks)
    q = torch.from_numpy(np.load(case / "queries.npy"))
    for r in range(2):
        got = np.load(out / f"search_rank{r}.npz")
        for nprobe in spec["nprobes"]:
            s, i = index.search(q, spec["k"], nprobe)
            assert np.array_equal(got[f"scores_{nprobe}"], s.numpy()), nprobe
            assert np.array_equal(got[f"ids_{nprobe}"], i.numpy()), nprobe


def test_sharded_pieces_in_one_process(tmp_path):
    keys = _tie_data(tmp_path)
    index = IVFIndex.build(keys, 6, seed=0, kmeans_backend="torch")
    owner = assign_lists(index.list_sizes, 2)
    assert set(owner.tolist()) == {0, 1}
    loads = [int(index.list_sizes[owner == r].sum()) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= int(index.list_sizes.max())
    q = torch.from_numpy(np.load(tmp_path / "queries.npy"))
    shards = [ShardedIVFIndex(index, rank=r, world_size=2) for r in range(2)]
    assert sum(s.local.n_keys for s in shards) == index.n_keys
    # each rank's own search, merged the way the collective merges, is the full search
    parts = []
    for s in shards:
        route = s.router().route(q, 4)
        mine = torch.where(s.owned[route.lists], route.lists, torch.full_like(route.lists, -1))
        sc, pos = s.local._scanner("exact").search(route.scan_queries, mine, 5)
        gpos = torch.where(pos >= 0, s.global_rows[pos.clamp(min=0)], pos)
        ids = torch.where(pos >= 0, s.local.ids[pos.clamp(min=0)], pos)
        parts.append((sc, gpos, ids))
    ms, _, mi = merge_topk(*(torch.cat([p[j] for p in parts], 1) for j in range(3)), 5)
    s_ref, i_ref = index.search(q, 5, 4)
    assert torch.equal(ms, s_ref) and torch.equal(mi, i_ref)
    with pytest.raises(InputError, match="only 6 lists"):
        ShardedIVFIndex(index, rank=0, world_size=7)
    with pytest.raises(InputError, match="rank"):
        ShardedIVFIndex(index, rank=2, world_size=2)
    with pytest.raises(InputError, match="scanner"):
        shards[0].search(q, 5, 2, scanner="pq")


def test_key_range_and_environment(monkeypatch):
    assert [distributed.key_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(InputError, match="world size"):
        distributed.key_range(2, 0, 3)
    assert distributed.backend_for("cpu") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            distributed.backend_for("cuda")
    monkeypatch.setenv("AMIPS_DIST_TIMEOUT", "soon")
    with pytest.raises(InputError, match="AMIPS_DIST_TIMEOUT"):
        distributed.timeout_s()
    for v in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    assert not distributed.launched_by_torchrun()
    with distributed.session("cpu") as dev:  # no torchrun: nothing to join
        assert dev == "cpu" and not distributed.is_distributed()


def _start_ranks(case: Path, out: Path, port: int) -> list[subprocess.Popen]:
    """What torchrun starts: one `python -m amips labels` per rank, with its variables."""
    procs = []
    for r in range(2):
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AMIPS_DIST_TIMEOUT="20")
        cmd = [sys.executable, "-m", "amips", "labels", "--keys", str(case / "keys.npy"), "--queries",
               str(case / "queries.npy"), "--out", str(out), "--topk", "3", "--partitions",
               str(case / "partitions.npy"), "--batch-size", "16", "--shard-size", "200", "--quiet"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_rank_killed_mid_job_then_rerun_finishes_identically(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    _tie_data(case, n_keys=600, n_queries=1600, d=16, seed=3)
    out = tmp_path / "two"
    procs = _start_ranks(case, out, _free_port())
    work1 = out / ".amips_labels_partial" / "rank0001of0002"
    deadline = time.time() + 120
    try:
        while not list(work1.glob("batch_*.npz")):
            assert time.time() < deadline and procs[1].poll() is None, "rank 1 never committed a batch"
            time.sleep(0.005)
        os.kill(procs[1].pid, signal.SIGKILL)  # a rank dies mid-job ...
        os.kill(procs[0].pid, signal.SIGKILL)  # ... and torchrun stops the others
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert not (out / "labels.json").exists(), "the job finished before the kill; make it longer"
    done_before = len(list(work1.glob("batch_*.npz")))
    assert 0 < done_before < 1600 // 16
    procs = _start_ranks(case, out, _free_port())
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    run_label_job(case / "keys.npy", case / "queries.npy", tmp_path / "one", topk=3,
                  partitions_path=case / "partitions.npy", batch_size=16, shard_size=200, progress=False)
    assert _same_files(tmp_path / "one", out) == 6
    assert json.loads((out / "labels.json").read_text())["world_size"] == 2
