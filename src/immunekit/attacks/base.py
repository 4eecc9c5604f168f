"""Attack contract: a budget, per-step records, and a result that names what stopped it."""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from immunekit.data.task import Split, Task
from immunekit.errors import ConfigError, DataError
from immunekit.metrics.task_scores import task_score
from immunekit.models.base import ImmunizableModel

Optimizer = Literal["gd_exact", "gd", "sgd", "sgd_momentum", "adam", "adamw"]
OPTIMIZERS: tuple[str, ...] = ("gd_exact", "gd", "sgd", "sgd_momentum", "adam", "adamw")
Schedule = Literal["constant", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
DEFAULT_LR = 1e-3
"""Learning rate used when ``AttackBudget.lr`` is None (except ``gd``/``gd_exact`` of the linear probe)."""

TRAIN_SPLITS: tuple[str, ...] = ("attack", "primary", "attack_disjoint", "attack_cross", "val_harmful")
EVAL_SPLITS: tuple[str, ...] = ("eval_harmful", "eval_primary", "val_harmful")
OPTIONAL_SPLITS: tuple[str, ...] = ("val_harmful", "attack_disjoint", "attack_cross")
EVAL_BATCH_SIZE = 1024
"""Rows per forward pass when a whole split is evaluated or featurized (held-out scores, the
harm curve, a probe's frozen features, a full-batch step over a larger split): one setting,
independent of the attack budget, so no split is ever forwarded in one pass. Read at call time;
the functions that use it also take ``batch_size=`` (and :func:`~immunekit.attacks._loop.run_loop`
``eval_batch_size=``). The results equal a one-pass evaluation to float rounding (bit for bit when
the split fits in one chunk)."""

SplitT = TypeVar("SplitT", bound=Split)


@dataclass(frozen=True, kw_only=True)
class AttackBudget:
    """The adversary's resources and optimizer settings; whichever limit is hit first stops the attack.

    The defaults (100 Adam steps at lr 0.01, batch 32, held-out evaluation every 10 steps) are the
    one default budget of the API and the CLI (``immunekit evaluate``): ``AttackBudget()`` works
    with every attack.

    Attributes:
        steps: optimizer steps (≥ 1).
        batch_size: examples per step for stochastic optimizers (full batch for ``gd``/``gd_exact``).
        lr: base learning rate η, one meaning for every attack and optimizer: the step multiplies the
            gradient of the **mean** training loss over the examples of the step (the mini-batch, or
            the whole split for ``gd``), as ``torch.optim`` does with a mean-reduced loss; e.g. plain
            GD/SGD takes w ← w − η ∇_w (1/B) Σ_i ℓ_i(w). (In the linear probe ℓ_i is the squared error
            of row i summed over its target columns; the torch loop's ``mse_loss`` also averages over
            the C columns, so there the same η moves C times less; with one column both are the same
            step.) ``None`` = the optimizer's default: ``1/L`` for ``gd`` in the
            linear probe, with L = λ_max(2AᵀA/N) the smoothness constant of that mean loss (the same
            iterates as 1/λ_max(2AᵀA) on the summed loss ‖Aw − Y‖²), :data:`DEFAULT_LR` = 1e-3
            otherwise (``gd_exact`` chooses its own step by exact line search and records it in the
            same mean-loss units; its ``lr`` is always ``None``, a given value is dropped).
        optimizer: ``gd_exact`` (full-batch GD, exact line search — Fig. 1 of arXiv 2505.23760; linear
            probe only), ``gd`` (full-batch, fixed step), ``sgd``, ``sgd_momentum``, ``adam`` or ``adamw``.
        max_examples: cap on examples processed, or ``None``.
        max_flops: cap on floating-point operations, or ``None``.
        eval_every: evaluate on the held-out split every this many steps; step 0 and the last step
            are always evaluated (0 = only those two).
        schedule: ``constant`` or ``cosine``; the lr of step t (1-based) is :func:`scheduled_lr`.
        warmup_steps: linear warm-up steps (lr t/W · η for t ≤ W), then the schedule.
        momentum: momentum of ``sgd_momentum`` (torch.optim.SGD, no dampening, no Nesterov).
        weight_decay: decoupled weight decay of ``adamw``. 0 by default: torch's own default of 0.01
            is *not* used silently; set it explicitly. Only ``adamw`` accepts a non-zero value.
        max_tokens: cap on tokens processed (sequence inputs only; tabular and vision inputs count 0
            tokens, so the cap never binds for them), or ``None``.
        eval_dense_until: also evaluate at every step up to this one (0: none), e.g. where a harm
            curve crosses its threshold; evaluating changes no weight, so the trajectory is the
            same whatever the evaluation steps.

    """

    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per stochastic step"})
    lr: float | None = field(default=1e-2, metadata={"help": "learning rate (None: optimizer default)"})
    optimizer: Optimizer = field(default="adam", metadata={"help": "one of " + ", ".join(OPTIMIZERS)})
    max_examples: int | None = field(default=None, metadata={"help": "cap on examples seen"})
    max_flops: float | None = field(default=None, metadata={"help": "cap on FLOPs"})
    eval_every: int = field(
        default=10, metadata={"help": "held-out evaluation period (0: step 0 and the last step only)"}
    )
    schedule: Schedule = field(default="constant", metadata={"help": "lr schedule: " + ", ".join(SCHEDULES)})
    warmup_steps: int = field(default=0, metadata={"help": "linear lr warm-up steps before the schedule"})
    momentum: float = field(default=0.9, metadata={"help": "momentum of sgd_momentum"})
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "decoupled weight decay of adamw (0: none; torch's 0.01 is not implied)"},
    )
    max_tokens: int | None = field(default=None, metadata={"help": "cap on tokens seen (sequence inputs)"})
    eval_dense_until: int = field(
        default=0, metadata={"help": "also evaluate at every step up to this one (0: none)"}
    )

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
        for name in ("max_examples", "max_flops", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"budget.{name} must be > 0 or None, got {value}")
        if self.eval_every < 0:
            raise ConfigError(f"budget.eval_every must be >= 0, got {self.eval_every}")
        if self.eval_dense_until < 0:
            raise ConfigError(f"budget.eval_dense_until must be >= 0, got {self.eval_dense_until}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"budget.schedule {self.schedule!r} is unknown; choose one of {list(SCHEDULES)}"
            )
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"budget.warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"budget.momentum must be in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0.0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"budget.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.weight_decay > 0.0 and self.optimizer != "adamw":
            raise ConfigError(
                f"budget.weight_decay={self.weight_decay} only applies to optimizer 'adamw', got "
                f"{self.optimizer!r}; use optimizer='adamw' or weight_decay=0"
            )
        if self.optimizer == "gd_exact" and self.lr is not None:
            # exact line search chooses every step; a learning rate (the default 0.01 included)
            # would be recorded without effect, so it is normalised away
            object.__setattr__(self, "lr", None)
        if self.optimizer == "gd_exact" and (self.schedule != "constant" or self.warmup_steps):
            raise ConfigError(
                "budget.optimizer 'gd_exact' chooses its own step by line search; a schedule or warm-up "
                "cannot apply: use schedule='constant', warmup_steps=0 or optimizer='gd'"
            )

    def evaluates(self, step: int) -> bool:
        """Whether step ``step`` is evaluated on the held-out split (the last step always is too).

        Example:
            >>> b = AttackBudget(steps=100, eval_every=25, eval_dense_until=3)
            >>> [t for t in range(101) if b.evaluates(t)]
            [0, 1, 2, 3, 25, 50, 75, 100]

        """
        return step <= self.eval_dense_until or (self.eval_every > 0 and step % self.eval_every == 0)

    def examples_per_step(self, n_rows: int) -> int:
        """Examples one step uses on a split of ``n_rows`` rows (full batch for gd/gd_exact)."""
        return n_rows if self.optimizer in ("gd", "gd_exact") else min(self.batch_size, n_rows)

    def describe(self, n_rows: int) -> str:
        """The derived budget, e.g. ``"200 steps × 32 = 6,400 examples"`` (for the start-of-attack log)."""
        per = self.examples_per_step(n_rows)
        text = f"{self.steps:,} steps × {per:,} = {self.steps * per:,} examples"
        caps = [
            f"{k}={getattr(self, 'max_' + k):,}"
            for k in ("examples", "tokens", "flops")
            if getattr(self, "max_" + k) is not None
        ]
        return text + (f" (caps: {', '.join(caps)})" if caps else "")


