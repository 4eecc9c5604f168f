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

Rank rule (methods/condition_number.md §7.1, :mod:`immunekit.spectral.rank`): null(K_P) and
null(K_H) are decided once per fit on the singular values of X_P and X_H (r = #{s_i > rtol·s_1},
``rank_rtol`` default max(N, D)·eps), and every κ of H = θᵀKθ, the rank k of R_ill and Opt-κ and the
step bounds use that fixed rank; the decisions are recorded in ``info_["rank_rule"]``. The
eigenvalues the spectral terms use are s² of the factor Fθ (eps-relative), not ``eigvalsh``'s.

Three documented safeguards (each switchable, each recorded per step):

* ``primary_safeguard``: the §4 guarantees hold per regularizer only (paper §4.4), and the R_ill
  step also moves H_P; τ_H is halved until the joint step keeps κ(H_P) at or below its value at
  θ_0 (``safeguard_against="initial"``, the default: exactly condition (ii) of Definition 3.1,
  κ(H_P) immunized / reference ≤ 1). ``"previous"`` instead forbids any per-step rise of κ(H_P);
  that is stricter than the theory asks, and on MNIST digit pairs it halves τ_H 13-15 times per
  step, so R_ill barely acts and the RIR comes from a falling κ(H_P) with κ(H_H) *below* the
  reference (pairs 0-3 and 5-8: harmful ratio 0.56 and 0.41 against 13.8 and 8.7 with
  ``"initial"``, RIR 39 and 15 against 41 and 17.5). The halving
  count is searched from the previous step's (``safeguard_search="warm"``, galloping then
  bisection), which returns the same count as plain backtracking whenever the accepted step
  sizes form an interval [0, τ*] — bit-identical fits on the house-prices seeds and on MNIST
  pair (0, 1) under both safeguard targets. It pays off when many halvings are needed (108
  instead of 384 κ evaluations on that pair with ``"previous"``); with the default ``"initial"``
  few are, and the two searches cost about the same (87 and 80).
* ``primary_subspace``: with a rank-deficient K_P (constant columns in the primary training
  rows), an R_ill step mixes range(K_P) with its null space N, and the least-squares primary head
  on θ-features then puts weight on N, which held-out rows do touch (14 % higher primary test
  MSE on Ames in our measurement). Updates are therefore projected as Δ ↦ P_V Δ P_V
  (V = range(K_P)), so θ = P_N + P_VθP_V and the primary least-squares predictions on any input
  equal those of θ_0 = I exactly. R_well and the task gradient already have this form.
* ``task_step_guard``: R_ill inflates ‖θ‖, so a fixed η on the task loss eventually exceeds
  2/L; η is capped at 1/L of the current task-loss curvature.

Fast paths (``use_fast_paths``, on by default; ``False`` runs the original dense code, kept for
benchmarks/mnist_speed.py and tests/defenses/test_defense_speed_paths.py). The iteration, every
decision (ranks, clips, caps, safeguard halvings) and the recorded values are the same; results
differ by rounding only. Measured on the house-prices tasks (seeds 1–3, Kaggle csv), default
configs: final θ within 2e-11 relative for condition_number and rill_only and 3e-8 for opt_kappa,
whose trajectory is that sensitive to rounding (the original code moves θ by 5e-9 when only the
row order of X_H changes). At D = 784 a fit is 2.3–4.4× faster (benchmarks/mnist_speed.py):

* once per fit: one SVD per data factor X decides null(K) by the rank rule and gives the
  preconditioner, the factor F (FᵀF = K) and the range projector
  (:class:`~immunekit.spectral.rank.FactorSpectrum`, shared with the dense path); step 0 reuses
  the directions computed at θ_0 for λ balancing; λ_max(K_P) is kept for the task-step guard.
* thin pieces: F keeps only its rank K rows; P_K and the primary-subspace projection use the
  thinner of the range/null bases (:class:`~immunekit.spectral.fast.RangeProjector`, nothing
  at full rank); H = (Fθ)ᵀ(Fθ) reuses the product formed for κ.
* spectral terms: ``eigvalsh`` plus inverse iteration for the one or two eigenvectors G needs,
  on the r × r Gram of Fθ when rank K < D (:func:`~immunekit.spectral.fast.g_well_fast` etc.).
  rill_only (τ_P = 0) records R_well(H_P) from Fθ's singular values and skips its direction.
* κ(H_P) of a step's θ is the one its safeguard accepted (the same tensor), and κ(H_P), κ(H_H)
  are computed once per step instead of twice.
* the safeguard skips a halving candidate only when a certified lower bound on its log κ(H_P)
  (:func:`~immunekit.spectral.fast.gram_kappa_bound`: QR + Lanczos, about a quarter of
  ``svdvals``) already exceeds the limit, i.e. when the reference rejects it too; candidates near
  the limit (``TIE_MARGIN``) are re-decided with the reference's own full-factor κ.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from immunekit.data.task import Task
from immunekit.defenses.base import Defense, DefenseConfig, require_linear
from immunekit.defenses.deep import PRIMARY_GRAD_RATIO, DeepTrainingConfig, check_training_settings, fit_deep
from immunekit.defenses.linear_common import task_grads, task_head_width
from immunekit.defenses.spectral_iterative import (
    IterPoint,
    LowRankTerm,
    Side,
    ill_term,
    well_term,
)
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel, LinearModel
from immunekit.spectral.condition import (
    EPS64,
    KappaInfo,
    check_rtol,
    gram_condition_number,
    gram_spectrum,
)
from immunekit.spectral.fast import (
    RangeProjector,
    g_ill_fast,
    g_well_fast,
    gram_kappa_bound,
)
from immunekit.spectral.hessians import covariance, linear_l2_hessian, symmetrize
from immunekit.spectral.iterative import SolverStats, check_solver
from immunekit.spectral.rank import FactorSpectrum, factor_spectrum_cached
from immunekit.spectral.regularizers import (
    Preconditioner,
    SpectralGrad,
    g_ill,
    g_well,
    r_ill_step_bound,
    r_well_step_bound,
)

log = logging.getLogger(__name__)

TIE_MARGIN = 1e-9
"""Relative distance of a candidate's log κ(H_P) to the safeguard's limit below which the decision
is re-taken with the reference's full-factor evaluations (thin and full differ by rounding only)."""

