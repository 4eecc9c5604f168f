"""Condition-number immunization of a deep extractor (methods/condition_number.md §6, §7.3, §12).

The registry names ``condition_number`` and ``rill_only`` run this loop for every model that is not
a :class:`~immunekit.models.base.LinearModel` (a LinearModel keeps the closed-form Algorithm 1).
With Φ ``(B, D)`` the features of a mini-batch (``model.features``, cast to float64 for the
spectra) and S = ΦᵀΦ ``(D, D)`` the ℓ2 / Gauss–Newton proxy of the probe Hessian (Eq. 18), each
step takes one D_P batch (x, y) and one D_H batch (x only) and descends, by autograd and without
preconditioning,

    L = L_task(head(Φ_P), y) + λ_P R_well(S_P) + λ_H R_ill(S_H)

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
* ``rill_only``: no R_well term (λ_P = 0); λ_H is still balanced against R_well, as in the linear
  path, so the harmful term matches ``condition_number``'s.

Trained parameters: the last ``blocks`` blocks of :meth:`ImmunizableModel.blocks` and the head
(:meth:`~immunekit.models.base.ImmunizableModel.trainable_blocks`); everything else keeps
requires_grad off during the fit. The model is put in ``train()`` mode with every BatchNorm back in
``eval()``, so the θ_0 running statistics are used and never updated (§12); the original mode and
requires_grad flags are restored on the returned copy. Dropout layers, if any, draw from torch's
global generator (the only randomness not governed by ``seed``).

Optimizer: SGD, momentum 0.9 (Nesterov), constant ``lr``, weight decay 0 on the extractor and 2e-5
on the head. One epoch is one pass over the harmful training rows in batches of
b_H = min(``batch_size``, N_H) (a shorter tail is dropped, so every step sees b_H harmful rows);
the primary rows are drawn in batches of min(``batch_size``, N_P) from a fresh permutation each
time fewer than a batch remain. Both orders come from one ``torch.Generator`` seeded with ``seed``.

λ balancing (§12, documented choice): λ_P is fixed (``lambda_primary``, default 1). At θ_0, on
the first batch pair, λ_H is chosen so that ‖λ_H ∇R_ill‖ = ‖λ_P ∇R_well‖, both norms taken over
all trainable parameters (the head's regularizer gradients are zero); ``lambda_harmful`` overrides
it. Both norms and λ_H are recorded in ``info_``.

Guards: a non-finite loss, gradient or parameter stops the fit with a NumericalError naming the
step (NaN weights are never returned). The input model is never modified.

:func:`group_features` and :func:`rir_theta0` measure RIR_θ0 (§7.3) on the same groups of training
rows for a frozen θ_0 copy and the immunized model (the pure computation is
:func:`immunekit.metrics.rir_groups.rir_by_groups`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from immunekit.data.task import Task
from immunekit.defenses.base import Defense
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

DEEP_FIELDS: tuple[str, ...] = (
    "epochs",
    "batch_size",
    "blocks",
    "label_smoothing",
    "momentum",
    "weight_decay_extractor",
    "weight_decay_head",
    "lr",
    "lambda_primary",
    "lambda_harmful",
    "balance",
    "rank_rtol",
    "delta_min",
    "task_loss",
    "progress",
)
"""The config fields the deep loop reads (the others belong to the closed-form Algorithm 1)."""


class DeepConfig(Protocol):
    """The settings the deep loop reads (fields of ``ConditionNumberConfig``)."""

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
    def lambda_primary(self) -> float | None: ...
    @property
    def lambda_harmful(self) -> float | None: ...
    @property
    def balance(self) -> str: ...
    @property
    def rank_rtol(self) -> float | None: ...
    @property
    def delta_min(self) -> float: ...
    @property
    def task_loss(self) -> bool: ...
    @property
    def progress(self) -> bool: ...


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


@dataclass(frozen=True)
class StepTerms:
    """The loss terms of one batch pair.

    Attributes:
        task: task loss (0-d, the model's dtype; 0 when the task term is off).
        r_well: R_well(S_P) (float64 0-d).
        r_ill: R_ill(S_H) (float64 0-d; 0 when Δ was floored).
        floored: Δ(S_H) hit ``delta_min``.
        kappa_primary: κ(S_P) of the batch by the factor rank rule.
        kappa_harmful: κ(S_H) of the batch by the factor rank rule (its rank is R_ill's k).

    """

    task: Tensor
    r_well: Tensor
    r_ill: Tensor
    floored: bool
    kappa_primary: KappaInfo
    kappa_harmful: KappaInfo


def task_loss_fn(task: Task, outputs: int, dtype: torch.dtype, label_smoothing: float) -> tuple[Any, str]:
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
    loss: Any | None,
    rtol: float | None = None,
    delta_min: float = 0.0,
    with_well: bool = True,
) -> StepTerms:
    """Forward one batch pair and form the terms of the deep objective.

    Args:
        model: the model in its training configuration.
        x_p: ``(B_P, ...)`` primary inputs.
        y_p: ``(B_P, ...)`` their targets.
        x_h: ``(B_H, ...)`` harmful inputs (B_H ≥ 2).
        loss: the task term ``loss(pred, y)`` or ``None`` (no task term).
        rtol: the rank rule's cut on Φ_H and Φ_P (default max(B, D)·eps_64).
        delta_min: floor of Δ(S_H).
        with_well: compute R_well(S_P) with a graph (False: its value only, for records).

    Returns:
        StepTerms.

    """
    phi_p = model.features(x_p)
    phi_h = model.features(x_h)
    task_term = loss(model.head(phi_p), y_p) if loss is not None else torch.zeros((), dtype=phi_p.dtype)
    spec_p = FactorSpectrum.of(phi_p.detach(), rtol=rtol)
    spec_h = FactorSpectrum.of(phi_h.detach(), rtol=rtol)
    s_p = gram(phi_p if with_well else phi_p.detach())
    r_well = r_well_autograd(s_p)
    r_ill, floored = r_ill_of_factor(phi_h, spec_h.rank, delta_min=delta_min)
    return StepTerms(task_term, r_well, r_ill, floored, spec_p.kappa(), spec_h.kappa())


# ---------------------------------------------------------------------------------------------
# Model configuration during the fit
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


def _deep_config(defense: Defense) -> DeepConfig:
    missing = [f for f in DEEP_FIELDS if not hasattr(defense.config, f)]
    if missing:
        raise ConfigError(
            f"defense {defense.name!r} has no deep-network settings ({missing}); the deep variant is "
            "registered as 'condition_number' and 'rill_only'"
        )
    return cast(DeepConfig, defense.config)


def _f(t: Tensor) -> float:
    return float(t.detach())


def _norm(grads: tuple[Tensor | None, ...]) -> float:
    return math.sqrt(sum(float((g.to(F64) ** 2).sum()) for g in grads if g is not None))


# ---------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------


def fit_deep(defense: Defense, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
    """Immunize a copy of a deep ``model`` (§6); sets ``defense.history_`` and ``defense.info_``.

    Args:
        defense: the ``condition_number`` or ``rill_only`` instance (its config and name; a
            ``uses_primary_term`` of False drops R_well).
        model: any ImmunizableModel (not modified).
        task: primary (x, y) and harmful (x) training rows.
        seed: seeds the mini-batch order (a private ``torch.Generator``).

    Returns:
        A new model of the same class, the last ``blocks`` blocks and the head trained.

    Raises:
        ConfigError: a harmful batch < 2 rows, ``blocks`` larger than the model's block count,
            ``balance='per_step'`` (linear only), or a loss without a task term (``lm``).
        NumericalError: a non-finite loss, gradient or parameter (the step is named), or a zero
            R_ill gradient at θ_0 when λ_H is to be balanced.

    """
    cfg = _deep_config(defense)
    use_well = bool(getattr(defense, "uses_primary_term", True))
    if cfg.balance == "per_step":
        raise ConfigError(
            f"{defense.name}: balance='per_step' is the linear Algorithm 1's; the deep variant uses "
            "balance='init' (λ_H balanced at θ_0) or 'fixed' (lambda_primary and lambda_harmful)"
        )
    b_h, b_p, per_epoch = batch_plan(len(task.harmful), len(task.primary), cfg.batch_size)
    work = copy.deepcopy(model)
    trainable = work.trainable_blocks(cfg.blocks)  # ConfigError for a bad count
    head_ids = {id(p) for p in work.head.parameters()}
    ext_params = [p for p in trainable.values() if id(p) not in head_ids]
    head_params = [p for p in trainable.values() if id(p) in head_ids]
    if not ext_params:
        raise ConfigError(
            f"{defense.name}: the last {cfg.blocks} block(s) of {type(model).__name__} have no parameters "
            "outside the head, so the features cannot change; train more blocks"
        )
    params = list(trainable.values())
    lam_p_balance = 1.0 if cfg.lambda_primary is None else float(cfg.lambda_primary)
    lam_p = lam_p_balance if use_well else 0.0
    dtype = _input_dtype(work)
    gen = torch.Generator().manual_seed(seed)
    primary = _PrimaryStream(len(task.primary), b_p, gen)
    x_p_all, y_p_all, x_h_all = task.primary.x, task.primary.y, task.harmful.x
    n_bn = sum(isinstance(m, _BatchNorm) for m in work.modules())

    groups: list[dict[str, Any]] = [{"params": ext_params, "weight_decay": cfg.weight_decay_extractor}]
    if head_params:
        groups.append({"params": head_params, "weight_decay": cfg.weight_decay_head})
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)

    history: list[dict[str, float]] = []
    info: dict[str, Any] = {
        "variant": "deep",
        "trainable_parameters": list(trainable),
        "trainable_blocks": [name for name, _ in work.blocks()[len(work.blocks()) - cfg.blocks :]],
        "frozen_parameters": sum(1 for n, _ in work.named_parameters() if n not in trainable),
        "batchnorm_layers_frozen": n_bn,
        "batch_size_harmful": b_h,
        "batch_size_primary": b_p,
        "batches_per_epoch": per_epoch,
        "epochs": cfg.epochs,
        "steps": per_epoch * cfg.epochs,
        "optimizer": {
            "name": "sgd",
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "nesterov": cfg.momentum > 0,
            "weight_decay_extractor": cfg.weight_decay_extractor,
            "weight_decay_head": cfg.weight_decay_head,
        },
        "rank_rtol": cfg.rank_rtol,
        "delta_floor_hits": 0,
        "uses_primary_term": use_well,
        "config_fields_used": list(DEEP_FIELDS),
    }
    loss_fn: Any | None = None
    info["task_loss"] = "off"
    if cfg.task_loss:
        with torch.no_grad(), evaluation_mode(work):
            outputs = int(work(_place(work, x_p_all[:1])).reshape(1, -1).shape[1])
        loss_fn, info["task_loss"] = task_loss_fn(task, outputs, dtype, cfg.label_smoothing)
    step = 0
    bar = tqdm(total=info["steps"], desc=defense.name, disable=not cfg.progress, leave=False)
    with training_configuration(work, set(trainable)):
        lam_h: float | None = None
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(task.harmful), generator=gen)
            for b in range(per_epoch):
                idx_h, idx_p = perm[b * b_h : (b + 1) * b_h], primary.next()
                x_p, x_h = _place(work, x_p_all[idx_p]), _place(work, x_h_all[idx_h])
                y_p = y_p_all[idx_p].to(x_p.device)
                terms = step_terms(
                    work,
                    x_p,
                    y_p,
                    x_h,
                    loss=loss_fn,
                    rtol=cfg.rank_rtol,
                    delta_min=cfg.delta_min,
                    with_well=use_well or lam_h is None,
                )
                if lam_h is None:
                    lam_h = _initial_lambda(defense.name, cfg, terms, params, lam_p_balance, info)
                    info["first_batch"] = {"primary": idx_p.tolist(), "harmful": idx_h.tolist()}
                    info["lambda_primary"], info["lambda_harmful"] = lam_p, lam_h
                reg_p = lam_p * terms.r_well if use_well else torch.zeros((), dtype=F64)
                reg_h = lam_h * terms.r_ill
                total = terms.task.to(F64) + reg_p + reg_h
                record = {
                    "step": float(step),
                    "epoch": float(epoch),
                    "loss": _f(total),
                    "task_loss": _f(terms.task),
                    "r_well": _f(terms.r_well),
                    "r_ill": _f(terms.r_ill),
                    "reg_primary": _f(reg_p),
                    "reg_harmful": _f(reg_h),
                    "kappa_primary": terms.kappa_primary.kappa,
                    "kappa_harmful": terms.kappa_harmful.kappa,
                    "log_kappa_primary": terms.kappa_primary.log_kappa,
                    "log_kappa_harmful": terms.kappa_harmful.log_kappa,
                    "rank_primary": float(terms.kappa_primary.rank),
                    "rank_harmful": float(terms.kappa_harmful.rank),
                    "delta_floored": float(terms.floored),
                    "lr": float(opt.param_groups[0]["lr"]),
                }
                info["delta_floor_hits"] += int(terms.floored)
                if not math.isfinite(record["loss"]):
                    raise NumericalError(
                        f"{defense.name}: non-finite loss at step {step} (epoch {epoch}): task "
                        f"{record['task_loss']:.3g}, λ_P·R_well {record['reg_primary']:.3g}, λ_H·R_ill "
                        f"{record['reg_harmful']:.3g}; lower lr or lambda_harmful"
                    )
                opt.zero_grad(set_to_none=True)
                total.backward()
                bad = [
                    n for n, p in trainable.items() if p.grad is not None and not torch.isfinite(p.grad).all()
                ]
                if bad:
                    raise NumericalError(
                        f"{defense.name}: non-finite gradient at step {step} (epoch {epoch}) in {bad[:3]}; "
                        "lower lr or lambda_harmful"
                    )
                opt.step()
                bad = [n for n, p in trainable.items() if not torch.isfinite(p).all()]
                if bad:
                    raise NumericalError(
                        f"{defense.name}: non-finite parameters after step {step} (epoch {epoch}) in "
                        f"{bad[:3]}; lower lr"
                    )
                history.append(record)
                step += 1
                bar.update(1)
    bar.close()
    if history:
        first, last = history[0], history[-1]
        log.info(
            "%s (deep): %d steps, batch log κ(S_H) %.3f → %.3f, log κ(S_P) %.3f → %.3f",
            defense.name,
            len(history),
            first["log_kappa_harmful"],
            last["log_kappa_harmful"],
            first["log_kappa_primary"],
            last["log_kappa_primary"],
        )
    defense.history_ = history
    defense.info_ = info
    for p in work.parameters():
        p.grad = None
    return work


def _initial_lambda(
    name: str,
    cfg: DeepConfig,
    terms: StepTerms,
    params: list[nn.Parameter],
    lam_p: float,
    info: dict[str, Any],
) -> float:
    """λ_H: the config's, or λ_P‖∇R_well‖/‖∇R_ill‖ over the trainable parameters at θ_0 (§12).

    Both raw gradient norms are recorded (``grad_norm_well_raw``, ``grad_norm_ill_raw``) together
    with the weighted ones (``grad_norm_primary`` = λ_P‖∇R_well‖, ``grad_norm_harmful`` =
    λ_H‖∇R_ill‖), which are equal when λ_H was balanced.
    """
    g_well = torch.autograd.grad(terms.r_well, params, retain_graph=True, allow_unused=True)
    if terms.floored:
        g_ill: tuple[Tensor | None, ...] = (None,) * len(params)
    else:
        g_ill = torch.autograd.grad(terms.r_ill, params, retain_graph=True, allow_unused=True)
    n_well, n_ill = _norm(g_well), _norm(g_ill)
    if cfg.lambda_harmful is not None:
        lam_h, source = float(cfg.lambda_harmful), "config"
    else:
        if not (n_ill > 0 and math.isfinite(n_ill) and math.isfinite(n_well)):
            raise NumericalError(
                f"{name}: ‖∇R_ill‖ = {n_ill:.3g} and ‖∇R_well‖ = {n_well:.3g} at θ_0 on the first batch "
                "pair; λ_H cannot be balanced: set lambda_harmful explicitly"
            )
        lam_h, source = lam_p * n_well / n_ill, "balanced"
        if n_well == 0:
            log.warning("%s: ‖∇R_well‖ = 0 at θ_0, so the balanced λ_H is 0", name)
    info.update(
        {
            "lambda_harmful_source": source,
            "lambda_primary_balance": lam_p,
            "grad_norm_well_raw": n_well,
            "grad_norm_ill_raw": n_ill,
            "grad_norm_primary": lam_p * n_well,
            "grad_norm_harmful": lam_h * n_ill,
        }
    )
    log.info("%s (deep): λ_P=%.3g, λ_H=%.3g (%s)", name, lam_p, lam_h, source)
    return lam_h


# ---------------------------------------------------------------------------------------------
# RIR_θ0 by groups (§7.3)
# ---------------------------------------------------------------------------------------------


def group_features(
    reference: ImmunizableModel,
    immunized: ImmunizableModel,
    x: Tensor,
    *,
    groups: int = 20,
    per_group: int = 100,
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor]]:
    """Features of the same G disjoint groups of rows of ``x`` for θ_0 and θ^I (eval mode, no grad).

    θ_0 is evaluated through a separate frozen copy (never the immunized module; §11 item 7), and
    both models' mode flags are left as they were.

    Args:
        reference: θ_0, the model the defense started from.
        immunized: θ^I.
        x: ``(N, ...)`` rows of one domain's training split.
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
    if groups * per_group > len(x):
        raise ConfigError(
            f"{groups} disjoint groups of {per_group} rows need {groups * per_group} rows, the split has "
            f"{len(x)}; use fewer groups or rows per group"
        )
    if reference is immunized:
        log.warning("group_features: θ_0 and θ^I are the same module; every ratio will be 1")
    frozen = copy.deepcopy(reference)
    for p in frozen.parameters():
        p.requires_grad_(False)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    out_ref: list[Tensor] = []
    out_imm: list[Tensor] = []
    with evaluation_mode(frozen), evaluation_mode(immunized):
        for g in range(groups):
            rows = x[perm[g * per_group : (g + 1) * per_group]]
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
    h0, hi = group_features(
        reference, immunized, task.harmful.x, groups=groups, per_group=per_group, seed=seed
    )
    p0, pi = group_features(
        reference, immunized, task.primary.x, groups=groups, per_group=per_group, seed=seed + 1
    )
    return rir_by_groups(h0, hi, p0, pi, rtol=rtol)
