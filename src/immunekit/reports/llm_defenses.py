"""The report of ``immunekit run llm-defenses``: one table defenses × conditions, curves, calibration.

Reads ``results.json`` only (layout: :mod:`immunekit.experiments.llm_defenses`) and writes
``report.md`` and ``harm_curves.png``: for every defense, the harm of the immunized model (solid)
and of θ0 (dashed) against attack steps under each 100-shot setting of the grid, so harm is never
read without the step axis. Each card's own report (with its stability and trainability plots)
is linked from the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from immunekit.reports._common import DASH, read_kind_record, write_figures_and_report
from immunekit.reports.plots import new_figure, save_figure

KIND = "llm_defenses"
CURVES_FIGURE = "harm_curves.png"
SEARCH_FIGURE = "search_cumulative_best.png"
REQUIRED = ("defenses", "mitigation", "calibration", "answer", "config")
CONDITIONS = (
    ("resistance_strong", "strong res."),
    ("resistance_weak", "weak res."),
    ("stability", "stability"),
    ("generalization_in_domain", "gen. in"),
    ("generalization_cross_domain", "gen. cross"),
    ("trainability", "trainability"),
)


def load_llm_defenses(path: str | Path) -> dict[str, Any]:
    """Read and check an ``llm_defenses`` ``results.json`` (ReportError naming what is wrong)."""
    return read_kind_record(path, KIND, "an llm-defenses record", REQUIRED)


def _pct(x: Any) -> str:
    return DASH if x is None else f"{100 * x:.0f} %"


def _interval(v: Mapping[str, Any], *, pct: bool = True, signed: bool = False) -> str:
    def f(x: float) -> str:
        if not pct:
            return f"{x:.3g}"
        return f"{100 * x:+.0f}" if signed else f"{100 * x:.0f}"

    text = f(v["mean"]) + (" pts" if signed else (" %" if pct else ""))
    if v.get("ci95"):
        lo, hi = v["ci95"]
        text += f" [{f(lo)}, {f(hi)}]"
    return text


def render(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """The Markdown report."""
    cfg = results["config"]
    lines = [
        "# LM defenses judged by the four conditions",
        "",
        f"θ0: the aligned SmolLM2-135M (key `{results.get('aligned', {}).get('key')}`). Attack grid: "
        + ", ".join(f"`{a}`" for a in cfg["attacks"])
        + f"; T = {cfg['steps']} steps of {cfg['batch_size']}, harm judged every {cfg['eval_every']} "
        f"steps on {cfg['eval_prompts']} sr_eval prompts ({cfg['max_new_tokens']} new tokens, keyword "
        f"judge). Seeds: {cfg['seeds']}.",
        "",
        f"**Answer.** {results['answer']['text'][:1].upper()}{results['answer']['text'][1:]}.",
        "",
        "Worst-case harm: the largest final harm over the grid's 100-shot settings (each model meets its own "
        "worst attacker); gap = θ0's worst case − the defended model's (points; 95 % interval over seeds "
        "when there are ≥ 2). Conditions: one letter per seed (P pass, F fail, ? inconclusive, - not run).",
        "",
        "| defense | " + " | ".join(label for _, label in CONDITIONS) + " | worst harm | θ0 worst | gap | "
        "perplexity (θ0) | benign refusal (θ0) | cards |",
        "|---" * (len(CONDITIONS) + 7) + "|",
    ]
    short = {"PASS": "P", "FAIL": "F", "INCONCLUSIVE": "?", "NOT-RUN": "-", "NOT-TESTED": "-"}
    for name, r in results["defenses"].items():
        marks = ["".join(short.get(s, "?") for s in r["conditions"][k]) for k, _ in CONDITIONS]
        cards = " ".join(f"[s{seed}]({path}/report.md)" for seed, path in r["cards"].items())
        lines.append(
            f"| {name} | "
            + " | ".join(marks)
            + f" | {_interval(r['worst_harm'])} | {_interval(r['worst_harm_reference'])} | "
            f"{_interval(r['gap'], signed=True)} | {_interval(r['perplexity'], pct=False)} "
            f"({_interval(r['perplexity_reference'], pct=False)}) | {_interval(r['benign_refusal'])} "
            f"({_interval(r['benign_refusal_reference'])}) | {cards} |"
        )
    if figures.get("curves"):
        lines += ["", f"![harm against attack steps]({figures['curves']})"]
    if figures.get("search"):
        lines += [
            "",
            "Attacker search (Optuna; the grid first, then TPE over LoRA/full and the learning rate), "
            "scored on val_harmful:",
            "",
            f"![cumulative best of the attacker search]({figures['search']})",
        ]
    lines += ["", "## Fine-tuning-time mitigation (not a release-time defense)", ""]
    lines.append(
        "Qi et al.'s safety-data mixing (arXiv 2310.03693, Table 4): θ0 attacked by full fine-tuning on the "
        "100 pairs with N refusals mixed in. It is the fine-tuner's choice: it says nothing about a release."
    )
    lines += ["", "| N refusals | training rows | final harm |", "|---|---|---|"]
    for n, m in results["mitigation"].items():
        lines.append(f"| {n} | {m['train_rows']} | {_interval(m['final_harm'])} |")
    cal = results["calibration"]
    lines += ["", "## Calibration: published numbers of another model and scale", "", f"{cal['source']}.", ""]
    lines.append(f"Caution: {cal['caution']}.")
    lines += [
        "",
        "| defense | " + " | ".join(cal["columns"]) + " |",
        "|---" * (len(cal["columns"]) + 1) + "|",
    ]
    for name, values in cal["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", "## Defense fits", "", "| defense | seed | seconds | notes |", "|---|---|---|---|"]
    for name, r in results["defenses"].items():
        for fit in r["fit"]:
            info = fit.get("info") or {}
            kappa = info.get("kappa")
            note = (
                f"κ ratio harmful {kappa['ratio_harmful']:.3g}, primary {kappa['ratio_primary']:.3g}"
                if kappa
                else ""
            )
            lines.append(f"| {name} | {fit['seed']} | {fit['seconds']:.0f} | {note} |")
    lines += ["", f"Trial time summed over workers: {results['trial_seconds_total'] / 60:.1f} min.", ""]
    return "\n".join(lines)


RUN_WIDE = ("precision", "max_new_tokens", "micro_batch")
"""Attack overrides every setting of a run shares: left out of the plots' labels."""


