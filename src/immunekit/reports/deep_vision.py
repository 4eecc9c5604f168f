"""The deep vision report: Table 3 per backbone, the paper's rows beside it, the checks, Fig. 3 curves.

Input is the ``results.json`` of ``immunekit run deep-vision`` (``kind == "deep_vision"``, written by
:mod:`immunekit.experiments.deep_vision`); this module reads that JSON only (no torch, no model).
Output, next to it (or in ``out_dir``):

* ``report.md``: per backbone its setting, θ_0 and the probe's learning-rate choice; Table 3 with
  (i) first, then (ii), RIR_θ0 and D_P accuracy (mean ± sample std over seeds, and a table of the
  95 % bootstrap intervals), the full-data variant, the probe's last-epoch harmful accuracy, the
  fine-tuning attacks' final harmful accuracy and the threshold-sensitivity count; the probe
  accuracy per epoch; the paper's Table 3 rows for the matching architecture (labelled *other data
  and scale*); the "Done when" checks with their numbers; a link to the report card.
* ``probe_curves.png``: harmful test accuracy against probe epoch per method (mean over seeds with
  a ± one-std band), θ_0 dashed, one panel per backbone (Fig. 3 of arXiv 2505.23760). Drawn with
  matplotlib's Agg canvas (the ``[plots]`` extra); without it the report says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from immunekit.reports._common import (
    DASH,
    display_name,
    fmt_num,
    read_kind_record,
    write_figures_and_report,
)
from immunekit.reports.plots import save_figure
from immunekit.reports.schema import RERUN_HINT, ReportError

logger = logging.getLogger(__name__)

KIND = "deep_vision"
REPORT_FILENAME = "report.md"
PROBE_FIGURE = "probe_curves.png"
DPI = 120
REFERENCE_COLOR = "black"
METHOD_COLORS = {
    "condition_number": "#d62728",
    "opt_kappa": "#1f77b4",
    "imma": "#2ca02c",
    "rill_only": "#ff7f0e",
}
FALLBACK_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
REQUIRED = ("schema_version", "kind", "backbones", "seeds", "config")
CHECK_NAMES = (
    ("no_failed_seeds", "the defense ran on every seed (no NumericalError)"),
    ("i_above_one", "(i) > 1"),
    ("ii_at_most_one", "(ii) ≤ 1"),
    (
        "highest_rir_theta0",
        "highest RIR_θ0 of all methods (default cut; band edges vs the methods not threshold-sensitive)",
    ),
    ("not_threshold_sensitive", "not threshold-sensitive (no seed's RIR_θ0 moves > 2× across the band)"),
    ("highest_rir_outside_band", "highest RIR_θ0 outside the threshold-sensitive band (both above)"),
    ("primary_accuracy_kept", "D_P accuracy within the allowed drop of θ_0's"),
    ("probe_below_theta0_every_epoch", "harmful probe accuracy below θ_0's at every epoch (θ_0's lr)"),
    (
        "probe_below_theta0_every_epoch_own_lr",
        "the same with each model probed at its own largest stable lr (informational, not in the verdict)",
    ),
)


def is_deep_vision(data: Any) -> bool:
    """Whether ``data`` is a deep vision results record."""
    return isinstance(data, Mapping) and data.get("kind") == KIND


def load_deep_vision(path: str | Path) -> dict[str, Any]:
    """Read and check a deep vision ``results.json``.

    Raises:
        ReportError: missing file, not JSON, another kind, or a required key missing (named, with the fix).

    """
    data = read_kind_record(path, KIND, "a deep vision record", REQUIRED)
    if not isinstance(data["backbones"], Mapping):
        raise ReportError(f"{path}: 'backbones' must be a mapping of backbone results; {RERUN_HINT}")
    return dict(data)


# ------------------------------------------------------------------------------------------- text


def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return DASH
    return fmt_num(float(x), digits)


def _metric(method: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = (method.get("metrics") or {}).get(name)
    return value if isinstance(value, Mapping) else {}


def _mean_std(metric: Mapping[str, Any], scale: float = 1.0) -> str:
    mean = metric.get("mean")
    if not isinstance(mean, int | float):
        return DASH
    std = metric.get("std")
    text = _num(mean * scale)
    if isinstance(std, int | float) and (metric.get("n") or 0) > 1:
        text += f" ± {_num(std * scale, 3)}"
    censored = metric.get("censored") or 0
    return text + (f" ({censored} censored)" if censored else "")


def _ci(metric: Mapping[str, Any], scale: float = 1.0) -> str:
    lo, hi = metric.get("ci_low"), metric.get("ci_high")
    if not isinstance(lo, int | float) or not isinstance(hi, int | float):
        return DASH
    return f"[{_num(lo * scale)}, {_num(hi * scale)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _label(key: str, reference: str | None) -> str:
    if key == reference:
        return "Init θ_0" + (" (identity)" if key != "theta0" else "")
    return display_name(key)


def _methods(backbone: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    methods = backbone.get("methods") or {}
    ref = backbone.get("reference")
    order: list[str] = [ref] if isinstance(ref, str) and ref in methods else []
    declared = backbone.get("method_order")  # results.json is written with sorted keys: the run's order
    order += [
        str(k) for k in (declared if isinstance(declared, list) else []) if k in methods and k not in order
    ]
    order += [str(k) for k in methods if k not in order]
    return {k: methods[k] for k in order if isinstance(methods[k], Mapping)}


def _table3(backbone: Mapping[str, Any]) -> str:
    ref = backbone.get("reference")
    header = [
        "method",
        "(i) ↑",
        "(ii) ↓",
        "RIR_θ0 ↑",
        "D_P acc % ↑",
        "full-data (i)",
        "full-data (ii)",
        "full-data RIR",
        "probe acc % (last epoch) ↓",
        "full FT acc % ↓",
        "partial FT acc % ↓",
        "threshold-sensitive seeds",
        "failed seeds",
    ]
    rows = []
    for key, m in _methods(backbone).items():
        seeds = len(m.get("seeds") or [])
        failed = m.get("failed_seeds") or []
        rows.append(
            [
                _label(key, ref),
                _mean_std(_metric(m, "kappa_ratio_harmful")),
                _mean_std(_metric(m, "kappa_ratio_primary")),
                _mean_std(_metric(m, "rir_theta0")),
                _mean_std(_metric(m, "primary_test_accuracy"), 100),
                _mean_std(_metric(m, "kappa_ratio_harmful_full")),
                _mean_std(_metric(m, "kappa_ratio_primary_full")),
                _mean_std(_metric(m, "rir_full")),
                _mean_std(_metric(m, "probe_harmful_accuracy_final"), 100),
                _mean_std(_metric(m, "full_finetune_harmful_accuracy"), 100),
                _mean_std(_metric(m, "partial_finetune_harmful_accuracy"), 100),
                f"{m.get('threshold_sensitive_seeds', 0)}/{seeds}",
                f"{len(failed)}/{seeds}",
            ]
        )
    notes = [
        f"- {_label(key, ref)}, seed {f.get('seed')}: the {f.get('stage')} failed ({f.get('error')}: "
        f"{f.get('message')}); that seed has no measurement and is left out of the means"
        for key, m in _methods(backbone).items()
        for f in m.get("failed_seeds") or []
    ]
    return _table(header, rows) + ("\n\n" + "\n".join(notes) if notes else "")


def _ci_table(backbone: Mapping[str, Any]) -> str:
    ref = backbone.get("reference")
    header = ["method", "(i)", "(ii)", "RIR_θ0", "D_P acc %", "RIR_θ0 at rtol/band", "RIR_θ0 at rtol·band"]
    rows = [
        [
            _label(key, ref),
            _ci(_metric(m, "kappa_ratio_harmful")),
            _ci(_metric(m, "kappa_ratio_primary")),
            _ci(_metric(m, "rir_theta0")),
            _ci(_metric(m, "primary_test_accuracy"), 100),
            _mean_std(_metric(m, "rir_band_low")),
            _mean_std(_metric(m, "rir_band_high")),
        ]
        for key, m in _methods(backbone).items()
    ]
    return _table(header, rows)


def _probe_table(backbone: Mapping[str, Any], curve: str = "probe_curve") -> str:
    """Mean ± std harmful test accuracy (%) per epoch and method, then each method's lr and divergences."""
    methods = {k: m for k, m in _methods(backbone).items() if m.get(curve)}
    if not methods:
        return ""
    ref = backbone.get("reference")
    epochs = next(iter(methods.values()))[curve].get("epoch") or []
    header = ["epoch", *(_label(k, ref) for k in methods)]
    rows = []
    for e, epoch in enumerate(epochs):
        row = [str(epoch)]
        for m in methods.values():
            points = m[curve].get("harmful_test_accuracy") or []
            row.append(
                _mean_std(points[e], 100) if e < len(points) and isinstance(points[e], Mapping) else DASH
            )
        rows.append(row)
    lrs = ["lr", *(", ".join(_num(v) for v in (m[curve].get("lr") or [])) or DASH for m in methods.values())]
    counts = [
        [label, *(f"{m[curve].get(key, 0)}/{m[curve].get('seeds_with_curve', 0)}" for m in methods.values())]
        for label, key in (
            ("loss rose (unstable lr)", "loss_rose_seeds"),
            ("non-finite loss", "nonfinite_seeds"),
        )
    ]
    return _table(header, [*rows, lrs, *counts])


