"""Atomic file writes and input fingerprints shared by every long job.

A file is written to ``<name>.tmp`` in the same folder, flushed and fsynced, then renamed
over its final name with ``os.replace`` (atomic on POSIX): a reader, or a job resumed after
a kill -9, sees either the old complete file or the new complete one, never a torn write.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(fh)`` on a temporary file, fsync it, then move it over ``path``.

    The temporary name carries the process id, so concurrent writers never share one, and it
    is removed if ``write`` fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    return atomic_write(path, lambda fh: np.save(fh, array))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Identity of an input file: path, size, mtime and a hash of its first and last MiB."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if st.st_size > (2 << 20):
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256_head_tail": h.hexdigest()}


_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: ``AMIPS_FAULT_POINT=name[:n]`` kills this process (SIGKILL, like ``kill -9``)
    the n-th time (default 1st) execution passes ``fault_point(name)``.

    The points sit between two final writes of the long jobs (labels outputs, training's
    last checkpoint and state, the index files), so tests can check deterministically that
    a job killed while writing its final outputs leaves nothing complete-looking and
    resumes to the same outputs. Unset (the normal case) it costs one dict lookup.
    """
    spec = os.environ.get("AMIPS_FAULT_POINT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(count or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
