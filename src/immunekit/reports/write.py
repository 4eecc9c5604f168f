"""Write ``report.md`` and its PNG figures for one run."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from immunekit.reports import grid
from immunekit.reports._common import atomic_write_text, attack_by_key, safe_filename
from immunekit.reports.markdown import CONVERGENCE_PREFIX, HEATMAPS, KAPPA_BARS, render_markdown
from immunekit.reports.schema import load_results, resolve_results_path

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.md"
KAPPA_BARS_FILENAME = "kappa_bars.png"
HEATMAPS_FILENAME = "heatmaps.png"


def convergence_filename(attack_key: str) -> str:
    """File name of the convergence figure of one attack, e.g. ``convergence_gd_exact.png``."""
    return f"convergence_{safe_filename(attack_key)}.png"


def write_report(results_path_or_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Load a ``results.json`` and write ``report.md`` plus its figures.

    One convergence figure per attack in ``results["attacks"]`` and one κ-ratio bar chart are written
    next to the report; a grid run (top-level ``cells``) also gets ``heatmaps.png`` (measured | paper
    ln-RIR maps, one row per method). Without matplotlib a warning is logged and the report has no figures.

    Args:
        results_path_or_dir: the ``results.json`` file or the run folder holding it.
        out_dir: where to write; default: the folder of ``results.json``. Created if missing.

    An evaluation record (``kind == "evaluation"``, from ``immunekit evaluate``) gets the report card
    instead: ``report.md`` and a self-contained ``report.html`` (:func:`immunekit.reports.card.write_card`).
    A folder without its own ``results.json`` that holds evaluation records in subfolders (``immunekit
    evaluate --model DIR``) gets the method comparison: ``summary.md`` and ``summary.html``
    (:func:`immunekit.reports.comparison.write_comparison`). A deep vision record (``kind ==
    "deep_vision"``, from ``immunekit run deep-vision``) gets its own report: ``report.md`` and
    ``probe_curves.png`` (:func:`immunekit.reports.deep_vision.write_deep_vision_report`). An LLM
    fine-tuning attacks record (``kind == "llm_finetuning_attacks"``) gets ``report.md``,
    ``harm_by_attack.png`` and ``per_category.png`` (:func:`immunekit.reports.llm.write_llm_attacks_report`).
    An MLAC text record (``kind == "mlac_text"``, from ``immunekit run mlac-text``) gets ``report.md`` and
    ``harmful_vs_n.png`` (:func:`immunekit.reports.mlac.write_mlac_report`).

    Returns:
        Path of the written ``report.md`` (``summary.md`` for a comparison folder).

    Raises:
        ReportError: the results file is missing, not JSON, or fails validation.

    """
    from immunekit.reports import comparison

    if comparison.is_comparison_dir(results_path_or_dir):
        return comparison.write_comparison(results_path_or_dir, out_dir)[0]
    results_file = resolve_results_path(results_path_or_dir)
    kind = _kind(results_file)
    if kind == "evaluation":
        from immunekit.reports.card import write_card

        return write_card(results_file, out_dir)[0]
    if kind == "deep_vision":
        from immunekit.reports.deep_vision import write_deep_vision_report

        return write_deep_vision_report(results_file, out_dir)
    if kind == "llm_finetuning_attacks":
        from immunekit.reports.llm import write_llm_attacks_report

        return write_llm_attacks_report(results_file, out_dir)
    if kind == "llm_defenses":
        from immunekit.reports.llm_defenses import write_llm_defenses_report

        return write_llm_defenses_report(results_file, out_dir)
    if kind == "mlac_text":
        from immunekit.reports.mlac import write_mlac_report

        return write_mlac_report(results_file, out_dir)
    results = load_results(results_file)
    out = Path(out_dir) if out_dir is not None else results_file.parent
    out.mkdir(parents=True, exist_ok=True)
    figures = _write_figures(results, out)
    report = out / REPORT_FILENAME
    atomic_write_text(report, render_markdown(results, figures))
    logger.info("wrote %s (%d figure(s)) from %s", report, len(figures), results_file)
    return report


def _kind(path: Path) -> str | None:
    """The ``kind`` of the JSON object at ``path``, or ``None`` (errors: left to the loaders)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, Mapping) else None
    return kind if isinstance(kind, str) else None


def _write_figures(results: Mapping[str, Any], out: Path) -> dict[str, str]:
    """Render every figure; figure id → file name relative to ``out`` (only figures actually written)."""
    try:
        from immunekit.reports import plots

        plots.require_matplotlib()
    except ImportError as exc:
        logger.warning("%s; writing the report without figures", exc)
        return {}
    figures: dict[str, str] = {}
    for key in attack_by_key(results):
        name = convergence_filename(key)
        if plots.plot_convergence(results, key, out / name) is not None:
            figures[f"{CONVERGENCE_PREFIX}{key}"] = name
        else:
            logger.warning("no convergence curve recorded for attack %r; figure skipped", key)
    if plots.plot_kappa_bars(results, out / KAPPA_BARS_FILENAME) is not None:
        figures[KAPPA_BARS] = KAPPA_BARS_FILENAME
    if grid.is_grid(results):
        if plots.plot_heatmap_grid(results, out / HEATMAPS_FILENAME) is not None:
            figures[HEATMAPS] = HEATMAPS_FILENAME
        else:
            logger.warning("grid run without a per-pair RIR or paper map; heat maps skipped")
    return figures
