"""The CPU PQ engine (faiss fast-scan over amips' codes) against the torch path.

Contract (amips/index/cpu_engines.py): with ``reorder = 0`` the engine returns faiss'
ranking of amips' codes by its uint8 tables, so it may differ from the torch path's float
tables only within faiss' table rounding (bounded below); with ``reorder = R`` it re-scores
faiss' best R exactly, so when R covers every probed key it equals the torch path exactly.
"""

import pytest
import torch
from _topk import assert_same_topk

from amips.index import IVFIndex
from amips.index import cpu_engines as E
from amips.kernels.pq_scan import pq_lut

pytest.importorskip("faiss")
pytestmark = pytest.mark.usefixtures("one_torch_thread", "torch_backend")

NPROBE = 3


def _build(storage="float32", by_residual=True):
    g = torch.Generator().manual_seed(1)
    n, d = 700, 24
    # very unequal lists, two of them empty; keys clustered by list (so <q, centroid> is a
    # large part of every score) with natural norms
    sizes = torch.tensor([1, 0, 300, 3, 120, 0, 40, 200, 2, 34])
    part = torch.repeat_interleave(torch.arange(10), sizes)[torch.randperm(n, generator=g)]
    centres = 2 * torch.randn(10, d, generator=g)
    x = (centres[part] + torch.randn(n, d, generator=g)) * torch.exp(0.3 * torch.randn(n, 1, generator=g))
    x[11] = x[5]  # tied keys
    part[11] = part[5]
    index = IVFIndex.build(x, 10, partitions=part, storage_dtype=storage)
    index.train_pq(subspaces=12, anisotropic_threshold=0.2, iters=5, by_residual=by_residual)
    return index


@pytest.fixture(scope="module")
def index():
    return _build()


@pytest.fixture
def engine(monkeypatch):
    def use(name):
        monkeypatch.setenv("AMIPS_CPU_ENGINE", name)
    return use


def _queries(index, n=40, seed=3):
    """Queries near the lists' centres (so the centroid term matters), a few pure noise."""
    g = torch.Generator().manual_seed(seed)
    near = index.centroids[torch.randint(0, index.n_lists, (n,), generator=g)]
    q = torch.randn(n, index.d, generator=g) + near * (torch.arange(n) % 4 != 3)[:, None]
    q[0] = index.keys_by_list[int((index.ids == 5).nonzero())] * 3  # hits the tied pair
    return q


def _float_pq_scores(pq, q, probes):
    """The torch path's score of every key in every row's probed lists: [nq, n] (-inf elsewhere)."""
    lut = pq_lut(q, pq.codebooks)  # [nq, M, 16]
    dec_scores = q @ pq.decode().T  # = <q, c_l> + sum_m lut[m, code_m] (by_residual adds c_l)
    off = pq.list_offsets
    mask = torch.zeros(q.shape[0], dec_scores.shape[1], dtype=torch.bool)
    for i in range(q.shape[0]):
        for lst in probes[i].tolist():
            if lst >= 0:
                mask[i, int(off[lst]):int(off[lst + 1])] = True
    return torch.where(mask, dec_scores, torch.full_like(dec_scores, float("-inf"))), lut


def _faiss_rounding_bound(pq, q, probes, lut):
    """Worst-case error of faiss' quantized score: each of the M table entries and the bias is
    rounded to a grid of step 1/a, with a >= min(255 / (S + B / M), 65535 / (M S + B)) (S: the
    widest subspace table, B: the spread of <q, c_l> over the probed lists), both of faiss'
    schemes (bias folded into the tables, or kept as a uint16)."""
    m = lut.shape[1]
    span = (lut.amax(2) - lut.amin(2)).amax(1)  # S per query
    bias = q @ pq.centroids.T
    valid = probes >= 0
    b = bias.gather(1, probes.clamp_min(0))
    b_span = torch.where(valid, b, torch.full_like(b, -1e30)).amax(1) - \
        torch.where(valid, b, torch.full_like(b, 1e30)).amin(1)
    b_span = torch.where(valid.any(1), b_span, torch.zeros_like(b_span))
    a = torch.minimum(255 / (span + b_span / m), 65535 / (m * span + b_span))
    return (m + 1) * 0.5 / a + 1e-5 * bias.abs().amax(1)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("by_residual", [True, False])
