"""``amips verify PATH``: check any amips artifact on demand (index, labels folder, training
run, recommender run, demo run): finished, manifest well formed, every file the size and
content (blake2b) it was written with, arrays of the recorded shapes. Prints ``OK`` and
exits 0, or one line saying what is wrong and exits 2."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .._validate import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check an index, labels folder, training or recommender run: finished and untampered",
        description=(
            "Check an amips artifact: that it finished, that its manifest is well formed, and "
            "that every file it records has the size and content (blake2b) it was written with. "
            "Prints OK (exit 0) or what is wrong (exit 2)."
        ),
    )
    p.add_argument("path", help="an artifact folder (INDEXDIR, labels --out, train --out, mol train --out, demo --out)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._outputs import artifact_kind

    root = Path(args.path)
    if not root.exists():
        raise InputError(f"path: no such file or folder: {root}")
    if not root.is_dir():
        raise InputError(f"path: {root} is a file; amips verify checks artifact folders")
    kind = artifact_kind(root)
    if kind is None:
        raise InputError(f"path: {root} is not an amips artifact (no index, labels, run or demo manifest)")
    t0 = time.perf_counter()
    detail = verify_artifact(root, kind)
    print(f"OK: {kind} {root}: {detail} ({time.perf_counter() - t0:.2f} s)")
    return 0


def verify_artifact(root: Path, kind: str) -> str:
    """Check the artifact ``root`` of ``kind``; an InputError says what is wrong."""
    return {"index": _index, "labels": _labels, "training run": _training_run, "mol run": _mol_run,
            "demo run": _demo}[kind](root)


def _bytes(root: Path, record: dict | None) -> str:
    record = record or {}
    total = sum(int(e.get("size", 0)) for e in record.values() if isinstance(e, dict))
    return f"{len(record)} files, {total / 1e6:.1f} MB checked"


def _index(root: Path) -> str:
    from ..index.ivf import IVFIndex, read_index_json

    index = IVFIndex.load(root)  # manifest, every file's size and content, array shapes
    cfg = read_index_json(root)
    if cfg.get("files") is None:
        return f"{index!r}; made by an older amips: no content record (sizes and partitions checked)"
    return f"{index.n_keys:,} keys x {index.d}, {index.n_lists} lists; {_bytes(root, cfg['files'])}"


def _labels(root: Path) -> str:
    from .._io import check_files, load_npy, read_json

    if (root / ".amips_labels_partial").exists() or not (root / "labels.json").exists():
        raise InputError(f"labels: {root} is an unfinished labels job; rerun the same `amips labels` "
                         "command to finish it")
    manifest = read_json(root / "labels.json", "labels",
                         fields={"complete": bool, "outputs": dict, "n_queries": int, "n_keys": int})
    if not manifest["complete"]:
        raise InputError(f"labels: {root / 'labels.json'} records an unfinished job")
    if manifest.get("files") is None:
        raise InputError(f"labels: {root / 'labels.json'} has no record of its files (made by an older "
                         "amips); recompute with `amips labels --overwrite`")
    check_files(root, manifest["files"], "labels")
    nq = manifest["n_queries"]
    for name, file in manifest["outputs"].items():
        arr = load_npy(root / str(file), "labels", kind="iu" if name.endswith("_index") else "f", mmap=True)
        if arr.shape[0] != nq:
            raise InputError(f"labels: {root / str(file)} has {arr.shape[0]} rows, labels.json says {nq} queries")
        if name.endswith("_index") and arr.size and int(arr.max()) >= manifest["n_keys"]:
            raise InputError(f"labels: {root / str(file)} holds key id {int(arr.max())} >= n_keys "
                             f"{manifest['n_keys']}")
    return f"{nq:,} queries x {manifest['n_keys']:,} keys; {_bytes(root, manifest['files'])}"


def _training_run(root: Path) -> str:
    from .._io import read_json
    from ..models import load_model

    model = load_model(root)  # finished, files as recorded, weights that fit the config
    state = read_json(root / "state.json", "rundir")
    if state.get("files") is None:
        return f"{model.kind} model, step {state.get('step')}; made by an older amips: no content record"
    return f"{model.kind} model, {state.get('step')} of {state.get('steps')} steps; {_bytes(root, state['files'])}"


def _mol_run(root: Path) -> str:
    from ..mol.recommender import load
    from ..provenance import check_mol_run

    metrics = check_mol_run(root)
    rec = load(root)
    return f"{rec.similarity} recommender, {metrics.get('epochs_run')} epochs; {_bytes(root, metrics.get('files'))}"


def _demo(root: Path) -> str:
    from .._outputs import artifact_kind

    if not (root / "results.json").exists():
        raise InputError(f"demo: {root} has no results.json: the demo did not finish; rerun it with --overwrite")
    parts = []
    for sub in [root / "index", *sorted((root / "runs").glob("*"))]:
        kind = artifact_kind(sub)
        if kind is not None:
            verify_artifact(sub, kind)
            parts.append(sub.name)
    return f"results.json and {len(parts)} artifacts checked ({', '.join(parts)})"
