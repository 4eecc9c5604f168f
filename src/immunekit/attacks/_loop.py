"""The explicit training loop shared by the torch fine-tuning attacks (finetune.py, lora.py).

One loop, written out rather than hidden in a trainer, so every budget dimension is accounted for
in one place:

* **optimizer** from the budget (:func:`make_rule`): the pure update rules of
  :mod:`immunekit.attacks.functional` with ``torch.optim``'s arithmetic (``gd`` is full-batch SGD;
  ``sgd``, ``sgd_momentum``, ``adam``, ``adamw``); ``gd_exact`` exists only for the linear probe.
* **drivers**: in place (the module's parameters, ``loss.backward()``) or functional (a
  ``{name: tensor}`` dict through ``torch.func.functional_call``, optionally keeping the graph for
  second-order use; ``theta=`` of :func:`run_loop`). Both share everything else here.
* **lr**: the lr of every step is computed explicitly (:func:`~immunekit.attacks.base.scheduled_lr`),
  passed to the update rule and recorded in :attr:`StepRecord.lr`.
* **mini-batches** without replacement: a fresh ``torch.randperm`` per epoch from the run's ``batches``
  stream (:func:`~immunekit.attacks.base.rng_streams`, never the generator of a head or a subset),
  consecutive slices of ``min(batch_size, N)`` rows; a tail shorter than a batch is dropped, so
  every step costs the same examples, tokens and FLOPs. A step reads only its rows, through the
  split's :meth:`~immunekit.data.task.Split.rows` (decoded on demand for a streaming split), and
  moves only them to the device; the targets (small) are prepared once per split.
* **full batch** (``gd``, or ``batch_size >= N``): a split of at most ``eval_batch_size`` rows
  (:data:`~immunekit.attacks.base.EVAL_BATCH_SIZE`) is read once and forwarded in one pass, as
  before; a larger one is forwarded chunk by chunk with the gradient accumulated, each chunk's
  mean loss weighted by its share of the rows, so the step is that of the mean loss over the whole
  split (up to float rounding; batch-norm statistics are then per chunk).
* **budget**: before each step the examples, tokens and FLOPs it would use are added to the totals;
  the first cap that would be exceeded stops the run and is named (``examples``, ``tokens``,
  ``flops``; ``steps`` when the step budget is used up). A cap is never exceeded.
* **FLOPs** are measured with :class:`torch.utils.flop_counter.FlopCounterMode` around the forward
  and backward pass of the first step of each phase; every step of a phase uses as many rows, so
  that count is the cost of each of its steps (kept as it is: ``info['flops_per_example']`` is
  derived from it, never multiplied back, so a cap of k steps' FLOPs allows exactly k steps). When the
  counter sees no FLOPs or fails, the fallback is 6 · (model parameters) · (examples) (forward 2P,
  backward 4P per example). The method goes into ``info['flops_method']``.
* **loss**: :class:`immunekit.metrics.losses.LossSpec` of ``task.loss``, shared with the defenses:
  ``mse`` → mean squared error; ``ce`` with one output → squared loss on 0/1 targets (the ℓ2
  threat model of arXiv 2505.23760, as the linear probe); ``ce`` with C ≥ 2 outputs →
  cross-entropy; ``lm`` → :class:`ConfigError` (language models come later).
* **records**: one :class:`StepRecord` per step; the loss is the mini-batch loss before the step
  (``loss_on="batch"``, the default: free) or that of the whole training split after it
  (``loss_on="split"``: a forward pass over the split per step, which dominated the harness
  overhead benchmark). The held-out split is evaluated at step 0, every ``eval_every`` steps and at the
  last step: ``eval = {"harm", "utility", "loss"}`` (task scores of
  :func:`immunekit.metrics.task_scores.task_score`; loss = training loss on the eval split).
  Every whole-split evaluation runs in eval mode in chunks of ``eval_batch_size`` rows
  (:func:`~immunekit.attacks.base.eval_predictions`); only the predictions (N × outputs) are kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from immunekit.attacks.base import (
    DEFAULT_LR,
    OPTIMIZERS,
    AttackBudget,
    StepRecord,
    eval_predictions,
    rng_streams,
    scheduled_lr,
    split_of,
    split_score,
)
from immunekit.attacks.base import eval_batch_size as eval_batch_size_of
from immunekit.attacks.functional import FunctionalOptimizer, Params
from immunekit.data.task import Dataset, Split, Task
from immunekit.errors import ConfigError, DataError
from immunekit.metrics.losses import LossSpec
from immunekit.metrics.task_scores import task_score

log = logging.getLogger(__name__)

TORCH_OPTIMIZERS: tuple[str, ...] = tuple(o for o in OPTIMIZERS if o != "gd_exact")
FLOPS_COUNTED = (
    "FlopCounterMode on the first step of each phase (forward + backward), extrapolated per example"
)
FLOPS_FALLBACK = "fallback: 6 · params · examples"


@dataclass(frozen=True)
class Phase:
    """A stretch of training on one split.

    Attributes:
        name: label recorded in ``info['phases']`` (e.g. ``benign``, ``attack``).
        split: the task split the data came from.
        data: rows trained on (may be a subset of the split, e.g. :func:`immunekit.data.task.take`).
        steps: steps planned for this phase.
        tokens: tokens per row for the budget when ``data`` no longer shows them (the probe's
            cached features of token rows); ``None``: read from ``data`` (:func:`tokens_per_example`).

    """

    name: str
    split: str
    data: Split
    steps: int
    tokens: int | None = None

    def tokens_per_example(self) -> int:
        """Tokens in one row of this phase (``tokens``, else :func:`tokens_per_example` of ``data``)."""
        return tokens_per_example(self.data) if self.tokens is None else self.tokens


@dataclass
class LoopOutput:
    """Records and facts of one run of :func:`run_loop`."""

    initial: StepRecord
    records: list[StepRecord]
    stopped_by: str
    info: dict[str, Any] = field(default_factory=dict)
    params: Params | None = None  # θ after the last step, from the functional driver (else None)


def check_optimizer(budget: AttackBudget, attack: str) -> None:
    """Raise a :class:`ConfigError` when the torch-loop ``attack`` cannot run the budget's optimizer."""
    if budget.optimizer not in TORCH_OPTIMIZERS:
        raise ConfigError(
            f"attack {attack!r} does not implement optimizer {budget.optimizer!r} (exact line search "
            f"exists only for 'linear_probe'); choose one of {list(TORCH_OPTIMIZERS)}"
        )


