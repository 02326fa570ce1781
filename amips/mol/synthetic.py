"""A generated task whose true similarity is a mixture of logits: does a head recover it?

Items have two unit facets ``b_1, b_2`` in ``d`` dimensions; a query is one unit vector
``q``; the true similarity is ``max_j <q, b_j>`` (a hard mixture of two logits) and the
target of a query is its truly best item. A dot product of linear projections scores
``q^T (M_1 b_1 + M_2 b_2)``, linear in the facets, so it cannot represent the max; a MoL head
with one query and two item components can (its gate picks the larger logit).
:func:`fit_mixture_task` trains one head with the full softmax and returns test HR@1 and
HR@10 of the truly best item (ties counted against it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .similarity import DotProduct, MoL


def _facets(n: int, p: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, p, d, generator=g), dim=-1)


def fit_mixture_task(kind: str, *, seed: int = 0, d: int = 8, n_items: int = 200, steps: int = 300,
                     batch: int = 64, n_test: int = 400, lr: float = 1e-2) -> dict:
    """Train a ``kind`` ("mol" or "dot", equal parameter budget) head on the task."""
    g = torch.Generator().manual_seed(seed)
    items = _facets(n_items, 2, d, g)
    x = items.flatten(1)

    def best(q):
        return torch.einsum("qd,njd->qnj", q, items).amax(-1).argmax(1)

    test_q = _facets(n_test, 1, d, g)[:, 0]
    torch.manual_seed(seed)
    head_cls = MoL if kind == "mol" else DotProduct
    head = head_cls(d, 2 * d, p_q=1, p_x=2, d_p=d, tau=0.1, gate_hidden=32, gate_dropout=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        q = _facets(batch, 1, d, g)[:, 0]
        loss = F.cross_entropy(head(q, x, grid=True), best(q))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        s = head(test_q, x, grid=True)
    t = best(test_q)
    rank = (s >= s.gather(1, t[:, None])).sum(1) - 1
    return {"kind": kind, "seed": seed, "hr@1": (rank < 1).double().mean().item(),
            "hr@10": (rank < 10).double().mean().item(), "final_loss": loss.item(),
            "n_params": sum(p.numel() for p in head.parameters())}
