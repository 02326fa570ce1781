"""Product-quantization lookup-table (LUT) scan fused with a running top-k.

Maths. A key at position ``i`` is stored as M codes ``code[i, m]`` (K = 16 or 256 codewords
per subspace). For a query ``q`` split into M sub-vectors, the lookup table is

    lut[q, m, c] = <q_m, codebook[m, c]>                        (``pq_lut``)

and the approximate score of key ``i`` in a probed list ``l = probe_lists[q, p]`` is

    score(q, i) = scale[q] * sum_m lut[q, m, code[i, m]] + bias[q, p]

(``bias`` carries ``<q, centroid_l>`` when codes encode residuals to the IVF centroid, and
the offset of a quantized LUT; ``scale`` is 1 for a float LUT).

Shapes and dtypes.
- ``lut``: [nq, M, K] float32, float16, or uint8 (a quantized LUT from ``quantize_lut``;
  values are summed exactly as float32, integers stay exact below 2^24).
- ``codes``: [n, W] uint8. 8-bit codes: W = M, one byte per subspace. 4-bit codes: W =
  ceil(M / 2), byte j holds subspace 2j in its low nibble and 2j+1 in its high nibble
  (``pack_codes``); with odd M the last high nibble is padding and scores nothing.
- ``list_offsets``: [L+1] int64, list l owns rows ``list_offsets[l]:list_offsets[l+1]``.
- ``probe_lists``: [nq, nprobe] int64 list ids, -1 = no list.
- ``bias``: [nq, nprobe] float32; ``scale``: [nq] float32.
- Output: ``scores`` [nq, k] float32 descending, ``positions`` [nq, k] int64 rows of
  ``codes`` (-1 and -inf where fewer than k candidates exist).

Accumulation: float32. Tie rule: equal scores are ordered by lower position first (scores
and positions are packed into one order-preserving int64 key, score in the high 32 bits,
``2^32 - 1 - position`` in the low 32, so a single integer top-k decides both). The two
backends sum in different orders, so scores may differ in the last bits.

Triton kernel: one program per (query, probe, split); it walks blocks of BLOCK_N rows of its
list, loads a [BLOCK_N, BLOCK_W] tile of code bytes, gathers LUT entries, sums, and merges the
block into a running top-BLOCK_N held in registers (bitonic merge: the elementwise max of a
descending and an ascending sorted list holds the top half of their union; blocks with
nothing above the current k-th best skip the merge). Only
BLOCK_N >= k candidates per program are written, never all scores; a torch ``topk`` over the
programs' candidates finishes the merge. The torch reference (CPU fallback and oracle) uses a
byte-indexed table (pairs of 4-bit subspaces fused into 256 entries) and the same key packing.

``pq_reorder`` re-scores candidate positions exactly against stored keys.
"""

from __future__ import annotations

import math

import torch

from ._audit import AuditCase, DeviceSpec, dedupe, device_spec
from ._backend import launch_or_fallback, use_triton

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None

_INT64_MIN = -(1 << 63)
_LOW_MASK = (1 << 32) - 1
# Above 256 candidates the running top-k no longer fits one program's registers without
# spilling on every audited Triton/GPU (512- and 1024-wide sorts); the torch path takes over.
MAX_TRITON_K = 256


