"""``immunekit evaluate``: attack an immunized checkpoint and write the report card."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from immunekit.config import load_config, parse_set
from immunekit.errors import ConfigError

EXAMPLES = """\
examples:
  immunekit evaluate --model hp.safetensors                       # task from the checkpoint metadata
  immunekit evaluate --model m.safetensors --task gaussian_spectra --task-set dim=8 --task-set n=256
  immunekit evaluate --model m.safetensors --attacks linear_probe,closed_form_probe,full_finetune \\
      --budget steps=200 --budget optimizer=adam --budget lr=0.01 --seeds 0,1,2 --out runs/eval
  immunekit evaluate --model m.safetensors --attacks "linear_probe[optimizer=gd_exact,lr=null]"
  immunekit evaluate --model m.safetensors --search-trials 30    # add the Optuna attacker search
  immunekit evaluate --model cnn.safetensors --reference base.safetensors --threshold harm=0.7
  immunekit report runs/eval                                     # rebuild report.md/report.html

Writes DIR/results.json, DIR/report.md and a self-contained DIR/report.html (plots need the
[plots] extra). Conditions: resistance (strong/weak), stability, generalization (in-domain and
cross-domain), trainability; verdict IMMUNIZED, NOT IMMUNIZED or INCONCLUSIVE. Bad input (not an
immunekit checkpoint, unknown attack, steps <= 0, thresholds outside the score range, a search on a
task without a validation split) exits with code 2 and a one-line error.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``evaluate``."""
    from immunekit.experiments.evaluate import DEFAULT_ATTACKS, DEFAULT_BUDGET

    p = sub.add_parser(
        "evaluate",
        help="attack an immunized model under budgets and write the immunization report card",
        description=(
            "Run every attack of the grid (and optionally an attacker hyper-parameter search) on the "
            "immunized model and on a reference model over several seeds, judge the four immunization "
            "conditions of Rosati et al. (arXiv 2402.16382) and write results.json plus the report card."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", type=Path, required=True, help="immunized model: an immunekit safetensors checkpoint"
    )
    p.add_argument(
        "--task",
        help="task name (see 'immunekit ls'); default: the 'task' recorded in the checkpoint metadata. The "
        "task is built with evaluation_splits=True (validation and disjoint attack splits)",
    )
    p.add_argument(
        "--task-set",
        dest="task_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option (repeatable), e.g. --task-set dim=8; merged over the checkpoint's task_config",
    )
    default_attacks = ",".join(a if isinstance(a, str) else a[0] for a in DEFAULT_ATTACKS)
    p.add_argument(
        "--attacks",
        default=None,
        help=f"comma-separated attack grid; an entry may carry settings in brackets, "
        f"name[key=value,...] (attack config or budget keys); default: {default_attacks}",
    )
    budget_default = ", ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(DEFAULT_BUDGET).items() if v is not None and v != 0
    )
    p.add_argument(
        "--budget",
        dest="budget_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"attack budget field (repeatable), e.g. --budget steps=200; default: {budget_default}",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for confidence intervals)")
    p.add_argument(
        "--search-trials",
        type=int,
        default=None,
        metavar="N",
        help="add the attacker search with N Optuna trials (needs optuna, the [tune] extra)",
    )
    p.add_argument(
        "--search-set",
        dest="search_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="search option (repeatable), e.g. --search-set 'attacks=[linear_probe,full_finetune]'",
    )
    p.add_argument(
        "--threshold",
        dest="threshold_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="report-card tolerance (repeatable): harm (φ), slowdown (κ), stability (δ_stab), train "
        "(δ_train), train_steps (ε); e.g. --threshold harm=0.6",
    )
    p.add_argument(
        "--benign", default=None, help="trainability recipe (an attack spec run on the primary split)"
    )
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="reference model (before immunization); default for linear models: θ_0 = I with a zero head",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results directory (default: results/evaluate-<task>)"
    )
    p.add_argument("--no-report", action="store_true", help="write results.json only")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=handle)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds expects comma-separated integers, got {text!r}; e.g. --seeds 0,1,2"
        ) from None
    if not seeds:
        raise ConfigError("--seeds is empty; e.g. --seeds 0,1,2")
    return seeds


def _flat_sets(items: list[str], flag: str) -> dict[str, Any]:
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} expects key=value, got {item!r}")
    return parse_set(items)


def build_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve the CLI arguments into ``evaluate()`` keyword arguments (model and task loaded).

    Raises:
        ConfigError / DataError: bad input, before any attack runs.

    """
    from immunekit.attacks import AttackBudget
    from immunekit.data import TASKS
    from immunekit.experiments.evaluate import DEFAULT_ATTACKS, DEFAULT_BUDGET, load_model, parse_attack_list
    from immunekit.metrics.conditions import Thresholds

    model, meta = load_model(args.model)
    task_sets = _flat_sets(args.task_sets, "--task-set")
    name = args.task or meta.get("task")
    if not name:
        raise ConfigError(
            f"--task is required: the checkpoint {args.model} records no task in its metadata; "
            "e.g. --task house_prices"
        )
    task_kwargs: dict[str, Any] = {}
    if args.task is None or args.task == meta.get("task"):
        task_kwargs.update(meta.get("task_config") or {})
    task_kwargs.update(task_sets)
    task_kwargs["evaluation_splits"] = True
    builder = TASKS.get(str(name))
    try:
        task = builder(**task_kwargs)
    except TypeError as err:  # a keyword the builder does not take
        raise ConfigError(f"task {name!r}: {err}; check the --task-set keys") from None

    base = dataclasses.asdict(DEFAULT_BUDGET)
    budget = load_config(AttackBudget, {**base, **_flat_sets(args.budget_sets, "--budget")}, where="--budget")
    thresholds = load_config(Thresholds, _flat_sets(args.threshold_sets, "--threshold"), where="--threshold")
    search = None
    if args.search_trials is not None:
        from immunekit.attacks.worst_case import SearchConfig

        if args.search_trials < 1:
            raise ConfigError(f"--search-trials must be >= 1, got {args.search_trials}")
        search_over = {
            "steps": budget.steps,
            **_flat_sets(args.search_sets, "--search-set"),
            "n_trials": args.search_trials,
        }
        search = load_config(SearchConfig, search_over, where="--search-set")
    elif args.search_sets:
        raise ConfigError("--search-set needs --search-trials N to run the search")
    reference = None
    if args.reference is not None:
        reference, _ = load_model(args.reference)
    return {
        "model": model,
        "task": task,
        "attacks": parse_attack_list(args.attacks) if args.attacks else DEFAULT_ATTACKS,
        "budget": budget,
        "seeds": _seeds(args.seeds),
        "reference": reference,
        "search": search,
        "thresholds": thresholds,
        "benign": args.benign,
        "model_source": str(args.model),
        "reference_source": None if args.reference is None else str(args.reference),
    }


def handle(args: argparse.Namespace) -> int:
    """Evaluate, write results.json (and the report card), print the verdict."""
    from immunekit.experiments.evaluate import evaluate

    inputs = build_inputs(args)
    out = args.out or Path("results") / f"evaluate-{inputs['task'].name}"
    record = evaluate(**inputs, progress=not args.no_progress, out=out)
    print(summary(record))
    print(f"results: {out / 'results.json'}")
    if not args.no_report:
        from immunekit.reports.card import write_card

        md, page = write_card(out, results=record_from_disk(out))
        print(f"report:  {md}\nhtml:    {page}")
    return 0


def record_from_disk(out: Path) -> dict[str, Any]:
    """The record as written (JSON-cleaned: NaN/Inf → null), so the card sees what a rebuild sees."""
    import json

    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def summary(record: dict[str, Any]) -> str:
    """Plain-text verdict, condition statuses and the holds-against statement."""
    lines = [f"verdict: {record['verdict']['verdict']}"]
    for key, c in record["conditions"].items():
        lines.append(f"  {key:<30} {c['status']:<13} {c.get('detail', '')}")
    lines.append(record["statement"]["text"])
    return "\n".join(lines)
