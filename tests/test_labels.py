"""Certified-exact labels: the Python API against an fp64 oracle, tie-aware."""

import numpy as np
import pytest
import torch

import amips
from amips import InputError, exact_top1, exact_topk, partition_top1
from amips.labels import Candidates, KeySource
from amips.labels.certify import _certify_and_refine


def oracle(q, k):
    s = q.astype(np.float64) @ k.astype(np.float64).T
    return s


def check_top1(q, k, scores, index):
    s = oracle(q, k)
    best = s.max(1)
    index = np.asarray(index)
    got = s[np.arange(len(q)), index]
    # exact: the returned key's fp64 score is the maximum; ties go to the lowest index
    np.testing.assert_array_equal(got, best)
    np.testing.assert_array_equal(index, s.argmax(1))
    np.testing.assert_allclose(np.asarray(scores), best.astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
@pytest.mark.parametrize("nq,nk,d", [(1, 1, 1), (7, 3, 3), (50, 1000, 100), (13, 300, 384)])
def test_exact_top1_matches_oracle(nq, nk, d, precision):
    rng = np.random.default_rng(nq + nk + d)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    k = rng.standard_normal((nk, d)).astype(np.float32)
    s, i = exact_top1(q, k, precision=precision)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    check_top1(q, k, s.numpy(), i.numpy())


def test_near_ties_below_fp32_resolution_are_exact():
    """Gaps far below fp32 rounding: only the fp64 refinement can order these."""
    rng = np.random.default_rng(0)
    d = 64
    base = rng.standard_normal(d)
    keys = np.repeat(base[None], 12, axis=0)
    keys[:, 0] += np.linspace(0, 1e-9, 12)[::-1]  # key 0 best by 1e-10 steps
    keys = np.concatenate([rng.standard_normal((200, d)), keys]).astype(np.float64)
    keys32 = keys.astype(np.float32)
    q = np.abs(base[None]).astype(np.float32) + 1.0
    s, i = exact_top1(q, keys32)
    check_top1(q, keys32, s.numpy(), i.numpy())


def test_planted_exact_ties_and_fp16_inputs():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((500, 32)).astype(np.float16)
    k[[10, 250, 499]] = k[100]
    q = np.concatenate([k[100:101].astype(np.float32) * 3, rng.standard_normal((20, 32))]).astype(np.float16)
    s, i = exact_top1(q, k)
    assert int(i[0]) == 10
    check_top1(q, k, s.numpy(), i.numpy())
    s, i = exact_topk(q, k, 4)
    assert i[0].tolist() == [10, 100, 250, 499]


def test_many_ties_overflow_falls_back_to_fp64():
    k = np.ones((3000, 4), dtype=np.float32)  # every key ties: candidate set overflows
    q = np.ones((3, 4), dtype=np.float32)
    s, i = exact_top1(q, k)
    assert i.tolist() == [0, 0, 0]
    s, i = exact_topk(q, k, 5)
    assert i.tolist() == [[0, 1, 2, 3, 4]] * 3


@pytest.mark.parametrize("k", [1, 3, 10])
def test_exact_topk_matches_oracle(k):
    rng = np.random.default_rng(k)
    q = rng.standard_normal((40, 48)).astype(np.float32)
    keys = rng.standard_normal((700, 48)).astype(np.float32)
    s, i = exact_topk(q, keys, k)
    ref = oracle(q, keys)
    order = np.lexsort((np.broadcast_to(np.arange(700), ref.shape), -ref), axis=1)[:, :k]
    np.testing.assert_array_equal(i.numpy(), order)
    np.testing.assert_allclose(s.numpy(), np.take_along_axis(ref, order, 1), atol=1e-5)


def test_topk_larger_than_key_count_pads():
    rng = np.random.default_rng(2)
    s, i = exact_topk(rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), 6)
    assert (i[:, 4:] == -1).all() and torch.isneginf(s[:, 4:]).all()
    assert sorted(i[0, :4].tolist()) == [0, 1, 2, 3]


def test_streamed_shards_equal_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((2000, 24)).astype(np.float16)
    np.save(tmp_path / "keys.npy", keys)
    mm = np.load(tmp_path / "keys.npy", mmap_mode="r")
    q = rng.standard_normal((30, 24)).astype(np.float32)
    s1, i1 = exact_top1(q, mm, shard_size=333, batch_size=7)
    s2, i2 = exact_top1(q, keys)
    assert torch.equal(i1, i2) and torch.equal(s1, s2)
    t1 = exact_topk(q, mm, 5, shard_size=333)
    t2 = exact_topk(q, keys, 5)
    assert torch.equal(t1[1], t2[1])


def test_torch_inputs_stay_on_device_and_types():
    q = torch.randn(6, 8, dtype=torch.float64)
    k = torch.randn(20, 8, dtype=torch.float64)
    s, i = exact_top1(q, k)
    assert s.device == q.device
    check_top1(q.numpy(), k.numpy(), s.numpy(), i.numpy())


