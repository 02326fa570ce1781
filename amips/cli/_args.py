"""Flags and checks shared by every subcommand: one meaning for --device, --threads,
--overwrite, and for the files a command writes (see docs/errors.md)."""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import sys
from pathlib import Path

from .._validate import InputError, check_device, check_threads


def add_device(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument("--device", default=default,
                   help="cpu, cuda or cuda:N (an error when CUDA is absent)")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the CPU-bound work (default: torch's choice)")


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} already at the output path (without it, an existing "
                        "output is refused; unfinished work of the same job is resumed)")


def device_and_threads(args: argparse.Namespace) -> None:
    """Validate --device (and apply --threads) before any work starts."""
    if getattr(args, "device", None) not in (None, "cuda_if_available"):
        args.device = str(check_device(args.device, "device"))
    check_threads(getattr(args, "threads", None), "threads")


def output_file(path: str | None, name: str, *, overwrite: bool) -> Path | None:
    """A file a command will write (checked before any work, see
    :func:`amips._outputs.check_output_file`): refused when it exists (unless ``overwrite``), is
    a folder, a device, FIFO, socket or symlink, or its folder is missing or read-only."""
    from .._outputs import check_output_file

    return check_output_file(path, name, overwrite=overwrite)


def output_folder(path: str, name: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{name}: {p} exists and is not a folder; choose a folder name")
    return p


def clear_folder(path: Path, names) -> None:
    """Remove the named files/folders an earlier run left in ``path`` (--overwrite)."""
    for name in names:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


# Help for flags whose subcommand module gives none (kept here, not in the modules, so the
# modules other sessions edit stay untouched): (subcommand, dest) -> text.
HELP = {
    ("train", "model"): "network: keynet, supportnet (input-convex) or router-mlp",
    ("train", "steps"): "optimiser steps",
    ("train", "batch_size"): "queries per step",
    ("train", "width"): "hidden width (default: from --param-fraction, else the model's default)",
    ("train", "depth"): "hidden layers",
    ("train", "lr"): "peak learning rate",
    ("train", "weight_decay"): "AdamW weight decay",
    ("train", "optimizer"): "optimiser",
    ("train", "warmup"): "linear warm-up steps before the cosine decay",
    ("train", "ema"): "EMA decay of the saved weights",
    ("train", "w_score"): "weight of the score MSE in the loss",
    ("train", "w_key"): "weight of the key loss",
    ("train", "val_fraction"): "share of the queries held out for validation",
    ("train", "eval_every"): "steps between validations",
    ("train", "checkpoint_every"): "steps between checkpoints",
    ("train", "seed"): "random seed",
}


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where a default means something (not for required flags,
    switches, or None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        if "default" in text:
            return text  # the help already says what the default is
        return text + " (default: %(default)s)"


def complete_help(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Every subcommand shows its defaults in --help, and every flag has a help line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                sub.formatter_class = DefaultsFormatter
                complete_help(sub, path + (name,))
        elif action.option_strings and action.help is None:
            action.help = HELP.get((" ".join(path), action.dest))


@contextlib.contextmanager
def artifact_output(path: str, name: str, *, kind: str, overwrite: bool, command: str):
    """The artifact folder a command writes, checked up front (:func:`check_output_folder`),
    locked for this writer, and, with ``overwrite`` over an existing artifact, built in a
    sibling folder that replaces the old one only once complete. Yields the folder to write.

    A replacement killed mid-way leaves the old artifact in place (or, killed between the
    two renames of the swap, aside under ``.NAME.amips-old-PID``, restored here on the next
    run); its unfinished sibling is removed on the next run."""
    from .._outputs import (
        NEW_TAG,
        OLD_TAG,
        ArtifactLock,
        artifact_kind,
        check_output_folder,
        staging_folder,
        swap_in,
    )

    given = check_output_folder(path, name, kind=kind, overwrite=overwrite)
    final = given.resolve()  # the lock and the sibling sit beside the real folder ("." too)
    final.parent.mkdir(parents=True, exist_ok=True)  # checked: the nearest existing one is writable
    with ArtifactLock(final, command):
        if _recover_siblings(final, NEW_TAG, OLD_TAG):
            raise InputError(f"out: {given} was put back from where an interrupted --overwrite left it "
                             f"({final.parent}/.{final.name}{OLD_TAG}...); nothing else was changed: run "
                             "the command again")
        replacing = overwrite and artifact_kind(final) is not None
        target = staging_folder(final) if replacing else given
        try:
            yield target
        except BaseException:
            if replacing:
                shutil.rmtree(target, ignore_errors=True)
            raise
        if replacing:
            from .._outputs import OWN_NAMES

            swap_in(target, final, OWN_NAMES.get(kind))


def _recover_siblings(final: Path, new_tag: str, old_tag: str) -> bool:
    """Under the folder's lock: an old artifact left aside by a swap that was killed goes
    back in place (when nothing replaced it; returns True), and unfinished replacements are
    removed."""
    restored = False
    for sibling in final.parent.glob(f".{glob.escape(final.name)}{old_tag}*"):
        if not final.exists():
            os.rename(sibling, final)
            restored = True
        else:
            shutil.rmtree(sibling, ignore_errors=True)
    for sibling in final.parent.glob(f".{glob.escape(final.name)}{new_tag}*"):
        shutil.rmtree(sibling, ignore_errors=True)
    return restored


def command_line(args: argparse.Namespace) -> str:
    """The command a lock names as its holder."""
    return " ".join(["amips", *sys.argv[1:]])[:200] if sys.argv[1:] else f"amips {args.command}"


def check_input_file(path: str | None, name: str) -> None:
    """An input path (``file`` or ``file.hdf5:dataset``) exists and is a readable file."""
    if path is None:
        return
    from ..data import _split_hdf5

    file, _ = _split_hdf5(path)
    if not file.exists():
        raise InputError(f"{name}: no such file: {file}")
    if file.is_dir():
        raise InputError(f"{name}: {file} is a folder; expected a file")
    if not os.access(file, os.R_OK):
        raise InputError(f"{name}: {file} is not readable")


def load_partitions(path: str, n_keys: int, name: str = "partitions"):
    """A partitions file: 1-D integer ids, one per key, each in [0, n_keys) (so that a wild
    id such as 1e12 is refused before anything is sized by it)."""
    import numpy as np

    from ..data import load_array

    arr = load_array(path, name=name, mmap=False)
    if arr.ndim != 1:
        raise InputError(f"{name}: {path} must be a 1-D array of list ids (one per key), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputError(f"{name}: {path} must hold integer list ids, got dtype {arr.dtype}")
    if arr.shape[0] != n_keys:
        raise InputError(f"{name}: {path} has {arr.shape[0]} ids, expected {n_keys} (one per key)")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise InputError(f"{name}: {path} has a negative list id ({lo})")
        if hi >= n_keys:
            raise InputError(f"{name}: {path} has list id {hi}, more lists than keys ({n_keys}); ids must "
                             "be in [0, n_keys)")
    return np.asarray(arr, dtype=np.int64)
