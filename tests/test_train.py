"""Training: loss goes down, split by original query, exact resume, run folder, CLI, errors."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import amips.train as T
from amips import InputError, load_model
from amips.cli import main
from amips.data import synthetic
from amips.train import TrainConfig, evaluate, split_queries, train

# tiny shapes: several intra-op threads only contend on the shared CI cores
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # training tests exercise the loop; the fused kernels are checked in test_icnn/test_models
    # (under the Triton interpreter they would make every step take seconds)
    monkeypatch.setenv("AMIPS_BACKEND", "torch")



@pytest.fixture(scope="module")
def data():
    ds = synthetic(60, 300, 16, n_clusters=8, seed=0, test_fraction=0.2)
    part = (np.arange(60) % 6).astype(np.int64)
    return ds, part


def _cfg(**kw):
    base = dict(width=32, depth=2, steps=30, batch_size=64, lr=3e-3, warmup=3, eval_every=10,
                checkpoint_every=5, noise=0.0, val_fraction=0.1, ema=0.9)
    base.update(kw)
    return TrainConfig(**base)


def _losses(rundir):
    rows = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("kind", ["keynet", "supportnet"])
def test_training_lowers_loss(tmp_path, data, kind):
    ds, _ = data
    metrics = train(ds.keys, ds.queries_train, tmp_path / "run", _cfg(model=kind, steps=60, lr=1e-2), progress=False)
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-1:]) < 0.6 * losses[0]
    model = load_model(tmp_path / "run")
    assert model.kind == kind and not model.training
    assert metrics["rel_key_error_median"] < 1.5
    # evaluation of the saved model equals the metrics recorded at the end of training
    val = json.loads((tmp_path / "run" / "split.json").read_text())["val_index"]
    lab = T.load_or_compute_labels(torch.from_numpy(ds.queries_train), torch.from_numpy(ds.keys),
                                   cache_dir=tmp_path / "run" / "labels", progress=False)
    again = evaluate(model, ds.queries_train[val], ds.keys, lab["top1_index"][val], lab["top1_score"][val])
    assert again["score_mae"] == pytest.approx(metrics["score_mae"], rel=1e-5)


def test_multihead_with_noise_and_partitions(tmp_path, data):
    ds, part = data
    np.save(tmp_path / "partitions.npy", part)
    cents = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    np.save(tmp_path / "centroids.npy", cents)
    cfg = _cfg(model="supportnet", steps=8, noise=0.1, noise_fraction=0.5, w_key=0.5)
    metrics = train(ds.keys, ds.queries_train, tmp_path / "run", cfg,
                    partitions=tmp_path / "partitions.npy", progress=False)
    model = load_model(tmp_path / "run")
    assert model.n_heads == 6 and model.score(torch.from_numpy(ds.queries_test)).shape == (60, 6)
    assert model.config["n_partitions"] == 6
    sha = hashlib.sha256((tmp_path / "partitions.npy").read_bytes()).hexdigest()
    assert model.config["partitions_sha256"] == sha
    assert 0.0 <= metrics["routing_acc@1"] <= metrics["routing_acc@4"] <= 1.0
    # centroid routing used the centroids.npy beside the partitions file
    c = T.centroids_for(torch.from_numpy(part), torch.from_numpy(ds.keys), 6, tmp_path / "partitions.npy")
    torch.testing.assert_close(c, torch.from_numpy(cents))


@pytest.mark.parametrize("kind", ["router-mlp", "supportnet"])
def test_multihead_routers_start_at_centroid_routing(tmp_path, data, kind, monkeypatch):
    """With centroid_init (the default) a multi-head router's first step is centroid routing."""
    ds, part = data
    np.save(tmp_path / "partitions.npy", part)
    cents = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
    np.save(tmp_path / "centroids.npy", cents)
    seen = {}
    real_loss = T._loss

    def spy(model, q, *args):
        if "f" not in seen:
            with torch.no_grad():
                seen["f"] = model(q).float().clone()
                seen["q"] = q.detach().clone()
        return real_loss(model, q, *args)

    monkeypatch.setattr(T, "_loss", spy)
    train(ds.keys, ds.queries_train, tmp_path / "run", _cfg(model=kind, steps=2, w_key=0.0),
          partitions=tmp_path / "partitions.npy", progress=False)
    f, q = seen["f"], seen["q"]
    # each head = <q, centroid> + a per-head offset (router-mlp: exactly; the convex
    # SupportNet adds its positive hidden-to-output part, so compare the ranking signal)
    lin = q @ torch.from_numpy(cents).T
    if kind == "router-mlp":
        torch.testing.assert_close(f - lin, (f - lin)[:1].expand_as(f), atol=1e-4, rtol=1e-4)
    else:
        assert torch.corrcoef(torch.stack([(f - f.mean(0)).flatten(), (lin - lin.mean(0)).flatten()]))[0, 1] > 0.9
    model = load_model(tmp_path / "run")
    if kind == "router-mlp":
        assert model.config["linear_heads"] is True
        assert model.flops_per_query(with_key=False) >= 2 * 6 * 16