def test_partition_top1_matches_oracle():
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((400, 16)).astype(np.float32)
    q = rng.standard_normal((25, 16)).astype(np.float32)
    ids = rng.integers(0, 9, size=400)
    ids[ids == 3] = 4  # partition 3 empty
    ids[17] = 7
    ids[ids == 7] = 8
    ids[17] = 7  # partition 7 holds one key
    ids = rng.permutation(ids)  # unsorted ids
    s, i = partition_top1(q, keys, ids, n_partitions=10)
    assert s.shape == (25, 10) and i.shape == (25, 10)
    ref = oracle(q, keys)
    for p in range(10):
        members = np.nonzero(ids == p)[0]
        if len(members) == 0:
            assert torch.isneginf(s[:, p]).all() and (i[:, p] == -1).all()
            continue
        best = members[ref[:, members].argmax(1)]
        np.testing.assert_array_equal(i[:, p].numpy(), best)
        np.testing.assert_allclose(s[:, p].numpy(), ref[np.arange(25), best], atol=1e-5)


def test_partition_top1_through_the_kernel(monkeypatch):
    """The GPU path (fused kernel over partition segments), run by the interpreter."""
    monkeypatch.setenv("AMIPS_BACKEND", "triton")
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((120, 16)).astype(np.float32)
    q = rng.standard_normal((9, 16)).astype(np.float32)
    ids = rng.integers(0, 5, size=120)
    s, i = partition_top1(q, keys, ids)
    ref = oracle(q, keys)
    for p in range(5):
        members = np.nonzero(ids == p)[0]
        np.testing.assert_array_equal(i[:, p].numpy(), members[ref[:, members].argmax(1)])
    s1, i1 = exact_top1(q, keys)
    check_top1(q, keys, s1.numpy(), i1.numpy())


def test_certification_rejects_overlapping_bounds():
    """Candidates whose bounds cannot exclude an unseen key are not certified."""
    c = Candidates(
        scores=torch.tensor([[1.0, 0.5]]),
        index=torch.tensor([[0, 1]]),
        err=torch.tensor([[0.1, 0.1]], dtype=torch.float64),
        upper=torch.tensor([0.95], dtype=torch.float64),
    )
    keys = KeySource(np.eye(2, dtype=np.float32))
    _, _, ok = _certify_and_refine(c, 1, torch.tensor([[1.0, 0.0]], dtype=torch.float64), keys)
    assert not bool(ok[0])
    c.upper = torch.tensor([0.85], dtype=torch.float64)
    s, i, ok = _certify_and_refine(c, 1, torch.tensor([[1.0, 0.0]], dtype=torch.float64), keys)
    assert bool(ok[0]) and int(i[0, 0]) == 0 and float(s[0, 0]) == 1.0


@pytest.mark.parametrize(
    "queries,keys,match",
    [
        (np.full((2, 3), np.nan, np.float32), np.ones((4, 3), np.float32), "queries: contains NaN"),
        (np.ones((2, 3), np.float32), np.array([[1, 2, np.inf]] * 4, np.float32), "keys: contains NaN or inf"),
        (np.ones((2, 3), np.float32), np.ones((4, 5), np.float32), "dimension mismatch"),
        (np.ones((0, 3), np.float32), np.ones((4, 3), np.float32), "queries: is empty"),
        (np.ones((2, 3), np.float32), np.ones((0, 3), np.float32), "keys: is empty"),
        (np.ones((2, 3), bool), np.ones((4, 3), np.float32), "queries: expected a floating-point"),
        (np.ones(3, np.float32), np.ones((4, 3), np.float32), "queries: expected a 2-D"),
        ([[1.0, 2.0]], np.ones((4, 2), np.float32), "queries: expected a numpy array"),
    ],
)
def test_bad_inputs_name_the_argument(queries, keys, match):
    with pytest.raises(InputError, match=match):
        exact_top1(queries, keys)


def test_bad_k_and_partitions():
    q = np.ones((2, 3), np.float32)
    k = np.ones((4, 3), np.float32)
    with pytest.raises(InputError, match="k: must be <= 128"):
        exact_topk(q, k, 129)
    with pytest.raises(InputError, match="k: must be >= 1"):
        exact_topk(q, k, 0)
    with pytest.raises(InputError, match="partition_ids: expected 4 entries"):
        partition_top1(q, k, np.zeros(3, np.int64))
    with pytest.raises(InputError, match="partition_ids: expected integer"):
        partition_top1(q, k, np.zeros(4, np.float32))
    with pytest.raises(InputError, match="n_partitions"):
        partition_top1(q, k, np.array([0, 1, 2, 5]), n_partitions=3)
    with pytest.raises(InputError, match="precision"):
        exact_top1(q, k, precision="int4")


