"""Report figures: convergence curves (Fig. 1 style), κ-ratio bars, ln-RIR heat maps (Fig. 2 style).

Figure numbers refer to arXiv 2505.23760; the heat maps are drawn for grid runs (MNIST digit pairs).

matplotlib is imported lazily inside the functions and used through its object API with the Agg
canvas (no pyplot, no global backend switch), so ``import immunekit.reports`` works without it.

**Axis limits.** No figure lets one value set its y-range. :func:`robust_limits` takes the range of the
finite, non-diverged values, trims points far outside the bulk (beyond :data:`ROBUST_K` times the
10–90 % spread, measured on the axis' own scale: log for norm ratios, symmetric log for R²), widens it
for the values that must stay visible (thresholds, release harm) and so that no curve is entirely off
the axes. :func:`draw_clipped` draws every value outside the limits at the axis edge: a diverged one
(non-finite, ``|x|`` > :data:`DIVERGED_ABS`, or beyond a score's divergence floor) with an ``X``
(legend "diverged (clipped)"), a finite one trimmed as off-scale with a triangle pointing where it lies
(legend "off-scale (clipped)"). Clip markers carry the gid :data:`CLIP_GID`. These helpers are shared
with the report card (:mod:`immunekit.reports.card`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from immunekit.reports import grid
from immunekit.reports._common import (
    IDENTITY,
    atomic_target,
    attack_by_key,
    attack_label,
    display_name,
    fmt_num,
    method_order,
)

DPI = 120
IDENTITY_COLOR = "black"
METHOD_COLORS = {
    "condition_number": "#d62728",
    "opt_kappa": "#1f77b4",
    "imma": "#2ca02c",
    "rill_only": "#ff7f0e",
    IDENTITY: IDENTITY_COLOR,
}
FALLBACK_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
PANELS = (("primary", "Primary task $D_P$"), ("harmful", "Harmful task $D_H$"))
FLOOR = 1e-16  # zeros are clipped to min(FLOOR, smallest positive value in the panel)

_T = TypeVar("_T")


def require_matplotlib() -> None:
    """Import matplotlib or raise ImportError with the install hint."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "matplotlib is required for report figures; install it with `pip install 'immunekit[plots]'`"
        ) from exc


