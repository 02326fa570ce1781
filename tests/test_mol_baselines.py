"""Baselines of the recommender and the bootstrap statistics, against hand computations and
brute-force references on tiny generated ratings."""

import itertools

import numpy as np
import pytest
import torch

from amips import InputError
from amips.mol import baselines as bl
from amips.mol import data as moldata
from amips.mol import stats
from amips.mol.recommender import rank_targets, ranking_metrics


def _inter(rows):
    """rows: {user: [items in time order]} -> Interactions (timestamps 0, 1, 2, ...)."""
    users, items, stamps = [], [], []
    for u, seq in rows.items():
        for t, i in enumerate(seq):
            users.append(u)
            items.append(i)
            stamps.append(t)
    return moldata.build_interactions(np.array(users), np.array(items), np.array(stamps))


def test_rank_targets_counts_ties_against_the_target_and_excludes_history():
    s = torch.tensor([[3.0, 5.0, 5.0, 1.0, 5.0],
                      [3.0, 5.0, 5.0, 1.0, 5.0],
                      [3.0, 5.0, 5.0, 1.0, 5.0]])
    # row 0: items 1 and 4 tie with the target 2 -> rank 2 (both counted against it)
    # row 1: item 1 is in the history -> excluded; item 4 still ties -> rank 1
    # row 2: the target itself is in the history too (a repeat): never excluded -> rank 0
    ranks = rank_targets(s.clone(), [[0], [1, 3], [2, 1, 4]], [2, 2, 2])
    assert ranks.tolist() == [2, 1, 0]


def test_popular_by_hand():
    # training parts (all but the last two): u1 [10, 20, 30], u2 [20, 30], u3 [30, 40]
    inter = _inter({1: [10, 20, 30, 40, 50], 2: [20, 30, 10, 40], 3: [30, 40, 20, 60]})
    # training counts: 10:1 20:2 30:3 40:1 50:0 60:0
    pop = bl.Popular(inter)
    np.testing.assert_array_equal(pop.counts, [1, 2, 3, 1, 0, 0])
    ranks = bl.baseline_ranks(pop, inter, "test")
    # u1 test target 50 (count 0), history {10,20,30,40} excluded; 60 ties at 0 -> rank 1
    # u2 test target 40 (count 1), history {20,30,10} excluded; nothing else >= 1 -> rank 0
    # u3 test target 60 (count 0), history {30,40,20} excluded; 10 (1) above, 50 ties -> rank 2
    assert ranks.tolist() == [1, 0, 2]
    val = bl.baseline_ranks(pop, inter, "validation")
    # u1 val target 40 (1), history {10,20,30}: 40 ties with nothing left above -> 0
    # u2 val target 10 (1), history {20,30}: 40 ties at 1 -> rank 1
    # u3 val target 20 (2), history {30,40}: -> rank 0
    assert val.tolist() == [0, 1, 0]
    m = ranking_metrics(ranks)
    assert m["hr@1"] == pytest.approx(1 / 3) and m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def _brute_cooc(inter, window):
    n = inter.n_items
    c = np.zeros((n, n))
    for u in range(inter.n_users):
        s = inter.history(u, "train")
        for a, b in itertools.combinations(range(len(s)), 2):
            if (window == 0 or b - a <= window) and s[a] != s[b]:
                c[s[a], s[b]] += 1
                c[s[b], s[a]] += 1
    return c


@pytest.mark.parametrize("window, n_recent, decay", [(0, 3, 1.0), (2, 2, 0.5), (1, 50, 0.7)])
def test_item_knn_matches_brute_force(tmp_path, window, n_recent, decay):
    moldata.generate_ratings(tmp_path / "r.csv", n_users=25, n_items=12, min_len=4, max_len=12, seed=5)
    inter = moldata.load_interactions(tmp_path / "r.csv")
    c = _brute_cooc(inter, window)
    np.testing.assert_array_equal(bl.cooccurrence(inter, window), c)
    deg = np.sqrt(np.maximum(c.sum(1), 1))
    sim = c / deg[:, None] / deg[None, :]
    knn = bl.ItemKNN(inter, window, n_recent, decay)
    hist = [inter.history(u, "test") for u in range(inter.n_users)]
    got = knn.scores(hist)
    for r, h in enumerate(hist):
        want = np.zeros(inter.n_items)
        for k, item in enumerate(h[::-1][:n_recent]):
            want += decay ** k * sim[item]
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-6)
    # ranks equal the brute-force ranks of the reference scores
    want_ranks = []
    for u, h in enumerate(hist):
        t = inter.target(u, "test")
        sc = got[u].copy()
        sc[[i for i in set(h.tolist()) if i != t]] = -np.inf
        want_ranks.append(int(sum(sc[j] >= sc[t] for j in range(inter.n_items) if j != t)))
    assert bl.baseline_ranks(knn, inter, "test").tolist() == want_ranks


