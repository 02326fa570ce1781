"""Flags and checks shared by every subcommand: one meaning for --device, --threads,
--overwrite, and for the files a command writes (see docs/errors.md)."""

from __future__ import annotations

import argparse
import shutil
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
    """A file a command will write: refused when it exists (unless ``overwrite``) or is a
    folder; its parent folders are created."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{name}: {p} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise InputError(f"{name}: {p} already exists; pass --overwrite to replace it")
    if p.parent.exists() and not p.parent.is_dir():
        raise InputError(f"{name}: {p.parent} is not a folder")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


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
