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
