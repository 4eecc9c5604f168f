"""Grid experiments (MNIST digit pairs): read the per-pair ``cells`` of a results record.

A grid run's ``results.json`` holds, besides everything of schema version 1::

    "grid":  {"kind": "digit_pairs", "rows": "harmful", "cols": "primary", "size": 10},
    "cells": {"<p>-<h>": {"primary": p, "harmful": h,
                          "methods": {"<method>": {"metrics": {<metric summaries over seeds>},
                                                   "verdict": [<Definition 3.1 entry per seed>]}}}},
    "paper": {"source": ..., "table2": {"<method>": mean RIR},
              "fig2": {"<method>": 10×10 ln RIR, rows h, cols p}, "fig2_success_counts_text": ...}

and ``methods[m]["metrics"]`` then summarizes *across pairs* (values = per-pair means).

The paper's Table 2 is the **arithmetic mean of per-pair RIR** (not a ratio of means); a pair counts as a
success when its RIR > 1 and its primary κ ratio (ii) ≤ 1 (per-pair means over seeds).

Standard library only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from immunekit.reports._common import IDENTITY, method_order

DEFAULT_SIZE = 10
SUCCESS_MAX_RATIO_PRIMARY = 1.0  # (ii) ≤ 1
SUCCESS_MIN_RIR = 1.0  # RIR > 1, i.e. ln RIR > 0

Matrix = list[list[float | None]]


@dataclass(frozen=True)
class PairStats:
    """One method on one (primary, harmful) pair; numbers are per-pair means over seeds (None: missing)."""

    primary: int
    harmful: int
    rir: float | None
    ratio_harmful: float | None
    ratio_primary: float | None
    n_seeds: int
    immunized_seeds: int | None  # None: no verdict recorded

    @property
    def ln_rir(self) -> float | None:
        """Natural log of the per-pair mean RIR (None when RIR is missing or not positive)."""
        if self.rir is None or not self.rir > 0:
            return None
        return math.log(self.rir)

    @property
    def success(self) -> bool | None:
        """RIR > 1 and (ii) ≤ 1; None when either is missing."""
        if self.rir is None or self.ratio_primary is None:
            return None
        return self.rir > SUCCESS_MIN_RIR and self.ratio_primary <= SUCCESS_MAX_RATIO_PRIMARY

    @property
    def immunized(self) -> bool | None:
        """Definition 3.1 holds on every seed of the pair; None without a verdict."""
        if self.immunized_seeds is None:
            return None
        return self.n_seeds > 0 and self.immunized_seeds == self.n_seeds


@dataclass(frozen=True)
class GridSummary:
    """Table 2 numbers of one method over the pairs run."""

    n_pairs: int  # pairs where the method was run (has a cell entry)
    n_rir: int  # pairs with a RIR
    mean_rir: float | None  # arithmetic mean of per-pair mean RIR
    mean_ln_rir: float | None  # mean over pairs of ln(per-pair mean RIR)
    n_success: int
    n_success_known: int  # pairs with both RIR and (ii)
    n_immunized: int
    n_verdict: int  # pairs with a verdict


# ------------------------------------------------------------------------------------------ reading


def is_grid(results: Mapping[str, Any]) -> bool:
    """True when the record has a non-empty ``cells`` mapping."""
    cells = results.get("cells")
    return isinstance(cells, Mapping) and bool(cells)


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return None if math.isnan(float(x)) else float(x)


def _cell_pair(key: str, cell: Mapping[str, Any]) -> tuple[int, int] | None:
    p, h = cell.get("primary"), cell.get("harmful")
    if isinstance(p, int) and isinstance(h, int) and not isinstance(p, bool) and not isinstance(h, bool):
        return p, h
    parts = str(key).split("-")
    if len(parts) == 2 and all(s.strip().isdigit() for s in parts):
        return int(parts[0]), int(parts[1])
    return None


def cells(results: Mapping[str, Any]) -> list[tuple[int, int, Mapping[str, Any]]]:
    """``(primary, harmful, cell)`` for every readable cell, sorted by (primary, harmful)."""
    raw = results.get("cells")
    out = []
    for key, cell in raw.items() if isinstance(raw, Mapping) else []:
        if not isinstance(cell, Mapping):
            continue
        pair = _cell_pair(key, cell)
        if pair is not None:
            out.append((pair[0], pair[1], cell))
    return sorted(out, key=lambda t: (t[0], t[1]))


def grid_size(results: Mapping[str, Any]) -> int:
    """``grid.size`` (default 10), enlarged if a cell has a larger digit."""
    grid = results.get("grid")
    size = grid.get("size") if isinstance(grid, Mapping) else None
    size = size if isinstance(size, int) and size > 0 else DEFAULT_SIZE
    digits = [d for p, h, _ in cells(results) for d in (p, h)]
    return max([size, *(d + 1 for d in digits if d >= 0)])


def _cell_method(cell: Mapping[str, Any], method: str) -> Mapping[str, Any] | None:
    methods = cell.get("methods")
    record = methods.get(method) if isinstance(methods, Mapping) else None
    return record if isinstance(record, Mapping) else None


def grid_methods(results: Mapping[str, Any]) -> list[str]:
    """Methods with at least one cell, in display order (``config.methods``, then the rest)."""
    present: list[str] = []
    for _, _, cell in cells(results):
        methods = cell.get("methods")
        for m in methods if isinstance(methods, Mapping) else []:
            if m not in present and isinstance(methods[m], Mapping):
                present.append(m)
    order = [m for m in method_order(results) if m in present]
    return order + [m for m in present if m not in order]


def _summary_mean(metrics: Any, name: str) -> float | None:
    metric = metrics.get(name) if isinstance(metrics, Mapping) else None
    if not isinstance(metric, Mapping):
        return None
    mean = _number(metric.get("mean"))
    if mean is not None:
        return mean
    values = [v for v in (_number(x) for x in metric.get("values") or []) if v is not None]
    return statistics.fmean(values) if values else None


def _rir(metrics: Any) -> float | None:
    rir = _summary_mean(metrics, "rir")
    if rir is None:
        log_rir = _summary_mean(metrics, "log_rir")
        rir = math.exp(log_rir) if log_rir is not None and log_rir < 700 else None
    return rir


def _verdict(record: Mapping[str, Any]) -> tuple[int, int | None]:
    verdict = record.get("verdict")
    entries = [v for v in verdict if isinstance(v, Mapping)] if isinstance(verdict, list) else []
    if not entries:
        return 0, None
    return len(entries), sum(bool(v.get("immunized")) for v in entries)


def pair_stats(results: Mapping[str, Any], method: str) -> list[PairStats]:
    """Per-pair numbers of ``method`` for every cell where it was run, sorted by (primary, harmful)."""
    out = []
    for p, h, cell in cells(results):
        record = _cell_method(cell, method)
        if record is None:
            continue
        metrics = record.get("metrics")
        n_verdict, immunized = _verdict(record)
        rir_metric = metrics.get("rir") if isinstance(metrics, Mapping) else None
        rir_values = rir_metric.get("values") if isinstance(rir_metric, Mapping) else None
        out.append(
            PairStats(
                primary=p,
                harmful=h,
                rir=_rir(metrics),
                ratio_harmful=_summary_mean(metrics, "kappa_ratio_harmful"),
                ratio_primary=_summary_mean(metrics, "kappa_ratio_primary"),
                n_seeds=n_verdict or (len(rir_values) if isinstance(rir_values, list) else 0),
                immunized_seeds=immunized,
            )
        )
    return out


def summarize(results: Mapping[str, Any], method: str) -> GridSummary:
    """Table 2 numbers of ``method``: mean of per-pair RIR, mean ln RIR, success and Definition 3.1 counts."""
    pairs = pair_stats(results, method)
    rirs = [s.rir for s in pairs if s.rir is not None]
    lns = [s.ln_rir for s in pairs if s.ln_rir is not None]
    known = [s.success for s in pairs if s.success is not None]
    verdicts = [s.immunized for s in pairs if s.immunized is not None]
    return GridSummary(
        n_pairs=len(pairs),
        n_rir=len(rirs),
        mean_rir=statistics.fmean(rirs) if rirs else None,
        mean_ln_rir=statistics.fmean(lns) if lns else None,
        n_success=sum(known),
        n_success_known=len(known),
        n_immunized=sum(verdicts),
        n_verdict=len(verdicts),
    )


def empty_matrix(size: int) -> Matrix:
    """A ``size × size`` matrix of None."""
    return [[None] * size for _ in range(size)]


def ln_rir_matrix(results: Mapping[str, Any], method: str) -> Matrix:
    """Measured ln RIR per pair: ``m[h][p]`` (rows harmful, columns primary); None = not run / diagonal."""
    size = grid_size(results)
    matrix = empty_matrix(size)
    for s in pair_stats(results, method):
        if 0 <= s.harmful < size and 0 <= s.primary < size and s.harmful != s.primary:
            matrix[s.harmful][s.primary] = s.ln_rir
    return matrix


def success_matrix(results: Mapping[str, Any], method: str) -> list[list[bool | None]]:
    """``m[h][p]`` = the pair's success (RIR > 1 and (ii) ≤ 1); None when unknown or not run."""
    size = grid_size(results)
    matrix: list[list[bool | None]] = [[None] * size for _ in range(size)]
    for s in pair_stats(results, method):
        if 0 <= s.harmful < size and 0 <= s.primary < size and s.harmful != s.primary:
            matrix[s.harmful][s.primary] = s.success
    return matrix


