"""Render a results record (``results.json``, schema version 1) as a Markdown report.

Pure string building: no I/O, no plotting, deterministic for a given input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
    "rir",
    "log_rir",
    "kappa_ratio_harmful",
    "kappa_ratio_primary",
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
            ``"convergence.<attack key>"`` and ``"kappa_bars"``; other ids are embedded with the id
            as caption.

    Returns:
        The Markdown text, ending with a newline.

    """
    sections = [
        _title(results),
        _summary(results),
        _paper_table(results),
        _metrics_table(results),
        _verdict_table(results),
        _figures_section(results, figures),
        _provenance(results),
    ]
    return "\n\n".join(s.strip("\n") for s in sections if s) + "\n"


# ------------------------------------------------------------------------------------------ helpers


def _methods(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Return the method records in display order (see :func:`method_order`)."""
    methods = results.get("methods")
    if not isinstance(methods, Mapping):
        return {}
    return {m: methods[m] for m in method_order(results) if isinstance(methods[m], Mapping)}


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
    h = _mean_std(_metric(results, best, "kappa_ratio_harmful"))
    p = _mean_std(_metric(results, best, "kappa_ratio_primary"))
    return (
        f"{intro} {display_name(best)} has the highest mean RIR, "
        f"{_mean_std(_metric(results, best, 'rir'))} (harmful κ ratio (i) = {h}, "
        f"primary κ ratio (ii) = {p})."
    )


def _verdict_counts(record: Mapping[str, Any]) -> dict[str, int] | None:
    verdict = record.get("verdict")
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


def _steps_phrase(metric: Mapping[str, Any], budget: int | None) -> str:
    total, censored = _n_values(metric), _n_censored(metric)
    limit = str(budget) if budget is not None else "the budget"
    if total and censored >= total:
        return f"more than {limit} steps (ε not reached on {censored}/{total} seeds)"
    text = f"{_mean_std(metric)} steps"
    return f"{text} (ε not reached on {censored}/{total} seeds)" if censored else text


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
    text = (
        f"Under {attack_label(attack)}, a probe on {display_name(best)} needs "
        f"{_steps_phrase(harmful, budget)} to reach ε = {eps} on the harmful task versus "
        f"{_steps_phrase(primary, budget)} on the primary task"
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
    text = (
        f"Under {attack_label(attack)}, {display_name(best)} needs {_steps_phrase(harmful, budget)} "
        "on the harmful task"
    )
    ref = _metric(results, IDENTITY, f"{STEPS_PREFIX}harmful.{key}")
    if ref is not None:
        text += f" vs {_steps_phrase(ref, budget)} for {display_name(IDENTITY)}"
    total, censored = _n_values(harmful), _n_censored(harmful)
    if censored == 0:
        return text + "; Adam still reaches ε, so the κ slowdown is no guarantee against adaptive optimizers."
    if censored < total:
        return text + "; Adam reaches ε on some seeds, so κ does not reliably stop it."
    return (
        text + "; Adam did not reach ε within the budget here, but adaptive optimizers are outside the "
        "theory, so this is not guaranteed."
    )


# ------------------------------------------------------------------------------------------- tables


def _paper_rows(paper: Mapping[str, Any]) -> tuple[list[str], dict[str, list[Any]]]:
    """Columns and numeric rows of the paper's table; a bare number per method is the paper's RIR.

    Rows that are not a number or a list of numbers (e.g. a layout note or a per-pair matrix) are skipped.
    """
    raw = paper.get("rows")
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
    note = (
        f"Paper: {source}. Measured: mean ± std over {n_seeds} seed(s). "
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
    note = (
        "Mean ± std over seeds; ↑ higher is better, ↓ lower is better. "
        "`steps_to_epsilon.<task>.<attack>` is the first step with "
        f"‖w_t − w\\*‖²/‖w_0 − w\\*‖² ≤ ε = {fmt_num(results.get('epsilon'))}; "
        "censored seeds (ε not reached within the attack's step budget) are excluded from the mean."
    )
    return "## All metrics\n\n" + note + "\n\n" + _table(header, body, left_cols=2)


def _first_verdict(results: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for record in _methods(results).values():
        verdict = record.get("verdict")
        if isinstance(verdict, list) and verdict and isinstance(verdict[0], Mapping):
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
    for method, record in _methods(results).items():
        counts = _verdict_counts(record)
        if counts is None:
            body.append([display_name(method), DASH, DASH, DASH, DASH])
            continue
        total = counts["total"]
        body.append([display_name(method), *(f"{counts[k]}/{total}" for k in ("a", "b", "c", "immunized"))])
    header = ["Method", "(a) harmful harder", "(b) primary not harder", "(c) primary loss kept", "Immunized"]
    return (
        "## Definition 3.1 verdict\n\nSeeds passing each condition. "
        + _thresholds(first)
        + "\n\n"
        + _table(header, body)
    )


# ------------------------------------------------------------------------------- figures, provenance


def _figure_caption(results: Mapping[str, Any], fig_id: str) -> tuple[str, str]:
    if fig_id.startswith(CONVERGENCE_PREFIX):
        key = fig_id[len(CONVERGENCE_PREFIX) :]
        attack = attack_by_key(results).get(key, {"key": key})
        label = attack_label(attack)
        return (
            f"Convergence under {label}",
            f"‖w_t − w\\*‖²/‖w_0 − w\\*‖² of the attacker's linear probe per step "
            "(first seed, log scale); "
            f"left: primary task D_P, right: harmful task D_H; dotted line: ε; attacker: {label}.",
        )
    if fig_id == KAPPA_BARS:
        return (
            "κ ratios per method",
            "log10 (i) (solid) and log10 (ii) (hatched) per method, mean ± std over seeds; "
            "annotated: mean RIR.",
        )
    return fig_id, ""


def _figure_path(path: str) -> str:
    return f"<{path}>" if any(c in path for c in " ()") else path


def _figures_section(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    if not figures:
        return (
            "## Figures\n\nNo figures were rendered (matplotlib is missing or nothing was recorded to plot)."
        )
    blocks = []
    for fig_id, path in figures.items():
        alt, caption = _figure_caption(results, fig_id)
        block = f"### {alt}\n\n![{alt}]({_figure_path(path)})"
        blocks.append(block + (f"\n\n{caption}" if caption else ""))
    return "## Figures\n\n" + "\n\n".join(blocks)


def _git(prov: Mapping[str, Any]) -> str:
    sha = prov.get("git_sha")
    if not sha:
        return "unknown (not a git checkout)"
    dirty = prov.get("git_dirty")
    state = {True: " (dirty: uncommitted changes)", False: " (clean)"}.get(dirty, " (dirty state unknown)")
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