def _probe_intro(backbone: Mapping[str, Any], curve: str) -> str:
    methods = [m for m in _methods(backbone).values() if m.get(curve)]
    if not methods:
        return ""
    info = methods[0][curve]
    what = f"`{info.get('attack')}` ({info.get('loss')})"
    if curve == "probe_curve":
        lr = (backbone.get("probe_lr") or {}).get("lr")
        return (
            "### Fig. 3: harmful test accuracy (%) per probe epoch, every model probed at θ_0's lr "
            f"{_num(lr)}\n\n"
            f"Probe: {what} on frozen eval-mode features, plain constant-lr SGD; mean ± std over seeds. "
            "'loss rose' counts seeds whose last-epoch training loss ended above the initial one (θ_0's lr "
            "is unstable on these features; the accuracies are still what that attacker reached); a "
            "non-finite loss means the head did not train (no evidence: the check fails)."
        )
    return (
        "### The same probe at each model's own largest stable lr (an attacker who re-tunes the lr)\n\n"
        f"Probe: {what}; the lr is chosen per model and seed by the rule of θ_0's choice (training loss "
        "finite and decreasing on the harmful training rows)."
    )


def _paper_section(results: Mapping[str, Any], backbone: Mapping[str, Any]) -> str:
    paper = results.get("paper") or {}
    arch = (backbone.get("setting") or {}).get("paper_architecture")
    title = f"Paper reference ({paper.get('label', 'other data and scale')})"
    if not paper:
        return f"#### {title}\n\nNo paper table was configured (paper_table: null)."
    if not arch:
        return (
            f"#### {title}\n\nThe paper has no counterpart of this backbone (it reports ResNet18 and "
            "ViT-B/16); "
            "see the other backbones' sections for its rows."
        )
    rows = []
    init = (paper.get("init_accuracy") or {}).get(arch)
    rows.append(["–", "Init θ_0", "1", "1", "1", _num(init)])
    for dh, per_arch in (paper.get("rows") or {}).items():
        for method, values in ((per_arch or {}).get(arch) or {}).items():
            vals = list(values) + [None] * (4 - len(values))
            rows.append([str(dh), display_name(method), *(_num(v) for v in vals[:4])])
    note = paper.get("note", "")
    return (
        f"#### {title}\n\n{arch}, {paper.get('source', '')}. {note}. These numbers are **not** comparable "
        "with the table above (other data, other scale); they show the paper's ordering.\n\n"
        + _table(["D_H", "method", "(i) ↑", "(ii) ↓", "RIR_θ0 ↑", "D_P acc % ↑"], rows)
    )


