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


# --------------------------------------------------------------------------------------
# output paths, locks and the swap of a replaced artifact
# --------------------------------------------------------------------------------------
LOCK_SUFFIX = ".amips-lock"
NEW_TAG = ".amips-new-"
OLD_TAG = ".amips-old-"

# how a folder is recognised as an amips artifact: every name of one of the groups exists
# (names specific enough that a foreign folder does not carry them by chance)
_KIND_MARKERS = (
    ("index", (("lists.safetensors",), (".kmeans-stage.json",), (".incomplete", "centroids.npy"),
               ("index.json", "partitions.npy"))),
    ("labels", (("labels.json",), (".amips_labels_partial",))),
    ("mol run", (("interactions.safetensors",),)),
    ("training run", (("config.json", "model.safetensors"), ("config.json", "checkpoint.safetensors"),
                      ("config.json", "split.json"))),
    ("demo run", (("results.json", "index"), ("runs", "index"))),
)

# the names an artifact of each kind writes into its folder; on --overwrite anything else
# in the old folder (a user's own file) is carried over into the new one
OWN_NAMES = {
    "index": {"index.json", ".incomplete", "centroids.npy", "partitions.npy", "lists.safetensors",
              "pq.safetensors", ".kmeans-stage.json"},
    "labels": {"labels.json", ".amips_labels_partial", "top1_index.npy", "top1_score.npy", "topk_index.npy",
               "topk_score.npy", "partition_index.npy", "partition_score.npy"},
    "training run": {"config.json", "checkpoint.safetensors", "model.safetensors", "metrics.jsonl",
                     "state.json", "split.json", "labels", "noisy"},
    "mol run": {"config.json", "model.safetensors", "interactions.safetensors", "checkpoint.safetensors",
                "metrics.json"},
}


def artifact_kind(path: str | os.PathLike) -> str | None:
    """The kind of amips artifact the folder ``path`` holds ('index', 'labels', 'training
    run', 'mol run', 'demo run'), or None for an empty or foreign folder."""
    p = Path(path)
    if not p.is_dir():
        return None
    for kind, groups in _KIND_MARKERS:
        if any(all((p / m).exists() for m in group) for group in groups):
            return kind
    # a run killed right after its first file: known by what its config.json holds
    cfg = p / "config.json"
    if cfg.is_file() and cfg.stat().st_size < (16 << 20):
        try:
            obj = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        if isinstance(obj, dict) and {"model", "train", "n_keys"} <= obj.keys():
            return "training run"
        if isinstance(obj, dict) and {"similarity", "fit", "ratings"} <= obj.keys():
            return "mol run"
    return None


def _special(p: Path) -> str | None:
    """What ``p`` is when it is not a regular file, folder or absent (follows symlinks)."""
    import stat

    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a dangling symlink" if os.path.islink(p) else None
    except OSError as exc:
        return f"not usable ({exc.strerror})"
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def _check_parent(p: Path, name: str) -> None:
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{name}: folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise InputError(f"{name}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{name}: folder {parent} is not writable")


def _inside_artifact(p: Path, kind: str | None, name: str) -> None:
    """Refuse an output inside another amips artifact (of any kind but ``kind``'s own)."""
    for up in list(p.resolve().parents)[:8]:
        other = artifact_kind(up)
        if other is not None:
            raise InputError(f"{name}: {p} is inside {up}, which holds an amips {other}; "
                             "choose a path outside it")
        if up == up.parent:
            break


