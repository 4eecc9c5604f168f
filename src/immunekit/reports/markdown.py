"""Render a results record (``results.json``, schema version 1) as a Markdown report.

Pure string building: no I/O, no plotting, deterministic for a given input. A grid record (MNIST digit
pairs, top-level ``cells``; see :mod:`immunekit.reports.grid`) gets an extra "Table 2" section.

Every table leads with what an attacker feels: methods are ordered by the harmful κ ratio (i) (highest
geometric mean first), then by the harmful attacker's steps-to-ε ratio against identity, and the
columns put (i) and that ratio before (ii) and RIR. RIR is shown as arithmetic mean, geometric mean and
mean ln RIR, with the share of ln RIR that comes from (ii) and the rank rule's sensitivity band
(*threshold-sensitive* when RIR moves by more than 2× across it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from immunekit.reports import grid
from immunekit.reports._common import (
    DASH,
    IDENTITY,
    attack_by_key,
    attack_label,
    display_name,
    fmt_mean_std,
    fmt_num,
    method_order,
)

STEPS_PREFIX = "steps_to_epsilon."
PER_ATTACK_PREFIXES = ("steps_to_epsilon", "final_norm_ratio")  # "<prefix>.<task>.<attack key>"
CONVERGENCE_PREFIX = "convergence."
KAPPA_BARS = "kappa_bars"
HEATMAPS = "heatmaps"  # combined measured | paper ln-RIR heat maps of a grid run
HEATMAP_PREFIX = "heatmap."  # "heatmap.<method>": measured map of one method
PAPER_HEATMAP_PREFIX = "heatmap_paper."  # "heatmap_paper.<method>": the paper's Fig. 2 map
MAX_LISTED_MISSING = 20

PAPER_COLUMNS_DEFAULT = ("kappa_ratio_harmful", "kappa_ratio_primary", "rir")
COLUMN_LABELS = {"kappa_ratio_harmful": "(i)", "kappa_ratio_primary": "(ii)", "rir": "RIR"}
DEFAULT_DIRECTIONS = {
    "kappa_ratio_harmful": "higher",
    "kappa_ratio_primary": "lower",
    "rir": "higher",
    "log_rir": "higher",
}
ARROWS = {"higher": "↑", "lower": "↓"}

METRIC_ORDER = (
    "kappa_ratio_harmful",
    "kappa_ratio_primary",
    "rir",
    "log_rir",
    "kappa_ratio_harmful_band_low",
    "kappa_ratio_harmful_band_high",
    "kappa_ratio_primary_band_low",
    "kappa_ratio_primary_band_high",
    "rir_band_low",
    "rir_band_high",
    "log_rir_band_low",
    "log_rir_band_high",
    "rir_band_spread",
    "threshold_sensitive",
    "kappa_harmful_reference",
    "kappa_harmful_immunized",
    "kappa_primary_reference",
    "kappa_primary_immunized",
    "primary_test_mse",
    "primary_test_mse_reference",
    "harmful_test_mse_closed_form",
    "defense_seconds",
)
GD_OPTIMIZERS = ("gd_exact", "gd", "sgd")
CLOSED_FORM_METRICS = (
    ("harmful_test_mse_closed_form", "harmful test MSE"),
    ("harmful_test_accuracy_closed_form", "harmful test accuracy"),
)
SAME_RELATIVE_TOL = 0.01  # closed-form MSEs within 1 % count as "unchanged"


# ----------------------------------------------------------------------------------------------- API


def render_markdown(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """Render the whole report.

    Args:
        results: a results record as returned by :func:`immunekit.reports.load_results`.
        figures: figure id → path relative to the report, in display order. Ids are
            ``"convergence.<attack key>"`` and ``"kappa_bars"``; for grid runs also ``"heatmaps"``,
            ``"heatmap.<method>"`` and ``"heatmap_paper.<method>"`` (shown in the Table 2 section); other
            ids are embedded with the id as caption.

    Returns:
        The Markdown text, ending with a newline.

    """
    sections = [
        _title(results),
        _summary(results),
        _grid_section(results, figures) if grid.is_grid(results) else _attacker_table(results),
        _paper_table(results),
        _metrics_table(results),
        _verdict_table(results),
        _figures_section(results, figures),
        _provenance(results),
    ]
    return "\n\n".join(s.strip("\n") for s in sections if s) + "\n"


# ------------------------------------------------------------------------------------------ helpers


def _methods(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Return the method records ordered by (i), then the harmful steps-to-ε ratio (see _attacker_order)."""
    methods = results.get("methods")
    if not isinstance(methods, Mapping):
        return {}
    present = [m for m in method_order(results) if isinstance(methods[m], Mapping)]
    return {m: methods[m] for m in _attacker_order(results, present)}


