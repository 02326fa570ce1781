"""The top-1 screening kernel (Triton under the interpreter on CPU) against an fp64 oracle,
and its launch-config rule at the shapes the compile audit walks."""

import pytest
import torch

from amips.kernels import _audit
from amips.kernels.mips_topk import (
    audit_cases,
    mips_top1,
    mips_top1_launch_config,
    mips_top1_ref,
    top1_merged,
)


def _oracle_best(q: torch.Tensor, k: torch.Tensor):
    """fp64 best score and lowest index among the best, per query."""
    s = q.double() @ k.double().T
    return s.max(1).values, s.argmax(1)  # argmax returns the first maximum


def _check_guarantee(res, q, k, window, scale, tol=1e-5):
    """Every key of a segment other than index/near_index scores below best - w, or <= lost."""
    s = (q.double() @ k.double().T)
    off = res.offsets.tolist()
    for seg in range(len(off) - 1):
        lo, hi = off[seg], off[seg + 1]
        for row in range(q.shape[0]):
            if hi == lo:
                assert torch.isneginf(res.score[row, seg]) and int(res.index[row, seg]) == -1
                continue
            kept = set(res.near_index[row, seg].tolist()) | {int(res.index[row, seg])}
            assert int(res.index[row, seg]) in range(lo, hi)
            w = float(window[row]) * float(scale[seg])
            bound = max(float(res.lost[row, seg]), float(res.score[row, seg]) - w)
            for j in range(lo, hi):
                if j not in kept:
                    assert float(s[row, j]) <= bound + tol, (row, seg, j)
            for j, v in zip(res.near_index[row, seg].tolist(), res.near_score[row, seg].tolist()):
                if j >= 0:
                    assert lo <= j < hi and abs(v - float(s[row, j])) <= tol


@pytest.mark.parametrize("nq,nk,d,splits", [(1, 1, 1, 1), (5, 7, 3, 2), (19, 70, 33, 3), (17, 40, 16, 1)])
def test_top1_matches_fp64_oracle_and_keeps_its_window(nq, nk, d, splits):
    g = torch.Generator().manual_seed(nq * 100 + nk)
    q = torch.randn(nq, d, generator=g)
    k = torch.randn(nk, d, generator=g)
    window = torch.full((nq,), 0.7)
    res = mips_top1(q, k, window=window, segment_scale=torch.tensor([1.5]), splits=splits)
    assert res.score.shape == (nq, splits) and res.near_index.shape == (nq, splits, 8)
    s, i = top1_merged(res)
    ref_s, ref_i = _oracle_best(q, k)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s.double(), ref_s, atol=1e-5, rtol=0)
    _check_guarantee(res, q, k, window, torch.full((splits,), 1.5))
    ref = mips_top1_ref(q, k, window=window, segment_scale=torch.tensor([1.5]), splits=splits)
    assert torch.equal(ref.index, res.index)