SCREEN_MAX_ITERS = 30
"""Lanczos steps per extreme singular value in a screening bound (more only tightens the bound)."""

SCREEN_MIN_RANK = 384
"""Safeguard candidates are screened by a certified κ bound only when rank K_P is at least this:
below it ``svdvals`` is about as cheap as the bound's QR + triangular inverse + Lanczos."""


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
    lambda_primary: float | None = field(
        default=None,
        metadata={"help": "λ_P for init/fixed (default 1; deep models: set by primary_grad_ratio)"},
    )
    lambda_harmful: float | None = field(default=None, metadata={"help": "λ_H for fixed (init derives it)"})
    preconditioner: Literal["pinv", "ridge", "none"] = field(
        default="pinv", metadata={"help": "left preconditioner K⁺ (pinv), (K+εI)⁻¹ (ridge), none (ablation)"}
    )
    ridge: float = field(default=0.0, metadata={"help": "ε for the ridge preconditioner"})
    rank_rtol: float | None = field(
        default=None,
        metadata={
            "help": "the rank rule's relative cut on the singular values of X_P and X_H (K = XᵀX): decides "
            "null(K) for K⁺, the projector, the factor and rank H (default max(N, D)·eps); in (0, 1)"
        },
    )
    delta_min: float = field(default=1e-300, metadata={"help": "floor of Δ(H_H) in R_ill (hits are logged)"})
    guard: bool = field(default=True, metadata={"help": "clip τ to the monotone-κ step bounds"})
    primary_safeguard: bool = field(
        default=True,
        metadata={"help": "halve τ_H until the joint step does not raise κ(H_P) (τ_H = 0 if none does)"},
    )
    safeguard_against: Literal["previous", "initial"] = field(
        default="initial",
        metadata={"help": "κ(H_P) the joint step must not exceed: the current one, or θ_0's (condition (b))"},
    )
    safeguard_halvings: int = field(default=30, metadata={"help": "max halvings of τ_H per step"})
    safeguard_search: Literal["warm", "cold"] = field(
        default="warm",
        metadata={
            "help": "warm: search the halvings outward from the previous step's count; "
            "cold: from 0 every step (same τ_H when the accepted τs form an interval)"
        },
    )
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
    spectral_solver: str = field(
        default="dense",
        metadata={
            "help": "extreme spectra of H = θᵀKθ: 'dense' (SVD of the factor Fθ, the reference) or 'lanczos' "
            "(certified warm-started Lanczos on MMᵀ, dense fall-back recorded; pinv preconditioner only)"
        },
    )

    def __post_init__(self) -> None:
        check_solver(self.spectral_solver, where="spectral_solver")
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
        if self.rank_rtol is not None:
            check_rtol(self.rank_rtol, name="rank_rtol")
        if self.preconditioner == "ridge" and self.ridge <= 0:
            raise ConfigError("preconditioner='ridge' needs ridge > 0, e.g. ridge=1e-6")
        if self.balance == "fixed" and (self.lambda_primary is None or self.lambda_harmful is None):
            raise ConfigError(
                "balance='fixed' needs lambda_primary and lambda_harmful; or use balance='per_step'"
            )


