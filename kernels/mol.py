"""Fused Mixture-of-Logits screen: per (query, tile of items) the largest MoL score.

Maths
-----
For a query with normalised components ``f_i`` (i < P_Q) and query-gate term ``a`` [L],
and an item with normalised components ``g_j`` (j < P_X) and item-gate term ``b`` [L],
L = P_Q * P_X, pair p = i * P_X + j:

    l_p   = <f_i, g_j> / tau                                  (pair logits)
    c     = W2 SiLU(W1 l + b1) + b2                           (pair MLP, L -> H -> L)
    pi    = softmax_p( SiLU(a_p * b_p + c_p) )
    phi   = sum_p pi_p * l_p

The kernel's program owns one tile of ``BLOCK_N`` cached items and one query. It loads the
item tile ``X`` [BLOCK_N, P_X * d_P] and its gate terms, then:
the L logits as ONE tensor-core product ``X @ Fq`` with the query's block-diagonal matrix
``Fq`` [P_X * d_P, L] (column p = (i, j) holds f_i in the rows of item component j; built
once per query batch by :func:`block_diagonal_queries`), the pair MLP as two products over
the tile ([BLOCK_N, L] @ [L, H], [BLOCK_N, H] @ [H, L]), the combination with the gate
terms, the softmax and the weighted sum, all in registers; it writes only the tile's
maximum phi. No [queries x items x L] tensor exists anywhere.

Precision and the screen's margin
---------------------------------
Logit products take the cache's dtype (bf16/fp16; fp32 caches use tf32 on a GPU) with fp32
accumulation; the pair MLP's operands are fp16 (logits / tau <= 1/tau fits with 11 bits),
fp32 accumulation; gating, softmax and the sum run in fp32. The result is a *screen*: the
caller (``amips.mol.topk(method="exact")``) re-scores in fp64 every item of every tile whose
maximum is within ``2 * screen_margin(dtype) / tau`` of the k-th best tile maximum, which is
exact as long as each screened phi is within ``screen_margin / tau`` of the fp64 value (the
margin is 2^-6 with fp16/bf16 MLP operands: ~40x the error measured under the interpreter on
random and trained heads; ``tests/test_mol_kernel.py`` checks it).

Tie rule: the kernel reports maxima only; ties are resolved by the caller's canonical
ranking (score desc, item id asc).

Shapes and dtypes: ``qbd`` [nq, P_X * d_P, L] (cache dtype), ``query_gate`` [nq, L] fp32,
``items`` [N, P_X * d_P] (bf16/fp16/fp32), ``item_gate`` [N, L] fp32, ``w1t`` [L, H] fp16,
``b1`` [H] fp32, ``w2t`` [H, L] fp16, ``b2`` [L] fp32. Output ``tile_max`` [nq, n_tiles]
fp32, ``-inf`` for a tile without items.
"""

from __future__ import annotations

import torch

from ._audit import AuditCase, DeviceSpec, dedupe
from ._backend import KernelFailure, launch_or_fallback, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None
    tl = None

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def screen_margin(dtype: torch.dtype) -> float:
    """Bound (times 1/tau) on |screened phi - fp64 phi| that the caller certifies with."""
    return 2.0**-6


def _next_pow2(x: int, minimum: int = 16) -> int:
    p = minimum
    while p < x:
        p *= 2
    return p


