"""Where an artifact is written: output paths checked before any work, one writer per
artifact folder (a lock naming its holder), and the swap that replaces an artifact only
once its successor is complete (see docs/errors.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._validate import InputError

LOCK_SUFFIX = ".amips-lock"
NEW_TAG = ".amips-new-"
OLD_TAG = ".amips-old-"

# how a folder is recognised as an amips artifact: every name of one of the groups exists
# (names specific enough that a foreign folder does not carry them by chance)
_KIND_MARKERS = (
    ("tune", (("state/fingerprint.json",),)),
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
    "tune": {"state", "index", "router", "report.json", "report.txt", "frontier.csv", "points.csv",
             "frontier.png"},
}


def artifact_kind(path: str | os.PathLike) -> str | None:
    """The kind of amips artifact the folder ``path`` holds ('index', 'labels', 'training
    run', 'mol run', 'demo run', 'tune'), or None for an empty or foreign folder."""
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
