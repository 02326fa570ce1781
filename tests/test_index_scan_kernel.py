"""kernels/ivf_scan.py: Triton list scan (interpreter on CPU) against the torch reference
and an fp64 brute force, tie-aware."""

import pytest
import torch

from amips.kernels import ivf_scan as mod


def _case(n_lists=7, d=20, nq=9, nprobe=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([0, 50, 37, 90, 3, 70, 50, 1, 17, 64][:n_lists])
    n = int(sizes.sum())
    keys = torch.randn(n, d, generator=g)
    keys[5] = keys[6]  # an exact tie inside a list
    keys = keys.to(dtype)
    offsets = torch.zeros(n_lists + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    q = torch.randn(nq, d, generator=g)
    probes = torch.stack([torch.randperm(n_lists, generator=g)[:nprobe] for _ in range(nq)])
    probes[0, -1] = -1  # "no list" slot
    return q, keys, offsets, probes


def _brute(q, keys, offsets, probes, k):
    """fp64 scores of every probed candidate, sorted best first (score desc, position asc)."""
    out_s, out_p = [], []
    for i in range(q.shape[0]):
        pos = torch.cat([torch.arange(0)] + [torch.arange(int(offsets[lst]), int(offsets[lst + 1])) for lst in probes[i] if lst >= 0])
        pos = pos.sort().values
        s = keys[pos].double() @ q[i].double()
        order = torch.argsort(-s, stable=True)[:k]
        ps = torch.full((k,), -1, dtype=torch.int64)
        ss = torch.full((k,), float("-inf"), dtype=torch.float64)
        ps[: order.numel()] = pos[order]
        ss[: order.numel()] = s[order]
        out_s.append(ss)
        out_p.append(ps)
    return torch.stack(out_s), torch.stack(out_p)


def _check_tie_aware(s, p, ref_s, ref_p, q, keys, tol=1e-4):
    assert s.shape == ref_s.shape and p.shape == ref_p.shape
    assert torch.equal(p == -1, ref_p == -1)
    valid = ref_p >= 0
    # returned scores equal the best scores rank by rank
    assert torch.allclose(s.double()[valid], ref_s[valid], atol=tol, rtol=tol)
    # the returned positions really score what is reported
    rescored = torch.einsum("qd,qkd->qk", q.double(), keys[p.clamp(min=0)].double())
    assert torch.allclose(rescored[valid], ref_s[valid], atol=tol, rtol=tol)
    # ids may differ only where scores tie
    differ = (p != ref_p) & valid
    if differ.any():
        gap = (ref_s[differ] - rescored[differ]).abs()
        assert float(gap.max()) < tol
    # distinct positions per row
    for row in p:
        r = row[row >= 0]
        assert r.unique().numel() == r.numel()


@pytest.mark.parametrize("k", [1, 5, 37])
def test_reference_matches_brute_force(k):
    q, keys, offsets, probes = _case()
    s, p = mod.ivf_scan_ref(q, keys, offsets, probes, k)
    ref_s, ref_p = _brute(q, keys, offsets, probes, k)
    _check_tie_aware(s, p, ref_s, ref_p, q, keys)
    # small buffer forces many query chunks
    s2, p2 = mod.ivf_scan_ref(q, keys, offsets, probes, k, max_buffer=300)
    assert torch.equal(p2, p) and torch.allclose(s2, s, atol=1e-5, rtol=1e-5)
    # the few-queries path (one-at-a-time search) agrees too
    s3, p3 = mod.ivf_scan_ref(q[:3], keys, offsets, probes[:3], k)
    _check_tie_aware(s3, p3, ref_s[:3], ref_p[:3], q[:3], keys)


@pytest.mark.parametrize("k,d", [(1, 20), (5, 20), (20, 33)])
def test_triton_matches_reference(k, d):
    q, keys, offsets, probes = _case(d=d, seed=k)
    ref_s, ref_p = _brute(q, keys, offsets, probes, k)
    s, p = mod.ivf_scan(q, keys, offsets, probes, k)  # Triton (interpreter on CPU)
    _check_tie_aware(s, p, ref_s, ref_p, q, keys)


def test_tie_rule_lower_position_wins():
    keys = torch.ones(40, 16)
    offsets = torch.tensor([0, 20, 40])
    q = torch.ones(2, 16)
    probes = torch.tensor([[1, 0], [0, 1]])
    for fn in (mod.ivf_scan, mod.ivf_scan_ref):
        s, p = fn(q, keys, offsets, probes, 3)
        assert p.tolist() == [[0, 1, 2], [0, 1, 2]]
        assert torch.all(s == 16.0)


def test_fewer_candidates_than_k_and_fp16_keys():
    q, keys, offsets, probes = _case(n_lists=10, nprobe=1, seed=4)
    assert (offsets[probes[:, 0].clamp(min=0) + 1] - offsets[probes[:, 0].clamp(min=0)] < 24).any()
    keys16 = keys.half()
    for fn in (mod.ivf_scan, mod.ivf_scan_ref):
        s, p = fn(q, keys16, offsets, probes, 24)
        ref_s, ref_p = _brute(q, keys16.float(), offsets, probes, 24)
        _check_tie_aware(s, p, ref_s, ref_p, q, keys16.float(), tol=1e-3)


def test_bad_inputs():
    q, keys, offsets, probes = _case()
    with pytest.raises(ValueError, match="dimension"):
        mod.ivf_scan(q[:, :5], keys, offsets, probes, 3)
    with pytest.raises(ValueError, match="probes"):
        mod.ivf_scan(q, keys, offsets, probes + 100, 3)
    with pytest.raises(ValueError, match="k"):
        mod.ivf_scan(q, keys, offsets, probes, 0)
    with pytest.raises(ValueError, match="probes"):
        mod.ivf_scan(q, keys, offsets, probes.float(), 3)


@pytest.mark.gpu
def test_triton_on_cuda_larger_shapes():
    g = torch.Generator().manual_seed(0)
    n_lists, d, nq = 64, 100, 300
    sizes = torch.randint(0, 400, (n_lists,), generator=g)
    offsets = torch.zeros(n_lists + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    keys = torch.randn(int(offsets[-1]), d, generator=g)
    q = torch.randn(nq, d, generator=g)
    probes = torch.stack([torch.randperm(n_lists, generator=g)[:8] for _ in range(nq)])
    ref_s, ref_p = _brute(q, keys, offsets, probes, 10)
    s, p = mod.ivf_scan(q.cuda(), keys.cuda(), offsets.cuda(), probes.cuda(), 10)
    _check_tie_aware(s.cpu(), p.cpu(), ref_s, ref_p, q, keys, tol=1e-3)


# --- the batched kernel (lists grouped, read once per chunk) and the per-query kernel ------

@pytest.mark.parametrize("mode", ["batched", "per_query"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_both_kernels_match_fp64_brute_force(mode, dtype):
    q, keys, offsets, probes = _case(d=20, seed=2, dtype=dtype)
    ref_s, ref_p = _brute(q, keys.float(), offsets, probes, 6)
    s, p = mod.ivf_scan(q, keys, offsets, probes, 6, mode=mode)
    # the query is split into exact 16-bit terms: scores are fp32-accurate, not 16-bit
    _check_tie_aware(s, p, ref_s, ref_p, q, keys.float(), tol=1e-4)


def test_batched_kernel_chunks_few_queries_empty_lists_and_ties():
    q, keys, offsets, probes = _case(n_lists=10, nq=3, nprobe=5, seed=5)  # nq below a block
    probes[1] = torch.tensor([0, -1, 0, 4, -1])  # an empty list probed twice, a 3-key list
    keys[[60, 61]] = keys[62].clone()  # ties across the rows of one list
    ref_s, ref_p = _brute(q, keys, offsets, probes, 4)
    s, p = mod.ivf_scan(q, keys, offsets, probes, 4, mode="batched")
    _check_tie_aware(s, p, ref_s, ref_p, q, keys)
    cfg = dict(mod._INTERPRETER_BATCHED)
    s2, p2 = mod._scan_batched(q, keys, offsets, probes, 4, cfg, max_buffer=200)  # one query a chunk
    assert torch.equal(p2, p) and torch.allclose(s2, s)
    nothing = torch.full((2, 3), -1, dtype=torch.int64)
    s3, p3 = mod.ivf_scan(q[:2], keys, offsets, nothing, 2, mode="batched")
    assert torch.isneginf(s3).all() and (p3 == -1).all()


def test_mode_is_checked():
    q, keys, offsets, probes = _case()
    with pytest.raises(ValueError, match="mode"):
        mod.ivf_scan(q, keys, offsets, probes, 3, mode="fast")


@pytest.mark.parametrize("device", ["H100", "A100"])
def test_launch_config_rule_at_audit_shapes(device):
    from amips.kernels import _audit

    dev = getattr(_audit, device)
    for key_dtype, elem in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        for d in mod._AUDIT_D:
            for nq in mod._AUDIT_NQ:
                for nprobe in mod._AUDIT_NPROBE:
                    for mean_list in mod._AUDIT_LISTS:
                        cfg = mod.ivf_scan_launch_config(nq, nprobe, d, mean_list, 10, key_dtype=key_dtype, device=dev)
                        if cfg["mode"] == "per_query":
                            assert nq <= dev.sm_count and nprobe * mean_list * d * elem < 60e-6 * 40e9
                            assert cfg["K_PAD"] >= 10 and cfg["BLOCK_D"] <= 32
                        else:
                            smem = cfg["num_stages"] * cfg["BLOCK_D"] * elem * (
                                cfg["BLOCK_N"] + cfg["TERMS"] * cfg["BLOCK_M"])
                            assert smem < dev.max_shared_bytes and cfg["BLOCK_M"] >= 64
    # a large batch always takes the batched kernel; one query with a tiny scan the per-query one
    assert mod.ivf_scan_launch_config(65536, 32, 384, 1000, 10, device=dev)["mode"] == "batched"
    assert mod.ivf_scan_launch_config(1, 1, 64, 250, 10, device=dev)["mode"] == "per_query"
    with pytest.raises(ValueError, match="key_dtype"):
        mod.ivf_scan_launch_config(1, 1, 64, 250, 10, key_dtype="int8", device=dev)


def test_audit_cases_cover_both_kernels():
    from amips.kernels import _audit

    cases = mod.audit_cases(_audit.H100)
    kinds = {c.kernel_name for c in cases}
    assert kinds == {"_ivf_scan_kernel", "_ivf_scan_batched_kernel"}
    assert all(c.matrix == (c.kernel_name == "_ivf_scan_batched_kernel") for c in cases)
    for c in cases:
        assert set(k for k, v in c.signature.items() if v == "constexpr") == set(c.constexprs)
