"""Shared checks for the tests of the CPU engines (imported by the test modules)."""

import torch


def assert_same_topk(s_a, p_a, s_b, p_b, atol=1e-4):
    """Tie-aware: scores equal rank by rank; positions may differ only among equal scores."""
    fin = torch.isfinite(s_a)
    assert torch.equal(fin, torch.isfinite(s_b))
    torch.testing.assert_close(s_a[fin], s_b[fin], rtol=1e-5, atol=atol)
    assert torch.equal(p_a[~fin], p_b[~fin])
    for i in range(s_a.shape[0]):
        n = int(fin[i].sum())
        if n == 0:
            continue
        kth = float(s_a[i, n - 1])
        sure_a = {int(p) for p, s in zip(p_a[i, :n], s_a[i, :n]) if float(s) > kth + atol}
        sure_b = {int(p) for p, s in zip(p_b[i, :n], s_b[i, :n]) if float(s) > kth + atol}
        assert sure_a == sure_b
