"""Grid runs (MNIST digit pairs): Table 2 section, per-pair table, ln-RIR heat maps."""

from __future__ import annotations

import copy
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from immunekit.reports import grid, render_markdown, write_report
from immunekit.reports._common import fmt_num
from immunekit.reports.plots import plot_heatmap, plot_heatmap_grid

from .conftest import (
    GRID_METHODS,
    GRID_PAIRS,
    GRID_SUCCESS_TEXT,
    GRID_TABLE2,
    SEEDS,
    build_grid_results,
    build_results,
    dump,
    grid_paper_map,
    grid_ratios,
)
from .test_report_markdown import FIGURES, section
from .test_report_write import PNG_MAGIC

NAMES = {"condition_number": "Ours (condition number)", "opt_kappa": "Opt-κ", "rill_only": "R_ill only"}
GRID_FIGURES = {"kappa_bars": "kappa_bars.png", "heatmaps": "heatmaps.png"}


def assert_png(path: Path, min_size: tuple[int, int] = (600, 600)) -> None:
    from matplotlib.image import imread

    assert path.read_bytes().startswith(PNG_MAGIC), path
    image = imread(path)
    height, width = image.shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (path, image.shape)
    assert image.std() > 0.05  # not a blank canvas


def expected(method: str, pairs: list[tuple[int, int]] = GRID_PAIRS) -> dict[str, Any]:
    """Table 2 numbers recomputed from the synthetic per-seed ratios (independent of the code under test)."""
    rir, i_, ii, immunized = {}, {}, {}, {}
    for p, h in pairs:
        ratios = [grid_ratios(method, p, h, s) for s in SEEDS]
        rir[p, h] = statistics.fmean(a / b for a, b in ratios)
        i_[p, h] = statistics.fmean(a for a, _ in ratios)
        ii[p, h] = statistics.fmean(b for _, b in ratios)
        c_ok = [not (method == "condition_number" and (p, h) == (3, 8)) or s == 0 for s in SEEDS]
        immunized[p, h] = all(a >= 10 and b <= 1 and c for (a, b), c in zip(ratios, c_ok, strict=True))
    return {
        "mean_rir": sum(rir.values()) / len(rir),
        "mean_ln_rir": sum(math.log(r) for r in rir.values()) / len(rir),
        "mean_i": statistics.fmean(i_.values()),
        "geo_i": math.exp(statistics.fmean(math.log(v) for v in i_.values())),
        "success": sum(i_[k] > 1 and ii[k] <= 1 for k in rir),
        "immunized": sum(immunized.values()),
        "rir": rir,
    }


@pytest.fixture
def md(grid_results: dict[str, Any]) -> str:
    return render_markdown(grid_results, GRID_FIGURES)


@pytest.fixture(scope="module")
def grid_written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("grid") / "run"
    dump(build_grid_results(), run)
    return write_report(run)


# --------------------------------------------------------------------------------- Table 2 numbers


def test_expected_numbers_are_not_trivial() -> None:
    # the fixture exercises every branch of the success rule
    assert [expected(m)["success"] for m in GRID_METHODS] == [6, 3, 0]
    assert expected("condition_number")["immunized"] == 5
    assert min(expected("rill_only")["rir"].values()) < 1 < max(expected("rill_only")["rir"].values())
    # mean of per-pair RIR differs from the ratio of means
    ratios = [grid_ratios("condition_number", p, h, s) for p, h in GRID_PAIRS for s in SEEDS]
    ratio_of_means = statistics.fmean(a for a, _ in ratios) / statistics.fmean(b for _, b in ratios)
    assert abs(expected("condition_number")["mean_rir"] - ratio_of_means) > 1


@pytest.mark.parametrize("method", GRID_METHODS)
def test_summarize_matches_independent_computation(grid_results: dict[str, Any], method: str) -> None:
    want = expected(method)
    got = grid.summarize(grid_results, method)
    assert got.n_pairs == got.n_rir == got.n_success_known == got.n_verdict == len(GRID_PAIRS)
    assert got.mean_rir == pytest.approx(want["mean_rir"], rel=1e-12)
    assert got.mean_ln_rir == pytest.approx(want["mean_ln_rir"], rel=1e-12)
    assert (got.n_success, got.n_immunized) == (want["success"], want["immunized"])
    assert got.mean_ratio_harmful == pytest.approx(want["mean_i"], rel=1e-12)
    assert got.geo_mean_ratio_harmful == pytest.approx(want["geo_i"], rel=1e-12)
    assert got.geo_mean_rir == pytest.approx(math.exp(want["mean_ln_rir"]), rel=1e-12)