def missing_pairs(results: Mapping[str, Any], method: str | None = None) -> list[tuple[int, int]]:
    """Ordered pairs (p, h), p ≠ h, of the full grid without a cell (for ``method``, if given)."""
    size = grid_size(results)
    if method is None:
        run = {(p, h) for p, h, _ in cells(results)}
    else:
        run = {(s.primary, s.harmful) for s in pair_stats(results, method)}
    return [(p, h) for p in range(size) for h in range(size) if p != h and (p, h) not in run]


# -------------------------------------------------------------------------------------------- paper


def _paper(results: Mapping[str, Any]) -> Mapping[str, Any]:
    paper = results.get("paper")
    return paper if isinstance(paper, Mapping) else {}


def paper_table2(results: Mapping[str, Any]) -> dict[str, float]:
    """The paper's mean RIR per method (``paper.table2``; else scalar ``paper.rows``); {} if absent."""
    paper = _paper(results)
    for key in ("table2", "rows"):
        table = paper.get(key)
        if isinstance(table, Mapping):
            out = {m: float(v) for m, v in table.items() if _number(v) is not None}
            if out:
                return out
    return {}


def _as_matrix(value: Any) -> Matrix | None:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        return None
    return [[_number(x) for x in row] for row in value]


def paper_fig2(results: Mapping[str, Any], method: str) -> Matrix | None:
    """The paper's ln-RIR map of ``method`` (``paper.fig2[method]``, rows h, cols p), or None."""
    fig2 = _paper(results).get("fig2")
    matrix = _as_matrix(fig2.get(method)) if isinstance(fig2, Mapping) else None
    if matrix is None:
        return None
    for i, row in enumerate(matrix):  # the diagonal is unused (stored as 0)
        if i < len(row):
            row[i] = None
    return matrix


