"""MLAC (meta-learned adversarial censoring, "self-destructing models") and its AC baseline.

Henderson, Mitchell, Manning, Jurafsky, Finn (arXiv 2211.14946); specification
``docs/methods/mlac.md`` §1–§4, §6, §7. The defender's model θ (trunk + a head whose first C_g
columns are the **desired** logits) is trained so that a simulated attacker, who attaches a linear
head φ (bias-free, D → C_h) to the features Φ_θ(x) ``(N, D)`` and fine-tunes for the **harmful**
labels, stays bad at the harmful task, while the desired task stays good.

**Inner loop** (a differentiable simulated attacker, §3.1). Per outer step, with φ₀ the adversarial
head initialisation and η the inner learning rate, K steps of Adam (fresh state) on the harmful
cross-entropy of inner mini-batches (x_k, y_k) drawn from the defender's harmful rows::

    ψ_0 = (θ_trunk, φ₀)  (scope "full")  or  φ₀  (scope "probe": the trunk is frozen)
    g_k = ∇ψ CE(φ_{k−1}ᵀ Φ_{θ_{k−1}}(x_k), y_k),   ψ_k = Adam(ψ_{k−1}, clip(g_k, 100), η)

run by :func:`immunekit.attacks.functional.unroll`, the update code the harness's attacks use, so
the defense differentiates through the very steps that later evaluate it. ‖g_k‖ is recorded before
clipping. The trajectory's harmful logits on the outer batch x ``(B, ...)`` are
z_k = φ_kᵀ Φ_{θ_k}(x) ``(B, C_h)``, k = 0…K (z_0: the un-adapted trunk with φ₀).

**Outer loss** (minimised over θ, §3.2), with (x, y^g, y^b) the outer batch::

    L(θ) =  λ_good · CE(head_θ(Φ_θ(x))[:, :C_g], y^g)
          − λ_bad  · mean_k CE(z_k, y^b)
          − λ_lin  · mean_k CE_adj(z_k, y^b)
          + λ_grad · mean(‖g_1‖, …, ‖g_K‖, ‖∇ψ CE(z_K, y^b)‖)

CE_adj(z, y) = min_{W ∈ [−b, b]^{C×C}} CE(zW, y) is :func:`immunekit.metrics.head_adjusted.head_adjusted_ce`
(W* solved on detached logits; Danskin gradient). Only terms with a non-zero weight enter the graph;
the others are recorded from detached values (the penalty is not computed when λ_grad = 0).

**Adversary meta-update** (min–max, §3.3). The attacker's meta-parameters a = (η, φ₀) take an Adam
step (lr 1e-4, clip 10) that *minimises* A = mean_k CE(z_k, y^b) through the unrolled trajectory.
Both players' gradients come from the same forward pass: ∂L/∂θ and ∂A/∂a are two
``torch.autograd.grad`` calls on the one graph (the first retains it), then both steps are applied
(simultaneous gradient descent–ascent). η is clamped to ``inner_lr_clamp`` after each step.

* ``adv_head_init="meta"`` (default): φ₀ is a learned parameter and gets ∂A/∂φ₀ (the design the
  reference intended). ``"fresh"``: a new head U(±1/√D) is drawn every outer step from the fit's
  generator (what the reference BERT code actually ran, §7.1); φ₀ then gets no update, and a head
  passed to :meth:`MLAC.fit` would be unused, which is an error.
* ``inner_lr="meta"``: η is learned (init 3e-4); ``"sample"``: log-uniform in ``inner_lr_range``
  per outer step; ``"fixed"``: η = ``inner_lr_init`` throughout.

**First order** (``first_order=True``, first-order MAML). The inner steps run without
``create_graph``: each ψ_k is a detached leaf, so dψ_k/dψ_0 is taken as the identity. The outer
gradient is then

    ∇θ L ≈ ∂L/∂θ|direct + Σ_{k=1..K} ∂L/∂θ_k   (trunk entries of ψ_k; the head part has no θ),

i.e. the adversarial terms' gradients at the adapted parameters are applied to θ. Loss *values* are
exactly those of second order (the same trajectory); only the gradient is approximated. Terms that
exist only through the trajectory lose their gradient: the penalty's ‖g_k‖ are constants (only its
last term, ‖∇ψ CE(z_K)‖, evaluated at ψ_K, carries a gradient), and **η gets no gradient at all**,
so ``first_order=True`` with ``inner_lr="meta"`` (and K > 0) is refused with a ConfigError naming
``inner_lr="fixed"`` or ``"sample"``. φ₀ ("meta") gets the first-order adversary gradient
∂A/∂φ₀ + Σ_k ∂A/∂φ_k. With probe scope the trunk does not move in the inner loop, so z_k depends on
θ exactly and only dφ_k/dθ is dropped.

**Checkpoint selection** (§3.4, §7.3). Every ``val_every`` outer steps (and after the last one) the
mean total loss L is measured on ``val_batches`` outer batches of **defender validation data**, with
the same sampled inner batches, heads and learning rates at every evaluation (a generator re-seeded
each time, so the curve compares states, not draws), in eval mode. The state with the lowest value
is returned (step 0 is measured as a reference and is not a candidate). Validation data: the pair
passed to :meth:`MLAC.fit` as ``validation`` (e.g. discrim-eval's ``defender_val``: two aligned
splits, checked to share no row with the attacker's splits ``attack``, ``val_harmful``,
``eval_harmful``), else a ``val_fraction`` share of the defender's aligned training rows carved by a
seeded permutation (and removed from training). The attacker's splits are never read for training
or selection.

**Memory.** Second order: the unrolled graph of K steps is held until the outer backward. Before
training, one inner step (forward, gradient with ``create_graph``, clip, Adam update; in the scope
configured, "sample" counted as "full") and one outer
forward are run on 1 and 2 copies of the widest harmful row while a ``saved_tensors_hooks`` pack
hook sums the bytes of the distinct storages autograd saves; a linear fit a + b·n gives the cost of
n rows. The estimate is ``MEMORY_FACTOR`` · [K (a_in + b_in·max inner batch) + (K+1)(a_out + b_out·outer
batch)]; the factor covers the transient buffers of the double backward and the adversary's second
pass. When it exceeds ``max_memory_gb`` (default: 80 % of ``MemAvailable`` at fit time) :meth:`MLAC.fit`
raises a ConfigError suggesting ``first_order=True`` before anything is trained. First order holds
one graph at a time: each inner step is detached, and the outer gradient is accumulated one z_k at a
time (each share of L is differentiated and freed before the next forward), so the peak is about one
outer forward–backward on the outer batch or one inner step, whichever is larger. Validation runs the
outer forwards without a graph.

**Data.** The task's ``primary`` (desired labels) and ``harmful`` (harmful labels) splits must hold
the same inputs in the same order (ids and lengths are compared), as discrim-eval's
``defender_train`` does. The task loss must be ``"ce"``; the harmful task needs ≥ 2 classes.

Randomness: outer batches, inner batch sizes and rows, scopes, sampled learning rates and fresh heads
come from a private ``torch.Generator``; the φ₀ initialisation, the validation carve and the
validation draws from others, each seeded from sha256(``seed``, stream name). Dropout draws from a
forked global generator (:func:`immunekit.defenses.deep.private_rng`); the caller's global RNG state
is left as it was.

**Cost** (one CPU thread, float32, measured while another job shared the machine).
``BertTextClassifier.tiny`` (22.6k parameters, rows of 20–64 tokens), K = 4, inner batches up to 48,
outer batch 20: second order 1.7–2.0 outer steps/s (peak RSS +0.42 GB), first order 5.1–5.9 steps/s.
all-MiniLM-L6-v2 on discrim-eval (rows up to ~250 tokens): the default second-order run (K = 4,
inner ≤ 48, outer 20) is estimated at ≈ 93 GB and refused on a 24 GB machine; first order with K = 4,
inner batch 12, outer batch 20 takes ≈ 31 s per outer step (peak RSS 3.8 GB); AC (K = 0, outer 20)
≈ 4.3 s per step (peak RSS 2.8 GB).

Named presets (§4): every loss weight is explicit. ``MLAC()`` is the ``"mlac"`` preset (paper
figure: λ_bad = 0, λ_lin = 1, λ_grad = 0) with the quick profile's K = 4; ``AC()`` is ``"ac"``
(λ_bad = 1, λ_lin = 0, K = 0: only z_0 = φ₀ᵀΦ_θ(x) enters, so with ``adv_head_init="meta"`` it is
classic adversarial censoring against a trained linear adversary). :data:`PROFILES` holds the quick
(K = 4, 2,000 outer steps) and faithful (K = 16, 5,000) settings of §8.3; the config default
``outer_steps`` is small (100) so that unit runs stay cheap; experiments set a profile.

References:
    Henderson et al., "Self-Destructing Models: Increasing the Costs of Harmful Dual Uses of
    Foundation Models", arXiv 2211.14946 (AIES 2023). Finn et al., arXiv 1703.03400 (MAML and its
    first-order approximation).

"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from immunekit.attacks.functional import (
    FUNCTIONAL_OPTIMIZERS,
    FunctionalOptimizer,
    Trajectory,
    total_norm,
    unroll,
)
from immunekit.config import to_dict
from immunekit.data.task import Split, Task
from immunekit.defenses.base import Defense, DefenseConfig, check_input_dim
from immunekit.defenses.deep import private_rng, training_configuration
from immunekit.errors import ConfigError, DataError, NumericalError
from immunekit.metrics.head_adjusted import head_adjusted_ce
from immunekit.models.base import ImmunizableModel

log = logging.getLogger(__name__)

__all__ = [
    "AC",
    "MEMORY_FACTOR",
    "MLAC",
    "PRESETS",
    "PROFILES",
    "ACConfig",
    "LossWeights",
    "MLACConfig",
    "OuterTerms",
    "outer_loss",
]

PRESETS: dict[str, dict[str, float | int]] = {
    "mlac": {"lambda_good": 1.0, "lambda_bad": 0.0, "lambda_lin": 1.0, "lambda_grad": 0.0, "inner_steps": 4},
    "mlac_readme": {
        "lambda_good": 1.0,
        "lambda_bad": 1.0,
        "lambda_lin": 1.0,
        "lambda_grad": 0.0,
        "inner_steps": 4,
    },
    "ac": {"lambda_good": 1.0, "lambda_bad": 1.0, "lambda_lin": 0.0, "lambda_grad": 0.0, "inner_steps": 0},
    "desired_tuned": {
        "lambda_good": 1.0,
        "lambda_bad": 0.0,
        "lambda_lin": 0.0,
        "lambda_grad": 0.0,
        "inner_steps": 0,
    },
}
"""Named configurations of mlac.md §4, every weight explicit (K at the quick profile's 4 for MLAC).

``mlac``: the paper-figure MLAC; ``mlac_readme``: the reference README's command (also λ_bad = 1);
``ac``: adversarial censoring (no inner adaptation); ``desired_tuned``: plain desired-task tuning.
Use :meth:`MLACConfig.preset`.
"""

PROFILES: dict[str, dict[str, int]] = {
    "quick": {"inner_steps": 4, "outer_steps": 2000},
    "faithful": {"inner_steps": 16, "outer_steps": 5000},
}
"""The CPU-scale profiles of mlac.md §8.3 (the reference ran K = 16 and 50,000 outer steps)."""

MEMORY_FACTOR = 3.0
"""Safety factor of the second-order memory estimate over the measured saved-tensor bytes.

Calibrated on the growth of the peak RSS during a fit over the saved bytes counted (CPU, float32):
BertTextClassifier.tiny (width 32, 64 tokens, K = 4, batches 48/20) 2.2×; a width-128 tiny BERT (120
tokens) 1.45×; all-MiniLM-L6-v2 (K = 1, batches 2/2) 3.0× (the growth includes the outer Adam state,
the gradients and the transient buffers of the double backward and of the adversary's pass).
"""

_MEMORY_SHARE = 0.8  # default max_memory_gb: this share of MemAvailable


@dataclass(frozen=True)
class LossWeights:
    """The weights of the outer loss: λ_good, λ_bad, λ_lin, λ_grad (see the module docstring)."""

    good: float = 1.0
    bad: float = 0.0
    lin: float = 1.0
    grad: float = 0.0


def _finite_nonneg(value: float) -> bool:
    return math.isfinite(value) and value >= 0


@dataclass(frozen=True, kw_only=True)
class MLACConfig(DefenseConfig):
    """Settings of :class:`MLAC` (defaults: the ``"mlac"`` preset at the quick profile's K = 4)."""

    lambda_good: float = field(default=1.0, metadata={"help": "λ_good on the desired-task CE"})
    lambda_bad: float = field(default=0.0, metadata={"help": "λ_bad on −mean_k CE(z_k, y_b)"})
    lambda_lin: float = field(default=1.0, metadata={"help": "λ_lin on −mean_k CE_adj(z_k, y_b)"})
    lambda_grad: float = field(default=0.0, metadata={"help": "λ_grad on the inner gradient-norm penalty"})
    inner_steps: int = field(default=4, metadata={"help": "K inner Adam steps (0: AC, only z_0)"})
    inner_lr: Literal["meta", "sample", "fixed"] = field(
        default="meta", metadata={"help": "η: meta-learned, log-uniform per outer step, or fixed"}
    )
    inner_lr_init: float = field(default=3e-4, metadata={"help": "η at the start ('meta'), or η ('fixed')"})
    inner_lr_clamp: tuple[float, float] = field(
        default=(1e-6, 1e-2), metadata={"help": "[low, high] η is clamped to after each outer step ('meta')"}
    )
    inner_lr_range: tuple[float, float] = field(
        default=(1e-4, 1e-2), metadata={"help": "log-uniform range of η ('sample')"}
    )
    inner_batch_sizes: tuple[int, ...] = field(
        default=(12, 24, 48), metadata={"help": "inner batch size, uniform over these (capped at the rows)"}
    )
    inner_clip: float = field(default=100.0, metadata={"help": "inner gradient clip (total norm)"})
    inner_scope: Literal["full", "probe", "sample"] = field(
        default="full", metadata={"help": "inner attacker moves trunk + φ, φ only, or a random choice"}
    )
    inner_optimizer: str = field(
        default="adam", metadata={"help": "functional update rule of the inner steps"}
    )
    first_order: bool = field(
        default=False, metadata={"help": "detached inner steps (first-order MAML) instead of second order"}
    )
    adv_head_init: Literal["meta", "fresh"] = field(
        default="meta", metadata={"help": "φ₀ learned ('meta') or a fresh random head each outer step"}
    )
    adjust_bound: float = field(default=1.0, metadata={"help": "box bound b of the head-adjusted CE"})
    outer_steps: int = field(default=100, metadata={"help": "outer steps (quick profile: 2000)"})
    outer_lr: float = field(default=1e-5, metadata={"help": "Adam lr of θ"})
    outer_batch_size: int = field(default=20, metadata={"help": "rows per outer batch"})
    outer_clip: float = field(default=10.0, metadata={"help": "gradient clip of θ (total norm)"})
    adv_lr: float = field(default=1e-4, metadata={"help": "Adam lr of the adversary's η and φ₀"})
    adv_clip: float = field(default=10.0, metadata={"help": "gradient clip of the adversary (total norm)"})
    val_every: int = field(
        default=50, metadata={"help": "validate every this many outer steps (0: no checkpoint selection)"}
    )
    val_batches: int = field(default=10, metadata={"help": "outer batches per validation"})
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of the defender's rows held out when no validation is given"}
    )
    max_memory_gb: float | None = field(
        default=None, metadata={"help": "second-order graph limit in GB (None: 80% of available RAM)"}
    )
    log_every: int = field(default=50, metadata={"help": "log the loss terms every this many steps (0: off)"})
    progress: bool = field(default=False, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        for name in ("lambda_good", "lambda_bad", "lambda_lin", "lambda_grad"):
            value = getattr(self, name)
            if not _finite_nonneg(value):
                raise ConfigError(f"{name}={value!r} is invalid; loss weights are finite numbers >= 0")
        if self.lambda_good + self.lambda_bad + self.lambda_lin + self.lambda_grad == 0:
            raise ConfigError(
                "every loss weight is 0 (lambda_good, lambda_bad, lambda_lin, lambda_grad); set at least "
                "lambda_good=1.0, or start from a preset (MLACConfig.preset('mlac'))"
            )
        _int_at_least("inner_steps", self.inner_steps, 0, "K=0 is adversarial censoring (the 'ac' defense)")
        for name in ("outer_steps", "outer_batch_size", "val_batches"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("val_every", "log_every"):
            _int_at_least(name, getattr(self, name), 0)
        for name in ("inner_lr_init", "inner_clip", "outer_lr", "outer_clip", "adv_lr", "adv_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value!r} is invalid; use a finite number > 0")
        if not (math.isfinite(self.adjust_bound) and self.adjust_bound > 0):
            raise ConfigError(
                f"adjust_bound={self.adjust_bound!r} is invalid: the head-adjusted CE remaps logits with "
                "W in [-b, b]^{C×C} and needs b > 0 (the reference uses 1.0)"
            )
        for name in ("inner_lr_clamp", "inner_lr_range"):
            low, high = _pair(name, getattr(self, name))
            if not (0 < low < high and math.isfinite(high)):
                raise ConfigError(f"{name}=({low}, {high}) is invalid; use 0 < low < high")
        low, high = self.inner_lr_clamp
        if self.inner_lr == "meta" and not low <= self.inner_lr_init <= high:
            raise ConfigError(
                f"inner_lr_init={self.inner_lr_init} lies outside inner_lr_clamp={self.inner_lr_clamp}; "
                "start η inside the clamp range"
            )
        if not self.inner_batch_sizes:
            raise ConfigError("inner_batch_sizes is empty; give at least one size, e.g. (12, 24, 48)")
        for size in self.inner_batch_sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(
                    f"inner_batch_sizes={self.inner_batch_sizes!r} holds {size!r}; every inner batch size "
                    "must be an integer >= 1"
                )
        if self.inner_optimizer not in FUNCTIONAL_OPTIMIZERS:
            raise ConfigError(
                f"inner_optimizer={self.inner_optimizer!r} has no functional update; choose one of "
                f"{list(FUNCTIONAL_OPTIMIZERS)}"
            )
        if not (math.isfinite(self.val_fraction) and 0 <= self.val_fraction < 1):
            raise ConfigError(f"val_fraction={self.val_fraction!r} is invalid; use a number in [0, 1)")
        if self.max_memory_gb is not None and not (
            math.isfinite(self.max_memory_gb) and self.max_memory_gb > 0
        ):
            raise ConfigError(f"max_memory_gb={self.max_memory_gb!r} is invalid; use a number > 0 or None")
        if self.first_order and self.inner_lr == "meta" and self.inner_steps > 0:
            raise ConfigError(
                "first_order=True detaches the inner steps, so the meta-learned inner lr (inner_lr='meta') "
                "would never receive a gradient; pass inner_lr='fixed' (η = inner_lr_init throughout) or "
                "inner_lr='sample' (log-uniform in inner_lr_range), or use first_order=False"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MLACConfig:
        """The named configuration of :data:`PRESETS` (every λ and K set), with ``overrides`` on top.

        Example:
            >>> cfg = MLACConfig.preset("ac", outer_steps=10)
            >>> (cfg.lambda_bad, cfg.lambda_lin, cfg.inner_steps, cfg.outer_steps)
            (1.0, 0.0, 0, 10)

        """
        if name not in PRESETS:
            from immunekit.registry import did_you_mean

            raise ConfigError(f"unknown MLAC preset {name!r}{did_you_mean(name, list(PRESETS))}")
        from immunekit.config import load_config

        return load_config(cls, {**PRESETS[name], **overrides}, where=f"mlac.preset[{name}]")

    @property
    def weights(self) -> LossWeights:
        """(λ_good, λ_bad, λ_lin, λ_grad)."""
        return LossWeights(self.lambda_good, self.lambda_bad, self.lambda_lin, self.lambda_grad)


@dataclass(frozen=True, kw_only=True)
class ACConfig(MLACConfig):
    """Settings of :class:`AC`: the ``"ac"`` preset (λ_bad = 1, λ_lin = 0, K = 0)."""

    lambda_bad: float = field(default=1.0, metadata={"help": "λ_bad on −CE(z_0, y_b)"})
    lambda_lin: float = field(default=0.0, metadata={"help": "λ_lin on −CE_adj(z_0, y_b)"})
    inner_steps: int = field(default=0, metadata={"help": "K; adversarial censoring has no inner steps"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_steps != 0:
            raise ConfigError(
                f"ac has no inner adaptation (K = 0), got inner_steps={self.inner_steps}; use the 'mlac' "
                f"defense for K > 0"
            )


def _int_at_least(name: str, value: object, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = f" ({hint})" if hint else ""
        raise ConfigError(f"{name}={value!r} is invalid; use an integer >= {minimum}{extra}")


def _pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, tuple) or len(value) != 2:
        raise ConfigError(f"{name}={value!r} is invalid; give two numbers (low, high)")
    return float(value[0]), float(value[1])


# --- the pure loss ----------------------------------------------------------------------------------


class _Joint(nn.Module):
    """The defender's model plus the adversarial head φ ``(C_h, D)``, for ``functional_call``.

    ``forward(x)`` is the adversary's logits Φ(x) φᵀ, ``(N, C_h)``; ``forward(x, part="both")`` also
    returns the model's own head output from the same features. Parameter names: ``model.<name>`` for
    the model's, ``phi`` for the head.
    """

    def __init__(self, model: ImmunizableModel, phi: Tensor) -> None:
        super().__init__()
        self.model = model
        self.phi = nn.Parameter(phi.detach().clone(), requires_grad=phi.requires_grad)

    def forward(self, x: Tensor, part: str = "adv") -> Tensor | tuple[Tensor, Tensor]:
        feats = self.model.features(x)
        z = feats @ self.phi.T
        if part == "adv":
            return z
        return self.model.head(feats), z


@dataclass
class OuterTerms:
    """The outer loss of one outer batch and its parts (see :func:`outer_loss`).

    Attributes:
        total: L, 0-d (differentiable w.r.t. θ, and w.r.t. φ₀ and a tensor η when asked).
        good_ce: CE of the desired logits.
        adv_ce: CE(z_k, y^b), k = 0…K.
        adj_ce: CE_adj(z_k, y^b), k = 0…K (detached when λ_lin = 0).
        grad_pen: mean(‖g_1‖, …, ‖g_K‖, ‖∇ψ CE(z_K)‖), or None when λ_grad = 0 (not computed).
        adversary: A = mean_k CE(z_k, y^b), the objective the adversary minimises.
        trajectory: the inner :class:`~immunekit.attacks.functional.Trajectory` (keys ``model.<name>``
            and ``phi``).
        final_inputs: ψ_K as used by z_K and the penalty's last term (``{key: tensor}``).

    """

    total: Tensor
    good_ce: Tensor
    adv_ce: list[Tensor]
    adj_ce: list[Tensor]
    grad_pen: Tensor | None
    adversary: Tensor
    trajectory: Trajectory
    final_inputs: dict[str, Tensor]


def _ce(z: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(z, y)


def outer_loss(
    model: ImmunizableModel,
    params: Mapping[str, Tensor] | None,
    phi0: Tensor,
    lr: float | Tensor,
    outer: tuple[Tensor, Tensor, Tensor],
    inner: Sequence[tuple[Tensor, Tensor]],
    *,
    weights: LossWeights,
    scope: str = "full",
    create_graph: bool = True,
    differentiable: bool = True,
    desired_columns: int | None = None,
    inner_clip: float | None = 100.0,
    optimizer: FunctionalOptimizer | None = None,
    adjust_bound: float = 1.0,
) -> OuterTerms:
    """The MLAC outer loss L(θ) of one outer batch, as a pure function of θ, φ₀ and η.

    L = λ_good CE(head(Φ(x))[:, :C_g], y^g) − λ_bad mean_k CE(z_k, y^b) − λ_lin mean_k CE_adj(z_k, y^b)
    + λ_grad mean(‖g_1‖…‖g_K‖, ‖∇ψ CE(z_K, y^b)‖), with z_k = φ_k Φ_{θ_k}(x)ᵀ the harmful logits
    ``(B, C_h)`` after k inner steps of ``optimizer`` (K = ``len(inner)``) run by
    :func:`~immunekit.attacks.functional.unroll` (module docstring). Nothing is modified.

    Args:
        model: the defender's model (architecture; parameters not in ``params`` are read from it).
        params: θ, ``{name: tensor}`` with names of ``model.named_parameters()`` (may be non-leaves);
            ``None``: the model's own parameters.
        phi0: φ₀ ``(C_h, D)``.
        lr: η, a float or a 0-d tensor (differentiable).
        outer: ``(x, y_good, y_bad)``: inputs ``(B, ...)`` and both label sets ``(B,)``.
        inner: K inner batches ``(x_k, y_bad_k)``.
        weights: (λ_good, λ_bad, λ_lin, λ_grad).
        scope: ``"full"`` (the inner attacker moves the trunk, i.e. every non-head parameter, and φ)
            or ``"probe"`` (φ only).
        create_graph: second order: differentiate through the inner updates. False: each ψ_k is a
            detached leaf (first order; the caller maps their gradients, see the module docstring).
        differentiable: build graphs for the outer gradient (False: values only, e.g. validation).
        desired_columns: C_g, the head columns that are desired logits (None: all).
        inner_clip: inner gradient clip (total norm), None for none.
        optimizer: the inner update rule (default Adam).
        adjust_bound: box bound b of CE_adj.

    Returns:
        :class:`OuterTerms`.

    Raises:
        ConfigError: an unknown ``scope``.

    """
    setup = _Setup.build(model, params, phi0, scope)
    traj = setup.unroll(
        inner,
        lr,
        optimizer=optimizer,
        create_graph=create_graph and differentiable,
        clip=inner_clip,
    )
    n_terms = len(traj.params)
    pieces = [
        _piece(
            setup,
            setup.used(traj, k),
            outer,
            k=k,
            penalty=setup.final(traj) if weights.grad != 0 and k == n_terms - 1 else None,
            n_terms=n_terms,
            weights=weights,
            desired_columns=desired_columns,
            adjust_bound=adjust_bound,
            differentiable=differentiable,
        )
        for k in range(n_terms)
    ]
    total = torch.stack([piece.loss for piece in pieces]).sum()
    grad_pen: Tensor | None = None
    if weights.grad != 0:
        last = pieces[-1].last_norm
        assert last is not None
        norms = [n.to(last.dtype) for n in traj.grad_norms]
        grad_pen = torch.stack([*norms, last]).mean()
        if norms:  # the inner steps' norms (a graph in second order, constants in first order)
            total = total + weights.grad * torch.stack(norms).sum() / n_terms
    good_ce = pieces[0].good_ce
    assert good_ce is not None
    adv_ce = [piece.ce for piece in pieces]
    return OuterTerms(
        total=total,
        good_ce=good_ce,
        adv_ce=adv_ce,
        adj_ce=[piece.adj for piece in pieces],
        grad_pen=grad_pen,
        adversary=torch.stack(adv_ce).mean(),
        trajectory=traj,
        final_inputs=setup.final(traj),
    )


@dataclass
class _Setup:
    """The adversary module and the parameter dicts of one outer batch (keys ``model.<name>``, ``phi``).

    ``base`` holds θ and φ₀; ``start`` the inner attacker's ψ_0 (θ's trunk and φ₀ for "full", φ₀ for
    "probe").
    """

    joint: _Joint
    base: dict[str, Tensor]
    start: dict[str, Tensor]

    @classmethod
    def build(
        cls, model: ImmunizableModel, params: Mapping[str, Tensor] | None, phi0: Tensor, scope: str
    ) -> _Setup:
        if scope not in ("full", "probe"):
            raise ConfigError(f"scope={scope!r} is invalid; use 'full' or 'probe'")
        theta = dict(model.named_parameters()) if params is None else dict(params)
        head_names = _head_names(model)
        base: dict[str, Tensor] = {f"model.{k}": v for k, v in theta.items()}
        base["phi"] = phi0
        start = {"phi": phi0}
        if scope == "full":
            start.update({f"model.{k}": v for k, v in theta.items() if k not in head_names})
        return cls(_Joint(model, phi0.detach()), base, start)

    def unroll(
        self,
        inner: Sequence[tuple[Tensor, Tensor]],
        lr: float | Tensor,
        *,
        optimizer: FunctionalOptimizer | None,
        create_graph: bool,
        clip: float | None,
    ) -> Trajectory:
        with torch.enable_grad():
            return unroll(
                self.joint,
                self.start,
                list(inner),
                loss_fn=_ce,
                optimizer=optimizer if optimizer is not None else FunctionalOptimizer("adam"),
                lr=lr,
                create_graph=create_graph,
                clip=clip,
            )

    def used(self, traj: Trajectory, k: int) -> dict[str, Tensor]:
        """Every parameter of step k: θ and φ₀ overridden by ψ_k (k = 0: θ and φ₀ themselves)."""
        return dict(self.base) if k == 0 else {**self.base, **traj.params[k]}

    def final(self, traj: Trajectory) -> dict[str, Tensor]:
        """ψ_K as z_K uses it (K = 0: the entries of θ and φ₀ that the attacker would move)."""
        if len(traj.params) == 1:
            return {k: self.base[k] for k in self.start}
        return dict(traj.final)


@dataclass
class _Piece:
    """The share of L of one z_k (see :func:`_piece`) and its parts."""

    loss: Tensor
    ce: Tensor
    adj: Tensor
    good_ce: Tensor | None
    last_norm: Tensor | None


def _piece(
    setup: _Setup,
    used: Mapping[str, Tensor],
    outer: tuple[Tensor, Tensor, Tensor],
    *,
    k: int,
    penalty: Mapping[str, Tensor] | None,
    n_terms: int,
    weights: LossWeights,
    desired_columns: int | None,
    adjust_bound: float,
    differentiable: bool,
) -> _Piece:
    """z_k's share of L, the one outer forward at the parameters ``used``.

    The share is [λ_good CE(good, y^g) if k = 0] − (λ_bad CE(z_k) + λ_lin CE_adj(z_k)) / (K+1), plus
    λ_grad ‖∇ψ CE(z_K)‖ / (K+1) when ``penalty`` (ψ_K) is given.
    Without ``differentiable`` the forward runs under ``no_grad`` (validation), except for the
    penalty's gradient, which needs a graph of its own forward only.
    """
    x, y_good, y_bad = outer
    need_graph = differentiable or penalty is not None
    with torch.enable_grad() if need_graph else torch.no_grad():
        good_ce: Tensor | None = None
        if k == 0:
            head_logits, z = functional_call(setup.joint, dict(used), (x,), {"part": "both"}, strict=False)
            good = head_logits if desired_columns is None else head_logits[:, :desired_columns]
            good_ce = _ce(good, y_good)
            loss = weights.good * good_ce
        else:
            z = functional_call(setup.joint, dict(used), (x,), strict=False)
            loss = z.new_zeros(())
        ce = _ce(z, y_bad)
        keep = weights.lin != 0 and differentiable
        adj = head_adjusted_ce(z if keep else z.detach(), y_bad, bound=adjust_bound)
        if weights.bad != 0:
            loss = loss - weights.bad * ce / n_terms
        if weights.lin != 0:
            loss = loss - weights.lin * adj / n_terms
        last_norm: Tensor | None = None
        if penalty is not None:
            keys = [key for key, v in penalty.items() if v.requires_grad]
            got = torch.autograd.grad(
                ce, [penalty[key] for key in keys], create_graph=differentiable, allow_unused=True
            )
            last_norm = total_norm(got)
            loss = loss + weights.grad * last_norm / n_terms
    if not differentiable:
        loss, ce, adj = loss.detach(), ce.detach(), adj.detach()
        good_ce = None if good_ce is None else good_ce.detach()
        last_norm = None if last_norm is None else last_norm.detach()
    return _Piece(loss=loss, ce=ce, adj=adj, good_ce=good_ce, last_norm=last_norm)


def _head_names(model: ImmunizableModel) -> set[str]:
    ids = {id(p) for p in model.head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# --- data ---------------------------------------------------------------------------------------------


def _ids(split: Split) -> tuple[str, ...]:
    return tuple(getattr(split, "ids", ()) or ())


def _check_aligned(desired: Split, harmful: Split, names: tuple[str, str]) -> None:
    """``desired`` and ``harmful`` hold the same inputs in the same order (ids, or inputs when no ids)."""
    a, b = names
    if len(desired) != len(harmful):
        raise DataError(
            f"MLAC needs the desired labels ({a!r}, {len(desired)} rows) and the harmful labels ({b!r}, "
            f"{len(harmful)} rows) on the same inputs in the same order; build both splits from the same "
            "rows (e.g. discrim-eval's defender_train)"
        )
    ids_a, ids_b = _ids(desired), _ids(harmful)
    if ids_a or ids_b:
        if ids_a != ids_b:
            where = next((i for i, (p, q) in enumerate(zip(ids_a, ids_b, strict=False)) if p != q), None)
            detail = (
                f"row {where}: {ids_a[where]!r} vs {ids_b[where]!r}"
                if where is not None
                else f"{len(ids_a)} vs {len(ids_b)} ids"
            )
            raise DataError(
                f"MLAC needs {a!r} (desired labels) and {b!r} (harmful labels) aligned row by row, but their "
                f"ids differ ({detail}); give both splits the same rows in the same order"
            )
        return
    xa, xb = getattr(desired, "x", None), getattr(harmful, "x", None)
    if not (isinstance(xa, Tensor) and isinstance(xb, Tensor)):
        raise DataError(
            f"cannot check that {a!r} and {b!r} hold the same inputs: they have no ids; give both splits "
            "row ids"
        )
    if xa.shape != xb.shape or not torch.equal(xa, xb):
        raise DataError(
            f"MLAC needs {a!r} (desired labels) and {b!r} (harmful labels) on the same inputs in the same "
            "order, but their inputs differ; build both label sets on one set of rows"
        )


def _check_labels(split: Split, what: str) -> None:
    y = split.y
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(
            f"the {what} labels must be 1-D integer class indices, got dtype {y.dtype} and shape "
            f"{tuple(y.shape)}; MLAC trains cross-entropy on both tasks"
        )


def _classes(task: Task, names: Sequence[str], declared: str) -> int:
    top = -1
    for name in names:
        split = getattr(task, name, None)
        if split is not None and len(split):
            top = max(top, int(split.y.max()))
    value = task.info.get(declared) if isinstance(task.info, dict) else None
    given = value if isinstance(value, int) and not isinstance(value, bool) else 0
    return max(top + 1, given)


_DESIRED_SPLITS = ("primary", "eval_primary")
_HARMFUL_SPLITS = ("harmful", "attack", "eval_harmful", "val_harmful", "attack_disjoint", "attack_cross")
_ATTACKER_SPLITS = ("attack", "val_harmful", "eval_harmful", "attack_disjoint", "attack_cross")


@dataclass
class _Rows:
    """Aligned rows: inputs read from ``desired`` (with y^g), harmful labels from ``harmful.y``."""

    desired: Split
    harmful: Split
    index: Tensor  # rows of the splits this set uses
    device: torch.device
    dtype: torch.dtype

    def __len__(self) -> int:
        return int(self.index.numel())

    def read(self, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = self.index[pos]
        x, y_good = self.desired.rows(idx)
        y_bad = self.harmful.y.index_select(0, idx)
        return (
            _place(x, self.device, self.dtype),
            y_good.to(self.device, torch.long),
            y_bad.to(self.device, torch.long),
        )


def _place(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``x`` on ``device``; floating inputs in the model's dtype (token ids stay integers)."""
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)


def _generator(seed: int, stream: str) -> torch.Generator:
    digest = hashlib.sha256(f"immunekit.defenses.mlac:{int(seed)}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


@dataclass
class _Draw:
    """The random choices of one outer step."""

    outer: Tensor
    inner: list[Tensor]
    scope: str
    lr: float | None
    phi: Tensor | None


class _Sampler:
    """Outer batches without replacement (reshuffled when exhausted), and the per-step inner draws."""

    def __init__(self, n: int, cfg: MLACConfig, gen: torch.Generator, phi_shape: tuple[int, int]) -> None:
        self.n, self.cfg, self.gen, self.phi_shape = n, cfg, gen, phi_shape
        self.outer_size = min(cfg.outer_batch_size, n)
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def draw(self) -> _Draw:
        cfg, gen = self.cfg, self.gen
        if self.pos + self.outer_size > self.perm.numel():
            self.perm, self.pos = torch.randperm(self.n, generator=gen), 0
        outer = self.perm[self.pos : self.pos + self.outer_size]
        self.pos += self.outer_size
        scope = cfg.inner_scope
        if scope == "sample":
            scope = ("full", "probe")[int(torch.randint(2, (1,), generator=gen))]
        inner: list[Tensor] = []
        if cfg.inner_steps > 0:
            choice = int(torch.randint(len(cfg.inner_batch_sizes), (1,), generator=gen))
            size = min(cfg.inner_batch_sizes[choice], self.n)
            inner = [torch.randperm(self.n, generator=gen)[:size] for _ in range(cfg.inner_steps)]
        lr = None
        if cfg.inner_lr == "sample" and cfg.inner_steps > 0:
            low, high = cfg.inner_lr_range
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            lr = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        phi = _uniform_head(self.phi_shape, gen) if cfg.adv_head_init == "fresh" else None
        return _Draw(outer, inner, scope, lr, phi)


def _uniform_head(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    """U(−1/√D, 1/√D) entries, ``(C_h, D)`` float64 (the harness attacker's fresh-head law)."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    return (2.0 * u - 1.0) / shape[1] ** 0.5


# --- memory -------------------------------------------------------------------------------------------


def _saved_bytes(fn: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (``exclude``: data pointers)."""
    seen: set[int] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or meta tensors: not counted
            return t
        key = storage.data_ptr()
        if key and key not in seen and key not in exclude:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _widest_row(rows: _Rows, gen: torch.Generator) -> Tensor:
    """A row index of ``rows`` likely to cost the most: for token ids, the one with most real tokens."""
    pos = torch.randperm(len(rows), generator=gen)[:512]
    x, _ = rows.desired.rows(rows.index[pos])
    if x.is_floating_point() or x.ndim < 2:
        return pos[:1]
    length = (x >= 0).reshape(len(pos), -1).sum(dim=1)
    return pos[int(length.argmax())].reshape(1)


def _available_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    try:
        import psutil  # optional

        return float(psutil.virtual_memory().available) / 1e9
    except ImportError:
        return None


def _peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports kB)."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 / 1e9


# --- the defense --------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        model.eval()
        yield
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]


@dataclass
class _Fit:
    """Everything one fit needs (built by :meth:`MLAC._prepare`)."""

    cfg: MLACConfig
    work: ImmunizableModel
    params: dict[str, Tensor]
    head_names: set[str]
    train: _Rows
    val: _Rows | None
    c_good: int
    c_bad: int
    dim: int
    phi: nn.Parameter | None
    eta: Tensor | None
    optimizer: FunctionalOptimizer
    info: dict[str, Any]


class MLAC(Defense):
    """Meta-learned adversarial censoring: resist a simulated fine-tuning attacker (module docstring).

    Example:
        >>> defense = MLAC(inner_steps=2, outer_steps=3, val_every=0)  # doctest: +SKIP
        >>> immunized = defense.fit(model, task, seed=0)  # doctest: +SKIP

    """

    name = "mlac"
    Config: ClassVar[type[DefenseConfig]] = MLACConfig
    config: MLACConfig
    preset_name: ClassVar[str] = "mlac"

    def fit(
        self,
        model: ImmunizableModel,
        task: Task,
        *,
        seed: int,
        adv_head: Tensor | nn.Linear | None = None,
        validation: tuple[Split, Split] | None = None,
    ) -> ImmunizableModel:
        """Immunize a copy of ``model``; sets ``history_`` and ``info_``.

        Args:
            model: the defender's model; its head's first C_g columns are the desired logits (C_g =
                desired classes). Not modified.
            task: a ``ce`` task whose ``primary`` (desired labels) and ``harmful`` (harmful labels)
                splits hold the same inputs in the same order.
            seed: seeds every random choice (private generators; module docstring).
            adv_head: the initial adversarial head φ₀, a ``(C_h, D)`` tensor or a bias-free
                ``nn.Linear(D, C_h)``; ``None``: drawn U(±1/√D) from the seed. Only with
                ``adv_head_init="meta"``.
            validation: ``(desired split, harmful split)`` of aligned defender validation rows;
                ``None``: a ``val_fraction`` share of the training rows (when ``val_every`` > 0).

        Returns:
            A new model of the same class: trained trunk and head (the adversary is not part of it),
            the checkpoint with the lowest validation loss.

        Raises:
            ConfigError: an ``adv_head`` with ``adv_head_init="fresh"`` (it would be unused), a head
                of the wrong shape, a second-order graph estimated above ``max_memory_gb``, a model
                whose head has fewer outputs than desired classes.
            DataError: a task loss other than ``ce``, desired and harmful splits not aligned, fewer
                than 2 harmful classes, validation splits not aligned or sharing rows with the
                attacker's splits, too few rows.
            NumericalError: a non-finite loss or gradient (the step is named).

        """
        started = time.perf_counter()
        check_input_dim(model, task)
        cfg = self.config
        if adv_head is not None and cfg.adv_head_init == "fresh":
            raise ConfigError(
                "an adv_head was passed but adv_head_init='fresh' draws a new random head every outer step, "
                "so it would be silently unused; pass adv_head_init='meta' to start from it, or drop adv_head"
            )
        state = self._prepare(model, task, seed, adv_head, validation)
        self._check_memory(state, seed)
        history, curve, best = self._train(state, seed)
        state.info["seconds_total"] = time.perf_counter() - started
        self._finish(state, history, curve, best)
        return state.work

    # --- set-up ---------------------------------------------------------------------------------------

    def _prepare(
        self,
        model: ImmunizableModel,
        task: Task,
        seed: int,
        adv_head: Tensor | nn.Linear | None,
        validation: tuple[Split, Split] | None,
    ) -> _Fit:
        cfg = self.config
        if task.loss != "ce":
            raise DataError(
                f"{self.name} trains cross-entropy on a desired and a harmful classification task, but task "
                f"{task.name!r} has loss={task.loss!r}; use a 'ce' task (e.g. discrim_gender)"
            )
        _check_labels(task.primary, "desired (primary)")
        _check_labels(task.harmful, "harmful")
        _check_aligned(task.primary, task.harmful, ("primary", "harmful"))
        c_good = _classes(task, _DESIRED_SPLITS, "classes_primary")
        c_bad = _classes(task, _HARMFUL_SPLITS, "classes_harmful")
        distinct = int(torch.unique(task.harmful.y).numel())
        if c_bad < 2 or distinct < 2:
            raise DataError(
                f"the harmful task of {task.name!r} has {c_bad} class(es) ({distinct} distinct label(s) in "
                "'harmful'); MLAC needs at least 2 harmful classes for the adversary to learn anything"
            )
        work = copy.deepcopy(model)
        first = next(work.parameters(), None)
        if first is None:
            raise ConfigError(f"{type(model).__name__} has no parameters; there is nothing to immunize")
        device, dtype = first.device, first.dtype
        n = len(task.primary)
        gen_split = _generator(seed, "validation-split")
        all_rows = torch.arange(n)
        val: _Rows | None = None
        val_source = "none (val_every=0: the last state is returned)"
        if validation is not None and cfg.val_every == 0:
            raise ConfigError(
                "validation splits were passed but val_every=0 never evaluates them; set val_every > 0 "
                "(checkpoint selection) or drop validation"
            )
        if validation is not None:
            val_desired, val_harmful = validation
            _check_labels(val_desired, "validation desired")
            _check_labels(val_harmful, "validation harmful")
            _check_aligned(val_desired, val_harmful, ("validation[0]", "validation[1]"))
            _check_not_attacker(task, val_desired)
            if len(val_desired) < 1:
                raise DataError("the validation splits are empty; pass rows or validation=None")
            val = _Rows(val_desired, val_harmful, torch.arange(len(val_desired)), device, dtype)
            train_index = all_rows
            val_source = f"given ({len(val_desired)} rows)"
        elif cfg.val_every > 0 and cfg.val_fraction > 0:
            n_val = max(1, round(cfg.val_fraction * n))
            if n - n_val < 2:
                raise DataError(
                    f"{n} defender rows cannot spare {n_val} for validation "
                    f"(val_fraction={cfg.val_fraction}); pass validation=(desired, harmful) splits, lower "
                    "val_fraction or set val_every=0"
                )
            perm = torch.randperm(n, generator=gen_split)
            val = _Rows(task.primary, task.harmful, perm[:n_val].sort().values, device, dtype)
            train_index = perm[n_val:].sort().values
            val_source = f"carved: {n_val} of the {n} defender rows (val_fraction={cfg.val_fraction})"
        else:
            train_index = all_rows
        train = _Rows(task.primary, task.harmful, train_index, device, dtype)
        if len(train) < 1:
            raise DataError(f"task {task.name!r} has no defender rows (primary is empty)")
        with torch.no_grad(), _eval_mode(work):
            x1, _, _ = train.read(torch.arange(1))
            feats = work.features(x1)
            outputs = work(x1)
        dim, head_out = int(feats.reshape(1, -1).shape[1]), int(outputs.reshape(1, -1).shape[1])
        if head_out < c_good:
            raise ConfigError(
                f"the model's head has {head_out} outputs but the desired task has {c_good} classes; give "
                f"the model a head with at least {c_good} outputs (its first {c_good} are the desired logits)"
            )
        phi: nn.Parameter | None = None
        head_source = "fresh U(±1/√D) each outer step"
        if cfg.adv_head_init == "meta":
            if adv_head is None:
                start = _uniform_head((c_bad, dim), _generator(seed, "adv-head"))
                head_source = "meta: drawn U(±1/√D) from the seed"
            else:
                start = _head_tensor(adv_head, (c_bad, dim))
                head_source = "meta: supplied"
            phi = nn.Parameter(start.to(device=device, dtype=dtype))
        eta: Tensor | None = None
        if cfg.inner_lr == "meta" and cfg.inner_steps > 0 and not cfg.first_order:
            eta = torch.tensor(cfg.inner_lr_init, dtype=dtype, device=device, requires_grad=True)
        params: dict[str, Tensor] = dict(work.named_parameters())
        info: dict[str, Any] = {
            "defense": self.name,
            "preset": self.preset_name,
            "config": to_dict(cfg),
            "seed": seed,
            "loss_weights": dataclasses.asdict(cfg.weights),
            "inner_steps": cfg.inner_steps,
            "order": "first" if cfg.first_order else "second",
            "first_order_semantics": (
                "detached inner steps; adversarial-term gradients at the adapted trunk parameters added to θ "
                "(dθ_k/dθ = I); penalty norms ‖g_k‖ constant; η not learned"
                if cfg.first_order
                else "exact (create_graph through every inner update)"
            ),
            "adv_head_init": cfg.adv_head_init,
            "adv_head": {"source": head_source, "shape": [c_bad, dim]},
            "inner_lr_mode": _lr_mode(cfg),
            "inner_scope": cfg.inner_scope,
            "classes_desired": c_good,
            "classes_harmful": c_bad,
            "desired_columns": c_good,
            "head_outputs": head_out,
            "feature_dim": dim,
            "parameters": sum(p.numel() for p in params.values()),
            "train_rows": len(train),
            "validation": {"source": val_source, "rows": len(val) if val is not None else 0},
            "inner_batch_sizes_used": sorted({min(s, len(train)) for s in cfg.inner_batch_sizes}),
            "outer_batch_size_used": min(cfg.outer_batch_size, len(train)),
        }
        if phi is not None:
            info["adv_head"]["norm_init"] = float(phi.detach().norm())
        if head_out > c_good:
            log.info(
                "%s: the head has %d outputs; the first %d are the desired logits, the other %d are unused",
                self.name,
                head_out,
                c_good,
                head_out - c_good,
            )
        return _Fit(
            cfg=cfg,
            work=work,
            params=params,
            head_names=_head_names(work),
            train=train,
            val=val,
            c_good=c_good,
            c_bad=c_bad,
            dim=dim,
            phi=phi,
            eta=eta,
            optimizer=FunctionalOptimizer(cfg.inner_optimizer),
            info=info,
        )

    def _check_memory(self, state: _Fit, seed: int) -> None:
        """Estimate the second-order graph and refuse it above ``max_memory_gb`` (module docstring)."""
        cfg = state.cfg
        limit = cfg.max_memory_gb
        limit_source = "config"
        if limit is None:
            available = _available_gb()
            limit = None if available is None else _MEMORY_SHARE * available
            limit_source = "80% of MemAvailable" if available is not None else "unknown (no check)"
        memory: dict[str, Any] = {"limit_gb": limit, "limit_source": limit_source}
        state.info["memory"] = memory
        if cfg.first_order or cfg.inner_steps == 0:
            memory["estimate_gb"] = None
            memory["note"] = "no second-order graph (first order or K = 0)"
            return
        row = _widest_row(state.train, _generator(seed, "memory-row"))
        x, _, y_bad = state.train.read(row)
        work = state.work
        first = next(iter(state.params.values()))
        phi = torch.zeros(state.c_bad, state.dim, dtype=first.dtype, device=first.device, requires_grad=True)
        joint = _Joint(work, phi)
        exclude = {p.untyped_storage().data_ptr() for p in state.params.values()}
        trunk = {f"model.{k}": v for k, v in state.params.items() if k not in state.head_names}
        base = {f"model.{k}": v for k, v in state.params.items()}
        base["phi"] = phi
        start = {"phi": phi} if cfg.inner_scope == "probe" else {"phi": phi, **trunk}  # "sample": full
        eta = torch.tensor(cfg.inner_lr_init, dtype=first.dtype, device=first.device, requires_grad=True)

        def inner_step(n: int) -> int:
            xs, ys = x.expand(n, *x.shape[1:]), y_bad.expand(n)
            return _saved_bytes(
                lambda: unroll(
                    joint,
                    start,
                    [(xs, ys)],
                    loss_fn=_ce,
                    optimizer=state.optimizer,
                    lr=eta,
                    create_graph=True,
                    clip=cfg.inner_clip,
                ),
                exclude,
            )

        def outer_forward(n: int) -> int:
            xs = x.expand(n, *x.shape[1:])
            return _saved_bytes(lambda: functional_call(joint, base, (xs,), {"part": "both"}), exclude)

        # train mode (dropout masks are saved too), dropout drawn from a forked global generator
        with torch.enable_grad(), private_rng(seed), training_configuration(work, set(state.params)):
            i1, i2 = inner_step(1), inner_step(2)
            o1, o2 = outer_forward(1), outer_forward(2)
        per_row_in, per_row_out = max(i2 - i1, 0), max(o2 - o1, 0)
        fixed_in, fixed_out = max(i1 - per_row_in, 0), max(o1 - per_row_out, 0)
        k = cfg.inner_steps
        biggest = max(state.info["inner_batch_sizes_used"])
        outer_rows = state.info["outer_batch_size_used"]
        estimate = MEMORY_FACTOR * (
            k * (fixed_in + per_row_in * biggest) + (k + 1) * (fixed_out + per_row_out * outer_rows)
        )
        memory.update(
            estimate_gb=estimate / 1e9,
            factor=MEMORY_FACTOR,
            inner_step_bytes={"fixed": fixed_in, "per_row": per_row_in},
            outer_forward_bytes={"fixed": fixed_out, "per_row": per_row_out},
            measured_on="1 and 2 copies of the widest harmful training row",
        )
        log.info(
            "%s: second-order graph estimate %.2f GB (K=%d, inner batch <= %d, outer batch %d); limit %s",
            self.name,
            estimate / 1e9,
            k,
            biggest,
            outer_rows,
            "none" if limit is None else f"{limit:.2f} GB",
        )
        if limit is not None and estimate / 1e9 > limit:
            raise ConfigError(
                f"{self.name}: the second-order unroll is estimated at {estimate / 1e9:.3g} GB (K={k} inner "
                f"steps, inner batch up to {biggest}, outer batch {outer_rows}), above max_memory_gb="
                f"{limit:.3g} ({limit_source}); use first_order=True (with inner_lr='fixed' or 'sample'), "
                "fewer inner_steps or smaller inner_batch_sizes, or raise max_memory_gb"
            )

    # --- training -------------------------------------------------------------------------------------

    def _train(
        self, state: _Fit, seed: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], tuple[int, float, dict[str, Tensor] | None]]:
        cfg, work = state.cfg, state.work
        params = state.params
        opt = torch.optim.Adam(list(params.values()), lr=cfg.outer_lr)
        adv_params = [t for t in (state.eta, state.phi) if t is not None]
        adv_opt = torch.optim.Adam(adv_params, lr=cfg.adv_lr) if adv_params else None
        sampler = _Sampler(len(state.train), cfg, _generator(seed, "train"), (state.c_bad, state.dim))
        history: list[dict[str, Any]] = []
        curve: list[dict[str, Any]] = []
        best: tuple[int, float, dict[str, Tensor] | None] = (-1, math.inf, None)
        log.info(
            "%s: %d outer steps × batch %d, K=%d (%s order, scope %s, η %s), λ=%s, φ₀ %s, %d training rows",
            self.name,
            cfg.outer_steps,
            state.info["outer_batch_size_used"],
            cfg.inner_steps,
            state.info["order"],
            cfg.inner_scope,
            state.info["inner_lr_mode"],
            state.info["loss_weights"],
            cfg.adv_head_init,
            len(state.train),
        )
        bar = tqdm(total=cfg.outer_steps, desc=self.name, disable=not cfg.progress, leave=False)
        train_seconds = 0.0
        val_started = time.perf_counter()
        with private_rng(seed), training_configuration(work, set(params)):
            if state.val is not None and cfg.val_every > 0:
                curve.append({"step": 0, **self._validate(state, seed)})
            for step in range(1, cfg.outer_steps + 1):
                tic = time.perf_counter()
                record = self._step(state, sampler.draw(), opt, adv_opt, step)
                record["seconds"] = time.perf_counter() - tic
                train_seconds += record["seconds"]
                if (
                    state.val is not None
                    and cfg.val_every > 0
                    and (step % cfg.val_every == 0 or step == cfg.outer_steps)
                ):
                    point = {"step": step, **self._validate(state, seed)}
                    curve.append(point)
                    record["val_loss"] = point["val_loss"]
                    if point["val_loss"] < best[1]:
                        snapshot = {k: v.detach().clone() for k, v in work.state_dict().items()}
                        best = (step, point["val_loss"], snapshot)
                history.append(record)
                if cfg.log_every and step % cfg.log_every == 0:
                    log.info(
                        "%s step %d/%d: total %.4f, good CE %.4f, adv CE %.4f, adj CE %.4f, η %.3g, %.2fs",
                        self.name,
                        step,
                        cfg.outer_steps,
                        record["total"],
                        record["good_ce"],
                        record["adv_ce_mean"],
                        record["adj_ce_mean"],
                        record["inner_lr"] if record["inner_lr"] is not None else float("nan"),
                        record["seconds"],
                    )
                bar.update(1)
                bar.set_postfix(good=f"{record['good_ce']:.3f}", adv=f"{record['adv_ce_mean']:.3f}")
        bar.close()
        state.info["seconds_train"] = train_seconds  # outer steps only
        state.info["seconds_validation"] = time.perf_counter() - val_started - train_seconds
        state.info["outer_steps_per_s"] = cfg.outer_steps / train_seconds if train_seconds > 0 else None
        state.info["outer_steps_per_s_note"] = "outer steps only (validation excluded)"
        return history, curve, best

    def _current_lr(self, state: _Fit, draw: _Draw) -> float | Tensor:
        if state.eta is not None:
            return state.eta
        if draw.lr is not None:
            return draw.lr
        return state.cfg.inner_lr_init

    def _phi0(self, state: _Fit, draw: _Draw) -> Tensor:
        if state.phi is not None:
            return state.phi
        assert draw.phi is not None
        first = next(iter(state.params.values()))
        return draw.phi.to(device=first.device, dtype=first.dtype)

    def _inner(self, rows: _Rows, draw: _Draw) -> list[tuple[Tensor, Tensor]]:
        inner: list[tuple[Tensor, Tensor]] = []
        for idx in draw.inner:
            x, _, y_bad = rows.read(idx)
            inner.append((x, y_bad))
        return inner

    def _terms(self, state: _Fit, draw: _Draw, rows: _Rows, *, differentiable: bool) -> OuterTerms:
        cfg = state.cfg
        return outer_loss(
            state.work,
            state.params,
            self._phi0(state, draw),
            self._current_lr(state, draw),
            rows.read(draw.outer),
            self._inner(rows, draw),
            weights=cfg.weights,
            scope=draw.scope,
            create_graph=not cfg.first_order,
            differentiable=differentiable,
            desired_columns=state.c_good,
            inner_clip=cfg.inner_clip,
            optimizer=state.optimizer,
            adjust_bound=cfg.adjust_bound,
        )

    def _second_order(
        self, state: _Fit, draw: _Draw, lr: float | Tensor, step: int
    ) -> tuple[dict[str, Any], list[Tensor | None], list[Tensor | None]]:
        """∂L/∂θ and ∂A/∂(φ₀, η) from one forward through the differentiable unroll."""
        terms = self._terms(state, draw, state.train, differentiable=True)
        record = _record(terms, step, draw, lr)
        self._check_loss(record, step)
        adv_inputs = [t for t in (state.phi, state.eta) if t is not None]
        grads = torch.autograd.grad(
            terms.total, list(state.params.values()), retain_graph=bool(adv_inputs), allow_unused=True
        )
        adv: list[Tensor | None] = []
        if adv_inputs:
            adv = list(torch.autograd.grad(terms.adversary, adv_inputs, allow_unused=True))
        return record, list(grads), adv

    def _first_order(
        self, state: _Fit, draw: _Draw, lr: float | Tensor, step: int
    ) -> tuple[dict[str, Any], list[Tensor | None], list[Tensor | None]]:
        """First-order MAML, one z_k at a time (only one outer forward graph is alive at once).

        The share of L of z_k (:func:`_piece`) is differentiated w.r.t. the parameters it used: θ for
        k = 0 (and for the trunk in probe scope), the detached leaves ψ_k otherwise, each mapped to
        the θ entry of the same name; the adversary's CE(z_k)/(K+1) w.r.t. the head it used (φ₀, or
        φ_k mapped to φ₀). Values equal those of :func:`outer_loss`.
        """
        cfg = state.cfg
        weights = cfg.weights
        outer = state.train.read(draw.outer)
        setup = _Setup.build(state.work, state.params, self._phi0(state, draw), draw.scope)
        traj = setup.unroll(
            self._inner(state.train, draw),
            lr,
            optimizer=state.optimizer,
            create_graph=False,
            clip=cfg.inner_clip,
        )
        n_terms = len(traj.params)
        names = list(state.params)
        theta_grads: list[Tensor | None] = [None] * len(names)
        phi_grad: Tensor | None = None
        loss_sum, ces, adjs = 0.0, [], []
        good_ce, last_norm = math.nan, None
        for k in range(n_terms):
            used = setup.used(traj, k)
            piece = _piece(
                setup,
                used,
                outer,
                k=k,
                penalty=setup.final(traj) if weights.grad != 0 and k == n_terms - 1 else None,
                n_terms=n_terms,
                weights=weights,
                desired_columns=state.c_good,
                adjust_bound=cfg.adjust_bound,
                differentiable=True,
            )
            head = used["phi"] if state.phi is not None else None
            if piece.loss.requires_grad:
                inputs = [used[f"model.{n}"] for n in names]
                got = torch.autograd.grad(
                    piece.loss, inputs, retain_graph=head is not None, allow_unused=True
                )
                theta_grads = [_add(a, b) for a, b in zip(theta_grads, got, strict=True)]
            if head is not None:
                (g,) = torch.autograd.grad(piece.ce / n_terms, [head], allow_unused=True)
                phi_grad = _add(phi_grad, g)
            loss_sum += float(piece.loss.detach())
            ces.append(float(piece.ce.detach()))
            adjs.append(float(piece.adj.detach()))
            if piece.good_ce is not None:
                good_ce = float(piece.good_ce.detach())
            if piece.last_norm is not None:
                last_norm = float(piece.last_norm.detach())
            del piece, used
        norms = [float(n) for n in traj.grad_norms]
        grad_pen = None
        if weights.grad != 0 and last_norm is not None:
            grad_pen = (sum(norms) + last_norm) / n_terms
            loss_sum += weights.grad * sum(norms) / n_terms
        record = _record_values(step, draw, lr, loss_sum, good_ce, ces, adjs, grad_pen, norms)
        self._check_loss(record, step)
        return record, theta_grads, ([phi_grad] if state.phi is not None else [])

    def _check_loss(self, record: dict[str, Any], step: int) -> None:
        if not math.isfinite(record["total"]):
            raise NumericalError(
                f"{self.name}: non-finite outer loss at step {step} (good CE {record['good_ce']:.4g}, adv "
                f"CE {record['adv_ce_mean']:.4g}, adj CE {record['adj_ce_mean']:.4g}); lower outer_lr or "
                "inner_lr"
            )

    def _step(
        self,
        state: _Fit,
        draw: _Draw,
        opt: torch.optim.Optimizer,
        adv_opt: torch.optim.Optimizer | None,
        step: int,
    ) -> dict[str, Any]:
        """One outer step: both players' gradients at the same point, then both Adam steps."""
        cfg = state.cfg
        lr_used = self._current_lr(state, draw)
        if cfg.first_order:
            record, grads, adv_grads = self._first_order(state, draw, lr_used, step)
        else:
            record, grads, adv_grads = self._second_order(state, draw, lr_used, step)
        record["grad_norm"] = _clip_into(
            list(state.params.values()), grads, cfg.outer_clip, f"{self.name} step {step}"
        )
        adv_norm = None
        targets = [t for t in (state.phi, state.eta) if t is not None]
        if adv_grads and adv_opt is not None:
            adv_norm = _clip_into(targets, adv_grads, cfg.adv_clip, f"{self.name} step {step} (adversary)")
            adv_opt.step()
            adv_opt.zero_grad(set_to_none=True)
            if state.eta is not None:
                with torch.no_grad():
                    state.eta.clamp_(*cfg.inner_lr_clamp)
        record["adv_grad_norm"] = adv_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        bad = [n for n, p in state.params.items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NumericalError(
                f"{self.name}: non-finite parameters after step {step} in {bad[:3]}; lower outer_lr"
            )
        return record

    def _validate(self, state: _Fit, seed: int) -> dict[str, Any]:
        """Mean total loss (and its parts) on ``val_batches`` outer batches of the validation rows."""
        assert state.val is not None
        cfg = state.cfg
        sampler = _Sampler(
            len(state.val), cfg, _generator(seed, "validation-batches"), (state.c_bad, state.dim)
        )
        sums = {"val_loss": 0.0, "val_good_ce": 0.0, "val_adv_ce_mean": 0.0, "val_adj_ce_mean": 0.0}
        with _eval_mode(state.work):
            for _ in range(cfg.val_batches):
                terms = self._terms(state, sampler.draw(), state.val, differentiable=False)
                sums["val_loss"] += float(terms.total.detach())
                sums["val_good_ce"] += float(terms.good_ce.detach())
                sums["val_adv_ce_mean"] += float(terms.adversary.detach())
                sums["val_adj_ce_mean"] += float(torch.stack(terms.adj_ce).mean().detach())
        return {k: v / cfg.val_batches for k, v in sums.items()}

    def _finish(
        self,
        state: _Fit,
        history: list[dict[str, Any]],
        curve: list[dict[str, Any]],
        best: tuple[int, float, dict[str, Tensor] | None],
    ) -> None:
        info = state.info
        step, loss, snapshot = best
        if snapshot is not None:
            state.work.load_state_dict(snapshot)
            info["validation"].update(best_step=step, best_loss=loss, curve=curve, selected="lowest val_loss")
        else:
            info["validation"].update(best_step=None, curve=curve, selected="last state")
        if state.phi is not None:
            info["adv_head"]["norm_final"] = float(state.phi.detach().norm())
        if state.eta is not None:
            info["inner_lr_final"] = float(state.eta.detach())
        info["peak_rss_gb"] = _peak_rss_gb()
        info["peak_rss_note"] = "process peak resident set size since start (ru_maxrss)"
        for p in state.work.parameters():
            p.grad = None
        self.history_ = history
        self.info_ = info
        log.info(
            "%s: %d outer steps in %.1fs (%.2f steps/s); checkpoint %s",
            self.name,
            len(history),
            info.get("seconds_train", 0.0),
            info.get("outer_steps_per_s") or 0.0,
            f"step {step}" if snapshot is not None else "last",
        )


class AC(MLAC):
    """Adversarial censoring: MLAC with K = 0, λ_bad = 1, λ_lin = 0 (only z_0 = φ₀ᵀΦ_θ(x) enters).

    With ``adv_head_init="meta"`` the adversary φ₀ is trained to minimise CE(z_0, y^b) while θ maximises
    it: classic adversarial censoring against a trained linear adversary. ``"fresh"`` reproduces the
    reference's run (a random head each step, §7.1).
    """

    name = "ac"
    Config: ClassVar[type[DefenseConfig]] = ACConfig
    config: ACConfig
    preset_name: ClassVar[str] = "ac"


# --- helpers --------------------------------------------------------------------------------------------


def _lr_mode(cfg: MLACConfig) -> str:
    if cfg.inner_steps == 0:
        return "unused (K = 0)"
    if cfg.inner_lr == "meta":
        return f"meta-learned (init {cfg.inner_lr_init:g}, clamp {list(cfg.inner_lr_clamp)})"
    if cfg.inner_lr == "sample":
        return f"sampled log-uniform in {list(cfg.inner_lr_range)}"
    return f"fixed {cfg.inner_lr_init:g}"


def _head_tensor(head: Tensor | nn.Linear, shape: tuple[int, int]) -> Tensor:
    if isinstance(head, nn.Linear):
        if head.bias is not None:
            raise ConfigError(
                "adv_head must be bias-free (nn.Linear(D, C_h, bias=False)); MLAC's head has no bias"
            )
        head = head.weight
    if not isinstance(head, Tensor) or tuple(head.shape) != shape:
        got = tuple(head.shape) if isinstance(head, Tensor) else type(head).__name__
        raise ConfigError(
            f"adv_head must be a (C_h, D) = {shape} tensor (harmful classes × feature dim) or "
            f"nn.Linear({shape[1]}, {shape[0]}, bias=False), got {got}"
        )
    if not bool(torch.isfinite(head).all()):
        raise ConfigError("adv_head contains NaN or Inf; pass a finite head")
    return head.detach().clone()


def _check_not_attacker(task: Task, split: Split) -> None:
    """Validation rows must not be any of the attacker's rows."""
    hashes = split.row_hashes()
    for name in _ATTACKER_SPLITS:
        other = getattr(task, name, None)
        if other is not None and hashes & other.row_hashes():
            raise DataError(
                f"the validation rows share {len(hashes & other.row_hashes())} rows with the attacker's "
                f"split {name!r}; the defender may only validate on its own data (e.g. discrim-eval's "
                "defender_val)"
            )


def _clip_into(
    params: Sequence[Tensor], grads: Sequence[Tensor | None], max_norm: float, where: str
) -> float:
    """Set ``p.grad`` to g·min(1, c/(‖g‖ + 1e-6)) (as ``clip_grad_norm_``); returns ‖g‖ before clipping."""
    norm = float(total_norm(grads))
    if not math.isfinite(norm):
        raise NumericalError(f"non-finite gradient at {where}; lower outer_lr, adv_lr or inner_lr")
    coef = min(1.0, max_norm / (norm + 1e-6))
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else (g * coef).detach()
    return norm


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _record(terms: OuterTerms, step: int, draw: _Draw, lr: float | Tensor) -> dict[str, Any]:
    def num(t: Tensor) -> float:
        return float(t.detach())

    return _record_values(
        step,
        draw,
        lr,
        num(terms.total),
        num(terms.good_ce),
        [num(t) for t in terms.adv_ce],
        [num(t) for t in terms.adj_ce],
        None if terms.grad_pen is None else num(terms.grad_pen),
        [num(n) for n in terms.trajectory.grad_norms],
    )


def _record_values(
    step: int,
    draw: _Draw,
    lr: float | Tensor,
    total: float,
    good_ce: float,
    ces: list[float],
    adjs: list[float],
    grad_pen: float | None,
    inner_norms: list[float],
) -> dict[str, Any]:
    return {
        "step": step,
        "total": total,
        "good_ce": good_ce,
        "adv_ce_mean": sum(ces) / len(ces),
        "adv_ce_final": ces[-1],
        "adj_ce_mean": sum(adjs) / len(adjs),
        "grad_pen": grad_pen,
        "inner_grad_norms": inner_norms,
        "inner_lr": None if not draw.inner else float(lr.detach() if isinstance(lr, Tensor) else lr),
        "inner_batch": int(draw.inner[0].numel()) if draw.inner else 0,
        "scope": draw.scope,
    }
