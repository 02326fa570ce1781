"""Magnitudes: every entry point gives the exact answer, or a one-line InputError naming the
argument, for keys and queries of any finite scale.

Two kinds of check, over tiny shapes:

- against numpy float64 brute force (tie-aware, tolerance relative to each query's score
  scale ``||q|| max ||k||``): decimal magnitudes 1e-30 .. 1e18, denormals, mixed per-row scales;
- power-of-two equivariance: keys x 2^a and queries x 2^b give the unit-scale result exactly
  (the same ids, scores x 2^(a+b) in float64), for every storage dtype, scanner and engine
  (exact, PQ with and without reorder, the CPU engines, faiss flat and fast-scan PQ, a
  sharded index). With the base data's rows already in [0.5, 1) the scaled problem IS the
  base problem, so anything short of bit-identity is a magnitude bug.
"""

import json

import numpy as np
import pytest
import torch

import amips
import amips.mol as am
from amips import InputError, IVFIndex
from amips.cli import main
from amips.metrics import GroundTruth, evaluate_results, match_at_1, recall_at_k
from amips.mol.similarity import score_all
from amips.numerics import FLOAT32_MAX, FLOAT32_TINY

N_KEYS, N_QUERIES, D, N_LISTS = 240, 24, 12, 6
# decimal scales for keys and queries; "mixed": every row its own scale in 1e-30 .. 1e30
SCALES = [1e-30, 1e-25, 1e-4, 1.0, 1e4, 1e18, "denormal", "mixed"]


def _base(seed: int = 0):
    """Keys and queries whose rows all have their largest |element| in [0.5, 1), fp32,
    and one exact tie (key 7 == key 3)."""
    rng = np.random.default_rng(seed)
    keys = rng.uniform(-1, 1, (N_KEYS, D))
    queries = rng.uniform(-1, 1, (N_QUERIES, D))
    for x in (keys, queries):
        x /= np.abs(x).max(1, keepdims=True) * 1.01  # max in [0.5, 1): exactly 1/1.01 < 1
    keys[7] = keys[3]
    return keys.astype(np.float32), queries.astype(np.float32)


def _scaled(scale, seed: int = 0):
    keys, queries = _base(seed)
    rng = np.random.default_rng(seed + 1)
    if scale == "denormal":  # largest |element| ~ 2^-135: every value a float32 subnormal
        return (keys * np.float32(2.0**-135)), (queries * np.float32(2.0**-130))
    if scale == "mixed":
        ks = 10.0 ** rng.uniform(-30, 30, (N_KEYS, 1))
        qs = 10.0 ** rng.uniform(-30, 5, (N_QUERIES, 1))
        return (keys * ks).astype(np.float32), (queries * qs).astype(np.float32)
    return (keys * scale).astype(np.float32), (queries * scale).astype(np.float32)


def _truth(keys, queries):
    """fp64 scores [nq, nk] and each query's scale ||q|| * max ||k||."""
    k64, q64 = keys.astype(np.float64), queries.astype(np.float64)
    scale = np.linalg.norm(q64, axis=1) * np.linalg.norm(k64, axis=1).max()
    return q64 @ k64.T, scale


def _assert_topk(ids, scores, exact, scale, k, *, rtol=1e-5, exact_order=False):
    """Tie-aware: the returned keys' true scores equal the true top-k scores within rtol *
    scale; returned scores (when given) equal the returned keys' true scores likewise."""
    ids = np.asarray(ids).reshape(exact.shape[0], -1)[:, :k]
    tol = rtol * scale
    want = -np.sort(-exact, axis=1)[:, :k]
    assert (ids >= 0).all(), "a query got fewer than k results"
    got = np.take_along_axis(exact, ids, 1)
    assert (np.abs(np.sort(got, 1)[:, ::-1] - want) <= tol[:, None]).all(), "not the exact top-k"
    if exact_order:
        assert (np.abs(got - want) <= tol[:, None]).all()
    for row in ids:
        assert len(set(row.tolist())) == len(row)
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64).reshape(exact.shape[0], -1)[:, :k]
        assert np.isfinite(s).all()
        assert (np.abs(s - got) <= tol[:, None]).all(), "scores are not the keys' scores"