def _check_numbers(name: str, entry: Mapping[str, Any]) -> str:
    if name == "no_failed_seeds":
        failed = entry.get("failed") or []
        return "; ".join(f"seed {f.get('seed')}: {f.get('message')}" for f in failed) or "every seed ran"
    if name in ("i_above_one", "ii_at_most_one"):
        return f"{_num(entry.get('value'))} (threshold {_num(entry.get('threshold'))})"
    if name == "highest_rir_theta0":
        parts = []
        for cut, info in (entry.get("per_cut") or {}).items():
            others = ", ".join(f"{k} {_num(v)}" for k, v in (info.get("others") or {}).items())
            parts.append(f"{cut}: {_num(info.get('value'))} vs {others or DASH}")
        excluded = entry.get("excluded_at_band_edges") or []
        note = f"; not compared at the band edges (threshold-sensitive): {excluded}" if excluded else ""
        return "; ".join(parts) + note
    if name == "not_threshold_sensitive":
        spread = _num(entry.get("band_spread_max"))
        return f"{entry.get('flagged_seeds')} seed(s) flagged, largest band spread ×{spread}"
    if name == "primary_accuracy_kept":
        return (
            f"{_num(_pct(entry.get('value')))} % vs θ_0 {_num(_pct(entry.get('reference')))} % "
            f"(drop {_num(_pct(entry.get('drop')))} points, allowed {_num(_pct(entry.get('max_drop')))})"
        )
    if name.startswith("probe_below_theta0_every_epoch"):
        bad = entry.get("epochs_not_below") or []
        mine = ", ".join(_num(_pct(v)) for v in entry.get("value") or [])
        ref = ", ".join(_num(_pct(v)) for v in entry.get("reference") or [])
        return (
            f"epochs not below: {bad or 'none'}; non-finite seeds {entry.get('nonfinite_seeds', 0)}, loss "
            f"rose in {entry.get('loss_rose_seeds', 0)}; lr {entry.get('lr')} vs θ_0's "
            f"{entry.get('reference_lr')}; method % [{mine}] vs θ_0 % [{ref}]"
        )
    return ""


