"""IVF index: exhaustive search equals brute force, routers, faiss backend, save/load,
FLOP accounting and bad inputs."""

import json

import numpy as np
import pytest
import torch

import amips
from amips import InputError, IVFIndex
from amips.index import CentroidRouter, FixedRouter, KeyNetRouter, SupportRouter, kmeans
from amips.index.faiss_backend import FaissIVF
from amips.index.routers import top_lists
from amips.metrics import GroundTruth, match_at_1, recall_at_k, rescore


@pytest.fixture(autouse=True)
def torch_scan(monkeypatch):
    """The Triton scan is tested at tiny shapes in test_index_scan_kernel.py; here the
    interpreter would be far too slow, so searches use the torch path."""
    monkeypatch.setenv("AMIPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def data():
    ds = amips.synthetic(3000, 300, 24, n_clusters=16, seed=3)
    keys = ds.keys.copy()
    keys[7] = keys[8]  # an exact duplicate key: a tie for some queries
    return keys, np.vstack([ds.queries_test, ds.queries_train[:100]])


@pytest.fixture(scope="module")
def index(data):
    keys, _ = data
    return IVFIndex.build(keys, 20, seed=0)


def _assert_tie_aware_equal(queries, keys, ids, gt_scores, k):
    found = rescore(queries, keys, ids)
    assert match_at_1(found, gt_scores) == 1.0
    assert recall_at_k(found, gt_scores, k) == 1.0


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_full_probe_equals_brute_force(data, metric):
    keys, queries = data
    index = IVFIndex.build(keys, 20, metric=metric, seed=1, kmeans_backend="torch", iters=5)
    gt = GroundTruth.compute(queries, keys, k=10)
    scores, ids = index.search(queries, k=10, nprobe=index.n_lists)
    _assert_tie_aware_equal(queries, keys, ids, gt.scores, 10)
    assert torch.allclose(scores.double(), gt.scores, atol=1e-5)
    # ids are distinct original ids
    for row in ids:
        assert row.unique().numel() == 10


def test_grouping_is_consistent(index, data):
    keys, _ = data
    # every list's keys are exactly the keys whose partition is that list
    part = index.partitions
    offs = index.list_offsets
    for lst in range(index.n_lists):
        members = index.ids[offs[lst] : offs[lst + 1]]
        assert torch.equal(members.sort().values, torch.nonzero(part == lst).flatten())
    assert torch.allclose(index.keys(), torch.from_numpy(keys))
    assert int(index.list_sizes.sum()) == keys.shape[0]


def test_kmeans_torch_and_faiss_partition_all_keys(data):
    keys, _ = data
    for backend in ("torch", "faiss"):
        c, a = kmeans(keys, 12, backend=backend, iters=4, seed=0)
        assert c.shape == (12, keys.shape[1]) and a.shape == (keys.shape[0],)
        assert torch.allclose(c.norm(dim=1), torch.ones(12), atol=1e-4)  # spherical
        best = (torch.from_numpy(keys) @ c.T).argmax(1)
        assert torch.equal(best, a)


def test_kmeans_auto_without_faiss_uses_torch(data, monkeypatch):
    """The GPU image has no faiss: 'auto' must fall back to torch on CPU too."""
    import importlib

    km = importlib.import_module("amips.index.kmeans")  # the module (the package exports the function)
    keys, _ = data
    monkeypatch.setattr(km, "_has_faiss", lambda: False)

    def no_faiss(*args, **kwargs):
        raise AssertionError("faiss k-means called without faiss")

    monkeypatch.setattr(km, "_kmeans_faiss", no_faiss)
    c, a = km.kmeans(keys, 12, iters=4, seed=0)
    assert c.shape == (12, keys.shape[1]) and torch.equal((torch.from_numpy(keys) @ c.T).argmax(1), a)


def _router_mlp(index, sha=None, n_heads=None):
    from amips.models import RouterMLP

    torch.manual_seed(0)
    m = RouterMLP(index.d, width=16, depth=1, n_heads=n_heads or index.n_lists)
    m.config = {**m.config, "n_partitions": n_heads or index.n_lists,
                "partitions_sha256": sha if sha is not None else index.partitions_sha256}
    return m


def _keynet(index):
    from amips.models import KeyNet

    torch.manual_seed(0)
    m = KeyNet(index.d, width=16, depth=1)
    with torch.no_grad():
        m.out.weight.normal_(0, 0.05)  # move the key away from q
    return m


def test_top_lists_is_the_stable_order_under_ties():
    """top_lists (topk + a stable re-sort of boundary-tied rows) equals a full stable sort."""
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        nq, n_lists = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        nprobe = int(torch.randint(1, n_lists + 1, (1,), generator=g))
        scores = torch.randint(0, 4, (nq, n_lists), generator=g).float()  # many ties
        if trial % 3 == 0:
            scores[0, 0] = float("nan")  # ranks last
        ref = torch.argsort(torch.nan_to_num(scores, nan=float("-inf")), dim=1, descending=True,
                            stable=True)[:, :nprobe]
        assert torch.equal(top_lists(scores, nprobe), ref)
    # router-sized rows: both selection paths (topk up to 4 lists, argpartition beyond), with
    # ties planted across the cut and inside the selection, and -inf rows
    scores = torch.randn(64, 548, generator=g)
    scores[1, :10] = 5.0  # ten-way tie at the top: every nprobe < 10 cuts through it
    scores[2, 7], scores[2, 300] = 4.0, 4.0  # a tie inside the selection
    scores[3] = float("-inf")
    scores[4, 500:] = float("nan")
    for nprobe in (1, 2, 3, 4, 5, 8, 32, 100, 547, 548):
        ref = torch.argsort(torch.nan_to_num(scores, nan=float("-inf")), dim=1, descending=True,
                            stable=True)[:, :nprobe]
        assert torch.equal(top_lists(scores, nprobe), ref), nprobe


def test_routers_return_valid_ordered_lists(index, data):
    _, queries = data
    q = torch.from_numpy(queries)
    routers = [
        CentroidRouter(index.centroids),
        index.router(_router_mlp(index)),
        index.router(_keynet(index)),
        KeyNetRouter(_keynet(index), index.centroids, scan_with="query"),
    ]
    assert isinstance(routers[1], SupportRouter) and isinstance(routers[2], KeyNetRouter)
    for rt in routers:
        scores, _ = rt.list_scores(q)
        for nprobe in (1, 5, index.n_lists):
            lists = rt.route(q, nprobe).lists
            assert lists.shape == (q.shape[0], nprobe) and lists.dtype == torch.int64
            assert int(lists.min()) >= 0 and int(lists.max()) < index.n_lists
            for row in lists:
                assert row.unique().numel() == nprobe
            # ordered by the router's scores, best first
            chosen = scores.gather(1, lists)
            assert torch.all(chosen[:, :-1] >= chosen[:, 1:])
            # and nothing left out beats the last chosen
            rest = scores.scatter(1, lists, float("-inf"))
            assert torch.all(rest.max(1).values <= chosen[:, -1])
    # the centroid router ranks by <q, centroid>
    lists = routers[0].route(q, 3).lists
    assert torch.equal(lists, torch.argsort(q @ index.centroids.T, dim=1, descending=True, stable=True)[:, :3])
    # KeyNet substitution scans with the key, the route-only variant with q
    assert not torch.allclose(routers[2].route(q, 1).scan_queries, q)
    assert torch.equal(routers[3].route(q, 1).scan_queries, q)


def test_learned_routers_search_exactly_at_full_probe(index, data):
    keys, queries = data
    gt = GroundTruth.compute(queries, keys, k=5)
    for router in (_router_mlp(index), "centroid"):
        _, ids = index.search(queries, 5, index.n_lists, router)
        _assert_tie_aware_equal(queries, keys, ids, gt.scores, 5)
    kn = KeyNetRouter(_keynet(index), index.centroids, scan_with="query")
    _, ids = index.search(queries, 5, index.n_lists, kn)
    _assert_tie_aware_equal(queries, keys, ids, gt.scores, 5)


@pytest.mark.parametrize("kind", ["flat", "pqfs"])
def test_faiss_backend_matches_our_scanner(index, data, kind):
    keys, queries = data
    q = torch.from_numpy(queries)
    for router in ("centroid", _router_mlp(index)):
        rt = index.router(router)
        fb = FaissIVF(index, kind, pq_subspaces=12)
        for nprobe in (1, 4):
            ours_s, ours_i = index.search(q, 10, nprobe, rt)
            if kind == "flat":
                fs, fi = fb.search(q, 10, nprobe, rt)
            else:  # PQ codes + exact refine over every candidate = exact scan of the lists
                n_max = int(index.list_sizes.sort(descending=True).values[:nprobe].sum())
                fs, fi = fb.search(q, 10, nprobe, rt, refine=n_max)
            assert torch.allclose(fs.double(), ours_s.double(), atol=1e-4)
            a = rescore(q, keys, fi)
            b = rescore(q, keys, ours_i)
            assert torch.allclose(a, b, atol=1e-5)  # same keys up to ties
            same = (fi == ours_i) | ((a - b).abs() < 1e-5)
            assert bool(same.all())


def test_export_faiss_search_equals_faiss_own_routing(index, data):
    import faiss

    _, queries = data
    f = index.to_faiss("flat")
    f.nprobe = 3
    d_f, i_f = f.search(queries, 5)  # faiss routes with its IndexFlatIP over our centroids
    s, i = index.search(queries, 5, 3)
    assert np.allclose(d_f, s.numpy(), atol=1e-4)
    assert isinstance(f, faiss.IndexIVFFlat) and f.ntotal == index.n_keys


def test_save_load_round_trip(index, data, tmp_path):
    _, queries = data
    path = index.save(tmp_path / "ix")
    for name in ("index.json", "centroids.npy", "partitions.npy", "lists.safetensors"):
        assert (path / name).exists()
    part = np.load(path / "partitions.npy")
    assert part.dtype == np.int64 and part.shape == (index.n_keys,)
    assert np.array_equal(part, index.partitions.numpy())
    assert np.allclose(np.load(path / "centroids.npy"), index.centroids.numpy())
    cfg = json.loads((path / "index.json").read_text())
    loaded = IVFIndex.load(path)
    assert cfg["partitions_sha256"] == loaded.partitions_sha256 == index.partitions_sha256
    assert torch.equal(loaded.keys_by_list, index.keys_by_list)
    assert torch.equal(loaded.ids, index.ids)
    a = index.search(queries, 7, 3)
    b = loaded.search(queries, 7, 3)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    # no temporary files left behind
    assert not [p for p in path.iterdir() if p.name.startswith(".")]
    # a modified partition file is detected
    np.save(path / "partitions.npy", np.zeros_like(part))
    with pytest.raises(InputError, match="partitions.npy"):
        IVFIndex.load(path)


def test_flop_accounting_hand_computed():
    # 4 keys in d = 2, two lists of sizes 3 and 1
    keys = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1]], dtype=np.float32)
    index = IVFIndex.build(keys, 2, partitions=np.array([0, 0, 0, 1]))
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # query 0 probes list 0 (3 keys), query 1 probes list 1 (1 key): mean 2 keys scanned
    _, ids, info = index.search(q, 1, 1, return_info=True)
    assert ids[:, 0].tolist() == [0, 3]
    assert info.keys_scanned_per_query == 2.0
    assert info.router_flops_per_query == 2 * 2 * 2  # 2 lists x d = 2, 2 FLOPs per MAC
    assert info.scan_flops_per_query == 2 * 2 * 2.0  # 2 keys x d = 2 x 2
    assert info.flops_per_query == 16.0
    _, _, info = index.search(q, 1, 2, return_info=True)
    assert info.scan_flops_per_query == 2 * 2 * 4.0 and info.flops_per_query == 24.0
    assert index.flops_per_query(q, 2) == 24.0
    # a model router adds its own forward cost instead of the centroid scores
    fixed = FixedRouter(torch.tensor([[0], [0]]), 2, 2, cost=100.0)
    _, _, info = index.search(q, 1, 1, fixed, return_info=True)
    assert info.flops_per_query == 100.0 + 2 * 2 * 3.0