@pytest.mark.parametrize("method", GRID_METHODS)
def test_table2_rows(md: str, method: str) -> None:
    table = section(md, "Table 2")
    want = expected(method)
    n = len(GRID_PAIRS)
    paper_ln = {"condition_number": grid_paper_map(4.0), "rill_only": grid_paper_map(0.5)}.get(method)
    paper_ln_mean = (
        statistics.fmean(x for h, row in enumerate(paper_ln) for p, x in enumerate(row) if p != h)
        if paper_ln
        else None
    )
    # no identity cells and no band in the fixture: steps ratio and sensitivity are "—"
    row = (
        f"| {NAMES[method]} | {n} | {fmt_num(want['mean_i'])} ({fmt_num(want['geo_i'])}) | — "
        f"| {want['success']}/{n} | {fmt_num(want['mean_rir'])} | {fmt_num(math.exp(want['mean_ln_rir']))} "
        f"| {fmt_num(want['mean_ln_rir'])} | — | {want['immunized']}/{n} | {fmt_num(GRID_TABLE2[method])} "
        f"| {fmt_num(paper_ln_mean)} |"
    )
    assert row in table


def test_table2_section_text(md: str) -> None:
    table = section(md, "Table 2")
    assert "mean of per-pair RIR, not ratio of means" in table
    assert "6 of the 90 ordered digit pairs" in table and "2 seed(s)" in table
    assert "(i) > 1 and (ii) ≤ 1" in table and "RIR > 1 and (ii) ≤ 1" not in table
    assert GRID_SUCCESS_TEXT in table
    assert "| IMMA | — | — | — | — | — | — | — | — | — | 1.77 | 0.445 |" in table  # paper-only method
    # rows ordered by the geometric mean of (i): R_ill only (≈ 92), Ours (≈ 29), Opt-κ (≈ 1.8)
    assert table.index("| R_ill only |") < table.index("| Ours (condition") < table.index("| Opt-κ |")
    # order: Table 2 after the summary, before paper-vs-measured
    assert md.index("## Summary") < md.index("## Table 2") < md.index("## Paper vs measured")


def test_heatmaps_in_table2_section_not_repeated(md: str) -> None:
    table = section(md, "Table 2")
    figures = section(md, "Figures")
    assert "](heatmaps.png)" in table and "heatmaps.png" not in figures
    assert "](kappa_bars.png)" in figures
    assert table.index("heatmaps.png") < table.index("<details>")


def test_per_pair_table(md: str, grid_results: dict[str, Any]) -> None:
    block = md[md.index("<details>") : md.index("</details>")]
    assert "<summary>" in block and "\n\n| p | h |" in block  # blank line: GitHub renders the table
    rows = [line for line in block.splitlines() if line.startswith("| ") and line[2].isdigit()]
    pairs = [tuple(int(x) for x in r.strip("| ").split(" | ")[:2]) for r in rows]
    assert pairs == sorted(GRID_PAIRS)
    ours = expected("condition_number")["rir"][9, 5]
    rill = expected("rill_only")["rir"][9, 5]
    row = next(r for r in rows if r.startswith("| 9 | 5 |"))
    assert f"| {fmt_num(ours)} ✓ |" in row and f"| {fmt_num(rill)} ✗ |" in row
    assert "R_ill only (ii)" in block


def test_summary_and_verdict_for_grid(md: str) -> None:
    summary = section(md, "Summary")
    assert "6 of the 90 ordered digit pairs" in summary
    assert "Ours (condition number) has the highest mean of per-pair RIR" in summary
    assert "Ours (condition number) 6/6; Opt-κ 3/6; R_ill only 0/6" in summary
    verdict = section(md, "Definition 3.1 verdict")
    assert "(pair, seed)" in verdict
    assert "| Ours (condition number) | 12/12 | 12/12 | 11/12 | 11/12 |" in verdict


def test_verdict_from_cells_without_method_level_verdict(md: str, grid_results: dict[str, Any]) -> None:
    for record in grid_results["methods"].values():
        del record["verdict"]
    table = section(render_markdown(grid_results, GRID_FIGURES), "Definition 3.1 verdict")
    assert table == section(md, "Definition 3.1 verdict")


