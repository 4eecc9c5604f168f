"""``immunekit`` command line: one module per subcommand, this file only dispatches."""

from __future__ import annotations

import argparse
import logging
import sys

from immunekit import __version__
from immunekit.errors import ImmunekitError

SUBCOMMANDS = ("run", "evaluate", "ls", "report")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from immunekit.cli import evaluate, ls, report, run

    parser = argparse.ArgumentParser(
        prog="immunekit",
        description=(
            "Immunize models against harmful fine-tuning, attack them as an adversary would under a "
            "budget, and report whether the immunity held."
        ),
        epilog="Run 'immunekit <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"immunekit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for module in (run, evaluate, ls, report):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``immunekit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except ImmunekitError as exc:
        print(f"immunekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "immunekit: interrupted; finished trials are saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
