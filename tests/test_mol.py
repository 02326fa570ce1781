"""MoL similarity and its top-k methods (torch paths; the kernel is in test_mol_kernel.py)."""

import math

import numpy as np
import pytest
import torch

import amips
import amips.mol as am
from amips.mol.similarity import score_all, score_candidates
from amips.mol.topk import SCREEN_MARGIN, rank


def _head(seed=0, d_q=12, d_i=10, p_q=3, p_x=2, d_p=8, hidden=16, scale=1.0):
    torch.manual_seed(seed)
    h = am.MoL(d_q, d_i, p_q, p_x, d_p, tau=0.05, gate_hidden=hidden).eval()
    if scale != 1.0:  # sharper gates than the default initialisation
        with torch.no_grad():
            for m in (h.query_gate, h.item_gate, h.pair_gate):
                m[2].weight.mul_(scale)
    return h


def _phi_fp64(h: am.MoL, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Plain fp64 MoL for pairs, written out loop by loop."""
    hd = h.double()
    out = []
    for b in range(q.shape[0]):
        qb, xb = q[b].double(), x[b].double()
        f = hd.query_proj(qb).view(h.p_q, h.d_p)
        g = hd.item_proj(xb).view(h.p_x, h.d_p)
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-6)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-6)
        logits = torch.stack([f[i] @ g[j] for i in range(h.p_q) for j in range(h.p_x)]) / h.tau
        a, c = hd.query_gate(qb), hd.item_gate(xb)
        pair = hd.pair_gate(logits)
        z = a * c + pair
        z = z * torch.sigmoid(z)
        pi = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        out.append((pi * logits).sum())
    h.float()
    return torch.stack(out)


def test_phi_matches_fp64_pairs_grids_and_lists():
    h = _head(scale=3.0)
    torch.manual_seed(1)
    q, x = torch.randn(5, 12), torch.randn(7, 10)
    ref = _phi_fp64(h, q.repeat_interleave(7, 0), x.repeat(5, 1)).view(5, 7)
    grid = h(q, x)
    assert grid.shape == (5, 7)
    torch.testing.assert_close(grid.double(), ref, rtol=1e-5, atol=1e-4)
    pairs = h(q, x[:5])
    torch.testing.assert_close(pairs.double(), ref.diagonal()[:5] if False else torch.stack(
        [ref[i, i] for i in range(5)]), rtol=1e-5, atol=1e-4)
    lists = h(q, x[None].expand(5, 7, 10))
    torch.testing.assert_close(lists, grid, rtol=1e-5, atol=1e-5)
    forced = h(q[:3], x[:3], grid=True)
    torch.testing.assert_close(forced, grid[:3, :3], rtol=1e-5, atol=1e-5)


def test_gate_sums_to_one_and_phi_within_pair_logit_bounds():
    h = _head(scale=5.0)
    q, x = torch.randn(6, 12), torch.randn(9, 10)
    phi, pi = h(q, x, return_gates=True)
    assert pi.shape == (6, 9, h.n_pairs)
    torch.testing.assert_close(pi.sum(-1), torch.ones(6, 9))
    assert bool((pi >= 0).all())
    logits = torch.einsum("qid,njd->qnij", h.query_components(q), h.item_components(x)).flatten(-2) / h.tau
    assert bool((phi <= logits.max(-1).values + 1e-4).all())
    assert bool((phi >= logits.min(-1).values - 1e-4).all())
    # Gate dropout in training: still a distribution (renormalised), never all dropped.
    h.train()
    torch.manual_seed(3)
    _, pi_t = h(q, x, return_gates=True)
    torch.testing.assert_close(pi_t.sum(-1), torch.ones(6, 9))
    assert bool(((pi_t == 0).sum(-1) > 0).any())  # some pairs were dropped


def test_load_balancing_loss_values():
    L = 4
    uniform = torch.full((10, L), 1.0 / L)
    assert abs(am.MoL.load_balancing_loss(uniform).item()) < 1e-6
    onehot = torch.eye(L).repeat(3, 1)  # confident, balanced: the minimum -log L
    assert am.MoL.load_balancing_loss(onehot).item() == pytest.approx(-math.log(L), abs=1e-5)
    collapsed = torch.zeros(8, L)
    collapsed[:, 0] = 1
    assert am.MoL.load_balancing_loss(collapsed).item() == pytest.approx(0.0, abs=1e-5)


def test_dot_product_head_same_budget_and_interface():
    mol = am.MoL(64, 64, 8, 4, 64)
    dot = am.DotProduct(64, 64, 8, 4, 64)
    assert abs(dot.parameter_count() - mol.parameter_count()) / mol.parameter_count() < 0.01
    q, x = torch.randn(3, 64), torch.randn(50, 64)
    phi = dot(q, x)
    f = torch.nn.functional.normalize(dot.query_proj(q), dim=-1)
    g = torch.nn.functional.normalize(dot.item_proj(x), dim=-1)
    torch.testing.assert_close(phi, f @ g.T / dot.tau)
    cache = dot.item_cache(x, dtype=torch.float32)
    for method in am.METHODS:
        params = {"kprime": 8, "kprime_avg": 8} if method not in ("exact", "bound") else {}
        s, i = am.topk(dot, q, 5, method, items=cache, **params)
        assert i.shape == (3, 5)
    s, i = am.topk(dot, q, 5, "exact", items=cache)
    ref = rank(score_candidates(dot, dot.query_parts(q), cache, torch.arange(50).repeat(3, 1)),
               torch.arange(50).repeat(3, 1), 5)
    assert torch.equal(i, ref[1])


def _items(n=400, d_i=10, seed=5, dup=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_i, generator=g)
    if dup:  # planted ties: items identical to lower-numbered ones
        src = torch.randint(0, n // 2, (dup,), generator=g)
        dst = torch.randperm(n // 2, generator=g)[:dup] + n // 2
        x[dst] = x[src]
    return x


def _full_rank(h, qp, cache, k):
    ids = torch.arange(cache.n).repeat(qp.n, 1)
    return rank(score_candidates(h, qp, cache, ids), ids, k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_and_bound_equal_full_canonical_ranking(seed):
    h = _head(seed, scale=2.0 + seed)
    x = _items(seed=seed, dup=40)
    cache = h.item_cache(x)
    q = torch.randn(6, 12)
    qp = h.query_parts(q)
    ref_s, ref_i = _full_rank(h, qp, cache, 10)
    s, i = am.topk(h, q, 10, "exact", items=cache, backend="torch")
    assert torch.equal(i, ref_i) and torch.equal(s, ref_s)
    for dense in (0.0, 1.0):  # the exact-screen fallback, and always the bound
        s, i = am.topk(h, q, 10, "bound", items=cache, dense_fraction=dense, kprime=12)
        assert torch.equal(i, ref_i) and torch.equal(s, ref_s), dense
    for lists in ("max_logit", "per_pair"):
        for search in ("mm", "exact"):
            s, i, stats = am.topk(h, q, 10, "bound", items=cache, lists=lists, kprime=4,
                                  max_kprime=16, search=search, return_stats=True)
            assert torch.equal(i, ref_i) and torch.equal(s, ref_s), (lists, search)
            assert 0 < stats["items_scored"] <= 2 * cache.n


def test_bound_planted_ties_lower_id_first():
    h = _head(7)
    x = _items(n=120, seed=3)
    x[60:] = x[:60]  # every item has a twin 60 ids later
    cache = h.item_cache(x)
    q = torch.randn(4, 12)
    s_e, i_e = am.topk(h, q, 12, "exact", items=cache, backend="torch")
    for lists in ("max_logit", "per_pair"):
        s_b, i_b = am.topk(h, q, 12, "bound", items=cache, lists=lists, kprime=2, max_kprime=8)
        assert torch.equal(i_e, i_b) and torch.equal(s_e, s_b)
    for row_s, row_i in zip(s_e, i_e):
        for a in range(11):  # equal scores come in (lower id, its twin) order
            if row_s[a] == row_s[a + 1]:
                assert row_i[a] < row_i[a + 1]
        twins = set(row_i.tolist())
        assert all((t - 60 in twins) for t in twins if t >= 60)


def test_screen_error_far_below_margin():
    h = _head(4, scale=4.0)
    cache = h.item_cache(_items(n=300))
    qp = h.query_parts(torch.randn(5, 12))
    screened = score_all(h, qp, cache)
    canonical = score_candidates(h, qp, cache, torch.arange(300).repeat(5, 1))
    assert (screened - canonical).abs().max().item() < SCREEN_MARGIN / h.tau / 20


def _valid(s, i, n, exclude=None):
    for r in range(i.shape[0]):
        ids = i[r][i[r] >= 0].tolist()
        assert len(ids) == len(set(ids)) and all(0 <= t < n for t in ids)
        valid = s[r][i[r] >= 0]
        assert bool((valid[:-1] >= valid[1:]).all())
        assert bool(torch.isinf(s[r][i[r] < 0]).all())
        if exclude is not None:
            assert not set(ids) & set(exclude[r])


@pytest.mark.parametrize("method", am.METHODS)
def test_every_method_valid_sorted_and_honours_exclude(method):
    h = _head(2, scale=2.0)
    n = 300
    cache = h.item_cache(_items(n=n, dup=20))
    q = torch.randn(4, 12)
    params = {} if method in ("exact", "bound") else {"kprime": 16, "kprime_avg": 40}
    if method == "exact":
        params["backend"] = "torch"
    s, i = am.topk(h, q, 10, method, items=cache, **params)
    _valid(s, i, n)
    ex_s, ex_i = am.topk(h, q, 10, "exact", items=cache, backend="torch")
    exclude = [ex_i[0, :3].tolist(), [], ex_i[2].tolist(), list(range(0, n, 2))]
    s2, i2 = am.topk(h, q, 10, method, items=cache, exclude=exclude, **params)
    _valid(s2, i2, n, exclude)
    # CSR form gives the same result.
    indptr = np.cumsum([0] + [len(e) for e in exclude])
    indices = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude])
    s3, i3 = am.topk(h, q, 10, method, items=cache, exclude=(indptr, indices), **params)
    assert torch.equal(i2, i3)
    if method in ("exact", "bound"):
        ids = torch.arange(n).repeat(4, 1)
        sc = score_candidates(h, h.query_parts(q), cache, ids)
        for r, e in enumerate(exclude):
            sc[r, e] = float("-inf")
        assert torch.equal(i2, rank(sc, ids.masked_fill(torch.isinf(sc), -1), 10)[1])


def _oracle_fp64(h, qp, cache, exclude):
    """Brute force in fp64, written out apart from the library: every (query, item) phi from
    the cached components and gate terms; excluded items -inf."""
    qc, ic = qp.components.double(), cache.components.double()
    logits = torch.einsum("qid,njd->qnij", qc, ic).flatten(-2) / h.tau  # [nq, N, L]
    g = h.pair_gate
    hid = logits @ g[0].weight.double().T + g[0].bias.double()
    pair = (hid * torch.sigmoid(hid)) @ g[2].weight.double().T + g[2].bias.double()
    z = qp.gate.double()[:, None] * cache.gate.double()[None] + pair
    z = z * torch.sigmoid(z)
    pi = torch.softmax(z, dim=-1)
    phi = (pi * logits).sum(-1)
    for r, e in enumerate(exclude):
        phi[r, list(e)] = float("-inf")
    return phi


def _check_against_oracle(s, i, phi, k, tol=1e-5):
    """Tie-aware: the returned scores are the oracle's k best non-excluded scores, each
    returned id is non-excluded and has that score; ids differ only where scores tie."""
    for r in range(i.shape[0]):
        best = phi[r].sort(descending=True).values[:k]
        n_valid = int(torch.isfinite(best).sum())
        assert int((i[r] >= 0).sum()) == n_valid
        got = i[r][:n_valid]
        assert torch.allclose(s[r][:n_valid].double(), best[:n_valid], rtol=0, atol=tol / 0.05)
        assert torch.allclose(phi[r, got], best[:n_valid], rtol=0, atol=tol / 0.05)
        if n_valid:  # every item strictly above the k-th score is returned
            must = (phi[r] > best[n_valid - 1] + tol / 0.05).nonzero().flatten().tolist()
            assert set(must) <= set(got.tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_exclusion_per_row_unequal_histories_exact_and_bound_match_fp64_oracle(seed):
    h = _head(seed + 10, scale=3.0)
    n = 260
    cache = h.item_cache(_items(n=n, seed=seed, dup=30), dtype=torch.float32)
    q = torch.randn(5, 12)
    qp = h.query_parts(q)
    _, top = am.topk(h, q, 40, "exact", items=cache, backend="torch")
    g = torch.Generator().manual_seed(seed)
    # Very unequal histories: none, one item, the row's whole top-40, 90% of all items, all
    # but 4 items (fewer than k remain: padded).
    exclude = [[], [int(top[1, 0])], top[2].tolist(),
               torch.randperm(n, generator=g)[: int(0.9 * n)].tolist(),
               torch.randperm(n, generator=g)[: n - 4].tolist()]
    phi = _oracle_fp64(h, qp, cache, exclude)
    ref_s, ref_i = am.topk(h, q, 10, "exact", items=cache, backend="torch", exclude=exclude)
    _check_against_oracle(ref_s, ref_i, phi, 10)
    assert int((ref_i[4] >= 0).sum()) == 4
    runs = [dict(dense_fraction=0.0), dict(dense_fraction=1.0), dict(kprime=1, extra=1),
            dict(lists="per_pair", kprime=2, max_kprime=8),
            dict(lists="per_pair", kprime=2, max_kprime=8, search="exact")]
    for params in runs:
        s, i = am.topk(h, q, 10, "bound", items=cache, exclude=exclude, **params)
        assert torch.equal(i, ref_i) and torch.equal(s, ref_s), params
    # A row's result does not depend on the other rows of its batch (same query parts:
    # the query projection itself may round differently in another batch shape).
    for r in range(5):
        s1, i1 = am.topk(h, qp.take([r]), 10, "bound", items=cache, exclude=[exclude[r]])
        assert torch.equal(i1[0], ref_i[r]) and torch.equal(s1[0], ref_s[r])


def test_bound_equals_exact_when_the_pass_must_widen():
    # extra=0 keeps only k screened items per query, so certification often fails and the
    # pass reruns wider; the result must still be exact, with ties (twins) present.
    h = _head(21, scale=4.0)
    x = _items(n=200, seed=8)
    x[100:] = x[:100]
    cache = h.item_cache(x)
    q = torch.randn(6, 12)
    s_e, i_e = am.topk(h, q, 9, "exact", items=cache, backend="torch", extra=0)
    ref = _full_rank(h, h.query_parts(q), cache, 9)
    assert torch.equal(i_e, ref[1]) and torch.equal(s_e, ref[0])
    s_b, i_b, st = am.topk(h, q, 9, "bound", items=cache, kprime=1, extra=0, return_stats=True)
    assert torch.equal(i_b, ref[1]) and torch.equal(s_b, ref[0])
    assert 0 < st["items_passing_bound"] <= cache.n and st["rounds"] >= 1


def test_bound_prunes_items_when_gates_are_peaked():
    # A head whose gate is nearly one-hot on the largest logit makes phi ~ max logit, so the
    # bound is tight and most items are never given the pair MLP.
    h = _head(22)
    with torch.no_grad():
        h.pair_gate[0].weight.copy_(torch.eye(h.n_pairs, h.gate_hidden).T * 20.0)
        h.pair_gate[0].bias.zero_()
        h.pair_gate[2].weight.copy_(torch.eye(h.n_pairs, h.gate_hidden) * 20.0)
        h.pair_gate[2].bias.zero_()
        h.query_gate[2].weight.zero_()
        h.item_gate[2].weight.zero_()
    cache = h.item_cache(_items(n=400, seed=9))
    q = torch.randn(4, 12)
    s_e, i_e = am.topk(h, q, 5, "exact", items=cache, backend="torch")
    s_b, i_b, st = am.topk(h, q, 5, "bound", items=cache, return_stats=True)
    assert torch.equal(i_b, i_e) and torch.equal(s_b, s_e)
    assert st["passing_fraction"] < 0.5


def test_approximate_methods_fetch_per_row_for_exclusions():
    h = _head(23, scale=2.0)
    n = 300
    cache = h.item_cache(_items(n=n, seed=11))
    q = torch.randn(3, 12)
    # Row 0 excludes the 100 best items of the averaged search, row 1 nothing, row 2 one.
    from amips.mol.topk import _averaged_lists
    qp = h.query_parts(q)
    avg = _averaged_lists(h, qp, cache, 100, "mm", None, 1)
    exclude = [avg[0].tolist(), [], [int(avg[2, 0])]]
    for method, params in (("averaged", {"kprime_avg": 10}), ("per_embedding", {"kprime": 4}),
                           ("combined", {"kprime": 4, "kprime_avg": 10})):
        s, i = am.topk(h, qp, 10, method, items=cache, exclude=exclude, search="mm", **params)
        _valid(s, i, n, exclude)
        assert bool((i >= 0).all()), method  # over-fetched by each row's own count
        for r in range(3):  # the same as the row alone: no batch-wide over-fetch
            s1, i1 = am.topk(h, qp.take([r]), 10, method, items=cache, exclude=[exclude[r]],
                             search="mm", **params)
            assert torch.equal(i1[0], i[r]) and torch.equal(s1[0], s[r])
    # With every item a candidate the approximate methods are exact, exclusions included.
    ref = am.topk(h, q, 10, "exact", items=cache, backend="torch", exclude=exclude)[1]
    full = am.topk(h, q, 10, "per_embedding", items=cache, exclude=exclude, kprime=n, search="mm")[1]
    assert torch.equal(full, ref)


def test_exclude_leaves_fewer_than_k_pads():
    h = _head()
    cache = h.item_cache(_items(n=20))
    s, i = am.topk(h, torch.randn(2, 12), 10, "exact", items=cache, backend="torch",
                   exclude=[list(range(15)), []])
    assert (i[0] >= 0).sum() == 5 and bool((i[0, 5:] == -1).all())
    assert bool(torch.isinf(s[0, 5:]).all()) and bool((i[1] >= 0).all())


def test_approximate_methods_improve_with_kprime_and_ivf_search(monkeypatch):
    monkeypatch.setenv("AMIPS_BACKEND", "torch")  # the IVF scan kernel has its own tests
    h = _head(3, scale=2.0)
    cache = h.item_cache(_items(n=500))
    q = torch.randn(8, 12)
    _, ref = am.topk(h, q, 5, "exact", items=cache, backend="torch")
    full = am.topk(h, q, 5, "per_embedding", items=cache, kprime=500)[1]
    assert torch.equal(full, ref)  # every item in every list: exact
    s, i, st = am.topk(h, q[:2], 5, "combined", items=cache, kprime=8, kprime_avg=32,
                       search="ivf", nlist=4, nprobe=2, return_stats=True)
    _valid(s, i, 500)
    assert st["items_scored"] > 0


class _Recommender:
    """A model object with external item ids, as the recommender exposes."""

    def __init__(self, head, cache, item_ids):
        self.head, self.cache, self.item_ids = head, cache, item_ids

    def topk_target(self):
        return self.head, self.cache, self.item_ids


def test_topk_target_maps_external_ids_and_exclude():
    h = _head()
    cache = h.item_cache(_items(n=50))
    ext = np.arange(50) * 10 + 7
    model = _Recommender(h, cache, ext)
    q = torch.randn(3, 12)
    _, inner = am.topk(h, q, 5, "exact", items=cache, backend="torch")
    _, outer = am.topk(model, q, 5, "exact", backend="torch")
    assert torch.equal(outer, torch.as_tensor(ext)[inner])
    _, outer2 = am.topk(model, q, 5, "bound", exclude=[[int(outer[0, 0])], [], [999999]])
    assert int(outer[0, 0]) not in outer2[0].tolist()
    assert torch.equal(outer2[1:], outer[1:])


def test_bad_input_names_the_argument():
    h = _head()
    cache = h.item_cache(_items(n=30))
    q = torch.randn(2, 12)
    other = am.MoL(12, 10, 3, 3, 8)  # P_X mismatch
    with pytest.raises(amips.InputError, match="items"):
        am.topk(other, q, 3, items=cache)
    with pytest.raises(amips.InputError, match="queries"):
        am.topk(h, torch.randn(2, 11), 3, items=cache)
    with pytest.raises(amips.InputError, match="k"):
        am.topk(h, q, 31, items=cache)
    with pytest.raises(amips.InputError, match="k"):
        am.topk(h, q, 0, items=cache)
    bad = q.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(amips.InputError, match="queries"):
        am.topk(h, bad, 3, items=cache)
    with pytest.raises(amips.InputError, match="queries"):
        am.topk(h, q.long(), 3, items=cache)
    with pytest.raises(amips.InputError, match="method"):
        am.topk(h, q, 3, "nope", items=cache)
    with pytest.raises(amips.InputError, match="exclude"):
        am.topk(h, q, 3, items=cache, exclude=[[1]])
    with pytest.raises(amips.InputError, match="dense_fraction"):
        am.topk(h, q, 3, "bound", items=cache, dense_fraction=1.5)
    with pytest.raises(amips.InputError, match="extra"):
        am.topk(h, q, 3, "averaged", items=cache, extra=3)
    with pytest.raises(amips.InputError, match="items"):
        am.topk(h, q, 3)
    with pytest.raises(amips.InputError, match="kprime"):
        am.topk(h, q, 3, "per_embedding", items=cache, kprime=0)
    with pytest.raises(amips.InputError, match="bogus"):
        am.topk(h, q, 3, "averaged", items=cache, bogus=1)
    with pytest.raises(amips.InputError, match="item_repr"):
        h(q, torch.randn(4, 9))
    with pytest.raises(amips.InputError, match="dtype"):
        h.item_cache(torch.randn(4, 10), dtype="int8")
    with pytest.raises(amips.InputError, match="kprime"):
        am.topk(h, q, 3, "exact", items=cache, kprime=3)
    with pytest.raises(amips.InputError, match="p_q"):
        am.MoL(12, 10, 0, 2, 8)
    with pytest.raises(amips.InputError, match="tau"):
        am.MoL(12, 10, 2, 2, 8, tau=0.0)
    if torch.cuda.is_available():
        with pytest.raises(amips.InputError, match="queries"):
            am.topk(h, q.cuda(), 3, items=cache)


@pytest.mark.parametrize("n,k,chunk", [(1000, 10, 16), (1037, 7, 16), (5000, 40, 32), (300, 200, 16)])
def test_blocked_ip_topk_equals_full_topk(n, k, chunk):
    from amips.mol.topk import _blocked_ip_topk

    g = torch.Generator().manual_seed(n)
    q, keys = torch.randn(5, 8, generator=g), torch.randn(n, 8, generator=g)
    keys[n // 2 : n // 2 + 20] = keys[:20]  # ties across chunks
    v, i = _blocked_ip_topk(q, keys, k, chunk=chunk)
    full = q @ keys.T
    assert torch.equal(v, full.topk(k, dim=1).values)
    assert torch.equal(full.gather(1, i), v) and bool((i < n).all())
    assert all(len(set(r)) == k for r in i.tolist())
