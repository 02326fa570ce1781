"""``amips tune``: a target match rate and a time budget in, the fastest index that meets it
on held-out queries out (learned routers included).

    result = amips.tune(keys, queries, target="match@1=0.95", budget_minutes=30, out="tuned")
    result.chosen          # IVFIndex.search keyword arguments: nprobe, router, scanner, reorder, probe_margin
    result.index_dir       # the chosen index folder (IVFIndex.load, amips eval)
    result.frontier        # the Pareto frontier (validation metric vs QPS)

The search order, pruning and stopping rules are in :mod:`amips.tune._tuner`; docs/tune.md
is the user's guide.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._validate import InputError, check_device, check_matrix, check_positive_int, to_tensor
from ._quality import Target, parse_target
from ._report import lines as report_lines
from ._report import read_report

__all__ = ["tune", "TuneResult", "Target", "parse_target", "read_report", "report_lines", "NOT_REACHED"]

NOT_REACHED = 3  # the CLI's exit status when the target was not reached within the budget


@dataclass
class TuneResult:
    """What ``tune`` found. ``chosen`` is None when the target was not reached."""

    reached: bool
    chosen: dict | None
    point: dict | None
    test: dict | None
    frontier: list[dict]
    memory_frontier: list[dict]
    index_dir: Path | None
    report_path: Path
    report: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_report(cls, out: Path, report: dict) -> TuneResult:
        return cls(reached=bool(report["reached"]), chosen=report.get("chosen"), point=report.get("chosen_point"),
                   test=report.get("test"), frontier=report["frontier"], memory_frontier=report["memory_frontier"],
                   index_dir=Path(report["index_dir"]) if report.get("index_dir") else None,
                   report_path=Path(out) / "report.json", report=report)

    def summary(self) -> str:
        return "\n".join(report_lines(self.report))


def _array(x, name: str) -> np.ndarray:
    if isinstance(x, (str, os.PathLike)):
        from ..data import load_array

        x = load_array(x, name=name)
    t = check_matrix(to_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, name), name)
    return np.ascontiguousarray(t.detach().cpu().float().numpy())


def tune(
    keys,
    queries,
    *,
    target="match@1=0.95",
    metric: str | None = None,
    out,
    budget_minutes: float = 30.0,
    memory_gb: float | None = None,
    threads: int = 1,
    build_threads: int | None = None,
    device: str = "cpu",
    test_queries=None,
    overwrite: bool = False,
    seed: int = 0,
    repeats: int = 3,
    n_val: int | None = None,
    n_test: int | None = None,
    router_widths=None,
    train_steps: int | None = None,
    se_margin: float = 1.645,
    progress: bool = True,
    log=None,
) -> TuneResult:
    """Find the fastest IVF configuration whose ``metric`` reaches ``target`` on held-out queries.

    ``keys`` [n, d] and ``queries`` [m, d] (arrays, tensors or paths): the queries are split
    by query into train (routers), validation (choice) and test (the reported figures);
    ``test_queries`` replaces the test split. ``target``: ``"match@1=0.95"``,
    ``"recall@10=0.9"`` or a number with ``metric``. ``budget_minutes`` bounds the wall
    time (checked between configurations); ``memory_gb`` bounds the chosen index's memory.
    ``threads``: search threads while timing; builds and training use ``build_threads``
    (default: every core). A point counts as meeting the target when its validation metric
    minus ``se_margin`` standard errors reaches it (1.645: one-sided 95%). ``out``: the output folder, resumable (state/ inside); a rerun
    with the same inputs and options resumes, other ones are refused unless ``overwrite``.
    """
    from ._finish import finish
    from ._state import State
    from ._tuner import OutOfBudget, Tuner

    tgt = parse_target(target, metric)
    try:
        budget = float(budget_minutes)
    except (TypeError, ValueError):
        raise InputError(f"budget_minutes: expected a number of minutes, got {budget_minutes!r}") from None
    if not np.isfinite(budget) or budget <= 0:
        raise InputError(f"budget_minutes: expected a positive number of minutes, got {budget_minutes!r}")
    mem = None
    if memory_gb is not None:
        try:
            mem = float(memory_gb) * 2**30
        except (TypeError, ValueError):
            raise InputError(f"memory_gb: expected a number, got {memory_gb!r}") from None
        if not np.isfinite(mem) or mem <= 0:
            raise InputError(f"memory_gb: expected a positive number, got {memory_gb!r}")
    try:
        se_margin = float(se_margin)
    except (TypeError, ValueError):
        raise InputError(f"se_margin: expected a number of standard errors, got {se_margin!r}") from None
    if not np.isfinite(se_margin) or se_margin < 0:
        raise InputError(f"se_margin: expected a number >= 0, got {se_margin!r}")
    threads = check_positive_int(threads, "threads")
    build_threads = check_positive_int(build_threads or os.cpu_count() or 1, "build_threads")
    repeats = check_positive_int(repeats, "repeats")
    dev = check_device(device, "device")
    if out is None:
        raise InputError("out: an output folder is required")
    out = Path(out)
    log = log or (lambda msg: print(msg, flush=True))
    keys_np = _array(keys, "keys")
    q_np = _array(queries, "queries")
    if q_np.shape[1] != keys_np.shape[1]:
        raise InputError(f"queries: d = {q_np.shape[1]}, keys have d = {keys_np.shape[1]}")
    test_np = None
    if test_queries is not None:
        test_np = _array(test_queries, "test_queries")
        if test_np.shape[1] != keys_np.shape[1]:
            raise InputError(f"test_queries: d = {test_np.shape[1]}, keys have d = {keys_np.shape[1]}")
    if keys_np.shape[0] < 16:
        raise InputError(f"keys: need at least 16 keys to build an index, got {keys_np.shape[0]}")
    from ..provenance import fingerprint

    fp = {"version": 1, "keys": fingerprint(keys_np), "queries": fingerprint(q_np),
          "test_queries": None if test_np is None else fingerprint(test_np), "target": str(tgt),
          "memory_gb": memory_gb, "threads": threads, "device": str(dev), "seed": seed, "repeats": repeats,
          "n_val": n_val, "n_test": n_test, "router_widths": None if router_widths is None else list(router_widths),
          "train_steps": train_steps, "se_margin": float(se_margin)}
    state = State(out)
    resumed = state.open(fp, overwrite=overwrite)
    done = state.root / "done.json"
    if resumed and done.exists() and (out / "report.json").exists():
        import json

        if float(json.loads(done.read_text()).get("budget_s", 0)) >= budget * 60 - 1e-6:
            report = read_report(out)
            return TuneResult.from_report(out, report)
        done.unlink()  # a larger budget: continue where the last run stopped, with what is left
    if resumed:
        log(f"resuming the tune in {out} ({len(state.points())} operating points already measured)")
    tuner = Tuner(keys_np, q_np, test_np, tgt, out, budget_s=budget * 60, memory_bytes=mem, threads=threads,
                  build_threads=build_threads, device=dev, seed=int(seed), repeats=repeats, n_val=n_val,
                  n_test=n_test, router_widths=router_widths, train_steps=train_steps, log=log, progress=progress,
                  se_margin=se_margin)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=int(budget * 60), unit="s", desc="amips tune", leave=False)
        tuner.pbar = pbar
    stopped = False
    t0 = time.time()
    try:
        tuner.prepare()
        try:
            tuner.run()
        except OutOfBudget:
            stopped = True
            log(f"budget reached after {(time.time() - t0) / 60:.1f} min: finishing with what was measured")
        stopped_at = tuner.elapsed()
        report = finish(tuner, stopped_by_budget=stopped, stopped_at_s=stopped_at)
    finally:
        if pbar is not None:
            pbar.close()
    return TuneResult.from_report(out, report)
