"""Functional optimizer updates and the differentiable unroll driver.

An attack's training loop has three parts: a budget meter (``_loop.py``), an **update rule** and a
**driver**. This module holds the update rules, written as pure functions of
``(params, state, grads, lr)`` in the style of an init/update pair, and the driver
:func:`unroll`, which runs them over ``torch.func.functional_call`` so that a meta-learned defense
(MLAC, arXiv 2211.14946) can differentiate through the very steps that later evaluate it.

The in-place loop of ``_loop.py`` calls the same :meth:`FunctionalOptimizer.update` under
``torch.no_grad`` and writes the result into the parameters. The arithmetic is that of
``torch.optim``'s single-tensor implementations (the ones used on CPU), operation for operation, so
a float learning rate gives the parameters of ``torch.optim`` bit for bit:

* ``gd`` / ``sgd``: θ ← θ − η g;
* ``sgd_momentum`` (no dampening, no Nesterov): b₁ = g, b_t = μ b_{t−1} + g; θ ← θ − η b_t;
* ``adam``: m_t = m_{t−1} + (1 − β₁)(g − m_{t−1}) (a lerp), v_t = β₂ v_{t−1} + (1 − β₂) g²,
  θ ← θ − (η / (1 − β₁ᵗ)) · m_t / (√v_t / √(1 − β₂ᵗ) + ε);
* ``adamw``: θ ← θ (1 − η λ) first (decoupled weight decay), then the Adam step.

A parameter whose gradient is ``None`` (unused by the loss) is skipped and its state not advanced,
as ``torch.optim`` does. A **tensor** learning rate (e.g. MLAC's meta-learned inner lr) enters the
update as a differentiable factor; the float path uses ``addcdiv`` and friends, which take a
Python scalar only.

Second-order use: ∂√v/∂v is infinite at v = 0, and Adam meets v = 0 wherever a gradient entry is 0
(a ReLU that never fires, an unused embedding row); the chain rule then multiplies 0 by ∞. The
differentiable path therefore takes the square root through :func:`safe_sqrt`, which has the same
values and a zero derivative at 0.

References:
    Kingma & Ba, arXiv 1412.6980 (Adam); Loshchilov & Hutter, arXiv 1711.05101 (AdamW);
    Henderson et al., arXiv 2211.14946 (MLAC: a differentiable simulated attacker).

"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from immunekit.errors import ConfigError

Params = dict[str, Tensor]
"""Named tensors, as in :meth:`torch.nn.Module.named_parameters` (the keys of ``functional_call``)."""
State = dict[str, dict[str, Any]]
"""Per-parameter optimizer state: ``{"step": int, "m": Tensor, "v": Tensor}`` (what the rule needs)."""
LearningRate = float | Tensor | Callable[[int], float | Tensor]

FUNCTIONAL_OPTIMIZERS: tuple[str, ...] = ("gd", "sgd", "sgd_momentum", "adam", "adamw")


def safe_sqrt(x: Tensor) -> Tensor:
    """√x with the derivative at 0 set to 0 instead of ∞ (values are exactly ``x.sqrt()``).

    Example:
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> y = safe_sqrt(x)
        >>> y.sum().backward()
        >>> y.tolist(), x.grad.tolist()
        ([0.0, 2.0], [0.0, 0.25])

    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