def scheduled_lr(base: float, step: int, budget: AttackBudget) -> float:
    """Learning rate of step ``step`` (1-based) under the budget's schedule.

    With W = ``warmup_steps`` and T = ``steps``:

    * warm-up, t ≤ W: η_t = η · t / W;
    * ``constant``, t > W: η_t = η;
    * ``cosine``, t > W: η_t = η · ½ (1 + cos(π (t − W − 1) / (T − W))), so the first step after
      warm-up uses η and the decay heads to 0 (reached at t = T + 1, so no step is wasted on η = 0).

    Args:
        base: the base learning rate η.
        step: 1-based step index t.
        budget: provides schedule, warm-up and T.

    Returns:
        η_t.

    Example:
        >>> b = AttackBudget(steps=4, optimizer="sgd", schedule="cosine")
        >>> [round(scheduled_lr(1.0, t, b), 4) for t in range(1, 5)]
        [1.0, 0.8536, 0.5, 0.1464]

    """
    w, t_max = budget.warmup_steps, budget.steps
    if step <= w:
        return base * step / w
    if budget.schedule == "constant":
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - w - 1) / (t_max - w)))


@dataclass
class StepRecord:
    """What one attack step did and measured.

    Attributes:
        step: 1-based step index (0 for the initial state).
        examples: cumulative examples processed.
        flops: cumulative FLOPs (method in ``AttackResult.info['flops_method']``).
        lr: step size actually applied, in the units of :attr:`AttackBudget.lr` (it multiplies the
            gradient of the mean loss over the step's examples).
        loss: training loss on the attacker's split after the step (mean squared error for probes).
        grad_norm: norm of the gradient ``lr`` multiplies (that of the mean loss) at the step.
        wall_time: cumulative seconds.
        norm_ratio: ‖w_t − w*‖²/‖w_0 − w*‖² for linear probes (``None`` otherwise).
        accuracy: attacker-split accuracy for classification (``None`` for regression).
        eval: held-out metrics when evaluated at this step: ``{"harm": h, "utility": u, ...}`` with
            h the task score on the attack's eval split and u the task score on ``eval_primary``
            (:func:`immunekit.metrics.task_scores.task_score`).
        tokens: cumulative tokens processed (sequence inputs; 0 for tabular/vision).

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
    tokens: int = 0

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
        stopped_by: ``"steps"``, ``"examples"``, ``"tokens"``, ``"flops"`` or ``"converged"``.
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

    def harm_curve(self) -> list[tuple[int, float]]:
        """``[(step, harm)]`` over the initial state and every record evaluated with a ``"harm"``."""
        return [
            (r.step, float(r.eval["harm"]))
            for r in [self.initial, *self.records]
            if r.eval is not None and "harm" in r.eval
        ]


class Attack(ABC):
    """Base class: ``__call__`` copies the model, trains what the attack chooses, records each step."""

    name: ClassVar[str]
    supports_unroll: ClassVar[bool] = False
    """Whether :meth:`unroll` runs this attack through ``torch.func`` (the torch-loop attacks do)."""

    @abstractmethod
    def __call__(
        self, model: ImmunizableModel, task: Task, budget: AttackBudget, *, seed: int
    ) -> AttackResult:
        """Attack a copy of ``model`` on ``task`` within ``budget``; never mutates ``model``."""

    def unroll(
        self,
        model: ImmunizableModel,
        task: Task[Split],
        budget: AttackBudget,
        *,
        seed: int,
        theta: Mapping[str, Tensor] | None = None,
        create_graph: bool = False,
    ) -> tuple[AttackResult, dict[str, Tensor]]:
        """The attack as a differentiable function of the parameters it moves.

        Same copy, data, batches, budget and update rule as :meth:`__call__`, but the moving
        parameters are a ``{name: tensor}`` dict advanced through ``torch.func.functional_call``
        (:mod:`immunekit.attacks.functional`). With ``create_graph=False`` the result equals
        ``__call__``'s (parameters and records; the contract suite checks it); with ``True``, the
        returned parameters are differentiable functions of ``theta``, so a meta-learned defense
        differentiates through the code that later evaluates it. The batches are the attack's own
        seeded stream rather than an argument, which is what makes the records comparable.

        Returns:
            ``(result, final parameters by name)``.

        Raises:
            ConfigError: the attack has no differentiable form (closed-form probes, LoRA, LMs).

        """
        raise ConfigError(
            f"attack {self.name!r} cannot be unrolled differentiably; use one whose supports_unroll is "
            "True (full_finetune, partial_finetune, head_reset_probe, relearn)"
        )


def split_of(task: Task[SplitT], name: str) -> SplitT:
    """The task split called ``name``.

    Args:
        task: the task.
        name: attack, primary, harmful, eval_primary, eval_harmful, or one of the optional splits
            val_harmful, attack_disjoint, attack_cross.

    Raises:
        ConfigError: unknown split name.
        DataError: an optional split the task does not have (``None``).

    """
    names = ("attack", "primary", "harmful", "eval_primary", "eval_harmful", *OPTIONAL_SPLITS)
    if name not in names:
        raise ConfigError(f"unknown split {name!r}; choose one of {list(names)}")
    data = getattr(task, name, None)
    if data is None:
        raise DataError(
            f"task {task.name!r} has no {name!r} split; build it with evaluation_splits=True "
            f"(or pass the split to Task) or choose another split"
        )
    return data


def default_eval_split(split: str) -> str:
    """The held-out split matching a training split: eval_primary for primary, else eval_harmful."""
    return "eval_primary" if split == "primary" else "eval_harmful"


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the random stream ``name`` of an attack run with ``seed``.

    The first 8 bytes of sha256(``"immunekit-rng:{seed}:{name}"``), shifted right by one bit: a pure
    function of (seed, name), different for different names (so two streams of one run never start
    in the same state) and independent of which other streams the run asks for.

    Example:
        >>> stream_seed(0, "batches") == stream_seed(0, "batches") != stream_seed(0, "init")
        True

    """
    digest = hashlib.sha256(f"immunekit-rng:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rng_streams(seed: int, *names: str) -> tuple[torch.Generator, ...]:
    """One seeded CPU ``torch.Generator`` per name, each from :func:`stream_seed` (seed, name).

    An attack that draws for several purposes (head initialisation, a data subset, mini-batch order)
    takes one stream per purpose, so no draw of one purpose repeats or shifts those of another; the
    names used are ``init``, ``subset`` and ``batches``.

    Args:
        seed: the attack run's seed.
        names: distinct stream names.

    Returns:
        Generators in the order of ``names``.

    Raises:
        ConfigError: a name repeated (two equal streams would be the bug this avoids).

    Example:
        >>> init, batches = rng_streams(0, "init", "batches")
        >>> bool(torch.equal(torch.randperm(8, generator=init), torch.randperm(8, generator=batches)))
        False

    """
    if len(set(names)) != len(names):
        raise ConfigError(f"rng_streams: stream names must be distinct, got {list(names)}")
    return tuple(torch.Generator().manual_seed(stream_seed(seed, name)) for name in names)


def eval_batch_size(batch_size: int | None = None) -> int:
    """Rows per evaluation chunk: ``batch_size``, or :data:`EVAL_BATCH_SIZE` when ``None``.

    Raises:
        ConfigError: a value below 1.

    Example:
        >>> eval_batch_size(), eval_batch_size(64)
        (1024, 64)

    """
    size = EVAL_BATCH_SIZE if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"eval batch size must be an integer >= 1, got {size!r}; e.g. pass batch_size=256")
    return size