def method_styles(results: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Colour and line style per method, identical in every figure of a report.

    Known methods have fixed colours (identity: dashed black); others take fallback colours in the
    display order (:func:`~immunekit.reports._common.method_order`).
    """
    styles: dict[str, dict[str, str]] = {}
    order = method_order(results)
    spare = iter(FALLBACK_COLORS * (1 + len(order) // len(FALLBACK_COLORS)))
    for method in order:
        color = METHOD_COLORS.get(method) or next(spare)
        styles[method] = {"color": color, "linestyle": "--" if method == IDENTITY else "-"}
    return styles


def _records(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    methods = results.get("methods") or {}
    return [(m, methods[m]) for m in method_order(results) if isinstance(methods[m], Mapping)]


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot state), constrained layout."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically (no software tag: byte-stable); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


# ------------------------------------------------------------ robust limits and clipped values

#: |x| above this is a diverged run whatever the quantity (finite values of 1e58 occur).
DIVERGED_ABS = 1e12
#: Robust range: the 10 %–90 % quantiles, widened by ROBUST_K times their spread on each side.
ROBUST_Q = 0.1
ROBUST_K = 3.0
LIMIT_PAD = 0.06
#: gid of every clip-marker artist (values drawn at the axis edge).
CLIP_GID = "clipped"
DIVERGED_LABEL = "diverged (clipped)"
OFFSCALE_LABEL = "off-scale (clipped)"
DIVERGED_MARKER = "X"
OFFSCALE_MARKERS = {"low": "v", "high": "^"}
CLIP_LEGEND_COLOR = "0.3"
LINEAR, LOG, SYMLOG = "linear", "log", "symlog"
#: R² axes: linear on [-1, 1], log10 below -1 (R² < -1: more than twice the error of the mean predictor).
SYMLOG_LINTHRESH = 1.0
_SYMLOG_C = 1.0 / (1.0 - 1.0 / 10.0)  # matplotlib's symlog scale factor of the linear part (linscale 1)


def as_float(x: Any) -> float:
    """A JSON number as float; ``None``, strings and booleans become NaN."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return math.nan
    return float(x)


def is_diverged(x: float, floor: float | None = None) -> bool:
    """True for a value no axis should be scaled to: non-finite, ``|x|`` > 1e12, or below ``floor``.

    Example:
        >>> [is_diverged(v, floor=-99.0) for v in (0.5, -5e58, float("nan"), -150.0, -3.0)]
        [False, True, True, True, False]

    """
    return not math.isfinite(x) or abs(x) > DIVERGED_ABS or (floor is not None and x < floor)


def _forward(x: float, scale: str) -> float:
    if scale == LOG:
        return math.log10(x)
    if scale == SYMLOG and abs(x) > SYMLOG_LINTHRESH:
        return math.copysign(_SYMLOG_C + math.log10(abs(x) / SYMLOG_LINTHRESH), x)
    if scale == SYMLOG:
        return _SYMLOG_C * x / SYMLOG_LINTHRESH
    return x


def _inverse(t: float, scale: str) -> float:
    if scale == LOG:
        return float(10.0**t)
    if scale == SYMLOG and abs(t) > _SYMLOG_C:
        return math.copysign(SYMLOG_LINTHRESH * 10.0 ** (abs(t) - _SYMLOG_C), t)
    if scale == SYMLOG:
        return t * SYMLOG_LINTHRESH / _SYMLOG_C
    return t


def _quantile(xs: Sequence[float], q: float) -> float:
    """Quantile ``q`` of the sorted ``xs`` (linear interpolation)."""
    pos = q * (len(xs) - 1)
    i = int(pos)
    j = min(i + 1, len(xs) - 1)
    return xs[i] + (xs[j] - xs[i]) * (pos - i)


def _min_spread(q_lo: float, q_hi: float, scale: str) -> float:
    if scale == LOG:
        return 1.0  # a decade
    if scale == SYMLOG:
        return 0.75  # K times this spans the linear part [-1, 1]: an R² above about -1.3 is never trimmed
    return 0.05 * max(abs(q_lo), abs(q_hi)) or 1e-9


def robust_limits(
    series: Sequence[Sequence[float]],
    *,
    keep: Sequence[float] = (),
    scale: str = LINEAR,
    floor: float | None = None,
    pad: float = LIMIT_PAD,
    min_spread: float | None = None,
) -> tuple[float, float]:
    """Y-limits from the finite, non-diverged values that no single outlier dominates.

    On the axis' scale (``LOG``: log10; ``SYMLOG``: linear on [-1, 1], log10 beyond), the range of the
    values is cut to [q10 − K·s, q90 + K·s] (s the 10–90 % spread, K = :data:`ROBUST_K`) when there are
    at least 5 values, then widened so that every series keeps a value inside (its median) and every
    ``keep`` value (a threshold, the release harm) is inside, and padded by ``pad`` of the span.

    Args:
        series: the values of each curve; NaN, non-finite and diverged values are left out.
        keep: values that must lie inside the limits (non-finite or diverged ones are ignored).
        scale: ``"linear"``, ``"log"`` (only positive values count) or ``"symlog"``.
        floor: values below it are diverged (for R²: 1 − F, F the divergence factor).
        pad: fraction of the span added on both sides.
        min_spread: the smallest 10–90 % spread (on the axis' scale) the trimming assumes; default:
            a decade (log), 0.75 (symlog: about the linear part [-1, 1]), 5 % of the values (linear).
            A bounded score passes its range / K so that nothing inside the range is trimmed.

    Returns:
        ``(low, high)`` with ``low < high``.

    Example:
        >>> lo, hi = robust_limits([[0.1, 0.4, 0.6, 0.8, 0.85, 0.9], [-5.3e58, float("nan")]])
        >>> -0.1 < lo < 0.1 and 0.9 < hi < 1.0
        True

    """

    def usable(x: float) -> bool:
        return not is_diverged(x, floor) and (scale != LOG or x > 0)

    per = [[_forward(x, scale) for x in s if usable(x)] for s in series]
    kept = [_forward(x, scale) for x in keep if usable(x)]
    data = sorted(t for s in per for t in s)
    if data:
        lo, hi = data[0], data[-1]
        if len(data) >= 5:
            q_lo, q_hi = _quantile(data, ROBUST_Q), _quantile(data, 1.0 - ROBUST_Q)
            floor_spread = _min_spread(q_lo, q_hi, scale) if min_spread is None else min_spread
            spread = max(q_hi - q_lo, floor_spread)
            fence_lo, fence_hi = q_lo - ROBUST_K * spread, q_hi + ROBUST_K * spread
            inside = [t for t in data if fence_lo <= t <= fence_hi]  # never empty: q_lo, q_hi lie inside
            lo, hi = inside[0], inside[-1]
        for s in per:  # no curve entirely off the axes
            if s and not any(lo <= t <= hi for t in s):
                mid = statistics.median(s)
                lo, hi = min(lo, mid), max(hi, mid)
    elif kept:
        lo = hi = kept[0]
    else:
        lo, hi = (-3.0, 0.0) if scale == LOG else (0.0, 1.0)
    if kept:
        lo, hi = min(lo, *kept), max(hi, *kept)
    span = hi - lo
    if span <= 0:
        span = 1.0 if scale == LOG else max(0.1 * abs(lo), 0.05)
        lo, hi = lo - span / 2, hi + span / 2
    return _inverse(lo - pad * span, scale), _inverse(hi + pad * span, scale)


Clipped = tuple[float, float, str, str]  # (x, y drawn at the edge, "diverged" | "offscale", "low" | "high")


def split_clipped(
    xs: Sequence[float], ys: Sequence[float], limits: tuple[float, float], floor: float | None = None
) -> tuple[list[float], list[Clipped]]:
    """Split a curve into the values drawn as they are and the values drawn at the axis edge.

    Args:
        xs: the x of each value.
        ys: the values (NaN: a diverged run, as an undefined score is).
        limits: ``(low, high)`` of the axis.
        floor: values below it are diverged (see :func:`is_diverged`).

    Returns:
        ``ys`` with every value outside ``limits`` or diverged replaced by NaN (a gap in the line), and
        the clipped points ``(x, edge, kind, side)``: diverged values above zero go to the top edge,
        the others (NaN included) to the bottom; off-scale values to the edge they lie beyond.

    """
    lo, hi = limits
    shown: list[float] = []
    clipped: list[Clipped] = []
    for x, y in zip(xs, ys, strict=True):
        if is_diverged(y, floor):
            side = "high" if y > 0 else "low"  # NaN compares False: bottom edge
            clipped.append((x, hi if side == "high" else lo, "diverged", side))
            shown.append(math.nan)
        elif y < lo or y > hi:
            side = "high" if y > hi else "low"
            clipped.append((x, hi if side == "high" else lo, "offscale", side))
            shown.append(math.nan)
        else:
            shown.append(y)
    return shown, clipped


def draw_clipped(ax: Any, clipped: Sequence[Clipped], color: str, *, size: float = 8.0) -> list[Any]:
    """Draw clipped points at the axis edge: ``X`` for diverged, ▼/▲ for off-scale values.

    Every artist has gid :data:`CLIP_GID` and the label :data:`DIVERGED_LABEL` or
    :data:`OFFSCALE_LABEL` (:func:`legend_entries` merges them into one neutral legend entry each).
    Markers are not clipped by the axes, so a point on the edge stays whole.
    """
    artists = []
    for kind, side in (("diverged", "low"), ("diverged", "high"), ("offscale", "low"), ("offscale", "high")):
        pts = [(x, y) for x, y, k, s in clipped if (k, s) == (kind, side)]
        if not pts:
            continue
        (artist,) = ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            linestyle="none",
            marker=DIVERGED_MARKER if kind == "diverged" else OFFSCALE_MARKERS[side],
            markersize=size,
            color=color,
            markeredgecolor="black",
            markeredgewidth=0.6,
            clip_on=False,
            zorder=6,
            label=DIVERGED_LABEL if kind == "diverged" else OFFSCALE_LABEL,
        )
        artist.set_gid(CLIP_GID)
        artists.append(artist)
    return artists