@pytest.mark.parametrize("nq,nk,d", [(19, 70, 33), (3, 100, 48), (17, 40, 16)])
def test_flat_and_tiled_kernels_agree_with_windows_ties_and_partitions(nq, nk, d):
    """The flattened (key tile x d chunk) loop and the tile loop with chunks inside give the
    same best, window buffer and lost bound (d of 1, 2 and 3 chunks; a tied key copy)."""
    g = torch.Generator().manual_seed(d)
    q = torch.randn(nq, d, generator=g)
    k = torch.randn(nk, d, generator=g)
    k[nk // 2] = k[3]  # an exact tie across tiles: the lower index must win
    window = torch.full((nq,), 1.0)
    offsets = torch.tensor([0, 5, 5, nk // 2 + 1, nk])  # an empty and a 1-tile segment
    for off in (None, offsets):
        kw = dict(window=window, segment_scale=torch.ones(1 if off is None else 4), splits=None if off is not None else 2)
        flat = mips_top1(q, k, off, kernel="flat", **kw)
        tiled = mips_top1(q, k, off, kernel="tiled", **kw)
        for a, b in zip(flat, tiled):
            assert torch.equal(a, b)
        _check_guarantee(flat, q, k, window, torch.ones(flat.score.shape[1]))
    with pytest.raises(ValueError, match="kernel"):
        mips_top1(q, k, kernel="persistent")


def test_ties_resolve_to_the_lowest_index_inside_and_across_tiles():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(70, 12, generator=g)
    k[[5, 9, 33, 64]] = k[48].clone()  # 5 and 9 share a 16-key tile; 33, 48, 64 are in later ones
    q = k[48:49].repeat(4, 1) * 2.0
    for splits in (1, 3):
        res = mips_top1(q, k, splits=splits)
        assert top1_merged(res)[1].tolist() == [5] * 4
    s_ref, i_ref = _oracle_best(q, k)
    assert i_ref.tolist() == [5] * 4


def test_segments_with_empty_and_single_key_partitions_and_fp16_inputs():
    g = torch.Generator().manual_seed(4)
    k = torch.randn(50, 10, generator=g).half()
    q = torch.randn(9, 10, generator=g).half()
    offsets = torch.tensor([0, 0, 1, 20, 20, 50])
    scale = torch.tensor([1.0, 1.0, 0.5, 1.0, 2.0])
    window = torch.full((9,), 0.4)
    res = mips_top1(q, k, offsets, window=window, segment_scale=scale, near=4)
    assert res.score.shape == (9, 5) and res.near_index.shape == (9, 5, 4)
    assert torch.isneginf(res.score[:, [0, 3]]).all() and (res.index[:, [0, 3]] == -1).all()
    assert (res.index[:, 1] == 0).all()
    for seg, (lo, hi) in {2: (1, 20), 4: (20, 50)}.items():
        ref_s, ref_i = _oracle_best(q, k[lo:hi])  # fp16 products are exact in fp32
        assert torch.equal(res.index[:, seg], ref_i + lo)
        torch.testing.assert_close(res.score[:, seg].double(), ref_s, atol=1e-3, rtol=0)
    _check_guarantee(res, q.float(), k.float(), window, scale, tol=1e-3)


def test_a_full_window_buffer_raises_lost():
    """Many keys inside a wide window: the 4-slot buffer overflows and `lost` bounds the rest."""
    g = torch.Generator().manual_seed(6)
    k = torch.randn(64, 8, generator=g)
    q = torch.randn(3, 8, generator=g)
    window = torch.full((3,), 1e6)
    res = mips_top1(q, k, window=window, near=4)
    assert torch.isfinite(res.lost).all()
    _check_guarantee(res, q, k, window, torch.ones(1))


def test_bad_inputs():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="dimension mismatch"):
        mips_top1(q, torch.randn(5, 7))
    with pytest.raises(ValueError, match="dtype"):
        mips_top1(q, torch.randn(5, 8).half())
    with pytest.raises(ValueError, match="window"):
        mips_top1(q, torch.randn(5, 8), window=torch.full((4,), -1.0))
    with pytest.raises(ValueError, match="offsets"):
        mips_top1(q, torch.randn(5, 8), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="near"):
        mips_top1(q, torch.randn(5, 8), near=5)
    with pytest.raises(ValueError, match="precision"):
        mips_top1(q, torch.randn(5, 8), precision="bf16")


# --- the launch-config rule at the audit's shapes -----------------------------------------

@pytest.mark.parametrize("device", [_audit.H100, _audit.A100], ids=["sm90", "sm80"])
@pytest.mark.parametrize("operand", ["bf16", "tf32", "ieee"])
def test_launch_config_at_production_shapes(device, operand):
    for d in (64, 128, 384, 768):
        for nq in (1, 64, 1000, 4096, 65536, 262144):
            for n_seg in (None, 1000):
                cfg = mips_top1_launch_config(nq, 1 << 20, d, n_segments=n_seg, operand=operand,
                                              device=device)
                elem = 2 if operand == "bf16" else 4
                smem = (cfg["BLOCK_N"] * cfg["BLOCK_D"] * elem * cfg["num_stages"]
                        + cfg["BLOCK_M"] * cfg["BLOCK_D"] * elem * (1 if cfg["ONE_CHUNK"] else cfg["num_stages"]))
                assert smem < device.max_shared_bytes
                assert cfg["BLOCK_M"] >= 64 and cfg["BLOCK_N"] >= 64 and cfg["BLOCK_D"] >= 16
                assert cfg["num_stages"] >= 2
                if cfg["ONE_CHUNK"]:
                    assert cfg["BLOCK_D"] >= d
                m_blocks = -(-nq // cfg["BLOCK_M"])
                programs = m_blocks * (cfg["splits"] if n_seg is None else n_seg)
                assert programs >= device.sm_count  # small query counts still fill the SMs
                if n_seg is None:
                    assert cfg["splits"] * 4 * cfg["BLOCK_N"] <= 1 << 20
    with pytest.raises(ValueError, match="operand"):
        mips_top1_launch_config(10, 10, 10, operand="fp8", device=device)


def test_audit_cases_walk_the_launcher_rule():
    for device in (_audit.H100, _audit.A100):
        cases = audit_cases(device)
        names = [c.config for c in cases]
        assert len(names) == len(set(names)) and len(cases) >= 12
        assert all(c.matrix for c in cases)
        assert {c.exact_fp32 for c in cases} == {True, False}
        # both loops are audited (the flat one only where d takes several chunks)
        assert {c.kernel_name for c in cases} == {"_mips_top1_kernel", "_mips_top1_flat_kernel"}
        for c in cases:
            assert list(c.signature) == list(c.kernel.arg_names) and c.signature["NEAR"] == "constexpr"
            assert (c.kernel_name == "_mips_top1_flat_kernel") == c.config.startswith("flat_")
            assert not (c.config.startswith("flat_") and "_once" in c.config)
            assert set(k for k, v in c.signature.items() if v == "constexpr") == set(c.constexprs)
            assert c.shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")])
def test_top1_on_cuda_against_the_oracle_of_its_inputs(dtype, precision):
    g = torch.Generator().manual_seed(11)
    for nq, nk, d in ((3, 50_000, 384), (700, 30_000, 128), (200, 20_000, 100)):
        q = torch.randn(nq, d, generator=g).to(dtype)
        k = torch.randn(nk, d, generator=g).to(dtype)
        window = torch.full((nq,), 0.05 * d ** 0.5)
        res = mips_top1(q.cuda(), k.cuda(), window=window.cuda(), precision=precision)
        s, i = (t.cpu() for t in top1_merged(res))
        exact = q.double() @ k.double().T
        best = exact.max(1).values
        # the returned key is within the screening error of the best (tf32 rounds inputs)
        tol = 1e-3 * d if precision == "tf32" else 1e-4 * d ** 0.5
        assert bool((exact.gather(1, i[:, None])[:, 0] >= best - tol).all())
        assert res.score.shape[1] >= 1 and bool(torch.isfinite(res.score).all())
