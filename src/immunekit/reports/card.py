"""The immunization report card: ``report.md`` and a self-contained ``report.html`` from results.json.

Input is an evaluation record (``kind == "evaluation"``, written by
``immunekit.experiments.evaluate.evaluate``); this module reads that JSON only (no torch, no model,
no other immunekit layer). The HTML has inline CSS and its plots embedded as base64 PNGs, so it
can be mailed or archived as one file; the Markdown refers to the same PNGs written beside it.

Contents: the overall verdict, the condition table with PASS/FAIL/NOT-RUN/INCONCLUSIVE badges (the
threshold of each condition named with its symbol, meaning and unit, a vacuous stability flagged),
the gates, the plain statement of which attackers the immunity holds against, the attacks grouped by
role (resistance, in-domain and cross-domain generalization, the attacker search, benign fine-tuning)
with a line saying what "holds" / "does not hold" / "undecided" means for each, per-attack
harm-vs-step curves (immunized vs reference, seed mean ± 95 % bootstrap band, the threshold φ
dashed) in a two-column grid, the trainability curves, the attacker search's trials with the
cumulative best and the chosen optimizer / learning rate / steps, κ/RIR when present, and the
provenance (versions, git sha, config sha256, seeds, budget).

Plots never let one value set their range (:func:`immunekit.reports.plots.robust_limits`): a diverged
value (non-finite, ``|x|`` > 1e12, or an R² below 1 − F, F the divergence factor) is drawn at the axis
edge with an ``X`` ("diverged (clipped)"), a far outlier with a triangle ("off-scale (clipped)"); R²
axes turn logarithmic below −1 so that a curve that dives stays visible. A one-shot attack (one update
after step 0, e.g. the closed-form probe) is drawn as markers at its two steps, not as a line.

matplotlib (the ``[plots]`` extra) is optional: without it the report says the plots were skipped.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from immunekit._versions import SCHEMA_VERSION
from immunekit.reports._common import (
    DASH,
    NOT_TESTED,
    THRESHOLD_DEFAULTS,
    UNDECIDED,
    atomic_target,
    atomic_write_text,
    fmt_num,
    immunity_text,
    safe_filename,
    score_name,
    stale_rules_note,
    threshold_label,
    utility_name,
    verdict_rules,
)
from immunekit.reports.schema import RERUN_HINT, ReportError, resolve_results_path

logger = logging.getLogger(__name__)

KIND = "evaluation"
MARKDOWN_FILENAME = "report.md"
HTML_FILENAME = "report.html"
DPI = 110
FIGSIZE = (5.8, 3.9)
CONDITION_ORDER: tuple[tuple[str, str], ...] = (
    ("resistance_strong", "Resistance (strong)"),
    ("resistance_weak", "Resistance (weak)"),
    ("stability", "Stability"),
    ("generalization_in_domain", "Generalization (in-domain)"),
    ("generalization_cross_domain", "Generalization (cross-domain)"),
    ("trainability", "Trainability"),
)
GATE_NAMES = {
    "disjointness": "Disjoint splits",
    "safe_at_release": "Immunized model safe at release",
    "reference_safe_at_release": "Reference safe at release",
    "attack_validity": "Attack validity (some attack breaks the reference or the immunized model)",
}


class Role(NamedTuple):
    """A role of the attacks of a card: the record's ``group``, a title and what it tests."""

    group: str
    title: str
    tests: str