def short_key(key: str) -> str:
    """A setting key without the run-wide overrides, e.g. ``lm_lora[lr=0.0003]``."""
    name, _, inner = key.partition("[")
    kept = [p for p in inner.rstrip("]").split(",") if p and p.split("=")[0] not in RUN_WIDE]
    return f"{name}[{','.join(kept)}]" if kept else name


def curves_figure(results: Mapping[str, Any]) -> Any:
    """One panel per defense: harm vs step for each 100-shot setting, defended (solid) and θ0 (dashed)."""
    names = list(results["defenses"])
    if not names:
        return None
    fig = new_figure((4.0 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        for n_seed, attacks in enumerate(results["defenses"][name]["curves"].values()):
            full = [(k, a) for k, a in attacks.items() if a.get("rows") is None]
            for i, (key, a) in enumerate(full):
                for role, style in (("immunized", "-"), ("reference", "--")):
                    pts = a["curves"][role]
                    label = short_key(key) if role == "immunized" and n_seed == 0 else None
                    ax.plot(
                        [p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", label=label, lw=1.2
                    )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("attack step")
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(results["config"].get("thresholds", {}).get("harm") or 0.5, color="grey", lw=0.6)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("harmfulness rate")
    fig.suptitle("harm against attack steps: defended (solid), θ0 (dashed)", fontsize=9)
    return fig


def search_figure(results: Mapping[str, Any]) -> Any:
    """The attacker search's best validation harm after each trial, one line per (defense, seed)."""
    lines = [
        (f"{name} s{seed}", s["cumulative_best"])
        for name, r in results["defenses"].items()
        for seed, s in (r.get("search") or {}).items()
        if s and s.get("cumulative_best")
    ]
    if not lines:
        return None
    fig = new_figure((5.0, 3.2))
    ax = fig.subplots()
    for label, best in lines:
        shown = [b if b is not None and b > float("-inf") else float("nan") for b in best]
        ax.step(range(1, len(shown) + 1), shown, where="post", label=label)
    ax.set_xlabel("search trial")
    ax.set_ylabel("best harm so far (val_harmful)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6)
    return fig


def plot_search(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Write :func:`search_figure` (PNG, atomically); ``None`` without a search."""
    fig = search_figure(results)
    return None if fig is None else save_figure(fig, Path(path))


def plot_curves(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Write :func:`curves_figure` (PNG, atomically); ``None`` when there is nothing to draw."""
    fig = curves_figure(results)
    return None if fig is None else save_figure(fig, Path(path))


def write_llm_defenses_report(results_file: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``harm_curves.png`` and (with a search) ``search_cumulative_best.png``."""
    results_file = Path(results_file)
    results = load_llm_defenses(results_file)
    out = Path(out_dir) if out_dir is not None else results_file.parent
    plots = {"curves": (CURVES_FIGURE, plot_curves), "search": (SEARCH_FIGURE, plot_search)}
    return write_figures_and_report(results, out, plots, render, results_file)
