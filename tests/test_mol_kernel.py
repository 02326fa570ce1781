"""The fused MoL screen kernel against its torch reference (Triton interpreter on CPU)."""

import pytest
import torch

import amips.mol as am
from amips.kernels import _audit
from amips.kernels import mol as mk
from amips.mol.similarity import score_candidates
from amips.mol.topk import rank


def _setup(seed=0, n=150, p_q=3, p_x=2, d_p=16, hidden=16, dtype=torch.float16):
    torch.manual_seed(seed)
    h = am.MoL(20, 12, p_q, p_x, d_p, gate_hidden=hidden).eval()
    with torch.no_grad():
        h.pair_gate[2].weight.mul_(3.0)
    cache = h.item_cache(torch.randn(n, 12), dtype=dtype)
    qp = h.query_parts(torch.randn(3, 20))
    w = h.pair_gate
    args = (qp.components, qp.gate, cache.components, cache.gate, w[0].weight.detach(),
            w[0].bias.detach(), w[2].weight.detach(), w[2].bias.detach(), h.tau)
    return h, cache, qp, args


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n", [16, 150])  # one partial tile; many tiles, the last partial
def test_tile_max_matches_reference(dtype, n):
    h, cache, qp, args = _setup(n=n, dtype=dtype)
    got, bn = mk.mol_tile_max(*args, block_n=16)
    ref = mk.mol_tile_max_ref(*args, 16)
    assert got.shape == ref.shape == (3, (n + 15) // 16)
    # The kernel's fp16 pair MLP stays far inside the margin the caller certifies with.
    assert (got - ref).abs().max().item() < mk.screen_margin(dtype) / h.tau / 10
    canonical = score_candidates(h, qp, cache, torch.arange(n).repeat(3, 1))
    pad = torch.nn.functional.pad(canonical, (0, (-n) % 16), value=float("-inf"))
    assert (got - pad.view(3, -1, 16).amax(-1)).abs().max().item() < mk.screen_margin(dtype) / h.tau / 10


def test_query_chunks_and_tile_major_order_cover_every_query_and_tile(monkeypatch):
    """Launches of 2 queries each (the L2-sized query chunk, shrunk), programs numbered
    query-fastest: every (query, tile) maximum still lands in its own place."""
    h, cache, qp, args = _setup(seed=2, n=70)
    qc = torch.cat([args[0]] * 2)[:5]  # 5 queries: chunks of 2, 2, 1
    qg = torch.cat([args[1]] * 2)[:5]
    qc[3:] = qc[3:].flip(0)  # distinct rows per chunk
    args = (qc, qg, *args[2:])
    real = mk.mol_launch_config
    monkeypatch.setattr(mk, "mol_launch_config", lambda *a: {**real(*a), "QUERY_CHUNK": 2})
    got, _ = mk.mol_tile_max(*args, block_n=16)
    ref = mk.mol_tile_max_ref(*args, 16)
    assert got.shape == ref.shape == (5, 5)
    assert (got - ref).abs().max().item() < mk.screen_margin(torch.float16) / h.tau / 10
    cfg = real(65536, 1 << 20, 256, 16, 128, torch.bfloat16, _audit.H100)
    per_query = 256 * 16 * 2 + 16 * 4  # a bf16 [K, L] block-diagonal matrix and an fp32 gate
    assert cfg["QUERY_CHUNK"] * per_query <= 10 << 20 < (cfg["QUERY_CHUNK"] + 1) * per_query


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_through_kernel_equals_torch_path(dtype):
    h, cache, qp, _ = _setup(seed=1, n=130, dtype=dtype)
    s_k, i_k, st = am.topk(h, qp, 7, "exact", items=cache, backend="triton", return_stats=True)
    s_t, i_t = am.topk(h, qp, 7, "exact", items=cache, backend="torch")
    ids = torch.arange(130).repeat(3, 1)
    ref = rank(score_candidates(h, qp, cache, ids), ids, 7)
    assert torch.equal(i_k, i_t) and torch.equal(i_k, ref[1]) and torch.equal(s_k, s_t)
    assert st["rescored"] >= 7


def test_block_diagonal_queries_gives_every_pair_logit():
    f = torch.randn(2, 3, 5)
    items = torch.randn(4, 2, 5)
    bd = mk.block_diagonal_queries(f, 2, torch.float64)
    got = items.double().flatten(1) @ bd  # [2, 4, L]
    want = torch.einsum("qid,njd->qnij", f.double(), items.double()).flatten(-2)
    torch.testing.assert_close(got, want)


def test_launch_config_pure_and_audit_cases():
    cfg = mk.mol_launch_config(256, 1 << 20, 256, 32, 128, torch.bfloat16, _audit.H100)
    assert cfg == mk.mol_launch_config(256, 1 << 20, 256, 32, 128, torch.bfloat16, _audit.H100)
    assert min(cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_L"], cfg["BLOCK_H"]) >= 16
    cases = mk.audit_cases(_audit.H100)
    assert cases and all(c.matrix for c in cases)
    assert len({c.config for c in cases}) == len(cases)
    names = list(cases[0].signature)
    assert names[:3] == ["qbd_ptr", "qgate_ptr", "items_ptr"]


def test_launcher_rejects_inconsistent_inputs():
    h, cache, qp, args = _setup()
    bad = list(args)
    bad[1] = bad[1][:, :-1]  # query gate with L - 1 columns
    with pytest.raises(ValueError, match="query_gate"):
        mk.mol_tile_max(*bad)
    bad = list(args)
    bad[2] = bad[2].int()
    with pytest.raises(ValueError, match="items"):
        mk.mol_tile_max(*bad)


def test_exact_through_kernel_excludes_per_row():
    h, cache, qp, _ = _setup(seed=2, n=130, dtype=torch.float16)
    _, top = am.topk(h, qp, 20, "exact", items=cache, backend="torch")
    # Row 0 loses its whole top-20 (its best tiles), row 1 nothing, row 2 every other item.
    exclude = [top[0].tolist(), [], list(range(0, 130, 2))]
    s_k, i_k = am.topk(h, qp, 7, "exact", items=cache, backend="triton", exclude=exclude)
    s_t, i_t = am.topk(h, qp, 7, "exact", items=cache, backend="torch", exclude=exclude)
    assert torch.equal(i_k, i_t) and torch.equal(s_k, s_t)
    for r, e in enumerate(exclude):
        assert not set(i_k[r].tolist()) & set(e) and bool((i_k[r] >= 0).all())