def input_chunks(x: Tensor | Split, batch_size: int | None = None) -> Iterator[Tensor]:
    """The inputs of ``x`` in file order, ``batch_size`` rows at a time (at least one chunk).

    Args:
        x: inputs ``(N, ...)`` or a :class:`~immunekit.data.task.Split` (read with its ``batches``).
        batch_size: rows per chunk (default :data:`EVAL_BATCH_SIZE`).

    Yields:
        ``(B, ...)`` slices of ``x`` (views) or the split's decoded rows; an empty ``x`` yields one
        empty chunk, so a model still sees the input shape.

    """
    size = eval_batch_size(batch_size)
    if isinstance(x, Tensor):
        for start in range(0, max(len(x), 1), size):
            yield x[start : start + size]
        return
    if len(x) == 0:
        yield x.rows(torch.zeros(0, dtype=torch.long))[0]
        return
    for xb, _ in x.batches(size):
        yield xb


def model_input(x: Tensor, model: nn.Module) -> Tensor:
    """``x`` on the device of the model's first parameter, floating inputs in its dtype (ids keep theirs)."""
    first = next(iter(model.parameters()))
    return x.to(first.device, first.dtype) if x.is_floating_point() else x.to(first.device)


@torch.no_grad()
def eval_predictions(model: nn.Module, x: Tensor | Split, *, batch_size: int | None = None) -> Tensor:
    """``model(x)`` in eval mode without autograd; the model's training flag is restored afterwards.

    The rows are forwarded in chunks of ``batch_size`` (:func:`input_chunks`), never the whole split
    at once; the predictions (``N`` × outputs, small) are concatenated. Floating inputs are cast to
    the dtype of the model's first parameter, and every chunk moved to its device (token ids keep
    their integer dtype).

    Args:
        model: the model.
        x: inputs ``(N, ...)``, or a split whose rows are read on demand.
        batch_size: rows per forward pass (default :data:`EVAL_BATCH_SIZE`).

    Returns:
        The predictions ``(N, outputs)``: equal to one pass over ``x`` up to float rounding, and
        bit for bit when ``N <= batch_size``.

    """
    was_training = model.training
    model.eval()
    try:
        preds = [model(model_input(xb, model)) for xb in input_chunks(x, batch_size)]
    finally:
        model.train(was_training)
    return preds[0] if len(preds) == 1 else torch.cat(preds)