# ---------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _pq_scan_kernel(
        lut_ptr, codes_ptr, offsets_ptr, probes_ptr, bias_ptr, scale_ptr, out_ptr,
        nprobe, n_bytes, n_split,
        stride_lq, stride_pq, stride_bq,
        N_CODEWORDS: tl.constexpr, FOUR_BIT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_p = tl.program_id(1)
        pid_s = tl.program_id(2)
        list_id = tl.load(probes_ptr + pid_q.to(tl.int64) * stride_pq + pid_p)
        valid = list_id >= 0
        safe_id = tl.where(valid, list_id, 0)
        start = tl.load(offsets_ptr + safe_id)
        end = tl.load(offsets_ptr + safe_id + 1)
        end = tl.where(valid, end, start)
        bias = tl.load(bias_ptr + pid_q.to(tl.int64) * stride_bq + pid_p)
        scale = tl.load(scale_ptr + pid_q)
        lut_base = lut_ptr + pid_q.to(tl.int64) * stride_lq

        offs_n = tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_W)
        sentinel = tl.full([BLOCK_N], -9223372036854775808, tl.int64)
        top = sentinel
        for row0 in range(start + pid_s * BLOCK_N, end, n_split * BLOCK_N):
            rows = row0 + offs_n
            rmask = rows < end
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for w0 in range(0, n_bytes, BLOCK_W):
                cols = w0 + offs_w
                cmask = cols < n_bytes
                mask = rmask[:, None] & cmask[None, :]
                byte = tl.load(codes_ptr + rows.to(tl.int64)[:, None] * n_bytes + cols[None, :],
                               mask=mask, other=0).to(tl.int32)
                if FOUR_BIT:
                    lo = byte & 15
                    hi = (byte >> 4) & 15
                    v = tl.load(lut_base + (2 * cols[None, :]) * 16 + lo, mask=mask, other=0)
                    v2 = tl.load(lut_base + (2 * cols[None, :] + 1) * 16 + hi, mask=mask,
                                 other=0)
                    acc += tl.sum(v.to(tl.float32) + v2.to(tl.float32), axis=1)
                else:
                    v = tl.load(lut_base + cols[None, :] * N_CODEWORDS + byte, mask=mask,
                                other=0)
                    acc += tl.sum(v.to(tl.float32), axis=1)
            score = acc * scale + bias
            bits = score.to(tl.int32, bitcast=True)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            key = (ordered.to(tl.int64) << 32) + (4294967295 - rows.to(tl.int64))
            key = tl.where(rmask, key, sentinel)
            # merge only when the block holds a candidate better than the current k-th best
            if tl.max(key, axis=0) > tl.min(top, axis=0):
                block_up = tl.sort(key, descending=False)
                top = tl.sort(tl.maximum(top, block_up), descending=True)
        slot = (pid_q.to(tl.int64) * nprobe + pid_p) * n_split + pid_s
        tl.store(out_ptr + slot * BLOCK_N + offs_n, top)


# ---------------------------------------------------------------------------------------
# helpers: codes, LUTs, key packing
# ---------------------------------------------------------------------------------------
def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits: must be 4 or 8, got {bits!r}")
    return int(bits)


def code_bytes(subspaces: int, bits: int) -> int:
    """Bytes per key: M for 8-bit codes, ceil(M / 2) for 4-bit codes."""
    return subspaces if _check_bits(bits) == 8 else (subspaces + 1) // 2


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, M] integer codes -> [n, W] uint8 (two 4-bit codes per byte, low nibble first)."""
    bits = _check_bits(bits)
    if codes.dim() != 2 or codes.dtype.is_floating_point:
        raise ValueError(f"codes: expected integer codes [n, M], got {codes.dtype} {tuple(codes.shape)}")
    c = codes.long()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes: values must lie in [0, {1 << bits}) for {bits}-bit codes")
    if bits == 8:
        return c.to(torch.uint8).contiguous()
    if c.shape[1] % 2:
        c = torch.cat([c, torch.zeros_like(c[:, :1])], 1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, subspaces: int) -> torch.Tensor:
    """[n, W] uint8 -> [n, M] int64 (inverse of ``pack_codes``)."""
    bits = _check_bits(bits)
    p = packed.long()
    if bits == 8:
        return p[:, :subspaces]
    out = torch.stack([p & 15, p >> 4], 2).reshape(p.shape[0], -1)
    return out[:, :subspaces]


def pq_lut(queries: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """lut[q, m, c] = <queries[q, m-th block], codebooks[m, c]>: [nq, M, K] float32.
    Costs 2 * d * K flops per query."""
    m, k, ds = codebooks.shape
    if queries.dim() != 2 or queries.shape[1] != m * ds:
        raise ValueError(f"queries: expected [nq, {m * ds}], got {tuple(queries.shape)}")
    qs = queries.float().reshape(queries.shape[0], m, ds).transpose(0, 1)  # [M, nq, ds]
    return torch.bmm(qs, codebooks.float().transpose(1, 2)).transpose(0, 1).contiguous()


def quantize_lut(lut: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Table quantisation: returns ``(lut_q, scale [nq], offset [nq])`` with
    ``score ~= scale * sum_m lut_q[m, code_m] + offset``.

    ``"float32"``: unchanged. ``"float16"``: cast. ``"uint8"``: per query one scale
    ``max_m (max_c - min_c) / 255`` and per subspace the minimum subtracted (summed into the
    offset); entries rounded to 0..255 (the scheme of ScaNN's and faiss' int8/uint8 tables)."""
    nq = lut.shape[0]
    ones = torch.ones(nq, dtype=torch.float32, device=lut.device)
    zeros = torch.zeros(nq, dtype=torch.float32, device=lut.device)
    if dtype == "float32":
        return lut.float().contiguous(), ones, zeros
    if dtype == "float16":
        return lut.half().contiguous(), ones, zeros
    if dtype == "uint8":
        low = lut.amin(2, keepdim=True)
        span = (lut.amax(2, keepdim=True) - low).amax(1, keepdim=True)  # [nq, 1, 1]
        scale = (span / 255.0).clamp_min(1e-30)
        q = torch.round((lut - low) / scale).clamp_(0, 255).to(torch.uint8)
        return q.contiguous(), scale.reshape(nq).float(), low.sum((1, 2)).float()
    raise ValueError(f"lut_dtype: must be 'float32', 'float16' or 'uint8', got {dtype!r}")