def legend_entries(axes: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """Legend handles and labels of ``axes``, one per label; clip markers as neutral grey entries last."""
    from matplotlib.lines import Line2D

    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    clip = {
        DIVERGED_LABEL: Line2D([], [], linestyle="none", marker=DIVERGED_MARKER, color=CLIP_LEGEND_COLOR),
        OFFSCALE_LABEL: Line2D([], [], linestyle="none", marker="v", color=CLIP_LEGEND_COLOR),
    }
    labels = [label for label in seen if label not in clip] + [label for label in clip if label in seen]
    return [clip.get(label, seen.get(label)) for label in labels], labels


def apply_y_scale(ax: Any, limits: tuple[float, float], scale: str) -> bool:
    """Set the y scale and limits; ``SYMLOG`` is used only when the range reaches below -1.

    Returns:
        True when the axis is symmetric-log (the caller says so in the axis label).

    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    lo, hi = limits
    symlog = scale == SYMLOG and lo < -SYMLOG_LINTHRESH
    if scale == LOG:
        ax.set_yscale("log")
    elif symlog:
        ax.set_yscale("symlog", linthresh=SYMLOG_LINTHRESH, linscale=1.0)
        top = min(hi, SYMLOG_LINTHRESH)
        ticks = [-SYMLOG_LINTHRESH]
        ticks += [t for t in MaxNLocator(nbins=4).tick_values(-SYMLOG_LINTHRESH, top) if -1.0 < t <= top]
        decades = [-(10.0**k) for k in range(1, 40) if -(10.0**k) >= lo]
        ticks += decades or [t for t in (-2.0, -5.0) if t >= lo]  # a label below -1 in any case
        ax.yaxis.set_major_locator(FixedLocator(sorted(set(ticks))))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(lo, hi)
    return symlog


def integer_ticks(axis: Any) -> None:
    """Integer major ticks on ``axis`` (steps, trial numbers)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))


