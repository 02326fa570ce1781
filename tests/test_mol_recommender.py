"""MoL recommender: data split, training, id mapping of encode_users/topk, bad input."""

import json

import numpy as np
import pytest
import torch

import amips
from amips.mol import data as moldata
from amips.mol.recommender import full_scores, load, ranking_metrics
from amips.mol.training import FitConfig, fit, training_windows

TINY = {"d": 16, "n_layers": 1, "n_heads": 2, "max_len": 10, "dropout": 0.1, "p_q": 2, "p_x": 3,
        "d_p": 8, "tau": 0.05, "gating": "full", "gate_hidden": 16, "gate_dropout": 0.2}


def _tiny_cfg(similarity="mol", epochs=3, **kw):
    return FitConfig(similarity=similarity, epochs=epochs, patience=10, batch_size=32, n_uniform=32,
                     n_inbatch=32, warmup=5, model=dict(TINY), **kw)


def _write(path, text):
    path.write_text(text)
    return path


# --- data -------------------------------------------------------------------------------

def test_leave_last_out_orders_by_time_with_stable_ties(tmp_path):
    # user 5: rows out of order, two rows share timestamp 20 (file order keeps 30 before 10)
    csv = _write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n"
                 "5,30,4.0,20\n5,10,3.0,20\n5,40,1.0,5\n5,20,5.0,99\n5,50,2.0,50\n"
                 "9,10,1,3\n9,20,1,1\n9,40,1,2\n")
    inter = moldata.load_interactions(csv)
    assert inter.user_ids.tolist() == [5, 9] and inter.item_ids.tolist() == [10, 20, 30, 40, 50]
    ext = lambda a: inter.item_ids[a].tolist()
    assert ext(inter.sequence(0)) == [40, 30, 10, 50, 20]
    assert ext(inter.history(0, "train")) == [40, 30, 10]
    assert inter.item_ids[inter.target(0, "validation")] == 50
    assert inter.item_ids[inter.target(0, "test")] == 20
    assert ext(inter.history(0, "test")) == [40, 30, 10, 50]
    assert ext(inter.sequence(1)) == [20, 40, 10]
    assert ext(inter.history(1, "validation")) == [20]
    # windows: every training transition exactly once, left-padded, items shifted by one
    w = training_windows(inter, max_len=2)
    pairs = {(int(r[i]), int(r[i + 1])) for r in w for i in range(2) if r[i] > 0 and r[i + 1] > 0}
    assert pairs == {(4, 3), (3, 1)}


def test_generated_ratings_round_trip(tmp_path):
    users, items, stamps = moldata.generate_ratings(tmp_path / "g.csv", n_users=30, n_items=40, seed=3)
    inter = moldata.load_interactions(tmp_path / "g.csv")
    assert inter.n_interactions == len(users) and inter.n_users == 30
    for u in range(inter.n_users):  # generated rows are in time order per user already
        mine = items[users == inter.user_ids[u]]
        np.testing.assert_array_equal(inter.item_ids[inter.sequence(u)], mine)


@pytest.mark.parametrize("text, needle", [
    ("", "is empty"),
    ("userId,movieId,rating,timestamp\n", "no rows"),
    ("userId,itemId,rating,timestamp\n1,2,3,4\n", "lacks column(s) ['movieId']"),
    ("user,movieId,rating\n1,2,3\n", "lacks column(s) ['userId', 'timestamp']"),
    ("userId,movieId,rating,timestamp\nabc,2,3,4\n", "line 2: column 'userId' must be an integer"),
    ("userId,movieId,rating,timestamp\n1,2,3,4\n1,x7,3,4\n", "line 3: column 'movieId'"),
    ("userId,movieId,rating,timestamp\n1,2.5,3,4\n", "column 'movieId' must be an integer"),
    ("userId,movieId,rating,timestamp\n1,2,3,soon\n", "column 'timestamp' must be a number"),
    ("userId,movieId,rating,timestamp\n1,2,3,4\n1,3,3,5\n2,2,3,4\n2,3,3,5\n2,4,3,6\n",
     "too little history"),
])
def test_bad_ratings_files_name_the_argument(tmp_path, text, needle):
    csv = _write(tmp_path / "r.csv", text)
    with pytest.raises(amips.InputError, match="ratings") as exc:
        moldata.load_interactions(csv)
    assert needle in str(exc.value)


def test_missing_file_and_short_users_dropped(tmp_path):
    with pytest.raises(amips.InputError, match="ratings: no such file"):
        moldata.load_interactions(tmp_path / "nope.csv")
    csv = _write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,3,5\n"
                 "2,2,3,4\n2,3,3,5\n2,4,3,6\n")
    inter = moldata.load_interactions(csv, drop_short=True)
    assert inter.user_ids.tolist() == [2]


def test_ranking_metrics_by_hand():
    m = ranking_metrics(np.array([0, 9, 10, 199, 500]))
    assert m["hr@1"] == pytest.approx(0.2) and m["hr@10"] == pytest.approx(0.4)
    assert m["hr@200"] == pytest.approx(0.8) and m["hr@50"] == pytest.approx(0.6)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1.0 / np.log2(11)) / 5)
    assert m["mrr"] == pytest.approx(np.mean([1, 1 / 10, 1 / 11, 1 / 200, 1 / 501]))


