"""Linear-extractor experiments: immunize, measure κ/RIR, attack by linear probing, aggregate.

A trial is ``(method, seed) -> record``, a pure function of the resolved config; records are
written one file per trial, atomically, so an interrupted run resumes without recomputing or
duplicating finished trials. ``run_linear_experiment`` aggregates them into ``results.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import statistics
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from immunekit._versions import SCHEMA_VERSION
from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.attacks.linear_probe import ProbeCache, probe_problem
from immunekit.config import config_sha256, load_config, to_dict
from immunekit.data import TASKS
from immunekit.data.task import Task
from immunekit.defenses import DEFENSES
from immunekit.defenses.base import Defense
from immunekit.errors import ConfigError
from immunekit.experiments import device as device_mod
from immunekit.experiments import sweep
from immunekit.experiments.io import read_json
from immunekit.experiments.provenance import provenance
from immunekit.experiments.registry import Experiment, RunContext
from immunekit.metrics import KappaPair, metric_meta, rir, steps_to_epsilon, verdict
from immunekit.metrics.losses import LOSS_RULE, LOSS_RULE_TEXT
from immunekit.metrics.rir import rir_band
from immunekit.models.base import LinearModel, linear_model
from immunekit.models.checkpoint import save_checkpoint
from immunekit.registry import did_you_mean
from immunekit.spectral.condition import check_rtol
from immunekit.spectral.iterative import check_solver
from immunekit.spectral.rank import (
    DEFAULT_BAND,
    RANK_RULE,
    RANK_RULE_TEXT,
    FactorSpectrum,
    band_multipliers,
    check_band,
    factor_spectrum_cached,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """A defense under a display key, with config overrides (e.g. an ablation variant)."""

    key: str = field(metadata={"help": "unique label in results (e.g. 'opt_kappa' or 'opt_kappa_per_step')"})
    defense: str = field(default="", metadata={"help": "registry name (default: key)"})
    overrides: dict = field(default_factory=dict, metadata={"help": "defense config overrides"})

    def __post_init__(self) -> None:
        if not self.defense:
            object.__setattr__(self, "defense", self.key)
        DEFENSES.get(self.defense)  # unknown names fail here, with a suggestion


@dataclass(frozen=True, kw_only=True)
class AttackSpec:
    """A linear-probe attacker: optimizer and budget, under a display key."""

    key: str = field(metadata={"help": "label, e.g. 'gd_exact'"})
    optimizer: str = field(default="gd_exact", metadata={"help": "gd_exact, gd, sgd or adam"})
    steps: int = field(default=200, metadata={"help": "budget in optimizer steps"})
    lr: float | None = field(default=None, metadata={"help": "step size (None: optimizer default)"})
    batch_size: int = field(default=32, metadata={"help": "examples per stochastic step"})

    def budget(self) -> AttackBudget:
        """The AttackBudget this spec describes."""
        return AttackBudget(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            optimizer=self.optimizer,  # type: ignore[arg-type]  # AttackBudget checks the name
        )


@dataclass(frozen=True, kw_only=True)
class VerdictConfig:
    """Thresholds of Definition 3.1."""

    min_ratio_harmful: float = field(default=10.0, metadata={"help": "(a): (i) must reach this"})
    max_ratio_primary: float = field(default=1.0, metadata={"help": "(b): (ii) must not exceed this"})
    max_relative_loss_increase: float = field(
        default=0.01, metadata={"help": "(c): primary test loss tolerance"}
    )


@dataclass(frozen=True, kw_only=True)
class SpectralConfig:
    """How the Algorithm-1 defenses compute the extreme spectra of H = θᵀKθ."""

    solver: str = field(
        default="dense",
        metadata={
            "help": "'dense' (SVD of the factor Fθ; the reference) or 'lanczos' (certified warm-started "
            "Lanczos, dense fall-back recorded per trial); reaches every defense with that setting"
        },
    )

    def __post_init__(self) -> None:
        check_solver(self.solver, where="spectral.solver")


@dataclass(frozen=True, kw_only=True)
class LinearExperimentConfig:
    """A linear-extractor immunization experiment (house prices, MNIST pairs, synthetic)."""

    experiment: str = field(default="house_prices", metadata={"help": "experiment name (results label)"})
    task: str = field(default="house_prices", metadata={"help": "TASKS registry name"})
    task_config: dict = field(default_factory=dict, metadata={"help": "task keyword arguments"})
    seeds: tuple[int, ...] = field(default=(1, 2, 3), metadata={"help": "run seeds"})
    methods: tuple[MethodSpec, ...] = field(default=(), metadata={"help": "defenses to compare"})
    attacks: tuple[AttackSpec, ...] = field(default=(), metadata={"help": "linear-probe attackers"})
    epsilon: float = field(default=0.01, metadata={"help": "steps_to_epsilon threshold on the norm ratio"})
    verdict: VerdictConfig = field(
        default_factory=VerdictConfig, metadata={"help": "Definition 3.1 thresholds"}
    )
    paper_table: str | None = field(
        default=None, metadata={"help": "key of the paper's table to show beside"}
    )
    pairs: str | None = field(
        default=None,
        metadata={
            "help": "digit-pair tasks: 'all' (90 ordered pairs) or '0-1,3-8'; each pair is a grid cell"
        },
    )
    rank_rtol: float | None = field(
        default=None,
        metadata={
            "help": "the rank rule's relative cut on the singular values of X_P and X_H, for the metric and "
            "every defense with a rank_rtol setting (default max(N, D)·eps); in (0, 1)"
        },
    )
    spectral: SpectralConfig = field(
        default_factory=SpectralConfig,
        metadata={"help": "extreme spectra of the defenses: spectral.solver = dense | lanczos"},
    )
    band: float = field(
        default=DEFAULT_BAND,
        metadata={"help": "sensitivity band: κ ratios also at rank_rtol/band and rank_rtol·band; > 1"},
    )

    def __post_init__(self) -> None:
        TASKS.get(self.task)
        if self.rank_rtol is not None:
            check_rtol(self.rank_rtol, name="rank_rtol")
        check_band(self.band)
        if self.rank_rtol is not None and self.rank_rtol * self.band >= 1:
            raise ConfigError(
                f"rank_rtol × band must be < 1 (the band's upper cut), got {self.rank_rtol} × {self.band}; "
                "lower rank_rtol or band"
            )
        if not self.seeds:
            raise ConfigError("seeds must not be empty; e.g. --seeds 1,2,3")
        negative = [s for s in self.seeds if s < 0]
        if negative:
            raise ConfigError(
                f"seeds must be integers >= 0, got {negative[0]} in {list(self.seeds)}; e.g. --seeds 1,2,3"
            )
        if len(set(self.seeds)) != len(self.seeds):
            repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            raise ConfigError(
                f"seeds must be distinct, got {list(self.seeds)} (repeated: {repeated}); list each seed once"
            )
        for label, items in (("methods", self.methods), ("attacks", self.attacks)):
            keys = [m.key for m in items]
            if len(set(keys)) != len(keys):
                raise ConfigError(f"{label} keys must be unique, got {keys}")
        if self.pairs is not None:
            parse_pairs(self.pairs)
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"epsilon must be in (0, 1), got {self.epsilon}")


def normalise(data: dict[str, Any]) -> dict[str, Any]:
    """Allow YAML shorthand: a method or attack given as a bare string becomes ``{key: name}``."""
    out = dict(data)
    for name in ("methods", "attacks"):
        if name in out and isinstance(out[name], list | tuple):
            out[name] = [{"key": m} if isinstance(m, str) else m for m in out[name]]
    return out


DEFENSES_SECTION = "defenses"
"""Top-level config key beside the fields of :class:`LinearExperimentConfig`: per-method defense
settings, ``defenses: {<method key>: {<setting>: value}}`` (``--set defenses.<key>.<setting>=v``),
merged into that method's ``overrides``."""


