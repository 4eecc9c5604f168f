"""``immunekit run mlac-text``: MLAC's cost of adaptation on discrim-eval (mlac.md §4, §5, §7.2, §8).

The "self-destructing models" experiment (Henderson et al., arXiv 2211.14946) at CPU scale: a BERT
encoder (all-MiniLM-L6-v2, :class:`~immunekit.models.text_encoder.BertTextClassifier`) keeps the
desired task (70 discrim-eval scenarios) while an attacker who fine-tunes it for the harmful task
(gender, C = 3) on n labelled rows should do no better than one who starts from a random
initialisation. Data: :func:`immunekit.data.discrim_text.discrim_splits` (leakage-safe cell splits
``defender_train``, ``defender_val``, ``attack_train``, ``attack_val``, ``attack_test``).

**Model roles** (one model per role and seed; the head has 70 + C outputs, the first 70 being the
desired logits, mlac.md §2):

=================  ============================================================================
role               model
=================  ============================================================================
``random``         the same architecture re-initialised with the BERT initialiser (seeded per seed)
``pretrained``     the untouched released encoder with a seeded BERT-initialised head (not
                   trained: the attacker always attaches a fresh head, so a desired head would not
                   change the harmful measurement; its desired accuracy is the linear probe's)
``desired_tuned``  :class:`~immunekit.defenses.mlac.MLAC`, ``desired_tuned`` preset (λ_good only)
``ac``             :class:`~immunekit.defenses.mlac.AC` (``ac`` preset: λ_bad = 1, K = 0)
``mlac``           :class:`~immunekit.defenses.mlac.MLAC` (``mlac`` preset: λ_lin = 1, K steps)
=================  ============================================================================

The trained roles start from the pretrained model of their seed and are fitted on
``defender_train`` (desired = scenario, harmful = gender) with checkpoint selection on
``defender_val`` (mlac.md §3.4, §7.3); the attacker's splits are never seen in training.

**Trials** (sweep trials; every record is a pure function of its config, so an interrupted run
resumes and a folder written by another configuration is refused). They run in two phases, because
the second reads the models the first writes:

1. ``trials/models/<role>--seed<s>``: build (and for trained roles fit) the model and save it as a
   safetensors checkpoint (:func:`~immunekit.models.checkpoint.save_checkpoint`, atomic) under
   ``out/models/<role>--seed<s>.safetensors``; the record holds the training diagnostics. MLAC runs
   first, so a second-order unroll refused for memory fails within seconds.
2. ``trials/desired/<role>--seed<s>``: desired-task accuracy on ``attack_test`` scenarios: the model's
   own head (its first 70 columns; for ``random`` / ``pretrained`` an untrained head, chance level,
   shown but not meaningful) and a **linear probe on the frozen features** (the harness's
   ``head_reset_probe`` with Adam on features of ``defender_train``, every role alike).
3. ``trials/attacks/<role>/n<n>--seed<s>``: the **cost of adaptation** (§5, §7.2). The attack pool is a
   seeded n-row subset of ``attack_train`` (one permutation per seed, its first n rows: resampled per
   seed, nested over n, and the same rows for every role, so role differences are paired). The
   attacker tunes itself with the harness's :class:`~immunekit.attacks.worst_case.AttackerSearch`
   (Optuna TPE, seeded): ``head_reset_probe`` (fresh head, frozen trunk) or ``full_finetune`` with
   ``reset_head``, Adam, lr log-uniform in [1e-5, 1e-2], steps log-uniform integer in [100, 500]
   (quick; 1,000 faithful), batch ∈ {12, 24, 48}; each trial is scored on ``attack_val``, the chosen
   settings are re-run and reported on ``attack_test`` (the headline). The chosen settings are then
   re-run ``reruns`` times in all (re-run 0 is the search's own; the others with seeds derived from
   (seed, r), the same for every role) and the headline of the (role, n, seed) is their mean
   ``attack_test`` accuracy. Recorded: the chosen hyper-parameters, the ``attack_val`` score, every
   re-run's test and val score, the search's trials and cumulative best, chance (1/C) and majority
   accuracy (the largest class share of ``attack_test``; also the accuracy on ``attack_test`` of
   always predicting the pool's majority class), and for trained roles the desired accuracy of the
   attacked trunk with the model's own head put back (post-adaptation desired accuracy, §8.4).

**Aggregation** (``results.json``, ``kind: "mlac_text"``, rendered by :mod:`immunekit.reports.mlac`):
per role and n the mean, sample std and 95 % percentile-bootstrap CI over seeds
(:func:`immunekit.metrics.stats.summarise`, from 3 seeds) of the test accuracy; the gap
Δ(n) = acc_role(n) − acc_random(n) as paired per-seed differences
(:func:`immunekit.metrics.stats.paired_difference`); the recovery r(n) = Δ(n) / (acc_pretrained(n) −
acc_random(n)) as a ratio of the means (0: as hard to adapt as random, 1: as easy as pretrained),
flagged ``unstable`` when the paired CI of its denominator contains 0; desired accuracies; training
diagnostics; provenance. Records hold scores, settings and row ids, never text or token ids.

**Deviations from the reference protocol** (also listed in ``results["protocol"]["notes"]``):
steps are log-uniform integers (the harness's space) instead of the grid 100, 200, …; all
``n_trials`` trials run (no early stop at 0.99 or after 15 trials without improvement); a trial is
scored at its last step (the searched step count takes the place of the reference's best-of-
checkpoints, which was chosen on the reported split, §7.2), an oracle best-over-checkpoints number on
``attack_test`` is recorded only with ``attack.oracle_every > 0`` and never used as the headline;
the attack task's ``eval_primary`` is the gender split of ``attack_test``, only so that the fresh head
has C outputs (the search's "utility" is therefore not a desired-task score and is not recorded).

**Profiles** (mlac.md §8.3; explicit fields win): ``quick`` K = 4, 2,000 outer steps, ≤ 15 attacker
trials, steps 100–500, 5 re-runs; ``faithful`` K = 16, 5,000 outer steps, 50 trials, 100–1000, 15
re-runs; ``smoke`` a few steps of everything, for tests with ``encoder: tiny``. Seeds: ``seeds``.

**Data sources.** ``data.source`` names an entry of :data:`SOURCES` (``discrim``: the pinned
discrim-eval file with the MiniLM tokenizer). Tests register a small synthetic aligned source
(a function ``source(cfg) -> DiscrimText``); with a process pool the registering module must be
imported in the workers (``immunekit --import``, :func:`immunekit.experiments.sweep.add_worker_imports`).

Whole-split evaluations run in ``eval_batch_size`` (64) row chunks during the trials
(:func:`eval_chunks`). Cost: see the header of the packaged ``configs/mlac_text.yaml``.

References:
    Henderson, Mitchell, Manning, Jurafsky, Finn. Self-Destructing Models: Increasing the Costs of
    Harmful Dual Uses of Foundation Models. AIES 2023, arXiv 2211.14946.

"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from immunekit import assets
from immunekit._dist import launched_world_size
from immunekit._versions import SCHEMA_VERSION
from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.attacks.worst_case import AttackerSearch, SearchConfig, score
from immunekit.config import check_int, config_sha256, load_config, to_dict
from immunekit.data.discrim_text import DiscrimText, discrim_splits
from immunekit.data.task import Dataset, Task, take
from immunekit.defenses import DEFENSES
from immunekit.defenses.mlac import PROFILES, MLACConfig
from immunekit.errors import ConfigError, DataError
from immunekit.experiments import sweep
from immunekit.experiments.provenance import provenance
from immunekit.experiments.registry import OPTIONS, Experiment, RunContext
from immunekit.metrics.stats import RECOMMENDED_MIN_N, paired_difference
from immunekit.metrics.stats import summarise as bootstrap_summary
from immunekit.models.base import ImmunizableModel
from immunekit.models.checkpoint import load_checkpoint, save_checkpoint
from immunekit.models.text_encoder import BertTextClassifier, bert_init_
from immunekit.registry import Registry, did_you_mean

log = logging.getLogger(__name__)

KIND = "mlac_text"
"""``results.json``'s ``kind``; rendered by :mod:`immunekit.reports.mlac`."""
MEASURE_VERSION = "mlac_text/1"
"""Version of what the trials measure; part of every trial's config sha (bump when it changes)."""

