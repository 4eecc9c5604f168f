"""Attack contract: a budget, per-step records, and a result that names what stopped it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel

Optimizer = Literal["gd_exact", "gd", "sgd", "adam"]
OPTIMIZERS: tuple[str, ...] = ("gd_exact", "gd", "sgd", "adam")


@dataclass(frozen=True, kw_only=True)
class AttackBudget:
    """The adversary's resources and optimizer settings; whichever limit is hit first stops the attack.

    Attributes:
        steps: optimizer steps (≥ 1).
        batch_size: examples per step for stochastic optimizers (full batch for ``gd``/``gd_exact``).
        lr: learning rate; ``None`` = the optimizer's default (``1/L`` for ``gd``, 1e-3 otherwise;
            ``gd_exact`` chooses its own step by exact line search).
        optimizer: ``gd_exact`` (full-batch GD, exact line search — Fig. 1 of arXiv 2505.23760),
            ``gd`` (full-batch, fixed step), ``sgd`` or ``adam``.
        max_examples: cap on examples processed, or ``None``.
        max_flops: cap on floating-point operations, or ``None``.
        eval_every: evaluate on the held-out split every this many steps (0 = never).

    """

    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per stochastic step"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (None: optimizer default)"})
    optimizer: Optimizer = field(default="gd_exact", metadata={"help": "one of " + ", ".join(OPTIMIZERS)})
    max_examples: int | None = field(default=None, metadata={"help": "cap on examples seen"})
    max_flops: float | None = field(default=None, metadata={"help": "cap on FLOPs"})
    eval_every: int = field(default=0, metadata={"help": "held-out evaluation period (0: never)"})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(
                f"budget.steps must be >= 1, got {self.steps}; give the attacker at least one step"
            )
        if self.batch_size < 1:
            raise ConfigError(f"budget.batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"budget.lr must be > 0, got {self.lr}; or pass lr=None for the default")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"budget.optimizer {self.optimizer!r} is unknown; choose one of {list(OPTIMIZERS)}"
            )
        for name in ("max_examples", "max_flops"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"budget.{name} must be > 0 or None, got {value}")
        if self.eval_every < 0:
            raise ConfigError(f"budget.eval_every must be >= 0, got {self.eval_every}")


@dataclass
class StepRecord:
    """What one attack step did and measured.

    Attributes:
        step: 1-based step index (0 for the initial state).
        examples: cumulative examples processed.
        flops: cumulative FLOPs (method in ``AttackResult.info['flops_method']``).
        lr: step size actually applied.
        loss: training loss on the attacker's split after the step (mean squared error for probes).
        grad_norm: gradient norm at the step.
        wall_time: cumulative seconds.
        norm_ratio: ‖w_t − w*‖²/‖w_0 − w*‖² for linear probes (``None`` otherwise).
        accuracy: attacker-split accuracy for classification (``None`` for regression).
        eval: held-out metrics when evaluated at this step.

    """

    step: int
    examples: int
    flops: float
    lr: float
    loss: float
    grad_norm: float
    wall_time: float
    norm_ratio: float | None = None
    accuracy: float | None = None
    eval: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return asdict(self)


@dataclass
class AttackResult:
    """Outcome of an attack: the attacked copy, the step records and what stopped it.

    Attributes:
        model: the fine-tuned copy (the input model is never modified).
        initial: the state before the first step (``step == 0``).
        records: one :class:`StepRecord` per step taken.
        stopped_by: ``"steps"``, ``"examples"``, ``"flops"`` or ``"converged"``.
        info: attack-specific facts (derived lr, κ of the probe Hessian, FLOP method, ...).

    """

    model: ImmunizableModel
    initial: StepRecord
    records: list[StepRecord]
    stopped_by: str
    info: dict[str, Any] = field(default_factory=dict)

    def curve(self, key: str = "norm_ratio") -> list[float | None]:
        """``key`` over steps, starting with the initial state."""
        return [getattr(r, key) for r in [self.initial, *self.records]]


class Attack(ABC):
    """Base class: ``__call__`` copies the model, trains what the attack chooses, records each step."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(
        self, model: ImmunizableModel, task: Task, budget: AttackBudget, *, seed: int
    ) -> AttackResult:
        """Attack a copy of ``model`` on ``task`` within ``budget``; never mutates ``model``."""


def split_of(task: Task, name: str) -> Dataset:
    """The task split called ``name``: attack, primary, harmful, eval_primary or eval_harmful."""
    names = ("attack", "primary", "harmful", "eval_primary", "eval_harmful")
    if name not in names:
        raise ConfigError(f"unknown split {name!r}; choose one of {list(names)}")
    return getattr(task, name)
