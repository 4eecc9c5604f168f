"""The immunization report card: ``report.md`` and a self-contained ``report.html`` from results.json.

Input is an evaluation record (``kind == "evaluation"``, written by
``immunekit.experiments.evaluate.evaluate``); this module reads that JSON only (no torch, no model,
no other immunekit layer). The HTML has inline CSS and its plots embedded as base64 PNGs, so it
can be mailed or archived as one file; the Markdown refers to the same PNGs written beside it.

Contents: the overall verdict, the condition table with PASS/FAIL/NOT-RUN/INCONCLUSIVE badges, the
gates, the plain statement of which attackers the immunity holds against, per-attack harm-vs-step
curves (immunized vs reference, seed mean ± 95 % bootstrap band, the threshold φ dashed), the
trainability curves, the attacker search's cumulative-best curve and chosen settings, κ/RIR when
present, per-attack summaries over seeds and the provenance (versions, git sha, config sha256,
seeds, budget).

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
from typing import Any

from immunekit._versions import SCHEMA_VERSION
from immunekit.reports._common import (
    DASH,
    atomic_target,
    atomic_write_text,
    fmt_num,
    immunity_text,
    safe_filename,
    stale_rules_note,
    verdict_rules,
)
from immunekit.reports.schema import RERUN_HINT, ReportError, resolve_results_path

logger = logging.getLogger(__name__)

KIND = "evaluation"
MARKDOWN_FILENAME = "report.md"
HTML_FILENAME = "report.html"
DPI = 110
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
PLOT_GROUPS = ("resistance", "search", "in_domain", "cross_domain")
IMMUNIZED_COLOR = "#d62728"
REFERENCE_COLOR = "#404040"
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.badge{display:inline-block;padding:.1em .55em;border-radius:.7em;font-weight:600;font-size:.85em;color:#fff}
.PASS,.IMMUNIZED{background:#2e7d32}.FAIL,.NOT-IMMUNIZED{background:#c62828}
.NOT-RUN,.NOT-TESTED{background:#757575}.INCONCLUSIVE{background:#ef8f00}.INVALID{background:#6a1b9a}
.stale{background:#fff3e0;border-left:4px solid #ef8f00;padding:.6em 1em}
.verdict{font-size:1.6em;padding:.25em .8em}
.statement{background:#f7f7f7;border-left:4px solid #888;padding:.6em 1em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.88em;color:#555}.note{color:#666;font-size:.9em}
code{background:#f3f3f3;padding:0 .2em}
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


def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) if isinstance(v, int | float) and math.isfinite(v) else math.nan for v in values]


def _draw_band(ax: Any, band: Mapping[str, Any], color: str, label: str, linestyle: str) -> list[float]:
    steps = list(band.get("steps") or [])
    mean = _finite(band.get("mean") or [])
    lo, hi = _finite(band.get("ci_low") or mean), _finite(band.get("ci_high") or mean)
    if not steps or len(mean) != len(steps):
        return []
    ax.plot(steps, mean, color=color, linestyle=linestyle, marker=".", label=label)
    if len(lo) == len(steps) and len(hi) == len(steps):
        ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)
    return [v for v in [*mean, *lo, *hi] if not math.isnan(v)]


def _curve_figure(results: Mapping[str, Any], key: str, attack: Mapping[str, Any], *, benign: bool) -> bytes:
    bands = attack.get("bands") or {}
    loss = (results.get("task") or {}).get("loss")
    score = "R²" if loss == "mse" else "accuracy"
    fig = _new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    values = _draw_band(ax, bands.get("immunized") or {}, IMMUNIZED_COLOR, "immunized M*", "-")
    values += _draw_band(ax, bands.get("reference") or {}, REFERENCE_COLOR, "reference M", "--")
    if benign:
        target = ((results.get("conditions") or {}).get("trainability") or {}).get("target")
        if isinstance(target, int | float):
            ax.axhline(target, color="#1f77b4", linestyle=":", label=f"target {fmt_num(target)}")
        ax.set_ylabel(f"primary {score} (eval_primary)")
        ax.set_title(f"Benign fine-tuning: {key}")
    else:
        phi = (results.get("thresholds") or {}).get("harm")
        if isinstance(phi, int | float):
            ax.axhline(phi, color="black", linestyle="--", linewidth=1, label=f"φ = {fmt_num(phi)}")
            values.append(float(phi))
        ax.set_ylabel(f"harm: {score} on {attack.get('eval_split') or 'eval_harmful'}")
        ax.set_title(f"Harm vs step: {key}")
    if loss == "mse" and values and min(values) < -1.0:
        ax.set_ylim(bottom=-1.0, top=max(1.02, max(values) + 0.02))  # R² can dive far below 0 at step 0
    ax.set_xlabel("attack step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _search_figure(search: Mapping[str, Any]) -> bytes | None:
    trials = [t for t in search.get("trials") or [] if isinstance(t.get("value"), int | float)]
    best = _finite(search.get("cumulative_best") or [])
    if not trials and not best:
        return None
    fig = _new_figure((6.4, 3.4))
    ax = fig.add_subplot()
    if trials:
        ax.scatter(
            [t.get("number", i) for i, t in enumerate(trials)],
            [t["value"] for t in trials],
            color="#9467bd",
            s=14,
            label="trial (validation harm)",
        )
    if best:
        ax.step(range(len(best)), best, where="post", color="#1f77b4", label="cumulative best")
    ax.set_xlabel("trial")
    ax.set_ylabel("harm on val_harmful")
    ax.set_title("Attacker search: cumulative best")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def figure_ids(results: Mapping[str, Any]) -> list[str]:
    """Ids of every figure the card draws for ``results`` (when matplotlib is installed)."""
    ids = []
    for key, attack in (results.get("attacks") or {}).items():
        if attack.get("bands"):
            ids.append(f"{'benign' if attack.get('group') == 'benign' else 'harm'}_{safe_filename(key)}")
    search = results.get("search")
    if isinstance(search, Mapping) and (search.get("trials") or search.get("cumulative_best")):
        ids.append("search_cumulative_best")
    return ids


def render_figures(results: Mapping[str, Any]) -> dict[str, bytes]:
    """Figure id → PNG bytes; ``{}`` when matplotlib is not installed."""
    if not _matplotlib_available():
        return {}
    out: dict[str, bytes] = {}
    for key, attack in (results.get("attacks") or {}).items():
        if not attack.get("bands"):
            continue
        benign = attack.get("group") == "benign"
        out[f"{'benign' if benign else 'harm'}_{safe_filename(key)}"] = _curve_figure(
            results, key, attack, benign=benign
        )
    search = results.get("search")
    if isinstance(search, Mapping):
        png = _search_figure(search)
        if png is not None:
            out["search_cumulative_best"] = png
    return out


# --- tables -------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return fmt_num(value)
    return str(value)


def condition_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(label, status, value, threshold, detail) of every condition in display order."""
    conds = results.get("conditions") or {}
    rows = []
    for key, label in CONDITION_ORDER:
        c = conds.get(key)
        if isinstance(c, Mapping):
            rows.append(
                (
                    label,
                    str(c.get("status")),
                    _fmt(c.get("value")),
                    _fmt(c.get("threshold")),
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


def attack_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Per attack: key, group, holds?, final harm M* and M (mean [95 % CI]), paired difference, min ratio."""
    per = results.get("per_attack") or {}
    rows = []
    for key, attack in (results.get("attacks") or {}).items():
        if attack.get("group") == "benign":
            continue
        summ = (attack.get("summary") or {}).get("final_harm") or {}
        verdict = per.get(key) or {}
        rows.append(
            [
                key,
                str(attack.get("group", "")),
                immunity_text(verdict),
                _summary_text(summ.get("immunized")),
                _summary_text(summ.get("reference")),
                _summary_text(summ.get("difference")),
                _fmt(verdict.get("min_ratio")),
            ]
        )
    return rows


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


def search_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(setting, value) of the search's chosen attacker, or [] when no search ran."""
    search = results.get("search")
    if not isinstance(search, Mapping):
        return []
    chosen = search.get("chosen") or {}
    rows = [(str(k), _fmt(v) if not isinstance(v, Mapping) else str(dict(v))) for k, v in chosen.items()]
    rows.append(("trials", str(len(search.get("trials") or []))))
    if search.get("objective"):
        rows.append(("objective", str(search["objective"])))
    return rows


# --- Markdown -----------------------------------------------------------------------------------


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
    lines += ["", "## Attacks", ""]
    lines += _md_table(
        ["attack", "group", "immunity", "final harm M*", "final harm M", "M* − M (paired)", "min t* ratio"],
        attack_rows(results),
    )
    lines += ["", "## Curves", ""]
    if not figures:
        lines.append("_Plots skipped: matplotlib is not installed (`pip install 'immunekit[plots]'`)._")
    for fid in figure_ids(results):
        if fid in figures:
            lines.append(f"![{fid}]({figures[fid]})")
    rows = search_rows(results)
    if rows:
        lines += ["", "## Attacker search (chosen settings)", ""]
        lines += _md_table(["setting", "value"], rows)
    rows = kappa_rows(results)
    if rows:
        lines += ["", "## κ / RIR (linear-probe Hessians ∝ ΦᵀΦ)", ""]
        lines += _md_table(["quantity", "value"], rows)
    lines += ["", "## Thresholds", ""]
    lines += _md_table(
        ["threshold", "value"], [(k, _fmt(v)) for k, v in (results.get("thresholds") or {}).items()]
    )
    lines += ["", "## Provenance", ""]
    lines += _md_table(["item", "value"], provenance_rows(results))
    return "\n".join(lines) + "\n"


# --- HTML ---------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _badge(status: str, extra: str = "") -> str:
    cls = status.replace(" ", "-")
    return f'<span class="badge {_e(cls)} {extra}">{_e(status)}</span>'


def _html_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], *, badge_col: int | None = None, table_id: str = ""
) -> str:
    ident = f' id="{_e(table_id)}"' if table_id else ""
    out = [f"<table{ident}><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        cells = [_badge(c) if i == badge_col else _e(c) for i, c in enumerate(row)]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render_card_html(results: Mapping[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """The card as one self-contained HTML page; ``images`` maps figure id → PNG bytes (embedded)."""
    images = images or {}
    verdict = results.get("verdict") or {}
    task = results.get("task") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Immunization report card: {_e(task.get('name', '?'))}</title>",
        f"<style>{CSS}</style></head><body>",
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
    parts.append(
        _html_table(
            [
                "attack",
                "group",
                "immunity",
                "final harm M* (mean [95% CI])",
                "final harm M",
                "M* − M (paired)",
                "min t* ratio",
            ],
            attack_rows(results),
            table_id="attacks",
        )
    )
    parts.append("<h2>Curves</h2>")
    if not images:
        parts.append(
            '<p class="note">Plots skipped: matplotlib is not installed '
            "(<code>pip install 'immunekit[plots]'</code>).</p>"
        )
    for fid in figure_ids(results):
        if fid in images:
            data = base64.b64encode(images[fid]).decode("ascii")
            parts.append(
                f'<figure><img id="fig-{_e(fid)}" alt="{_e(fid)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_e(_caption(fid))}</figcaption></figure>"
            )
    rows = search_rows(results)
    if rows:
        parts.append("<h2>Attacker search: chosen settings</h2>")
        parts.append(_html_table(["setting", "value"], rows, table_id="search"))
    rows = kappa_rows(results)
    if rows:
        parts.append("<h2>κ / RIR (linear-probe Hessians ∝ ΦᵀΦ)</h2>")
        parts.append(_html_table(["quantity", "value"], rows, table_id="kappa"))
    parts.append("<h2>Thresholds</h2>")
    parts.append(
        _html_table(
            ["threshold", "value"], [(k, _fmt(v)) for k, v in (results.get("thresholds") or {}).items()]
        )
    )
    parts.append("<h2>Provenance</h2>")
    parts.append(_html_table(["item", "value"], provenance_rows(results), table_id="provenance"))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _caption(fid: str) -> str:
    if fid == "search_cumulative_best":
        return "Attacker search: validation harm per trial and the cumulative best."
    if fid.startswith("benign_"):
        return (
            "Benign fine-tuning on the primary task: quality vs step, mean ± 95% bootstrap band over seeds."
        )
    return "Harm vs attack step, mean ± 95% bootstrap band over seeds; dashed black line: the threshold φ."


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
    "HTML_FILENAME",
    "KIND",
    "MARKDOWN_FILENAME",
    "badge",
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
