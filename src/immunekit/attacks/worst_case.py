"""The worst-case attacker: the strongest of a fixed grid, and an attacker that searches its settings.

Harm and utility are task scores (:func:`immunekit.metrics.task_scores.task_score`: R² for ``mse``,
accuracy for ``ce``; higher = the task is done better) of the attacked model: harm h on a harmful
held-out split, utility u on ``eval_primary``.

* :class:`WorstCase` runs every member (attack name, config overrides, budget) of a grid on the same
  model, task and seed, chooses the member with the highest final harm on ``val_harmful`` and
  reports that member's harm on ``eval_harmful``, optionally skipping members whose utility fell
  below a floor (an attack that destroys the model "succeeds" trivially). A task without
  ``val_harmful`` is selected on ``eval_harmful`` itself, with a warning and
  ``info["selected_on_reported_split"] = True`` (the reported harm is then optimistic for the
  attacker); ``info["selection_split"]`` always names the split used.
* :class:`AttackerSearch` (and :func:`search_attacker`) tunes the attacker's hyper-parameters with
  Optuna's TPE sampler (seeded): each trial attacks a copy of the model on the attack split with
  the sampled settings and scores harm on ``val_harmful``; the best settings are then re-run and
  reported on ``eval_harmful``, which the search never sees.

What the search guarantees about a fixed ``grid`` (:data:`GUARANTEE`): every grid setting runs as
one trial, queued before this run's sampled ones, with its exact attack, config overrides and budget
(every budget field: momentum, warm-up, caps, schedule, weight decay …, not only those of the search
space) and the same seed as every trial, scored on ``val_harmful``; its value equals the harm on
``val_harmful`` of running that setting directly with that seed. ``n_trials`` is raised to cover
every grid setting (logged; ``SearchResult.n_trials_effective``). So on the validation objective the
best trial is at least as harmful as every grid setting that completed (one an attack rejects is
pruned and listed with its error in ``SearchResult.grid``). Nothing is claimed on ``eval_harmful``:
the chosen settings are re-run and reported there, and a grid setting may score higher there than
the choice.

Scale: ``storage=None`` keeps the study in memory; an Optuna storage URL (``sqlite:///study.db``
locally, a PostgreSQL/MySQL URL when many workers share a study, as SQLite copes poorly with
concurrent writers) makes it resumable: a rerun with the same ``study_name`` loads the finished
trials and only runs the missing ones (``n_trials`` counts the study's total; a grid setting the
study has finished, matched by its exact settings, is not run again). Many processes or
hosts may run :func:`search_attacker` against the same RDB study at once; ``n_trials`` is then the
shared total (Optuna's ``MaxTrialsCallback``). ``n_jobs > 1`` runs trials in threads of one process
(trial values stay deterministic, the TPE proposals then depend on timing).

References:
    Rosati et al., "Immunization against harmful fine-tuning attacks", arXiv 2402.16382.
    Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework", arXiv 1907.10902.

"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from immunekit.attacks.base import (
    OPTIMIZERS,
    Attack,
    AttackBudget,
    AttackResult,
    default_eval_split,
    split_score,
)
from immunekit.config import load_config
from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel
from immunekit.registry import did_you_mean

log = logging.getLogger(__name__)

Setting = tuple[str, Mapping[str, Any], AttackBudget | None]
"""One grid member: (registered attack name, attack config overrides, budget or None = the call's)."""

_MEMBER_KEYS = ("attack", "config", "budget")


# --------------------------------------------------------------------------------------------------
# scores


def score(model: ImmunizableModel, data: Dataset, loss: str) -> float:
    """Task score of ``model`` on one split (R² for ``mse``, accuracy for ``ce``), in eval mode.

    The attacks' shared evaluation step (:func:`~immunekit.attacks.base.split_score`, which the
    training loop's harm curve uses too), with non-finite values mapped to −inf for ranking.

    Args:
        model: the model; its training flag is restored afterwards.
        data: the split, ``x (N, ...)`` and ``y``.
        loss: the task's loss (``"mse"`` or ``"ce"``).

    Returns:
        :func:`~immunekit.metrics.task_scores.task_score` of ``model(x)`` against ``y`` (for an
        ``lm`` task: the judged harmfulness rate of a prompt split, 1 / perplexity of an answered
        one, :func:`_lm_score`); a non-finite value (a diverged attack) is returned as −inf.

    """
    value = _lm_score(model, data) if loss == "lm" else split_score(model, data, data.y, loss)
    return value if math.isfinite(value) else float("-inf")


LM_SCORE_TOKENS = 64
"""Tokens generated per prompt when the search judges a language model (``lm_finetune``'s default)."""


def _lm_score(model: ImmunizableModel, data: Any) -> float:
    """A language model's score on a token split, as the LM attacks measure it.

    Harmful prompts (no answers): the keyword judge's harmfulness rate of greedy completions of
    :data:`LM_SCORE_TOKENS` tokens. Answered conversations (``eval_primary``): 1 / perplexity.
    """
    from immunekit.attacks.lm_eval import answer_perplexity, judge_split
    from immunekit.metrics.judges import make_judge

    if all(c.assistant for c in data.chats):
        return 1.0 / answer_perplexity(model, data)  # type: ignore[arg-type]
    judged = judge_split(model, data, make_judge("keyword"), max_new_tokens=LM_SCORE_TOKENS)  # type: ignore[arg-type]
    return float(judged.summary.harmfulness_rate)


def _require(task: Task, split: str) -> Dataset:
    data = getattr(task, split, None)
    if data is None:
        raise DataError(
            f"task {task.name!r} has no {split!r} split, which the attacker search needs; build the "
            "task with evaluation_splits=True (e.g. gaussian_spectra(..., evaluation_splits=True)) or "
            f"pass {split}=Dataset(...) to Task"
        )
    return data


# --------------------------------------------------------------------------------------------------
# WorstCase


def member_key(attack: str, config: Mapping[str, Any], budget: AttackBudget | None) -> str:
    """Readable key of a grid member, e.g. ``"linear_probe[adam,lr=0.001,steps=50,batch=32]"``.

    Keys are made unique by :class:`WorstCase` (``#2``, ``#3`` … for repeated settings).
    """
    parts = []
    if budget is not None:
        lr = "default" if budget.lr is None else f"{budget.lr:g}"
        parts += [budget.optimizer, f"lr={lr}", f"steps={budget.steps}"]
        if budget.optimizer not in ("gd", "gd_exact"):
            parts.append(f"batch={budget.batch_size}")
        if getattr(budget, "schedule", "constant") != "constant":
            parts.append(f"schedule={budget.schedule}")
    parts += [f"{k}={v}" for k, v in sorted(config.items())]
    return f"{attack}[{','.join(parts)}]"


def _normalise_member(item: object, index: int) -> Setting:
    """(attack, config, budget) from a tuple or a mapping ``{attack, config?, budget?}``."""
    where = f"worst_case.settings[{index}]"
    if isinstance(item, Mapping):
        unknown = [k for k in item if k not in _MEMBER_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}: unknown key{did_you_mean(str(unknown[0]), list(_MEMBER_KEYS))}"
            )
        if "attack" not in item:
            raise ConfigError(f"{where}: missing 'attack' (a registered attack name, e.g. 'linear_probe')")
        item = (item["attack"], item.get("config") or {}, item.get("budget"))
    if not isinstance(item, tuple | list) or len(item) not in (2, 3):
        raise ConfigError(
            f"{where}: expected (attack, config, budget), (attack, budget) or a mapping, got {item!r}"
        )
    if len(item) == 2:
        item = (item[0], {}, item[1])
    name, config, budget = item
    if not isinstance(name, str):
        raise ConfigError(f"{where}: the attack must be a registered name (str), got {name!r}")
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: attack config overrides must be a mapping, got {config!r}")
    if isinstance(budget, Mapping):
        budget = load_config(AttackBudget, budget, where=f"{where}.budget")
    if budget is not None and not isinstance(budget, AttackBudget):
        raise ConfigError(f"{where}: budget must be an AttackBudget, a mapping or None, got {budget!r}")
    return name, dict(config), budget