# --- training and the trained model -----------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("molrec")
    moldata.generate_ratings(root / "r.csv", n_users=120, n_items=90, min_len=12, max_len=30, seed=1)
    torch.set_num_threads(1)
    metrics = fit(root / "r.csv", root / "model", _tiny_cfg("mol", epochs=4), progress=False)
    return root, metrics


def test_training_lowers_the_loss_and_learns(trained):
    root, metrics = trained
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0] - 0.3
    assert np.isfinite(losses).all()
    # better than chance on the (learnable) generated sequences: ~10/80 candidate items
    assert metrics["validation"]["hr@10"] > 0.2
    saved = json.loads((root / "model" / "metrics.json").read_text())
    assert saved["test"] == metrics["test"]
    cfg = json.loads((root / "model" / "config.json").read_text())
    assert cfg["n_params"]["total"] == metrics["n_params"]["total"]


def test_encode_users_and_topk_map_external_ids(trained):
    root, _ = trained
    m = amips.mol.load(root / "model")
    inter = moldata.load_interactions(root / "r.csv")
    users = inter.user_ids[[3, 0, 17]]
    q = m.encode_users(users)
    assert q.shape == (3, TINY["d"]) and q.dtype == torch.float32
    # the query is the encoder's last position over the history up to the test target
    u = 17
    hist = inter.item_ids[inter.history(u, "test")]
    torch.testing.assert_close(m.encode_histories([hist])[0], q[2])
    k = 7
    s, ids = amips.mol.topk(m, q, k, method="exact")
    assert ids.shape == (3, k) and set(ids.flatten().tolist()) <= set(m.item_ids.tolist())
    # against the head's own full grid over internal items, mapped through item_ids
    ref = full_scores(m.model, q).double()
    for r in range(3):
        internal = m.interactions.item_index(ids[r].numpy())
        kth = ref[r].sort(descending=True).values[k - 1]
        assert (ref[r, internal] >= kth - 1e-3).all()
    # seen items excluded, in external ids
    seen = m.seen_items(users)
    s2, ids2 = amips.mol.topk(m, q, k, method="exact", exclude=seen)
    for r in range(3):
        assert not set(ids2[r].tolist()) & set(seen[r].tolist())
    for method in ("bound", "combined"):
        s3, ids3 = amips.mol.topk(m, q, k, method=method, exclude=seen)
        assert set(ids3.flatten().tolist()) <= set(m.item_ids.tolist())
        if method == "bound":
            torch.testing.assert_close(s3, s2)


def test_dot_head_has_the_same_parameter_budget(trained):
    root, metrics = trained
    from amips.mol.recommender import SeqRecModel

    mol = SeqRecModel(90, "mol", TINY).param_counts()
    dot = SeqRecModel(90, "dot", TINY).param_counts()
    assert mol["encoder"] == dot["encoder"]
    assert abs(mol["head"] - dot["head"]) <= 0.02 * mol["head"]


def test_api_bad_input_names_the_argument(trained, tmp_path):
    root, _ = trained
    m = amips.mol.load(root / "model")
    with pytest.raises(amips.InputError, match="user_ids: unknown user"):
        m.encode_users([123456])
    with pytest.raises(amips.InputError, match="user_ids: is empty"):
        m.encode_users([])
    with pytest.raises(amips.InputError, match="histories: entry 0 is an empty history"):
        m.encode_histories([[]])
    with pytest.raises(amips.InputError, match=r"histories\[0\]: unknown item"):
        m.encode_histories([[999999]])
    q = m.encode_users(m.user_ids[:2])
    with pytest.raises(amips.InputError, match="k: .* larger than the number of items"):
        amips.mol.topk(m, q, m.interactions.n_items + 1)
    with pytest.raises(amips.InputError, match="queries: dimension mismatch"):
        amips.mol.topk(m, torch.zeros(2, TINY["d"] + 1), 3)
    with pytest.raises(amips.InputError, match="model: no such folder"):
        load(tmp_path / "missing")
    # a model folder whose weights do not match its config (P / d mismatch)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["p_q"] += 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(amips.InputError, match="model: .* does not match"):
        load(bad)
    with pytest.raises(amips.InputError, match="out: .* already holds a training run"):
        fit(root / "r.csv", root / "model", _tiny_cfg(), progress=False)
    with pytest.raises(amips.InputError, match="similarity"):
        fit(root / "r.csv", tmp_path / "x", _tiny_cfg("cosine"), progress=False)


def _deterministic_walk(path, n_users=60, n_items=40, length=20, seed=0):
    """Sequences whose next item is a fixed function of the previous one (a permutation)."""
    rng = np.random.default_rng(seed)
    succ = rng.permutation(n_items)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(n_users):
        item = int(rng.integers(n_items))
        for t in range(length):
            lines.append(f"{u},{item},1,{t}")
            item = int(succ[item])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("similarity, loss", [("dot", "full"), ("mol", "full"), ("mol", "sampled")])
def test_a_model_learns_a_deterministic_next_item(tmp_path, similarity, loss):
    # next item = succ(previous item): a model that learns anything ranks it first
    _deterministic_walk(tmp_path / "r.csv")
    torch.set_num_threads(1)
    cfg = FitConfig(similarity=similarity, loss=loss, epochs=12, patience=12, batch_size=16,
                    warmup=5, lr=3e-3, n_uniform=32, n_inbatch=16, model=dict(TINY))
    m = fit(tmp_path / "r.csv", tmp_path / "m", cfg, progress=False)
    assert m["test"]["hr@10"] >= 0.95, m["history"]
    assert m["test"]["hr@1"] >= 0.6, m["history"]
