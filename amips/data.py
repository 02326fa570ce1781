"""Data input: key and query matrices from disk, dataset folders, and synthetic data.

Formats (chosen by file suffix):
- ``.npy``: memory-mapped (``np.load(mmap_mode="r")``), never read whole when streaming.
- ``.fvecs`` / ``.ivecs`` / ``.bvecs``: the TEXMEX format (per row: int32 dimension, then
  the row as float32 / int32 / uint8), memory-mapped as a strided view.
- ``.hdf5`` / ``.h5``: ann-benchmarks files (datasets ``train``, ``test``, ``neighbors``);
  name one with ``file.hdf5:train``. Needs ``h5py`` (``pip install "amips[hdf5]"``).
- a folder with ``keys.npy``, ``queries_train.npy``, ``queries_test.npy`` (optionally
  ``gt_test_top1.npy``): the layout of the real datasets in ``../shared/data``.

fp16 inputs stay fp16 on disk and in memory maps; :func:`rows_float32` upcasts the rows a
computation reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._validate import InputError

VEC_DTYPES = {".fvecs": np.float32, ".ivecs": np.int32, ".bvecs": np.uint8}
HDF5_SUFFIXES = (".hdf5", ".h5")


def _split_hdf5(path: str | os.PathLike) -> tuple[Path, str | None]:
    text = str(path)
    for suffix in HDF5_SUFFIXES:
        marker = suffix + ":"
        if marker in text:
            head, _, name = text.partition(marker)
            return Path(head + suffix), name
    return Path(text), None


def load_array(path: str | os.PathLike, *, name: str = "path", mmap: bool = True) -> np.ndarray:
    """Load a 2-D array (or 1-D ids) from ``.npy``, ``.fvecs``/``.ivecs``/``.bvecs`` or HDF5.

    ``.npy`` and the ``*vecs`` formats are memory-mapped when ``mmap`` is true.
    """
    file, dataset = _split_hdf5(path)
    if not file.exists():
        raise InputError(f"{name}: no such file: {file}")
    if file.is_dir():
        raise InputError(f"{name}: {file} is a folder; expected a .npy, .fvecs, .ivecs, .bvecs or .hdf5 file")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            why = "it is empty (0 bytes)" if file.stat().st_size == 0 else f"{exc.__class__.__name__}: {exc}"
            raise InputError(
                f"{name}: cannot read {file} as .npy ({why}); it is truncated or not a .npy file"
            ) from None
        if not isinstance(array, np.ndarray):
            raise InputError(f"{name}: {file} holds no array")
        return array
    if suffix in VEC_DTYPES:
        return _load_vecs(file, VEC_DTYPES[suffix], name=name, mmap=mmap)
    if suffix in HDF5_SUFFIXES:
        return _load_hdf5(file, dataset or "train", name=name)
    raise InputError(
        f"{name}: unsupported file type {suffix!r} ({file}); "
        "expected .npy, .fvecs, .ivecs, .bvecs, .hdf5 or .h5"
    )


def _load_vecs(file: Path, dtype, *, name: str, mmap: bool) -> np.ndarray:
    size = file.stat().st_size
    if size < 4:
        raise InputError(f"{name}: {file} is empty")
    d = int(np.fromfile(file, dtype=np.int32, count=1)[0])
    itemsize = np.dtype(dtype).itemsize
    row_bytes = 4 + d * itemsize
    if d <= 0 or size % row_bytes:
        raise InputError(f"{name}: {file} is not a valid {file.suffix} file (d = {d}, {size} bytes)")
    n = size // row_bytes
    raw = np.memmap(file, dtype=np.uint8, mode="r", shape=(n, row_bytes)) if mmap else (
        np.fromfile(file, dtype=np.uint8).reshape(n, row_bytes)
    )
    dims = raw[:, :4].copy().view(np.int32).ravel() if n <= 1_000_000 else None
    if dims is not None and not np.all(dims == d):
        raise InputError(f"{name}: {file} has rows of different dimensions")
    return raw[:, 4:].view(dtype)


def _load_hdf5(file: Path, dataset: str, *, name: str) -> np.ndarray:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise InputError(f"{name}: reading HDF5 needs h5py: pip install 'amips[hdf5]'") from exc
    try:
        handle = h5py.File(file, "r")
    except OSError as exc:
        raise InputError(f"{name}: cannot read {file} as HDF5 ({exc}); it is truncated or not HDF5") from None
    with handle:
        if dataset not in handle:
            raise InputError(
                f"{name}: {file} has no dataset {dataset!r} (it has {sorted(handle.keys())})"
            )
        return np.asarray(handle[dataset])


def rows_float32(array, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of a (memory-mapped) array as a contiguous fp32 CPU tensor."""
    block = np.asarray(array[start:stop])
    if block.dtype.kind not in "fiu":
        raise InputError(f"expected numeric rows, got dtype {block.dtype}")
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))