def _build_attack(name: str, config: Mapping[str, Any]) -> Attack:
    """``ATTACKS.get(name)(**config)`` with a did-you-mean error for unknown names."""
    from immunekit.attacks import ATTACKS  # the registry imports this module lazily

    names = ATTACKS.names()
    if name not in names:
        raise ConfigError(f"unknown attack {name!r}{did_you_mean(name, names)}")
    return ATTACKS.get(name)(**config)


def _steps_to_max(result: AttackResult, final_harm: float, curve_split: str, split: str) -> tuple[float, int]:
    """(max harm, first step reaching it) from the attack's harm curve, or the final values.

    The curve is used only when the attack evaluated ``split`` itself (``curve_split``), so a
    benign member's curve on ``eval_primary`` is never read as harm.
    """
    curve = result.harm_curve() if curve_split == split and hasattr(result, "harm_curve") else []
    last = result.records[-1].step if result.records else 0
    harms = [h for _, h in curve]
    if not harms or max(harms) <= final_harm:
        return final_harm, next((s for s, h in curve if h == final_harm), last)
    best = max(harms)
    return best, next(s for s, h in curve if h == best)


def _curve_split(config: Mapping[str, Any]) -> str:
    """The split an attack's own harm curve is evaluated on (attack-config convention)."""
    split = config.get("split", "attack")
    return config.get("eval_split") or default_eval_split(split)