def config_keys() -> list[str]:
    """Every top-level key an experiment config (YAML file or ``--set``) may hold, sorted."""
    fields = [f.name for f in dataclasses.fields(LinearExperimentConfig)]
    return sorted([*fields, DEFENSES_SECTION])


def build_config(data: dict[str, Any]) -> LinearExperimentConfig:
    """Strictly load a LinearExperimentConfig from a (merged) mapping, and check what it names.

    Besides the dataclass fields, ``data`` may hold a ``defenses`` section (see
    :data:`DEFENSES_SECTION`). Every method's defense settings and every attack's budget are checked
    here, so a bad value fails before any trial runs.

    Raises:
        ConfigError: an unknown key (the message lists every top-level key), a ``defenses`` entry
            for a method not in the run, or an invalid value anywhere, including a defense setting
            or an attack budget.

    """
    data = dict(data)
    keys = config_keys()
    for key in data:
        if key not in keys:
            hint = did_you_mean(str(key), keys)
            hint = hint if "did you mean" in hint else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; the top-level keys are: {', '.join(keys)}")
    sections = data.pop(DEFENSES_SECTION, None)
    data = normalise(data)
    if sections:
        data["methods"] = apply_defense_sections(data.get("methods", []), sections)
    cfg = load_config(LinearExperimentConfig, data, where="experiment")
    check_methods_and_attacks(cfg)
    return cfg


def apply_defense_sections(methods: Any, sections: Any) -> list[Any]:
    """Merge ``defenses.<key>`` settings into the ``overrides`` of the method called ``key``."""
    if not isinstance(sections, dict):
        raise ConfigError(
            f"defenses must map method keys to settings, got {sections!r}; "
            "e.g. --set defenses.condition_number.steps=50"
        )
    if not isinstance(methods, list | tuple):
        return list(methods) if methods else []  # load_config reports the malformed methods list
    out = [dict(m) if isinstance(m, dict) else m for m in methods]
    keys = [m.get("key") for m in out if isinstance(m, dict)]
    for key, settings in sections.items():
        if key not in keys:
            hint = did_you_mean(str(key), [str(k) for k in keys])
            hint = hint if "did you mean" in hint else ""
            raise ConfigError(
                f"defenses.{key}: no method {key!r} in this run{hint} (methods: "
                f"{', '.join(map(str, keys))}); add it to --methods or drop the setting"
            )
        if not isinstance(settings, dict):
            raise ConfigError(
                f"defenses.{key} must be a mapping of that defense's settings, got {settings!r}; "
                f"e.g. --set defenses.{key}.steps=50"
            )
        for m in out:
            if isinstance(m, dict) and m.get("key") == key:
                m["overrides"] = {**(m.get("overrides") or {}), **settings}
    return out


def make_defense(cfg: LinearExperimentConfig, method: MethodSpec, task: Task | None = None) -> Defense:
    """The defense a trial of ``method`` fits: its overrides plus what the experiment and task imply.

    The experiment's ``rank_rtol`` reaches every defense with that setting (one rank rule for the
    metric and the defenses), and a task without a genuine primary loss (``info["task_term"]`` is
    ``False``, e.g. MNIST's 'reference' protocol) switches the task term off; explicit overrides win.

    Raises:
        ConfigError: an invalid or unknown defense setting, naming the method.

    """
    defense_cls = DEFENSES.get(method.defense)
    overrides = dict(method.overrides)
    fields = defense_cls.Config.__dataclass_fields__
    if task is not None and task.info.get("task_term") is False and "task_loss" in fields:
        overrides.setdefault("task_loss", False)
    if cfg.rank_rtol is not None and "rank_rtol" in fields:
        overrides.setdefault("rank_rtol", cfg.rank_rtol)  # one rank rule for metric and defense
    if "spectral_solver" in fields:
        overrides.setdefault("spectral_solver", cfg.spectral.solver)
    try:
        return defense_cls(**overrides)
    except ConfigError as exc:
        what = "" if method.key == method.defense else f"method {method.key!r} (defense {method.defense!r}): "
        raise ConfigError(
            f"{what}{exc}; set it with --set defenses.{method.key}.<setting>=... or in the method's overrides"
        ) from None


