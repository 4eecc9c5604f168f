"""Method comparison: ``summary.md`` and a self-contained ``summary.html`` over several report cards.

Input is a folder ``OUT`` holding one evaluation record per immunized model in a subfolder
(``OUT/<rel>/results.json``, ``kind == "evaluation"``), as ``immunekit evaluate --model DIR`` writes
them. This module reads that JSON only (no torch, no model, no other immunekit layer).

One row per model (method, seed and grid cell when known): the overall verdict; the status of each
condition of Rosati et al. (arXiv 2402.16382): resistance strong/weak, stability, generalization
in-domain/cross-domain, trainability; for every resistance attack whether the immunity holds
against it, with the smallest steps-to-threshold ratio min_s t*_s(M*)/t*_s(M) over seeds and the
largest harm max_{s,t} h_s(t) of the immunized model; the κ ratios (i) κ(H_H*)/κ(H_H) and
(ii) κ(H_P*)/κ(H_P) when measured; and each record's plain statement of which attackers the
immunity holds against. A per-method table counts, per attack, the seeds the immunity holds for.

Method, seed and cell come from the checkpoint metadata the CLI stores in the record
(``record["checkpoint"]["metadata"]``); without it they are parsed from the folder name
``[cell/]method--seedN``.

Records evaluated with different attacks, budget, seeds, thresholds or search are not compared: a
mixed folder raises :class:`ReportError` naming both folders.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from immunekit.reports._common import (
    DASH,
    HOLDS,
    NOT_HOLDS,
    NOT_TESTED,
    UNDECIDED,
    atomic_write_text,
    fmt_num,
    immunity_text,
    score_name,
    stale_rules_note,
    threshold_label,
)
from immunekit.reports.card import (
    CONDITION_ORDER,
    CSS,
    badge,
    breakable,
    escape,
    load_evaluation,
    md_table,
)
from immunekit.reports.schema import RESULTS_FILENAME, ReportError

logger = logging.getLogger(__name__)

SUMMARY_MD = "summary.md"
SUMMARY_HTML = "summary.html"
#: Config keys every compared record must share (the model, task and benign recipe may differ).
SHARED_CONFIG_KEYS = ("attacks", "budget", "seeds", "thresholds", "search")
#: Attack groups shown as resistance columns (the grid and the attacker search's choice).
RESISTANCE_GROUPS = ("resistance", "search")
#: The comparison fits a 1280 px window: tables take the page width and break long keys anywhere.
EXTRA_CSS = """
table{width:100%;font-size:.84em}
th,td{padding:.3em .45em;overflow-wrap:break-word}
td small{overflow-wrap:anywhere}
.badge{font-size:.8em;padding:.1em .45em;white-space:normal}
td small{color:#555;display:block}
"""
_REL_PATTERN = re.compile(r"^(?:(?P<cell>.+)/)?(?P<method>[^/]+?)--seed(?P<seed>-?\d+)$")


# --- loading ------------------------------------------------------------------------------------


def find_evaluations(root: str | Path) -> list[tuple[str, Path]]:
    """Every evaluation record below ``root`` (not ``root/results.json`` itself), sorted.

    Args:
        root: the comparison folder ``OUT``.

    Returns:
        ``(rel, path)`` pairs: ``rel`` the record's folder relative to ``root`` (POSIX, e.g.
        ``"0-1/opt_kappa--seed1"``), ``path`` its ``results.json``. Files that are not
        evaluation records (other runs, unreadable JSON) are skipped with a debug log line.

    """
    root = Path(root)
    found = []
    for path in sorted(root.rglob(RESULTS_FILENAME)):
        if path.parent == root:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.debug("skipping %s: not readable JSON", path)
            continue
        if isinstance(data, Mapping) and data.get("kind") == "evaluation":
            found.append((path.parent.relative_to(root).as_posix(), path))
        else:
            logger.debug("skipping %s: not an evaluation record", path)
    return found


def is_comparison_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder without its own ``results.json`` holding evaluation records below."""
    p = Path(path)
    return p.is_dir() and not (p / RESULTS_FILENAME).exists() and bool(find_evaluations(p))


def shared_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``record["config"]`` every compared model must share (:data:`SHARED_CONFIG_KEYS`)."""
    config = record.get("config") or {}
    return {k: config.get(k) for k in SHARED_CONFIG_KEYS}


def load_comparison(root: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Load and validate every evaluation record below ``root``.

    Returns:
        ``(rel, record)`` pairs sorted by ``rel``.

    Raises:
        ReportError: no evaluation record below ``root``, an invalid record, or records evaluated
            with different shared settings (:data:`SHARED_CONFIG_KEYS`).

    """
    items = find_evaluations(root)
    if not items:
        raise ReportError(
            f"{root}: no evaluation records (*/results.json with kind 'evaluation') below it; run "
            "`immunekit evaluate --model DIR --out OUT` first"
        )
    out = [(rel, load_evaluation(path)) for rel, path in items]
    first_rel, first = out[0]
    for rel, record in out[1:]:
        diff = [k for k in SHARED_CONFIG_KEYS if shared_config(record)[k] != shared_config(first)[k]]
        if diff:
            raise ReportError(
                f"{Path(root) / rel} was evaluated with different {', '.join(diff)} than "
                f"{Path(root) / first_rel}; refusing to mix them in one comparison. Evaluate them into "
                "separate --out folders"
            )
    return out