@dataclass(frozen=True)
class FunctionalOptimizer:
    """A first-order update rule as a pure function (``init`` / ``update``).

    Attributes:
        name: one of :data:`FUNCTIONAL_OPTIMIZERS`.
        momentum: μ of ``sgd_momentum``.
        weight_decay: λ of ``adamw`` (decoupled).
        betas: (β₁, β₂) of ``adam`` / ``adamw``.
        eps: ε of ``adam`` / ``adamw``.

    Example:
        >>> opt = FunctionalOptimizer("sgd")
        >>> p = {"w": torch.tensor([1.0, 2.0])}
        >>> new, _ = opt.update(p, opt.init(p), {"w": torch.tensor([1.0, -1.0])}, 0.5)
        >>> new["w"].tolist()
        [0.5, 2.5]

    """

    name: str
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in FUNCTIONAL_OPTIMIZERS:
            raise ConfigError(
                f"optimizer {self.name!r} has no functional update; choose one of "
                f"{list(FUNCTIONAL_OPTIMIZERS)} ('gd_exact' is the linear probe's)"
            )

    @classmethod
    def from_budget(cls, budget: Any) -> FunctionalOptimizer:
        """The rule of an :class:`~immunekit.attacks.base.AttackBudget` (optimizer, momentum, decay)."""
        return cls(budget.optimizer, momentum=budget.momentum, weight_decay=budget.weight_decay)

    def init(self, params: Mapping[str, Tensor]) -> State:
        """Empty state for ``params`` (moments are created at a parameter's first update)."""
        return {name: {"step": 0} for name in params}

    def update(
        self,
        params: Mapping[str, Tensor],
        state: State,
        grads: Mapping[str, Tensor | None],
        lr: float | Tensor,
    ) -> tuple[Params, State]:
        """One step: new parameters and new state; nothing passed in is modified.

        Args:
            params: θ, ``{name: tensor}``.
            state: from :meth:`init` or the previous update.
            grads: ∇θ of the mean loss, same keys; ``None`` skips that parameter.
            lr: η, a float or a 0-d tensor (differentiable).

        Returns:
            ``(params, state)`` after the step, as new dicts.

        """
        new_params: Params = {}
        new_state: State = {}
        for name, p in params.items():
            g, st = grads.get(name), state[name]
            if g is None:
                new_params[name], new_state[name] = p, st
                continue
            new_params[name], new_state[name] = self._one(p, g, st, lr)
        return new_params, new_state

    def _one(
        self, p: Tensor, g: Tensor, st: dict[str, Any], lr: float | Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        step = int(st["step"]) + 1
        if self.name in ("gd", "sgd", "sgd_momentum"):
            buf = (
                g if self.name != "sgd_momentum" else g.clone() if step == 1 else st["m"] * self.momentum + g
            )
            new = p - lr * buf if isinstance(lr, Tensor) else torch.add(p, buf, alpha=-lr)
            return new, ({"step": step, "m": buf} if self.name == "sgd_momentum" else {"step": step})
        if self.name == "adamw" and self.weight_decay != 0.0:
            p = p * (1 - lr * self.weight_decay)
        b1, b2 = self.betas
        # not st.get("m", zeros_like(p)): the default would be allocated at every step
        m = st["m"] if "m" in st else torch.zeros_like(p)
        v = st["v"] if "v" in st else torch.zeros_like(p)
        m = torch.lerp(m, g, 1 - b1)
        v = torch.addcmul(v * b2, g, g, value=1 - b2)
        bc1, bc2_sqrt = 1 - b1**step, (1 - b2**step) ** 0.5
        root = safe_sqrt(v) if torch.is_grad_enabled() and v.requires_grad else v.sqrt()
        denom = root / bc2_sqrt + self.eps
        if isinstance(lr, Tensor):
            new = p - (lr / bc1) * (m / denom)
        else:
            new = torch.addcdiv(p, m, denom, value=-lr / bc1)
        return new, {"step": step, "m": m, "v": v}


def total_norm(grads: Iterable[Tensor | None]) -> Tensor:
    """‖g‖₂ over every gradient tensor (``None`` entries skipped); 0-d, differentiable."""
    norms = [torch.linalg.vector_norm(g) for g in grads if g is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_by_norm(
    grads: Mapping[str, Tensor | None], max_norm: float
) -> tuple[dict[str, Tensor | None], Tensor]:
    """Scale the gradients so that their total norm is at most ``max_norm`` (as ``clip_grad_norm_``).

    The factor is min(1, max_norm / (‖g‖ + 1e-6)), differentiable in g.

    Returns:
        ``(clipped grads, the norm before clipping)``.

    """
    if max_norm <= 0:
        raise ConfigError(f"gradient clip max_norm must be > 0, got {max_norm}; use None to disable clipping")
    norm = total_norm(grads.values())
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: None if g is None else g * coef.to(g.dtype) for k, g in grads.items()}, norm


@dataclass
class Trajectory:
    """What :func:`unroll` did: the parameters after every step and the per-step measurements.

    Attributes:
        params: θ₀, θ₁, …, θ_K (θ₀ is the input; with ``keep="last"`` only θ₀ and θ_K).
        losses: the mini-batch loss at θ_{k−1} of step k (before its update), k = 1…K.
        grad_norms: ‖∇θ‖ of step k before any clipping.
        lrs: the learning rate of step k.
        state: the optimizer state after the last step.

    """

    params: list[Params]
    losses: list[Tensor] = field(default_factory=list)
    grad_norms: list[Tensor] = field(default_factory=list)
    lrs: list[float | Tensor] = field(default_factory=list)
    state: State = field(default_factory=dict)

    @property
    def final(self) -> Params:
        """θ_K."""
        return self.params[-1]


def _lr_of(lr: LearningRate, step: int) -> float | Tensor:
    return lr(step) if callable(lr) else lr


def functional_grads(
    model: nn.Module,
    params: Params,
    x: Tensor,
    target: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    create_graph: bool,
) -> tuple[Tensor, Tensor, dict[str, Tensor | None]]:
    """Loss, predictions and ∇θ of ``loss_fn(model_θ(x), target)`` with θ = ``params``.

    Parameters of ``model`` not in ``params`` (and buffers) are read from the module as they are.
    Gradients are ``None`` for parameters the loss does not use.
    """
    pred = functional_call(model, params, (x,), strict=False)
    loss = loss_fn(pred, target)
    names = [k for k, p in params.items() if p.requires_grad]
    got = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph, allow_unused=True)
    grads: dict[str, Tensor | None] = dict.fromkeys(params)
    grads.update(zip(names, got, strict=True))
    return loss, pred, grads


