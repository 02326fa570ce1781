"""The ``amips`` command line.

Each subcommand lives in its own module ``amips/cli/<name>.py`` that defines
``register(subparsers)``; it adds its parser and sets ``func`` (called with the parsed
arguments, returning an exit code). Bad input raises :class:`amips.InputError`, which is
printed as ``amips <command>: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .._validate import InputError

# Order in which subcommands appear in --help.
SUBCOMMANDS = ("demo", "labels", "train", "index", "eval", "mol")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"amips {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"amips {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