ROLES: tuple[str, ...] = ("random", "pretrained", "desired_tuned", "ac", "mlac")
"""Every model role, in display order."""
TRAINED: dict[str, tuple[str, str]] = {
    "desired_tuned": ("mlac", "desired_tuned"),
    "ac": ("ac", "ac"),
    "mlac": ("mlac", "mlac"),
}
"""Trained role → (registered defense, :data:`~immunekit.defenses.mlac.PRESETS` name)."""
TRAIN_ORDER: tuple[str, ...] = ("mlac", "ac", "desired_tuned", "pretrained", "random")
"""Order of the model trials: the expensive (and memory-checked) MLAC first."""
ATTACK_NAMES = {"head_reset_probe": "probe", "full_finetune": "full"}
"""The attacker's two choices (mlac.md §5.5) and their short names in tables."""

PROFILE_SETTINGS: dict[str, dict[str, int]] = {
    "quick": {
        **PROFILES["quick"],
        "n_trials": 15,
        "steps_min": 100,
        "steps_max": 500,
        "reruns": 5,
        "n_startup_trials": 10,
        "probe_steps": 500,
    },
    "faithful": {
        **PROFILES["faithful"],
        "n_trials": 50,
        "steps_min": 100,
        "steps_max": 1000,
        "reruns": 15,
        "n_startup_trials": 20,
        "probe_steps": 1000,
    },
    "smoke": {
        "inner_steps": 1,
        "outer_steps": 3,
        "n_trials": 2,
        "steps_min": 2,
        "steps_max": 4,
        "reruns": 2,
        "n_startup_trials": 1,
        "probe_steps": 5,
    },
}
"""Values of the profile for every setting left ``None`` in the config (mlac.md §8.3; ``smoke``: tests)."""

TINY_PRETRAINED_SEED = 0
"""``encoder: tiny`` has no released weights: a fixed random init stands in for "pretrained"."""

NOTES: tuple[str, ...] = (
    "attacker steps are log-uniform integers in [steps_min, steps_max] (the harness's search space), not "
    "the reference's grid 100, 200, ...",
    "every search runs all n_trials trials (no early stop at accuracy 0.99 or after 15 trials without "
    "improvement)",
    "a search trial is scored at its last step on attack_val; the searched step count stands in for the "
    "reference's best-over-checkpoints, which it chose on the reported split (mlac.md §7.2)",
    "the headline is the mean attack_test accuracy of the re-runs of the settings chosen on attack_val; "
    "the oracle (best checkpoint on attack_test) is logged only with attack.oracle_every > 0",
    "attack pools are nested over n within a seed and shared by every role (paired comparisons)",
    "pretrained = the untouched encoder with a seeded, untrained head; its desired accuracy is the "
    "linear probe's",
    "recovery r(n) is a ratio of means over seeds",
)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the texts come from and how they are split and tokenised."""

    source: str = field(default="discrim", metadata={"help": "data source (SOURCES): discrim or a test's"})
    split_seed: int = field(default=0, metadata={"help": "seed of the (race, age) cell assignment"})
    scrub: Literal["pronouns", "none"] = field(default="pronouns", metadata={"help": "pronoun scrubbing"})
    binary_gender: bool = field(default=False, metadata={"help": "female and male only (C = 2)"})
    max_length: int = field(default=256, metadata={"help": "most tokens per text"})

    def __post_init__(self) -> None:
        check_int("data.split_seed", self.split_seed, 0)
        check_int("data.max_length", self.max_length, 2)


@dataclass(frozen=True, kw_only=True)
class DefenseSettings:
    """How the trained roles are fitted (every λ comes from the role's preset)."""

    inner_steps: int | None = field(default=None, metadata={"help": "MLAC's K (None: the profile's)"})
    outer_steps: int | None = field(
        default=None, metadata={"help": "outer steps of every trained role (None: the profile's)"}
    )
    first_order: bool = field(default=False, metadata={"help": "first-order MLAC (--first-order)"})
    first_order_inner_lr: Literal["sample", "fixed"] = field(
        default="sample",
        metadata={"help": "η of first-order MLAC (meta-learning needs second order): sampled or fixed"},
    )
    validate: bool = field(
        default=True, metadata={"help": "select the checkpoint on defender_val (mlac.md §3.4)"}
    )
    overrides: dict = field(
        default_factory=dict,
        metadata={"help": "MLACConfig fields for every trained role, e.g. {outer_lr: 1e-4}"},
    )
    roles: dict = field(
        default_factory=dict,
        metadata={"help": "MLACConfig fields per role, e.g. {mlac: {inner_batch_sizes: [12]}}"},
    )

    def __post_init__(self) -> None:
        if self.inner_steps is not None:
            check_int("defense.inner_steps", self.inner_steps, 0)
        if self.outer_steps is not None:
            check_int("defense.outer_steps", self.outer_steps, 1)
        unknown = [r for r in self.roles if r not in TRAINED]
        if unknown:
            raise ConfigError(
                f"defense.roles.{unknown[0]}: not a trained role"
                + did_you_mean(str(unknown[0]), list(TRAINED))
            )


@dataclass(frozen=True, kw_only=True)
class AttackSettings:
    """The attacker's search (mlac.md §5.5, §8.3); ``None`` fields come from the profile."""

    n_trials: int | None = field(default=None, metadata={"help": "search trials (quick 15, faithful 50)"})
    steps_min: int | None = field(default=None, metadata={"help": "fewest attack steps (100)"})
    steps_max: int | None = field(
        default=None, metadata={"help": "most attack steps (quick 500, faithful 1000)"}
    )
    lr_min: float = field(default=1e-5, metadata={"help": "lower end of the log-uniform lr"})
    lr_max: float = field(default=1e-2, metadata={"help": "upper end of the log-uniform lr"})
    batch_sizes: tuple[int, ...] = field(default=(12, 24, 48), metadata={"help": "batch size choices"})
    attacks: tuple[str, ...] = field(
        default=("head_reset_probe", "full_finetune"),
        metadata={"help": "probe (fresh head, frozen trunk) and/or full fine-tuning (fresh head)"},
    )
    n_startup_trials: int | None = field(
        default=None, metadata={"help": "random trials before TPE (quick 10, faithful 20)"}
    )
    reruns: int | None = field(
        default=None, metadata={"help": "runs of the chosen settings, the search's own included (5 / 15)"}
    )
    oracle_every: int = field(
        default=0,
        metadata={"help": "also log the oracle (best attack_test checkpoint every k steps); 0: off"},
    )
    val_rows: int | None = field(
        default=None, metadata={"help": "cap on attack_val rows, a fixed seeded subset (None: all)"}
    )
    test_rows: int | None = field(
        default=None, metadata={"help": "cap on attack_test rows, a fixed seeded subset (None: all)"}
    )

    def __post_init__(self) -> None:
        for name in ("n_trials", "steps_min", "steps_max", "reruns", "val_rows", "test_rows"):
            value = getattr(self, name)
            if value is not None:
                check_int(f"attack.{name}", value, 1)
        if self.n_startup_trials is not None:
            check_int("attack.n_startup_trials", self.n_startup_trials, 0)
        check_int("attack.oracle_every", self.oracle_every, 0)
        if not (0 < self.lr_min <= self.lr_max and math.isfinite(self.lr_max)):
            raise ConfigError(
                f"attack lr range [{self.lr_min}, {self.lr_max}] is invalid; need 0 < lr_min <= lr_max"
            )
        if not self.batch_sizes:
            raise ConfigError("attack.batch_sizes is empty; e.g. [12, 24, 48]")
        for b in self.batch_sizes:
            check_int("attack.batch_sizes[]", b, 1)
        unknown = [a for a in self.attacks if a not in ATTACK_NAMES]
        if not self.attacks or unknown:
            bad = unknown[0] if unknown else "(none)"
            raise ConfigError(
                f"attack.attacks: {bad!r} is not one of the attacker's choices {list(ATTACK_NAMES)}"
                + (did_you_mean(bad, list(ATTACK_NAMES)) if unknown else "")
            )


@dataclass(frozen=True, kw_only=True)
class DesiredProbeSettings:
    """The desired-task linear probe on frozen features (every role alike)."""

    enabled: bool = field(default=True, metadata={"help": "measure it"})
    steps: int | None = field(default=None, metadata={"help": "Adam steps (None: the profile's)"})
    lr: float = field(default=1e-2, metadata={"help": "Adam lr"})
    batch_size: int = field(default=64, metadata={"help": "rows per step"})
    train_rows: int | None = field(default=None, metadata={"help": "cap on defender_train rows (None: all)"})
    feature_batch_size: int = field(default=64, metadata={"help": "rows per forward pass"})

    def __post_init__(self) -> None:
        for name in ("steps", "train_rows"):
            if getattr(self, name) is not None:
                check_int(f"desired_probe.{name}", getattr(self, name), 1)
        check_int("desired_probe.batch_size", self.batch_size, 1)
        check_int("desired_probe.feature_batch_size", self.feature_batch_size, 1)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"desired_probe.lr={self.lr!r} is invalid; use a number > 0")


