"""PQ LUT scan (Triton under the interpreter at tiny shapes, torch reference), reorder, and
the IVF PQ scanner."""

import json

import pytest
import torch

from amips._validate import InputError
from amips.index.pq_scanner import PQScanner
from amips.kernels.pq_scan import (
    pack_codes,
    pq_lut,
    pq_reorder,
    pq_scan,
    pq_scan_ref,
    quantize_lut,
    unpack_codes,
)

# torch single-threaded here: a fixed reduction order and no oversubscription of 2 cores
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brute(lut, codes, offsets, probes, bias):
    """fp64 scores of every (query, candidate) over the probed lists, unpacked codes."""
    nq, m, _ = lut.shape
    out = []
    for q in range(nq):
        cand = {}
        for p, lid in enumerate(probes[q].tolist()):
            if lid < 0:
                continue
            for row in range(int(offsets[lid]), int(offsets[lid + 1])):
                s = lut[q, torch.arange(m), codes[row]].double().sum().item()
                cand[row] = s + float(bias[q, p])
        out.append(cand)
    return out


def _check_topk(scores, positions, brute, k, tol=1e-4):
    """Tie-aware: the returned scores are the k best, each position scores what is claimed,
    no position repeats, and padding is (-inf, -1) exactly where candidates run out."""
    for q, cand in enumerate(brute):
        want = sorted(cand.values(), reverse=True)[:k]
        got_pos = positions[q].tolist()
        n_valid = len(want)
        assert all(p >= 0 for p in got_pos[:n_valid]) and all(p == -1 for p in got_pos[n_valid:])
        assert torch.all(torch.isinf(scores[q, n_valid:]))
        assert len(set(got_pos[:n_valid])) == n_valid
        for j in range(n_valid):
            assert abs(scores[q, j].item() - want[j]) <= tol
            assert abs(cand[got_pos[j]] - scores[q, j].item()) <= tol


def _case(bits, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = 1 << bits
    nq, n = 2, 150
    lut = torch.randn(nq, m, kc, generator=g)
    codes = torch.randint(0, kc, (n, m), generator=g)
    offsets = torch.tensor([0, 40, 40, 100, 150])  # list 1 empty
    probes = torch.tensor([[0, 2], [3, -1]])
    bias = torch.randn(nq, 2, generator=g)
    return lut, codes, offsets, probes, bias


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (9, 7))
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (9, 4)
    assert torch.equal(unpack_codes(packed, 4, 7), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) + 16 * int(codes[0, 1])  # low nibble first
    c8 = torch.randint(0, 256, (5, 3))
    assert torch.equal(unpack_codes(pack_codes(c8, 8), 8, 3), c8)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(codes, 5)
    with pytest.raises(ValueError, match="values"):
        pack_codes(torch.full((2, 2), 16), 4)


def test_lut_matches_fp64():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 12, generator=g)
    cb = torch.randn(4, 16, 3, generator=g)
    lut = pq_lut(q, cb)
    want = torch.einsum("qmd,mkd->qmk", q.double().reshape(3, 4, 3), cb.double())
    assert torch.allclose(lut.double(), want, atol=1e-5)


@pytest.mark.parametrize("bits,m", [(4, 7), (8, 3)])
def test_triton_scan_packed_equals_unpacked_reference(bits, m):
    lut, codes, offsets, probes, bias = _case(bits, m)
    packed = pack_codes(codes, bits)
    k = 10
    s, p = pq_scan(lut, packed, offsets, probes, k, bits=bits, bias=bias)  # Triton (interpreter)
    brute = _brute(lut, codes, offsets, probes, bias)
    _check_topk(s, p, brute, k)
    s_ref, p_ref = pq_scan_ref(lut, packed, offsets, probes, k, bits=bits, bias=bias)
    _check_topk(s_ref, p_ref, brute, k)
    assert torch.allclose(s, s_ref, atol=1e-5)


