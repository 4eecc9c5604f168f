"""Baseline "Opt-κ": descend the condition numbers themselves instead of the R_well/R_ill surrogates.

Objective (toolkit choice; the paper does not state it): L(D_P) + λ_P log κ(H_P) + λ_H / log κ(H_H),
pseudo-inverse κ. ∂log κ/∂H = v_1v_1ᵀ/λ_1 − v_kv_kᵀ/λ_k is a spectral function of H, so the K⁺
left preconditioning of Algorithm 1 applies unchanged; ∂(1/log κ)/∂H = −(∂log κ/∂H)/log²κ.
The terms are balanced exactly as for ``condition_number`` (same ``balance`` options), and there
is no monotone step bound, so ``guard`` has no effect.

A model that is not a LinearModel gets the deep variant under the same name
(:func:`immunekit.defenses.deep_baselines.fit_opt_kappa_deep`): the same objective on mini-batch
features, κ from the singular values of Φ by the factor rank rule, in the shared loop of
:mod:`immunekit.defenses.deep`, with the deep fields of ``ConditionNumberConfig``.

References:
    Zheng et al., arXiv 2505.23760, §5 (baselines).

"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from immunekit.data.task import Task
from immunekit.defenses.condition_number import ConditionNumberConfig, SpectralLinearDefense, _Point
from immunekit.defenses.deep_baselines import fit_opt_kappa_deep
from immunekit.defenses.spectral_iterative import IterPoint, LowRankTerm, inverse_log_term, log_kappa_term
from immunekit.models.base import ImmunizableModel, LinearModel
from immunekit.spectral.fast import g_log_kappa_fast
from immunekit.spectral.regularizers import SpectralGrad, g_log_kappa


@dataclass(frozen=True, kw_only=True)
class OptKappaConfig(ConditionNumberConfig):
    """Algorithm 1's settings and the deep fields (the deep loop reads them for a non-linear model)."""


class OptKappa(SpectralLinearDefense):
    """Algorithm 1 with log κ(H_P) and 1/log κ(H_H) as the regularizers."""

    name = "opt_kappa"
    Config = OptKappaConfig
    config: OptKappaConfig

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Algorithm 1 with the log κ terms for a LinearModel, the deep loop otherwise."""
        if not isinstance(model, LinearModel):
            return fit_opt_kappa_deep(self, model, task, seed=seed)
        return super().fit(model, task, seed=seed)

    def primary_term(self, h: Tensor, rank: int) -> SpectralGrad:
        """∂ log κ(H_P)/∂H_P."""
        return g_log_kappa(h, rank=rank)

    def harmful_term(self, h: Tensor, rank: int) -> SpectralGrad:
        """∂(1/log κ(H_H))/∂H_H = −(∂ log κ/∂H)/log²κ."""
        return _inverse_log(g_log_kappa(h, rank=rank))

    def _fast_primary_term(self, pp: _Point) -> SpectralGrad:
        """primary_term computing only v_1 and v_k (see SpectralLinearDefense._fast_primary_term)."""
        if type(self).primary_term is OptKappa.primary_term:
            return g_log_kappa_fast(pp.hessian(), rank=pp.info.rank, factor=pp.m, values=pp.values)
        return super()._fast_primary_term(pp)

    def _fast_harmful_term(self, ph: _Point) -> SpectralGrad:
        """harmful_term computing only v_1 and v_k."""
        if type(self).harmful_term is OptKappa.harmful_term:
            return _inverse_log(
                g_log_kappa_fast(ph.hessian(), rank=ph.info.rank, factor=ph.m, values=ph.values)
            )
        return super()._fast_harmful_term(ph)

    def _iter_terms_builtin(self) -> bool:
        """The iterative path knows the log κ terms (and R_well / R_ill for other subclasses)."""
        cls = type(self)
        return cls.primary_term is OptKappa.primary_term and cls.harmful_term is OptKappa.harmful_term

    def _iter_primary_term(self, pt: IterPoint) -> LowRankTerm:
        """Log κ(H_P) from the certified pairs: G = v_1v_1ᵀ/λ_1 − v_kv_kᵀ/λ_k."""
        return log_kappa_term(pt, pt.theta.shape[1])

    def _iter_harmful_term(self, pt: IterPoint) -> LowRankTerm:
        """1/log κ(H_H) from the certified pairs."""
        return inverse_log_term(log_kappa_term(pt, pt.theta.shape[1]))

    def primary_bound(self, sg: SpectralGrad) -> float:
        """No monotone step bound is known for log κ."""
        return float("inf")

    def harmful_bound(self, sg: SpectralGrad) -> float:
        """No monotone step bound is known for 1/log κ."""
        return float("inf")


def _inverse_log(sg: SpectralGrad) -> SpectralGrad:
    """The R_H = 1/log κ term from the log κ one: G ↦ −G/log²κ, value 1/log κ."""
    lk = max(sg.value, 1e-12)
    return SpectralGrad(-sg.g / lk**2, 1.0 / lk, sg.eigenvalues, sg.eigenvectors, sg.rank)
