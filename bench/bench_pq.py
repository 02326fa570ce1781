"""Does score-aware quantization buy inner-product ranking accuracy, and at what speed?

Paper (Guo et al., ICML 2020) Figure 3 style on real text embeddings, plus a side-by-side at
equal bits per vector. No partitioning: every query scores every key's PQ code (this
isolates the quantizer; the IVF comparison lives in bench_ivf).

1. ``fig3a``: Recall1@10 (the exact top-1 key is among the 10 best by approximate score) and
   match@1 against the threshold T, at 4 dims per 4-bit subspace: reconstruction PQ; the
   same codebook with score-aware codes (coordinate descent); score-aware codebooks and codes.
2. ``fig3b``: relative error of the top-1 inner product, |<q, x~*> - <q, x*>| / <q, x*>
   (x* the exact top-1 key), against bits per vector (1, 2, 4 dims per 4-bit subspace... i.e.
   d/8, d/4, d/2 subspaces), reconstruction vs score-aware (T = 0.2).
3. ``side``: at 2 dims per 4-bit subspace (4 bits per 2 dims): amips PQ (reconstruction,
   score-aware T = 0.2), ScaNN ``score_ah(2)`` with T = 0.2 and without a threshold, faiss
   ``IndexPQFastScan`` (4-bit) + ``IndexRefineFlat``; match@1 and Recall1@10 with exact
   reorder R in {0, 10, 100}; single-thread QPS. amips' accuracy here is computed from the
   decoded keys (q . x~, identical to the LUT sum up to float rounding; checked against
   ``PQScanner.search`` on a subset and printed); its QPS is the real ``PQScanner.search``
   (torch CPU path, or Triton on a GPU) on a query subset. LUT quantisation (uint8) is
   reported next to float32 through the real scanner on SciFact.
4. GPU only: scan throughput of the Triton kernel (codes/s, GB/s of code bytes against the
   measured device copy bandwidth). Without CUDA this prints "no GPU" and writes nothing.

Data: ``../shared/data/wordnet`` (117,659 keys; test queries subsampled to --n-queries,
codebooks trained on a --train-keys sample, all keys encoded) and ``../shared/data/scifact``
(5,183 keys, all 1,109 queries, all keys for training). Ground truth: the datasets'
``gt_test_top1_score.npy`` (exact fp64); hits are tie-aware (a key whose exact score is within
1e-6 relative of the top-1 counts).

    python bench/bench_pq.py            # both datasets
    python bench/bench_pq.py --quick    # SciFact only, fewer thresholds
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, device_name, git_sha  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))

from amips.index.pq_scanner import PQScanner  # noqa: E402
from amips.kernels.pq_scan import pack_codes  # noqa: E402
from amips.quantize import ProductQuantizer  # noqa: E402

ROWS: list[dict] = []
PART = {"name": ""}


def record(provider, dataset, bits, subspaces, threshold, reorder, metric, value, **extra):
    ROWS.append(dict(bench="pq", part=PART["name"], provider=provider, dataset=dataset, bits_per_vector=bits,
                     subspaces=subspaces, threshold="" if threshold is None else threshold,
                     reorder=reorder, metric=metric, value=float(value), **extra))


# ------------------------------------------------------------------------ data and metrics
def load(name: str, n_queries: int | None):
    folder = DATA / name
    keys = np.load(folder / "keys.npy").astype(np.float32)
    queries = np.load(folder / "queries_test.npy").astype(np.float32)
    gt_score = np.load(folder / "gt_test_top1_score.npy").astype(np.float64)
    if n_queries and n_queries < len(queries):
        queries, gt_score = queries[:n_queries], gt_score[:n_queries]
    return torch.from_numpy(keys), torch.from_numpy(queries), torch.from_numpy(gt_score)


class Judge:
    """Tie-aware hits: a returned key is 'the top-1' if its exact score is within 1e-6
    relative of the exact top-1 score."""

    def __init__(self, keys, queries, gt_score):
        self.keys, self.queries = keys.double(), queries.double()
        self.cut = gt_score - 1e-6 * gt_score.abs()

    def hits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [nq, c] (-1 = none) -> bool [nq, c]."""
        valid = ids >= 0
        cand = self.keys[ids.clamp_min(0)]
        s = torch.einsum("qcd,qd->qc", cand, self.queries)
        return (s >= self.cut[:, None]) & valid

    def metrics(self, ids10: torch.Tensor) -> tuple[float, float]:
        h = self.hits(ids10[:, :10])
        return h[:, 0].double().mean().item(), h.any(1).double().mean().item()


