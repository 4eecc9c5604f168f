"""Reports: turn a ``results.json`` into ``report.md`` and PNG figures.

This layer reads JSON only. It imports no torch and no other immunekit layer; matplotlib is
imported lazily when figures are drawn.

Example:
    >>> from immunekit.reports import write_report
    >>> report_path = write_report("runs/house_prices-20261122T021500Z-3f2a9c1d")  # doctest: +SKIP

"""

from __future__ import annotations

from immunekit.reports.markdown import render_markdown
from immunekit.reports.schema import SCHEMA_VERSION, ReportError, load_results, validate_results
from immunekit.reports.write import write_report

__all__ = [
    "SCHEMA_VERSION",
    "ReportError",
    "load_results",
    "render_markdown",
    "validate_results",
    "write_report",
]
