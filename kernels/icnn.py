"""Fused input-convex (ICNN) layer: forward, input gradient and parameter gradients.

Maths (one layer of a SupportNet, batch of M rows)::

    pre = z @ softplus(w_free).T + q @ a.T + bias        # [M, N]
    out = act(pre)                                       # [M, N]

- ``z`` [M, K] is the previous layer's output (absent for the first layer), ``w_free``
  [N, K] the free parameter of the hidden-to-hidden weights; the weights actually used are
  ``softplus(w_free) > 0``, applied as the tile is loaded (no positive copy is stored).
- ``q`` [M, D] is the query, re-injected through the unconstrained ``a`` [N, D] (optional).
- ``bias`` [N] is optional.
- ``act`` is convex and non-decreasing, so every layer keeps convexity in ``q``:
  ``softleaky``: ``s*x + (1-s)*softplus(beta*x)/beta``; ``leaky``: ``s*x + (1-s)*relu(x)``
  (1-homogeneous); ``none``: identity (output layer).

Backward, given ``g = dL/d out`` [M, N], with ``gpre = g * act'(pre)``::

    dL/dz      = gpre @ softplus(w_free)                  # [M, K]
    dL/dq      = gpre @ a                                 # [M, D]   (key recovery)
    dL/dw_free = (gpre.T @ z) * sigmoid(w_free)           # [N, K]
    dL/da      = gpre.T @ q,   dL/dbias = gpre.sum(0)

``gpre`` is formed on the fly from ``g`` and the saved ``pre`` inside each GEMM's loads.
Training on a loss of the key ``grad_q f`` needs the parameter gradient of that gradient
(double backward). :class:`ICNNLayerFunction`'s backward is itself a differentiable
:class:`ICNNLayerBackward` whose forward runs the Triton backward kernels and whose own
backward (second order) is a handful of analytic torch GEMMs on the saved pre-activation:
with ``G`` the cotangent reaching ``gpre``, ``d/dg = G * act'(pre)``, and
``G * g * act''(pre)`` flows into ``pre`` like an ordinary layer gradient, plus the direct
terms of each first-order output. No layer is recomputed.

Shapes and dtypes: fp32 or bf16 activations (bf16 on GPU only), fp32 parameters, fp32
accumulation. No ties: this op is a dense GEMM.

Precision (a deliberate choice, :func:`icnn_precision`): every GEMM of a layer, forward and
backward, multiplies in the precision the activations ask for:

- bf16 activations (the training loop's default on CUDA, bf16 autocast): bf16 tensor-core
  products with fp32 accumulation, in the forward and in both backward GEMMs (``gpre`` and
  the weights are rounded to bf16 as loaded, as torch's autocast does for its matmuls).
- fp32 activations follow torch's own switch for fp32 matmuls,
  ``torch.backends.cuda.matmul.allow_tf32``: tf32 tensor cores when it is on
  (``torch.set_float32_matmul_precision("high")``), otherwise exact fp32 (``ieee``, FMA
  units, no tensor cores). Torch leaves the switch off by default, so fp32 training
  (``amips train --no-bf16``) computes what the same model in plain torch computes; it is
  the exact path, chosen on purpose, and it is slower than tf32 (the user who wants speed
  keeps bf16 autocast or turns tf32 on). The ``ieee`` tiles are sized so they do not
  spill (audited).

Launch configuration: :func:`icnn_launch_config` is a pure function of the GEMM's shape,
precision and the device's properties; the launchers call it on CUDA and ``audit_cases``
walks the production shapes (widths 256..2048, batch 4096) through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._audit import AuditCase, DeviceSpec, dedupe, device_spec
from ._backend import launch_or_fallback, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None
    tl = None

ACTIVATIONS = {"none": 0, "softleaky": 1, "leaky": 2}


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _softplus(x):
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _act_grad(pre, ACT: tl.constexpr, slope, beta):
        if ACT == 1:
            sig = 1.0 / (1.0 + tl.exp(-beta * pre))
            d = slope + (1.0 - slope) * sig
        elif ACT == 2:
            d = tl.where(pre > 0, 1.0, slope)
        else:
            d = tl.full(pre.shape, 1.0, tl.float32)
        return d

    @triton.jit
    def _mma(a, b, PRECISION: tl.constexpr):
        # "bf16": tensor-core bf16 product (operands rounded as loaded), fp32 accumulation;
        # "tf32"/"ieee": fp32 operands at that input precision.
        if PRECISION == "bf16":
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _icnn_fwd_kernel(
        z_ptr, w_ptr, q_ptr, a_ptr, b_ptr, pre_ptr, out_ptr,
        M, N, K, D,
        stride_zm, stride_zk, stride_wn, stride_wk,
        stride_qm, stride_qd, stride_an, stride_ad,
        stride_om, stride_on,
        slope, beta,
        HAS_Z: tl.constexpr, HAS_Q: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr, SAVE_PRE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        rows = offs_m.to(tl.int64)
        cols = offs_n.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_Z:
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                zt = tl.load(
                    z_ptr + rows[:, None] * stride_zm + offs_k[None, :] * stride_zk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0,
                )
                wt = tl.load(
                    w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0,
                ).to(tl.float32)
                # positivity applied as loaded; masked entries must stay exactly zero
                wt = tl.where(mask_n[None, :] & mask_k[:, None], _softplus(wt), 0.0)
                acc += _mma(zt, wt.to(zt.dtype), PRECISION)
        if HAS_Q:
            for d0 in range(0, D, BLOCK_K):
                offs_d = d0 + tl.arange(0, BLOCK_K)
                mask_d = offs_d < D
                qt = tl.load(
                    q_ptr + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0,
                )
                at = tl.load(
                    a_ptr + cols[None, :] * stride_an + offs_d[:, None] * stride_ad,
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0,
                )
                acc += _mma(qt, at.to(qt.dtype), PRECISION)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :]
        out_offs = rows[:, None] * stride_om + cols[None, :] * stride_on
        mask_mn = mask_m[:, None] & mask_n[None, :]
        if SAVE_PRE:
            tl.store(pre_ptr + out_offs, acc, mask=mask_mn)
        if ACT == 1:
            bx = beta * acc
            y = slope * acc + (1.0 - slope) * _softplus(bx) / beta
        elif ACT == 2:
            y = tl.where(acc > 0, acc, slope * acc)
        else:
            y = acc
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask_mn)

    @triton.jit
    def _icnn_bwd_input_kernel(
        g_ptr, pre_ptr, w_ptr, dx_ptr,
        M, N, K,
        stride_gm, stride_gn, stride_wn, stride_wk, stride_xm, stride_xk,
        slope, beta,
        ACT: tl.constexpr, POSITIVE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # dx[M, K] = (g * act'(pre))[M, N] @ W[N, K], W = softplus(w_free) when POSITIVE
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_k = offs_k < K
        rows = offs_m.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask_mn = mask_m[:, None] & mask_n[None, :]
            gofs = rows[:, None] * stride_gm + offs_n[None, :].to(tl.int64) * stride_gn
            gt = tl.load(g_ptr + gofs, mask=mask_mn, other=0.0).to(tl.float32)
            pt = tl.load(pre_ptr + gofs, mask=mask_mn, other=0.0).to(tl.float32)
            gpre = gt * _act_grad(pt, ACT, slope, beta)
            wt = tl.load(
                w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0,
            ).to(tl.float32)
            if POSITIVE:
                wt = tl.where(mask_n[:, None] & mask_k[None, :], _softplus(wt), 0.0)
            acc += _mma(gpre, wt, PRECISION)
        tl.store(
            dx_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :],
        )

    @triton.jit
    def _icnn_bwd_weight_kernel(
        g_ptr, pre_ptr, x_ptr, w_ptr, dw_ptr,
        M, N, K,
        stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk,
        stride_dn, stride_dk,
        slope, beta,
        ACT: tl.constexpr, POSITIVE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # dW[N, K] = (g * act'(pre)).T @ x, times sigmoid(w_free) when POSITIVE
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask_k = offs_k < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            rows = offs_m.to(tl.int64)
            # gpre loaded transposed: [BLOCK_N, BLOCK_M]
            gofs = rows[None, :] * stride_gm + offs_n[:, None].to(tl.int64) * stride_gn
            mask_nm = mask_n[:, None] & mask_m[None, :]
            gt = tl.load(g_ptr + gofs, mask=mask_nm, other=0.0).to(tl.float32)
            pt = tl.load(pre_ptr + gofs, mask=mask_nm, other=0.0).to(tl.float32)
            gpre = gt * _act_grad(pt, ACT, slope, beta)
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            ).to(tl.float32)
            acc += _mma(gpre, xt, PRECISION)
        mask_nk = mask_n[:, None] & mask_k[None, :]
        if POSITIVE:
            wt = tl.load(
                w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask_nk, other=0.0,
            ).to(tl.float32)
            acc = acc / (1.0 + tl.exp(-wt))
        tl.store(
            dw_ptr + offs_n[:, None].to(tl.int64) * stride_dn + offs_k[None, :] * stride_dk,
            acc, mask=mask_nk,
        )


# --------------------------------------------------------------------------------------
# torch reference (CPU fallback and oracle)
# --------------------------------------------------------------------------------------
def activation_ref(pre: torch.Tensor, act: str, slope: float, beta: float) -> torch.Tensor:
    if act == "softleaky":
        return slope * pre + (1.0 - slope) * F.softplus(beta * pre) / beta
    if act == "leaky":
        return torch.where(pre > 0, pre, slope * pre)
    return pre


def icnn_layer_ref(
    z: torch.Tensor | None,
    q: torch.Tensor | None,
    w_free: torch.Tensor | None,
    a: torch.Tensor | None,
    bias: torch.Tensor | None,
    act: str = "softleaky",
    slope: float = 0.1,
    beta: float = 1.0,
) -> torch.Tensor:
    """Plain torch ICNN layer (differentiable to any order)."""
    pre = None
    if z is not None:
        pre = z @ F.softplus(w_free).to(z.dtype).T
    if q is not None:
        inj = q @ a.to(q.dtype).T
        pre = inj if pre is None else pre + inj
    if bias is not None:
        pre = pre + bias.to(pre.dtype)
    return activation_ref(pre, act, slope, beta)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def icnn_precision(dtype: torch.dtype, on_cuda: bool, allow_tf32: bool | None = None) -> str:
    """The product precision of a layer's GEMMs (see "Precision" in the module docstring):
    ``"bf16"`` for bf16 activations, ``"tf32"`` for fp32 on CUDA when torch allows tf32
    matmuls, else ``"ieee"`` (exact fp32; always under the interpreter)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if (on_cuda and dtype == torch.float32 and allow_tf32) else "ieee"