def _clean_curve(values: Sequence[Any]) -> list[float]:
    """None → NaN (a diverged run); negatives → 0 (drawn at the floor with the zeros); +inf kept."""
    out = []
    for v in values:
        x = as_float(v)
        out.append(max(x, 0.0) if not math.isnan(x) else math.nan)
    return out


def _panel_curves(results: Mapping[str, Any], task: str, attack_key: str) -> dict[str, list[float]]:
    curves = {}
    for method, record in _records(results):
        curve = (record.get("curves") or {}).get(f"{task}.{attack_key}") or {}
        ratios = curve.get("norm_ratio")
        if isinstance(ratios, list) and ratios:
            curves[method] = _clean_curve(ratios)
    return curves


def _clip_zeros(curves: dict[str, list[float]]) -> tuple[dict[str, list[float]], float | None]:
    """Replace exact zeros by a floor for the log scale; returns the curves and the floor (None: no zero)."""
    positive = [x for c in curves.values() for x in c if x > 0 and not is_diverged(x)]
    floor = min([FLOOR, *positive])
    has_zero = any(x == 0 for c in curves.values() for x in c)
    return {m: [floor if x == 0 else x for x in c] for m, c in curves.items()}, floor if has_zero else None


def _draw_panel(
    ax: Any,
    curves: dict[str, list[float]],
    styles: Mapping[str, Mapping[str, str]],
    title: str,
    epsilon: float | None,
) -> None:
    clipped, floor = _clip_zeros(curves)
    keep = [epsilon] if epsilon is not None and epsilon > 0 else []
    keep += [floor] if floor is not None else []  # exact zeros stay in view, at the floor
    limits = robust_limits(list(clipped.values()), keep=keep, scale=LOG)
    for method, ys in clipped.items():
        style = styles.get(method, {"color": "gray", "linestyle": "-"})
        ys = [math.inf if math.isnan(y) else y for y in ys]  # an undefined ratio: the run diverged
        shown, out = split_clipped(range(len(ys)), ys, limits)
        ax.plot(
            range(len(ys)), shown, label=display_name(method), lw=1.8 if method != IDENTITY else 1.5, **style
        )
        draw_clipped(ax, out, style["color"], size=5.0 if len(out) > 40 else 7.0)
    if epsilon is not None and epsilon > 0:
        label = f"ε = {fmt_num(epsilon)} (steps-to-ε target, norm ratio)"
        ax.axhline(epsilon, color="0.45", ls=":", lw=1.2, label=label)
    if not curves:
        ax.text(0.5, 0.5, "no curve recorded", ha="center", va="center", transform=ax.transAxes, color="0.4")
    else:
        apply_y_scale(ax, limits, LOG)
    integer_ticks(ax.xaxis)
    ax.set_title(title)
    note = f"   (exact zeros drawn at {fmt_num(floor)})" if floor is not None else ""
    ax.set_xlabel("step $t$" + note)
    ax.grid(True, which="major", alpha=0.3)


