"""Condition-number immunization of a linear extractor (Algorithm 1 of arXiv 2505.23760).

Objective (Eq. 11): min_{ω,θ} λ_H R_ill(H_H) + λ_P R_well(H_P) + L(D_P; ω, θ), with the linear-probe
Hessians H_P = θᵀK_Pθ and H_H = θᵀK_Hθ and K = XᵀX computed once from all training inputs.
Each iteration updates simultaneously (step (c) uses ω_t):

    ω ← ω − η ∇_ω L(D_P)
    θ ← θ − η ∇_θ L(D_P) − τ_P K_P⁺ ∇_θ R_well(H_P) − τ_H K_H⁺ ∇_θ R_ill(H_H),   τ = ηλ

The regularizer gradients are preconditioned on the LEFT by K⁺ (Theorem 4.3), computed in
closed form as K⁺∇_θR = 2 P_K θ G, so each regularizer step keeps its Hessian's eigenvectors.
The task gradient is not preconditioned.

λ balancing (``balance``; the paper balances the terms by gradient norms without saying how):
``init`` (default) fixes λ_P (default 1) and picks λ_H once at θ_0 so that both preconditioned
terms have equal Frobenius norm; ``per_step`` sets τ_X = s_X / ‖K_X⁺∇_θR_X‖_F at every step (a
fixed step norm per term); ``fixed`` uses the given λ values. With ``guard`` (default) each
regularizer step is clipped to its step bound, which guarantees that R_well alone lowers κ(H_P)
and R_ill alone raises κ(H_H) (§4 of the spec); without it a fixed λ_H large enough to matter
diverges within a few iterations. Every applied τ, λ and clip is recorded in ``history_``.

Three documented safeguards (each switchable, each recorded per step):

* ``primary_safeguard``: the §4 guarantees hold per regularizer only (paper §4.4), and the R_ill
  step also moves H_P; τ_H is halved until the joint step does not raise κ(H_P).
* ``primary_subspace``: with a rank-deficient K_P (constant columns in the primary training
  rows), an R_ill step mixes range(K_P) with its null space N, and the least-squares primary head
  on θ-features then puts weight on N, which held-out rows do touch (14 % higher primary test
  MSE on Ames in our measurement). Updates are therefore projected as Δ ↦ P_V Δ P_V
  (V = range(K_P)), so θ = P_N + P_VθP_V and the primary least-squares predictions on any input
  equal those of θ_0 = I exactly. R_well and the task gradient already have this form.
* ``task_step_guard``: R_ill inflates ‖θ‖, so a fixed η on the task loss eventually exceeds
  2/L; η is capped at 1/L of the current task-loss curvature.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from immunekit.data.task import Task
from immunekit.defenses.base import Defense, DefenseConfig, require_linear
from immunekit.defenses.linear_common import head_width, task_grads
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel
from immunekit.spectral.condition import KappaInfo, gram_condition_number, psd_factor
from immunekit.spectral.hessians import covariance, linear_l2_hessian
from immunekit.spectral.regularizers import (
    Preconditioner,
    SpectralGrad,
    g_ill,
    g_well,
    make_preconditioner,
    r_ill_step_bound,
    r_well_step_bound,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SpectralDefenseConfig(DefenseConfig):
    """Settings of the Algorithm-1 family (condition_number, rill_only, opt_kappa)."""

    steps: int = field(default=100, metadata={"help": "iterations T (full batch)"})
    lr: float = field(default=0.005, metadata={"help": "η for the task loss (and τ = ηλ)"})
    balance: Literal["per_step", "init", "fixed"] = field(
        default="init", metadata={"help": "how λ_P/λ_H are set (see module docs)"}
    )
    step_norm_primary: float = field(
        default=0.1, metadata={"help": "per_step: ‖τ_P K_P⁺∇R_P‖_F (0 disables)"}
    )
    step_norm_harmful: float = field(
        default=0.1, metadata={"help": "per_step: ‖τ_H K_H⁺∇R_H‖_F (0 disables)"}
    )
    lambda_primary: float | None = field(default=None, metadata={"help": "λ_P for init/fixed (default 1)"})
    lambda_harmful: float | None = field(default=None, metadata={"help": "λ_H for fixed (init derives it)"})
    preconditioner: Literal["pinv", "ridge", "none"] = field(
        default="pinv", metadata={"help": "left preconditioner K⁺ (pinv), (K+εI)⁻¹ (ridge), none (ablation)"}
    )
    pinv_rtol: float | None = field(
        default=None, metadata={"help": "relative threshold of K⁺ (default D·eps)"}
    )
    ridge: float = field(default=0.0, metadata={"help": "ε for the ridge preconditioner"})
    rank_rtol: float | None = field(
        default=None,
        metadata={"help": "relative threshold on the singular values of F·θ (FᵀF = K) for rank and κ of H"},
    )
    delta_min: float = field(default=1e-300, metadata={"help": "floor of Δ(H_H) in R_ill (hits are logged)"})
    guard: bool = field(default=True, metadata={"help": "clip τ to the monotone-κ step bounds"})
    primary_safeguard: bool = field(
        default=True,
        metadata={"help": "halve τ_H until the joint step does not raise κ(H_P) (τ_H = 0 if none does)"},
    )
    safeguard_against: Literal["previous", "initial"] = field(
        default="previous",
        metadata={"help": "κ(H_P) the joint step must not exceed: the current one, or θ_0's (condition (b))"},
    )
    safeguard_halvings: int = field(default=30, metadata={"help": "max halvings of τ_H per step"})
    guard_fraction: float = field(
        default=0.9, metadata={"help": "with guard, τ is clipped to this fraction of the strict step bound"}
    )
    task_step_guard: bool = field(
        default=True, metadata={"help": "cap the task step at 1/L of the current task-loss curvature"}
    )
    task_loss: bool = field(default=True, metadata={"help": "include L(D_P) (condition (c))"})
    primary_subspace: bool = field(
        default=True,
        metadata={"help": "update θ only inside range(K_P) (θ stays the identity on inputs D_P never spans)"},
    )
    progress: bool = field(default=False, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}; the paper uses 0.005")
        if not 0 < self.guard_fraction < 1:
            raise ConfigError(
                f"guard_fraction must be in (0, 1), got {self.guard_fraction}; the bounds are strict"
            )
        for name in ("step_norm_primary", "step_norm_harmful", "ridge", "delta_min"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.preconditioner == "ridge" and self.ridge <= 0:
            raise ConfigError("preconditioner='ridge' needs ridge > 0, e.g. ridge=1e-6")
        if self.balance == "fixed" and (self.lambda_primary is None or self.lambda_harmful is None):
            raise ConfigError(
                "balance='fixed' needs lambda_primary and lambda_harmful; or use balance='per_step'"
            )


class SpectralLinearDefense(Defense):
    """Algorithm 1 with pluggable spectral terms: H_P kept well-conditioned, H_H made ill-conditioned."""

    Config = SpectralDefenseConfig
    uses_primary_term: ClassVar[bool] = True

    def primary_term(self, h: Tensor, rank: int) -> SpectralGrad:
        """∂R_P/∂H_P (to be descended); ``rank`` is H_P's numerical rank."""
        return g_well(h)

    def harmful_term(self, h: Tensor, rank: int) -> SpectralGrad:
        """∂R_H/∂H_H (to be descended); ``rank`` is H_H's numerical rank (k of R_ill)."""
        return g_ill(h, delta_min=self.config.delta_min, rank=rank)

    def primary_bound(self, sg: SpectralGrad) -> float:
        """Largest τ_P with a monotone guarantee (``inf``: none)."""
        return r_well_step_bound(sg.eigenvalues, rank=sg.rank)

    def harmful_bound(self, sg: SpectralGrad) -> float:
        """Largest τ_H with a monotone guarantee (``inf``: none)."""
        return r_ill_step_bound(sg.eigenvalues, sg.delta, sg.rank)

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Run Algorithm 1 from the model's θ_0 (ω_0 = 0); returns a new LinearModel."""
        cfg = self.config
        lin = require_linear(model, self.name, task)
        theta = lin.theta
        omega = torch.zeros(theta.shape[1], head_width(task.primary, task.loss), dtype=torch.float64)
        su = self._setup(theta, task)
        self.history_ = []
        self.info_ = {
            "preconditioner_primary": su.pre_p.describe(),
            "preconditioner_harmful": su.pre_h.describe(),
            "balance": cfg.balance,
            "lambda_primary": su.lam_p,
            "lambda_harmful": su.lam_h,
            "primary_subspace": cfg.primary_subspace,
            "delta_floor_hits": 0,
        }
        for t in tqdm(range(cfg.steps), desc=self.name, disable=not cfg.progress, leave=False):
            theta, omega = self._step(t, theta, omega, task, su)
        self._finish(theta, su)
        return lin.with_weights(theta, omega)

    def _setup(self, theta: Tensor, task: Task) -> _Setup:
        cfg = self.config
        k_p, k_h = covariance(task.primary.x), covariance(task.harmful.x)
        kw = {"method": cfg.preconditioner, "rtol": cfg.pinv_rtol, "ridge": cfg.ridge}
        pre_p, pre_h = make_preconditioner(k_p, **kw), make_preconditioner(k_h, **kw)
        proj = (
            make_preconditioner(k_p, method="pinv", rtol=cfg.pinv_rtol).projector
            if cfg.primary_subspace
            else None
        )
        f_p, f_h = psd_factor(k_p, rtol=cfg.pinv_rtol), psd_factor(k_h, rtol=cfg.pinv_rtol)
        su = _Setup(k_p, k_h, f_p, f_h, pre_p, pre_h, proj, None, None, 0.0, cfg.rank_rtol)
        lam_p, lam_h = self._initial_lambdas(theta, su)
        return dataclasses.replace(su, lam_p=lam_p, lam_h=lam_h, log_kappa_p0=su.kappa_p(theta).log_kappa)

    def _initial_lambdas(self, theta: Tensor, su: _Setup) -> tuple[float | None, float | None]:
        cfg = self.config
        if cfg.balance == "fixed":
            return cfg.lambda_primary, cfg.lambda_harmful
        if cfg.balance == "per_step":
            return None, None
        lam_p = 1.0 if cfg.lambda_primary is None else cfg.lambda_primary
        d_p, d_h = self._directions(theta, su)[2:]
        lam_h = lam_p * float(d_p.norm()) / max(float(d_h.norm()), 1e-300)
        log.info("%s: λ_P=%.3g, λ_H=%.3g balanced at θ_0", self.name, lam_p, lam_h)
        # Without a primary term (rill_only) λ_H keeps the value balanced against R_well, so the
        # harmful step matches condition_number's and only λ_P = 0 differs.
        return (lam_p if self.uses_primary_term else 0.0), lam_h

    def _directions(self, theta: Tensor, su: _Setup) -> tuple[SpectralGrad, SpectralGrad, Tensor, Tensor]:
        """Spectral terms and the preconditioned directions K_P⁺∇_θR_P, K_H⁺∇_θR_H (projected if asked)."""
        sp = self.primary_term(linear_l2_hessian(theta, su.k_p), su.kappa_p(theta).rank)
        sh = self.harmful_term(linear_l2_hessian(theta, su.k_h), su.kappa_h(theta).rank)
        d_p, d_h = su.pre_p.spectral_step(theta, sp.g), su.pre_h.spectral_step(theta, sh.g)
        return sp, sh, su.project(d_p), su.project(d_h)

    def _tau(
        self, lam: float | None, step_norm: float, direction: Tensor, bound: float
    ) -> tuple[float, bool]:
        norm = float(direction.norm())
        if lam is None:
            tau = step_norm / norm if norm > 0 and step_norm > 0 else 0.0
        elif lam == 0.0:
            return 0.0, False
        else:
            tau = self.config.lr * lam
        # The bounds are strict (at the bound itself the R_ill step zeroes λ_k), so clip inside them.
        limit = self.config.guard_fraction * bound
        if self.config.guard and tau > limit:
            return limit, True
        return tau, False

    def _step(self, t: int, theta: Tensor, omega: Tensor, task: Task, su: _Setup) -> tuple[Tensor, Tensor]:
        cfg = self.config
        loss, g_theta, g_omega = (
            task_grads(task.primary, theta, omega, task.loss)
            if cfg.task_loss
            else (float("nan"), torch.zeros_like(theta), torch.zeros_like(omega))
        )
        sp, sh, d_p, d_h = self._directions(theta, su)
        tau_p, clip_p = self._tau(su.lam_p, cfg.step_norm_primary, d_p, self.primary_bound(sp))
        tau_h, clip_h = self._tau(su.lam_h, cfg.step_norm_harmful, d_h, self.harmful_bound(sh))
        self.info_["delta_floor_hits"] += int(sh.floored)
        eta, capped = self._task_lr(theta, omega, su.k_p, task)
        base = theta - eta * su.project(g_theta) - tau_p * d_p
        log_kappa_p, log_kappa_h = su.kappa_p(theta).log_kappa, su.kappa_h(theta).log_kappa
        limit = su.log_kappa_p0 if cfg.safeguard_against == "initial" else log_kappa_p
        tau_h, halvings = self._safe_harmful_step(base, d_h, tau_h, su, limit)
        self.history_.append(
            {
                "step": t,
                "task_loss": loss,
                "reg_primary": sp.value,
                "reg_harmful": sh.value,
                "log_kappa_primary": log_kappa_p,
                "log_kappa_harmful": log_kappa_h,
                "tau_primary": tau_p,
                "tau_harmful": tau_h,
                "lambda_primary": tau_p / cfg.lr,
                "lambda_harmful": tau_h / cfg.lr,
                "clipped_primary": float(clip_p),
                "clipped_harmful": float(clip_h),
                "task_lr": eta,
                "task_lr_capped": float(capped),
                "safeguard_halvings": float(halvings),
            }
        )
        return base - tau_h * d_h, omega - eta * g_omega

    def _safe_harmful_step(
        self, base: Tensor, d_h: Tensor, tau_h: float, su: _Setup, log_kappa_p: float
    ) -> tuple[float, int]:
        """Halve τ_H until the joint step does not raise κ(H_P) (at most ``safeguard_halvings`` times).

        The §4 guarantees hold per regularizer only (paper §4.4): the R_ill step also moves H_P.
        Backtracking on τ_H makes the *joint* update keep condition (b) monotone; τ_H = 0 is used
        if no halving suffices.
        """
        cfg = self.config
        if not cfg.primary_safeguard or tau_h == 0.0 or not self.uses_primary_term:
            return tau_h, 0
        for halvings in range(cfg.safeguard_halvings + 1):
            if su.kappa_p(base - tau_h * d_h).log_kappa <= log_kappa_p:
                return tau_h, halvings
            tau_h *= 0.5
        return 0.0, cfg.safeguard_halvings + 1

    def _task_lr(self, theta: Tensor, omega: Tensor, k_p: Tensor, task: Task) -> tuple[float, bool]:
        """η, capped at 1/L where L bounds the task loss curvature in ω and in θ.

        For the mean squared error over N·C outputs, ∇²_ω L = 2 (θᵀK_Pθ ⊗ I)/(N·C) and
        ∇²_θ L = 2 (K_P ⊗ ωωᵀ)/(N·C); BCE/CE curvature is at most ¼ / ½ of that. A regularizer that
        inflates ‖θ‖ (R_ill does) would otherwise make the fixed-η task step diverge.
        """
        cfg = self.config
        if not (cfg.task_loss and cfg.task_step_guard):
            return cfg.lr, False
        n_out = task.primary.x.shape[0] * omega.shape[1]
        l_omega = 2.0 * float(torch.linalg.eigvalsh(linear_l2_hessian(theta, k_p))[-1]) / n_out
        l_theta = 2.0 * float(torch.linalg.eigvalsh(k_p)[-1]) * float((omega**2).sum()) / n_out
        limit = 1.0 / max(l_omega, l_theta, 1e-300)
        return (limit, True) if cfg.lr > limit else (cfg.lr, False)

    def _finish(self, theta: Tensor, su: _Setup) -> None:
        self.info_.update(
            final_log_kappa_primary=su.kappa_p(theta).log_kappa,
            final_log_kappa_harmful=su.kappa_h(theta).log_kappa,
        )