def icnn_launch_config(kind: str, m: int, n: int, k: int, precision: str,
                       device: DeviceSpec) -> dict:
    """Block sizes, warps and stages of one ICNN GEMM on ``device`` (pure; audited).

    ``kind`` names the kernel and the shapes its GEMM sees: ``"fwd"``: out [m, n] reduced
    over k (and over the query width, in the same blocks); ``"bwd_input"``: dx [m, k] =
    gpre [m, n] @ W [n, k], reduced over n; ``"bwd_weight"``: dW [n, k] = gpre.T @ x,
    reduced over m. Exact fp32 (``ieee``) runs on FMA units: 64 x 64 tiles with a 16-deep
    reduction step and 8 warps hold the operands in registers without spilling (the
    32-deep step used before spilled 159-232 registers). Tensor cores: 64-row tiles with one
    warpgroup (4 warps; Hopper wgmma needs 64 rows), 128 columns on Hopper and 64 on Ampere
    (a 128 x 128 tf32 tile spills there), the column block shrunk to the output's width
    (>= 16); the reduction step is 32 (a 64-deep bf16 step spills on Hopper: the fp32
    ``g * act'(pre)`` operand of the backward and the softplus of the weights are formed in
    registers); 3 pipeline stages. At batch 4096 a 64-row tile gives 64 x cols/128 programs: 128 at width 256
    (4 of 132 SMs idle on an H100), 256 and more from width 512.
    """
    if kind not in ("fwd", "bwd_input", "bwd_weight"):
        raise ValueError(f"kind: expected 'fwd', 'bwd_input' or 'bwd_weight', got {kind!r}")
    if precision not in ("ieee", "tf32", "bf16"):
        raise ValueError(f"precision: expected 'ieee', 'tf32' or 'bf16', got {precision!r}")
    # output tile (rows, cols) and reduction length of the GEMM, in the kernel's own terms
    rows, cols, red = {"fwd": (m, n, k), "bwd_input": (m, k, n), "bwd_weight": (n, k, m)}[kind]
    if precision == "ieee":
        br, bc, bs, warps, stages = 64, 64, 16, 8, 2
    else:
        br, bc = 64, (128 if device.capability[0] >= 9 else 64)
        bs, warps, stages = 32, 4, 3
    bc = min(bc, max(16, triton.next_power_of_2(cols)))
    bs = min(bs, max(16, triton.next_power_of_2(red)))
    blocks = {"fwd": (br, bc, bs), "bwd_input": (br, bs, bc), "bwd_weight": (bs, br, bc)}[kind]
    return {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "BLOCK_K": blocks[2],
            "num_warps": warps, "num_stages": stages}


