"""Sanity baseline "whiten_primary": whiten the primary inputs, no training.

θ = K_P^{-1/2} on the retained subspace V = range(K_P), scaled by s_1, and the identity on null(K_P):

    θ = V_r diag(s_1/s_1, …, s_1/s_r) V_rᵀ + (I − V_r V_rᵀ),   K_P = X_PᵀX_P = V diag(s²) Vᵀ,

with null(K_P) decided by the rank rule (:class:`~immunekit.spectral.rank.FactorSpectrum`). Then
H_P = θᵀK_Pθ = s_1² V_rV_rᵀ, so κ(H_P) = 1 and (ii) = 1/κ(K_P): the RIR is as large as κ(K_P)
whatever happens to the harmful task. It exists to show that RIR can be bought through (ii) alone —
read (i) first. θ is invertible, so the least-squares primary head keeps its predictions (condition
(c)); the head ω is left at zero (no training).

The scale s_1 is a choice: it keeps θ = θ_0 = I on the top primary direction and on null(K_P), so
neither block is rescaled against the other. (i) depends on that relative scale (it mixes both
blocks through K_H): on house prices, seeds 1–3, this choice gives (i) 0.60, 5.2, 0.31, while the
unscaled K_P^{-1/2} with the identity on null(K_P) gives 3.3, 4.8, 2.4; (ii) is the same for both.

References:
    Zheng et al., arXiv 2505.23760, Eq. 15 (RIR); methods/condition_number.md §7.2.

"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from immunekit.data.task import Task
from immunekit.defenses.base import Defense, DefenseConfig, require_linear
from immunekit.defenses.linear_common import task_head_width
from immunekit.models.base import ImmunizableModel
from immunekit.spectral.condition import check_rtol
from immunekit.spectral.rank import FactorSpectrum


@dataclass(frozen=True, kw_only=True)
class WhitenPrimaryConfig(DefenseConfig):
    """Settings of the whitening baseline."""

    rank_rtol: float | None = field(
        default=None,
        metadata={
            "help": "the rank rule's relative cut on the singular values of X_P (default max(N, D)·eps)"
        },
    )

    def __post_init__(self) -> None:
        if self.rank_rtol is not None:
            check_rtol(self.rank_rtol, name="rank_rtol")


class WhitenPrimary(Defense):
    """θ = K_P^{-1/2} on range(K_P), identity on null(K_P): κ(H_P) = 1 by construction."""

    name = "whiten_primary"
    Config = WhitenPrimaryConfig
    config: WhitenPrimaryConfig  # what Defense.__init__ loads: this class's Config

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Whiten the primary features: a new LinearModel with θ = θ_0 · W, ω = 0 (θ_0 = I: θ = W).

        Example:
            >>> from immunekit.data.synthetic import gaussian_spectra
            >>> from immunekit.models import linear_model
            >>> task = gaussian_spectra(dim=4, n=64, seed=0)
            >>> out = WhitenPrimary().fit(linear_model(4), task, seed=0)
            >>> spec = FactorSpectrum.of(task.primary.x)
            >>> round(spec.kappa(out.theta).kappa, 9)
            1.0

        """
        lin = require_linear(model, self.name, task)
        theta0 = lin.theta
        # whiten the features Φ_P = X_Pθ_0 (θ_0 = I: the inputs), so H_P = θᵀK_Pθ is constant on range
        spec = FactorSpectrum.of(task.primary.x.to(torch.float64) @ theta0, rtol=self.config.rank_rtol)
        theta = theta0 @ spec.whitener()
        omega = torch.zeros(theta.shape[1], task_head_width(task, task.primary), dtype=torch.float64)
        self.history_ = []
        self.info_ = {"rank_rule": {"primary": spec.describe()}, "note": "θ = K_P^{-1/2} on range(K_P)"}
        return lin.with_weights(theta, omega)
