"""Immunization of a deep extractor: one mini-batch loop, the objective plugged in (§6, §7.3, §8, §12).

Every registered defense with a deep variant (``condition_number``, ``rill_only``, ``opt_kappa``,
``imma``) runs :func:`fit_deep` for a model that is not a
:class:`~immunekit.models.base.LinearModel` (a LinearModel keeps its closed-form algorithm). The
loop (batch plan, training configuration, optimizer, guards, records) is shared; what differs is
the objective, an :class:`Objective` that maps one batch pair to a scalar loss and a record:

* :class:`RegularizedObjective`, for ``condition_number``, ``rill_only`` and ``opt_kappa``. With
  Φ ``(B, D)`` the features of a mini-batch (``model.features``, cast to float64 for the spectra)
  and S = ΦᵀΦ ``(D, D)`` the ℓ2 / Gauss–Newton proxy of the probe Hessian (Eq. 18), each step takes
  one D_P batch (x, y) and one D_H batch (x only) and descends, by autograd and without
  preconditioning,

      L = L_task(head(Φ_P), y) + λ_P R_P(S_P) + λ_H R_H(S_H)

  with R_P = R_well, R_H = R_ill (condition_number; rill_only drops the R_P term) or
  R_P = log κ, R_H = 1/log κ (opt_kappa, :mod:`immunekit.defenses.deep_baselines`).
* :class:`~immunekit.defenses.deep_baselines.ImmaObjective` for ``imma``.

Terms of the condition-number objective:

* L_task: label-smoothed cross-entropy (ε = ``label_smoothing``, 0.1) for a head with C ≥ 2
  outputs; otherwise (``mse`` tasks, one-output binary heads) the task's
  :class:`~immunekit.metrics.losses.LossSpec` loss, the loss attacks train with.
* R_well(S) = ½λ_1² − ‖S‖_F²/(2p), p = D (:func:`~immunekit.spectral.regularizers.r_well_autograd`).
* R_ill(S) = 1/Δ, Δ = Σ_{i≤k} λ_i²/(2k) − ½λ_k², the formula of
  :func:`~immunekit.spectral.regularizers.r_ill_autograd` with the rank k ≤ B decided by the
  toolkit's factor rule on Φ_H (:class:`~immunekit.spectral.rank.FactorSpectrum`,
  r = #{s_i > rtol·s_1}); the eigenvalues are λ_i = s_i² from the singular values of Φ_H, which
  resolve small eigenvalues to eps relative to s_i, where ``eigvalsh`` of S would stop at
  eps·λ_1 (:func:`r_ill_of_factor`). Δ ≤ ``delta_min`` (all retained λ equal) drops the term for
  that step and is counted.

λ rule (§12, documented choice). Both regularizers are tied to the task gradient, so the default
does not depend on the scale of the features. At θ_0, on the first batch pair, with all norms
taken over the trainable parameters (Euclidean norm of the concatenated gradients; the head's
regularizer gradients are zero):

    λ_P = ρ ‖∇L_task‖ / ‖∇R_P‖      (ρ = ``primary_grad_ratio``, default :data:`PRIMARY_GRAD_RATIO`)
    λ_H = λ_P ‖∇R_P‖ / ‖∇R_H‖      (so ‖λ_H∇R_H‖ = ‖λ_P∇R_P‖ = ρ‖∇L_task‖)

``lambda_primary`` replaces the first line and ``lambda_harmful`` the second; ``rill_only``
computes λ_P the same way (or takes ``lambda_primary``) only as the reference of λ_H and applies
no R_P term, so its harmful term matches ``condition_number``'s. Every norm and λ is recorded in
``info_`` (``grad_norm_task``, ``grad_norm_task_extractor``, ``grad_norm_<term>_raw``,
``grad_norm_primary`` = λ_P‖∇R_P‖, ``grad_norm_harmful`` = λ_H‖∇R_H‖, ``lambda_*`` and their
``*_source``).

Why a ratio to the task gradient: R_well(S) grows as the fourth power of the feature scale, so a
fixed λ_P means nothing across models. λ_P = 1 (the linear default) trains the synthetic MLP of
tests/defenses/test_deep_condition_number.py to primary accuracy 0.32, and on the small MNIST
ResNet of :mod:`immunekit.experiments.theta0` (R_well(S_P) ≈ 7.4e6 on a batch of 64 at θ_0) even
λ_P = 1e-4 produces non-finite gradients at the third step. ρ is measured, not guessed: see
"Measurement" below.

Measurement (ρ and the deep defaults). θ_0 = the small HF ResNet (3 epochs) and ViT (5 epochs) of
:func:`~immunekit.experiments.theta0.train_theta0` (seed 0; MNIST test accuracy 0.9916 and 0.9738),
D_P = 5,000 MNIST training images, D_H = 5,000 Fashion-MNIST training images (standardised like
MNIST), seed 0, batch 64, one epoch (78 steps), lr 0.005. ρ was chosen on the MNIST ``val`` split
(accuracy; θ_0: ResNet 0.9905, ViT 0.9793) and on RIR_θ0 over 20 × 100 *training* rows per domain
(:func:`rir_theta0`); the MNIST ``test`` split was read only for the chosen setting
(tests/defenses/test_deep_real.py). (i), (ii), RIR_θ0 and val accuracy:

    ρ      ResNet (i)   (ii)   RIR     val      ViT (i)   (ii)    RIR    val
    0.01   0.65         0.52   1.26    0.9888
    0.1    1.82         0.67   2.81    0.9890   1.36      1.42    0.98   0.9769
    0.3    5.54         0.72   9.08    0.9891
    1      50.5         0.50   98.2    0.9887   4.46      1.97    2.37   0.9762
    3      1.3e3        0.35   3.6e3   0.9872   24.7      8.02    3.25   0.9728
    10     1.1e4        0.26   4.8e4   0.9856   12.8      2.28    5.93   0.9687
    30     1.1e5        2.94   6.9e4   0.9850   1.94      0.074   27.6   0.9642
    100    diverges (non-finite loss at step 4)

On the ResNet every ρ in [0.3, 10] meets (i) > 1, (ii) ≤ 1 and a val accuracy within 0.5 point; ρ = 1
sits in the middle (log scale) of that range and also holds for seeds 1 and 2 ((i) 34.9 and 21.4,
(ii) 0.57 and 0.50, val 0.9886 and 0.9888), hence :data:`PRIMARY_GRAD_RATIO` = 1: both regularizers
start with the task gradient's norm (ResNet ‖∇L_task‖ = 0.77 at θ_0, λ_P = 4.1e-8, λ_H = 2.0e4).
lr 0.005 and one epoch are kept: they meet the goal on the ResNet, and neither 3 epochs, lr 0.001 or
0.02, batch 32 or 128, no label smoothing nor two trained blocks gave the ViT (ii) ≤ 1 with (i) > 1
and val accuracy within 1 point (closest: ρ = 3, 3 epochs: (i) 5.3, (ii) 1.06, val 0.9742; ρ = 10,
two blocks: (i) 7.4, (ii) 0.62, val 0.9604).

Why the ViT does not separate the domains: its features are the final LayerNorm's output
φ = γ ⊙ n + β with n ⊥ 1, so φ·(1/γ) = Σ_i β_i/γ_i for *every* input. That direction is the
smallest singular direction of Φ in both domains at θ_0 (|cos| = 0.998 with 1/γ on 100 rows of
each), so κ(S_H) and κ(S_P) share their σ_min: R_ill lowers |Σβ/γ| and raises κ(S_P) with it, and
(i)/(ii) move together (RIR 1-6 for ρ ≤ 10). The uncentred κ of LayerNorm features is a property
of the norm layer more than of the domain; a fix needs the metric or the trained set to change
(e.g. centred features, or the final norm kept frozen), not λ.

Trained parameters: the last ``blocks`` blocks of :meth:`ImmunizableModel.blocks` and the head
(:meth:`~immunekit.models.base.ImmunizableModel.trainable_blocks`); everything else keeps
requires_grad off during the fit. The model is put in ``train()`` mode with every BatchNorm back in
``eval()``, so the θ_0 running statistics are used and never updated (§12); the original mode and
requires_grad flags are restored on the returned copy.

Randomness: both batch orders come from one private ``torch.Generator`` seeded with ``seed``.
Dropout layers draw from torch's *global* generator (``nn.Dropout`` takes no generator), so the
loop runs inside ``torch.random.fork_rng`` with the global generator seeded from a value derived
from ``seed`` (:func:`dropout_seed`): the fit is a function of ``seed`` alone, and the caller's
global RNG state is restored afterwards, as if the fit had drawn nothing (library code never seeds
the global RNG for good, DESIGN §4).

Optimizer: SGD, momentum 0.9 (Nesterov), constant ``lr``, weight decay 0 on the extractor and 2e-5
on the head. One epoch is one pass over the harmful training rows in batches of
b_H = min(``batch_size``, N_H) (a shorter tail is dropped, so every step sees b_H harmful rows);
the primary rows are drawn in batches of min(``batch_size``, N_P) from a fresh permutation each
time fewer than a batch remain. Splits are read only through ``Dataset.rows(idx)``.

Data parallel (DESIGN §5). Under ``torchrun --nproc_per_node W`` or ``accelerate launch`` the loop
runs on W processes through the shim :class:`~immunekit._dist.DataParallel` (``fit_deep``'s
``parallel``; by default ``DataParallel()``, built once per fit, which detects the launch from
``WORLD_SIZE``; on one process every call of the shim returns its input unchanged, so the
one-process numbers are bit-identical with and without it). Every process draws the same seeded
global batch order and reads only its shard of each global batch pair, rows r, r + W, … of it
(``shard`` before ``Dataset.rows``), so b_H and b_P must be multiples of W (else a ConfigError).
Each process forwards its own rows; the spectral terms (R_P, R_H), the batch κ records and the
factor rank rule are computed on the features of the whole global batch (``gather``, whose gradient
flows back to the process's own rows), so they are the one-process values. Each process
back-propagates task(shard) + W·(λ_P R_P + λ_H R_H) and the gradients are averaged over the
processes (``average_gradients``) before the non-finite guard, the gradient norm, clipping and the
optimizer step: the average is the gradient of the one-process loss (derivation in
:mod:`immunekit._dist`), and every process takes the same step. The λ rule uses the global norms:
each term's gradient at θ_0 is combined over the processes with the same weighting (the mean for the
task term, the sum for a spectral term) before its norm is taken, so λ_P and λ_H equal the
one-process λ. Records (``history_``, ``info_``) hold the global, unscaled values on every process
(the task loss as the mean of the shards' means). IMMA adapts its inner head on the gathered harmful
features and labels; its outer terms are means over rows, so they need no scaling. The result
equals the one-process fit up to rounding (the batch sums are split in W parts): the 2-process test
(tests/defenses/test_deep_parallel.py) holds float64 weights to 1e-9 relative (measured: 1e-13).
Limits: dropout masks are drawn per process (process r from its own stream, :func:`dropout_seed`
with ``rank``), so a model with dropout gets other masks than on one process (the same
distribution, other draws) and the fit is not the one-process fit; BatchNorm is in eval mode, so no
statistics need syncing. A plugged-in :class:`Objective` runs under several processes only if it
declares ``data_parallel = True``. Only process 0 should write results (:attr:`DataParallel.is_main`),
but every process must run every fit (the fits are collective).

Guards: a non-finite loss, gradient or parameter stops the fit with a NumericalError naming the
step (NaN weights are never returned); the gradient norm of every step is recorded (``grad_norm``,
before any clipping). The input model is never modified.

:func:`group_features` and :func:`rir_theta0` measure RIR_θ0 (§7.3) on the same groups of training
rows for a frozen θ_0 copy and the immunized model (the pure computation is
:func:`immunekit.metrics.rir_groups.rir_by_groups`).

References:
    Zheng, Bai, Bullins, Yeh, Model Immunization from a Condition Number Perspective, ICML 2025,
    arXiv 2505.23760 (§4, §5, Eqs. 3, 12, 17, 18).

"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from immunekit._dist import DataParallel
from immunekit.data.task import Task
from immunekit.defenses.base import Defense, DefenseConfig
from immunekit.errors import ConfigError, DataError, NumericalError
from immunekit.metrics.losses import LossSpec
from immunekit.metrics.rir_groups import GroupRIR, rir_by_groups
from immunekit.models.base import ImmunizableModel
from immunekit.spectral.condition import KappaInfo
from immunekit.spectral.hessians import symmetrize
from immunekit.spectral.rank import FactorSpectrum
from immunekit.spectral.regularizers import r_well_autograd

log = logging.getLogger(__name__)

F64 = torch.float64

PRIMARY_GRAD_RATIO = 1.0
"""Default ρ of the λ rule: ‖λ_P∇R_P‖ = ρ‖∇L_task‖ at θ_0 (measured, see the module docstring)."""

TRAINING_FIELDS: tuple[str, ...] = (
    "epochs",
    "batch_size",
    "blocks",
    "label_smoothing",
    "momentum",
    "weight_decay_extractor",
    "weight_decay_head",
    "lr",
    "progress",
)
"""The config fields the shared loop reads (``task_loss`` too when the config has it)."""

REGULARIZED_FIELDS: tuple[str, ...] = (
    "lambda_primary",
    "lambda_harmful",
    "primary_grad_ratio",
    "balance",
    "rank_rtol",
    "delta_min",
    "task_loss",
)
"""The config fields :class:`RegularizedObjective` reads."""

DEEP_FIELDS: tuple[str, ...] = TRAINING_FIELDS + REGULARIZED_FIELDS
"""The config fields condition_number, rill_only and opt_kappa read on a deep model (the others
belong to the closed-form Algorithm 1)."""

TaskLoss = Callable[[Tensor, Tensor], Tensor]
"""``loss(pred (B, C), y (B, ...)) -> 0-d`` tensor."""


class TrainingConfig(Protocol):
    """The settings the shared loop reads."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def blocks(self) -> int: ...
    @property
    def label_smoothing(self) -> float: ...
    @property
    def momentum(self) -> float: ...
    @property
    def weight_decay_extractor(self) -> float: ...
    @property
    def weight_decay_head(self) -> float: ...
    @property
    def lr(self) -> float: ...
    @property
    def progress(self) -> bool: ...