def test_ease_matches_column_wise_ridge(tmp_path):
    moldata.generate_ratings(tmp_path / "r.csv", n_users=30, n_items=10, min_len=4, max_len=10, seed=1)
    inter = moldata.load_interactions(tmp_path / "r.csv")
    lam = 3.0
    ease = bl.EASE(inter, lam)
    x = np.zeros((inter.n_users, inter.n_items))
    for u in range(inter.n_users):
        x[u, inter.history(u, "train")] = 1.0
    # EASE's definition: column j regressed on the other columns, ridge lam, B_jj = 0
    for j in range(inter.n_items):
        others = [i for i in range(inter.n_items) if i != j]
        a = x[:, others]
        w = np.linalg.solve(a.T @ a + lam * np.eye(len(others)), a.T @ x[:, j])
        np.testing.assert_allclose(ease.weights.numpy()[others, j], w, rtol=1e-6, atol=1e-8)
        assert ease.weights[j, j] == 0
    h = [inter.history(0, "test")]
    xh = np.zeros(inter.n_items)
    xh[h[0]] = 1
    np.testing.assert_allclose(ease.scores(h)[0], xh @ ease.weights.numpy(), atol=1e-9)


def test_tune_picks_the_best_validation_point_and_ranks_test(tmp_path):
    moldata.generate_ratings(tmp_path / "r.csv", n_users=40, n_items=30, min_len=6, max_len=14, seed=3)
    inter = moldata.load_interactions(tmp_path / "r.csv")
    res = {r["name"]: r for r in bl.tune(inter)}
    assert set(res) == {"popular", "item_knn", "ease"}
    for r in res.values():
        best = max(r["grid"], key=lambda g: (g["val_hr@10"], g["val_ndcg@10"]))
        assert all(r["params"][k] == best[k] for k in r["params"])
        assert ranking_metrics(r["validation_ranks"])["hr@10"] == best["val_hr@10"]
        assert r["test_ranks"].shape == (inter.n_users,)
    # the generated walk is sequential: co-occurrence over recent items beats popularity
    assert ranking_metrics(res["item_knn"]["test_ranks"])["hr@10"] > \
        ranking_metrics(res["popular"]["test_ranks"])["hr@10"]
    with pytest.raises(InputError, match="baselines: unknown baseline 'svd'"):
        bl.tune(inter, ["svd"])
    with pytest.raises(InputError, match="lam"):
        bl.EASE(inter, 0.0)


# --- statistics ---------------------------------------------------------------------------

def test_bootstrap_interval_covers_a_known_mean():
    # 200 draws of Bernoulli(.3): the 95% interval covers .3 in about 95% of repeats
    rng = np.random.default_rng(0)
    covered = 0
    for rep in range(200):
        v = (rng.random(300) < 0.3).astype(float)
        mean, lo, hi = stats.bootstrap_ci(v, n_boot=400, seed=rep)
        assert lo <= mean <= hi
        covered += lo <= 0.3 <= hi
    assert 0.88 <= covered / 200 <= 0.99
    # the interval shrinks like 1 / sqrt(n)
    w = [np.subtract(*stats.bootstrap_ci((rng.random(n) < .3).astype(float), n_boot=400)[2:0:-1])
         for n in (100, 1600)]
    assert 2.5 < w[0] / w[1] < 6


def test_paired_difference_removes_shared_user_variance():
    rng = np.random.default_rng(1)
    base = rng.random(500)  # per-user difficulty both models share
    a, b = base + 0.02, base.copy()
    mean, lo, hi = stats.paired_ci(a, b)
    assert mean == pytest.approx(0.02) and lo == pytest.approx(0.02) and hi == pytest.approx(0.02)
    _, ulo, uhi = stats.bootstrap_ci(a)
    assert uhi - ulo > 0.03
    ranks = np.array([0, 3, 9, 10, 60])
    np.testing.assert_allclose(stats.per_user(ranks, "hr@10"), [1, 1, 1, 0, 0])
    np.testing.assert_allclose(stats.per_user(ranks, "ndcg@10")[:2], [1.0, 1 / np.log2(5)])
    with pytest.raises(InputError, match="values"):
        stats.bootstrap_ci([])
    with pytest.raises(InputError, match="values: contains NaN"):
        stats.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(InputError, match="different users"):
        stats.paired_ci([1.0, 2.0], [1.0])
    with pytest.raises(InputError, match="metric"):
        stats.per_user(ranks, "auc")
