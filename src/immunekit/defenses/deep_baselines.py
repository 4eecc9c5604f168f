"""The baselines Opt-κ and IMMA on a deep extractor (methods/condition_number.md §8), for :func:`fit_deep`.

Both run in the shared loop of :mod:`immunekit.defenses.deep` (last ``blocks`` blocks and the head
trained, BatchNorm in eval with θ_0 statistics, SGD with Nesterov momentum, non-finite guards, the
input model never modified, a private ``torch.Generator`` for the batch order and a forked global
generator for dropout), under the registry names ``opt_kappa`` and ``imma``; a LinearModel keeps the
closed-form linear algorithms.

**Opt-κ** descends the condition numbers themselves instead of the R_well/R_ill surrogates. With
Φ ``(B, D)`` the features of a mini-batch and S = ΦᵀΦ:

    L = L_task + λ_P log κ(S_P) + λ_H / log κ(S_H),   κ(S) = (s_1 / s_r)²

with s the singular values of Φ (float64, ``torch.linalg.svdvals``, differentiable: ∂s_i/∂Φ =
u_i v_iᵀ for a simple s_i) and r the factor rank rule r = #{s_i > rtol·s_1}
(:class:`~immunekit.spectral.rank.FactorSpectrum`); so log κ = 2(ln s_1 − ln s_r). When
log κ(S_H) ≤ :data:`LOG_KAPPA_FLOOR` (all retained s equal) the harmful term is dropped for that
step and counted (``log_kappa_floor_hits``). λ_P and λ_H are set at θ_0 by the same rule as
``condition_number`` (‖λ_P∇log κ_P‖ = ρ‖∇L_task‖, ‖λ_H∇(1/log κ_H)‖ = ‖λ_P∇log κ_P‖), and
``lambda_primary`` / ``lambda_harmful`` override them.

**IMMA** (Zheng & Yeh, ECCV 2024; the toolkit's linear-probing form of §8). Per batch pair:

* inner: a fresh linear head w ``(D, C_H)`` (zero, no bias) on the detached harmful features
  Φ_H ``(B_H, D)`` takes M_in = ``inner_steps`` gradient steps on the harmful loss,
  w ← w − η_in ∇_w L(D_H; w, Φ_H), η_in = ``inner_lr`` (float64, closed-form gradient Φ_Hᵀ R with
  R = ∂L/∂Z of :meth:`~immunekit.metrics.losses.LossSpec.residual`);
* outer: θ ← θ − η·clip(∇_θ[L_task(D_P) − λ_adv L(D_H; w_adapted, θ)]), λ_adv = ``adv_weight``,
  the gradient's norm over all trainable parameters clipped at ``clip``, then the loop's SGD step.

w_adapted is held fixed in the outer gradient (first order, as the linear IMMA of
:mod:`immunekit.defenses.imma`, whose θ-gradient also treats w as a constant). The harmful loss is
the task's :class:`~immunekit.metrics.losses.LossSpec` loss for a head of the task's width (cross-
entropy for C ≥ 3 classes, squared loss on 0/1 targets for two, MSE for ``mse``), i.e. the loss
a linear-probe attacker trains. IMMA needs harmful labels: a harmful split whose ``y`` has no
columns, or (``ce``) negative labels marking unlabelled rows, is a ConfigError. The task term
(label-smoothed cross-entropy, as in ``condition_number``) is always on. Every step records the
inner loss before and after adaptation, the adapted harmful loss, the gradient norm before
clipping and whether it was clipped; ``info_`` records λ_adv, M_in, η_in and the clip.

Data parallel (see :mod:`immunekit.defenses.deep`): Opt-κ's log κ terms are computed on the
gathered features of the global batch and weighted by W, exactly as R_well/R_ill. IMMA adapts its
inner head on the gathered, detached harmful features and labels (so w is the one-process w on
every process); its outer loss is a mean over rows and is taken on each process's shard, and the
averaged gradient is the one-process gradient before clipping.

References:
    Zheng, Bai, Bullins, Yeh, arXiv 2505.23760, §5 (baselines); Zheng & Yeh, IMMA: Immunizing
    text-to-image models against malicious adaptation, ECCV 2024.

"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from immunekit.data.task import Task
from immunekit.defenses.base import Defense
from immunekit.defenses.deep import (
    DEEP_FIELDS,
    F64,
    Batch,
    FitState,
    RegularizedObjective,
    SpectralPair,
    deep_config,
    fit_deep,
)
from immunekit.errors import ConfigError, NumericalError
from immunekit.metrics.losses import LossSpec, head_width
from immunekit.models.base import ImmunizableModel
from immunekit.spectral.rank import FactorSpectrum

log = logging.getLogger(__name__)

LOG_KAPPA_FLOOR = 1e-12
"""log κ(S_H) at or below this drops the 1/log κ term for the step (the linear Opt-κ's clamp)."""

IMMA_FIELDS: tuple[str, ...] = ("inner_lr", "inner_steps", "adv_weight", "clip")
"""The config fields :class:`ImmaObjective` reads (besides the shared loop's)."""


# ---------------------------------------------------------------------------------------------
# Opt-κ
# ---------------------------------------------------------------------------------------------


def log_kappa_of_factor(phi: Tensor, rank: int) -> Tensor:
    """The log-condition number log κ(ΦᵀΦ) = 2(ln s_1 − ln s_r), differentiable in Φ (float64 0-d).

    Args:
        phi: ``(B, D)`` features.
        rank: r ≥ 1 (the factor rank rule's), e.g. ``FactorSpectrum.of(Φ).rank``.

    Raises:
        NumericalError: ``rank`` < 1 (zero features).

    Example:
        >>> phi = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))   # κ(ΦᵀΦ) = 16
        >>> round(float(log_kappa_of_factor(phi, 3)), 10)   # ln 16
        2.7725887222

    """
    if rank < 1:
        raise NumericalError("log κ is undefined for zero features (rank 0); check the batch")
    s = torch.linalg.svdvals(phi.to(F64))
    return 2.0 * (torch.log(s[0]) - torch.log(s[rank - 1]))


def inverse_log_kappa_of_factor(
    phi: Tensor, rank: int, *, floor: float = LOG_KAPPA_FLOOR
) -> tuple[Tensor, bool]:
    """1/log κ(ΦᵀΦ) (float64 0-d), or 0 and ``True`` when log κ ≤ ``floor`` (all retained s equal).

    Args:
        phi: ``(B, D)`` features.
        rank: r ≥ 1 of the factor rank rule.
        floor: log κ at or below this gives a zero term, flagged.

    Returns:
        ``(1/log κ, floored)``.

    """
    lk = log_kappa_of_factor(phi, rank)
    if float(lk.detach()) <= floor:
        return torch.zeros((), dtype=F64), True
    return 1.0 / lk, False


def opt_kappa_pair() -> SpectralPair:
    """R_P = log κ(S_P) and R_H = 1/log κ(S_H) (spec §8)."""
    return SpectralPair(
        "log_kappa", "inv_log_kappa", "log_kappa", log_kappa_of_factor, inverse_log_kappa_of_factor
    )


def fit_opt_kappa_deep(
    defense: Defense, model: ImmunizableModel, task: Task, *, seed: int
) -> ImmunizableModel:
    """Opt-κ on a deep ``model`` (a new model; ``defense.history_`` and ``info_`` set).

    Raises:
        ConfigError: as :func:`~immunekit.defenses.deep.fit_deep`.

    """
    cfg = deep_config(defense, DEEP_FIELDS)
    objective = RegularizedObjective(defense.name, cfg, opt_kappa_pair(), use_primary=True)
    return fit_deep(defense, model, task, seed=seed, objective=objective)


# ---------------------------------------------------------------------------------------------
# IMMA
# ---------------------------------------------------------------------------------------------


def harmful_loss_spec(task: Task, name: str = "imma") -> LossSpec:
    """The attacker's loss on the harmful split, after checking that the split has labels.

    Args:
        task: the task (its ``harmful.y`` is read whole; inputs are not touched).
        name: the defense, for messages.

    Returns:
        LossSpec for a linear head of the task's width on the harmful split (float64).

    Raises:
        ConfigError: the harmful split has no labels (``y`` without columns, or negative ``ce``
            labels marking unlabelled rows).

    """
    y = task.harmful.y
    if y.numel() == 0:
        raise ConfigError(
            f"{name} needs harmful labels, but task {task.name!r} has harmful targets of shape "
            f"{tuple(y.shape)}; build the task with the harmful task's labels, or use condition_number "
            "or opt_kappa, which use harmful inputs only"
        )
    if task.loss == "ce" and int(y.min()) < 0:
        n = int((y < 0).sum())
        raise ConfigError(
            f"{name} needs harmful labels, but {n} harmful row(s) of task {task.name!r} carry a negative "
            "label (unlabelled); label every harmful training row, or use condition_number or opt_kappa"
        )
    columns = 1 if y.ndim == 1 else int(y.shape[1])
    return LossSpec(task.loss, head_width(task.classes, task.loss, columns), F64)


def adapt_head(
    phi: Tensor, target: Tensor, spec: LossSpec, *, steps: int, lr: float
) -> tuple[Tensor, float, float]:
    """The attacker's inner loop: a zero linear head trained ``steps`` GD steps on fixed features.

    w_0 = 0 ``(D, C)``; w_{t+1} = w_t − η ∇_w L(Φ w_t, target) with ∇_w L = Φᵀ R(Φ w_t), R the
    loss's closed-form residual ∂L/∂Z (:meth:`LossSpec.residual`).

    Args:
        phi: ``(B, D)`` features (detached; float64 is used).
        target: ``(B, ...)`` targets from :meth:`LossSpec.targets`.
        spec: the loss.
        steps: M_in ≥ 1.
        lr: η_in > 0.

    Returns:
        ``(w, loss before, loss after)``: the adapted head ``(D, C)`` (float64, no graph) and the
        harmful loss at w_0 and at w.

    """
    f = phi.detach().to(F64)
    w = torch.zeros(f.shape[1], spec.outputs, dtype=F64, device=f.device)
    before = float(spec(f @ w, target))
    for _ in range(steps):
        w = w - lr * (f.T @ spec.residual(f @ w, target))
    return w, before, float(spec(f @ w, target))


class ImmaObjective:
    """L_task(D_P) − λ_adv L(D_H; w_adapted, θ) with a fresh inner head per batch pair (see module docs).

    Args:
        name: the defense's name.
        cfg: a config with the shared loop's fields and :data:`IMMA_FIELDS`.

    """

    fields: tuple[str, ...] = IMMA_FIELDS
    loss_parts: tuple[str, ...] = ("task_loss", "harmful_loss")
    hint: str = "lower lr or adv_weight"
    data_parallel: bool = True

    def __init__(self, name: str, cfg: Any) -> None:
        self.name, self.cfg = name, cfg
        self.max_grad_norm: float | None = float(cfg.clip)
        self.spec: LossSpec | None = None

    def prepare(self, task: Task, info: dict[str, Any]) -> None:
        """Check the harmful labels and record the IMMA settings."""
        self.spec = harmful_loss_spec(task, self.name)
        info.update(
            {
                "adv_weight": self.cfg.adv_weight,
                "inner_steps": self.cfg.inner_steps,
                "inner_lr": self.cfg.inner_lr,
                "clip": self.cfg.clip,
                "harmful_loss": self.spec.describe(),
                "harmful_head_width": self.spec.outputs,
                "inner_head": "fresh zero linear head (no bias) per batch pair; first order (held fixed "
                "in the outer gradient)",
            }
        )

    def loss(self, state: FitState, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Adapt the inner head on Φ_H, then the outer loss at the adapted head.

        Under data parallelism the inner head is adapted on the gathered (detached) features and
        labels of the whole harmful batch, so every process holds the one-process w; both outer
        terms are means over rows, so each process returns them on its own shard and the averaged
        gradient is the global one (no W scaling). The record holds the global values.
        """
        if self.spec is None:
            raise ConfigError(f"{self.name}: ImmaObjective.prepare must run before loss")
        model, dp = state.model, state.parallel
        phi_p, phi_h = model.features(batch.x_p), model.features(batch.x_h)
        task_term = (
            state.loss_fn(model.head(phi_p), batch.y_p)
            if state.loss_fn is not None
            else torch.zeros((), dtype=phi_p.dtype)
        )
        target, _ = self.spec.targets(batch.y_h, "harmful")
        full_h = dp.gather(phi_h.detach())  # (B_H, D): the global harmful batch
        full_target = target if dp.world_size == 1 else dp.gather(target)
        w, before, after = adapt_head(
            full_h, full_target, self.spec, steps=self.cfg.inner_steps, lr=self.cfg.inner_lr
        )
        harmful = self.spec(phi_h.to(F64) @ w, target)
        total = task_term.to(F64) - self.cfg.adv_weight * harmful
        kp = FactorSpectrum.of(dp.gather(phi_p.detach())).kappa()
        kh = FactorSpectrum.of(full_h).kappa()
        return total, {
            "loss": dp.all_same(float(total.detach())),
            "task_loss": dp.all_same(float(task_term.detach())),
            "harmful_loss": dp.all_same(float(harmful.detach())),
            "inner_loss_start": before,
            "inner_loss_end": after,
            "log_kappa_primary": kp.log_kappa,
            "log_kappa_harmful": kh.log_kappa,
        }


def fit_imma_deep(defense: Defense, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
    """IMMA on a deep ``model`` (a new model; ``defense.history_`` and ``info_`` set).

    Raises:
        ConfigError: missing harmful labels, or as :func:`~immunekit.defenses.deep.fit_deep`.
        NumericalError: a non-finite loss, gradient or parameter.

    """
    cfg = deep_config(defense, IMMA_FIELDS)
    return fit_deep(defense, model, task, seed=seed, objective=ImmaObjective(defense.name, cfg))


__all__ = [
    "IMMA_FIELDS",
    "LOG_KAPPA_FLOOR",
    "ImmaObjective",
    "adapt_head",
    "fit_imma_deep",
    "fit_opt_kappa_deep",
    "harmful_loss_spec",
    "inverse_log_kappa_of_factor",
    "log_kappa_of_factor",
    "opt_kappa_pair",
]