def check_output_folder(path: str | os.PathLike, name: str, *, kind: str, overwrite: bool) -> Path:
    """An artifact folder a command will write, checked before any work: not a file, special
    file or symlink to one; parent exists and is writable; not inside another artifact; with
    ``overwrite``, a folder that holds another kind of artifact is refused (never replaced)."""
    p = Path(path)
    special = _special(p)
    if special:
        raise InputError(f"{name}: {p} is {special}; give a folder path")
    if p.exists() and not p.is_dir():
        raise InputError(f"{name}: {p} exists and is not a folder; choose a folder name")
    # a symlink to a folder is written through (a replacement is swapped in at its target);
    # missing folders above it are created, so the nearest existing one must be writable
    target = p.resolve() if os.path.islink(p) else p
    up = target.parent if str(target.parent) else Path(".")
    while not up.exists() and up != up.parent:
        if os.path.islink(up) or _special(up):
            raise InputError(f"{name}: {up} is {_special(up) or 'a dangling symlink'}; give a folder path")
        up = up.parent
    _check_parent(up / target.name, name)
    _inside_artifact(p, kind, name)
    if p.is_dir():
        held = artifact_kind(p)
        if held is not None and held != kind:
            raise InputError(f"{name}: {p} holds an amips {held}, not a {kind}; choose another folder"
                             + (" (--overwrite never replaces another kind of artifact)" if overwrite else ""))
        if held is None and any(p.iterdir()) and overwrite:
            raise InputError(f"{name}: {p} holds files that are not an amips {kind}; --overwrite replaces "
                             "only an amips artifact of the same kind: choose another folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"{name}: folder {p} is not writable")
    return p


def check_output_file(path: str | os.PathLike | None, name: str, *, overwrite: bool) -> Path | None:
    """A file a command will write (``--json``, ``--plot``, an export), checked before any
    work: not a folder, device, FIFO, socket or symlink; refused when it exists unless
    ``overwrite``; its folder must exist and be writable."""
    if path is None:
        return None
    p = Path(path)
    special = _special(p)
    if special:
        raise InputError(f"{name}: {p} is {special}; give a regular file name (it is never replaced)")
    if os.path.islink(p):
        raise InputError(f"{name}: {p} is a symlink; give the file itself")
    if p.is_dir():
        raise InputError(f"{name}: {p} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise InputError(f"{name}: {p} already exists; pass --overwrite to replace it")
    _check_parent(p, name)
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{name}: {p} is not writable")
    return p


def _holder_alive(holder: dict) -> bool:
    import socket

    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, so never taken over
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


class ArtifactLock:
    """One writer per artifact folder: ``<parent>/.<name>.amips-lock`` created with O_EXCL,
    holding the writer's pid, host, command and start time (it sits beside the folder, so
    the swap of an ``--overwrite`` keeps it). A lock whose pid is dead on this host is stale:
    it is renamed aside (only one taker's rename can succeed), checked to be the stale one,
    and removed; a live holder is an InputError naming it."""

    def __init__(self, folder: str | os.PathLike, command: str):
        folder = Path(folder)
        self.path = folder.parent / f".{folder.name}{LOCK_SUFFIX}"
        self.command = command
        self._held = False

    def acquire(self) -> ArtifactLock:
        import socket
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        blob = json.dumps(me).encode()
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.path)
                if holder is None:
                    continue  # removed meanwhile: try again
                if holder == {}:
                    # being written this instant (or corrupt): give its writer a moment
                    time.sleep(0.05)
                    holder = _read_lock(self.path)
                    if holder is None:
                        continue
                if holder and _holder_alive(holder):
                    raise InputError(
                        f"out: {self.path.parent / self.path.name[1:-len(LOCK_SUFFIX)]} is being written by "
                        f"another amips process (pid {holder.get('pid')} on {holder.get('host')}, "
                        f"`{holder.get('command')}`, since {holder.get('started')}); wait for it to "
                        f"finish, or remove {self.path} if that process is gone"
                    ) from None
                self._take_over(holder)
                continue
            try:
                os.write(fd, blob)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._held = True
            return self
        raise InputError(f"out: could not take the lock {self.path} (contended); try again")

    def _take_over(self, stale: dict) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another taker moved it first
        if _read_lock(aside) in (stale, {}):
            aside.unlink(missing_ok=True)
            return
        # we moved a fresh lock another taker had just made: put it back, never over a newer one
        try:
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self._held:
            if (_read_lock(self.path) or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> ArtifactLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def staging_folder(final: str | os.PathLike) -> Path:
    """A fresh sibling folder of ``final`` (same file system) to build a replacement in."""
    final = Path(final)
    build = final.parent / f".{final.name}{NEW_TAG}{os.getpid()}"
    if build.exists():
        import shutil

        shutil.rmtree(build)
    return build


def swap_in(build: str | os.PathLike, final: str | os.PathLike, own: set | None = None) -> Path:
    """Replace the folder ``final`` by the complete folder ``build``: rename the old one
    aside, rename the new one in (a failure there puts the old one back), carry over what of
    the old folder is not the artifact's own (``own`` names; a user's notes, say), then
    delete the old one."""
    import shutil

    build, final = Path(build), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}{OLD_TAG}{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    try:
        os.rename(build, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        if own is not None:
            for entry in old.iterdir():
                if entry.name not in own and not (final / entry.name).exists():
                    os.rename(entry, final / entry.name)
        shutil.rmtree(old, ignore_errors=True)
    return final
