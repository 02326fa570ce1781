"""Mixture-of-Logits (MoL) similarity and an equal-budget dot-product head.

phi(q, x) = sum over the L = P_Q * P_X component pairs (i, j) of
            pi_ij(q, x) * <f_i(q), g_j(x)> / tau

``f_i(q)`` (``P_Q`` query components) and ``g_j(x)`` (``P_X`` item components) are linear
projections of the query and item representations to ``d_P`` dimensions each, L2-normalised
(norm clamped at ``eps`` away from 0), so every pair logit lies in [-1/tau, 1/tau]. The gate
pi is a softmax over the L pairs of

    z(q, x) = SiLU(a(q) * b(x) + c(l(q, x) / tau))

with ``a`` a query MLP (d_query -> hidden -> L), ``b`` an item MLP (d_item -> hidden -> L,
query-independent, so it is stored in the :class:`ItemCache`), and ``c`` a pair MLP on the
L pair logits / tau (L -> hidden -> L). Because pi >= 0 and sums to 1, phi lies between the
smallest and the largest pair logit / tau: the bound ``amips.mol.topk(method="bound")``
builds on. Pair index p = i * P_X + j (query component major).

Training extras: gate dropout (each pair weight dropped with probability ``gate_dropout``,
the rest renormalised to sum 1; never all dropped) and the load-balancing term
``-H(mean gate) + mean H(gate)`` (:meth:`MoL.load_balancing_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import InputError, all_finite

GATINGS = ("full",)
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NORM_EPS = 1e-6
# Rows of (query, item) pairs evaluated at once by the blocked paths: bounds temporaries to
# about rows * max(L, hidden) floats, whatever the number of items.
_BLOCK_ROWS = 1 << 15


@dataclass
class QueryParts:
    """What one batch of queries contributes to every score: its normalised components
    ``[nq, P_Q, d_P]`` (fp32) and its query-gate term ``[nq, L]`` (fp32; ``None`` for a
    head without a gate)."""

    components: torch.Tensor
    gate: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.components.shape[0]

    def take(self, rows) -> QueryParts:
        return QueryParts(self.components[rows], None if self.gate is None else self.gate[rows])


@dataclass
class ItemCache:
    """What is query-independent, computed once per item set.

    ``components`` [N, P_X, d_P] normalised item components stored in ``dtype`` (bf16 by
    default: every score of every top-k method is a function of these rounded values, so
    methods agree exactly); ``gate`` [N, L] fp32 item-gate terms (``None`` without a gate).
    ``extras`` holds lazily built search structures (averaged components, per-component
    exact searchers and IVF indexes), keyed by their parameters.
    """

    components: torch.Tensor
    gate: torch.Tensor | None
    extras: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.components.shape[0]

    @property
    def device(self) -> torch.device:
        return self.components.device


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_repr(x, name: str, d: int, module: nn.Module, *, dims=(2,)) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in dims:
        want = " or ".join(f"{k}-D" for k in dims)
        raise InputError(f"{name}: expected a {want} tensor, got shape {tuple(x.shape)}")
    if x.shape[-1] != d:
        raise InputError(f"{name}: dimension mismatch, expected d = {d}, got shape {tuple(x.shape)}")
    param = next(module.parameters(), None)
    if param is not None and x.device != param.device:
        raise InputError(f"{name}: on {x.device} but the model is on {param.device}")
    if not x.requires_grad and not all_finite(x.detach()):
        raise InputError(f"{name}: contains NaN or inf values")
    return x


class MoL(nn.Module):
    """Mixture-of-Logits similarity head, to put on top of a query tower and an item tower.

    ``MoL(d_query, d_item, p_q, p_x, d_p, tau=0.05, gating="full", gate_hidden=128,
    gate_dropout=0.2)``. ``forward(query_repr, item_repr)`` scores pairs ([B, d_q] with
    [B, d_i] -> [B]), grids ([B, d_q] with [N, d_i], N != B or ``grid=True`` -> [B, N],
    evaluated in blocks of items) or per-query item lists ([B, d_q] with [B, N, d_i] ->
    [B, N]). ``return_gates=True`` also returns the gate weights (shape of the scores + [L]).
    """

    has_gate = True

    def __init__(self, d_query: int, d_item: int, p_q: int = 8, p_x: int = 4, d_p: int = 64,
                 tau: float = 0.05, gating: str = "full", gate_hidden: int = 128,
                 gate_dropout: float = 0.2):
        super().__init__()
        for name, value in (("d_query", d_query), ("d_item", d_item), ("p_q", p_q), ("p_x", p_x),
                            ("d_p", d_p), ("gate_hidden", gate_hidden)):
            _check_int(value, name)
        if not (isinstance(tau, (int, float)) and tau > 0 and tau == tau):
            raise InputError(f"tau: expected a positive number, got {tau!r}")
        if gating not in GATINGS:
            raise InputError(f"gating: expected one of {GATINGS}, got {gating!r}")
        if not (isinstance(gate_dropout, (int, float)) and 0 <= gate_dropout < 1):
            raise InputError(f"gate_dropout: expected a number in [0, 1), got {gate_dropout!r}")
        self.d_query, self.d_item = d_query, d_item
        self.p_q, self.p_x, self.d_p = p_q, p_x, d_p
        self.tau = float(tau)
        self.gating = gating
        self.gate_hidden = gate_hidden
        self.gate_dropout = float(gate_dropout)
        self.n_pairs = p_q * p_x
        self.query_proj = nn.Linear(d_query, p_q * d_p)
        self.item_proj = nn.Linear(d_item, p_x * d_p)
        self.query_gate = _mlp(d_query, gate_hidden, self.n_pairs)
        self.item_gate = _mlp(d_item, gate_hidden, self.n_pairs)
        self.pair_gate = _mlp(self.n_pairs, gate_hidden, self.n_pairs)

    def config(self) -> dict:
        return {"kind": "mol", "d_query": self.d_query, "d_item": self.d_item, "p_q": self.p_q,
                "p_x": self.p_x, "d_p": self.d_p, "tau": self.tau, "gating": self.gating,
                "gate_hidden": self.gate_hidden, "gate_dropout": self.gate_dropout}

    # -- the two sides ---------------------------------------------------------------------
    def query_components(self, query_repr: torch.Tensor) -> torch.Tensor:
        return _normalise(self.query_proj(query_repr).unflatten(-1, (self.p_q, self.d_p)))

    def item_components(self, item_repr: torch.Tensor) -> torch.Tensor:
        return _normalise(self.item_proj(item_repr).unflatten(-1, (self.p_x, self.d_p)))

    def query_parts(self, query_repr: torch.Tensor) -> QueryParts:
        """Normalised query components [nq, P_Q, d_P] and query-gate term [nq, L] (fp32)."""
        q = _check_repr(query_repr, "queries", self.d_query, self)
        with torch.no_grad():
            q = q.float()
            return QueryParts(self.query_components(q).contiguous(),
                              self.query_gate(q).contiguous() if self.has_gate else None)

    def item_cache(self, item_repr: torch.Tensor, dtype=torch.bfloat16) -> ItemCache:
        """Normalised item components in ``dtype`` and the item-gate terms, for retrieval."""
        x = _check_repr(item_repr, "items", self.d_item, self)
        if isinstance(dtype, str):
            if dtype not in CACHE_DTYPES:
                raise InputError(f"dtype: expected one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
            dtype = CACHE_DTYPES[dtype]
        if dtype not in CACHE_DTYPES.values():
            raise InputError(f"dtype: expected bfloat16, float16 or float32, got {dtype}")
        comps, gates = [], []
        with torch.no_grad():
            for a in range(0, x.shape[0], 65536):
                xb = x[a : a + 65536].float()
                comps.append(self.item_components(xb).to(dtype))
                if self.has_gate:
                    gates.append(self.item_gate(xb))
        return ItemCache(torch.cat(comps).contiguous(), torch.cat(gates).contiguous() if gates else None)

    # -- scoring ---------------------------------------------------------------------------
    def combine(self, logits: torch.Tensor, query_gate: torch.Tensor | None,
                item_gate: torch.Tensor | None, *, dropout: bool = False):
        """phi and pi from pair logits [..., L] (already / tau) and the two gate terms
        (broadcastable to [..., L]). Runs in the dtype of ``logits``."""
        w = [p.to(logits.dtype) for p in (self.pair_gate[0].weight, self.pair_gate[0].bias,
                                          self.pair_gate[2].weight, self.pair_gate[2].bias)]
        pair = F.linear(F.silu(F.linear(logits, w[0], w[1])), w[2], w[3])
        z = F.silu(query_gate.to(logits.dtype) * item_gate.to(logits.dtype) + pair)
        pi = torch.softmax(z, dim=-1)
        if dropout and self.gate_dropout > 0:
            keep = (torch.rand_like(pi) >= self.gate_dropout).to(pi.dtype)
            none_kept = keep.sum(-1, keepdim=True) == 0
            keep = torch.where(none_kept, torch.ones_like(keep), keep)
            kept = pi * keep
            pi = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(pi.dtype).tiny)
        return (pi * logits).sum(-1), pi

    def score_components(self, qc: torch.Tensor, qg, ic: torch.Tensor, ig, *,
                         dropout: bool = False):
        """phi from broadcastable components: qc [..., P_Q, d], ic [..., P_X, d]."""
        logits = torch.einsum("...id,...jd->...ij", qc, ic).flatten(-2) / self.tau
        return self.combine(logits, qg, ig, dropout=dropout)

    def forward(self, query_repr: torch.Tensor, item_repr: torch.Tensor, *, grid: bool | None = None,
                return_gates: bool = False):
        q = _check_repr(query_repr, "query_repr", self.d_query, self)
        x = _check_repr(item_repr, "item_repr", self.d_item, self, dims=(2, 3))
        dropout = self.training
        qc = self.query_components(q)
        qg = self.query_gate(q) if self.has_gate else None
        if x.dim() == 3:  # per-query item lists [B, N, d]
            if x.shape[0] != q.shape[0]:
                raise InputError(f"item_repr: {x.shape[0]} item lists for {q.shape[0]} queries")
            ic = self.item_components(x)
            ig = self.item_gate(x) if self.has_gate else None
            phi, pi = self._score(qc[:, None], None if qg is None else qg[:, None], ic, ig, dropout)
        else:
            if grid is None:
                grid = x.shape[0] != q.shape[0]
            if not grid and x.shape[0] != q.shape[0]:
                raise InputError(f"item_repr: {x.shape[0]} items for {q.shape[0]} queries (pairs)")
            ic = self.item_components(x)
            ig = self.item_gate(x) if self.has_gate else None
            if not grid:
                phi, pi = self._score(qc, qg, ic, ig, dropout)
            elif not self.has_gate:  # one pair, no gate: the grid is one matrix product
                phi = (qc.flatten(1) @ ic.flatten(1).T) / self.tau
                pi = torch.ones_like(phi)[..., None] if return_gates else None
            else:
                step = max(1, _BLOCK_ROWS // max(1, q.shape[0]))
                outs, gates = [], []
                for a in range(0, x.shape[0], step):
                    phi_b, pi_b = self._score(
                        qc[:, None], None if qg is None else qg[:, None], ic[None, a : a + step],
                        None if ig is None else ig[None, a : a + step], dropout)
                    outs.append(phi_b)
                    if return_gates:
                        gates.append(pi_b)
                phi = torch.cat(outs, 1)
                pi = torch.cat(gates, 1) if return_gates else None
        return (phi, pi) if return_gates else phi

    def _score(self, qc, qg, ic, ig, dropout):
        return self.score_components(qc, qg, ic, ig, dropout=dropout)

    @staticmethod
    def load_balancing_loss(gates: torch.Tensor) -> torch.Tensor:
        """-H(mean gate) + mean H(gate) over all (query, item) rows of ``gates`` [..., L].

        Minimised by gates that are confident per example yet use every pair across the
        batch. The paper's code weights it by 0.001."""
        g = gates.reshape(-1, gates.shape[-1]).float()
        mean = g.mean(0)
        h_mean = -(mean * mean.clamp_min(1e-12).log()).sum()
        h_each = -(g * g.clamp_min(1e-12).log()).sum(-1).mean()
        return -h_mean + h_each

    # -- the canonical score used by every top-k method -------------------------------------
    def score(self, query_parts: QueryParts, cache: ItemCache, item_index=None) -> torch.Tensor:
        """phi of cached items: [nq, N] for all items (fp32, blocked), or [nq, m] for the item
        ids ``item_index`` [nq, m] (negative ids give -inf) in the canonical precision every
        top-k method ranks by: evaluated in fp64 on the cached components, rounded to fp32."""
        if item_index is None:
            return score_all(self, query_parts, cache)
        return score_candidates(self, query_parts, cache, item_index)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DotProduct(MoL):
    """Dot-product baseline with the same interface and parameter budget as ``MoL``.

    Takes the same arguments as :class:`MoL` and spends that MoL's parameter count on one
    query and one item projection of width ``d_p' = budget / (d_query + d_item + 2)``,
    L2-normalised, scored ``<f(q), g(x)> / tau`` (one pair, no gate: ``P_Q = P_X = 1``).
    """

    has_gate = False

    def __init__(self, d_query: int, d_item: int, p_q: int = 8, p_x: int = 4, d_p: int = 64,
                 tau: float = 0.05, gating: str = "full", gate_hidden: int = 128,
                 gate_dropout: float = 0.2):
        reference = MoL(d_query, d_item, p_q, p_x, d_p, tau, gating, gate_hidden, gate_dropout)
        budget = reference.parameter_count()
        width = max(1, round(budget / (d_query + d_item + 2)))
        nn.Module.__init__(self)
        self.d_query, self.d_item = d_query, d_item
        self.p_q, self.p_x, self.d_p = 1, 1, width
        self.tau = float(tau)
        self.gating = "none"
        self.gate_hidden = gate_hidden
        self.gate_dropout = 0.0
        self.n_pairs = 1
        self.matched = {"p_q": p_q, "p_x": p_x, "d_p": d_p, "gate_hidden": gate_hidden,
                        "budget": budget}
        self.query_proj = nn.Linear(d_query, width)
        self.item_proj = nn.Linear(d_item, width)

    def config(self) -> dict:
        return {"kind": "dot", "d_query": self.d_query, "d_item": self.d_item, "tau": self.tau,
                "width": self.d_p, **self.matched}

    def combine(self, logits, query_gate=None, item_gate=None, *, dropout: bool = False):
        return logits[..., 0], torch.ones_like(logits)