def test_paper_vs_measured_uses_table2(md: str, grid_results: dict[str, Any]) -> None:
    table = section(md, "Paper vs measured")
    assert "| Method | Paper RIR ↑ | Measured RIR ↑ |" in table
    metric = grid_results["methods"]["condition_number"]["metrics"]["rir"]
    assert metric["mean"] == pytest.approx(expected("condition_number")["mean_rir"])
    assert f"| Ours (condition number) | 70.04 | {fmt_num(metric['mean'])} ± " in table
    assert "across the 6 digit pairs" in table
    assert "across digit pairs" in section(md, "All metrics")


# ------------------------------------------------------------------------------------ robustness


def test_missing_pairs_and_methods(grid_results: dict[str, Any]) -> None:
    del grid_results["cells"]["2-4"]
    del grid_results["cells"]["0-1"]["methods"]["opt_kappa"]
    del grid_results["cells"]["1-0"]["methods"]["rill_only"]["metrics"]["kappa_ratio_primary"]
    grid_results["cells"]["4-2"]["methods"]["rill_only"].pop("verdict")
    md = render_markdown(grid_results, {})
    table = section(md, "Table 2")
    pairs = [k for k in GRID_PAIRS if k != (2, 4)]
    opt = expected("opt_kappa", [k for k in pairs if k != (0, 1)])
    assert f"| Opt-κ | 4 | {fmt_num(opt['mean_i'])} ({fmt_num(opt['geo_i'])}) |" in table
    assert f"| {opt['success']}/4 | {fmt_num(opt['mean_rir'])} |" in table
    assert "| 0/4 (1 without (i) or (ii)) |" in table  # R_ill only
    assert "5 of the 90" in table and "85 pairs were not run" in table
    assert "No heat map was rendered" in table


def test_short_missing_list(grid_results: dict[str, Any]) -> None:
    full = build_grid_results([(p, h) for p in range(10) for h in range(10) if p != h and (p, h) != (5, 7)])
    table = section(render_markdown(full, {}), "Table 2")
    assert "89 of the 90" in table and "Not run: (5, 7)." in table


def test_cell_key_fallback_and_matrix_orientation(grid_results: dict[str, Any]) -> None:
    cell = grid_results["cells"]["9-5"]
    del cell["primary"], cell["harmful"]
    matrix = grid.ln_rir_matrix(grid_results, "condition_number")
    assert matrix[5][9] == pytest.approx(math.log(expected("condition_number")["rir"][9, 5]))
    assert matrix[9][5] is None and all(matrix[i][i] is None for i in range(10))
    success = grid.success_matrix(grid_results, "opt_kappa")
    assert success[1][0] is False and success[4][2] is True and success[3][3] is None
    paper = grid.paper_fig2(grid_results, "rill_only")
    assert paper is not None and paper[0][0] is None and paper[1][0] == grid_paper_map(0.5)[1][0]
    assert grid.paper_fig2(grid_results, "layout") is None


def test_log_rir_fallback(grid_results: dict[str, Any]) -> None:
    metrics = grid_results["cells"]["0-1"]["methods"]["condition_number"]["metrics"]
    rir = metrics.pop("rir")
    metrics["log_rir"] = {"mean": math.log(rir["mean"]), "values": [], "n": 2}
    stats = next(
        s for s in grid.pair_stats(grid_results, "condition_number") if (s.primary, s.harmful) == (0, 1)
    )
    assert stats.rir == pytest.approx(rir["mean"])


@pytest.mark.parametrize("paper", [{}, None, {"table2": {"imma": 1.77}}, {"fig2": {"imma": [[0.0]]}}])
def test_grid_without_or_with_partial_paper(grid_results: dict[str, Any], paper: Any) -> None:
    if paper is None:
        del grid_results["paper"]
    else:
        grid_results["paper"] = paper
    md = render_markdown(grid_results, {})
    table = section(md, "Table 2")
    want = expected("condition_number")
    row = f"| Ours (condition number) | 6 | {fmt_num(want['mean_i'])} ({fmt_num(want['geo_i'])}) |"
    assert row in table and "| — | — |" in table
    assert "The paper's text on success counts" not in table
    if not paper:
        assert "no paper numbers" in table