@pytest.mark.parametrize("bits,m", [(4, 6), (4, 5), (8, 4)])
def test_torch_scan_equals_unpacked_reference(bits, m):
    lut, codes, offsets, probes, bias = _case(bits, m, seed=2)
    packed = pack_codes(codes, bits)
    brute = _brute(lut, codes, offsets, probes, bias)
    for k in (1, 7, 120):  # 120 > the 100 candidates of query 0: padded with -1
        s, p = pq_scan_ref(lut, packed, offsets, probes, k, bits=bits, bias=bias, budget=500)
        _check_topk(s, p, brute, k)


def test_scan_tie_rule_lower_position_first():
    lut = torch.zeros(1, 2, 16)
    codes = pack_codes(torch.zeros(30, 2, dtype=torch.long), 4)
    offsets = torch.tensor([0, 30])
    s, p = pq_scan_ref(lut, codes, offsets, torch.tensor([[0]]), 5, bits=4)
    assert p[0].tolist() == [0, 1, 2, 3, 4]


def test_uint8_lut_close_to_float():
    lut, codes, offsets, probes, bias = _case(4, 6, seed=3)
    lq, scale, offset = quantize_lut(lut, "uint8")
    assert lq.dtype == torch.uint8
    packed = pack_codes(codes, 4)
    s, p = pq_scan_ref(lq, packed, offsets, probes, 5, bits=4, bias=bias + offset[:, None],
                       scale=scale)
    brute = _brute(lut, codes, offsets, probes, bias)
    for q in range(2):  # each reported approximate score is within the rounding bound
        for j in range(5):
            assert abs(s[q, j].item() - brute[q][p[q, j].item()]) <= 6 * 0.5 * scale[q].item() + 1e-5


def test_scan_bad_input():
    lut, codes, offsets, probes, bias = _case(4, 6)
    packed = pack_codes(codes, 4)
    with pytest.raises(ValueError, match="bits"):
        pq_scan_ref(lut, packed, offsets, probes, 3, bits=6)
    with pytest.raises(ValueError, match="bytes per key"):
        pq_scan_ref(lut, pack_codes(codes, 8), offsets, probes, 3, bits=4)
    with pytest.raises(ValueError, match="probe_lists"):
        pq_scan_ref(lut, packed, offsets, probes + 5, 3, bits=4)
    with pytest.raises(ValueError, match="list_offsets"):
        pq_scan_ref(lut, packed, torch.tensor([0, 10, 5, 150]), probes, 3, bits=4)
    bad = lut.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pq_scan(bad, packed, offsets, probes, 3, bits=4)


def test_reorder_exact():
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(20, 5, generator=g)
    q = torch.randn(2, 5, generator=g)
    pos = torch.tensor([[3, 7, 1, -1], [0, 19, 5, 6]])
    s, p = pq_reorder(q, keys, pos, 3)
    for i in range(2):
        cand = [c for c in pos[i].tolist() if c >= 0]
        exact = sorted(((q[i].double() @ keys[c].double()).item(), c) for c in cand)[::-1][:3]
        assert p[i].tolist() == [c for _, c in exact]
        assert torch.allclose(s[i].double(), torch.tensor([v for v, _ in exact]).double(),
                              atol=1e-5)


# ----------------------------------------------------------------------------- scanner
def _index(seed=0, n=240, d=12, n_lists=4):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g)
    keys = keys / keys.norm(dim=1, keepdim=True)
    cents = keys[torch.randperm(n, generator=g)[:n_lists]]
    lists = (keys @ cents.T).argmax(1)
    order = torch.argsort(lists, stable=True)
    keys = keys[order]
    offsets = torch.zeros(n_lists + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(lists, minlength=n_lists), 0)
    queries = torch.randn(3, d, generator=g)
    return keys, offsets, cents, queries


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("AMIPS_BACKEND", "torch")
    # the torch path itself (the CPU default engine, faiss, is tested in test_cpu_pq_engine.py)
    monkeypatch.setenv("AMIPS_CPU_ENGINE", "torch")


