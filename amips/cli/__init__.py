"""The ``amips`` command line.

Each subcommand lives in its own module ``amips/cli/<name>.py`` that defines
``register(subparsers)``; it adds its parser and sets ``func`` (called with the parsed
arguments, returning an exit code). Bad input raises :class:`amips.InputError`, which is
printed as one line ``amips <command>: error: ...`` with exit status 2; argparse's own
errors (a missing or malformed flag) take the same one-line form. Loading layers turn a
user's bad file into an InputError where they read it; anything else is a bug and keeps
its traceback. The policy is written down in ``docs/errors.md``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from .._validate import InputError
from ._args import complete_help

_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}

# Order in which subcommands appear in --help.
SUBCOMMANDS = ("demo", "labels", "train", "index", "eval", "tune", "mol", "verify")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``amips <cmd>: error: ... (see amips <cmd> --help)``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="amips",
        description="Maximum inner product search that learns from its query distribution.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"amips {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    complete_help(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line argparse error
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    command = args.command + (f" {args.index_command}" if getattr(args, "index_command", None) else "")
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"amips {command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        # the machine refused a write or read (disk full, read-only, no permission, quota):
        # the user's to fix, and the swap of --overwrite kept the old artifact
        if exc.errno not in _USER_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"amips {command}: error: cannot write or read{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"amips {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
