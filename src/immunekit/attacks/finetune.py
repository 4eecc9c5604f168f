"""Fine-tuning attacks on torch models: which parameters move, on which data (loop in ``_loop.py``).

* ``head_reset_probe``: a fresh random linear head on frozen features, trained with a torch
  optimizer (the stochastic twin of ``linear_probe``; the extractor is never touched). The features
  are those of the frozen extractor in eval mode, computed once per (extractor state, task, split)
  and shared between runs (:class:`~immunekit.attacks.linear_probe.ProbeCache`, bit-for-bit state
  match): the loop then trains ``head(Φ)`` on them, so dropout draws no noise into a frozen trunk,
  batch-norm statistics never move, and a search's probe trials forward the trunk once, not at
  every step. FLOPs are counted for the head's steps (as ``linear_probe`` counts them), tokens for
  the rows each step reads; the feature pass is described in ``info['features']``.
* ``full_finetune``: every parameter moves (optionally from a fresh head, ``reset_head``).
* ``partial_finetune``: the last ``blocks`` parameterised child modules of the extractor plus the
  head move; earlier blocks stay bit-identical.
* ``relearn``: benign warm-up on ``primary`` for ``warmup_steps_benign`` steps, then fine-tuning on a
  seeded subset of ``subset_size`` rows of the attack split (the "relearning" threat of Rosati et
  al., arXiv 2402.16382: a little harmful data after benign training). Both phases count against
  the budget, share one optimizer and lr schedule, and are listed in ``info['phases']``.

Randomness: a run with ``seed`` draws a fresh head from its ``init`` stream, the relearn rows from
its ``subset`` stream and the mini-batch order from its ``batches`` stream
(:func:`~immunekit.attacks.base.rng_streams`): three generators seeded from (seed, name), so no
draw repeats or shifts another (one seed in two generators would make the relearn subset and the
first batch order the same permutation).

Every attack deep-copies its input (the input's state_dict is left bit-identical), trains the copy
with :func:`immunekit.attacks._loop.run_loop` and returns it; see that module for the loss, the
optimizers (``gd_exact`` is rejected: exact line search exists only for ``linear_probe``), the budget
accounting, FLOPs and the harm curve (``eval = {"harm", "utility", "loss"}`` at step 0, every
``eval_every`` steps and the last step). The default lr is 1e-3 when ``budget.lr`` is None.

Example:
    >>> from immunekit.attacks import ATTACKS, AttackBudget
    >>> from immunekit.data.synthetic import gaussian_spectra
    >>> from immunekit.models.base import linear_model
    >>> task = gaussian_spectra(dim=4, n=64, seed=0)
    >>> budget = AttackBudget(steps=5, optimizer="sgd")
    >>> res = ATTACKS.get("full_finetune")()(linear_model(4), task, budget, seed=0)
    >>> len(res.records), res.stopped_by, [s for s, _ in res.harm_curve()]
    (5, 'steps', [0, 5])

"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from immunekit.attacks._loop import LoopOutput, Phase, check_optimizer, run_loop
from immunekit.attacks.base import (
    Attack,
    AttackBudget,
    AttackResult,
    default_eval_split,
    rng_streams,
    split_of,
)
from immunekit.attacks.functional import Params
from immunekit.attacks.linear_probe import ProbeCache
from immunekit.config import load_config
from immunekit.data.task import OPTIONAL_SPLITS, SPLITS, Dataset, Split, Task, take
from immunekit.errors import ConfigError
from immunekit.models.base import FeatureHead, ImmunizableModel

log = logging.getLogger(__name__)

PREPARE_STREAMS: tuple[str, ...] = ("init", "subset")
"""Random streams of an attack's preparation (:func:`~immunekit.attacks.base.rng_streams`); batches
come from the loop's ``batches`` stream."""

