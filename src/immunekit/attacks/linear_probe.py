"""Linear probing: fit a fresh linear head on frozen features under a budget.

The attacker's loss is the sum of squares f(w) = ‖A w − Y‖²_F with A = Φ(X) the frozen features
(the ℓ2 threat model of arXiv 2505.23760); for classification Y holds 0/1 targets (one column
for two classes, one-hot otherwise). The GD limit is w* = A⁺Y + (I − A⁺A) w_0, and every step
records ‖w_t − w*‖²_F / ‖w_0 − w*‖²_F, whose decay rate is governed by κ(AᵀA).

w* comes from one QR of A and an SVD of its R (:class:`immunekit.spectral.lstsq.MinNormLstsq`),
which also gives κ(AᵀA) and the core R with A = QR: the full-batch optimizers compute the same
iterates from R (AᵀA = RᵀR, Aᵀ(Aw − Y) = Rᵀ(Rw − QᵀY), ‖Ag‖ = ‖Rg‖) at O(D²C) per step instead of
O(NDC). FLOPs are still counted for the attacker's algorithm on A (the budget's meaning), not
for this simulation of it. :class:`ProbeCache` shares features and factorizations between probes
(and closed-form evaluations) of the same extractor on the same split. Features are computed in
chunks of :data:`~immunekit.attacks.base.EVAL_BATCH_SIZE` rows in eval mode (:func:`split_features`),
so a deep extractor never forwards a whole split at once; only the float64 features are kept.

Learning rates are in one unit for every optimizer (:attr:`AttackBudget.lr`): η multiplies the
gradient of the mean loss over the step's B rows, ∇ (1/B)‖A_B w − Y_B‖²_F = (2/B) A_Bᵀ(A_B w − Y_B)
(B = N for the full-batch optimizers), as ``torch.optim`` on a mean-reduced loss; the recorded
``lr`` and ``grad_norm`` are those of that mean loss.

Optimizers:
    * ``gd_exact``: g = 2Aᵀ(Aw − Y), α = ‖g‖²/(2‖Ag‖²), w ← w − αg (Eq. 16 / Fig. 1 protocol); the
      recorded step is N·α, the same step expressed on the mean-loss gradient g/N.
    * ``gd``: w ← w − η·(2/N)Aᵀ(Aw − Y); default η = 1/L with L = λ_max(2AᵀA/N) = 2‖A‖₂²/N, the
      smoothness constant of the mean loss (the same iterates as the step 1/λ_max(2AᵀA) on the
      summed loss ‖Aw − Y‖²_F).
    * ``sgd`` / ``sgd_momentum`` / ``adam`` / ``adamw``: mini-batches of ``budget.batch_size`` on the mean
      squared error, with the update rules of ``torch.optim`` (SGD without dampening; Adam β = (0.9,
      0.999), ε = 1e-8; AdamW's decoupled decay w ← w(1 − η·λ) before the Adam step).

FLOPs: 2·B·D·C per product with B rows (a step of a mini-batch optimizer is two products, ``gd`` two
on all N rows, ``gd_exact`` three), computed in integers so that a cap of k steps' FLOPs allows
exactly k steps. Randomness: w_0 (``init="normal"``) comes from the run's ``init`` stream and the
mini-batch rows from its ``batches`` stream (:func:`~immunekit.attacks.base.rng_streams`), so the
batch order does not depend on the initialisation.

Every optimizer but ``gd_exact`` follows ``budget.schedule``/``warmup_steps``
(:func:`~immunekit.attacks.base.scheduled_lr`). Harm curve: the held-out split is evaluated at step
0, every ``eval_every`` steps and at the last step, ``eval = {"harm", "utility", "loss"}`` with the
task scores of :func:`immunekit.metrics.task_scores.task_score` (harm on the eval split, utility on
``eval_primary``) and the held-out mean squared error.
"""

from __future__ import annotations