def _attacker_order(results: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    """Methods by mean ln (i) over seeds (descending), then harmful steps-to-ε ratio; unknown last, stable."""
    if grid.is_grid(results):
        return grid.order_by_attacker(results, methods)

    def key(m: str) -> tuple[float, float]:
        i = _mean_log(_metric(results, m, "kappa_ratio_harmful"))
        if i is None:
            mean = _metric_mean(results, m, "kappa_ratio_harmful")
            i = math.log(mean) if mean is not None and mean > 0 else None
        ratio = _harmful_steps_ratio(results, m)[0]
        return (-(i if i is not None else -math.inf), -(ratio if ratio is not None else -math.inf))

    return sorted(methods, key=key)


def _metric_mean(results: Mapping[str, Any], method: str, name: str) -> float | None:
    metric = _metric(results, method, name)
    value = metric.get("mean") if metric is not None else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _harmful_steps_ratio(results: Mapping[str, Any], method: str) -> tuple[float | None, str]:
    """The method's harmful steps-to-ε over identity's (first GD attack): (ratio, bound "", "≥", "≤")."""
    attack = grid.harmful_steps_attack(results)
    if attack is None:
        return None, ""
    name = STEPS_PREFIX + "harmful." + attack[0]
    return grid.steps_ratio(_metric(results, method, name), _metric(results, IDENTITY, name), attack[1])


def _mean_log(metric: Mapping[str, Any] | None) -> float | None:
    """Mean over seeds of ln(value) (None if a value is missing or not positive)."""
    values = metric.get("values") if metric is not None else None
    if not isinstance(values, list) or not values:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    return statistics.fmean(math.log(v) for v in values)


def _share_from_primary(ln_i: float | None, ln_ii: float | None) -> float | None:
    """Fraction of ln RIR = ln (i) − ln (ii) contributed by −ln (ii) (None unless ln RIR > 0).

    0 when (ii) ≥ 1 (the primary ratio does not help RIR); above 1 when (i) < 1.
    """
    if ln_i is None or ln_ii is None or not ln_i - ln_ii > 0:
        return None
    return max(0.0, -ln_ii) / (ln_i - ln_ii)


def _fmt_ratio(value: float | None, bound: str) -> str:
    return DASH if value is None else f"{bound}{fmt_num(value)}"


def _fmt_share(share: float | None) -> str:
    return DASH if share is None else f"{100 * share:.0f} %"


def _metric(results: Mapping[str, Any], method: str, name: str) -> Mapping[str, Any] | None:
    methods = results.get("methods")
    record = methods.get(method) if isinstance(methods, Mapping) else None
    metrics = record.get("metrics") if isinstance(record, Mapping) else None
    if not isinstance(metrics, Mapping):
        return None
    value = metrics.get(name)
    return value if isinstance(value, Mapping) else None


def _n_values(metric: Mapping[str, Any]) -> int:
    values = metric.get("values")
    if isinstance(values, list):
        return len(values)
    return int(metric.get("n") or 0)


def _n_censored(metric: Mapping[str, Any]) -> int:
    if metric.get("censored") is not None:
        return int(metric["censored"])
    values = metric.get("values")
    return sum(v is None for v in values) if isinstance(values, list) else 0


def _mean_std(metric: Mapping[str, Any] | None) -> str:
    if metric is None:
        return DASH
    n = _n_values(metric) - _n_censored(metric)
    return fmt_mean_std(metric.get("mean"), metric.get("std"), n)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left_cols: int = 1) -> str:
    align = [":---" if i < left_cols else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _direction(results: Mapping[str, Any], name: str) -> str | None:
    for method in _methods(results):
        metric = _metric(results, method, name)
        if metric is not None and metric.get("direction") in ARROWS:
            return str(metric["direction"])
    return DEFAULT_DIRECTIONS.get(name)


def _arrow(results: Mapping[str, Any], name: str) -> str:
    arrow = ARROWS.get(_direction(results, name) or "", "")
    return f" {arrow}" if arrow else ""


def _steps_budget(results: Mapping[str, Any], metric_name: str) -> int | None:
    key = metric_name.split(".", 2)[-1]
    steps = attack_by_key(results).get(key, {}).get("steps")
    return int(steps) if isinstance(steps, int | float) else None


def _steps_cell(metric: Mapping[str, Any] | None, budget: int | None) -> str:
    """``"37 ± 2"``, ``"> 200 (3/3 censored)"`` or ``"40 ± 5 (1/3 censored > 200)"``."""
    if metric is None:
        return DASH
    total, censored = _n_values(metric), _n_censored(metric)
    limit = str(budget) if budget is not None else "budget"
    if total and censored >= total:
        return f"> {limit} ({censored}/{total} censored)"
    text = _mean_std(metric)
    return f"{text} ({censored}/{total} censored > {limit})" if censored else text


# -------------------------------------------------------------------------------------------- title


def _title(results: Mapping[str, Any]) -> str:
    experiment = results.get("experiment") or "experiment"
    seeds = ", ".join(str(s) for s in results.get("seeds") or []) or DASH
    return (
        f"# Immunization report: {experiment}\n\n"
        f"Run `{results.get('run_id', DASH)}` · created {results.get('created_at', DASH)} · "
        f"seeds {seeds}"
    )


# ------------------------------------------------------------------------------------------ summary


def _summary(results: Mapping[str, Any]) -> str:
    if grid.is_grid(results):
        parts = [_grid_summary_sentences(results), *_attacker_sentences(results)]
    else:
        parts = [_rir_sentence(results), _verdict_sentence(results), *_attacker_sentences(results)]
    return "## Summary\n\n" + " ".join(p for p in parts if p)


def _best_method(results: Mapping[str, Any], exclude_identity: bool = False) -> str | None:
    best, best_value = None, None
    for method in _methods(results):
        metric = _metric(results, method, "rir")
        value = metric.get("mean") if metric else None
        if value is None or (exclude_identity and method == IDENTITY):
            continue
        if best_value is None or value > best_value:
            best, best_value = method, value
    return best


def _rir_sentence(results: Mapping[str, Any]) -> str:
    methods = _methods(results)
    n_seeds = len(results.get("seeds") or [])
    intro = f"This report compares {len(methods)} method(s) over {n_seeds} seed(s)."
    best = _best_method(results)
    if best is None:
        return intro + " No method has a measured RIR."
    text = intro
    lead = next((m for m in methods if m != IDENTITY), None)
    if lead is not None and _metric(results, lead, "kappa_ratio_harmful") is not None:
        ratio, bound = _harmful_steps_ratio(results, lead)
        text += (
            f" {display_name(lead)} makes the harmful task hardest to probe: harmful κ ratio (i) = "
            f"{_mean_std(_metric(results, lead, 'kappa_ratio_harmful'))}"
            + (f", harmful attacker steps to ε × {_fmt_ratio(ratio, bound)} of identity's" if ratio else "")
            + "."
        )
    h = _mean_std(_metric(results, best, "kappa_ratio_harmful"))
    p = _mean_std(_metric(results, best, "kappa_ratio_primary"))
    share = _share_from_primary(
        _mean_log(_metric(results, best, "kappa_ratio_harmful")),
        _mean_log(_metric(results, best, "kappa_ratio_primary")),
    )
    text += (
        f" {display_name(best)} has the highest mean RIR, "
        f"{_mean_std(_metric(results, best, 'rir'))} (harmful κ ratio (i) = {h}, "
        f"primary κ ratio (ii) = {p})"
    )
    if share is not None:
        text += f"; {_fmt_share(share)} of its mean ln RIR comes from (ii)"
    return text + "."


def _grid_summary_sentences(results: Mapping[str, Any]) -> str:
    methods = grid.grid_methods(results)
    n_pairs = len(grid.cells(results))
    n_seeds = len(results.get("seeds") or [])
    size = grid.grid_size(results)
    text = (
        f"This report compares {len(methods)} method(s) on {n_pairs} of the {size * (size - 1)} ordered "
        f"digit pairs (p, h) with {n_seeds} seed(s) each."
    )
    summaries = {m: grid.summarize(results, m) for m in methods}
    ranked = [m for m in methods if summaries[m].mean_rir is not None]
    if not ranked:
        return text + " No method has a measured RIR."
    best = max(ranked, key=lambda m: summaries[m].mean_rir or 0.0)
    best_s = summaries[best]
    text += (
        f" {display_name(best)} has the highest mean of per-pair RIR, {fmt_num(best_s.mean_rir)} "
        f"(mean ln RIR {fmt_num(best_s.mean_ln_rir)})."
    )
    success = [f"{display_name(m)} {s.n_success}/{s.n_success_known}" for m, s in summaries.items()]
    text += " Pairs succeeding ((i) > 1 and (ii) ≤ 1): " + "; ".join(success) + "."
    sensitive = [
        f"{display_name(m)} {s.n_threshold_sensitive}/{s.n_sensitivity_known}"
        for m, s in summaries.items()
        if s.n_threshold_sensitive
    ]
    if sensitive:
        text += (
            " Threshold-sensitive pairs (RIR moves > 2× across the rank rule's band): "
            + "; ".join(sensitive)
            + "."
        )
    verdicts = [
        f"{display_name(m)} {s.n_immunized}/{s.n_verdict}" for m, s in summaries.items() if s.n_verdict
    ]
    if verdicts:
        text += " Pairs meeting Definition 3.1 on every seed: " + "; ".join(verdicts) + "."
    return text


def _verdict_entries(results: Mapping[str, Any], method: str, record: Mapping[str, Any]) -> list[Any]:
    """Method-level verdicts (a grid run stores every pair × seed there); else those of the cells."""
    verdict = record.get("verdict")
    if isinstance(verdict, list) and verdict:
        return verdict
    if not grid.is_grid(results):
        return []
    entries: list[Any] = []
    for _, _, cell in grid.cells(results):
        methods = cell.get("methods")
        cell_record = methods.get(method) if isinstance(methods, Mapping) else None
        cell_verdict = cell_record.get("verdict") if isinstance(cell_record, Mapping) else None
        if isinstance(cell_verdict, list):
            entries += [v for v in cell_verdict if isinstance(v, Mapping)]
    return entries


def _verdict_counts(record: Mapping[str, Any], entries: list[Any] | None = None) -> dict[str, int] | None:
    verdict = record.get("verdict") if entries is None else entries
    if not isinstance(verdict, list) or not verdict:
        return None
    counts = {k: sum(bool(v.get(k)) for v in verdict) for k in ("a", "b", "c", "immunized")}
    counts["total"] = len(verdict)
    return counts


def _verdict_sentence(results: Mapping[str, Any]) -> str:
    parts = []
    for method, record in _methods(results).items():
        counts = _verdict_counts(record)
        if counts is None:
            continue
        ok = counts["immunized"] == counts["total"]
        parts.append(
            f"{display_name(method)} {'meets' if ok else 'does not meet'} it "
            f"({counts['immunized']}/{counts['total']} seeds immunized)"
        )
    if not parts:
        return ""
    return "Definition 3.1 on every seed: " + "; ".join(parts) + "."


def _attacker_sentences(results: Mapping[str, Any]) -> list[str]:
    best = _best_method(results, exclude_identity=True)
    if best is None:
        return []
    attacks = list(attack_by_key(results).values())
    gd = next((a for a in attacks if a.get("optimizer") in GD_OPTIMIZERS), None)
    adam = next((a for a in attacks if a.get("optimizer") == "adam"), None)
    sentences = [
        _gd_sentence(results, best, gd) if gd else "",
        _closed_form_sentence(results, best),
        _adam_sentence(results, best, adam) if adam else "",
    ]
    return [s for s in sentences if s]


def _censor_unit(results: Mapping[str, Any]) -> str:
    """What a censored value counts: seeds, or for a grid run pairs where no seed reached ε."""
    return "pairs by any seed" if grid.is_grid(results) else "seeds"


def _steps_phrase(metric: Mapping[str, Any], budget: int | None, unit: str = "seeds") -> str:
    total, censored = _n_values(metric), _n_censored(metric)
    limit = str(budget) if budget is not None else "the budget"
    if total and censored >= total:
        return f"more than {limit} steps (ε not reached on {censored}/{total} {unit})"
    text = f"{_mean_std(metric)} steps"
    return f"{text} (ε not reached on {censored}/{total} {unit})" if censored else text


def _steps_lower_bound(metric: Mapping[str, Any], budget: int | None) -> float | None:
    """Mean steps over reached seeds, or the budget when no seed reached ε (a lower bound)."""
    if metric.get("mean") is not None and _n_censored(metric) < _n_values(metric):
        return float(metric["mean"])
    return float(budget) + 1 if budget is not None else None


def _steps_pair(results: Mapping[str, Any], method: str, key: str) -> tuple[Any, Any] | None:
    harmful = _metric(results, method, f"{STEPS_PREFIX}harmful.{key}")
    primary = _metric(results, method, f"{STEPS_PREFIX}primary.{key}")
    return (harmful, primary) if harmful is not None and primary is not None else None


def _gd_sentence(results: Mapping[str, Any], best: str, attack: Mapping[str, Any]) -> str:
    key, budget = str(attack["key"]), attack.get("steps")
    pair = _steps_pair(results, best, key)
    if pair is None:
        return ""
    harmful, primary = pair
    eps = fmt_num(results.get("epsilon"))
    unit = _censor_unit(results)
    text = (
        f"Under {attack_label(attack)}, a probe on {display_name(best)} needs "
        f"{_steps_phrase(harmful, budget, unit)} to reach ε = {eps} on the harmful task versus "
        f"{_steps_phrase(primary, budget, unit)} on the primary task"
    )
    ident = _steps_pair(results, IDENTITY, key) if best != IDENTITY else None
    if ident is not None:
        text += (
            f" ({display_name(IDENTITY)}: {_steps_cell(ident[0], budget)} vs {_steps_cell(ident[1], budget)})"
        )
    h, p = _steps_lower_bound(harmful, budget), _steps_lower_bound(primary, budget)
    if h is None or p is None:
        return text + "."
    if h > p:
        return text + ", so the conditioning slows gradient-descent probing of the harmful task."
    return text + ", so here the conditioning does not slow gradient-descent probing of the harmful task."


def _closed_form_sentence(results: Mapping[str, Any], best: str) -> str:
    for name, label in CLOSED_FORM_METRICS:
        ours, ref = _metric(results, best, name), _metric(results, IDENTITY, name)
        if ours and ref and ours.get("mean") is not None and ref.get("mean") is not None:
            return _closed_form_text(float(ours["mean"]), float(ref["mean"]), best, label)
    return ""


def _closed_form_text(a: float, b: float, best: str, label: str) -> str:
    rel = abs(a - b) / max(abs(b), 1e-300)
    numbers = (
        f"{label} of the closed-form least-squares probe {fmt_num(a)} for "
        f"{display_name(best)} vs {fmt_num(b)} for {display_name(IDENTITY)}"
    )
    if rel <= SAME_RELATIVE_TOL:
        return (
            f"It does not stop a closed-form least-squares attacker: {numbers}, i.e. unchanged, "
            f"since an invertible θ only reparametrizes the probe."
        )
    return f"For a closed-form least-squares attacker the {numbers} ({fmt_num(100 * rel)} % apart)."


def _adam_sentence(results: Mapping[str, Any], best: str, attack: Mapping[str, Any]) -> str:
    key, budget = str(attack["key"]), attack.get("steps")
    harmful = _metric(results, best, f"{STEPS_PREFIX}harmful.{key}")
    if harmful is None:
        return ""
    unit = _censor_unit(results)
    text = (
        f"Under {attack_label(attack)}, {display_name(best)} needs "
        f"{_steps_phrase(harmful, budget, unit)} on the harmful task"
    )
    ref = _metric(results, IDENTITY, f"{STEPS_PREFIX}harmful.{key}")
    if ref is not None:
        text += f" vs {_steps_phrase(ref, budget, unit)} for {display_name(IDENTITY)}"
    total, censored = _n_values(harmful), _n_censored(harmful)
    if censored == 0:
        return text + "; Adam still reaches ε, so the κ slowdown is no guarantee against adaptive optimizers."
    if censored < total:
        some = "pairs" if grid.is_grid(results) else "seeds"
        return text + f"; Adam reaches ε on some {some}, so κ does not reliably stop it."
    return (
        text + "; Adam did not reach ε within the budget here, but adaptive optimizers are outside the "
        "theory, so this is not guaranteed."
    )


# ----------------------------------------------------------------------------- grid (Table 2, Fig. 2)


def _grid_table_methods(results: Mapping[str, Any]) -> list[str]:
    measured = grid.order_by_attacker(results, grid.grid_methods(results))
    return measured + [m for m in grid.paper_table2(results) if m not in measured]


def _count(k: int, n: int) -> str:
    return f"{k}/{n}" if n else DASH


def _grid_table2(results: Mapping[str, Any]) -> str:
    paper_rir = grid.paper_table2(results)
    attack = grid.harmful_steps_attack(results)
    steps_label = f"Harmful steps-to-ε ratio ({attack[0]}) ↑" if attack else "Harmful steps-to-ε ratio ↑"
    header = [
        "Method",
        "Pairs run",
        "Mean (i) ↑ (geometric)",
        steps_label,
        "Success: (i) > 1 and (ii) ≤ 1",
        "Mean RIR ↑",
        "Geometric mean RIR ↑",
        "Mean ln RIR ↑",
        "Threshold-sensitive pairs",
        "Definition 3.1 on all seeds",
        "Paper mean RIR ↑",
        "Paper mean ln RIR ↑",
    ]
    body = []
    for method in _grid_table_methods(results):
        s = grid.summarize(results, method)
        success = _count(s.n_success, s.n_success_known)
        if s.n_success_known and s.n_success_known < s.n_pairs:
            success += f" ({s.n_pairs - s.n_success_known} without (i) or (ii))"
        ratio_i = DASH
        if s.mean_ratio_harmful is not None:
            ratio_i = f"{fmt_num(s.mean_ratio_harmful)} ({fmt_num(s.geo_mean_ratio_harmful)})"
        body.append(
            [
                display_name(method),
                str(s.n_pairs) if s.n_pairs else DASH,
                ratio_i,
                _fmt_ratio(s.steps_ratio, s.steps_ratio_bound),
                success,
                fmt_num(s.mean_rir),
                fmt_num(s.geo_mean_rir),
                fmt_num(s.mean_ln_rir),
                _count(s.n_threshold_sensitive, s.n_sensitivity_known),
                _count(s.n_immunized, s.n_verdict),
                fmt_num(paper_rir.get(method)),
                fmt_num(grid.paper_mean_ln_rir(results, method)),
            ]
        )
    return _table(header, body)


def _grid_intro(results: Mapping[str, Any]) -> str:
    size = grid.grid_size(results)
    n_pairs = len(grid.cells(results))
    n_seeds = len(results.get("seeds") or [])
    missing = grid.missing_pairs(results)
    text = (
        f"{n_pairs} of the {size * (size - 1)} ordered digit pairs (p, h), p ≠ h, were run with {n_seeds} "
        "seed(s) each (p = primary digit, h = harmful digit)."
    )
    if missing and len(missing) <= MAX_LISTED_MISSING:
        text += " Not run: " + ", ".join(f"({p}, {h})" for p, h in missing) + "."
    elif missing:
        text += f" {len(missing)} pairs were not run."
    return text + (
        " Per pair, RIR, (i) and (ii) are means over seeds. Methods are ordered by the geometric mean of (i) "
        "over pairs, then by the "
        'geometric mean over pairs of the harmful attacker\'s steps-to-ε ratio to identity ("≥": some '
        "counts censored at the budget, a lower bound). **Mean RIR is the arithmetic mean of the "
        "per-pair RIR over the pairs run (mean of per-pair RIR, not ratio of means)**, as in the paper's "
        "Table 2; the geometric mean is exp(mean ln RIR), where mean ln RIR is the mean of ln(per-pair "
        "RIR). A pair succeeds when (i) > 1 and (ii) ≤ 1: RIR > 1 alone can come from (ii) while the "
        "harmful task gets easier to probe (the paper does not state its rule). A pair is "
        "threshold-sensitive when its RIR moves by more than 2× across the rank rule's sensitivity band "
        "(rtol ×10⁻² … ×10²) on any seed. "
        "Definition 3.1 counts pairs where every seed is immunized."
    )


def _grid_paper_note(results: Mapping[str, Any]) -> str:
    paper = results.get("paper")
    source = paper.get("source") if isinstance(paper, Mapping) else None
    parts = []
    if grid.paper_table2(results) or grid.paper_fig2_methods(results):
        parts.append(
            f"Paper: {source or 'source not recorded'}; paper mean ln RIR is the mean over the off-diagonal "
            "cells of its Fig. 2 map."
        )
    else:
        parts.append("The record has no paper numbers for this grid.")
    text = grid.paper_success_text(results)
    if text:
        parts.append(f"The paper's text on success counts: “{text.rstrip('.')}.”")
    return " ".join(parts)


def _pair_rir_cell(stats: grid.PairStats) -> str:
    mark = {True: " ✓", False: " ✗"}.get(stats.success, "") if stats.success is not None else ""
    flag = " ⚠" if stats.threshold_sensitive else ""
    return fmt_num(stats.rir) + mark + flag


def _grid_pair_table(results: Mapping[str, Any]) -> str:
    methods = grid.order_by_attacker(results, grid.grid_methods(results))
    by_method = {m: {(s.primary, s.harmful): s for s in grid.pair_stats(results, m)} for m in methods}
    header = ["p", "h"]
    for m in methods:
        name = display_name(m)
        header += [f"{name} (i)", f"{name} (ii)", f"{name} RIR"]
    body = []
    for p, h, _ in grid.cells(results):
        row = [str(p), str(h)]
        for m in methods:
            stats = by_method[m].get((p, h))
            if stats is None:
                row += [DASH, DASH, DASH]
            else:
                row += [fmt_num(stats.ratio_harmful), fmt_num(stats.ratio_primary), _pair_rir_cell(stats)]
        body.append(row)
    return (
        f"<details>\n<summary>Per-pair results ({len(body)} pairs; means over seeds; "
        "✓/✗ = success rule met/failed; ⚠ = threshold-sensitive)</summary>\n\n"
        + _table(header, body, left_cols=2)
        + "\n\n</details>"
    )


def _grid_section(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    heatmaps = {f: p for f, p in figures.items() if _is_heatmap(f)}
    if heatmaps:
        maps = "\n\n".join(_figure_blocks(results, heatmaps))
    else:
        maps = "### ln-RIR heat maps\n\nNo heat map was rendered (matplotlib is missing)."
    parts = [
        "## Table 2: mean RIR over digit pairs",
        _grid_intro(results),
        _grid_table2(results),
        _grid_paper_note(results),
        maps,
        "### Per-pair results",
        _grid_pair_table(results),
    ]
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------- tables


def _band_cell(results: Mapping[str, Any], method: str) -> str:
    """Largest factor by which a seed's RIR moves across the band (max RIR / min RIR over the cuts)."""
    metric = _metric(results, method, "rir_band_spread")
    values = metric.get("values") if metric is not None else None
    spreads = [float(v) for v in values or [] if isinstance(v, int | float) and not isinstance(v, bool)]
    return f"×{fmt_num(max(spreads))}" if spreads else DASH


def _sensitive_cell(results: Mapping[str, Any], method: str) -> str:
    metric = _metric(results, method, "threshold_sensitive")
    values = metric.get("values") if metric is not None else None
    if not isinstance(values, list) or not values:
        return DASH
    flagged = sum(1 for v in values if isinstance(v, int | float) and v > 0)
    return f"{'yes' if flagged else 'no'} ({flagged}/{len(values)})"


def _attacker_table(results: Mapping[str, Any]) -> str:
    """The lead table: (i) and the harmful attacker's slowdown first, then (ii) and RIR (three means)."""
    methods = list(_methods(results))
    if not methods:
        return ""
    attack = grid.harmful_steps_attack(results)
    steps_label = f"harmful steps-to-ε ratio ({attack[0]}) ↑" if attack else "harmful steps-to-ε ratio ↑"
    header = [
        "Method",
        "(i) ↑",
        steps_label,
        "(ii) ↓",
        "RIR ↑ (mean ± std)",
        "geometric mean RIR",
        "mean ln RIR",
        "share of ln RIR from (ii)",
        "RIR spread across the band (max over seeds)",
        "threshold-sensitive",
    ]
    body = []
    for m in methods:
        ln_rir = _metric_mean(results, m, "log_rir")
        if ln_rir is None:
            ln_rir = _mean_log(_metric(results, m, "rir"))
        ln_i = _mean_log(_metric(results, m, "kappa_ratio_harmful"))
        ln_ii = _mean_log(_metric(results, m, "kappa_ratio_primary"))
        body.append(
            [
                display_name(m),
                _mean_std(_metric(results, m, "kappa_ratio_harmful")),
                _fmt_ratio(*_harmful_steps_ratio(results, m)),
                _mean_std(_metric(results, m, "kappa_ratio_primary")),
                _mean_std(_metric(results, m, "rir")),
                fmt_num(math.exp(ln_rir)) if ln_rir is not None and ln_rir < 700 else DASH,
                fmt_num(ln_rir),
                _fmt_share(_share_from_primary(ln_i, ln_ii)),
                _band_cell(results, m),
                _sensitive_cell(results, m),
            ]
        )
    note = (
        "Ordered by the harmful κ ratio (i) (geometric mean over seeds), then by the harmful attacker's "
        "steps to reach "
        'ε over identity\'s (mean over the seeds that reached ε; "≥" when no seed did within the budget, a '
        "lower bound). RIR = (i)/(ii) is given as the arithmetic mean, the geometric mean exp(mean ln RIR) "
        "and mean ln RIR; the share of ln RIR from (ii) is −mean ln (ii) / (mean ln (i) − mean ln (ii)). "
        "The spread is max/min of a seed's RIR over the rank rule's cuts rtol ×10⁻², ×1 and ×10² "
        "(largest over seeds); a seed is threshold-sensitive when its RIR moves by more than 2× across "
        "the band."
    )
    return "## What an attacker feels\n\n" + note + "\n\n" + _table(header, body)


def _paper_rows(paper: Mapping[str, Any]) -> tuple[list[str], dict[str, list[Any]]]:
    """Columns and numeric rows of the paper's table; a bare number per method is the paper's RIR.

    Rows that are not a number or a list of numbers (e.g. a layout note or a per-pair matrix) are skipped.
    Without ``rows``, a grid run's ``table2`` (mean RIR per method) is used.
    """
    raw = paper.get("rows")
    if not isinstance(raw, Mapping) or not raw:
        raw = paper.get("table2")
    rows: dict[str, list[Any]] = {}
    for method, value in raw.items() if isinstance(raw, Mapping) else []:
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows[method] = [value]
        elif isinstance(value, list) and all(v is None or isinstance(v, int | float) for v in value):
            rows[method] = list(value)
    columns = list(paper.get("columns") or [])
    if not columns:
        scalar = bool(rows) and all(len(v) == 1 for v in rows.values())
        columns = ["rir"] if scalar else list(PAPER_COLUMNS_DEFAULT)
    return columns, rows


def _paper_table(results: Mapping[str, Any]) -> str:
    paper = results.get("paper")
    paper = paper if isinstance(paper, Mapping) else {}
    columns, rows = _paper_rows(paper)
    labels = [COLUMN_LABELS.get(c, c) + _arrow(results, c) for c in columns]
    header = ["Method", *(f"Paper {lab}" for lab in labels), *(f"Measured {lab}" for lab in labels)]
    methods = list(_methods(results)) + [m for m in rows if m not in _methods(results)]
    body = []
    for method in methods:
        paper_row = rows.get(method, [])
        paper_cells = [fmt_num(paper_row[i]) if i < len(paper_row) else DASH for i in range(len(columns))]
        measured = [_mean_std(_metric(results, method, c)) for c in columns]
        body.append([display_name(method), *paper_cells, *measured])
    source = paper.get("source") or "the paper has no numbers for this experiment"
    n_seeds = len(results.get("seeds") or [])
    over = f"mean ± std over {n_seeds} seed(s)"
    if grid.is_grid(results):
        over = (
            f"mean ± std across the {len(grid.cells(results))} digit pairs of the per-pair means "
            f"(each over {n_seeds} seed(s)), i.e. the mean of per-pair values, not a ratio of means"
        )
    note = (
        f"Paper: {source}. Measured: {over}. "
        f"(i) = κ(H_H) ratio vs identity, (ii) = κ(H_P) ratio vs identity, RIR = (i)/(ii); "
        f"{DASH} = not reported or not measured."
    )
    return "## Paper vs measured\n\n" + note + "\n\n" + _table(header, body)


def _metric_names(results: Mapping[str, Any]) -> list[str]:
    present: set[str] = set()
    for record in _methods(results).values():
        present.update((record.get("metrics") or {}).keys())
    ordered = [m for m in METRIC_ORDER if m in present]
    per_attack = [
        f"{prefix}.{task}.{key}"
        for key in attack_by_key(results)
        for prefix in PER_ATTACK_PREFIXES
        for task in ("harmful", "primary")
    ]
    ordered += [m for m in per_attack if m in present]
    return ordered + sorted(present - set(ordered))


def _unit(results: Mapping[str, Any], name: str) -> str:
    for method in _methods(results):
        metric = _metric(results, method, name)
        if metric is not None and metric.get("unit"):
            return str(metric["unit"])
    return ""


def _metrics_table(results: Mapping[str, Any]) -> str:
    methods = list(_methods(results))
    header = ["Metric", "Unit", *(display_name(m) for m in methods)]
    body = []
    for name in _metric_names(results):
        if name.startswith(STEPS_PREFIX):
            budget = _steps_budget(results, name)
            cells = [_steps_cell(_metric(results, m, name), budget) for m in methods]
        else:
            cells = [_mean_std(_metric(results, m, name)) for m in methods]
        body.append([f"`{name}`{_arrow(results, name)}", _unit(results, name), *cells])
    over = "Mean ± std over seeds"
    censored = "censored seeds (ε not reached within the attack's step budget) are excluded from the mean."
    if grid.is_grid(results):
        over = (
            "Grid run: every metric is summarized across digit pairs, i.e. mean ± std of the per-pair means "
            "(one value per pair, each a mean over seeds); per-pair values are in the Table 2 section"
        )
        censored = (
            "a pair's value is the mean over the seeds that reached ε within the attack's step budget, and "
            "the pair is censored (excluded from the mean) when no seed did."
        )
    note = (
        f"{over}; ↑ higher is better, ↓ lower is better. "
        "`steps_to_epsilon.<task>.<attack>` is the first step with "
        f"‖w_t − w\\*‖²/‖w_0 − w\\*‖² ≤ ε = {fmt_num(results.get('epsilon'))}; " + censored
    )
    return "## All metrics\n\n" + note + "\n\n" + _table(header, body, left_cols=2)


def _verdict_methods(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Method records in display order; a grid run adds methods that only appear in its cells."""
    methods = _methods(results)
    if grid.is_grid(results):
        methods.update({m: {} for m in grid.grid_methods(results) if m not in methods})
    return methods


def _first_verdict(results: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for method, record in _verdict_methods(results).items():
        verdict = _verdict_entries(results, method, record)
        if verdict and isinstance(verdict[0], Mapping):
            return verdict[0]
    return None


def _thresholds(first: Mapping[str, Any]) -> str:
    a = fmt_num(first.get("threshold_a_min_ratio_harmful"))
    b = fmt_num(first.get("threshold_b_max_ratio_primary"))
    c = fmt_num(first.get("threshold_c_max_relative_loss_increase"))
    return (
        f"Thresholds: (a) harmful κ ratio (i) ≥ {a}; (b) primary κ ratio (ii) ≤ {b}; "
        f"(c) relative increase of the primary loss ≤ {c}. Immunized = (a) and (b) and (c)."
    )


def _verdict_table(results: Mapping[str, Any]) -> str:
    first = _first_verdict(results)
    if first is None:
        return "## Definition 3.1 verdict\n\nNo verdict recorded."
    body = []
    for method, record in _verdict_methods(results).items():
        counts = _verdict_counts(record, _verdict_entries(results, method, record))
        if counts is None:
            body.append([display_name(method), DASH, DASH, DASH, DASH])
            continue
        total = counts["total"]
        body.append([display_name(method), *(f"{counts[k]}/{total}" for k in ("a", "b", "c", "immunized"))])
    header = ["Method", "(a) harmful harder", "(b) primary not harder", "(c) primary loss kept", "Immunized"]
    unit = "Seeds passing each condition. "
    if grid.is_grid(results):
        unit = "Grid run: (pair, seed) runs passing each condition, over all pairs. "
    return "## Definition 3.1 verdict\n\n" + unit + _thresholds(first) + "\n\n" + _table(header, body)


# ------------------------------------------------------------------------------- figures, provenance


def _figure_caption(results: Mapping[str, Any], fig_id: str) -> tuple[str, str]:
    if fig_id.startswith(CONVERGENCE_PREFIX):
        key = fig_id[len(CONVERGENCE_PREFIX) :]
        attack = attack_by_key(results).get(key, {"key": key})
        label = attack_label(attack)
        which = "first pair of the grid, first seed" if grid.is_grid(results) else "first seed"
        return (
            f"Convergence under {label}",
            f"‖w_t − w\\*‖²/‖w_0 − w\\*‖² of the attacker's linear probe per step "
            f"({which}, log scale); "
            f"left: primary task D_P, right: harmful task D_H; dotted line: ε; attacker: {label}.",
        )
    if fig_id == KAPPA_BARS:
        over = "across digit pairs (of the per-pair means)" if grid.is_grid(results) else "over seeds"
        return (
            "κ ratios per method",
            f"log10 (i) (solid) and log10 (ii) (hatched) per method, mean ± std {over}; annotated: mean RIR.",
        )
    if fig_id == HEATMAPS or fig_id.startswith((HEATMAP_PREFIX, PAPER_HEATMAP_PREFIX)):
        return _heatmap_caption(fig_id)
    return fig_id, ""


def _is_heatmap(fig_id: str) -> bool:
    return fig_id == HEATMAPS or fig_id.startswith((HEATMAP_PREFIX, PAPER_HEATMAP_PREFIX))


def _heatmap_caption(fig_id: str) -> tuple[str, str]:
    rule = (
        "✗ with a black border: the pair fails the success rule — measured: not ((i) > 1 and (ii) ≤ 1); "
        "paper: ln RIR ≤ 0 only, since the paper publishes no per-pair (ii). Grey: diagonal (unused); "
        "white: pair not run."
    )
    layout = "rows = harmful digit h, columns = primary digit p; diverging colours centred at ln RIR = 0"
    if fig_id == HEATMAPS:
        return (
            "ln-RIR heat maps, measured vs paper",
            f"One row per method (identity left out: its RIR is 1 by definition); left: measured ln of "
            f"the per-pair mean RIR, right: the paper's Fig. 2; {layout}, one colour scale for all panels. "
            + rule,
        )
    if fig_id.startswith(PAPER_HEATMAP_PREFIX):
        method = display_name(fig_id[len(PAPER_HEATMAP_PREFIX) :])
        return f"ln-RIR heat map, {method}, paper Fig. 2", f"{layout}. " + rule
    method = display_name(fig_id[len(HEATMAP_PREFIX) :])
    return f"ln-RIR heat map, {method}, measured", f"{layout}. " + rule


def _figure_path(path: str) -> str:
    return f"<{path}>" if any(c in path for c in " ()") else path


def _figure_blocks(results: Mapping[str, Any], figures: Mapping[str, str], level: str = "###") -> list[str]:
    blocks = []
    for fig_id, path in figures.items():
        alt, caption = _figure_caption(results, fig_id)
        block = f"{level} {alt}\n\n![{alt}]({_figure_path(path)})"
        blocks.append(block + (f"\n\n{caption}" if caption else ""))
    return blocks


def _figures_section(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    heatmaps = grid.is_grid(results) and any(_is_heatmap(f) for f in figures)
    if heatmaps:  # already shown in the Table 2 section
        figures = {f: p for f, p in figures.items() if not _is_heatmap(f)}
    if not figures:
        if heatmaps:
            return "## Figures\n\nThe ln-RIR heat maps are shown in the Table 2 section above."
        return (
            "## Figures\n\nNo figures were rendered (matplotlib is missing or nothing was recorded to plot)."
        )
    return "## Figures\n\n" + "\n\n".join(_figure_blocks(results, figures))


def _git(prov: Mapping[str, Any]) -> str:
    sha = prov.get("git_sha")
    if not sha:
        return "unknown (not a git checkout)"
    dirty = prov.get("git_dirty")
    state = {True: " (dirty: uncommitted changes)", False: " (clean)"}.get(bool(dirty), "")
    state = state if isinstance(dirty, bool) else " (dirty state unknown)"
    return f"`{sha}`{state}"


def _provenance(results: Mapping[str, Any]) -> str:
    prov = results.get("provenance") or {}

    def val(key: str) -> str:
        value = prov.get(key)
        return str(value) if value not in (None, "") else DASH

    seeds = ", ".join(str(s) for s in results.get("seeds") or []) or DASH
    lines = [
        f"- immunekit {val('immunekit')}, git {_git(prov)}",
        f"- python {val('python')}, torch {val('torch')}, numpy {val('numpy')}, pandas {val('pandas')}",
        f"- platform {val('platform')}, device {val('device')}, dtype {val('dtype')}",
        f"- seeds: {seeds}",
        f"- config_sha256: `{results.get('config_sha256') or DASH}`",
        f"- task_version: `{val('task_version')}`",
        f"- command:\n\n  ```\n  {val('command')}\n  ```",
    ]
    return "## Provenance\n\n" + "\n".join(lines)