@torch.no_grad()
def eval_features(model: ImmunizableModel, x: Tensor | Split, *, batch_size: int | None = None) -> Tensor:
    """Frozen features Φ(x) in float64, computed chunk by chunk in eval mode without autograd.

    Each chunk's features are converted to float64 before the next chunk is read, so memory holds
    the ``(N, D)`` float64 features plus one chunk's activations, never a forward pass over the
    whole split. The model's training flag is restored afterwards.

    Args:
        model: an :class:`~immunekit.models.base.ImmunizableModel` (its :meth:`features` are used).
        x: inputs ``(N, ...)`` or a split.
        batch_size: rows per forward pass (default :data:`EVAL_BATCH_SIZE`).

    Returns:
        ``(N, D)`` float64 features (on the model's device).

    Example:
        >>> from immunekit.models.base import linear_model
        >>> eval_features(linear_model(3), torch.ones(5, 3), batch_size=2).shape
        torch.Size([5, 3])

    """
    was_training = model.training
    model.eval()
    try:
        feats = [
            model.features(model_input(xb, model)).to(torch.float64) for xb in input_chunks(x, batch_size)
        ]
    finally:
        model.train(was_training)
    return feats[0] if len(feats) == 1 else torch.cat(feats)


def split_score(
    model: nn.Module, x: Tensor | Split, y: Tensor, loss: str, *, batch_size: int | None = None
) -> float:
    """Task score (R² for ``mse``, accuracy for ``ce``) of ``model`` on inputs ``x`` and targets ``y``.

    The one evaluation step of the attacks: :func:`eval_predictions` (chunks of ``batch_size`` rows)
    then :func:`~immunekit.metrics.task_scores.task_score`. ``x`` may be a split, read on demand
    (pass its ``y``). Non-finite values (a diverged attack) are returned as they are; callers that
    rank decide what they mean.

    Example:
        >>> from immunekit.models.base import linear_model
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> split_score(linear_model(3), x, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), "mse")
        -1.5

    """
    pred = eval_predictions(model, x, batch_size=batch_size)
    return task_score(pred, y.to(pred.device), loss)  # type: ignore[arg-type]