@dataclass(frozen=True)
class _Setup:
    """What Algorithm 1 computes once: K_P, K_H, their factors and preconditioners, λs, the projector."""

    k_p: Tensor
    k_h: Tensor
    f_p: Tensor
    f_h: Tensor
    pre_p: Preconditioner
    pre_h: Preconditioner
    proj: Tensor | None
    lam_p: float | None
    lam_h: float | None
    log_kappa_p0: float
    rank_rtol: float | None

    def kappa_p(self, theta: Tensor) -> KappaInfo:
        """κ(θᵀK_Pθ) from the factor F_Pθ (small eigenvalues resolved to eps relative)."""
        return gram_condition_number(self.f_p @ theta, rtol=self.rank_rtol)

    def kappa_h(self, theta: Tensor) -> KappaInfo:
        """κ(θᵀK_Hθ) from the factor F_Hθ."""
        return gram_condition_number(self.f_h @ theta, rtol=self.rank_rtol)

    def project(self, update: Tensor) -> Tensor:
        """P_V Δ P_V + P_N Δ P_N with V = range(K_P), N = null(K_P) (identity when the constraint is off)."""
        if self.proj is None:
            return update
        other = torch.eye(self.proj.shape[0], dtype=self.proj.dtype) - self.proj
        return self.proj @ update @ self.proj + other @ update @ other


class ConditionNumber(SpectralLinearDefense):
    """Condition-number immunization: R_well on H_P, R_ill on H_H, K⁺-preconditioned (Algorithm 1)."""

    name = "condition_number"


@dataclass(frozen=True, kw_only=True)
class RillOnlyConfig(SpectralDefenseConfig):
    """R_ill only: Algorithm 1 with λ_P = 0 (task loss kept, K_H preconditioning kept)."""

    step_norm_primary: float = field(default=0.0, metadata={"help": "0: no R_well term"})


class RillOnly(SpectralLinearDefense):
    """Baseline "R_ill only" (arXiv 2505.23760 §5): maximise κ(H_H) without protecting D_P."""

    name = "rill_only"
    Config = RillOnlyConfig
    uses_primary_term = False

    def __init__(self, config: RillOnlyConfig | None = None, **overrides: object) -> None:
        super().__init__(config, **overrides)
        if self.config.step_norm_primary or self.config.lambda_primary:
            raise ConfigError("rill_only has no R_well term; leave step_norm_primary/lambda_primary at 0")