def paper_fig2_methods(results: Mapping[str, Any]) -> list[str]:
    """Methods with a paper ln-RIR map in ``paper.fig2``, in its key order."""
    fig2 = _paper(results).get("fig2")
    if not isinstance(fig2, Mapping):
        return []
    return [m for m in fig2 if _as_matrix(fig2[m]) is not None]


def paper_mean_ln_rir(results: Mapping[str, Any], method: str) -> float | None:
    """Mean of the paper's off-diagonal ln-RIR cells of ``method``."""
    matrix = paper_fig2(results, method)
    values = [x for row in matrix or [] for x in row if x is not None]
    return statistics.fmean(values) if values else None


def paper_success_text(results: Mapping[str, Any]) -> str | None:
    """The paper's sentence on Fig. 2 success counts (``paper.fig2_success_counts_text``), or None."""
    text = _paper(results).get("fig2_success_counts_text")
    return str(text) if isinstance(text, str) and text.strip() else None


def heatmap_methods(results: Mapping[str, Any]) -> list[str]:
    """Methods drawn in the combined heat-map figure: measured ones (identity left out), then paper-only."""
    measured = [m for m in grid_methods(results) if m != IDENTITY]
    return measured + [m for m in paper_fig2_methods(results) if m not in measured]


def finite_abs_max(matrices: Sequence[Matrix | None]) -> float:
    """Largest finite |x| over the matrices (0 when there is none)."""
    values = [abs(x) for m in matrices for row in m or [] for x in row if x is not None and math.isfinite(x)]
    return max(values, default=0.0)
