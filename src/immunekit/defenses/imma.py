"""Baseline IMMA (bi-level immunization; Zheng & Yeh, ECCV 2024): linear and deep extractors.

The paper's linear-probing adaptation is not stated; the toolkit's documented choice alternates
one inner and one outer step, as the original does:

    inner (M_in times): w ← w − η_in ∇_w L(D_H; w, θ)          (attacker's probe, persistent)
    outer:              ω ← ω − η ∇_ω L(D_P; ω, θ)
                        θ ← θ − η clip(∇_θ L(D_P; ω, θ) − λ_adv ∇_θ L(D_H; w, θ))

so θ is pushed to *raise* the adapted harmful loss while keeping the primary loss low. Unlike
the condition-number method IMMA needs harmful labels. Gradient norms are clipped at ``clip``.

A model that is not a LinearModel gets the deep variant under the same name
(:func:`immunekit.defenses.deep_baselines.fit_imma_deep`): a fresh linear head adapted on each
harmful mini-batch, then one step of the shared loop of :mod:`immunekit.defenses.deep` on
L_task − λ_adv L(D_H; w_adapted), clipped at ``clip``. It reads ``lr``, ``inner_lr``,
``inner_steps``, ``adv_weight``, ``clip``, ``progress`` and the deep fields below; ``steps`` is the
linear loop's (the deep loop runs ``epochs`` passes over the harmful rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from immunekit.data.task import Task
from immunekit.defenses.base import Defense, require_linear
from immunekit.defenses.deep import DeepTrainingConfig
from immunekit.defenses.deep_baselines import fit_imma_deep
from immunekit.defenses.linear_common import task_grads, task_head_width
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel, LinearModel
from immunekit.spectral.rank import FactorSpectrum


@dataclass(frozen=True, kw_only=True)
class ImmaConfig(DeepTrainingConfig):
    """Settings of the IMMA baseline (linear loop; the deep fields are read for a non-linear model)."""

    steps: int = field(default=100, metadata={"help": "outer iterations"})
    lr: float = field(default=0.005, metadata={"help": "outer step η"})
    inner_lr: float = field(default=0.005, metadata={"help": "attacker's inner step η_in"})
    inner_steps: int = field(default=1, metadata={"help": "inner steps M_in per outer step"})
    adv_weight: float = field(default=1.0, metadata={"help": "λ_adv on the adapted harmful loss"})
    clip: float = field(
        default=1.0,
        metadata={"help": "max Frobenius norm of the θ update direction (deep: of the trainable gradient)"},
    )
    progress: bool = field(default=False, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "lr", "inner_lr", "clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"imma.{name} must be > 0, got {getattr(self, name)}")
        if self.inner_steps < 1 or self.adv_weight < 0:
            raise ConfigError(
                f"imma needs inner_steps >= 1 and adv_weight >= 0, got {self.inner_steps}, {self.adv_weight}"
            )


class Imma(Defense):
    """Bi-level baseline: maximise the harmful loss after a simulated probe step."""

    name = "imma"
    Config = ImmaConfig
    config: ImmaConfig  # what Defense.__init__ loads: this class's Config

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Alternate inner probe steps on D_H with outer steps on θ and ω (the deep loop for a deep model)."""
        if not isinstance(model, LinearModel):
            return fit_imma_deep(self, model, task, seed=seed)
        cfg = self.config
        lin = require_linear(model, self.name, task)
        theta = lin.theta
        omega = torch.zeros(theta.shape[1], task_head_width(task, task.primary), dtype=torch.float64)
        w = torch.zeros(theta.shape[1], task_head_width(task, task.harmful), dtype=torch.float64)
        self.history_ = []
        for t in tqdm(range(cfg.steps), desc=self.name, disable=not cfg.progress, leave=False):
            for _ in range(cfg.inner_steps):
                _, _, g_w = task_grads(task.harmful, theta, w, task.loss)
                w = w - cfg.inner_lr * g_w
            loss_p, g_theta_p, g_omega = task_grads(task.primary, theta, omega, task.loss)
            loss_h, g_theta_h, _ = task_grads(task.harmful, theta, w, task.loss)
            direction = g_theta_p - cfg.adv_weight * g_theta_h
            norm = float(direction.norm())
            if norm > cfg.clip:
                direction = direction * (cfg.clip / norm)
            theta = theta - cfg.lr * direction
            omega = omega - cfg.lr * g_omega
            self.history_.append(
                {
                    "step": t,
                    "task_loss": loss_p,
                    "harmful_loss": loss_h,
                    "direction_norm": norm,
                }
            )
        # κ of the result only: per-step κ at D = 784 would cost more than the iteration itself.
        # The rank rule: null(K) decided on the singular values of X, rank of H fixed on K.
        spec_p, spec_h = FactorSpectrum.of(task.primary.x), FactorSpectrum.of(task.harmful.x)
        self.info_ = {
            "adv_weight": cfg.adv_weight,
            "inner_steps": cfg.inner_steps,
            "inner_lr": cfg.inner_lr,
            "rank_rule": {"primary": spec_p.describe(), "harmful": spec_h.describe()},
            "final_log_kappa_primary": spec_p.kappa(theta).log_kappa,
            "final_log_kappa_harmful": spec_h.kappa(theta).log_kappa,
        }
        return lin.with_weights(theta, omega)