@dataclass
class Dataset:
    """Keys and query splits of a MIPS dataset (arrays may be memory maps)."""

    keys: np.ndarray
    queries_train: np.ndarray | None
    queries_test: np.ndarray
    gt_test_top1: np.ndarray | None = None
    name: str = "dataset"

    def describe(self) -> str:
        n_train = 0 if self.queries_train is None else len(self.queries_train)
        return (
            f"{self.name}: {self.keys.shape[0]:,} keys x {self.keys.shape[1]} "
            f"({self.keys.dtype}), {n_train:,} train / {len(self.queries_test):,} test queries"
        )


def load_dataset(folder: str | os.PathLike) -> Dataset:
    """Load a dataset folder (``keys.npy``, ``queries_train.npy``, ``queries_test.npy``)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"data: {root} is not a folder")
    if not (root / "keys.npy").exists():
        raise InputError(f"data: {root} has no keys.npy")
    if not (root / "queries_test.npy").exists():
        raise InputError(f"data: {root} has no queries_test.npy")
    train = root / "queries_train.npy"
    gt = root / "gt_test_top1.npy"
    return Dataset(
        keys=load_array(root / "keys.npy", name="keys"),
        queries_train=load_array(train, name="queries_train") if train.exists() else None,
        queries_test=load_array(root / "queries_test.npy", name="queries_test"),
        gt_test_top1=np.load(gt) if gt.exists() else None,
        name=root.name,
    )


def synthetic(
    n_keys: int = 20_000,
    n_queries: int = 4_000,
    d: int = 64,
    *,
    n_clusters: int = 64,
    unit_norm: bool = True,
    norm_spread: float = 0.3,
    query_shift: float = 0.5,
    cluster_spread: float = 0.35,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Seeded document-like embeddings: clustered keys, queries from a shifted distribution.

    Keys are cluster centres plus noise; with ``unit_norm=False`` their norms vary
    log-normally (``norm_spread``), as in recommender catalogues. Queries mix the same
    centres with a random shift of strength ``query_shift`` so that their distribution differs
    from the keys' (the setting in which learning from queries pays). Queries are unit-norm.
    """
    if min(n_keys, n_queries, d, n_clusters) < 1:
        raise InputError("synthetic: n_keys, n_queries, d and n_clusters must be >= 1")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    assign = rng.choice(n_clusters, size=n_keys, p=weights)
    keys = centres[assign] + cluster_spread * rng.standard_normal((n_keys, d)) / np.sqrt(d)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    if not unit_norm:
        keys *= rng.lognormal(mean=0.0, sigma=norm_spread, size=(n_keys, 1))
    shift = rng.standard_normal(d)
    shift /= np.linalg.norm(shift)
    q_assign = rng.choice(n_clusters, size=n_queries)
    queries = (
        centres[q_assign]
        + query_shift * shift
        + 1.5 * cluster_spread * rng.standard_normal((n_queries, d)) / np.sqrt(d)
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    n_test = max(1, int(round(n_queries * test_fraction)))
    return Dataset(
        keys=keys.astype(np.float32),
        queries_train=queries[n_test:].astype(np.float32) if n_queries > n_test else None,
        queries_test=queries[:n_test].astype(np.float32),
        name=f"synthetic-{n_keys}x{d}-seed{seed}",
    )


def save_dataset(dataset: Dataset, folder: str | os.PathLike) -> Path:
    """Write a dataset in the folder layout :func:`load_dataset` reads."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "keys.npy", np.asarray(dataset.keys))
    np.save(root / "queries_test.npy", np.asarray(dataset.queries_test))
    if dataset.queries_train is not None:
        np.save(root / "queries_train.npy", np.asarray(dataset.queries_train))
    if dataset.gt_test_top1 is not None:
        np.save(root / "gt_test_top1.npy", np.asarray(dataset.gt_test_top1))
    return root