def check_methods_and_attacks(cfg: LinearExperimentConfig, task: Task | None = None) -> None:
    """Build every method's defense and every attack's budget once, so bad settings fail up front.

    Args:
        cfg: the experiment config.
        task: the task of the first trial, when built: adds the task-implied defense settings.

    Raises:
        ConfigError: the first invalid defense setting or attack budget, naming the method or attack.

    """
    for method in cfg.methods:
        make_defense(cfg, method, task)
    probe = ATTACKS.get("linear_probe")
    for spec in cfg.attacks:
        try:
            spec.budget()
            probe(split="attack", record_accuracy=False)
        except ConfigError as exc:
            raise ConfigError(f"attacks[{spec.key}]: {exc}") from None


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


def kappa_pair(
    theta: torch.Tensor, x_h: torch.Tensor, x_p: torch.Tensor, *, rtol: float | None = None
) -> KappaPair:
    """κ of H_H = θᵀK_Hθ and H_P = θᵀK_Pθ with K = XᵀX, by the rank rule (:mod:`immunekit.spectral.rank`).

    null(K) is decided on the singular values of the data factor X (r = #{s_i > rtol·s_1}, default
    rtol = max(N, D)·eps), and κ(H) = (s_1/s_r)² of the thin factor F·θ (FᵀF = K, ``(r, D)``) with
    the rank r fixed on K.

    Args:
        theta: ``(D_in, D_hid)`` extractor.
        x_h: ``(N_H, D_in)`` harmful training inputs.
        x_p: ``(N_P, D_in)`` primary training inputs.
        rtol: explicit relative cut in (0, 1), or ``None`` for the default.

    """
    spec_h, spec_p = FactorSpectrum.of(x_h, rtol=rtol), FactorSpectrum.of(x_p, rtol=rtol)
    return KappaPair(spec_h.kappa(theta), spec_p.kappa(theta))


def probe_test_loss(
    model: LinearModel, task: Task, split: str, eval_split: str, *, cache: ProbeCache | None = None
) -> tuple[float, float | None]:
    """Held-out MSE (and accuracy for classification) of the best linear head w* = A⁺Y on ``split``.

    ``cache`` shares the features and the least-squares factorization with the attacks of the
    same extractor (the numbers are the same with or without it).
    """
    from immunekit.attacks.linear_probe import accuracy

    if cache is None:
        prob = probe_problem(model, task, split, eval_split)
    else:
        prob = cache.problem(model, task, split, eval_split)
    w = prob.factor().solve(prob.y)
    pred = prob.eval_a @ w
    mse = float(((pred - prob.eval_y) ** 2).mean())
    return mse, (accuracy(pred, prob.eval_y) if prob.classes else None)


@dataclass(frozen=True, eq=False)
class _Reference:
    """What every method of one task shares: θ_0 and its measurements, the rank rule's spectra.

    Attributes:
        model: the reference model θ_0 = I, ω_0 = 0 (``linear_model(D)``).
        multipliers: the cuts of the sensitivity band, ascending multipliers of rtol (middle: 1).
        spectra: per cut, (X_H's, X_P's) :class:`FactorSpectrum` (one SVD each, re-cut).
        kappas: per cut, :func:`kappa_pair` of θ_0.
        primary: :func:`probe_test_loss` of θ_0 on primary → eval_primary.
        probes: features and factorizations of θ_0 (a fallback for models with θ = θ_0).

    """

    model: LinearModel
    multipliers: tuple[float, ...]
    spectra: tuple[tuple[FactorSpectrum, FactorSpectrum], ...]
    kappas: tuple[KappaPair, ...]
    primary: tuple[float, float | None]
    probes: ProbeCache

    @classmethod
    def of(cls, task: Task, *, rtol: float | None = None, band: float = DEFAULT_BAND) -> _Reference:
        """Measure θ_0 on ``task`` at the default cut and at both edges of the band."""
        model = linear_model(task.input_dim)
        spec_h, spec_p = (
            factor_spectrum_cached(task.harmful.x, rtol=rtol),
            factor_spectrum_cached(task.primary.x, rtol=rtol),
        )
        mults = band_multipliers(band)
        spectra = tuple((spec_h.scaled(m), spec_p.scaled(m)) for m in mults)
        kappas = tuple(_kappa_pair_at(model.theta, h, p) for h, p in spectra)
        probes = ProbeCache(max_entries=2)
        primary = probe_test_loss(model, task, "primary", "eval_primary", cache=probes)
        return cls(model, mults, spectra, kappas, primary, probes)

    @property
    def center(self) -> int:
        """Index of the default cut (multiplier 1)."""
        return self.multipliers.index(1.0)

    @property
    def kappa(self) -> KappaPair:
        """:func:`kappa_pair` of θ_0 at the default cut."""
        return self.kappas[self.center]

    def kappa_band(self, model: LinearModel) -> tuple[KappaPair, ...]:
        """κ of ``model``'s θ at every cut (the stored values when θ = θ_0 bit for bit)."""
        theta = model.theta
        ref = self.model.theta
        if theta.shape == ref.shape and torch.equal(theta, ref):
            return self.kappas
        return tuple(_kappa_pair_at(theta, h, p) for h, p in self.spectra)

    def kappa_of(self, model: LinearModel) -> KappaPair:
        """:func:`kappa_pair` of ``model``'s θ at the default cut."""
        theta = model.theta
        ref = self.model.theta
        if theta.shape == ref.shape and torch.equal(theta, ref):
            return self.kappa
        return _kappa_pair_at(theta, *self.spectra[self.center])

    def rank_rule(self) -> dict[str, Any]:
        """The record's ``rank_rule`` entry: rule name, the decisions on X_P and X_H, the band's ranks."""
        spec_h, spec_p = self.spectra[self.center]
        return {
            "rule": RANK_RULE,
            "text": RANK_RULE_TEXT,
            "primary": spec_p.describe(),
            "harmful": spec_h.describe(),
            "band_multipliers": list(self.multipliers),
            "band_rank_primary": [p.rank for _, p in self.spectra],
            "band_rank_harmful": [h.rank for h, _ in self.spectra],
        }


def _kappa_pair_at(theta: torch.Tensor, spec_h: FactorSpectrum, spec_p: FactorSpectrum) -> KappaPair:
    """κ(θᵀK_Hθ), κ(θᵀK_Pθ) from the thin factors of the two spectra (rank fixed on K)."""
    return KappaPair(spec_h.kappa(theta), spec_p.kappa(theta))