def _config(kind, m, n, k, ref: torch.Tensor, precision: str) -> dict:
    if ref.is_cuda:
        return icnn_launch_config(kind, m, n, k, precision, device_spec(ref.device))
    # interpreter (CPU tests): small tiles keep it fast; >= 16 as a GPU requires
    return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


def icnn_layer_forward(z, q, w_free, a, bias, act, slope, beta, save_pre=True):
    """Triton forward: returns (pre fp32 or None, out in the activations' dtype)."""
    ref = z if z is not None else q
    M = ref.shape[0]
    N = (w_free if w_free is not None else a).shape[0]
    K = z.shape[1] if z is not None else 0
    D = q.shape[1] if q is not None else 0
    out = torch.empty((M, N), device=ref.device, dtype=ref.dtype)
    pre = torch.empty((M, N), device=ref.device, dtype=torch.float32) if save_pre else out
    dummy = out
    zz = z if z is not None else dummy
    ww = w_free if w_free is not None else dummy
    qq = q if q is not None else dummy
    aa = a if a is not None else dummy
    bb = bias if bias is not None else dummy
    precision = icnn_precision(ref.dtype, ref.is_cuda)
    cfg = _config("fwd", M, N, max(K, D), ref, precision)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))

    def launch():
        _icnn_fwd_kernel[grid](
            zz, ww, qq, aa, bb, pre, out,
            M, N, K, D,
            zz.stride(0), zz.stride(1), ww.stride(0), ww.stride(1),
            qq.stride(0), qq.stride(1), aa.stride(0), aa.stride(1),
            out.stride(0), out.stride(1),
            float(slope), float(beta),
            HAS_Z=z is not None, HAS_Q=q is not None, HAS_BIAS=bias is not None,
            ACT=ACTIVATIONS[act], SAVE_PRE=save_pre, PRECISION=precision, **cfg,
        )
        return (pre if save_pre else None), out

    def fallback():
        with torch.no_grad():
            p = None
            if z is not None:
                p = z.float() @ F.softplus(w_free.float()).T
            if q is not None:
                inj = q.float() @ a.float().T
                p = inj if p is None else p + inj
            if bias is not None:
                p = p + bias.float()
            out.copy_(activation_ref(p, act, slope, beta))
        return (p if save_pre else None), out

    return launch_or_fallback("_icnn_fwd_kernel", launch, fallback)