class DeepConfig(TrainingConfig, Protocol):
    """The settings of the regularized objective (fields of ``ConditionNumberConfig``)."""

    @property
    def lambda_primary(self) -> float | None: ...
    @property
    def lambda_harmful(self) -> float | None: ...
    @property
    def primary_grad_ratio(self) -> float: ...
    @property
    def balance(self) -> str: ...
    @property
    def rank_rtol(self) -> float | None: ...
    @property
    def delta_min(self) -> float: ...
    @property
    def task_loss(self) -> bool: ...


@dataclass(frozen=True, kw_only=True)
class DeepTrainingConfig(DefenseConfig):
    """The shared loop's settings: IMMA's config and ``ConditionNumberConfig`` both inherit them."""

    epochs: int = field(default=1, metadata={"help": "deep: passes over the harmful training data"})
    batch_size: int = field(
        default=64, metadata={"help": "deep: rows per D_P and per D_H mini-batch (harmful batch >= 2)"}
    )
    blocks: int = field(
        default=1, metadata={"help": "deep: trainable blocks counted from the output side (plus the head)"}
    )
    label_smoothing: float = field(
        default=0.1, metadata={"help": "deep: ε of the label-smoothed cross-entropy task term"}
    )
    momentum: float = field(default=0.9, metadata={"help": "deep: SGD momentum (Nesterov when > 0)"})
    weight_decay_extractor: float = field(
        default=0.0, metadata={"help": "deep: weight decay of the trainable extractor blocks"}
    )
    weight_decay_head: float = field(default=2e-5, metadata={"help": "deep: weight decay of the head"})

    def __post_init__(self) -> None:
        check_training_settings(self)


