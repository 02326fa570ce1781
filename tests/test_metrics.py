"""amips.metrics: tie-aware match@1, recall@k, MRR on hand-made cases."""

import numpy as np
import pytest
import torch

from amips import InputError
from amips.metrics import GroundTruth, evaluate_results, match_at_1, mrr, recall_at_k, rescore


def test_hand_computed_metrics():
    true = torch.tensor([[5.0, 4.0, 3.0], [2.0, 2.0, 1.0]], dtype=torch.float64)
    found = torch.tensor([[5.0, 3.0, 0.0], [2.0, 2.0, 1.0]], dtype=torch.float64)
    assert match_at_1(found, true) == 1.0
    assert recall_at_k(found, true, 1) == 1.0
    # query 0: 5 and 3 reach the 2nd best (4)? only 5 does -> 1/2; query 1: both 2s -> 2/2
    assert recall_at_k(found, true, 2) == pytest.approx((0.5 + 1.0) / 2)
    assert recall_at_k(found, true, 3) == pytest.approx((2 / 3 + 1.0) / 2)
    found2 = torch.tensor([[4.0, 5.0, 0.0], [1.0, 0.5, 2.0]], dtype=torch.float64)
    assert match_at_1(found2, true) == 0.0
    assert mrr(found2, true) == pytest.approx((1 / 2 + 1 / 3) / 2)
    found3 = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    assert mrr(found3, true) == pytest.approx(0.5)


def test_ties_count_as_matches():
    keys = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # rows 0, 1 tie
    q = np.array([[1.0, 0.2]], dtype=np.float32)
    gt = GroundTruth.compute(q, keys, k=2)
    for ids in ([[0, 1]], [[1, 0]]):
        res = evaluate_results(q, keys, torch.tensor(ids), gt, k=2)
        assert res["match_at_1"] == 1.0 and res["recall_at_2"] == 1.0 and res["mrr"] == 1.0
    res = evaluate_results(q, keys, torch.tensor([[2, 0]]), gt, k=2)
    assert res["match_at_1"] == 0.0 and res["recall_at_2"] == 0.5 and res["mrr"] == 0.5


def test_rescore_is_fp64_and_marks_missing():
    keys = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    q = keys[:3] * 2
    s = rescore(q, keys, torch.tensor([[0, -1], [1, 2], [9, 9]]))
    assert s.dtype == torch.float64 and s[0, 1] == float("-inf")
    assert s[1, 1] == pytest.approx(float(np.dot(q[1].astype(np.float64), keys[2].astype(np.float64))))


def test_ground_truth_matches_numpy():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((200, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    gt = GroundTruth.compute(q, keys, k=4)
    ref = np.sort(q.astype(np.float64) @ keys.astype(np.float64).T, axis=1)[:, ::-1][:, :4]
    assert np.allclose(gt.scores.numpy(), ref)


def test_bad_inputs():
    with pytest.raises(InputError, match="same nq"):
        match_at_1(torch.zeros(3, 1), torch.zeros(4, 1))
    with pytest.raises(InputError, match="top-5"):
        recall_at_k(torch.zeros(3, 5), torch.zeros(3, 2), 5)
    with pytest.raises(InputError, match="out of range"):
        rescore(np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), torch.tensor([[5]]))
    with pytest.raises(InputError, match="integer"):
        rescore(np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), np.array([[0.5]]))