def _fits_float32(values: np.ndarray) -> bool:
    """Whether float32 holds these scores per amips' rule: no |score| beyond its range, and
    no row whose largest |score| is nonzero but below its normal range."""
    mag = np.abs(values).reshape(values.shape[0], -1).max(1)
    return bool((mag <= FLOAT32_MAX).all() and not ((mag > 0) & (mag < FLOAT32_TINY)).any())


def _refused(exc: InputError, *names: str) -> None:
    text = str(exc)
    assert "\n" not in text and any(text.startswith(n) for n in names), text


# ----------------------------------------------------------------------------------------
# exact labels
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", SCALES + [2.0**126])
def test_exact_top1_topk_at_any_magnitude(scale):
    keys, queries = _scaled(scale) if scale != 2.0**126 else (_base()[0] * np.float32(2.0**126), _base()[1])
    exact, qscale = _truth(keys, queries)
    best = exact.max(1)
    s64, i64 = amips.exact_top1(queries, keys, score_dtype="float64")
    assert s64.dtype == torch.float64
    _assert_topk(i64[:, None].numpy(), s64[:, None].numpy(), exact, qscale, 1, rtol=1e-12)
    assert (i64.numpy() == exact.argmax(1)).all()  # the tie goes to the lower index
    ts, ti = amips.exact_topk(queries, keys, 5, score_dtype="float64")
    _assert_topk(ti.numpy(), ts.numpy(), exact, qscale, 5, rtol=1e-12, exact_order=True)
    if _fits_float32(best[:, None]) and _fits_float32(-np.sort(-exact, 1)[:, :5]):
        s32, i32 = amips.exact_top1(queries, keys)
        assert s32.dtype == torch.float32 and torch.equal(i32, i64)
        np.testing.assert_allclose(s32.numpy(), best, rtol=2**-23)
    else:
        with pytest.raises(InputError) as err:
            amips.exact_top1(queries, keys)
            amips.exact_topk(queries, keys, 5)
        _refused(err.value, "queries, keys")
        assert "score_dtype='float64'" in str(err.value)


def test_exact_scores_that_underflow_float32_are_refused_not_zero():
    keys, queries = _scaled(1e-30)
    with pytest.raises(InputError, match="underflow float32"):
        amips.exact_top1(queries, keys)
    with pytest.raises(InputError, match="score_dtype"):
        amips.exact_top1(queries, keys, score_dtype="float16")
    s, _ = amips.exact_top1(queries, keys, score_dtype="float64")
    assert (s.abs() > 0).all()


# ----------------------------------------------------------------------------------------
# index search: brute force at decimal magnitudes
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", SCALES + [1e36])
def test_search_is_exact_at_any_magnitude(scale):
    keys, queries = _scaled(scale)
    exact, qscale = _truth(keys, queries)
    index = IVFIndex.build(keys, N_LISTS, seed=0)
    scores, ids = index.search(queries, 10, N_LISTS, score_dtype="float64")  # every list: exact
    assert scores.dtype == torch.float64
    _assert_topk(ids.numpy(), scores.numpy(), exact, qscale, 10)
    if _fits_float32(np.take_along_axis(exact, ids.numpy(), 1)):
        s32, i32 = index.search(queries, 10, N_LISTS)
        assert s32.dtype == torch.float32 and torch.equal(i32, ids)
    else:
        with pytest.raises(InputError) as err:
            index.search(queries, 10, N_LISTS)
        _refused(err.value, "queries: scores")