def check_training_settings(cfg: Any) -> None:
    """Validate the deep fields of a config (``epochs`` … ``weight_decay_head``).

    Raises:
        ConfigError: naming the field, the value and the fix.

    """
    for name in ("epochs", "blocks"):
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(
                f"{name} must be >= 1, got {value}; the deep variant trains at least one block "
                "for one pass over the harmful data"
            )
    if cfg.batch_size < 2:
        raise ConfigError(
            f"batch_size must be >= 2, got {cfg.batch_size}; R_ill needs a harmful batch of rank >= 2"
        )
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}; the paper uses 0.1")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}; the paper uses 0.9")
    for name in ("weight_decay_extractor", "weight_decay_head"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")


# ---------------------------------------------------------------------------------------------
# The spectral terms on a feature factor
# ---------------------------------------------------------------------------------------------


def gram(phi: Tensor) -> Tensor:
    """S = ΦᵀΦ in float64, ``(D, D)`` symmetric, differentiable (Φ ``(B, D)``)."""
    p = phi.to(F64)
    return symmetrize(p.T @ p)


def r_ill_of_factor(phi: Tensor, rank: int, *, delta_min: float = 0.0) -> tuple[Tensor, bool]:
    """R_ill(ΦᵀΦ) = 1/Δ with the rank k fixed by the caller, differentiable in Φ.

    Δ = Σ_{i≤k} λ_i²/(2k) − ½λ_k² with λ_i = s_i² the squared singular values of Φ ``(B, D)``
    (float64); this is :func:`~immunekit.spectral.regularizers.r_ill_autograd` of S = ΦᵀΦ with k
    decided by the factor rank rule instead of on ``eigvalsh(S)``. ∂R_ill/∂Φ = U diag(∂R/∂s) Vᵀ
    needs no eigenvalue gaps, and σ_k is simple in general position.

    Args:
        phi: ``(B, D)`` features.
        rank: k ≥ 1, e.g. ``FactorSpectrum.of(Φ).rank``.
        delta_min: Δ at or below this (all retained λ equal) gives a zero term, flagged.

    Returns:
        ``(R_ill, floored)``: a float64 0-d tensor (0 when floored) and whether Δ hit the floor.

    Raises:
        NumericalError: ``rank`` < 1 (zero features), or Δ ≤ 0 without a floor.

    Example:
        >>> phi = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)).sqrt()   # S = diag(3, 1)
        >>> round(float(r_ill_of_factor(phi, 2)[0]), 12)   # Δ = (9 + 1)/4 − 1/2 = 2
        0.5

    """
    if rank < 1:
        raise NumericalError("R_ill is undefined for zero features (rank 0); check the harmful batch")
    lam = torch.linalg.svdvals(phi.to(F64))[:rank] ** 2
    d = (lam**2).sum() / (2 * rank) - 0.5 * lam[rank - 1] ** 2
    if float(d.detach()) <= delta_min:
        if delta_min <= 0:
            raise NumericalError(
                f"Δ(S_H) = {float(d.detach()):.3g}: the harmful batch's retained eigenvalues are all equal, "
                "so R_ill is infinite; pass delta_min > 0 to floor it"
            )
        return torch.zeros((), dtype=F64), True
    return 1.0 / d, False


def r_well_of_factor(phi: Tensor, rank: int) -> Tensor:
    """R_well(ΦᵀΦ) through ``eigvalsh`` of S (float64 0-d, differentiable); ``rank`` is unused (p = D)."""
    return r_well_autograd(gram(phi))


@dataclass(frozen=True)
class SpectralPair:
    """The two spectral terms of a :class:`RegularizedObjective`, as functions of feature factors.

    Attributes:
        primary_tag: names R_P in records (``r_<tag>``, ``grad_norm_<tag>_raw``), e.g. ``"well"``.
        harmful_tag: names R_H likewise, e.g. ``"ill"``.
        floor_tag: names the floor of R_H (``<tag>_floored`` per step, ``<tag>_floor_hits``).
        primary: ``(Φ_P (B, D), rank) -> R_P`` float64 0-d, differentiable in Φ.
        harmful: ``(Φ_H (B, D), rank) -> (R_H, floored)``; R_H is 0 when floored.

    """

    primary_tag: str
    harmful_tag: str
    floor_tag: str
    primary: Callable[[Tensor, int], Tensor]
    harmful: Callable[[Tensor, int], tuple[Tensor, bool]]


def condition_number_pair(delta_min: float) -> SpectralPair:
    """R_P = R_well(S_P) and R_H = R_ill(S_H), Δ floored at ``delta_min`` (§4, §6)."""
    return SpectralPair(
        "well", "ill", "delta", r_well_of_factor, partial(r_ill_of_factor, delta_min=delta_min)
    )


@dataclass(frozen=True)
class StepTerms:
    """The loss terms of one batch pair.

    Attributes:
        task: task loss (0-d, the model's dtype; 0 when the task term is off); under data
            parallelism the mean over this process's shard.
        primary: R_P(S_P) (float64 0-d), e.g. R_well.
        harmful: R_H(S_H) (float64 0-d; 0 when floored), e.g. R_ill.
        floored: R_H hit its floor (Δ(S_H) ≤ ``delta_min`` for R_ill).
        kappa_primary: κ(S_P) of the batch by the factor rank rule.
        kappa_harmful: κ(S_H) of the batch by the factor rank rule (its rank is R_H's k).

    """

    task: Tensor
    primary: Tensor
    harmful: Tensor
    floored: bool
    kappa_primary: KappaInfo
    kappa_harmful: KappaInfo


def task_loss_fn(
    task: Task, outputs: int, dtype: torch.dtype, label_smoothing: float
) -> tuple[TaskLoss, str]:
    """The task term: ``(loss(pred, y), description)``.

    Label-smoothed cross-entropy for a ``ce`` head with C ≥ 2 outputs, otherwise the LossSpec loss
    (mean squared error, or squared loss on 0/1 targets for a one-output binary head).
    """
    spec = LossSpec(task.loss, outputs, dtype)

    def loss(pred: Tensor, y: Tensor) -> Tensor:
        target, _ = spec.targets(y, "primary")
        if spec.kind == "cross_entropy":
            return nn.functional.cross_entropy(pred, target, label_smoothing=label_smoothing)
        return spec(pred, target)

    if spec.kind == "cross_entropy":
        return loss, f"cross-entropy with label smoothing {label_smoothing:g}"
    return loss, spec.describe()


def step_terms(
    model: ImmunizableModel,
    x_p: Tensor,
    y_p: Tensor,
    x_h: Tensor,
    *,
    loss: TaskLoss | None,
    pair: SpectralPair,
    rtol: float | None = None,
    with_primary: bool = True,
    parallel: DataParallel | None = None,
) -> StepTerms:
    """Forward one batch pair and form the terms of the regularized objective.

    Under data parallelism the inputs are this process's shard of each global batch: the task term
    is the mean over the shard, while the spectral terms, the κ records and the rank rule are
    computed on the features of the whole global batch (:meth:`DataParallel.gather`), so they equal
    the one-process values; the caller weights them by :attr:`DataParallel.spectral_scale`.

    Args:
        model: the model in its training configuration.
        x_p: ``(B_P, ...)`` primary inputs (this process's rows).
        y_p: ``(B_P, ...)`` their targets.
        x_h: ``(B_H, ...)`` harmful inputs (this process's rows; the global batch has ≥ 2).
        loss: the task term ``loss(pred, y)`` or ``None`` (no task term).
        pair: the spectral terms R_P and R_H.
        rtol: the rank rule's cut on Φ_H and Φ_P (default max(B, D)·eps_64).
        with_primary: compute R_P(S_P) with a graph (False: its value only, for records).
        parallel: the process group (``None``: one process; features are then used as they are).

    Returns:
        StepTerms.

    """
    dp = parallel if parallel is not None else DataParallel.one_process()
    phi_p = model.features(x_p)
    phi_h = model.features(x_h)
    task_term = loss(model.head(phi_p), y_p) if loss is not None else torch.zeros((), dtype=phi_p.dtype)
    full_p = dp.gather(phi_p if with_primary else phi_p.detach())  # (B_P, D), global batch
    full_h = dp.gather(phi_h)  # (B_H, D)
    spec_p = FactorSpectrum.of(full_p.detach(), rtol=rtol)
    spec_h = FactorSpectrum.of(full_h.detach(), rtol=rtol)
    r_p = pair.primary(full_p, spec_p.rank)
    r_h, floored = pair.harmful(full_h, spec_h.rank)
    return StepTerms(task_term, r_p, r_h, floored, spec_p.kappa(), spec_h.kappa())


# ---------------------------------------------------------------------------------------------
# Model configuration and randomness during the fit
# ---------------------------------------------------------------------------------------------


@contextmanager
def training_configuration(model: nn.Module, trainable: set[str]) -> Iterator[None]:
    """train() with every BatchNorm in eval(), requires_grad only on ``trainable``; restores all flags.

    Args:
        model: modified in place for the duration (its mode and requires_grad flags are restored).
        trainable: parameter names (of ``named_parameters``) that get requires_grad.

    """
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        yield
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad for the duration; the module's mode flags are restored."""
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]