class _ReferenceCache:
    """The :class:`_Reference` of the last few tasks this process measured, one per live Task object.

    An entry is used only for the very task object it was made for (held by a weak reference, so
    a freed task's entry is dropped and its id can never be mistaken for a new task's) and only if
    the task's ``version`` and the in-place-modification counters of its tensors are unchanged.
    The cache never keeps a task alive, keeps at most ``size`` entries (least recently used
    dropped first), and its values are never modified after they are made.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: OrderedDict[int, tuple[weakref.ref[Task], tuple, _Reference]] = OrderedDict()

    def get(self, task: Task, *, rtol: float | None = None, band: float = DEFAULT_BAND) -> _Reference:
        """The reference measurements of ``task`` (computed on the first call for this task and cut)."""
        key, stamp = id(task), (_task_stamp(task), rtol, band)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is task and entry[1] == stamp:
            self._entries.move_to_end(key)
            return entry[2]
        ref = _Reference.of(task, rtol=rtol, band=band)
        self._entries[key] = (weakref.ref(task, functools.partial(self._forget, key)), stamp, ref)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return ref

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self, key: int, dead: weakref.ref[Task]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is dead:
            del self._entries[key]


def _task_stamp(task: Task) -> tuple:
    """``task.version`` and the ``_version`` counters (bumped by in-place writes) of its split tensors."""
    splits = (task.primary, task.harmful, task.attack, task.eval_primary, task.eval_harmful)
    return (task.version, tuple(t._version for d in splits for t in (d.x, d.y)))


_REFERENCES = _ReferenceCache()


def run_trial(cfg: LinearExperimentConfig, method: MethodSpec, seed: int, task: Task) -> dict[str, Any]:
    """Immunize, measure and attack for one (method, seed); returns the trial record (JSON-ready).

    See :func:`immunize_and_measure`, which also returns the immunized model.
    """
    return immunize_and_measure(cfg, method, seed, task)[0]


def immunize_and_measure(
    cfg: LinearExperimentConfig, method: MethodSpec, seed: int, task: Task
) -> tuple[dict[str, Any], LinearModel]:
    """Immunize, measure and attack for one (method, seed): the trial record and the immunized model.

    The reference measurements (κ of θ_0, θ_0's primary test loss, K's factors) are made once per
    task object and process and shared by every method; the features and least-squares solves of
    the immunized model are shared by its closed-form evaluations and its attacks. Wall times are
    recorded as ``defense_seconds`` (fit), ``measure_seconds`` (κ, RIR, closed-form losses,
    including this task's reference measurements if this trial made them) and ``attack_seconds``.
    """
    model0 = linear_model(task.input_dim)
    defense = make_defense(cfg, method, task)
    t0 = time.perf_counter()
    immunized = defense.fit(model0, task, seed=seed)
    seconds = time.perf_counter() - t0
    if not isinstance(immunized, LinearModel):
        raise ConfigError(
            f"defense {method.defense!r} returned a {type(immunized).__name__}, not a LinearModel; the "
            "linear experiments need a defense of linear extractors (see 'immunekit ls defenses')"
        )
    t0 = time.perf_counter()
    ref = _REFERENCES.get(task, rtol=cfg.rank_rtol, band=cfg.band)
    probes = ProbeCache(fallback=ref.probes)
    kappas = ref.kappa_band(immunized)
    parts = rir(ref.kappa, kappas[ref.center])
    band = rir_band(ref.kappas, kappas, ref.multipliers)
    mse_ref, acc_ref = ref.primary
    mse_imm, acc_imm = probe_test_loss(immunized, task, "primary", "eval_primary", cache=probes)
    harm_mse, harm_acc = probe_test_loss(immunized, task, "attack", "eval_harmful", cache=probes)
    metrics: dict[str, float | None] = {
        **{k: float(v) for k, v in parts.to_dict().items()},
        **band.to_metrics(),
        "primary_test_mse": mse_imm,
        "primary_test_mse_reference": mse_ref,
        "harmful_test_mse_closed_form": harm_mse,
        "defense_seconds": seconds,
        "measure_seconds": time.perf_counter() - t0,
        "attack_seconds": None,  # set below; kept beside the other timings
    }
    if acc_imm is not None:
        metrics.update(
            primary_test_accuracy=acc_imm,
            primary_test_accuracy_reference=acc_ref,
            harmful_test_accuracy_closed_form=harm_acc,
        )
    v = cfg.verdict
    ver = verdict(
        parts,
        primary_loss_reference=mse_ref,
        primary_loss_immunized=mse_imm,
        min_ratio_harmful=v.min_ratio_harmful,
        max_ratio_primary=v.max_ratio_primary,
        max_relative_loss_increase=v.max_relative_loss_increase,
    )
    t0 = time.perf_counter()
    curves = _attack_curves(cfg, immunized, task, seed, metrics, probes)
    metrics["attack_seconds"] = time.perf_counter() - t0
    record = {
        "method": method.key,
        "defense": method.defense,
        "seed": seed,
        "metrics": metrics,
        "verdict": {"seed": seed, **ver.to_dict()},
        "rank_rule": ref.rank_rule(),
        "loss_rule": LOSS_RULE,
        "curves": curves,
        "defense_info": {**defense.info_, "steps_run": len(defense.history_)},
    }
    return record, immunized


def _attack_curves(
    cfg: LinearExperimentConfig,
    model: LinearModel,
    task: Task,
    seed: int,
    metrics: dict[str, float | None],
    probes: ProbeCache | None = None,
) -> dict[str, dict[str, list]]:
    curves: dict[str, dict[str, list]] = {}
    probe = ATTACKS.get("linear_probe")
    for spec in cfg.attacks:
        for which, split in (("harmful", "attack"), ("primary", "primary")):
            # only the norm-ratio and loss curves are kept: no per-step accuracy (an N×D product)
            attack = probe(split=split, record_accuracy=False)
            result = attack(model, task, spec.budget(), seed=seed, cache=probes)
            ratios = result.curve("norm_ratio")
            metrics[f"steps_to_epsilon.{which}.{spec.key}"] = steps_to_epsilon(ratios, cfg.epsilon)
            metrics[f"final_norm_ratio.{which}.{spec.key}"] = ratios[-1]
            curves[f"{which}.{spec.key}"] = {"norm_ratio": ratios, "loss": result.curve("loss")}
    return curves


# ---------------------------------------------------------------------------------------------
# The experiment: trials on disk, resume, aggregate
# ---------------------------------------------------------------------------------------------


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``'all'`` → the 90 ordered digit pairs; ``'0-1,3-8'`` → [(0, 1), (3, 8)] (primary-harmful).

    Example:
        >>> parse_pairs("0-1, 3-8")
        [(0, 1), (3, 8)]
        >>> len(parse_pairs("all"))
        90

    """
    if text.strip() == "all":
        return [(p, h) for p in range(10) for h in range(10) if p != h]
    pairs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        parts = item.split("-")
        if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            raise ConfigError(f"pair {item!r} is not 'p-h' (e.g. 3-8); use --pairs all or --pairs 0-1,3-8")
        p, h = int(parts[0]), int(parts[1])
        if p > 9 or h > 9:
            raise ConfigError(f"pair {item!r}: digits are 0-9")
        if p == h:
            raise ConfigError(f"pair {item!r}: a pair needs two different digits")
        pairs.append((p, h))
    if not pairs:
        raise ConfigError("no pairs given; use --pairs all or --pairs 0-1,3-8")
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"pairs repeat: {text!r}")
    return pairs