def test_bad_inputs(index, data, tmp_path):
    keys, queries = data
    with pytest.raises(InputError, match="nprobe"):
        index.search(queries, 10, 0)
    with pytest.raises(InputError, match="nprobe"):
        index.search(queries, 10, index.n_lists + 1)
    with pytest.raises(InputError, match="dimension"):
        index.search(queries[:, :5], 10, 2)
    bad = queries.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        index.search(bad, 10, 2)
    with pytest.raises(InputError, match="k"):
        index.search(queries, 0, 2)
    with pytest.raises(InputError, match="n_lists"):
        IVFIndex.build(keys, keys.shape[0] + 1)
    with pytest.raises(InputError, match="metric"):
        IVFIndex.build(keys, 4, metric="cosine")
    with pytest.raises(InputError, match="router"):
        index.search(queries, 10, 2, router="nonsense:abc")
    with pytest.raises(InputError, match="scanner"):
        index.search(queries, 10, 2, scanner="pq")  # built without PQ
    # a multi-head router trained for another index
    with pytest.raises(InputError, match="another index"):
        index.search(queries, 10, 2, router=_router_mlp(index, sha="0" * 64))
    with pytest.raises(InputError, match="heads"):
        index.search(queries, 10, 2, router=_router_mlp(index, n_heads=index.n_lists + 3))
    with pytest.raises(InputError, match="index.json"):
        IVFIndex.load(tmp_path)