def dropout_seed(seed: int, rank: int = 0) -> int:
    """A 63-bit seed for the forked global generator, derived from the fit's ``seed`` (sha256).

    Distinct from ``seed`` itself, which seeds the batch-order generator. Process ``rank`` > 0 of a
    data-parallel fit gets its own stream (so the shards' dropout masks are independent, not copies
    of each other); rank 0 and a single process share the same one.

    Example:
        >>> dropout_seed(0) == dropout_seed(0) != dropout_seed(1)
        True
        >>> dropout_seed(0, rank=1) != dropout_seed(0, rank=0) == dropout_seed(0)
        True

    """
    text = f"immunekit.defenses.deep:{int(seed)}:dropout"
    if rank:
        text += f":rank{int(rank)}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


@contextmanager
def private_rng(seed: int, rank: int = 0) -> Iterator[None]:
    """Run the block with torch's global generator forked and seeded with :func:`dropout_seed`.

    ``torch.random.fork_rng`` saves the CPU (and every visible CUDA device's) RNG state and restores
    it on exit, so the caller's global stream is left exactly as it was.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(dropout_seed(seed, rank))
        yield


def _input_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _place(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` on the model's device, in its floating dtype."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return x.to(device=device, dtype=_input_dtype(model))


class _PrimaryStream:
    """Primary batches without replacement: a fresh permutation whenever fewer than a batch remain."""

    def __init__(self, n: int, size: int, gen: torch.Generator) -> None:
        self.n, self.size, self.gen = n, size, gen
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> Tensor:
        if self.pos + self.size > self.perm.numel():
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        out = self.perm[self.pos : self.pos + self.size]
        self.pos += self.size
        return out


def batch_plan(n_harmful: int, n_primary: int, batch_size: int) -> tuple[int, int, int]:
    """(b_H, b_P, batches per epoch) for N_H harmful and N_P primary training rows.

    Raises:
        ConfigError: the harmful batch would have fewer than 2 rows (R_ill needs rank ≥ 2).
        DataError: no primary rows.

    Example:
        >>> batch_plan(100, 30, 64)
        (64, 30, 1)

    """
    b_h, b_p = min(batch_size, n_harmful), min(batch_size, n_primary)
    if b_h < 2:
        raise ConfigError(
            f"the harmful mini-batch has {b_h} row(s) (batch_size={batch_size}, {n_harmful} harmful rows); "
            "R_ill needs at least 2: use batch_size >= 2 and at least 2 harmful training rows"
        )
    if b_p < 1:
        raise DataError("the task has no primary training rows; the deep defense needs D_P batches")
    return b_h, b_p, n_harmful // b_h


def batch_order(
    n_harmful: int, n_primary: int, plan: tuple[int, int, int], epochs: int, seed: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(epoch, harmful rows (b_H,), primary rows (b_P,))`` of every step, from one seeded generator.

    Each epoch draws one permutation of the harmful rows; the primary rows come from
    :class:`_PrimaryStream` on the same generator (drawn after the harmful slice of the step).
    """
    b_h, b_p, per_epoch = plan
    gen = torch.Generator().manual_seed(seed)
    primary = _PrimaryStream(n_primary, b_p, gen)
    for epoch in range(epochs):
        perm = torch.randperm(n_harmful, generator=gen)
        for b in range(per_epoch):
            yield epoch, perm[b * b_h : (b + 1) * b_h], primary.next()