@pytest.mark.parametrize("by_residual", [True, False])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_scanner_reorder_covering_all_equals_brute_force(torch_backend, by_residual, threshold):
    keys, offsets, cents, queries = _index()
    sc = PQScanner.train(keys, offsets, cents, subspaces=6, bits=4, by_residual=by_residual,
                         anisotropic_threshold=threshold, iters=4)
    probes = torch.tensor([[0, 2], [1, -1], [3, 0]])
    n_cand = max(int(offsets[lid + 1] - offsets[lid]) for lid in range(4)) * 2
    s, p = sc.search(queries, probes, 5, reorder=n_cand, keys_by_list=keys)
    for i in range(3):
        rows = [r for lid in probes[i].tolist() if lid >= 0
                for r in range(int(offsets[lid]), int(offsets[lid + 1]))]
        exact = (keys[rows].double() @ queries[i].double())
        best = torch.topk(exact, 5).values
        assert torch.allclose(s[i].double(), best, atol=1e-5)
        for j, r in enumerate(p[i].tolist()):  # tie-aware: each returned row scores as claimed
            assert r in rows
            assert abs((keys[r].double() @ queries[i].double()).item() - s[i, j].item()) < 1e-5
    # without reorder the scores are the LUT scores of the decoded keys (bias included)
    s0, p0 = sc.search(queries, probes, 5)
    dec = sc.decode()
    for i in range(3):
        assert torch.allclose(s0[i], (dec[p0[i]] @ queries[i]), atol=1e-4)


def test_scanner_triton_path_and_state_roundtrip():
    keys, offsets, cents, queries = _index(seed=1, n=120)
    sc = PQScanner.train(keys, offsets, cents, subspaces=4, bits=8, iters=3,
                         anisotropic_threshold=0.2)
    probes = torch.tensor([[0, 1], [2, 2], [3, -1]])  # a duplicate probe is scanned once
    s, p = sc.search(queries, probes, 4)  # Triton under the interpreter here
    cfg = json.loads(json.dumps(sc.config()))
    sc2 = PQScanner.from_state(sc.state_dict(), cfg)
    import os
    os.environ["AMIPS_BACKEND"] = "torch"
    try:
        s2, p2 = sc2.search(queries, probes, 4)
    finally:
        del os.environ["AMIPS_BACKEND"]
    assert torch.allclose(s, s2, atol=1e-5)
    assert len(set(p[1].tolist())) == 4
    # Triton scan + reorder covering every candidate = brute force over the probed lists
    s3, p3 = sc.search(queries, probes, 4, reorder=120, keys_by_list=keys)
    for i in range(3):
        rows = [r for lid in set(probes[i].tolist()) if lid >= 0
                for r in range(int(offsets[lid]), int(offsets[lid + 1]))]
        best = torch.topk(keys[rows].double() @ queries[i].double(), 4).values
        assert torch.allclose(s3[i].double(), best, atol=1e-5)
        assert set(p3[i].tolist()) <= set(rows)


def test_scanner_flops():
    keys, offsets, cents, _ = _index()
    sc = PQScanner.train(keys, offsets, cents, subspaces=6, bits=4, iters=2)
    d, k, m = 12, 16, 6
    assert sc.flops_per_query(100, 2, 10) == 2 * d * k + 100 * m + 2 * d * 2 + 2 * d * 10
    sc.by_residual = False
    assert sc.flops_per_query(100, 2, 0) == 2 * d * k + 100 * m