@pytest.mark.parametrize("scale", [1e-30, 1e18, "denormal"])
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_low_precision_storage_is_exact_on_its_stored_keys_or_refused(scale, storage):
    keys, queries = _scaled(scale)
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[storage]
    peak = float(np.abs(keys).max())
    info = torch.finfo(dt)
    if peak > info.max or peak < info.tiny:
        with pytest.raises(InputError) as err:
            IVFIndex.build(keys, N_LISTS, storage_dtype=storage)
        _refused(err.value, "storage_dtype")
        return
    index = IVFIndex.build(keys, N_LISTS, storage_dtype=storage)
    stored = torch.from_numpy(keys).to(dt).float().numpy()
    exact, qscale = _truth(stored, queries)
    scores, ids = index.search(queries, 5, N_LISTS, score_dtype="float64")
    _assert_topk(ids.numpy(), scores.numpy(), exact, qscale, 5)


def test_float16_storage_refuses_keys_it_would_store_as_inf():
    keys, _ = _scaled(1e18)
    with pytest.raises(InputError, match="storage_dtype: float16 .* inf"):
        IVFIndex.build(keys, N_LISTS, storage_dtype="float16")
    with pytest.raises(InputError, match="^keys: values reach"):
        IVFIndex.build(keys.astype(np.float64) * 1e30, N_LISTS)  # beyond float32 itself


def test_search_at_the_top_of_the_float32_range_is_exact_or_refused_by_name():
    keys, queries = _base()
    keys = keys * np.float32(2.0**126)  # elements up to 8e37: every fp32 product of a scan overflows
    index = IVFIndex.build(keys, N_LISTS)
    with pytest.raises(InputError) as err:
        index.search(queries * 1e10, 5, N_LISTS)
    _refused(err.value, "queries: scores overflow")
    exact, qscale = _truth(keys, queries * np.float32(1e10))
    scores, ids = index.search(queries * 1e10, 5, N_LISTS, score_dtype="float64")
    _assert_topk(ids.numpy(), scores.numpy(), exact, qscale, 5)
    s32, i32 = index.search(queries * np.float32(2.0**-10), 5, N_LISTS)  # scores ~1e35: fp32 holds them
    assert torch.isfinite(s32).all() and (i32 >= 0).all()


# ----------------------------------------------------------------------------------------
# index search: power-of-two equivariance over every scanner and engine
# ----------------------------------------------------------------------------------------
EXPONENTS = [(-100, -100), (-83, -83), (60, 60), (126, -40), (-135, 20), (0, 90)]


def _search(index, queries, how, k=5, nprobe=3):
    if how.startswith("faiss"):
        from amips.index.faiss_backend import FaissIVF

        fb = FaissIVF(index, how.split("-")[1], **({"pq_subspaces": 6} if how.endswith("pqfs") else {}))
        return fb.search(queries, k, nprobe, refine=8 if how.endswith("pqfs") else 0, score_dtype="float64")
    if how.startswith("pq"):
        return index.search(queries, k, nprobe, scanner="pq", reorder=int(how[2:] or 0), score_dtype="float64")
    return index.search(queries, k, nprobe, score_dtype="float64")


@pytest.mark.parametrize("key_log2,query_log2", EXPONENTS)
@pytest.mark.parametrize("how,storage,engine", [
    ("exact", "float32", "batched"), ("exact", "float32", "faiss"), ("exact", "float32", "torch"),
    ("exact", "bfloat16", "auto"), ("exact", "float16", "auto"),
    # (the PQ torch path runs the pq_scan kernel, under the Triton interpreter here: too slow
    # for a table; the scaling is applied above the scanners, once for all of them)
    ("pq", "float32", "auto"), ("pq8", "float32", "auto"),
    ("faiss-flat", "float32", "auto"), ("faiss-pqfs", "float32", "auto"),
])
def test_search_is_power_of_two_equivariant(key_log2, query_log2, how, storage, engine, monkeypatch):
    monkeypatch.setenv("AMIPS_CPU_ENGINE", engine)
    keys, queries = _base()
    kk = (keys.astype(np.float64) * 2.0**key_log2).astype(np.float32)
    qq = (queries.astype(np.float64) * 2.0**query_log2).astype(np.float32)
    # subnormal keys keep fewer bits: the base problem is what they hold, scaled up (exact)
    keys = (kk.astype(np.float64) * 2.0**-key_log2).astype(np.float32)
    pq = {"pq_subspaces": 6, "pq_iters": 4} if how.startswith("pq") else {}
    base = IVFIndex.build(keys, N_LISTS, seed=0, storage_dtype=storage, **pq)
    s0, i0 = _search(base, queries, how)[:2]
    peak, info = float(np.abs(kk).max()), torch.finfo(getattr(torch, storage))
    if storage == "float16" and not info.tiny <= peak <= info.max or (key_log2 < -126 and storage != "float32"):
        with pytest.raises(InputError) as err:
            IVFIndex.build(kk, N_LISTS, seed=0, storage_dtype=storage, **pq)
        _refused(err.value, "storage_dtype")
        return
    scaled = IVFIndex.build(kk, N_LISTS, seed=0, storage_dtype=storage, **pq)
    s1, i1 = _search(scaled, qq, how)[:2]
    assert torch.equal(i1, i0)
    assert torch.equal(s1, s0.double() * 2.0 ** (key_log2 + query_log2))