def test_public_api_exports():
    assert amips.exact_top1 is exact_top1 and callable(amips.partition_top1)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_screening_precisions_are_certified_exact(precision):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((3000, 96)).astype(np.float32)
    k = rng.standard_normal((20000, 96)).astype(np.float32)
    k[[100, 19999]] = k[5000]
    q[0] = k[5000]
    s, i = exact_top1(torch.from_numpy(q).cuda(), torch.from_numpy(k).cuda(), precision=precision)
    assert i.is_cuda
    check_top1(q, k, s.cpu().numpy(), i.cpu().numpy())
    assert int(i[0]) == 100
    s, i = exact_topk(torch.from_numpy(q).cuda(), torch.from_numpy(k).cuda(), 8, precision=precision)
    ref = oracle(q, k)
    order = np.lexsort((np.broadcast_to(np.arange(len(k)), ref.shape), -ref), axis=1)[:, :8]
    np.testing.assert_array_equal(i.cpu().numpy(), order)


def test_certification_cascade_bf16_then_fp32_then_fp64():
    """Masses of near-equal keys: the bf16 screen overflows, the fp32 re-screen certifies."""
    from amips.labels import BatchLabeler, KeySource, LabelSpec

    rng = np.random.default_rng(8)
    d = 16
    q = np.zeros((2, d), np.float32)
    q[:, 0] = 1.0
    keys = rng.standard_normal((1500, d)).astype(np.float32) * 0.01
    keys[:, 0] = 1.0 + np.arange(1500, dtype=np.float32) * 6e-6  # distinct, within the bf16 bound
    labeler = BatchLabeler(KeySource(keys), LabelSpec(precision="bf16"), torch.device("cpu"))
    qt = torch.from_numpy(q)
    out, stats = labeler.finish(qt, labeler.screen(qt, 0, None))
    assert stats["rescreened_queries"] == 2 and stats["fallback_queries"] == 0
    check_top1(q, keys, out["top1_score"], out["top1_index"])
    tied = np.ones((1500, d), np.float32)  # exact ties: only the fp64 scan can settle them
    labeler = BatchLabeler(KeySource(tied), LabelSpec(precision="bf16"), torch.device("cpu"))
    out, stats = labeler.finish(qt, labeler.screen(qt, 0, None))
    assert stats["fallback_queries"] == 2 and out["top1_index"].tolist() == [0, 0]


def test_bf16_bitwise_threshold_compare_equals_float_compare():
    from amips.labels.screen import _at_least

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 300, generator=g).bfloat16()
    for threshold in (
        torch.rand(64, generator=g, dtype=torch.float64) + 0.01,  # positive: int16 path
        torch.randn(64, generator=g, dtype=torch.float64),  # mixed signs: float path
        scores[:, 7].double(),  # exactly representable thresholds (ties count as >=)
        scores[:, 7].double() + 1e-9,
    ):
        expected = scores.double() >= threshold[:, None]
        assert torch.equal(_at_least(scores, threshold), expected)


def test_labeler_reuses_keys_across_calls():
    from amips.labels import Labeler

    rng = np.random.default_rng(9)
    keys = torch.from_numpy(rng.standard_normal((600, 12)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, 7, size=600))
    lab = Labeler(keys, partition_ids=ids, n_partitions=8, batch_size=13)
    for seed in (0, 1):
        q = torch.from_numpy(np.random.default_rng(seed).standard_normal((40, 12)).astype(np.float32))
        out = lab(q)
        s, i = exact_top1(q, keys)
        ps, pi = partition_top1(q, keys, ids, n_partitions=8)
        assert torch.equal(out["top1_index"], i) and torch.equal(out["partition_index"], pi)
        assert torch.isneginf(out["partition_score"][:, 7]).all()
        check_top1(q.numpy(), keys.numpy(), out["top1_score"].numpy(), out["top1_index"].numpy())
    assert lab._batch._cached is not None  # the prepared shard was kept
    with pytest.raises(InputError, match="dimension mismatch"):
        lab(torch.ones(2, 5))


def test_kernel_top1_window_overflow_goes_down_the_cascade(monkeypatch):
    """The GPU top-1 path (interpreter): a full window buffer leaves the query uncertified,
    the cascade settles it exactly (lowest index among exact ties); others certify at once."""
    from amips.labels import BatchLabeler, KeySource, LabelSpec

    monkeypatch.setenv("AMIPS_BACKEND", "triton")
    rng = np.random.default_rng(12)
    d = 16
    keys = rng.standard_normal((90, d)).astype(np.float32)
    keys[40:70] = keys[3] * 4  # 30 exact ties, far ahead of every other key for q[0]
    q = rng.standard_normal((3, d)).astype(np.float32)
    q[0] = keys[3]
    labeler = BatchLabeler(KeySource(keys), LabelSpec(precision="fp32"), torch.device("cpu"))
    qt = torch.from_numpy(q)
    out, stats = labeler.finish(qt, labeler.screen(qt, 0, None))
    assert stats["fallback_queries"] >= 1 and out["top1_index"][0] == 40
    check_top1(q, keys, out["top1_score"], out["top1_index"])
