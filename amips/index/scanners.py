"""Scanners: score the keys of the probed lists and keep the best k.

One interface (the PQ scanner of :mod:`amips.index.pq_scanner` follows it too)::

    search(queries [nq, d], probe_lists [nq, nprobe] int64, k, *, reorder=0, keys_by_list=None)
        -> (scores [nq, k] fp32, positions [nq, k] int64 rows of keys_by_list, -1 if fewer)
    flops_per_query(n_codes_scanned, nprobe, reorder) -> float

:class:`ExactScanner` scores every key of the probed lists in full precision with the
``ivf_scan`` kernel on CUDA and, on CPU, with the engine :func:`amips.index.cpu_engines.exact_engine`
picks by batch size (list-major matrix products for batches, faiss ``search_preassigned``
for a few queries); it costs 2·d FLOPs per key scanned.
"""

from __future__ import annotations

import torch

from .._validate import InputError, check_matrix, check_positive_int, to_tensor
from ..kernels.ivf_scan import ivf_scan


def check_probes(probe_lists, nq: int, n_lists: int, device) -> torch.Tensor:
    if not isinstance(probe_lists, torch.Tensor):
        raise InputError(f"probe_lists: expected a torch tensor, got {type(probe_lists).__name__}")
    if probe_lists.dtype.is_floating_point or probe_lists.dim() != 2 or probe_lists.shape[0] != nq:
        raise InputError(
            f"probe_lists: expected integer [nq = {nq}, nprobe], got {probe_lists.dtype} "
            f"{tuple(probe_lists.shape)}"
        )
    p = probe_lists.long().to(device)
    if p.numel() and (int(p.max()) >= n_lists or int(p.min()) < -1):
        raise InputError(f"probe_lists: list ids must lie in [0, {n_lists - 1}] (or -1 = none)")
    return p.contiguous()


class ExactScanner:
    name = "exact"

    def __init__(self, keys_by_list: torch.Tensor, list_offsets: torch.Tensor):
        self.keys_by_list = keys_by_list
        self.list_offsets = list_offsets.long()
        self.d = keys_by_list.shape[1]
        self.n_lists = self.list_offsets.numel() - 1

    def search(self, queries, probe_lists, k: int, *, reorder: int = 0, keys_by_list=None):
        keys = self.keys_by_list if keys_by_list is None else keys_by_list
        q = check_matrix(to_tensor(queries, "queries"), "queries", dim=self.d)
        k = check_positive_int(k, "k")
        if q.dtype == torch.float64:
            q = q.float()
        q = q.to(keys.device)
        probes = check_probes(probe_lists, q.shape[0], self.n_lists, keys.device)
        if keys.device.type == "cpu" and keys_by_list is None:
            from .cpu_engines import exact_engine  # list-major products or faiss, by batch size

            # by the (query, list) pairs actually probed (adaptive probing leaves -1s)
            live = int((probes >= 0).sum()) if probes.numel() else 0
            engine = exact_engine(self, q.shape[0], live / max(1, q.shape[0]))
            if engine is not None:
                return engine.search(q, probes, k)
        offsets = self.list_offsets.to(keys.device)
        return ivf_scan(q, keys, offsets, probes, k)

    def flops_per_query(self, n_codes_scanned: float, nprobe: int, reorder: int = 0) -> float:
        return 2.0 * self.d * float(n_codes_scanned)

    def state_dict(self) -> dict:
        return {}

    def config(self) -> dict:
        return {"name": self.name}
