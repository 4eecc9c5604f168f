from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from immunekit.reports import ReportError, write_report
from immunekit.reports.plots import method_styles, plot_convergence, plot_kappa_bars

from .conftest import build_results, dump

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGS = ("convergence_gd_exact.png", "convergence_adam.png", "kappa_bars.png")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 10_000, (path, len(data))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full report (3 figures) shared by the read-only tests: rendering PNGs is slow."""
    run = tmp_path_factory.mktemp("written") / "run"
    dump(build_results(), run)
    return write_report(run)


def test_write_report_next_to_results(written: Path) -> None:
    run = written.parent
    assert written == run / "report.md"
    text = written.read_text(encoding="utf-8")
    for name in FIGS:
        assert_png(run / name)
        assert f"]({name})" in text
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in run.iterdir()) == sorted(["results.json", "report.md", *FIGS])


def test_markdown_contains_key_numbers(written: Path) -> None:
    text = written.read_text(encoding="utf-8")
    assert "356.2 ± 8.77" in text and "> 200 (2/2 censored)" in text and "| 2/2 | 2/2 | 2/2 | 2/2 |" in text


def test_out_dir_and_deterministic_markdown(written: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "nested"
    report = write_report(written.parent / "results.json", out_dir=out)
    assert report == out / "report.md"
    for name in FIGS:
        assert_png(out / name)
    assert report.read_text(encoding="utf-8") == written.read_text(encoding="utf-8")


def test_rewrite_replaces_report(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # markdown only, fast
    first = write_report(results_dir).read_text(encoding="utf-8")
    assert write_report(results_dir).read_text(encoding="utf-8") == first


def test_bad_results_raise(tmp_path: Path, results: dict[str, Any]) -> None:
    results["schema_version"] = 99
    dump(results, tmp_path)
    with pytest.raises(ReportError, match="immunekit run"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_without_matplotlib_writes_markdown_only(
    results_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with caplog.at_level(logging.WARNING, logger="immunekit.reports"):
        report = write_report(results_dir)
    assert "matplotlib" in caplog.text and "without figures" in caplog.text
    text = report.read_text(encoding="utf-8")
    assert "No figures" in text and "![" not in text
    assert not any((results_dir / name).exists() for name in FIGS)


def test_attack_without_curves_is_skipped(
    tmp_path: Path, results: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    for record in results["methods"].values():
        record["curves"] = {k: v for k, v in record["curves"].items() if not k.endswith(".adam")}
    dump(results, tmp_path)
    with caplog.at_level(logging.WARNING, logger="immunekit.reports"):
        text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "'adam'" in caplog.text
    assert "convergence_adam.png" not in text and "convergence_gd_exact.png" in text
    assert not (tmp_path / "convergence_adam.png").exists()


def test_plot_convergence_skips_methods_and_clips_zeros(tmp_path: Path, results: dict[str, Any]) -> None:
    del results["methods"]["rill_only"]["curves"]
    results["methods"]["condition_number"]["curves"]["harmful.gd_exact"]["norm_ratio"][5] = None
    out = plot_convergence(results, "gd_exact", tmp_path / "c.png")
    assert out == tmp_path / "c.png"
    assert_png(out)


def test_plot_convergence_none_without_curves(tmp_path: Path, results: dict[str, Any]) -> None:
    assert plot_convergence(results, "no_such_attack", tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_plot_kappa_bars(tmp_path: Path, results: dict[str, Any]) -> None:
    assert_png(plot_kappa_bars(results, tmp_path / "k.png"))
    for record in results["methods"].values():
        record["metrics"].pop("kappa_ratio_harmful")
        record["metrics"].pop("kappa_ratio_primary")
    assert plot_kappa_bars(results, tmp_path / "none.png") is None


def test_method_styles_consistent(results: dict[str, Any]) -> None:
    results["methods"]["custom_a"] = {"metrics": {}}
    results["methods"]["custom_b"] = {"metrics": {}}
    styles = method_styles(results)
    assert styles["identity"] == {"color": "black", "linestyle": "--"}
    assert styles["condition_number"]["linestyle"] == "-"
    colors = [s["color"] for s in styles.values()]
    assert len(set(colors)) == len(colors)
    assert method_styles(results) == styles
