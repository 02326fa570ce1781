"""Noisy copies made once: deterministic, exactly labelled, no validation leak, resumable."""

import json

import numpy as np
import pytest
import torch

import amips.labels as L
import amips.noisy as N
from amips import InputError
from amips.cli import main
from amips.train import TrainConfig, split_queries, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("AMIPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    keys = (rng.standard_normal((90, 12)) * np.exp(0.4 * rng.standard_normal((90, 1)))).astype(np.float32)
    keys[7] = keys[3]  # a tied pair
    queries = rng.standard_normal((40, 12)).astype(np.float32)
    part = rng.integers(0, 7, 90).astype(np.int64)
    part[part == 5] = 4  # list 5 is empty
    return torch.from_numpy(keys), torch.from_numpy(queries), part


def test_copies_deterministic_and_near_their_query(data):
    _, q, _ = data
    base = np.array([0, 5, 9, 31])
    a = N.make_copies(q, base, 3, 0.1, seed=11)
    b = N.make_copies(q, base, 3, 0.1, seed=11)
    c = N.make_copies(q, base, 3, 0.1, seed=12)
    assert a.shape == (12, 12) and torch.equal(a, b) and not torch.equal(a, c)
    src = q[torch.from_numpy(base)].repeat_interleave(3, 0)
    torch.testing.assert_close(a.norm(dim=1), src.norm(dim=1), rtol=1e-5, atol=0)
    cos = torch.nn.functional.cosine_similarity(a, src)
    assert bool((cos > 0.9).all()) and bool((cos < 1).all())
    with pytest.raises(InputError, match="noise_copies"):
        N.make_copies(q, base, -1, 0.1, 0)
    with pytest.raises(InputError, match="base"):
        N.make_copies(q, np.array([40]), 1, 0.1, 0)


def test_labels_equal_fp64_oracle(tmp_path, data):
    keys, q, part = data
    copies = N.make_copies(q, np.arange(10), 2, 0.2, seed=0)
    copies[3] = keys[3] * 2  # exact tie between keys 3 and 7: lowest index wins
    lab = N.label_copies(copies, keys, tmp_path / "noisy", fingerprint="x", partition_ids=part,
                         n_partitions=7, chunk=6, progress=False)
    s = copies.double() @ keys.double().T
    best = s.max(1).values
    assert torch.equal(lab["top1_index"], s.argmax(1))  # argmax takes the lowest tied index
    torch.testing.assert_close(lab["top1_score"].double(), best, rtol=1e-6, atol=1e-6)
    for p in range(7):
        col = lab["partition_score"][:, p].double()
        members = torch.from_numpy(part == p)
        if not bool(members.any()):
            assert bool(torch.isneginf(col).all())
        else:
            torch.testing.assert_close(col, s[:, members].max(1).values, rtol=1e-6, atol=1e-6)
    manifest = json.loads((tmp_path / "noisy" / "manifest.json").read_text())
    assert manifest["complete"] and not (tmp_path / "noisy" / "parts").exists()


def test_resume_after_kill_during_bulk_labelling(tmp_path, data, monkeypatch):
    keys, q, part = data
    copies = N.make_copies(q, np.arange(30), 2, 0.1, seed=0)  # 60 rows, chunks of 8 -> 8 chunks
    calls = []
    real = L.Labeler.__call__

    def dying(self, x):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(L.Labeler, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        N.label_copies(copies, keys, tmp_path / "n", fingerprint="f", partition_ids=part,
                       n_partitions=7, chunk=8, progress=False)
    assert len(list((tmp_path / "n" / "parts").glob("*.npz"))) == 3
    assert not json.loads((tmp_path / "n" / "manifest.json").read_text())["complete"]
    monkeypatch.setattr(L.Labeler, "__call__", lambda self, x: (calls.append(x.shape[0]), real(self, x))[1])
    calls.clear()
    resumed = N.label_copies(copies, keys, tmp_path / "n", fingerprint="f", partition_ids=part,
                             n_partitions=7, chunk=8, progress=False)
    assert calls == [8, 8, 8, 8, 4]  # only the five missing chunks were labelled
    fresh = N.label_copies(copies, keys, tmp_path / "m", fingerprint="f", partition_ids=part,
                           n_partitions=7, chunk=8, progress=False)
    for name in fresh:
        assert torch.equal(resumed[name], fresh[name])
    # a complete cache is read back, a cache for another fingerprint is redone
    calls.clear()
    N.label_copies(copies, keys, tmp_path / "n", fingerprint="f", partition_ids=part, n_partitions=7,
                   chunk=8, progress=False)
    assert calls == []
    N.label_copies(copies, keys, tmp_path / "n", fingerprint="g", partition_ids=part, n_partitions=7,
                   chunk=8, progress=False)
    assert len(calls) == 8


def test_training_uses_copies_of_training_queries_only(tmp_path, data):
    keys, q, part = data
    cfg = TrainConfig(model="supportnet", width=16, depth=2, steps=4, batch_size=16, warmup=1,
                      eval_every=4, checkpoint_every=4, noise=0.1, noise_copies=3, val_fraction=0.25)
    train(keys.numpy(), q.numpy(), tmp_path / "run", cfg, partitions=part, progress=False)
    train_idx, val_idx = split_queries(40, 0.25, 0)
    root = tmp_path / "run" / "noisy"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n"] == 3 * len(train_idx)
    copies = N.make_copies(q, train_idx, 3, 0.1, 0)
    # every copy sits next to its own training query, never next to a validation query
    nearest = torch.cdist(copies, q).argmin(1).numpy()
    assert set(nearest) <= set(train_idx.tolist()) and not set(nearest) & set(val_idx.tolist())
    assert np.array_equal(nearest, np.repeat(train_idx, 3))
    top1 = np.load(root / "top1_index.npy")
    assert np.array_equal(top1, (copies.double() @ keys.double().T).argmax(1).numpy())
    assert np.load(root / "partition_score.npy").shape == (3 * len(train_idx), 7)
    cfg_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_json["train"]["noise_copies"] == 3 and not cfg_json["train"]["noise_online"]


def test_pool_draws_copies_of_the_same_query(data):
    _, q, _ = data
    base = np.arange(5)
    copies = N.make_copies(q, base, 4, 0.05, 0)
    lab = {"top1_index": torch.arange(20), "top1_score": torch.arange(20).float()}
    pool = N.NoisyPool(copies, lab, 4, 0.5, "cpu")
    pos = torch.tensor([0, 1, 2, 3, 4] * 40)
    qq = q[pos]
    s, i = torch.full((200,), -1.0), torch.full((200,), -1)
    out_q, out_s, out_i, _ = pool.draw(pos, qq, s, i, None, torch.Generator().manual_seed(0))
    swapped = out_i >= 0
    assert 0.3 < float(swapped.float().mean()) < 0.7
    assert torch.equal(out_i[swapped] // 4, pos[swapped])  # a copy of the row's own query
    assert torch.equal(out_q[swapped], copies[out_i[swapped]])
    assert torch.equal(out_q[~swapped], qq[~swapped])


def test_bad_options_and_step_clock(tmp_path, data, capsys):
    keys, q, _ = data
    with pytest.raises(InputError, match="noise_copies"):
        TrainConfig(noise_copies=-2).validate()
    np.save(tmp_path / "k.npy", keys.numpy())
    np.save(tmp_path / "q.npy", q.numpy())
    rc = main(["train", "--keys", str(tmp_path / "k.npy"), "--queries", str(tmp_path / "q.npy"),
               "--model", "keynet", "--out", str(tmp_path / "r"), "--noise-copies", "-1"])
    assert rc == 2 and "noise_copies" in capsys.readouterr().err
    lines = []
    clock = N.StepClock(0, 100, after=2, write=lines.append)
    for step in range(1, 6):
        clock.tick(step)
    assert len(lines) == 1 and "s per step" in lines[0] and "97 steps" in lines[0]