class WorstCase(Attack):
    """Run several (attack, config, budget) settings and keep the strongest per seed.

    Selection and report use different splits, so the reported harm is not the maximum of noisy
    estimates on the split it is reported on: the chosen member has the highest final harm on the
    **selection split** (``val_harmful`` when the task has it), and its harm on ``eval_split``
    (``eval_harmful``) is the reported number. A task without the selection split falls back to
    selecting on ``eval_split`` itself, with a warning and ``info["selected_on_reported_split"] =
    True``: the reported harm is then the best of several members on one split, optimistic for the
    attacker. Ties go to the member whose harm curve (when the attack evaluated the selection split)
    reaches its maximum at the earliest step, then to the earlier member. With ``utility_floor``,
    members whose final utility (task score on ``eval_primary``) is below it are not eligible; if
    none is, the strongest member overall is returned with ``info["chosen"]["meets_floor"] = False``
    (never understating harm) and a warning.

    Args:
        settings: members as ``(attack name, config overrides, budget)`` tuples, ``(name, budget)``
            or mappings ``{"attack": ..., "config": {...}, "budget": {...}}``; a budget of ``None``
            uses the budget passed to the call. Default: the linear probe under the call's budget.
        utility_floor: minimum final utility of an eligible member, or ``None``.
        eval_split: the harmful split harm is reported on (``eval_harmful``; ``val_harmful`` for tuning).
        selection_split: the harmful split the member is chosen on (``val_harmful``, or
            ``eval_harmful`` to select on the reported split on purpose).

    Raises:
        ConfigError: an unknown attack name (with a suggestion), a bad member or config.

    Example:
        >>> from immunekit.data.synthetic import gaussian_spectra
        >>> from immunekit.models.base import linear_model
        >>> task = gaussian_spectra(dim=4, n=64, seed=0, evaluation_splits=True)
        >>> weak = ("linear_probe", {}, AttackBudget(steps=2, optimizer="sgd", lr=1e-4))
        >>> strong = ("linear_probe", {}, AttackBudget(steps=20, optimizer="gd_exact"))
        >>> res = WorstCase([weak, strong])(linear_model(4), task, AttackBudget(steps=1), seed=0)
        >>> res.info["chosen"]["key"], res.info["selection_split"], res.info["eval_split"]
        ('linear_probe[gd_exact,lr=default,steps=20]', 'val_harmful', 'eval_harmful')

    """

    name = "worst_case"

    def __init__(
        self,
        settings: Sequence[object] | None = None,
        *,
        utility_floor: float | None = None,
        eval_split: str = "eval_harmful",
        selection_split: str = "val_harmful",
    ) -> None:
        raw = list(settings) if settings is not None else [("linear_probe", {}, None)]
        if not raw:
            raise ConfigError(
                "worst_case needs at least one setting; pass settings=[(attack, config, budget)]"
            )
        if utility_floor is not None and (
            isinstance(utility_floor, bool) or not math.isfinite(utility_floor)
        ):
            raise ConfigError(f"utility_floor={utility_floor!r} is invalid; use a finite number or None")
        for arg, value in (("eval_split", eval_split), ("selection_split", selection_split)):
            if value not in ("eval_harmful", "val_harmful"):
                raise ConfigError(f"{arg}={value!r} is invalid; choose 'eval_harmful' or 'val_harmful'")
        self.settings = [_normalise_member(item, i) for i, item in enumerate(raw)]
        self.attacks = [_build_attack(name, config) for name, config, _ in self.settings]
        self.utility_floor = utility_floor
        self.eval_split = eval_split
        self.selection_split = selection_split

    def selection_split_for(self, task: Task) -> str:
        """The split members are chosen on for ``task``.

        ``selection_split`` if the task has it, else ``eval_split`` (the fallback :meth:`__call__`
        warns about).
        """
        has = getattr(task, self.selection_split, None) is not None
        return self.selection_split if has else self.eval_split

    def __call__(
        self, model: ImmunizableModel, task: Task, budget: AttackBudget, *, seed: int
    ) -> AttackResult:
        """Run every member on a copy of ``model``; return the chosen member's result (see class doc)."""
        held = _require(task, self.eval_split)
        selection_split = self.selection_split_for(task)
        same = selection_split == self.eval_split
        if same and self.eval_split == "eval_harmful":
            log.warning(
                "worst_case: %s; the member is selected on %s, the split its harm is reported on, so "
                "the reported harm is selected on the same split (optimistic for the attacker)",
                f"task {task.name!r} has no {self.selection_split!r} split"
                if selection_split != self.selection_split
                else "selection_split is the reported split",
                selection_split,
            )
        chooser = held if same else _require(task, selection_split)
        members: dict[str, dict[str, Any]] = {}
        best: tuple[tuple[float, int], str, AttackResult] | None = None
        best_any: tuple[tuple[float, int], str, AttackResult] | None = None
        budgets = [own or budget for _, _, own in self.settings]
        keys = _unique(
            [member_key(name, config, b) for (name, config, _), b in zip(self.settings, budgets, strict=True)]
        )
        for key, (name, config, _), member_budget, attack in zip(
            keys, self.settings, budgets, self.attacks, strict=True
        ):
            result = attack(model, task, member_budget, seed=seed)
            harm = score(result.model, held, task.loss)
            selected = harm if same else score(result.model, chooser, task.loss)
            utility = score(result.model, task.eval_primary, task.loss)
            curve = _curve_split(config)
            max_harm, steps_to_max = _steps_to_max(result, harm, curve, self.eval_split)
            _, selection_steps = _steps_to_max(result, selected, curve, selection_split)
            ok = self.utility_floor is None or utility >= self.utility_floor
            members[key] = {
                "attack": name,
                "config": dict(config),
                "budget": dataclasses.asdict(member_budget),
                "final_harm": harm,
                "selection_harm": selected,
                "final_utility": utility,
                "max_harm": max_harm,
                "steps_to_max_harm": steps_to_max,
                "steps": len(result.records),
                "stopped_by": result.stopped_by,
                "meets_floor": ok,
            }
            rank = (selected, -selection_steps)  # higher selection harm first, then the earlier maximum
            log.info(
                "worst_case member %s: harm %.4g (%s), %.4g (%s), utility %.4g%s",
                key,
                selected,
                selection_split,
                harm,
                self.eval_split,
                utility,
                "" if ok else " (below floor)",
            )
            if best_any is None or rank > best_any[0]:
                best_any = (rank, key, result)
            if ok and (best is None or rank > best[0]):
                best = (rank, key, result)
        if best is None:
            log.warning(
                "worst_case: no member keeps utility >= %s; reporting the strongest member %s anyway",
                self.utility_floor,
                best_any[1],  # type: ignore[index]
            )
            best = best_any
        _, key, result = best  # type: ignore[misc]
        chosen = {"key": key, **members[key]}
        info = {
            "members": members,
            "chosen": chosen,
            "utility_floor": self.utility_floor,
            "eval_split": self.eval_split,
            "selection_split": selection_split,
            "selected_on_reported_split": same,
            "member_info": result.info,
        }
        return AttackResult(result.model, result.initial, result.records, result.stopped_by, info)