import copy
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from immunekit.attacks.base import (
    Attack,
    AttackBudget,
    AttackResult,
    StepRecord,
    default_eval_split,
    eval_features,
    rng_streams,
    scheduled_lr,
    split_of,
)
from immunekit.config import load_config
from immunekit.data.task import Dataset, Split, Task
from immunekit.errors import ConfigError, DataError
from immunekit.metrics.task_scores import task_score
from immunekit.models.base import ImmunizableModel, LinearModel
from immunekit.spectral.lstsq import MinNormLstsq

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LinearProbeConfig:
    """Settings of a linear-probe attack."""

    split: Literal["attack", "primary", "attack_disjoint", "attack_cross", "val_harmful"] = field(
        default="attack", metadata={"help": "split the probe is fitted on (attack = harmful data)"}
    )
    eval_split: Literal["eval_harmful", "eval_primary", "val_harmful"] | None = field(
        default=None, metadata={"help": "held-out split for evaluations (default: matches split)"}
    )
    init: Literal["zeros", "normal"] = field(default="zeros", metadata={"help": "w_0 (normal: N(0, 1/D))"})
    rtol: float | None = field(default=None, metadata={"help": "rank threshold of the pseudo-inverse for w*"})
    record_accuracy: bool = field(
        default=True,
        metadata={
            "help": "record the attacker-split accuracy at every step (classification); costs an N×D "
            "product per step, without it the loss comes from the D×D factor"
        },
    )


@dataclass(frozen=True, eq=False)
class ProbeProblem:
    """The attacker's least-squares problem on frozen features.

    Attributes:
        a: ``(N, D)`` features.
        y: ``(N, C)`` targets.
        classes: number of classes (0 for regression).
        eval_a: ``(M, D)`` held-out features.
        eval_y: ``(M, C)`` held-out targets.
        util_a: ``(K, D)`` features of ``eval_primary`` (the utility beside harm).
        util_y: ``(K, C)`` regression targets or ``(K,)`` class labels of ``eval_primary``.
        loss: the task loss (``mse``/``ce``), for the task scores.

    """

    a: Tensor
    y: Tensor
    classes: int
    eval_a: Tensor
    eval_y: Tensor
    util_a: Tensor | None = None
    util_y: Tensor | None = None
    loss: str = "mse"
    _factors: dict[float | None, MinNormLstsq] = field(default_factory=dict, repr=False)

    def factor(self, rtol: float | None = None) -> MinNormLstsq:
        """The least-squares factorization of ``a`` with rank threshold ``rtol`` (computed once per rtol)."""
        if rtol not in self._factors:
            self._factors[rtol] = MinNormLstsq.of(self.a, rtol=rtol)
        return self._factors[rtol]


def targets(data: Split, loss: str, classes: int) -> Tensor:
    """Probe targets ``(N, C)``: the regression targets, or 0/1 (one column if binary, else one-hot)."""
    if loss == "mse":
        return data.y.to(torch.float64).reshape(len(data), -1)
    y = data.y.long().reshape(-1)
    if classes <= 2:
        return y.to(torch.float64)[:, None]
    return torch.nn.functional.one_hot(y, classes).to(torch.float64)


@torch.no_grad()
def split_features(model: ImmunizableModel, data: Split, *, batch_size: int | None = None) -> Tensor:
    """Frozen float64 features ``(N, D)`` of a split, as the probes use them.

    In chunks of ``batch_size`` rows (:data:`~immunekit.attacks.base.EVAL_BATCH_SIZE` by default), in
    eval mode (:func:`~immunekit.attacks.base.eval_features`): a deep extractor never sees the whole
    split at once. A :class:`LinearModel` on an in-memory :class:`Dataset` is the exception: its
    features are one product with data already in memory (no activations to hold), computed in one
    pass as before, so the linear numbers stay bit for bit those of the closed-form theory's tests
    whatever the split size and the BLAS blocking.

    Args:
        model: the model whose ``features`` are probed.
        data: the split.
        batch_size: rows per forward pass.

    Returns:
        ``(N, D)`` float64.

    """
    if isinstance(model, LinearModel) and isinstance(data, Dataset):
        dtype = next(model.parameters()).dtype
        return model.features(data.x.to(dtype)).to(torch.float64)
    return eval_features(model, data, batch_size=batch_size)


