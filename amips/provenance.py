"""Provenance: what every artifact was computed from, and whether it is complete.

Every artifact folder records fingerprints of its inputs in its manifest, and every consumer
checks them before use, so labels, models and indexes made from *other* data are refused
instead of silently giving wrong answers:

================  =====================================  ===================================
artifact          manifest (written last)                 ``inputs`` fingerprinted
================  =====================================  ===================================
labels folder     ``labels.json`` (``complete: true``)    keys, queries, partitions
training run      ``config.json`` + ``state.json``        keys, queries, partitions
                  (the run is complete when
                  ``state.json``'s step equals the step
                  of ``model.safetensors``)
IVF index         ``index.json`` (``complete: true``)     keys, partitions
================  =====================================  ===================================

Consumers: ``train --labels`` checks keys, queries and partitions against ``labels.json``;
a router or KeyNet checks its run's keys (and partitions) against the index's;
``train --partitions INDEXDIR/partitions.npy`` requires a complete index whose
``partitions_sha256`` matches the file and whose keys are the training keys.

A fingerprint is ``{"shape", "dtype", "sha256", "rows_hashed"}``. The hash is over the
*values* (little-endian float64 for vectors, int64 for ids, in row-major order, with the
shape), so the same numbers stored as float16, float32, float64 or integers hash the same
and an exact conversion (fp16 -> fp32) does not break provenance. Arrays of at most
``FULL_HASH_ROWS`` rows are hashed whole; larger ones are hashed on ``SAMPLED_ROWS`` rows
evenly spaced from the first to the last (``rows_hashed`` says how many): a cheap sampled
hash that catches any change of shape and any change touching the sampled rows, computed
in the same way by producer and consumer (the sample depends only on the shape).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._validate import InputError

FINGERPRINT_VERSION = 1
FULL_HASH_ROWS = 65536
SAMPLED_ROWS = 4096
_CHUNK_ROWS = 8192
# files an index folder holds while its build or save is under way
INDEX_UNFINISHED_MARKERS = (".kmeans-stage.json", ".incomplete")


def _rows(x: Any, index: np.ndarray | slice) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        block = x[torch.as_tensor(index) if isinstance(index, np.ndarray) else index].detach().cpu()
        if block.dtype == torch.bfloat16:
            block = block.float()
        return block.numpy()
    return np.asarray(x[index])


def fingerprint(x: Any) -> dict:
    """Fingerprint of an array or tensor (see the module docstring)."""
    if isinstance(x, (str, os.PathLike)):
        from .data import load_array

        x = load_array(x, name="fingerprint")
    shape = tuple(int(s) for s in x.shape)
    dtype = str(x.dtype).replace("torch.", "")
    n = shape[0] if shape else 0
    canon = np.int64 if (len(shape) == 1 and ("int" in dtype)) else np.float64
    h = hashlib.sha256()
    h.update(json.dumps({"v": FINGERPRINT_VERSION, "shape": shape}).encode())
    if n <= FULL_HASH_ROWS:
        chunks = [slice(a, min(a + _CHUNK_ROWS, n)) for a in range(0, n, _CHUNK_ROWS)]
        rows_hashed = n
    else:
        sample = np.unique(np.linspace(0, n - 1, SAMPLED_ROWS).round().astype(np.int64))
        chunks = [sample]
        rows_hashed = int(sample.size)
    for index in chunks:
        block = np.ascontiguousarray(_rows(x, index), dtype=canon)
        h.update(block.astype(block.dtype.newbyteorder("<"), copy=False).tobytes())
    return {"shape": list(shape), "dtype": dtype, "sha256": h.hexdigest(), "rows_hashed": rows_hashed}


def describe(fp: dict | None) -> str:
    if not fp:
        return "nothing recorded"
    shape = "x".join(str(s) for s in fp.get("shape", []))
    return f"{shape} {fp.get('dtype')} sha256 {str(fp.get('sha256'))[:12]}"


def same(a: dict | None, b: dict | None) -> bool:
    """Two fingerprints name the same data (shape and value hash; dtype is informational)."""
    if not a or not b:
        return False
    return list(a.get("shape", [])) == list(b.get("shape", [])) and a.get("sha256") == b.get("sha256")


def check_same(name: str, recorded_side: str, recorded: dict | None, given_side: str, given: dict,
               fix: str) -> None:
    """InputError naming both sides when ``recorded`` differs from ``given``: ``name: <recorded
    side: ... other X> (<its fingerprint>) than <given side> (<its fingerprint>); <fix>``."""
    if same(recorded, given):
        return
    raise InputError(
        f"{name}: {recorded_side} ({describe(recorded)}) than {given_side} ({describe(given)}); {fix}"
    )


def _read_json(path: Path, name: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{name}: cannot read {path} ({exc.__class__.__name__}: {exc})") from None


# --------------------------------------------------------------------------------------
# labels folders (amips labels)
# --------------------------------------------------------------------------------------
def check_labels_dir(labels_dir, *, keys, queries, partitions=None) -> dict:
    """Verify that ``labels_dir`` is a complete labels folder made from these inputs."""
    root = Path(labels_dir)
    if not root.is_dir():
        raise InputError(f"labels: {root} is not a folder")
    manifest_path = root / "labels.json"
    fix = f"recompute them with `amips labels --out {root} --overwrite` for these inputs"
    if not manifest_path.exists():
        raise InputError(
            f"labels: {root} has no labels.json: the labels job did not finish (or this is not a "
            f"labels folder); rerun the same `amips labels` command to finish it"
        )
    manifest = _read_json(manifest_path, "labels")
    if not isinstance(manifest, dict):
        raise InputError(f"labels: {manifest_path} is not a JSON object (hand-edited or corrupt); {fix}")
    inputs = manifest.get("inputs")
    if manifest.get("complete") is True and inputs is not None and (
            not isinstance(inputs, dict)
            or any(not isinstance(inputs.get(n), (dict, type(None))) for n in ("keys", "queries", "partitions"))):
        raise InputError(f"labels: {manifest_path} field 'inputs' is not a set of fingerprints (hand-edited "
                         f"or corrupt); {fix}")
    if not manifest.get("complete") or "inputs" not in manifest:
        raise InputError(
            f"labels: {manifest_path} records no complete job with input fingerprints (made by an "
            f"older amips or interrupted); {fix}"
        )
    if manifest.get("files") is not None:
        from ._io import check_files

        check_files(root, manifest["files"], "labels")  # the outputs as they were written
    inputs = manifest["inputs"]
    for name, given in (("keys", keys), ("queries", queries)):
        check_same(name, f"the labels in {root} were computed for other {name}", inputs.get(name),
                   f"the given {name}", fingerprint(given), fix)
    if partitions is not None:
        if inputs.get("partitions") is None:
            raise InputError(
                f"partitions: labels in {root} were computed without partitions; {fix} --partitions"
            )
        check_same("partitions", f"the labels in {root} were computed for other partitions",
                   inputs.get("partitions"), "the given partitions", fingerprint(partitions), fix)
    return manifest


# --------------------------------------------------------------------------------------
# index folders (amips index build)
# --------------------------------------------------------------------------------------
def check_partitions_file(path, *, keys) -> None:
    """``train --partitions FILE``: when FILE sits in an index folder, that index must be
    complete, hold this very file, and have been built from ``keys``."""
    from ._io import sha256_file

    p = Path(path)
    root = p.parent
    index_json = root / "index.json"
    markers = any((root / m).exists() for m in INDEX_UNFINISHED_MARKERS)
    looks_like_index = index_json.exists() or markers or (root / "lists.safetensors").exists()
    if not looks_like_index:
        return  # a standalone partitions file (and centroids.npy): nothing to check against
    # index.json exists only once IVFIndex.save finished (it is removed first and written
    # last); a leftover k-means stage file beside it is only an unfinished clean-up
    if not index_json.exists() or (root / ".incomplete").exists():
        raise InputError(
            f"partitions: {p} belongs to an index build that did not finish ({root} has no "
            f"complete index.json); rerun `amips index build ... --out {root}` to finish it"
        )
    cfg = _read_json(index_json, "partitions")
    if cfg.get("partitions_sha256") != sha256_file(p):
        raise InputError(
            f"partitions: {p} does not match {index_json} (partitions_sha256 "
            f"{str(cfg.get('partitions_sha256'))[:12]}...): the index is being rebuilt or the "
            f"file was modified; rebuild the index with `amips index build --overwrite`"
        )
    recorded = (cfg.get("inputs") or {}).get("keys")
    if recorded is not None:
        check_same("keys", f"the index in {root} was built from other keys", recorded,
                   "the given keys", fingerprint(keys), "train on the keys the index was built from")


def check_model_for_index_keys(model, index) -> None:
    """A router / KeyNet must have been trained on the index's keys (when both record them)."""
    cfg = getattr(model, "config", None) or {}
    theirs = (cfg.get("inputs") or {}).get("keys")
    ours = index_keys_fingerprint(index)
    if theirs is None or ours is None:
        if isinstance(cfg, dict) and cfg.get("rundir") and theirs is None:
            warnings.warn(
                "router: the model's run records no key fingerprint (trained by an older amips); "
                "cannot verify it was trained on this index's keys",
                stacklevel=3,
            )
        return
    check_same("router", f"the {cfg.get('kind', 'model')} model in {cfg.get('rundir', '?')} was trained "
               "on other keys", theirs, "the index's keys", ours,
               "train the model on the keys this index was built from")


