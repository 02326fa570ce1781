"""Score-aware (anisotropic) vector and product quantization (Guo et al., ICML 2020).

For a datapoint ``x`` quantized to ``x~`` the residual ``r = x - x~`` splits into
``r_par = <r, u> u`` (``u = x / ||x||``) and ``r_perp = r - r_par``. For the weight
``w(t) = 1[t >= T]`` over queries uniform on the unit sphere, the expected weighted
inner-product error is proportional to ``eta * ||r_par||^2 + ||r_perp||^2`` with

    eta(T, ||x||, d) = (d - 1) * (I_{d-2}(a) / I_d(a) - 1),    I_k(a) = int_0^a sin^k(t) dt,
    a = arccos(T / ||x||)                                        (Theorem 3.2, exact)

    eta -> (d - 1) * T^2 / (||x||^2 - T^2)                       (large-d limit)

(``eta(0.2, 1, 100) = 4.125`` in the limit). Throughout, a datapoint's loss is written with
``h_perp = 1`` and ``h_par = eta``:

    loss(x, x~) = ||r||^2 + (eta - 1) <r, u>^2

How a threshold is applied to data (:func:`anisotropic_eta`): ``T`` is relative to each
key's norm, a cosine, i.e. the threshold on ``<q, x>`` is ``T * ||x||`` for unit queries, so
every key gets ``eta = (d - 1) T^2 / (1 - T^2)`` (``T`` in ``[0, 1)``). On unit-norm keys this
is ScaNN's absolute ``T`` exactly; on keys of natural norms an absolute ``T`` is not
scale-invariant (scaling the keys by 5, which changes no ranking, divides eta by 25) and it
ranks badly: on word-vector-like keys of norm ~5 (``bench/_wordlike.py``) an absolute
``T = 0.2`` gives ``eta`` 0.006-3.7 (median 0.16 < 1: the parallel error of the long keys,
the ones that win MIPS, becomes nearly free) and match@1 fell from .33 (plain PQ) to .02;
``T`` relative to a global norm (mean, max) makes eta blow up for keys just above the
threshold, and those few keys then dominate the shared codebooks (.18 and .25); relative to
each key's norm it gains over plain PQ (.43), as on unit-norm data (bench/RESULTS.md). The
per-key ``eta`` cap ``ETA_MAX`` only matters for ``T`` close to 1.

What is here
- :func:`eta_limit`, :func:`eta_exact`, :func:`anisotropic_eta` (per row).
- :func:`score_aware_loss`, :func:`anisotropic_codeword` (Theorem 4.2's closed form).
- :func:`anisotropic_kmeans`: Lloyd iterations with the score-aware assignment and the
  Theorem 4.2 update (an IVF partitioner).
- :class:`ProductQuantizer`: M subspaces, 16 (4-bit) or 256 (8-bit) codewords each; trained by
  k-means (reconstruction) and, with a threshold, refined under the score-aware loss: codes by
  coordinate descent over subspaces (started from the reconstruction codes, so the
  score-aware loss never increases), codebooks by exact block coordinate descent (one
  subspace at a time; Theorem 4.2 generalised to one block of a product code).

When PQ runs on residuals ``y = x - c`` (IVF), the loss is still that of ``x``: the direction
``u`` and ``eta`` come from the original ``x`` (``originals=``), the error is ``y - y~``.
Everything is torch and runs on the tensors' device (GPU or CPU).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._validate import InputError, check_matrix, check_positive_int, to_tensor

ETA_MAX = 1.0e4
_CHUNK_ELEMS = 1 << 23  # elements of one [rows, codewords] (or [M, rows, K]) scratch block


# ---------------------------------------------------------------------------------------
# eta
# ---------------------------------------------------------------------------------------
def _check_eta_args(threshold, norm, dim) -> tuple[float, float, int]:
    dim = check_positive_int(dim, "dim")
    if dim < 2:
        raise InputError(f"dim: must be >= 2, got {dim}")
    threshold, norm = float(threshold), float(norm)
    if not (math.isfinite(threshold) and math.isfinite(norm)):
        raise InputError("threshold and norm must be finite")
    if threshold < 0:
        raise InputError(f"threshold: must be >= 0, got {threshold}")
    if norm <= threshold:
        raise InputError(
            f"norm: must exceed the threshold (||x|| = {norm} <= T = {threshold}): "
            "no unit query reaches the threshold"
        )
    return threshold, norm, dim


def eta_limit(threshold: float, norm: float, dim: int) -> float:
    """Large-d limit of eta: ``(d - 1) T^2 / (||x||^2 - T^2)``."""
    t, n, d = _check_eta_args(threshold, norm, dim)
    return (d - 1) * t * t / (n * n - t * t)


def _sin_power_integral_ratio(alpha: float, dim: int) -> float:
    """``I_{d-2}(alpha) / I_d(alpha)``, integrals of sin^k over [0, alpha], by quadrature.

    Both integrands are scaled by ``sin(alpha)^d`` in log space so nothing underflows for
    large d. Composite 32-node Gauss-Legendre on panels that halve towards ``alpha``, where
    the integrands peak (decay length about ``tan(alpha) / d``).
    """
    nodes, weights = np.polynomial.legendre.leggauss(32)
    decay = math.tan(alpha) / dim if alpha < math.pi / 2 else alpha
    edges = [0.0]
    gap = alpha / 2
    while gap > 1e-4 * min(decay, alpha):
        edges.append(alpha - gap)
        gap /= 2
    edges.append(alpha)
    lo_e, hi_e = np.array(edges[:-1]), np.array(edges[1:])
    half = 0.5 * (hi_e - lo_e)
    theta = (lo_e + half)[:, None] + half[:, None] * nodes[None, :]
    w = half[:, None] * weights[None, :]
    log_sin = np.log(np.sin(theta))
    ref = dim * math.log(math.sin(alpha))
    lo = np.exp((dim - 2) * log_sin - ref)
    hi = np.exp(dim * log_sin - ref)
    return float(np.sum(w * lo) / np.sum(w * hi))


def eta_exact(threshold: float, norm: float, dim: int) -> float:
    """Exact finite-d eta (Theorem 3.2): ``(d - 1) (I_{d-2}(a) / I_d(a) - 1)``,
    ``a = arccos(T / ||x||)``, for queries uniform on the unit sphere of R^d."""
    t, n, d = _check_eta_args(threshold, norm, dim)
    if t == 0.0:
        # alpha = pi/2: Wallis, I_{d-2}/I_d = d/(d-1) -> eta = 1 (isotropic)
        return 1.0
    alpha = math.acos(t / n)
    return (d - 1) * (_sin_power_integral_ratio(alpha, d) - 1.0)


def anisotropic_eta(originals: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-row eta (large-d limit) of ``originals`` [n, d] for a threshold relative to each
    row's norm: ``eta_limit(T * ||x||, ||x||, d) = (d - 1) T^2 / (1 - T^2)``, the same for every
    row with ``||x|| > 0`` (zero rows get 1: no direction to weight). ``T`` in ``[0, 1)``."""
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold < 0 or threshold >= 1:
        raise InputError(
            f"anisotropic_threshold: must be a finite number in [0, 1) (a cosine, relative to "
            f"each key's norm), got {threshold}")
    d = originals.shape[1]
    t2 = threshold * threshold
    eta = min((d - 1) * t2 / (1.0 - t2), ETA_MAX)
    sq = (originals.double() ** 2).sum(1)
    out = torch.where(sq > 0, torch.full_like(sq, eta), torch.ones_like(sq))
    return out.to(originals.dtype)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