@dataclass(frozen=True, kw_only=True)
class MlacTextConfig:
    """The experiment (module docstring); every field has a default."""

    experiment: str = field(default=KIND, metadata={"help": "experiment name (results label)"})
    profile: Literal["quick", "faithful", "smoke"] = field(
        default="quick", metadata={"help": "quick / faithful (mlac.md §8.3) or smoke (tests)"}
    )
    roles: tuple[str, ...] = field(default=ROLES, metadata={"help": "model roles (--roles)"})
    n_values: tuple[int, ...] = field(default=(20, 50, 100, 200), metadata={"help": "attacker pool sizes n"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "outer seeds (--seeds)"})
    encoder: Literal["minilm", "tiny"] = field(
        default="minilm", metadata={"help": "all-MiniLM-L6-v2, or a tiny random BERT (tests)"}
    )
    tiny: dict = field(
        default_factory=lambda: {"vocab_size": 30522, "max_position_embeddings": 512},
        metadata={"help": "tiny_config sizes for encoder: tiny"},
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    defense: DefenseSettings = field(default_factory=DefenseSettings, metadata={"help": "trained roles"})
    attack: AttackSettings = field(default_factory=AttackSettings, metadata={"help": "attacker search"})
    desired_probe: DesiredProbeSettings = field(
        default_factory=DesiredProbeSettings, metadata={"help": "desired-task probe"}
    )
    n_boot: int = field(default=10_000, metadata={"help": "bootstrap resamples of the CIs"})
    eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "rows per forward pass of the harness's whole-split evaluations during the trials "
            "(not part of the trials' identity: results agree to float rounding)"
        },
    )

    def __post_init__(self) -> None:
        if not self.roles:
            raise ConfigError(f"roles is empty; choose from {list(ROLES)}")
        for r in self.roles:
            if r not in ROLES:
                raise ConfigError(f"unknown role {r!r}{did_you_mean(str(r), list(ROLES))}")
        if len(set(self.roles)) != len(self.roles):
            raise ConfigError(f"roles repeat: {list(self.roles)}; list each role once")
        if not self.n_values:
            raise ConfigError("n_values is empty; e.g. [20, 50, 100, 200]")
        for n in self.n_values:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(
                    f"n_values holds {n!r}; every attacker pool size n must be an integer >= 1 "
                    "(e.g. [20, 50, 100, 200])"
                )
        if len(set(self.n_values)) != len(self.n_values):
            raise ConfigError(f"n_values repeat: {list(self.n_values)}; list each n once")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and non-empty, got {list(self.seeds)}")
        for s in self.seeds:
            check_int("seeds[]", s, 0)
        check_int("n_boot", self.n_boot, 100)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        if self.encoder == "tiny":
            from immunekit.models.text_encoder import tiny_config

            try:
                tiny_config(**self.tiny)
            except TypeError as err:
                raise ConfigError(f"tiny: {err}; keys are those of tiny_config") from None

    def setting(self, name: str) -> int:
        """The value of a profile-backed setting: the config's own, else the profile's."""
        own = {
            "inner_steps": self.defense.inner_steps,
            "outer_steps": self.defense.outer_steps,
            "n_trials": self.attack.n_trials,
            "steps_min": self.attack.steps_min,
            "steps_max": self.attack.steps_max,
            "reruns": self.attack.reruns,
            "n_startup_trials": self.attack.n_startup_trials,
            "probe_steps": self.desired_probe.steps,
        }[name]
        return int(PROFILE_SETTINGS[self.profile][name] if own is None else own)

    def resolved(self) -> dict[str, int]:
        """Every profile-backed setting as it will be used."""
        return {k: self.setting(k) for k in PROFILE_SETTINGS["quick"]}


def build_config(data: Mapping[str, Any]) -> MlacTextConfig:
    """Strictly load the config and check what can be checked without data (defense presets, steps).

    Raises:
        ConfigError: an unknown key (with a suggestion), an unknown role, n ≤ 0, a bad defense
            override, or steps_max < steps_min.

    """
    cfg = load_config(MlacTextConfig, dict(data), where=KIND)
    if cfg.setting("steps_max") < cfg.setting("steps_min"):
        raise ConfigError(
            f"attack.steps_max={cfg.setting('steps_max')} < steps_min={cfg.setting('steps_min')}; "
            "raise steps_max or lower steps_min"
        )
    for role in cfg.roles:
        if role in TRAINED:
            defense_config(cfg, role)
    search_config(cfg, "check")
    return cfg


def defense_config(cfg: MlacTextConfig, role: str) -> MLACConfig:
    """The MLAC config of a trained role: its preset, the profile's steps, then the config's overrides.

    Raises:
        ConfigError: not a trained role, or overrides the preset rejects (e.g. first order with a
            meta-learned η).

    """
    if role not in TRAINED:
        raise ConfigError(f"role {role!r} is not trained; trained roles: {list(TRAINED)}")
    _, preset = TRAINED[role]
    over: dict[str, Any] = {"outer_steps": cfg.setting("outer_steps")}
    if role == "mlac":
        over["inner_steps"] = cfg.setting("inner_steps")
        over["first_order"] = cfg.defense.first_order
        if cfg.defense.first_order:
            over["inner_lr"] = cfg.defense.first_order_inner_lr
    if not cfg.defense.validate:
        over["val_every"] = 0
    over.update(cfg.defense.overrides)
    over.update(cfg.defense.roles.get(role, {}))
    return MLACConfig.preset(preset, **over)


def search_config(cfg: MlacTextConfig, study_name: str) -> SearchConfig:
    """The harness's attacker search of this config (Adam only, constant lr, fresh heads)."""
    a = cfg.attack
    overrides = {"full_finetune": {"reset_head": True}} if "full_finetune" in a.attacks else {}
    return SearchConfig(
        n_trials=cfg.setting("n_trials"),
        steps=cfg.setting("steps_min"),
        steps_max=cfg.setting("steps_max"),
        lr_min=a.lr_min,
        lr_max=a.lr_max,
        batch_sizes=tuple(a.batch_sizes),
        optimizers=("adam",),
        schedules=("constant",),
        attacks=tuple(a.attacks),
        attack_overrides=overrides,
        split="attack",
        n_startup_trials=cfg.setting("n_startup_trials"),
        storage=None,
        study_name=study_name,
    )


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

Source = Callable[[MlacTextConfig], DiscrimText]
SOURCES: Registry[Source] = Registry("mlac-text data source")
"""Data sources by name: ``source(cfg) -> DiscrimText`` (every split with both label sets)."""


