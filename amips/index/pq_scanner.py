"""PQ scanner of the IVF index: score-aware product-quantized codes scored by lookup tables.

Train from the index's keys grouped by list (``PQScanner.train``); search a batch of queries
over their probed lists (``search``), optionally re-scoring the best R candidates exactly
against the stored keys. Scoring runs ``amips.kernels.pq_scan`` (Triton on CUDA, torch on CPU).

Score of key ``i`` in list ``l`` (by_residual, the default):
``<q, c_l> + sum_m lut[q, m, code[i, m]]`` with ``lut[q, m, c] = <q_m, codebook[m, c]>``,
the codes quantizing the residual ``x_i - c_l``; without by_residual the codes quantize
``x_i`` and the bias is 0. With ``anisotropic_threshold = T`` the codebooks and codes
minimise the score-aware loss of ``x_i`` (see ``amips.quantize``; ``T`` is relative to each
key's norm, so keys of any norms are weighted as ScaNN weights unit-norm keys); ``None`` means
the plain reconstruction loss. Codebooks are trained on at most ``TRAIN_SAMPLE`` keys (a seeded
random sample); every key is then encoded.
"""

from __future__ import annotations

import math

import torch

from .._validate import InputError, check_matrix, check_positive_int, to_tensor
from ..kernels.pq_scan import (
    code_bytes,
    pack_codes,
    pq_lut,
    pq_reorder,
    pq_scan,
    quantize_lut,
    unpack_codes,
)
from ..quantize import ProductQuantizer, check_pq_shape

LUT_DTYPES = ("float32", "float16", "uint8")
TRAIN_SAMPLE = 100_000  # codebooks are trained on at most this many keys


def _check_offsets(list_offsets, n_rows: int) -> torch.Tensor:
    if not isinstance(list_offsets, torch.Tensor):
        list_offsets = torch.as_tensor(list_offsets)
    if list_offsets.dtype.is_floating_point or list_offsets.dim() != 1 or list_offsets.numel() < 2:
        raise InputError(
            f"list_offsets: expected integer [L+1] with L >= 1, got {list_offsets.dtype} "
            f"{tuple(list_offsets.shape)}"
        )
    off = list_offsets.long()
    if int(off[0]) != 0 or int(off[-1]) != n_rows:
        raise InputError(
            f"list_offsets: must start at 0 and end at the number of keys ({n_rows}), got "
            f"{int(off[0])}..{int(off[-1])}"
        )
    if bool((off[1:] < off[:-1]).any()):
        raise InputError("list_offsets: must be non-decreasing")
    return off


def check_threshold(threshold) -> float | None:
    """The score-aware threshold T as a float in [0, 1), or None (plain PQ)."""
    if threshold is None:
        return None
    t = float(threshold)
    if not math.isfinite(t) or t < 0 or t >= 1:
        raise InputError(
            f"anisotropic_threshold: must be a finite number in [0, 1) (a cosine, "
            f"relative to each key's norm) or None, got {t}"
        )
    return t


