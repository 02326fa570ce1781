"""The fused screening kernel (Triton under the interpreter on CPU) against an fp64 oracle."""

import math

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
    # tensor cores: truncating accumulation, 2d units of 2^-23 (4x the round-to-nearest term)
    for p in ("tf32", "bf16"):
        assert screening_error_bound(384, p, operands_exact=True) == pytest.approx(768 * 2**-23, rel=2e-3)
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


# --------------------------------------------------------------------------------------
# The bound under truncated (tensor-core) accumulation
# --------------------------------------------------------------------------------------
def _round_toward_zero_fp32(x: float) -> float:
    f = float(np.float32(x))
    if abs(f) > abs(x):
        f = float(np.nextafter(np.float32(f), np.float32(0.0)))
    return f


def tensor_core_dot(q: np.ndarray, k: np.ndarray, block: int = 16) -> float:
    """A tensor core's fp32-accumulated dot product of 16-bit operands (the model of Fasi,
    Higham, Mikaitis and Pranesh, 2021): products exact; each MMA adds a k-block of products
    to the accumulator by aligning every addend to the largest exponent and truncating it
    (toward zero) to 24 significant bits of that exponent; the exact sum of the aligned
    addends is normalised with round-toward-zero."""
    prods = q.astype(np.float64) * k.astype(np.float64)  # exact: 8-bit x 8-bit significands
    acc = 0.0
    for a in range(0, prods.size, block):
        terms = [acc, *prods[a:a + block].tolist()]
        largest = max(abs(t) for t in terms)
        if largest == 0.0:
            continue
        grid = 2.0 ** (math.frexp(largest)[1] - 24)  # one ulp of the largest, in fp32
        aligned = sum(math.trunc(t / grid) * grid for t in terms)  # exact in fp64
        acc = _round_toward_zero_fp32(aligned)
    return acc


def _bf16_exact(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).double().numpy()


def test_tensor_core_model_stays_inside_the_bound_on_random_data():
    rng = np.random.default_rng(0)
    d = 384
    c = screening_error_bound(d, "bf16", operands_exact=True)
    for _ in range(20):
        q, k = _bf16_exact(rng.standard_normal(d)), _bf16_exact(rng.standard_normal(d))
        err = abs(tensor_core_dot(q, k) - float(q @ k))
        assert err <= c * np.linalg.norm(q) * np.linalg.norm(k)


def test_round_to_nearest_bound_certifies_a_wrong_top1_under_truncation_and_2_to_the_23_does_not():
    """Two keys, bf16-exact data (no input rounding), screened with truncating accumulation.
    Key A's small positive products are all truncated away (its screened score falls by
    383 units of 2^-23); key B's small negative ones too (its screened score rises by 382
    units). A is the true top-1 by ~2e-5, yet with the round-to-nearest unit 2^-24 the
    certificate "B's lower bound is above A's upper bound" holds and A is never re-scored;
    with the tensor-core bound A stays a candidate and the fp64 refinement returns it."""
    from amips.labels.certify import Candidates, KeySource, _certify_and_refine

    d = 384
    small, eps = 2.0**-12, 2.0**-11 * 127 / 128  # products +-2^-23 * 127/128: below one ulp of 1
    q = np.full(d, small)
    q[0] = 1.0
    key_a = np.full(d, eps)
    key_a[0] = 1.0
    key_b = np.full(d, -eps)
    key_b[0], key_b[1] = 1.0, 0.28125  # q[1] * key_b[1] = 576 * 2^-23, on the fp32 grid of 1
    keys = np.stack([key_b, key_a])  # B first: the lower index would win a tie
    assert np.array_equal(_bf16_exact(q), q) and np.array_equal(_bf16_exact(keys), keys)
    exact = keys @ q
    assert exact[1] > exact[0]  # A (index 1) is the true top-1
    screened = np.array([tensor_core_dot(q, key) for key in keys])
    assert screened[0] > screened[1]  # the screen ranks B first
    qn, kn = np.linalg.norm(q), np.linalg.norm(keys, axis=1).max()
    # the round-to-nearest bound is violated by A's score alone; the tensor-core one holds
    c_nearest = screening_error_bound(d, "ieee")  # gamma_d(2^-24), no input term
    c_tensor = screening_error_bound(d, "bf16", operands_exact=True)
    assert abs(screened[1] - exact[1]) > c_nearest * qn * np.linalg.norm(keys[1])
    assert np.all(np.abs(screened - exact) <= c_tensor * qn * np.linalg.norm(keys, axis=1))

    source = KeySource(torch.from_numpy(keys))
    q64 = torch.from_numpy(q)[None]
    found = {}
    for name, c in (("nearest", c_nearest), ("tensor", c_tensor)):
        err = torch.full((1, 2), c * qn * kn, dtype=torch.float64)
        cand = Candidates(torch.from_numpy(screened).float()[None], torch.tensor([[0, 1]]), err,
                          torch.tensor([-math.inf], dtype=torch.float64))
        s, i, certified = _certify_and_refine(cand, 1, q64, source)
        found[name] = (int(i[0, 0]), bool(certified[0]))
    assert found["nearest"] == (0, True)  # certified, and wrong
    assert found["tensor"] == (1, True)  # certified, and right