def cells(cfg: LinearExperimentConfig) -> list[tuple[str, dict[str, Any]]]:
    """Grid cells: (key, task-config overrides); one cell ``""`` when the experiment has no grid."""
    if cfg.pairs is None:
        return [("", {})]
    return [(f"{p}-{h}", {"primary": p, "harmful": h}) for p, h in parse_pairs(cfg.pairs)]


def trial_path(out: Path, method: str, seed: int, cell: str = "") -> Path:
    """Where the record of one trial lives (``trials/<cell>/`` for grid experiments)."""
    folder = out / "trials" / cell if cell else out / "trials"
    return folder / f"{method}--seed{seed}.json"


def trial_config_sha(
    cfg: LinearExperimentConfig, method: MethodSpec, cell: dict[str, Any] | None = None
) -> str:
    """Identity of everything a trial depends on (not the lists of seeds, pairs or other methods)."""
    data = to_dict(cfg)
    for key in ("seeds", "methods", "experiment", "paper_table", "pairs"):
        data.pop(key)
    data["method"] = to_dict(method)
    data["loss_rule"] = LOSS_RULE
    if cell:
        data["cell"] = cell
    return config_sha256(data)


def resolve_device(device: str) -> str:
    """The device the linear experiments run on for ``device``; they run in float64 on the CPU only.

    The spectral code (factor SVDs, pseudo-inverses, closed-form probes) builds float64 CPU tensors,
    so ``"cpu"`` is the one device it honours: ``"auto"`` resolves to ``"cpu"`` (saying so at INFO
    level when CUDA is present), and an accelerator raises instead of being silently ignored.

    Args:
        device: ``"auto"``, ``"cpu"`` or a torch device string such as ``"cuda"``, ``"cuda:1"``, ``"mps"``.

    Returns:
        ``"cpu"``.

    Raises:
        ConfigError: ``device`` is not a torch device, is not available on this machine
            (:func:`immunekit.experiments.device.resolve_device`), or is an accelerator the linear
            experiments cannot use.

    Example:
        >>> resolve_device("auto"), resolve_device("cpu")
        ('cpu', 'cpu')

    """
    if str(device).strip().lower() == "auto":
        if torch.cuda.is_available():
            log.info("--device auto: the linear experiments run in float64 on the CPU; CUDA is not used")
        return "cpu"
    if torch.device(device_mod.resolve_device(device)).type == "cpu":  # checks the name and availability
        return "cpu"
    raise ConfigError(
        f"--device {device!r} cannot be honoured: the linear experiments run in float64 on the CPU only "
        "(their spectral code builds CPU tensors); use --device cpu or --device auto"
    )