def convergence_figure(results: Mapping[str, Any], attack_key: str) -> Any | None:
    """The figure of :func:`plot_convergence` (a matplotlib ``Figure``), or ``None`` without curves."""
    panels = [(title, _panel_curves(results, task, attack_key)) for task, title in PANELS]
    if not any(curves for _, curves in panels):
        return None
    styles = method_styles(results)
    fig = new_figure((11.0, 4.6))
    axes = fig.subplots(1, 2)
    epsilon = results.get("epsilon")
    for ax, (title, curves) in zip(axes, panels, strict=True):
        _draw_panel(ax, curves, styles, title, epsilon if isinstance(epsilon, int | float) else None)
    axes[0].set_ylabel(r"$\|w_t - w^*\|^2 \,/\, \|w_0 - w^*\|^2$")
    attack = attack_by_key(results).get(attack_key, {"key": attack_key})
    fig.suptitle(f"Linear-probe convergence, attacker: {attack_label(attack)}", fontsize=12)
    handles, labels = legend_entries(axes)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
    return fig


def plot_convergence(results: Mapping[str, Any], attack_key: str, path: str | Path) -> Path | None:
    """Two panels (D_P, D_H) of ‖w_t − w*‖²/‖w_0 − w*‖² per step, one line per method, log scale.

    The y-range is robust (:func:`robust_limits`): a diverged ratio (non-finite, NaN or above 1e12) is
    drawn at the top edge as a clip marker instead of stretching the axis. Steps have integer ticks.

    Args:
        results: the results record.
        attack_key: an attack key of ``results["attacks"]``; curves are read from
            ``methods[m]["curves"]["primary.<key>"|"harmful.<key>"]["norm_ratio"]``.
        path: the PNG to write (atomically, dpi 120).

    Returns:
        ``path``, or ``None`` (nothing written) when no method has a curve for this attack.

    Raises:
        ImportError: matplotlib is not installed.

    """
    fig = convergence_figure(results, attack_key)
    return None if fig is None else save_figure(fig, Path(path))


def _log10_stats(metric: Mapping[str, Any] | None) -> tuple[float, float]:
    """Mean and sample std over seeds of log10 of a positive metric; NaN when unavailable."""
    if not metric:
        return math.nan, math.nan
    values = [float(v) for v in metric.get("values") or [] if isinstance(v, int | float) and v > 0]
    if values:
        logs = [math.log10(v) for v in values]
        return statistics.fmean(logs), statistics.stdev(logs) if len(logs) > 1 else 0.0
    mean = metric.get("mean")
    if isinstance(mean, int | float) and mean > 0:
        return math.log10(mean), 0.0
    return math.nan, math.nan


def _bar_data(results: Mapping[str, Any]) -> list[tuple[str, tuple[float, float], tuple[float, float], Any]]:
    rows = []
    for method, record in _records(results):
        metrics = record.get("metrics") or {}
        harmful = _log10_stats(metrics.get("kappa_ratio_harmful"))
        primary = _log10_stats(metrics.get("kappa_ratio_primary"))
        if math.isnan(harmful[0]) and math.isnan(primary[0]):
            continue
        rows.append((method, harmful, primary, (metrics.get("rir") or {}).get("mean")))
    return rows