def make_rule(budget: AttackBudget, attack: str) -> FunctionalOptimizer:
    """The update rule of ``budget.optimizer`` (:mod:`immunekit.attacks.functional`; lr set per step).

    ``gd``/``sgd``: SGD; ``sgd_momentum``: SGD with ``budget.momentum``; ``adam``: Adam (β = (0.9,
    0.999), ε = 1e-8); ``adamw``: AdamW with ``budget.weight_decay`` (0 by default, not torch's 0.01).
    The arithmetic is ``torch.optim``'s, so the in-place loop gives its parameters bit for bit.

    Raises:
        ConfigError: ``gd_exact`` (linear probe only).

    """
    check_optimizer(budget, attack)
    return FunctionalOptimizer.from_budget(budget)


def tokens_per_example(data: Split) -> int:
    """Tokens in one row: the sequence length for integer ``(N, L)`` inputs (token ids), else 0.

    An in-memory split is read from its tensor; another one decodes its first row to see the dtype.
    """
    if isinstance(data, Dataset):
        x = data.x
        return int(x.shape[1]) if x.ndim == 2 and not x.is_floating_point() else 0
    if len(data.item_shape) != 1 or len(data) == 0:
        return 0
    first, _ = data.rows(torch.zeros(1, dtype=torch.long))
    return 0 if first.is_floating_point() else int(data.item_shape[0])


class _Sampler:
    """Epoch-wise shuffled mini-batches of a fixed size (a shorter tail is dropped)."""

    def __init__(self, n: int, batch: int, gen: torch.Generator | None) -> None:
        self.n, self.batch, self.gen = n, batch, gen
        self.order: Tensor | None = None
        self.pos = n

    def __next__(self) -> Tensor | None:
        if self.gen is None:  # full batch
            return None
        order = self.order
        if order is None or self.pos + self.batch > self.n:
            order = self.order = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx

    def __iter__(self) -> Iterator[Tensor | None]:
        return self