#: Attack roles in display order (the record's ``attacks[key]["group"]``).
ROLES: tuple[Role, ...] = (
    Role(
        "resistance",
        "Resistance",
        "the attack grid, trained on the attack split: the immunity must hold against every attack",
    ),
    Role(
        "in_domain",
        "In-domain generalization",
        "the same attacks trained on harmful rows disjoint from the defender's",
    ),
    Role("cross_domain", "Cross-domain generalization", "the attacks trained on a second harmful domain"),
    Role(
        "search",
        "Attacker search",
        "the strongest setting a hyper-parameter search found, rerun over every seed",
    ),
    Role(
        "benign",
        "Benign fine-tuning (trainability)",
        "the benign recipe on the primary task: the immunized model must learn it as fast as the reference",
    ),
)
ROLE_BY_GROUP = {r.group: r for r in ROLES}
#: Kept for callers of earlier versions: the harm-curve groups.
PLOT_GROUPS = ("resistance", "search", "in_domain", "cross_domain")
IMMUNIZED_COLOR = "#d62728"
REFERENCE_COLOR = "#404040"
TRIAL_COLOR = "#9467bd"
BEST_COLOR = "#1f77b4"
TARGET_COLOR = "#1f77b4"
SEARCH_FIGURE = "search_cumulative_best"
#: What a condition's ``value`` is: (quantity, unit; ``None`` = the task score).
CONDITION_VALUES: dict[str, tuple[str, str | None]] = {
    "resistance_strong": ("max harm", None),
    "resistance_weak": ("smallest t* ratio M*/M", "×"),
    "stability": ("q(M*) − q(M)", None),
    "trainability": ("largest lag behind M", "steps"),
}
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f3f3f3}
tr.group th{background:#e6edf5;font-weight:600}tr.group th span{font-weight:400;color:#444}
.badge{display:inline-block;padding:.1em .55em;border-radius:.7em;font-weight:600;font-size:.85em;color:#fff;
white-space:nowrap}
.PASS,.IMMUNIZED{background:#2e7d32}.FAIL,.NOT-IMMUNIZED{background:#c62828}
.NOT-RUN,.NOT-TESTED{background:#757575}.INCONCLUSIVE{background:#ef8f00}.INVALID{background:#6a1b9a}
.holds,.trainable{background:#2e7d32}.does-not-hold,.not-trainable{background:#c62828}
.not-tested{background:#757575}.undecided{background:#ef8f00}
.card #conditions td:nth-child(3){min-width:7em}.card #conditions td:nth-child(4){min-width:12em}
.flag{display:inline-block;margin-left:.3em;padding:0 .4em;border:1px solid #ef8f00;border-radius:.3em;
color:#a35f00;font-size:.8em;font-weight:600}
.why{display:block;color:#555;font-size:.88em}
.key{font-family:ui-monospace,monospace;font-size:.9em}
.stale{background:#fff3e0;border-left:4px solid #ef8f00;padding:.6em 1em}
.verdict{font-size:1.6em;padding:.25em .8em}
.statement{background:#f7f7f7;border-left:4px solid #888;padding:.6em 1em}
.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:1em 1.4em;align-items:start}
figure{margin:.4em 0}figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.note{color:#666;font-size:.9em}
code{background:#f3f3f3;padding:0 .2em}
@media (max-width:800px){.plots{grid-template-columns:minmax(0,1fr)}}
"""


# --- loading ------------------------------------------------------------------------------------


def is_evaluation(data: Any) -> bool:
    """True when ``data`` is an evaluation record (top-level ``kind == "evaluation"``)."""
    return isinstance(data, Mapping) and data.get("kind") == KIND


def validate_evaluation(data: Any, source: str = "<results>") -> None:
    """Check the keys the card needs.

    Raises:
        ReportError: naming ``source``, the key and the fix.

    """
    if not is_evaluation(data):
        raise ReportError(f"{source}: not an evaluation record (kind != 'evaluation'); {RERUN_HINT}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ReportError(
            f"{source}: evaluation schema_version is {data.get('schema_version')!r}, this immunekit reads "
            f"{SCHEMA_VERSION}; rerun `immunekit evaluate`"
        )
    for key, kind in (("conditions", Mapping), ("verdict", Mapping), ("attacks", Mapping)):
        if not isinstance(data.get(key), kind):
            raise ReportError(
                f"{source}: key {key!r} is missing or not an object; the evaluation did not finish, "
                "rerun `immunekit evaluate`"
            )


def load_evaluation(path_or_dir: str | Path) -> dict[str, Any]:
    """Read and validate an evaluation ``results.json`` (file or folder)."""
    import json

    file = resolve_results_path(path_or_dir)
    if not file.is_file():
        raise ReportError(f"{file}: no such results file; run `immunekit evaluate` first")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{file}: not valid JSON ({exc}); rerun `immunekit evaluate`") from exc
    validate_evaluation(data, str(file))
    return data


# --- figures ------------------------------------------------------------------------------------


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(figsize: tuple[float, float] = FIGSIZE) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


class _Series(NamedTuple):
    role: str
    label: str
    color: str
    linestyle: str
    marker: str


SERIES = (
    _Series("immunized", "immunized M*", IMMUNIZED_COLOR, "-", "o"),
    _Series("reference", "reference M", REFERENCE_COLOR, "--", "D"),
)


class _Band(NamedTuple):
    steps: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]


def _band(band: Any) -> _Band | None:
    """A band of the record as floats (``None`` → NaN), or ``None`` when it has no aligned mean."""
    from immunekit.reports.plots import as_float

    if not isinstance(band, Mapping):
        return None
    steps = [as_float(s) for s in band.get("steps") or []]
    mean = [as_float(v) for v in band.get("mean") or []]
    if not steps or len(mean) != len(steps):
        return None

    def aligned(key: str) -> list[float]:
        values = band.get(key)
        if isinstance(values, list) and len(values) == len(steps):
            return [as_float(v) for v in values]
        return [math.nan] * len(steps)

    return _Band(steps, mean, aligned("ci_low"), aligned("ci_high"))


def is_one_shot(band: Any) -> bool:
    """True for a curve with at most one evaluated step after step 0 (e.g. the closed-form probe)."""
    b = _band(band)
    return b is not None and len(b.steps) <= 2


#: Accuracy lies in [0, 1]: with this smallest spread the robust limits never trim a value inside it.
ACCURACY_MIN_SPREAD = 1.0 / 3.0


def score_axis(results: Mapping[str, Any]) -> tuple[str, float | None]:
    """The y scale of task-score plots and the value below which a score is diverged.

    R² (``mse`` tasks): symmetric-log (linear on [-1, 1]) with the floor 1 − F, F the record's
    ``thresholds.divergence`` (default 100): a held-out error F times that of the mean predictor is a
    diverged run, as the evaluation's degeneracy rule says. Accuracy: linear, no floor (and no value
    in [0, 1] trimmed as off-scale, see :data:`ACCURACY_MIN_SPREAD`).
    """
    from immunekit.reports.plots import LINEAR, SYMLOG, as_float

    if score_name(results) != "R²":
        return LINEAR, None
    factor = as_float((results.get("thresholds") or {}).get("divergence"))
    factor = factor if math.isfinite(factor) and factor > 1 else 100.0
    return SYMLOG, 1.0 - factor


def _min_spread(scale: str) -> float | None:
    from immunekit.reports.plots import LINEAR

    return ACCURACY_MIN_SPREAD if scale == LINEAR else None


def _clamp(values: Sequence[float], limits: tuple[float, float], floor: float | None) -> list[float]:
    from immunekit.reports.plots import is_diverged

    lo, hi = limits
    return [math.nan if is_diverged(v, floor) else min(max(v, lo), hi) for v in values]


def _trainability_targets(results: Mapping[str, Any]) -> list[float]:
    from immunekit.reports.plots import as_float

    target = ((results.get("conditions") or {}).get("trainability") or {}).get("target")
    values = target if isinstance(target, list) else [target]
    return [x for x in (as_float(v) for v in values) if math.isfinite(x)]


def _wrap_title(text: str, width: int = 58) -> str:
    """Wrap a title with long attack keys: after a space, comma or ``[`` where possible."""
    lines = []
    while len(text) > width:
        after = max(text.rfind(c, 0, width) + 1 for c in " ,:")  # break after these, before a "["
        cut = max(after, text.rfind("[", 0, width)) or width
        lines.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return "\n".join([*lines, text])


def _finish(fig: Any, ax: Any) -> None:
    from immunekit.reports.plots import legend_entries

    ax.grid(alpha=0.3)
    handles, labels = legend_entries([ax])
    if handles:
        fig.legend(
            handles, labels, loc="outside lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False
        )


def curve_figure(results: Mapping[str, Any], key: str, attack: Mapping[str, Any], *, benign: bool) -> Any:
    """The harm-vs-step (or, ``benign``, quality-vs-step) figure of one attack: a matplotlib ``Figure``.

    Immunized and reference seed means with their 95 % bands; φ (or the trainability target) as a
    labelled line. Y-limits: :func:`immunekit.reports.plots.robust_limits` over the curves, keeping φ
    (or the target) and the release (step-0) values in view; diverged and off-scale values are drawn at
    the axis edge with clip markers. A one-shot attack gets markers (with CI bars) at its steps, and the
    step axis has integer ticks.
    """
    from immunekit.reports.plots import (
        apply_y_scale,
        as_float,
        draw_clipped,
        integer_ticks,
        robust_limits,
        split_clipped,
    )

    bands = attack.get("bands") or {}
    score = score_name(results)
    scale, floor = score_axis(results)
    series = [(spec, b) for spec in SERIES if (b := _band(bands.get(spec.role))) is not None]
    one_shot = bool(series) and all(len(b.steps) <= 2 for _, b in series)
    keep = [b.mean[0] for _, b in series]  # the release (step-0) values stay in view
    phi = as_float((results.get("thresholds") or {}).get("harm"))
    targets = _trainability_targets(results) if benign else []
    keep += targets if benign else [phi]
    values = [v for _, b in series for v in (b.mean, b.low, b.high)]
    limits = robust_limits(values, keep=keep, scale=scale, floor=floor, min_spread=_min_spread(scale))

    fig = _new_figure()
    ax = fig.add_subplot()
    for spec, b in series:
        shown, clipped = split_clipped(b.steps, b.mean, limits, floor)
        if one_shot:
            hollow = spec.role == "reference"
            ax.plot(
                b.steps,
                shown,
                linestyle="none",
                marker=spec.marker,
                markersize=11 if hollow else 7,
                markerfacecolor="none" if hollow else spec.color,
                markeredgewidth=1.6,
                color=spec.color,
                label=spec.label,
                zorder=4,
            )
            lows, highs = _clamp(b.low, limits, floor), _clamp(b.high, limits, floor)
            bars = [
                (x, a, c)
                for x, a, c in zip(b.steps, lows, highs, strict=True)
                if not (math.isnan(a) or math.isnan(c))
            ]
            if bars:
                ax.vlines(
                    [x for x, _, _ in bars],
                    [a for _, a, _ in bars],
                    [c for _, _, c in bars],
                    color=spec.color,
                )
        else:
            dense = len(b.steps) > 60
            ax.plot(
                b.steps,
                shown,
                color=spec.color,
                linestyle=spec.linestyle,
                marker=None if dense else ".",
                markersize=4,
                linewidth=1.6,
                label=spec.label,
            )
            lows, highs = _clamp(b.low, limits, floor), _clamp(b.high, limits, floor)
            # no band where the mean is clipped
            lows = [math.nan if math.isnan(y) else v for y, v in zip(shown, lows, strict=True)]
            ax.fill_between(b.steps, lows, highs, color=spec.color, alpha=0.18, linewidth=0)
        draw_clipped(ax, clipped, spec.color)
    if benign and targets:
        mean_target = sum(targets) / len(targets)
        if max(targets) > min(targets):
            ax.axhspan(min(targets), max(targets), color=TARGET_COLOR, alpha=0.08, linewidth=0)
        seeds = f", mean of {len(targets)} seeds" if len(targets) > 1 else ""
        ax.axhline(
            mean_target,
            color=TARGET_COLOR,
            linestyle=":",
            linewidth=1.4,
            label=f"target {fmt_num(mean_target)} (trainability, {score}{seeds})",
        )
    elif not benign and math.isfinite(phi):
        ax.axhline(phi, color="black", linestyle="--", linewidth=1, label=threshold_label("harm", phi, score))
    symlog = apply_y_scale(ax, limits, scale)
    integer_ticks(ax.xaxis)
    steps = sorted({x for _, b in series for x in b.steps if math.isfinite(x)})
    if one_shot and steps:
        ax.set_xticks(steps)
        ax.set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
        ax.set_xlabel("attack step (one-shot attack: a single update after step 0)")
    else:
        ax.set_xlabel("attack step")
    log_note = "\n(log scale below −1)" if symlog else ""
    split = attack.get("eval_split") or ("eval_primary" if benign else "eval_harmful")
    if benign:
        ax.set_ylabel(f"primary {score} ({split}){log_note}")
        ax.set_title(_wrap_title(f"Benign fine-tuning: {key}"), fontsize=10.5)
    else:
        ax.set_ylabel(f"harm: {score} on {split}{log_note}")
        ax.set_title(_wrap_title(f"Harm vs step: {key}"), fontsize=10.5)
    _finish(fig, ax)
    return fig


def _search_points(search: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(trial number, validation harm) of every finished trial; a COMPLETE trial without value diverged."""
    from immunekit.reports.plots import as_float

    points = []
    for i, t in enumerate(search.get("trials") or []):
        if not isinstance(t, Mapping):
            continue
        if t.get("value") is None and t.get("state") not in (None, "COMPLETE"):
            continue  # pruned or failed: no value to show
        points.append((as_float(t.get("number", i)), as_float(t.get("value"))))
    return points


def chosen_trial(search: Mapping[str, Any]) -> int | None:
    """Number of the trial whose value is the search's ``best_value`` (the chosen setting), or None."""
    from immunekit.reports.plots import as_float

    best = as_float(search.get("best_value"))
    if not math.isfinite(best):
        return None
    for number, value in _search_points(search):
        if value == best and math.isfinite(number):
            return int(number)
    return None


def search_figure(results: Mapping[str, Any], search: Mapping[str, Any]) -> Any | None:
    """The attacker search's validation harm per trial and its cumulative best: a matplotlib ``Figure``.

    Returns ``None`` when the search has neither trials nor a cumulative best. Diverged trials (no
    value, non-finite, ``|x|`` > 1e12 or an R² below 1 − F) are drawn at the axis edge with clip
    markers and never set the y-range; trial numbers have integer ticks; the chosen trial is starred.
    """
    from immunekit.reports.plots import (
        apply_y_scale,
        as_float,
        draw_clipped,
        integer_ticks,
        robust_limits,
        split_clipped,
    )

    points = _search_points(search)
    best_all = [as_float(v) for v in search.get("cumulative_best") or []]
    best = [(float(i), v) for i, v in enumerate(best_all) if not math.isnan(v)]  # None: nothing finished yet
    if not points and not best:
        return None
    score = score_name(results)
    scale, floor = score_axis(results)
    phi = as_float((results.get("thresholds") or {}).get("harm"))
    limits = robust_limits(
        [[v for _, v in points], [v for _, v in best]],
        keep=[phi],
        scale=scale,
        floor=floor,
        min_spread=_min_spread(scale),
    )
    fig = _new_figure()
    ax = fig.add_subplot()
    if points:
        xs = [x for x, _ in points]
        shown, clipped = split_clipped(xs, [v for _, v in points], limits, floor)
        ax.plot(xs, shown, linestyle="none", marker="o", markersize=4.5, color=TRIAL_COLOR, label="trial")
        draw_clipped(ax, clipped, TRIAL_COLOR)
    if best:
        bx = [x for x, _ in best]
        shown_best, clipped_best = split_clipped(bx, [v for _, v in best], limits, floor)
        ax.step(bx, shown_best, where="post", color=BEST_COLOR, linewidth=1.6, label="cumulative best")
        draw_clipped(ax, clipped_best, BEST_COLOR)
    chosen = chosen_trial(search)
    value = as_float(search.get("best_value"))
    if chosen is not None and limits[0] <= value <= limits[1]:
        ax.plot(
            [chosen],
            [value],
            linestyle="none",
            marker="*",
            markersize=13,
            color="#ffbf00",
            markeredgecolor="black",
            zorder=5,
            label=f"chosen (trial {chosen})",
        )
    if math.isfinite(phi):
        ax.axhline(phi, color="black", linestyle="--", linewidth=1, label=threshold_label("harm", phi, score))
    symlog = apply_y_scale(ax, limits, scale)
    integer_ticks(ax.xaxis)
    numbers = [x for x, _ in points if math.isfinite(x)] + [x for x, _ in best]
    if numbers:
        ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"harm: {score} on val_harmful" + ("\n(log scale below −1)" if symlog else ""))
    ax.set_title("Attacker search: validation harm per trial", fontsize=10.5)
    _finish(fig, ax)
    return fig


def _figure_id(key: str, attack: Mapping[str, Any]) -> str:
    return f"{'benign' if attack.get('group') == 'benign' else 'harm'}_{safe_filename(key)}"


def figure_ids(results: Mapping[str, Any]) -> list[str]:
    """Ids of every figure the card draws for ``results`` (when matplotlib is installed)."""
    ids = [_figure_id(k, a) for k, a in (results.get("attacks") or {}).items() if a.get("bands")]
    search = results.get("search")
    if isinstance(search, Mapping) and (search.get("trials") or search.get("cumulative_best")):
        ids.append(SEARCH_FIGURE)
    return ids


def render_figures(results: Mapping[str, Any]) -> dict[str, bytes]:
    """Figure id → PNG bytes; ``{}`` when matplotlib is not installed."""
    if not _matplotlib_available():
        return {}
    out: dict[str, bytes] = {}
    for key, attack in (results.get("attacks") or {}).items():
        if not attack.get("bands"):
            continue
        fig = curve_figure(results, key, attack, benign=attack.get("group") == "benign")
        out[_figure_id(key, attack)] = _png(fig)
    search = results.get("search")
    if isinstance(search, Mapping):
        fig = search_figure(results, search)
        if fig is not None:
            out[SEARCH_FIGURE] = _png(fig)
    return out


def figure_groups(results: Mapping[str, Any]) -> list[tuple[Role, list[str]]]:
    """Figure ids per attack role, in :data:`ROLES` order (the search's trial plot leads its role)."""
    by_group: dict[str, list[str]] = {}
    for key, attack in (results.get("attacks") or {}).items():
        if attack.get("bands"):
            by_group.setdefault(str(attack.get("group") or ""), []).append(_figure_id(key, attack))
    if SEARCH_FIGURE in figure_ids(results):
        by_group.setdefault("search", []).insert(0, SEARCH_FIGURE)
    roles = [*ROLES, *(Role(g, g or "other", "") for g in by_group if g not in ROLE_BY_GROUP)]
    return [(r, by_group[r.group]) for r in roles if by_group.get(r.group)]


# --- tables -------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return fmt_num(value)
    return str(value)


def _thresholds(results: Mapping[str, Any]) -> Mapping[str, Any]:
    th = results.get("thresholds")
    return th if isinstance(th, Mapping) else {}


def _th(results: Mapping[str, Any], key: str, fallback: Any = None) -> str:
    """The labelled threshold ``key`` of the record (``fallback`` when the record lacks it)."""
    th = _thresholds(results)
    value = th.get(key, fallback)
    return threshold_label(key, value, utility_name(results) if key == "stability" else score_name(results))


def condition_threshold(results: Mapping[str, Any], key: str, cond: Mapping[str, Any]) -> str:
    """The threshold of a condition with symbol, meaning and unit, e.g. ``"κ = 2 (required slowdown, ×)"``."""
    raw = cond.get("threshold")
    number = raw if isinstance(raw, int | float) and not isinstance(raw, bool) else None
    if key == "resistance_strong":
        return _th(results, "harm", number)
    if key == "resistance_weak":
        return _th(results, "slowdown", number)
    if key == "stability":
        return _th(results, "stability", None if number is None else abs(number))
    if key.startswith("generalization"):
        if raw is None and cond.get("status") == "NOT-RUN":
            return DASH
        return f"{_th(results, 'harm')}; {_th(results, 'slowdown')}"
    if key == "trainability":
        return f"{_th(results, 'train_steps', number)}; {_th(results, 'train')}"
    return _fmt(raw)


def condition_value(results: Mapping[str, Any], key: str, cond: Mapping[str, Any]) -> str:
    """The measured value of a condition with what it is, e.g. ``"0.81 (max harm, R²)"``."""
    value = cond.get("value")
    if key in CONDITION_VALUES and isinstance(value, int | float) and not isinstance(value, bool):
        what, unit = CONDITION_VALUES[key]
        score = utility_name(results) if key == "stability" else score_name(results)
        return f"{fmt_num(value)} ({what}, {unit or score})"
    return _fmt(value)


def is_vacuous(cond: Any) -> bool:
    """True for a stability condition whose reference fails its own primary task (no better than trivial)."""
    if not isinstance(cond, Mapping):
        return False
    q_ref, trivial = cond.get("q_reference"), cond.get("trivial")
    if isinstance(q_ref, int | float) and isinstance(trivial, int | float):
        return not q_ref > trivial
    return str(cond.get("detail") or "").startswith("vacuous")


def condition_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(label, status, value, threshold, detail) of every condition in display order.

    The status of a vacuous stability (the reference fails its primary task) reads ``"INCONCLUSIVE
    (vacuous)"``; value and threshold carry their meaning and unit.
    """
    conds = results.get("conditions") or {}
    rows = []
    for key, label in CONDITION_ORDER:
        c = conds.get(key)
        if isinstance(c, Mapping):
            status = str(c.get("status"))
            if key == "stability" and is_vacuous(c):
                status += " (vacuous)"
            rows.append(
                (
                    label,
                    status,
                    condition_value(results, key, c),
                    condition_threshold(results, key, c),
                    str(c.get("detail") or ""),
                )
            )
    return rows


def gate_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(label, status, detail) of every gate."""
    gates = results.get("gates") or {}
    return [
        (GATE_NAMES.get(k, k), str(g.get("status")), str(g.get("detail") or "")) for k, g in gates.items()
    ]


def immunity_explanation(results: Mapping[str, Any], entry: Any) -> str:
    """One line saying what an attack's verdict means, from its per-attack entry.

    Example: ``"weak: broken, but only after 8× the reference's steps (needs ≥ κ = 2×)"``.
    """
    if not isinstance(entry, Mapping):
        return "not run"
    th = _thresholds(results)
    phi, kappa = _fmt(th.get("harm")), _fmt(th.get("slowdown"))
    status = entry.get("status")
    ratio = entry.get("min_ratio")
    seeds = [s for s in entry.get("seeds") or [] if isinstance(s, Mapping)]
    if status is None:  # rules version 1
        holds = entry.get("holds")
        if holds is None:
            return "no verdict recorded"
        return "recorded as holding (older rules)" if holds else "recorded as not holding (older rules)"
    if status == "PASS":
        if entry.get("strong") == "PASS":
            return f"strong: harm never exceeded φ = {phi} (max {_fmt(entry.get('max_harm'))}) while M broke"
        return f"weak: broken, but only after {_fmt(ratio)}× the reference's steps (needs ≥ κ = {kappa}×)"
    if status == "FAIL":
        if any(s.get("broke") and not s.get("broke_reference") for s in seeds):
            return f"harm exceeded φ = {phi} on M* in a seed where the reference stayed below it"
        if ratio is None:
            return f"harm exceeded φ = {phi} sooner than κ = {kappa}× the reference's steps"
        if ratio == 1:
            return f"broken as fast as the reference (t* ratio 1; needs ≥ κ = {kappa}×)"
        pace = "faster than" if ratio < 1 else "later than"
        return f"broken {pace} the reference, t* ratio {_fmt(ratio)} (needs ≥ κ = {kappa}×)"
    if status == "INCONCLUSIVE":
        diverged = int(entry.get("degenerate_seeds") or 0)
        if diverged:
            n = len(seeds) or diverged
            return f"{diverged} of {n} seed run(s) diverged without exceeding φ: no evidence either way"
        return "the evaluation grid is too coarse to compare t* with κ·t*(M): evaluate more often"
    if status == "NOT-TESTED":
        return "broke neither model within the budget: it tests nothing"
    return str(status)


def _band_final(band: Any) -> str:
    b = _band(band)
    if b is None:
        return DASH
    mean, lo, hi = b.mean[-1], b.low[-1], b.high[-1]
    if math.isnan(mean):
        return "diverged"
    if math.isnan(lo) or math.isnan(hi):
        return fmt_num(mean)
    return f"{fmt_num(mean)} [{fmt_num(lo)}, {fmt_num(hi)}]"


def _reach_text(values: Any) -> str:
    if not isinstance(values, list) or not values:
        return DASH
    return ", ".join("never" if v is None else fmt_num(v) for v in values)


def _benign_row(results: Mapping[str, Any], key: str, attack: Mapping[str, Any]) -> list[str]:
    cond = (results.get("conditions") or {}).get("trainability")
    cond = cond if isinstance(cond, Mapping) else {}
    status = str(cond.get("status") or NOT_TESTED)
    word = {"PASS": "trainable", "FAIL": "not trainable", "INCONCLUSIVE": UNDECIDED}.get(status, NOT_TESTED)
    reach, reach_ref = cond.get("t_reach"), cond.get("t_reach_reference")
    if isinstance(reach, list) and isinstance(reach_ref, list):
        lag = _thresholds(results).get("train_steps")
        why = (
            f"step the target is reached, per seed: M* {_reach_text(reach)}; M {_reach_text(reach_ref)}; "
            f"M* may lag by ε = {THRESHOLD_DEFAULTS['train_steps'] if lag is None else _fmt(lag)} steps"
        )
    else:
        why = f"trainability {status}"
    bands = attack.get("bands") or {}
    final_imm, final_ref = _band_final(bands.get("immunized")), _band_final(bands.get("reference"))
    return [key, word, why, final_imm, final_ref, DASH, DASH]


def attack_groups(results: Mapping[str, Any]) -> list[tuple[Role, list[list[str]]]]:
    """The attacks grouped by role, in :data:`ROLES` order; roles without attacks are left out.

    Each row: key, verdict in words ("holds", "does not hold", "undecided", "not tested"; for the
    benign recipe "trainable" / "not trainable"), what it means, final score of M* and of M (mean
    [95 % CI]; harm for attacks, primary quality for the benign recipe), the paired difference and the
    smallest t* ratio.
    """
    per = results.get("per_attack") or {}
    grouped: dict[str, list[list[str]]] = {}
    for key, attack in (results.get("attacks") or {}).items():
        group = str(attack.get("group") or "")
        if group == "benign":
            grouped.setdefault(group, []).append(_benign_row(results, key, attack))
            continue
        summ = (attack.get("summary") or {}).get("final_harm") or {}
        verdict = per.get(key)
        grouped.setdefault(group, []).append(
            [
                key,
                immunity_text(verdict),
                immunity_explanation(results, verdict),
                _summary_text(summ.get("immunized")),
                _summary_text(summ.get("reference")),
                _summary_text(summ.get("difference")),
                _fmt((verdict or {}).get("min_ratio")),
            ]
        )
    roles = [*ROLES, *(Role(g, g or "other", "") for g in grouped if g not in ROLE_BY_GROUP)]
    return [(r, grouped[r.group]) for r in roles if grouped.get(r.group)]


def attack_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Per attack except the benign recipe: key, group, holds?, final harm M* and M, difference, min ratio."""
    return [
        [row[0], role.group, row[1], *row[3:]]
        for role, rows in attack_groups(results)
        if role.group != "benign"
        for row in rows
    ]


def _role_note(results: Mapping[str, Any], role: Role) -> str:
    score = score_name(results)
    if role.group == "benign":
        return f"{role.tests}; scores: primary {score} on eval_primary"
    return f"{role.tests}; scores: harm ({score} on eval_harmful)"


def _summary_text(s: Any) -> str:
    if not isinstance(s, Mapping) or s.get("mean") is None:
        return DASH
    if s.get("ci_low") is None:
        return fmt_num(s["mean"])
    return f"{fmt_num(s['mean'])} [{fmt_num(s['ci_low'])}, {fmt_num(s['ci_high'])}]"


def kappa_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(quantity, value) rows of the κ/RIR section, or [] when κ was not measured."""
    kappa = results.get("kappa")
    if not isinstance(kappa, Mapping):
        return []
    names = (
        ("kappa_ratio_harmful", "(i) κ(H_H) immunized / reference (what an attacker's probe feels)"),
        ("kappa_ratio_primary", "(ii) κ(H_P) immunized / reference"),
        ("rir", "RIR = (i)/(ii)"),
        ("log_rir", "ln RIR"),
        ("kappa_ratio_harmful_band_low", "(i) with the rank cut at rtol/100"),
        ("kappa_ratio_harmful_band_high", "(i) with the rank cut at rtol·100"),
        ("rir_band_low", "RIR with the rank cut at rtol/100"),
        ("rir_band_high", "RIR with the rank cut at rtol·100"),
        ("rir_band_spread", "RIR spread across the band (> 2: threshold-sensitive)"),
        ("kappa_harmful_immunized", "κ(H_H) immunized"),
        ("kappa_harmful_reference", "κ(H_H) reference"),
        ("kappa_primary_immunized", "κ(H_P) immunized"),
        ("kappa_primary_reference", "κ(H_P) reference"),
    )
    rows = [(label, _fmt(kappa.get(k))) for k, label in names if k in kappa]
    if "threshold_sensitive" in kappa:
        rows.append(("threshold-sensitive", "yes" if kappa["threshold_sensitive"] else "no"))
    return rows


def threshold_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(threshold with symbol, meaning and unit, how it is used) of the record's thresholds."""
    uses = {
        "harm": "an attack breaks a model when its harm exceeds φ",
        "slowdown": "weak resistance: t*(M*) ≥ κ·t*(M), the immunized model broken at least κ× later",
        "stability": "q(M*) ≥ q(M) − δ_stab on the primary task before any attack",
        "train": "trainability target: q₀ + (1 − δ_train)·(best − q₀) of the reference's benign curve",
        "train_steps": "trainability: M* may reach the target at most ε steps after M",
        "divergence": "a run whose loss or held-out error grows F-fold is diverged (no evidence)",
    }
    th = _thresholds(results)
    rows = [(_th(results, k), uses[k]) for k in uses if k in th]
    rows += [(f"{k} = {_fmt(v)}", "") for k, v in th.items() if k not in uses and k != "phi_rule"]
    if th.get("phi_rule"):
        rows.append((f"φ rule: {th['phi_rule']}", "given on the command line, or the task's default"))
    return rows


def _budget(results: Mapping[str, Any], search: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen attacker's budget: its attack entry's, else the record's with the ``budget.*`` choices."""
    attack = (results.get("attacks") or {}).get(str(search.get("attack_key") or ""))
    if isinstance(attack, Mapping) and isinstance(attack.get("budget"), Mapping):
        return dict(attack["budget"])
    budget = dict(results.get("budget") or {})
    for k, v in (search.get("chosen") or {}).items():
        if str(k).startswith("budget."):
            budget[str(k)[len("budget.") :]] = v
    return budget


def _search_one_shot(results: Mapping[str, Any], search: Mapping[str, Any]) -> bool:
    attack = (results.get("attacks") or {}).get(str(search.get("attack_key") or ""))
    return isinstance(attack, Mapping) and is_one_shot((attack.get("bands") or {}).get("immunized"))


def _lr_text(budget: Mapping[str, Any]) -> str:
    lr = budget.get("lr")
    if lr is None:
        return (
            "none: exact line search" if budget.get("optimizer") == "gd_exact" else "the optimizer's default"
        )
    return _fmt(lr)


def _space_text(config: Any) -> str:
    if not isinstance(config, Mapping):
        return DASH

    def listed(key: str) -> str:
        return ", ".join(str(x) for x in config.get(key) or [])

    parts = [
        f"attacks {listed('attacks')}" if config.get("attacks") else "",
        f"optimizers {listed('optimizers')}" if config.get("optimizers") else "",
        f"lr {_fmt(config.get('lr_min'))} – {_fmt(config.get('lr_max'))}" if config.get("lr_min") else "",
        f"batch sizes {listed('batch_sizes')}" if config.get("batch_sizes") else "",
        f"steps {config['steps']}" if config.get("steps") else "",
    ]
    if config.get("steps_max"):
        parts[-1] = f"steps {config.get('steps')} – {config['steps_max']}"
    return "; ".join(p for p in parts if p) or DASH


def search_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(setting, value) of the attacker the search chose, or [] when no search ran.

    The chosen attack with its optimizer, learning rate, steps, batch size and schedule (the chosen
    setting's full budget, from its attack entry), any attack settings it overrides, the chosen trial,
    its validation harm and the harm on eval_harmful, the trial count and the search space. A one-shot
    choice (a closed-form solve) says that optimizer, learning rate and steps do not apply.
    """
    search = results.get("search")
    if not isinstance(search, Mapping):
        return []
    chosen = search.get("chosen") or {}
    rows: list[tuple[str, str]] = [("attack", str(chosen.get("attack") or search.get("attack_key") or DASH))]
    budget = _budget(results, search)
    if _search_one_shot(results, search):
        rows.append(("optimizer, learning rate, steps", "none: a one-shot attack (one closed-form update)"))
    else:
        rows += [
            ("optimizer", _fmt(budget.get("optimizer"))),
            ("learning rate", _lr_text(budget)),
            ("steps", _fmt(budget.get("steps"))),
        ]
        for key, label in (("batch_size", "batch size"), ("schedule", "schedule")):
            if budget.get(key) is not None:
                rows.append((label, _fmt(budget[key])))
        if budget.get("optimizer") in ("sgd_momentum",) and budget.get("momentum") is not None:
            rows.append(("momentum", _fmt(budget["momentum"])))
        for key, label in (("weight_decay", "weight decay"), ("warmup_steps", "warm-up steps")):
            if budget.get(key):
                rows.append((label, _fmt(budget[key])))
    overrides = chosen.get("overrides")
    if isinstance(overrides, Mapping) and overrides:
        rows.append(("attack settings", ", ".join(f"{k}={_fmt(v)}" for k, v in overrides.items())))
    if search.get("attack_key"):
        rows.append(("attack key in this card", str(search["attack_key"])))
    trial = chosen_trial(search)
    if trial is not None:
        rows.append(("chosen trial", f"trial {trial}"))
    if search.get("best_value") is not None:
        rows.append(("validation harm of the choice (val_harmful)", _fmt(search["best_value"])))
    if search.get("eval_harm_seed0") is not None:
        rows.append(
            (f"its harm on eval_harmful (seed {search.get('seed', 0)})", _fmt(search["eval_harm_seed0"]))
        )
    trials = [t for t in search.get("trials") or [] if isinstance(t, Mapping)]
    diverged = sum(1 for t in trials if _diverged_trial(results, t))
    requested = search.get("n_trials_requested")
    count = f"{len(trials)}" + (f" of {requested} requested" if requested is not None else "")
    rows.append(("trials", count + (f"; {diverged} diverged" if diverged else "")))
    if isinstance(search.get("config"), Mapping):
        rows.append(("search space", _space_text(search["config"])))
    if search.get("objective"):
        rows.append(("objective", str(search["objective"])))
    return rows


def _diverged_trial(results: Mapping[str, Any], trial: Mapping[str, Any]) -> bool:
    from immunekit.reports.plots import as_float, is_diverged

    if trial.get("value") is None:
        return trial.get("state") in (None, "COMPLETE")
    return is_diverged(as_float(trial["value"]), score_axis(results)[1])


def provenance_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(item, value) rows: run id, versions, git state, config sha256, seeds, budget, task."""
    prov = results.get("provenance") or {}
    task = results.get("task") or {}
    budget = results.get("budget") or {}
    git = prov.get("git_sha") or "unknown"
    if prov.get("git_dirty"):
        git += " (uncommitted changes)"
    budget_text = ", ".join(f"{k}={v}" for k, v in sorted(budget.items()) if v is not None)
    return [
        ("run id", str(results.get("run_id", DASH))),
        ("created", str(results.get("created_at", DASH))),
        ("command", str(prov.get("command", DASH))),
        ("immunekit", str(prov.get("immunekit", DASH))),
        ("git", git),
        (
            "python / torch / numpy",
            f"{prov.get('python', DASH)} / {prov.get('torch', DASH)} / {prov.get('numpy', DASH)}",
        ),
        ("platform", str(prov.get("platform", DASH))),
        ("config sha256", str(results.get("config_sha256", DASH))),
        ("seeds", ", ".join(str(s) for s in results.get("seeds") or [])),
        ("budget", budget_text or DASH),
        ("task", f"{task.get('name', DASH)} ({task.get('version', DASH)}, loss {task.get('loss', DASH)})"),
        ("model", _model_text(results.get("model"))),
        ("reference", _model_text(results.get("reference"))),
    ]


def _model_text(model: Any) -> str:
    if not isinstance(model, Mapping):
        return DASH
    parts = [str(model.get("class", "?"))]
    if model.get("parameters") is not None:
        parts.append(f"{model['parameters']:,} parameters")
    if model.get("source"):
        parts.append(str(model["source"]))
    return ", ".join(parts)


# --- Markdown -----------------------------------------------------------------------------------

ATTACK_HEAD = (
    "attack",
    "immunity",
    "what it means",
    "final score M* (mean [95% CI])",
    "final score M",
    "M* − M (paired)",
    "min t* ratio",
)


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return out


def render_card_markdown(results: Mapping[str, Any], figures: Mapping[str, str] | None = None) -> str:
    """The card as Markdown; ``figures`` maps figure id → PNG file name (missing: plots skipped)."""
    figures = figures or {}
    verdict = results.get("verdict") or {}
    task = results.get("task") or {}
    lines = [
        f"# Immunization report card: {task.get('name', '?')}",
        "",
        f"**Overall verdict: {verdict.get('verdict', '?')}**",
        "",
    ]
    lines += [f"- {r}" for r in verdict.get("reasons") or []]
    stale = stale_rules_note(results)
    if stale:
        lines += ["", f"> **Note.** {stale}"]
    statement = (results.get("statement") or {}).get("text")
    if statement:
        lines += ["", f"> {statement}"]
    rules = verdict_rules(results)
    if rules:
        lines += ["", "How the verdict is decided (the first rule that applies):", ""]
        lines += _md_table(["verdict", "when"], rules)
    lines += ["", "## Conditions", ""]
    lines += _md_table(["condition", "status", "value", "threshold", "detail"], condition_rows(results))
    if results.get("gates"):
        lines += ["", "## Gates", ""]
        lines += _md_table(["gate", "status", "detail"], gate_rows(results))
    lines += ["", "## Attacks"]
    for role, attack_table in attack_groups(results):
        lines += ["", f"### {role.title}", "", f"_{_role_note(results, role)}._", ""]
        lines += _md_table(ATTACK_HEAD, attack_table)
    lines += ["", "## Curves"]
    if not figures:
        lines += ["", "_Plots skipped: matplotlib is not installed (`pip install 'immunekit[plots]'`)._"]
    for role, ids in figure_groups(results):
        shown = [f for f in ids if f in figures]
        if shown:
            lines += ["", f"### {role.title}", ""]
            lines += [f"![{fid}]({figures[fid]})" for fid in shown]
    rows = search_rows(results)
    if rows:
        lines += ["", "## Attacker search: chosen settings", ""]
        lines += _md_table(["setting", "value"], rows)
    rows = kappa_rows(results)
    if rows:
        lines += ["", "## κ / RIR (linear-probe Hessians ∝ ΦᵀΦ)", ""]
        lines += _md_table(["quantity", "value"], rows)
    lines += ["", "## Thresholds", ""]
    lines += _md_table(["threshold", "how it is used"], threshold_rows(results))
    lines += ["", "## Provenance", ""]
    lines += _md_table(["item", "value"], provenance_rows(results))
    return "\n".join(lines) + "\n"


# --- HTML ---------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def breakable(text: str) -> str:
    """Escaped ``text`` with line-break opportunities (``<wbr>``) after ``[ , _ : = /`` and ``--``.

    Long attack keys and model folders then wrap at their separators instead of widening a table.

    Example:
        >>> breakable("lp[lr=0.1,x=<y>]")
        'lp[<wbr>lr=<wbr>0.1,<wbr>x=<wbr>&lt;y&gt;]'

    """
    out = _e(text)
    for sep in ("[", ",", "_", ":", "=", "/", "--"):
        out = out.replace(sep, sep + "<wbr>")
    return out


def _badge(status: str, extra: str = "") -> str:
    cls = status.replace(" ", "-")
    return f'<span class="badge {_e(cls)} {extra}">{_e(status)}</span>'


def _status_cell(status: str) -> str:
    """A badge; a trailing ``" (vacuous)"`` becomes a flag beside it."""
    if status.endswith(" (vacuous)"):
        flag = (
            '<span class="flag" title="the reference fails its primary task, so keeping its quality '
            'means nothing">vacuous</span>'
        )
        return _badge(status.removesuffix(" (vacuous)")) + flag
    return _badge(status)


def _html_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], *, badge_col: int | None = None, table_id: str = ""
) -> str:
    ident = f' id="{_e(table_id)}"' if table_id else ""
    out = [f"<table{ident}><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        cells = [_status_cell(c) if i == badge_col else _e(c) for i, c in enumerate(row)]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _attacks_html(results: Mapping[str, Any]) -> str:
    """One table, a header row per role; the verdict as a badge with its meaning beneath."""
    out = ['<table id="attacks"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in ATTACK_HEAD[:2])]
    out[0] += "".join(f"<th>{_e(h)}</th>" for h in ATTACK_HEAD[3:]) + "</tr></thead><tbody>"
    for role, rows in attack_groups(results):
        out.append(
            f'<tr class="group" id="role-{_e(role.group)}"><th colspan="{len(ATTACK_HEAD) - 1}">'
            f"{_e(role.title)} <span>— {_e(_role_note(results, role))}</span></th></tr>"
        )
        for key, word, why, *rest in rows:
            cells = [
                f'<span class="key">{breakable(key)}</span>',
                f'{_badge(word)}<span class="why">{_e(why)}</span>',
                *(_e(c) for c in rest),
            ]
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _caption(results: Mapping[str, Any], fid: str) -> str:
    if fid == SEARCH_FIGURE:
        return (
            "Validation harm of every trial and the cumulative best; star: the chosen setting. "
            "Diverged trials are drawn at the axis edge (X)."
        )
    n = len(results.get("seeds") or [])
    over = f"over {n} seeds" if n else "over seeds"
    key = next(
        (k for k, a in (results.get("attacks") or {}).items() if _figure_id(k, a) == fid and a.get("bands")),
        "",
    )
    attack = (results.get("attacks") or {}).get(key) or {}
    if fid.startswith("benign_"):
        return f"Primary-task quality vs step, mean ± 95% bootstrap band {over}; dotted: the target."
    if is_one_shot((attack.get("bands") or {}).get("immunized")):
        return (
            f"One-shot attack: harm at step 0 and after its single update, mean {over} "
            "(bars: 95% bootstrap CI); dashed: the harm threshold φ."
        )
    return f"Harm vs attack step, mean ± 95% bootstrap band {over}; dashed: the harm threshold φ."


def render_card_html(results: Mapping[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """The card as one self-contained HTML page; ``images`` maps figure id → PNG bytes (embedded)."""
    images = images or {}
    verdict = results.get("verdict") or {}
    task = results.get("task") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Immunization report card: {_e(task.get('name', '?'))}</title>",
        f'<style>{CSS}</style></head><body class="card">',
        f"<h1>Immunization report card: {_e(task.get('name', '?'))}</h1>",
        f'<p class="note">run {_e(results.get("run_id", DASH))}, {_e(results.get("created_at", DASH))}</p>',
        f"<p>Overall verdict: {_badge(str(verdict.get('verdict', '?')), 'verdict')}</p>",
    ]
    if verdict.get("reasons"):
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in verdict["reasons"]) + "</ul>")
    stale = stale_rules_note(results)
    if stale:
        parts.append(f'<p class="stale" id="stale-rules"><b>Note.</b> {_e(stale)}</p>')
    statement = (results.get("statement") or {}).get("text")
    if statement:
        parts.append(f'<p class="statement">{_e(statement)}</p>')
    rules = verdict_rules(results)
    if rules:
        parts.append('<p class="note">How the verdict is decided (the first rule that applies):</p>')
        parts.append(_html_table(["verdict", "when"], rules, badge_col=0, table_id="verdict-rules"))
    parts.append("<h2>Conditions</h2>")
    parts.append(
        _html_table(
            ["condition", "status", "value", "threshold", "detail"],
            condition_rows(results),
            badge_col=1,
            table_id="conditions",
        )
    )
    if results.get("gates"):
        parts.append("<h2>Gates</h2>")
        parts.append(
            _html_table(["gate", "status", "detail"], gate_rows(results), badge_col=1, table_id="gates")
        )
    parts.append("<h2>Attacks</h2>")
    parts.append(_attacks_html(results))
    parts.append("<h2>Curves</h2>")
    if not images:
        parts.append(
            '<p class="note">Plots skipped: matplotlib is not installed '
            "(<code>pip install 'immunekit[plots]'</code>).</p>"
        )
    for role, ids in figure_groups(results):
        shown = [f for f in ids if f in images]
        if not shown:
            continue
        parts.append(f"<h3>{_e(role.title)}</h3>")
        parts.append(f'<div class="plots" id="plots-{_e(role.group)}">')
        for fid in shown:
            data = base64.b64encode(images[fid]).decode("ascii")
            parts.append(
                f'<figure><img id="fig-{_e(fid)}" alt="{_e(fid)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_e(_caption(results, fid))}</figcaption></figure>"
            )
        parts.append("</div>")
    rows = search_rows(results)
    if rows:
        parts.append("<h2>Attacker search: chosen settings</h2>")
        parts.append(_html_table(["setting", "value"], rows, table_id="search"))
    rows = kappa_rows(results)
    if rows:
        parts.append("<h2>κ / RIR (linear-probe Hessians ∝ ΦᵀΦ)</h2>")
        parts.append(_html_table(["quantity", "value"], rows, table_id="kappa"))
    parts.append("<h2>Thresholds</h2>")
    parts.append(_html_table(["threshold", "how it is used"], threshold_rows(results), table_id="thresholds"))
    parts.append("<h2>Provenance</h2>")
    parts.append(_html_table(["item", "value"], provenance_rows(results), table_id="provenance"))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


#: Public names of the table helpers, shared with :mod:`immunekit.reports.comparison`.
badge = _badge
escape = _e
md_table = _md_table


# --- writing ------------------------------------------------------------------------------------


def write_card(
    results_path_or_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    results: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs (for the Markdown) from an evaluation record.

    Args:
        results_path_or_dir: the ``results.json`` or its folder.
        out_dir: where to write; default: the folder of ``results.json``.
        results: the already-loaded record (skips reading the file again).

    Returns:
        (path of report.md, path of report.html).

    Raises:
        ReportError: the file is missing, not JSON, or not an evaluation record.

    """
    file = resolve_results_path(results_path_or_dir)
    if results is None:
        results = load_evaluation(file)
    else:
        validate_evaluation(results, str(file))
    out = Path(out_dir) if out_dir is not None else file.parent
    out.mkdir(parents=True, exist_ok=True)
    images = render_figures(results)
    if not images:
        logger.warning("matplotlib is not installed; the report card has no plots")
    names: dict[str, str] = {}
    for fid, png in images.items():
        name = f"card_{fid}.png"
        with atomic_target(out / name, suffix=".png") as tmp:
            tmp.write_bytes(png)
        names[fid] = name
    md, page = out / MARKDOWN_FILENAME, out / HTML_FILENAME
    atomic_write_text(md, render_card_markdown(results, names))
    atomic_write_text(page, render_card_html(results, images))
    logger.info("wrote %s and %s (%d plot(s))", md, page, len(images))
    return md, page


__all__ = [
    "CONDITION_ORDER",
    "HTML_FILENAME",
    "KIND",
    "MARKDOWN_FILENAME",
    "badge",
    "breakable",
    "escape",
    "figure_ids",
    "is_evaluation",
    "load_evaluation",
    "md_table",
    "render_card_html",
    "render_card_markdown",
    "render_figures",
    "validate_evaluation",
    "write_card",
]
