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
            "self-contained report.html."
        ),
    )
    p.add_argument("dir", type=Path, help="results directory (or a results.json file)")
    p.add_argument("--out", type=Path, default=None, help="write the report here instead of DIR")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Render the report."""
    from immunekit.reports import write_report

    path = write_report(args.dir, args.out)
    print(f"report: {path}")
    return 0
