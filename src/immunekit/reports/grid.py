"""Grid experiments (MNIST digit pairs): read the per-pair ``cells`` of a results record.

A grid run's ``results.json`` holds, besides everything of schema version 1::

    "grid":  {"kind": "digit_pairs", "rows": "harmful", "cols": "primary", "size": 10},
    "cells": {"<p>-<h>": {"primary": p, "harmful": h,
                          "methods": {"<method>": {"metrics": {<metric summaries over seeds>},
                                                   "verdict": [<Definition 3.1 entry per seed>]}}}},
    "paper": {"source": ..., "table2": {"<method>": mean RIR},
              "fig2": {"<method>": 10×10 ln RIR, rows h, cols p}, "fig2_success_counts_text": ...}

and ``methods[m]["metrics"]`` then summarizes *across pairs* (values = per-pair means).

The paper's Table 2 is the **arithmetic mean of per-pair RIR** (not a ratio of means); the geometric mean
exp(mean ln RIR) is reported beside it, since a few pairs can dominate the arithmetic mean. A pair counts
as a success when its harmful κ ratio (i) > 1 and its primary κ ratio (ii) ≤ 1 (per-pair means over
seeds): RIR > 1 alone can be bought through (ii) while the harmful task gets *easier* to probe
((i) < 1). Definition 3.1 is separate and unchanged. A pair is *threshold-sensitive* when its RIR moves
by more than 2× across the rank rule's sensitivity band on any seed (``threshold_sensitive`` metric).
The harmful attacker's steps-to-ε ratio is the method's ``steps_to_epsilon.harmful.<attack>`` over
identity's on the same pair (first gradient-descent attack; a censored count is the budget + 1, so the
ratio is then a bound).

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
SUCCESS_MIN_RATIO_HARMFUL = 1.0  # (i) > 1: the harmful task must get harder to probe
GD_OPTIMIZERS = ("gd_exact", "gd", "sgd")
STEPS_HARMFUL_PREFIX = "steps_to_epsilon.harmful."

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
    threshold_sensitive: bool | None = None  # RIR moved > 2× across the band on some seed
    rir_band_spread: float | None = None  # largest spread over seeds

    @property
    def ln_rir(self) -> float | None:
        """Natural log of the per-pair mean RIR (None when RIR is missing or not positive)."""
        if self.rir is None or not self.rir > 0:
            return None
        return math.log(self.rir)

    @property
    def success(self) -> bool | None:
        """(i) > 1 and (ii) ≤ 1; None when either is missing."""
        if self.ratio_harmful is None or self.ratio_primary is None:
            return None
        return (
            self.ratio_harmful > SUCCESS_MIN_RATIO_HARMFUL and self.ratio_primary <= SUCCESS_MAX_RATIO_PRIMARY
        )

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
    n_success_known: int  # pairs with both (i) and (ii)
    n_immunized: int
    n_verdict: int  # pairs with a verdict
    mean_ratio_harmful: float | None = None  # arithmetic mean of per-pair (i)
    geo_mean_ratio_harmful: float | None = None  # exp(mean ln (i))
    n_threshold_sensitive: int = 0
    n_sensitivity_known: int = 0  # pairs with a recorded band
    steps_ratio: float | None = None  # geometric mean over pairs of the harmful steps-to-ε ratio
    steps_ratio_n: int = 0  # pairs in it
    steps_ratio_bound: str = ""  # "≥" when censored counts make it a lower bound

    @property
    def geo_mean_rir(self) -> float | None:
        """Geometric mean of per-pair RIR, exp(mean ln RIR)."""
        if self.mean_ln_rir is None or self.mean_ln_rir > 700:
            return None
        return math.exp(self.mean_ln_rir)


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
        if not isinstance(methods, Mapping):
            continue
        for m in methods:
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


def _max_value(metrics: Any, name: str) -> float | None:
    metric = metrics.get(name) if isinstance(metrics, Mapping) else None
    if not isinstance(metric, Mapping):
        return None
    values = [v for v in (_number(x) for x in metric.get("values") or []) if v is not None]
    return max(values) if values else _number(metric.get("mean"))


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
        sensitive = _max_value(metrics, "threshold_sensitive")
        out.append(
            PairStats(
                primary=p,
                harmful=h,
                rir=_rir(metrics),
                ratio_harmful=_summary_mean(metrics, "kappa_ratio_harmful"),
                ratio_primary=_summary_mean(metrics, "kappa_ratio_primary"),
                n_seeds=n_verdict or (len(rir_values) if isinstance(rir_values, list) else 0),
                immunized_seeds=immunized,
                threshold_sensitive=None if sensitive is None else sensitive > 0,
                rir_band_spread=_max_value(metrics, "rir_band_spread"),
            )
        )
    return out


def harmful_steps_attack(results: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """(key, step budget) of the attack whose harmful steps-to-ε ratio tables show: the first GD attack."""
    attacks = [a for a in results.get("attacks") or [] if isinstance(a, Mapping) and a.get("key")]
    chosen = next(
        (a for a in attacks if a.get("optimizer") in GD_OPTIMIZERS), attacks[0] if attacks else None
    )
    if chosen is None:
        return None
    steps = chosen.get("steps")
    return str(chosen["key"]), (int(steps) if isinstance(steps, int | float) else None)


def steps_value(metric: Any, budget: int | None) -> tuple[float | None, bool]:
    """(steps, censored) of a steps-to-ε summary: the mean over seeds that reached ε, else budget + 1."""
    if not isinstance(metric, Mapping):
        return None, False
    mean = _number(metric.get("mean"))
    if mean is not None:
        return mean, False
    values = metric.get("values")
    if isinstance(values, list) and values and budget is not None:
        return float(budget + 1), True
    return None, False


def steps_ratio(method_metric: Any, reference_metric: Any, budget: int | None) -> tuple[float | None, str]:
    """Harmful steps-to-ε of a method over the reference's: (ratio, bound) with bound "", "≥" or "≤".

    A censored method count (ε not reached) makes the ratio a lower bound ("≥"); a censored reference
    count an upper bound ("≤"); both censored: unknown (None).
    """
    a, a_cens = steps_value(method_metric, budget)
    b, b_cens = steps_value(reference_metric, budget)
    if a is None or b is None or b <= 0 or (a_cens and b_cens):
        return None, ""
    return a / b, ("≥" if a_cens else "≤" if b_cens else "")


def pair_steps_ratios(results: Mapping[str, Any], method: str) -> dict[tuple[int, int], tuple[float, str]]:
    """Per pair: the method's harmful steps-to-ε ratio to identity's (see :func:`steps_ratio`)."""
    attack = harmful_steps_attack(results)
    if attack is None:
        return {}
    name = STEPS_HARMFUL_PREFIX + attack[0]
    out = {}
    for p, h, cell in cells(results):
        record, reference = _cell_method(cell, method), _cell_method(cell, IDENTITY)
        if record is None or reference is None:
            continue
        m, r = record.get("metrics"), reference.get("metrics")
        value, bound = steps_ratio(
            m.get(name) if isinstance(m, Mapping) else None,
            r.get(name) if isinstance(r, Mapping) else None,
            attack[1],
        )
        if value is not None:
            out[p, h] = (value, bound)
    return out


def _geo_mean(values: Sequence[float]) -> float | None:
    logs = [math.log(v) for v in values if v > 0]
    return math.exp(statistics.fmean(logs)) if logs and len(logs) == len(values) else None


def summarize(results: Mapping[str, Any], method: str) -> GridSummary:
    """Table 2 numbers of ``method``: (i), steps ratio, success, RIR means, band flags, Definition 3.1."""
    pairs = pair_stats(results, method)
    rirs = [s.rir for s in pairs if s.rir is not None]
    lns = [s.ln_rir for s in pairs if s.ln_rir is not None]
    known = [s.success for s in pairs if s.success is not None]
    verdicts = [s.immunized for s in pairs if s.immunized is not None]
    ratios_i = [s.ratio_harmful for s in pairs if s.ratio_harmful is not None]
    sensitive = [s.threshold_sensitive for s in pairs if s.threshold_sensitive is not None]
    ratios = [r for r in pair_steps_ratios(results, method).values() if r[1] != "≤"]
    steps = [v for v, _ in ratios]
    lower = any(b == "≥" for _, b in ratios)
    return GridSummary(
        n_pairs=len(pairs),
        n_rir=len(rirs),
        mean_rir=statistics.fmean(rirs) if rirs else None,
        mean_ln_rir=statistics.fmean(lns) if lns else None,
        n_success=sum(known),
        n_success_known=len(known),
        n_immunized=sum(verdicts),
        n_verdict=len(verdicts),
        mean_ratio_harmful=statistics.fmean(ratios_i) if ratios_i else None,
        geo_mean_ratio_harmful=_geo_mean(ratios_i) if ratios_i else None,
        n_threshold_sensitive=sum(sensitive),
        n_sensitivity_known=len(sensitive),
        steps_ratio=_geo_mean(steps) if steps else None,
        steps_ratio_n=len(steps),
        steps_ratio_bound="≥" if lower and steps else "",
    )


def order_by_attacker(results: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    """``methods`` by the geometric mean of (i) over pairs (descending), then the harmful steps-to-ε ratio.

    The geometric mean (κ ratios compared in log space) keeps one extreme pair from deciding the order;
    unknown values go last, ties keep the given order.
    """

    def key(m: str) -> tuple[float, float]:
        s = summarize(results, m)
        i = s.geo_mean_ratio_harmful if s.geo_mean_ratio_harmful is not None else -math.inf
        return (-i, -(s.steps_ratio if s.steps_ratio is not None else -math.inf))

    return sorted(methods, key=key)


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
    """``m[h][p]`` = the pair's success ((i) > 1 and (ii) ≤ 1); None when unknown or not run."""
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