def run_linear_experiment(
    cfg: LinearExperimentConfig,
    out: str | Path,
    *,
    progress: bool = True,
    executor: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    save_models: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run every (cell, method, seed) trial not yet on disk, then write ``results.json``.

    The trials form a sweep (:mod:`immunekit.experiments.sweep`): each record is written
    atomically to :func:`trial_path` as it finishes, an interrupted run resumes without recomputing
    finished trials, and the records do not depend on the executor.

    Everything that can be checked is checked before the first trial, in this order, and nothing is
    written on a failure: the device, executor and results directory; the first trial's task (so a
    missing, empty or too small data file is reported as such); every method's defense settings and
    every attack budget; then the trial records already in ``out`` (rules, configuration).

    Args:
        cfg: the resolved experiment config.
        out: results directory (created; trials resume from ``out/trials``).
        progress: show a progress bar with trials done / total and ETA.
        executor: ``"local"`` (``workers=1``: in this process, serial, easy to debug; more: a pool of
            spawned processes, one torch thread each) or ``"ray"`` (extra ``immunekit[ray]``).
        workers: local pool size, or CPUs of a local Ray instance (``None``: the usable cores).
        ray_address: ``"ray"`` only: cluster address (``None``: ``RAY_ADDRESS``, else local Ray).
        save_models: also write each immunized model as a safetensors checkpoint to
            ``out/models/[cell/]method--seedN.safetensors`` (with the task and its config in the
            metadata, for ``immunekit evaluate``); trials already on disk are not rerun, so resume
            with a new ``--out`` to get their models. Local executor only (Ray nodes need not share
            this filesystem).
        device: ``"auto"`` or ``"cpu"`` (:func:`resolve_device`); recorded in the provenance.

    Returns:
        The aggregated results record (also written to ``out/results.json``).

    Raises:
        ConfigError: an unusable device, an unknown executor, ``workers < 1``, an unwritable results
            directory, an invalid defense setting or attack budget, a results directory written by a
            different configuration, Ray missing or its cluster unreachable (all before any write).
        DataError: the first trial's task cannot be built from its data.

    """
    from immunekit.experiments.registry import EXPERIMENTS

    key = cfg.experiment.replace("-", "_")
    kind = EXPERIMENTS.get(key) if key in EXPERIMENTS else LinearExperiment
    experiment = kind() if issubclass(kind, LinearExperiment) else LinearExperiment()
    ctx = RunContext(
        out=Path(out),
        progress=progress,
        executor=executor,
        workers=workers,
        ray_address=ray_address,
        save_models=save_models,
        device=device,
    )
    return experiment.run(cfg, ctx)


_TASKS_CACHE: dict[str, Task] = {}


def task_for(
    cfg: LinearExperimentConfig,
    seed: int,
    cell: dict[str, Any] | None = None,
    factory: Callable[..., Task] | None = None,
) -> Task:
    """The task of (cell, seed), built once per process (consecutive trials share it).

    ``factory`` (default: ``TASKS.get(cfg.task)``) builds it; workers get it from the driver.
    """
    kwargs = {**cfg.task_config, **(cell or {})}
    key = config_sha256({"task": cfg.task, "config": kwargs, "seed": seed})
    if key not in _TASKS_CACHE:
        _TASKS_CACHE.clear()  # keep one task: trials are visited cell by cell, seed by seed
        _TASKS_CACHE[key] = (factory or TASKS.get(cfg.task))(seed=seed, **kwargs)
    return _TASKS_CACHE[key]


@dataclass(frozen=True)
class LinearTrial:
    """The payload of one (cell, method, seed) trial: all a pool or Ray worker needs (picklable).

    The task factory is looked up in ``TASKS`` by the driver and travels with the trial (pickled
    by reference), so a task registered outside immunekit reaches a worker by the import of its
    module there.
    """

    cfg: LinearExperimentConfig
    cell: str
    cell_config: dict[str, Any]
    method: MethodSpec
    seed: int
    task_factory: Callable[..., Task]
    save_dir: str | None = None  # where to write the immunized model; not part of the trial's identity


def linear_trials(cfg: LinearExperimentConfig, save_dir: str | Path | None = None) -> list[sweep.Trial]:
    """The sweep of ``cfg``: one trial per (cell, seed, method), keyed by its :func:`trial_path`.

    With ``save_dir`` each trial also writes its immunized model there (see :func:`model_path`).
    """
    factory = TASKS.get(cfg.task)
    save = None if save_dir is None else str(save_dir)
    return [
        sweep.Trial(
            key=trial_path(Path(), m.key, seed, cell).with_suffix("").as_posix(),
            config_sha=trial_config_sha(cfg, m, over),
            payload=LinearTrial(
                cfg=cfg, cell=cell, cell_config=over, method=m, seed=seed, task_factory=factory, save_dir=save
            ),
        )
        for cell, over in cells(cfg)
        for seed in cfg.seeds
        for m in cfg.methods
    ]


def run_linear_trial(trial: LinearTrial) -> dict[str, Any]:
    """The sweep job: run one trial on its (cell, seed) task; the runner stores the record."""
    task = task_for(trial.cfg, trial.seed, trial.cell_config, trial.task_factory)
    record, model = immunize_and_measure(trial.cfg, trial.method, trial.seed, task)
    record.update(cell=trial.cell, task_version=task.version, resources=_resources())
    if trial.save_dir is not None:
        cfg = trial.cfg
        task_config = {**cfg.task_config, **trial.cell_config, "seed": trial.seed}
        save_checkpoint(
            model,
            model_path(Path(trial.save_dir), trial.method.key, trial.seed, trial.cell),
            metadata={
                "experiment": cfg.experiment,
                "task": cfg.task,
                "task_config": task_config,
                "method": trial.method.key,
                "defense": trial.method.defense,
                "seed": trial.seed,
                "task_version": task.version,
            },
        )
    return record


def _resources() -> dict[str, float]:
    """Peak resident memory of this process so far (MB; a pool worker's peak over its trials)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux
    except (ImportError, OSError):  # pragma: no cover - not on POSIX
        return {}
    return {"peak_rss_mb": peak}


def model_path(out: Path, method: str, seed: int, cell: str = "") -> Path:
    """``out/[cell/]method--seedN.safetensors``: where ``--save-models`` puts a trial's immunized model."""
    return out.joinpath(*([cell] if cell else []), f"{method}--seed{seed}.safetensors")


def log_rank_deficiency(task: Task, rtol: float | None = None) -> list[dict[str, Any]]:
    """Log at INFO level when K_P or K_H is singular: κ is then over the retained spectrum.

    A singular K is a fact of the data (constant or collinear features, fewer rows than features),
    not a problem: κ, RIR and the K⁺ preconditioner use the pseudo-inverse over the retained
    spectrum. The rank is the rank rule's (on the singular values of X), with the gap at the cut;
    ``results.json`` records the same facts for every trial's task under ``rank_deficiency``.

    Returns:
        One entry per singular matrix: ``matrix`` (``"K_P"`` or ``"K_H"``) and
        :meth:`FactorSpectrum.describe` (rank, dim, rows, rtol, gap).

    """
    found = []
    for name, data in (("K_P", task.primary), ("K_H", task.harmful)):
        spec = FactorSpectrum.of(data.x, rtol=rtol)
        if spec.rank < spec.dim:
            last, first = spec.gap()
            found.append({"matrix": name, **spec.describe()})
            log.info(
                "%s has rank %d of %d (constant or collinear features in the training rows); κ, RIR and "
                "the K⁺ preconditioner use the pseudo-inverse over the retained spectrum (rank rule %s: "
                "rtol %.1e on σ(X); last kept σ/σ_1 %.2e, first dropped %s); recorded in results.json "
                "under rank_deficiency",
                name,
                spec.rank,
                spec.dim,
                RANK_RULE,
                spec.rtol,
                last if last is not None else 0.0,
                "none" if first is None else f"{first:.2e}",
            )
    return found


def rank_deficiency(
    cfg: LinearExperimentConfig, records: dict[tuple[str, str, int], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``results.json``'s ``rank_deficiency``: every singular K_P or K_H, per (cell, seed) task.

    Read from the trial records' ``rank_rule`` decisions (every method of a task shares them), in
    trial order; empty when every K has full rank.
    """
    out = []
    for cell, _ in cells(cfg):
        for seed in cfg.seeds:
            rule = next(
                (records[(cell, m.key, seed)].get("rank_rule") for m in cfg.methods),
                None,
            )
            if not isinstance(rule, dict):
                continue
            for matrix, split in (("K_P", "primary"), ("K_H", "harmful")):
                desc = rule.get(split)
                if isinstance(desc, dict) and desc.get("rank", 0) < desc.get("dim", 0):
                    out.append({"cell": cell or None, "seed": seed, "matrix": matrix, "split": split, **desc})
    return out


def check_rules(out: Path, trials: list[sweep.Trial]) -> None:
    """Refuse, with the reason, a results directory whose trials were measured under another rule.

    Two rules change every number: the rank rule (κ, RIR and the defenses' pseudo-inverses) and the
    loss rule (the defenses' task term, :mod:`immunekit.metrics.losses`). The config hash changes
    with either (the sweep refuses the directory in any case); this check runs first so that the
    message names the rule instead of a generic config mismatch.

    Raises:
        ConfigError: a trial record under ``out`` records no rule or another rule's name.

    """
    for t in trials:
        path = sweep.trial_file(out, t.key)
        if not path.exists():
            continue
        record = read_json(path)
        record = record if isinstance(record, dict) else {}
        entry = record.get("rank_rule")
        rule = entry.get("rule") if isinstance(entry, dict) else None
        if rule != RANK_RULE:
            old = (
                f"rank rule {rule!r}"
                if rule
                else "the older rank rule (rank of K on its eigenvalues at D·eps; no rank_rule recorded)"
            )
            raise ConfigError(
                f"{path} was measured under {old}; this version decides ranks by the rank rule {RANK_RULE!r} "
                f"({RANK_RULE_TEXT}), which changes κ, RIR and the defenses, so the results cannot be mixed "
                f"or resumed. Use a new --out directory, or delete {out} to start over"
            )
        loss = record.get("loss_rule")
        if loss != LOSS_RULE:
            old = (
                f"loss rule {loss!r}"
                if loss
                else "the older loss rule (BCE-with-logits task term for binary tasks)"
            )
            raise ConfigError(
                f"{path} was measured under {old}; this version trains the defenses' task term with the "
                f"loss rule {LOSS_RULE!r} ({LOSS_RULE_TEXT}), so the results cannot be mixed or resumed. "
                f"Use a new --out directory, or delete {out} to start over"
            )


def aggregate(
    cfg: LinearExperimentConfig,
    records: dict[tuple[str, str, int], dict[str, Any]],
    task: Task,
    *,
    device: str = "cpu",
    device_requested: str | None = None,
) -> dict[str, Any]:
    """Combine per-trial records into the results.json document (docs/results-schema.md).

    Without a grid, ``methods[m].metrics`` summarise the seeds. With a grid (digit pairs), each cell
    gets its own per-method summaries under ``cells``, and ``methods[m].metrics`` summarise the
    per-cell means across cells (so the mean RIR is the mean of per-pair RIR, as in the paper).
    ``provenance.device`` is the device the trials ran on and ``provenance.device_requested`` the
    ``--device`` asked for; ``rank_deficiency`` lists every singular K (:func:`rank_deficiency`).
    """
    resolved = to_dict(cfg)
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sha = config_sha256(resolved)
    grid = cells(cfg)
    per_cell = {
        cell: {m.key: _summarise_trials([records[(cell, m.key, s)] for s in cfg.seeds]) for m in cfg.methods}
        for cell, _ in grid
    }
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "experiment": cfg.experiment,
        "run_id": f"{cfg.experiment}-{created.replace('-', '').replace(':', '')}-{sha[:8]}",
        "created_at": created,
        "seeds": list(cfg.seeds),
        "config": resolved,
        "config_sha256": sha,
        "provenance": {
            **provenance(task_version=task.version, task_info=_jsonable(task.info)),
            "device": device,
            "device_requested": device_requested if device_requested is not None else device,
        },
        "paper": paper_rows(cfg.paper_table),
        "attacks": [dataclasses.asdict(a) for a in cfg.attacks],
        "epsilon": cfg.epsilon,
        "rank_rule": {
            "rule": RANK_RULE,
            "text": RANK_RULE_TEXT,
            "band_multipliers": list(band_multipliers(cfg.band)),
        },
        "rank_deficiency": rank_deficiency(cfg, records),
        "trials": [
            str(trial_path(Path(""), m.key, s, cell))
            for cell, _ in grid
            for s in cfg.seeds
            for m in cfg.methods
        ],
    }
    first = grid[0][0]
    if len(grid) == 1 and not first:
        doc["methods"] = {
            m.key: {"defense": m.defense, "overrides": m.overrides, **per_cell[first][m.key]}
            for m in cfg.methods
        }
        return doc
    doc["grid"] = {"kind": "digit_pairs", "rows": "harmful", "cols": "primary", "size": 10}
    doc["cells"] = {
        cell: {
            **over,
            "methods": {
                k: {"metrics": v["metrics"], "verdict": v["verdict"]} for k, v in per_cell[cell].items()
            },
        }
        for cell, over in grid
    }
    doc["methods"] = {m.key: _across_cells(m, [per_cell[c][m.key] for c, _ in grid]) for m in cfg.methods}
    return doc


def _summarise_trials(recs: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(dict.fromkeys(k for r in recs for k in r["metrics"]))
    return {
        "metrics": {n: summarise(n, [r["metrics"].get(n) for r in recs]) for n in names},
        "verdict": [r["verdict"] for r in recs],
        "rank_rule": [r.get("rank_rule") for r in recs],
        "curves": recs[0]["curves"],
        "defense_info": recs[0]["defense_info"],
    }


def _across_cells(method: MethodSpec, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(dict.fromkeys(k for s in summaries for k in s["metrics"]))
    return {
        "defense": method.defense,
        "overrides": method.overrides,
        "metrics": {n: summarise(n, [s["metrics"].get(n, {}).get("mean") for s in summaries]) for n in names},
        "verdict": [v for s in summaries for v in s["verdict"]],
        "curves": summaries[0]["curves"],
        "defense_info": summaries[0]["defense_info"],
    }


def summarise(name: str, values: list[float | None]) -> dict[str, Any]:
    """Mean, sample std and count over seeds; ``None`` values are censored (e.g. never reached ε)."""
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    direction, unit = metric_meta(name)
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else (0.0 if present else None),
        "n": len(present),
        "values": values,
        "censored": len(values) - len(present),
        "direction": direction,
        "unit": unit,
    }


def read_paper_table(key: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(source, table, all tables)`` of ``key`` in ``paper_tables.json``; the table is a copy.

    Raises:
        ConfigError: ``key`` names no table (the message lists them).

    """
    tables = read_json(Path(__file__).with_name("paper_tables.json"))
    if key not in tables:
        raise ConfigError(
            f"unknown paper table {key!r}; choose one of {sorted(k for k in tables if k != 'source')}"
        )
    return f"{tables['source']}, {key}", dict(tables[key]), tables


def paper_rows(key: str | None) -> dict[str, Any]:
    """The paper's numbers for ``key`` (a table in paper_tables.json), or {}.

    A table of scalars (Table 2: mean RIR per method) becomes a one-column ``rir`` table; Table 2
    also brings the Fig. 2 ln-RIR heat maps (rows harmful digit, columns primary digit).
    """
    if not key:
        return {}
    source, table, tables = read_paper_table(key)
    out: dict[str, Any] = {"source": source}
    if all(isinstance(v, int | float) for v in table.values()):
        out.update(columns=["rir"], rows={m: [v] for m, v in table.items()}, table2=table)
        fig2 = {k: v for k, v in tables.get("fig2_mnist_ln_rir", {}).items() if k != "layout"}
        out.update(
            fig2=fig2,
            fig2_success_counts_text=(
                "R_ill only fails everywhere; IMMA succeeds once; Opt-κ fails on 32 of 90; "
                "Ours succeeds on all 90"
            ),
        )
        return out
    columns = [c.removesuffix("_ii").removesuffix("_i") for c in table.pop("columns", [])]
    out.update(columns=columns, rows=table)
    return out


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(info, default=str))


class LinearExperiment(Experiment):
    """The linear-extractor experiments (house prices, MNIST digit pairs, synthetic spectra).

    A trial is one (cell, method, seed); the job is :func:`run_linear_trial`, the aggregation
    :func:`aggregate`, and ``results.json`` has ``kind == "linear"``.
    """

    name = "linear"  # an unregistered linear config (its own ``experiment`` name) runs as this
    kind = "linear"
    help = "a linear-extractor experiment"
    job = staticmethod(run_linear_trial)

    def build_config(self, data: dict[str, Any]) -> LinearExperimentConfig:
        """:func:`build_config`."""
        return build_config(data)

    def resolve_device(self, device: str) -> str:
        """:func:`resolve_device`: the CPU, the one device the float64 spectral code honours."""
        return resolve_device(device)

    def trials(self, cfg: LinearExperimentConfig, ctx: RunContext, device: str) -> list[sweep.Trial]:
        """:func:`linear_trials`, saving models under ``out/models`` with ``--save-models``."""
        return linear_trials(cfg, ctx.out / "models" if ctx.save_models else None)

    def check(self, cfg: LinearExperimentConfig, ctx: RunContext, trials: list[sweep.Trial]) -> Task:
        """Check the first trial's task, every method and attack, and the records already in ``out``.

        In that order, so a bad data file is reported as such; returns that task.
        """
        first_task = task_for(cfg, cfg.seeds[0], cells(cfg)[0][1])
        check_methods_and_attacks(cfg, first_task)
        check_rules(ctx.out, trials)
        _, todo = sweep.split_done(ctx.out, trials)
        if todo:
            log_rank_deficiency(first_task, cfg.rank_rtol)
        return first_task

    def aggregate(
        self,
        cfg: LinearExperimentConfig,
        records: dict[str, dict[str, Any]],
        ctx: RunContext,
        device: str,
        state: Any,
    ) -> dict[str, Any]:
        """:func:`aggregate` over the records keyed by (cell, method, seed)."""
        keyed = {
            (t.payload.cell, t.payload.method.key, t.payload.seed): records[t.key] for t in linear_trials(cfg)
        }
        return aggregate(cfg, keyed, state, device=device, device_requested=ctx.device)

    def summary(self, results: dict[str, Any]) -> str:
        """:func:`summary_table`."""
        return summary_table(results)


class HousePrices(LinearExperiment):
    """House prices (arXiv 2505.23760 §5.1, Table 1): SalePrice on RL rows vs LotArea on the rest."""

    name = "house_prices"
    help = "linear regression on the Ames house prices, 5 methods (Table 1)"


class MnistPairs(LinearExperiment):
    """MNIST digit pairs (arXiv 2505.23760 §5.2, Table 2, Fig. 2): 90 ordered pairs."""

    name = "mnist_pairs"
    help = "linear classification on 90 ordered MNIST digit pairs (Table 2, Fig. 2)"


class Synthetic(LinearExperiment):
    """Synthetic Gaussian tasks with designed spectra (a fast smoke run)."""

    name = "synthetic"
    help = "synthetic Gaussian tasks with designed spectra (seconds; a smoke run)"


def summary_table(results: dict[str, Any]) -> str:
    """A plain-text table of the headline numbers (mean over seeds), (i) first.

    The last column is the spectral κ criterion of Definition 3.1 only; whether a model resists
    real attackers is the report card's verdict (``immunekit evaluate``), said under the table.
    """
    head = (
        f"{'method':<24}{'(i)':>12}{'(ii)':>10}{'RIR':>12}{'primary MSE':>13}{'κ criterion (Def. 3.1)':>24}"
    )
    lines = [head, "-" * len(head)]
    for key, m in results["methods"].items():
        g = {n: (v["mean"] if v["mean"] is not None else math.nan) for n, v in m["metrics"].items()}
        ok = f"{sum(v['immunized'] for v in m['verdict'])}/{len(m['verdict'])} seeds"
        lines.append(
            f"{key:<24}{g['kappa_ratio_harmful']:>12.4g}{g['kappa_ratio_primary']:>10.3g}{g['rir']:>12.4g}"
            f"{g['primary_test_mse']:>13.4f}{ok:>24}"
        )
    lines.append(
        "κ criterion: Definition 3.1 on condition numbers only. Whether a model resists attackers is "
        "the report card's verdict: immunekit evaluate --model DIR/models (run with --save-models)."
    )
    return "\n".join(lines)