def test_single_cell_report_has_no_grid_section(results: dict[str, Any]) -> None:
    md = render_markdown(results, FIGURES)
    assert "## Table 2" not in md and "<details>" not in md
    assert not grid.is_grid(results)
    results["cells"] = {}
    assert render_markdown(results, FIGURES) == md


# ----------------------------------------------------------------------------------------- figures


def test_write_report_renders_heatmaps(grid_written: Path) -> None:
    run = grid_written.parent
    text = grid_written.read_text(encoding="utf-8")
    assert "](heatmaps.png)" in text
    assert_png(run / "heatmaps.png", min_size=(1200, 2400))  # 4 rows (3 measured + IMMA paper-only) × 2
    assert sorted(p.name for p in run.iterdir()) == [
        "heatmaps.png",
        "kappa_bars.png",
        "report.md",
        "results.json",
    ]


def test_write_report_single_cell_has_no_heatmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # markdown only, fast
    dump(build_results(), tmp_path)
    write_report(tmp_path)
    assert not (tmp_path / "heatmaps.png").exists()


def test_grid_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    dump(build_grid_results(), tmp_path)
    with caplog.at_level(logging.WARNING, logger="immunekit.reports"):
        text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "No heat map was rendered" in text and "## Table 2" in text
    assert not (tmp_path / "heatmaps.png").exists()


