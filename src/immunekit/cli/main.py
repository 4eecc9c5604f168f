"""``immunekit`` command line: one module per subcommand, this file only dispatches."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence

from immunekit import __version__
from immunekit.errors import ConfigError, ImmunekitError

SUBCOMMANDS = ("run", "evaluate", "ls", "report", "config")

IMPORT_HELP = (
    "import MODULE before the command runs, so that the models, tasks and defenses it registers exist "
    "(repeatable; before the command, e.g. immunekit --import mypkg.models evaluate ...); the module "
    "must be importable from sys.path (set PYTHONPATH)"
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from immunekit.cli import config, evaluate, ls, report, run

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
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for module in (run, evaluate, ls, report, config):
        module.add_parser(sub)
    return parser


def leading_imports(argv: Sequence[str]) -> list[str]:
    """The ``--import MODULE`` options given before the subcommand, in order.

    They are read before the parser is built, so that what the modules register (an executor, say)
    is already known when the subcommands declare their choices.

    Example:
        >>> leading_imports(["-v", "--import", "a.b", "--import=c", "run", "--import", "x"])
        ['a.b', 'c']

    """
    found: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item == "--import" and i + 1 < len(items):
            found.append(items[i + 1])
            i += 2
            continue
        if item.startswith("--import="):
            found.append(item.split("=", 1)[1])
        elif not item.startswith("-"):
            break  # the subcommand: what follows is its own
        i += 1
    return found


def import_modules(modules: Sequence[str]) -> list[str]:
    """Import each module (``--import``) in order; returns their names.

    Raises:
        ConfigError: a module fails to import; the one-line message names it and the exception.

    """
    names = []
    for name in modules:
        if not name.strip():
            raise ConfigError("--import needs a module name, e.g. --import mypkg.models")
        try:
            importlib.import_module(name.strip())
        except Exception as exc:  # any failure of the user's module: report it in one line
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ConfigError(
                f"--import {name}: the module failed to import ({reason}); check the module name and that "
                "its folder is on sys.path (PYTHONPATH)"
            ) from None
        names.append(name.strip())
    return names


def _in_workers(modules: list[str]) -> contextlib.AbstractContextManager[None]:
    """Pool and Ray workers of this command import ``modules`` too (a worker is a fresh interpreter)."""
    if not modules:
        return contextlib.nullcontext()
    from immunekit.experiments.sweep import importing_in_workers

    return importing_in_workers(modules)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``immunekit`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        modules = import_modules(leading_imports(argv))
    except ImmunekitError as exc:
        print(f"immunekit: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _in_workers(modules):
            return int(args.handler(args) or 0)
    except ImmunekitError as exc:
        print(f"immunekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # a sweep says how many trials it kept and where (experiments.sweep.SweepInterrupted)
        said = str(exc) or "finished trials are saved, rerun the same command to resume"
        print(f"immunekit: interrupted; {said}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