@torch.no_grad()
def probe_problem(
    model: ImmunizableModel, task: Task[Split], split: str, eval_split: str, *, batch_size: int | None = None
) -> ProbeProblem:
    """Frozen features and targets of ``split`` and ``eval_split`` (float64).

    Features come from :func:`split_features` (chunks of ``batch_size`` rows, eval mode); only the
    float64 features of the training split, the eval split and ``eval_primary`` are kept.
    """
    if isinstance(model, LinearModel) and model.extractor.in_features != task.input_dim:
        raise DataError(
            f"the model takes {model.extractor.in_features} inputs but task {task.name!r} has "
            f"{task.input_dim} features; attack a model built for this task"
        )
    train, held = split_of(task, split), split_of(task, eval_split)
    classes = task.classes
    util = split_of(task, "eval_primary")
    feats = [split_features(model, d, batch_size=batch_size) for d in (train, held)]
    util_a = feats[1] if eval_split == "eval_primary" else split_features(model, util, batch_size=batch_size)
    util_y = util.y.to(torch.float64).reshape(len(util), -1) if task.loss == "mse" else util.y.reshape(-1)
    return ProbeProblem(
        feats[0],
        targets(train, task.loss, classes),
        classes,
        feats[1],
        targets(held, task.loss, classes),
        util_a,
        util_y,
        task.loss,
    )


def least_squares(a: Tensor, y: Tensor, w0: Tensor, *, rtol: float | None = None) -> Tensor:
    """GD limit w* = A⁺Y + (I − A⁺A) w_0 with a relative-threshold pseudo-inverse.

    Computed as w_0 + R⁺(QᵀY − R w_0) from a QR of A and an SVD of R (backward stable, the
    minimum-norm solution for w_0 = 0; :class:`immunekit.spectral.lstsq.MinNormLstsq`), without
    forming A⁺.

    Args:
        a: ``(N, D)``.
        y: ``(N, C)``.
        w0: ``(D, C)`` starting head.
        rtol: singular values ≤ ``rtol · s_max`` are dropped (default ``max(N, D) · eps``).

    Returns:
        ``(D, C)``.

    """
    return MinNormLstsq.of(a, rtol=rtol).gd_limit(y, w0)