def _bwd_input(g, pre, w, positive, act, slope, beta, out_dtype):
    M, N = g.shape
    K = w.shape[1]
    dx = torch.empty((M, K), device=g.device, dtype=out_dtype)
    precision = icnn_precision(out_dtype if out_dtype == torch.bfloat16 else g.dtype, g.is_cuda)
    cfg = _config("bwd_input", M, N, K, g, precision)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))

    def launch():
        _icnn_bwd_input_kernel[grid](
            g, pre, w, dx, M, N, K,
            g.stride(0), g.stride(1), w.stride(0), w.stride(1), dx.stride(0), dx.stride(1),
            float(slope), float(beta),
            ACT=ACTIVATIONS[act], POSITIVE=positive, PRECISION=precision, **cfg,
        )
        return dx

    def fallback():
        gpre = g.float() * _act_grad_ref(pre, act, slope, beta)
        wt = F.softplus(w.float()) if positive else w.float()
        return dx.copy_(gpre @ wt)

    return launch_or_fallback("_icnn_bwd_input_kernel", launch, fallback)


def _bwd_weight(g, pre, x, w, positive, act, slope, beta):
    M, N = g.shape
    K = x.shape[1]
    dw = torch.empty((N, K), device=g.device, dtype=torch.float32)
    precision = icnn_precision(x.dtype if x.dtype == torch.bfloat16 else g.dtype, g.is_cuda)
    cfg = _config("bwd_weight", M, N, K, g, precision)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))

    def launch():
        _icnn_bwd_weight_kernel[grid](
            g, pre, x, w, dw, M, N, K,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            dw.stride(0), dw.stride(1),
            float(slope), float(beta),
            ACT=ACTIVATIONS[act], POSITIVE=positive, PRECISION=precision, **cfg,
        )
        return dw

    def fallback():
        gpre = g.float() * _act_grad_ref(pre, act, slope, beta)
        d = gpre.T @ x.float()
        return dw.copy_(d * torch.sigmoid(w.float()) if positive else d)

    return launch_or_fallback("_icnn_bwd_weight_kernel", launch, fallback)


