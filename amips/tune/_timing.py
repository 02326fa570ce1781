"""Wall-clock timing the way bench/ measures: fixed threads, best of a few repeats,
interleaved across configurations (each round calls every configuration once), the
router's cost inside every timed call."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def set_threads(n: int) -> None:
    """torch and faiss (when installed) thread counts."""
    torch.set_num_threads(int(n))
    try:
        import faiss

        faiss.omp_set_num_threads(int(n))
    except ImportError:
        pass


@contextlib.contextmanager
def threads(n: int, restore: int):
    set_threads(n)
    try:
        yield
    finally:
        set_threads(restore)


def best_of(fn: Callable[[], object], repeats: int = 3, device=None) -> tuple[float, object]:
    """Seconds of the fastest of ``repeats`` calls, and the last call's result."""
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def interleaved(fns: Sequence[Callable[[], object]], repeats: int = 3, device=None) -> list[float]:
    """Best-of-``repeats`` seconds of every call, timed round-robin (one call of each per round),
    so slow drifts of a shared machine hit every configuration alike."""
    best = [math.inf] * len(fns)
    for _ in range(max(1, repeats)):
        for i, fn in enumerate(fns):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
    return best