def test_search_with_a_model_hashes_the_partitions_once(index, data, monkeypatch):
    """search(router=model) wraps the model on every call and checks it against the index's
    partition digests; those are computed once, not per call (it cost 5 ms per query)."""
    _, queries = data
    model = _router_mlp(index)
    index.search(queries[:1], 5, 2, model)
    calls = []
    real = type(index).partitions
    monkeypatch.setattr(type(index), "partitions", property(lambda self: calls.append(1) or real.fget(self)))
    for _ in range(3):
        index.search(queries[:1], 5, 2, model)
    assert calls == []
    with pytest.raises(amips.InputError, match="another index"):
        index.search(queries[:1], 5, 2, _router_mlp(index, sha="0" * 64))


def test_bf16_router_scores_lists_with_a_bf16_copy(index, data):
    """dtype='bf16': the list scores come from a bf16 copy of the model (the model itself
    stays fp32), close to the fp32 scores, and the routes mostly agree; bad dtypes and
    non-model routers are refused by name."""
    _, queries = data
    q = torch.from_numpy(queries)
    model = _router_mlp(index)
    with torch.no_grad():
        model.out.weight.normal_(0, 0.5)
    fp32, bf16 = index.router(model), index.router(model, dtype="bf16")
    assert bf16.describe().endswith("(bf16)") and fp32.describe() == "router-mlp"
    assert next(model.parameters()).dtype == torch.float32
    s32, _ = fp32.list_scores(q)
    s16, _ = bf16.list_scores(q)
    assert s16.dtype == torch.float32 and not torch.equal(s16, s32)
    scale = s32.abs().max()
    assert float((s16 - s32).abs().max()) <= 0.05 * float(scale)
    l32, l16 = fp32.route(q, 4).lists, bf16.route(q, 4).lists
    assert float((l32[:, 0] == l16[:, 0]).float().mean()) >= 0.9
    # the search path takes it like any router
    _, ids = index.search(q[:20], 5, 4, bf16)
    assert ids.shape == (20, 5) and bool((ids >= 0).all())
    with pytest.raises(InputError, match="dtype"):
        index.router(model, dtype="fp16")
    with pytest.raises(InputError, match="dtype"):
        index.router("centroid", dtype="bf16")
    with pytest.raises(InputError, match="dtype"):
        index.router(_keynet(index), dtype="bf16")
    with pytest.raises(InputError, match="dtype"):
        index.router(fp32, dtype="bf16")


