"""Report figures: convergence curves (Fig. 1 style), κ-ratio bars, ln-RIR heat maps (Fig. 2 style).

Figure numbers refer to arXiv 2505.23760; the heat maps are drawn for grid runs (MNIST digit pairs).

matplotlib is imported lazily inside the functions and used through its object API with the Agg
canvas (no pyplot, no global backend switch), so ``import immunekit.reports`` works without it.
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


def _new_figure(figsize: tuple[float, float]) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _clean_curve(values: Sequence[Any]) -> list[float]:
    """None/NaN → NaN (gap); negatives → 0 (clipped later with the zeros)."""
    out = []
    for v in values:
        x = float(v) if isinstance(v, int | float) else math.nan
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
    positive = [x for c in curves.values() for x in c if x > 0 and math.isfinite(x)]
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
    for method, ys in clipped.items():
        style = styles.get(method, {"color": "gray", "linestyle": "-"})
        ax.plot(
            range(len(ys)), ys, label=display_name(method), lw=1.8 if method != IDENTITY else 1.5, **style
        )
    if epsilon is not None and epsilon > 0:
        ax.axhline(epsilon, color="0.45", ls=":", lw=1.2, label=f"ε = {fmt_num(epsilon)}")
    if not curves:
        ax.text(0.5, 0.5, "no curve recorded", ha="center", va="center", transform=ax.transAxes, color="0.4")
    else:
        ax.set_yscale("log")
    ax.set_title(title)
    note = f"   (exact zeros drawn at {fmt_num(floor)})" if floor is not None else ""
    ax.set_xlabel("step $t$" + note)
    ax.grid(True, which="major", alpha=0.3)


def plot_convergence(results: Mapping[str, Any], attack_key: str, path: str | Path) -> Path | None:
    """Two panels (D_P, D_H) of ‖w_t − w*‖²/‖w_0 − w*‖² per step, one line per method, log scale.

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
    panels = [(title, _panel_curves(results, task, attack_key)) for task, title in PANELS]
    if not any(curves for _, curves in panels):
        return None
    styles = method_styles(results)
    fig = _new_figure((11.0, 4.6))
    axes = fig.subplots(1, 2)
    epsilon = results.get("epsilon")
    for ax, (title, curves) in zip(axes, panels, strict=True):
        _draw_panel(ax, curves, styles, title, epsilon if isinstance(epsilon, int | float) else None)
    axes[0].set_ylabel(r"$\|w_t - w^*\|^2 \,/\, \|w_0 - w^*\|^2$")
    attack = attack_by_key(results).get(attack_key, {"key": attack_key})
    fig.suptitle(f"Linear-probe convergence, attacker: {attack_label(attack)}", fontsize=12)
    handles, labels = _merged_legend(axes)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
    return _save(fig, Path(path))


def _merged_legend(axes: Sequence[Any]) -> tuple[list[Any], list[str]]:
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen.keys())


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
    rows = _bar_data(results)
    if not rows:
        return None
    styles = method_styles(results)
    fig = _new_figure((max(6.5, 1.7 * len(rows) + 2.5), 4.8))
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
    return _save(fig, Path(path))


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
    fig = _new_figure((HEATMAP_PANEL_INCHES + 1.2, HEATMAP_PANEL_INCHES + 1.1))
    ax = fig.subplots()
    image = _draw_heat_panel(ax, matrix, fails, norm, title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="ln RIR")
    rule = "ln RIR ≤ 0 ((ii) per pair not published)" if paper else "not ((i) > 1 and (ii) ≤ 1)"
    fig.supxlabel(
        f"{FAIL_MARK} + black border: fails, i.e. {rule}. Grey: diagonal; white: pair not run.", fontsize=8
    )
    return _save(fig, Path(path))


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
    fig = _new_figure((width, HEATMAP_PANEL_INCHES * len(rows) + 1.4))
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
    return _save(fig, Path(path))