class PQScanner:
    """Product-quantized list scanner (4- or 8-bit codes, reconstruction or score-aware)."""

    name = "pq"

    def __init__(self, codebooks: torch.Tensor, codes: torch.Tensor, list_offsets: torch.Tensor,
                 centroids: torch.Tensor, *, bits: int, anisotropic_threshold: float | None,
                 by_residual: bool, iters: int = 20, seed: int = 0,
                 lut_dtype: str = "float32"):
        self.codebooks = codebooks.float().contiguous()  # [M, K, ds]
        self.codes = codes.contiguous()  # [n, W] uint8, packed
        self.list_offsets = list_offsets.long().contiguous()
        self.centroids = centroids.float().contiguous()
        self.subspaces, self.n_codewords, sub_dim = self.codebooks.shape
        self.dim = self.subspaces * sub_dim
        self.bits = int(bits)
        self.anisotropic_threshold = anisotropic_threshold
        self.by_residual = bool(by_residual)
        self.iters = int(iters)
        self.seed = int(seed)
        self.lut_dtype = lut_dtype

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, keys_by_list: torch.Tensor, list_offsets: torch.Tensor,
              centroids: torch.Tensor, *, subspaces: int, bits: int = 4,
              anisotropic_threshold: float | None = None, by_residual: bool = True,
              iters: int = 20, seed: int = 0) -> PQScanner:
        keys = check_matrix(to_tensor(keys_by_list, "keys_by_list"), "keys_by_list").float()
        n, d = keys.shape
        subspaces, bits = check_pq_shape(d, subspaces, bits)
        off = _check_offsets(list_offsets, n).to(keys.device)
        cents = check_matrix(to_tensor(centroids, "centroids"), "centroids", dim=d).float()
        cents = cents.to(keys.device)
        if cents.shape[0] != off.numel() - 1:
            raise InputError(
                f"centroids: expected {off.numel() - 1} rows (one per list), got {cents.shape[0]}"
            )
        anisotropic_threshold = check_threshold(anisotropic_threshold)
        iters = check_positive_int(iters, "iters")
        target = keys
        if by_residual:
            list_of_row = torch.repeat_interleave(
                torch.arange(off.numel() - 1, device=keys.device), off[1:] - off[:-1])
            target = keys - cents[list_of_row]
        if n > TRAIN_SAMPLE:  # codebooks from a sample (as ScaNN and faiss do), all keys encoded
            gen = torch.Generator().manual_seed(int(seed))
            pick = torch.randperm(n, generator=gen)[:TRAIN_SAMPLE].to(keys.device)
            pq, _ = ProductQuantizer.train(
                target[pick], subspaces, bits, threshold=anisotropic_threshold,
                originals=keys[pick], iters=iters, seed=seed)
            codes = pq.encode(target, threshold=anisotropic_threshold, originals=keys)
        else:
            pq, codes = ProductQuantizer.train(
                target, subspaces, bits, threshold=anisotropic_threshold, originals=keys,
                iters=iters, seed=seed)
        return cls(pq.codebooks, pack_codes(codes, bits), off, cents, bits=bits,
                   anisotropic_threshold=anisotropic_threshold, by_residual=by_residual,
                   iters=iters, seed=seed)

    # ------------------------------------------------------------------ search
    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    def to(self, device) -> PQScanner:
        for name in ("codebooks", "codes", "list_offsets", "centroids"):
            setattr(self, name, getattr(self, name).to(device))
        self._cpu_engine = None
        return self

    def decode(self) -> torch.Tensor:
        """Reconstructed keys [n, d] in list order (centroid added back when by_residual)."""
        pq = ProductQuantizer(self.dim, self.subspaces, self.bits, codebooks=self.codebooks)
        x = pq.decode(unpack_codes(self.codes, self.bits, self.subspaces))
        if self.by_residual:
            off = self.list_offsets
            rows = torch.repeat_interleave(torch.arange(off.numel() - 1, device=off.device),
                                           off[1:] - off[:-1])
            x = x + self.centroids[rows]
        return x

    def search(self, queries: torch.Tensor, probe_lists: torch.Tensor, k: int, *,
               reorder: int = 0, keys_by_list: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over the probed lists: ``(scores [nq, k] fp32, positions [nq, k] int64)``.

        Positions are rows of ``keys_by_list`` (-1 and -inf where fewer than k candidates).
        ``reorder = R > 0`` re-scores the best ``max(R, k)`` approximate candidates exactly
        against ``keys_by_list`` (then the scores are exact inner products). A list probed
        twice for one query is scanned once. Inputs are moved to the scanner's device;
        results come back on the queries' device."""
        q = check_matrix(to_tensor(queries, "queries"), "queries", dim=self.dim)
        out_device = q.device
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k: must be an integer >= 1, got {k!r}")
        if isinstance(reorder, bool) or not isinstance(reorder, int) or reorder < 0:
            raise InputError(f"reorder: must be an integer >= 0, got {reorder!r}")
        if not isinstance(probe_lists, torch.Tensor):
            probe_lists = torch.as_tensor(probe_lists)
        if probe_lists.dtype.is_floating_point or probe_lists.dim() != 2 or \
                probe_lists.shape[0] != q.shape[0]:
            raise InputError(
                f"probe_lists: expected integer [{q.shape[0]}, nprobe], got "
                f"{probe_lists.dtype} {tuple(probe_lists.shape)}"
            )
        n_lists = self.list_offsets.numel() - 1
        probes = probe_lists.long().to(self.device)
        if probes.numel() and (int(probes.min()) < -1 or int(probes.max()) >= n_lists):
            raise InputError(f"probe_lists: ids must lie in [-1, {n_lists}) (-1 = none)")
        if self.lut_dtype not in LUT_DTYPES:
            raise InputError(f"lut_dtype: must be one of {LUT_DTYPES}, got {self.lut_dtype!r}")
        keys = None
        if reorder > 0:
            if keys_by_list is None:
                raise InputError("keys_by_list: required when reorder > 0")
            keys = to_tensor(keys_by_list, "keys_by_list")
            if keys.dim() != 2 or keys.shape != (self.codes.shape[0], self.dim):
                raise InputError(
                    f"keys_by_list: expected shape ({self.codes.shape[0]}, {self.dim}), got "
                    f"{tuple(keys.shape)}"
                )
            keys = keys.to(self.device)
        q = q.float().to(self.device)
        probes = _dedupe_probes(probes)
        if self.device.type == "cpu":
            from .cpu_engines import pq_engine  # faiss fast-scan over these codes, when it applies

            engine = pq_engine(self)
            if engine is not None:
                scores, pos = engine.search(q, probes, k, reorder=reorder, keys_by_list=keys)
                return scores.to(out_device), pos.to(out_device)
        lut = pq_lut(q, self.codebooks)
        lut, scale, offset = quantize_lut(lut, self.lut_dtype)
        if self.by_residual:
            bias = q @ self.centroids.T  # [nq, L]; only the probed entries are used
            bias = bias.gather(1, probes.clamp_min(0))
        else:
            bias = torch.zeros(probes.shape, dtype=torch.float32, device=self.device)
        bias = bias + offset[:, None]
        n_cand = max(k, reorder) if reorder > 0 else k
        scores, pos = pq_scan(lut, self.codes, self.list_offsets, probes, n_cand,
                              bits=self.bits, bias=bias, scale=scale)
        if reorder > 0:
            scores, pos = pq_reorder(q, keys, pos, k)
        return scores.to(out_device), pos.to(out_device)

    def flops_per_query(self, n_codes_scanned: float, nprobe: int, reorder: int) -> float:
        """Operations per query, counted as:
        LUT build ``2 * d * K`` (each codeword dotted with its query block) +
        bias ``2 * d * nprobe`` when by_residual (``<q, c_l>`` per probed list) +
        ``M`` per scanned code (one table lookup-and-add per subspace) +
        ``2 * d * R`` for the exact re-score of R candidates.
        Top-k bookkeeping is not counted."""
        d, k, m = self.dim, self.n_codewords, self.subspaces
        flops = 2.0 * d * k + float(n_codes_scanned) * m
        if self.by_residual:
            flops += 2.0 * d * nprobe
        if reorder > 0:
            flops += 2.0 * d * reorder
        return flops

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "codebooks": self.codebooks.cpu(),
            "codes": self.codes.cpu(),
            "list_offsets": self.list_offsets.cpu(),
            "centroids": self.centroids.cpu(),
        }

    def config(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "subspaces": self.subspaces,
            "bits": self.bits,
            "anisotropic_threshold": self.anisotropic_threshold,
            "by_residual": self.by_residual,
            "iters": self.iters,
            "seed": self.seed,
            "lut_dtype": self.lut_dtype,
            "n_keys": int(self.codes.shape[0]),
            "n_lists": int(self.list_offsets.numel() - 1),
        }

    @classmethod
    def from_state(cls, state: dict, config: dict) -> PQScanner:
        missing = [k for k in ("codebooks", "codes", "list_offsets", "centroids") if k not in state]
        if missing:
            raise InputError(f"state: missing tensors {missing} (codebooks not trained?)")
        for key in ("subspaces", "bits", "by_residual"):
            if key not in config:
                raise InputError(f"config: missing {key!r}")
        cb = state["codebooks"]
        subspaces, bits = int(config["subspaces"]), int(config["bits"])
        if cb.dim() != 3 or cb.shape[0] != subspaces:
            raise InputError(f"state: codebooks shape {tuple(cb.shape)} does not match config")
        check_pq_shape(subspaces * cb.shape[2], subspaces, bits)
        if cb.shape[1] != 1 << bits:
            raise InputError(f"state: codebooks have {cb.shape[1]} codewords, bits = {bits}")
        codes = state["codes"]
        if codes.dtype != torch.uint8 or codes.dim() != 2 or \
                codes.shape[1] != code_bytes(subspaces, bits):
            raise InputError(f"state: codes {codes.dtype} {tuple(codes.shape)} do not match config")
        off = _check_offsets(state["list_offsets"], codes.shape[0])
        return cls(cb, codes, off, state["centroids"], bits=bits,
                   anisotropic_threshold=config.get("anisotropic_threshold"),
                   by_residual=bool(config["by_residual"]), iters=int(config.get("iters", 20)),
                   seed=int(config.get("seed", 0)),
                   lut_dtype=str(config.get("lut_dtype", "float32")))


def _dedupe_probes(probes: torch.Tensor) -> torch.Tensor:
    """Replace repeated list ids within a row by -1 (so no key is returned twice)."""
    if probes.shape[1] < 2:
        return probes
    srt, order = torch.sort(probes, dim=1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    out = probes.clone()
    out.scatter_(1, order, torch.where(dup, torch.full_like(srt, -1), srt))
    return out