@SOURCES.register("discrim")
def discrim_source(cfg: MlacTextConfig) -> DiscrimText:
    """The pinned discrim-eval file, MiniLM-tokenised (:func:`immunekit.data.discrim_text.discrim_splits`)."""
    d = cfg.data
    return discrim_splits(
        seed=d.split_seed, scrub=d.scrub, binary_gender=d.binary_gender, max_length=d.max_length
    )


_DATA_CACHE: dict[tuple[int, str], DiscrimText] = {}
REQUIRED_SPLITS = ("defender_train", "attack_train", "attack_val", "attack_test")


def load_data(cfg: MlacTextConfig) -> DiscrimText:
    """The config's data (cached per process by source and data settings).

    Raises:
        ConfigError: an unknown source.
        DataError: a required split is missing.

    """
    fn = SOURCES.get(cfg.data.source)
    key = (id(fn), json.dumps(to_dict(cfg.data), sort_keys=True))
    if key not in _DATA_CACHE:
        data = fn(cfg)
        missing = [s for s in REQUIRED_SPLITS if s not in data.splits]
        if missing:
            raise DataError(f"data source {cfg.data.source!r} lacks the split(s) {missing}")
        _DATA_CACHE.clear()  # one data set per process is enough
        _DATA_CACHE[key] = data
    return _DATA_CACHE[key]


def classes(data: DiscrimText) -> tuple[int, int]:
    """(desired classes C_g, harmful classes C_h): the task's info, else 1 + the largest label."""
    info = data.info or {}
    c_g = info.get("classes_primary") or 1 + max(int(s.scenario.max()) for s in data.splits.values())
    c_h = info.get("classes_harmful") or 1 + max(int(s.gender.max()) for s in data.splits.values())
    return int(c_g), int(c_h)


def data_summary(cfg: MlacTextConfig, data: DiscrimText) -> dict[str, Any]:
    """What the record says about the data (sizes, classes, versions; no text)."""
    c_g, c_h = classes(data)
    info = {k: v for k, v in (data.info or {}).items() if k not in ("cells", "scenario_ids")}
    return {
        "source": cfg.data.source,
        "name": data.task.name,
        "version": data.task.version,
        "sizes": {name: len(s) for name, s in data.splits.items()},
        "classes_desired": c_g,
        "classes_harmful": c_h,
        "info": json.loads(json.dumps(info, default=str)),
    }