def test_pq_default_r0_is_torch_ranking_up_to_table_rounding(engine, k, by_residual):
    index = _build(by_residual=by_residual)
    q = _queries(index)
    probes = index.router(None).route(q, NPROBE).lists
    probes[1] = torch.tensor([1, 5, -1])  # only empty lists and a -1
    engine("faiss")
    s_f, p_f = index.pq.search(q, probes, k)
    assert isinstance(index.pq._cpu_engine, E.FaissPQEngine)
    ref, lut = _float_pq_scores(index.pq, q, probes)
    bound = _faiss_rounding_bound(index.pq, q, probes, lut)
    assert bool((p_f[1] == -1).all()) and bool(torch.isneginf(s_f[1]).all())
    for i in range(q.shape[0]):
        n_avail = int(torch.isfinite(ref[i]).sum())
        got = p_f[i][p_f[i] >= 0]
        assert got.numel() == min(k, n_avail) and got.unique().numel() == got.numel()
        if got.numel() == 0:
            continue
        true = ref[i, got]
        assert bool(torch.isfinite(true).all())  # only keys of probed lists
        # faiss' score of a returned key is its float PQ score up to the table rounding
        assert float((s_f[i, : got.numel()] - true).abs().max()) <= float(bound[i])
        kth = float(ref[i].topk(got.numel()).values[-1])
        # nothing far below the torch path's k-th score is returned, nothing far above missed
        assert float(true.min()) >= kth - 2 * float(bound[i])
        must = set(torch.nonzero(ref[i] > kth + 2 * float(bound[i]))[:, 0].tolist())
        assert must <= set(got.tolist())


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_pq_default_reorder_covering_all_equals_torch_path(engine, storage):
    index = _build(storage=storage)
    q = _queries(index)
    route = index.router(None).route(q, NPROBE)
    for k in (1, 5):
        engine("torch")
        s_t, p_t = index.pq.search(q, route.lists, k, reorder=700, keys_by_list=index.keys_by_list)
        engine("faiss")
        s_f, p_f = index.pq.search(q, route.lists, k, reorder=700, keys_by_list=index.keys_by_list)
        assert_same_topk(s_f, p_f, s_t, p_t)
        # through the index too, with ids mapped back
        engine("torch")
        a = index.search(q, k, NPROBE, scanner="pq", reorder=700)
        engine("auto")
        b = index.search(q, k, NPROBE, scanner="pq", reorder=700)
        assert_same_topk(b[0], b[1], a[0], a[1])


def test_pq_default_reorder_rescores_fast_scan_candidates_exactly(index, engine):
    q = _queries(index)
    probes = index.router(None).route(q, NPROBE).lists
    engine("faiss")
    k, r = 4, 30
    s_f, p_f = index.pq.search(q, probes, k, reorder=r, keys_by_list=index.keys_by_list)
    cand = index.pq.search(q, probes, r)[1]  # the engine's R = 0 ranking: faiss' best r
    keys = index.keys_by_list.double()
    exact = torch.einsum("qd,qcd->qc", q.double(), keys[cand.clamp_min(0)])
    exact = torch.where(cand >= 0, exact, torch.full_like(exact, float("-inf")))
    # the best k of those candidates by exact score (ties: lower position first)
    order = torch.argsort(cand.clamp_min(0), dim=1, stable=True)
    by_pos_s, by_pos_p = exact.gather(1, order), cand.gather(1, order)
    best = torch.argsort(by_pos_s, dim=1, descending=True, stable=True)[:, :k]
    assert_same_topk(s_f, p_f, by_pos_s.gather(1, best).float(), by_pos_p.gather(1, best))
    ok = p_f >= 0
    assert bool(ok[:, 0].all())
    ip = torch.einsum("qd,qkd->qk", q.double(), keys[p_f.clamp_min(0)]).float()
    torch.testing.assert_close(s_f[ok], ip[ok], rtol=1e-5, atol=1e-4)


def test_pq_engine_match_at_1_keeps_torch_path(index, engine):
    """On queries near keys, the default finds the same top-1 keys as the torch path."""
    g = torch.Generator().manual_seed(7)
    pick = torch.randperm(index.n_keys, generator=g)[:60]
    q = index.keys_by_list[pick] + 0.05 * torch.randn(60, index.d, generator=g)
    engine("torch")
    _, p_t = index.search(q, 1, NPROBE, scanner="pq")
    engine("auto")
    _, p_f = index.search(q, 1, NPROBE, scanner="pq")
    assert float((p_t == p_f).float().mean()) >= 0.9
