"""``immunekit report DIR``: rebuild report.md and plots from results.json alone."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``report``."""
    p = sub.add_parser(
        "report",
        help="rebuild report.md (and report.html for evaluations) from a results directory",
        description=(
            "Rebuild report.md and the PNG plots from DIR/results.json (no model needed). For a record "
            "written by 'immunekit evaluate' this rebuilds the report card: report.md and a "
            "self-contained report.html. For a folder of per-model evaluations ('immunekit evaluate "
            "--model DIR') it rebuilds the method comparison summary.md and summary.html."
        ),
    )
    p.add_argument("dir", type=Path, help="results directory (or a results.json file)")
    p.add_argument("--out", type=Path, default=None, help="write the report here instead of DIR")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Render the report."""
    from immunekit.cli.run import check_out
    from immunekit.errors import ConfigError
    from immunekit.reports import ReportError, write_report

    if args.out is not None:  # checked before any figure is drawn
        check_out(args.out)
    elif args.dir.exists():  # the report goes next to results.json (a missing DIR: write_report says so)
        target = args.dir if args.dir.is_dir() else args.dir.parent
        check_out(target, "DIR", "pass --out to write the report to another folder")
    try:
        path = write_report(args.dir, args.out)
    except ReportError as err:  # one-line error, exit code 2
        raise ConfigError(str(err)) from None
    print(f"report: {path}")
    if path.name == "summary.md":
        print(f"html:   {path.with_name('summary.html')}")
    return 0