TrainSplit = Literal["attack", "primary", "attack_disjoint", "attack_cross", "val_harmful"]
EvalSplit = Literal["eval_harmful", "eval_primary", "val_harmful"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings every torch-loop attack shares."""

    split: TrainSplit = field(
        default="attack",
        metadata={"help": "training split (attack = harmful data; primary = benign fine-tuning)"},
    )
    eval_split: EvalSplit | None = field(
        default=None,
        metadata={
            "help": "held-out split of the harm curve (default: eval_primary for split=primary, "
            "else eval_harmful)"
        },
    )
    loss_on: Literal["split", "batch"] = field(
        default="batch",
        metadata={
            "help": "recorded loss: the mini-batch loss before each step (free, what a training loop logs), "
            "or the whole training split after it (a forward pass over the split per step)"
        },
    )

    def eval_split_name(self) -> str:
        """The configured eval split, or the default for ``split``."""
        return self.eval_split or default_eval_split(self.split)


@dataclass(frozen=True, kw_only=True)
class HeadResetProbeConfig(TrainConfig):
    """Settings of :class:`HeadResetProbe`."""

    head_init: Literal["uniform", "zeros"] = field(
        default="uniform",
        metadata={"help": "fresh head: uniform(±1/√D) like nn.Linear's default (seeded), or zeros"},
    )
    bias: bool = field(default=False, metadata={"help": "give the fresh head a bias (linear_probe has none)"})


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainConfig):
    """Settings of :class:`FullFinetune`."""

    reset_head: bool = field(
        default=False, metadata={"help": "replace the head by a fresh uniform(±1/√D) one first (seeded)"}
    )


@dataclass(frozen=True, kw_only=True)
class PartialFinetuneConfig(FinetuneConfig):
    """Settings of :class:`PartialFinetune`."""

    blocks: int = field(
        default=1, metadata={"help": "last k parameterised child modules of the extractor to train (+ head)"}
    )

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise ConfigError(
                f"blocks must be >= 1, got {self.blocks}; use head_reset_probe to train the head only"
            )


@dataclass(frozen=True, kw_only=True)
class RelearnConfig(FinetuneConfig):
    """Settings of :class:`Relearn`."""

    warmup_steps_benign: int = field(
        default=10, metadata={"help": "benign steps on the primary split before the harmful phase"}
    )
    subset_size: int = field(
        default=64, metadata={"help": "rows of the attack split (seeded subset) fine-tuned on afterwards"}
    )

    def __post_init__(self) -> None:
        if self.warmup_steps_benign < 0:
            raise ConfigError(f"warmup_steps_benign must be >= 0, got {self.warmup_steps_benign}")
        if self.subset_size < 1:
            raise ConfigError(f"subset_size must be >= 1, got {self.subset_size}")


def fresh_head(
    model: ImmunizableModel, outputs: int, gen: torch.Generator, *, init: str = "uniform", bias: bool = False
) -> nn.Linear:
    """A new ``nn.Linear(D, outputs)`` on the model's features, drawn from ``gen``.

    ``uniform`` draws every entry from U(−1/√D, 1/√D) (the distribution of ``nn.Linear``'s default
    initialisation, here from a seeded generator); ``zeros`` is the linear probe's w_0 = 0.
    """
    first = next(model.parameters())
    d = int(model.head.in_features) if isinstance(model.head, nn.Linear) else 0
    if d == 0:
        raise ConfigError(
            f"cannot infer the feature dimension of {type(model).__name__}: its head is not an nn.Linear"
        )
    head = nn.Linear(d, outputs, bias=bias, dtype=first.dtype, device=first.device)
    with torch.no_grad():
        for p in head.parameters():
            if init == "zeros":
                p.zero_()
            else:
                u = torch.rand(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(((2.0 * u - 1.0) / d**0.5).to(p.dtype))
    return head


def head_outputs(task: Task[Split], split: str) -> int:
    """Outputs a fresh head needs: target columns (mse), 1 for binary ce (ℓ2 threat model), else C."""
    data = split_of(task, split)
    if task.loss == "mse":
        return int(data.y.reshape(len(data), -1).shape[1])
    top = max(int(split_of(task, s).y.max()) for s in (split, "eval_harmful", "eval_primary"))
    return 1 if top <= 1 else top + 1


class _TorchAttack(Attack):
    """Shared plumbing: config loading, the copy, and the loop; subclasses choose params and phases."""

    Config: ClassVar[type[TrainConfig]]

    def __init__(self, config: TrainConfig | None = None, **overrides: Any) -> None:
        base = {} if config is None else {k: getattr(config, k) for k in config.__dataclass_fields__}
        self.config = load_config(self.Config, {**base, **overrides}, where="attack")

    supports_unroll: ClassVar[bool] = True

    def __call__(
        self, model: ImmunizableModel, task: Task[Split], budget: AttackBudget, *, seed: int
    ) -> AttackResult:
        """Attack a deep copy of ``model``; the input is never modified (any :class:`Split` type)."""
        attacked, params, phases, extra = self._setup(model, task, budget, seed)
        out = self._loop(attacked, params, task, budget, phases, seed)
        return self.result(attacked, out, extra)

    def unroll(
        self,
        model: ImmunizableModel,
        task: Task[Split],
        budget: AttackBudget,
        *,
        seed: int,
        theta: Mapping[str, Tensor] | None = None,
        create_graph: bool = False,
    ) -> tuple[AttackResult, Params]:
        """The same attack run through ``torch.func.functional_call`` (see :meth:`Attack.unroll`).

        The copy, the fresh head, the batches, the budget meter and the update rule are those of
        :meth:`__call__`; only the driver differs: the moving parameters are a ``{name: tensor}``
        dict θ, so with ``create_graph=True`` the returned θ_K is a differentiable function of θ₀.

        Args:
            model: the model to attack (never modified).
            task: as for :meth:`__call__`.
            budget: as for :meth:`__call__`.
            seed: as for :meth:`__call__`.
            theta: start values for some of the moving parameters, by the names of
                :meth:`~torch.nn.Module.named_parameters` (e.g. a defender's parameters, through
                which gradients should flow); the others start from the prepared copy.
            create_graph: keep the graph through every step (second order).

        Returns:
            ``(result, θ_K)``: the :class:`AttackResult` (its model holds a detached θ_K) and the
            final parameters by name.

        Raises:
            ConfigError: a name in ``theta`` that is not a moving parameter of this attack.

        """
        if not self.supports_unroll:
            return super().unroll(model, task, budget, seed=seed, theta=theta, create_graph=create_graph)
        attacked, params, phases, extra = self._setup(model, task, budget, seed)
        names = {id(p): n for n, p in attacked.named_parameters()}
        start: dict[str, Tensor] = {names[id(p)]: p for p in params}
        unknown = sorted(set(theta or {}) - set(start))
        if unknown:
            raise ConfigError(
                f"theta names {unknown} are not parameters that {self.name!r} trains; use names from "
                f"{sorted(start)[:8]}{' ...' if len(start) > 8 else ''}"
            )
        start.update(theta or {})
        out = self._loop(attacked, params, task, budget, phases, seed, theta=start, create_graph=create_graph)
        assert out.params is not None  # the functional driver always returns θ
        return self.result(attacked, out, extra), out.params

    def _setup(
        self, model: ImmunizableModel, task: Task[Split], budget: AttackBudget, seed: int
    ) -> tuple[ImmunizableModel, list[nn.Parameter], list[Phase], dict[str, Any]]:
        check_optimizer(budget, self.name)
        attacked = copy.deepcopy(model)
        rngs = dict(zip(PREPARE_STREAMS, rng_streams(seed, *PREPARE_STREAMS), strict=True))
        return self.prepare(attacked, task, budget, rngs)

    def _loop(
        self,
        attacked: ImmunizableModel,
        params: list[nn.Parameter],
        task: Task[Split],
        budget: AttackBudget,
        phases: list[Phase],
        seed: int,
        **driver: Any,
    ) -> LoopOutput:
        return run_loop(
            attacked,
            params,
            task,
            budget,
            phases=phases,
            eval_split=self.config.eval_split_name(),
            seed=seed,
            attack=self.name,
            loss_on=self.config.loss_on,
            **driver,
        )

    def result(self, attacked: ImmunizableModel, out: LoopOutput, extra: dict[str, Any]) -> AttackResult:
        info = {"split": self.config.split, "eval_split": self.config.eval_split_name(), **out.info, **extra}
        return AttackResult(attacked, out.initial, out.records, out.stopped_by, info)

    def prepare(
        self,
        model: ImmunizableModel,
        task: Task[Split],
        budget: AttackBudget,
        rngs: Mapping[str, torch.Generator],
    ) -> tuple[ImmunizableModel, list[nn.Parameter], list[Phase], dict[str, Any]]:
        """(model to train, parameters that move, phases, extra info); default: all params, one phase.

        ``rngs`` holds the run's ``init`` (fresh heads) and ``subset`` (relearn rows) streams
        (:data:`PREPARE_STREAMS`); the loop draws its batches from a third one.
        """
        cfg = self.config
        if getattr(cfg, "reset_head", False):
            model.head = fresh_head(model, head_outputs(task, cfg.split), rngs["init"])
        phase = Phase("attack", cfg.split, split_of(task, cfg.split), budget.steps)
        return model, list(model.parameters()), [phase], {}


class HeadResetProbe(_TorchAttack):
    """Fresh random head on frozen features, trained by a torch optimizer; the extractor never moves.

    The frozen features (eval mode) come from :attr:`features_cache`, shared by every run in the
    process: a hit needs the same task object, split names, model class and training flag, and a
    bit-for-bit equal state outside the head, so a changed extractor never reuses stale features.
    """

    name = "head_reset_probe"
    Config = HeadResetProbeConfig
    config: HeadResetProbeConfig  # what __init__ loads: the subclass's own Config
    features_cache: ClassVar[ProbeCache] = ProbeCache(max_entries=2)

    def _loop(
        self,
        attacked: ImmunizableModel,
        params: list[nn.Parameter],
        task: Task[Split],
        budget: AttackBudget,
        phases: list[Phase],
        seed: int,
        **driver: Any,
    ) -> LoopOutput:
        """The loop on ``head(Φ)`` over the cached features of the train, eval and utility splits."""
        split, eval_split = self.config.split, self.config.eval_split_name()
        prob = self.features_cache.problem(attacked, task, split, eval_split)
        dtype = next(attacked.head.parameters()).dtype

        def on_features(name: str, feats: Tensor | None) -> Dataset:
            raw = split_of(task, name)
            assert feats is not None  # probe_problem always returns the utility features
            # rows without ids are hashed by content; features of distinct rows may coincide, so
            # such rows get positional ids (the task's own disjointness was checked on its inputs)
            ids = tuple(raw.ids) or tuple(f"{name}:{i}" for i in range(len(raw)))
            return Dataset(feats.to(dtype), raw.y, ids)

        # the loop reads three splits; the others become empty feature splits, so the task keeps
        # one input shape and no split's inputs are forwarded for nothing
        dim = int(prob.a.shape[1])
        unused: dict[str, Any] = {
            name: None
            if name in OPTIONAL_SPLITS
            else Dataset(torch.zeros(0, dim, dtype=dtype), split_of(task, name).y[:0])
            for name in SPLITS
        }
        on_task = replace(
            task,
            **{
                **unused,
                split: on_features(split, prob.a),
                eval_split: on_features(eval_split, prob.eval_a),
                "eval_primary": on_features("eval_primary", prob.util_a),
            },
        )
        moved = [replace(p, data=split_of(on_task, p.split), tokens=p.tokens_per_example()) for p in phases]
        out = super()._loop(FeatureHead(attacked.head), params, on_task, budget, moved, seed, **driver)
        # a cache hit must not show in the results: a run is the same whether or not it was cached
        out.info["features"] = {"mode": "eval", "dim": dim}
        return out

    def prepare(
        self,
        model: ImmunizableModel,
        task: Task[Split],
        budget: AttackBudget,
        rngs: Mapping[str, torch.Generator],
    ) -> tuple[ImmunizableModel, list[nn.Parameter], list[Phase], dict[str, Any]]:
        cfg = self.config
        outputs = head_outputs(task, cfg.split)
        model.head = fresh_head(model, outputs, rngs["init"], init=cfg.head_init, bias=cfg.bias)
        phase = Phase("attack", cfg.split, split_of(task, cfg.split), budget.steps)
        return model, list(model.head.parameters()), [phase], {"head_init": cfg.head_init}


class FullFinetune(_TorchAttack):
    """Every parameter of the model moves."""

    name = "full_finetune"
    Config = FinetuneConfig


def extractor_blocks(extractor: nn.Module) -> list[nn.Module]:
    """Parameterised child modules of the extractor in order, or ``[extractor]`` if it has none."""
    kids = [m for m in extractor.children() if any(True for _ in m.parameters())]
    if kids:
        return kids
    return [extractor] if any(True for _ in extractor.parameters()) else []


class PartialFinetune(_TorchAttack):
    """The last ``blocks`` parameterised blocks of the extractor and the head move; the rest is frozen."""

    name = "partial_finetune"
    Config = PartialFinetuneConfig
    config: PartialFinetuneConfig  # what __init__ loads: the subclass's own Config

    def prepare(
        self,
        model: ImmunizableModel,
        task: Task[Split],
        budget: AttackBudget,
        rngs: Mapping[str, torch.Generator],
    ) -> tuple[ImmunizableModel, list[nn.Parameter], list[Phase], dict[str, Any]]:
        cfg = self.config
        model, _, phases, extra = super().prepare(model, task, budget, rngs)
        blocks = extractor_blocks(model.extractor)
        if cfg.blocks > len(blocks):
            raise ConfigError(
                f"partial_finetune blocks={cfg.blocks} but the extractor of {type(model).__name__} has "
                f"{len(blocks)} parameterised block(s); use blocks <= {len(blocks)} or full_finetune"
            )
        chosen = blocks[len(blocks) - cfg.blocks :]
        params = [p for b in chosen for p in b.parameters()] + list(model.head.parameters())
        return model, params, phases, {**extra, "blocks": cfg.blocks, "blocks_available": len(blocks)}


class Relearn(_TorchAttack):
    """Benign warm-up on ``primary``, then full fine-tuning on a seeded subset of the attack split."""

    name = "relearn"
    Config = RelearnConfig
    config: RelearnConfig  # what __init__ loads: the subclass's own Config

    def prepare(
        self,
        model: ImmunizableModel,
        task: Task[Split],
        budget: AttackBudget,
        rngs: Mapping[str, torch.Generator],
    ) -> tuple[ImmunizableModel, list[nn.Parameter], list[Phase], dict[str, Any]]:
        cfg = self.config
        if cfg.warmup_steps_benign >= budget.steps:
            raise ConfigError(
                f"relearn warmup_steps_benign={cfg.warmup_steps_benign} leaves no harmful step in a "
                f"budget of {budget.steps} steps; use warmup_steps_benign < budget.steps"
            )
        if cfg.reset_head:
            model.head = fresh_head(model, head_outputs(task, cfg.split), rngs["init"])
        data = split_of(task, cfg.split)
        rows = torch.randperm(len(data), generator=rngs["subset"])[: cfg.subset_size].sort().values
        if cfg.subset_size >= len(data):
            log.info(
                "relearn: subset_size %d >= %d rows of %r: the whole split",
                cfg.subset_size,
                len(data),
                cfg.split,
            )
        subset = take(data, rows)  # in-memory rows are copied; a streaming split gets a view
        phases = [
            Phase("benign", "primary", split_of(task, "primary"), cfg.warmup_steps_benign),
            Phase("relearn", cfg.split, subset, budget.steps - cfg.warmup_steps_benign),
        ]
        return model, list(model.parameters()), phases, {"subset_rows": rows.tolist()}
