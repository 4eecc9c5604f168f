"""Algorithm 1's spectral pieces from certified iterative extreme spectra (``spectral_solver='lanczos'``).

The regularizers need only extreme eigenpairs of H = θᵀKθ = MᵀM (M = F·θ, F = S V_rᵀ the thin
factor of K from the rank rule, r = rank K decided once per task), the safeguard only κ:

* R_well: G = λ_1 v_1v_1ᵀ − H/p, value (p·λ_1² − ‖H‖_F²)/(2p); its step bound reads λ_1, λ_2, λ_r;
* R_ill: G = (λ_k v_kv_kᵀ − H/k)/Δ², Δ = ‖H‖_F²/(2k) − λ_k²/2 (k = r: H has no other non-zero
  eigenvalue); its step bound reads λ_k and Δ;
* log κ: G = v_1v_1ᵀ/λ_1 − v_kv_kᵀ/λ_k (Opt-κ), and 1/log κ from it.

Every G is ``Σ_j c_j v_jv_jᵀ − c_H·H`` with v_j = Mᵀu_j/√λ_j for eigenvectors u_j of A = MMᵀ, so
the pseudo-inverse-preconditioned direction K⁺∇_θR = 2 P_K θ G needs no D×D product with G:
P_K θ = V_r S⁻¹ M and M v_j = √λ_j u_j give

    K⁺∇_θR = 2 V_r S⁻¹ ( Σ_j c_j √λ_j u_j v_jᵀ − c_H · A M ),

(A M for the −c_H·H part; nothing for Opt-κ's rank-2 G). S⁻¹ meets rows of A M that carry the
same grading s_i, so it is applied without loss. The eigenpairs come from
:func:`~immunekit.spectral.iterative.gram_extremes` (certified, warm-started from the previous
evaluation's eigenvectors, dense fall-back recorded in :class:`SolverStats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from immunekit.spectral.iterative import GramExtremes, SolverStats, gram_extremes
from immunekit.spectral.rank import FactorSpectrum
from immunekit.spectral.regularizers import SpectralGrad, _floored

F64 = torch.float64


@dataclass(frozen=True)
class IterPoint:
    """One θ on one side (H = θᵀKθ): the factor product M = Fθ and its certified extreme spectrum."""

    theta: Tensor
    m: Tensor
    ext: GramExtremes

    @property
    def log_kappa(self) -> float:
        """Log κ(H) = log λ_1 − log λ_r (rank fixed on K)."""
        return self.ext.log_kappa

    @property
    def rank(self) -> int:
        """R = rank K (rows of the thin factor)."""
        return int(self.m.shape[0])


@dataclass(frozen=True)
class LowRankTerm:
    """G = Σ_j c_j v_jv_jᵀ − c_H·H, with the spectral facts the step bounds and the history need."""

    value: float
    pairs: tuple[tuple[float, float, Tensor], ...]  # (c_j, λ_j, u_j)
    c_h: float
    eigenvalues: Tensor
    rank: int
    delta: float = float("nan")
    floored: bool = False
    zero: bool = False

    def spectral_grad(self) -> SpectralGrad:
        """The :class:`SpectralGrad` view the step bounds read (``g`` and vectors left empty)."""
        empty = torch.empty(0, 0, dtype=F64)
        return SpectralGrad(empty, self.value, self.eigenvalues, empty, self.rank, self.delta, self.floored)

    def scaled(self, factor: float, value: float) -> LowRankTerm:
        """C ↦ factor·c for every coefficient, with a new value."""
        pairs = tuple((factor * c, lam, u) for c, lam, u in self.pairs)
        return LowRankTerm(
            value, pairs, factor * self.c_h, self.eigenvalues, self.rank, self.delta, self.floored
        )


def _eigenvalues(p: int, pt: IterPoint, second: bool) -> Tensor:
    """Length-p eigenvalue vector holding only what was certified: λ_1, (λ_2), λ_r; NaN elsewhere."""
    w = torch.full((p,), math.nan, dtype=F64)
    e = pt.ext
    w[0] = e.lam_max
    if second and p > 1:
        w[1] = e.lam_second
    if not math.isnan(e.lam_min):
        w[pt.rank - 1] = e.lam_min
    return w


def well_term(pt: IterPoint, p: int) -> LowRankTerm:
    """R_well(H): G = λ_1 v_1v_1ᵀ − H/p, value (p·λ_1² − ‖H‖_F²)/(2p) (≥ 0)."""
    e = pt.ext
    value = max(0.0, (p * e.lam_max**2 - e.frob_sq) / (2 * p))
    return LowRankTerm(value, ((e.lam_max, e.lam_max, e.u_max),), 1.0 / p, _eigenvalues(p, pt, True), pt.rank)


def ill_term(pt: IterPoint, p: int, delta_min: float) -> LowRankTerm:
    """R_ill(H) with k = r: G = (λ_k v_kv_kᵀ − H/k)/Δ², value 1/Δ (Δ floored as :func:`g_ill`)."""
    e, k = pt.ext, pt.rank
    w = _eigenvalues(p, pt, False)
    d = e.frob_sq / (2 * k) - 0.5 * e.lam_min**2
    if d < delta_min:
        return LowRankTerm(1.0 / delta_min, (), 0.0, w, k, d, True, zero=True)
    d_eff = _floored(d, delta_min)
    assert e.u_min is not None
    return LowRankTerm(
        1.0 / d_eff, ((e.lam_min / d_eff**2, e.lam_min, e.u_min),), 1.0 / (k * d_eff**2), w, k, d
    )


def log_kappa_term(pt: IterPoint, p: int) -> LowRankTerm:
    """Log κ(H): G = v_1v_1ᵀ/λ_1 − v_kv_kᵀ/λ_k."""
    e = pt.ext
    assert e.u_min is not None
    pairs = ((1.0 / e.lam_max, e.lam_max, e.u_max), (-1.0 / e.lam_min, e.lam_min, e.u_min))
    return LowRankTerm(pt.log_kappa, pairs, 0.0, _eigenvalues(p, pt, False), pt.rank)


def inverse_log_term(term: LowRankTerm) -> LowRankTerm:
    """1/log κ from the log κ term: G ↦ −G/log²κ, value 1/log κ (as opt_kappa._inverse_log)."""
    lk = max(term.value, 1e-12)
    return term.scaled(-1.0 / lk**2, 1.0 / lk)


@dataclass
class Side:
    """One side's per-task pieces (K's rank-r subspace, decided once) and its warm starts."""

    spec: FactorSpectrum
    stats: SolverStats
    second: bool = False
    f: Tensor = field(init=False)
    basis: Tensor = field(init=False)
    s: Tensor = field(init=False)
    warm: tuple[Tensor | None, Tensor | None] = (None, None)

    def __post_init__(self) -> None:
        r = self.spec.rank
        self.f = self.spec.factor(thin=True)
        self.basis = self.spec.right_vectors[:, :r].contiguous()
        self.s = self.spec.singular_values[:r].contiguous()

    def point(self, theta: Tensor, m: Tensor | None = None) -> IterPoint:
        """The certified extreme spectrum of θᵀKθ (M = Fθ unless given), warm-started."""
        m = self.f @ theta if m is None else m
        ext = gram_extremes(
            m, second=self.second, start_max=self.warm[0], start_min=self.warm[1], stats=self.stats
        )
        self.warm = (ext.u_max, ext.u_min)
        return IterPoint(theta, m, ext)

    def direction(self, pt: IterPoint, term: LowRankTerm) -> Tensor:
        """K⁺∇_θR = 2 V_r S⁻¹ (Σ_j c_j √λ_j u_j v_jᵀ − c_H·A·M), ``(D, D)``."""
        m = pt.m
        if term.zero:
            return torch.zeros(m.shape[1], m.shape[1], dtype=F64)
        if term.c_h == 0.0:  # a sum of outer products (Opt-κ): no r × D × D product at all
            out = torch.zeros(m.shape[1], m.shape[1], dtype=F64)
            for c, lam, u in term.pairs:
                left = self.basis @ (u / self.s)
                out = out + (2.0 * c * math.sqrt(lam)) * torch.outer(left, pt.ext.h_vector(m, u))
            return out
        x = -term.c_h * (pt.ext.gram @ m) if term.c_h != 0.0 else torch.zeros_like(m)
        for c, lam, u in term.pairs:
            v = pt.ext.h_vector(m, u)
            x = x + (c * math.sqrt(lam)) * torch.outer(u, v)
        return 2.0 * (self.basis @ (x / self.s[:, None]))