def approx_topk(queries, approx_keys, k, block=2048):
    """Top-k of q . x~ over all keys (what the LUT scan computes), blocked over keys."""
    best_s = torch.full((queries.shape[0], 0), -float("inf"))
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for a in range(0, approx_keys.shape[0], 1 << 15):
        s = queries @ approx_keys[a:a + (1 << 15)].T
        s_all = torch.cat([best_s, s], 1)
        i_all = torch.cat([best_i, torch.arange(a, a + s.shape[1]).expand(queries.shape[0], -1)], 1)
        best_s, j = torch.topk(s_all, k, dim=1)
        best_i = i_all.gather(1, j)
    return best_s, best_i


def reorder_exact(queries, keys, ids, r, k=10):
    cand = ids[:, :r]
    s = torch.einsum("qcd,qd->qc", keys[cand], queries)
    j = torch.argsort(-s, dim=1, stable=True)[:, :k]
    return cand.gather(1, j)


def eval_codes(judge, queries, keys, approx_keys, reorders=(0,)):
    _, ids = approx_topk(queries, approx_keys, max(10, max(reorders)))
    out = {}
    for r in reorders:
        top = ids[:, :10] if r == 0 else reorder_exact(queries, keys, ids, r)
        out[r] = judge.metrics(top)
    return out, ids


def top1_rel_error(queries, keys, approx_keys, gt_ids):
    exact = (keys[gt_ids] * queries).sum(1).double()
    approx = (approx_keys[gt_ids] * queries).sum(1).double()
    return ((approx - exact).abs() / exact.abs().clamp_min(1e-12)).mean().item()


# ------------------------------------------------------------------------ parts
def train_pq(train_x, all_x, m, threshold, *, sa_codebooks, iters, base=None):
    """(quantizer, codes for all_x). ``base``: reuse this reconstruction quantizer."""
    if base is None or sa_codebooks:
        pq, _ = ProductQuantizer.train(train_x, m, 4, threshold=threshold if sa_codebooks else None,
                                       iters=iters, score_aware_iters=3, sweeps=8)
    else:
        pq = base
    return pq, pq.encode(all_x, threshold=threshold, sweeps=8)