def _pct(x: Any) -> float | None:
    return float(x) * 100 if isinstance(x, int | float) and not isinstance(x, bool) else None


def _checks_section(backbone: Mapping[str, Any]) -> str:
    checks = backbone.get("checks") or {}
    if not checks.get("available"):
        reason = checks.get("reason", "no checks recorded")
        return f"#### Done when\n\nNot evaluated: {reason}."
    rows = []
    for name, text in CHECK_NAMES:
        if name not in checks:
            continue
        entry = checks.get(name) or {}
        rows.append([text, "yes" if entry.get("passed") else "**NO**", _check_numbers(name, entry)])
    verdict = "all hold" if checks.get("passed") else "**not all hold** (see the rows marked NO)"
    return (
        f"#### Done when ({display_name(str(checks.get('method')))}, issue 12)\n\n"
        f"On means over seeds: {verdict}.\n\n" + _table(["check", "holds", "numbers"], rows)
    )


def _setting(name: str, backbone: Mapping[str, Any]) -> str:
    s = backbone.get("setting") or {}
    theta0 = backbone.get("theta0") or {}
    probe = backbone.get("probe_lr") or {}
    lines = [
        f"- setting: D_P **{s.get('primary')}** kept, D_H **{s.get('harmful')}** blocked; inputs "
        f"normalised as {s.get('normalization')}; {s.get('description', '')}",
        f"- θ_0: {theta0.get('source', DASH)}"
        + (
            f"; MNIST test accuracy {_num(_pct(theta0.get('test_accuracy')))} %"
            if "test_accuracy" in theta0
            else ""
        ),
    ]
    grid = probe.get("grid") or []
    if grid:
        stable = [_num(r.get("lr")) for r in grid if r.get("stable")]
        lines.append(
            f"- probe lr **{_num(probe.get('lr'))}** ({probe.get('source')}): {probe.get('rule', '')}; grid "
            f"{[_num(r.get('lr')) for r in grid]}, stable {stable}"
        )
    else:
        lines.append(f"- probe lr **{_num(probe.get('lr'))}** ({probe.get('source', 'config')})")
    return "\n".join(lines)