def test_centroid_init_can_be_turned_off(tmp_path, data):
    ds, part = data
    train(ds.keys, ds.queries_train, tmp_path / "run", _cfg(model="router-mlp", steps=2, w_key=0.0,
          centroid_init=False), partitions=part, progress=False)
    model = load_model(tmp_path / "run")
    assert model.lin is None and not model.config.get("linear_heads", False)


def test_run_from_before_the_router_options_resumes(tmp_path, data):
    """A run folder written before centroid_init/focus existed resumes as it started."""
    ds, part = data
    run = tmp_path / "run"
    train(ds.keys, ds.queries_train, run, _cfg(model="router-mlp", steps=4, w_key=0.0, centroid_init=False,
          focus=0.0), partitions=part, progress=False)
    cfg = json.loads((run / "config.json").read_text())
    for key in ("centroid_init", "focus"):
        del cfg["train"][key]
    cfg["model"].pop("linear_heads", None)
    (run / "config.json").write_text(json.dumps(cfg))
    # resuming with today's defaults is accepted and keeps the run's own behaviour
    train(ds.keys, ds.queries_train, run, _cfg(model="router-mlp", steps=4, w_key=0.0), partitions=part,
          progress=False, resume=True)
    assert load_model(run).lin is None
    again = json.loads((run / "config.json").read_text())["train"]
    assert again["centroid_init"] is False and again["focus"] == 0.0


def test_focus_weights():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 9, generator=g, dtype=torch.float64) * 0.1
    s[0, 3] = 5.0  # one list far ahead
    valid = torch.ones_like(s, dtype=torch.bool)
    valid[1, :2] = False  # empty lists
    s[1, :2] = float("-inf")
    w = T.focus_weights(s, valid, 0.65)
    assert torch.isfinite(w).all() and (w[valid] >= 1 / 3 - 1e-12).all()
    for r in range(5):
        assert w[r][valid[r]].mean() == pytest.approx(1.0)
        assert int(w[r].argmax()) == int(torch.where(valid[r], s[r], -torch.inf).argmax())
    assert w[0, 3] > 0.9 * (1 + 2 * 9) / 3  # nearly all the weight on the far-ahead list
    # the temperature follows the spread of the support values: scale-free
    torch.testing.assert_close(T.focus_weights(s * 7.0, valid, 0.65), w)
    # focus = 0 in the config means plain MSE (no weights at all)
    with pytest.raises(InputError, match="focus"):
        TrainConfig(focus=-1.0).validate()


def test_split_is_by_original_query(tmp_path, data, monkeypatch):
    tr, va = split_queries(1000, 0.1, seed=3)
    assert len(va) == 100 and not set(tr) & set(va) and len(set(tr) | set(va)) == 1000
    ds, _ = data
    seen = []
    real_loss = T._loss

    def spy(model, q, *args):
        seen.append(q.detach().clone())
        return real_loss(model, q, *args)

    monkeypatch.setattr(T, "_loss", spy)
    train(ds.keys, ds.queries_train, tmp_path / "run", _cfg(model="keynet", steps=10, noise=0.2,
          noise_fraction=1.0), progress=False)
    val = json.loads((tmp_path / "run" / "split.json").read_text())["val_index"]
    qv = torch.from_numpy(ds.queries_train[val])
    batch = torch.cat(seen)
    # every trained row is a noisy sibling of a training query: its nearest original query
    # is never a validation query
    q_all = torch.from_numpy(ds.queries_train)
    nearest = torch.cdist(batch, q_all).argmin(1)
    assert not set(nearest.tolist()) & set(val)
    assert torch.cdist(batch, qv).min() > 0