def _unique(keys: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
        out.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
    return out


# --------------------------------------------------------------------------------------------------
# attacker search


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """The attacker search: its budget (trials × per-trial steps), space, and Optuna study."""

    n_trials: int = field(default=20, metadata={"help": "trials of the study in total (resumed ones count)"})
    steps: int = field(default=100, metadata={"help": "optimizer steps per trial (lower end with steps_max)"})
    steps_max: int | None = field(
        default=None,
        metadata={"help": "sample steps log-uniformly in [steps, steps_max]; None = fixed steps"},
    )
    lr_min: float = field(default=1e-4, metadata={"help": "lower end of the log-uniform learning rate"})
    lr_max: float = field(default=1.0, metadata={"help": "upper end of the log-uniform learning rate"})
    batch_sizes: tuple[int, ...] = field(default=(16, 32, 64), metadata={"help": "batch size choices"})
    optimizers: tuple[str, ...] = field(default=("sgd", "adam"), metadata={"help": "optimizer choices"})
    schedules: tuple[str, ...] = field(default=("constant",), metadata={"help": "lr schedule choices"})
    attacks: tuple[str, ...] = field(
        default=("linear_probe", "full_finetune"),
        metadata={"help": "registered attack names to choose from (checked when the search runs)"},
    )
    attack_overrides: dict = field(
        default_factory=dict,
        metadata={"help": "fixed config overrides per attack name, e.g. {partial_finetune: {blocks: 1}}"},
    )
    split: str = field(
        default="attack",
        metadata={"help": "training split of every trial: attack, attack_disjoint or attack_cross"},
    )
    n_startup_trials: int = field(default=10, metadata={"help": "random trials before TPE models the space"})
    storage: str | None = field(
        default=None,
        metadata={"help": "Optuna storage URL (sqlite:///study.db, postgresql://...); None = in memory"},
    )
    study_name: str = field(default="immunekit-attacker-search", metadata={"help": "Optuna study name"})

    def __post_init__(self) -> None:
        for name in ("n_trials", "steps", "n_startup_trials"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "n_startup_trials" else 1)
            ):
                low = 0 if name == "n_startup_trials" else 1
                raise ConfigError(f"search.{name}={value!r} is invalid; use an integer >= {low}")
        if self.steps_max is not None and (
            not isinstance(self.steps_max, int) or self.steps_max < self.steps
        ):
            raise ConfigError(
                f"search.steps_max={self.steps_max!r} is invalid; use an integer >= steps={self.steps} "
                "or None"
            )
        if not (0 < self.lr_min <= self.lr_max and math.isfinite(self.lr_max)):
            raise ConfigError(
                f"search lr range [{self.lr_min}, {self.lr_max}] is invalid; need 0 < lr_min <= lr_max < inf"
            )
        for name in ("batch_sizes", "optimizers", "schedules", "attacks"):
            if not getattr(self, name):
                raise ConfigError(f"search.{name} is empty; give at least one choice")
        bad = [b for b in self.batch_sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
        if bad:
            raise ConfigError(f"search.batch_sizes has invalid entries {bad}; use integers >= 1")
        for opt in self.optimizers:
            if opt not in OPTIMIZERS:
                raise ConfigError(
                    f"search.optimizers: {opt!r} is unknown{did_you_mean(opt, list(OPTIMIZERS))}"
                )
        if self.split not in ("attack", "attack_disjoint", "attack_cross"):
            raise ConfigError(
                f"search.split={self.split!r} is invalid; choose attack, attack_disjoint or attack_cross "
                "(val_harmful scores the trials, eval_harmful is reported, neither is trained on)"
            )
        unknown = [k for k in self.attack_overrides if k not in self.attacks]
        if unknown:
            raise ConfigError(
                f"search.attack_overrides names {unknown}, which are not in search.attacks "
                f"{list(self.attacks)}; add them to attacks or drop the overrides"
            )
        if not self.study_name.strip():
            raise ConfigError("search.study_name is empty; give the study a name")


@dataclass
class SearchResult:
    """What :func:`search_attacker` found and how it did on the reported split.

    Attributes:
        chosen: the best trial's settings: ``attack``, ``config`` (overrides), ``budget`` (as a dict),
            the Optuna ``params``, the ``trial`` number and ``grid`` (the grid member's key when the
            best trial was a grid setting, else ``None``).
        best_value: the best trial's harm on ``val_harmful``.
        trials: every finished trial in order: ``number``, ``params``, ``value`` (val harm; ``None``
            when pruned), ``state``, ``enqueued`` (a fixed grid setting) and, for grid settings,
            ``grid`` = ``{"key", "id", "in_space"}`` (``in_space``: its parameters are a point of the
            space, so TPE learns from it; otherwise it ran with no sampled parameter).
        cumulative_best: best val harm after each trial of ``trials`` (−inf before the first success).
        result: the chosen settings re-run on the attack split and evaluated on ``eval_harmful``.
        eval_harm: harm of ``result.model`` on ``eval_harmful`` (the reported number).
        eval_utility: its utility on ``eval_primary``.
        study_name: the Optuna study name.
        storage: the storage URL with any password removed (``None`` = in memory).
        n_trials_requested: ``SearchConfig.n_trials``.
        n_trials_effective: the study's total after this run: ``n_trials`` raised, when needed, so
            that every grid setting runs (the grid size for a fresh study).
        grid: one entry per grid setting, in the order given: ``index``, ``key``, ``attack``,
            ``config``, ``budget`` (the exact settings it ran with), ``in_space``, ``trial`` (number),
            ``state`` (``COMPLETE``, ``PRUNED`` with ``error``, or ``NOT RUN``) and ``value`` (val harm).

    """

    chosen: dict[str, Any]
    best_value: float
    trials: list[dict[str, Any]]
    cumulative_best: list[float]
    result: AttackResult
    eval_harm: float
    eval_utility: float
    study_name: str
    storage: str | None
    n_trials_requested: int = 0
    n_trials_effective: int = 0
    grid: list[dict[str, Any]] = field(default_factory=list)

    @property
    def grid_best_value(self) -> float | None:
        """The best val harm among the grid settings' trials (``None`` without a completed one)."""
        values = [g["value"] for g in self.grid if g["state"] == "COMPLETE" and g["value"] is not None]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no model)."""
        return {
            "chosen": self.chosen,
            "best_value": self.best_value,
            "objective": "harm on val_harmful",
            "reported_split": "eval_harmful",
            "trials": self.trials,
            "cumulative_best": self.cumulative_best,
            "eval_harm": self.eval_harm,
            "eval_utility": self.eval_utility,
            "study_name": self.study_name,
            "storage": self.storage,
            "n_trials_requested": self.n_trials_requested,
            "n_trials_effective": self.n_trials_effective,
            "grid": self.grid,
            "grid_best_value": self.grid_best_value,
            "guarantee": GUARANTEE,
        }


GUARANTEE = (
    "every grid setting ran as a trial with its exact attack, config overrides and budget, scored on "
    "val_harmful like the other trials, so best_value >= the val_harmful harm of each grid setting "
    "that completed (no such claim holds on eval_harmful)"
)
"""What :class:`AttackerSearch` guarantees about its grid (recorded in :meth:`SearchResult.to_dict`)."""


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as err:
        raise ConfigError(
            'the attacker search needs Optuna, which is not installed; pip install "immunekit[tune]" '
            "(or use WorstCase over a fixed grid)"
        ) from err
    return optuna


def redact(url: str | None) -> str | None:
    """``url`` without its password (``postgresql://user:***@host/db``), for logs and records."""
    return None if url is None else re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


GridItem = Mapping[str, Any] | tuple[str, AttackBudget] | tuple[str, Mapping[str, Any], AttackBudget]
"""A fixed grid setting of the attacker search: a point of the space (a mapping of its parameters,
``{"attack", "optimizer", "lr", "batch_size"[, "schedule", "steps"]}``), ``(attack name, budget)``
or ``(attack name, config overrides, budget)``."""


@dataclass(frozen=True)
class _GridMember:
    """A normalised grid setting: a point of the space (``budget is None``) or exact settings."""

    index: int
    attack: str
    config: dict[str, Any]
    budget: AttackBudget | None
    params: dict[str, Any] | None  # its parameters in the space, if it can be a point of it


class AttackerSearch(Attack):
    """An attacker that tunes its own hyper-parameters (Optuna TPE) on ``val_harmful``.

    Search space (one Optuna parameter each): ``attack`` ∈ ``config.attacks``, ``optimizer`` ∈
    ``config.optimizers``, ``lr`` log-uniform in [``lr_min``, ``lr_max``], ``batch_size`` ∈
    ``config.batch_sizes``, ``schedule`` ∈ ``config.schedules`` and, with ``steps_max``, ``steps``
    log-uniform integer in [``steps``, ``steps_max``]. For sampled trials, budget fields outside the
    space (momentum, weight decay, caps, warm-up) come from the budget template and the attack config
    from ``attack_overrides`` and ``split``. A trial whose combination an attack rejects (a
    ``ConfigError``, e.g. an optimizer it does not implement) is pruned and recorded.

    **Grid settings** run first, each as one trial with its exact attack, config overrides and
    budget (every field, not only those of the space), the same seed, and scored on ``val_harmful``
    like every trial, so its value equals that of running the setting directly. ``n_trials`` is
    raised, with an INFO line, to the finished trials plus the grid settings still to run
    (``SearchResult.n_trials_effective``), so every one of them runs. A setting whose parameters
    are a point of the space (same attack config and template budget as a sampled trial with those
    parameters) is enqueued with them, so TPE learns from it; any other runs with no sampled
    parameter (``in_space: False``). Hence, on the validation objective, the best trial is at least
    as harmful as every grid setting that completed (:data:`GUARANTEE`). A study resumed from storage
    runs only the grid settings it has not finished yet (matched by their exact settings).

    Called as an :class:`~immunekit.attacks.base.Attack`, ``budget`` is the template (its steps,
    lr, batch size, optimizer and schedule are replaced by the trial's) and the returned result is
    the re-run of the chosen settings, with the search summary in ``info["search"]``.

    Args:
        config: :class:`SearchConfig` (or keyword overrides).
        grid: fixed settings run as the first trials (:data:`GridItem`): mappings of the parameters
            above (``{"attack": "linear_probe", "optimizer": "adam", "lr": 0.01, "batch_size": 32}``,
            which must lie in the space), ``(attack name, AttackBudget)`` or ``(attack name, config
            overrides, AttackBudget)`` (any valid setting; it must not train on ``val_harmful``).
        n_jobs: trials run in parallel threads of this process (Optuna's ``n_jobs``).

    Raises:
        ConfigError: a grid setting that cannot run as a trial (:meth:`outside_space` says why).

    """

    name = "attacker_search"

    def __init__(
        self,
        config: SearchConfig | None = None,
        *,
        grid: Sequence[GridItem] = (),
        n_jobs: int = 1,
        **overrides: Any,
    ) -> None:
        base = {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        self.config = load_config(SearchConfig, {**base, **overrides}, where="search")
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
            raise ConfigError(f"n_jobs={n_jobs!r} is invalid; use an integer >= 1 (or -1 for one per CPU)")
        self.n_jobs = n_jobs
        self.grid = [self._member(g, i) for i, g in enumerate(grid)]

    def __call__(
        self, model: ImmunizableModel, task: Task, budget: AttackBudget, *, seed: int
    ) -> AttackResult:
        """Search, re-run the best settings and return that result with ``info["search"]``."""
        found = self.run(model, task, seed=seed, budget=budget)
        res = found.result
        return AttackResult(
            res.model, res.initial, res.records, res.stopped_by, {**res.info, "search": found.to_dict()}
        )

    # -- the space and the grid ---------------------------------------------------------------------

    def outside_space(self, item: GridItem) -> str | None:
        """Why a fixed setting cannot run as a trial of this search, or ``None`` if it can.

        Every valid ``(attack, [config overrides,] budget)`` can (in the space or not; see the class
        doc); the reasons left are a mapping outside the space, an unknown attack or invalid
        overrides, overrides that are not JSON values (they are stored with the trial) and a
        setting that trains on ``val_harmful``, the split the search selects on.
        """
        try:
            self._member(item, 0)
        except ConfigError as err:
            return str(err)
        return None

    def _member(self, item: GridItem, index: int) -> _GridMember:
        where = f"grid[{index}]"
        if isinstance(item, Mapping):
            params = self._grid_params(item, index)
            name = params["attack"]
            return _GridMember(index, name, {}, None, params)
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise ConfigError(
                f"{where}: expected (attack name, AttackBudget), (attack name, config overrides, "
                f"AttackBudget) or a mapping of search parameters, got {item!r}"
            )
        name, config, b = (item[0], {}, item[1]) if len(item) == 2 else item
        if not isinstance(name, str) or not isinstance(b, AttackBudget) or not isinstance(config, Mapping):
            raise ConfigError(
                f"{where}: expected (attack name, [config overrides,] AttackBudget), got {item!r}"
            )
        config = dict(config)
        _build_attack(name, config)  # unknown names and invalid overrides fail here, before any trial
        if config.get("split", "attack") == "val_harmful":
            raise ConfigError(
                f"{where}: trains on val_harmful, the split the search scores trials on, so its value "
                "would be inflated; train on attack, attack_disjoint or attack_cross"
            )
        try:
            json.dumps(config)
        except TypeError as err:
            raise ConfigError(
                f"{where}: config overrides must be JSON values (they are stored with the trial): {err}"
            ) from None
        point: dict[str, Any] | None
        try:
            point = self._grid_params((name, b), index)
        except ConfigError:
            point = None  # runs exactly all the same, with no sampled parameter
        return _GridMember(index, name, config, b, point)

    def _grid_params(self, item: Mapping[str, Any] | tuple[str, AttackBudget], index: int) -> dict[str, Any]:
        """The space parameters of a setting, or a ConfigError saying which one lies outside the space."""
        cfg, where = self.config, f"grid[{index}]"
        if isinstance(item, tuple):
            name, b = item
            if b.lr is None:
                raise ConfigError(
                    f"{where}: the budget needs an explicit lr to be placed in the search space"
                )
            item = {"attack": name, "optimizer": b.optimizer, "lr": b.lr, "batch_size": b.batch_size,
                    "schedule": b.schedule, "steps": b.steps}  # fmt: skip
        params = dict(item)
        params.setdefault("schedule", "constant" if "constant" in cfg.schedules else cfg.schedules[0])
        params.setdefault("steps", cfg.steps)
        checks = {
            "attack": params.get("attack") in cfg.attacks,
            "optimizer": params.get("optimizer") in cfg.optimizers,
            "batch_size": params.get("batch_size") in cfg.batch_sizes,
            "schedule": params.get("schedule") in cfg.schedules,
            "lr": isinstance(params.get("lr"), int | float) and cfg.lr_min <= params["lr"] <= cfg.lr_max,
            "steps": params["steps"] == cfg.steps
            if cfg.steps_max is None
            else isinstance(params["steps"], int) and cfg.steps <= params["steps"] <= cfg.steps_max,
        }
        unknown = [k for k in params if k not in checks]
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}: unknown parameter{did_you_mean(unknown[0], list(checks))}"
            )
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"{where}: {bad[0]}={params.get(bad[0])!r} lies outside the search space; widen the space "
                f"(search.{_SPACE_FIELD[bad[0]]}) or change the grid setting"
            )
        if cfg.steps_max is None:
            del params["steps"]
        return params

    def _grid_trial(self, member: _GridMember, template: AttackBudget) -> dict[str, Any]:
        """The exact settings of a grid member for the trial template, as stored with its trial."""
        if member.budget is None:  # a point of the space: a sampled trial with these parameters
            if member.params is None:  # _member builds every point with its parameters
                raise ConfigError(f"grid[{member.index}] has neither a budget nor search parameters")
            name, config, b = self.settings(member.params, template)
            in_space = True
        else:
            name, config, b = member.attack, member.config, member.budget
            in_space = member.params is not None and self.settings(member.params, template) == (
                name,
                config,
                dataclasses.replace(b, eval_every=template.eval_every),  # evaluations change no weight
            )
        exact = {"attack": name, "config": config, "budget": dataclasses.asdict(b)}
        exact = json.loads(json.dumps(exact))  # as any storage gives it back
        blob = json.dumps(exact, sort_keys=True, separators=(",", ":"))
        return {
            **exact,
            "id": hashlib.sha256(blob.encode()).hexdigest()[:16],
            "key": member_key(name, config, b),
            "in_space": in_space,
            "point": member.budget is None,
        }

    def _suggest(self, trial: Any) -> dict[str, Any]:
        cfg = self.config
        params = {
            "attack": trial.suggest_categorical("attack", list(cfg.attacks)),
            "optimizer": trial.suggest_categorical("optimizer", list(cfg.optimizers)),
            "lr": trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(cfg.batch_sizes)),
            "schedule": trial.suggest_categorical("schedule", list(cfg.schedules)),
        }
        if cfg.steps_max is not None:
            params["steps"] = trial.suggest_int("steps", cfg.steps, cfg.steps_max, log=True)
        return params

    def settings(
        self, params: Mapping[str, Any], template: AttackBudget
    ) -> tuple[str, dict[str, Any], AttackBudget]:
        """(attack name, config overrides, budget) of a trial's parameters."""
        cfg = self.config
        name = params["attack"]
        config = dict(cfg.attack_overrides.get(name, {}))
        if cfg.split != "attack":
            config["split"] = cfg.split
        changes = {k: params[k] for k in ("optimizer", "lr", "batch_size") if k in params}
        changes["steps"] = params.get("steps", cfg.steps)
        if "schedule" in params:
            changes["schedule"] = params["schedule"]
        return name, config, dataclasses.replace(template, **changes)

    # -- the study ---------------------------------------------------------------------------------

    def run(
        self, model: ImmunizableModel, task: Task, *, seed: int, budget: AttackBudget | None = None
    ) -> SearchResult:
        """Run (or resume) the study, then re-run the best settings and score them on ``eval_harmful``.

        Args:
            model: the model to attack (never modified).
            task: needs ``val_harmful`` (and the configured training split).
            seed: seed of the TPE sampler and of every trial's attack (the same seed in every trial,
                so trials differ only in their settings).
            budget: template for the fields the space does not set (default ``AttackBudget()``);
                its ``eval_every`` is used for the final re-run only (sampled trials evaluate steps 0
                and T; grid settings run with their own budget).

        Returns:
            :class:`SearchResult`.

        Raises:
            DataError: the task lacks ``val_harmful`` or the training split.
            ConfigError: an unknown attack name, an invalid override, Optuna missing, or every
                trial rejected by its attack.

        """
        cfg = self.config
        val = _require(task, "val_harmful")
        _require(task, cfg.split)
        for name in cfg.attacks:  # fail before any trial on a typo or a bad override
            _build_attack(name, cfg.attack_overrides.get(name, {}))
        optuna = _import_optuna()
        template = budget or AttackBudget()
        trial_template = dataclasses.replace(template, eval_every=0)
        grid = [self._grid_trial(m, trial_template) for m in self.grid]
        exact = {g["id"]: (m, g) for m, g in zip(self.grid, grid, strict=True)}
        previous = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = self._study(optuna, seed)
            effective = self._enqueue_grid(study, optuna, grid)
            done = _finished(study, optuna)
            log.info(
                "attacker search %r: %d trials done, running %d more (storage %s)",
                cfg.study_name, done, effective - done, redact(cfg.storage) or "in memory",
            )  # fmt: skip

            def objective(trial: Any) -> float:
                attrs = trial.user_attrs.get("grid")
                try:
                    if attrs is None:
                        name, config, b = self.settings(self._suggest(trial), trial_template)
                    else:
                        if attrs["in_space"]:
                            self._suggest(trial)  # the enqueued values: TPE learns from this trial
                        name, config, b = self._exact(attrs, exact)
                    attacked = _build_attack(name, config)(model, task, b, seed=seed)
                except ConfigError as err:  # a combination the budget or the attack does not support
                    trial.set_user_attr("error", str(err))
                    raise optuna.TrialPruned(str(err)) from err
                return score(attacked.model, val, task.loss)

            if effective > done:
                states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                study.optimize(
                    objective,
                    n_trials=effective - done,
                    n_jobs=self.n_jobs,
                    callbacks=[optuna.study.MaxTrialsCallback(effective, states=states)],
                )
            trials = _trial_table(study, optuna)
        finally:
            optuna.logging.set_verbosity(previous)
        complete = [t for t in trials if t["state"] == "COMPLETE"]
        if not complete:
            reasons = sorted({t.get("error", "") for t in trials} - {""})
            raise ConfigError(
                f"no trial of the attacker search completed; every attack rejected its settings: {reasons}; "
                "narrow search.optimizers / search.attacks to combinations the attacks implement"
            )
        best = max(complete, key=lambda t: (t["value"], -t["number"]))
        attrs = _grid_attrs(study, best["number"])
        if attrs is None or attrs.get("point"):
            name, config, b = self.settings(best["params"], template)
        else:  # a grid setting: re-run exactly what the trial ran
            name, config, b = self._exact(attrs, exact)
        result = _build_attack(name, config)(model, task, b, seed=seed)
        eval_harm = score(result.model, task.eval_harmful, task.loss)
        eval_utility = score(result.model, task.eval_primary, task.loss)
        log.info("attacker search chose %s: val harm %.4g, eval harm %.4g", member_key(name, config, b),
                 best["value"], eval_harm)  # fmt: skip
        chosen = {
            "key": member_key(name, config, b),
            "attack": name,
            "config": config,
            "budget": dataclasses.asdict(b),
            "params": dict(best["params"]),
            "trial": best["number"],
            "grid": None if attrs is None else attrs["key"],
        }
        return SearchResult(
            chosen=chosen,
            best_value=float(best["value"]),
            trials=trials,
            cumulative_best=_cumulative_best(trials),
            result=result,
            eval_harm=eval_harm,
            eval_utility=eval_utility,
            study_name=cfg.study_name,
            storage=redact(cfg.storage),
            n_trials_requested=cfg.n_trials,
            n_trials_effective=effective,
            grid=_grid_summary(grid, trials),
        )

    def _enqueue_grid(self, study: Any, optuna: Any, grid: list[dict[str, Any]]) -> int:
        """Enqueue the grid settings the study has not finished or queued; return the study's total.

        The total is ``n_trials``, raised to the finished trials plus every queued one (ours first
        among them) when that is more, so that no grid setting is left out.
        """
        cfg = self.config
        state = optuna.trial.TrialState
        known = {
            t.user_attrs["grid"]["id"]
            for t in study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.WAITING))
            if isinstance(t.user_attrs.get("grid"), Mapping)
        }
        for g in grid:
            if g["id"] in known:
                continue
            known.add(g["id"])  # a setting listed twice runs once: same settings, same seed
            params = self._grid_params_of(g) if g["in_space"] else {}
            study.enqueue_trial(params, user_attrs={"enqueued": True, "grid": g})
        done = _finished(study, optuna)
        queued = len(study.get_trials(deepcopy=False, states=(state.WAITING,)))
        effective = max(cfg.n_trials, done + queued)
        if effective > max(cfg.n_trials, done):  # more than n_trials alone would have run
            log.info(
                "attacker search %r: n_trials raised from %d to %d so that every grid setting runs as a "
                "trial (%d grid settings, %d trials finished, %d queued)",
                cfg.study_name, cfg.n_trials, effective, len(grid), done, queued,
            )  # fmt: skip
        return effective

    def _grid_params_of(self, g: Mapping[str, Any]) -> dict[str, Any]:
        """The space parameters of an in-space grid trial (from its exact settings)."""
        b = g["budget"]
        params = {"attack": g["attack"], "optimizer": b["optimizer"], "lr": b["lr"],
                  "batch_size": b["batch_size"], "schedule": b["schedule"]}  # fmt: skip
        if self.config.steps_max is not None:
            params["steps"] = b["steps"]
        return params

    @staticmethod
    def _exact(
        attrs: Mapping[str, Any], members: Mapping[str, tuple[_GridMember, dict[str, Any]]]
    ) -> tuple[str, dict[str, Any], AttackBudget]:
        """(attack, config, budget) a grid trial runs: this run's member, or the stored settings."""
        if attrs["id"] in members and members[attrs["id"]][0].budget is not None:
            m = members[attrs["id"]][0]
            return m.attack, dict(m.config), m.budget  # type: ignore[return-value]
        budget = load_config(AttackBudget, attrs["budget"], where="grid trial budget")
        return str(attrs["attack"]), dict(attrs["config"]), budget

    def _study(self, optuna: Any, seed: int) -> Any:
        cfg = self.config
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
        return optuna.create_study(
            study_name=cfg.study_name,
            storage=cfg.storage,
            sampler=sampler,
            direction="maximize",
            load_if_exists=True,
        )