def test_probe_margin_probes_only_lists_near_the_best(index, data):
    """Adaptive probing: of its best nprobe lists a query scans those the router scores
    within probe_margin of its best list; the search equals a search of exactly those
    lists, FLOPs and keys scanned count only them, and bad margins are refused by name."""
    keys, queries = data
    q = torch.from_numpy(queries)
    rt = index.router(_router_mlp(index))
    scores, _ = rt.list_scores(q)
    full = rt.route(q, 6).lists
    s = scores.gather(1, full)
    gaps = (s[:, :1] - s[:, 1:]).flatten()
    margin = float(gaps.median())
    lists = index.route(q, 6, rt, probe_margin=margin).lists
    want = torch.where(s >= s[:, :1] - margin, full, torch.full_like(full, -1))
    want[:, 0] = full[:, 0]
    assert torch.equal(lists, want)
    n_live = (lists >= 0).sum(1)
    assert int(n_live.min()) >= 1 and 1 < float(n_live.float().mean()) < 6  # adaptive, not all or none
    # margin 0 keeps the best list (and lists tied with it); a huge margin keeps all nprobe
    assert torch.equal(index.route(q, 6, rt, probe_margin=0.0).lists[:, 0], full[:, 0])
    assert torch.equal(index.route(q, 6, rt, probe_margin=1e30).lists, full)
    # the search is the exact top-k of the kept lists
    sc, ids, info = index.search(q, 5, 6, rt, probe_margin=margin, return_info=True)
    ref_s, ref_ids = index.search(q, 5, 6, FixedRouter(lists, index.n_lists, index.d))
    assert torch.equal(ids, ref_ids) and torch.equal(sc, ref_s)
    sizes = index.list_sizes
    scanned = torch.where(lists >= 0, sizes[lists.clamp_min(0)], 0).sum(1).double().mean()
    assert info.keys_scanned_per_query == pytest.approx(float(scanned))
    plain = index.search(q, 5, 6, rt, return_info=True)[2]
    assert info.keys_scanned_per_query < plain.keys_scanned_per_query
    assert index.flops_per_query(q, 6, rt, probe_margin=margin) < index.flops_per_query(q, 6, rt)
    for bad in (-1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(InputError, match="probe_margin"):
            index.search(q[:3], 5, 6, rt, probe_margin=bad)
    with pytest.raises(InputError, match="probe_margin"):
        index.search(q[:3], 5, 2, FixedRouter(full[:3], index.n_lists, index.d), probe_margin=1.0)
