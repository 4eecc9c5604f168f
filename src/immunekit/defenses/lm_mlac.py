"""MLAC for causal language models, first order (``lm_mlac``).

Henderson, Mitchell, Manning, Jurafsky, Finn, "Self-Destructing Models" (arXiv 2211.14946);
``docs/methods/mlac.md`` §3 carried over to the language-model setting of
``docs/methods/immunization_conditions.md`` §8. The released weights θ of a :class:`CausalLM` are
trained so that a *simulated attacker*, who fine-tunes them for a few steps on harmful answers,
still assigns those answers a high loss, while benign answers stay likely.

**Inner loop** (the simulated attacker, §3.1). Each outer step takes the outer batch x (rows
``idx`` of the task's ``harmful`` split: prompt → harmful answer). A persistent scratch copy of the
model (built once per fit, its trainable parameters overwritten from θ each step) starts at
φ_0 = θ and runs K = ``inner_steps`` steps of Adam (fresh state each outer step, lr η =
``inner_lr``) on the answer cross-entropy of inner batches x'_k of ``inner_batch`` rows::

    g_k = ∇φ CE(φ_{k−1}, x'_k),   φ_k = Adam(φ_{k−1}, g_k, η),   k = 1…K

Each x'_k is a fresh draw (stream ``inner``) from the harmful rows *outside* the outer batch (from
all rows when the outer batch covers the split), so the trajectory is judged on answers the attacker
did not train on. ‖g_k‖ is recorded; it is not clipped (the reference clips at norm 100).

**Outer loss** (minimised over θ, §3.2), CE the token-mean answer cross-entropy, x_r the benign
retain rows (the task's ``primary`` split, ``batch_size`` rows per step in a seeded cycling order,
stream ``retain``)::

    L(θ) = λ_good · CE(θ, x_r) − λ_bad · 1/(K+1) · Σ_{k=0..K} CE(φ_k, x)

λ_good = ``retain_weight`` (0 drops the retain term), λ_bad = ``bad_weight``. This is the §4
"MLAC" row with the plain harmful loss (λ_bad) in place of the head-adjusted CE_adj (λ_lin): a
causal LM has no fresh classification head to re-map, and its harmful "labels" are the answer
tokens. The gradient-norm penalty λ_grad is left out: in first order its ‖g_k‖ are constants
of θ (only the last would carry a gradient, through a second backward pass), so it would add
cost without its intended effect.

**First order** (FOMAML). The inner steps are not differentiated through: dφ_k/dθ is taken as the
identity, so::

    ∇θ L ≈ λ_good ∇θ CE(θ, x_r) − λ_bad/(K+1) · [∇θ CE(θ, x) + Σ_{k=1..K} ∇φ CE(φ_k, x)]

The k = 0 term is exact. The loss handed to the shared loop is the surrogate::

    S(θ) = λ_good CE(θ, x_r) − λ_bad/(K+1) · [CE(θ, x) + Σ_{k≥1} CE(φ_k, x)
                                             + Σ_p ⟨p − sg(p), G_p⟩],   G = Σ_{k≥1} ∇φ CE(φ_k, x)

(sg: stop-gradient; the CE(φ_k, x) are constants). ⟨p − sg(p), G_p⟩ is exactly 0 in value and
has gradient G_p, so S equals L in value and ∇S is the first-order gradient above: the shared
loop's ``backward``, clipping and Adam step apply it unchanged, and the recorded ``loss`` is L.

**Cap.** −CE is unbounded below (``adversarial_loss`` without a cap took the perplexity to 7e10).
``harmful_cap`` (opt-in, off by default, as in that defense) drops the whole harmful term from a
step whose mean_k CE(φ_k, x) already exceeds the cap; both terms are recorded every step.

**LoRA.** With ``lora=True`` θ is the set of adapters: the scratch copy is taken after wrapping, so
the attacker and the surrogate act on the same trainable parameters (the frozen base weights are
equal in both copies); the adapters are merged into the returned model.

Optimisation otherwise as the other LM defenses (:mod:`immunekit.defenses.lm_adversarial`): Adam,
``epochs`` passes over the harmful rows in a seeded order, cosine schedule after a linear warm-up,
optional bf16 autocast and gradient clipping. Under bf16 the attacker's forward passes run in their
own autocast region without the weight-cast cache: the shared loop's region caches each weight's
bf16 copy until the outer step ends, which would hide the attacker's in-place updates.

``history_`` holds one record per outer step: lr, the loss L, the gradient norm before clipping,
``ce_retain``, ``ce_harmful`` (the K+1 values CE(φ_k, x)), ``ce_harmful_mean``, ``ce_harmful_last``
(k = K), ``inner_grad_norm`` (K values), ``inner_rows`` (the K inner batches), ``capped`` and the
real tokens of every forward pass; ``info_`` the base figures plus the inner settings and the
number of capped steps.

Cost: one outer step runs 2K + 2 forward/backward passes (K inner updates, K evaluations of the
adapted model, the exact k = 0 term and the retain term), about K + 1 times a ``gradient_ascent``
step, and holds a second copy of the model and of Adam's moments.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from immunekit.attacks.base import rng_streams
from immunekit.attacks.lm_eval import real_tokens
from immunekit.config import check_int
from immunekit.data.task import Task
from immunekit.data.token_split import TokenSplit
from immunekit.defenses.lm_adversarial import LmDefenseConfig, _LmDefense, _Retain, _token_mean
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel
from immunekit.models.causal_lm import CausalLM

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LmMLACConfig(LmDefenseConfig):
    """Settings of :class:`LmMLAC` (module docstring)."""

    inner_steps: int = field(default=2, metadata={"help": "K: Adam steps of the simulated attacker"})
    inner_lr: float = field(default=1e-4, metadata={"help": "η: the simulated attacker's Adam learning rate"})
    inner_batch: int = field(default=2, metadata={"help": "harmful rows per inner step"})
    bad_weight: float = field(
        default=1.0, metadata={"help": "λ_bad of −mean_k CE(φ_k) on the outer harmful rows"}
    )
    retain_weight: float = field(
        default=1.0, metadata={"help": "λ_good of the benign retain CE on 'primary' (0: off)"}
    )
    harmful_cap: float | None = field(
        default=None, metadata={"help": "drop the harmful term once mean_k CE(φ_k) exceeds this (None: off)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("inner_steps", "inner_batch"):
            check_int(name, getattr(self, name))
        if not (math.isfinite(self.inner_lr) and self.inner_lr > 0):
            raise ConfigError(
                f"inner_lr must be > 0, got {self.inner_lr}; the simulated attacker needs a step size, "
                "e.g. 1e-4 (the attack's fine-tuning lr)"
            )
        if not (math.isfinite(self.bad_weight) and self.bad_weight > 0):
            raise ConfigError(
                f"bad_weight must be > 0, got {self.bad_weight}; λ_bad = 0 is plain retain training "
                "(no defense), MLAC uses 1.0"
            )
        if not (math.isfinite(self.retain_weight) and self.retain_weight >= 0):
            raise ConfigError(f"retain_weight must be >= 0, got {self.retain_weight}; the default is 1.0")
        if self.harmful_cap is not None and not (math.isfinite(self.harmful_cap) and self.harmful_cap > 0):
            raise ConfigError(f"harmful_cap must be > 0 or None, got {self.harmful_cap}")


@dataclass
class _Attacker:
    """Per-fit state: the retain cycle, the scratch copy the simulated attacker trains, its stream."""

    retain: _Retain
    scratch: CausalLM
    theta: list[torch.nn.Parameter]
    phi: list[torch.nn.Parameter]
    inner: torch.Generator

    def inner_rows(self, outer: Tensor, k: int) -> Tensor:
        """``k`` harmful rows drawn without replacement from outside ``outer`` (all rows if none left)."""
        n = len(self.retain.harmful)
        taken = set(outer.tolist())
        pool = torch.tensor([i for i in range(n) if i not in taken] or list(range(n)))
        return pool[torch.randperm(len(pool), generator=self.inner)[:k]]


class LmMLAC(_LmDefense):
    """First-order MLAC on a causal LM: resist a simulated K-step attacker, keep benign answers."""

    name = "lm_mlac"
    Config = LmMLACConfig
    config: LmMLACConfig

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Train a copy of the causal LM ``model`` on ``task`` (module docstring); the input is unchanged."""
        out = super().fit(model, task, seed=seed)
        cfg = self.config
        self.info_.update(
            {
                "inner_steps": cfg.inner_steps,
                "inner_lr": cfg.inner_lr,
                "inner_batch": cfg.inner_batch,
                "bad_weight": cfg.bad_weight,
                "retain_weight": cfg.retain_weight,
                "harmful_cap": cfg.harmful_cap,
                "capped_steps": sum(bool(h["capped"]) for h in self.history_),
                "first_order": True,
            }
        )
        return out

    def prepare(self, model: CausalLM, task: Task, seed: int) -> _Attacker:
        """The retain cycle and the scratch copy of ``model`` (after any LoRA wrapping)."""
        harmful = task.harmful
        assert isinstance(harmful, TokenSplit)  # _check_lm
        retain = task.primary if self.config.retain_weight > 0 else None
        if retain is not None and not isinstance(retain, TokenSplit):
            raise DataError(f"the retain split 'primary' of task {task.name!r} is not a token split")
        order, inner = rng_streams(seed, "retain", "inner")
        scratch = copy.deepcopy(model)
        theta = [p for p in model.parameters() if p.requires_grad]
        phi = [p for p in scratch.parameters() if p.requires_grad]
        assert [p.shape for p in theta] == [p.shape for p in phi]  # a deep copy: same trainable set
        return _Attacker(_Retain(harmful, retain, order), scratch, theta, phi, inner)

    def loss(self, model: CausalLM, context: _Attacker, idx: Tensor) -> tuple[Tensor, dict[str, Any], int]:
        """The surrogate S (value L, gradient the first-order one), the recorded terms and tokens."""
        cfg = self.config
        harmful = context.retain.harmful
        x, y = harmful.rows(idx)
        ce_adapted, grads, norms, rows, used = self._attack(context, idx, x, y)
        ce_0, _ = _token_mean(model, x, y)  # k = 0: φ_0 = θ, exact
        used += real_tokens(x)
        values = [float(ce_0.detach()), *ce_adapted]
        mean_harm = sum(values) / len(values)
        cap = cfg.harmful_cap
        capped = cap is not None and mean_harm > cap
        terms: dict[str, Any] = {
            "ce_harmful": values,
            "ce_harmful_mean": mean_harm,
            "ce_harmful_last": values[-1],
            "inner_grad_norm": norms,
            "inner_rows": rows,
            "capped": capped,
        }
        loss = ce_0 * 0.0  # keeps a graph when every term is off (capped, λ_good = 0)
        if not capped:
            # Σ_p <p − sg(p), G_p> is 0 in value with gradient G: the adapted models' gradients reach θ
            pull = sum(((p - p.detach()) * g).sum() for p, g in zip(context.theta, grads, strict=True))
            harm = ce_0 + sum(ce_adapted) + pull
            loss = loss - cfg.bad_weight / len(values) * harm
        if context.retain.retain is not None:
            xr, yr = context.retain.retain.rows(context.retain.next_rows(len(idx)))
            ce_ret, _ = _token_mean(model, xr, yr)
            loss = loss + cfg.retain_weight * ce_ret
            terms["ce_retain"] = float(ce_ret.detach())
            used += real_tokens(xr)
        return loss, terms, used

    def _attack(
        self, context: _Attacker, idx: Tensor, x: Tensor, y: Tensor
    ) -> tuple[list[float], list[Tensor], list[float], list[list[int]], int]:
        """Run the simulated attacker from θ; CE(φ_k, x) and G = Σ_k ∇φ CE(φ_k, x) for k = 1…K.

        Returns:
            ``(CE(φ_k, x) for k = 1…K, G per trainable parameter, ‖g_k‖, inner rows, tokens read)``.

        """
        cfg = self.config
        harmful = context.retain.harmful
        phi = context.phi
        device = phi[0].device.type
        with torch.no_grad():
            for p, q in zip(phi, context.theta, strict=True):
                p.copy_(q)
        opt = torch.optim.Adam(phi, lr=cfg.inner_lr)  # fresh state every outer step
        grads = [torch.zeros_like(p) for p in phi]
        values: list[float] = []
        norms: list[float] = []
        rows: list[list[int]] = []
        used = 0
        # The shared loop's autocast caches the bf16 copy of every weight until the step ends; φ
        # changes in place between forward passes here, so the attacker's passes must not use it.
        bf16 = cfg.precision == "bf16"
        fresh = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
        for _ in range(cfg.inner_steps):
            pick = context.inner_rows(idx, cfg.inner_batch)
            xi, yi = harmful.rows(pick)
            with fresh:
                ce_in, _ = _token_mean(context.scratch, xi, yi)
            with torch.autocast(device, enabled=False):  # backward outside autocast, as the shared loop
                step = torch.autograd.grad(ce_in, phi)
            norms.append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in step])))
            )
            for p, g in zip(phi, step, strict=True):
                p.grad = g
            opt.step()
            for p in phi:
                p.grad = None
            del step
            with fresh:
                ce_k, _ = _token_mean(context.scratch, x, y)
            with torch.autocast(device, enabled=False):
                at_k = torch.autograd.grad(ce_k, phi)
            for acc, g in zip(grads, at_k, strict=True):
                acc.add_(g)
            del at_k
            values.append(float(ce_k.detach()))
            rows.append(pick.tolist())
            used += real_tokens(xi) + real_tokens(x)
        return values, grads, norms, rows, used
