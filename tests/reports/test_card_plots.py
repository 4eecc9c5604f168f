"""The plotting code: robust y-limits, clipped diverged values, one-shot markers, integer step ticks.

Each figure is built and its matplotlib Axes inspected: every finite value a line draws lies inside the
axes' y-limits, and every input value outside them (diverged: 1e58, -5e58, inf, nan; or a far outlier)
is drawn at the axis edge by a clip-marker artist (gid ``"clipped"``) instead of setting the range.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import pytest

from immunekit.reports import card, plots

from .conftest import build_results
from .test_card import make_record

pytest.importorskip("matplotlib")

TOL = 1e-9
DIVERGED = [1e58, -5e58, math.inf, math.nan, None]


def ylim(ax: Any) -> tuple[float, float]:
    lo, hi = ax.get_ylim()
    return float(lo), float(hi)


def line_points(ax: Any) -> list[tuple[Any, float, float]]:
    """(artist, x, y) of every finite point of every line of ``ax`` (clip markers included)."""
    out = []
    for line in ax.get_lines():
        xs = line.get_xdata(orig=True)
        ys = line.get_ydata(orig=True)
        for x, y in zip(xs, ys, strict=True):
            y = float(y)
            if math.isfinite(y):
                out.append((line, float(x), y))
    return out


def clip_artists(ax: Any) -> list[Any]:
    return [line for line in ax.get_lines() if line.get_gid() == plots.CLIP_GID]


def assert_lines_inside_limits(ax: Any) -> None:
    lo, hi = ylim(ax)
    span = hi - lo
    for line, _x, y in line_points(ax):
        assert lo - TOL * span <= y <= hi + TOL * span, f"{line.get_label()!r}: y={y} outside {(lo, hi)}"


def assert_each_value_shown(ax: Any, xs: Sequence[float], ys: Sequence[Any], label: str) -> None:
    """Every value is on the line ``label`` inside the limits, or a clip marker at the edge at its x."""
    lo, hi = ylim(ax)
    drawn = {(x, y) for line, x, y in line_points(ax) if line.get_label() == label}
    edges = {(x, y) for line in clip_artists(ax) for _, x, y in line_points_of(line)}
    for x, y in zip(xs, ys, strict=True):
        v = math.nan if y is None else float(y)
        if math.isfinite(v) and lo <= v <= hi and abs(v) < plots.DIVERGED_ABS:
            assert (float(x), v) in drawn, f"{label}: value {v} at x={x} inside the limits is not drawn"
        else:
            assert (float(x), lo) in edges or (float(x), hi) in edges, (
                f"{label}: value {v} at x={x} is outside {(lo, hi)} but not drawn as a clip marker"
            )


def line_points_of(line: Any) -> list[tuple[Any, float, float]]:
    return [(line, float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)]


def legend_texts(fig: Any) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def x_ticks_are_integers(fig: Any, ax: Any) -> bool:
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def band(steps: list[int], mean: list[Any], width: float = 0.05) -> dict[str, Any]:
    def shift(v: Any, d: float) -> Any:
        return v + d if isinstance(v, int | float) and math.isfinite(v) and abs(v) < 1e12 else v

    return {
        "steps": steps,
        "mean": mean,
        "ci_low": [shift(v, -width) for v in mean],
        "ci_high": [shift(v, width) for v in mean],
    }


def harm_attack(imm: list[Any], ref: list[Any], steps: list[int] | None = None) -> dict[str, Any]:
    steps = steps if steps is not None else [10 * i for i in range(len(imm))]
    return {
        "group": "resistance",
        "eval_split": "eval_harmful",
        "bands": {"immunized": band(steps, imm), "reference": band(steps, ref)},
    }


# --- harm curves ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", DIVERGED, ids=["1e58", "-5e58", "inf", "nan", "null"])
def test_a_diverged_harm_value_is_clipped_and_marked_not_used_for_limits(bad: Any) -> None:
    rec = make_record()
    imm = [0.0, 0.3, bad, 0.6, 0.7, 0.72]
    ref = [0.0, 0.7, 0.8, 0.85, 0.9, 0.9]
    attack = harm_attack(imm, ref)
    fig = card.curve_figure(rec, "linear_probe", attack, benign=False)
    (ax,) = fig.axes
    lo, hi = ylim(ax)
    assert -0.5 < lo < 0.0 and 0.9 < hi < 1.3, f"limits {(lo, hi)} are set by the diverged value {bad}"
    assert_lines_inside_limits(ax)
    steps = attack["bands"]["immunized"]["steps"]
    assert_each_value_shown(ax, steps, imm, "immunized M*")
    assert_each_value_shown(ax, steps, ref, "reference M")
    (marker,) = clip_artists(ax)
    assert marker.get_marker() == plots.DIVERGED_MARKER and marker.get_label() == plots.DIVERGED_LABEL
    top = isinstance(bad, float) and bad > 0
    assert list(marker.get_ydata()) == [hi if top else lo] and list(marker.get_xdata()) == [20]
    assert "diverged (clipped)" in legend_texts(fig)
    assert "φ = 0.5 (harm threshold, R²)" in legend_texts(fig)


def test_a_far_outlier_is_drawn_off_scale_not_used_for_limits() -> None:
    rec = make_record()
    steps = list(range(0, 31))
    imm = [0.0] + [0.6 + 0.01 * (i % 20) for i in range(1, 31)]
    imm[7] = -60.0  # finite, not diverged (R² above 1 - F = -99), but far from the rest
    ref = [0.0] + [0.8 + 0.005 * (i % 10) for i in range(1, 31)]
    attack = harm_attack(imm, ref, steps)
    fig = card.curve_figure(rec, "full_finetune", attack, benign=False)
    (ax,) = fig.axes
    lo, _hi = ylim(ax)
    assert -1.0 < lo < 0.0, f"the outlier -60 set the lower limit {lo}"
    assert_lines_inside_limits(ax)
    assert_each_value_shown(ax, steps, imm, "immunized M*")
    assert_each_value_shown(ax, steps, ref, "reference M")
    (marker,) = clip_artists(ax)
    assert marker.get_label() == plots.OFFSCALE_LABEL and marker.get_marker() == "v"
    assert list(marker.get_xdata()) == [7] and list(marker.get_ydata()) == [lo]
    assert "off-scale (clipped)" in legend_texts(fig)
    assert x_ticks_are_integers(fig, ax)


def test_every_curve_stays_visible_when_one_dives_below_minus_one() -> None:
    rec = make_record()
    steps = list(range(0, 31))
    imm = [0.0] + [0.6 + 0.01 * (i % 20) for i in range(1, 31)]
    ref = [0.0] + [-8.0 + 0.01 * i for i in range(1, 31)]  # the whole curve far below the other
    attack = harm_attack(imm, ref, steps)
    fig = card.curve_figure(rec, "full_finetune", attack, benign=False)
    (ax,) = fig.axes
    lo, hi = ylim(ax)
    assert_lines_inside_limits(ax)
    assert_each_value_shown(ax, steps, imm, "immunized M*")
    assert_each_value_shown(ax, steps, ref, "reference M")
    for label in ("immunized M*", "reference M"):  # no curve entirely off the axes
        assert all(lo <= y <= hi for line, _, y in line_points(ax) if line.get_label() == label)
    assert not clip_artists(ax)
    assert ax.get_yscale() == "symlog"  # R² below -1 on a log scale: [-1, 1] keeps its resolution
    assert "(log scale below −1)" in ax.get_ylabel()


def test_benign_curve_draws_the_trainability_target_and_keeps_it_in_view() -> None:
    rec = make_record()
    rec["conditions"]["trainability"]["target"] = [0.92, 0.95, 0.97]
    attack = {
        "group": "benign",
        "eval_split": "eval_primary",
        "bands": {
            "immunized": band([0, 10, 20], [0.0, 0.1, 0.2]),
            "reference": band([0, 10, 20], [0.0, 0.5, 0.6]),
        },
    }
    fig = card.curve_figure(rec, "benign:linear_probe", attack, benign=True)
    (ax,) = fig.axes
    _lo, hi = ylim(ax)
    assert hi > 0.97  # the target (mean 0.9467, band up to 0.97) is visible
    assert_lines_inside_limits(ax)
    assert any(t.startswith("target 0.9467 (trainability, R², mean of 3 seeds)") for t in legend_texts(fig))


def test_one_shot_curves_are_drawn_as_markers_with_integer_steps() -> None:
    rec = make_record()
    attack = harm_attack([0.0, 0.77], [0.0, 0.77], steps=[0, 1])
    fig = card.curve_figure(rec, "closed_form_probe", attack, benign=False)
    (ax,) = fig.axes
    series = [line for line in ax.get_lines() if line.get_label() in ("immunized M*", "reference M")]
    assert len(series) == 2
    for line in series:
        assert line.get_linestyle() == "None", f"{line.get_label()} is drawn as a line"
        assert line.get_marker() not in (None, "None", "", " ")
        assert list(line.get_xdata()) == [0, 1]
    assert list(ax.get_xticks()) == [0, 1]
    lo, hi = ax.get_xlim()
    assert -1 < lo < 0 and 1 < hi < 2
    assert_lines_inside_limits(ax)


def test_multi_step_curves_are_lines_with_integer_step_ticks() -> None:
    rec = make_record()
    steps = [0, 1, 2, 3]  # matplotlib's default ticks here: 0, 0.5, 1, 1.5, ...
    attack = harm_attack([0.0, 0.2, 0.3, 0.4], [0.0, 0.6, 0.7, 0.8], steps=steps)
    fig = card.curve_figure(rec, "linear_probe", attack, benign=False)
    (ax,) = fig.axes
    (line,) = [line for line in ax.get_lines() if line.get_label() == "immunized M*"]
    assert line.get_linestyle() == "-"
    assert x_ticks_are_integers(fig, ax)


# --- the attacker search ----------------------------------------------------------------------------


def search_record(values: list[Any]) -> dict[str, Any]:
    rec = make_record()
    best, cumulative = -math.inf, []
    for v in values:
        if isinstance(v, float | int) and math.isfinite(v) and abs(v) < 1e12:
            best = max(best, v)
        cumulative.append(best if math.isfinite(best) else None)
    rec["search"] = {
        "chosen": {"attack": "linear_probe", "overrides": {}, "budget.lr": 0.3},
        "trials": [{"number": i, "value": v, "state": "COMPLETE"} for i, v in enumerate(values)],
        "cumulative_best": cumulative,
        "best_value": best,
    }
    return rec


def test_search_plot_clips_a_diverged_trial_and_has_integer_trial_ticks() -> None:
    values = [0.62, 0.75, -5.3e58, 0.81, None, 0.7, math.inf, 0.86, 0.4, 0.85, 0.84, 0.83]
    rec = search_record(values)
    fig = card.search_figure(rec, rec["search"])
    (ax,) = fig.axes
    lo, hi = ylim(ax)
    assert -0.5 < lo < 0.4 and 0.86 < hi < 1.2, f"limits {(lo, hi)} set by a diverged trial"
    assert_lines_inside_limits(ax)
    assert_each_value_shown(ax, list(range(len(values))), values, "trial")
    markers = {(x, y) for line in clip_artists(ax) for _, x, y in line_points_of(line)}
    assert markers == {(2.0, lo), (4.0, lo), (6.0, hi)}
    assert {line.get_label() for line in clip_artists(ax)} == {plots.DIVERGED_LABEL}
    assert "diverged (clipped)" in legend_texts(fig) and "chosen (trial 7)" in legend_texts(fig)
    (best,) = [line for line in ax.get_lines() if line.get_label() == "cumulative best"]
    assert max(best.get_ydata()) == pytest.approx(0.86)
    assert x_ticks_are_integers(fig, ax)


def test_search_plot_of_a_few_trials_has_integer_trial_ticks() -> None:
    rec = search_record([0.3, 0.5, 0.4, 0.7])  # matplotlib's default ticks here: 0, 0.5, 1, 1.5, ...
    fig = card.search_figure(rec, rec["search"])
    (ax,) = fig.axes
    assert x_ticks_are_integers(fig, ax)
    assert_lines_inside_limits(ax)


def test_an_accuracy_axis_trims_nothing_inside_zero_to_one() -> None:
    rec = search_record([0.999, 1.0, 1.0, 0.5, 1.0, 1.0, 0.999, 1.0])
    rec["task"] = {"name": "mnist", "loss": "ce", "score": "accuracy"}
    rec["thresholds"]["harm"] = 0.75
    fig = card.search_figure(rec, rec["search"])
    (ax,) = fig.axes
    assert not clip_artists(ax) and ylim(ax)[0] < 0.5  # a bad trial at 0.5 is a value, not an outlier
    assert ax.get_yscale() == "linear" and ax.get_ylabel() == "harm: accuracy on val_harmful"


# --- robust limits ----------------------------------------------------------------------------------


def test_robust_limits_ignore_diverged_values_and_trim_a_lone_outlier() -> None:
    bulk = [0.01 * i for i in range(50)]
    assert plots.robust_limits([bulk]) == plots.robust_limits([bulk, [1e58, -5e58, math.inf, math.nan]])
    lo, hi = plots.robust_limits([[*bulk, 40.0]])
    assert hi < 2.0 and lo < 0.0
    shown, clipped = plots.split_clipped(range(51), [*bulk, 40.0], (lo, hi))
    assert math.isnan(shown[-1]) and clipped == [(50, hi, "offscale", "high")]
    lo, hi = plots.robust_limits([bulk], keep=[3.0])  # a threshold stays in view
    assert hi > 3.0


def test_robust_limits_keep_a_lone_curve_and_a_small_sample() -> None:
    lo, hi = plots.robust_limits([[0.2, 0.6]])  # < 5 values: the plain range (padded)
    assert lo < 0.2 and hi > 0.6
    lo, hi = plots.robust_limits([[0.5] * 40, [-30.0, -31.0]])  # the second curve stays visible
    assert lo <= -30.0


# --- run-report figures (plots.py) -----------------------------------------------------------------


def test_convergence_plot_clips_diverged_norm_ratios() -> None:
    results = copy.deepcopy(build_results())
    curve = results["methods"]["rill_only"]["curves"]["harmful.adam"]["norm_ratio"]
    curve[5], curve[6], curve[7] = 1e58, math.inf, math.nan
    fig = plots.convergence_figure(results, "adam")
    assert fig is not None
    for ax in fig.axes:
        lo, hi = ylim(ax)
        assert hi < 10.0, f"limits {(lo, hi)} stretched by a diverged ratio"
        assert_lines_inside_limits(ax)
        assert x_ticks_are_integers(fig, ax)
    harmful = fig.axes[1]
    markers = {(x, y) for line in clip_artists(harmful) for _, x, y in line_points_of(line)}
    hi = ylim(harmful)[1]
    assert markers == {(5.0, hi), (6.0, hi), (7.0, hi)}
    assert plots.DIVERGED_LABEL in legend_texts(fig)
    (rill,) = [line for line in harmful.get_lines() if line.get_label() == "R_ill only"]
    assert all(math.isnan(y) for y in rill.get_ydata()[5:8])


def test_kappa_bars_lie_inside_their_limits() -> None:
    fig = plots.kappa_bars_figure(build_results())
    assert fig is not None
    (ax,) = fig.axes
    lo, hi = ylim(ax)
    heights = [p.get_y() + p.get_height() for p in ax.patches] + [p.get_y() for p in ax.patches]
    assert heights and all(lo <= h <= hi for h in heights)
    assert_lines_inside_limits(ax)
