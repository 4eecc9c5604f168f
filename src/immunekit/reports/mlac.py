"""The MLAC text report: cost of adaptation per model role and attacker pool size n.

Input is the ``results.json`` of ``immunekit run mlac-text`` (``kind == "mlac_text"``, written by
:mod:`immunekit.experiments.mlac_text`); this module reads that JSON only (no torch, no model).
Output, next to it (or in ``out_dir``):

* ``report.md``: the setting (data, encoder, profile, seeds, the attacker's search space and the splits
  it is tuned and reported on); the headline table, role × n, of harmful ``attack_test`` accuracy after
  the tuned attack (mean and 95 % CI over seeds); per (role, n) the ``attack_val`` score, the attacks
  chosen, the gap Δ(n) to Random (paired per seed, with its CI) and the recovery r(n); chance and
  majority-class accuracy; desired-task accuracy (own head, linear probe on frozen features, own head
  after the attack); the defenses' training diagnostics; the protocol's deviations; provenance.
* ``harmful_vs_n.png``: harmful test accuracy against n (log x-axis) per role with its 95 % CI band
  (± one std when fewer than 3 seeds), chance and majority as horizontal lines (mlac.md §5.9).

Figures are drawn with matplotlib's Agg canvas (the ``[plots]`` extra); without it the report says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from immunekit.reports._common import DASH, fmt_num, read_kind_record, write_figures_and_report
from immunekit.reports.plots import new_figure, save_figure

logger = logging.getLogger(__name__)

KIND = "mlac_text"
REPORT_FILENAME = "report.md"
FIGURE = "harmful_vs_n.png"
REQUIRED = ("schema_version", "kind", "roles", "n_values", "seeds", "cost", "config")
ROLE_NAMES = {
    "random": "Random",
    "pretrained": "Pretrained",
    "desired_tuned": "Desired-tuned",
    "ac": "AC",
    "mlac": "MLAC",
}
ROLE_COLORS = {
    "random": "#7f7f7f",
    "pretrained": "black",
    "desired_tuned": "#1f77b4",
    "ac": "#ff7f0e",
    "mlac": "#d62728",
}
FALLBACK_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
ATTACK_SHORT = {"head_reset_probe": "probe", "full_finetune": "full"}


def is_mlac_text(data: Any) -> bool:
    """Whether ``data`` is an MLAC text results record."""
    return isinstance(data, Mapping) and data.get("kind") == KIND


def load_mlac_text(path: str | Path) -> dict[str, Any]:
    """Read and check an MLAC text ``results.json``.

    Raises:
        ReportError: missing file, not JSON, another kind, or a required key missing (named, with the fix).

    """
    return read_kind_record(path, KIND, "an MLAC text record", REQUIRED)


def role_name(role: str) -> str:
    """Display name of a role (``mlac`` → ``MLAC``); unknown roles as given."""
    return ROLE_NAMES.get(role, role)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _pct(x: Any, digits: int = 1) -> str:
    v = _num(x)
    return DASH if v is None else f"{100 * v:.{digits}f}"


def _pp(x: Any) -> str:
    v = _num(x)
    return DASH if v is None else f"{100 * v:+.1f}"


def _ci(s: Mapping[str, Any] | None, fmt: Any = _pct) -> str:
    if not s or _num(s.get("ci_low")) is None or _num(s.get("ci_high")) is None:
        return ""
    return f" [{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]"


def _mean_ci(s: Mapping[str, Any] | None) -> str:
    """``mean [lo, hi]`` in %, ``mean ± std`` when there is no interval, ``—`` without a value."""
    if not s or _num(s.get("mean")) is None:
        return DASH
    ci = _ci(s)
    if ci:
        return f"{_pct(s['mean'])}{ci}"
    if (s.get("n") or 0) > 1 and _num(s.get("std")) is not None:
        return f"{_pct(s['mean'])} ± {_pct(s['std'])}"
    return _pct(s["mean"])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _entry(results: Mapping[str, Any], role: str, n: Any) -> Mapping[str, Any]:
    return ((results.get("cost") or {}).get(role) or {}).get(str(n)) or {}


def _choices(entry: Mapping[str, Any]) -> str:
    """The chosen settings per seed, e.g. ``s0 full lr 3e-4 × 200 steps, batch 24``."""
    parts = []
    for c in entry.get("chosen") or []:
        if not isinstance(c, Mapping):
            continue
        attack = ATTACK_SHORT.get(str(c.get("attack")), str(c.get("attack")))
        parts.append(
            f"s{c.get('seed')}: {attack}, lr {fmt_num(c.get('lr'), 2)}, {c.get('steps')} steps, "
            f"batch {c.get('batch_size')}"
        )
    return "; ".join(parts) or DASH


def _recovery(entry: Mapping[str, Any], role: str) -> str:
    if role in ("random", "pretrained"):
        return "0 (reference)" if role == "random" else "1 (reference)"
    rec = entry.get("recovery")
    if not isinstance(rec, Mapping) or _num(rec.get("value")) is None:
        return DASH
    text = f"{float(rec['value']):.2f}"
    return text + " (unstable)" if rec.get("unstable") else text


# --------------------------------------------------------------------------------------------- text


def _setting(results: Mapping[str, Any]) -> str:
    cfg = results.get("config") or {}
    data = results.get("data") or {}
    protocol = results.get("protocol") or {}
    space = protocol.get("search_space") or {}
    sizes = data.get("sizes") or {}
    resolved = results.get("resolved") or {}
    lines = [
        f"- data: `{data.get('name', DASH)}` ({data.get('version', DASH)}); splits "
        + ", ".join(f"{k} {v}" for k, v in sizes.items()),
        f"- desired task: {data.get('classes_desired', DASH)} classes (scenario); harmful task: "
        f"{data.get('classes_harmful', DASH)} classes (gender)",
        f"- encoder: {cfg.get('encoder', DASH)}; profile {cfg.get('profile', DASH)}; seeds "
        + ", ".join(str(s) for s in results.get("seeds") or []),
        f"- attacker pool: {protocol.get('attack_pool', DASH)}; n ∈ "
        + ", ".join(str(n) for n in results.get("n_values") or []),
        f"- attacker search: {space.get('n_trials', DASH)} TPE trials over "
        f"{' / '.join(space.get('attacks') or [])} (fresh head), {space.get('optimizer', 'adam')}, lr "
        f"{fmt_num((space.get('lr') or [None])[0])}–{fmt_num((space.get('lr') or [None, None])[-1])} (log), "
        f"steps {(space.get('steps') or [DASH])[0]}–{(space.get('steps') or [DASH])[-1]}, batch "
        f"{', '.join(str(b) for b in space.get('batch_sizes') or [])}; objective "
        f"{protocol.get('search_objective', DASH)}; reported: {protocol.get('reported', DASH)} "
        f"({space.get('reruns', DASH)} run(s) of the chosen settings)",
        f"- MLAC: K = {resolved.get('inner_steps', DASH)}, {resolved.get('outer_steps', DASH)} outer steps, "
        f"{'first' if (cfg.get('defense') or {}).get('first_order') else 'second'} order",
    ]
    return "## Setting\n\n" + "\n".join(lines)


def _headline(results: Mapping[str, Any]) -> str:
    roles, ns = results.get("roles") or [], results.get("n_values") or []
    rows = [
        [role_name(r)] + [_mean_ci(_entry(results, r, n).get("test_accuracy")) for n in ns] for r in roles
    ]
    b = results.get("baselines") or {}
    pool = b.get("majority_from_pool") or {}
    baseline_rows = [
        ["chance"] + [_pct(b.get("chance")) for _ in ns],
        ["majority class of attack_test"] + [_pct(b.get("majority")) for _ in ns],
        ["always the pool's majority class"] + [_mean_ci(pool.get(str(n))) for n in ns],
    ]
    table = _table(["role"] + [f"n = {n}" for n in ns], rows + baseline_rows)
    return (
        "## Harmful accuracy after the tuned attack\n\n"
        "Gender accuracy (%) on `attack_test` of the attacker's best settings (chosen on `attack_val`), "
        "mean over seeds with the 95 % bootstrap interval (± std with fewer than 3 seeds). Lower is more "
        "resistant; Random is the reference a defended model should match.\n\n" + table
    )


def _detail(results: Mapping[str, Any]) -> str:
    roles, ns = results.get("roles") or [], results.get("n_values") or []
    rows = []
    for r in roles:
        for n in ns:
            e = _entry(results, r, n)
            gap = e.get("gap")
            gap_text = DASH if not isinstance(gap, Mapping) else f"{_pp(gap.get('mean'))}{_ci(gap, _pp)}"
            choice = e.get("attack_choice") or {}
            rows.append(
                [
                    role_name(r),
                    str(n),
                    _mean_ci(e.get("test_accuracy")),
                    _mean_ci(e.get("val_accuracy")),
                    ", ".join(f"{k} ×{v}" for k, v in sorted(choice.items())) or DASH,
                    gap_text,
                    _recovery(e, r),
                    _mean_ci(e.get("oracle_test")),
                ]
            )
    header = [
        "role",
        "n",
        "test acc %",
        "val acc % (search)",
        "attack chosen",
        "Δ vs Random (pp)",
        "r(n)",
        "oracle test % (not headline)",
    ]
    settings = []
    for r in roles:
        for n in ns:
            settings.append(f"- {role_name(r)}, n = {n}: {_choices(_entry(results, r, n))}")
    return (
        "## Per role and n\n\n"
        "Δ(n) = acc_role(n) − acc_Random(n), paired per seed (same attack pools), with its 95 % "
        "interval; r(n) = Δ(n) / (acc_Pretrained(n) − acc_Random(n)) from the means: 0 is as hard to adapt "
        "as Random, 1 as easy as Pretrained; *unstable* when the denominator's interval contains 0. The "
        "oracle (best `attack_test` checkpoint) is logged only when enabled and is never the headline.\n\n"
        + _table(header, rows)
        + "\n\nChosen settings per seed:\n\n"
        + "\n".join(settings)
    )


def _desired(results: Mapping[str, Any]) -> str:
    roles, ns = results.get("roles") or [], results.get("n_values") or []
    desired = results.get("desired") or {}
    rows = []
    for r in roles:
        d = desired.get(r) or {}
        own = _mean_ci(d.get("own_head")) if d.get("own_head_trained") else "(untrained head)"
        after = [_mean_ci(_entry(results, r, n).get("desired_after_attack")) for n in ns]
        rows.append([role_name(r), own, _mean_ci(d.get("probe")), *after])
    header = ["role", "own head %", "linear probe on frozen features %"] + [
        f"own head after attack, n = {n}" for n in ns
    ]
    return (
        "## Desired-task accuracy\n\n"
        "Scenario accuracy (%) on `attack_test`: the model's own head (its desired columns; Random and "
        "Pretrained carry an untrained head), a linear probe trained on frozen features of "
        "`defender_train` (every role alike), and for trained roles the attacked trunk with the model's own "
        "head put back (the attack of the headline's first run).\n\n" + _table(header, rows)
    )


def _training(results: Mapping[str, Any]) -> str:
    training = results.get("training") or {}
    rows = []
    for r in results.get("roles") or []:
        t = training.get(r) or {}
        if not t.get("trained"):
            continue
        w = t.get("loss_weights") or {}
        per = t.get("per_seed") or []
        rows.append(
            [
                role_name(r),
                f"{t.get('defense')} / {t.get('preset')}",
                ", ".join(f"{k.removeprefix('lambda_')} {fmt_num(v)}" for k, v in w.items()),
                str(t.get("inner_steps")),
                str(t.get("order")) if t.get("inner_steps") else DASH,
                str(t.get("outer_steps")),
                ", ".join(str(p.get("best_step")) for p in per) or DASH,
                ", ".join(fmt_num(p.get("outer_steps_per_s"), 3) for p in per) or DASH,
                ", ".join(fmt_num(p.get("seconds_train"), 3) for p in per) or DASH,
            ]
        )
    if not rows:
        return "## Defense training\n\nNo trained role in this run."
    header = ["role", "defense / preset", "λ", "K", "order", "outer steps", "best step", "steps/s", "train s"]
    return (
        "## Defense training\n\nPer seed: the outer step kept (lowest `defender_val` loss), speed and "
        "training time.\n\n" + _table(header, rows)
    )


def _notes(results: Mapping[str, Any]) -> str:
    notes = (results.get("protocol") or {}).get("notes") or []
    if not notes:
        return ""
    return "## Protocol notes\n\n" + "\n".join(f"- {n}" for n in notes)


def _provenance(results: Mapping[str, Any]) -> str:
    prov = results.get("provenance") or {}
    lines = [
        f"- run {results.get('run_id', DASH)}, created {results.get('created_at', DASH)}",
        f"- immunekit {prov.get('immunekit', DASH)}, git `{prov.get('git_sha') or 'unknown'}`"
        + (" (dirty)" if prov.get("git_dirty") else ""),
        f"- python {prov.get('python', DASH)}, torch {prov.get('torch', DASH)}, "
        f"device {prov.get('device', DASH)}",
        f"- config_sha256: `{results.get('config_sha256', DASH)}`",
        f"- trial wall time, summed: {fmt_num(results.get('trial_seconds_total'))} s",
    ]
    return "## Provenance\n\n" + "\n".join(lines)


def render_mlac(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """The Markdown report of an MLAC text record; ``figures`` maps ``"harmful"`` to its file name."""
    intro = (
        "# Self-destructing models: cost of adaptation\n\n"
        "MLAC (Henderson et al., arXiv 2211.14946) at CPU scale: can an attacker with n labelled rows "
        "re-purpose the model for the harmful task (gender) better than one starting from a random "
        "initialisation, while the desired task (scenario) stays usable? Roles: "
        + ", ".join(role_name(r) for r in results.get("roles") or [])
        + "."
    )
    parts = [intro, _setting(results), _headline(results)]
    if "harmful" in figures:
        parts.append(
            f"![Harmful accuracy against n]({figures['harmful']})\n\n"
            "Harmful `attack_test` accuracy against the attacker's pool size n (log scale), mean over seeds "
            "with the 95 % interval as a band; chance and majority dashed."
        )
    else:
        parts.append("No figure was rendered (matplotlib is missing or no accuracy was recorded).")
    parts += [_detail(results), _desired(results), _training(results), _notes(results), _provenance(results)]
    return "\n\n".join(p for p in parts if p) + "\n"


# ------------------------------------------------------------------------------------------- figure


def _band(s: Mapping[str, Any]) -> tuple[float, float, float] | None:
    mean = _num(s.get("mean"))
    if mean is None:
        return None
    lo, hi = _num(s.get("ci_low")), _num(s.get("ci_high"))
    if lo is None or hi is None:
        std = _num(s.get("std")) or 0.0
        lo, hi = mean - std, mean + std
    return 100 * mean, 100 * lo, 100 * hi


def harmful_figure(results: Mapping[str, Any]) -> Any | None:
    """Harmful test accuracy vs n (log x) per role with CI bands, chance and majority; ``None`` if empty."""
    ns = [n for n in results.get("n_values") or [] if isinstance(n, int | float) and n > 0]
    curves = []
    spare = iter(FALLBACK_COLORS * 4)
    for role in results.get("roles") or []:
        pts = [(n, _band(_entry(results, role, n).get("test_accuracy") or {})) for n in ns]
        kept = [(float(n), b) for n, b in pts if b is not None]
        if kept:
            curves.append((role, ROLE_COLORS.get(role) or next(spare), kept))
    if not curves:
        return None
    fig = new_figure((6.4, 4.2))
    ax = fig.subplots()
    for role, color, kept in curves:
        xs = [x for x, _ in kept]
        ax.plot(
            xs,
            [b[0] for _, b in kept],
            marker="o",
            color=color,
            markersize=4,
            label=role_name(role),
            linestyle="--" if role == "random" else "-",
        )
        ax.fill_between(
            xs, [b[1] for _, b in kept], [b[2] for _, b in kept], color=color, alpha=0.15, linewidth=0
        )
    b = results.get("baselines") or {}
    for key, label, style in (("chance", "chance", ":"), ("majority", "majority class", "--")):
        v = _num(b.get(key))
        if v is not None:
            ax.axhline(100 * v, color="0.4", linestyle=style, linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("attacker's labelled rows n (log scale)")
    ax.set_ylabel("harmful accuracy on attack_test (%)")
    ax.set_title("Cost of adaptation: harmful accuracy after the tuned attack", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_harmful_vs_n(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Write :func:`harmful_figure` to ``path`` (PNG, atomically); ``None`` when there is nothing to draw."""
    fig = harmful_figure(results)
    return None if fig is None else save_figure(fig, Path(path))


def write_mlac_report(results_file: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and ``harmful_vs_n.png`` for an MLAC text ``results.json``.

    Args:
        results_file: the ``results.json``.
        out_dir: where to write; default: the folder of ``results.json`` (created if missing).

    Returns:
        The path of ``report.md``.

    Raises:
        ReportError: the file is not a readable MLAC text record.

    """
    results_file = Path(results_file)
    results = load_mlac_text(results_file)
    out = Path(out_dir) if out_dir is not None else results_file.parent
    plots = {"harmful": (FIGURE, plot_harmful_vs_n)}
    return write_figures_and_report(results, out, plots, render_mlac, results_file)


__all__ = [
    "FIGURE",
    "KIND",
    "harmful_figure",
    "is_mlac_text",
    "load_mlac_text",
    "plot_harmful_vs_n",
    "render_mlac",
    "role_name",
    "write_mlac_report",
]