def test_a_learned_router_reads_the_original_queries():
    """A router that is not scale-equivariant (a model) routes the original float32 queries;
    the scan still runs scaled, and float64 queries float32 cannot hold are refused by name."""
    from amips.index.routers import CentroidRouter

    class ModelLike(CentroidRouter):
        scale_equivariant = False
        seen = []

        def list_scores(self, queries):
            self.seen.append(queries)
            return super().list_scores(queries)

    keys, queries = _scaled(1e-30)
    index = IVFIndex.build(keys, N_LISTS, seed=0)
    rt = ModelLike(index.centroids)
    exact, qscale = _truth(keys, queries)
    scores, ids = index.search(queries, 5, N_LISTS, rt, score_dtype="float64")
    _assert_topk(ids.numpy(), scores.numpy(), exact, qscale, 5)
    assert torch.equal(rt.seen[-1], torch.from_numpy(queries))  # not the scaled copy
    with pytest.raises(InputError) as err:
        index.search(queries.astype(np.float64) * 1e-30, 5, N_LISTS, rt, score_dtype="float64")
    _refused(err.value, "queries: values outside float32's range")


def test_a_fixed_router_and_a_copied_scan_query_keep_the_query_scale():
    from amips.index.routers import FixedRouter, Route

    class CopyingRouter(FixedRouter):  # hands the scanner a copy of the (scaled) queries
        def route(self, queries, nprobe, margin=None):
            r = super().route(queries, nprobe, margin)
            return Route(r.lists, r.scan_queries.clone())

    keys, queries = _scaled(1e-30)
    index = IVFIndex.build(keys, N_LISTS, seed=0)
    exact, qscale = _truth(keys, queries)
    lists = torch.arange(N_LISTS).repeat(N_QUERIES, 1)
    for rt in (FixedRouter(lists, N_LISTS, D), CopyingRouter(lists, N_LISTS, D)):
        scores, ids = index.search(queries, 5, N_LISTS, rt, score_dtype="float64")
        _assert_topk(ids.numpy(), scores.numpy(), exact, qscale, 5)