# --- rows ---------------------------------------------------------------------------------------


def model_identity(rel: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Method, seed and cell of a record: checkpoint metadata first, else the folder name.

    Example:
        >>> model_identity("0-1/opt_kappa--seed2", {})
        {'method': 'opt_kappa', 'seed': 2, 'cell': '0-1'}

    """
    meta = (record.get("checkpoint") or {}).get("metadata") or {}
    m = _REL_PATTERN.match(rel)
    parsed = (
        {"method": m["method"], "seed": int(m["seed"]), "cell": m["cell"] or ""}
        if m
        else {"method": rel, "seed": None, "cell": ""}
    )
    cell = meta.get("cell")
    if cell is None and m is not None:
        cell = parsed["cell"]
    return {
        "method": str(meta.get("method") or parsed["method"]),
        "seed": meta.get("seed", parsed["seed"]),
        "cell": str(cell or ""),
    }


#: One column for the attacker search: each model's search picks its own settings (shown in the cell).
SEARCH_COLUMN = "search (tuned per model)"


def _column(key: str, group: str | None) -> str:
    return SEARCH_COLUMN if group == "search" or key.startswith("search:") else key


def resistance_attacks(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Attack columns of the resistance groups over all records, in grid order (first seen first).

    The fixed attacks keep their keys; whatever the search chose is one :data:`SEARCH_COLUMN`.
    """
    keys: list[str] = []
    for record in records:
        groups = record.get("groups") or {}
        attacks = record.get("attacks") or {}
        ordered = [_column(k, g) for g in RESISTANCE_GROUPS for k in groups.get(g) or []]
        ordered += [
            _column(k, a.get("group")) for k, a in attacks.items() if a.get("group") in RESISTANCE_GROUPS
        ]
        keys += [k for k in dict.fromkeys(ordered) if k not in keys]
    return keys


def _search_key(record: Mapping[str, Any]) -> str | None:
    chosen = list((record.get("groups") or {}).get("search") or [])
    chosen += [k for k, a in (record.get("attacks") or {}).items() if a.get("group") == "search"]
    return chosen[0] if chosen else None


def comparison_rows(items: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One JSON-ready row per model.

    Returns:
        Rows with ``model`` (folder), ``method``, ``seed``, ``cell``, ``verdict``, ``conditions``
        (condition key → status), ``attacks`` (attack key → ``{"immunity", "strength", "min_ratio",
        "max_harm"}``, ``immunity`` one of "holds", "does not hold", "not tested", "—" = not run),
        ``kappa_ratio_harmful`` (i), ``kappa_ratio_primary`` (ii) (``None`` when not measured)
        and ``statement`` (the record's plain sentence).

    """
    attack_keys = resistance_attacks([r for _, r in items])
    rows = []
    for rel, record in items:
        per = record.get("per_attack") or {}
        conditions = record.get("conditions") or {}
        kappa_entry = record.get("kappa")
        kappa = kappa_entry if isinstance(kappa_entry, Mapping) else {}
        attacks = {}
        for key in attack_keys:
            real = _search_key(record) if key == SEARCH_COLUMN else key
            entry = per.get(real) if real is not None else None
            entry = entry if isinstance(entry, Mapping) else None
            strength = None
            if entry is not None and entry.get("holds"):
                strength = "strong" if entry.get("strong") in (True, "PASS") else "weak"
            attacks[key] = {
                "immunity": immunity_text(entry),
                "strength": strength,
                "min_ratio": None if entry is None else entry.get("min_ratio"),
                "max_harm": None if entry is None else entry.get("max_harm"),
                "setting": real.removeprefix("search:") if key == SEARCH_COLUMN and real else None,
            }
        rows.append(
            {
                "model": rel,
                **model_identity(rel, record),
                "verdict": str((record.get("verdict") or {}).get("verdict", "?")),
                "stale_rules": stale_rules_note(record) is not None,
                "conditions": {
                    key: str(conditions[key].get("status"))
                    if isinstance(conditions.get(key), Mapping)
                    else DASH
                    for key, _ in CONDITION_ORDER
                },
                "attacks": attacks,
                "kappa_ratio_harmful": kappa.get("kappa_ratio_harmful"),
                "kappa_ratio_primary": kappa.get("kappa_ratio_primary"),
                "statement": str((record.get("statement") or {}).get("text") or DASH),
            }
        )
    return rows


def method_rows(rows: Sequence[Mapping[str, Any]], attack_keys: Sequence[str]) -> list[list[str]]:
    """Per (cell, method): models, verdict counts and, per attack, "holds in k of n" over its seeds."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["cell"], row["method"]), []).append(row)
    out = []
    for (cell, method), members in groups.items():
        verdicts: dict[str, int] = {}
        for r in members:
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        line = [cell or DASH, method, str(len(members)), ", ".join(f"{v} {n}" for v, n in verdicts.items())]
        for key in attack_keys:
            tested = [r for r in members if r["attacks"][key]["immunity"] in (HOLDS, NOT_HOLDS)]
            held = sum(r["attacks"][key]["immunity"] == HOLDS for r in tested)
            undecided = sum(r["attacks"][key]["immunity"] == UNDECIDED for r in members)
            parts = [f"{HOLDS} {held} of {len(tested)}"] if tested else []
            parts += [f"{UNDECIDED} {undecided}"] if undecided else []
            line.append(", ".join(parts) or NOT_TESTED)
        out.append(line)
    return out


def _attack_detail(a: Mapping[str, Any]) -> str:
    text = f"min t* ratio {fmt_num(a['min_ratio'])}, max harm {fmt_num(a['max_harm'])}"
    return f"{text}; chose {a['setting']}" if a.get("setting") else text


def _has_cells(rows: Sequence[Mapping[str, Any]]) -> bool:
    return any(r["cell"] for r in rows)


def _identity_cells(row: Mapping[str, Any], cells: bool) -> list[str]:
    seed = DASH if row["seed"] is None else str(row["seed"])
    return [row["model"], *([row["cell"] or DASH] if cells else []), row["method"], seed]


def _head(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return ["model", *(["cell"] if _has_cells(rows) else []), "method", "seed"]


def _setup_text(record: Mapping[str, Any]) -> str:
    task = record.get("task") or {}
    th = record.get("thresholds") or {}
    budget = record.get("budget") or {}
    return (
        f"task {task.get('name', '?')}; seeds {', '.join(str(s) for s in record.get('seeds') or [])}; "
        f"budget steps={budget.get('steps', '?')}, optimizer={budget.get('optimizer', '?')}, "
        f"lr={budget.get('lr', '?')}; {threshold_label('harm', th.get('harm'), score_name(record))}, "
        f"{threshold_label('slowdown', th.get('slowdown'), score_name(record))}"
    )


# --- rendering ----------------------------------------------------------------------------------

_INTRO = (
    "One row per immunized model. An attack column says whether the immunity holds against that "
    "attacker (strong: harm never exceeds φ within the budget; weak: steps-to-threshold at least κ "
    "times the reference's), with the smallest t* ratio over seeds and the largest harm of the "
    "immunized model. κ ratios: (i) κ(H_H) and (ii) κ(H_P), immunized / reference."
)


def render_comparison_markdown(items: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The comparison as Markdown (``summary.md``)."""
    rows = comparison_rows(items)
    keys = resistance_attacks([r for _, r in items])
    cells = _has_cells(rows)
    lines = ["# Immunization comparison", "", _setup_text(items[0][1]) + ".", "", _INTRO, ""]
    stale = _stale_text(rows)
    if stale:
        lines += [f"> **Note.** {stale}", ""]
    lines += ["## Conditions", ""]
    lines += md_table(
        [*_head(rows), "verdict", *(label for _, label in CONDITION_ORDER), "κ ratio (i)", "κ ratio (ii)"],
        [
            [
                *_identity_cells(r, cells),
                r["verdict"],
                *(r["conditions"][k] for k, _ in CONDITION_ORDER),
                fmt_num(r["kappa_ratio_harmful"]),
                fmt_num(r["kappa_ratio_primary"]),
            ]
            for r in rows
        ],
    )
    lines += ["", "## Resistance per attack", ""]
    lines += md_table(
        [*_head(rows), *keys],
        [
            [
                *_identity_cells(r, cells),
                *(
                    _attack_md(r["attacks"][k])
                    for k in keys  # one cell: "does not hold (min t* ratio 1, max harm 0.97)"
                ),
            ]
            for r in rows
        ],
    )
    lines += ["", "## By method", ""]
    lines += md_table(["cell", "method", "models", "verdicts", *keys], method_rows(rows, keys))
    lines += ["", "## Which attackers the immunity holds against", ""]
    lines += [f"- **{r['model']}** ({r['verdict']}): {r['statement']}" for r in rows]
    return "\n".join(lines) + "\n"


def _stale_text(rows: Sequence[Mapping[str, Any]]) -> str | None:
    stale = [str(r["model"]) for r in rows if r.get("stale_rules")]
    if not stale:
        return None
    return (
        f"{len(stale)} of {len(rows)} model(s) ({', '.join(stale[:5])}{', …' if len(stale) > 5 else ''}) "
        "were judged by older verdict rules that could call a non-immune model IMMUNIZED; their "
        "verdicts are shown as recorded. Rerun `immunekit evaluate` for the current rules."
    )


def _attack_md(a: Mapping[str, Any]) -> str:
    if a["immunity"] == DASH:
        return DASH
    word = a["immunity"] + (f" ({a['strength']})" if a["strength"] else "")
    return f"{word}; {_attack_detail(a)}"


def _attack_html(a: Mapping[str, Any]) -> str:
    if a["immunity"] == DASH:
        return escape(DASH)
    word = a["immunity"] + (f" ({a['strength']})" if a["strength"] else "")
    rest = escape(word[len(a["immunity"]) :])
    return f"{badge(a['immunity'])}{rest}<small>{breakable(_attack_detail(a))}</small>"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    """HTML table whose cells are already HTML (escape text before); headers may break at separators."""
    out = [f'<table id="{table_id}"><thead><tr>' + "".join(f"<th>{breakable(h)}</th>" for h in head)]
    out.append("</tr></thead><tbody>")
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</tbody></table>")
    return "\n".join(out)


def render_comparison_html(items: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The comparison as one self-contained HTML page (inline CSS, badges; ``summary.html``)."""
    rows = comparison_rows(items)
    keys = resistance_attacks([r for _, r in items])
    cells = _has_cells(rows)
    head = _head(rows)

    def ident(r: Mapping[str, Any]) -> list[str]:
        link = f'<a href="{escape(r["model"])}/report.html">{breakable(r["model"])}</a>'
        return [link, *(escape(c) for c in _identity_cells(r, cells)[1:])]

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Immunization comparison</title>",
        f"<style>{CSS}{EXTRA_CSS}</style></head><body>",
        "<h1>Immunization comparison</h1>",
        f'<p class="note">{escape(_setup_text(items[0][1]))}</p>',
        f"<p>{escape(_INTRO)}</p>",
        *(
            [f'<p class="stale"><b>Note.</b> {escape(_stale_text(rows) or "")}</p>']
            if _stale_text(rows)
            else []
        ),
        "<h2>Conditions</h2>",
        _table(
            [*head, "verdict", *(label for _, label in CONDITION_ORDER), "κ ratio (i)", "κ ratio (ii)"],
            [
                [
                    *ident(r),
                    badge(r["verdict"]),
                    *(badge(r["conditions"][k]) for k, _ in CONDITION_ORDER),
                    escape(fmt_num(r["kappa_ratio_harmful"])),
                    escape(fmt_num(r["kappa_ratio_primary"])),
                ]
                for r in rows
            ],
            "conditions",
        ),
        "<h2>Resistance per attack</h2>",
        _table(
            [*head, *keys],
            [[*ident(r), *(_attack_html(r["attacks"][k]) for k in keys)] for r in rows],
            "attacks",
        ),
        "<h2>By method</h2>",
        _table(
            ["cell", "method", "models", "verdicts", *keys],
            [[escape(c) for c in line] for line in method_rows(rows, keys)],
            "methods",
        ),
        "<h2>Which attackers the immunity holds against</h2>",
        '<ul id="statements">'
        + "".join(
            f"<li><b>{escape(r['model'])}</b> {badge(r['verdict'])} "
            f'<span class="statement-text">{escape(r["statement"])}</span></li>'
            for r in rows
        )
        + "</ul>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# --- writing ------------------------------------------------------------------------------------


def write_comparison(root: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.html`` for the evaluation records below ``root``.

    Args:
        root: the folder holding ``<rel>/results.json`` per model.
        out_dir: where to write; default: ``root``.

    Returns:
        (path of summary.md, path of summary.html).

    Raises:
        ReportError: no records, an invalid record, or records with different shared settings.

    """
    items = load_comparison(root)
    out = Path(out_dir) if out_dir is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / SUMMARY_MD, out / SUMMARY_HTML
    atomic_write_text(md, render_comparison_markdown(items))
    atomic_write_text(page, render_comparison_html(items))
    logger.info("wrote %s and %s (%d model(s))", md, page, len(items))
    return md, page


__all__ = [
    "SHARED_CONFIG_KEYS",
    "SUMMARY_HTML",
    "SUMMARY_MD",
    "comparison_rows",
    "find_evaluations",
    "is_comparison_dir",
    "load_comparison",
    "method_rows",
    "model_identity",
    "render_comparison_html",
    "render_comparison_markdown",
    "resistance_attacks",
    "shared_config",
    "write_comparison",
]