def deep_config(defense: Defense, fields: tuple[str, ...]) -> Any:
    """``defense.config`` after checking that it has ``fields``.

    Raises:
        ConfigError: naming the missing fields.

    """
    missing = [f for f in fields if not hasattr(defense.config, f)]
    if missing:
        raise ConfigError(
            f"defense {defense.name!r} has no deep-network settings ({missing}); the deep variant is "
            "registered as 'condition_number', 'rill_only', 'opt_kappa' and 'imma'"
        )
    return defense.config


def _f(t: Tensor) -> float:
    return float(t.detach())


def _norm(grads: tuple[Tensor | None, ...] | list[Tensor | None]) -> float:
    return math.sqrt(sum(float((g.to(F64) ** 2).sum()) for g in grads if g is not None))


# ---------------------------------------------------------------------------------------------
# The shared loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One batch pair, placed on the model's device and dtype (targets on the device only).

    Under data parallelism these are this process's rows of the global batch pair
    (:meth:`DataParallel.shard`, B/W rows each); on one process the whole batch.

    Attributes:
        x_p: ``(B_P, ...)`` primary inputs.
        y_p: ``(B_P, ...)`` primary targets.
        x_h: ``(B_H, ...)`` harmful inputs.
        y_h: ``(B_H, ...)`` harmful targets (only IMMA reads them).
        idx_p: ``(B_P,)`` primary row numbers.
        idx_h: ``(B_H,)`` harmful row numbers.

    """

    x_p: Tensor
    y_p: Tensor
    x_h: Tensor
    y_h: Tensor
    idx_p: Tensor
    idx_h: Tensor


@dataclass
class FitState:
    """What the objective may read during a fit.

    Attributes:
        name: the defense's registry name.
        cfg: its config.
        model: the working copy (in its training configuration during the loop).
        trainable: ``{name: parameter}`` of the trained blocks and the head.
        head_ids: ``id`` of every head parameter.
        loss_fn: the task term, or ``None`` when it is off.
        info: becomes ``defense.info_``.
        parallel: the data-parallel process group (the no-op object on one process). The batch
            an objective receives is this process's shard; terms that are not means over rows
            must be computed on :meth:`DataParallel.gather`-ed features and weighted by
            :meth:`DataParallel.scale_gathered` (see :mod:`immunekit._dist`).

    """

    name: str
    cfg: Any
    model: ImmunizableModel
    trainable: dict[str, nn.Parameter]
    head_ids: set[int]
    loss_fn: TaskLoss | None
    info: dict[str, Any] = field(default_factory=dict)
    parallel: DataParallel = field(default_factory=DataParallel.one_process)

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, in ``named_parameters`` order."""
        return list(self.trainable.values())


