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

from ._validate import InputError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(fh)`` on a temporary file, fsync it, then move it over ``path``.

    The temporary name carries the process id, so concurrent writers never share one, and it
    is removed if ``write`` fails. ``write`` gets a file object that hashes what passes
    through it, so :func:`file_digest` of the new file costs no second read.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            hashing = _HashingWriter(fh)
            write(hashing)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        st = path.stat()
        if st.st_size == hashing.size:
            _WRITTEN[str(path.resolve())] = (st.st_size, st.st_mtime_ns, hashing.hash.hexdigest())
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


# --------------------------------------------------------------------------------------
# content digests of the files an artifact writes (computed while writing)
# --------------------------------------------------------------------------------------
DIGEST = "blake2b"
_DIGEST_CHUNK = 1 << 22
# resolved path -> (size, mtime_ns, digest) of the files this process wrote with atomic_write
_WRITTEN: dict[str, tuple[int, int, str]] = {}


class _HashingWriter:
    """A write-only file object that hashes (blake2b) and counts every byte it passes on, so
    an artifact's record of its own files costs no second read."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh
        self.hash = hashlib.blake2b(digest_size=32)
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        view = view.cast("B")
        self.hash.update(view)
        self.size += view.nbytes
        return self._fh.write(view)

    def flush(self) -> None:
        self._fh.flush()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def read(self, *_args):  # present so that zipfile (np.savez) takes it as a file object
        import io

        raise io.UnsupportedOperation("write-only")

    def seekable(self) -> bool:
        return False


def file_digest(path: str | os.PathLike) -> str:
    """blake2b of a file's content: the digest recorded while this process wrote it (when
    its size and mtime still match), else one pass over the file in 4 MiB chunks."""
    p = Path(path)
    st = p.stat()
    known = _WRITTEN.get(str(p.resolve()))
    if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
        return known[2]
    h = hashlib.blake2b(digest_size=32)
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(_DIGEST_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def files_record(root: str | os.PathLike, names) -> dict:
    """``{name: {"size", "blake2b"}}`` of the named files in ``root`` (those that exist)."""
    root = Path(root)
    record = {}
    for name in names:
        p = root / name
        if p.is_file():
            record[name] = {"size": p.stat().st_size, DIGEST: file_digest(p)}
    return record


def check_files(root: str | os.PathLike, record: Any, what: str, *, content: bool = True,
                names=None) -> None:
    """InputError naming the first file of ``record`` (or of ``names``) that is missing, has
    another size, or (``content``) another content digest than the artifact recorded."""
    root = Path(root)
    if not isinstance(record, dict):
        raise InputError(f"{what}: the manifest of {root} has no valid record of its files ('files')")
    for name in names if names is not None else sorted(record):
        entry = record.get(name)
        p = root / name
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise InputError(f"{what}: the manifest of {root} has no valid record of {name} ('files')")
        if not p.is_file():
            raise InputError(f"{what}: {p} is missing (the artifact records it); rebuild the artifact")
        size = p.stat().st_size
        if size != entry["size"]:
            raise InputError(f"{what}: {p} has {size} bytes, the artifact recorded {entry['size']} "
                             "(truncated, replaced or modified); rebuild the artifact")
        if content and file_digest(p) != entry.get(DIGEST):
            raise InputError(f"{what}: {p} differs from what the artifact recorded ({DIGEST} "
                             "mismatch: modified or corrupt); rebuild the artifact")


def content_fingerprint(path: str | os.PathLike) -> dict:
    """Identity of an input file by its whole content: size and blake2b (one chunked pass)."""
    p = Path(path)
    return {"path": str(p.resolve()), "size": p.stat().st_size, DIGEST: file_digest(p)}


# --------------------------------------------------------------------------------------
# checked reads of manifests
# --------------------------------------------------------------------------------------
_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
          list: "a list"}


def read_json(path: str | os.PathLike, what: str, *, fields: dict | None = None) -> dict:
    """The JSON object in ``path``, or an InputError naming the file (and the field) when it
    is missing, unreadable, not JSON, not an object, or a field of ``fields`` (name -> type or
    tuple of types) is absent or of another type."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputError(f"{what}: {p} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what}: cannot read {p} ({exc.__class__.__name__}: {exc})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what}: {p} is not valid JSON ({exc}); truncated or hand-edited") from None
    if not isinstance(obj, dict):
        raise InputError(f"{what}: {p} holds a JSON {type(obj).__name__}, expected an object")
    for field, types in (fields or {}).items():
        types = types if isinstance(types, tuple) else (types,)
        if field not in obj:
            raise InputError(f"{what}: {p} has no field {field!r} (truncated or hand-edited)")
        value = obj[field]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = " or ".join(_TYPES.get(t, t.__name__) for t in types if t is not type(None))
            raise InputError(f"{what}: {p} field {field!r} must be {want}, got {value!r:.60}")
    return obj


def load_npy(path: str | os.PathLike, what: str, *, ndim: int | None = None, kind: str = "fiu",
             shape: tuple | None = None, mmap: bool = False) -> np.ndarray:
    """A checked ``.npy`` read: InputError naming the file when it is missing, truncated, not
    a .npy, pickled, or of another rank, dtype kind or shape (``None`` in ``shape`` = any)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: {p} is missing")
    try:
        arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(f"{what}: cannot read {p} as .npy ({exc.__class__.__name__}: {str(exc)[:120]}); "
                         "truncated or not a .npy file") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{what}: {p} holds no array")
    if ndim is not None and arr.ndim != ndim:
        raise InputError(f"{what}: {p} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.dtype.kind not in kind:
        raise InputError(f"{what}: {p} has dtype {arr.dtype}, expected "
                         + ("integer ids" if kind == "iu" else "numbers"))
    if shape is not None:
        if len(shape) != arr.ndim or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            want = "x".join("?" if s is None else str(s) for s in shape)
            raise InputError(f"{what}: {p} has shape {arr.shape}, expected {want}")
    return arr