# ---------------------------------------------------------------------------------------
# loss and the Theorem 4.2 update
# ---------------------------------------------------------------------------------------
def score_aware_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    eta: torch.Tensor | float,
    *,
    originals: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row ``||r||^2 + (eta - 1) <r, u>^2`` with ``r = x - x_hat`` and ``u`` the unit
    direction of ``originals`` (default ``x``). ``eta`` is a scalar or a per-row tensor."""
    x = check_matrix(to_tensor(x, "x"), "x")
    x_hat = check_matrix(to_tensor(x_hat, "x_hat"), "x_hat", dim=x.shape[1])
    if x_hat.shape != x.shape:
        raise InputError(f"x_hat: shape {tuple(x_hat.shape)} differs from x {tuple(x.shape)}")
    u = _unit_rows(x if originals is None else originals)
    r = x - x_hat
    par = (r * u).sum(1)
    return (r * r).sum(1) + (torch.as_tensor(eta, dtype=x.dtype, device=x.device) - 1) * par * par


def anisotropic_codeword(x: torch.Tensor, eta: torch.Tensor | float) -> torch.Tensor:
    """Theorem 4.2: the codeword minimising ``sum_i eta_i ||r_par||^2 + ||r_perp||^2`` over the
    rows of ``x`` [n, d] (all assigned to it):
    ``c = (sum_i I + sum_i (eta_i - 1) x_i x_i^T / ||x_i||^2)^-1 sum_i eta_i x_i``."""
    x = check_matrix(to_tensor(x, "x"), "x")
    eta = torch.as_tensor(eta, dtype=torch.float64, device=x.device).expand(x.shape[0])
    xd = x.double()
    u = _unit_rows(xd)
    a = torch.eye(x.shape[1], dtype=torch.float64, device=x.device) * x.shape[0]
    a = a + (u * (eta - 1)[:, None]).T @ u
    b = (xd * eta[:, None]).sum(0)
    return torch.linalg.solve(a, b).to(x.dtype)


def _sa_assignment_cost(x, sq_norms, norms, eta, centroids) -> torch.Tensor:
    """loss(x_i, c_j) for all pairs: ||x - c||^2 + (eta - 1)(||x|| - <c, u>)^2."""
    dots = x @ centroids.T
    c_sq = (centroids * centroids).sum(1)
    par = norms[:, None] - dots / norms.clamp_min(1e-30)[:, None]
    return sq_norms[:, None] - 2 * dots + c_sq[None, :] + (eta - 1)[:, None] * par * par


def anisotropic_kmeans(
    x,
    n_clusters: int,
    *,
    threshold: float,
    iters: int = 20,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anisotropic vector quantization (partitioning): Lloyd iterations alternating the
    score-aware assignment and the Theorem 4.2 codeword update. Returns
    ``(centroids [L, d], assignments [n] int64)``; runs on ``x``'s device."""
    x = check_matrix(to_tensor(x, "x"), "x").float()
    n, d = x.shape
    n_clusters = check_positive_int(n_clusters, "n_clusters", maximum=n)
    iters = check_positive_int(iters, "iters")
    eta = anisotropic_eta(x, threshold)
    sq = (x * x).sum(1)
    norms = sq.sqrt()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if init is None:
        cent = x[torch.randperm(n, generator=gen)[:n_clusters].to(x.device)].clone()
    else:
        cent = check_matrix(to_tensor(init, "init"), "init", dim=d).float().to(x.device).clone()
        if cent.shape[0] != n_clusters:
            raise InputError(f"init: expected {n_clusters} rows, got {cent.shape[0]}")
    u = _unit_rows(x.double())
    assign = torch.empty(n, dtype=torch.long, device=x.device)
    chunk = max(1, _CHUNK_ELEMS // n_clusters)
    for _ in range(iters):
        for a in range(0, n, chunk):
            cost = _sa_assignment_cost(x[a:a + chunk], sq[a:a + chunk], norms[a:a + chunk],
                                       eta[a:a + chunk], cent)
            assign[a:a + chunk] = cost.argmin(1)
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=n_clusters).cpu().tolist()
        start = 0
        new = cent.clone()
        empty = []
        for j, cnt in enumerate(counts):
            if cnt == 0:
                empty.append(j)
                continue
            rows = order[start:start + cnt]
            start += cnt
            ur, er = u[rows], eta[rows].double()
            a_mat = torch.eye(d, dtype=torch.float64, device=x.device) * cnt
            a_mat = a_mat + (ur * (er - 1)[:, None]).T @ ur
            b = (x[rows].double() * er[:, None]).sum(0)
            new[j] = torch.linalg.solve(a_mat, b).float()
        if empty:  # re-seed empty clusters with random points
            pick = torch.randint(0, n, (len(empty),), generator=gen).to(x.device)
            new[torch.tensor(empty, device=x.device)] = x[pick]
        cent = new
    for a in range(0, n, chunk):
        cost = _sa_assignment_cost(x[a:a + chunk], sq[a:a + chunk], norms[a:a + chunk],
                                   eta[a:a + chunk], cent)
        assign[a:a + chunk] = cost.argmin(1)
    return cent, assign