# --------------------------------------------------------------------------------------
# compile audit: the production shapes walked through icnn_launch_config
# --------------------------------------------------------------------------------------
_AUDIT_WIDTHS = (256, 512, 1024, 2048)
_AUDIT_BATCH = 4096
_AUDIT_D = 384
_AUDIT_HEADS = (1, 1024)
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}


def _audit_case(kernel, kind, m, n, k, precision, act_dtype, flags, args, device, shapes):
    cfg = icnn_launch_config(kind, m, n, k, precision, device)
    fn = getattr(kernel, "fn", kernel)
    act_ptr = _PTR[act_dtype]
    act_args = {"_icnn_fwd_kernel": ("z_ptr", "q_ptr", "out_ptr"),
                "_icnn_bwd_input_kernel": ("g_ptr", "dx_ptr"),
                "_icnn_bwd_weight_kernel": ("g_ptr", "x_ptr")}[fn.__name__]
    constexprs = dict(flags, PRECISION=precision,
                      **{b: cfg[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")})
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = act_ptr if name in act_args else "*fp32"
        elif name in ("slope", "beta"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    # the tile: what decides registers and shared memory (1 = a dimension Triton specialises)
    tile = (f"{kind},{precision},{str(act_dtype).replace('torch.', '')},"
            f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']},w{cfg['num_warps']},"
            f"s{cfg['num_stages']}" + (",n=1" if args.get("N") == 1 else ""))
    config = tile + "," + ",".join(f"{f}={int(v)}" for f, v in flags.items())
    # integer values as at run time: Triton specialises 1 (a constant) and multiples of 16
    return tile, AuditCase(kernel, sig, constexprs, cfg["num_warps"], cfg["num_stages"], config,
                           matrix=True, exact_fp32=precision == "ieee", shapes=shapes,
                           extra={"args": args})


def audit_cases(device: DeviceSpec) -> list[AuditCase]:
    """The ICNN kernel tiles that SupportNet training launches at batch 4096, widths
    256..2048, d 384, 1 or 1024 heads, for what the training loop feeds: bf16 autocast (its
    CUDA default, ``bf16``), fp32 with torch's default (``ieee``) and fp32 with tf32
    allowed (``tf32``). Every distinct tile (block sizes, warps, stages, dtype, precision,
    a dimension specialised to 1) is compiled once, with the heaviest layer that uses it:
    hidden layers (previous layer + query re-injection, softleaky, bias) come first, so
    their softplus epilogue represents the lighter input/output layers and the leaky
    (``--homogeneous``) variant of the same tile; the shapes note lists every layer."""
    if triton is None:
        return []
    m, d = _AUDIT_BATCH, _AUDIT_D
    tiles: dict[str, AuditCase] = {}
    notes: dict[str, list[str]] = {}

    def add(tile_case, note):
        tile, case = tile_case
        if tile not in tiles:
            tiles[tile] = case
            notes[tile] = []
        notes[tile].append(note)

    variants = [(torch.bfloat16, "bf16"), (torch.float32, "ieee"), (torch.float32, "tf32")]
    for act_dtype, prec in variants:
        for w in _AUDIT_WIDTHS:
            layers = [  # (name, N, K, HAS_Z, ACT); hidden first: the heaviest epilogue
                ("hidden", w, w, True, 1), ("input", w, 0, False, 1),
            ] + [(f"output({h} heads)", h, w, True, 0) for h in _AUDIT_HEADS]
            for name, n, k, has_z, act in layers:
                note = f"{name} w{w}"
                flags = {"HAS_Z": has_z, "HAS_Q": True, "HAS_BIAS": True, "ACT": act,
                         "SAVE_PRE": True}
                args = {"M": m, "N": n, "K": k, "D": d, "stride_zm": k, "stride_zk": 1,
                        "stride_wn": k, "stride_wk": 1, "stride_qm": d, "stride_qd": 1,
                        "stride_an": d, "stride_ad": 1, "stride_om": n, "stride_on": 1}
                if not has_z:  # a dummy tensor stands in for z and w_free
                    args.update(K=0, stride_zm=n, stride_wn=n)
                add(_audit_case(_icnn_fwd_kernel, "fwd", m, n, max(k, d), prec, act_dtype,
                                flags, args, device, note), note)
                # backward: dz (positive weights, softplus) before dq (injection weights)
                for pos, kk in ((True, k), (False, d)):
                    if pos and not has_z:
                        continue
                    flags_b = {"ACT": act, "POSITIVE": pos}
                    args_b = {"M": m, "N": n, "K": kk, "stride_gm": n, "stride_gn": 1,
                              "stride_wn": kk, "stride_wk": 1, "stride_xm": kk, "stride_xk": 1}
                    add(_audit_case(_icnn_bwd_input_kernel, "bwd_input", m, n, kk, prec,
                                    act_dtype, flags_b, args_b, device, note), note)
                    args_w = {"M": m, "N": n, "K": kk, "stride_gm": n, "stride_gn": 1,
                              "stride_xm": kk, "stride_xk": 1, "stride_wn": kk, "stride_wk": 1,
                              "stride_dn": kk, "stride_dk": 1}
                    add(_audit_case(_icnn_bwd_weight_kernel, "bwd_weight", m, n, kk, prec,
                                    act_dtype, flags_b, args_w, device, note), note)
    out = []
    for tile, c in tiles.items():
        seen = list(dict.fromkeys(notes[tile]))
        shapes = f"batch {m}, d {d}: " + ", ".join(seen[:8]) + (" ..." if len(seen) > 8 else "")
        out.append(AuditCase(c.kernel, c.signature, c.constexprs, c.num_warps, c.num_stages,
                             c.config, c.matrix, c.exact_fp32, shapes, c.extra))
    return dedupe(out)


def _act_grad_ref(pre, act, slope, beta):
    if act == "softleaky":
        return slope + (1.0 - slope) * torch.sigmoid(beta * pre)
    if act == "leaky":
        return torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, slope))
    return torch.ones_like(pre)


def _act_grad2_ref(pre, act, slope, beta):
    """act''(pre), or None where it vanishes (piecewise-linear activations)."""
    if act == "softleaky":
        sig = torch.sigmoid(beta * pre)
        return (1.0 - slope) * beta * sig * (1.0 - sig)
    return None


class ICNNLayerBackward(torch.autograd.Function):
    """First-order gradients of one layer (Triton); its own backward (second order, for a
    loss on the key) is analytic torch GEMMs on the saved pre-activation."""

    @staticmethod
    def forward(ctx, g, pre, z, q, w_free, a, bias, act, slope, beta):
        g = g.contiguous()
        ctx.save_for_backward(g, pre, z, q, w_free, a, bias)
        ctx.cfg = (act, slope, beta)
        dz = _bwd_input(g, pre, w_free, True, act, slope, beta, z.dtype) if z is not None else None
        dq = _bwd_input(g, pre, a, False, act, slope, beta, q.dtype) if q is not None else None
        dw = _bwd_weight(g, pre, z, w_free, True, act, slope, beta) if z is not None else None
        da = _bwd_weight(g, pre, q, a, False, act, slope, beta) if q is not None else None
        db = None
        if bias is not None:
            db = (g.float() * _act_grad_ref(pre, act, slope, beta)).sum(0)
        return dz, dq, dw, da, db

    @staticmethod
    @once_differentiable
    def backward(ctx, u_z, u_q, u_w, u_a, u_b):
        # Second order, analytically, from the saved pre-activation (no recomputation).
        # With gpre = g * act'(pre) and G the cotangent reaching gpre:
        #   G = u_z Wp^T + u_q A^T + z (u_w * sig)^T + q u_a^T + u_b
        #   d/dg = G * act'(pre);  via act'(pre): Gpre = G * g * act''(pre) flows into
        #   pre = z Wp^T + q A^T + b like an ordinary layer gradient;
        #   plus the direct terms of dz = gpre Wp, dq = gpre A, dW = (gpre^T z) * sig, dA = gpre^T q.
        g, pre, z, q, w_free, a, bias = ctx.saved_tensors
        act, slope, beta = ctx.cfg
        g32 = g.float()
        d1 = _act_grad_ref(pre, act, slope, beta)
        gpre = g32 * d1
        wp = F.softplus(w_free.float()) if w_free is not None else None
        sig = torch.sigmoid(w_free.float()) if w_free is not None else None
        z32 = z.float() if z is not None else None
        q32 = q.float() if q is not None else None
        a32 = a.float() if a is not None else None
        terms_g = []
        if u_z is not None:
            terms_g.append(u_z.float() @ wp.T)
        if u_q is not None:
            terms_g.append(u_q.float() @ a32.T)
        if u_w is not None:
            terms_g.append(z32 @ (u_w.float() * sig).T)
        if u_a is not None:
            terms_g.append(q32 @ u_a.float().T)
        if u_b is not None:
            terms_g.append(u_b.float()[None, :].expand_as(gpre))
        gg = gz = gq = gw = ga = gb = None

        def add(x, y):
            return y if x is None else x + y

        if terms_g:
            G = terms_g[0]
            for t in terms_g[1:]:
                G = G + t
            gg = (G * d1).to(g.dtype)
            d2 = _act_grad2_ref(pre, act, slope, beta)
            if d2 is not None:
                gp = G * g32 * d2
                if z is not None:
                    gz = add(gz, gp @ wp)
                    gw = add(gw, (gp.T @ z32) * sig)
                if q is not None:
                    gq = add(gq, gp @ a32)
                    ga = add(ga, gp.T @ q32)
                if bias is not None:
                    gb = add(gb, gp.sum(0))
        if u_z is not None:
            gw = add(gw, (gpre.T @ u_z.float()) * sig)
        if u_q is not None:
            ga = add(ga, gpre.T @ u_q.float())
        if u_w is not None:
            uws = u_w.float() * sig
            gz = add(gz, gpre @ uws)
            gw = add(gw, (gpre.T @ z32) * uws * (1.0 - sig))
        if u_a is not None:
            gq = add(gq, gpre @ u_a.float())

        def cast(x, like):
            return None if x is None or like is None else x.to(like.dtype)

        return (gg, None, cast(gz, z), cast(gq, q), cast(gw, w_free), cast(ga, a), cast(gb, bias),
                None, None, None)


class ICNNLayerFunction(torch.autograd.Function):
    """One fused ICNN layer (Triton forward, Triton backward, double-backward capable)."""

    @staticmethod
    def forward(ctx, z, q, w_free, a, bias, act, slope, beta):
        pre, out = icnn_layer_forward(z, q, w_free, a, bias, act, slope, beta, save_pre=True)
        ctx.save_for_backward(pre, z, q, w_free, a, bias)
        ctx.cfg = (act, slope, beta)
        return out

    @staticmethod
    def backward(ctx, g):
        pre, z, q, w_free, a, bias = ctx.saved_tensors
        act, slope, beta = ctx.cfg
        dz, dq, dw, da, db = ICNNLayerBackward.apply(g, pre, z, q, w_free, a, bias, act, slope, beta)
        return dz, dq, dw, da, db, None, None, None


def _autocast_on_cuda() -> bool:
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled()


def _autocast_dtype_cuda() -> torch.dtype:
    try:
        return torch.get_autocast_dtype("cuda")
    except AttributeError:  # older torch
        return torch.get_autocast_gpu_dtype()


def _check(t, name, dim=None, ref=None):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected {dim}-D, got shape {tuple(t.shape)}")
    if ref is not None and t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, expected {ref.device}")


def icnn_layer(
    z: torch.Tensor | None,
    q: torch.Tensor | None,
    w_free: torch.Tensor | None,
    a: torch.Tensor | None,
    bias: torch.Tensor | None,
    act: str = "softleaky",
    slope: float = 0.1,
    beta: float = 1.0,
) -> torch.Tensor:
    """One ICNN layer ``act(z @ softplus(w_free).T + q @ a.T + bias)``; see the module docstring.

    Runs the fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``) for fp32/bf16
    inputs, the torch reference otherwise (fp64 always takes the reference).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act: expected one of {sorted(ACTIVATIONS)}, got {act!r}")
    if z is None and q is None:
        raise ValueError("icnn_layer: needs z, q or both")
    if (z is None) != (w_free is None):
        raise ValueError("w_free: must be given exactly when z is given")
    if (q is None) != (a is None):
        raise ValueError("a: must be given exactly when q is given")
    ref = z if z is not None else q
    for t, n, dim in ((z, "z", 2), (q, "q", 2), (w_free, "w_free", 2), (a, "a", 2), (bias, "bias", 1)):
        _check(t, n, dim, ref)
    if z is not None and w_free.shape[1] != z.shape[1]:
        raise ValueError(f"w_free: shape {tuple(w_free.shape)} does not match z {tuple(z.shape)}")
    if q is not None and a.shape[1] != q.shape[1]:
        raise ValueError(f"a: shape {tuple(a.shape)} does not match q {tuple(q.shape)}")
    if z is not None and q is not None:
        if z.shape[0] != q.shape[0]:
            raise ValueError(f"z and q: row counts differ ({z.shape[0]} vs {q.shape[0]})")
        if a.shape[0] != w_free.shape[0]:
            raise ValueError("a and w_free: output widths differ")
    n_out = (w_free if w_free is not None else a).shape[0]
    if bias is not None and bias.shape[0] != n_out:
        raise ValueError(f"bias: expected {n_out} entries, got {bias.shape[0]}")
    tensors = [t for t in (z, q, w_free, a, bias) if t is not None]
    if ref.dtype == torch.float64 or not use_triton(*tensors):
        return icnn_layer_ref(z, q, w_free, a, bias, act, slope, beta)
    if ref.is_cuda and _autocast_on_cuda():
        dt = _autocast_dtype_cuda()
        z = z.to(dt) if z is not None else None
        q = q.to(dt) if q is not None else None
    with torch.autocast(device_type=ref.device.type, enabled=False):
        z = z.contiguous() if z is not None else None
        q = q.contiguous() if q is not None else None
        return ICNNLayerFunction.apply(z, q, w_free, a, bias, act, float(slope), float(beta))