def unroll(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: FunctionalOptimizer,
    lr: LearningRate,
    create_graph: bool,
    clip: float | None = None,
    keep: str = "all",
) -> Trajectory:
    """Run ``optimizer`` on ``params`` over ``batches`` without touching ``model``'s parameters.

    Step k (1-based) computes g_k = ∇θ loss_fn(f_θ(x_k), t_k) at θ_{k−1} through
    ``torch.func.functional_call``, optionally clips it to total norm ``clip``, and sets
    θ_k = update(θ_{k−1}, g_k, η_k).

    With ``create_graph=True`` every θ_k is a differentiable function of θ₀ (and of a tensor η):
    gradients of any function of the trajectory flow back through all K updates (second order).
    With ``create_graph=False`` each θ_k is a fresh leaf (detached), the same numbers the in-place
    loop produces from the same batches.

    Args:
        model: provides the architecture (and every parameter or buffer not in ``params``); its mode
            (train/eval) is used as it is.
        params: θ₀, the tensors that move; with ``create_graph=True`` they may be non-leaves (e.g. a
            defender's parameters) and gradients reach whatever they came from.
        batches: ``(x, target)`` pairs, one per step.
        loss_fn: mean loss ``(predictions, target) -> 0-d tensor``.
        optimizer: the update rule (fresh state each call).
        lr: η, a float, a 0-d tensor, or ``step -> η`` (1-based).
        create_graph: keep the graph through every update.
        clip: clip each step's gradient to this total norm (None: no clipping).
        keep: ``"all"`` (θ₀…θ_K) or ``"last"`` (θ₀ and θ_K: less memory without create_graph).

    Returns:
        :class:`Trajectory`.

    Raises:
        ConfigError: unknown ``keep``; a parameter that cannot receive a gradient.

    """
    if keep not in ("all", "last"):
        raise ConfigError(f"keep must be 'all' or 'last', got {keep!r}")
    theta: Params = {k: _as_start(k, v, create_graph) for k, v in params.items()}
    out = Trajectory(params=[theta])
    state = optimizer.init(theta)
    for k, (x, target) in enumerate(batches, start=1):
        with torch.enable_grad():
            loss, _, grads = functional_grads(model, theta, x, target, loss_fn, create_graph=create_graph)
        norm = total_norm(grads.values())
        if clip is not None:
            grads, norm = clip_by_norm(grads, clip)
        eta = _lr_of(lr, k)
        if create_graph:
            with torch.enable_grad():  # even inside a caller's no_grad: the graph is what was asked for
                theta, state = optimizer.update(theta, state, grads, eta)
        else:
            with torch.no_grad():
                theta, state = optimizer.update(theta, state, grads, eta)
            theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
            loss, norm = loss.detach(), norm.detach()
        out.losses.append(loss)
        out.grad_norms.append(norm)
        out.lrs.append(eta)
        if keep == "all" or len(out.params) == 1:
            out.params.append(theta)
        else:
            out.params[-1] = theta
    out.state = state
    return out


def _as_start(name: str, value: Tensor, create_graph: bool) -> Tensor:
    if not value.is_floating_point():
        raise ConfigError(f"parameter {name!r} is {value.dtype}: only floating-point tensors can be trained")
    if create_graph and value.requires_grad:
        return value  # keep the link to whatever θ₀ came from
    return value.detach().requires_grad_(True)