_SPACE_FIELD = {
    "attack": "attacks",
    "optimizer": "optimizers",
    "batch_size": "batch_sizes",
    "schedule": "schedules",
    "lr": "lr_min / lr_max",
    "steps": "steps / steps_max",
}


def _finished(study: Any, optuna: Any) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _grid_attrs(study: Any, number: int) -> dict[str, Any] | None:
    """The stored grid settings of trial ``number``, or None for a sampled trial."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    attrs = trial.user_attrs.get("grid")
    return dict(attrs) if isinstance(attrs, Mapping) else None


def _trial_table(study: Any, optuna: Any) -> list[dict[str, Any]]:
    """Finished trials in order of their number (running and waiting ones are left out)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    rows = []
    for t in sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number):
        row = {
            "number": t.number,
            "params": dict(t.params),
            "value": None if t.value is None else float(t.value),
            "state": t.state.name,
            "enqueued": bool(t.user_attrs.get("enqueued", False)),
        }
        grid = t.user_attrs.get("grid")
        if isinstance(grid, Mapping):
            row["grid"] = {"key": grid["key"], "id": grid["id"], "in_space": bool(grid["in_space"])}
        if "error" in t.user_attrs:
            row["error"] = t.user_attrs["error"]
        rows.append(row)
    return rows