def _subseed(*parts: object) -> int:
    """A non-negative 63-bit seed from sha256 of the parts (stable across processes)."""
    text = ":".join(str(p) for p in ("mlac_text", *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def attack_rows(pool: int, n: int, seed: int) -> Tensor:
    """The attacker's n rows of a pool of ``pool``: the first n of one seeded permutation, sorted.

    The permutation depends on the seed only, so pools are nested over n within a seed and identical
    for every role (paired comparisons).

    Example:
        >>> small, large, other = attack_rows(40, 5, 0), attack_rows(40, 10, 0), attack_rows(40, 5, 1)
        >>> set(small.tolist()) <= set(large.tolist()), len(small), other.tolist() == small.tolist()
        (True, 5, False)

    """
    if n > pool:
        raise ConfigError(f"n={n} exceeds the attack pool of {pool} rows (attack_train)")
    gen = torch.Generator().manual_seed(_subseed("attack-rows", seed))
    return torch.randperm(pool, generator=gen)[:n].sort().values


def _cap(split: Dataset, rows: int | None, name: str) -> Dataset:
    """``rows`` rows of ``split`` drawn by a permutation fixed per split name (the same for every trial)."""
    if rows is None or rows >= len(split):
        return split
    gen = torch.Generator().manual_seed(_subseed("cap", name))
    out = take(split, torch.randperm(len(split), generator=gen)[:rows].sort().values)
    assert isinstance(out, Dataset)
    return out


def attack_task(cfg: MlacTextConfig, data: DiscrimText, rows: Tensor) -> Task:
    """The harness task of one cost-of-adaptation trial.

    ``attack`` = the n rows of ``attack_train`` (gender), ``val_harmful`` = ``attack_val`` (the
    search's objective), ``eval_harmful`` = ``attack_test`` (reported); ``eval_primary`` is the
    gender split of ``attack_test`` too, only so that the harness's fresh head has C_h outputs.
    """
    test = _cap(data["attack_test"].dataset("gender"), cfg.attack.test_rows, "attack_test")
    pool = data["attack_train"].dataset("gender")
    attack = take(pool, rows)
    assert isinstance(attack, Dataset)
    return Task(
        name=f"{data.task.name}:cost-of-adaptation",
        version=data.task.version,
        loss="ce",
        primary=data["defender_train"].dataset("scenario"),
        harmful=data["defender_train"].dataset("gender"),
        attack=attack,
        val_harmful=_cap(data["attack_val"].dataset("gender"), cfg.attack.val_rows, "attack_val"),
        eval_harmful=test,
        eval_primary=test,
        info={"attack_rows": len(rows)},
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def base_model(
    cfg: MlacTextConfig, kind: Literal["pretrained", "random"], seed: int, outputs: int
) -> BertTextClassifier:
    """The untouched encoder with a seeded head (``pretrained``) or a seeded BERT re-init (``random``)."""
    if kind == "random":
        gen = _subseed("random", seed)
        if cfg.encoder == "minilm":
            return BertTextClassifier.random_init(outputs, generator=gen)
        return BertTextClassifier.tiny(outputs, generator=gen, **cfg.tiny)
    head_gen = torch.Generator().manual_seed(_subseed("head", seed))
    if cfg.encoder == "minilm":
        return BertTextClassifier.minilm(outputs, generator=head_gen)
    model = BertTextClassifier.tiny(outputs, generator=TINY_PRETRAINED_SEED, **cfg.tiny)
    bert_init_(model.head, head_gen, std=float(model.hf_config.initializer_range))
    return model


@torch.no_grad()
def features(model: ImmunizableModel, x: Tensor, batch_size: int) -> Tensor:
    """Φ(x) ``(N, D)`` in eval mode, ``batch_size`` rows per pass (mode flags restored)."""
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        parts = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
    return torch.cat(parts) if parts else torch.empty(0, 0)


@torch.no_grad()
def head_accuracy(head: torch.nn.Module, feats: Tensor, y: Tensor, columns: int) -> float:
    """Accuracy of ``head(feats)[:, :columns]``'s arg-max against ``y``."""
    if len(y) == 0:
        return float("nan")
    pred = head(feats)[:, :columns].argmax(1)
    return float((pred == y).double().mean())


def desired_probe(
    cfg: MlacTextConfig, train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor, seed: int
) -> dict[str, Any]:
    """The harness's ``head_reset_probe`` (Adam) on frozen features: desired accuracy on ``attack_test``."""
    from immunekit.experiments.deep_vision import FeatureProbeModel

    ps = cfg.desired_probe
    train = Dataset(train_feats, train_y, tuple(f"train:{i}" for i in range(len(train_y))))
    test = Dataset(test_feats, test_y, tuple(f"test:{i}" for i in range(len(test_y))))
    ftask = Task(
        name="desired-probe",
        version="frozen features",
        loss="ce",
        primary=train,
        harmful=train,
        attack=train,
        eval_primary=test,
        eval_harmful=test,
    )
    budget = AttackBudget(
        steps=cfg.setting("probe_steps"), optimizer="adam", lr=ps.lr, batch_size=ps.batch_size, eval_every=0
    )
    probe = ATTACKS.get("head_reset_probe")(split="attack", eval_split="eval_harmful")
    outputs = 1 + max(int(train_y.max()), int(test_y.max()))
    result = probe(FeatureProbeModel(int(train_feats.shape[1]), outputs), ftask, budget, seed=seed)
    return {
        "accuracy": score(result.model, test, "ce"),
        "train_accuracy": score(result.model, train, "ce"),
        "steps": budget.steps,
        "lr": ps.lr,
        "batch_size": ps.batch_size,
        "train_rows": len(train_y),
    }


# ---------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelTrial:
    """Build (and for trained roles fit) one model and save it."""

    cfg: MlacTextConfig
    role: str
    seed: int
    path: str


@dataclass(frozen=True)
class DesiredTrial:
    """Desired-task accuracy of one saved model."""

    cfg: MlacTextConfig
    role: str
    seed: int
    path: str


@dataclass(frozen=True)
class AttackTrial:
    """The cost of adaptation of one saved model at one pool size n."""

    cfg: MlacTextConfig
    role: str
    seed: int
    n: int
    path: str


def model_path(out: Path, role: str, seed: int) -> Path:
    """``out/models/<role>--seed<s>.safetensors``."""
    return out / "models" / f"{role}--seed{seed}.safetensors"


def model_sha(cfg: MlacTextConfig, role: str, seed: int) -> str:
    """Identity of a model trial: role, seed, encoder, data and the role's defense config only."""
    return config_sha256(
        {
            "version": MEASURE_VERSION,
            "role": role,
            "seed": seed,
            "encoder": cfg.encoder,
            "tiny": cfg.tiny if cfg.encoder == "tiny" else None,
            "data": to_dict(cfg.data),
            "defense": to_dict(defense_config(cfg, role)) if role in TRAINED else None,
            "validate": cfg.defense.validate if role in TRAINED else None,
        }
    )


def _thin(history: Sequence[Mapping[str, Any]], keep: int = 50) -> list[dict[str, Any]]:
    """At most ``keep`` evenly spaced outer-step records (first and last kept), scalar fields only."""
    n = len(history)
    if not n:
        return []
    idx = sorted({round(i * (n - 1) / max(keep - 1, 1)) for i in range(min(keep, n))})
    fields = ("step", "total", "good_ce", "adv_ce_mean", "adj_ce_mean", "grad_pen", "inner_lr", "seconds")
    return [{k: history[i].get(k) for k in fields if k in history[i]} for i in idx]


def _checkpoint_metadata(cfg: MlacTextConfig, role: str, seed: int, data: DiscrimText) -> dict[str, Any]:
    c_g, c_h = classes(data)
    meta: dict[str, Any] = {
        "experiment": cfg.experiment,
        "kind": KIND,
        "role": role,
        "seed": seed,
        "encoder": cfg.encoder,
        "desired_columns": c_g,
        "harmful_classes": c_h,
        "task_version": data.task.version,
        "defense": TRAINED[role][0] if role in TRAINED else None,
        "preset": TRAINED[role][1] if role in TRAINED else None,
    }
    if role != "pretrained" and "pretrained" in cfg.roles:  # `immunekit evaluate`'s default reference
        meta["reference_model"] = f"pretrained--seed{seed}.safetensors"  # a file beside this one
    if cfg.data.source == "discrim":  # `immunekit evaluate --model` builds the task from these
        meta["task"] = "discrim_gender"
        meta["task_config"] = {
            "seed": cfg.data.split_seed,
            "scrub": cfg.data.scrub,
            "binary_gender": cfg.data.binary_gender,
            "max_length": cfg.data.max_length,
        }
    return meta


def run_model_trial(trial: ModelTrial) -> dict[str, Any]:
    """Build the role's model (fit it for trained roles) and save it (module docstring, phase 1)."""
    start = time.perf_counter()
    cfg, role, seed = trial.cfg, trial.role, trial.seed
    data = load_data(cfg)
    c_g, c_h = classes(data)
    base = base_model(cfg, "random" if role == "random" else "pretrained", seed, c_g + c_h)
    record: dict[str, Any] = {"phase": "model", "role": role, "seed": seed}
    if role in TRAINED:
        name, preset = TRAINED[role]
        dcfg = defense_config(cfg, role)
        defense = DEFENSES.get(name)(dcfg)
        validation = None
        if cfg.defense.validate and dcfg.val_every > 0 and "defender_val" in data.splits:
            val = data["defender_val"]
            validation = (val.dataset("scenario"), val.dataset("gender"))
        model = defense.fit(base, data.task, seed=seed, validation=validation)  # type: ignore[call-arg]
        info = dict(getattr(defense, "info_", {}) or {})
        history = list(getattr(defense, "history_", []) or [])
        val_info = dict(info.get("validation") or {})
        record["training"] = {
            "defense": name,
            "preset": preset,
            "config": to_dict(dcfg),
            "order": info.get("order"),
            "inner_steps": info.get("inner_steps"),
            "inner_lr_mode": info.get("inner_lr_mode"),
            "adv_head_init": info.get("adv_head_init"),
            "outer_steps_run": len(history),
            "outer_steps_per_s": info.get("outer_steps_per_s"),
            "seconds_train": info.get("seconds_train"),
            "seconds_validation": info.get("seconds_validation"),
            "peak_rss_gb": info.get("peak_rss_gb"),
            "validation": {
                k: val_info.get(k) for k in ("source", "rows", "best_step", "best_loss", "selected")
            },
            "validation_curve": val_info.get("curve") or [],
            "history": _thin(history),
            "parameters": info.get("parameters"),
        }
    else:
        model = base
        record["training"] = None
    model.eval()
    path = Path(trial.path)
    save_checkpoint(model, path, metadata=_checkpoint_metadata(cfg, role, seed, data))
    record.update(
        model_file=f"models/{path.name}",
        model_sha256=assets.sha256_file(path),
        parameters=sum(p.numel() for p in model.parameters()),
        seconds={"trial": time.perf_counter() - start},
    )
    return json.loads(json.dumps(record, default=str))


def _load(path: str) -> ImmunizableModel:
    """The model a model trial saved at ``out/models/<name>.safetensors``, checked against its record."""
    file = Path(path)
    record = sweep.trial_file(file.parents[1], f"trials/models/{file.name.removesuffix('.safetensors')}")
    expected = json.loads(record.read_text()).get("model_sha256") if record.is_file() else None
    if not file.is_file() or (expected is not None and assets.sha256_file(file) != expected):
        raise ConfigError(
            f"the model {path} is missing or differs from the one its trial saved; delete {record} to "
            "rebuild it, or rerun into a new --out"
        )
    return load_checkpoint(path).eval()


def run_desired_trial(trial: DesiredTrial) -> dict[str, Any]:
    """Desired accuracy on ``attack_test``: own head and a linear probe on frozen features (phase 2)."""
    start = time.perf_counter()
    cfg = trial.cfg
    data = load_data(cfg)
    c_g, _ = classes(data)
    model = _load(trial.path)
    bs = cfg.desired_probe.feature_batch_size
    test = data["attack_test"]
    test_feats = features(model, test.x, bs)
    own = head_accuracy(model.head, test_feats, test.scenario, c_g)
    record: dict[str, Any] = {
        "phase": "desired",
        "role": trial.role,
        "seed": trial.seed,
        "own_head": own,
        "own_head_trained": trial.role in TRAINED,
        "data": data_summary(cfg, data),
        "probe": None,
    }
    if cfg.desired_probe.enabled:
        train = data["defender_train"]
        rows = cfg.desired_probe.train_rows
        x, y = (train.x, train.scenario) if rows is None else (train.x[:rows], train.scenario[:rows])
        train_feats = features(model, x, bs)
        record["probe"] = desired_probe(
            cfg, train_feats, y, test_feats, test.scenario, _subseed("probe", trial.seed)
        )
    record["seconds"] = {"trial": time.perf_counter() - start}
    return record


def _majority(train_y: Tensor, test_y: Tensor, c_h: int) -> dict[str, float]:
    test_counts = torch.bincount(test_y, minlength=c_h).double()
    train_counts = torch.bincount(train_y, minlength=c_h)
    top = int(train_counts.argmax())  # ties: the smallest label
    return {
        "chance": 1.0 / c_h,
        "majority": float(test_counts.max() / test_counts.sum()),
        "majority_from_pool": float((test_y == top).double().mean()),
        "pool_majority_class": top,
    }


def run_attack_trial(trial: AttackTrial) -> dict[str, Any]:
    """The attacker search and its re-runs on one model at one n (module docstring, phase 2)."""
    start = time.perf_counter()
    cfg, role, seed, n = trial.cfg, trial.role, trial.seed, trial.n
    data = load_data(cfg)
    c_g, c_h = classes(data)
    model = _load(trial.path)
    pool = data["attack_train"]
    rows = attack_rows(len(pool), n, seed)
    task = attack_task(cfg, data, rows)
    val = task.val_harmful
    assert val is not None
    search = AttackerSearch(search_config(cfg, f"{KIND}/{role}/n{n}/seed{seed}"))
    template = AttackBudget(
        steps=cfg.setting("steps_min"), optimizer="adam", eval_every=cfg.attack.oracle_every
    )
    t0 = time.perf_counter()
    found = search.run(model, task, seed=seed, budget=template)
    search_seconds = time.perf_counter() - t0
    chosen = found.chosen
    budget = load_config(AttackBudget, chosen["budget"], where="chosen budget")
    first_val = score(found.result.model, val, "ce")  # the search's value is the trial's, not the re-run's
    reruns = [{"rerun": 0, "seed": seed, "test": found.eval_harm, "val": first_val}]
    t0 = time.perf_counter()
    for r in range(1, cfg.setting("reruns")):
        s = _subseed("rerun", seed, r)
        res = ATTACKS.get(chosen["attack"])(**chosen["config"])(model, task, budget, seed=s)
        reruns.append(
            {
                "rerun": r,
                "seed": s,
                "test": score(res.model, task.eval_harmful, "ce"),
                "val": score(res.model, val, "ce"),
            }
        )
    rerun_seconds = time.perf_counter() - t0
    tests = [r["test"] for r in reruns]
    record: dict[str, Any] = {
        "phase": "attack",
        "role": role,
        "seed": seed,
        "n": n,
        "rows": [pool.ids[i] for i in rows.tolist()],
        "test_accuracy": statistics.fmean(tests),
        "test_accuracy_search_rerun": found.eval_harm,
        "val_accuracy": found.best_value,
        "reruns": reruns,
        "chosen": {
            "attack": chosen["attack"],
            "optimizer": budget.optimizer,
            "lr": budget.lr,
            "steps": budget.steps,
            "batch_size": budget.batch_size,
            "trial": chosen["trial"],
            "key": chosen["key"],
        },
        "search": {
            "trials": [
                {
                    "number": t["number"],
                    "state": t["state"],
                    "value": t["value"],
                    **{k: t["params"].get(k) for k in ("attack", "lr", "steps", "batch_size")},
                }
                for t in found.trials
            ],
            "cumulative_best": found.cumulative_best,
            "n_trials": found.n_trials_effective,
            "objective": "accuracy on attack_val",
            "reported": "accuracy on attack_test",
        },
        "baselines": _majority(task.attack.y, task.eval_harmful.y, c_h),
        "oracle_test": None,
        "desired_after_attack": None,
    }
    if cfg.attack.oracle_every > 0:
        curve = found.result.harm_curve()
        record["oracle_test"] = max(h for _, h in curve) if curve else None
    if role in TRAINED:  # the attacked trunk with the model's own desired head put back (§8.4)
        test = data["attack_test"]
        bs = cfg.desired_probe.feature_batch_size
        trunk = features(found.result.model, test.x, bs)
        record["desired_after_attack"] = head_accuracy(model.head, trunk, test.scenario, c_g)
    record["seconds"] = {
        "search": search_seconds,
        "reruns": rerun_seconds,
        "trial": time.perf_counter() - start,
    }
    return record


@contextlib.contextmanager
def eval_chunks(rows: int) -> Iterator[None]:
    """Evaluate whole splits ``rows`` rows per forward pass inside the block.

    The harness's default is :data:`immunekit.attacks.base.EVAL_BATCH_SIZE` (1,024), read at call
    time; it is restored afterwards. An eager-attention BERT on 840 rows of ~240 tokens in one pass
    holds attention scores of 840 × heads × 240² floats per layer (gigabytes for MiniLM); 64-row
    chunks do the same arithmetic with a small peak (measured 4× faster on the tiny encoder).
    """
    from immunekit.attacks import base

    before = base.EVAL_BATCH_SIZE
    base.EVAL_BATCH_SIZE = rows
    try:
        yield
    finally:
        base.EVAL_BATCH_SIZE = before


def run_trial(payload: ModelTrial | DesiredTrial | AttackTrial) -> dict[str, Any]:
    """The sweep job: dispatch on the payload's phase.

    Evaluations run in ``eval_batch_size`` chunks (:func:`eval_chunks`), and torch's global generator
    (which dropout draws from: MiniLM trains with dropout 0.1, and the harness's attacks do not seed
    it) is forked and seeded from (phase, seed, n), the same for every role, so a trial's record does
    not depend on the trials a worker ran before it; the caller's generator is restored afterwards.
    """
    phase = type(payload).__name__
    with eval_chunks(payload.cfg.eval_batch_size), torch.random.fork_rng(devices=[]):
        torch.manual_seed(_subseed("dropout", phase, payload.seed, getattr(payload, "n", None)))
        if isinstance(payload, ModelTrial):
            return run_model_trial(payload)
        if isinstance(payload, DesiredTrial):
            return run_desired_trial(payload)
        return run_attack_trial(payload)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def summarise(values: Sequence[Any], *, n_boot: int = 10_000) -> dict[str, Any]:
    """Mean, sample std and the 95 % percentile-bootstrap CI (from 3 values) of the finite values.

    Example:
        >>> s = summarise([0.5, 0.6, 0.7], n_boot=1000)
        >>> round(s["mean"], 6), s["n"], s["ci_low"] <= s["mean"] <= s["ci_high"]
        (0.6, 3, True)

    """
    present = [f for f in (_finite(v) for v in values) if f is not None]
    out: dict[str, Any] = {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else (0.0 if present else None),
        "ci_low": None,
        "ci_high": None,
        "confidence": 0.95,
        "n": len(present),
        "values": [_finite(v) for v in values],
    }
    if len(present) >= RECOMMENDED_MIN_N:
        s = bootstrap_summary(present, confidence=0.95, n_boot=n_boot, seed=0)
        out.update(
            ci_low=s.ci_low, ci_high=s.ci_high, ci_method=f"bootstrap {s.method}, {s.n_boot} resamples"
        )
    return out


def paired(a: Sequence[Any], b: Sequence[Any], *, n_boot: int = 10_000) -> dict[str, Any] | None:
    """Paired per-seed differences a_i − b_i (pairs with both values finite): mean, std, 95 % CI."""
    pairs = [
        (x, y)
        for x, y in ((_finite(u), _finite(v)) for u, v in zip(a, b, strict=True))
        if x is not None and y is not None
    ]
    if not pairs:
        return None
    diffs = [x - y for x, y in pairs]
    out: dict[str, Any] = {
        "mean": statistics.fmean(diffs),
        "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "ci_low": None,
        "ci_high": None,
        "n": len(diffs),
        "values": diffs,
    }
    if len(pairs) >= RECOMMENDED_MIN_N:
        p = paired_difference([x for x, _ in pairs], [y for _, y in pairs], n_boot=n_boot, seed=0)
        out.update(
            ci_low=p.ci_low,
            ci_high=p.ci_high,
            frac_positive=p.frac_positive,
            ci_method=f"paired bootstrap {p.method}",
        )
    return out


def _by_seed(
    records: Mapping[str, Mapping[str, Any]], phase: str
) -> dict[tuple[Any, ...], Mapping[str, Any]]:
    out: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for r in records.values():
        if r.get("phase") != phase:
            continue
        key = (r["role"], r.get("n"), int(r["seed"])) if phase == "attack" else (r["role"], int(r["seed"]))
        out[key] = r
    return out


def aggregate_cost(
    cfg: MlacTextConfig, attacks: Mapping[tuple[Any, ...], Mapping[str, Any]]
) -> dict[str, Any]:
    """Per role and n: test / val accuracy summaries, choices, Δ(n) vs random and r(n)."""
    seeds = list(cfg.seeds)
    cost: dict[str, Any] = {}

    def values(role: str, n: int, key: str) -> list[Any]:
        return [attacks[(role, n, s)].get(key) if (role, n, s) in attacks else None for s in seeds]

    for role in cfg.roles:
        per_n: dict[str, Any] = {}
        for n in cfg.n_values:
            recs = [attacks.get((role, n, s)) for s in seeds]
            choices: dict[str, int] = {}
            for r in recs:
                if r is not None:
                    name = ATTACK_NAMES.get(r["chosen"]["attack"], r["chosen"]["attack"])
                    choices[name] = choices.get(name, 0) + 1
            test = values(role, n, "test_accuracy")
            entry: dict[str, Any] = {
                "test_accuracy": summarise(test, n_boot=cfg.n_boot),
                "val_accuracy": summarise(values(role, n, "val_accuracy"), n_boot=cfg.n_boot),
                "test_accuracy_search_rerun": summarise(
                    values(role, n, "test_accuracy_search_rerun"), n_boot=cfg.n_boot
                ),
                "oracle_test": summarise(values(role, n, "oracle_test"), n_boot=cfg.n_boot),
                "desired_after_attack": summarise(values(role, n, "desired_after_attack"), n_boot=cfg.n_boot),
                "chosen": [None if r is None else {"seed": r["seed"], **r["chosen"]} for r in recs],
                "attack_choice": choices,
                "gap": None,
                "recovery": None,
            }
            if "random" in cfg.roles and role != "random":
                entry["gap"] = paired(test, values("random", n, "test_accuracy"), n_boot=cfg.n_boot)
            per_n[str(n)] = entry
        cost[role] = per_n
    if "random" in cfg.roles and "pretrained" in cfg.roles:
        for n in cfg.n_values:
            den = paired(
                values("pretrained", n, "test_accuracy"),
                values("random", n, "test_accuracy"),
                n_boot=cfg.n_boot,
            )
            for role in cfg.roles:
                gap = cost[role][str(n)]["gap"] if role != "random" else {"mean": 0.0}
                if den is None or gap is None:
                    continue
                d = den["mean"]
                unstable = den.get("ci_low") is None or den["ci_low"] <= 0.0 <= den["ci_high"]
                cost[role][str(n)]["recovery"] = {
                    "value": None if abs(d) < 1e-12 else gap["mean"] / d,
                    "denominator": d,
                    "denominator_ci": [den.get("ci_low"), den.get("ci_high")],
                    "unstable": bool(unstable),
                    "definition": "mean Δ(n) / mean (acc_pretrained(n) − acc_random(n)) over seeds",
                }
    return cost


def aggregate_desired(
    cfg: MlacTextConfig, desired: Mapping[tuple[Any, ...], Mapping[str, Any]]
) -> dict[str, Any]:
    """Per role: own-head and probe desired accuracy on attack_test scenarios over seeds."""
    out: dict[str, Any] = {}
    for role in cfg.roles:
        recs = [desired.get((role, s)) for s in cfg.seeds]
        out[role] = {
            "own_head": summarise([None if r is None else r["own_head"] for r in recs], n_boot=cfg.n_boot),
            "own_head_trained": role in TRAINED,
            "probe": summarise(
                [None if r is None or r.get("probe") is None else r["probe"]["accuracy"] for r in recs],
                n_boot=cfg.n_boot,
            ),
        }
    return out


def aggregate_training(
    cfg: MlacTextConfig, models: Mapping[tuple[Any, ...], Mapping[str, Any]]
) -> dict[str, Any]:
    """Per trained role: defense settings and per-seed diagnostics (best step, speed, time)."""
    out: dict[str, Any] = {}
    for role in cfg.roles:
        recs = [models.get((role, s)) for s in cfg.seeds]
        trained = [r["training"] for r in recs if r is not None and r.get("training")]
        if not trained:
            out[role] = {
                "trained": False,
                "model_files": [r.get("model_file") for r in recs if r is not None],
            }
            continue
        first = trained[0]
        out[role] = {
            "trained": True,
            "defense": first["defense"],
            "preset": first["preset"],
            "order": first["order"],
            "inner_steps": first["inner_steps"],
            "inner_lr_mode": first["inner_lr_mode"],
            "adv_head_init": first["adv_head_init"],
            "outer_steps": first["config"]["outer_steps"],
            "loss_weights": {
                k: first["config"][k] for k in ("lambda_good", "lambda_bad", "lambda_lin", "lambda_grad")
            },
            "per_seed": [
                {
                    "seed": s,
                    "best_step": t["validation"].get("best_step"),
                    "best_loss": t["validation"].get("best_loss"),
                    "outer_steps_per_s": t["outer_steps_per_s"],
                    "seconds_train": t["seconds_train"],
                    "peak_rss_gb": t["peak_rss_gb"],
                    "validation_curve": t["validation_curve"],
                }
                for s, t in zip(cfg.seeds, (r["training"] if r else None for r in recs), strict=True)
                if t
            ],
            "model_files": [r.get("model_file") for r in recs if r is not None],
        }
    return out


def _baselines(attacks: Mapping[tuple[Any, ...], Mapping[str, Any]], cfg: MlacTextConfig) -> dict[str, Any]:
    """Chance, majority share of attack_test, and per n the pool-majority accuracy over seeds.

    The pools depend on (n, seed) only, not on the role, so each seed counts once.
    """
    if not attacks:
        return {}
    first = next(iter(attacks.values()))["baselines"]
    pool: dict[str, Any] = {}
    for n in cfg.n_values:
        per_seed = {k[2]: r["baselines"]["majority_from_pool"] for k, r in attacks.items() if k[1] == n}
        pool[str(n)] = summarise([per_seed.get(s) for s in cfg.seeds], n_boot=cfg.n_boot)
    return {"chance": first["chance"], "majority": first["majority"], "majority_from_pool": pool}


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


class MlacText(Experiment):
    """``immunekit run mlac-text``: MLAC's cost of adaptation on discrim-eval (module docstring)."""

    name = "mlac_text"
    kind = KIND
    help = "self-destructing models: MLAC / AC / desired-tuned on discrim-eval, cost of adaptation vs n"
    options = OPTIONS.get("mlac_text", ())
    job = staticmethod(run_trial)
    cpu_only = True

    def build_config(self, data: dict[str, Any]) -> MlacTextConfig:
        """:func:`build_config`."""
        return build_config(data)

    def trials(self, cfg: MlacTextConfig, ctx: RunContext, device: str) -> list[sweep.Trial]:
        """Model trials (MLAC first), then desired and attack trials (see the module docstring)."""
        out: list[sweep.Trial] = []
        shas = {(r, s): model_sha(cfg, r, s) for r in cfg.roles for s in cfg.seeds}
        for role in [r for r in TRAIN_ORDER if r in cfg.roles]:
            for seed in cfg.seeds:
                path = str(model_path(ctx.out, role, seed))
                out.append(
                    sweep.Trial(
                        f"trials/models/{role}--seed{seed}",
                        shas[role, seed],
                        ModelTrial(cfg, role, seed, path),
                    )
                )
        probe = {**to_dict(cfg.desired_probe), "steps": cfg.setting("probe_steps")}
        attack = {
            **to_dict(cfg.attack),
            **{
                k: cfg.setting(k)
                for k in ("n_trials", "steps_min", "steps_max", "reruns", "n_startup_trials")
            },
        }
        for seed in cfg.seeds:
            for role in cfg.roles:
                path = str(model_path(ctx.out, role, seed))
                sha = config_sha256({"model": shas[role, seed], "probe": probe, "version": MEASURE_VERSION})
                out.append(
                    sweep.Trial(
                        f"trials/desired/{role}--seed{seed}", sha, DesiredTrial(cfg, role, seed, path)
                    )
                )
                for n in cfg.n_values:
                    sha = config_sha256(
                        {"model": shas[role, seed], "n": n, "attack": attack, "version": MEASURE_VERSION}
                    )
                    out.append(
                        sweep.Trial(
                            f"trials/attacks/{role}/n{n}--seed{seed}",
                            sha,
                            AttackTrial(cfg, role, seed, n, path),
                        )
                    )
        return out

    def check(self, cfg: MlacTextConfig, ctx: RunContext, trials: list[sweep.Trial]) -> dict[str, Any]:
        """Data first (sources, splits, n against the attack pool), then the encoder asset.

        Raises:
            ConfigError: an unknown source, n larger than ``attack_train``, row caps larger than
                their splits.
            DataError / AssetError: the data or the encoder cannot be had.

        """
        if launched_world_size() > 1:
            raise ConfigError(
                "mlac-text does not run under torchrun / accelerate launch; start it as one process"
            )
        if ctx.executor == "ray" and (ctx.ray_address or os.environ.get("RAY_ADDRESS")):
            raise ConfigError(
                "mlac-text passes the trained models between trials through files under --out, which the "
                "nodes of a Ray cluster do not share; use --executor local (or a local Ray instance)"
            )
        data = load_data(cfg)
        pool = len(data["attack_train"])
        big = [n for n in cfg.n_values if n > pool]
        if big:
            raise ConfigError(
                f"n_values {big} exceed the attack pool: attack_train has {pool} rows; use n <= {pool}"
            )
        if (
            cfg.defense.validate
            and any(r in TRAINED for r in cfg.roles)
            and "defender_val" not in data.splits
        ):
            raise ConfigError(
                f"data source {cfg.data.source!r} has no defender_val split for checkpoint selection; add it "
                "or set defense.validate: false"
            )
        for name, rows in (("attack_val", cfg.attack.val_rows), ("attack_test", cfg.attack.test_rows)):
            if rows is not None and rows > len(data[name]):
                raise ConfigError(
                    f"attack.{name[7:]}_rows={rows} exceeds the {len(data[name])} rows of {name}"
                )
        if cfg.encoder == "minilm":
            from immunekit.models.text_encoder import minilm_folder

            minilm_folder()
        return data_summary(cfg, data)

    def stages(self, trials: list[sweep.Trial]) -> list[list[sweep.Trial]]:
        """The model trials first: the desired-accuracy and attack trials load what they saved."""
        models = [t for t in trials if isinstance(t.payload, ModelTrial)]
        return [models, [t for t in trials if not isinstance(t.payload, ModelTrial)]]

    def aggregate(
        self,
        cfg: MlacTextConfig,
        records: dict[str, dict[str, Any]],
        ctx: RunContext,
        device: str,
        state: Any,
    ) -> dict[str, Any]:
        """``results.json`` (module docstring)."""
        resolved = to_dict(cfg)
        sha = config_sha256(resolved)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        attacks = _by_seed(records, "attack")
        desired = _by_seed(records, "desired")
        models = _by_seed(records, "model")
        data = state if isinstance(state, Mapping) else next((r["data"] for r in desired.values()), {})
        wall = [r.get("seconds", {}).get("trial") for r in records.values()]
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "experiment": cfg.experiment,
            "run_id": f"{cfg.experiment}-{created.replace('-', '').replace(':', '')}-{sha[:8]}",
            "created_at": created,
            "seeds": list(cfg.seeds),
            "roles": list(cfg.roles),
            "n_values": list(cfg.n_values),
            "config": resolved,
            "config_sha256": sha,
            "resolved": cfg.resolved(),
            "provenance": {
                **provenance(
                    task_version=str(data.get("version", "")),
                    task_info=data.get("info") or {},
                    device=device,
                    dtype="float32",
                ),
                "workers": ctx.workers,
                "executor": ctx.executor,
            },
            "data": data,
            "protocol": {
                "attack_pool": "seeded n-row subset of attack_train (nested over n, shared by roles)",
                "search_objective": "accuracy on attack_val",
                "reported": "mean accuracy on attack_test over the re-runs of the chosen settings",
                "search_space": {
                    "attacks": [ATTACK_NAMES[a] for a in cfg.attack.attacks],
                    "optimizer": "adam",
                    "lr": [cfg.attack.lr_min, cfg.attack.lr_max],
                    "steps": [cfg.setting("steps_min"), cfg.setting("steps_max")],
                    "batch_sizes": list(cfg.attack.batch_sizes),
                    "n_trials": cfg.setting("n_trials"),
                    "reruns": cfg.setting("reruns"),
                },
                "notes": list(NOTES),
            },
            "baselines": _baselines(attacks, cfg),
            "cost": aggregate_cost(cfg, attacks),
            "desired": aggregate_desired(cfg, desired),
            "training": aggregate_training(cfg, models),
            "trials": sorted(records),
            "trial_seconds_total": sum(v for v in wall if isinstance(v, int | float)),
        }

    def summary(self, results: dict[str, Any]) -> str:
        """:func:`summary_table`."""
        return summary_table(results)


def _pct(x: Any) -> str:
    v = _finite(x)
    return "—" if v is None else f"{100 * v:.1f}"


def summary_table(results: Mapping[str, Any]) -> str:
    """Plain-text harmful test accuracy (%) per role and n (mean [95 % CI]), Δ vs random, desired accuracy.

    Example:
        >>> print(summary_table({"roles": [], "n_values": [], "cost": {}}))
        mlac-text: no role in the results

    """
    roles, ns, cost = results.get("roles") or [], results.get("n_values") or [], results.get("cost") or {}
    if not roles:
        return "mlac-text: no role in the results"
    lines = ["harmful accuracy on attack_test after the tuned attack, % (mean [95% CI]; Δ vs random)"]
    head = f"{'role':<15}" + "".join(f"{'n=' + str(n):>30}" for n in ns)
    lines += [head, "-" * len(head)]
    for role in roles:
        cells = []
        for n in ns:
            e = (cost.get(role) or {}).get(str(n)) or {}
            t = e.get("test_accuracy") or {}
            ci = f"[{_pct(t.get('ci_low'))}, {_pct(t.get('ci_high'))}]" if t.get("ci_low") is not None else ""
            gap = e.get("gap") or {}
            d = f" Δ{100 * gap['mean']:+.1f}" if _finite(gap.get("mean")) is not None else ""
            cells.append(f"{_pct(t.get('mean'))} {ci}{d}")
        lines.append(f"{role:<15}" + "".join(f"{c:>30}" for c in cells))
    b = results.get("baselines") or {}
    lines.append(f"chance {_pct(b.get('chance'))} %, majority {_pct(b.get('majority'))} %")
    desired = results.get("desired") or {}
    parts = []
    for role in roles:
        entry = desired.get(role) or {}
        own = (entry.get("own_head") or {}).get("mean") if entry.get("own_head_trained") else None
        probe = (entry.get("probe") or {}).get("mean")
        parts.append(f"{role} {_pct(own) if own is not None else '—'}/{_pct(probe)}")
    lines.append("desired accuracy on attack_test, % (own head / linear probe): " + ", ".join(parts))
    lines.append(
        f"trial time {float(results.get('trial_seconds_total') or 0) / 60:.1f} min (summed over workers)"
    )
    return "\n".join(lines)


__all__ = [
    "KIND",
    "PROFILE_SETTINGS",
    "ROLES",
    "SOURCES",
    "TRAINED",
    "AttackSettings",
    "AttackTrial",
    "DataConfig",
    "DefenseSettings",
    "DesiredProbeSettings",
    "DesiredTrial",
    "MlacText",
    "MlacTextConfig",
    "ModelTrial",
    "attack_rows",
    "attack_task",
    "base_model",
    "build_config",
    "defense_config",
    "eval_chunks",
    "load_data",
    "run_trial",
    "search_config",
    "summarise",
    "summary_table",
]
