"""The fused screening kernel (Triton under the interpreter on CPU) against an fp64 oracle."""

import numpy as np
import pytest
import torch

from amips.kernels.mips_topk import (
    mips_topk,
    mips_topk_ref,
    screening_error_bound,
)


def oracle_topk(q: np.ndarray, k: np.ndarray, kp: int):
    """fp64 scores; order (score desc, index asc)."""
    s = q.astype(np.float64) @ k.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(k.shape[0]), s.shape), -s), axis=1)[:, :kp]
    return np.take_along_axis(s, order, 1), order


def assert_topk_tie_aware(scores, index, ref_scores, q, k, tol):
    """Scores match the oracle's; every returned key's exact score equals the oracle's."""
    scores = scores.double().numpy()
    index = index.numpy()
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=tol)
    exact = np.einsum("id,ijd->ij", q.astype(np.float64), k.astype(np.float64)[index])
    np.testing.assert_allclose(exact, ref_scores, rtol=0, atol=tol)
    for row in index:
        assert len(set(row.tolist())) == len(row), "duplicate key in a top-k row"


@pytest.mark.parametrize(
    "nq,nk,d,kp",
    [(1, 1, 1, 1), (5, 7, 3, 2), (37, 101, 20, 3), (19, 300, 100, 4), (17, 40, 384, 2), (33, 9, 16, 8)],
)
def test_kernel_matches_fp64_oracle(nq, nk, d, kp):
    rng = np.random.default_rng(nq * 1000 + nk)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    k = rng.standard_normal((nk, d)).astype(np.float32)
    s, i = mips_topk(torch.from_numpy(q), torch.from_numpy(k), kp)
    take = min(kp, nk)
    ref_s, _ = oracle_topk(q, k, take)
    assert s.shape == (nq, 1, kp) and i.shape == (nq, 1, kp)
    tol = 4 * screening_error_bound(d, "ieee") * np.sqrt(d) * 10
    assert_topk_tie_aware(s[:, 0, :take], i[:, 0, :take], ref_s, q, k, tol)
    if take < kp:
        assert torch.isneginf(s[:, 0, take:]).all() and (i[:, 0, take:] == -1).all()


def test_planted_ties_resolve_to_lowest_index():
    rng = np.random.default_rng(3)
    k = rng.standard_normal((70, 12)).astype(np.float32)
    k[[5, 33, 64]] = k[48]  # four identical keys
    q = np.repeat(k[48:49] * 2.0, 4, axis=0)
    s, i = mips_topk(torch.from_numpy(q), torch.from_numpy(k), 3)
    assert i[:, 0].tolist() == [[5, 33, 48]] * 4
    s_ref, i_ref = mips_topk_ref(torch.from_numpy(q).double(), torch.from_numpy(k).double(), 3)
    assert i_ref[:, 0].tolist() == [[5, 33, 48]] * 4


def test_segments_partition_top2_with_empty_and_single_segments():
    rng = np.random.default_rng(4)
    k = rng.standard_normal((50, 10)).astype(np.float32)
    q = rng.standard_normal((9, 10)).astype(np.float32)
    offsets = torch.tensor([0, 0, 1, 20, 20, 50])
    s, i = mips_topk(torch.from_numpy(q), torch.from_numpy(k), 2, offsets)
    assert s.shape == (9, 5, 2)
    assert torch.isneginf(s[:, 0]).all() and (i[:, 0] == -1).all()
    assert (i[:, 1, 0] == 0).all() and (i[:, 1, 1] == -1).all()
    assert torch.isneginf(s[:, 3]).all()
    for seg, (lo, hi) in {2: (1, 20), 4: (20, 50)}.items():
        ref_s, ref_i = oracle_topk(q, k[lo:hi], 2)
        np.testing.assert_array_equal(i[:, seg].numpy(), ref_i + lo)
        np.testing.assert_allclose(s[:, seg].numpy(), ref_s, atol=1e-5)


def test_reference_and_kernel_agree_with_many_key_blocks():
    rng = np.random.default_rng(5)
    q = torch.from_numpy(rng.standard_normal((20, 24)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((530, 24)).astype(np.float32))
    s_k, i_k = mips_topk(q, k, 5, splits=3)
    s_r, i_r = mips_topk_ref(q, k, 5, block_keys=64)
    assert torch.equal(i_k, i_r)
    torch.testing.assert_close(s_k, s_r, atol=1e-5, rtol=0)


def test_error_bound_constants():
    assert screening_error_bound(384, "ieee") == pytest.approx(384 * 2**-24, rel=2e-3)
    assert 2 * 2**-8 < screening_error_bound(384, "bf16") < 2.2 * 2**-8
    assert screening_error_bound(384, "bf16", bf16_output=True) > screening_error_bound(384, "bf16")
    with pytest.raises(ValueError, match="precision"):
        screening_error_bound(10, "fp8")


def test_kernel_bad_inputs():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="dimension mismatch"):
        mips_topk(q, torch.randn(5, 7), 1)
    with pytest.raises(ValueError, match="fp32 or fp64"):
        mips_topk(q.half(), torch.randn(5, 8).half(), 1)
    with pytest.raises(ValueError, match="offsets"):
        mips_topk(q, torch.randn(5, 8), 1, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="precision"):
        mips_topk(q, torch.randn(5, 8), 1, precision="fp8")
    with pytest.raises(ValueError, match="queries"):
        mips_topk(q[0], torch.randn(5, 8), 1)