def _grid_summary(grid: list[dict[str, Any]], trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per grid setting (in order): its exact settings and the first finished trial that ran them."""
    first: dict[str, dict[str, Any]] = {}
    for t in trials:
        if "grid" in t and t["state"] in ("COMPLETE", "PRUNED"):
            first.setdefault(t["grid"]["id"], t)
    out = []
    for index, g in enumerate(grid):
        found = first.get(g["id"])
        row = {
            "index": index,
            "key": g["key"],
            "attack": g["attack"],
            "config": g["config"],
            "budget": g["budget"],
            "in_space": g["in_space"],
            "trial": None if found is None else found["number"],
            "state": "NOT RUN" if found is None else found["state"],
            "value": None if found is None else found["value"],
        }
        if found is not None and "error" in found:
            row["error"] = found["error"]
        out.append(row)
    missing = [r["key"] for r in out if r["state"] == "NOT RUN"]
    if missing:  # e.g. another worker of a shared study is still running them
        log.warning("attacker search: grid settings without a finished trial yet: %s", missing)
    return out


def _cumulative_best(trials: list[dict[str, Any]]) -> list[float]:
    out, best = [], float("-inf")
    for t in trials:
        if t["state"] == "COMPLETE" and t["value"] is not None:
            best = max(best, t["value"])
        out.append(best)
    return out


def search_attacker(
    model: ImmunizableModel,
    task: Task,
    config: SearchConfig | None = None,
    *,
    seed: int = 0,
    budget: AttackBudget | None = None,
    grid: Sequence[GridItem] = (),
    n_jobs: int = 1,
    **overrides: Any,
) -> SearchResult:
    """Tune the attacker on ``val_harmful`` and report the chosen settings on ``eval_harmful``.

    Shorthand for ``AttackerSearch(config, grid=grid, n_jobs=n_jobs, **overrides).run(...)``; see
    :class:`AttackerSearch` for the space and :class:`SearchConfig` for the options.

    Example:
        >>> from immunekit.data.synthetic import gaussian_spectra
        >>> from immunekit.models.base import linear_model
        >>> task = gaussian_spectra(dim=4, n=64, seed=0, evaluation_splits=True)
        >>> found = search_attacker(linear_model(4), task, n_trials=3, steps=10, attacks=["linear_probe"])
        >>> len(found.trials), found.cumulative_best == sorted(found.cumulative_best)
        (3, True)

    """
    return AttackerSearch(config, grid=grid, n_jobs=n_jobs, **overrides).run(
        model, task, seed=seed, budget=budget
    )