class Objective(Protocol):
    """A deep objective: a scalar loss per batch pair, plugged into :func:`fit_deep`.

    Attributes:
        fields: config fields it reads (besides :data:`TRAINING_FIELDS`), checked and recorded.
        loss_parts: record keys named in the message of a non-finite loss.
        hint: what to lower when the fit diverges (for error messages).
        max_grad_norm: clip the gradient's norm over the trainable parameters to this (``None``:
            no clipping).

    An objective that may run under several processes also sets a class attribute
    ``data_parallel = True`` (it handles shards as :class:`FitState` describes); without it
    :func:`fit_deep` refuses a data-parallel launch.

    """

    fields: tuple[str, ...]
    loss_parts: tuple[str, ...]
    hint: str
    max_grad_norm: float | None

    def prepare(self, task: Task, info: dict[str, Any]) -> None:
        """Check the task before anything is trained; may record facts in ``info``."""

    def loss(self, state: FitState, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """The loss of one batch pair (0-d, with a graph) and its record (with ``"loss"``)."""
        ...


def fit_deep(
    defense: Defense,
    model: ImmunizableModel,
    task: Task,
    *,
    seed: int,
    objective: Objective | None = None,
    parallel: DataParallel | None = None,
) -> ImmunizableModel:
    """Immunize a copy of a deep ``model``; sets ``defense.history_`` and ``defense.info_``.

    Args:
        defense: the defense instance (its config and name).
        model: any ImmunizableModel (not modified).
        task: primary (x, y) and harmful (x; y for IMMA) training rows, read by ``rows(idx)``.
        seed: seeds the mini-batch order (a private ``torch.Generator``) and, through a forked
            global generator, dropout (:func:`private_rng`).
        objective: the loss; ``None``: :meth:`RegularizedObjective.condition_number` (the
            ``condition_number`` / ``rill_only`` objective, by the defense's ``uses_primary_term``).
        parallel: the data-parallel process group; ``None`` detects a launch (``DataParallel()``:
            the no-op object on one process). See "Data parallel" in the module docstring.

    Returns:
        A new model of the same class, the last ``blocks`` blocks and the head trained (the same
        weights on every process of a data-parallel fit).

    Raises:
        ConfigError: a harmful batch < 2 rows, ``blocks`` larger than the model's block count,
            trainable blocks without parameters, a batch that the processes cannot share evenly,
            an objective that is not data-parallel under several processes, or the objective's own
            checks.
        NumericalError: a non-finite loss, gradient or parameter (the step is named).

    """
    if objective is None:
        objective = RegularizedObjective.condition_number(defense)
    cfg = deep_config(defense, TRAINING_FIELDS + objective.fields)
    plan = batch_plan(len(task.harmful), len(task.primary), cfg.batch_size)
    dp = parallel if parallel is not None else DataParallel()
    _check_parallel(defense.name, dp, objective, plan, cfg.batch_size)
    work = copy.deepcopy(model)
    state = _fit_state(defense.name, cfg, work, task, objective.fields)
    state.parallel = dp
    objective.prepare(task, state.info)
    b_h, b_p, per_epoch = plan
    state.info.update(
        batch_size_harmful=b_h,
        batch_size_primary=b_p,
        batches_per_epoch=per_epoch,
        epochs=cfg.epochs,
        steps=per_epoch * cfg.epochs,
        dropout_seed=dropout_seed(seed),
        data_parallel_processes=dp.world_size,
    )
    opt = _optimizer(cfg, state)
    history = _train(state, objective, opt, task, plan, seed)
    _finish(defense, state, history)
    return work


def _check_parallel(
    name: str, dp: DataParallel, objective: Objective, plan: tuple[int, int, int], batch_size: int
) -> None:
    """Refuse a launch the loop cannot share: an objective without ``data_parallel``, uneven batches.

    Raises:
        ConfigError: naming the objective or the batch, the process count and the fix.

    """
    if dp.world_size == 1:
        return
    if not getattr(objective, "data_parallel", False):
        raise ConfigError(
            f"{name}: the objective {type(objective).__name__} is not data-parallel (it sets no "
            f"data_parallel = True), but {dp.world_size} processes were launched; run it on one "
            "process (without torchrun / accelerate launch), or make its loss handle shards"
        )
    b_h, b_p, _ = plan
    dp.check_batch(b_h, f"{name}: the harmful mini-batch (batch_size={batch_size})")
    dp.check_batch(b_p, f"{name}: the primary mini-batch (min(batch_size={batch_size}, primary rows))")


def _fit_state(name: str, cfg: Any, work: ImmunizableModel, task: Task, fields: tuple[str, ...]) -> FitState:
    """Trainable parameters (ConfigError for a bad block count), the task term and the base record."""
    trainable = work.trainable_blocks(cfg.blocks)
    head_ids = {id(p) for p in work.head.parameters()}
    if all(id(p) in head_ids for p in trainable.values()):
        raise ConfigError(
            f"{name}: the last {cfg.blocks} block(s) of {type(work).__name__} have no parameters "
            "outside the head, so the features cannot change; train more blocks"
        )
    blocks = work.blocks()
    info: dict[str, Any] = {
        "variant": "deep",
        "trainable_parameters": list(trainable),
        "trainable_blocks": [n for n, _ in blocks[len(blocks) - cfg.blocks :]],
        "frozen_parameters": sum(1 for n, _ in work.named_parameters() if n not in trainable),
        "batchnorm_layers_frozen": sum(isinstance(m, _BatchNorm) for m in work.modules()),
        "optimizer": {
            "name": "sgd",
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "nesterov": cfg.momentum > 0,
            "weight_decay_extractor": cfg.weight_decay_extractor,
            "weight_decay_head": cfg.weight_decay_head,
        },
        "config_fields_used": list(dict.fromkeys(TRAINING_FIELDS + fields)),
    }
    loss_fn: TaskLoss | None = None
    info["task_loss"] = "off"
    if getattr(cfg, "task_loss", True):
        x1, _ = task.primary.rows(torch.arange(1))
        with evaluation_mode(work):
            outputs = int(work(_place(work, x1)).reshape(1, -1).shape[1])
        loss_fn, info["task_loss"] = task_loss_fn(task, outputs, _input_dtype(work), cfg.label_smoothing)
    return FitState(name, cfg, work, trainable, head_ids, loss_fn, info)


def _optimizer(cfg: Any, state: FitState) -> torch.optim.SGD:
    """SGD (Nesterov when momentum > 0); extractor and head in groups with their own weight decay."""
    ext = [p for p in state.params if id(p) not in state.head_ids]
    head = [p for p in state.params if id(p) in state.head_ids]
    groups: list[dict[str, Any]] = [{"params": ext, "weight_decay": cfg.weight_decay_extractor}]
    if head:
        groups.append({"params": head, "weight_decay": cfg.weight_decay_head})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _read_batch(
    model: nn.Module, task: Task, idx_p: Tensor, idx_h: Tensor, parallel: DataParallel | None = None
) -> Batch:
    """The rows of one step this process computes, read through ``Dataset.rows``.

    ``idx_p`` and ``idx_h`` are the global batch; only the shard of ``parallel`` is read (all of it
    on one process).
    """
    if parallel is not None:
        idx_p, idx_h = parallel.shard(idx_p), parallel.shard(idx_h)
    x_p, y_p = task.primary.rows(idx_p)
    x_h, y_h = task.harmful.rows(idx_h)
    xp, xh = _place(model, x_p), _place(model, x_h)
    return Batch(xp, y_p.to(xp.device), xh, y_h.to(xh.device), idx_p, idx_h)


def _train(
    state: FitState,
    objective: Objective,
    opt: torch.optim.Optimizer,
    task: Task,
    plan: tuple[int, int, int],
    seed: int,
) -> list[dict[str, float]]:
    """The loop: one optimizer step per batch pair, every step recorded."""
    history: list[dict[str, float]] = []
    order = batch_order(len(task.harmful), len(task.primary), plan, state.cfg.epochs, seed)
    dp = state.parallel
    quiet = not state.cfg.progress or not dp.is_main
    bar = tqdm(total=state.info["steps"], desc=state.name, disable=quiet, leave=False)
    with private_rng(seed, dp.rank), training_configuration(state.model, set(state.trainable)):
        for step, (epoch, idx_h, idx_p) in enumerate(order):  # the global batch order, every process
            batch = _read_batch(state.model, task, idx_p, idx_h, dp)
            if step == 0:
                state.info["first_batch"] = {"primary": idx_p.tolist(), "harmful": idx_h.tolist()}
            total, terms = objective.loss(state, batch, step)
            record = {"step": float(step), "epoch": float(epoch), **terms}
            record["lr"] = float(opt.param_groups[0]["lr"])
            _descend(state, objective, opt, total, record)
            history.append(record)
            bar.update(1)
    bar.close()
    return history


def _descend(
    state: FitState, objective: Objective, opt: torch.optim.Optimizer, total: Tensor, record: dict[str, float]
) -> None:
    """Backward, guards, optional clipping, optimizer step; adds ``grad_norm`` (and ``clipped``)."""
    where = f"step {int(record['step'])} (epoch {int(record['epoch'])})"
    if not math.isfinite(record["loss"]):
        parts = ", ".join(f"{k} {record[k]:.3g}" for k in objective.loss_parts)
        raise NumericalError(f"{state.name}: non-finite loss at {where}: {parts}; {objective.hint}")
    opt.zero_grad(set_to_none=True)
    total.backward()
    state.parallel.average_gradients(state.params)  # the global gradient on every process
    bad = [n for n, p in state.trainable.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise NumericalError(f"{state.name}: non-finite gradient at {where} in {bad[:3]}; {objective.hint}")
    norm = record["grad_norm"] = _norm([p.grad for p in state.params])
    if objective.max_grad_norm is not None:
        clipped = norm > objective.max_grad_norm
        if clipped:  # g ← g·c/‖g‖ exactly (clip_grad_norm_ divides by ‖g‖ + 1e-6)
            for p in state.params:
                if p.grad is not None:
                    p.grad.mul_(objective.max_grad_norm / norm)
        record["clipped"] = float(clipped)
    opt.step()
    bad = [n for n, p in state.trainable.items() if not torch.isfinite(p).all()]
    if bad:
        raise NumericalError(f"{state.name}: non-finite parameters after {where} in {bad[:3]}; lower lr")


def _finish(defense: Defense, state: FitState, history: list[dict[str, float]]) -> None:
    """Store the diagnostics on the defense, drop gradients, log the batch κ trend."""
    if history and "log_kappa_harmful" in history[0] and state.parallel.is_main:
        first, last = history[0], history[-1]
        log.info(
            "%s (deep): %d steps, batch log κ(S_H) %.3f → %.3f, log κ(S_P) %.3f → %.3f",
            state.name,
            len(history),
            first["log_kappa_harmful"],
            last["log_kappa_harmful"],
            first["log_kappa_primary"],
            last["log_kappa_primary"],
        )
    defense.history_ = history
    defense.info_ = state.info
    for p in state.model.parameters():
        p.grad = None


# ---------------------------------------------------------------------------------------------
# The regularized objective: condition_number, rill_only, opt_kappa
# ---------------------------------------------------------------------------------------------


class RegularizedObjective:
    """L_task + λ_P R_P(S_P) + λ_H R_H(S_H) with λ set at θ_0 by the rule of the module docstring.

    Args:
        name: the defense's name (for messages).
        cfg: a config with :data:`DEEP_FIELDS`.
        pair: R_P and R_H.
        use_primary: apply the λ_P R_P term (False: rill_only; λ_P is then only λ_H's reference).

    Raises:
        ConfigError: ``balance='per_step'`` (linear only), or λ_P to be derived from the task
            gradient while the task term is off.

    """

    fields: tuple[str, ...] = REGULARIZED_FIELDS
    loss_parts: tuple[str, ...] = ("task_loss", "reg_primary", "reg_harmful")
    hint: str = "lower lr or lambda_harmful"
    max_grad_norm: float | None = None
    data_parallel: bool = True

    def __init__(self, name: str, cfg: DeepConfig, pair: SpectralPair, *, use_primary: bool) -> None:
        if cfg.balance == "per_step":
            raise ConfigError(
                f"{name}: balance='per_step' is the linear Algorithm 1's; the deep variant uses "
                "balance='init' (λ set at θ_0) or 'fixed' (lambda_primary and lambda_harmful)"
            )
        if cfg.lambda_primary is None and not cfg.task_loss and (use_primary or cfg.lambda_harmful is None):
            raise ConfigError(
                f"{name}: with task_loss=False there is no task gradient to set λ_P from "
                f"(‖λ_P∇R_P‖ = ρ‖∇L_task‖); pass lambda_primary explicitly, e.g. lambda_primary=1e-6"
            )
        self.name, self.cfg, self.pair, self.use_primary = name, cfg, pair, use_primary
        self.lam_p: float | None = None
        self.lam_h: float | None = None

    @classmethod
    def condition_number(cls, defense: Defense) -> RegularizedObjective:
        """R_well + R_ill; without R_well when the defense's ``uses_primary_term`` is False (rill_only)."""
        cfg = deep_config(defense, DEEP_FIELDS)
        use_primary = bool(getattr(defense, "uses_primary_term", True))
        return cls(defense.name, cfg, condition_number_pair(cfg.delta_min), use_primary=use_primary)

    def prepare(self, task: Task, info: dict[str, Any]) -> None:
        """Record the floor counter and whether R_P is applied."""
        info[f"{self.pair.floor_tag}_floor_hits"] = 0
        info["uses_primary_term"] = self.use_primary
        info["rank_rtol"] = self.cfg.rank_rtol

    def loss(self, state: FitState, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Task + weighted spectral terms; λ are set on the first call (θ_0, first batch pair).

        Under data parallelism the returned loss is this process's share, task(shard) +
        W·(λ_P R_P + λ_H R_H) on the gathered features, whose gradient averaged over the processes
        is the global gradient; the record holds the global values (task loss averaged over the
        processes, unscaled terms), equal to the one-process record.
        """
        dp = state.parallel
        terms = step_terms(
            state.model,
            batch.x_p,
            batch.y_p,
            batch.x_h,
            loss=state.loss_fn,
            pair=self.pair,
            rtol=self.cfg.rank_rtol,
            with_primary=self.use_primary or self.lam_h is None,
            parallel=dp,
        )
        if self.lam_p is None or self.lam_h is None:
            self.lam_p, self.lam_h = self._calibrate(state, terms)
        reg_p = self.lam_p * terms.primary if self.use_primary else torch.zeros((), dtype=F64)
        reg_h = self.lam_h * terms.harmful
        total = terms.task.to(F64) + dp.scale_gathered(reg_p) + dp.scale_gathered(reg_h)
        state.info[f"{self.pair.floor_tag}_floor_hits"] += int(terms.floored)
        return total, self._record(terms, total, reg_p, reg_h, dp)

    def _record(
        self, terms: StepTerms, total: Tensor, reg_p: Tensor, reg_h: Tensor, dp: DataParallel
    ) -> dict[str, float]:
        kp, kh = terms.kappa_primary, terms.kappa_harmful
        task = _f(terms.task)
        loss = _f(total)
        if dp.world_size > 1:  # the global loss: the shards' mean task loss + the unscaled terms
            task = dp.all_same(task)
            loss = task + _f(reg_p) + _f(reg_h)
        return {
            "loss": loss,
            "task_loss": task,
            f"r_{self.pair.primary_tag}": _f(terms.primary),
            f"r_{self.pair.harmful_tag}": _f(terms.harmful),
            "reg_primary": _f(reg_p),
            "reg_harmful": _f(reg_h),
            "kappa_primary": kp.kappa,
            "kappa_harmful": kh.kappa,
            "log_kappa_primary": kp.log_kappa,
            "log_kappa_harmful": kh.log_kappa,
            "rank_primary": float(kp.rank),
            "rank_harmful": float(kh.rank),
            f"{self.pair.floor_tag}_floored": float(terms.floored),
        }

    def _calibrate(self, state: FitState, terms: StepTerms) -> tuple[float, float]:
        """(applied λ_P, λ_H) at θ_0 from the gradient norms of the first batch pair; all recorded."""
        norms = _term_norms(state, terms)
        required = self.use_primary or self.cfg.lambda_harmful is None
        lam_p, source_p = _lambda_primary(self.name, self.cfg, norms, required=required)
        lam_h, source_h = _lambda_harmful(self.name, self.cfg, lam_p, norms)
        applied = lam_p if self.use_primary else 0.0
        tag_p, tag_h = self.pair.primary_tag, self.pair.harmful_tag
        state.info.update(
            {
                "lambda_rule": "‖λ_P∇R_P‖ = ρ‖∇L_task‖, ‖λ_H∇R_H‖ = ‖λ_P∇R_P‖ at θ_0 (first batch pair)",
                "primary_grad_ratio": self.cfg.primary_grad_ratio if source_p == "task_ratio" else None,
                "lambda_primary_source": source_p,
                "lambda_harmful_source": source_h,
                "lambda_primary_balance": lam_p,
                "lambda_primary": applied,
                "lambda_harmful": lam_h,
                "grad_norm_task": norms["task"],
                "grad_norm_task_extractor": norms["task_extractor"],
                f"grad_norm_{tag_p}_raw": norms["primary"],
                f"grad_norm_{tag_h}_raw": norms["harmful"],
                "grad_norm_primary": lam_p * norms["primary"],
                "grad_norm_harmful": lam_h * norms["harmful"],
            }
        )
        if state.parallel.is_main:
            log.info("%s (deep): λ_P=%.3g (%s), λ_H=%.3g (%s)", self.name, lam_p, source_p, lam_h, source_h)
        return applied, lam_h


def _term_norms(state: FitState, terms: StepTerms) -> dict[str, float]:
    """‖∇L_task‖ (all trainable and extractor only), ‖∇R_P‖, ‖∇R_H‖ over the trainable parameters.

    The gradients are those of the global objective's terms on the global batch pair: under data
    parallelism each process's gradient of a term is combined over the processes
    (:meth:`DataParallel.global_gradient`: the mean for the task term on the shard, the sum for the
    spectral terms on gathered features) before the norm is taken, so every process gets the
    one-process norms and λ.
    """
    params = state.params
    dp = state.parallel

    def grads(t: Tensor, *, gathered: bool) -> tuple[Tensor | None, ...]:
        if not t.requires_grad:
            return (None,) * len(params)
        g = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        return dp.global_gradient(g, gathered=gathered)

    g_task = grads(terms.task, gathered=False)
    g_ext = tuple(g for g, p in zip(g_task, params, strict=True) if id(p) not in state.head_ids)
    g_h = (None,) * len(params) if terms.floored else grads(terms.harmful, gathered=True)
    return {
        "task": _norm(g_task),
        "task_extractor": _norm(g_ext),
        "primary": _norm(grads(terms.primary, gathered=True)),
        "harmful": _norm(g_h),
    }


def _lambda_primary(
    name: str, cfg: DeepConfig, norms: dict[str, float], *, required: bool = True
) -> tuple[float, str]:
    """λ_P: the config's, or ρ‖∇L_task‖/‖∇R_P‖ (0.0, ``"unused"`` when undefined and not required).

    λ_P is not required when the R_P term is off and λ_H is given (rill_only with ``lambda_harmful``).

    Raises:
        NumericalError: a zero or non-finite norm makes the required ratio undefined.

    """
    if cfg.lambda_primary is not None:
        return float(cfg.lambda_primary), "config"
    n_task, n_p = norms["task"], norms["primary"]
    if not (n_task > 0 and n_p > 0 and math.isfinite(n_task) and math.isfinite(n_p)):
        if not required:
            return 0.0, "unused"
        raise NumericalError(
            f"{name}: ‖∇L_task‖ = {n_task:.3g} and ‖∇R_P‖ = {n_p:.3g} at θ_0 on the first batch pair; "
            "λ_P = ρ‖∇L_task‖/‖∇R_P‖ is undefined: set lambda_primary explicitly"
        )
    return cfg.primary_grad_ratio * n_task / n_p, "task_ratio"


def _lambda_harmful(name: str, cfg: DeepConfig, lam_p: float, norms: dict[str, float]) -> tuple[float, str]:
    """λ_H: the config's, or λ_P‖∇R_P‖/‖∇R_H‖.

    Raises:
        NumericalError: ‖∇R_H‖ is zero or a norm is not finite.

    """
    if cfg.lambda_harmful is not None:
        return float(cfg.lambda_harmful), "config"
    n_p, n_h = norms["primary"], norms["harmful"]
    if not (n_h > 0 and math.isfinite(n_h) and math.isfinite(n_p)):
        raise NumericalError(
            f"{name}: ‖∇R_H‖ = {n_h:.3g} and ‖∇R_P‖ = {n_p:.3g} at θ_0 on the first batch pair; "
            "λ_H cannot be balanced: set lambda_harmful explicitly"
        )
    if n_p == 0:
        log.warning("%s: ‖∇R_P‖ = 0 at θ_0, so the balanced λ_H is 0", name)
    return lam_p * n_p / n_h, "balanced"


# ---------------------------------------------------------------------------------------------
# RIR_θ0 by groups (§7.3)
# ---------------------------------------------------------------------------------------------


class RowSource(Protocol):
    """Anything that reads rows by index: a :class:`~immunekit.data.task.Dataset` or another split."""

    def __len__(self) -> int: ...

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs ``(B, ...)`` and targets of the rows ``idx`` ``(B,)``."""
        ...


def group_features(
    reference: ImmunizableModel,
    immunized: ImmunizableModel,
    data: RowSource | Tensor,
    *,
    groups: int = 20,
    per_group: int = 100,
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor]]:
    """Features of the same G disjoint groups of rows for θ_0 and θ^I (eval mode, no grad).

    θ_0 is evaluated through a separate frozen copy (never the immunized module; §11 item 7), and
    both models' mode flags are left as they were.

    Args:
        reference: θ_0, the model the defense started from.
        immunized: θ^I.
        data: one domain's training split (read through ``rows(idx)``), or its ``(N, ...)`` inputs.
        groups: G.
        per_group: rows per group n (G·n ≤ N; the groups are disjoint).
        seed: seeds the draw (a private ``torch.Generator``).

    Returns:
        ``(reference_features, immunized_features)``: G float64 tensors ``(n, D)`` each, group g
        of both lists built from the same rows.

    Raises:
        ConfigError: G or n < 1, or G·n > N.

    """
    if groups < 1 or per_group < 1:
        raise ConfigError(f"groups and per_group must be >= 1, got {groups} and {per_group}")
    if groups * per_group > len(data):
        raise ConfigError(
            f"{groups} disjoint groups of {per_group} rows need {groups * per_group} rows, the split has "
            f"{len(data)}; use fewer groups or rows per group"
        )
    if reference is immunized:
        log.warning("group_features: θ_0 and θ^I are the same module; every ratio will be 1")

    def read(idx: Tensor) -> Tensor:
        return data[idx] if isinstance(data, Tensor) else data.rows(idx)[0]

    frozen = copy.deepcopy(reference)
    for p in frozen.parameters():
        p.requires_grad_(False)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    out_ref: list[Tensor] = []
    out_imm: list[Tensor] = []
    with evaluation_mode(frozen), evaluation_mode(immunized):
        for g in range(groups):
            rows = read(perm[g * per_group : (g + 1) * per_group])
            out_ref.append(frozen.features(_place(frozen, rows)).to(device="cpu", dtype=F64))
            out_imm.append(immunized.features(_place(immunized, rows)).to(device="cpu", dtype=F64))
    return out_ref, out_imm


def rir_theta0(
    reference: ImmunizableModel,
    immunized: ImmunizableModel,
    task: Task,
    *,
    groups: int = 20,
    per_group: int = 100,
    seed: int = 0,
    rtol: float | None = None,
) -> GroupRIR:
    """RIR_θ0 (Eq. 17) on G groups of the harmful and the primary training rows (§7.3).

    The harmful groups are drawn with ``seed`` and the primary ones with ``seed + 1``.
    """
    h0, hi = group_features(reference, immunized, task.harmful, groups=groups, per_group=per_group, seed=seed)
    p0, pi = group_features(
        reference, immunized, task.primary, groups=groups, per_group=per_group, seed=seed + 1
    )
    return rir_by_groups(h0, hi, p0, pi, rtol=rtol)


__all__ = [
    "DEEP_FIELDS",
    "PRIMARY_GRAD_RATIO",
    "TRAINING_FIELDS",
    "Batch",
    "DeepTrainingConfig",
    "FitState",
    "Objective",
    "RegularizedObjective",
    "RowSource",
    "SpectralPair",
    "StepTerms",
    "batch_order",
    "batch_plan",
    "check_training_settings",
    "condition_number_pair",
    "deep_config",
    "dropout_seed",
    "evaluation_mode",
    "fit_deep",
    "gram",
    "group_features",
    "private_rng",
    "r_ill_of_factor",
    "r_well_of_factor",
    "rir_theta0",
    "step_terms",
    "task_loss_fn",
    "training_configuration",
]