def test_plot_heatmap_measured_and_paper(tmp_path: Path, grid_results: dict[str, Any]) -> None:
    assert plot_heatmap(grid_results, "opt_kappa", tmp_path / "m.png") == tmp_path / "m.png"
    assert_png(tmp_path / "m.png")
    assert plot_heatmap(grid_results, "rill_only", tmp_path / "p.png", paper=True) == tmp_path / "p.png"
    assert_png(tmp_path / "p.png")
    assert plot_heatmap(grid_results, "opt_kappa", tmp_path / "none.png", paper=True) is None
    assert plot_heatmap(grid_results, "imma", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp files left


def test_plot_heatmap_grid_missing_pairs_no_paper_inf(tmp_path: Path, grid_results: dict[str, Any]) -> None:
    del grid_results["cells"]["2-4"]
    del grid_results["cells"]["0-1"]["methods"]["opt_kappa"]
    grid_results["cells"]["1-0"]["methods"]["condition_number"]["metrics"]["rir"]["mean"] = math.inf
    grid_results["paper"] = {}
    assert_png(plot_heatmap_grid(grid_results, tmp_path / "g.png"))
    assert plot_heatmap(grid_results, "condition_number", tmp_path / "c.png") is not None


def test_plot_heatmap_grid_nothing_to_draw(tmp_path: Path, grid_results: dict[str, Any]) -> None:
    empty = copy.deepcopy(grid_results)
    for cell in empty["cells"].values():
        cell["methods"] = {}
    empty["paper"] = {}
    assert plot_heatmap_grid(empty, tmp_path / "g.png") is None
    assert not (tmp_path / "g.png").exists()


def test_grid_record_loads_and_bad_cells_type_raises(tmp_path: Path, grid_results: dict[str, Any]) -> None:
    from immunekit.reports import ReportError, load_results

    assert load_results(dump(grid_results, tmp_path / "ok")) == grid_results
    grid_results["cells"] = [grid_results["cells"]["0-1"]]
    with pytest.raises(ReportError, match="'cells' is a list"):
        load_results(dump(grid_results, tmp_path / "bad"))


# ------------------------------------------------------------- success needs (i) > 1; attacker first


def _summary_metric(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "values": values,
        "n": len(present),
        "censored": len(values) - len(present),
    }


def test_rir_above_one_through_ii_alone_is_not_a_success(grid_results: dict[str, Any]) -> None:
    # Opt-κ on (2, 4): (i) = 0.5 < 1 with (ii) = 0.05, so RIR = 10 > 1 and (ii) ≤ 1, yet the harmful
    # task got easier to probe: not a success under the (i) > 1 rule (it was under RIR > 1)
    metrics = grid_results["cells"]["2-4"]["methods"]["opt_kappa"]["metrics"]
    metrics["kappa_ratio_harmful"] = _summary_metric([0.5, 0.5])
    metrics["kappa_ratio_primary"] = _summary_metric([0.05, 0.05])
    metrics["rir"] = _summary_metric([10.0, 10.0])
    stats = next(s for s in grid.pair_stats(grid_results, "opt_kappa") if (s.primary, s.harmful) == (2, 4))
    assert stats.rir == 10.0 and stats.ratio_primary <= 1 and stats.success is False
    assert grid.success_matrix(grid_results, "opt_kappa")[4][2] is False
    before = expected("opt_kappa")["success"]
    assert grid.summarize(grid_results, "opt_kappa").n_success == before - 1  # (2, 4) succeeded before
    # the boundary: (i) = 1 exactly is not > 1
    metrics["kappa_ratio_harmful"] = _summary_metric([1.0, 1.0])
    assert grid.summarize(grid_results, "opt_kappa").n_success == before - 1
    metrics["kappa_ratio_harmful"] = _summary_metric([1.0 + 1e-9, 1.0 + 1e-9])
    assert grid.summarize(grid_results, "opt_kappa").n_success == before


def test_steps_ratio_against_identity_and_threshold_sensitive_pairs(grid_results: dict[str, Any]) -> None:
    grid_results["attacks"] = [
        {"key": "adam", "optimizer": "adam", "steps": 100},
        {"key": "gd_exact", "optimizer": "gd_exact", "steps": 100},
    ]
    name = "steps_to_epsilon.harmful.gd_exact"
    ours_steps = {(0, 1): [40.0, 60.0], (1, 0): [None, None], (2, 4): [20.0, 20.0]}
    ident_steps = {(0, 1): [10.0, 10.0], (1, 0): [20.0, 30.0], (2, 4): [None, None]}
    for (p, h), values in ours_steps.items():
        cell = grid_results["cells"][f"{p}-{h}"]
        cell["methods"]["condition_number"]["metrics"][name] = _summary_metric(values)
        cell["methods"]["identity"] = {"metrics": {name: _summary_metric(ident_steps[p, h])}}
    ratios = grid.pair_steps_ratios(grid_results, "condition_number")
    # 50/10; a censored method (ε not reached in 100 steps → 101) over 25 is a lower bound; a censored
    # reference makes an upper bound, left out of the summary
    assert ratios == {(0, 1): (5.0, ""), (1, 0): (101 / 25, "≥"), (2, 4): (20 / 101, "≤")}
    s = grid.summarize(grid_results, "condition_number")
    assert s.steps_ratio == pytest.approx(math.sqrt(5.0 * 101 / 25), rel=1e-12)
    assert (s.steps_ratio_n, s.steps_ratio_bound) == (2, "≥")
    # threshold-sensitive: a pair is flagged when any seed is
    band = grid_results["cells"]["0-1"]["methods"]["condition_number"]["metrics"]
    band["threshold_sensitive"] = _summary_metric([0.0, 1.0])
    band["rir_band_spread"] = _summary_metric([1.5, 3.0])
    grid_results["cells"]["1-0"]["methods"]["condition_number"]["metrics"]["threshold_sensitive"] = (
        _summary_metric([0.0, 0.0])
    )
    s = grid.summarize(grid_results, "condition_number")
    assert (s.n_threshold_sensitive, s.n_sensitivity_known) == (1, 2)
    md = render_markdown(grid_results, {})
    table = section(md, "Table 2")
    assert "Harmful steps-to-ε ratio (gd_exact) ↑" in table
    assert f"| ≥{fmt_num(math.sqrt(5.0 * 101 / 25))} |" in table and "| 1/2 |" in table
    pair_row = next(line for line in table.splitlines() if line.startswith("| 0 | 1 |"))
    assert " ⚠ |" in pair_row
    assert "Threshold-sensitive pairs" in section(md, "Summary")


def test_order_uses_the_geometric_mean_of_i_so_one_pair_cannot_decide(grid_results: dict[str, Any]) -> None:
    metrics = grid_results["cells"]["3-8"]["methods"]["opt_kappa"]["metrics"]
    metrics["kappa_ratio_harmful"] = _summary_metric([1e6, 1e6])
    s = grid.summarize(grid_results, "opt_kappa")
    ours = grid.summarize(grid_results, "condition_number")
    assert s.mean_ratio_harmful > 1e5 > ours.mean_ratio_harmful  # the arithmetic mean would put Opt-κ first
    assert s.geo_mean_ratio_harmful < ours.geo_mean_ratio_harmful
    assert grid.order_by_attacker(grid_results, ["opt_kappa", "condition_number", "rill_only"]) == [
        "rill_only",
        "condition_number",
        "opt_kappa",
    ]