@dataclass
class _Data:
    """A split prepared for the loop: targets in the loss's form on the device, inputs read on demand.

    Only the targets (N or N × C values) are held whole; the inputs of a step are the split's
    :meth:`~immunekit.data.task.Split.rows` of that step, moved to the device and cast there.
    """

    split: Split
    target: Tensor
    raw_y: Tensor
    device: torch.device
    dtype: torch.dtype
    full: Tensor | None = None  # inputs of a full-batch phase that fits one chunk, read once

    def inputs(self, idx: Tensor) -> Tensor:
        """Inputs of rows ``idx`` (``(B,)`` long, CPU) on the device, floating ones in the model's dtype."""
        x, _ = self.split.rows(idx)
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def targets(self, idx: Tensor | None) -> Tensor:
        return self.target if idx is None else self.target.index_select(0, idx.to(self.device))

    def raw_rows(self, idx: Tensor | None) -> Tensor:
        # only classification records need the raw labels (batch accuracy): not selected every step
        return self.raw_y if idx is None else self.raw_y.index_select(0, idx.to(self.device))


def prepare(spec: LossSpec, data: Split, device: torch.device, name: str) -> _Data:
    """Training targets of ``data`` on ``device``, checked against the head width; inputs stay unread."""
    target, labels = spec.targets(data.y.to(device), name)
    return _Data(data, target, labels, device, spec.dtype)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (all of them: the 6·P·examples fallback counts the full forward)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def trainable_only(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Let only ``params`` require grad inside the block; restore every flag afterwards."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _InPlace:
    """Driver that trains the module's own parameters: ``loss.backward()``, then the rule in place."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], rule: FunctionalOptimizer) -> None:
        self.model, self.rule = model, rule
        self.params = {str(i): p for i, p in enumerate(params)}
        self.state = rule.init(self.params)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def grads(self) -> dict[str, Tensor | None]:
        return {k: p.grad for k, p in self.params.items()}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def step(self, lr: float) -> None:
        with torch.no_grad():
            new, self.state = self.rule.update(self.params, self.state, self.grads(), lr)
            for k, p in self.params.items():
                if new[k] is not p:
                    p.copy_(new[k])


class _Functional:
    """Driver that trains a ``Params`` dict θ through ``torch.func.functional_call``.

    The module (the attack's copy) holds a detached copy of θ after every step, so evaluations and
    records read the same numbers as the in-place driver; with ``create_graph`` each θ_k stays a
    differentiable function of θ₀.
    """

    def __init__(
        self,
        model: nn.Module,
        theta: Mapping[str, Tensor],
        rule: FunctionalOptimizer,
        create_graph: bool,
    ) -> None:
        self.model, self.rule, self.create_graph = model, rule, create_graph
        own = {id(p) for p in model.parameters()}  # the copy's tensors: _sync writes into them
        self.theta = {k: _start(v, create_graph and id(v) not in own) for k, v in theta.items()}
        self.state = rule.init(self.theta)
        self.acc: dict[str, Tensor | None] = dict.fromkeys(self.theta)
        self._sync()

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self.theta, (x,), strict=False)

    def backward(self, loss: Tensor) -> None:
        names = list(self.theta)
        got = torch.autograd.grad(
            loss, [self.theta[k] for k in names], create_graph=self.create_graph, allow_unused=True
        )
        for k, g in zip(names, got, strict=True):
            if g is not None:
                have = self.acc[k]
                self.acc[k] = g if have is None else have + g

    def grads(self) -> dict[str, Tensor | None]:
        return self.acc

    def zero_grad(self) -> None:
        self.acc = dict.fromkeys(self.theta)

    def step(self, lr: float) -> None:
        if self.create_graph:
            self.theta, self.state = self.rule.update(self.theta, self.state, self.acc, lr)
        else:
            with torch.no_grad():
                new, self.state = self.rule.update(self.theta, self.state, self.acc, lr)
            self.theta = {k: v.detach().requires_grad_(True) for k, v in new.items()}
        self._sync()

    def _sync(self) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in self.theta.items():
                named[k].copy_(v)


def _start(value: Tensor, keep_link: bool) -> Tensor:
    if keep_link and value.requires_grad:
        return value  # keep the link to whatever θ₀ came from
    return value.detach().clone().requires_grad_(True)


Driver = _InPlace | _Functional


class _Run:
    """State of one run of the loop (kept in an object so each piece stays short)."""

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        task: Task[Split],
        budget: AttackBudget,
        *,
        eval_split: str,
        gen: torch.Generator,
        loss_on: str,
        attack: str,
        chunk: int,
        theta: Mapping[str, Tensor] | None = None,
        create_graph: bool = False,
    ) -> None:
        first = next(iter(model.parameters()))
        self.device, dtype = first.device, first.dtype
        self.model, self.params, self.task, self.b, self.gen = model, params, task, budget, gen
        self.loss_on, self.chunk = loss_on, chunk
        held = split_of(task, eval_split)
        probe_x, _ = held.rows(torch.arange(min(1, len(held))))
        try:  # in eval mode: one row through a batch-norm layer must neither fail nor move its statistics
            outputs = int(eval_predictions(model, probe_x).shape[-1])
        except (RuntimeError, IndexError) as exc:
            raise DataError(
                f"{type(model).__name__} cannot take the inputs of task {task.name!r} (rows of shape "
                f"{tuple(held.item_shape)}): {exc}; attack a model built for this task"
            ) from exc
        self.spec = LossSpec(task.loss, outputs, dtype)
        self.held = prepare(self.spec, held, self.device, eval_split)
        self.util = prepare(self.spec, split_of(task, "eval_primary"), self.device, "eval_primary")
        self.base_lr = budget.lr if budget.lr is not None else DEFAULT_LR
        rule = make_rule(budget, attack)
        self.driver: Driver = (
            _InPlace(model, params, rule) if theta is None else _Functional(model, theta, rule, create_graph)
        )
        self.t0 = time.perf_counter()
        self.examples, self.tokens, self.flops = 0, 0, 0.0
        self.methods: set[str] = set()
        # FLOPs of one step of each phase (a phase's steps all use the same number of rows), kept
        # per step rather than per example: (c / n) · n need not round back to c, and a cap equal to
        # k steps' cost must allow exactly k steps
        self.fps: dict[int, float] = {}
        self.rows: dict[int, int] = {}

    def evaluate(self) -> dict[str, float]:
        """Held-out ``{"harm", "utility", "loss"}`` in eval mode (the shared evaluation step of base.py)."""
        loss = self.task.loss
        pred = eval_predictions(self.model, self.held.split, batch_size=self.chunk)
        return {
            "harm": task_score(pred, self.held.raw_y, loss),  # type: ignore[arg-type]
            "utility": split_score(self.model, self.util.split, self.util.raw_y, loss, batch_size=self.chunk),
            "loss": float(self.spec(pred, self.held.target)),
        }

    def split_metrics(self, data: _Data) -> tuple[float, float | None]:
        pred = eval_predictions(self.model, data.split, batch_size=self.chunk)  # no autograd graph
        loss = float(self.spec(pred, data.target))
        acc = None if self.task.loss == "mse" else task_score(pred, data.raw_y, "ce")
        return loss, acc

    def record(
        self,
        step: int,
        lr: float,
        gnorm: float,
        data: _Data,
        batch_metrics: tuple[float, float | None] | None,
    ) -> StepRecord:
        loss, acc = batch_metrics if batch_metrics is not None else self.split_metrics(data)
        rec = StepRecord(
            step, self.examples, self.flops, lr, loss, gnorm, time.perf_counter() - self.t0, None, acc
        )
        rec.tokens = self.tokens
        if self.b.evaluates(step):
            rec.eval = self.evaluate()
        return rec

    def over(self, n: int, tok: int, flops: float | None) -> str | None:
        b = self.b
        if b.max_examples is not None and self.examples + n > b.max_examples:
            return "examples"
        if b.max_tokens is not None and self.tokens + tok > b.max_tokens:
            return "tokens"
        if flops is not None and b.max_flops is not None and self.flops + flops > b.max_flops:
            return "flops"
        return None

    def forward_backward(self, data: _Data, idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """Forward + backward of the rows ``idx`` (``None``: the whole split); returns (loss, predictions).

        A whole split larger than one chunk is forwarded chunk by chunk: chunk k of n_k rows adds
        (n_k / N) · (its mean loss) to the loss and to the gradient, so the sum is the mean loss over
        all N rows. The predictions returned then are detached (they only feed the records).
        """
        if idx is not None or data.full is not None:
            xb = data.inputs(idx) if idx is not None else data.full
            assert xb is not None  # the branch condition
            pred = self.driver.forward(xb)
            loss = self.spec(pred, data.targets(idx))
            self.driver.backward(loss)
            return loss, pred
        n = len(data.split)
        total = torch.zeros((), dtype=data.dtype, device=self.device)
        preds: list[Tensor] = []
        for start in range(0, n, self.chunk):
            rows = torch.arange(start, min(start + self.chunk, n))
            pred = self.driver.forward(data.inputs(rows))
            part = self.spec(pred, data.targets(rows)) * (len(rows) / n)
            self.driver.backward(part)
            total = total + part.detach()
            preds.append(pred.detach())
        return total, torch.cat(preds)

    def backward(self, phase_idx: int, data: _Data, idx: Tensor | None) -> tuple[Tensor, Tensor, float]:
        """Forward + backward of one step's rows; returns (loss, predictions, FLOPs of the pass)."""
        n = len(data.split) if idx is None else len(idx)
        if phase_idx in self.fps:
            loss, pred = self.forward_backward(data, idx)
            return loss, pred, self.fps[phase_idx]
        counted = 0.0
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                loss, pred = self.forward_backward(data, idx)
            counted = float(counter.get_total_flops())
        except Exception as exc:  # the counter is a measurement aid: never let it break an attack
            log.debug("FlopCounterMode failed (%s); using the 6·P·examples fallback", exc)
            self.driver.zero_grad()
            loss, pred = self.forward_backward(data, idx)
        if counted > 0:
            self.methods.add(FLOPS_COUNTED)
            self.fps[phase_idx] = counted
        else:
            self.methods.add(FLOPS_FALLBACK)
            self.fps[phase_idx] = float(6 * count_params(self.model) * n)
        self.rows[phase_idx] = n
        return loss, pred, self.fps[phase_idx]

    def grad_norm(self) -> float:
        grads = [g.detach() for g in self.driver.grads().values() if g is not None]
        if not grads:
            return 0.0
        # one norm per tensor, then one host sync: this runs every step
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def run(self, phases: list[Phase]) -> LoopOutput:
        prepared = [prepare(self.spec, p.data, self.device, p.split) for p in phases]
        phase_info = []
        self.model.train()
        start = next((i for i, p in enumerate(phases) if p.steps > 0), 0)  # first phase that trains
        initial = self.record(0, 0.0, float("nan"), prepared[start], None)
        records: list[StepRecord] = []
        stopped, step = "steps", 0
        for i, (phase, data) in enumerate(zip(phases, prepared, strict=True)):
            n = len(phase.data)
            full = self.b.optimizer == "gd" or self.b.batch_size >= n
            per = n if full else self.b.batch_size
            sampler = _Sampler(n, per, None if full else self.gen)
            if full and n <= self.chunk and phase.steps > 0:  # one batch: read it once for every step
                data.full = data.inputs(torch.arange(n))
            tok = per * phase.tokens_per_example()
            first = step + 1
            for _ in range(phase.steps):
                idx = next(sampler)
                stop = self.over(per, tok, self.fps.get(i))
                if stop is None:
                    self.driver.zero_grad()
                    loss, pred, cost = self.backward(i, data, idx)
                    stop = self.over(per, tok, cost)
                if stop is not None:
                    self.driver.zero_grad()
                    stopped = stop
                    break
                step += 1
                lr = scheduled_lr(self.base_lr, step, self.b)
                gnorm = self.grad_norm()
                batch_metrics = None
                if self.loss_on == "batch":
                    acc = None
                    if self.task.loss != "mse":
                        acc = task_score(pred.detach(), data.raw_rows(idx), "ce")
                    batch_metrics = (float(loss.detach()), acc)
                self.driver.step(lr)
                self.examples, self.tokens, self.flops = (
                    self.examples + per,
                    self.tokens + tok,
                    self.flops + cost,
                )
                records.append(self.record(step, lr, gnorm, data, batch_metrics))
            data.full = None  # the phase is over: let its inputs go
            phase_info.append(
                {"name": phase.name, "split": phase.split, "rows": n, "first_step": first, "last_step": step}
            )
            if stopped != "steps":
                break
        self.driver.zero_grad()
        if records and records[-1].eval is None:
            records[-1].eval = self.evaluate()
        info = {
            "optimizer": self.b.optimizer,
            "lr": self.base_lr,
            "schedule": self.b.schedule,
            "warmup_steps": self.b.warmup_steps,
            "loss": self.spec.describe(),
            "loss_on": self.loss_on,
            "flops_method": "; ".join(sorted(self.methods)) or FLOPS_COUNTED,
            "flops_per_example": [
                self.fps[i] / self.rows[i] if i in self.fps else None for i in range(len(phases))
            ],
            "trainable_params": sum(p.numel() for p in self.params),
            "phases": phase_info,
        }
        theta = self.driver.theta if isinstance(self.driver, _Functional) else None
        return LoopOutput(initial, records, stopped, info, theta)


def run_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    task: Task[Split],
    budget: AttackBudget,
    *,
    phases: list[Phase],
    eval_split: str,
    seed: int,
    attack: str,
    loss_on: str = "batch",
    eval_batch_size: int | None = None,
    theta: Mapping[str, Tensor] | None = None,
    create_graph: bool = False,
) -> LoopOutput:
    """Train ``params`` of ``model`` (in place: pass a copy) through ``phases`` within ``budget``.

    Args:
        model: the model to train in place (the attack's copy); its output has one column per target
            (``mse``), one column (binary ``ce``, squared loss on 0/1) or C ≥ 2 columns (``ce``).
        params: the parameters that move; every other parameter is frozen during the run and its
            ``requires_grad`` flag restored afterwards.
        task: provides the loss and the held-out splits.
        budget: steps, caps and optimizer settings; ``sum(phase.steps)`` should equal ``budget.steps``.
        phases: training stretches in order (one for most attacks; relearn has two).
        eval_split: held-out split of ``harm`` (``utility`` is always ``eval_primary``).
        seed: the attack run's seed; the mini-batch order comes from its ``batches`` stream
            (:func:`~immunekit.attacks.base.rng_streams`), independent of the attack's other draws.
        attack: the attack's name, for messages.
        loss_on: ``split`` (loss of the whole training split after each step) or ``batch``.
        eval_batch_size: rows per forward pass of a whole-split evaluation and of a full-batch step
            over a larger split (default :data:`~immunekit.attacks.base.EVAL_BATCH_SIZE`); independent
            of the budget, it changes no record beyond float rounding.
        theta: ``None`` trains ``params`` in place (``loss.backward()``, then the update rule). A
            ``{name: tensor}`` dict of θ₀ for the parameters named so in ``model`` selects the
            functional driver: θ moves through ``torch.func.functional_call`` and the same rule, the
            module holds a detached copy of θ after each step (for the evaluations), and the final θ
            is returned in :attr:`LoopOutput.params`. Same batches, records and parameters as in place.
        create_graph: with ``theta``: keep the autograd graph through every step, so the returned θ
            is a differentiable function of θ₀ (second order; memory grows with the steps).

    Returns:
        :class:`LoopOutput` with the initial record, one record per step, the stopping dimension
        and ``info`` (optimizer, lr, schedule, loss, flops_method, flops_per_example, phases).

    Raises:
        ConfigError: unsupported optimizer (``gd_exact``) or loss (``lm``), no trainable parameter.
        DataError: the model's outputs do not fit the task's targets.

    """
    check_optimizer(budget, attack)
    if not params:
        raise ConfigError(f"attack {attack!r} found no parameter to train in {type(model).__name__}")
    if loss_on not in ("split", "batch"):
        raise ConfigError(f"loss_on must be 'split' or 'batch', got {loss_on!r}")
    rows = len(phases[-1].data)
    log.info("%s (%s, %s lr): %s", attack, budget.optimizer, budget.schedule, budget.describe(rows))
    if budget.max_tokens is not None and not any(p.tokens_per_example() for p in phases):
        log.warning("budget.max_tokens is set but the inputs are not token sequences: it cannot bind")
    chunk = eval_batch_size_of(eval_batch_size)
    (gen,) = rng_streams(seed, "batches")
    with trainable_only(model, params):
        run = _Run(
            model,
            params,
            task,
            budget,
            eval_split=eval_split,
            gen=gen,
            loss_on=loss_on,
            attack=attack,
            chunk=chunk,
            theta=theta,
            create_graph=create_graph,
        )
        was = model.training
        try:
            return run.run(phases)
        finally:
            model.train(was)