class ProbeCache:
    """Frozen features and their factorizations, shared by probes of the same extractor and split.

    An entry is made per (model, task, split, eval split). A later model matches it when it has the
    same class, training flag and a bit-for-bit equal state outside its head (a snapshot taken with
    the entry), so two model objects with the same θ share an entry, and a model changed in place
    does not; the task must be the very same, live object (entries refer to it weakly, so a cache
    never keeps a task alive and never mistakes a new task for a freed one; tasks are immutable by
    contract). The :class:`ProbeProblem` of an entry keeps its least-squares factorization, so every
    probe of that problem reuses one solve.

    Args:
        fallback: a cache consulted (never written) on a miss, e.g. one for a reference model that
            outlives this one.
        max_entries: entries kept, oldest dropped first.

    Example:
        >>> from immunekit.data.synthetic import gaussian_spectra
        >>> from immunekit.models.base import linear_model
        >>> task, cache = gaussian_spectra(dim=4, n=32, seed=0), ProbeCache()
        >>> p1 = cache.problem(linear_model(4), task, "attack", "eval_harmful")
        >>> p1 is cache.problem(linear_model(4), task, "attack", "eval_harmful")
        True

    """

    def __init__(self, fallback: ProbeCache | None = None, *, max_entries: int = 8) -> None:
        if max_entries < 1:
            raise ConfigError(f"max_entries must be >= 1, got {max_entries}")
        self.fallback = fallback
        self.max_entries = max_entries
        self._entries: list[
            tuple[weakref.ref[Task[Split]], str, str, tuple[type, bool], dict[str, Tensor], ProbeProblem]
        ] = []

    def problem(
        self, model: ImmunizableModel, task: Task[Split], split: str, eval_split: str
    ) -> ProbeProblem:
        """:func:`probe_problem` of (model, task, split, eval_split), computed once."""
        found = self.lookup(model, task, split, eval_split)
        if found is not None:
            return found
        prob = probe_problem(model, task, split, eval_split)
        kind = (type(model), model.training)
        self._entries = [entry for entry in self._entries if entry[0]() is not None]  # tasks freed
        self._entries.append((weakref.ref(task), split, eval_split, kind, _state(model, clone=True), prob))
        del self._entries[: -self.max_entries]
        return prob

    def lookup(
        self, model: ImmunizableModel, task: Task[Split], split: str, eval_split: str
    ) -> ProbeProblem | None:
        """The cached problem (here or in the fallback), or None."""
        state = None
        kind = (type(model), model.training)
        for t, s, e, k, snap, prob in self._entries:
            if t() is task and s == split and e == eval_split and k == kind:
                state = _state(model, clone=False) if state is None else state
                if _same_state(snap, state):
                    return prob
        return None if self.fallback is None else self.fallback.lookup(model, task, split, eval_split)

    def __len__(self) -> int:
        return len(self._entries)


def _state(model: ImmunizableModel, *, clone: bool) -> dict[str, Tensor]:
    """Everything that can change the features: parameters and buffers outside the head."""
    out = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("head.")}
    return {k: v.clone() for k, v in out.items()} if clone else out


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def accuracy(pred: Tensor, y: Tensor) -> float:
    """Accuracy of 0/1 (one column, threshold ½) or one-hot (argmax) targets."""
    if y.shape[1] == 1:
        return float(((pred > 0.5) == (y > 0.5)).to(torch.float64).mean())
    return float((pred.argmax(1) == y.argmax(1)).to(torch.float64).mean())


class LinearProbe(Attack):
    """Fit a new linear head on frozen features; the extractor is never touched.

    Args:
        config: :class:`LinearProbeConfig` (or keyword overrides).

    """

    name = "linear_probe"
    Config = LinearProbeConfig

    def __init__(self, config: LinearProbeConfig | None = None, **overrides: object) -> None:
        base = {} if config is None else {k: getattr(config, k) for k in config.__dataclass_fields__}
        self.config = load_config(LinearProbeConfig, {**base, **overrides}, where="attack")

    def __call__(
        self,
        model: ImmunizableModel,
        task: Task[Split],
        budget: AttackBudget,
        *,
        seed: int,
        cache: ProbeCache | None = None,
    ) -> AttackResult:
        """Probe a copy of ``model``; see the module docstring for the optimizers.

        ``cache`` shares the features and the least-squares factorization with other probes of the
        same extractor and split (the result is the same with or without it).
        """
        cfg = self.config
        prob = self.problem(model, task, cache)
        init, batches = rng_streams(seed, "init", "batches")
        n, d = prob.a.shape
        c = prob.y.shape[1]
        w0 = torch.zeros(d, c, dtype=torch.float64)
        if cfg.init == "normal":
            w0 = torch.randn(d, c, generator=init, dtype=torch.float64) / d**0.5
        factor = prob.factor(cfg.rtol)
        run = _ProbeRun(prob, budget, w0, factor, batches, record_accuracy=cfg.record_accuracy)
        log.info("linear probe (%s) on %s, D=%d: %s", budget.optimizer, cfg.split, d, budget.describe(n))
        records, stopped = run.execute()
        attacked = copy.deepcopy(model)
        attacked.head = _head_from(run.w, attacked)
        info = {
            "split": cfg.split,
            "eval_split": self.eval_split,
            "optimizer": budget.optimizer,
            "lr": run.base_lr,
            "flops_method": "analytic: 2·N·D·C per product (forward + gradient)",
            "kappa_probe_hessian": factor.gram_kappa().to_dict(),
            "w_star_loss": float(((prob.a @ run.w_star - prob.y) ** 2).mean()),
            "initial_distance_sq": run.d0,
        }
        return AttackResult(attacked, run.initial, records, stopped, info)

    @property
    def eval_split(self) -> str:
        """The configured eval split, or the default for the training split."""
        return self.config.eval_split or default_eval_split(self.config.split)

    def problem(
        self, model: ImmunizableModel, task: Task[Split], cache: ProbeCache | None = None
    ) -> ProbeProblem:
        """The configured split's :class:`ProbeProblem` (through ``cache`` when given)."""
        cfg = self.config
        eval_split = self.eval_split
        if cache is None:
            return probe_problem(model, task, cfg.split, eval_split)
        return cache.problem(model, task, cfg.split, eval_split)