def index_keys_fingerprint(index) -> dict | None:
    inputs = getattr(index, "inputs", None) or {}
    if inputs.get("keys") is not None:
        return inputs["keys"]
    if index.keys_by_list.dtype == torch.float32:
        # built in memory without a record: the stored keys are the keys, exactly
        fp = fingerprint(index.keys())
        index.inputs = {**inputs, "keys": fp}
        return fp
    return None


# --------------------------------------------------------------------------------------
# training runs (amips train)
# --------------------------------------------------------------------------------------
def run_status(root: Path) -> tuple[bool, int | None, int | None]:
    """(complete, step of model.safetensors, total steps) for a run folder."""
    step = None
    try:
        from safetensors import safe_open

        with safe_open(str(root / "model.safetensors"), framework="pt") as fh:
            step = int((fh.metadata() or {}).get("step", -1))
    except Exception:  # noqa: BLE001 - a truncated file is reported by the loader
        step = None
    state_path = root / "state.json"
    total = None
    cfg_path = root / "config.json"
    try:
        total = int(json.loads(cfg_path.read_text())["train"]["steps"])
    except Exception:  # noqa: BLE001 - reported by the loader
        total = None
    if not state_path.exists():
        return False, step, total
    try:
        state = json.loads(state_path.read_text())
        same_step = step is not None and int(state.get("step", -2)) == step
    except (OSError, ValueError, TypeError, AttributeError):
        return False, step, total
    # a run stopped early (--max-minutes, or by any other cause) is not finished, whatever
    # its last checkpoint says; runs from before "finished" was recorded count by their step
    finished = state.get("finished", True) is True and not state.get("stopped_early", False)
    return (same_step and finished), step, total