def _card_line(results: Mapping[str, Any], name: str) -> str:
    card = (results.get("cards") or {}).get(name)
    if not card:
        config = results.get("config") or {}
        why = "card: false" if config.get("card") is False else "not written"
        return f"Report card: none ({why})."
    per = card.get("per_attack") or {}
    holds = [k for k, v in per.items() if v == "PASS"]
    fails = [k for k, v in per.items() if v == "FAIL"]
    return (
        f"Report card of {display_name(str(card.get('method')))} (seed {card.get('seed')}): "
        f"[report.md]({card.get('report')}) · [report.html]({card.get('html')}); verdict "
        f"**{card.get('verdict')}**; holds against {holds or 'none'}, broken by {fails or 'none'}."
    )


def _backbone_section(results: Mapping[str, Any], name: str, backbone: Mapping[str, Any]) -> str:
    rir = (results.get("config") or {}).get("rir") or {}
    groups, per_group = rir.get("groups", "G"), rir.get("per_group", "n")
    parts = [
        f"## {name}",
        _setting(name, backbone),
        "### Table 3 (mean ± sample std over seeds; (i) first)",
        f"(i) = κ ratio of the harmful probe Hessian ΦᵀΦ (immunized / θ_0), (ii) the same on D_P, RIR_θ0 = "
        f"mean over {groups} groups × {per_group} training rows of (i)_g/(ii)_g (§7.3); full-data = κ over "
        "all training features. D_P accuracy: the model's own head on the D_P test split.",
        _table3(backbone),
        "95 % bootstrap intervals over seeds (descriptive at 3 seeds) and RIR_θ0 at the band's edges:",
        _ci_table(backbone),
        _probe_intro(backbone, "probe_curve"),
        _probe_table(backbone, "probe_curve"),
        _probe_intro(backbone, "probe_curve_own_lr"),
        _probe_table(backbone, "probe_curve_own_lr"),
        _paper_section(results, backbone),
        _checks_section(backbone),
        _card_line(results, name),
    ]
    return "\n\n".join(p for p in parts if p)


def _provenance(results: Mapping[str, Any]) -> str:
    prov = results.get("provenance") or {}
    lines = [
        f"- run {results.get('run_id', DASH)}, created {results.get('created_at', DASH)}",
        f"- immunekit {prov.get('immunekit', DASH)}, git `{prov.get('git_sha') or 'unknown'}`"
        + (" (dirty)" if prov.get("git_dirty") else ""),
        f"- python {prov.get('python', DASH)}, torch {prov.get('torch', DASH)}, "
        f"platform {prov.get('platform', DASH)}",
        f"- device {prov.get('device', DASH)}, dtype {prov.get('dtype', DASH)}, "
        f"workers {prov.get('workers', DASH)}",
        f"- seeds: {', '.join(str(s) for s in results.get('seeds') or [])}",
        f"- config_sha256: `{results.get('config_sha256', DASH)}`",
        f"- trial wall time, summed: {_num(results.get('trial_seconds_total'))} s",
    ]
    return "## Provenance\n\n" + "\n".join(lines)