# --- blocked and canonical evaluation on an ItemCache --------------------------------------

def _gate_weights(head: MoL, dtype) -> list[torch.Tensor] | None:
    if not head.has_gate:
        return None
    return [p.detach().to(dtype) for p in (head.pair_gate[0].weight, head.pair_gate[0].bias,
                                           head.pair_gate[2].weight, head.pair_gate[2].bias)]


def phi_from_logits(head: MoL, logits: torch.Tensor, qg, ig, weights=None) -> torch.Tensor:
    """phi from pair logits [..., L] (already / tau), no autograd, in logits' dtype."""
    if not head.has_gate:
        return logits[..., 0]
    w = weights if weights is not None else _gate_weights(head, logits.dtype)
    pair = F.linear(F.silu(F.linear(logits, w[0], w[1])), w[2], w[3])
    z = F.silu(qg.to(logits.dtype) * ig.to(logits.dtype) + pair)
    pi = torch.softmax(z, dim=-1)
    return (pi * logits).sum(-1)


@torch.no_grad()
def score_all(head: MoL, qp: QueryParts, cache: ItemCache, *, start: int = 0,
              stop: int | None = None) -> torch.Tensor:
    """fp32 phi of every query against items ``start:stop``, in blocks of items (the
    [nq, block, L] logits of one block at a time). The screen of ``exact`` on CPU."""
    stop = cache.n if stop is None else stop
    nq = qp.n
    step = max(1, _BLOCK_ROWS // max(1, nq))
    qc = qp.components.float().flatten(0, 1)  # [nq * P_Q, d]
    w = _gate_weights(head, torch.float32)
    out = torch.empty(nq, stop - start, dtype=torch.float32, device=qc.device)
    for a in range(start, stop, step):
        b = min(stop, a + step)
        ic = cache.components[a:b].float().flatten(0, 1)  # [m * P_X, d]
        logits = (qc @ ic.T).view(nq, head.p_q, b - a, head.p_x).permute(0, 2, 1, 3)
        logits = logits.reshape(nq, b - a, head.n_pairs) * (1.0 / head.tau)
        ig = None if cache.gate is None else cache.gate[None, a:b]
        qg = None if qp.gate is None else qp.gate[:, None]
        out[:, a - start : b - start] = phi_from_logits(head, logits, qg, ig, w)
    return out


@torch.no_grad()
def score_candidates(head: MoL, qp: QueryParts, cache: ItemCache, item_index, *,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Canonical phi of candidate items ``item_index`` [nq, m] (fp64 evaluation of the cached
    components, rounded to fp32; -inf where the id is negative). ``dtype=torch.float32``
    gives the fp32 screen of the same items instead (within SCREEN_MARGIN / tau)."""
    idx = torch.as_tensor(item_index, device=cache.device)
    if idx.dim() != 2 or idx.shape[0] != qp.n:
        raise InputError(f"item_index: expected [{qp.n}, m] item ids, got shape {tuple(idx.shape)}")
    idx = idx.long()
    if idx.numel() and int(idx.max()) >= cache.n:
        raise InputError(f"item_index: id {int(idx.max())} >= number of items {cache.n}")
    nq, m = idx.shape
    out = torch.full((nq, m), float("-inf"), dtype=torch.float32, device=cache.device)
    if m == 0:
        return out
    w = _gate_weights(head, dtype)
    rows = max(1, _BLOCK_ROWS // max(1, m))
    for a in range(0, nq, rows):
        sel = idx[a : a + rows]
        safe = sel.clamp_min(0)
        qc = qp.components[a : a + rows].to(dtype)  # [r, P_Q, d]
        ic = cache.components[safe].to(dtype)  # [r, m, P_X, d]
        # [r, m, P_Q, P_X]: one batched product per query, same summation for every item.
        logits = torch.einsum("rid,rmjd->rmij", qc, ic).flatten(-2) / head.tau
        qg = None if qp.gate is None else qp.gate[a : a + rows, None]
        ig = None if cache.gate is None else cache.gate[safe]
        phi = phi_from_logits(head, logits, qg, ig, w).float()
        out[a : a + rows] = torch.where(sel >= 0, phi, out[a : a + rows])
    return out