def check_run_finished(root, *, allow_unfinished: bool = False, content: bool = True) -> None:
    """A finished run whose files are as recorded; an unfinished one refused (or, with
    ``allow_unfinished``, warned about)."""
    from ._io import check_files

    root = Path(root)
    complete, step, total = run_status(root)
    if complete:
        state = _read_json(root / "state.json", "rundir")
        if state.get("files") is not None:
            check_files(root, state["files"], "rundir", content=content)
        return
    where = f"step {step if step is not None else '?'} of {total if total is not None else '?'}"
    if allow_unfinished:
        warnings.warn(f"rundir: {root} is an unfinished run; using its latest checkpoint ({where})",
                      stacklevel=3)
        return
    why = "the run was interrupted or is still running"
    try:
        if json.loads((root / "state.json").read_text()).get("stopped_early"):
            why = "the run stopped early, at its --max-minutes limit"
    except (OSError, ValueError, AttributeError):
        pass
    raise InputError(
        f"rundir: {root} is an unfinished training run (model.safetensors is from {where}; "
        f"{why}); rerun `amips train ... --resume` to "
        "finish it, or pass --allow-unfinished (allow_unfinished=True) to use the latest checkpoint"
    )


def run_inputs(keys, queries, partition_ids=None, *, labels_dir=None, partitions_path=None) -> dict:
    """Fingerprints a training run records in ``config.json`` (``inputs``), after checking
    the labels folder and the partitions file it was given against the same inputs."""
    if partitions_path is not None:
        check_partitions_file(partitions_path, keys=keys)
    if labels_dir is not None:
        check_labels_dir(labels_dir, keys=keys, queries=queries, partitions=partition_ids)
    return {
        "keys": fingerprint(keys),
        "queries": fingerprint(queries),
        "partitions": fingerprint(partition_ids) if partition_ids is not None else None,
    }