class SpectralLinearDefense(Defense):
    """Algorithm 1 with pluggable spectral terms: H_P kept well-conditioned, H_H made ill-conditioned."""

    Config = SpectralDefenseConfig
    config: SpectralDefenseConfig  # what Defense.__init__ loads: this class's Config
    uses_primary_term: ClassVar[bool] = True
    use_fast_paths: ClassVar[bool] = True
    _prev_halvings: int = 0  # the warm safeguard search starts here (reset by fit)
    _ref_holder: _RefHolder | None = None  # the dense reference κ(H_P) for safeguard ties (iterative path)
    safeguard_evaluations_: int = 0  # κ(H_P) candidates the last safeguard search evaluated
    """Run the cached / thin / certified computations (see "Fast paths" below); ``False`` runs the
    original dense ones (for benchmarks and equality tests; an instance attribute overrides it)."""

    def primary_term(self, h: Tensor, rank: int) -> SpectralGrad:
        """∂R_P/∂H_P (to be descended); ``rank`` is H_P's rank, fixed on K_P (the rank rule)."""
        return g_well(h, rank=rank)

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
        omega = torch.zeros(theta.shape[1], task_head_width(task, task.primary), dtype=torch.float64)
        self._prev_halvings = 0
        self.safeguard_evaluations_ = 0
        if self.use_fast_paths and self._iterative_supported():
            return lin.with_weights(*self._iter_fit(theta, omega, task))
        if self.use_fast_paths:
            return lin.with_weights(*self._fast_fit(theta, omega, task))
        su = self._setup(theta, task)
        self.history_ = []
        self.info_ = {
            "rank_rule": su.rank_rule,
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
        # The rank rule (spectral.rank): null(K) decided once, on the singular values of X.
        spec_p, spec_h = task_spectra(task, cfg.rank_rtol)
        pre_p = spec_p.preconditioner(cfg.preconditioner, ridge=cfg.ridge)
        pre_h = spec_h.preconditioner(cfg.preconditioner, ridge=cfg.ridge)
        proj = spec_p.preconditioner("pinv").projector if cfg.primary_subspace else None
        su = _Setup(
            k_p,
            k_h,
            spec_p.factor(thin=False),
            spec_h.factor(thin=False),
            pre_p,
            pre_h,
            proj,
            None,
            None,
            0.0,
            spec_p,
            spec_h,
        )
        lam_p, lam_h = self._initial_lambdas(theta, su)
        return dataclasses.replace(su, lam_p=lam_p, lam_h=lam_h, log_kappa_p0=su.kappa_p(theta).log_kappa)

    def _initial_lambdas(self, theta: Tensor, su: _Setup) -> tuple[float | None, float | None]:
        cfg = self.config
        if cfg.balance == "fixed":  # rill_only: λ_P is never applied
            return (cfg.lambda_primary if self.uses_primary_term else 0.0), cfg.lambda_harmful
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
        sp = self.primary_term(linear_l2_hessian(theta, su.k_p), su.spec_p.rank)
        sh = self.harmful_term(linear_l2_hessian(theta, su.k_h), su.spec_h.rank)
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
        self.safeguard_evaluations_ = 0
        tau_h, halvings = self._safe_harmful_step(base, d_h, tau_h, su, limit)
        evaluations = self.safeguard_evaluations_
        self.history_.append(
            _step_record(
                t, loss, (sp.value, sh.value), (log_kappa_p, log_kappa_h), (tau_p, tau_h), cfg.lr,
                (clip_p, clip_h), (eta, capped), (halvings, evaluations),
            )
        )  # fmt: skip
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
        j = self._search_halvings(lambda j: su.kappa_p(base - tau_h * 0.5**j * d_h).log_kappa <= log_kappa_p)
        return (0.0, cfg.safeguard_halvings + 1) if j is None else (tau_h * 0.5**j, j)

    def _search_halvings(self, accept: Callable[[int], bool]) -> int | None:
        """The safeguard's halving count: the smallest j ≤ ``safeguard_halvings`` with ``accept(j)``.

        ``cold`` tries j = 0, 1, 2, … (backtracking). ``warm`` starts one below the previous step's
        count, j₀ = max(0, j_prev − 1) (j₀ = 0 after a step where nothing was accepted), gallops
        away from j₀ in steps 1, 2, 4, … until the decision flips, then bisects the last gap. When
        the accepted step sizes along the ray form an interval [0, τ*] (accept(j) ⇒ accept(j + 1))
        both return the same j; warm needs about 2·log₂(|j − j₀| + 1) + 2 evaluations instead of
        j + 1 (on MNIST j climbs to 25-28 and usually moves by one per step).
        """
        last = self.config.safeguard_halvings
        self.safeguard_evaluations_ = 0
        memo: dict[int, bool] = {}

        def ok(j: int) -> bool:
            if j not in memo:
                self.safeguard_evaluations_ += 1
                memo[j] = accept(j)
            return memo[j]

        if self.config.safeguard_search == "cold":
            return next((j for j in range(last + 1) if ok(j)), None)
        found = _gallop(ok, min(max(self._prev_halvings - 1, 0), last), last)
        self._prev_halvings = 0 if found is None else found
        return found

    def _task_lr(self, theta: Tensor, omega: Tensor, k_p: Tensor, task: Task) -> tuple[float, bool]:
        """η, capped at 1/L where L bounds the task loss curvature in ω and in θ.

        For the squared losses over N·C outputs, ∇²_ω L = 2 (θᵀK_Pθ ⊗ I)/(N·C) and
        ∇²_θ L = 2 (K_P ⊗ ωωᵀ)/(N·C); cross-entropy curvature is at most ½ of that. A regularizer that
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

    # -----------------------------------------------------------------------------------------
    # Fast paths: the same iteration and the same decisions, cheaper at large D (module docs)
    # -----------------------------------------------------------------------------------------

    def _fast_fit(self, theta: Tensor, omega: Tensor, task: Task) -> tuple[Tensor, Tensor]:
        cfg = self.config
        fs = self._fast_setup(theta, task)
        self.history_ = []
        self.info_ = {
            "rank_rule": {"primary": fs.spec_p.describe(), "harmful": fs.spec_h.describe()},
            "preconditioner_primary": fs.pre_p.describe(),
            "preconditioner_harmful": fs.pre_h.describe(),
            "balance": cfg.balance,
            "lambda_primary": fs.lam_p,
            "lambda_harmful": fs.lam_h,
            "primary_subspace": cfg.primary_subspace,
            "delta_floor_hits": 0,
        }
        point: _Point | None = fs.start
        for t in tqdm(range(cfg.steps), desc=self.name, disable=not cfg.progress, leave=False):
            theta, omega, point = self._fast_step(t, theta, omega, task, fs, point)
        final_p = point if point is not None else fs.kappa_p(theta)
        self.info_.update(
            final_log_kappa_primary=final_p.info.log_kappa,
            final_log_kappa_harmful=fs.kappa_h(theta).info.log_kappa,
        )
        return theta, omega

    def _fast_setup(self, theta: Tensor, task: Task) -> _FastSetup:
        cfg = self.config
        # One SVD per data factor decides null(K) (the rank rule) and gives the preconditioner,
        # the thin factor and the range projector.
        spec_p, spec_h = task_spectra(task, cfg.rank_rtol)
        pinv = cfg.preconditioner == "pinv"
        pre_p = spec_p.preconditioner(cfg.preconditioner, ridge=cfg.ridge, dense=not pinv)
        pre_h = spec_h.preconditioner(cfg.preconditioner, ridge=cfg.ridge, dense=not pinv)
        fs = _FastSetup(
            spec_p=spec_p,
            spec_h=spec_h,
            f_p=spec_p.factor(thin=True),
            f_h=spec_h.factor(thin=True),
            pre_p=pre_p,
            pre_h=pre_h,
            range_p=spec_p.projector() if pinv else None,
            range_h=spec_h.projector() if pinv else None,
            subspace=spec_p.projector() if cfg.primary_subspace else None,
            rtol=spec_p.rtol,
            k_p_max=float(spec_p.eigenvalues()[0]),
        )
        fs.start = fs.kappa_p(theta)
        fs.log_kappa_p0 = fs.start.info.log_kappa
        if cfg.balance == "fixed":  # rill_only: λ_P is never applied
            fs.lam_p = cfg.lambda_primary if self.uses_primary_term else 0.0
            fs.lam_h = cfg.lambda_harmful
        elif cfg.balance == "init":
            directions = self._fast_directions(theta, fs, fs.start, primary=True)
            d_p, d_h = directions[2], directions[3]
            assert d_p is not None
            lam_p = 1.0 if cfg.lambda_primary is None else cfg.lambda_primary
            lam_h = lam_p * float(d_p.norm()) / max(float(d_h.norm()), 1e-300)
            log.info("%s: λ_P=%.3g, λ_H=%.3g balanced at θ_0", self.name, lam_p, lam_h)
            fs.lam_p, fs.lam_h = (lam_p if self.uses_primary_term else 0.0), lam_h
            fs.first_directions = directions  # step 0 runs at θ_0: reuse them
        # R_well's direction is only needed when τ_P can be non-zero (not for rill_only); its value
        # is still recorded, from the factor's singular values.
        fs.skip_primary = type(self).primary_term is SpectralLinearDefense.primary_term and (
            fs.lam_p == 0.0 or (fs.lam_p is None and cfg.step_norm_primary == 0)
        )
        return fs

    def _fast_directions(
        self, theta: Tensor, fs: _FastSetup, pp: _Point, *, primary: bool
    ) -> tuple[SpectralGrad, SpectralGrad, Tensor | None, Tensor, _Point]:
        """As :meth:`_directions`, with H = (Fθ)ᵀ(Fθ) from the thin factor products already formed."""
        ph = fs.kappa_h(theta)
        if primary:
            sp = self._fast_primary_term(pp)
            d_p: Tensor | None = fs.project(fs.direction(fs.pre_p, fs.range_p, theta, sp.g))
        else:
            sp, d_p = _well_value(pp, theta.shape[1]), None
        sh = self._fast_harmful_term(ph)
        d_h = fs.project(fs.direction(fs.pre_h, fs.range_h, theta, sh.g))
        return sp, sh, d_p, d_h, ph

    def _fast_primary_term(self, pp: _Point) -> SpectralGrad:
        """:meth:`primary_term` computing only v_1 (g_well_fast; on the Gram of F_Pθ if rank K_P < D)."""
        h = pp.hessian()
        if type(self).primary_term is SpectralLinearDefense.primary_term:
            return g_well_fast(h, factor=pp.m, rank=pp.info.rank, values=pp.values)
        return self.primary_term(h, pp.info.rank)

    def _fast_harmful_term(self, ph: _Point) -> SpectralGrad:
        """:meth:`harmful_term` computing only v_k (g_ill_fast; on the Gram of F_Hθ if rank K_H < D)."""
        h = ph.hessian()
        if type(self).harmful_term is SpectralLinearDefense.harmful_term:
            return g_ill_fast(
                h, rank=ph.info.rank, delta_min=self.config.delta_min, factor=ph.m, values=ph.values
            )
        return self.harmful_term(h, ph.info.rank)

    def _fast_step(
        self, t: int, theta: Tensor, omega: Tensor, task: Task, fs: _FastSetup, pp: _Point | None
    ) -> tuple[Tensor, Tensor, _Point | None]:
        cfg = self.config
        if cfg.task_loss:
            loss, g_theta, g_omega = task_grads(task.primary, theta, omega, task.loss)
        else:
            loss, g_theta, g_omega = float("nan"), None, torch.zeros_like(omega)
        if pp is None:
            pp = fs.kappa_p(theta)
        if t == 0 and fs.first_directions is not None:
            sp, sh, d_p, d_h, ph = fs.first_directions
            fs.first_directions = None
        else:
            sp, sh, d_p, d_h, ph = self._fast_directions(theta, fs, pp, primary=not fs.skip_primary)
        if d_p is None:
            tau_p, clip_p = 0.0, False
        else:
            tau_p, clip_p = self._tau(fs.lam_p, cfg.step_norm_primary, d_p, self.primary_bound(sp))
        tau_h, clip_h = self._tau(fs.lam_h, cfg.step_norm_harmful, d_h, self.harmful_bound(sh))
        self.info_["delta_floor_hits"] += int(sh.floored)
        eta, capped = self._fast_task_lr(pp, omega, fs, task)
        # θ − η·P(∇L) − τ_P d_P as in _step (a zero gradient or τ_P = 0 leaves θ bit for bit).
        base = theta
        if g_theta is not None:
            base = base - eta * fs.project(g_theta)
        if d_p is not None:
            base = base - tau_p * d_p
        log_kappa_p, log_kappa_h = pp.info.log_kappa, ph.info.log_kappa
        limit = fs.log_kappa_p0 if cfg.safeguard_against == "initial" else log_kappa_p
        limit_theta = fs.start.theta if cfg.safeguard_against == "initial" and fs.start else theta
        self.safeguard_evaluations_ = 0
        tau_h, halvings, nxt = self._fast_safe_harmful_step(base, d_h, tau_h, fs, limit, limit_theta)
        evaluations = self.safeguard_evaluations_
        # Screen the next step's first candidate only if this step's first one was rejected.
        fs.screen_first = evaluations > 1 or (evaluations == 1 and nxt is None)
        self.history_.append(
            _step_record(
                t, loss, (sp.value, sh.value), (log_kappa_p, log_kappa_h), (tau_p, tau_h), cfg.lr,
                (clip_p, clip_h), (eta, capped), (halvings, evaluations),
            )
        )  # fmt: skip
        new_theta = nxt.theta if nxt is not None else base - tau_h * d_h
        return new_theta, omega - eta * g_omega, nxt

    def _fast_safe_harmful_step(
        self,
        base: Tensor,
        d_h: Tensor,
        tau_h: float,
        fs: _FastSetup,
        limit: float,
        limit_theta: Tensor | None = None,
    ) -> tuple[float, int, _Point | None]:
        """:meth:`_safe_harmful_step` with the same accepted halving count, and the accepted point.

        A candidate is evaluated exactly (``svdvals`` of its factor, as the reference does) unless
        a certified lower bound on its log κ(H_P) already exceeds ``limit``: then the reference
        would reject it too, so it is skipped. The thin factor's value differs from the full one's
        by rounding only; within ``TIE_MARGIN`` of the limit both sides are re-evaluated with the
        reference's full factor (``limit_theta`` is the θ that ``limit`` was computed at). The exact
        value of the accepted candidate is kept for the next step, whose θ it is.
        """
        cfg = self.config
        if not cfg.primary_safeguard or tau_h == 0.0 or not self.uses_primary_term:
            return tau_h, 0, None
        screen = _Screen(fs, base, d_h)
        reference_limit: list[float] = []
        accepted: dict[int, _Point] = {}

        def accept(j: int) -> bool:
            tau = tau_h * 0.5**j
            screened = bool(accepted) or self.safeguard_evaluations_ > 1 or fs.screen_first
            if screened and screen.certainly_above(tau, limit):
                return False
            cand = base - tau * d_h
            point = fs.kappa_p(cand)
            ok = point.info.log_kappa <= limit
            if limit_theta is not None and abs(point.info.log_kappa - limit) <= TIE_MARGIN * max(
                1.0, abs(limit)
            ):
                if not reference_limit:
                    reference_limit.append(fs.reference_log_kappa_p(limit_theta))
                ok = fs.reference_log_kappa_p(cand) <= reference_limit[0]
            if ok:
                accepted[j] = point
            return ok

        j = self._search_halvings(accept)
        if j is None:
            return 0.0, cfg.safeguard_halvings + 1, None
        return tau_h * 0.5**j, j, accepted[j]

    # -----------------------------------------------------------------------------------------
    # Iterative spectra (spectral_solver='lanczos'): the same iteration, certified extreme pairs
    # -----------------------------------------------------------------------------------------

    def _iterative_supported(self) -> bool:
        """Whether ``spectral_solver='lanczos'`` applies: the pinv preconditioner and the built-in terms."""
        cfg = self.config
        if cfg.spectral_solver != "lanczos":
            return False
        if cfg.preconditioner != "pinv":
            log.warning(
                "%s: spectral_solver='lanczos' needs preconditioner='pinv'; using the dense path", self.name
            )
            return False
        return self._iter_terms_builtin()

    def _iter_terms_builtin(self) -> bool:
        """True when primary_term / harmful_term are R_well / R_ill (subclasses with other terms override)."""
        cls = type(self)
        return (
            cls.primary_term is SpectralLinearDefense.primary_term
            and cls.harmful_term is SpectralLinearDefense.harmful_term
        )

    def _iter_primary_term(self, pt: IterPoint) -> LowRankTerm:
        """R_well(H_P) from the certified pairs (see :mod:`immunekit.defenses.spectral_iterative`)."""
        return well_term(pt, pt.theta.shape[1])

    def _iter_harmful_term(self, pt: IterPoint) -> LowRankTerm:
        """R_ill(H_H) from the certified pairs."""
        return ill_term(pt, pt.theta.shape[1], self.config.delta_min)

    def _iter_fit(self, theta: Tensor, omega: Tensor, task: Task) -> tuple[Tensor, Tensor]:
        """Algorithm 1 with certified iterative extreme spectra (module docs, "Fast paths")."""
        cfg = self.config
        t_start = time.perf_counter()
        spec_p, spec_h = task_spectra(task, cfg.rank_rtol)
        t_cov = time.perf_counter() - t_start
        stats = SolverStats()
        skip_primary = self._iter_skip_primary()
        # λ_2(H_P) only enters R_well's step bound
        second = (
            not skip_primary and cfg.guard and type(self).primary_bound is SpectralLinearDefense.primary_bound
        )
        side_p = Side(spec_p, stats, second=second)
        side_h = Side(spec_h, stats)
        self._ref_holder = _RefHolder(spec_p)
        subspace = spec_p.projector() if cfg.primary_subspace else None
        k_p_max = float(spec_p.singular_values[0]) ** 2
        pp = side_p.point(theta)
        start_theta, log_kappa_p0 = theta, pp.log_kappa
        lam_p, lam_h = self._iter_lambdas(theta, pp, side_p, side_h, subspace, skip_primary)
        self.history_ = []
        self.info_ = {
            "rank_rule": {"primary": spec_p.describe(), "harmful": spec_h.describe()},
            "preconditioner_primary": spec_p.preconditioner("pinv", dense=False).describe(),
            "preconditioner_harmful": spec_h.preconditioner("pinv", dense=False).describe(),
            "balance": cfg.balance,
            "lambda_primary": lam_p,
            "lambda_harmful": lam_h,
            "primary_subspace": cfg.primary_subspace,
            "delta_floor_hits": 0,
            "spectral_solver": "lanczos",
        }

        def project(u: Tensor) -> Tensor:
            return u if subspace is None else subspace.sandwich(u)

        for t in tqdm(range(cfg.steps), desc=self.name, disable=not cfg.progress, leave=False):
            if cfg.task_loss:
                loss, g_theta, g_omega = task_grads(task.primary, theta, omega, task.loss)
            else:
                loss, g_theta, g_omega = float("nan"), None, torch.zeros_like(omega)
            ph = side_h.point(theta)
            sh = self._iter_harmful_term(ph)
            d_h = project(side_h.direction(ph, sh))
            if skip_primary:
                sp, d_p = well_term(pp, theta.shape[1]), None
                tau_p, clip_p = 0.0, False
            else:
                sp = self._iter_primary_term(pp)
                d_p = project(side_p.direction(pp, sp))
                tau_p, clip_p = self._tau(
                    lam_p, cfg.step_norm_primary, d_p, self.primary_bound(sp.spectral_grad())
                )
            tau_h, clip_h = self._tau(
                lam_h, cfg.step_norm_harmful, d_h, self.harmful_bound(sh.spectral_grad())
            )
            self.info_["delta_floor_hits"] += int(sh.floored)
            eta, capped = self._iter_task_lr(pp, omega, k_p_max, task)
            base = theta
            if g_theta is not None:
                base = base - eta * project(g_theta)
            if d_p is not None:
                base = base - tau_p * d_p
            limit = log_kappa_p0 if cfg.safeguard_against == "initial" else pp.log_kappa
            limit_theta = start_theta if cfg.safeguard_against == "initial" else theta
            tau_h, halvings, nxt = self._iter_safe_harmful_step(base, d_h, tau_h, side_p, limit, limit_theta)
            self.history_.append(
                _step_record(
                    t, loss, (sp.value, sh.value), (pp.log_kappa, ph.log_kappa), (tau_p, tau_h), cfg.lr,
                    (clip_p, clip_h), (eta, capped), (halvings, self.safeguard_evaluations_),
                )
            )  # fmt: skip
            theta = nxt.theta if nxt is not None else base - tau_h * d_h
            omega = omega - eta * g_omega
            pp = nxt if nxt is not None else side_p.point(theta)
        self.info_.update(
            final_log_kappa_primary=pp.log_kappa,
            final_log_kappa_harmful=side_h.point(theta).log_kappa,
            spectral_stats=stats.to_dict(),
        )
        total = time.perf_counter() - t_start
        self.info_["timing"] = {
            "covariance": t_cov,
            "spectra": stats.seconds,
            "update": total - t_cov - stats.seconds,
        }
        return theta, omega

    def _iter_skip_primary(self) -> bool:
        """R_well's direction is not needed when τ_P is always 0 (rill_only); its value is still recorded."""
        cfg = self.config
        if not self.uses_primary_term:
            return True
        if cfg.balance == "fixed":
            return cfg.lambda_primary == 0.0
        return cfg.balance == "per_step" and cfg.step_norm_primary == 0

    def _iter_lambdas(
        self,
        theta: Tensor,
        pp: IterPoint,
        side_p: Side,
        side_h: Side,
        subspace: RangeProjector | None,
        skip_primary: bool,
    ) -> tuple[float | None, float | None]:
        cfg = self.config
        if cfg.balance == "fixed":
            return (cfg.lambda_primary if self.uses_primary_term else 0.0), cfg.lambda_harmful
        if cfg.balance == "per_step":
            return None, None

        def project(u: Tensor) -> Tensor:
            return u if subspace is None else subspace.sandwich(u)

        ph = side_h.point(theta)
        d_p = project(side_p.direction(pp, self._iter_primary_term(pp)))
        d_h = project(side_h.direction(ph, self._iter_harmful_term(ph)))
        lam_p = 1.0 if cfg.lambda_primary is None else cfg.lambda_primary
        lam_h = lam_p * float(d_p.norm()) / max(float(d_h.norm()), 1e-300)
        log.info("%s: λ_P=%.3g, λ_H=%.3g balanced at θ_0", self.name, lam_p, lam_h)
        return (lam_p if self.uses_primary_term else 0.0), lam_h

    def _iter_task_lr(self, pp: IterPoint, omega: Tensor, k_p_max: float, task: Task) -> tuple[float, bool]:
        """:meth:`_task_lr` with λ_max(θᵀK_Pθ) certified and λ_max(K_P) = s_1² of X_P."""
        cfg = self.config
        if not (cfg.task_loss and cfg.task_step_guard):
            return cfg.lr, False
        n_out = task.primary.x.shape[0] * omega.shape[1]
        l_omega = 2.0 * pp.ext.lam_max / n_out
        l_theta = 2.0 * k_p_max * float((omega**2).sum()) / n_out
        limit = 1.0 / max(l_omega, l_theta, 1e-300)
        return (limit, True) if cfg.lr > limit else (cfg.lr, False)

    def _iter_safe_harmful_step(
        self, base: Tensor, d_h: Tensor, tau_h: float, side_p: Side, limit: float, limit_theta: Tensor
    ) -> tuple[float, int, IterPoint | None]:
        """The safeguard's halving search on certified κ(H_P) of θ(τ) = base − τ d_H.

        F_Pθ(τ) = M_0 − τM_1 (two factor products per step, none per candidate). A candidate whose
        certified interval for log κ lies on one side of ``limit`` is decided by it; within the
        bound plus ``TIE_MARGIN`` of the limit both sides are re-decided with the reference's dense
        full-factor κ (as the dense fast path does).
        """
        cfg = self.config
        self.safeguard_evaluations_ = 0
        if not cfg.primary_safeguard or tau_h == 0.0 or not self.uses_primary_term:
            return tau_h, 0, None
        m0, m1 = side_p.f @ base, side_p.f @ d_h
        accepted: dict[int, IterPoint] = {}
        reference_limit: list[float] = []
        ref = _FastSetup.reference_log_kappa_p

        def accept(j: int) -> bool:
            tau = tau_h * 0.5**j
            cand = base - tau * d_h
            pt = side_p.point(cand, m0 - tau * m1)
            lk = pt.log_kappa
            margin = 2.0 * pt.ext.rel_bound + TIE_MARGIN * max(1.0, abs(limit))
            if abs(lk - limit) <= margin:
                holder = self._ref_holder
                if not reference_limit:
                    reference_limit.append(ref(holder, limit_theta))  # type: ignore[arg-type]
                ok = ref(holder, cand) <= reference_limit[0]  # type: ignore[arg-type]
            else:
                ok = lk <= limit
            if ok:
                accepted[j] = pt
            return ok

        j = self._search_halvings(accept)
        if j is None:
            return 0.0, cfg.safeguard_halvings + 1, None
        return tau_h * 0.5**j, j, accepted[j]

    def _fast_task_lr(self, pp: _Point, omega: Tensor, fs: _FastSetup, task: Task) -> tuple[float, bool]:
        """:meth:`_task_lr` with λ_max(θᵀK_Pθ) = s_1² of F_Pθ and λ_max(K_P) from the setup's eigh."""
        cfg = self.config
        if not (cfg.task_loss and cfg.task_step_guard):
            return cfg.lr, False
        n_out = fs.n_out(task, omega)
        l_omega = 2.0 * pp.info.sigma_max / n_out
        l_theta = 2.0 * fs.k_p_max * float((omega**2).sum()) / n_out
        limit = 1.0 / max(l_omega, l_theta, 1e-300)
        return (limit, True) if cfg.lr > limit else (cfg.lr, False)


def task_spectra(task: Task, rtol: float | None = None) -> tuple[FactorSpectrum, FactorSpectrum]:
    """The rank rule's decisions on the task's training inputs: (X_P's, X_H's) :class:`FactorSpectrum`.

    The same function of the same data everywhere (defenses and the metric), so null(K) is decided
    once per task.
    """
    return factor_spectrum_cached(task.primary.x, rtol=rtol), factor_spectrum_cached(
        task.harmful.x, rtol=rtol
    )


def _gallop(ok: Callable[[int], bool], start: int, last: int) -> int | None:
    """Smallest j in [0, last] with ok(j), for a monotone ok (False…False True…True), from ``start``.

    Exponential search away from ``start`` brackets the flip between a rejected ``lo`` and an
    accepted ``hi``, and bisection closes it.
    """
    if ok(start):
        hi, step = start, 1
        while hi > 0:
            j = max(hi - step, 0)
            if not ok(j):
                lo = j
                break
            hi, step = j, 2 * step
        else:
            return 0
    else:
        lo, step = start, 1
        while True:
            if lo == last:
                return None
            j = min(lo + step, last)
            if ok(j):
                hi = j
                break
            lo, step = j, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


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
    spec_p: FactorSpectrum
    spec_h: FactorSpectrum

    @property
    def rank_rule(self) -> dict:
        """The rank decisions on X_P and X_H (recorded in ``info_``)."""
        return {"primary": self.spec_p.describe(), "harmful": self.spec_h.describe()}

    def kappa_p(self, theta: Tensor) -> KappaInfo:
        """κ(θᵀK_Pθ) from the factor F_Pθ, rank fixed on K_P (small eigenvalues resolved to eps relative)."""
        return gram_condition_number(self.f_p @ theta, rtol=self.spec_p.rtol, rank=self.spec_p.rank)

    def kappa_h(self, theta: Tensor) -> KappaInfo:
        """κ(θᵀK_Hθ) from the factor F_Hθ, rank fixed on K_H."""
        return gram_condition_number(self.f_h @ theta, rtol=self.spec_h.rtol, rank=self.spec_h.rank)

    def project(self, update: Tensor) -> Tensor:
        """P_V Δ P_V + P_N Δ P_N with V = range(K_P), N = null(K_P) (identity when the constraint is off)."""
        if self.proj is None:
            return update
        other = torch.eye(self.proj.shape[0], dtype=self.proj.dtype) - self.proj
        return self.proj @ update @ self.proj + other @ update @ other


@dataclass(frozen=True)
class _Point:
    """κ(θᵀKθ) at one θ from the thin factor product M = F_thin θ, kept with M and its singular values."""

    theta: Tensor
    info: KappaInfo
    m: Tensor
    values: Tensor

    def hessian(self) -> Tensor:
        """H = θᵀKθ = MᵀM (equal to linear_l2_hessian(θ, K) up to rounding: FᵀF = K)."""
        return symmetrize(self.m.T @ self.m)


def _well_value(pp: _Point, p: int) -> SpectralGrad:
    """R_well(H_P) from the singular values s of F_Pθ (λ = s², zeros up to p) when G is not needed."""
    w = torch.zeros(p, dtype=torch.float64)
    lam = pp.values[:p] ** 2
    w[: lam.numel()] = lam
    value = float((w[0] ** 2 - w**2).sum() / (2 * p)) if p else 0.0
    return SpectralGrad(torch.empty(0, 0, dtype=torch.float64), value, w, torch.empty(0, 0), pp.info.rank)


@dataclass(kw_only=True)
class _FastSetup:
    """What the fast path computes once: thin factors and projectors from one eigh per K, λs, caches."""

    spec_p: FactorSpectrum
    spec_h: FactorSpectrum
    f_p: Tensor
    f_h: Tensor
    pre_p: Preconditioner
    pre_h: Preconditioner
    range_p: RangeProjector | None
    range_h: RangeProjector | None
    subspace: RangeProjector | None
    rtol: float
    k_p_max: float
    lam_p: float | None = None
    lam_h: float | None = None
    log_kappa_p0: float = 0.0
    start: _Point | None = None
    first_directions: tuple | None = None
    skip_primary: bool = False
    screen_first: bool = True
    screen_vectors: tuple[Tensor | None, Tensor | None] = (None, None)
    f_p_full: Tensor | None = None

    def __post_init__(self) -> None:
        self.norm_f_p = float(self.f_p.norm())

    def _kappa(self, f: Tensor, theta: Tensor, spec: FactorSpectrum) -> _Point:
        m = f @ theta
        info, values = gram_spectrum(m, rtol=spec.rtol, rank=spec.rank)
        return _Point(theta, info, m, values)

    def kappa_p(self, theta: Tensor) -> _Point:
        """κ(θᵀK_Pθ) from F_Pθ, exactly as _Setup.kappa_p (rank fixed on K_P, thin factor)."""
        return self._kappa(self.f_p, theta, self.spec_p)

    def kappa_h(self, theta: Tensor) -> _Point:
        """κ(θᵀK_Hθ) from F_Hθ (rank fixed on K_H)."""
        return self._kappa(self.f_h, theta, self.spec_h)

    def reference_log_kappa_p(self, theta: Tensor) -> float:
        """The log κ(θᵀK_Pθ) of _Setup.kappa_p, bit for bit (full D-row factor, same rank)."""
        if self.f_p_full is None:
            self.f_p_full = self.spec_p.factor(thin=False)
        rank, rtol = self.spec_p.rank, self.spec_p.rtol
        return gram_condition_number(self.f_p_full @ theta, rtol=rtol, rank=rank).log_kappa

    def direction(self, pre: Preconditioner, rp: RangeProjector | None, theta: Tensor, g: Tensor) -> Tensor:
        """K⁺∇_θR = 2 P_K θ G (Preconditioner.spectral_step) with a thin P_K for the pseudo-inverse."""
        if rp is None:
            return pre.spectral_step(theta, g)
        return 2.0 * rp.apply(theta @ g)

    def project(self, update: Tensor) -> Tensor:
        """_Setup.project with thin bases (the identity when K_P has full rank)."""
        return update if self.subspace is None else self.subspace.sandwich(update)

    @staticmethod
    def n_out(task: Task, omega: Tensor) -> int:
        return task.primary.x.shape[0] * omega.shape[1]


@dataclass
class _RefHolder:
    """Just what :meth:`_FastSetup.reference_log_kappa_p` reads (the dense reference κ of H_P)."""

    spec_p: FactorSpectrum
    f_p_full: Tensor | None = None


class _Screen:
    """Certified early rejection of safeguard candidates θ(τ) = base − τ d_H (see _fast_safe_harmful_step).

    F_Pθ(τ) is formed as M_0 − τM_1 with M_0 = F_P·base and M_1 = F_P·d_H, while the reference forms
    F_P·fl(base − τd_H). Both are within (2γ_D + 5eps)·|F_P|(|base| + τ|d_H|) of the exact product
    (γ_D = D·eps/(1 − D·eps), the standard bound on a D-term dot product), so their distance in
    spectral norm is at most (2γ_D + 5eps)·‖F_P‖_F(‖base‖_F + τ‖d_H‖_F): that is the ``abs_err``
    handed to gram_log_kappa_lower_bound, which adds QR's and svdvals' backward errors.
    """

    def __init__(self, fs: _FastSetup, base: Tensor, d_h: Tensor) -> None:
        self.fs, self.base, self.d_h = fs, base, d_h
        self._m: tuple[Tensor, Tensor] | None = None
        d = fs.f_p.shape[1]
        self.coef = (2.0 * d * EPS64 / (1.0 - d * EPS64) + 5.0 * EPS64) * fs.norm_f_p
        self.nb, self.nd = float(base.norm()), float(d_h.norm())

    def certainly_above(self, tau: float, limit: float) -> bool:
        """True only if the reference's log κ(H_P) at θ(τ) certainly exceeds ``limit``."""
        if self.fs.f_p.shape[0] < SCREEN_MIN_RANK or not math.isfinite(limit):
            return False
        if self._m is None:
            self._m = (self.fs.f_p @ self.base, self.fs.f_p @ self.d_h)
        m0, m1 = self._m
        abs_err = self.coef * (self.nb + tau * self.nd)
        res = gram_kappa_bound(
            m0 - tau * m1,
            rtol=self.fs.rtol,
            abs_err=abs_err,
            target=limit,
            max_iters=SCREEN_MAX_ITERS,
            rel_tol=1e-9,
            start=self.fs.screen_vectors,
        )
        # The singular vectors move little between candidates (and steps): warm-start the next one.
        self.fs.screen_vectors = (res.top, res.bottom)
        return res.log_kappa_lower > limit


@dataclass(frozen=True, kw_only=True)
class ConditionNumberConfig(SpectralDefenseConfig, DeepTrainingConfig):
    """Algorithm 1's settings plus those of the deep-network variant (:mod:`immunekit.defenses.deep`).

    The deep loop's own fields (``epochs`` … ``weight_decay_head``) come from
    :class:`~immunekit.defenses.deep.DeepTrainingConfig` and, with ``primary_grad_ratio``, are
    read only when the model is not a LinearModel; the deep loop also reads
    ``lr`` (its SGD step), ``lambda_primary``, ``lambda_harmful``, ``balance`` (``init`` or
    ``fixed``), ``rank_rtol``, ``delta_min``, ``task_loss`` and ``progress``. On a deep model an
    unset ``lambda_primary`` is derived from the task gradient at θ_0 (``primary_grad_ratio``, see
    :mod:`immunekit.defenses.deep`), not the linear default 1.
    """

    primary_grad_ratio: float = field(
        default=PRIMARY_GRAD_RATIO,
        metadata={
            "help": "deep: ρ of the default λ_P, ‖λ_P∇R_P‖ = ρ‖∇L_task‖ at θ_0 on the first batch pair "
            "(lambda_primary overrides it)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_settings(self)
        rho = self.primary_grad_ratio
        if isinstance(rho, bool) or not (isinstance(rho, int | float) and math.isfinite(rho) and rho > 0):
            raise ConfigError(
                f"primary_grad_ratio must be a finite number > 0, got {rho!r}; the default is "
                f"{PRIMARY_GRAD_RATIO} (pass lambda_primary to fix λ_P instead)"
            )


class ConditionNumber(SpectralLinearDefense):
    """Condition-number immunization: R_well on H_P, R_ill on H_H, K⁺-preconditioned (Algorithm 1).

    A LinearModel gets the closed-form Algorithm 1; any other ImmunizableModel gets the deep-network
    variant of §6 (:func:`immunekit.defenses.deep.fit_deep`), under the same registry name.
    """

    name = "condition_number"
    Config = ConditionNumberConfig
    config: ConditionNumberConfig

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Algorithm 1 for a LinearModel, the deep loop (R_well + R_ill by autograd) otherwise."""
        if not isinstance(model, LinearModel):
            return fit_deep(self, model, task, seed=seed)
        return super().fit(model, task, seed=seed)


@dataclass(frozen=True, kw_only=True)
class RillOnlyConfig(ConditionNumberConfig):
    """R_ill only: Algorithm 1 with λ_P = 0 (task loss kept, K_H preconditioning kept).

    ``lambda_primary`` is accepted but never applied: with ``balance='init'`` it is the reference
    λ_H is balanced against (‖λ_H K_H⁺∇R_ill‖ = ‖λ_P K_P⁺∇R_well‖, or the deep rule), so
    ``rill_only`` gets the harmful term of ``condition_number`` with the same ``lambda_primary``.
    """

    step_norm_primary: float = field(default=0.0, metadata={"help": "0: no R_well term"})


class RillOnly(SpectralLinearDefense):
    """Baseline "R_ill only" (arXiv 2505.23760 §5): maximise κ(H_H) without protecting D_P."""

    name = "rill_only"
    Config = RillOnlyConfig
    uses_primary_term = False

    def __init__(self, config: RillOnlyConfig | None = None, **overrides: object) -> None:
        super().__init__(config, **overrides)
        if self.config.step_norm_primary:
            raise ConfigError(
                f"rill_only has no R_well term, got step_norm_primary={self.config.step_norm_primary}; "
                "leave it at 0 (lambda_primary only sets the reference λ_H is balanced against)"
            )

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Algorithm 1 with λ_P = 0 for a LinearModel, the deep loop without R_well otherwise."""
        if not isinstance(model, LinearModel):
            return fit_deep(self, model, task, seed=seed)
        return super().fit(model, task, seed=seed)


def _step_record(
    step: int,
    loss: float,
    regs: tuple[float, float],
    log_kappas: tuple[float, float],
    taus: tuple[float, float],
    lr: float,
    clipped: tuple[bool, bool],
    task_lr: tuple[float, bool],
    safeguard: tuple[int, int],
) -> dict[str, float]:
    """One step's ``history_`` record (dense and iterative paths alike); pairs are (primary, harmful)."""
    return {
        "step": step,
        "task_loss": loss,
        "reg_primary": regs[0],
        "reg_harmful": regs[1],
        "log_kappa_primary": log_kappas[0],
        "log_kappa_harmful": log_kappas[1],
        "tau_primary": taus[0],
        "tau_harmful": taus[1],
        "lambda_primary": taus[0] / lr,
        "lambda_harmful": taus[1] / lr,
        "clipped_primary": float(clipped[0]),
        "clipped_harmful": float(clipped[1]),
        "task_lr": task_lr[0],
        "task_lr_capped": float(task_lr[1]),
        "safeguard_halvings": float(safeguard[0]),
        "safeguard_evaluations": float(safeguard[1]),
    }
