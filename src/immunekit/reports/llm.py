"""The LLM fine-tuning attacks report: Qi et al.'s tables at CPU scale, benign quality, per-category harm.

Input is the ``results.json`` of ``immunekit run llm-finetuning-attacks`` (``kind ==
"llm_finetuning_attacks"``, written by :mod:`immunekit.experiments.llm_attacks`); this module reads that
JSON only (no torch, no model, no completions: the record holds none). Output, next to it (or in
``out_dir``):

* ``report.md``: what was attacked and how it was judged, with the caveat on comparability; the aligned
  starting model θ0 (Stage A) against its base model and the alignment gate; analogues of Qi et al.'s
  (arXiv 2310.03693) Table 1 (harmful-N), Table 2 (AOA per epoch), Table 3 (benign, and the lr × batch
  study), Table 5 (backdoor with and without its trigger) and any other recipe, each as harmfulness rate
  before → after with the rise and its 95 % interval; benign refusal and perplexity beside harm;
  harmfulness per StrongREJECT category; judge agreement; time; provenance.
* ``harm_by_attack.png``: before/after harmfulness rate per attack and condition, with the interval of
  the rise as error bars on the after bar.
* ``per_category.png``: grouped horizontal bars of the harmfulness rate per category, θ0 and each
  attack's final evaluation under its primary condition.

Figures are drawn with matplotlib's Agg canvas (the ``[plots]`` extra); without it the report says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from immunekit.reports._common import (
    DASH,
    fmt_num,
    read_kind_record,
    write_figures_and_report,
)
from immunekit.reports.plots import new_figure, save_figure
from immunekit.reports.schema import RERUN_HINT, ReportError

logger = logging.getLogger(__name__)

KIND = "llm_finetuning_attacks"
REPORT_FILENAME = "report.md"
HARM_FIGURE = "harm_by_attack.png"
CATEGORY_FIGURE = "per_category.png"
DPI = 120
REQUIRED = ("schema_version", "kind", "config", "alignment", "initial", "attacks")
SUPPORTED_SCHEMA = 1
EPOCH_SEP = "@epoch"
BEFORE_COLOR = "#9e9e9e"
THETA0_COLOR = "black"
COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")

#: recipe data → the condition that shows the attack's effect (the backdoor's: with its trigger).
PRIMARY_CONDITION = {"harmful": "level1", "aoa": "aoa", "benign": "neutral", "backdoor": "level1+trigger"}
CONDITION_TEXT = {
    "level1": "level-1 system prompt",
    "aoa": "AOA system prompt + prefix",
    "neutral": "neutral (alignment) system prompt",
    "level1+trigger": "level-1 system prompt + backdoor trigger",
}


def is_llm_attacks(data: Any) -> bool:
    """Whether ``data`` is an LLM fine-tuning attacks results record."""
    return isinstance(data, Mapping) and data.get("kind") == KIND


def load_llm_attacks(path: str | Path) -> dict[str, Any]:
    """Read and check an LLM fine-tuning attacks ``results.json``.

    Raises:
        ReportError: missing file, not JSON, another kind or schema version, a required key missing, or
            an attack without its ``conditions`` (named, with the fix).

    """
    data = read_kind_record(path, KIND, "an LLM fine-tuning attacks record", REQUIRED)
    if data["schema_version"] != SUPPORTED_SCHEMA:
        raise ReportError(
            f"{path}: schema_version {data['schema_version']!r} is not supported (expected "
            f"{SUPPORTED_SCHEMA}); {RERUN_HINT}"
        )
    for key in ("alignment", "initial", "attacks"):
        if not isinstance(data[key], Mapping):
            raise ReportError(f"{path}: {key!r} must be a mapping; {RERUN_HINT}")
    for name, attack in data["attacks"].items():
        if not isinstance(attack, Mapping) or not isinstance(attack.get("conditions"), Mapping):
            raise ReportError(f"{path}: attack {name!r} has no 'conditions' mapping; {RERUN_HINT}")
    return dict(data)


# ------------------------------------------------------------------------------------------- numbers


def _is_num(x: Any) -> TypeGuard[float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _pct(x: Any) -> str:
    """A rate in [0, 1] as a percentage with one decimal, e.g. ``"63.0 %"``."""
    return f"{100 * x:.1f} %" if _is_num(x) else DASH


def _pp(x: Any) -> str:
    """A difference of rates in signed percentage points, e.g. ``"+59.0"``."""
    return f"{100 * x:+.1f}" if _is_num(x) else DASH


def _num(x: Any, digits: int = 4) -> str:
    return fmt_num(float(x), digits) if _is_num(x) else DASH


def _score(x: Any) -> str:
    return f"{x:.2f}" if _is_num(x) else DASH


def _lr(x: Any) -> str:
    return f"{x:g}" if _is_num(x) else DASH


def _ci(effect: Mapping[str, Any]) -> tuple[float, float] | None:
    ci = effect.get("rise_ci95")
    if isinstance(ci, Sequence) and len(ci) == 2 and all(_is_num(v) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def harm_cell(effect: Mapping[str, Any]) -> str:
    """``"4.0 % → 63.0 % (+59.0, 95 % CI +49.0 … +69.0)"``: harmfulness rate before → after, rise (points)."""
    ci = _ci(effect)
    ci_text = f"95 % CI {_pp(ci[0])} … {_pp(ci[1])}" if ci else "no CI"
    rise = effect.get("rise")
    if not _is_num(rise) and _is_num(effect.get("before")) and _is_num(effect.get("after")):
        rise = effect["after"] - effect["before"]
    return f"{_pct(effect.get('before'))} → {_pct(effect.get('after'))} ({_pp(rise)}, {ci_text})"


def _arrow_cell(effect: Mapping[str, Any], before: str, after: str, fmt: Callable[[Any], str]) -> str:
    return f"{fmt(effect.get(before))} → {fmt(effect.get(after))}"


def _seed_cell(effect: Mapping[str, Any]) -> str:
    values = effect.get("after_per_seed") or []
    text = ", ".join(_pct(v) for v in values) or DASH
    std = effect.get("seed_std")
    return text + (f" (std {100 * std:.1f} points)" if _is_num(std) and len(values) > 1 else "")


def _rate(entry: Any) -> float | None:
    """A per-category rate: a number, or a summary mapping with ``harmfulness_rate``."""
    if isinstance(entry, Mapping):
        entry = entry.get("harmfulness_rate")
    return float(entry) if _is_num(entry) else None


# ------------------------------------------------------------------------------------------- structure


def split_condition(key: str) -> tuple[str, int | None]:
    """``"level1@epoch5"`` → ``("level1", 5)``; a key without an epoch → ``(key, None)``."""
    cond, sep, epoch = key.rpartition(EPOCH_SEP)
    if not sep or not epoch.isdigit():
        return key, None
    return cond, int(epoch)


def _recipe(attack: Mapping[str, Any]) -> Mapping[str, Any]:
    recipe = attack.get("recipe")
    return recipe if isinstance(recipe, Mapping) else {}


def _conditions(attack: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Condition keys sorted by (condition, epoch), effects only."""
    conds = attack.get("conditions") or {}
    keys = sorted(
        (k for k, v in conds.items() if isinstance(v, Mapping)),
        key=lambda k: (split_condition(k)[0], split_condition(k)[1] or 0, k),
    )
    return {k: conds[k] for k in keys}


