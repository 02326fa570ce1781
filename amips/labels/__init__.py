"""Certified-exact MIPS labels: top-1, top-k and per-partition top-1 over huge key sets.

Every answer equals an fp64 oracle (ties resolved to the lowest key index). The work is
done in three steps, the same on every device:

1. **Screen** in low precision, fast: the fused Triton kernel on a GPU (tf32/bf16 tensor
   cores, or exact fp32), and on CPU a bf16 matrix multiply with a threshold filter (CPUs
   with bf16 instructions) or faiss/torch fp32. Each screened score ``s~`` of key ``k`` comes
   with a rigorous error bound ``err = c * ||q|| * max ||k||`` (the maximum over the key
   block that produced it; ``c`` from :func:`amips.kernels.mips_topk.screening_error_bound`).
2. **Certify**: with ``LB_k`` the k-th largest lower bound ``s~ - err`` among the kept
   candidates and ``upper`` a bound on the exact score of every key *not* kept, the exact
   top-k lies inside the candidates when ``upper < LB_k``; only candidates with
   ``s~ + err >= LB_k`` can belong to it.
3. **Refine**: those candidates are re-scored in fp64 and ranked (score desc, index asc).
   A query whose candidates could not be certified (``upper >= LB_k``: too many keys within
   the bound) is screened again in exact-product fp32, whose bound is ~d·2^-24 instead of
   ~2^-7; what still fails (masses of tied keys) falls back to a full fp64 scan.

Keys larger than memory are streamed in shards from memory-mapped files; queries in
batches. :func:`run_label_job` is the resumable pipeline behind ``amips labels``.
"""

from .batch import BatchLabeler, Labeler, LabelSpec, exact_top1, exact_topk, partition_top1
from .certify import CANDIDATE_CAP, MAX_TOPK, Candidates, KeySource
from .job import MANIFEST, OUTPUT_FILES, PARTIAL_DIR, run_label_job
from .screen import resolve_precision

__all__ = [
    "exact_top1",
    "exact_topk",
    "partition_top1",
    "run_label_job",
    "Labeler",
    "resolve_precision",
    "BatchLabeler",
    "LabelSpec",
    "KeySource",
    "Candidates",
    "MAX_TOPK",
    "CANDIDATE_CAP",
    "MANIFEST",
    "OUTPUT_FILES",
    "PARTIAL_DIR",
]