def test_scanner_bad_input(torch_backend):
    keys, offsets, cents, queries = _index()
    with pytest.raises(InputError, match="not divisible"):
        PQScanner.train(keys, offsets, cents, subspaces=5)
    with pytest.raises(InputError, match="bits"):
        PQScanner.train(keys, offsets, cents, subspaces=6, bits=2)
    bad = keys.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        PQScanner.train(bad, offsets, cents, subspaces=6)
    with pytest.raises(InputError, match="list_offsets"):
        PQScanner.train(keys, offsets[:-1], cents, subspaces=6)
    with pytest.raises(InputError, match="centroids"):
        PQScanner.train(keys, offsets, cents[:2], subspaces=6)
    with pytest.raises(InputError, match=r"anisotropic_threshold.*\[0, 1\)"):
        PQScanner.train(keys, offsets, cents, subspaces=6, anisotropic_threshold=1.0)
    sc = PQScanner.train(keys, offsets, cents, subspaces=6, iters=2)
    probes = torch.tensor([[0], [1], [2]])
    with pytest.raises(InputError, match="keys_by_list"):
        sc.search(queries, probes, 3, reorder=10)
    with pytest.raises(InputError, match="probe_lists"):
        sc.search(queries, probes + 10, 3)
    with pytest.raises(InputError, match="dimension"):
        sc.search(queries[:, :6], probes, 3)
    q_nan = queries.clone()
    q_nan[1, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        sc.search(q_nan, probes, 3)
    with pytest.raises(InputError, match="not trained"):
        PQScanner.from_state({}, sc.config())


def test_scanner_trains_codebooks_on_a_sample(torch_backend, monkeypatch):
    import amips.index.pq_scanner as mod

    monkeypatch.setattr(mod, "TRAIN_SAMPLE", 100)
    keys, offsets, cents, queries = _index(seed=2)
    sc = PQScanner.train(keys, offsets, cents, subspaces=6, bits=4, iters=3,
                         anisotropic_threshold=0.2)
    assert sc.codes.shape == (240, 3)
    s, p = sc.search(queries, torch.tensor([[0, 1], [2, 3], [1, -1]]), 3)
    assert bool((p >= 0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("bits,m,k", [(4, 48, 10), (4, 47, 100), (8, 16, 10)])
def test_triton_scan_gpu_matches_reference(bits, m, k):
    g = torch.Generator().manual_seed(5)
    kc, nq, n, n_lists, nprobe = 1 << bits, 64, 20000, 50, 6
    lut = torch.randn(nq, m, kc, generator=g).cuda()
    codes = pack_codes(torch.randint(0, kc, (n, m), generator=g), bits).cuda()
    cuts = torch.sort(torch.randint(0, n, (n_lists - 1,), generator=g)).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]).cuda()
    probes = torch.randint(-1, n_lists, (nq, nprobe), generator=g).cuda()
    bias = torch.randn(nq, nprobe, generator=g).cuda()
    for lut_dtype in ("float32", "uint8"):
        lq, scale, offset = quantize_lut(lut, lut_dtype)
        args = (lq, codes, offsets, probes, k)
        kw = dict(bits=bits, bias=bias + offset[:, None], scale=scale)
        s, p = pq_scan(*args, **kw)
        s_ref, p_ref = pq_scan_ref(*args, **kw)
        assert torch.allclose(s, s_ref, atol=1e-4, rtol=1e-5)
        # tie-aware: where positions differ the scores agree
        diff = p != p_ref
        assert torch.allclose(s[diff], s_ref[diff], atol=1e-4)


def test_float16_lut_close_to_float():
    lut, codes, offsets, probes, bias = _case(8, 4, seed=6)
    lh, scale, offset = quantize_lut(lut, "float16")
    assert lh.dtype == torch.float16 and torch.all(scale == 1) and torch.all(offset == 0)
    s, p = pq_scan_ref(lh, pack_codes(codes, 8), offsets, probes, 5, bits=8, bias=bias)
    brute = _brute(lut, codes, offsets, probes, bias)
    for q in range(2):
        for j in range(5):
            assert abs(s[q, j].item() - brute[q][p[q, j].item()]) <= 4 * 4e-3
    with pytest.raises(ValueError, match="lut_dtype"):
        quantize_lut(lut, "int4")


def test_triton_scan_many_blocks_skip_rule():
    # one program walking 11 blocks: blocks with nothing above the k-th best skip the merge
    g = torch.Generator().manual_seed(8)
    lut = torch.randn(1, 4, 16, generator=g)
    codes = torch.randint(0, 16, (700, 4), generator=g)
    codes[650] = lut[0].argmax(1)  # the best key sits in the last block
    offsets = torch.tensor([0, 700])
    probes = torch.tensor([[0]])
    bias = torch.zeros(1, 1)
    s, p = pq_scan(lut, pack_codes(codes, 4), offsets, probes, 5, bits=4, bias=bias)
    _check_topk(s, p, _brute(lut, codes, offsets, probes, bias), 5)
    assert p[0, 0].item() == 650