def check_resume(recorded: dict | None, given: dict, root) -> None:
    """``train --resume``: the run continues on the inputs it started with (runs from before
    provenance recorded none and are checked by their shapes only)."""
    if not recorded:
        return
    for name in ("keys", "queries", "partitions"):
        if recorded.get(name) is None and given.get(name) is None:
            continue
        check_same(name, f"the run in {root} was started on other {name}", recorded.get(name),
                   f"the given {name}", given.get(name),
                   "resume with the inputs the run started with, or start a new run (--overwrite)")


# --------------------------------------------------------------------------------------
# recommender runs (amips mol train)
# --------------------------------------------------------------------------------------
def check_mol_run(model_dir, ratings=None, *, content: bool = True) -> dict:
    """A finished ``amips mol train`` folder whose files are as recorded and, given
    ``ratings``, trained on that very file (by content). Returns its metrics.json."""
    from ._io import check_files, content_fingerprint, file_fingerprint, read_json

    root = Path(model_dir)
    if not root.exists():
        raise InputError(f"model: no such folder: {root}")
    if not root.is_dir():
        raise InputError(f"model: {root} is not a folder (expected the --out folder of `amips mol train`)")
    cfg = read_json(root / "config.json", "model", fields={"similarity": str, "model": dict, "n_items": int})
    if not (root / "metrics.json").exists():
        raise InputError(f"model: {root} is an unfinished training run (no metrics.json: stopped by "
                         "--max-minutes, interrupted or still running); rerun `amips mol train ... --resume`")
    metrics = read_json(root / "metrics.json", "model")
    if metrics.get("files") is not None:
        check_files(root, metrics["files"], "model", content=content)
    if ratings is not None:
        p = Path(ratings)
        if not p.is_file():
            raise InputError(f"ratings: no such file: {p}")
        recorded = cfg.get("ratings_content")
        if isinstance(recorded, dict):
            given = content_fingerprint(p)
            same_file = given["size"] == recorded.get("size") and given["blake2b"] == recorded.get("blake2b")
        else:  # runs from before the whole-content fingerprint
            given = file_fingerprint(p)
            old = cfg.get("ratings") or {}
            same_file = given["size"] == old.get("size") and given["sha256_head_tail"] == old.get("sha256_head_tail")
        if not same_file:
            raise InputError(f"ratings: {p} is not the file the model in {root} was trained on (content "
                             "differs); evaluate on the training ratings file, or train on this one")
    return metrics