def _head_from(w: Tensor, model: ImmunizableModel) -> nn.Linear:
    dtype = next(model.parameters()).dtype
    head = nn.Linear(w.shape[0], w.shape[1], bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(w.T.to(dtype))
    return head


class _ProbeRun:
    """One probing run: state, step rule and records (kept apart so each piece stays short).

    Full-batch steps use the factorization A = Q T (T = R, ``(D, D)``, for N ≥ D; T = A otherwise):
    with c = QᵀY, the gradient 2Aᵀ(Aw − Y) = 2Tᵀ(Tw − c) and ‖Ag‖ = ‖Tg‖, exact in algebra. The
    recorded loss is ‖Aw − Y‖²/(NC) from the predictions when they are needed anyway (per-step
    accuracy), else (‖Tw − c‖² + ‖(I − QQᵀ)Y‖²)/(NC), equal in algebra and free of cancellation.
    """

    def __init__(
        self,
        prob: ProbeProblem,
        budget: AttackBudget,
        w0: Tensor,
        factor: MinNormLstsq,
        gen: torch.Generator,
        *,
        record_accuracy: bool = True,
    ):
        self.p, self.b, self.gen = prob, budget, gen
        self.factor = factor
        self.w = w0.clone()
        self.c, unreachable = factor.project(prob.y)
        self.w_star = factor.gd_limit(prob.y, w0, qtb=self.c)
        self.d0 = float(((w0 - self.w_star) ** 2).sum())
        self.core = factor.core
        self.unreachable = float(unreachable.sum())
        self.predict = bool(prob.classes) and record_accuracy  # predictions needed for the accuracy
        n, d = prob.a.shape
        self.n, self.dc = n, d * prob.y.shape[1]
        self.flops_per_product = self.product_flops(n)
        self.base_lr = self._default_lr()
        # Adam moments (β1 = 0.9, β2 = 0.999, ε = 1e-8, as torch.optim.Adam), written out so the
        # probe stays a plain tensor loop without autograd.
        self.m = torch.zeros_like(w0)
        self.v = torch.zeros_like(w0)
        self.t = 0
        self.t0 = time.perf_counter()
        self.initial = self._record(0, 0, 0.0, 0.0, float("nan"))

    def product_flops(self, rows: int) -> float:
        """FLOPs of one product of ``rows`` feature rows with the head: 2·rows·D·C, exact (integers)."""
        return float(2 * rows * self.dc)

    def _default_lr(self) -> float:
        if self.b.lr is not None:
            return float(self.b.lr)
        if self.b.optimizer == "gd":
            lam = self.factor.sigma_max**2  # ‖A‖₂², from the SVD of T
            # 1/L for the mean loss (1/N)‖Aw − Y‖², L = 2‖A‖₂²/N: the step 1/(2‖A‖₂²) on the summed loss
            return self.n / (2.0 * lam) if lam > 0 else 1.0
        return 0.0 if self.b.optimizer == "gd_exact" else 1e-3

    def _record(self, step: int, examples: int, flops: float, lr: float, gnorm: float) -> StepRecord:
        ratio = float(((self.w - self.w_star) ** 2).sum()) / self.d0 if self.d0 > 0 else 0.0
        acc = None
        if self.predict:
            pred = self.p.a @ self.w
            loss = float(((pred - self.p.y) ** 2).mean())
            acc = accuracy(pred, self.p.y)
        else:
            loss = (float(((self.core @ self.w - self.c) ** 2).sum()) + self.unreachable) / self.p.y.numel()
        rec = StepRecord(
            step,
            examples,
            flops,
            lr,
            loss,
            gnorm,
            time.perf_counter() - self.t0,
            ratio,
            acc,
        )
        if self.b.evaluates(step):
            rec.eval = self.evaluate()
        return rec

    def evaluate(self) -> dict[str, float]:
        """Held-out ``{"harm", "utility", "loss"}`` of the current head (harm-curve convention)."""
        ev = self.p.eval_a @ self.w
        out = {"harm": task_score(ev, self.p.eval_y, self.p.loss)}  # type: ignore[arg-type]
        if self.p.util_a is not None and self.p.util_y is not None:
            out["utility"] = task_score(self.p.util_a @ self.w, self.p.util_y, self.p.loss)  # type: ignore[arg-type]
        out["loss"] = float(((ev - self.p.eval_y) ** 2).mean())
        return out

    def execute(self) -> tuple[list[StepRecord], str]:
        records: list[StepRecord] = []
        examples, flops = 0, 0.0
        stopped = "steps"
        for step in range(1, self.b.steps + 1):
            stop = self._over_budget(examples, flops)
            if stop:
                stopped = stop
                break
            lr, gnorm, used, cost = self._step(step)
            if lr is None:
                stopped = "converged"
                break
            examples, flops = examples + used, flops + cost
            records.append(self._record(step, examples, flops, lr, gnorm))
        if records and records[-1].eval is None:  # the last step is always evaluated
            records[-1].eval = self.evaluate()
        return records, stopped

    def step_cost(self) -> tuple[int, float]:
        """(examples, FLOPs) of one step of the configured optimizer.

        Products of B rows cost 2·B·D·C, in integers: the former ``2·B/N · 2·N·D·C`` rounded B/N
        (e.g. 21/72), so a cap equal to one step's cost could stop the run before that step.
        """
        n = self.n
        if self.b.optimizer not in ("gd", "gd_exact"):
            return self._batch(), 2.0 * self.product_flops(self._batch())
        return n, (3.0 if self.b.optimizer == "gd_exact" else 2.0) * self.flops_per_product

    def _over_budget(self, examples: int, flops: float) -> str | None:
        per, cost = self.step_cost()
        return budget_stop(self.b, examples + per, flops + cost)

    def _batch(self) -> int:
        return min(self.b.batch_size, self.p.a.shape[0])

    def _step(self, step: int) -> tuple[float | None, float, int, float]:
        a, y, opt = self.p.a, self.p.y, self.b.optimizer
        if opt in ("gd", "gd_exact"):
            t = self.core  # A = QT: Aᵀ(Aw − Y) = Tᵀ(Tw − QᵀY) and ‖Ag‖ = ‖Tg‖
            g = 2.0 * (t.T @ (t @ self.w - self.c))  # scale the vector, not the matrix (exact either way)
            mean_g = g / self.n  # gradient of the mean loss, the one the recorded lr multiplies
            gnorm = float(mean_g.norm())
            if opt == "gd_exact":
                ag = float(((t @ g) ** 2).sum())
                if ag == 0.0:  # gradient in the null space: GD has converged exactly
                    return None, gnorm, 0, 0.0
                alpha = float(g.norm()) ** 2 / (2.0 * ag)  # exact line search along g
                self.w = self.w - alpha * g
                return alpha * self.n, gnorm, *self.step_cost()  # the same step along g/N
            lr = scheduled_lr(self.base_lr, step, self.b)
            self.w = self.w - lr * mean_g
            return lr, gnorm, *self.step_cost()
        if self._batch() >= a.shape[0]:  # full batch: no sampling needed
            ab, yb = a, y
        else:
            idx = torch.randperm(a.shape[0], generator=self.gen)[: self._batch()]
            ab, yb = a.index_select(0, idx), y.index_select(0, idx)
        # gradient of the batch mean squared error; the exact factor 2 scales the vector, not the
        # matrix, which gives bit for bit the values of (2Aᵀ)(Aw − Y) / n at a fraction of the cost
        g = 2.0 * (ab.T @ (ab @ self.w - yb)) / len(ab)
        lr = scheduled_lr(self.base_lr, step, self.b)
        if opt == "sgd":
            self.w = self.w - lr * g
        elif opt == "sgd_momentum":  # torch.optim.SGD: buf = g at the first step, then μ·buf + g
            self.m = g.clone() if self.t == 0 else self.b.momentum * self.m + g
            self.t += 1
            self.w = self.w - lr * self.m
        else:
            if opt == "adamw":  # decoupled decay first, as torch.optim.AdamW
                self.w = self.w * (1.0 - lr * self.b.weight_decay)
            self.t += 1
            self.m = 0.9 * self.m + 0.1 * g
            self.v = 0.999 * self.v + 0.001 * g * g
            m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
            self.w = self.w - lr * m_hat / (v_hat.sqrt() + 1e-8)
        return lr, float(g.norm()), *self.step_cost()


def budget_stop(budget: AttackBudget, examples: int, flops: float) -> str | None:
    """The budget dimension that ``examples`` / ``flops`` would exceed, or None."""
    if budget.max_examples is not None and examples > budget.max_examples:
        return "examples"
    if budget.max_flops is not None and flops > budget.max_flops:
        return "flops"
    return None


class ClosedFormProbe(Attack):
    """The attacker's best linear head in one step: w* = A⁺Y (least squares, min-norm)."""

    name = "closed_form_probe"
    Config = LinearProbeConfig

    def __init__(self, config: LinearProbeConfig | None = None, **overrides: object) -> None:
        self.inner = LinearProbe(config, **overrides)

    def __call__(
        self,
        model: ImmunizableModel,
        task: Task[Split],
        budget: AttackBudget,
        *,
        seed: int,
        cache: ProbeCache | None = None,
    ) -> AttackResult:
        """Solve the probe in closed form; the budget must allow one step (``cache``: as LinearProbe)."""
        if budget.steps < 1:
            raise ConfigError("closed_form_probe needs a budget of at least 1 step")
        cfg = self.inner.config
        prob = self.inner.problem(model, task, cache)
        w0 = torch.zeros(prob.a.shape[1], prob.y.shape[1], dtype=torch.float64)
        run = _ProbeRun(
            prob, budget, w0, prob.factor(cfg.rtol), torch.Generator(), record_accuracy=cfg.record_accuracy
        )
        n, d = prob.a.shape
        flops = 2.0 * n * d * min(n, d) + run.flops_per_product  # SVD-based solve, order of magnitude
        info = {
            "split": cfg.split,
            "optimizer": "closed_form",
            "flops_method": "analytic: SVD solve ~2·N·D·min(N,D)",
        }
        attacked = copy.deepcopy(model)
        stop = budget_stop(budget, n, flops)
        if stop is not None:  # the solve needs every row once; a smaller budget cannot afford it
            attacked.head = _head_from(run.w, attacked)
            return AttackResult(attacked, run.initial, [], stop, info)
        run.w = run.w_star.clone()
        attacked.head = _head_from(run.w, attacked)
        final = run._record(1, n, flops, float("nan"), 0.0)
        final.eval = run.evaluate()
        return AttackResult(attacked, run.initial, [final], "converged", info)