# ---------------------------------------------------------------------------------------
# product quantization
# ---------------------------------------------------------------------------------------
def check_pq_shape(dim: int, subspaces, bits) -> tuple[int, int]:
    subspaces = check_positive_int(subspaces, "subspaces")
    if isinstance(bits, bool) or bits not in (4, 8):
        raise InputError(f"bits: must be 4 or 8 (16 or 256 codewords per subspace), got {bits!r}")
    if dim % subspaces != 0:
        raise InputError(
            f"subspaces: d = {dim} is not divisible by subspaces = {subspaces} "
            f"(choose a divisor of {dim})"
        )
    return subspaces, int(bits)


class ProductQuantizer:
    """Codebooks ``[M, K, d/M]`` (K = 2^bits); ``encode`` / ``decode`` codes ``[n, M]`` int64.

    Build with :meth:`train`; an untrained quantizer (``codebooks is None``) refuses to encode.
    """

    def __init__(self, dim: int, subspaces: int, bits: int = 4,
                 codebooks: torch.Tensor | None = None):
        dim = check_positive_int(dim, "dim")
        self.dim = dim
        self.subspaces, self.bits = check_pq_shape(dim, subspaces, bits)
        self.n_codewords = 1 << self.bits
        self.sub_dim = dim // self.subspaces
        self.codebooks = None
        if codebooks is not None:
            cb = to_tensor(codebooks, "codebooks")
            want = (self.subspaces, self.n_codewords, self.sub_dim)
            if tuple(cb.shape) != want:
                raise InputError(f"codebooks: expected shape {want}, got {tuple(cb.shape)}")
            if not bool(torch.isfinite(cb).all()):
                raise InputError("codebooks: contains NaN or inf values")
            self.codebooks = cb.float()

    # -- helpers --------------------------------------------------------------------
    def _require_trained(self) -> torch.Tensor:
        if self.codebooks is None:
            raise InputError("codebooks not trained: call ProductQuantizer.train(...) first")
        return self.codebooks

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d] -> [M, n, ds]"""
        return x.reshape(x.shape[0], self.subspaces, self.sub_dim).transpose(0, 1)

    def _check_x(self, x, name="x") -> torch.Tensor:
        return check_matrix(to_tensor(x, name), name, dim=self.dim).float()

    def _check_codes(self, codes) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            codes = torch.as_tensor(np.asarray(codes))
        if codes.dtype.is_floating_point or codes.dim() != 2 or codes.shape[1] != self.subspaces:
            raise InputError(
                f"codes: expected integer codes [n, {self.subspaces}], got "
                f"{codes.dtype} {tuple(codes.shape)}"
            )
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_codewords):
            raise InputError(f"codes: values must lie in [0, {self.n_codewords})")
        return codes

    # -- public ---------------------------------------------------------------------
    def decode(self, codes) -> torch.Tensor:
        cb = self._require_trained()
        codes = self._check_codes(codes).to(cb.device)
        m_idx = torch.arange(self.subspaces, device=cb.device)
        return cb[m_idx[None, :], codes].reshape(codes.shape[0], self.dim)

    def encode(self, x, *, threshold: float | None = None, originals=None,
               init_codes=None, sweeps: int = 8) -> torch.Tensor:
        """Codes [n, M] int64: nearest codeword per subspace (reconstruction), or with a
        threshold the score-aware codes by coordinate descent over subspaces, started from
        ``init_codes`` (default: the reconstruction codes)."""
        cb = self._require_trained()
        x = self._check_x(x).to(cb.device)
        codes = self._nearest(x) if init_codes is None else \
            self._check_codes(init_codes).to(cb.device).clone()
        if threshold is None:
            return codes
        orig = x if originals is None else self._check_x(originals, "originals").to(cb.device)
        if orig.shape[0] != x.shape[0]:
            raise InputError(f"originals: expected {x.shape[0]} rows, got {orig.shape[0]}")
        eta = anisotropic_eta(orig, threshold)
        u = _unit_rows(orig)
        return self._score_aware_assign(x, u, eta, codes, sweeps=sweeps)

    def loss(self, x, codes, *, threshold: float | None = None, originals=None) -> torch.Tensor:
        """Mean loss of ``codes`` for ``x``: squared reconstruction error, or with a threshold
        the score-aware loss (eta and direction from ``originals``, default ``x``)."""
        x = self._check_x(x)
        x_hat = self.decode(codes).to(x.device)
        if threshold is None:
            return ((x - x_hat) ** 2).sum(1).mean()
        orig = x if originals is None else self._check_x(originals, "originals")
        return score_aware_loss(x, x_hat, anisotropic_eta(orig, threshold),
                                originals=orig).mean()

    @classmethod
    def train(cls, x, subspaces: int, bits: int = 4, *, threshold: float | None = None,
              originals=None, score_aware_codebooks: bool = True, iters: int = 20,
              score_aware_iters: int = 5, sweeps: int = 8, seed: int = 0,
              ) -> tuple[ProductQuantizer, torch.Tensor]:
        """Train on ``x`` [n, d]; returns ``(quantizer, codes [n, M])``.

        Always starts with ``iters`` k-means iterations per subspace (reconstruction PQ).
        With a threshold: codes are re-assigned under the score-aware loss and, when
        ``score_aware_codebooks``, ``score_aware_iters`` rounds of (score-aware assignment,
        exact score-aware codebook update) follow. Runs on ``x``'s device."""
        x = check_matrix(to_tensor(x, "x"), "x").float()
        pq = cls(x.shape[1], subspaces, bits)
        iters = check_positive_int(iters, "iters")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        pq.codebooks = pq._kmeans(x, iters, gen)
        codes = pq._nearest(x)
        if threshold is None:
            return pq, codes
        orig = x if originals is None else pq._check_x(originals, "originals").to(x.device)
        if orig.shape[0] != x.shape[0]:
            raise InputError(f"originals: expected {x.shape[0]} rows, got {orig.shape[0]}")
        eta = anisotropic_eta(orig, threshold)
        u = _unit_rows(orig)
        codes = pq._score_aware_assign(x, u, eta, codes, sweeps=sweeps)
        if score_aware_codebooks:
            for _ in range(score_aware_iters):
                pq._score_aware_codebook_update(x, u, eta, codes)
                codes = pq._score_aware_assign(x, u, eta, codes, sweeps=sweeps)
        return pq, codes

    # -- internals ------------------------------------------------------------------
    def _kmeans(self, x: torch.Tensor, iters: int, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        k = self.n_codewords
        xs = self._split(x)  # [M, n, ds] view
        if n >= k:
            init = torch.randperm(n, generator=gen)[:k]
        else:  # fewer rows than codewords: every row is a codeword, the rest repeat rows
            init = torch.cat([torch.randperm(n, generator=gen),
                              torch.randint(0, n, (k - n,), generator=gen)])
        init = init.to(x.device)
        cb = xs[:, init].clone()
        for _ in range(iters):
            codes = self._nearest(x, cb)  # [n, M]
            sums = torch.zeros_like(cb)
            counts = torch.zeros(self.subspaces, k, device=x.device, dtype=x.dtype)
            sums.scatter_add_(1, codes.T[:, :, None].expand(-1, -1, self.sub_dim), xs)
            counts.scatter_add_(1, codes.T, torch.ones_like(codes.T, dtype=x.dtype))
            new = sums / counts.clamp_min(1)[:, :, None]
            empty = counts == 0
            new[empty] = cb[empty]
            if bool(empty.any()) and n >= k:  # re-seed empty codewords with random training rows
                m_idx, k_idx = torch.nonzero(empty, as_tuple=True)
                pick = torch.randint(0, n, (m_idx.numel(),), generator=gen).to(x.device)
                new[m_idx, k_idx] = xs[m_idx, pick]
            cb = new
        return cb

    def _nearest(self, x: torch.Tensor, cb: torch.Tensor | None = None) -> torch.Tensor:
        cb = self.codebooks if cb is None else cb
        xs = self._split(x)
        cb_sq = (cb * cb).sum(2)  # [M, K]
        codes = torch.empty(x.shape[0], self.subspaces, dtype=torch.long, device=x.device)
        chunk = max(1, _CHUNK_ELEMS // (self.subspaces * self.n_codewords))
        for a in range(0, x.shape[0], chunk):
            dist = cb_sq[:, None, :] - 2 * torch.bmm(xs[:, a:a + chunk], cb.transpose(1, 2))
            codes[a:a + chunk] = dist.argmin(2).T
        return codes

    def _score_aware_assign(self, x, u, eta, codes, *, sweeps: int) -> torch.Tensor:
        """Coordinate descent over subspaces: for subspace m, with the other codes fixed,
        pick the codeword minimising ||y_m - c||^2 + (eta - 1)(s_other + <y_m - c, u_m>)^2,
        where s_other is the parallel error of the other subspaces. Never increases the
        loss; stops after ``sweeps`` passes or when no code changes."""
        cb = self.codebooks
        codes = codes.clone()
        xs, us = self._split(x), self._split(u)
        m_idx = torch.arange(self.subspaces, device=x.device)
        r_par = ((xs - cb[m_idx[:, None], codes.T]) * us).sum(2)  # [M, n]
        s = r_par.sum(0)  # [n] total parallel error
        em1 = eta - 1
        cb_sq = (cb * cb).sum(2)
        chunk = max(1, _CHUNK_ELEMS // self.n_codewords)
        for _ in range(max(1, sweeps)):
            changed = 0
            for m in range(self.subspaces):
                cm, ym, um = cb[m], xs[m], us[m]
                for a in range(0, x.shape[0], chunk):
                    sl = slice(a, a + chunk)
                    y_dot_u = (ym[sl] * um[sl]).sum(1)
                    other = s[sl] - r_par[m, sl]
                    dist = cb_sq[m][None, :] - 2 * ym[sl] @ cm.T
                    par = (other + y_dot_u)[:, None] - um[sl] @ cm.T
                    cost = dist + em1[sl, None] * par * par
                    best = cost.argmin(1)
                    # keep the current code on ties so the loss never goes up by rounding
                    cur = codes[sl, m]
                    keep = cost.gather(1, cur[:, None])[:, 0] <= cost.gather(1, best[:, None])[:, 0]
                    best = torch.where(keep, cur, best)
                    changed += int((best != cur).sum())
                    codes[sl, m] = best
                    new_par = y_dot_u - (um[sl] * cm[best]).sum(1)
                    s[sl] = other + new_par
                    r_par[m, sl] = new_par
            if changed == 0:
                break
        return codes

    def _score_aware_codebook_update(self, x, u, eta, codes) -> None:
        """Exact block coordinate descent on the codebooks: for subspace m, each codeword
        solves (n_k I + sum (eta_i - 1) u_im u_im^T) c = sum y_im + sum (eta_i - 1) a_i u_im,
        a_i = s_other_i + <y_im, u_im> (Theorem 4.2 for one block of a product code)."""
        cb = self.codebooks
        k, ds = self.n_codewords, self.sub_dim
        xs, us = self._split(x), self._split(u)
        m_idx = torch.arange(self.subspaces, device=x.device)
        r_par = ((xs - cb[m_idx[:, None], codes.T]) * us).sum(2)
        s = r_par.sum(0)
        em1 = (eta - 1).double()
        eye = torch.eye(ds, dtype=torch.float64, device=x.device)
        for m in range(self.subspaces):
            ym, um, cm = xs[m].double(), us[m].double(), codes[:, m]
            a_i = (s - r_par[m]).double() + (ym * um).sum(1)
            outer = (um[:, :, None] * um[:, None, :]) * em1[:, None, None]  # [n, ds, ds]
            a_mat = torch.zeros(k, ds, ds, dtype=torch.float64, device=x.device)
            a_mat.index_add_(0, cm, outer)
            counts = torch.bincount(cm, minlength=k).double()
            a_mat += counts[:, None, None] * eye
            rhs = torch.zeros(k, ds, dtype=torch.float64, device=x.device)
            rhs.index_add_(0, cm, ym + (em1 * a_i)[:, None] * um)
            used = counts > 0
            new = cb[m].clone()
            if bool(used.any()):
                new[used] = torch.linalg.solve(a_mat[used], rhs[used]).float()
            cb[m] = new
            new_par = (xs[m] * us[m]).sum(1) - (us[m] * new[cm]).sum(1)
            s = s - r_par[m] + new_par
            r_par[m] = new_par
