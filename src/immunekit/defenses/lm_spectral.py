"""The condition-number defense on a causal LM's final hidden features (``lm_condition_number``).

Zheng et al. (arXiv 2505.23760) immunize a feature extractor against a *linear-probe* attacker by
making the probe's Hessian on harmful data ill-conditioned (R_ill) while keeping it
well-conditioned on the primary data (R_well). On a causal LM the probe is the output layer: an
attacker who keeps the released body and trains a new read-out W ``(V, D)`` of the final hidden
states h_t (``lm_head_probe``) minimises the answer cross-entropy Σ_t CE(W h_t, y_{t+1}), whose
Hessian in W is Σ_t (diag p_t − p_t p_tᵀ) ⊗ h_t h_tᵀ. Its ℓ2 / Gauss–Newton proxy is the feature
second-moment matrix S = ΦᵀΦ of the hidden states Φ ``(n, D)`` at the positions the attacker
trains on (every position that predicts an answer token), the proxy of
:mod:`immunekit.defenses.deep` (Eq. 18 of the paper).

Each step reads ``batch_size`` harmful conversations (the task's ``harmful`` split: prompt →
harmful answer; for ``qi_harmful_text`` the defense half, disjoint from the attacker's) and as many
benign ones (``primary``, seeded and cycling, stream ``retain``), and descends::

    L(θ) = CE(θ; benign answers) + λ_P R_well(Φ_Pᵀ Φ_P) + λ_H R_ill(Φ_Hᵀ Φ_H)

* Φ_P ``(n_P, D)``, Φ_H ``(n_H, D)``: float64 final hidden states (after the final norm) at the
  answer-predicting positions of the benign and harmful batches; the benign forward is shared by
  the LM loss and Φ_P.
* R_well(S) = ½λ_1² − ‖S‖_F²/(2D) and R_ill(S) = 1/Δ, Δ = Σ_{i≤k} λ_i²/(2k) − ½λ_k², with the rank
  k of Φ_H by the toolkit's factor rule (:class:`~immunekit.spectral.rank.FactorSpectrum`), as in
  :func:`~immunekit.defenses.deep.r_ill_of_factor` / :func:`~immunekit.defenses.deep.r_well_of_factor`.
  A step whose Δ ≤ ``delta_min`` drops the R_ill term and is counted.
* λ rule of the deep defenses: at θ_0 on the first batch, λ_P = ρ‖∇L_task‖/‖∇R_well‖ and
  λ_H = ρ‖∇L_task‖/‖∇R_ill‖ (ρ = ``primary_grad_ratio``), norms over the trainable parameters, so
  both regularizers start at the task gradient's scale whatever the features' scale
  (``lambda_primary`` / ``lambda_harmful`` override).

The defense is judged by what it is meant to change: ``info_["kappa"]`` holds κ(S_H) and κ(S_P)
of a fixed set of ``probe_rows`` harmful and benign conversations (all their answer positions)
before and after, and the ratios (i) = κ_H(after)/κ_H(before), (ii) = κ_P(after)/κ_P(before). A
large (i) says a head-only attacker's gradient descent converges more slowly on the harmful data;
it says nothing about LoRA or full fine-tuning, which move the features themselves: the report
card's attacks decide that.

Optimisation (Adam, cosine schedule, bf16, LoRA, ``max_steps``) is the shared loop of
:mod:`immunekit.defenses.lm_adversarial`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from immunekit.attacks.base import rng_streams
from immunekit.attacks.lm_eval import answer_features, real_tokens
from immunekit.data.task import Task
from immunekit.data.token_split import TokenSplit
from immunekit.defenses.deep import r_ill_of_factor, r_well_of_factor
from immunekit.defenses.lm_adversarial import LmDefenseConfig, _check_lm, _LmDefense, _Retain
from immunekit.errors import ConfigError, DataError, NumericalError
from immunekit.models.base import ImmunizableModel
from immunekit.models.causal_lm import CausalLM
from immunekit.spectral.rank import FactorSpectrum

log = logging.getLogger(__name__)

F64 = torch.float64


@dataclass(frozen=True, kw_only=True)
class LmConditionNumberConfig(LmDefenseConfig):
    """Settings of :class:`LmConditionNumber` (module docstring)."""

    primary_grad_ratio: float = field(
        default=1.0,
        metadata={"help": "ρ: each regularizer's gradient norm at θ0 over the LM loss's"},
    )
    lambda_primary: float | None = field(default=None, metadata={"help": "λ_P of R_well (None: the ρ rule)"})
    lambda_harmful: float | None = field(default=None, metadata={"help": "λ_H of R_ill (None: the ρ rule)"})
    delta_min: float = field(default=1e-12, metadata={"help": "drop R_ill on a step whose Δ is at most this"})
    probe_rows: int = field(
        default=16, metadata={"help": "harmful and benign conversations of the before/after κ measurement"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.primary_grad_ratio) and self.primary_grad_ratio > 0):
            raise ConfigError(
                f"primary_grad_ratio must be > 0, got {self.primary_grad_ratio}; the default is 1"
            )
        for name in ("lambda_primary", "lambda_harmful"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be >= 0 or None (the ρ rule), got {value}")
        if not self.delta_min >= 0:
            raise ConfigError(f"delta_min must be >= 0, got {self.delta_min}")
        if self.probe_rows < 1:
            raise ConfigError(f"probe_rows must be >= 1, got {self.probe_rows}")


def kappa_of_rows(model: CausalLM, split: TokenSplit, rows: int) -> dict[str, float]:
    """κ(S) of S = ΦᵀΦ over the answer positions of the first ``rows`` conversations (no grad).

    κ = λ_1/λ_r with the toolkit's factor rank rule r; also returns r and the number of positions.
    """
    idx = torch.arange(min(rows, len(split)))
    feats = []
    with torch.no_grad():
        for lo in range(0, len(idx), 4):
            x, y = split.rows(idx[lo : lo + 4])
            phi, _ = answer_features(model, x, y)
            feats.append(phi.to(F64).cpu())
    spec = FactorSpectrum.of(torch.cat(feats))
    k = spec.kappa()
    return {"kappa": float(k.kappa), "rank": int(spec.rank), "positions": int(spec.rows)}


@dataclass
class _Context:
    retain: _Retain
    lambdas: dict[str, float] = field(default_factory=dict)


class LmConditionNumber(_LmDefense):
    """LM loss + λ_P R_well on benign features + λ_H R_ill on harmful features (module docstring)."""

    name = "lm_condition_number"
    Config = LmConditionNumberConfig
    config: LmConditionNumberConfig

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Immunize a copy of the causal LM; ``info_["kappa"]`` holds κ before and after."""
        lm = _check_lm(model, task, self.name)
        primary = task.primary
        if not isinstance(primary, TokenSplit):
            raise DataError(
                f"{self.name} needs benign conversations in the task's 'primary' split (a TokenSplit), got "
                f"{type(primary).__name__}"
            )
        before = self._kappas(lm, task)
        out = super().fit(lm, task, seed=seed)
        assert isinstance(out, CausalLM)
        after = self._kappas(out, task)
        ctx = self._context
        self.info_.update(
            {
                "lambdas": dict(ctx.lambdas),
                "delta_floor_hits": sum(bool(h["delta_floored"]) for h in self.history_),
                "kappa": {
                    "before": before,
                    "after": after,
                    "ratio_harmful": after["harmful"]["kappa"] / before["harmful"]["kappa"],
                    "ratio_primary": after["primary"]["kappa"] / before["primary"]["kappa"],
                    "probe_rows": self.config.probe_rows,
                },
            }
        )
        return out

    def _kappas(self, model: CausalLM, task: Task) -> dict[str, dict[str, float]]:
        splits = {"harmful": task.harmful, "primary": task.primary}
        out = {}
        for role, split in splits.items():
            assert isinstance(split, TokenSplit)
            out[role] = kappa_of_rows(model, split, self.config.probe_rows)
        return out

    def prepare(self, model: CausalLM, task: Task, seed: int) -> _Context:
        harmful, primary = task.harmful, task.primary
        assert isinstance(harmful, TokenSplit) and isinstance(primary, TokenSplit)
        (order,) = rng_streams(seed, "retain")
        self._context = _Context(_Retain(harmful, primary, order))
        return self._context

    def loss(self, model: CausalLM, context: _Context, idx: Tensor) -> tuple[Tensor, dict[str, Any], int]:
        retain = context.retain
        assert retain.retain is not None
        xh, yh = retain.harmful.rows(idx)
        xp, yp = retain.retain.rows(retain.next_rows(len(idx)))
        phi_p, target = answer_features(model, xp, yp)
        phi_h, _ = answer_features(model, xh, yh)
        if len(target) == 0 or phi_h.shape[0] == 0:
            raise DataError("a batch has no answer position; every conversation needs an answer")
        logits = model.head(phi_p)
        task_loss = functional.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)), target
        )
        with torch.autocast(phi_h.device.type, enabled=False):  # the spectra stay float64 under bf16
            rank_h = FactorSpectrum.of(phi_h.detach()).rank
            r_well = r_well_of_factor(phi_p, 0)
            r_ill, floored = r_ill_of_factor(phi_h, rank_h, delta_min=self.config.delta_min)
        if not context.lambdas:
            context.lambdas = self._calibrate(model, task_loss, r_well, r_ill)
        lam_p, lam_h = context.lambdas["lambda_primary"], context.lambdas["lambda_harmful"]
        loss = task_loss + (lam_p * r_well + lam_h * r_ill).to(task_loss.dtype)
        terms = {
            "ce_primary": float(task_loss.detach()),
            "r_well": float(r_well.detach()),
            "r_ill": float(r_ill.detach()),
            "rank_harmful": rank_h,
            "delta_floored": floored,
        }
        return loss, terms, real_tokens(xh) + real_tokens(xp)

    def _calibrate(
        self, model: CausalLM, task_loss: Tensor, r_well: Tensor, r_ill: Tensor
    ) -> dict[str, float]:
        """λ_P, λ_H by the ρ rule on the first batch (module docstring), or the config's."""
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]

        def norm(t: Tensor) -> float:
            grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
            return math.sqrt(sum(float(g.detach().to(F64).pow(2).sum()) for g in grads if g is not None))

        n_task, n_well, n_ill = norm(task_loss), norm(r_well), (norm(r_ill) if r_ill.requires_grad else 0.0)
        out = {"grad_norm_task": n_task, "grad_norm_well_raw": n_well, "grad_norm_ill_raw": n_ill}
        for name, raw in (("lambda_primary", n_well), ("lambda_harmful", n_ill)):
            given = getattr(cfg, name)
            if given is not None:
                out[name] = float(given)
                continue
            if not (raw > 0 and math.isfinite(raw) and math.isfinite(n_task)):
                raise NumericalError(
                    f"{self.name}: ‖∇L_task‖ = {n_task:.3g}, gradient norm of the {name[7:]} regularizer "
                    f"{raw:.3g} at θ0; the ρ rule is undefined: set {name} explicitly"
                )
            out[name] = cfg.primary_grad_ratio * n_task / raw
        log.info("%s: λ_P = %.3g, λ_H = %.3g", self.name, out["lambda_primary"], out["lambda_harmful"])
        return out