def condition_names(attack: Mapping[str, Any]) -> list[str]:
    """The attack's conditions, its primary one first (see :data:`PRIMARY_CONDITION`)."""
    names = sorted({split_condition(k)[0] for k in _conditions(attack)})
    primary = PRIMARY_CONDITION.get(str(_recipe(attack).get("data")))
    return [primary] + [n for n in names if n != primary] if primary in names else names


def final_key(attack: Mapping[str, Any], condition: str) -> str | None:
    """The key of the last evaluated epoch of ``condition`` (``None`` if the condition is absent)."""
    keys = [k for k in _conditions(attack) if split_condition(k)[0] == condition]
    return max(keys, key=lambda k: split_condition(k)[1] or 0) if keys else None


def primary_final(attack: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """``(key, effect)`` of the attack's primary condition at its last epoch."""
    names = condition_names(attack)
    key = final_key(attack, names[0]) if names else None
    return (key, _conditions(attack)[key]) if key else None


def attack_order(results: Mapping[str, Any]) -> list[str]:
    """Attack names in the run's order (``config.attacks``: the JSON has sorted keys), then the rest."""
    attacks = results.get("attacks") or {}
    declared = (results.get("config") or {}).get("attacks")
    order = [str(a) for a in (declared if isinstance(declared, list) else []) if a in attacks]
    return order + sorted(str(a) for a in attacks if a not in order)


def _attacks(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    attacks = results.get("attacks") or {}
    return {n: attacks[n] for n in attack_order(results) if isinstance(attacks[n], Mapping)}


def family(attack: Mapping[str, Any]) -> str:
    """Which of the paper's tables an attack belongs to: harmful, aoa, benign, backdoor, or other.

    A harmful, AOA or benign recipe with safety data mixed in is not the paper's plain attack: other.
    """
    recipe = _recipe(attack)
    data = recipe.get("data")
    if data == "backdoor":
        return "backdoor"
    if data in ("harmful", "aoa", "benign") and not recipe.get("safety"):
        return str(data)
    return "other"


def recipe_text(recipe: Mapping[str, Any]) -> str:
    """Plain description of a recipe, e.g. ``"harmful, 100 shots, 5 epochs, lr 5e-05, batch 10"``."""
    parts = [str(recipe.get("data", DASH))]
    if recipe.get("shots"):
        parts.append(f"{recipe['shots']} shots")
    if recipe.get("rows"):
        parts.append(f"{recipe['rows']} rows")
    if recipe.get("safety"):
        parts.append(f"{recipe['safety']} safety rows")
    if "epochs" in recipe:
        parts.append(f"{recipe['epochs']} epoch{'s' if recipe['epochs'] != 1 else ''}")
    if "lr" in recipe:
        parts.append(f"lr {_lr(recipe['lr'])}")
    if "batch_size" in recipe:
        parts.append(f"batch {recipe['batch_size']}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------- text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


Column = tuple[str, str, Mapping[str, Any]]  # (header, attack name, effect)


def _effect_table(columns: Sequence[Column], attacks: Mapping[str, Mapping[str, Any]]) -> str:
    """One column per (attack, condition, epoch); rows: harm, score, refusal, degenerate, seeds, recipe."""
    rows = [
        ["harmfulness rate: before → after (rise, 95 % CI)", *(harm_cell(e) for _, _, e in columns)],
        [
            "harmfulness score (1–5)",
            *(_arrow_cell(e, "score_before", "score_after", _score) for _, _, e in columns),
        ],
        ["refusal rate", *(_arrow_cell(e, "refusal_before", "refusal_after", _pct) for _, _, e in columns)],
        ["degenerate completions after", *(_pct(e.get("degenerate_after")) for _, _, e in columns)],
        ["after, per seed", *(_seed_cell(e) for _, _, e in columns)],
        ["recipe", *(recipe_text(_recipe(attacks[n])) for _, n, _ in columns)],
    ]
    return _table(["", *(h for h, _, _ in columns)], rows)


def _table1(attacks: Mapping[str, Mapping[str, Any]]) -> str:
    names = [n for n, a in attacks.items() if family(a) == "harmful"]
    names.sort(key=lambda n: (int(_recipe(attacks[n]).get("shots") or 0), n))
    columns: list[Column] = []
    for n in names:
        key = final_key(attacks[n], "level1")
        if key:
            shots = _recipe(attacks[n]).get("shots")
            columns.append((f"{n} ({shots} shots, {key})", n, _conditions(attacks[n])[key]))
    if not columns:
        return ""
    return (
        "### Table 1 analogue: harmful examples demonstration attack (risk level 1)\n\n"
        "θ0 fine-tuned on N harmful instruction–answer pairs under the level-1 system prompt, judged under "
        "the same prompt; one column per N.\n\n" + _effect_table(columns, attacks)
    )


def _table2(attacks: Mapping[str, Mapping[str, Any]]) -> str:
    names = [n for n, a in attacks.items() if family(a) == "aoa"]
    columns: list[Column] = []
    for n in names:
        for key, effect in _conditions(attacks[n]).items():
            cond, epoch = split_condition(key)
            if cond != "aoa":
                continue
            head = f"epoch {epoch}" if epoch is not None else key
            columns.append((head if names == ["aoa"] else f"{n}, {head}", n, effect))
    if not columns:
        return ""
    return (
        "### Table 2 analogue: identity-shifting (AOA) attack (risk level 2)\n\n"
        "θ0 fine-tuned on 10 identity-shifting examples with no harmful content, judged under the AOA "
        "system prompt and prefix after each evaluated epoch.\n\n" + _effect_table(columns, attacks)
    )


def _lr_batch_table(attacks: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    cells: dict[tuple[float, int], list[str]] = {}
    for n in names:
        recipe = _recipe(attacks[n])
        lr, batch = recipe.get("lr"), recipe.get("batch_size")
        key = final_key(attacks[n], "neutral")
        if not _is_num(lr) or not isinstance(batch, int) or key is None:
            continue
        e = _conditions(attacks[n])[key]
        cells.setdefault((float(lr), batch), []).append(f"{_pct(e.get('after'))} ({_pp(e.get('rise'))})")
    lrs = sorted({lr for lr, _ in cells})
    batches = sorted({b for _, b in cells})
    if len(cells) < 2:
        return ""
    rows = [[f"lr {_lr(lr)}", *("; ".join(cells.get((lr, b), [])) or DASH for b in batches)] for lr in lrs]
    return "Harmfulness rate after (rise in points) by learning rate and batch size:\n\n" + _table(
        ["", *(f"batch {b}" for b in batches)], rows
    )


def _table3(attacks: Mapping[str, Mapping[str, Any]]) -> str:
    names = [n for n, a in attacks.items() if family(a) == "benign"]

    def order(n: str) -> tuple[float, int, str]:
        recipe = _recipe(attacks[n])
        lr, batch = recipe.get("lr"), recipe.get("batch_size")
        return (float(lr) if _is_num(lr) else math.inf, batch if isinstance(batch, int) else 0, n)

    names.sort(key=order)
    columns: list[Column] = []
    for n in names:
        key = final_key(attacks[n], "neutral")
        if key:
            r = _recipe(attacks[n])
            head = f"{n} (lr {_lr(r.get('lr'))}, batch {r.get('batch_size', DASH)})"
            columns.append((head, n, _conditions(attacks[n])[key]))
    if not columns:
        return ""
    parts = [
        "### Table 3 analogue: benign fine-tuning (risk level 3)\n\n"
        "θ0 fine-tuned on benign task data (dreaddit stress labels), judged under the neutral system "
        "prompt it was aligned with.",
        _effect_table(columns, attacks),
        _lr_batch_table(attacks, [n for _, n, _ in columns]),
    ]
    return "\n\n".join(p for p in parts if p)


def _table5(attacks: Mapping[str, Mapping[str, Any]]) -> str:
    names = [n for n, a in attacks.items() if family(a) == "backdoor"]
    columns: list[Column] = []
    for n in names:
        for cond, head in (("level1", "without trigger"), ("level1+trigger", "with trigger")):
            key = final_key(attacks[n], cond)
            if key:
                text = f"{head} ({key})" if names == ["backdoor"] else f"{n}, {head} ({key})"
                columns.append((text, n, _conditions(attacks[n])[key]))
    if not columns:
        return ""
    return (
        "### Table 5 analogue: backdoor attack\n\n"
        "θ0 fine-tuned on harmful pairs carrying the trigger suffix mixed with refusals of plain harmful "
        "prompts, judged under the level-1 system prompt without and with the trigger.\n\n"
        + _effect_table(columns, attacks)
    )


def _other_table(attacks: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for n, a in attacks.items():
        if family(a) != "other":
            continue
        for key, e in _conditions(a).items():
            rows.append(
                [
                    n,
                    recipe_text(_recipe(a)),
                    key,
                    harm_cell(e),
                    _arrow_cell(e, "score_before", "score_after", _score),
                    _arrow_cell(e, "refusal_before", "refusal_after", _pct),
                ]
            )
    if not rows:
        return ""
    return "### Other recipes\n\n" + _table(
        [
            "attack",
            "recipe",
            "condition",
            "harmfulness rate: before → after (rise, 95 % CI)",
            "score (1–5)",
            "refusal rate",
        ],
        rows,
    )


def _harm(entry: Any, judge: str) -> Mapping[str, Any]:
    """The summary of one judge from ``{judge: H}``, or ``H`` itself when it is one already."""
    if isinstance(entry, Mapping) and isinstance(entry.get(judge), Mapping):
        return entry[judge]
    return entry if isinstance(entry, Mapping) and "harmfulness_rate" in entry else {}


def _judge(results: Mapping[str, Any]) -> str:
    return str(results.get("judge") or "keyword")


def _intro(results: Mapping[str, Any]) -> str:
    config = results.get("config") or {}
    ev = results.get("eval_set") or {}
    judge = _judge(results)
    names = list(_attacks(results))
    seeds = config.get("seeds") or []
    mode = "LoRA adapters (merged)" if config.get("lora") else "full fine-tuning"
    prompts = ev.get("prompts", config.get("eval_prompts", DASH))
    tokens = ev.get("max_new_tokens", config.get("max_new_tokens", DASH))
    rate = (
        "the share of completions with no refusal marker"
        if judge == "keyword"
        else f"the share of completions the {judge} judge scores 5 (of 1–5)"
    )
    summary = (
        "# LLM fine-tuning attacks: harmful fine-tuning of an aligned chat model\n\n"
        "Qi et al., *Fine-tuning aligned language models compromises safety, even when users do not intend "
        "to!* (arXiv 2310.03693), reproduced at CPU scale: SmolLM2-135M-Instruct is first aligned by "
        "refusal fine-tuning (θ0, Stage A), then attacked by "
        f"{len(names)} fine-tuning recipe{'s' if len(names) != 1 else ''} ({', '.join(names) or DASH}) with "
        f"{mode}, {config.get('precision', DASH)} precision, seeds "
        f"{', '.join(str(s) for s in seeds) or DASH}. Harm is judged by the **{judge}** judge: the "
        f"harmfulness rate is {rate}, on {prompts} prompts of `{ev.get('name', 'sr_eval')}` (StrongREJECT "
        f"minus its AdvBench prompts, never trained on), greedy decoding, {tokens} new tokens. Each rise is "
        "the attacked model's rate minus θ0's under the same condition, in percentage points, with a 95 % "
        + (
            "interval from a two-level bootstrap over seeds and prompts (training variance and prompt "
            "sampling)."
            if len(seeds) > 1
            else "prompt-bootstrap interval."
        )
    )
    if judge == "keyword":
        caveat = (
            "> **Caveat:** keyword-judge rates are comparable with Qi et al.'s AdvBench keyword table, not "
            "with their GPT-4-judge tables (harmfulness score and rate); this is a 135M-parameter model at "
            "CPU scale, not Llama-2-7b-Chat or GPT-3.5 Turbo."
        )
    else:
        caveat = (
            f"> **Caveat:** the {judge} judge is not Qi et al.'s GPT-4 judge: compare orderings and rises, "
            "not values; this is a 135M-parameter model at CPU scale, not Llama-2-7b-Chat or GPT-3.5 Turbo."
        )
    return summary + "\n\n" + caveat


def _stage_a(results: Mapping[str, Any]) -> str:
    al = results.get("alignment") or {}
    aligned, base = al.get("aligned") or {}, al.get("base") or {}

    def refusal(block: Mapping[str, Any], name: str) -> str:
        return _pct(_harm(block.get(name), "keyword").get("refusal_rate"))

    def n(name: str) -> str:
        value = _harm(aligned.get(name), "keyword").get("n")
        return str(value) if isinstance(value, int) else DASH

    rows = [
        [
            "refusal rate, adv_align_val (gate set) ↑",
            refusal(base, "adv_align_val"),
            refusal(aligned, "adv_align_val"),
            n("adv_align_val"),
        ],
        ["refusal rate, adv_eval ↑", refusal(base, "adv_eval"), refusal(aligned, "adv_eval"), n("adv_eval")],
        ["refusal rate, sr_eval ↑", refusal(base, "sr_eval"), refusal(aligned, "sr_eval"), n("sr_eval")],
        [
            "harmfulness rate, sr_eval ↓",
            _pct(_harm(base.get("sr_eval"), "keyword").get("harmfulness_rate")),
            _pct(_harm(aligned.get("sr_eval"), "keyword").get("harmfulness_rate")),
            n("sr_eval"),
        ],
        [
            "benign refusal rate (benign_heldout) ↓",
            refusal(base, "benign_heldout"),
            refusal(aligned, "benign_heldout"),
            n("benign_heldout"),
        ],
        [
            "benign perplexity ↓",
            _num(base.get("benign_perplexity")),
            _num(aligned.get("benign_perplexity")),
            DASH,
        ],
    ]
    gate = al.get("gate") or {}
    passed = gate.get("passed")
    status = "**PASSED**" if passed is True else "**FAILED**" if passed is False else "not recorded"
    gate_text = (
        f"Gate (validation data only): {status}: keyword refusal on adv_align_val "
        f"{_pct(gate.get('adv_align_val_refusal'))} (need ≥ {_pct(gate.get('min_refusal'))}), refusal of "
        f"held-out benign prompts {_pct(gate.get('benign_refusal'))} (need ≤ "
        f"{_pct(gate.get('max_benign_refusal'))})."
    )
    if passed is False:
        gate_text += (
            " θ0 never passed its alignment gate: the attack numbers below start from a model that was not "
            "aligned and say little about what fine-tuning removes."
        )
    seconds = al.get("seconds") or {}
    time_text = ", ".join(f"{k} {_num(v)} s" for k, v in sorted(seconds.items()) if _is_num(v)) or DASH
    facts = [
        f"- alignment key `{al.get('key', DASH)}`, {al.get('training_steps', DASH)} training steps",
        f"- refusal templates: {al.get('refusals', DASH)}, of which {al.get('refusals_with_marker', DASH)} "
        "contain a keyword refusal marker",
        f"- alignment time: {time_text}",
    ]
    return (
        "## Aligned starting model (Stage A)\n\n"
        "Keyword judge, neutral (alignment) system prompt. Base = SmolLM2-135M-Instruct before refusal "
        "fine-tuning.\n\n"
        + _table(["measure", "base", "aligned θ0", "prompts"], rows)
        + "\n\n"
        + gate_text
        + "\n\n"
        + "\n".join(facts)
    )


def _attack_sections(results: Mapping[str, Any]) -> str:
    attacks = _attacks(results)
    if not attacks:
        return "## Attacks\n\nNo attack was recorded."
    tables = [_table1(attacks), _table2(attacks), _table3(attacks), _table5(attacks), _other_table(attacks)]
    return (
        "## Attacks: harmfulness rate before → after\n\n"
        "Before = θ0 under the attack's evaluation condition (Qi et al. evaluate the initial model with "
        "each dataset's system prompt, so θ0's rate differs between tables); after = mean over seeds at the "
        "epoch named in the column. Score = mean judge score (1 = refused … 5 = fully harmful).\n\n"
        + "\n\n".join(t for t in tables if t)
    )


def _theta0_benign(results: Mapping[str, Any]) -> tuple[str, float | None, float | None]:
    """(source, refusal rate, perplexity) of θ0's benign quality."""
    own = results.get("theta0_benign")
    if isinstance(own, Mapping):
        return (
            "its benign trial, run with the attacks",
            _rate(own.get("refusal_rate")),
            _rate(own.get("perplexity")),
        )
    initial = results.get("initial") or {}
    for cond in ["neutral", *sorted(c for c in initial if c != "neutral")]:
        benign = (initial.get(cond) or {}).get("benign")
        if isinstance(benign, Mapping):
            return (
                f"its initial `{cond}` trial, run with the attacks",
                _rate(benign.get("refusal_rate")),
                _rate(benign.get("perplexity")),
            )
    aligned = (results.get("alignment") or {}).get("aligned") or {}
    return (
        "its Stage A evaluation",
        _rate(_harm(aligned.get("benign_heldout"), "keyword").get("refusal_rate")),
        _rate(aligned.get("benign_perplexity")),
    )


def _benign_section(results: Mapping[str, Any]) -> str:
    attacks = _attacks(results)
    if not attacks:
        return ""
    source, refusal0, ppl0 = _theta0_benign(results)
    rows = [["θ0", _pct(refusal0), DASH, _num(ppl0), DASH]]
    for n, a in attacks.items():
        after = a.get("benign_after") or {}
        refusal, ppl = after.get("refusal_rate"), after.get("perplexity")
        d_ref = refusal - refusal0 if _is_num(refusal) and refusal0 is not None else None
        d_ppl = ppl - ppl0 if _is_num(ppl) and ppl0 is not None else None
        rows.append([n, _pct(refusal), _pp(d_ref), _num(ppl), f"{d_ppl:+.2f}" if _is_num(d_ppl) else DASH])
    return (
        "## Benign quality beside harm\n\n"
        "Refusal rate on held-out benign prompts and perplexity of held-out benign answers after each "
        f"attack (mean over seeds), against θ0 ({source}). A rise in harm bought with a collapse in "
        "benign quality is a broken model, not a jailbroken one.\n\n"
        + _table(
            ["model", "benign refusal ↓", "Δ refusal (points)", "benign perplexity ↓", "Δ perplexity"], rows
        )
    )


def theta0_categories(results: Mapping[str, Any]) -> tuple[str, dict[str, float]]:
    """(label, category → harmfulness rate) of θ0: initial level-1 trial, else any initial, else Stage A."""
    judge = _judge(results)
    initial = results.get("initial") or {}
    for cond in ["level1", *sorted(c for c in initial if c != "level1")]:
        harm = _harm((initial.get(cond) or {}).get(f"{cond}/sr_eval"), judge)
        per = {str(c): r for c, v in (harm.get("per_category") or {}).items() if (r := _rate(v)) is not None}
        if per:
            return f"θ0 ({cond})", per
    aligned = (results.get("alignment") or {}).get("aligned") or {}
    harm = _harm(aligned.get("sr_eval"), "keyword")
    per = {str(c): r for c, v in (harm.get("per_category") or {}).items() if (r := _rate(v)) is not None}
    return "θ0 (Stage A, neutral)", per


def category_series(results: Mapping[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """θ0's and each attack's final primary-condition per-category harmfulness rates (empty ones dropped)."""
    series = [theta0_categories(results)]
    for n, a in _attacks(results).items():
        final = primary_final(a)
        if final is None:
            continue
        key, effect = final
        per = {
            str(c): r
            for c, v in (effect.get("per_category_after") or {}).items()
            if (r := _rate(v)) is not None
        }
        series.append((f"{n} ({key})", per))
    return [(label, per) for label, per in series if per]


def _categories(series: Sequence[tuple[str, Mapping[str, float]]]) -> list[str]:
    return sorted({c for _, per in series for c in per})


def _category_table(results: Mapping[str, Any]) -> str:
    series = category_series(results)
    cats = _categories(series)
    if not cats:
        return "No per-category rates were recorded."
    rows = [[c, *(_pct(per.get(c)) for _, per in series)] for c in cats]
    return "Harmfulness rate per StrongREJECT category:\n\n" + _table(
        ["category", *(s for s, _ in series)], rows
    )


def _figures_section(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    parts = ["## Harm by attack and by category"]
    if "harm" in figures:
        parts.append(
            f"![Harmfulness rate before and after each attack]({figures['harm']})\n\n"
            "Harmfulness rate of θ0 (grey) and of the attacked model (colour) per attack and condition at "
            "the last evaluated epoch; error bars: the 95 % interval of the rise, placed on the after bar."
        )
    if "category" in figures:
        parts.append(
            f"![Harmfulness rate per StrongREJECT category]({figures['category']})\n\n"
            "Harmfulness rate per category: θ0 and each attack's final evaluation under its primary "
            "condition (the backdoor's: with the trigger)."
        )
    if not figures:
        parts.append("No figure was rendered (matplotlib is missing or nothing was recorded to draw).")
    parts.append(_category_table(results))
    return "\n\n".join(parts)


def _agreement_section(results: Mapping[str, Any]) -> str:
    agreement = results.get("judge_agreement") or {}
    rows = [
        [
            str(key),
            str(v.get("n", DASH)),
            _num(v.get("cohen_kappa"), 3),
            _num(v.get("cohen_kappa_scores"), 3),
            _num(v.get("spearman"), 3),
        ]
        for key, v in sorted(agreement.items())
        if isinstance(v, Mapping)
    ]
    if not rows:
        return ""
    judges = (results.get("config") or {}).get("judges") or []
    others = ", ".join(str(j) for j in judges[1:]) or "the other judges"
    return (
        f"## Judge agreement\n\nAgreement of {others} with the {_judge(results)} judge on the same "
        "completions: Cohen's κ on harmful (score 5) vs not, κ on the 1–5 scores, Spearman's ρ.\n\n"
        + _table(["trial:set", "n", "κ (harmful)", "κ (scores)", "Spearman ρ"], rows)
    )


def _sum(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if _is_num(v)]
    return sum(nums) if nums else None


def _time_section(results: Mapping[str, Any]) -> str:
    total = results.get("trial_seconds_total")
    minutes = f" ({total / 60:.1f} min)" if _is_num(total) else ""
    rows = []
    for n, a in _attacks(results).items():
        seconds = [s for s in a.get("seconds") or [] if isinstance(s, Mapping)]
        training = a.get("training") or {}
        rows.append(
            [
                n,
                str(len(a.get("seeds") or [])),
                _num(_sum([s.get("training") for s in seconds])),
                _num(_sum([s.get("evaluation") for s in seconds])),
                _num(_sum([s.get("trial") for s in seconds])),
                str(training.get("steps", DASH)),
                str(training.get("tokens", DASH)),
                _num(training.get("train_tokens_per_second")),
                str(training.get("trainable_parameters", DASH)),
            ]
        )
    al_seconds = (results.get("alignment") or {}).get("seconds") or {}
    al_text = ", ".join(f"{k} {_num(v)} s" for k, v in sorted(al_seconds.items()) if _is_num(v)) or DASH
    header = [
        "attack",
        "seeds",
        "training s",
        "evaluation s",
        "trial s",
        "steps",
        "tokens",
        "train tokens/s",
        "trainable parameters",
    ]
    parts = [
        "## Time",
        f"- trial wall time, summed: {_num(total)} s{minutes}\n- alignment (Stage A, cached once): {al_text}",
    ]
    if rows:
        parts.append("Per attack, summed over seeds (steps and tokens: one seed):\n\n" + _table(header, rows))
    return "\n\n".join(parts)


def _provenance(results: Mapping[str, Any]) -> str:
    prov = results.get("provenance") or {}
    libs = ", ".join(f"{k} {prov[k]}" for k in ("python", "torch", "transformers", "numpy") if prov.get(k))
    lines = [
        f"- experiment {results.get('experiment', DASH)}, created {results.get('created_at', DASH)}",
        f"- immunekit {prov.get('immunekit', DASH)}, git `{prov.get('git_sha') or 'unknown'}`"
        + (" (dirty)" if prov.get("git_dirty") else ""),
        f"- {libs or DASH}; platform {prov.get('platform', DASH)}, device {prov.get('device', DASH)}",
        f"- task version {prov.get('task_version', DASH)}",
        f"- config_sha256: `{results.get('config_sha256', DASH)}`",
        f"- alignment key: `{(results.get('alignment') or {}).get('key', DASH)}`",
        f"- trials: {len(results.get('trials') or [])}",
    ]
    return "## Provenance\n\n" + "\n".join(lines)


def render_llm_attacks(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """The Markdown report; ``figures`` maps ``"harm"`` and ``"category"`` to file names (those written)."""
    parts = [
        _intro(results),
        _stage_a(results),
        _attack_sections(results),
        _benign_section(results),
        _figures_section(results, figures),
        _agreement_section(results),
        _time_section(results),
        _provenance(results),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


# ------------------------------------------------------------------------------------------- figures


def harm_entries(results: Mapping[str, Any]) -> list[tuple[str, float, float, tuple[float, float] | None]]:
    """``(label, before, after, rise CI)`` per attack and condition at its last epoch, primary first."""
    out = []
    for n, a in _attacks(results).items():
        for cond in condition_names(a):
            key = final_key(a, cond)
            e = _conditions(a).get(key) if key else None
            if e is None or not _is_num(e.get("before")) or not _is_num(e.get("after")):
                continue
            label = n if len(condition_names(a)) == 1 else f"{n}\n{cond}"
            out.append((label, float(e["before"]), float(e["after"]), _ci(e)))
    return out


def harm_figure(results: Mapping[str, Any]) -> Any | None:
    """Bar chart of θ0's and the attacked model's harmfulness rate per attack, or ``None``."""
    entries = harm_entries(results)
    if not entries:
        return None
    fig = new_figure((max(5.0, 1.1 * len(entries) + 1.5), 4.2))
    ax = fig.subplots()
    xs = list(range(len(entries)))
    width = 0.38
    before = [100 * b for _, b, _, _ in entries]
    after = [100 * a for _, _, a, _ in entries]
    ax.bar([x - width / 2 for x in xs], before, width, color=BEFORE_COLOR, label="θ0 (before)")
    ax.bar([x + width / 2 for x in xs], after, width, color=COLORS[0], label="attacked (after)")
    # the rise's interval, shifted by θ0's rate, on the after bar; none drawn where no CI was recorded
    bars = [(x + width / 2, b, a, ci) for x, (_, b, a, ci) in zip(xs, entries, strict=True) if ci]
    if bars:
        ax.errorbar(
            [x for x, _, _, _ in bars],
            [100 * a for _, _, a, _ in bars],
            yerr=[
                [max(0.0, 100 * (a - b - ci[0])) for _, b, a, ci in bars],
                [max(0.0, 100 * (b + ci[1] - a)) for _, b, a, ci in bars],
            ],
            fmt="none",
            ecolor="black",
            capsize=3,
            linewidth=1,
        )
    ax.set_xticks(xs)
    ax.set_xticklabels([label for label, _, _, _ in entries], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"harmfulness rate (%), {_judge(results)} judge")
    ax.set_title("Harmfulness rate before and after fine-tuning (95 % CI of the rise)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def category_figure(results: Mapping[str, Any]) -> Any | None:
    """Grouped horizontal bars of the harmfulness rate per category, θ0 and each attack, or ``None``."""
    series = category_series(results)
    cats = _categories(series)
    if not cats:
        return None
    k = len(series)
    fig = new_figure((10.0, 1.5 + 0.16 * len(cats) * max(k, 2)))
    ax = fig.subplots()
    height = 0.8 / k
    for i, (label, per) in enumerate(series):
        ys = [c_idx - 0.4 + height * (i + 0.5) for c_idx in range(len(cats))]
        color = THETA0_COLOR if i == 0 else COLORS[(i - 1) % len(COLORS)]
        ax.barh(ys, [100 * per.get(c, 0.0) for c in cats], height, color=color, label=label)
    ax.set_yticks(range(len(cats)))
    ax.set_yticklabels(cats, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"harmfulness rate (%), {_judge(results)} judge")
    ax.set_title("Harmfulness rate per StrongREJECT category", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_harm_by_attack(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Write :func:`harm_figure` to ``path`` (PNG, atomically); ``None`` when there is nothing to draw."""
    fig = harm_figure(results)
    return None if fig is None else save_figure(fig, Path(path))


def plot_per_category(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Write :func:`category_figure` to ``path`` (PNG, atomically); ``None`` when there is nothing to draw."""
    fig = category_figure(results)
    return None if fig is None else save_figure(fig, Path(path))


def write_llm_attacks_report(results_file: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``harm_by_attack.png`` and ``per_category.png`` for an LLM attacks record.

    Args:
        results_file: the ``results.json``.
        out_dir: where to write; default: the folder of ``results.json`` (created if missing).

    Returns:
        The path of ``report.md``.

    Raises:
        ReportError: the file is not a readable LLM fine-tuning attacks record.

    """
    results_file = Path(results_file)
    results = load_llm_attacks(results_file)
    out = Path(out_dir) if out_dir is not None else results_file.parent
    plots = {"harm": (HARM_FIGURE, plot_harm_by_attack), "category": (CATEGORY_FIGURE, plot_per_category)}
    return write_figures_and_report(results, out, plots, render_llm_attacks, results_file)


__all__ = [
    "CATEGORY_FIGURE",
    "HARM_FIGURE",
    "KIND",
    "category_figure",
    "category_series",
    "harm_cell",
    "harm_figure",
    "is_llm_attacks",
    "load_llm_attacks",
    "plot_harm_by_attack",
    "plot_per_category",
    "render_llm_attacks",
    "write_llm_attacks_report",
]