if triton is not None:

    @triton.jit
    def _silu(x):
        return x / (1.0 + tl.exp(-x))

    @triton.jit
    def _mol_tile_max_kernel(
        qbd_ptr, qgate_ptr, items_ptr, igate_ptr, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, out_ptr,
        nq, n_items, n_tiles, inv_tau,
        stride_qb, stride_qk, stride_ql,
        stride_gq, stride_xn, stride_in,
        K: tl.constexpr, L: tl.constexpr, H: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # One program: one tile of items x one query. (A loop over several queries per
        # program, reusing the item tile, spills at every production shape on sm_90.)
        # Programs are numbered query-fastest: consecutive programs, which run at the same
        # time, share one item tile, so each tile comes from HBM once per launch and from L2
        # for the other queries; the launcher sizes the query chunk of a launch so that its
        # query-side data (block-diagonal matrices, gates) stays in L2 across the tiles.
        pid = tl.program_id(0)
        q64 = (pid % nq).to(tl.int64)
        pid_n = pid // nq
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rl = tl.arange(0, BLOCK_L)
        rh = tl.arange(0, BLOCK_H)
        n_ok = rn < n_items
        l_ok = rl < L
        rn64 = rn.to(tl.int64)
        x = tl.load(items_ptr + rn64[:, None] * stride_xn + rk[None, :],
                    mask=n_ok[:, None] & (rk[None, :] < K), other=0.0)
        ig = tl.load(igate_ptr + rn64[:, None] * stride_in + rl[None, :],
                     mask=n_ok[:, None] & l_ok[None, :], other=0.0)
        fq = tl.load(qbd_ptr + q64 * stride_qb + rk[:, None] * stride_qk + rl[None, :] * stride_ql,
                     mask=(rk[:, None] < K) & l_ok[None, :], other=0.0)
        qg = tl.load(qgate_ptr + q64 * stride_gq + rl, mask=l_ok, other=0.0)
        w1t = tl.load(w1t_ptr + rl[:, None] * H + rh[None, :],
                      mask=l_ok[:, None] & (rh[None, :] < H), other=0.0)
        w2t = tl.load(w2t_ptr + rh[:, None] * L + rl[None, :],
                      mask=(rh[:, None] < H) & l_ok[None, :], other=0.0)
        b1 = tl.load(b1_ptr + rh, mask=rh < H, other=0.0)
        b2 = tl.load(b2_ptr + rl, mask=l_ok, other=0.0)
        logits = tl.dot(x, fq, input_precision=DOT_PRECISION) * inv_tau  # [BLOCK_N, BLOCK_L]
        hid = _silu(tl.dot(logits.to(tl.float16), w1t) + b1[None, :])
        pair = tl.dot(hid.to(tl.float16), w2t) + b2[None, :]
        z = _silu(qg[None, :] * ig + pair)
        z = tl.where(l_ok[None, :], z, float("-inf"))
        z = z - tl.max(z, axis=1)[:, None]
        e = tl.exp(z)
        phi = tl.sum(e * logits, axis=1) / tl.sum(e, axis=1)
        phi = tl.where(n_ok, phi, float("-inf"))
        tl.store(out_ptr + q64 * n_tiles + pid_n, tl.max(phi, axis=0))


def block_diagonal_queries(components: torch.Tensor, p_x: int, dtype: torch.dtype) -> torch.Tensor:
    """[nq, P_Q, d] query components -> [nq, P_X * d, L]: column i * P_X + j holds f_i in
    rows j * d : (j + 1) * d, zeros elsewhere, so ``items_flat @ out`` gives every pair logit."""
    nq, p_q, d = components.shape
    out = torch.zeros(nq, p_x, d, p_q, p_x, dtype=dtype, device=components.device)
    f = components.to(dtype).transpose(1, 2)  # [nq, d, P_Q]
    for j in range(p_x):
        out[:, j, :, :, j] = f
    return out.view(nq, p_x * d, p_q * p_x)


def mol_tile_max_ref(query_components, query_gate, items, item_gate, w1, b1, w2, b2, tau,
                     block_n: int) -> torch.Tensor:
    """Torch reference (fp32): per (query, tile of ``block_n`` items) the largest phi.

    ``items`` [N, P_X, d] cached components; ``w1`` [H, L], ``w2`` [L, H] (nn.Linear
    layout). Blocked over items; never holds more than one block's [nq, block, L] logits."""
    nq, p_q, d = query_components.shape
    n, p_x, _ = items.shape
    qc = query_components.float().flatten(0, 1)
    n_tiles = (n + block_n - 1) // block_n
    out = torch.full((nq, n_tiles), float("-inf"), dtype=torch.float32, device=items.device)
    step = max(block_n, ((1 << 15) // max(1, nq)) // block_n * block_n)
    for a in range(0, n, step):
        b = min(n, a + step)
        logits = (qc @ items[a:b].float().flatten(0, 1).T).view(nq, p_q, b - a, p_x)
        logits = logits.permute(0, 2, 1, 3).reshape(nq, b - a, p_q * p_x) / tau
        hid = torch.nn.functional.silu(logits @ w1.float().T + b1.float())
        pair = hid @ w2.float().T + b2.float()
        z = torch.nn.functional.silu(query_gate.float()[:, None] * item_gate[a:b].float()[None] + pair)
        phi = (torch.softmax(z, -1) * logits).sum(-1)
        pad = (-(b - a)) % block_n
        phi = torch.nn.functional.pad(phi, (0, pad), value=float("-inf"))
        out[:, a // block_n : a // block_n + phi.shape[1] // block_n] = phi.view(nq, -1, block_n).amax(-1)
    return out


def mol_launch_config(nq: int, n_items: int, k_dim: int, n_pairs: int, hidden: int,
                      dtype: torch.dtype, device: DeviceSpec) -> dict:
    """Block sizes, warps and stages for a launch (pure: shapes and device properties)."""
    block_k = _next_pow2(k_dim)
    # The item tile stays in registers across the query loop: keep it <= 32 KiB.
    block_n = 64
    # Queries per launch: their block-diagonal matrices and gates ([K, L] + [L] each) take
    # at most a quarter of a 40 MB (A100) / 50 MB (H100, H200) L2, so they stay resident
    # while the launch walks the item tiles.
    elem = 4 if dtype == torch.float32 else 2
    per_query = k_dim * n_pairs * elem + n_pairs * 4
    query_chunk = max(1, min(max(1, nq), (10 << 20) // per_query))
    return {
        "QUERY_CHUNK": query_chunk,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "BLOCK_L": _next_pow2(n_pairs),
        "BLOCK_H": _next_pow2(hidden),
        "DOT_PRECISION": "tf32" if dtype == torch.float32 else "ieee",
        "num_warps": 4 if block_k <= 256 and n_pairs <= 32 else 8,
        "num_stages": 1,
    }


def _check(name, t, shape, dtypes, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {dtypes}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, items on {device}")


def mol_tile_max(query_components, query_gate, items, item_gate, w1, b1, w2, b2, tau: float,
                 *, block_n: int | None = None):
    """Per (query, tile) maximum MoL score; returns ``(tile_max [nq, n_tiles], block_n)``.

    ``query_components`` [nq, P_Q, d] (normalised), ``query_gate`` [nq, L], ``items``
    [N, P_X, d] cached components (bf16/fp16/fp32), ``item_gate`` [N, L], pair-MLP weights in
    nn.Linear layout. Runs the Triton kernel on CUDA (or under the interpreter), else the
    reference. Raises ValueError on inconsistent shapes, dtypes or devices.
    """
    if items.dim() != 3 or query_components.dim() != 3 or items.shape[2] != query_components.shape[2]:
        raise ValueError(f"items / query_components: component shapes {tuple(items.shape)} and "
                         f"{tuple(query_components.shape)} disagree")
    nq, p_q, d = query_components.shape
    n, p_x, _ = items.shape
    L = p_q * p_x
    H = w1.shape[0]
    dev = items.device
    if items.dtype not in _TRITON_DTYPE:
        raise ValueError(f"items: expected bf16, fp16 or fp32, got {items.dtype}")
    floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    _check("query_components", query_components, (nq, p_q, d), floats, dev)
    _check("query_gate", query_gate, (nq, L), floats, dev)
    _check("item_gate", item_gate, (n, L), floats, dev)
    _check("w1", w1, (H, L), floats, dev)
    _check("b1", b1, (H,), floats, dev)
    _check("w2", w2, (L, H), floats, dev)
    _check("b2", b2, (L,), floats, dev)
    if n == 0 or nq == 0:
        raise ValueError("items / query_components: empty")

    def reference(bn):
        return mol_tile_max_ref(query_components, query_gate, items, item_gate, w1, b1, w2, b2,
                                tau, bn)

    if not use_triton(items, query_components):
        bn = block_n or 64
        return reference(bn), bn
    from ._audit import device_spec

    spec = device_spec(dev) if dev.type == "cuda" else _INTERPRETER
    cfg = mol_launch_config(nq, n, p_x * d, L, H, items.dtype, spec)
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    bn = cfg["BLOCK_N"]
    n_tiles = (n + bn - 1) // bn

    # The interpreter mis-converts bf16 (numpy has none): it screens an fp32 copy instead.
    run_dtype = torch.float32 if (items.dtype == torch.bfloat16 and not items.is_cuda) else items.dtype
    if run_dtype != items.dtype:
        cfg["DOT_PRECISION"] = "ieee"

    def launch():
        qbd = block_diagonal_queries(query_components, p_x, run_dtype)
        qg = query_gate.float().contiguous()
        x = items.reshape(n, p_x * d).to(run_dtype).contiguous()
        ig = item_gate.float().contiguous()
        w1t = w1.T.to(torch.float16).contiguous()
        w2t = w2.T.to(torch.float16).contiguous()
        out = torch.empty(nq, n_tiles, dtype=torch.float32, device=dev)
        b1f, b2f = b1.float().contiguous(), b2.float().contiguous()
        chunk = max(1, min(cfg["QUERY_CHUNK"], (2**31 - 1) // n_tiles))  # 1-D grid < 2^31
        for a in range(0, nq, chunk):
            m = min(nq, a + chunk) - a
            _mol_tile_max_kernel[(m * n_tiles,)](
                qbd[a:], qg[a:], x, ig, w1t, b1f, w2t, b2f, out[a:],
                m, n, n_tiles, 1.0 / tau,
                qbd.stride(0), qbd.stride(1), qbd.stride(2),
                qg.stride(0), x.stride(0), ig.stride(0),
                K=p_x * d, L=L, H=H, BLOCK_K=cfg["BLOCK_K"], BLOCK_L=cfg["BLOCK_L"],
                BLOCK_H=cfg["BLOCK_H"], BLOCK_N=bn, DOT_PRECISION=cfg["DOT_PRECISION"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        if bool(torch.isnan(out).any()):  # a miscompiled screen must not drop tiles silently
            raise KernelFailure("_mol_tile_max_kernel produced NaN tile maxima")
        return out

    return launch_or_fallback("_mol_tile_max_kernel", launch, lambda: reference(bn)), bn


# The interpreter has no device: the launcher asks for the H100 configuration.
_INTERPRETER = DeviceSpec((9, 0), 132, 232448, "interpreter")

# Production shapes: the paper's MoL configurations (P_Q x P_X x d_P) with hidden 128.
_SHAPES = [(8, 4, 64), (8, 4, 128), (8, 8, 32), (4, 4, 64)]


def audit_cases(device: DeviceSpec) -> list[AuditCase]:
    """Each distinct configuration the launcher picks for production shapes on ``device``."""
    if triton is None:  # pragma: no cover
        return []
    cases = []
    for p_q, p_x, d_p in _SHAPES:
        L, H = p_q * p_x, 128
        for dtype in (torch.bfloat16, torch.float16):
            for nq in (1, 256):
                cfg = mol_launch_config(nq, 1 << 20, p_x * d_p, L, H, dtype, device)
                t = _TRITON_DTYPE[dtype]
                sig = {
                    "qbd_ptr": f"*{t}", "qgate_ptr": "*fp32", "items_ptr": f"*{t}", "igate_ptr": "*fp32",
                    "w1t_ptr": "*fp16", "b1_ptr": "*fp32", "w2t_ptr": "*fp16", "b2_ptr": "*fp32",
                    "out_ptr": "*fp32", "nq": "i32", "n_items": "i32", "n_tiles": "i32", "inv_tau": "fp32",
                    "stride_qb": "i32", "stride_qk": "i32", "stride_ql": "i32", "stride_gq": "i32",
                    "stride_xn": "i32", "stride_in": "i32",
                    "K": "constexpr", "L": "constexpr", "H": "constexpr", "BLOCK_K": "constexpr",
                    "BLOCK_L": "constexpr", "BLOCK_H": "constexpr", "BLOCK_N": "constexpr",
                    "DOT_PRECISION": "constexpr",
                }
                constexprs = {"K": p_x * d_p, "L": L, "H": H, **{
                    key: cfg[key] for key in ("BLOCK_K", "BLOCK_L", "BLOCK_H", "BLOCK_N", "DOT_PRECISION")}}
                config = (f"{t} K{p_x * d_p} L{L} H{H} BN{cfg['BLOCK_N']} "
                          f"w{cfg['num_warps']} s{cfg['num_stages']}")
                cases.append(AuditCase(_mol_tile_max_kernel, sig, constexprs, cfg["num_warps"],
                                       cfg["num_stages"], config, matrix=True,
                                       shapes=f"{p_q}x{p_x}x{d_p} nq={nq}"))
    return dedupe(cases)