def part_fig3(name, keys, queries, gt_score, train_x, thresholds, iters):
    PART["name"] = "fig3a"
    judge = Judge(keys, queries, gt_score)
    d = keys.shape[1]
    m = d // 4
    bits = 4 * m
    t0 = time.time()
    base, rec_codes = train_pq(train_x, keys, m, None, sa_codebooks=False, iters=iters)
    res, _ = eval_codes(judge, queries, keys, base.decode(rec_codes))
    m1, r10 = res[0]
    print(f"[{name}] reconstruction PQ {m}x4: match@1 {m1:.4f} Recall1@10 {r10:.4f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    for t in [0.0] + list(thresholds):
        record("amips-reconstruction", name, bits, m, t, 0, "match@1", m1)
        record("amips-reconstruction", name, bits, m, t, 0, "recall1@10", r10)
    for t in thresholds:
        for sa_cb, prov in ((False, "amips-sa-assign"), (True, "amips-sa-codebook")):
            t0 = time.time()
            pq, codes = train_pq(train_x, keys, m, t, sa_codebooks=sa_cb, iters=iters, base=base)
            res, _ = eval_codes(judge, queries, keys, pq.decode(codes))
            m1s, r10s = res[0]
            record(prov, name, bits, m, t, 0, "match@1", m1s)
            record(prov, name, bits, m, t, 0, "recall1@10", r10s)
            print(f"[{name}] T={t:.2f} {prov:18s} match@1 {m1s:.4f} Recall1@10 {r10s:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


def part_fig3b(name, keys, queries, gt_ids, train_x, iters, dims_per_block=(8, 4, 2)):
    PART["name"] = "fig3b"
    d = keys.shape[1]
    for dpb in dims_per_block:
        m = d // dpb
        base, rec = train_pq(train_x, keys, m, None, sa_codebooks=False, iters=iters)
        err = top1_rel_error(queries, keys, base.decode(rec), gt_ids)
        record("amips-reconstruction", name, 4 * m, m, "", 0, "top1_rel_error", err)
        pq_a, codes_a = train_pq(train_x, keys, m, 0.2, sa_codebooks=False, iters=iters, base=base)
        err_a = top1_rel_error(queries, keys, pq_a.decode(codes_a), gt_ids)
        record("amips-sa-assign", name, 4 * m, m, 0.2, 0, "top1_rel_error", err_a)
        pq_c, codes_c = train_pq(train_x, keys, m, 0.2, sa_codebooks=True, iters=iters)
        err_c = top1_rel_error(queries, keys, pq_c.decode(codes_c), gt_ids)
        record("amips-sa-codebook", name, 4 * m, m, 0.2, 0, "top1_rel_error", err_c)
        print(f"[{name}] {4 * m} bits: top-1 relative error rec {err:.4f} sa-assign {err_a:.4f} "
              f"sa-codebook {err_c:.4f}", flush=True)


def best_seconds(fn, repeats=3) -> float:
    return best_of(fn, repeats)[0]


def part_side(name, keys, queries, gt_score, train_x, iters, n_qps, dims_per_block=2):
    PART["name"] = "side"
    judge = Judge(keys, queries, gt_score)
    n, d = keys.shape
    m = d // dims_per_block
    bits = 4 * m
    reorders = (0, 10, 100)
    qps_q = queries[:n_qps]
    offsets = torch.tensor([0, n])
    probes = torch.zeros(n_qps, 1, dtype=torch.long)
    cent = torch.zeros(1, d)
    # --- amips
    for prov, t in (("amips-reconstruction", None), ("amips-sa-codebook", 0.2)):
        t0 = time.time()
        pq, codes = train_pq(train_x, keys, m, t, sa_codebooks=t is not None, iters=iters)
        build = time.time() - t0
        res, ids = eval_codes(judge, queries, keys, pq.decode(codes), reorders)
        sc = PQScanner(pq.codebooks, pack_codes(codes, 4), offsets, cent, bits=4,
                       anisotropic_threshold=t, by_residual=False)
        chk = min(20, n_qps)
        _, pos = sc.search(queries[:chk], probes[:chk], 10)
        agree = (pos[:, 0] == ids[:chk, 0]).double().mean().item()
        torch.set_num_threads(1)
        for r in reorders:
            secs = best_seconds(lambda r=r, sc=sc: sc.search(qps_q, probes, 10, reorder=r, keys_by_list=keys),
                           repeats=2)
            record(prov, name, bits, m, t, r, "qps_1thread", n_qps / secs, n_queries=n_qps)
            record(prov, name, bits, m, t, r, "match@1", res[r][0])
            record(prov, name, bits, m, t, r, "recall1@10", res[r][1])
        torch.set_num_threads(1)
        record(prov, name, bits, m, t, 0, "build_s", build)
        print(f"[{name}] {prov}: build {build:.0f} s, scanner top-1 agrees with decoded "
              f"scoring on {agree:.2f} of {chk} queries", flush=True)
    # --- faiss fast-scan
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        t0 = time.time()
        base = faiss.IndexPQFastScan(d, m, 4, faiss.METRIC_INNER_PRODUCT)
        refine = faiss.IndexRefineFlat(base)
        refine.train(train_x.numpy())
        refine.add(keys.numpy())
        build = time.time() - t0
        record("faiss-pq-fastscan", name, bits, m, "", 0, "build_s", build)
        q_np = queries.numpy()
        faiss.omp_set_num_threads(1)
        for r in reorders:
            if r == 0:
                _, ids = base.search(q_np, 10)
            else:
                params = faiss.IndexRefineSearchParameters(k_factor=r / 10)
                _, ids = refine.search(q_np, 10, params=params)
            m1, r10 = judge.metrics(torch.from_numpy(ids))
            if r == 0:
                secs = best_seconds(lambda: base.search(qps_q.numpy(), 10))
            else:
                secs = best_seconds(lambda p=params: refine.search(qps_q.numpy(), 10, params=p))
            for met, v in (("match@1", m1), ("recall1@10", r10), ("qps_1thread", n_qps / secs)):
                record("faiss-pq-fastscan", name, bits, m, "", r, met, v, n_queries=n_qps)
        faiss.omp_set_num_threads(1)
        print(f"[{name}] faiss fast-scan done ({build:.0f} s build)", flush=True)
    except Exception as exc:  # pragma: no cover
        print(f"faiss: skipped ({exc})")
    # --- ScaNN
    try:
        import scann
    except Exception as exc:
        print(f"scann: not installed ({exc}); ScaNN rows skipped")
        return
    k_np = keys.numpy()
    q_np = queries.numpy()
    for prov, t in (("scann-score_ah-T0.2", 0.2), ("scann-score_ah-noT", float("nan"))):
        for r in reorders:
            t0 = time.time()
            b = scann.scann_ops_pybind.builder(k_np, 10, "dot_product").score_ah(
                dims_per_block, anisotropic_quantization_threshold=t,
                training_sample_size=train_x.shape[0])
            if r > 0:
                b = b.reorder(r)
            searcher = b.build()
            build = time.time() - t0
            ids, _ = searcher.search_batched(q_np, final_num_neighbors=10)
            m1, r10 = judge.metrics(torch.from_numpy(ids.astype(np.int64)))
            secs = best_seconds(lambda s=searcher: s.search_batched(qps_q.numpy(),
                                                               final_num_neighbors=10))
            tt = "" if t != t else t
            for met, v in (("match@1", m1), ("recall1@10", r10), ("qps_1thread", n_qps / secs)):
                record(prov, name, bits, m, tt, r, met, v, n_queries=n_qps)
            if r == 0:
                record(prov, name, bits, m, tt, 0, "build_s", build)
        print(f"[{name}] {prov} done", flush=True)


def part_lut_dtype(name, keys, queries, gt_score, iters):
    """float32 vs uint8 LUT through the real scanner (no partition, one list)."""
    PART["name"] = "lut"
    judge = Judge(keys, queries, gt_score)
    n, d = keys.shape
    m = d // 2
    pq, codes = train_pq(keys, keys, m, 0.2, sa_codebooks=True, iters=iters)
    sc = PQScanner(pq.codebooks, pack_codes(codes, 4), torch.tensor([0, n]), torch.zeros(1, d),
                   bits=4, anisotropic_threshold=0.2, by_residual=False)
    probes = torch.zeros(queries.shape[0], 1, dtype=torch.long)
    for dt in ("float32", "uint8"):
        sc.lut_dtype = dt
        _, pos = sc.search(queries, probes, 10)
        m1, r10 = judge.metrics(pos)
        record(f"amips-sa-codebook-lut-{dt}", name, 4 * m, m, 0.2, 0, "match@1", m1)
        record(f"amips-sa-codebook-lut-{dt}", name, 4 * m, m, 0.2, 0, "recall1@10", r10)
        print(f"[{name}] LUT {dt}: match@1 {m1:.4f} Recall1@10 {r10:.4f}", flush=True)


def part_gpu():
    PART["name"] = "gpu"
    if not torch.cuda.is_available():
        print("GPU scan throughput: no GPU in this session (CUDA unavailable); nothing measured")
        return
    import triton.testing

    from amips.kernels.pq_scan import pq_scan

    dev = "cuda"
    n, m, nq, nprobe = 4_000_000, 192, 2048, 32
    n_lists = 4096
    codes = torch.randint(0, 256, (n, m // 2), dtype=torch.uint8, device=dev)
    offsets = torch.linspace(0, n, n_lists + 1, device=dev).long()
    probes = torch.randint(0, n_lists, (nq, nprobe), device=dev)
    lut = torch.randn(nq, m, 16, device=dev)
    ms = triton.testing.do_bench(lambda: pq_scan(lut, codes, offsets, probes, 10, bits=4))
    n_codes = nq * nprobe * (n / n_lists)
    gbs = n_codes * (m // 2) / (ms * 1e-3) / 1e9
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    buf2 = torch.empty_like(buf)
    ms_copy = triton.testing.do_bench(lambda: buf2.copy_(buf))
    copy_gbs = 2 * buf.numel() / (ms_copy * 1e-3) / 1e9
    record("amips-triton", "synthetic", 4 * m, m, "", 0, "codes_per_s", n_codes / (ms * 1e-3))
    record("amips-triton", "synthetic", 4 * m, m, "", 0, "code_GBps", gbs)
    record("amips-triton", "synthetic", 4 * m, m, "", 0, "copy_GBps", copy_gbs)
    print(f"GPU scan: {n_codes / (ms * 1e-3) / 1e9:.2f} G codes/s, {gbs:.0f} GB/s of codes, "
          f"copy {copy_gbs:.0f} GB/s ({gbs / copy_gbs:.0%})")


# ------------------------------------------------------------------------ main
def part_ivf_default(name, keys, queries, gt_score, *, n_lists, subspaces, nprobes, reorders,
                     thresholds=(0.2,), repeats=3, torch_queries=200, pq_iters=10, train_threads=1):
    """The CPU default of ``IVFIndex.search(scanner="pq")`` (faiss fast-scan over amips'
    codes) next to faiss ``IndexIVFPQFastScan`` (+ ``IndexRefineFlat`` for R > 0) on the same
    lists, code size and nprobe: with amips' codes (the engine's own faiss index, searched by
    faiss itself: the cost of amips' routing and wrapping) and with faiss' own PQ (trained by
    faiss on the keys). One thread, providers interleaved, best of ``repeats``; the torch path
    on ``torch_queries`` queries (its match@1 on those). Per threshold T (None = plain PQ)."""
    import os

    import faiss

    from amips.index import IVFIndex
    from amips.index.cpu_engines import pq_engine
    from amips.index.faiss_backend import to_faiss

    PART["name"] = "ivf"
    k_out = 10
    faiss.omp_set_num_threads(1)
    judge = Judge(keys, queries, gt_score)
    q = queries.float().contiguous()
    qn = q.numpy()
    bits = subspaces * 4
    t = time.time()
    base = IVFIndex.build(keys, n_lists, iters=10, seed=0)
    t_lists = time.time() - t
    t = time.time()
    fidx = to_faiss(base, kind="pqfs", pq_subspaces=subspaces)  # faiss' own PQ on amips' lists
    t_faiss = time.time() - t
    fidx_ref = faiss.IndexRefineFlat(fidx, faiss.swig_ptr(np.ascontiguousarray(keys.numpy())))
    sizes = base.list_sizes
    print(f"[{name}] ivf: {n_lists} lists ({int(sizes.min())}..{int(sizes.max())}) in {t_lists:.0f} s; "
          f"faiss PQ{subspaces}x4fs trained in {t_faiss:.0f} s", flush=True)

    def m_at_1(ids, nq):
        top = ids[:, 0]
        exact = (judge.keys[top.clamp_min(0)] * judge.queries[:nq]).sum(1)
        return float(((exact >= judge.cut[:nq]) & (top >= 0)).float().mean())

    for thr in thresholds:
        t = time.time()
        index = IVFIndex(base.centroids, base.keys_by_list, base.list_offsets, base.ids, metric=base.metric)
        torch.set_num_threads(train_threads)  # training may use the cores; every timing is 1 thread
        index.train_pq(subspaces=subspaces, anisotropic_threshold=thr, iters=pq_iters, seed=0)
        torch.set_num_threads(1)
        build = time.time() - t
        tlabel = "" if thr is None else thr
        record("amips-pq-build", name, bits, subspaces, tlabel, 0, "build_s", build, n_lists=n_lists)
        os.environ["AMIPS_CPU_ENGINE"] = "auto"
        eng = pq_engine(index.pq)  # built once, outside the timings (as a loaded index keeps it)
        same = eng.index  # faiss' IVFPQFastScan holding amips' codes; labels = rows of keys_by_list
        same.quantizer = eng._quantizer
        # exact re-scoring wrappers built once (IndexRefineFlat copies the keys it is given)
        same_ref = faiss.IndexRefineFlat(same, faiss.swig_ptr(
            np.ascontiguousarray(index.keys_by_list.float().numpy())))
        print(f"[{name}] T={thr}: amips PQ trained in {build:.0f} s", flush=True)
        for nprobe in nprobes:
            for r in reorders:
                def amips_default(index=index, nprobe=nprobe, r=r):
                    os.environ["AMIPS_CPU_ENGINE"] = "auto"
                    return index.search(q, k_out, nprobe, scanner="pq", reorder=r)[1]

                def amips_torch(index=index, nprobe=nprobe, r=r):
                    os.environ["AMIPS_CPU_ENGINE"] = "torch"
                    try:
                        return index.search(q[:torch_queries], k_out, nprobe, scanner="pq", reorder=r)[1]
                    finally:
                        os.environ["AMIPS_CPU_ENGINE"] = "auto"

                def faiss_search(ix, ref, ids_map, nprobe=nprobe, r=r, k_out=k_out):
                    ix.nprobe = nprobe
                    if r:
                        ref.k_factor = r / k_out
                        out = ref.search(qn, k_out)[1]
                    else:
                        out = ix.search(qn, k_out)[1]
                    out = torch.from_numpy(out)
                    return out if ids_map is None else torch.where(out >= 0, ids_map[out.clamp_min(0)], out)

                provs = {
                    "amips-cpu-default": amips_default,
                    "faiss-fastscan-amips-codes": functools.partial(faiss_search, same, same_ref, index.ids),
                    "faiss-ivfpq-fastscan": functools.partial(faiss_search, fidx, fidx_ref, None),
                    "amips-torch": amips_torch,
                }
                best = dict.fromkeys(provs, math.inf)
                res = {}
                for _ in range(repeats):  # interleaved
                    for prov, fn in provs.items():
                        t = time.perf_counter()
                        res[prov] = fn()
                        best[prov] = min(best[prov], time.perf_counter() - t)
                line = []
                for prov, secs in best.items():
                    nq = torch_queries if prov == "amips-torch" else q.shape[0]
                    m1 = m_at_1(res[prov], nq)
                    pt = "" if prov == "faiss-ivfpq-fastscan" else tlabel
                    record(prov, name, bits, subspaces, pt, r, "qps", nq / secs,
                           nprobe=nprobe, n_lists=n_lists, n_queries=nq, block_threshold=tlabel)
                    record(prov, name, bits, subspaces, pt, r, "match_at_1", m1,
                           nprobe=nprobe, n_lists=n_lists, n_queries=nq, block_threshold=tlabel)
                    line.append(f"{prov} {nq / secs:7.0f} q/s m@1 {m1:.3f}")
                ratio = best["faiss-ivfpq-fastscan"] / best["amips-cpu-default"]
                ratio_same = best["faiss-fastscan-amips-codes"] / best["amips-cpu-default"]
                for met, v in (("qps_ratio_vs_faiss", ratio), ("qps_ratio_vs_faiss_same_codes", ratio_same)):
                    record("amips-cpu-default", name, bits, subspaces, tlabel, r, met, v,
                           nprobe=nprobe, n_lists=n_lists)
                print(f"[{name}] T={thr} nprobe {nprobe:3d} R {r:3d}: " + " | ".join(line)
                      + f" | default/faiss {ratio:.2f}x, /faiss-same-codes {ratio_same:.2f}x", flush=True)


def ivf_table():
    rows = [r for r in ROWS if r["part"] == "ivf" and r["metric"] in ("qps", "match_at_1")]
    if not rows:
        return
    cells = {}
    for r in rows:
        key = (r["dataset"], r["block_threshold"], r["nprobe"], r["reorder"], r["provider"])
        cells.setdefault(key, {})[r["metric"]] = r["value"]
    print(f"\n{'dataset':9s} {'T':>4s} {'nprobe':>6s} {'R':>4s} {'provider':28s} {'q/s':>8s} {'m@1':>6s}"
          "   (T: amips' threshold in that interleaved block; faiss' own PQ has none)")
    for (ds, thr, nprobe, rr, prov), v in cells.items():
        print(f"{ds:9s} {str(thr):>4s} {nprobe:6d} {rr:4d} {prov:28s} {v['qps']:8.0f} {v['match_at_1']:6.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="SciFact only, thresholds 0.2 and 0.4")
    ap.add_argument("--datasets", default="scifact,wordnet")
    ap.add_argument("--n-queries", type=int, default=2000, help="wordnet test queries used")
    ap.add_argument("--train-keys", type=int, default=20000, help="wordnet codebook sample")
    ap.add_argument("--qps-queries", type=int, default=50)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--parts", default="fig3,fig3b,side,lut,gpu")
    ap.add_argument("--ivf-lists", type=int, default=512, help="part ivf: lists of the IVF index")
    ap.add_argument("--ivf-wordlike", type=int, default=300_000,
                    help="part ivf: also on a word-vector-like set of this many keys x 100 (0: off)")
    ap.add_argument("--ivf-nprobe", default="8,16,32", help="part ivf: nprobe values")
    ap.add_argument("--ivf-reorder", default="0,20,100", help="part ivf: exact re-score depths R")
    ap.add_argument("--ivf-thresholds", default="0.2,none",
                    help="part ivf: score-aware thresholds T of amips' PQ ('none' = plain PQ)")
    ap.add_argument("--ivf-pq-iters", type=int, default=10, help="part ivf: PQ k-means iterations")
    ap.add_argument("--repeats", type=int, default=3, help="part ivf: timed repeats (best of)")
    ap.add_argument("--ivf-train-sample", type=int, default=None,
                    help="part ivf: keys amips' PQ codebooks train on (default: the library's 100,000)")
    ap.add_argument("--train-threads", type=int, default=1,
                    help="part ivf: torch threads while training (timings always use 1)")
    ap.add_argument("--plot-only", metavar="CSV", help="redraw the PNG from a CSV and exit")
    args = ap.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as fh:
            plot(Path(args.plot_only).with_suffix(".png"), list(csv.DictReader(fh)))
        return 0
    torch.set_num_threads(1)
    datasets = ["scifact"] if args.quick else [d for d in args.datasets.split(",") if d]
    missing = [d for d in datasets if not (DATA / d / "keys.npy").is_file()]
    if missing:
        print(f"no data for {missing} under {DATA}; skipped")
        datasets = [d for d in datasets if d not in missing]
    ivf_opts = dict(
        nprobes=[int(v) for v in args.ivf_nprobe.split(",")],
        reorders=[int(v) for v in args.ivf_reorder.split(",")],
        thresholds=[None if v.strip().lower() == "none" else float(v) for v in args.ivf_thresholds.split(",")],
        repeats=args.repeats, pq_iters=args.ivf_pq_iters, train_threads=args.train_threads)
    if args.ivf_train_sample:
        import amips.index.pq_scanner as pq_scanner_module

        pq_scanner_module.TRAIN_SAMPLE = args.ivf_train_sample
    thresholds = [0.2, 0.4] if args.quick else [0.1, 0.15, 0.2, 0.3, 0.4]
    parts = set(args.parts.split(","))
    dev = device_name()
    t_start = time.time()
    for name in datasets:
        keys, queries, gt_score = load(name, None if name == "scifact" else args.n_queries)
        g = torch.Generator().manual_seed(0)
        if keys.shape[0] > args.train_keys:
            train_x = keys[torch.randperm(keys.shape[0], generator=g)[:args.train_keys]]
        else:
            train_x = keys
        gt_ids = torch.from_numpy(np.load(DATA / name / "gt_test_top1.npy")[: queries.shape[0]])
        if "fig3" in parts:
            part_fig3(name, keys, queries, gt_score, train_x, thresholds, args.iters)
        if "fig3b" in parts:
            part_fig3b(name, keys, queries, gt_ids, train_x, args.iters,
                       (4, 2) if args.quick else (8, 4, 2))
        if "side" in parts:
            part_side(name, keys, queries, gt_score, train_x, args.iters, args.qps_queries)
        if "ivf" in parts and name != "scifact":
            part_ivf_default(name, keys, queries, gt_score, n_lists=args.ivf_lists,
                             subspaces=keys.shape[1] // 2, **ivf_opts)
        if "lut" in parts and name == "scifact":
            part_lut_dtype(name, keys, queries, gt_score, args.iters)
    if "ivf" in parts and args.ivf_wordlike:
        from _wordlike import word_vector_like

        wk, wq = word_vector_like(args.ivf_wordlike, args.n_queries, 100, seed=0)
        wk, wq = torch.from_numpy(wk), torch.from_numpy(wq)
        gt = torch.cat([(wq[a:a + 1024] @ wk.T).max(1).values for a in range(0, wq.shape[0], 1024)])
        part_ivf_default("wordlike", wk, wq, gt, n_lists=args.ivf_lists, subspaces=50, **ivf_opts)
    if "gpu" in parts:
        part_gpu()
    OUT.mkdir(parents=True, exist_ok=True)
    sha = git_sha()
    for row in ROWS:
        row.update(device=dev, git_sha=sha)
    fields = ["bench", "part", "provider", "dataset", "bits_per_vector", "subspaces", "threshold",
              "reorder", "nprobe", "n_lists", "n_queries", "block_threshold", "metric", "value",
              "device", "git_sha"]
    path = OUT / ("pq_quick.csv" if args.quick else "pq.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for row in ROWS:
            w.writerow({f: row.get(f, "") for f in fields})
    plot(path.with_suffix(".png"))
    print(f"\nwrote {path} ({len(ROWS)} rows) in {time.time() - t_start:.0f} s on {dev}")
    table()
    ivf_table()
    return 0


def plot(path, rows=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = ROWS if rows is None else rows
    for part, ax, metric, xkey in (("fig3a", axes[0], "recall1@10", "threshold"),
                                   ("fig3b", axes[1], "top1_rel_error", "bits_per_vector")):
        series = {}
        for r in rows:
            if r["part"] != part or r["metric"] != metric or r[xkey] == "":
                continue
            series.setdefault((r["dataset"], r["provider"]), []).append(
                (float(r[xkey]), float(r["value"])))
        for (ds, prov), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{ds} {prov}")
        ax.set_xlabel("threshold T" if xkey == "threshold" else "bits per vector")
        ax.set_ylabel(metric)
        if ax.lines:
            ax.legend(fontsize=6)
    axes[0].set_title("Recall1@10 vs T (4 dims / 4-bit subspace)")
    axes[1].set_title("relative error of top-1 inner product")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table():
    rows = [r for r in ROWS if r["metric"] in ("match@1", "recall1@10", "qps_1thread")
            and r["part"] == "side"]
    if not rows:
        return
    print(f"\n{'dataset':8s} {'provider':22s} {'bits':>5s} {'R':>4s} {'match@1':>8s} "
          f"{'R1@10':>7s} {'QPS(1t)':>9s}")
    key = {}
    for r in rows:
        key.setdefault((r["dataset"], r["provider"], r["bits_per_vector"], r["reorder"]), {})[
            r["metric"]] = r["value"]
    for (ds, prov, bits, rr), v in key.items():
        print(f"{ds:8s} {prov:22s} {bits:5d} {rr:4d} {v.get('match@1', 0):8.4f} "
              f"{v.get('recall1@10', 0):7.4f} {v.get('qps_1thread', 0):9.1f}")


if __name__ == "__main__":
    sys.exit(main())