def _pack_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    bits = scores.float().contiguous().view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    return (ordered << 32) + (_LOW_MASK - positions.long())


def _unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    empty = keys == _INT64_MIN
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32).clone()
    positions = _LOW_MASK - (keys & _LOW_MASK)
    scores[empty] = -math.inf
    positions[empty] = -1
    return scores, positions


def _finish(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [nq, c] -> top-k decoded, padded with (-inf, -1) when c < k."""
    nq = keys.shape[0]
    if keys.shape[1] < k:
        pad = torch.full((nq, k - keys.shape[1]), _INT64_MIN, dtype=torch.int64,
                         device=keys.device)
        keys = torch.cat([keys, pad], 1)
    top = torch.topk(keys, k, dim=1, sorted=True).values
    return _unpack_keys(top)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _validate(lut, codes, list_offsets, probe_lists, k, bits, bias, scale):
    bits = _check_bits(bits)
    if lut.dim() != 3:
        raise ValueError(f"lut: expected [nq, M, K], got shape {tuple(lut.shape)}")
    nq, m, kc = lut.shape
    if kc != (1 << bits):
        raise ValueError(f"lut: {bits}-bit codes need K = {1 << bits} entries per subspace, got {kc}")
    if lut.dtype not in (torch.float32, torch.float16, torch.uint8):
        raise ValueError(f"lut: dtype must be float32, float16 or uint8, got {lut.dtype}")
    if lut.dtype != torch.uint8 and not bool(torch.isfinite(lut).all()):
        raise ValueError("lut: contains NaN or inf values")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes: expected uint8 [n, W], got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[1] != code_bytes(m, bits):
        raise ValueError(
            f"codes: {m} subspaces of {bits}-bit codes need {code_bytes(m, bits)} bytes per "
            f"key, got {codes.shape[1]}"
        )
    if list_offsets.dim() != 1 or list_offsets.dtype != torch.int64 or list_offsets.numel() < 2:
        raise ValueError("list_offsets: expected int64 [L+1] with L >= 1")
    if int(list_offsets[0]) != 0 or int(list_offsets[-1]) != codes.shape[0]:
        raise ValueError(
            f"list_offsets: must start at 0 and end at n = {codes.shape[0]}, got "
            f"{int(list_offsets[0])}..{int(list_offsets[-1])}"
        )
    if bool((list_offsets[1:] < list_offsets[:-1]).any()):
        raise ValueError("list_offsets: must be non-decreasing")
    if probe_lists.dim() != 2 or probe_lists.shape[0] != nq or probe_lists.dtype != torch.int64:
        raise ValueError(
            f"probe_lists: expected int64 [{nq}, nprobe], got {probe_lists.dtype} "
            f"{tuple(probe_lists.shape)}"
        )
    n_lists = list_offsets.numel() - 1
    if probe_lists.numel() and (int(probe_lists.min()) < -1 or int(probe_lists.max()) >= n_lists):
        raise ValueError(f"probe_lists: ids must lie in [-1, {n_lists})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    if bias is None:
        bias = torch.zeros(probe_lists.shape, dtype=torch.float32, device=lut.device)
    if tuple(bias.shape) != tuple(probe_lists.shape):
        raise ValueError(f"bias: expected shape {tuple(probe_lists.shape)}, got {tuple(bias.shape)}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError("bias: contains NaN or inf values")
    if scale is None:
        scale = torch.ones(nq, dtype=torch.float32, device=lut.device)
    if tuple(scale.shape) != (nq,):
        raise ValueError(f"scale: expected shape ({nq},), got {tuple(scale.shape)}")
    devs = {t.device for t in (lut, codes, list_offsets, probe_lists, bias, scale)}
    if len(devs) != 1:
        raise ValueError(f"pq_scan: all tensors must be on one device, got {sorted(map(str, devs))}")
    return bits, bias.float().contiguous(), scale.float().contiguous()


# ---------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------
def _byte_lut(lut: torch.Tensor, bits: int) -> torch.Tensor:
    """[nq, M, K] -> [nq, W, 256] float32 indexed by the code byte."""
    lut = lut.float()
    if bits == 8:
        return lut
    nq, m, _ = lut.shape
    if m % 2:
        lut = torch.cat([lut, torch.zeros_like(lut[:, :1])], 1)
    lo, hi = lut[:, 0::2], lut[:, 1::2]  # [nq, W, 16]
    return (hi[:, :, :, None] + lo[:, :, None, :]).reshape(nq, lo.shape[1], 256)


def pq_scan_ref(lut, codes, list_offsets, probe_lists, k, *, bits, bias=None, scale=None,
                budget: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`pq_scan` (same arguments, same tie rule)."""
    bits, bias, scale = _validate(lut, codes, list_offsets, probe_lists, k, bits, bias, scale)
    nq, nprobe = probe_lists.shape
    n_bytes = codes.shape[1]
    dev = lut.device
    offsets = list_offsets.tolist()
    keys = torch.full((nq, nprobe, k), _INT64_MIN, dtype=torch.int64, device=dev)
    q_chunk = max(1, budget // (n_bytes * 256))
    byte_idx = torch.arange(n_bytes, device=dev)
    for q0 in range(0, nq, q_chunk):
        q1 = min(nq, q0 + q_chunk)
        table = _byte_lut(lut[q0:q1], bits)  # [b, W, 256]
        probes = probe_lists[q0:q1]
        qa, pa = torch.nonzero(probes >= 0, as_tuple=True)
        lists = probes[qa, pa]
        order = torch.argsort(lists, stable=True)
        qa, pa, lists = qa[order], pa[order], lists[order]
        uniq, counts = torch.unique_consecutive(lists, return_counts=True)
        start = 0
        for lid, cnt in zip(uniq.tolist(), counts.tolist()):
            qs, ps = qa[start:start + cnt], pa[start:start + cnt]
            start += cnt
            r0, r1 = offsets[lid], offsets[lid + 1]
            if r1 == r0:
                continue
            sub = table[qs]  # [a, W, 256]
            best = torch.full((cnt, 0), _INT64_MIN, dtype=torch.int64, device=dev)
            rows_per = max(1, budget // max(1, cnt * n_bytes))
            for a in range(r0, r1, rows_per):
                b = min(r1, a + rows_per)
                c = codes[a:b].long()  # [r, W]
                s = sub[:, byte_idx[:, None], c.T].sum(1)  # [a, r]
                s = s * scale[q0 + qs][:, None] + bias[q0 + qs, ps][:, None]
                pos = torch.arange(a, b, device=dev).expand(cnt, -1)
                cand = torch.cat([best, _pack_keys(s, pos)], 1)
                best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
            keys[q0 + qs, ps, : best.shape[1]] = best
    return _finish(keys.reshape(nq, nprobe * k), k)


# ---------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------
def pq_scan_launch_config(nq: int, nprobe: int, max_list_len: int, n_bytes: int, k: int,
                          device: DeviceSpec) -> dict:
    """Block sizes, warps, stages and list split of the PQ scan on ``device`` (pure;
    audited). ``BLOCK_N = max(64, next_pow2(k))`` rows per block (the running top-k lives in
    a sorted ``BLOCK_N`` vector, so ``k <= MAX_TRITON_K`` = 256), 16 code bytes per step,
    8 warps; ``n_split`` splits each probed list
    across programs until the grid holds 4 programs per SM (the merge is a top-k)."""
    if k < 1 or k > MAX_TRITON_K:
        raise ValueError(f"k: the kernel handles 1..{MAX_TRITON_K}, got {k}")
    block_n = max(64, triton.next_power_of_2(k))
    # audited on Triton 3.6 and 3.9, sm_90 and sm_80: 16-byte steps and 8 warps do not
    # spill (4 warps left one value in local memory, 32-byte steps too)
    block_w, warps = 16, 8
    want = -(-4 * device.sm_count // max(1, nq * nprobe))
    split = int(max(1, min(want, -(-max(1, max_list_len) // block_n))))
    return {"BLOCK_N": block_n, "BLOCK_W": block_w, "num_warps": warps,
            "num_stages": 3, "n_split": split}


def pq_scan(lut, codes, list_offsets, probe_lists, k, *, bits, bias=None, scale=None,
            n_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k approximate scores over the probed lists' codes; see the module docstring.

    Runs the Triton kernel on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)
    when ``k <= MAX_TRITON_K``; otherwise the torch reference."""
    bits, bias, scale = _validate(lut, codes, list_offsets, probe_lists, k, bits, bias, scale)
    if k > MAX_TRITON_K or triton is None or not use_triton(lut, codes):
        return pq_scan_ref(lut, codes, list_offsets, probe_lists, k, bits=bits, bias=bias,
                           scale=scale)
    nq, nprobe = probe_lists.shape
    lut_in = lut
    m = lut.shape[1]
    if bits == 4 and m % 2:  # padding subspace for the unused high nibble
        lut = torch.cat([lut, torch.zeros_like(lut[:, :1])], 1)
    lut = lut.contiguous()
    codes = codes.contiguous()
    probes = probe_lists.contiguous()
    n_bytes = codes.shape[1]
    sizes = list_offsets[1:] - list_offsets[:-1]
    max_len = int(sizes.max())
    if lut.is_cuda:
        cfg = pq_scan_launch_config(nq, nprobe, max_len, n_bytes, k, device_spec(lut.device))
    else:  # interpreter: the same blocks, no split unless asked
        cfg = pq_scan_launch_config(1, 1, 1, n_bytes, k, DeviceSpec((0, 0), 1, 0))
    split = n_split or cfg.pop("n_split")
    cfg.pop("n_split", None)
    block_n = cfg["BLOCK_N"]
    out = torch.empty((nq, nprobe * split, block_n), dtype=torch.int64, device=lut.device)
    grid = (nq, nprobe, split)

    def launch():
        _pq_scan_kernel[grid](
            lut, codes, list_offsets, probes, bias, scale, out,
            nprobe, n_bytes, split,
            lut.stride(0), probes.stride(0), bias.stride(0),
            N_CODEWORDS=1 << bits, FOUR_BIT=bits == 4, **cfg,
        )
        return _finish(out.reshape(nq, nprobe * split * block_n), k)

    def fallback():
        return pq_scan_ref(lut_in, codes, list_offsets, probe_lists, k, bits=bits, bias=bias,
                           scale=scale)

    return launch_or_fallback("_pq_scan_kernel", launch, fallback)


# ---------------------------------------------------------------------------------------
# compile audit: production shapes walked through pq_scan_launch_config
# ---------------------------------------------------------------------------------------
_LUT_PTR = {"float32": "*fp32", "float16": "*fp16", "uint8": "*u8"}


def audit_cases(device: DeviceSpec) -> list[AuditCase]:
    """PQ scans on 1M keys in 1,000 lists (up to 4,096 rows per list), d 384: 4-bit codes
    (192 subspaces, 96 bytes) and 8-bit codes (48 subspaces, 48 bytes), every LUT dtype
    (float32, float16, uint8), k = 1, 10, 100 (the usual re-rank depth) and 256 (``MAX_TRITON_K``), batches
    of 1,024 and 65,536 queries at nprobe 32 and 64 (one program per probed list), and one
    query at nprobe 64 (lists split across programs: ``n_split`` > 1 is a run-time
    integer, the same compiled code). Not a matrix kernel (table gathers)."""
    if triton is None:
        return []
    cases = []
    names = list(_pq_scan_kernel.arg_names)
    for bits, n_bytes in ((4, 96), (8, 48)):
        for lut_dtype, ptr in _LUT_PTR.items():
            for k in (1, 10, 100, 256):
                shapes = ((1024, 32), (65536, 64))
                if lut_dtype == "float32" and k == 100:  # one query: the list is split
                    shapes += ((1, 64),)
                for nq, nprobe in shapes:
                    cfg = pq_scan_launch_config(nq, nprobe, 4096, n_bytes, k, device)
                    cx = {"N_CODEWORDS": 1 << bits, "FOUR_BIT": bits == 4,
                          "BLOCK_N": cfg["BLOCK_N"], "BLOCK_W": cfg["BLOCK_W"]}
                    sig = {}
                    for name in names:
                        if name in cx:
                            sig[name] = "constexpr"
                        elif name == "lut_ptr":
                            sig[name] = ptr
                        elif name == "codes_ptr":
                            sig[name] = "*u8"
                        elif name in ("offsets_ptr", "probes_ptr", "out_ptr"):
                            sig[name] = "*i64"
                        elif name.endswith("_ptr"):
                            sig[name] = "*fp32"
                        else:
                            sig[name] = "i32"
                    args = {"nprobe": nprobe, "n_bytes": n_bytes, "n_split": cfg["n_split"],
                            "stride_lq": (1 << bits) * (n_bytes * 2 if bits == 4 else n_bytes),
                            "stride_pq": nprobe, "stride_bq": nprobe}
                    # only what changes the compiled code goes into the config; the rest
                    # (n_split, nprobe: run-time integers) into the shapes note
                    one = ",".join(a for a in ("nprobe", "n_split") if args[a] == 1)
                    config = (f"bits{bits},lut_{lut_dtype},N{cfg['BLOCK_N']},W{cfg['BLOCK_W']},"
                              f"w{cfg['num_warps']},s{cfg['num_stages']}"
                              + (f",{one}=1" if one else ""))
                    cases.append(AuditCase(
                        _pq_scan_kernel, sig, cx, cfg["num_warps"], cfg["num_stages"], config,
                        matrix=False, shapes=f"k {k}, nq {nq} x nprobe {nprobe}",
                        extra={"args": args}))
    return dedupe(cases)


# ---------------------------------------------------------------------------------------
# exact reorder
# ---------------------------------------------------------------------------------------
def pq_reorder(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, k: int,
               *, budget: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score candidate ``positions`` [nq, R] (-1 = none) exactly against ``keys`` [n, d]
    (fp32 or fp16, upcast) and keep the best k: ``(scores [nq, k], positions [nq, k])``.
    Tie rule as in the scan (lower position first). Costs 2 * d flops per candidate."""
    nq, r = positions.shape
    d = queries.shape[1]
    out_s = torch.empty(nq, k, dtype=torch.float32, device=queries.device)
    out_p = torch.empty(nq, k, dtype=torch.int64, device=queries.device)
    chunk = max(1, budget // max(1, r * d))
    for a in range(0, nq, chunk):
        b = min(nq, a + chunk)
        pos = positions[a:b]
        valid = pos >= 0
        cand = keys[pos.clamp_min(0)].float()  # [c, R, d]
        s = torch.bmm(cand, queries[a:b].float()[:, :, None])[:, :, 0]
        packed = _pack_keys(s, pos.clamp_min(0))
        packed = torch.where(valid, packed, torch.full_like(packed, _INT64_MIN))
        out_s[a:b], out_p[a:b] = _finish(packed, k)
    return out_s, out_p