def test_sharded_search_scales_like_the_index():
    from amips.index.sharded import ShardedIVFIndex

    keys, queries = _base()
    kk, qq = keys * np.float32(2.0**-120), queries * np.float32(2.0**-20)
    index = IVFIndex.build(kk, N_LISTS, seed=0)
    want = index.search(qq, 5, 3, score_dtype="float64")
    got = ShardedIVFIndex(index, rank=0, world_size=1).search(qq, 5, 3, score_dtype="float64")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(InputError, match="^queries: scores underflow"):
        ShardedIVFIndex(index, rank=0, world_size=1).search(qq, 5, 3)
    # each rank scans in the whole index's key scale: the two halves merge as they are
    halves = [ShardedIVFIndex(index, rank=r, world_size=2).search(qq, 5, 3, score_dtype="float64")
              for r in (0, 1)]
    merged = torch.cat([h[0] for h in halves], 1).sort(1, descending=True).values[:, :5]
    # (a rank's CPU engine may sum in another order: fp32 rounding of the scaled scores)
    torch.testing.assert_close(merged, want[0], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------
# metrics and eval
# ----------------------------------------------------------------------------------------
def _true_match_recall(exact, qscale, ids, k=10, rtol=1e-6):
    best = exact.max(1)
    kth = -np.sort(-exact, 1)[:, k - 1]
    got = np.take_along_axis(exact, ids, 1)
    tol = rtol * qscale
    m1 = float((got[:, 0] >= best - tol).mean())
    rec = float((got[:, :k] >= (kth - tol)[:, None]).sum(1).clip(max=k).mean() / k)
    return m1, rec


@pytest.mark.parametrize("scale", SCALES + [1e36])
def test_metrics_match_brute_force_at_any_magnitude(scale):
    keys, queries = _scaled(scale)
    exact, qscale = _truth(keys, queries)
    gt = GroundTruth.compute(queries, keys, k=10)
    rng = np.random.default_rng(3)
    found = rng.permutation(np.tile(np.arange(N_KEYS), (N_QUERIES, 1)).T).T[:, :10]  # random ids
    found[: N_QUERIES // 2] = np.argsort(-exact, 1, kind="stable")[: N_QUERIES // 2, :10]  # half right
    out = evaluate_results(queries, keys, found, gt, k=10)
    m1, rec = _true_match_recall(exact, qscale, found)
    assert out["match_at_1"] == pytest.approx(m1) and out["recall_at_10"] == pytest.approx(rec)
    assert 0.5 <= m1 < 0.7  # the random half is not counted as ties


def test_metrics_without_a_scale_are_relative_to_the_rows_scores():
    true = torch.tensor([[3e-9, 2e-9], [3.0, 2.0]])
    found = torch.tensor([[2e-9], [2.0]])
    assert match_at_1(found, true) == 0.0  # 1e-9 apart at scale 3e-9 is no tie
    assert match_at_1(found * 1e-20, true * 1e-20) == 0.0
    assert match_at_1(true[:, :1] * (1 - 1e-8), true) == 1.0
    assert recall_at_k(true, true, 2) == 1.0
    with pytest.raises(InputError, match="^scale"):
        match_at_1(found, true, scale=torch.tensor([1.0]))


@pytest.mark.parametrize("scale", [1e-25, 1e-4, 1e18])
def test_eval_reports_the_same_quality_at_any_magnitude(scale):
    from amips.eval import evaluate

    rows = {}
    for s in (1.0, scale):
        keys, queries = _scaled(s)
        index = IVFIndex.build(keys, N_LISTS, seed=0)
        rows[s] = evaluate(index, queries, nprobes=(1, 2), repeats=0, qps_single=0)
        keys64, q64 = keys, queries
        exact, qscale = _truth(keys64, q64)
        for r in rows[s]:
            _, ids = index.search(queries, 10, r["nprobe"], score_dtype="float64")
            m1, rec = _true_match_recall(exact, qscale, ids.numpy())
            assert r["match_at_1"] == pytest.approx(m1) and r["recall_at_10"] == pytest.approx(rec)
    for a, b in zip(rows[1.0], rows[scale]):
        assert a["match_at_1"] == b["match_at_1"] and a["recall_at_10"] == b["recall_at_10"]


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def _files(tmp_path, scale):
    keys, queries = _scaled(scale)
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "q.npy", queries)
    return keys, queries


@pytest.mark.parametrize("scale", [1e-30, 1e-4, 1e18, "mixed"])
def test_labels_cli_is_exact_or_refuses_in_one_line(tmp_path, scale, capsys):
    keys, queries = _files(tmp_path, scale)
    exact, _ = _truth(keys, queries)
    rc = main(["labels", "--keys", str(tmp_path / "k.npy"), "--queries", str(tmp_path / "q.npy"),
               "--out", str(tmp_path / "lab"), "--topk", "3", "--quiet"])
    err = capsys.readouterr().err
    if _fits_float32(exact.max(1)[:, None]) and _fits_float32(-np.sort(-exact, 1)[:, :3]):
        assert rc == 0, err
        assert (np.load(tmp_path / "lab" / "top1_index.npy") == exact.argmax(1)).all()
        np.testing.assert_allclose(np.load(tmp_path / "lab" / "top1_score.npy"), exact.max(1), rtol=2**-23)
    else:
        assert rc == 2
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("amips labels: error: queries, keys:"), err
        assert "Traceback" not in err


@pytest.mark.parametrize("scale", [1e-25, 1e-4])
def test_eval_cli_on_scaled_files_matches_unit_scale(tmp_path, scale, capsys):
    results = {}
    for s in (1.0, scale):
        root = tmp_path / str(s)
        root.mkdir()
        _files(root, s)
        assert main(["index", "build", "--keys", str(root / "k.npy"), "--n-lists", str(N_LISTS),
                     "--out", str(root / "ix"), "--quiet"]) == 0
        assert main(["eval", "--index", str(root / "ix"), "--queries", str(root / "q.npy"),
                     "--nprobe", "1,2", "--repeats", "0", "--single", "0",
                     "--json", str(root / "eval.json")]) == 0
        results[s] = json.loads((root / "eval.json").read_text())["results"]
    capsys.readouterr()
    for a, b in zip(results[1.0], results[scale]):
        assert (a["match_at_1"], a["recall_at_10"]) == (b["match_at_1"], b["recall_at_10"])


# ----------------------------------------------------------------------------------------
# MoL top-k
# ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # exp overflow inside the interpreter's gate
@pytest.mark.parametrize("scale", [1e-30, 1e-4, 1e4, 1e18, 1e30])
def test_mol_topk_at_any_query_magnitude(scale):
    torch.manual_seed(0)
    head = am.MoL(12, 10, 3, 2, 8, tau=0.05, gate_hidden=16).eval()
    items = torch.randn(200, 10)
    cache = head.item_cache(items, dtype=torch.float32)
    queries = torch.randn(16, 12) * scale
    with torch.no_grad():
        grid = score_all(head, head.query_parts(queries), cache).double()
    best = grid.max(1).values
    for method in ("exact", "bound"):
        scores, ids = am.topk(head, queries, 5, method, items=cache)
        assert torch.isfinite(scores).all() and (ids >= 0).all()
        # the head's scores lie in [-1/tau, 1/tau]: a tolerance of fp32 rounding there
        assert (grid.gather(1, ids[:, :1])[:, 0] >= best - 1e-4).all(), method


@pytest.mark.parametrize("case", ["float16-1e18", "float64-1e-50"])
def test_index_build_cli_refuses_keys_its_storage_cannot_hold(tmp_path, case, capsys):
    keys, _ = _base()
    storage, arr = (("float16", keys * np.float32(1e18)) if case == "float16-1e18"
                    else ("float32", keys.astype(np.float64) * 1e-50))
    np.save(tmp_path / "k.npy", arr)
    rc = main(["index", "build", "--keys", str(tmp_path / "k.npy"), "--n-lists", str(N_LISTS),
               "--storage", storage, "--out", str(tmp_path / "ix"), "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "storage_dtype" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "ix" / "centroids.npy").exists()  # refused before the k-means


def test_eval_cli_keeps_float64_queries_exact(tmp_path, capsys):
    keys, queries = _base()
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "q1.npy", queries.astype(np.float64))
    np.save(tmp_path / "q2.npy", queries.astype(np.float64) * 1e-50)  # float32 would hold 0s
    assert main(["index", "build", "--keys", str(tmp_path / "k.npy"), "--n-lists", str(N_LISTS),
                 "--out", str(tmp_path / "ix"), "--quiet"]) == 0
    out = []
    for name in ("q1", "q2"):
        assert main(["eval", "--index", str(tmp_path / "ix"), "--queries", str(tmp_path / f"{name}.npy"),
                     "--nprobe", "1", "--repeats", "0", "--single", "0",
                     "--json", str(tmp_path / f"{name}.json")]) == 0
        out.append(json.loads((tmp_path / f"{name}.json").read_text())["results"][0])
    capsys.readouterr()
    assert out[0]["match_at_1"] == out[1]["match_at_1"] < 1.0