def kappa_bars_figure(results: Mapping[str, Any]) -> Any | None:
    """The figure of :func:`plot_kappa_bars` (a matplotlib ``Figure``), or ``None`` without ratios."""
    rows = _bar_data(results)
    if not rows:
        return None
    styles = method_styles(results)
    fig = new_figure((max(6.5, 1.7 * len(rows) + 2.5), 4.8))
    ax = fig.subplots()
    tops = _draw_bars(ax, rows, styles)
    _annotate_rir(ax, rows, tops)
    ax.axhline(0.0, color="black", lw=0.9)
    ax.set_xticks(range(len(rows)), [display_name(m) for m, *_ in rows], rotation=12 if len(rows) > 3 else 0)
    ax.set_ylabel(r"$\log_{10}$ κ ratio vs identity")
    over = "across digit pairs" if grid.is_grid(results) else "over seeds"
    ax.set_title(f"Condition-number ratios per method (mean ± std {over})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(handles=_bar_legend(), loc="best", frameon=False)
    return fig


def plot_kappa_bars(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Draw grouped bars of log10 (i) and log10 (ii) per method (± std over seeds), RIR annotated.

    Args:
        results: the results record.
        path: the PNG to write (atomically, dpi 120).

    Returns:
        ``path``, or ``None`` (nothing written) when no method has (i) or (ii).

    Raises:
        ImportError: matplotlib is not installed.

    """
    fig = kappa_bars_figure(results)
    return None if fig is None else save_figure(fig, Path(path))


def _draw_bars(ax: Any, rows: Sequence[Any], styles: Mapping[str, Mapping[str, str]]) -> list[float]:
    width, tops = 0.38, []
    for i, (method, harmful, primary, _) in enumerate(rows):
        color = styles.get(method, {}).get("color", "gray")
        bars = ((-width / 2, harmful, "", 0.9), (width / 2, primary, "///", 0.45))
        for offset, (mean, std), hatch, alpha in bars:
            if math.isnan(mean):
                continue
            ax.bar(
                i + offset,
                mean,
                width,
                yerr=std,
                color=color,
                alpha=alpha,
                hatch=hatch,
                edgecolor=color,
                capsize=4,
                error_kw={"elinewidth": 1.0, "ecolor": "0.2"},
            )
        tops.append(max((m + s for m, s in (harmful, primary) if not math.isnan(m)), default=0.0))
    return tops


def _annotate_rir(ax: Any, rows: Sequence[Any], tops: Sequence[float]) -> None:
    span = max([abs(t) for t in tops] + [1.0])
    for i, ((_, _, _, rir), top) in enumerate(zip(rows, tops, strict=True)):
        ax.annotate(
            f"RIR {fmt_num(rir)}",
            (i, max(top, 0.0) + 0.04 * span),
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold",
        )
    ax.set_ylim(top=max(max(tops, default=0.0), 0.0) + 0.18 * span)


def _bar_legend() -> list[Any]:
    from matplotlib.patches import Patch

    return [
        Patch(facecolor="0.5", edgecolor="0.5", alpha=0.9, label="(i) harmful κ ratio (↑)"),
        Patch(facecolor="0.5", edgecolor="0.5", alpha=0.45, hatch="///", label="(ii) primary κ ratio (↓)"),
    ]


# ------------------------------------------------------------------------- grid heat maps (Fig. 2)

HEATMAP_CMAP = "RdBu"  # negative (ln RIR < 0, failure side) red, positive blue
DIAGONAL_COLOR = "0.82"
FAIL_MARK = "✗"
HEATMAP_PANEL_INCHES = 5.4
HEATMAP_FONT = 7.5
HEATMAP_NOTE = (
    "Cells: ln RIR per pair (measured: ln of the mean RIR over seeds); rows = harmful digit h, "
    "columns = primary digit p; blue > 0 > red.\n"
    f"{FAIL_MARK} + black border = pair fails the success rule (measured: not ((i) > 1 and (ii) ≤ 1); "
    "paper: ln RIR ≤ 0 only, since (ii) per pair is not published). Grey: diagonal (unused); "
    "white: pair not run."
)


def _cell_label(x: float) -> str:
    """1–2 decimals: ``"4.83"``, ``"12.3"``, ``"∞"``."""
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    text = f"{x:.1f}" if abs(x) >= 9.995 else f"{x:.2f}"
    return "0.00" if text == "-0.00" else text


def _heat_norm(matrices: Sequence[Any]) -> Any:
    """TwoSlopeNorm centred at 0; the larger side spans its data, the smaller at least half of it."""
    from matplotlib.colors import TwoSlopeNorm

    values = [x for m in matrices for row in m or [] for x in row if x is not None and math.isfinite(x)]
    pos = max([x for x in values if x > 0], default=0.0)
    neg = max([-x for x in values if x < 0], default=0.0)
    span = max(pos, neg, 0.5)
    return TwoSlopeNorm(vcenter=0.0, vmin=-max(neg, span / 2), vmax=max(pos, span / 2))


def _panel_message(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=10)
    ax.set_axis_off()


def _draw_heat_panel(
    ax: Any,
    matrix: Sequence[Sequence[float | None]],
    fails: Sequence[Sequence[bool | None]],
    norm: Any,
    title: str,
) -> Any:
    """Draw one ln-RIR map (``matrix[h][p]``) with numbers, grey diagonal and failure marks."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    size = len(matrix)
    data = np.full((size, size), np.nan)
    for h, row in enumerate(matrix):
        for p, x in enumerate(row[:size]):
            if x is not None and h != p:
                data[h, p] = min(max(x, norm.vmin), norm.vmax)  # ±∞ drawn at the colour limits
    cmap = matplotlib.colormaps[HEATMAP_CMAP].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="equal", interpolation="none")
    for h in range(size):
        for p in range(size):
            x = matrix[h][p] if p < len(matrix[h]) else None
            if h == p:
                ax.add_patch(Rectangle((p - 0.5, h - 0.5), 1, 1, facecolor=DIAGONAL_COLOR, edgecolor="none"))
                continue
            if x is None:
                continue
            shade = norm(data[h, p])
            color = "white" if shade < 0.18 or shade > 0.78 else "black"
            failed = h < len(fails) and p < len(fails[h]) and fails[h][p]
            ax.text(
                p,
                h + (0.08 if failed else 0.0),
                _cell_label(x),
                ha="center",
                va="center",
                fontsize=HEATMAP_FONT,
                color=color,
                fontweight="bold" if failed else "normal",
            )
            if failed:
                ax.add_patch(
                    Rectangle((p - 0.44, h - 0.44), 0.88, 0.88, fill=False, edgecolor="black", linewidth=1.8)
                )
                ax.text(p + 0.36, h - 0.3, FAIL_MARK, ha="right", va="center", fontsize=6.5, color=color)
    ticks = range(size)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.set_xticks([t - 0.5 for t in range(1, size)], minor=True)
    ax.set_yticks([t - 0.5 for t in range(1, size)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("primary digit $p$", fontsize=9)
    ax.set_ylabel("harmful digit $h$", fontsize=9)
    ax.set_title(title, fontsize=10)
    return image


def _measured_panel(results: Mapping[str, Any], method: str) -> tuple[Any, Any, str] | None:
    if not grid.pair_stats(results, method):
        return None
    matrix = grid.ln_rir_matrix(results, method)
    fails = [[s is False for s in row] for row in grid.success_matrix(results, method)]
    summary = grid.summarize(results, method)
    title = (
        f"{display_name(method)}: measured\n"
        f"success {summary.n_success}/{summary.n_success_known} · mean RIR {fmt_num(summary.mean_rir)}"
    )
    return matrix, fails, title


def _paper_panel(results: Mapping[str, Any], method: str) -> tuple[Any, Any, str] | None:
    matrix = grid.paper_fig2(results, method)
    if matrix is None:
        return None
    fails = [[x is not None and x <= 0 for x in row] for row in matrix]
    values = [math.exp(x) for row in matrix for x in row if x is not None and x < 700]
    mean = statistics.fmean(values) if values else None
    title = f"{display_name(method)}: paper Fig. 2\nmean RIR of the map {fmt_num(mean)}"
    return matrix, fails, title


def _pad(matrix: Sequence[Sequence[_T | None]], size: int) -> list[list[_T | None]]:
    rows = [list(r[:size]) + [None] * (size - len(r[:size])) for r in matrix[:size]]
    return rows + [[None] * size for _ in range(size - len(rows))]


def plot_heatmap(
    results: Mapping[str, Any], method: str, path: str | Path, *, paper: bool = False
) -> Path | None:
    """Draw the 10×10 ln-RIR heat map of one method (rows harmful digit h, columns primary digit p).

    Args:
        results: a grid results record (``cells``; for ``paper=True``: ``paper.fig2[method]``).
        method: the method key.
        path: the PNG to write (atomically, dpi 120).
        paper: draw the paper's Fig. 2 map instead of the measured one.

    Returns:
        ``path``, or ``None`` (nothing written) when there is nothing to draw.

    Raises:
        ImportError: matplotlib is not installed.

    """
    panel = _paper_panel(results, method) if paper else _measured_panel(results, method)
    if panel is None:
        return None
    matrix, fails, title = panel
    size = max(grid.grid_size(results), len(matrix))
    matrix, fails = _pad(matrix, size), _pad(fails, size)
    norm = _heat_norm([matrix])
    fig = new_figure((HEATMAP_PANEL_INCHES + 1.2, HEATMAP_PANEL_INCHES + 1.1))
    ax = fig.subplots()
    image = _draw_heat_panel(ax, matrix, fails, norm, title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="ln RIR")
    rule = "ln RIR ≤ 0 ((ii) per pair not published)" if paper else "not ((i) > 1 and (ii) ≤ 1)"
    fig.supxlabel(
        f"{FAIL_MARK} + black border: fails, i.e. {rule}. Grey: diagonal; white: pair not run.", fontsize=8
    )
    return save_figure(fig, Path(path))


def plot_heatmap_grid(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """One row per method: measured ln-RIR map | paper's Fig. 2 map, one shared diverging colour scale.

    Methods: those with cells (identity left out: its RIR is 1 by definition), then methods only the
    paper maps. The paper column is drawn when ``paper.fig2`` has a map for any of them.

    Args:
        results: a grid results record.
        path: the PNG to write (atomically, dpi 120).

    Returns:
        ``path``, or ``None`` (nothing written) when there is no measured or paper map.

    Raises:
        ImportError: matplotlib is not installed.

    """
    rows = [(m, _measured_panel(results, m), _paper_panel(results, m)) for m in grid.heatmap_methods(results)]
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    if not rows:
        return None
    with_paper = any(r[2] is not None for r in rows)
    size = max([grid.grid_size(results)] + [len(p[0]) for r in rows for p in r[1:] if p is not None])
    norm = _heat_norm([p[0] for r in rows for p in r[1:] if p is not None])
    ncols = 2 if with_paper else 1
    width = HEATMAP_PANEL_INCHES * ncols + 1.3
    fig = new_figure((width, HEATMAP_PANEL_INCHES * len(rows) + 1.4))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    image = None
    for (method, measured, paper), row_axes in zip(rows, axes, strict=True):
        for ax, panel, what in zip(row_axes, (measured, paper), ("measured", "paper"), strict=False):
            if panel is None:
                missing = "not run" if what == "measured" else "no paper map"
                _panel_message(ax, f"{display_name(method)}: {missing}")
                continue
            matrix, fails, title = panel
            image = _draw_heat_panel(ax, _pad(matrix, size), _pad(fails, size), norm, title)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.5 if len(rows) > 1 else 0.8, aspect=40, label="ln RIR")
    fig.suptitle("ln RIR per digit pair (Fig. 2 layout)", fontsize=13)
    fig.supxlabel(HEATMAP_NOTE, fontsize=8.5)
    return save_figure(fig, Path(path))