def render_deep_vision(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """The Markdown report of a deep vision record; ``figures`` maps ``"probe"`` to its file name."""
    backbones = results.get("backbones") or {}
    intro = (
        "# Deep vision: condition-number immunization of pretrained backbones\n\n"
        "Table 3 and Fig. 3 of arXiv 2505.23760 at CPU scale: the last block of a pretrained backbone θ_0 is "
        "immunized so that its own domain D_P stays usable and linear probing on a harmful domain D_H gets "
        "harder. Success needs (i) > 1 and (ii) ≤ 1 (RIR can be bought through (ii) alone), D_P accuracy "
        "kept, and a slower harmful probe."
    )
    parts = [intro]
    parts += [_backbone_section(results, name, b) for name, b in backbones.items() if isinstance(b, Mapping)]
    if "probe" in figures:
        parts.append(
            f"## Figures\n\n![Harmful test accuracy of the linear probe per epoch]({figures['probe']})\n\n"
            "Harmful test accuracy of the linear probe against probe epochs, mean over seeds with a ± "
            "one-std band; θ_0 dashed; one panel per backbone (Fig. 3 style: lower is better)."
        )
    else:
        parts.append(
            "## Figures\n\nNo figure was rendered (matplotlib is missing or no probe curve was recorded)."
        )
    parts.append(_provenance(results))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- figure


def _curve(
    method: Mapping[str, Any], curve: str = "probe_curve"
) -> tuple[list[float], list[float], list[float]]:
    data = method.get(curve) or {}
    epochs = data.get("epoch") or []
    points = data.get("harmful_test_accuracy") or []
    xs, ys, sd = [], [], []
    for epoch, p in zip(epochs, points, strict=False):
        mean = p.get("mean") if isinstance(p, Mapping) else None
        if isinstance(mean, int | float) and math.isfinite(mean):
            std = p.get("std")
            xs.append(float(epoch))
            ys.append(100 * float(mean))
            sd.append(100 * float(std) if isinstance(std, int | float) and math.isfinite(std) else 0.0)
    return xs, ys, sd


ROWS = (("probe_curve", "θ_0's lr (Fig. 3 protocol)"), ("probe_curve_own_lr", "each model's own stable lr"))


def probe_figure(results: Mapping[str, Any]) -> Any | None:
    """The Fig. 3 figure, or ``None`` when no curve was recorded.

    One column per backbone; the first row probes every model at θ_0's lr (the paper's protocol), the
    second (when recorded) at each model's own largest stable lr.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    backbones = [(n, b) for n, b in (results.get("backbones") or {}).items() if isinstance(b, Mapping)]
    rows = [
        (curve, title)
        for curve, title in ROWS
        if any(_curve(m, curve)[0] for _, b in backbones for m in _methods(b).values())
    ]
    if not rows:
        return None
    fig = Figure(figsize=(5.2 * len(backbones), 3.7 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(backbones), squeeze=False)
    spare = iter(FALLBACK_COLORS * 4)
    colors: dict[str, str] = {}
    for r, (curve, title) in enumerate(rows):
        for c, (name, b) in enumerate(backbones):
            ax = axes[r][c]
            ref = b.get("reference")
            for key, m in _methods(b).items():
                xs, ys, sd = _curve(m, curve)
                if not xs:
                    continue
                if key == ref:
                    color, style = REFERENCE_COLOR, "--"
                else:
                    color = colors.setdefault(key, METHOD_COLORS.get(key) or next(spare))
                    style = "-"
                ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=_label(key, ref))
                ax.fill_between(
                    xs,
                    [y - s for y, s in zip(ys, sd, strict=True)],
                    [y + s for y, s in zip(ys, sd, strict=True)],
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
            s = b.get("setting") or {}
            ax.set_title(f"{name}, D_H {s.get('harmful', '?')}: {title}", fontsize=10)
            ax.set_xlabel("probe epoch")
            ax.set_ylabel("harmful test accuracy (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    return fig


def plot_probe_curves(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Write :func:`probe_figure` to ``path`` (PNG, atomically); ``None`` when there is nothing to draw."""
    fig = probe_figure(results)
    return None if fig is None else save_figure(fig, Path(path))


def write_deep_vision_report(results_file: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and ``probe_curves.png`` for a deep vision ``results.json``.

    Args:
        results_file: the ``results.json``.
        out_dir: where to write; default: the folder of ``results.json`` (created if missing).

    Returns:
        The path of ``report.md``.

    Raises:
        ReportError: the file is not a readable deep vision record.

    """
    results_file = Path(results_file)
    results = load_deep_vision(results_file)
    out = Path(out_dir) if out_dir is not None else results_file.parent
    plots = {"probe": (PROBE_FIGURE, plot_probe_curves)}
    return write_figures_and_report(results, out, plots, render_deep_vision, results_file)


__all__ = [
    "KIND",
    "PROBE_FIGURE",
    "is_deep_vision",
    "load_deep_vision",
    "plot_probe_curves",
    "probe_figure",
    "render_deep_vision",
    "write_deep_vision_report",
]