def test_resume_after_interruption_matches_uninterrupted(tmp_path, data, monkeypatch):
    ds, part = data
    cfg = _cfg(model="supportnet", steps=12, checkpoint_every=4, w_key=0.5, noise=0.05, noise_fraction=0.5)
    train(ds.keys, ds.queries_train, tmp_path / "full", cfg, partitions=part, progress=False)

    calls = {"n": 0}
    real_ema = T._ema_update

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # after the step-4 checkpoint, before the step-8 one: work is lost
            raise KeyboardInterrupt
        return real_ema(*args)

    monkeypatch.setattr(T, "_ema_update", dying)
    with pytest.raises(KeyboardInterrupt):
        train(ds.keys, ds.queries_train, tmp_path / "cut", cfg, partitions=part, progress=False)
    monkeypatch.setattr(T, "_ema_update", real_ema)
    (tmp_path / "cut" / "checkpoint.safetensors.tmp").write_bytes(b"half-written junk")
    with pytest.raises(InputError, match="--resume"):
        train(ds.keys, ds.queries_train, tmp_path / "cut", cfg, partitions=part, progress=False)
    train(ds.keys, ds.queries_train, tmp_path / "cut", cfg, partitions=part, progress=False, resume=True)
    a = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "val"]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_bad_configurations_and_inputs(tmp_path, data):
    ds, part = data
    bad = ds.queries_train.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="queries: contains NaN"):
        train(ds.keys, bad, tmp_path / "a", _cfg(model="keynet"), progress=False)
    with pytest.raises(InputError, match="dimension mismatch"):
        train(ds.keys, ds.queries_train[:, :8], tmp_path / "b", _cfg(model="keynet"), progress=False)
    with pytest.raises(InputError, match="partitions"):
        train(ds.keys, ds.queries_train, tmp_path / "c", _cfg(model="keynet"), partitions=part[:10],
              progress=False)
    with pytest.raises(InputError, match="model"):
        _cfg(model="transformer").validate()
    with pytest.raises(InputError, match="width and param_fraction"):
        _cfg(model="keynet", param_fraction=0.1).validate()
    with pytest.raises(InputError, match="noise_fraction"):
        _cfg(model="keynet", noise_fraction=2.0).validate()
    with pytest.raises(InputError, match="device"):
        train(ds.keys, ds.queries_train, tmp_path / "d", _cfg(model="keynet"), device="nonsense",
              progress=False)
    train(ds.keys, ds.queries_train, tmp_path / "e", _cfg(model="keynet", steps=2), progress=False)
    with pytest.raises(InputError, match="resume: training option lr"):
        train(ds.keys, ds.queries_train, tmp_path / "e", _cfg(model="keynet", steps=2, lr=0.1),
              progress=False, resume=True)


def test_cli_end_to_end(tmp_path, data, capsys):
    ds, part = data
    np.save(tmp_path / "keys.npy", ds.keys)
    np.save(tmp_path / "q.npy", ds.queries_train)
    np.save(tmp_path / "partitions.npy", part)
    args = ["train", "--keys", str(tmp_path / "keys.npy"), "--queries", str(tmp_path / "q.npy"),
            "--model", "router-mlp", "--out", str(tmp_path / "run"), "--partitions",
            str(tmp_path / "partitions.npy"), "--steps", "6", "--batch-size", "32",
            "--param-fraction", "2.0", "--depth", "2", "--noise", "0", "--quiet", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "routing_acc@1" in out and "x n_keys*d" in out
    model = load_model(tmp_path / "run")
    assert model.kind == "router-mlp" and model.n_heads == 6
    assert model.n_params() <= 2.0 * 60 * 16
    # a second run into the same folder without --resume is refused with exit status 2
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args[:-2] + ["--device", "cpu", "--resume"]) == 0
    bad = args.copy()
    bad[bad.index("--steps") + 1] = "0"
    bad[bad.index("--out") + 1] = str(tmp_path / "other")
    assert main(bad) == 2
    assert "steps" in capsys.readouterr().err
